"""Offline checks of the Helm chart in helm/pgfanout, run by scripts/check-helm.sh.

No cluster and no helm binary: helm-python-sdk (Helm's official Go SDK behind
a C ABI) lints the chart, checks values against values.schema.json and renders
the templates; kubernetes-validate checks every rendered object against the
Kubernetes OpenAPI schemas in strict mode (an unknown field fails); our own
subset schema checks the ServiceMonitor, a CRD that kubernetes-validate has no
schema for; chart_properties.py asserts what the gateway depends on. The
guards are also fed bad input, to show that they fail when they should.

Prints one line per check and closes with `helm: N passed, M failed`; exits 1
on any failure.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import latest_version

import chart_properties as props
import dashboard_checks as dashboards

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHART = ROOT / "helm" / "pgfanout"
DASHBOARD = CHART / "dashboards" / "pgfanout.json"
RELEASE, NAMESPACE = "rt", "realtime"


@dataclass
class ValueSet:
    """A values file to render, and what its rendering must contain."""

    name: str
    file: str | None
    kinds: set[str]
    secret_name: str | None
    connections_metric: bool = False
    spread: bool = True
    min_kube: str | None = None  # when the set needs a newer Kubernetes than the chart
    dashboards: bool = False  # renders the Grafana dashboard ConfigMap


VALUE_SETS = [
    ValueSet(
        "default", None,
        {"ServiceAccount", "ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
        secret_name=None,
    ),
    ValueSet(
        "production", "ci/production-values.yaml",
        {"ServiceAccount", "ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler",
         "PodDisruptionBudget", "ServiceMonitor"},
        secret_name="pgfanout-credentials", connections_metric=True, dashboards=True,
    ),
    # The native preStop sleep action is on by default from Kubernetes 1.30.
    ValueSet(
        "minimal", "ci/minimal-values.yaml", {"ConfigMap", "Secret", "Service", "Deployment"},
        secret_name="rt-pgfanout", spread=False, min_kube="1.30.0",
    ),
]

# Values the README may document as one row: free-form Kubernetes objects.
FREE_FORM = {
    "resources", "dashboards.labels", "autoscaling.behavior", "strategy", "topologySpreadConstraints",
    "podSecurityContext", "securityContext",
}


@dataclass
class Report:
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    def check(self, name: str, fn: Callable[[], list[str] | None]) -> Any:
        """Run one check: it returns problems (or raises); none means pass."""
        try:
            problems = fn() or []
        except Exception as e:  # a crash in a check is a failed check, with its cause
            problems = [f"{type(e).__name__}: {e}"]
            if "-v" in sys.argv:
                traceback.print_exc()
        if problems:
            self.failed.append(name)
            print(f"FAIL {name}")
            for p in problems:
                print(f"     - {p}")
        else:
            self.passed += 1
            print(f"ok   {name}")


def chart_min_kube() -> str:
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    m = re.match(r"^>=\s*v?(\d+\.\d+\.\d+)", constraint)
    if not m:
        raise SystemExit(f"Chart.yaml kubeVersion {constraint!r}: expected '>=X.Y.Z...'")
    return m.group(1)


def load_values(vs: ValueSet) -> dict[str, Any]:
    return yaml.safe_load((CHART / vs.file).read_text()) if vs.file else {}


def render(chart: helm.Chart, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Rendered objects and NOTES.txt; raises what Helm raises."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objs, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objs.append(doc)
    return objs, notes


def lint(values: dict[str, Any], kube: str) -> list[str]:
    """Warnings and errors of `helm lint`.

    In lint mode Helm only logs a template's `fail` (and `required`) instead of
    failing, so the log is read too: a chart guard that fires is an error.
    """
    with captured_stderr() as log:
        result = helm.lint(str(CHART), values, kube_version=f"v{kube}")
    problems = [f"{m['path']}: {m['error']}" for m in result["messages"] if m["severity"] >= 2]
    problems += list(result.get("errors") or [])
    problems += [line for line in "".join(log).splitlines() if "fail" in line or "required" in line]
    return problems


def kube_schema(objs: list[dict[str, Any]], version: str) -> list[str]:
    problems = []
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD: checked by servicemonitor_schema below
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(e.message)
    return problems


def servicemonitor_schema(objs: list[dict[str, Any]]) -> list[str]:
    schema = json.loads((HERE / "servicemonitor.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for obj in props.of_kind(objs, "ServiceMonitor"):
        for err in validator.iter_errors(obj):
            problems.append(f"{'.'.join(map(str, err.path))}: {err.message}")
    return problems


def check_value_set(report: Report, chart: helm.Chart, vs: ValueSet, min_kube: str) -> list[dict[str, Any]]:
    values = load_values(vs)
    kube = vs.min_kube or min_kube
    report.check(f"{vs.name}: helm lint (kube v{kube})", lambda: lint(values, kube))
    report.check(f"{vs.name}: values.schema.json", lambda: chart.validate_schema(values))
    rendered: dict[str, Any] = {}

    def do_render() -> list[str]:
        rendered["objs"], rendered["notes"] = render(chart, values)
        return [] if rendered["notes"].strip() else ["NOTES.txt rendered empty"]

    report.check(f"{vs.name}: render", do_render)
    objs = rendered.get("objs")
    if objs is None:
        return []

    def kinds() -> list[str]:
        got = {o["kind"] for o in objs}
        return [] if got == vs.kinds else [f"rendered {sorted(got)}, want {sorted(vs.kinds)}"]

    report.check(f"{vs.name}: rendered kinds", kinds)
    for version in sorted({kube, latest_version()}, key=lambda v: tuple(map(int, v.split(".")))):
        report.check(f"{vs.name}: kubernetes schemas v{version} (strict, {len(objs)} objects)",
                     lambda v=version: kube_schema(objs, v))
    if "ServiceMonitor" in vs.kinds:
        report.check(f"{vs.name}: ServiceMonitor against scripts/helm/servicemonitor.schema.json",
                     lambda: servicemonitor_schema(objs))
    report.check(f"{vs.name}: dashboards ConfigMap {'carries dashboards/pgfanout.json' if vs.dashboards else 'absent'}",
                 lambda: dashboards.configmap_problems(objs, DASHBOARD, vs.dashboards))
    report.check(f"{vs.name}: no session affinity", lambda: props.no_session_affinity(objs))
    report.check(f"{vs.name}: terminationGracePeriodSeconds >= preStop + drain + grace",
                 lambda: props.termination_grace(objs))
    report.check(f"{vs.name}: probes on /health and /ready", lambda: props.probes(objs))
    report.check(f"{vs.name}: ConfigMap and Secret keys are PGFANOUT_*, logs json",
                 lambda: props.config_names(objs))
    report.check(f"{vs.name}: env from ConfigMap/Secret, NODE_ID from pod name",
                 lambda: props.env_sources(objs, vs.secret_name))
    report.check(f"{vs.name}: non-root, read-only, no caps, seccomp", lambda: props.security(objs))
    report.check(f"{vs.name}: selectors agree", lambda: props.selectors(objs))
    report.check(f"{vs.name}: PDB sets one of min/maxUnavailable", lambda: props.disruption_budget(objs))
    if vs.spread:
        report.check(f"{vs.name}: spread across nodes and zones", lambda: props.topology_spread(objs))
    if "HorizontalPodAutoscaler" in vs.kinds:
        report.check(f"{vs.name}: HPA metrics", lambda: props.hpa_metrics(objs, vs.connections_metric))
    return objs


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Capture file descriptor 2, where Helm's Go logger writes; the text lands in the list."""
    sys.stderr.flush()
    saved = os.dup(2)
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read())


