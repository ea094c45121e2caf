#!/usr/bin/env bash
# scripts/deps.sh: install or start what pgfanout's scripts need.
#
# Idempotent and quiet: when everything is already there it prints nothing on
# stderr and changes nothing. It only acts (and says so, on stderr) when
# something is missing or stopped.
#
# Usage
#   scripts/deps.sh [test|cluster]          run it by hand; stdout is only the
#                                           `export ...` lines, so
#                                           eval "$(scripts/deps.sh)" works
#   source scripts/deps.sh test|cluster     from scripts/test.sh and
#                                           scripts/run-cluster.sh (always pass
#                                           the mode: a sourced file sees the
#                                           caller's arguments otherwise)
#
# Modes
#   test (default)  Debian packages, PostgreSQL, Rust + rustfmt + clippy +
#                   cargo-nextest, SDK test packages (tests/sdk/js, tests/sdk/python),
#                   Debian's chromium and tests/browser (playwright-core)
#   cluster         Debian packages, PostgreSQL, Redis on 127.0.0.1:6379 (only
#                   when PGFANOUT_REDIS_URL is unset or that default), Rust,
#                   tests/sdk/js packages
#
# Exports
#   PGFANOUT_TEST_DATABASE_URL  a Postgres URL that logs in (kept if already set)
#   PGFANOUT_PYTHON             python of the SDK venv .tmp/venv (when
#                               tests/sdk/python/requirements.txt exists);
#                               .tmp/venv/bin is also put first on PATH
#   PATH                        gains ${CARGO_HOME:-~/.cargo}/bin when cargo is there
#
# Never touches pg_hba.conf; the only change it may make to Postgres is a
# password for the `postgres` role when password auth is required on TCP.
set -euo pipefail

DEPS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS_PG_TRUST_URL='postgres://postgres@127.0.0.1:5432/postgres'
DEPS_PG_PASSWORD_URL='postgres://postgres:postgres@127.0.0.1:5432/postgres'
DEPS_REDIS_DEFAULT_URL='redis://127.0.0.1:6379'

deps_log() { printf 'deps: %s\n' "$*" >&2; }
deps_die() {
  printf 'deps: error: %s\n' "$*" >&2
  exit 1
}
deps_have() { command -v "$1" >/dev/null 2>&1; }

# Runs a command as root: directly when we are root, through sudo otherwise
# (non-interactive sudo when there is no terminal, as in CI).
deps_as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif deps_have sudo; then
    if [[ -t 0 ]]; then sudo "$@"; else sudo -n "$@"; fi
  else
    deps_die "need root for: $* (run as root or install sudo)"
  fi
}

