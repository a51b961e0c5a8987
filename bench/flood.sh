#!/usr/bin/env bash
# A flood from a few heavy client addresses against one steady client, with the
# per-client limits on and off (issue 24): how much of its connection rate and latency the
# steady client keeps.
#
#   bench/flood.sh     # FLOOD_SOURCES=10 FLOOD_CONCURRENCY=256 STEADY_RATE=200 LIMIT=400 DURATION=8
#
# edgeproxy pinned to CPU $PROXY_CPU (one worker), the backend and both load generators on
# CPU $LOAD_CPU. The steady client (127.0.0.1, paced at STEADY_RATE new connections a
# second, under its limit) runs alone, then beside the flood (as fast as it goes, from
# FLOOD_SOURCES addresses at 127.2.0.0 up), with `[rate_limit]` at LIMIT new connections a
# second per client and then off. A flood spread over more addresses than its rate per
# address exceeds the limit is not what per-client limits are for. Loopback only, bounded
# in time; stops only the processes it started.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
DURATION=${DURATION:-8}
FLOOD_SOURCES=${FLOOD_SOURCES:-10}
STEADY_RATE=${STEADY_RATE:-200}
LIMIT=${LIMIT:-400}
FLOOD_CONCURRENCY=${FLOOD_CONCURRENCY:-256}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
WORK=$(mktemp -d /tmp/edgeproxy-flood.XXXXXX)
LISTEN=127.0.0.1:18200 ECHO=127.0.0.1:18201
(cd "$root" && cargo build --release --locked -q -p edgeproxy -p loadgen)
bin=$root/target/release
ulimit -n "$(ulimit -Hn)"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
taskset -c "$LOAD_CPU" "$bin/edgeproxy-loadgen" echo --listen $ECHO & pids+=($!)

. "$here/settle.sh"

# run LIMITS(on|off) FLOOD(yes|no): prints the steady client's and the flood's results.
run() {
  settle
  local env=(THREADS=1 EDGEPROXY="$bin/edgeproxy")
  if [ "$1" = on ]; then
    env+=(EDGEPROXY_RATE_LIMIT_ENABLED=true EDGEPROXY_RATE_LIMIT_MAX_REQUESTS="$LIMIT")
  fi
  taskset -c "$PROXY_CPU" env "${env[@]}" "$here/edgeproxy-cmd.sh" $LISTEN $ECHO "$WORK" >/dev/null 2>&1 &
  local proxy=$!
  pids+=("$proxy")
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18200) 2>/dev/null && break; sleep 0.05; done
  local flood_out="$WORK/flood.json" flood=""
  if [ "$2" = yes ]; then
    taskset -c "$LOAD_CPU" "$bin/edgeproxy-loadgen" rate --target $LISTEN --concurrency "$FLOOD_CONCURRENCY" \
      --sources "$FLOOD_SOURCES" --warmup 1 --duration $((DURATION + 2)) > "$flood_out" &
    flood=$!
    pids+=("$flood")
    sleep 1  # the flood is under way before the steady client starts
  fi
  local steady
  steady=$(taskset -c "$LOAD_CPU" "$bin/edgeproxy-loadgen" rate --target $LISTEN --concurrency 8 \
    --max-rate "$STEADY_RATE" --warmup 1 --duration "$DURATION" --pid "$proxy")
  if [ -n "$flood" ]; then wait "$flood" || true; fi
  kill "$proxy" 2>/dev/null || true; wait "$proxy" 2>/dev/null || true
  echo "limits $1, flood $2: steady $steady"
  if [ -n "$flood" ]; then echo "  flood $(cat "$flood_out")"; fi
}

run on no
run on yes
run off yes
