#!/usr/bin/env bash
# edgeproxy against HAProxy and nginx stream, side by side in one run, per proxy core.
#
#   bench/compare.sh                      # all proxies, all tests
#   PROXIES="edgeproxy haproxy-splice" TESTS="rate bulk1" bench/compare.sh
#   BASELINE=/tmp/edgeproxy-old PROXIES="baseline edgeproxy" TESTS="rate idle" bench/compare.sh
#   PROXIES="edgeproxy-native edgeproxy-trap edgeproxy" TESTS=rate bench/compare.sh
#   PROXIES="edgeproxy-decide edgeproxy-shadow edgeproxy-decide edgeproxy-shadow" TESTS=rate bench/compare.sh
#   PROXIES="edgeproxy-decide edgeproxy-shadow-trap edgeproxy-decide edgeproxy-shadow-trap" TESTS=rate bench/compare.sh
#   SOURCES=10000 PROXIES="edgeproxy edgeproxy-limited edgeproxy edgeproxy-limited" TESTS=rate bench/compare.sh
#   PROXIES="edgeproxy-tls haproxy-tls nginx-tls" TESTS="tls-rate tls-bulk1" bench/compare.sh
#   ROUNDS=2 MINE=edgeproxy-uring PROXIES="edgeproxy-uring edgeproxy nginx" TESTS="rate idle bulk1" bench/compare.sh
#   (EDGEPROXY_BIN=path runs edgeproxy-native and edgeproxy-trap on another build)
#
# ROUNDS repeats the list of proxies (alternated within each round, so drift in the
# machine hits all alike); each rate run starts from the same TIME_WAIT state (settle.sh).
# The last column is MINE's mean against the best peer's (MINE: edgeproxy, or the first
# edgeproxy variant listed), with each side's spread over its runs, (max - min) / mean:
# a difference smaller than the spread is noise.
#
# Installs HAProxy and nginx (Debian packages) when missing, builds edgeproxy and the
# project's load generator (bench/loadgen) in release mode, then for each proxy and test
# starts a fresh proxy pinned to CPU $PROXY_CPU with one worker, runs the load from CPU
# $LOAD_CPU (backends there too), and prints one markdown table with ratios to edgeproxy.
# Loopback only; every load is bounded in time and count; it stops only the processes it
# started, by PID.
#
# Tests: rate (new connections/s: 64 concurrent connect + 64 B echo + close, p50/p99
# latency, proxy CPU per connection), bulk1 and bulk8 (Gbit/s through 1 and 8 streams,
# proxy CPU seconds per GB), idle (proxy RSS per idle connection, both legs live),
# idle-scale (the same at each of $IDLE_SCALE connections, through 8 backends, with the
# time it took to open them; every proxy sized to the fd limit, counts past it skipped).
# tls-rate, tls-bulk1 and tls-idle: rate, bulk1 and idle through a TLS session each proxy
# terminates (the *-tls proxies, one ECDSA P-256 certificate for all), every connection a
# full handshake.
# edgeproxy runs with the embedded wasm policy deciding and bindings on, as deployed;
# edgeproxy-uring is the same on the io_uring data path (data_path = "io_uring").
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
PROXIES=${PROXIES:-"edgeproxy haproxy haproxy-splice nginx"}
ROUNDS=${ROUNDS:-1}
round=$PROXIES
for _ in $(seq 2 "$ROUNDS"); do PROXIES="$PROXIES $round"; done
TESTS=${TESTS:-"rate bulk1 bulk8 idle"}
DURATION=${DURATION:-10}
SOURCES=${SOURCES:-0}  # rate from this many client addresses (127.2.0.0 up); 0: 127.0.0.1
WARMUP=${WARMUP:-3}
IDLE_CONNS=${IDLE_CONNS:-9000}  # 2 fds each through a proxy: fits a 20000 fd limit
IDLE_SCALE=${IDLE_SCALE:-"10000 50000 100000"}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
WORK=${WORK:-$(mktemp -d /tmp/edgeproxy-bench.XXXXXX)}
LISTEN=127.0.0.1:18000 ECHO=127.0.0.1:18100 SINK=127.0.0.1:18101
# idle-scale's backends: one proxy address reaches a backend address from at most ~28,000
# ports, so 100,000 connections need several.
ECHOS=127.0.0.1:18110,127.0.0.1:18111,127.0.0.1:18112,127.0.0.1:18113,127.0.0.1:18114,127.0.0.1:18115,127.0.0.1:18116,127.0.0.1:18117

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  echo "installing haproxy and nginx (Debian packages)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx libnginx-mod-stream >/dev/null
fi
(cd "$root" && cargo build --release --locked -q -p edgeproxy -p loadgen)
bin=$root/target/release
case " $PROXIES " in *" edgeproxy-trap "*|*" edgeproxy-shadow-trap "*)
  "$bin/edgeproxy" policy build "$root/host/tests/fixtures/chaos-policy" --out "$WORK/chaos.wasm" >/dev/null ;;
