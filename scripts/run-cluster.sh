#!/usr/bin/env bash
# scripts/run-cluster.sh: a local pgfanout cluster (N gateway nodes sharing one Postgres and
# one Redis), in the foreground. Ctrl-C (or SIGTERM) drains and stops every node.
#
# Settings (environment):
#   PGFANOUT_NODES          number of nodes, 1..26 (default 2: node-a, node-b, ...)
#   PGFANOUT_BASE_PORT      node-a listens on 127.0.0.1:BASE, node-b on BASE+1, ... (default 8000)
#   PGFANOUT_DATABASE_URL   default: the URL scripts/deps.sh found (PGFANOUT_TEST_DATABASE_URL)
#   PGFANOUT_REDIS_URL      default redis://127.0.0.1:6379 (started when nothing answers there)
#   PGFANOUT_CHANNELS       default orders,events
#   PGFANOUT_LOG_FORMAT     default text
#   PGFANOUT_ALLOW_ANONYMOUS default true here (pgfanout's own default is false), so the
#                           watch command below works without a token
#   PGFANOUT_DEMO           default true: every node serves the live-table demo page at
#                           /demo/ (and creates its table); false to leave it off
# Any other PGFANOUT_* setting (see README) is passed to every node as is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/deps.sh
source "$ROOT/scripts/deps.sh" cluster

say() { printf 'run-cluster: %s\n' "$*" >&2 || true; }
die() {
  say "error: $*"
  exit 1
}

nodes=${PGFANOUT_NODES:-2}
base_port=${PGFANOUT_BASE_PORT:-8000}
if ! [[ $nodes =~ ^[0-9]+$ ]] || ((nodes < 1 || nodes > 26)); then
  die "PGFANOUT_NODES must be 1..26, not '$nodes'"
fi
if ! [[ $base_port =~ ^[0-9]+$ ]] || ((base_port < 1024 || base_port + nodes > 65535)); then
  die "PGFANOUT_BASE_PORT must be a port number >= 1024, not '$base_port'"
fi

export PGFANOUT_DATABASE_URL=${PGFANOUT_DATABASE_URL:-$PGFANOUT_TEST_DATABASE_URL}
export PGFANOUT_REDIS_URL=${PGFANOUT_REDIS_URL:-redis://127.0.0.1:6379}
export PGFANOUT_CHANNELS=${PGFANOUT_CHANNELS:-orders,events}
export PGFANOUT_LOG_FORMAT=${PGFANOUT_LOG_FORMAT:-text}
export PGFANOUT_ALLOW_ANONYMOUS=${PGFANOUT_ALLOW_ANONYMOUS:-true}
export PGFANOUT_DEMO=${PGFANOUT_DEMO:-true}

ids=()
ports=()
letters=abcdefghijklmnopqrstuvwxyz
for ((i = 0; i < nodes; i++)); do
  ids+=("node-${letters:i:1}")
  ports+=($((base_port + i)))
  if deps_tcp_open 127.0.0.1 "${ports[i]}"; then
    die "127.0.0.1:${ports[i]} is already in use (another run-cluster?); set PGFANOUT_BASE_PORT"
  fi
done

say "building (cargo build --release)"
cargo build --release --bin pgfanout
bin=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgfanout
[[ -x $bin ]] || die "no binary at $bin after the build"

pids=()
stopping=0
force=0

# Stops every node: SIGTERM (the node drains its clients), then SIGKILL after the
# shutdown grace plus a margin, or at once on a second Ctrl-C.
stop_nodes() {
  ((stopping)) && return 0
  stopping=1
  trap 'force=1' INT
  # Our output may be a pipe whose reader is gone (`run-cluster.sh | tee log`, then Ctrl-C):
  # dying of SIGPIPE here would leave the nodes running in their own sessions.
  trap '' PIPE
  ((${#pids[@]})) || return 0
  say "stopping ${ids[*]} (Ctrl-C again to kill at once)"
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local grace=${PGFANOUT_SHUTDOWN_GRACE:-25s}
  grace=${grace%s}
  [[ $grace =~ ^[0-9]+$ ]] || grace=25
  local deadline=$((SECONDS + grace + 5)) alive
  while :; do
    alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]})) || break
    if ((force || SECONDS >= deadline)); then
      say "killing ${alive[*]}"
      kill -KILL "${alive[@]}" 2>/dev/null || true
      break
    fi
    # A second Ctrl-C interrupts this sleep (the INT trap may not run again while we are
    # inside it): treat an interrupted sleep as "kill now".
    sleep 0.2 || force=1
  done
  wait "${pids[@]}" 2>/dev/null || true
  # Let the prefixers print the nodes' last lines before our caller's prompt returns.
  sleep 0.3 || true
}
trap 'stop_nodes; exit 130' INT
trap 'stop_nodes; exit 143' TERM
trap 'stop_nodes; exit 141' PIPE
trap 'stop_nodes' EXIT

