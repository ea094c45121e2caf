#!/usr/bin/env bash
# scripts/test.sh: the whole pgfanout test suite, exactly as CI runs it (.ci/run execs this).
#
#   scripts/test.sh [NEXTEST ARGS...]     e.g. scripts/test.sh resumes_   (a test-name filter)
#
# 1. scripts/deps.sh test: installs or starts what is missing (packages, Postgres,
#    cargo-nextest, SDK test packages) and exports PGFANOUT_TEST_DATABASE_URL.
# 2. cargo fmt --check, cargo clippy -D warnings (every workspace member).
# 3. Extra suites that exist: scripts/check-helm.sh; the load tool's smoke run
#    (scripts/bench.sh --smoke: 300 connections, a few seconds); the fuzz targets
#    (scripts/fuzz.sh, FUZZ_SECONDS each, default 30; 0 skips; log in .tmp/fuzz.log) when cargo-fuzz and a
#    nightly toolchain are installed.
# 4. cargo nextest run (profile `ci` when CI=true: no retries, no fail-fast, hung tests
#    killed after 120 s; see .config/nextest.toml).
# Every step runs even after a failure; a summary follows; the exit status is non-zero
# when any step failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/deps.sh
source "$ROOT/scripts/deps.sh" test

profile=default
cargo_flags=()
if [[ ${CI:-} == true || ${CI:-} == 1 ]]; then
  profile=ci
  # CI must build exactly what Cargo.lock says.
  cargo_flags=(--locked)
  # A clean clone builds once: incremental caches would only take disk.
  export CARGO_INCREMENTAL=0
fi

summary=()
failed=()

# step NAME COMMAND...: runs the command, records its outcome and time.
step() {
  local name=$1 start=$SECONDS rc=0
  shift
  printf '\n==> %s: %s\n' "$name" "$*"
  "$@" || rc=$?
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    summary+=("$(printf '  ok       %-8s %4ds' "$name" "$took")")
  else
    summary+=("$(printf '  FAILED   %-8s %4ds  (exit %d)' "$name" "$took" "$rc")")
    failed+=("$name")
  fi
}

skip() {
  summary+=("$(printf '  skipped  %-8s        %s' "$1" "$2")")
}

printf '==> pgfanout tests (nextest profile: %s, database: %s)\n' "$profile" "$PGFANOUT_TEST_DATABASE_URL"

step fmt cargo fmt --all -- --check
step clippy cargo clippy "${cargo_flags[@]}" --workspace --all-targets -- -D warnings
if [[ -f scripts/check-helm.sh ]]; then
  step helm bash scripts/check-helm.sh
else
  skip helm "scripts/check-helm.sh not present"
fi
# The load tool against a 2-node cluster for a few seconds, so it cannot rot (not a benchmark).
# A debug build: it shares the test build's dependencies (a release build took minutes).
step smoke bash scripts/bench.sh --smoke --debug --out "$ROOT/.tmp/bench-smoke"
fuzz_seconds=${FUZZ_SECONDS:-30}
if ((fuzz_seconds == 0)); then
  skip fuzz "FUZZ_SECONDS=0"
elif command -v cargo-fuzz >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1 &&
  rustup run nightly rustc --version >/dev/null 2>&1; then
  # libFuzzer reports every new input: keep its log in .tmp/fuzz.log, show the end.
  mkdir -p "$ROOT/.tmp"
  step fuzz bash -c 'scripts/fuzz.sh "$1" >"$2" 2>&1; rc=$?; tail -n 25 "$2"; exit $rc' _ \
    "$fuzz_seconds" "$ROOT/.tmp/fuzz.log"
else
  skip fuzz "cargo-fuzz or a nightly toolchain not installed"
fi
# Last, so its closing line is the last test summary in the log.
step nextest cargo nextest run "${cargo_flags[@]}" --workspace --profile "$profile" --no-fail-fast "$@"

printf '\n==> summary\n'
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  printf 'test.sh: FAILED: %s\n' "${failed[*]}"
  exit 1
fi
printf 'test.sh: all steps ok\n'