esac
# 2 fds per proxied connection: idle-scale's 100,000 needs a hard limit over 200,000,
# which only root with CAP_SYS_RESOURCE can raise. Each proxy is sized to the limit.
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
FDS=$(ulimit -n)
MAXCONN=$(( (FDS - 200) / 2 ))
export EDGEPROXY_MAX_CONNECTIONS=$MAXCONN

case " $TESTS " in *" tls-"*)  # one ECDSA P-256 pair for every proxy
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench.test \
    -addext subjectAltName=DNS:bench.test -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>/dev/null
  cat "$WORK/tls.pem" "$WORK/tls.key" > "$WORK/tls-combined.pem" ;;
esac

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Background jobs are started by taskset directly (it execs), so $! is the process itself.
load() { taskset -c "$LOAD_CPU" "$bin/edgeproxy-loadgen" "$@"; }
taskset -c "$LOAD_CPU" "$bin/edgeproxy-loadgen" echo --listen $ECHO & pids+=($!)
case " $TESTS " in *" idle-scale "*)
  taskset -c "$LOAD_CPU" "$bin/edgeproxy-loadgen" echo $(printf -- '--listen %s ' ${ECHOS//,/ }) & pids+=($!) ;;
esac
taskset -c "$LOAD_CPU" "$bin/edgeproxy-loadgen" sink --listen $SINK & pids+=($!)

render() { # TEMPLATE OUT BACKENDS(comma-separated) [SPLICE]
  local servers="" i=0 b
  for b in ${3//,/ }; do
    i=$((i + 1))
    case $1 in
      *haproxy*) servers+="    server s$i $b\n" ;;
      *) servers+="        server $b;\n" ;;
    esac
  done
  sed -e "s|@LISTEN@|$LISTEN|; s|@SERVERS@|$servers|; s|@WORK@|$WORK|g; s|@FDS@|$FDS|; s|@MAXCONN@|$MAXCONN|" "$1" > "$2"
  if [ "${4:-}" = splice ]; then sed -i "s/#SPLICE# //" "$2"; fi
}

# Starts proxy $1 towards backend $2 on CPU $PROXY_CPU; sets $proxy_pid.
start_proxy() {
  local name=$1 backend=$2 cmd
  case $name in
    edgeproxy)  # the same adapter the shared harness uses; it execs edgeproxy
      cmd=(env EDGEPROXY="$bin/edgeproxy" THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    # These two decide every connection (bindings off), so the policy runs each time.
    edgeproxy-uring)  # the io_uring data path
      cmd=(env EDGEPROXY="$bin/edgeproxy" EDGEPROXY_DATA_PATH=io_uring THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    edgeproxy-uring-decide)  # the io_uring data path, the embedded policy deciding every connection
      cmd=(env EDGEPROXY="$bin/edgeproxy" EDGEPROXY_DATA_PATH=io_uring BINDINGS=0 THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    edgeproxy-native)  # the host's native scorer, no WebAssembly
      cmd=(env EDGEPROXY="${EDGEPROXY_BIN:-$bin/edgeproxy}" POLICY=native BINDINGS=0 THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    edgeproxy-decide)  # the embedded policy deciding every connection (bindings off)
      cmd=(env EDGEPROXY="$bin/edgeproxy" BINDINGS=0 THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    edgeproxy-shadow)  # the same, with geo-load also deciding every connection as a shadow
      cmd=(env EDGEPROXY="$bin/edgeproxy" BINDINGS=0 EDGEPROXY_SHADOW_POLICY_PATH="$root/policies/geo-load/geo-load.wasm" THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    edgeproxy-shadow-trap)  # deciding every connection, with a shadow that traps on every call
      cmd=(env EDGEPROXY="$bin/edgeproxy" APP=trap BINDINGS=0 EDGEPROXY_SHADOW_POLICY_PATH="$WORK/chaos.wasm" THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    edgeproxy-limited)  # per-client limits on, high enough to refuse nothing (their cost)
      cmd=(env EDGEPROXY="$bin/edgeproxy" EDGEPROXY_RATE_LIMIT_ENABLED=true EDGEPROXY_RATE_LIMIT_MAX_REQUESTS=1000000 EDGEPROXY_RATE_LIMIT_MAX_OPEN=1000000 THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    edgeproxy-trap)  # a policy that traps on every call (the test suite's chaos policy)
      cmd=(env EDGEPROXY="${EDGEPROXY_BIN:-$bin/edgeproxy}" APP=trap BINDINGS=0 EDGEPROXY_POLICY_PATH="$WORK/chaos.wasm" THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    baseline)  # another edgeproxy build (BASELINE=path), for before/after runs
      cmd=(env EDGEPROXY="${BASELINE:?set BASELINE to an edgeproxy binary}" THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    edgeproxy-tls)
      cmd=(env EDGEPROXY="$bin/edgeproxy" TLS_CERT="$WORK/tls.pem" TLS_KEY="$WORK/tls.key" THREADS=1 "$here/edgeproxy-cmd.sh" $LISTEN "$backend" "$WORK") ;;
    haproxy-tls) render "$here/peers/haproxy-tls.cfg" "$WORK/haproxy.cfg" "$backend"
      cmd=(haproxy -db -f "$WORK/haproxy.cfg") ;;
    nginx-tls) render "$here/peers/nginx-tls.conf" "$WORK/nginx.conf" "$backend"
      cmd=(nginx -c "$WORK/nginx.conf") ;;
    haproxy) render "$here/peers/haproxy.cfg" "$WORK/haproxy.cfg" "$backend"
      cmd=(haproxy -db -f "$WORK/haproxy.cfg") ;;
    haproxy-splice) render "$here/peers/haproxy.cfg" "$WORK/haproxy.cfg" "$backend" splice
      cmd=(haproxy -db -f "$WORK/haproxy.cfg") ;;
    nginx) render "$here/peers/nginx.conf" "$WORK/nginx.conf" "$backend"
      cmd=(nginx -c "$WORK/nginx.conf") ;;
    *) echo "unknown proxy $name" >&2; exit 2 ;;
  esac
  taskset -c "$PROXY_CPU" "${cmd[@]}" >"$WORK/$name.log" 2>&1 & proxy_pid=$!
  pids+=("$proxy_pid")
  for _ in $(seq 100); do  # up to 5 s for the listener
    (exec 3<>/dev/tcp/127.0.0.1/18000) 2>/dev/null && break
    sleep 0.05
  done
  # nginx and haproxy fork nothing with these configs, but report the worker if any.
  local child; child=$(pgrep -P "$proxy_pid" | head -1 || true)
  if [ -n "$child" ]; then proxy_pid=$child; fi
}