# True when something accepts TCP connections on host:port.
deps_tcp_open() {
  # shellcheck disable=SC2016 # $1 and $2 expand in the inner bash.
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# ---------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------

deps_pg_server_installed() {
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

# Installs, with one `apt-get update`, the packages whose commands are missing.
# Checks commands rather than package names, so a Node.js from another source
# (which ships its own npm) or a Python from pyenv counts as present.
deps_packages() {
  local missing=()
  deps_have psql || missing+=(postgresql-client)
  if ! deps_pg_server_installed && [[ -z ${PGFANOUT_TEST_DATABASE_URL:-} ]] &&
    ! deps_tcp_open 127.0.0.1 5432; then
    missing+=(postgresql)
  fi
  deps_have redis-server || missing+=(redis-server)
  deps_have redis-cli || missing+=(redis-tools)
  deps_have node || missing+=(nodejs)
  deps_have npm || missing+=(npm)
  if ! deps_have python3; then
    missing+=(python3 python3-pip python3-venv)
  else
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    if [[ -f $DEPS_ROOT/tests/sdk/python/requirements.txt ]] &&
      ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
      missing+=(python3-venv)
    fi
  fi
  deps_have curl || missing+=(curl)
  deps_have pgrep || missing+=(procps)
  ((${#missing[@]})) || return 0

  deps_have apt-get || deps_die "missing packages: ${missing[*]}; this is not a Debian/Ubuntu machine, install them by hand"
  deps_log "installing Debian packages: ${missing[*]}"
  # apt's progress goes to stderr: stdout is reserved for the export lines.
  deps_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  deps_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

# ---------------------------------------------------------------------------
# Rust
# ---------------------------------------------------------------------------

deps_rust() {
  local mode=$1 cargo_bin=${CARGO_HOME:-${HOME:-/root}/.cargo}/bin
  if [[ -x $cargo_bin/cargo && ":$PATH:" != *":$cargo_bin:"* ]]; then
    export PATH="$cargo_bin:$PATH"
  fi
  if ! deps_have cargo; then
    cat >&2 <<'EOF'
deps: error: cargo (Rust) is not installed, and this script does not fetch toolchains.
Install Rust with rustup, then run this command again:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
    . "$HOME/.cargo/env"
EOF
    exit 1
  fi
  [[ $mode == test ]] || return 0

  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    deps_have rustup || deps_die "cargo fmt / cargo clippy missing and no rustup to add them"
    deps_log "adding rustfmt and clippy (rustup component add)"
    rustup component add rustfmt clippy >&2
  fi
  if ! cargo nextest --version >/dev/null 2>&1; then
    deps_log "installing cargo-nextest (cargo install --locked; takes a few minutes)"
    cargo install cargo-nextest --locked >&2
  fi
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

deps_pg_accepting() {
  if deps_have pg_isready; then
    pg_isready -q -h 127.0.0.1 -p 5432 -t 3
  else
    deps_tcp_open 127.0.0.1 5432
  fi
}

# True when the URL logs in. -w: never prompt for a password (no stdin in CI).
deps_pg_login() {
  PGCONNECT_TIMEOUT=5 psql -w -X -q -tA -d "$1" -c 'SELECT 1' >/dev/null 2>&1
}

# Starts the newest local cluster when nothing accepts connections on 5432.
deps_pg_start() {
  deps_pg_accepting && return 0
  local ver=''
  if [[ -d /etc/postgresql ]]; then
    ver=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
  fi
  if [[ -z $ver ]]; then
    # Server package present but no cluster (e.g. create_main_cluster = false).
    deps_pg_server_installed || deps_die "no PostgreSQL server on 127.0.0.1:5432 and none installed"
    ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
    deps_log "creating PostgreSQL $ver cluster 'main'"
    deps_as_root pg_createcluster "$ver" main >&2
  fi
  deps_log "starting PostgreSQL $ver (cluster main)"
  # Exit status 2 means "already running" (perhaps on another port): the
  # readiness check below decides.
  deps_as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2 || true
  local i
  for ((i = 0; i < 60; i++)); do
    deps_pg_accepting && return 0
    sleep 0.5
  done
  deps_have pg_lsclusters && pg_lsclusters >&2
  deps_die "PostgreSQL does not accept connections on 127.0.0.1:5432"
}

# Sets PGFANOUT_TEST_DATABASE_URL to a URL that logs in.
deps_postgres() {
  if [[ -n ${PGFANOUT_TEST_DATABASE_URL:-} ]]; then
    deps_pg_login "$PGFANOUT_TEST_DATABASE_URL" && { export PGFANOUT_TEST_DATABASE_URL; return 0; }
    # It may point at the local server, stopped: start it, then check again.
    deps_pg_start
    deps_pg_login "$PGFANOUT_TEST_DATABASE_URL" ||
      deps_die "PGFANOUT_TEST_DATABASE_URL is set but cannot log in: $PGFANOUT_TEST_DATABASE_URL"
    export PGFANOUT_TEST_DATABASE_URL
    return 0
  fi

  deps_pg_start
  local url
  for url in "$DEPS_PG_TRUST_URL" "$DEPS_PG_PASSWORD_URL"; do
    if deps_pg_login "$url"; then
      export PGFANOUT_TEST_DATABASE_URL=$url
      return 0
    fi
  done
  # A fresh Debian server asks for a password on TCP (scram) and the role has
  # none: give it one through the local socket, as the postgres OS user.
  deps_log "setting a password for the 'postgres' role (TCP logins need one here)"
  # Peer auth on the socket; PG* variables of the caller must not redirect it.
  (cd / && deps_as_root runuser -u postgres -- env -u PGHOST -u PGHOSTADDR -u PGUSER -u PGDATABASE \
    psql -X -q -p 5432 -d postgres -c "ALTER ROLE postgres PASSWORD 'postgres'") >&2 ||
    deps_die "could not set a password for the postgres role through the local socket"
  deps_pg_login "$DEPS_PG_PASSWORD_URL" ||
    deps_die "cannot log in to Postgres as $DEPS_PG_PASSWORD_URL; set PGFANOUT_TEST_DATABASE_URL to a URL that works"
  export PGFANOUT_TEST_DATABASE_URL=$DEPS_PG_PASSWORD_URL
}

# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

# Tests start their own redis-server on free ports, so they only need the
# binary (checked in deps_packages). The local cluster shares one on 6379.
deps_redis_6379() {
  local url=${PGFANOUT_REDIS_URL:-$DEPS_REDIS_DEFAULT_URL}
  [[ $url == "$DEPS_REDIS_DEFAULT_URL" || $url == "$DEPS_REDIS_DEFAULT_URL/" ]] || return 0
  [[ $(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]] && return 0

  local dir=$DEPS_ROOT/.tmp
  mkdir -p "$dir"
  deps_log "starting redis-server on 127.0.0.1:6379 (log: .tmp/redis-6379.log)"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
    --dir "$dir" --logfile "$dir/redis-6379.log" --pidfile "$dir/redis-6379.pid" >&2 || true
  local i
  for ((i = 0; i < 50; i++)); do
    [[ $(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]] && return 0
    sleep 0.2
  done
  deps_die "Redis does not answer PING on 127.0.0.1:6379 (is the port taken? see .tmp/redis-6379.log, or set PGFANOUT_REDIS_URL)"
}

# ---------------------------------------------------------------------------
# SDK test packages
# ---------------------------------------------------------------------------

# `npm ci` in a test driver folder (tests/sdk/js, tests/browser) when its
# node_modules is missing or older than the lock. Our own stamp file marks a
# finished install (npm ci removes node_modules first, so a failed install
# leaves no stamp and is retried next time). Browsers are never downloaded:
# PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD stops any package from trying.
deps_npm_dir() {
  local dir=$DEPS_ROOT/$1
  [[ -f $dir/package.json ]] || return 0
  local stamp=$dir/node_modules/.pgfanout-installed lock=$dir/package-lock.json
  if [[ -f $stamp && ! $lock -nt $stamp && ! $dir/package.json -nt $stamp ]]; then
    return 0
  fi
  if [[ -f $lock ]]; then
    deps_log "npm ci in $1"
    (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) >&2
  else
    deps_log "npm install in $1 (no package-lock.json: commit one)"
    (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --no-package-lock --loglevel=error) >&2
  fi
  mkdir -p "$dir/node_modules"
  touch "$stamp"
}

deps_node_sdk() { deps_npm_dir tests/sdk/js; }

# tests/sdk/python: a venv at .tmp/venv (ignored by git), reinstalled when
# requirements.txt changes (its hash is kept in the venv).
deps_python_sdk() {
  local req=$DEPS_ROOT/tests/sdk/python/requirements.txt venv=$DEPS_ROOT/.tmp/venv
  [[ -f $req ]] || return 0
  local want have=''
  want=$(sha256sum "$req" | cut -d' ' -f1)
  [[ -f $venv/.requirements.sha256 ]] && have=$(<"$venv/.requirements.sha256")
  if [[ ! -x $venv/bin/python || $have != "$want" ]]; then
    if [[ ! -x $venv/bin/python ]]; then
      deps_log "creating Python venv .tmp/venv"
      python3 -m venv "$venv" >&2
    fi
    deps_log "pip install -r tests/sdk/python/requirements.txt (into .tmp/venv)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
    printf '%s\n' "$want" >"$venv/.requirements.sha256"
  fi
  export PGFANOUT_PYTHON=$venv/bin/python
  [[ ":$PATH:" == *":$venv/bin:"* ]] || export PATH="$venv/bin:$PATH"
}

# ---------------------------------------------------------------------------
# Chromium (browser tests)
# ---------------------------------------------------------------------------
# Debian's `chromium` (/usr/bin/chromium), installed only when missing, and the
# playwright-core driver in tests/browser. Never let a test tool download its
# own browser (that cannot work on our machines).
deps_chromium() {
  if [[ ! -x /usr/bin/chromium ]]; then
    deps_have apt-get || deps_die "/usr/bin/chromium is missing and this is not a Debian/Ubuntu machine: install Chromium there by hand"
    deps_log "installing Debian package: chromium"
    deps_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    deps_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
  fi
  deps_npm_dir tests/browser
}

# ---------------------------------------------------------------------------

deps_main() {
  local mode=${1:-test}
  case $mode in
    test | cluster) ;;
    *) deps_die "unknown mode '$mode' (use: test or cluster)" ;;
  esac
  deps_packages
  deps_rust "$mode"
  deps_postgres
  if [[ $mode == cluster ]]; then
    deps_redis_6379
    deps_node_sdk
  else
    deps_node_sdk
    deps_python_sdk
    deps_chromium
  fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  deps_main "$@"
  printf 'export PGFANOUT_TEST_DATABASE_URL=%q\n' "$PGFANOUT_TEST_DATABASE_URL"
  [[ -z ${PGFANOUT_PYTHON:-} ]] || printf 'export PGFANOUT_PYTHON=%q\n' "$PGFANOUT_PYTHON"
else
  deps_main "$@"
fi
