#!/usr/bin/env bash
# Validate the Helm chart in helm/pgfanout offline: no cluster, no helm binary.
#
# Lints and renders the chart with Helm's own Go SDK (PyPI helm-python-sdk),
# with the default values and the value sets in helm/pgfanout/ci/, validates
# every rendered object against the Kubernetes schemas (PyPI
# kubernetes-validate, strict) and the ServiceMonitor against our own subset
# schema, and asserts the properties the gateway depends on
# (scripts/helm/check_chart.py). Closes with `helm: N passed, M failed` and
# exits non-zero on any failure.
#
# The tools live in a venv under .tmp/helm-venv (HELM_VENV to move it),
# created on first use from scripts/helm/requirements.txt. Pass -v for
# tracebacks of crashed checks.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HELM_VENV:-$root/.tmp/helm-venv}"
requirements="$root/scripts/helm/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "check-helm: installing the chart tools into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
  echo "$want" >"$stamp"
fi

cd "$root/scripts/helm"
exec "$venv/bin/python" check_chart.py "$@"