stop_proxy() {
  local p=${pids[-1]}
  kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
  unset 'pids[-1]'
}

results=$WORK/results.jsonl
record() { echo "{\"proxy\":\"$1\",\"test\":\"$2\",\"result\":$3}" | tee -a "$results" >&2; }
: > "$results"
. "$here/settle.sh"
for test in $TESTS; do
  for name in $PROXIES; do
    case $test in
      rate)  settle; start_proxy "$name" $ECHO
             out=$(load rate --target $LISTEN --warmup "$WARMUP" --duration "$DURATION" --pid "$proxy_pid" --sources "$SOURCES") ;;
      bulk1) start_proxy "$name" $SINK
             out=$(load bulk --target $LISTEN --streams 1 --duration "$DURATION" --pid "$proxy_pid") ;;
      tls-rate) settle; start_proxy "$name" $ECHO
             out=$(load rate --tls --target $LISTEN --warmup "$WARMUP" --duration "$DURATION" --pid "$proxy_pid") ;;
      tls-idle) start_proxy "$name" $ECHO
             out=$(load idle --tls --target $LISTEN --count "$IDLE_CONNS" --pid "$proxy_pid") ;;
      tls-bulk1) start_proxy "$name" $SINK
             out=$(load bulk --tls --target $LISTEN --streams 1 --duration "$DURATION" --pid "$proxy_pid") ;;
      bulk8) start_proxy "$name" $SINK
             out=$(load bulk --target $LISTEN --streams 8 --duration "$DURATION" --pid "$proxy_pid") ;;
      idle)  start_proxy "$name" $ECHO
             out=$(load idle --target $LISTEN --count "$IDLE_CONNS" --pid "$proxy_pid") ;;
      idle-scale)
             for n in $IDLE_SCALE; do
               if [ "$n" -gt "$MAXCONN" ]; then
                 echo "idle-$n skipped: needs $((2 * n + 200)) fds in the proxy, the limit here is $FDS" >&2
                 continue
               fi
               start_proxy "$name" $ECHOS
               out=$(load idle --target $LISTEN --count "$n" --pid "$proxy_pid")
               stop_proxy
               record "$name" "idle-$n" "$out"
             done
             continue ;;
      *) echo "unknown test $test" >&2; exit 2 ;;
    esac
    stop_proxy
    record "$name" "$test" "$out"
  done
