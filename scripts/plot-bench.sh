#!/usr/bin/env bash
# scripts/plot-bench.sh [DIR]: BENCHMARKS.md's plots from DIR/*.csv (default docs/bench/plot).
# Installs matplotlib (PyPI) into .tmp/plot-venv on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv=$ROOT/.tmp/plot-venv
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check 'matplotlib>=3.8,<4'
fi
exec "$venv/bin/python" "$ROOT/scripts/plot-bench.py" "${1:-$ROOT/docs/bench/plot}"
