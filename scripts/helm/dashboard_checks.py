"""Checks of the Grafana dashboard in helm/pgfanout/dashboards, run by check_chart.py.

The dashboard must parse, have the data source and pod variables, query only
metrics pgfanout exports (the Metrics table of the repository's README.md,
which tests/metrics_names.rs checks against a running node), filter every
query on the pod (`node=~"$node"`), and show what operators need: connections
per pod, deliveries/s, latency quantiles, drops, rate limits, reconnects. The
chart's dashboards ConfigMap must carry the file unchanged.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

Obj = dict[str, Any]

METRIC = re.compile(r"\b(pgfanout_[a-z0-9_]+)(\{[^}]*\})?")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
POD_FILTER = 'node=~"$node"'

# What the dashboard must show, and a metric that shows it.
REQUIRED = {
    "connections per pod": "pgfanout_connections_open",
    "deliveries/s": "pgfanout_messages_written_total",
    "delivery latency quantiles": "pgfanout_delivery_latency_seconds",
    "drops": "pgfanout_messages_dropped_total",
    "rate limits": "pgfanout_rate_limit_decisions_total",
    "Redis reconnects": "pgfanout_redis_reconnects_total",
    "Postgres reconnects": "pgfanout_postgres_reconnects_total",
}


def readme_metrics(root: Path) -> set[str]:
    """`pgfanout_<name>` for every row of the Metrics table in README.md."""
    text = (root / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\|\s*`([a-z0-9_]+)[{`]", section, re.M)
    return {f"pgfanout_{n}" for n in names}


def all_panels(panels: list[Obj]) -> Iterator[Obj]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels") or [])


def base_name(metric: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def dashboard_problems(dash: Obj, known: set[str]) -> list[str]:
    problems = []
    for key in ("title", "uid", "panels", "templating", "schemaVersion"):
        if not dash.get(key):
            problems.append(f"no {key}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append("no `datasource` variable of type datasource")
    if "node" not in variables:
        problems.append("no `node` (pod) variable")
    ids, queried = set(), set()
    for panel in all_panels(dash.get("panels") or []):
        pid, title = panel.get("id"), panel.get("title", "?")
        if pid in ids:
            problems.append(f"panel id {pid} used twice")
        ids.add(pid)
        grid = panel.get("gridPos") or {}
        if not grid or grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{title!r}: gridPos missing or wider than 24")
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"{title!r}: data source is not the ${{datasource}} variable")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{title!r}: no queries")
        for target in targets:
            expr = target.get("expr", "")
            found = METRIC.findall(expr)
            if not found:
                problems.append(f"{title!r}: query names no pgfanout metric: {expr!r}")
            for metric, selector in found:
                name = base_name(metric)
                queried.add(name)
                if name not in known:
                    problems.append(f"{title!r}: {metric} is not a metric pgfanout exports (README.md, Metrics)")
                if POD_FILTER not in selector:
                    problems.append(f"{title!r}: {metric} is not filtered on the pod ({POD_FILTER})")
    for what, metric in REQUIRED.items():
        if metric not in queried:
            problems.append(f"shows no {what} ({metric})")
    if not any("histogram_quantile" in t.get("expr", "") and "pgfanout_delivery_latency_seconds_bucket" in t.get("expr", "")
               for p in all_panels(dash.get("panels") or []) for t in p.get("targets") or []):
        problems.append("no histogram_quantile over pgfanout_delivery_latency_seconds_bucket")
    return problems


def configmap_problems(objs: list[Obj], dashboard_file: Path, want: bool) -> list[str]:
    """The dashboards ConfigMap is rendered when wanted, and carries the file unchanged."""
    maps = [o for o in objs if o.get("kind") == "ConfigMap" and o["metadata"]["name"].endswith("-dashboards")]
    if not want:
        return [f"rendered {len(maps)} dashboards ConfigMap(s) with dashboards.enabled false"] if maps else []
    if len(maps) != 1:
        return [f"rendered {len(maps)} dashboards ConfigMaps, want 1"]
    data = maps[0].get("data") or {}
    if list(data) != ["pgfanout.json"]:
        return [f"dashboards ConfigMap keys {list(data)}, want ['pgfanout.json']"]
    if json.loads(data["pgfanout.json"]) != json.loads(dashboard_file.read_text()):
        return ["the ConfigMap's pgfanout.json differs from dashboards/pgfanout.json"]
    return []


def _first_query(dash: Obj) -> Obj:
    return next(t for p in all_panels(dash["panels"]) for t in p.get("targets") or [])


# Broken dashboards the check must notice.
MUTANTS: list[tuple[str, Callable[[Obj], None]]] = [
    ("a query on a metric pgfanout does not export",
     lambda d: _first_query(d).update(expr='sum(rate(pgfanout_no_such_total{node=~"$node"}[5m]))')),
    ("a query without the pod filter",
     lambda d: _first_query(d).update(expr=_first_query(d)["expr"].replace(POD_FILTER, ""))),
    ("no latency panel",
     lambda d: d.update(panels=[p for p in d["panels"]
                               if "delivery_latency" not in json.dumps(p.get("targets", []))])),
]


def mutant(dash: Obj, mutate: Callable[[Obj], None]) -> Obj:
    out = copy.deepcopy(dash)
    mutate(out)
    return out