def must_refuse(chart: helm.Chart, values: dict[str, Any], error: type, fragment: str) -> list[str]:
    """Rendering these values must fail with `error` mentioning `fragment`."""
    try:
        with captured_stderr():  # Helm logs the `fail` it meets
            render(chart, values)
    except error as e:
        return [] if fragment in str(e) else [f"failed for another reason: {e}"]
    return [f"rendered {values} without complaint"]


GUARDS = [
    ("schema refuses a misspelt top-level value", {"autoscalling": {"enabled": True}},
     helm.HelmValuesError, "autoscalling"),
    ("schema refuses an extraConfig name without PGFANOUT_", {"extraConfig": {"LOG": "debug"}},
     helm.HelmValuesError, "'LOG' does not match"),
    ("schema refuses runAsNonRoot false", {"podSecurityContext": {"runAsNonRoot": False}},
     helm.HelmValuesError, "runAsNonRoot"),
    ("schema refuses a log format other than json/text", {"config": {"logFormat": "xml"}},
     helm.HelmValuesError, "logFormat"),
    ("render refuses terminationGracePeriodSeconds below preStop + drain + grace",
     {"shutdown": {"terminationGracePeriodSeconds": 30}}, helm.HelmRenderError, "would kill pgfanout"),
    ("render refuses a drain window as long as the shutdown grace",
     {"shutdown": {"drainWindowSeconds": 25}}, helm.HelmRenderError, "must be shorter"),
    ("schema refuses a PDB maxUnavailable that is no count or percentage",
     {"podDisruptionBudget": {"maxUnavailable": "one"}}, helm.HelmValuesError, "maxUnavailable"),
    ("render refuses extraConfig overriding a chart setting",
     {"extraConfig": {"PGFANOUT_DRAIN_WINDOW": "1s"}}, helm.HelmRenderError, "sets it already"),
]


