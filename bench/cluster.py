#!/usr/bin/env python3
"""The fleet's numbers with real edgeproxy processes on loopback (docs/CLUSTER.md).

    python3 bench/cluster.py                 # everything, default intervals
    WRITES=50 TESTS=propagation,idle python3 bench/cluster.py

Five POPs on 127.0.1.1-5 (gossip 1 s, sync 2 s: the defaults), each with its own database,
joined with certificates made by `edgeproxy cluster ca|cert`. Tests:
  propagation  WRITES single-row writes at random POPs (sqlite3, as an operator's shell):
               time until the row is in every POP's table; p50, p99, max
  cost         idle CPU and UDP bytes per node per second over IDLE seconds, and wire bytes
               per replicated change (QUIC/TLS included, idle traffic subtracted)
  heal         POPs 4 and 5 frozen (SIGSTOP) while 100 rows are written on each side, then
               thawed: time until all five digests are equal
  rate         new connections/s through a POP with replication on and a write every
               second at another POP, against one with replication off, alternating (the
               proxy pinned to CPU 1, load on CPU 0)
Loopback only, bounded in time and count; stops only the processes it started.
"""
import json, os, random, signal, sqlite3, statistics, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("EDGEPROXY_BIN", os.path.join(ROOT, "target/release/edgeproxy"))
LOADGEN = os.path.join(ROOT, "target/release/edgeproxy-loadgen")
TESTS = os.environ.get("TESTS", "propagation,cost,heal,rate").split(",")
WRITES = int(os.environ.get("WRITES", "200"))
IDLE = int(os.environ.get("IDLE", "30"))
N = 5
procs = []


def run(*args):
    return subprocess.run([BIN, *args], check=True, capture_output=True, text=True).stdout


def ip(i):
    return f"127.0.1.{i}"


class Pop:
    def __init__(self, work, i, cluster=True, seed=1, cpu=None, extra=None):
        self.i, self.work = i, work
        self.db = os.path.join(work, f"p{i}.db")
        self.admin = f"{ip(i)}:9090"
        self.listen = f"{ip(i)}:8080"
        env = dict(os.environ)
        env.update({
            "EDGEPROXY_DB_PATH": self.db, "EDGEPROXY_LISTEN_ADDR": self.listen,
            "EDGEPROXY_ADMIN_ADDR": self.admin, "EDGEPROXY_WORKER_THREADS": "1",
            "EDGEPROXY_MAX_CONNECTIONS": "5000", "EDGEPROXY_REGION": "sa",
        })
        if cluster:
            certs = os.path.join(work, "certs")
            env.update({
                "EDGEPROXY_REPLICATION_ENABLED": "true",
                "EDGEPROXY_REPLICATION_NODE_ID": f"p{i}",
                "EDGEPROXY_REPLICATION_GOSSIP_ADDR": f"{ip(i)}:4001",
                "EDGEPROXY_REPLICATION_TRANSPORT_ADDR": f"{ip(i)}:4002",
                "EDGEPROXY_REPLICATION_BOOTSTRAP_PEERS": "" if i == seed else f"{ip(seed)}:4001",
                "EDGEPROXY_REPLICATION_CA_FILE": os.path.join(work, "ca/ca.pem"),
                "EDGEPROXY_REPLICATION_CERT_FILE": os.path.join(certs, f"p{i}.pem"),
                "EDGEPROXY_REPLICATION_KEY_FILE": os.path.join(certs, f"p{i}.key"),
            })
        env.update(extra or {})
        cmd = [BIN] if cpu is None else ["taskset", "-c", str(cpu), BIN]
        log = open(os.path.join(work, f"p{i}.log"), "a")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        procs.append(self.proc)
        self.wait(lambda s: s is not None, "admin API", path="/status")

    def get(self, path="/cluster"):
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=2) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def wait(self, cond, what, path="/cluster", limit=60):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            s = self.get(path)
            if cond(s):
                return s
            time.sleep(0.02)
        sys.exit(f"p{self.i}: {what} not reached within {limit}s")

    def cpu_seconds(self):
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def alive(s, n):
    return s is not None and sum(m["state"] == "alive" for m in s["members"]) == n


def digests(pops):
    return [(p.get() or {}).get("digest") for p in pops]


def wait_equal(pops, limit=120):
    t = time.monotonic()
    while time.monotonic() - t < limit:
        d = digests(pops)
        if None not in d and len(set(d)) == 1:
            return time.monotonic() - t
        time.sleep(0.01)
    sys.exit(f"digests differ after {limit}s: {digests(pops)}")


def insert(db, rid, port=80):
    c = sqlite3.connect(db, timeout=10)
    c.execute("INSERT OR REPLACE INTO backends VALUES (?,'web','eu','DE','10.0.0.1',?,1,1,10,0,0)",
              (rid, port))
    c.commit()
    c.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def wire(pops):
    return sum((p.get() or {}).get("wire_bytes_out") or 0 for p in pops)