done

cp "$results" "$root/target/compare-results.jsonl"  # for bench/plot_scale.py
MINE=${MINE:-} python3 - "$results" "$PROXIES" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
proxies = sys.argv[2].split()
metrics = [("rate", "cps", "connections/s", True), ("rate", "p99_us", "p99 connect+echo (us)", False),
           ("rate", "proxy_cpu_us_per_conn", "proxy CPU per connection (us)", False),
           ("bulk1", "gbps", "bulk, 1 stream (Gbit/s)", True), ("bulk1", "proxy_cpu_s_per_gb", "proxy CPU per GB, 1 stream (s)", False),
           ("bulk8", "gbps", "bulk, 8 streams (Gbit/s)", True), ("idle", "bytes_per_conn", "RSS per idle connection (B)", False),
           ("tls-rate", "cps", "TLS full handshakes/s (+64 B echo)", True), ("tls-rate", "p99_us", "TLS p99 handshake+echo (us)", False),
           ("tls-rate", "proxy_cpu_us_per_conn", "TLS proxy CPU per handshake (us)", False),
           ("tls-bulk1", "gbps", "TLS bulk, 1 stream (Gbit/s)", True), ("tls-bulk1", "proxy_cpu_s_per_gb", "TLS proxy CPU per GB (s)", False),
           ("tls-idle", "bytes_per_conn", "RSS per idle terminated TLS connection (B)", False)]
for t in sorted({r["test"] for r in rows if r["test"].startswith("idle-")}, key=lambda t: int(t[5:])):
    n = int(t[5:])
    metrics += [(t, "bytes_per_conn", f"RSS per idle connection, {n:,} open (B)", False),
                (t, "open_s", f"time to open {n:,} (s)", False)]
def runs(p, t):
    return [r["result"] for r in rows if r["proxy"] == p and r["test"] == t]
def get(p, t, m, k=0):  # the k-th run of p (a name repeated in PROXIES is another round)
    found = runs(p, t)
    return found[k].get(m) if k < len(found) else None
def mean(p, t, m):
    found = [r.get(m) for r in runs(p, t) if r.get(m) is not None]
    return sum(found) / len(found) if found else None
def spread(p, t, m):
    found = [r.get(m) for r in runs(p, t) if r.get(m) is not None]
    if len(found) < 2 or not sum(found):
        return None
    return (max(found) - min(found)) / (sum(found) / len(found))
mine = os.environ.get("MINE") or ("edgeproxy" if "edgeproxy" in proxies else next((p for p in proxies if p.startswith("edgeproxy")), None))
print("| metric | " + " | ".join(proxies) + f" | {mine} vs best peer (spread: {mine} / peer) |")
print("|---|" + "---|" * (len(proxies) + 1))
for test, key, label, higher in metrics:
    vals = [get(p, test, key, proxies[:i].count(p)) for i, p in enumerate(proxies)]
    if all(v is None for v in vals):
        continue
    cells = ["-" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}" for v in vals]
    # Each proxy's mean over its rounds.
    ours = mean(mine, test, key) if mine else None
    peers = [(v, p) for v, p in ((mean(p, test, key), p) for p in dict.fromkeys(proxies) if p != mine) if v is not None]
    ratio = "-"
    if ours is not None and peers:
        best, peer = max(peers) if higher else min(peers)
        ratio = f"{ours / best:.2f}x" if best else "-"
        s_ours, s_peer = spread(mine, test, key), spread(peer, test, key)
        if s_ours is not None and s_peer is not None:
            ratio += f" ({s_ours:.0%} / {s_peer:.0%})"
    print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
PY
