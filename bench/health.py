#!/usr/bin/env python3
"""What local health and self-registration cost, with a real edgeproxy on loopback
(docs/OPERATING.md, docs/PERFORMANCE.md).

    python3 bench/health.py                     # both tests
    TESTS=checks BACKENDS=10000 WINDOW=30 python3 bench/health.py

Tests:
  checks      BACKENDS rows (default 10,000) spread over 50 listeners on 127.0.3.x, checked
              every INTERVAL s (default 5): the proxy's CPU over WINDOW seconds with checks
              on, against the same proxy and table with checks off, as a share of one core;
              and the checks done (from /metrics) in the window.
  heartbeats  REGISTERED backends (default 1,000) registered through the API, each beating
              every BEAT s (default 10) for WINDOW seconds: routing table versions in the
              window (heartbeats must write nothing) and the proxy's CPU.
The proxy runs on one worker thread (EDGEPROXY_WORKER_THREADS=1). Loopback only, bounded in
time and count; stops only the processes it started.
"""
import http.client, json, os, socket, sqlite3, subprocess, sys, tempfile, threading, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("EDGEPROXY_BIN", os.path.join(ROOT, "target/release/edgeproxy"))
TESTS = os.environ.get("TESTS", "checks,heartbeats").split(",")
BACKENDS = int(os.environ.get("BACKENDS", "10000"))
INTERVAL = float(os.environ.get("INTERVAL", "5"))
REGISTERED = int(os.environ.get("REGISTERED", "1000"))
BEAT = float(os.environ.get("BEAT", "10"))
WINDOW = float(os.environ.get("WINDOW", "30"))
LISTENERS = 50
TICK = os.sysconf("SC_CLK_TCK")
procs = []


class Sink:
    """Listeners that accept and close at once, on threads (their CPU is not measured)."""

    def __init__(self, n):
        self.addrs, self.socks, self.accepted = [], [], 0
        for i in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((f"127.0.3.{1 + i % 250}", 0))
            s.listen(4096)
            self.addrs.append(s.getsockname())
            self.socks.append(s)
            threading.Thread(target=self.serve, args=(s,), daemon=True).start()

    def serve(self, s):
        while True:
            try:
                c, _ = s.accept()
                c.close()
                self.accepted += 1  # under the GIL; a lost count only blurs the rate
            except OSError:
                return


