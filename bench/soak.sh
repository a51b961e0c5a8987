#!/usr/bin/env bash
# Soak: one edgeproxy under mixed load and injected faults for DURATION seconds (600 by
# default), then checks that it returned to where it started.
#
#   bench/soak.sh                 # 10 minutes
#   DURATION=120 bench/soak.sh    # a short one
#
# Load (all on loopback, bounded): short echo connections (edgeproxy-loadgen rate, 16 at
# once), bulk streams to a sink (2 streams), and waves of 500 idle connections. Faults:
# one of the two echo backends is killed every 30 s and restarted 5 s later; the routing
# table is edited every 5 s; the policy file is swapped every 7 s (geo-load and
# least-connections alternate). Sampled every 10 s: RSS, open descriptors, active
# connections. At the end (after the load stops): active connections must be 0, open
# descriptors back to their first sample, RSS within 5% of its sample after warm-up (a
# fifth of the run), and every client error explained by a fault (there should be none:
# new clients of a killed backend fail over; what it held when it died is reset).
# Stops only the processes it started, by PID.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
DURATION=${DURATION:-600}
WORK=${WORK:-$(mktemp -d /tmp/edgeproxy-soak.XXXXXX)}
ECHO_LISTEN=127.0.0.1:18010 BULK_LISTEN=127.0.0.1:18011 ADMIN=127.0.0.1:18019
ECHO_A=127.0.0.1:18110 ECHO_B=127.0.0.1:18111 SINK=127.0.0.1:18112

(cd "$root" && cargo build --release --locked -q -p edgeproxy -p loadgen)
bin=$root/target/release
ulimit -n "$(ulimit -Hn)"
"$bin/edgeproxy" policy build "$root/examples/policies/least-connections" --out "$WORK/least.wasm" >/dev/null
cp "$root/policies/geo-load/geo-load.wasm" "$WORK/geo.wasm"
cp "$WORK/geo.wasm" "$WORK/policy.wasm"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$bin/edgeproxy-loadgen" echo --listen $ECHO_A & pids+=($!)
"$bin/edgeproxy-loadgen" echo --listen $ECHO_B & echo_b=$!; pids+=($echo_b)
"$bin/edgeproxy-loadgen" sink --listen $SINK & pids+=($!)

db=$WORK/routing.db
"$bin/edgeproxy" db init --db "$db" >/dev/null
add() { "$bin/edgeproxy" backend add "$1" --db "$db" --app "$2" --region sa --country BR --wg-ip 127.0.0.1 --port "${3##*:}" --soft-limit 1000 >/dev/null; }
add echo-a echo $ECHO_A; add echo-b echo $ECHO_B; add sink bulk $SINK
cat > "$WORK/edgeproxy.toml" <<EOF
db_path = "$db"
policy_path = "$WORK/policy.wasm"
admin_addr = "$ADMIN"
[[listener]]
addr = "$ECHO_LISTEN"
app = "echo"
[[listener]]
addr = "$BULK_LISTEN"
app = "bulk"
EOF
"$bin/edgeproxy" --config "$WORK/edgeproxy.toml" 2>"$WORK/edgeproxy.log" & proxy=$!; pids+=($proxy)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18010) 2>/dev/null && break; sleep 0.05; done