def main():
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "edgeproxy", "-p", "loadgen"],
                   cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="edgeproxy-cluster-bench.")
    run("cluster", "ca", "--dir", os.path.join(work, "ca"))
    for i in range(1, N + 2):
        run("cluster", "cert", f"p{i}", "--ca-dir", os.path.join(work, "ca"), "--dir", os.path.join(work, "certs"))
    pops = [Pop(work, i) for i in range(1, N + 1)]
    t = time.monotonic()
    for p in pops:
        p.wait(lambda s: alive(s, N - 1), "membership")
    print(f"membership of {N} POPs formed in {time.monotonic() - t:.1f} s", file=sys.stderr)
    out = []

    if "propagation" in TESTS:
        readers = [sqlite3.connect(f"file:{p.db}?mode=ro", uri=True) for p in pops]
        lat = []
        for k in range(WRITES):
            rid = f"prop-{k}"
            insert(random.choice(pops).db, rid)
            t = time.monotonic()
            pending = set(range(N))
            while pending:
                pending = {j for j in pending
                           if readers[j].execute("SELECT 1 FROM backends WHERE id=?", (rid,)).fetchone() is None}
                if time.monotonic() - t > 30:
                    sys.exit(f"{rid} not everywhere after 30 s")
                time.sleep(0.001)
            lat.append(time.monotonic() - t)
            time.sleep(0.02)
        out.append(("propagation: one write to all 5 POPs, p50 / p99 / max over %d writes" % WRITES,
                    "%.0f / %.0f / %.0f ms" % (pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, max(lat) * 1e3)))
        wait_equal(pops)

    if "cost" in TESTS:
        # The same POP with replication off, idling beside them: what the cluster adds.
        plain_db = os.path.join(work, "p8.db")
        run("db", "init", "--db", plain_db)
        plain = Pop(work, 8, cluster=False, extra={"EDGEPROXY_DB_PATH": plain_db})
        time.sleep(5)  # rounds begun by the writes above end
        c0, w0, t0 = [p.cpu_seconds() for p in pops], wire(pops), time.monotonic()
        p0 = plain.cpu_seconds()
        time.sleep(IDLE)
        dt = time.monotonic() - t0
        cpu = [(p.cpu_seconds() - c) / dt * 100 for p, c in zip(pops, c0)]
        plain_cpu = (plain.cpu_seconds() - p0) / dt * 100
        plain.stop()
        idle_bps = (wire(pops) - w0) / dt
        out.append((f"idle CPU per POP over {IDLE} s (mean / max, % of one core)",
                    "%.2f%% / %.2f%%; replication off: %.2f%%" % (statistics.mean(cpu), max(cpu), plain_cpu)))
        out.append(("idle UDP bytes sent per POP per second (SWIM + sync, QUIC included)",
                    "%.0f B/s" % (idle_bps / N)))
        w1, t1 = wire(pops), time.monotonic()
        for k in range(100):
            insert(pops[k % N].db, f"cost-{k}")
            time.sleep(0.05)
        wait_equal(pops)
        spent = wire(pops) - w1 - idle_bps * (time.monotonic() - t1)
        out.append(("wire bytes per replicated change, all 5 POPs together (idle traffic subtracted)",
                    "%.0f B" % (spent / 100)))

    if "heal" in TESTS:
        side = pops[3:]
        for p in side:
            p.signal(signal.SIGSTOP)
        pops[0].wait(lambda s: s and sum(m["state"] == "down" for m in s["members"]) == 2, "4 and 5 down")
        for k in range(100):
            insert(pops[0].db, f"heal-a-{k}")
            insert(side[0].db, f"heal-b-{k}")
        wait_equal(pops[:3])
        t = time.monotonic()
        for p in side:
            p.signal(signal.SIGCONT)
        healed = wait_equal(pops)
        out.append(("heal: 100 diverged rows per side, thaw to equal digests (sync interval 2 s)",
                    "%.2f s" % healed))

    if "rate" in TESTS:
        echo = subprocess.Popen(["taskset", "-c", "0", LOADGEN, "echo", "--listen", "127.0.0.1:18100"])
        procs.append(echo)
        insert(pops[1].db, "bench-echo")
        c = sqlite3.connect(pops[1].db, timeout=10)
        c.execute("UPDATE backends SET app='bench', region='sa', country='BR', wg_ip='127.0.0.1', port=18100, soft_limit=1000 WHERE id='bench-echo'")
        c.commit()
        c.close()
        member = Pop(work, 6, cpu=1)
        member.wait(lambda s: alive(s, N), "membership")
        wait_equal(pops + [member])
        solo_db = os.path.join(work, "p7.db")
        run("db", "init", "--db", solo_db)
        run("backend", "add", "bench-echo", "--db", solo_db, "--app", "bench", "--region", "sa",
            "--country", "BR", "--wg-ip", "127.0.0.1", "--port", "18100", "--soft-limit", "1000")
        solo = Pop(work, 7, cluster=False, cpu=1)
        rates = {"on": [], "off": []}
        for _ in range(2):
            for name, p in (("on", member), ("off", solo)):
                writer_stop = time.monotonic() + 14
                writer = None
                if name == "on":  # a write every second elsewhere, replicated to this POP
                    writer = subprocess.Popen([sys.executable, "-c", f"""
import sqlite3, time
k = 0
while time.monotonic() < {writer_stop}:
    c = sqlite3.connect({pops[2].db!r}, timeout=10)
    c.execute("INSERT OR REPLACE INTO backends VALUES ('tick','web','eu','DE','10.0.0.1',?,1,1,10,0,0)", (1 + k % 60000,))
    c.commit(); c.close(); k += 1; time.sleep(1)
"""])
                    procs.append(writer)
                r = subprocess.run(["taskset", "-c", "0", LOADGEN, "rate", "--target", p.listen,
                                    "--warmup", "2", "--duration", "10", "--pid", str(p.proc.pid)],
                                   check=True, capture_output=True, text=True)
                rates[name].append(json.loads(r.stdout)["cps"])
                if writer:
                    writer.wait()
        on, off = statistics.mean(rates["on"]), statistics.mean(rates["off"])
        out.append(("connections/s, replication on + a write/s elsewhere vs off (2 runs each)",
                    "%.0f vs %.0f (%.2fx)" % (on, off, on / off)))

    print("| measure | result |\n|---|---|")
    for k, v in out:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                    p.wait(timeout=5)
                except Exception:
                    pass
