#!/usr/bin/env bash
# scripts/bench.sh: runs loadtest scenarios against a local cluster of its own (2 nodes,
# its own redis-server, a fresh database on the local Postgres), then stops everything.
#
#   scripts/bench.sh [--smoke] [--debug] [--out DIR] [SCENARIO...] [-- LOADTEST ARGS...]
#
#   SCENARIO      names from loadtest/scenarios.toml (default: every scenario but smoke*)
#   --smoke       the quick check scripts/test.sh runs: scenarios smoke and smoke-notify,
#                 debug build, `loadtest --check` (fails on a failed connection, a lost or
#                 duplicated publication, or a step that delivered nothing)
#   --debug       debug builds (default: release, which is what figures must come from)
#   --target socketio
#                 the baseline instead of pgfanout: 2 Socket.IO servers with the Redis
#                 adapter (loadtest/baselines/socketio) on the same Redis; only
#                 scenarios that publish through the API (or not at all) apply
#                 (default: fanout-api idle churn ingest-api)
#   --target nchan
#                 the other baseline: 2 nginx instances with Nchan, one worker process
#                 each, on the same Redis (loadtest/baselines/nchan/nginx.conf.in); installs
#                 Debian's nginx and libnginx-mod-nchan when missing; same scenarios
#   --perf        record the nodes with `perf record -g` while the scenarios run; writes
#                 DIR/perf.data and the top frames to DIR/perf-top.txt
#   --out DIR     where results go (default .tmp/bench): DIR/results.csv and .json
#   -- ARGS       passed to `loadtest run` (e.g. -- --set duration=\"5s\")
#
# Environment: PGFANOUT_TEST_DATABASE_URL (else found by scripts/deps.sh),
# BENCH_NODES (default 2), BENCH_NODE_WRAPPER (a command the nodes run under, e.g.
# "valgrind --tool=massif --massif-out-file=.tmp/massif.%p" for a heap profile), BENCH_PORT (first node port, default: a free one from 18400),
# BENCH_NODE_ENV (extra VAR=value words for every node), BENCH_REDIS_CLUSTER=1 (a local
# 3-master Redis Cluster instead of one redis-server; the nodes run with
# PGFANOUT_REDIS_CLUSTER=true).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf 'bench: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

smoke=0
perf=0
target=pgfanout
profile=release
out=$ROOT/.tmp/bench
scenarios=()
extra=()
while (($#)); do
  case $1 in
    --smoke)
      smoke=1
      profile=debug
      ;;
    --debug) profile=debug ;;
    --perf) perf=1 ;;
    --target)
      target=$2
      [[ $target == pgfanout || $target == socketio || $target == nchan ]] ||
        die "--target pgfanout|socketio|nchan"
      shift
      ;;
    --out)
      out=$2
      shift
      ;;
    --)
      shift
      extra=("$@")
      break
      ;;
    -*) die "unknown option $1" ;;
    *) scenarios+=("$1") ;;
  esac
  shift
done
if ((smoke)); then
  scenarios=(smoke smoke-notify)
  extra+=(--check)
fi

# shellcheck source=scripts/deps.sh
[[ -n ${PGFANOUT_TEST_DATABASE_URL:-} ]] || source "$ROOT/scripts/deps.sh" cluster

# The Nchan baseline's packages: here, not in scripts/deps.sh, so the test run never
# installs nginx (as socketio's npm packages are installed only for --target socketio).
nchan_module=/usr/lib/nginx/modules/ngx_nchan_module.so
if [[ $target == nchan ]]; then
  [[ ${BENCH_REDIS_CLUSTER:-0} == 1 ]] && die "--target nchan runs on one redis-server, not BENCH_REDIS_CLUSTER=1"
  if ! command -v nginx >/dev/null 2>&1 || [[ ! -f $nchan_module ]]; then
    say "installing Debian's nginx and libnginx-mod-nchan"
    as_root=()
    [[ $(id -u) -eq 0 ]] || as_root=(sudo -n)
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends nginx libnginx-mod-nchan >&2
  fi
fi
db_admin=$PGFANOUT_TEST_DATABASE_URL

cargo_flags=()
[[ $profile == release ]] && cargo_flags=(--release)
say "building pgfanout and loadtest ($profile)"
cargo build "${cargo_flags[@]}" -p pgfanout -p loadtest --bin pgfanout --bin loadtest >&2
bin_dir=${CARGO_TARGET_DIR:-$ROOT/target}/$profile

mkdir -p "$out"
run_dir=$(mktemp -d "$ROOT/.tmp/bench-run.XXXXXX")
pids=()
# The processes whose CPU and RSS are reported: the nodes, and for nginx its workers too.
measured=()
redis_pid=''
cluster_pids=()
db_name="pgfanout_bench_$$"

cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  [[ -n $redis_pid ]] && kill -TERM "$redis_pid" 2>/dev/null || true
  for pid in "${cluster_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  psql -X -q -d "$db_admin" -c "DROP DATABASE IF EXISTS $db_name WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  local p=$1
  while timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$p" 2>/dev/null; do p=$((p + 1)); done
  printf '%s' "$p"
}

# Our own Redis: nothing else's traffic in its CPU figure.
redis_port=$(free_port $((16400 + RANDOM % 1000)))
if [[ ${BENCH_REDIS_CLUSTER:-0} == 1 ]]; then
  # Three masters, no replicas, on consecutive free ports (cluster bus on port + 10000).
  seeds=()
  addresses=()
  p=$redis_port
  for i in 0 1 2; do
    p=$(free_port "$p")
    redis-server --bind 127.0.0.1 --port "$p" --save '' --appendonly no \
      --cluster-enabled yes --cluster-config-file "$run_dir/nodes-$i.conf" \
      --cluster-node-timeout 2000 --dbfilename "dump-$i.rdb" \
      --dir "$run_dir" --logfile "$run_dir/redis-$i.log" --daemonize no >/dev/null &
    cluster_pids+=($!)
    for _ in $(seq 50); do
      [[ $(redis-cli -p "$p" ping 2>/dev/null) == PONG ]] && break
      sleep 0.1
    done
    seeds+=("redis://127.0.0.1:$p")
    addresses+=("127.0.0.1:$p")
    p=$((p + 1))
  done
  redis-cli --cluster create "${addresses[@]}" --cluster-yes >/dev/null
  for _ in $(seq 100); do
    redis-cli -p "$redis_port" cluster info 2>/dev/null | grep -q cluster_state:ok && break
    sleep 0.1
  done
  sleep 1
  redis_url=$(IFS=,; printf '%s' "${seeds[*]}")
  redis_cluster=true
else
  redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
    --dir "$run_dir" --logfile "$run_dir/redis.log" --daemonize no >/dev/null &
  redis_pid=$!
  for _ in $(seq 50); do
    [[ $(redis-cli -p "$redis_port" ping 2>/dev/null) == PONG ]] && break
    sleep 0.1
  done
  redis_url="redis://127.0.0.1:$redis_port"
  redis_cluster=false
fi

# A fresh database: the nodes install their schema there.
psql -X -q -d "$db_admin" -c "CREATE DATABASE $db_name" >/dev/null
db_url=$(python3 -c 'import sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/"+sys.argv[2])))' "$db_admin" "$db_name")

channels=$(printf 'bench%d,' $(seq 0 99))
channels=${channels%,}
nodes=${BENCH_NODES:-2}
port=$(free_port "${BENCH_PORT:-18400}")
urls=()
api_urls=()
letters=abcdefghijklmnopqrstuvwxyz
if [[ $target == socketio ]]; then
  (cd loadtest/baselines/socketio && [[ -d node_modules ]] || npm ci --no-audit --no-fund --loglevel=error >&2)