metric() { curl -s "http://$ADMIN/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s+=$2} END {print s+0}'; }
sample() { echo "$(date +%s) $(awk '/VmRSS/{print $2}' /proc/$proxy/status) $(ls /proc/$proxy/fd | wc -l) $(metric edgeproxy_connections_active)"; }

end=$(( $(date +%s) + DURATION ))
: > "$WORK/samples"; : > "$WORK/rate.jsonl"; : > "$WORK/bulk.jsonl"; : > "$WORK/idle.jsonl"
# Load loops, each ending at $end.
( while [ "$(date +%s)" -lt $end ]; do
    "$bin/edgeproxy-loadgen" rate --target $ECHO_LISTEN --concurrency 16 --warmup 0 --duration 20 >> "$WORK/rate.jsonl" 2>>"$WORK/load.err"
  done ) & load_rate=$!; pids+=($load_rate)
( while [ "$(date +%s)" -lt $end ]; do
    "$bin/edgeproxy-loadgen" bulk --target $BULK_LISTEN --streams 2 --duration 20 >> "$WORK/bulk.jsonl" 2>>"$WORK/load.err" \
      || echo '{"test":"bulk","aborted":true}' >> "$WORK/bulk.jsonl"
  done ) & load_bulk=$!; pids+=($load_bulk)
( while [ "$(date +%s)" -lt $end ]; do
    # A wave is aborted (a reset) when its backend is killed under it: an injected fault.
    "$bin/edgeproxy-loadgen" idle --target $ECHO_LISTEN --count 500 --pid $proxy >> "$WORK/idle.jsonl" 2>>"$WORK/load.err" \
      || echo '{"test":"idle","aborted":true}' >> "$WORK/idle.jsonl"
    sleep 5
  done ) & load_idle=$!; pids+=($load_idle)

kills=0; t=0
while [ "$(date +%s)" -lt $end ]; do
  sleep 1; t=$((t + 1))
  if [ $((t % 30)) -eq 0 ]; then kill "$echo_b"; wait "$echo_b" 2>/dev/null || true; kills=$((kills + 1)); fi
  if [ $((t % 30)) -eq 5 ] && [ $t -gt 30 ]; then "$bin/edgeproxy-loadgen" echo --listen $ECHO_B & echo_b=$!; pids+=($echo_b); fi
  if [ $((t % 5)) -eq 0 ]; then "$bin/edgeproxy" backend update echo-a --db "$db" --weight $((1 + t % 3)) >/dev/null; fi
  if [ $((t % 7)) -eq 0 ]; then
    if [ $(((t / 7) % 2)) -eq 0 ]; then src=least; else src=geo; fi
    cp "$WORK/$src.wasm" "$WORK/policy.wasm.new" && mv "$WORK/policy.wasm.new" "$WORK/policy.wasm"
  fi
  if [ $((t % 10)) -eq 0 ]; then sample >> "$WORK/samples"; fi
done
wait "$load_rate" "$load_bulk" "$load_idle" 2>/dev/null || true
for _ in $(seq 300); do [ "$(metric edgeproxy_connections_active)" = 0 ] && break; sleep 0.1; done
sample >> "$WORK/samples"

python3 - "$WORK" "$kills" "$DURATION" <<'PY'
import json, sys
work, kills, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
samples = [list(map(int, l.split())) for l in open(f"{work}/samples")]
rate = [json.loads(l) for l in open(f"{work}/rate.jsonl") if l.strip()]
bulk = [json.loads(l) for l in open(f"{work}/bulk.jsonl") if l.strip()]
idle = [json.loads(l) for l in open(f"{work}/idle.jsonl") if l.strip()]
first, last = samples[0], samples[-1]
warm = samples[max(1, len(samples) // 5)]
conns = sum(r["conns"] for r in rate); errors = sum(r["errors"] for r in rate)
aborted = sum(1 for w in idle + bulk if w.get("aborted"))
rss_growth = (last[1] - warm[1]) / warm[1]
checks = {
    "active connections at the end": (last[3] == 0, last[3]),
    "open descriptors back to the start": (last[2] <= first[2], f"{first[2]} -> {last[2]}"),
    "RSS growth after warm-up under 5%": (rss_growth < 0.05, f"{warm[1]} -> {last[1]} KiB ({rss_growth:+.1%})"),
    # A killed backend resets what it held: short connections in flight to it, and an
    # idle wave holding some of its connections. Nothing else may fail.
    "client errors explained by the kills": (errors <= 16 * kills and aborted <= kills,
        f"{errors} of {conns} short connections, {aborted} aborted waves, {kills} kills"),
}
print(f"soak: {duration} s, {len(samples)} samples, backend killed {kills} times, "
      f"{conns} short connections, {sum(b.get('bytes', 0) for b in bulk) / 1e9:.1f} GB bulk, "
      f"{len(idle)} waves of 500 idle connections")
for name, (ok, detail) in checks.items():
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
sys.exit(0 if all(ok for ok, _ in checks.values()) else 1)
PY