for ((i = 0; i < nodes; i++)); do
  id=${ids[i]}
  # Each node in its own session, so a terminal's Ctrl-C reaches only this script, which
  # then stops the nodes in order (a node takes a second signal as "exit now, no drain").
  # Its log lines get a prefix. The prefixer ignores INT/TERM/PIPE, and when our own
  # output is gone (`| tee` ended by the same Ctrl-C) it keeps reading into /dev/null:
  # a node whose log pipe breaks must still be able to log its way through the drain.
  PGFANOUT_LISTEN="127.0.0.1:${ports[i]}" PGFANOUT_NODE_ID="$id" \
    setsid "$bin" > >(
      trap '' INT TERM PIPE
      sed -u "s/^/[$id] /" 2>/dev/null
      exec cat >/dev/null
    ) 2>&1 &
  pids+=($!)
done

# Waits until every node answers 200 on /ready.
deadline=$((SECONDS + 60))
for ((i = 0; i < nodes; i++)); do
  url="http://127.0.0.1:${ports[i]}/ready"
  until curl -fsS -m 2 -o /dev/null "$url" 2>/dev/null; do
    kill -0 "${pids[i]}" 2>/dev/null || die "${ids[i]} exited during start-up (its log is above)"
    if ((SECONDS >= deadline)); then
      die "${ids[i]} is not ready after 60 s: $(curl -sS -m 2 "$url" 2>&1 || true)"
    fi
    sleep 0.3
  done
done

# How to watch a channel from a terminal: the repo's centrifuge-js driver when its packages
# are installed, otherwise a raw-protocol one-liner on Node's WebSocket.
first_channel=${PGFANOUT_CHANNELS%%,*}
last=$((nodes - 1))
watch_url="ws://127.0.0.1:${ports[last]}/connection/websocket"
raw_js='const [u,c]=process.argv.slice(1),w=new WebSocket(u);w.onopen=()=>{w.send(JSON.stringify({id:1,connect:{name:"cli"}}));w.send(JSON.stringify({id:2,subscribe:{channel:c}}))};w.onmessage=e=>String(e.data).split("\n").forEach(l=>l=="{}"?w.send("{}"):l&&console.log(l));w.onclose=e=>console.log("closed",e.code,e.reason)'
if [[ -f tests/sdk/js/subscribe.mjs && -d tests/sdk/js/node_modules/centrifuge ]]; then
  watch_cmd="node tests/sdk/js/subscribe.mjs $watch_url $first_channel 1000000 3600000"
elif node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null; then
  watch_cmd="node -e '$raw_js' $watch_url $first_channel"
elif node --experimental-websocket -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null; then
  watch_cmd="node --experimental-websocket -e '$raw_js' $watch_url $first_channel"
else
  watch_cmd="(this Node.js has no WebSocket: use the JavaScript snippet in README.md)"
fi

{
  printf '\npgfanout cluster is up: %d node(s), channels %s\n' "$nodes" "$PGFANOUT_CHANNELS"
  printf '  Postgres  %s\n  Redis     %s\n' "$PGFANOUT_DATABASE_URL" "$PGFANOUT_REDIS_URL"
  for ((i = 0; i < nodes; i++)); do
    printf '  %-7s WebSocket ws://127.0.0.1:%d/connection/websocket   metrics http://127.0.0.1:%d/metrics\n' \
      "${ids[i]}" "${ports[i]}" "${ports[i]}"
  done
  if [[ $PGFANOUT_DEMO == true ]]; then
    printf '\nLive demo (open it in a browser; every node serves it, try one tab per node):\n  http://127.0.0.1:%d/demo/\n' "${ports[0]}"
  fi
  printf '\nWatch %s on %s (another terminal; any node works):\n  %s\n' "$first_channel" "${ids[last]}" "$watch_cmd"
  printf '\nSend a notification:\n  psql "%s" -c "SELECT pg_notify('"'"'%s'"'"', '"'"'{\\"id\\":1}'"'"')"\n' \
    "$PGFANOUT_DATABASE_URL" "$first_channel"
  printf '\nCtrl-C stops the cluster.\n\n'
} >&2

# Runs until a node exits on its own (then stops the others and fails) or a signal arrives.
status=0
wait -n -p gone "${pids[@]}" || status=$?
if ((!stopping)); then
  for ((i = 0; i < nodes; i++)); do [[ ${pids[i]} == "${gone:-}" ]] && say "${ids[i]} exited (status $status)"; done
  stop_nodes
  exit 1
fi