fi
node_log() {
  if [[ $target == nchan ]]; then
    printf '%s/%s/error.log' "$run_dir" "$1"
  else
    printf '%s/%s.log' "$run_dir" "$1"
  fi
}
# One nginx (master + one worker) in the foreground, its config and files in $run_dir/$id.
start_nchan() {
  local id=$1 port=$2 dir=$run_dir/$1 user_line='' master
  mkdir -p "$dir"
  # As root, nginx would run its worker as nobody, who cannot enter $run_dir.
  [[ $(id -u) -eq 0 ]] && user_line="user $(id -un) $(id -gn);"
  sed -e "s|@PREFIX@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@REDIS@|127.0.0.1:$redis_port|g" \
    -e "s|@USER_LINE@|$user_line|" loadtest/baselines/nchan/nginx.conf.in >"$dir/nginx.conf"
  nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$run_dir/$id.log" 2>&1 &
  master=$!
  pids+=("$master")
  measured+=("$master")
  # Ready when a publication goes through, i.e. Nchan reached Redis.
  for _ in $(seq 100); do
    curl -fsS -m 1 -o /dev/null -X POST --data ready "http://127.0.0.1:$port/pub/bench-ready" \
      2>/dev/null && break
    kill -0 "$master" 2>/dev/null || { cat "$run_dir/$id.log" "$dir/error.log" >&2; die "$id exited at start"; }
    sleep 0.1
  done
  curl -fsS -m 1 -o /dev/null -X POST --data ready "http://127.0.0.1:$port/pub/bench-ready" ||
    { cat "$dir/error.log" >&2; die "$id not ready"; }
  for pid in $(pgrep -P "$master"); do measured+=("$pid"); done
  urls+=("\"ws://127.0.0.1:$port/sub/\"")
  api_urls+=("\"http://127.0.0.1:$port/pub/\"")
}
for ((i = 0; i < nodes; i++)); do
  port=$(free_port "$port")
  id="bench-${letters:i:1}"
  if [[ $target == nchan ]]; then
    start_nchan "$id" "$port"
    port=$((port + 1))
    continue
  fi
  if [[ $target == socketio ]]; then
    PORT=$port REDIS_URL="$redis_url" API_KEY=bench-api-key-0123456789 \
      node loadtest/baselines/socketio/server.js >"$run_dir/$id.log" 2>&1 &
    pids+=($!)
    measured+=($!)
    urls+=("\"ws://127.0.0.1:$port/socket.io/?EIO=4&transport=websocket\"")
    api_urls+=("\"http://127.0.0.1:$port/api/publish\"")
    for _ in $(seq 100); do
      curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$port/ready" 2>/dev/null && break
      sleep 0.1
    done
    port=$((port + 1))
    continue
  fi
  # shellcheck disable=SC2086 # BENCH_NODE_ENV is a list of words on purpose.
  env PGFANOUT_LISTEN="127.0.0.1:$port" PGFANOUT_NODE_ID="$id" \
    PGFANOUT_DATABASE_URL="$db_url" PGFANOUT_REDIS_URL="$redis_url" \
    PGFANOUT_REDIS_CLUSTER="$redis_cluster" \
    PGFANOUT_CHANNELS="$channels" PGFANOUT_ALLOW_ANONYMOUS=true \
    PGFANOUT_ALLOW_ANONYMOUS_PUBLISH=true PGFANOUT_API_KEYS=bench-api-key-0123456789 \
    PGFANOUT_LOG=warn PGFANOUT_LOG_FORMAT=text ${BENCH_NODE_ENV:-} \
    ${BENCH_NODE_WRAPPER:-} "$bin_dir/pgfanout" >"$run_dir/$id.log" 2>&1 &
  pids+=($!)
  measured+=($!)
  urls+=("\"ws://127.0.0.1:$port/connection/websocket\"")
  api_urls+=("\"http://127.0.0.1:$port/api/publish\"")
  for _ in $(seq 150); do
    curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$port/ready" 2>/dev/null && break
    kill -0 "${pids[i]}" 2>/dev/null || { cat "$run_dir/$id.log" >&2; die "$id exited at start"; }
    sleep 0.2
  done
  curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$port/ready" || { cat "$run_dir/$id.log" >&2; die "$id not ready"; }
  port=$((port + 1))
done
say "cluster up ($target): ${nodes} nodes (pids ${measured[*]}), redis $redis_url (pids $redis_pid${cluster_pids[*]}), database $db_name"

join() {
  local IFS=,
  printf '[%s]' "$*"
}
args=(run loadtest/scenarios.toml
  --set "urls=$(join "${urls[@]}")" --set "api_urls=$(join "${api_urls[@]}")"
  --set 'api_key="bench-api-key-0123456789"' --set "database_url=\"$db_url\""
  --postgres-cpu
  --json "$out/results.json" --csv "$out/results.csv")
for pid in "${measured[@]}"; do args+=(--node-pid "$pid"); done
for pid in $redis_pid "${cluster_pids[@]}"; do args+=(--redis-pid "$pid"); done
[[ $target != pgfanout ]] && args+=(--set "protocol=\"$target\"")
if ((${#scenarios[@]})); then
  for s in "${scenarios[@]}"; do args+=(--only "$s"); done
elif [[ $target != pgfanout ]]; then
  # The baselines are published to through their APIs only.
  for s in fanout-api idle churn ingest-api; do args+=(--only "$s"); done
else
  for s in fanout fanout-api broadcast idle churn ingest-notify ingest-notify-batch ingest-api; do
    args+=(--only "$s")
  done
fi
perf_pid=''
if ((perf)); then
  perf record -q -F 999 -g -o "$out/perf.data" -p "$(IFS=,; printf '%s' "${measured[*]}")" 2>"$run_dir/perf.log" &
  perf_pid=$!
fi
status=0
"$bin_dir/loadtest" "${args[@]}" "${extra[@]}" || status=$?
if [[ -n $perf_pid ]]; then
  kill -INT "$perf_pid" 2>/dev/null || true
  wait "$perf_pid" 2>/dev/null || true
  perf report -i "$out/perf.data" --no-children --percent-limit 0.7 --stdio -g none \
    --sort dso,symbol 2>/dev/null | grep -v '^#' | grep -v '^$' >"$out/perf-top.txt" || true
  say "profile: $out/perf-top.txt"
fi
for ((i = 0; i < nodes; i++)); do
  log=$(node_log "bench-${letters:i:1}")
  if grep -qiE 'panic|ERROR' "$log"; then
    say "node bench-${letters:i:1} logged errors:"
    grep -iE 'panic|ERROR' "$log" | head -5 >&2
  fi
done
say "results: $out/results.csv, $out/results.json"
exit "$status"
