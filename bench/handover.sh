#!/usr/bin/env bash
# Upgrades under load (issue 27): l4load's closed loop (16 clients: connect, echo 64
# bytes, close) through a proxy for 12 s, once untouched and once with 5 upgrades 2 s
# apart, for edgeproxy (a new process taking the sockets over the handover socket) and
# HAProxy (master-worker reload, SIGUSR2: the new worker takes the listeners from the old
# one). Runs alternate over ROUNDS. Prints connections, failed connections and the
# latency percentiles (connect() to the last echoed byte) of each run.
#   bench/handover.sh [ROUNDS=2]
# Env: EDGEPROXY (binary, default target/release/edgeproxy). Loopback only; every process
# started here is stopped by PID.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rounds=${1:-2}
bin=${EDGEPROXY:-$here/../target/release/edgeproxy}
work=$(mktemp -d /tmp/handover-bench.XXXXXX)
build=${WORKROOT:-/tmp/l4bench}/build
mkdir -p "$build"
for b in l4load echosrv; do
  [ -x "$build/$b" ] || gcc -O2 -Wall -pthread -o "$build/$b" "$here/../../shared/bench/$b.c"
done
port=17300 bport=17301
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'stop_all; rm -rf "$work"' EXIT
"$build/echosrv" -a 127.0.0.1 -p $bport >/dev/null 2>&1 &
pids+=($!)

listening() { for _ in $(seq 100); do ss -Hltn "( sport = :$1 )" | grep -q . && return 0; sleep 0.1; done; return 1; }
free() { for _ in $(seq 100); do ss -Hltn "( sport = :$1 )" | grep -q . || return 0; sleep 0.1; done; return 1; }

"$bin" db init --db "$work/routing.db" >/dev/null
"$bin" backend add echo --db "$work/routing.db" --app bench --region sa --country BR \
  --wg-ip 127.0.0.1 --port $bport --soft-limit 1000 >/dev/null 2>&1
edgeproxy() {
  EDGEPROXY_LISTEN_ADDR=127.0.0.1:$port EDGEPROXY_DB_PATH=$work/routing.db EDGEPROXY_REGION=sa \
    EDGEPROXY_ADMIN_ADDR= EDGEPROXY_WORKER_THREADS=1 EDGEPROXY_DRAIN_TIMEOUT_SECS=5 \
    EDGEPROXY_HANDOVER_SOCKET=$work/handover.sock EDGEPROXY_POLICY_CACHE_DIR=$work/cache \
    "$bin" >>"$work/edgeproxy.log" 2>&1 &
  pids+=($!)
}
cat >"$work/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 9900
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:$port
    default_backend be
backend be
    server s1 127.0.0.1:$bport
EOF

# run NAME UPGRADES: one 12 s load run, with UPGRADES upgrades 2 s apart.
run() {
  local name=$1 upgrades=$2 first= load
  free $port
  # Every run from the same TIME_WAIT state: the loopback's drained.
  for _ in $(seq 120); do [ "$(ss -Htan state time-wait | wc -l)" -gt 100 ] || break; sleep 1; done
  case $name in
    edgeproxy) edgeproxy ;;
    haproxy) haproxy -W -db -f "$work/haproxy.cfg" >>"$work/haproxy.log" 2>&1 & first=$!; pids+=($first) ;;
  esac
  listening $port
  "$build/l4load" rate -H 127.0.0.1 -p $port -c 16 -d 12 -w 1 -S 16 >"$work/load" &
  load=$!
  for i in $(seq "$upgrades"); do
    sleep 2
    case $name in
      edgeproxy) edgeproxy ;;
      haproxy) kill -USR2 "$first" ;;
    esac
  done
  wait $load
  printf '%-10s upgrades=%s %s\n' "$name" "$upgrades" "$(cat "$work/load")"
  # Stop what serves now (edgeproxy: the last successor; HAProxy: the master).
  case $name in
    edgeproxy) for p in "${pids[@]}"; do [ "$p" = "${pids[0]}" ] || kill -TERM "$p" 2>/dev/null || true; done ;;
    haproxy) kill -TERM "$first" ;;
  esac
  pids=("${pids[0]}")
  free $port
}

for r in $(seq "$rounds"); do
  for name in edgeproxy haproxy; do run $name 0; done
  for name in haproxy edgeproxy; do run $name 5; done
done
echo "edgeproxy successors that took over: $(grep -c 'took over;' "$work/edgeproxy.log" || true)"
