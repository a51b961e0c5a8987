#!/usr/bin/env bash
# edgeproxy's DNS server against Knot and gdnsd serving the same answers from a static
# zone, side by side in one run, one core each.
#
#   bench/dns.sh
#   SERVERS="edgeproxy edgeproxy-native knot gdnsd" ROUNDS=3 DURATION=10 bench/dns.sh
#
# Installs dnsperf, Knot, gdnsd and dig (Debian packages) when missing and builds edgeproxy in
# release mode. Every server runs pinned to CPU $SERVER_CPU with one worker (one UDP
# thread), dnsperf on CPU $LOAD_CPU; the servers take turns within each round, in reverse
# order every other round. Each turn runs dnsperf flat out for $DURATION s (queries/s,
# and the server's CPU time per query from /proc, which stays fair if dnsperf is the one
# saturated, and how much of it is user space: the rest is the kernel's UDP work,
# delivering the replies included), then for 5 s at a fixed $LAT_QPS (below every
# server's most) for latency percentiles and CPU per query at equal load. The question is
# `app.internal A`: edgeproxy answers the policy's pick and one alternate (two A records),
# the zones hold the same two. Loopback only; every load is bounded; it stops only the
# processes it started, by PID.
#
# Servers: edgeproxy (the embedded WebAssembly policy deciding every answer),
# edgeproxy-native (the native scorer), edgeproxy-rrl (the WebAssembly policy with the
# response rate limit on, set high enough to refuse nothing: its cost), knot, gdnsd,
# edgeproxy=FILE (that policy component instead of the embedded one: two builds of a
# policy side by side) and edgeproxy@BINARY (that edgeproxy binary with its embedded
# policy: two builds of edgeproxy side by side).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
SERVERS=${SERVERS:-"edgeproxy edgeproxy-native knot gdnsd"}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10}
LAT_QPS=${LAT_QPS:-50000}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
WORK=${WORK:-$(mktemp -d /tmp/edgeproxy-dns-bench.XXXXXX)}
PORT=15353

need() { command -v "$1" >/dev/null 2>&1; }
if ! need dnsperf || ! need knotd || ! need gdnsd || ! need dig; then
  echo "installing dnsperf, knot, gdnsd and dig (Debian packages)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsperf knot gdnsd bind9-dnsutils >/dev/null
fi
(cd "$root" && cargo build --release --locked -q -p edgeproxy)
bin=$root/target/release/edgeproxy

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# The same names everywhere: the pick and one alternate for a client of no known country
# (edgeproxy: the POP's region first).
db=$WORK/routing.db
"$bin" db init --db "$db" >/dev/null
"$bin" backend add sa-1 --db "$db" --app app --region sa --country BR --wg-ip 10.1.0.1 --port 7001 >/dev/null
"$bin" backend add eu-1 --db "$db" --app app --region eu --country DE --wg-ip 10.2.0.1 --port 7002 >/dev/null
"$bin" backend add us-1 --db "$db" --app app --region us --country US --wg-ip 10.3.0.1 --port 7003 >/dev/null
cat > "$WORK/internal.zone" <<EOF
\$TTL 10
@    IN SOA ns.internal. hostmaster.internal. 1 3600 600 86400 10
@    IN NS  ns.internal.
ns   IN A   127.0.0.1
app  IN A   10.1.0.1
app  IN A   10.2.0.1
EOF
mkdir -p "$WORK/knot" "$WORK/gdnsd/zones"
cat > "$WORK/knot.conf" <<EOF
server:
    listen: 127.0.0.1@$PORT
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
    rundir: $WORK/knot
database:
    storage: $WORK/knot
log:
  - target: stderr
    any: warning
zone:
  - domain: internal
    storage: $WORK
    file: internal.zone
EOF
cat > "$WORK/gdnsd/config" <<EOF
options => {
  listen => [ 127.0.0.1 ]
  dns_port => $PORT
  udp_threads => 1
  tcp_threads => 1
}
EOF
cp "$WORK/internal.zone" "$WORK/gdnsd/zones/internal"
echo "app.internal A" > "$WORK/queries.txt"

start_server() {
  local name=$1 cmd
  case $name in
    edgeproxy|edgeproxy-native|edgeproxy-rrl|edgeproxy=*|edgeproxy@*)
      cmd=(env EDGEPROXY_DB_PATH="$db" EDGEPROXY_REGION=sa EDGEPROXY_LISTEN_ADDR=127.0.0.1:18000
           EDGEPROXY_ADMIN_ADDR= EDGEPROXY_WORKER_THREADS=1 EDGEPROXY_DNS_ENABLED=true
           EDGEPROXY_DNS_LISTEN_ADDR=127.0.0.1:$PORT EDGEPROXY_DNS_RATE_LIMIT=0)
      case $name in
        edgeproxy-native) cmd+=(EDGEPROXY_NATIVE_POLICY=true) ;;
        edgeproxy-rrl) cmd+=(EDGEPROXY_DNS_RATE_LIMIT=10000000) ;;
        edgeproxy=*) cmd+=(EDGEPROXY_POLICY_PATH="${name#edgeproxy=}") ;;
      esac
      case $name in
        # A path (env would take a bare name from PATH, and a word with = as a setting).
        edgeproxy@*/*=*|edgeproxy@*=*) echo "$name: a binary's path may not hold =" >&2; exit 2 ;;
        edgeproxy@*/*) cmd+=("${name#edgeproxy@}") ;;
        edgeproxy@*) echo "$name: give the binary as a path (./edgeproxy)" >&2; exit 2 ;;
        *) cmd+=("$bin") ;;
      esac ;;
    knot) cmd=(knotd -c "$WORK/knot.conf") ;;
    gdnsd) cmd=(gdnsd -c "$WORK/gdnsd" -D start) ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  taskset -c "$SERVER_CPU" "${cmd[@]}" >"$WORK/${name//\//_}.log" 2>&1 & server_pid=$!
  pids+=("$server_pid")
  for _ in $(seq 100); do  # up to 5 s for an answer
    dig +short +time=1 +tries=1 -p $PORT @127.0.0.1 app.internal A 2>/dev/null | grep -q . && return
    sleep 0.05
  done
  echo "$name did not answer; its log:" >&2; cat "$WORK/${name//\//_}.log" >&2; exit 1
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true
  unset 'pids[-1]'
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
user_ticks() { awk '{print $14}' "/proc/$1/stat"; }

