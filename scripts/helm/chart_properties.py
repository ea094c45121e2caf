"""Properties of the rendered pgfanout chart that the gateway depends on.

Each check takes the rendered objects (a list of dicts) and returns a list of
problems, empty when the property holds. They are pure functions, so that
check_chart.py can also feed them broken objects and prove they notice.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

Obj = dict[str, Any]
Check = Callable[[list[Obj]], list[str]]

DURATION_PART = re.compile(r"(\d+)\s*(ms|s|m|h)")


def parse_seconds(text: str) -> float:
    """Seconds in a humantime duration such as `5s`, `1m 30s` or `500ms`."""
    compact = text.replace(" ", "")
    parts = DURATION_PART.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"not a duration this check understands: {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * scale[u] for n, u in parts)


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: list[Obj], kind: str) -> Obj:
    found = of_kind(objs, kind)
    if len(found) != 1:
        raise LookupError(f"expected one {kind}, rendered {len(found)}")
    return found[0]


def settings(objs: list[Obj]) -> Obj:
    """The ConfigMap of PGFANOUT_* settings (not the dashboards one)."""
    found = [o for o in of_kind(objs, "ConfigMap") if not o["metadata"]["name"].endswith("-dashboards")]
    if len(found) != 1:
        raise LookupError(f"expected one settings ConfigMap, rendered {len(found)}")
    return found[0]


def containers(deploy: Obj) -> list[Obj]:
    return deploy["spec"]["template"]["spec"]["containers"]


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every (path, key, value) in a nested structure."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def no_session_affinity(objs: list[Obj]) -> list[str]:
    """Nothing pins a client to a pod: Services say None, nothing else says more."""
    problems = []
    services = of_kind(objs, "Service")
    if not services:
        problems.append("no Service rendered")
    for svc in services:
        if svc["spec"].get("sessionAffinity") != "None":
            problems.append(
                f"Service/{svc['metadata']['name']}: sessionAffinity is "
                f"{svc['spec'].get('sessionAffinity')!r}, want 'None' spelled out"
            )
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        for path, key, value in walk(obj):
            if key == "sessionAffinity" and value != "None":
                problems.append(f"{name}{path} = {value!r}")
            if key == "sessionAffinityConfig":
                problems.append(f"{name}{path} is set")
            if isinstance(key, str) and re.search(r"affinity|sticky", key, re.I) and (
                ".annotations." in path
            ):
                problems.append(f"{name}{path}: affinity/stickiness annotation")
    return problems


def termination_grace(objs: list[Obj]) -> list[str]:
    """The kubelet never kills pgfanout mid-drain.

    terminationGracePeriodSeconds counts from the start of preStop, so it must
    cover preStop sleep + PGFANOUT_DRAIN_WINDOW + PGFANOUT_SHUTDOWN_GRACE, read
    from the ConfigMap that pgfanout itself reads.
    """
    deploy, cm = one(objs, "Deployment"), settings(objs)
    pod = deploy["spec"]["template"]["spec"]
    grace = pod.get("terminationGracePeriodSeconds")
    if grace is None:
        return ["terminationGracePeriodSeconds is not set (the default 30 s is not derived)"]
    try:
        drain = parse_seconds(cm["data"]["PGFANOUT_DRAIN_WINDOW"])
        hard = parse_seconds(cm["data"]["PGFANOUT_SHUTDOWN_GRACE"])
    except (KeyError, ValueError) as e:
        return [f"ConfigMap: drain window or shutdown grace unusable: {e}"]
    pre_stop = pre_stop_seconds(containers(deploy)[0])
    if pre_stop is None:
        return ["no preStop sleep: endpoints may still route to a pod that stops accepting"]
    problems = []
    if drain >= hard:
        problems.append(f"drain window {drain}s does not fit in shutdown grace {hard}s")
    need = pre_stop + drain + hard
    if grace < need:
        problems.append(
            f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain {drain} + grace {hard}"
        )
    if pre_stop <= 0:
        problems.append("preStop sleeps 0 s")
    return problems


def pre_stop_seconds(container: Obj) -> float | None:
    """Seconds the preStop hook sleeps (exec sleep N or the native sleep action)."""
    hook = container.get("lifecycle", {}).get("preStop") or {}
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command") or []
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        return float(command[1])
    return None


def probes(objs: list[Obj]) -> list[str]:
    """Liveness and startup on /health, readiness on /ready, on the serving port."""
    want = {"livenessProbe": "/health", "startupProbe": "/health", "readinessProbe": "/ready"}
    problems = []
    c = containers(one(objs, "Deployment"))[0]
    port_names = {p.get("name") for p in c.get("ports", [])}
    for probe, path in want.items():
        get = (c.get(probe) or {}).get("httpGet")
        if not get:
            problems.append(f"{probe}: missing or not httpGet")
            continue
        if get.get("path") != path:
            problems.append(f"{probe}: path {get.get('path')!r}, want {path!r}")
        if get.get("port") not in port_names:
            problems.append(f"{probe}: port {get.get('port')!r} is not a container port")
    listen = settings(objs)["data"].get("PGFANOUT_LISTEN", "")
    ports = {str(p["containerPort"]) for p in c.get("ports", [])}
    if listen.rsplit(":", 1)[-1] not in ports:
        problems.append(f"PGFANOUT_LISTEN {listen!r} is not on a container port {sorted(ports)}")
    return problems


def config_names(objs: list[Obj]) -> list[str]:
    """The ConfigMap holds PGFANOUT_* settings only, JSON logs, and the shutdown timing."""
    data = settings(objs).get("data") or {}
    problems = [f"ConfigMap key {k!r} does not start with PGFANOUT_" for k in data if not k.startswith("PGFANOUT_")]
    for required in ("PGFANOUT_LISTEN", "PGFANOUT_DRAIN_WINDOW", "PGFANOUT_SHUTDOWN_GRACE"):
        if required not in data:
            problems.append(f"ConfigMap lacks {required}")
    if data.get("PGFANOUT_LOG_FORMAT") != "json":
        problems.append(f"PGFANOUT_LOG_FORMAT is {data.get('PGFANOUT_LOG_FORMAT')!r}, want 'json'")
    for secret_name in ("PGFANOUT_DATABASE_URL", "PGFANOUT_REDIS_URL"):
        if secret_name in data:
            problems.append(f"{secret_name} is in the ConfigMap: it belongs in the Secret")
    for secret in of_kind(objs, "Secret"):
        keys = list((secret.get("stringData") or {}) | (secret.get("data") or {}))
        problems += [f"Secret key {k!r} does not start with PGFANOUT_" for k in keys if not k.startswith("PGFANOUT_")]
    return problems


def env_sources(objs: list[Obj], secret_name: str | None) -> list[str]:
    """The container loads the ConfigMap and the right Secret; NODE_ID is the pod name."""
    problems = []
    c = containers(one(objs, "Deployment"))[0]
    sources = c.get("envFrom") or []
    cm_refs = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
    secret_refs = [s["secretRef"]["name"] for s in sources if "secretRef" in s]
    if cm_refs != [settings(objs)["metadata"]["name"]]:
        problems.append(f"envFrom ConfigMaps {cm_refs}, want the chart's ConfigMap")
    want_secrets = [secret_name] if secret_name else []
    if secret_refs != want_secrets:
        problems.append(f"envFrom Secrets {secret_refs}, want {want_secrets}")
    rendered = [s["metadata"]["name"] for s in of_kind(objs, "Secret")]
    for name in rendered:
        if name not in secret_refs:
            problems.append(f"Secret/{name} is rendered but not loaded")
    node_id = [e for e in c.get("env", []) if e.get("name") == "PGFANOUT_NODE_ID"]
    ref = node_id[0].get("valueFrom", {}).get("fieldRef", {}) if node_id else {}
    if ref.get("fieldPath") != "metadata.name":
        problems.append("PGFANOUT_NODE_ID does not come from the pod name (fieldRef metadata.name)")
    return problems


def security(objs: list[Obj]) -> list[str]:
    """Non-root, read-only root filesystem, no capabilities, RuntimeDefault seccomp."""
    problems = []
    deploy = one(objs, "Deployment")
    pod_sc = deploy["spec"]["template"]["spec"].get("securityContext") or {}
    if pod_sc.get("runAsNonRoot") is not True:
        problems.append("pod securityContext.runAsNonRoot is not true")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runs as uid 0")
    for c in containers(deploy):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("runAsNonRoot") is False:
            problems.append(f"{name}: runAsNonRoot false overrides the pod")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if (sc.get("capabilities") or {}).get("add"):
            problems.append(f"{name}: adds capabilities")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile {seccomp!r}, want RuntimeDefault")
    return problems


def selectors(objs: list[Obj]) -> list[str]:
    """Service, PDB, HPA and ServiceMonitor all point at the Deployment's pods."""
    problems = []
    deploy = one(objs, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    match = deploy["spec"]["selector"]["matchLabels"]

    def covers(selector: dict[str, str], what: str) -> None:
        if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{what} selector {selector} does not select the pods {pod_labels}")

    covers(match, "Deployment")
    for svc in of_kind(objs, "Service"):
        covers(svc["spec"].get("selector", {}), f"Service/{svc['metadata']['name']}")
        for port in svc["spec"]["ports"]:
            names = {p.get("name") for p in containers(deploy)[0].get("ports", [])}
            if port.get("targetPort") not in names:
                problems.append(f"Service port {port.get('name')} targets {port.get('targetPort')!r}")
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        covers(pdb["spec"]["selector"].get("matchLabels", {}), "PodDisruptionBudget")
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if (target.get("kind"), target.get("name")) != ("Deployment", deploy["metadata"]["name"]):
            problems.append(f"HPA scales {target}, not the Deployment")
        if "replicas" in deploy["spec"]:
            problems.append("Deployment sets replicas although an HPA owns the count")
    for sm in of_kind(objs, "ServiceMonitor"):
        svc_labels = one(objs, "Service")["metadata"]["labels"]
        selector = sm["spec"]["selector"].get("matchLabels", {})
        if not selector or any(svc_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"ServiceMonitor selector {selector} misses the Service")
        svc_ports = {p["name"] for p in one(objs, "Service")["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in svc_ports or ep.get("path") != "/metrics":
                problems.append(f"ServiceMonitor endpoint {ep.get('port')}{ep.get('path')} is not http/metrics")
    return problems


def disruption_budget(objs: list[Obj]) -> list[str]:
    """A PDB sets exactly one of minAvailable and maxUnavailable (the API refuses both)."""
    problems = []
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        set_fields = [f for f in ("minAvailable", "maxUnavailable") if f in pdb["spec"]]
        if len(set_fields) != 1:
            problems.append(f"PodDisruptionBudget sets {set_fields or 'neither'}, want exactly one")
    return problems


def topology_spread(objs: list[Obj]) -> list[str]:
    """Pods spread across nodes and zones, each constraint selecting the pods."""
    deploy = one(objs, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    constraints = deploy["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
    keys = {c.get("topologyKey") for c in constraints}
    problems = [
        f"no topology spread over {k}"
        for k in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
        if k not in keys
    ]
    for c in constraints:
        selector = (c.get("labelSelector") or {}).get("matchLabels") or {}
        if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"spread over {c.get('topologyKey')} selects {selector}, not the pods")
    return problems


def hpa_metrics(objs: list[Obj], want_connections: bool) -> list[str]:
    """autoscaling/v2 on CPU, and on pgfanout_connections_open per pod when asked."""
    hpa = one(objs, "HorizontalPodAutoscaler")
    problems = []
    if hpa["apiVersion"] != "autoscaling/v2":
        problems.append(f"HPA apiVersion {hpa['apiVersion']}")
    metrics = hpa["spec"].get("metrics", [])
    if not any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu" for m in metrics):
        problems.append("HPA does not scale on CPU")
    pods = [m for m in metrics if m.get("type") == "Pods"]
    has = any(m["pods"]["metric"]["name"] == "pgfanout_connections_open" for m in pods)
    if has != want_connections:
        problems.append(f"HPA connections-per-pod metric present={has}, want {want_connections}")
    return problems
