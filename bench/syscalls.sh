#!/usr/bin/env bash
# syscalls per proxied connection: strace -c -f over a fixed-length rate run.
# usage: bench/syscalls.sh epoll|io_uring   (after cargo build --release -p edgeproxy -p loadgen; needs strace)
# Loopback only, 3 s of load; stops only the processes it started.
set -euo pipefail
path=$1
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/.." && pwd); bin=$root/target/release
work=$(mktemp -d)
taskset -c 0 $bin/edgeproxy-loadgen echo --listen 127.0.0.1:18200 & echo_pid=$!
sleep 0.3
EDGEPROXY=$bin/edgeproxy THREADS=1 EDGEPROXY_DATA_PATH=$path taskset -c 1 $root/bench/edgeproxy-cmd.sh 127.0.0.1:18201 127.0.0.1:18200 $work & pp=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18201) 2>/dev/null && break; sleep 0.05; done
sleep 0.5
pid=$(pgrep -f "edgeproxy.*" -P $pp | head -1 || true); [ -n "$pid" ] || pid=$pp
strace -c -f -p $pid -o $work/strace.txt & st=$!
sleep 1
out=$(taskset -c 0 $bin/edgeproxy-loadgen rate --target 127.0.0.1:18201 --warmup 0 --duration 3 --pid $pid)
sleep 0.5
kill -INT $st; wait $st 2>/dev/null || true
kill $pp $echo_pid 2>/dev/null || true; wait 2>/dev/null || true
conns=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["conns"])')
echo "path=$path conns=$conns"
python3 - $work/strace.txt $conns <<'PY'
import sys
conns=int(sys.argv[2]); rows=[]
for l in open(sys.argv[1]):
    p=l.split()
    if len(p)>=5 and p[0][0].isdigit() and p[-1]!='total':
        calls=int(p[3]); rows.append((calls,p[-1]))
total=sum(c for c,_ in rows)
print(f"total {total/conns:.2f} per connection")
for c,n in sorted(rows,reverse=True)[:14]: print(f"  {n}: {c/conns:.2f}")
PY