results=$WORK/results.jsonl
: > "$results"
order=($SERVERS)
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 0 ]; then order=($(printf '%s\n' "${order[@]}" | tac)); fi
  for name in "${order[@]}"; do
    start_server "$name"
    # Warm up (the policy's instances, caches), then flat out.
    taskset -c "$LOAD_CPU" dnsperf -s 127.0.0.1 -p $PORT -d "$WORK/queries.txt" -l 2 -q 200 >/dev/null 2>&1
    t0=$(cpu_ticks "$server_pid"); u0=$(user_ticks "$server_pid")
    out=$(taskset -c "$LOAD_CPU" dnsperf -s 127.0.0.1 -p $PORT -d "$WORK/queries.txt" -l "$DURATION" -q 200 -c 4 2>&1)
    t1=$(cpu_ticks "$server_pid"); u1=$(user_ticks "$server_pid")
    # At a fixed rate, every query's latency (-v), for percentiles.
    t2=$(cpu_ticks "$server_pid")
    taskset -c "$LOAD_CPU" dnsperf -s 127.0.0.1 -p $PORT -d "$WORK/queries.txt" -l 5 -Q "$LAT_QPS" -v 2>&1 \
      | awk '/^> NOERROR/ {print $NF}' > "$WORK/latency.txt"
    t3=$(cpu_ticks "$server_pid")
    stop_server
    python3 - "$name" "$round" "$((t1 - t0))" "$(getconf CLK_TCK)" "$out" "$WORK/latency.txt" "$((t3 - t2))" "$((u1 - u0))" >>"$results" <<'PY'
import json, re, sys
name, rnd, ticks, hz, out, lat, fixed_ticks, user_ticks = sys.argv[1:9]
qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
done = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
lats = sorted(float(x) for x in open(lat).read().split())
pct = lambda p: round(lats[min(len(lats) - 1, int(p * len(lats)))] * 1e6, 1) if lats else None
cpu_s = int(ticks) / int(hz)
print(json.dumps({"server": name, "round": int(rnd), "qps": qps, "lost": lost,
                  "cpu_us_per_query": round(cpu_s * 1e6 / max(done, 1), 2),
                  "user_us_per_query": round(int(user_ticks) / int(hz) * 1e6 / max(done, 1), 2),
                  "cpu_us_per_query_fixed": round(int(fixed_ticks) / int(hz) * 1e6 / max(len(lats), 1), 2),
                  "p50_us": pct(0.5), "p99_us": pct(0.99), "p999_us": pct(0.999)}))
PY
    tail -1 "$results" >&2
  done
done

python3 - "$results" "$SERVERS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
servers = sys.argv[2].split()
def col(s, k):
    v = [r[k] for r in rows if r["server"] == s and r[k] is not None]
    return (statistics.mean(v), (max(v) - min(v)) / statistics.mean(v) * 100 if len(v) > 1 else 0) if v else (None, 0)
print("| | " + " | ".join(servers) + " |")
print("|---|" + "---|" * len(servers))
for k, label in [("qps", "queries/s (dnsperf flat out)"), ("cpu_us_per_query", "server CPU per query (us)"),
                 ("user_us_per_query", "of which in user space (us)"),
                 ("cpu_us_per_query_fixed", "server CPU per query at the fixed rate (us)"),
                 ("p50_us", "p50 latency at fixed rate (us)"), ("p99_us", "p99 (us)"), ("p999_us", "p99.9 (us)")]:
    cells = []
    for s in servers:
        m, spread = col(s, k)
        cells.append("-" if m is None else f"{m:,.1f} (±{spread / 2:.0f}%)")
    print(f"| {label} | " + " | ".join(cells) + " |")
cpu = {s: col(s, "cpu_us_per_query")[0] for s in servers}
print()
for s in servers:
    if cpu[s]:
        print(f"{s}: {1e6 / cpu[s]:,.0f} queries per CPU-second", end="")
        ref = [f"{cpu[o] / cpu[s]:.2f}x {o}" for o in servers if o != s and cpu[o] and not o.startswith("edgeproxy")]
        print(" (" + ", ".join(ref) + ")" if s.startswith("edgeproxy") and ref else "")
PY
echo "raw results: $results" >&2