def broken(objs: list[dict[str, Any]], kind: str, mutate: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    out = copy.deepcopy(objs)
    mutate(props.settings(out) if kind == "ConfigMap" else props.one(out, kind))
    return out


def pod_spec(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["template"]["spec"]


# Broken renderings the property checks must notice (so none of them is vacuous).
MUTANTS: list[tuple[str, Callable[[list[dict[str, Any]]], list[str]], str, Callable[[dict[str, Any]], None]]] = [
    ("sessionAffinity ClientIP", props.no_session_affinity, "Service",
     lambda s: s["spec"].update(sessionAffinity="ClientIP")),
    ("terminationGracePeriodSeconds 30", props.termination_grace, "Deployment",
     lambda d: pod_spec(d).update(terminationGracePeriodSeconds=30)),
    ("readiness probe on /health", props.probes, "Deployment",
     lambda d: pod_spec(d)["containers"][0]["readinessProbe"]["httpGet"].update(path="/health")),
    ("ConfigMap key LOG_LEVEL", props.config_names, "ConfigMap",
     lambda c: c["data"].update(LOG_LEVEL="debug")),
    ("runAsNonRoot false", props.security, "Deployment",
     lambda d: pod_spec(d)["securityContext"].update(runAsNonRoot=False)),
    ("NODE_ID from a literal", lambda o: props.env_sources(o, None), "Deployment",
     lambda d: pod_spec(d)["containers"][0].update(env=[{"name": "PGFANOUT_NODE_ID", "value": "a"}])),
]


def check_guards(report: Report, chart: helm.Chart, default_objs: list[dict[str, Any]]) -> None:
    for name, values, error, fragment in GUARDS:
        report.check(f"guard: {name}", lambda v=values, e=error, f=fragment: must_refuse(chart, v, e, f))
    for name, values in [("a template fail", {"shutdown": {"terminationGracePeriodSeconds": 30}}),
                         ("a schema violation", {"autoscalling": {"enabled": True}})]:
        report.check(f"guard: lint reports {name}",
                     lambda v=values: [] if lint(v, chart_min_kube()) else ["lint found nothing"])
    if not default_objs:
        return
    for name, prop, kind, mutate in MUTANTS:
        def caught(prop=prop, kind=kind, mutate=mutate) -> list[str]:
            return [] if prop(broken(default_objs, kind, mutate)) else ["the property check let it pass"]
        report.check(f"guard: property check catches {name}", caught)


def value_leaves(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node and prefix not in FREE_FORM:
        out: set[str] = set()
        for k, v in node.items():
            out |= value_leaves(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix}


def readme_documents_values() -> list[str]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    rows = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", readme, re.M))
    leaves = value_leaves(values)
    return [f"README.md has no row for `{k}`" for k in sorted(leaves - rows)] + [
        f"README.md documents `{k}`, which values.yaml does not have" for k in sorted(rows - leaves)
    ]


# Settings that belong in the Secret (envFrom loads any such key without a
# chart change), and the one the pod sets itself.
SECRET_SETTING = re.compile(r"^PGFANOUT_\w*(_URL|_SECRET|_KEY|_KEYS|_TOKEN|_PASSWORD)$")
POD_SETTINGS = {"PGFANOUT_NODE_ID"}


def chart_covers_every_setting(default_objs: list[dict[str, Any]]) -> list[str]:
    """Every PGFANOUT_* setting pgfanout reads (src/config/) has its place in the chart."""
    config_src = "\n".join(p.read_text() for p in sorted((ROOT / "src" / "config").glob("*.rs")))
    settings = set(re.findall(r'env\s*=\s*"(PGFANOUT_[A-Z0-9_]+)"', config_src))
    if not settings:
        return ["no `env = \"PGFANOUT_...\"` found in src/config/"]
    in_configmap = set(props.settings(default_objs)["data"]) if default_objs else set()
    in_configmap |= {"PGFANOUT_CHANNELS"}  # rendered only when config.channels is set
    missing = sorted(settings - in_configmap - POD_SETTINGS - {s for s in settings if SECRET_SETTING.match(s)})
    return [f"{name} is read by pgfanout but the chart does not set it: add it to config in "
            "helm/pgfanout (values.yaml, values.schema.json, templates/configmap.yaml, README.md)"
            for name in missing]


def dockerfile_matches_chart() -> list[str]:
    """The image the chart runs: its port and user agree with the chart's defaults."""
    text = (ROOT / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    problems = []
    expose = re.findall(r"^EXPOSE\s+(\d+)", text, re.M)
    if expose != [str(values["containerPort"])]:
        problems.append(f"EXPOSE {expose}, chart containerPort {values['containerPort']}")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    uid = str(values["podSecurityContext"]["runAsUser"])
    if not users or users[-1].split(":")[0] != uid:
        problems.append(f"final USER {users[-1:] or None}, chart runAsUser {uid} (numeric, for runAsNonRoot)")
    if "cargo build --release --locked" not in text:
        problems.append("the builder does not run cargo build --release --locked")
    if not re.search(r'^ENTRYPOINT\s+\[\s*"[^"]*pgfanout"', text, re.M):
        problems.append("ENTRYPOINT is not the pgfanout binary (exec form)")
    return problems


def check_dashboard(report: Report) -> None:
    dash = json.loads(DASHBOARD.read_text())
    known = dashboards.readme_metrics(ROOT)
    report.check(f"dashboard: {len(list(dashboards.all_panels(dash['panels'])))} panels on "
                 f"{len(known)} exported metrics, per pod",
                 lambda: dashboards.dashboard_problems(dash, known))
    for name, mutate in dashboards.MUTANTS:
        report.check(f"guard: dashboard check catches {name}",
                     lambda m=mutate: [] if dashboards.dashboard_problems(dashboards.mutant(dash, m), known)
                     else ["the dashboard check let it pass"])


def main() -> int:
    report = Report()
    min_kube = chart_min_kube()
    print(f"helm-python-sdk {helm.helm_c_version()} (Helm SDK {helm.helm_sdk_version()}), "
          f"kubernetes-validate schemas v{min_kube}..v{latest_version()}")
    default_objs: list[dict[str, Any]] = []
    with helm.Chart.load(str(CHART)) as chart:
        for vs in VALUE_SETS:
            objs = check_value_set(report, chart, vs, min_kube)
            if vs.name == "default":
                default_objs = objs
        check_guards(report, chart, default_objs)
    report.check("README.md has a row for every value", readme_documents_values)
    check_dashboard(report)
    report.check("Dockerfile agrees with the chart", dockerfile_matches_chart)
    if (ROOT / "src" / "config" / "mod.rs").exists():
        report.check("chart sets every PGFANOUT_* setting in src/config/",
                     lambda: chart_covers_every_setting(default_objs))
    else:
        print("skip chart sets every PGFANOUT_* setting: no src/config/ to read them from")
    print(f"helm: {report.passed} passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