def cpu_split(pid):
    """(user, system) CPU seconds of `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid):
    return sum(cpu_split(pid))


def get(addr, path):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as r:
        body = r.read()
    return json.loads(body) if path != "/metrics" else body.decode()


def counter(text, prefix):
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(prefix))


def start(work, name, env_extra):
    db = os.path.join(work, f"{name}.db")
    admin = f"127.0.2.{len(procs) + 1}:9090"
    env = dict(os.environ)
    env.update({
        "EDGEPROXY_DB_PATH": db, "EDGEPROXY_LISTEN_ADDR": f"127.0.2.{len(procs) + 1}:8080",
        "EDGEPROXY_ADMIN_ADDR": admin, "EDGEPROXY_WORKER_THREADS": "1",
        "EDGEPROXY_NATIVE_POLICY": "1",
    })
    env.update(env_extra)
    log = open(os.path.join(work, f"{name}.log"), "a")
    p = subprocess.Popen([BIN], env=env, stdout=subprocess.DEVNULL, stderr=log)
    procs.append(p)
    deadline = time.monotonic() + 60
    while True:
        try:
            get(admin, "/status")
            return p, admin
        except Exception:
            if p.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{name} did not start; see {work}/{name}.log")
            time.sleep(0.1)


def table(path, rows):
    subprocess.run([BIN, "db", "init", "--db", path], check=True, capture_output=True)
    con = sqlite3.connect(path)
    con.executemany(
        "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)"
        " VALUES (?, 'app', 'sa', 'BR', ?, ?, 1, 1, 100, 0, 0)", rows)
    con.commit()
    con.close()


def haproxy(work, mode, rows):
    """HAProxy (one thread) with the same servers, checked the same way, as the peer."""
    cfg = os.path.join(work, f"haproxy-{mode}.cfg")
    check = f" check inter {int(INTERVAL * 1000)}" if mode == "on" else ""
    with open(cfg, "w") as f:
        f.write("global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n"
                "  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n"
                "  timeout check 2s\nbackend app\n")
        for id, ip, port in rows:
            f.write(f"  server {id} {ip}:{port}{check}\n")
        f.write("frontend fe\n  bind 127.0.2.200:8080\n  default_backend app\n")
    p = subprocess.Popen(["haproxy", "-f", cfg], stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(work, f"haproxy-{mode}.log"), "a"))
    procs.append(p)
    return p


def checks(work):
    sink = Sink(LISTENERS)
    rows = [(f"b{i:05}", sink.addrs[i % LISTENERS][0], sink.addrs[i % LISTENERS][1])
            for i in range(BACKENDS)]
    peers = ["edgeproxy"] + (["haproxy"] if subprocess.run(
        ["sh", "-c", "command -v haproxy"], capture_output=True).returncode == 0 else [])
    print(f"checks: {BACKENDS} backends every {INTERVAL:g} s, {WINDOW:g} s window, one thread each "
          f"(loopback: the kernel's work for both ends of each handshake is charged to the checker)")
    print("| checker | checks | checks/s | user CPU | system CPU | total (% of a core) | CPU per check |")
    # Neither checker completes the handshake for a connect check (HAProxy's half-open
    # trick), so the listeners here never accept one.
    print("|---|---|---|---|---|---|---|")
    base = {}
    for peer in peers:
        for mode in ["off", "on"]:
            admin = None
            if peer == "edgeproxy":
                db = os.path.join(work, f"checks-{mode}.db")
                table(db, rows)
                p, admin = start(work, f"checks-{mode}", {
                    "EDGEPROXY_DB_PATH": db,
                    "EDGEPROXY_HEALTH_CHECK_ENABLED": "1" if mode == "on" else "0",
                    "EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS": str(INTERVAL),
                })
            else:
                p = haproxy(work, mode, rows)
            time.sleep(INTERVAL + 2)  # settle: past the first round of checks
            done = lambda: counter(get(admin, "/metrics"), "edgeproxy_health_checks_total") if admin else 0
            (u0, s0), n0, t0 = cpu_split(p.pid), done(), time.monotonic()
            time.sleep(WINDOW)
            (u1, s1), n1, t1 = cpu_split(p.pid), done(), time.monotonic()
            down = sum(1 for b in get(admin, "/backends") if not b["up_here"]) if admin else 0
            p.terminate()
            p.wait()
            span = t1 - t0
            user, system = (u1 - u0) / span, (s1 - s0) / span
            # HAProxy's checks are not counted here: its rate is the configured one.
            rate = (n1 - n0) / span if admin else (BACKENDS / INTERVAL if mode == "on" else 0)
            if down:
                print(f"warning: {down} backends down at the end of the {peer} run")
            if mode == "off":
                base[peer] = user + system
                print(f"| {peer} | off | {rate:.0f} | {user * 100:.2f}% | {system * 100:.2f}% | {(user + system) * 100:.2f}% | |")
            else:
                extra = user + system - base[peer]
                print(f"| {peer} | on | {rate:.0f} | {user * 100:.2f}% | {system * 100:.2f}% | "
                      f"{(user + system) * 100:.2f}% (+{extra * 100:.2f}%) | {extra / max(rate, 1) * 1e6:.1f} us |")


def heartbeats(work):
    sink = Sink(1)
    db = os.path.join(work, "beats.db")
    subprocess.run([BIN, "db", "init", "--db", db], check=True, capture_output=True)
    api = "127.0.2.100:8081"
    p, admin = start(work, "beats", {
        "EDGEPROXY_DB_PATH": db, "EDGEPROXY_API_ENABLED": "1",
        "EDGEPROXY_API_LISTEN_ADDR": api, "EDGEPROXY_HEARTBEAT_TTL_SECS": str(int(BEAT * 3)),
    })
    host, port = api.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)

    def call(method, path, body=None):
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            sys.exit(f"{method} {path}: {r.status} {data!r}")

    for i in range(REGISTERED):
        call("POST", "/api/v1/register", json.dumps({
            "id": f"r{i:05}", "app": "app", "region": "sa", "ip": sink.addrs[0][0],
            "port": sink.addrs[0][1]}))
    deadline = time.monotonic() + 30
    while get(admin, "/status")["routing"]["backends"] < REGISTERED:
        if time.monotonic() > deadline:
            sys.exit("the registrations never reached routing")
        time.sleep(0.1)
    v0, c0, t0 = get(admin, "/status")["routing"]["version"], cpu_seconds(p.pid), time.monotonic()
    beats, next_at = 0, t0
    gap = BEAT / REGISTERED
    while time.monotonic() - t0 < WINDOW:
        call("POST", f"/api/v1/heartbeat/r{beats % REGISTERED:05}")
        beats += 1
        next_at += gap
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    v1, c1, t1 = get(admin, "/status")["routing"]["version"], cpu_seconds(p.pid), time.monotonic()
    expired = counter(get(admin, "/metrics"), 'edgeproxy_registrations_total{event="expired"}')
    p.terminate()
    p.wait()
    minutes = (t1 - t0) / 60
    print(f"heartbeats: {REGISTERED} registered backends beating every {BEAT:g} s, {t1 - t0:.0f} s window")
    print(f"  {beats / (t1 - t0):.0f} heartbeats/s; table versions in the window: {v1 - v0} "
          f"({(v1 - v0) / minutes:.1f}/min); expirations: {expired:.0f}")
    print(f"  proxy CPU: {(c1 - c0) / (t1 - t0) * 100:.2f}% of a core "
          f"({(c1 - c0) / max(beats, 1) * 1e6:.0f} us per heartbeat)")


def main():
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: cargo build --release -p edgeproxy")
    work = tempfile.mkdtemp(prefix="edgeproxy-health-")
    try:
        if "checks" in TESTS:
            checks(work)
        if "heartbeats" in TESTS:
            heartbeats(work)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()


if __name__ == "__main__":
    main()
