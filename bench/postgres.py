#!/usr/bin/env python3
"""The routing table in PostgreSQL against the SQLite file, with a real edgeproxy on
loopback (docs/OPERATING.md, docs/PERFORMANCE.md).

    python3 bench/postgres.py
    ROWS=1000,100000 CHANGES=20 python3 bench/postgres.py

For each table size in ROWS, the same rows in a SQLite file and in a throwaway PostgreSQL
server (Debian's `postgresql`, started here as the `postgres` user when run as root):
  reload    `POST /reload` on a proxy reading that table, RELOADS times (default 10): the
            median and slowest reload (one full read of the table, its checks, and the
            comparison with the serving snapshot; the policy reload is a no-op here).
  change    CHANGES times (default 20): `UPDATE` one row's weight (PostgreSQL: psql; SQLite:
            sqlite3), then poll `/status` every 2 ms until the routing version moves: time
            from the commit to the new table serving (the periodic reload is an hour away,
            so this is the NOTIFY path or the file watch).
Loopback only; stops only the processes it started.
"""
import json, os, shutil, socket, sqlite3, subprocess, sys, tempfile, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("EDGEPROXY_BIN", os.path.join(ROOT, "target/release/edgeproxy"))
ROWS = [int(n) for n in os.environ.get("ROWS", "1000,100000").split(",")]
RELOADS = int(os.environ.get("RELOADS", "10"))
CHANGES = int(os.environ.get("CHANGES", "20"))
ROOTED = os.geteuid() == 0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pg_bin():
    base = "/usr/lib/postgresql"
    versions = sorted(os.listdir(base)) if os.path.isdir(base) else []
    if not versions:
        sys.exit("PostgreSQL's server binaries are missing (apt-get install postgresql)")
    return os.path.join(base, versions[-1], "bin")


def as_postgres(args):
    return (["runuser", "-u", "postgres", "--"] if ROOTED else []) + args


class Postgres:
    def __init__(self, work):
        self.dir = os.path.join(work, "pg")
        os.makedirs(self.dir)
        if ROOTED:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        b = pg_bin()
        subprocess.run(as_postgres([f"{b}/initdb", "-D", f"{self.dir}/data", "-U", "edgeproxy",
                                    "--auth=trust", "--no-sync"]), check=True, capture_output=True)
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        subprocess.run(as_postgres([f"{b}/pg_ctl", "-D", f"{self.dir}/data", "-o", opts,
                                    "-l", f"{self.dir}/log", "-w", "start"]), check=True,
                       capture_output=True)
        self.bin = b
        self.url = f"postgres://edgeproxy@127.0.0.1:{self.port}/postgres"

    def psql(self, sql):
        subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", self.url, "-c", sql], check=True,
                       capture_output=True)

    def stop(self):
        subprocess.run(as_postgres([f"{self.bin}/pg_ctl", "-D", f"{self.dir}/data", "-m", "fast",
                                    "-w", "stop"]), capture_output=True)


def rows_csv(path, n):
    with open(path, "w") as f:
        f.write("id,app,region,country,wg_ip,port\n")
        for i in range(n):
            f.write(f"b{i:06},web,eu,DE,10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255},8080\n")


def edgeproxy(args, env):
    subprocess.run([BIN] + args, check=True, capture_output=True, env=env)


def status(admin):
    with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as r:
        return json.load(r)


def start_proxy(env, work, name):
    admin = f"127.0.0.1:{free_port()}"
    env = dict(env, EDGEPROXY_ADMIN_ADDR=admin, EDGEPROXY_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
               EDGEPROXY_DB_RELOAD_SECS="3600", EDGEPROXY_WORKER_THREADS="1",
               EDGEPROXY_BINDING_TTL_SECS="0")
    log = open(os.path.join(work, f"{name}.log"), "w")
    p = subprocess.Popen([BIN], env=env, stdout=log, stderr=log)
    deadline = time.time() + 60
    while True:
        try:
            status(admin)
            return p, admin
        except OSError:
            if time.time() > deadline or p.poll() is not None:
                sys.exit(f"{name}: the proxy did not start (log: {log.name})")
            time.sleep(0.05)


def reload_times(admin):
    out = []
    for _ in range(RELOADS):
        req = urllib.request.Request(f"http://{admin}/reload", method="POST")
        t = time.perf_counter()
        urllib.request.urlopen(req, timeout=60).read()
        out.append((time.perf_counter() - t) * 1000)
    return out


def change_times(admin, update):
    out = []
    for i in range(CHANGES):
        v = status(admin)["routing"]["version"]
        update(i)
        t = time.perf_counter()
        deadline = t + 30
        while status(admin)["routing"]["version"] == v:
            if time.perf_counter() > deadline:
                sys.exit("a change was not routed within 30 s")
            time.sleep(0.002)
        out.append((time.perf_counter() - t) * 1000)
    return out


def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "edgeproxy"],
                       cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="edgeproxy-pg-bench-")
    if ROOTED:
        os.chmod(work, 0o755)
    pg = Postgres(work)
    procs = []
    results = []
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
        edgeproxy(["db", "init"], dict(base, EDGEPROXY_DB_URL=pg.url))
        for n in ROWS:
            csv = os.path.join(work, f"rows-{n}.csv")
            rows_csv(csv, n)
            db = os.path.join(work, f"routing-{n}.db")
            edgeproxy(["db", "init", "--db", db], base)
            edgeproxy(["db", "import", csv, "--db", db], base)
            pg.psql("TRUNCATE backends")
            edgeproxy(["db", "import", csv], dict(base, EDGEPROXY_DB_URL=pg.url))
            for source, env in (("sqlite", dict(base, EDGEPROXY_DB_PATH=db)),
                                ("postgres", dict(base, EDGEPROXY_DB_URL=pg.url))):
                p, admin = start_proxy(env, work, f"{source}-{n}")
                procs.append(p)
                reloads = reload_times(admin)
                if source == "postgres":
                    upd = lambda i: pg.psql(f"UPDATE backends SET weight = {i + 2} WHERE id = 'b000000'")
                else:
                    def upd(i, db=db):
                        c = sqlite3.connect(db)
                        c.execute("UPDATE backends SET weight = ? WHERE id = 'b000000'", (i + 2,))
                        c.commit()
                        c.close()
                changes = change_times(admin, upd)
                p.terminate()
                p.wait()
                results.append((n, source, med(reloads), max(reloads), med(changes), max(changes)))
                print(json.dumps(dict(rows=n, source=source, reload_ms=reloads, change_ms=changes)),
                      flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        pg.stop()
    print("\n| rows | table in | reload, median (ms) | reload, slowest (ms) | UPDATE to routed, median (ms) | UPDATE to routed, slowest (ms) |")
    print("|---|---|---|---|---|---|")
    for n, source, rm, rx, cm, cx in results:
        print(f"| {n:,} | {source} | {rm:.1f} | {rx:.1f} | {cm:.0f} | {cx:.0f} |")


if __name__ == "__main__":
    main()
