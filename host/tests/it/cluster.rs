//! The fleet end to end: real `edgeproxy` processes on their own 127.x.y.z addresses,
//! each with its own database, joined by mutual TLS from a CA made by `edgeproxy cluster
//! ca`. Convergence is waited for (equal digests) with a deadline, never slept for.
//!
//! A partition is a POP frozen with SIGSTOP: it neither sends nor answers, while its
//! database still takes writes from the CLI, as a cut-off POP's would from its operator.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::{Backend, registration, send, served_by};

/// Longest any convergence may take here (sync rounds run every 300 ms).
const CONVERGE: Duration = Duration::from_secs(20);

fn edgeproxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgeproxy"))
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A CA, certificates, and an address block of its own (127.<pid>.<n>.0/24), so tests
/// running at once never share a port.
struct Fleet {
    dir: tempfile::TempDir,
    net: [u8; 3],
}

static FLEETS: AtomicU8 = AtomicU8::new(0);

impl Fleet {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = edgeproxy();
        c.args(["cluster", "ca", "--dir"])
            .arg(dir.path().join("ca"));
        run_ok(c);
        let pid = std::process::id();
        Self {
            dir,
            net: [
                127,
                20 + (pid % 200) as u8,
                FLEETS.fetch_add(1, Ordering::SeqCst),
            ],
        }
    }

    fn ip(&self, n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(self.net[0], self.net[1], self.net[2], n))
    }

    fn cert(&self, ca_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir.path().join("certs");
        let mut c = edgeproxy();
        c.args(["cluster", "cert", name, "--ca-dir"])
            .arg(ca_dir)
            .arg("--dir")
            .arg(&dir);
        if !dir.join(format!("{name}.pem")).exists() {
            run_ok(c);
        }
        (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        )
    }

    /// POPs a, b and c (b and c joining through a), once they all see each other.
    async fn trio(&self) -> (Pop, Pop, Pop) {
        let a = self.pop("a", 1, &[]);
        let b = self.pop("b", 2, &[1]);
        let c = self.pop("c", 3, &[1]);
        for p in [&a, &b, &c] {
            p.wait_members(2).await;
        }
        (a, b, c)
    }

    /// A bare QUIC client on address .`n` holding member `name`'s certificate (the
    /// cluster's CA, the default cluster): what a member, or one gone rogue, dials with.
    fn member_endpoint(&self, name: &str, n: u8) -> quinn::Endpoint {
        let ca = self.dir.path().join("ca");
        let (cert, key) = self.cert(&ca, name);
        let files = edgeproxy::adapters::cluster::TlsFiles {
            ca: ca.join("ca.pem"),
            cert,
            key,
        };
        let (_, config) =
            edgeproxy::adapters::cluster::tls::quic_configs(&files, "edgeproxy", name).unwrap();
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(self.ip(n), 0)).unwrap();
        endpoint.set_default_client_config(config);
        endpoint
    }

    /// Starts POP `name` on address .`n`, joining through `seeds` (indexes).
    fn pop(&self, name: &str, n: u8, seeds: &[u8]) -> Pop {
        self.pop_with(name, n, seeds, &[])
    }

    fn pop_with(&self, name: &str, n: u8, seeds: &[u8], env: &[(&str, &str)]) -> Pop {
        let (cert, key) = self.cert(&self.dir.path().join("ca"), name);
        let ip = self.ip(n);
        let seeds: Vec<String> = seeds
            .iter()
            .map(|s| format!("{}:4001", self.ip(*s)))
            .collect();
        let pop = Pop {
            name: name.to_owned(),
            db: self.dir.path().join(format!("{name}.db")),
            log: self.dir.path().join(format!("{name}.log")),
            listen: SocketAddr::new(ip, 8080),
            admin: SocketAddr::new(ip, 9090),
            env: [
                ("EDGEPROXY_REPLICATION_ENABLED", "true".to_owned()),
                ("EDGEPROXY_REPLICATION_NODE_ID", name.to_owned()),
                ("EDGEPROXY_REPLICATION_GOSSIP_ADDR", format!("{ip}:4001")),
                ("EDGEPROXY_REPLICATION_TRANSPORT_ADDR", format!("{ip}:4002")),
                ("EDGEPROXY_REPLICATION_BOOTSTRAP_PEERS", seeds.join(",")),
                ("EDGEPROXY_REPLICATION_GOSSIP_INTERVAL_MS", "100".to_owned()),
                ("EDGEPROXY_REPLICATION_SYNC_INTERVAL_MS", "300".to_owned()),
                (
                    "EDGEPROXY_REPLICATION_CA_FILE",
                    self.dir.path().join("ca/ca.pem").display().to_string(),
                ),
                (
                    "EDGEPROXY_REPLICATION_CERT_FILE",
                    cert.display().to_string(),
                ),
                ("EDGEPROXY_REPLICATION_KEY_FILE", key.display().to_string()),
                ("EDGEPROXY_LISTEN_ADDR", format!("{ip}:8080")),
                ("EDGEPROXY_ADMIN_ADDR", format!("{ip}:9090")),
                ("EDGEPROXY_WORKER_THREADS", "1".to_owned()),
                ("EDGEPROXY_MAX_CONNECTIONS", "1000".to_owned()),
                ("EDGEPROXY_DRAIN_TIMEOUT_SECS", "1".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect(),
            child: None,
        };
        pop.start()
    }
}

struct Pop {
    name: String,
    db: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Pop {
    fn start(mut self) -> Self {
        self.child = Some(self.spawn(edgeproxy()));
        self
    }

    fn spawn(&self, mut c: Command) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        c.env("EDGEPROXY_DB_PATH", &self.db)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "edgeproxy=debug")
            .stdout(Stdio::null())
            .stderr(log);
        c.spawn().unwrap()
    }

    fn pid(&self) -> String {
        self.child.as_ref().unwrap().id().to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process (SIGTERM) and waits for it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.signal_pid(&c, "-TERM");
            let _ = c.wait();
        }
    }

    fn signal_pid(&self, c: &Child, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status();
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `edgeproxy backend ARGS --db <this POP's database>`, as an operator at this POP.
    fn backend(&self, args: &[&str]) -> String {
        let mut c = edgeproxy();
        c.arg("backend").args(args).arg("--db").arg(&self.db);
        run_ok(c)
    }

    /// `GET /cluster`, None while the admin API does not answer yet.
    async fn status(&self) -> Option<Value> {
        let conn = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(self.admin),
        )
        .await;
        match conn {
            Ok(Ok(_)) => {}
            _ => return None,
        }
        let (code, body) = crate::support::http(self.admin, "GET", "/cluster", &[]).await;
        (code == 200).then(|| serde_json::from_str(&body).unwrap())
    }

    async fn wait_status(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            if let Some(s) = self.status().await
                && cond(&s)
            {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{}: {what} not reached within {CONVERGE:?}; last status {:?}\nlog:\n{}",
                    self.name,
                    self.status().await,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_members(&self, n: usize) -> Value {
        self.wait_status(&format!("{n} alive members"), |s| {
            s["members"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["state"] == "alive")
                .count()
                == n
        })
        .await
    }

    fn rows(&self) -> Vec<Value> {
        let mut c = edgeproxy();
        c.args(["backend", "list", "--all", "--json", "--db"])
            .arg(&self.db);
        serde_json::from_str(&run_ok(c)).unwrap()
    }
}

impl Drop for Pop {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A frozen POP must be thawed to die cleanly.
            self.signal_pid(c, "-CONT");
        }
        self.kill();
    }
}

/// Waits until every POP reports the same digest with `rows` live rows, and returns it.
async fn converged(pops: &[&Pop], rows: usize) -> String {
    converged_past(pops, rows, "").await
}

/// As [`converged`], on a digest other than `old` (after an edit that keeps the count).
async fn converged_past(pops: &[&Pop], rows: usize, old: &str) -> String {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let mut digests = Vec::new();
        for p in pops {
            digests.push(
                p.status()
                    .await
                    .map(|s| (s["digest"].as_str().unwrap().to_owned(), s["rows"].clone())),
            );
        }
        if digests.iter().all(|d| d.is_some() && *d == digests[0])
            && digests[0].as_ref().unwrap().1 == rows
            && digests[0].as_ref().unwrap().0 != old
        {
            return digests[0].clone().unwrap().0;
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = pops
                .iter()
                .map(|p| format!("--- {}\n{}", p.name, p.logs()))
                .collect();
            panic!(
                "no convergence on {rows} rows within {CONVERGE:?}: {digests:?}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn add(pop: &Pop, id: &str, backend: SocketAddr) {
    pop.backend(&[
        "add",
        id,
        "--app",
        "web",
        "--region",
        "eu",
        "--country",
        "DE",
        "--ip",
        &backend.ip().to_string(),
        "--port",
        &backend.port().to_string(),
    ]);
}

/// `root/*/rest`, the first that exists (a multiarch library directory).
fn glob_one(root: &str, rest: &str) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path().join(rest))
        .find(|p| p.exists())
}

fn row<'a>(rows: &'a [Value], id: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no row {id} in {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_at_one_pop_is_routed_at_every_pop() {
    let fleet = Fleet::new();
    let (a, b, c) = fleet.trio().await;
    let backend = Backend::start("berlin").await;
    add(&b, "berlin-1", backend.addr);
    converged(&[&a, &b, &c], 1).await;
    for p in [&a, &b, &c] {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        // The proxy reloads the file the replicator wrote; a connection then routes.
        loop {
            if tokio::time::timeout(Duration::from_secs(2), served_by("127.0.0.1", p.listen))
                .await
                .is_ok_and(|name| name == "berlin")
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never routed",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Each row says when and where it was written; the operator's tools show the fleet.
    let b_node = b.status().await.unwrap()["node"].clone();
    assert_eq!(row(&a.rows(), "berlin-1")["version"]["node"], b_node);
    let (code, metrics) = crate::support::http(a.admin, "GET", "/metrics", &[]).await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("edgeproxy_cluster_members{state=\"alive\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgeproxy_cluster_replication_lag_seconds"),
        "{metrics}"
    );
    let mut cli = edgeproxy();
    cli.args(["cluster", "status", "--json"])
        .env("EDGEPROXY_ADMIN_ADDR", a.admin.to_string());
    let shown: Value = serde_json::from_str(&run_ok(cli)).unwrap();
    assert_eq!(shown["name"], "a");
    assert_eq!(shown["members"].as_array().unwrap().len(), 2);
    let mut cli = edgeproxy();
    cli.args(["cluster", "status"])
        .env("EDGEPROXY_ADMIN_ADDR", a.admin.to_string());
    let text = run_ok(cli);
    assert!(text.contains("digest") && text.contains("alive"), "{text}");

    // A hard DELETE in the sqlite3 shell at one POP is a tombstone everywhere.
    rusqlite::Connection::open(&c.db)
        .unwrap()
        .execute("DELETE FROM backends WHERE id = 'berlin-1'", [])
        .unwrap();
    converged(&[&a, &b, &c], 0).await;
    for p in [&a, &b, &c] {
        assert_eq!(row(&p.rows(), "berlin-1")["deleted"], true, "{}", p.name);
    }
    let status = a.status().await.unwrap();
    assert_eq!(status["tombstones"], 1);
    assert!(status["changes_applied"].as_u64().unwrap() >= 1, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_id_end_the_same_everywhere() {
    let fleet = Fleet::new();
    let (a, b, c) = fleet.trio().await;
    // Both at once, each unaware of the other.
    let (ra, rb) = ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
    // (Upserts, as two sqlite3 shells would: `backend add` would rightly refuse an id that
    // has already arrived from the other POP.)
    let upsert = |p: &Pop, addr: SocketAddr| {
        rusqlite::Connection::open(&p.db)
            .unwrap()
            .execute(
                "INSERT OR REPLACE INTO backends VALUES ('x','web','eu','DE',?1,?2,1,1,10,0,0)",
                rusqlite::params![addr.ip().to_string(), addr.port()],
            )
            .unwrap();
    };
    std::thread::scope(|s| {
        s.spawn(|| upsert(&a, ra));
        s.spawn(|| upsert(&b, rb));
    });
    converged(&[&a, &b, &c], 1).await;
    let winners: Vec<Value> = [&a, &b, &c]
        .iter()
        .map(|p| row(&p.rows(), "x").clone())
        .collect();
    assert!(winners.iter().all(|w| *w == winners[0]), "{winners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_with_writes_on_both_sides_heals_to_one_table() {
    let fleet = Fleet::new();
    let (a, b, c) = fleet.trio().await;
    add(&a, "shared", "10.0.0.9:9".parse().unwrap());
    converged(&[&a, &b, &c], 1).await;

    // {A, B} | {C}: C is frozen; both sides take writes, including to the same row.
    c.signal("-STOP");
    a.wait_status("c down", |s| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "c" && m["state"] == "down")
    })
    .await;
    add(&a, "left", "10.0.0.1:1".parse().unwrap());
    let before = converged(&[&a, &b], 2).await;
    b.backend(&["update", "shared", "--port", "1111"]);
    // B's edit is stamped (and replicated to A) before C's is made.
    converged_past(&[&a, &b], 2, &before).await;
    add(&c, "right", "10.0.0.3:3".parse().unwrap());
    c.backend(&["update", "shared", "--weight", "7"]);

    c.signal("-CONT");
    converged(&[&a, &b, &c], 3).await;
    for p in [&a, &b, &c] {
        p.wait_members(2).await;
        let rows = p.rows();
        row(&rows, "left");
        row(&rows, "right");
        // C's edit of `shared` came later than B's, so it wins whole (row-level LWW).
        let shared = row(&rows, "shared");
        assert_eq!(
            (shared["port"].as_u64(), shared["weight"].as_u64()),
            (Some(9), Some(7)),
            "{}",
            p.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_wiped_databases_and_late_joiners_catch_up() {
    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    let mut b = fleet.pop("b", 2, &[1]);
    for p in [&a, &b] {
        p.wait_members(1).await;
    }
    add(&a, "one", "10.0.0.1:1".parse().unwrap());
    converged(&[&a, &b], 1).await;

    // Restart with the database: B misses a write while away and catches up at once.
    b.stop();
    add(&a, "two", "10.0.0.2:2".parse().unwrap());
    let mut b = b.start();
    converged(&[&a, &b], 2).await;

    // Wiped database: a new node id, and the whole table pulled back.
    b.stop();
    std::fs::remove_file(&b.db).unwrap();
    let _ = std::fs::remove_file(b.db.with_extension("db-wal"));
    let _ = std::fs::remove_file(b.db.with_extension("db-shm"));
    let b = b.start();
    converged(&[&a, &b], 2).await;

    // A late joiner that knows only B finds A too, and the table.
    let c = fleet.pop("c", 3, &[2]);
    c.wait_members(2).await;
    converged(&[&a, &b, &c], 2).await;

    // Restarted with its bootstrap peer gone, C finds the cluster from the peers it
    // remembered in its database.
    let mut c = c;
    c.stop();
    c.env
        .retain(|(k, _)| k != "EDGEPROXY_REPLICATION_BOOTSTRAP_PEERS");
    let c = c.start();
    c.wait_members(2).await;
}

/// The status page's fleet section in a real browser: a POP alone, then a second POP
/// joining, alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_second_pop_joining() {
    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    a.wait_members(0).await;
    let page = crate::support::Browser::open(&format!("http://{}/", a.admin)).await;
    let member = |name: &str| {
        format!(
            "const m = document.querySelector('[data-member={name}]'); \
             return m ? m.dataset.state + ' ' + m.dataset.table : null"
        )
    };
    page.wait_for(&member("a"), "self self".into()).await;
    assert_eq!(page.eval(&member("b")).await, serde_json::Value::Null);
    let b = fleet.pop("b", 2, &[1]);
    b.wait_members(1).await;
    // The open page shows it joining: alive, and once it has synced, the same table.
    page.wait_for(&member("b"), "alive same".into()).await;
}

/// A POP upgraded in place (the handover socket): the old process stops replicating
/// before the new one starts, the fleet takes the new incarnation, and writes go on
/// reaching it and leaving it, while its listener never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_taken_over_by_a_new_process_goes_on_replicating_both_ways() {
    let fleet = Fleet::new();
    let socket = fleet.dir.path().join("a-handover.sock");
    let mut a = fleet.pop_with(
        "a",
        1,
        &[],
        &[("EDGEPROXY_HANDOVER_SOCKET", socket.to_str().unwrap())],
    );
    let b = fleet.pop("b", 2, &[1]);
    for p in [&a, &b] {
        p.wait_members(1).await;
    }
    let backend = Backend::start("berlin").await;
    add(&b, "berlin-1", backend.addr);
    converged(&[&a, &b], 1).await;

    let mut old = a.child.take().unwrap();
    a.child = Some(a.spawn(edgeproxy()));
    let deadline = tokio::time::Instant::now() + CONVERGE;
    let status = loop {
        if let Some(s) = old.try_wait().unwrap() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old process is still running:\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{}", a.logs());
    let logs = a.logs();
    assert!(
        logs.contains("stopping replication for the new process") && logs.contains("took over"),
        "{logs}"
    );
    add(&b, "berlin-2", backend.addr);
    converged(&[&a, &b], 2).await;
    add(&a, "berlin-3", backend.addr);
    converged(&[&a, &b], 3).await;
    b.wait_members(1).await;
    assert_eq!(served_by("127.0.0.1", a.listen).await, "berlin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_clusters_credentials_or_name_cannot_join() {
    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    let b = fleet.pop("b", 2, &[1]);
    a.wait_members(1).await;
    add(&a, "secret", "10.0.0.1:1".parse().unwrap());
    converged(&[&a, &b], 1).await;

    // Another CA: its own certificate, its own root.
    let rogue_ca = fleet.dir.path().join("rogue-ca");
    let mut c = edgeproxy();
    c.args(["cluster", "ca", "--dir"]).arg(&rogue_ca);
    run_ok(c);
    let (cert, key) = fleet.cert(&rogue_ca, "mallory");
    let rogue = fleet.pop_with(
        "mallory",
        3,
        &[1],
        &[
            (
                "EDGEPROXY_REPLICATION_CA_FILE",
                &rogue_ca.join("ca.pem").display().to_string(),
            ),
            (
                "EDGEPROXY_REPLICATION_CERT_FILE",
                &cert.display().to_string(),
            ),
            ("EDGEPROXY_REPLICATION_KEY_FILE", &key.display().to_string()),
        ],
    );
    // The right CA, the wrong cluster name.
    let stranger = fleet.pop_with(
        "stranger",
        4,
        &[1],
        &[("EDGEPROXY_REPLICATION_CLUSTER_NAME", "other")],
    );
    // The right CA and the right name in its ALPN, but a certificate for another cluster
    // (two clusters sharing a CA): the certificate is checked once the handshake is done.
    let other = fleet.dir.path().join("other-cluster");
    let mut c = edgeproxy();
    c.args(["cluster", "cert", "liar", "--cluster", "other", "--ca-dir"])
        .arg(fleet.dir.path().join("ca"))
        .arg("--dir")
        .arg(&other);
    run_ok(c);
    let liar = fleet.pop_with(
        "liar",
        5,
        &[1],
        &[
            (
                "EDGEPROXY_REPLICATION_CERT_FILE",
                &other.join("liar.pem").display().to_string(),
            ),
            (
                "EDGEPROXY_REPLICATION_KEY_FILE",
                &other.join("liar.key").display().to_string(),
            ),
        ],
    );
    a.wait_status("refusals counted", |s| {
        s["peers_refused"].as_u64().unwrap() >= 3
    })
    .await;
    assert!(a.logs().contains("another cluster"), "{}", a.logs());
    for outsider in [&rogue, &stranger, &liar] {
        let s = outsider.wait_status("its admin API", |_| true).await;
        assert_eq!(s["members"].as_array().unwrap().len(), 0, "{s}");
        assert_eq!(s["rows"], 0, "{} learned rows: {s}", outsider.name);
    }
    // Nor can it push rows in: its write stays its own.
    add(&rogue, "evil", "10.6.6.6:6".parse().unwrap());
    let s = a.status().await.unwrap();
    assert_eq!(s["members"].as_array().unwrap().len(), 1, "{s}");
    assert!(a.rows().iter().all(|r| r["id"] != "evil"));
    assert!(a.logs().contains("failed authentication"), "{}", a.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_with_its_clock_30s_ahead_cannot_outrank_later_writes() {
    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    // libfaketime (Debian's faketime) moves the whole process's clock. Preloaded directly,
    // not through the `faketime` wrapper, which forks: the child is edgeproxy itself.
    let lib = glob_one("/usr/lib", "faketime/libfaketime.so.1")
        .expect("libfaketime (apt-get install faketime) runs a POP with its clock ahead");
    let fast = fleet.pop_with(
        "fast",
        2,
        &[1],
        &[
            ("LD_PRELOAD", &lib.display().to_string()),
            ("FAKETIME", "+30s"),
        ],
    );
    a.wait_members(1).await;
    fast.wait_members(1).await;

    add(&fast, "x", "10.0.0.1:1".parse().unwrap());
    let before = converged(&[&a, &fast], 1).await;
    // The row really was stamped 30 s ahead (the clock is the HLC: milliseconds << 16).
    let stamped_ms = fast.status().await.unwrap()["clock"].as_u64().unwrap() >> 16;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(stamped_ms > now_ms + 20_000, "{stamped_ms} vs {now_ms}");
    // A writes after it has seen the fast POP's row: its clock moved past that row's, so
    // its write wins although A's wall clock is 30 s behind.
    a.backend(&["update", "x", "--port", "2"]);
    converged_past(&[&a, &fast], 1, &before).await;
    for p in [&a, &fast] {
        assert_eq!(row(&p.rows(), "x")["port"], 2, "{}", p.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_away_longer_than_the_tombstone_window_does_not_resurrect_deletes() {
    let fleet = Fleet::new();
    let ttl = [("EDGEPROXY_REPLICATION_TOMBSTONE_TTL_SECS", "2")];
    let a = fleet.pop_with("a", 1, &[], &ttl);
    let mut b = fleet.pop_with("b", 2, &[1], &ttl);
    a.wait_members(1).await;
    add(&a, "x", "10.0.0.1:1".parse().unwrap());
    add(&a, "kept", "10.0.0.2:2".parse().unwrap());
    converged(&[&a, &b], 2).await;

    // B is away while x is deleted and its tombstone purged.
    b.stop();
    a.backend(&["remove", "x"]);
    a.wait_status("the tombstone purged", |s| {
        s["tombstones"] == 0 && s["rows"] == 1
    })
    .await;
    let b = b.start();
    converged(&[&a, &b], 1).await;
    for p in [&a, &b] {
        assert!(
            p.rows().iter().all(|r| r["id"] != "x"),
            "{} resurrected x",
            p.name
        );
    }
    assert!(b.logs().contains("saw superseded"), "{}", b.logs());
}

/// Writes `sql` to the POP's file as any SQLite client would (the `sqlite3` shell, a tool),
/// once the POP has set the file up.
async fn client(pop: &Pop, sql: &str) {
    pop.wait_status("up", |_| true).await;
    rusqlite::Connection::open(&pop.db)
        .unwrap()
        .execute_batch(sql)
        .unwrap_or_else(|e| panic!("{}: {sql}: {e}", pop.name));
}

fn rows_sql(ids: impl IntoIterator<Item = String>) -> String {
    ids.into_iter()
        .map(|id| {
            format!(
                "INSERT INTO backends VALUES ('{id}','web','eu','DE','10.0.0.1',80,1,1,10,0,0);"
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_older_than_the_tombstone_window_still_takes_new_and_wiped_pops() {
    let fleet = Fleet::new();
    let ttl = [("EDGEPROXY_REPLICATION_TOMBSTONE_TTL_SECS", "2")];
    let a = fleet.pop_with("a", 1, &[], &ttl);
    client(&a, &rows_sql((0..20).map(|i| format!("r{i}")))).await;
    client(&a, &rows_sql(["gone".to_owned()])).await;
    a.wait_status("21 rows", |s| s["rows"] == 21).await;
    client(&a, "DELETE FROM backends WHERE id = 'gone'").await;
    // The purge proves the window has passed since every row was written.
    a.wait_status("the tombstone purged", |s| {
        s["tombstones"] == 0 && s["rows"] == 20
    })
    .await;
    let mut b = fleet.pop_with("b", 2, &[1], &ttl);
    converged(&[&a, &b], 20).await;
    b.stop();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", b.db.display()));
    }
    let b = b.start();
    converged(&[&a, &b], 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pops_with_clocks_400_days_ahead_and_behind_empty_no_table_and_get_every_row() {
    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    let b = fleet.pop("b", 2, &[1]);
    client(&a, &rows_sql((0..10).map(|i| format!("r{i}")))).await;
    converged(&[&a, &b], 10).await;
    let lib = glob_one("/usr/lib", "faketime/libfaketime.so.1")
        .expect("libfaketime (apt-get install faketime) runs a POP with its clock ahead");
    let c = fleet.pop_with(
        "c",
        3,
        &[1],
        &[
            ("LD_PRELOAD", &lib.display().to_string()),
            ("FAKETIME", "+400d"),
        ],
    );
    converged(&[&a, &b, &c], 10).await;
    // One 400 days behind: every row looks 400 days ahead of its clock, but not of the
    // fleet's (the median of the POPs' clocks), so it takes them.
    let d = fleet.pop_with(
        "d",
        4,
        &[1],
        &[
            ("LD_PRELOAD", &lib.display().to_string()),
            ("FAKETIME", "-400d"),
        ],
    );
    converged(&[&a, &b, &c, &d], 10).await;
    // Several rounds later nothing has moved.
    let rounds = |s: &Value| s["sync_rounds"].as_u64().unwrap();
    for p in [&a, &b, &c, &d] {
        let now = rounds(&p.status().await.unwrap());
        p.wait_status("5 more sync rounds", |s| rounds(s) >= now + 5)
            .await;
    }
    converged(&[&a, &b, &c, &d], 10).await;
    // And a write at the POP behind reaches everyone: its clock follows the rows it took.
    client(&d, &rows_sql(["from-d".to_owned()])).await;
    converged(&[&a, &b, &c, &d], 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_from_any_sqlite_client_is_replicated() {
    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    let b = fleet.pop("b", 2, &[1]);
    client(&a, &rows_sql(["x".to_owned()])).await;
    let before = converged(&[&a, &b], 1).await;
    // How most tools write a row: it failed with "UNIQUE constraint failed:
    // _edgeproxy_dirty.id" at a replicating POP.
    client(
        &a,
        "INSERT INTO backends VALUES ('x','web','eu','DE','10.0.0.1',81,1,1,10,0,0)
         ON CONFLICT(id) DO UPDATE SET port = excluded.port",
    )
    .await;
    converged_past(&[&a, &b], 1, &before).await;
    assert_eq!(row(&b.rows(), "x")["port"], 81);
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_member_pins_no_memory_and_stalls_no_replication() {
    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    let b = fleet.pop("b", 2, &[1]);
    a.wait_members(1).await;
    client(&b, &rows_sql(["before".to_owned()])).await;
    converged(&[&a, &b], 1).await;
    let pid = a.child.as_ref().unwrap().id();
    let baseline = rss_mib(pid);

    // A member gone rogue: its certificate is from the cluster's CA.
    let endpoint = fleet.member_endpoint("rogue", 99);
    let target = SocketAddr::new(fleet.ip(1), 4002);
    // A flood of connections from one address: a few are taken.
    let mut conns = Vec::new();
    for _ in 0..10 {
        let connecting = endpoint.connect(target, "edgeproxy").unwrap();
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(5), connecting).await {
            // A refused connection is closed by the POP right after the handshake.
            if tokio::time::timeout(Duration::from_millis(200), c.closed())
                .await
                .is_err()
            {
                conns.push(c);
            }
        }
    }
    assert!(
        !conns.is_empty() && conns.len() <= 4,
        "{} connections taken",
        conns.len()
    );
    // A frame announced at 100 MiB: refused before it is read.
    let mut s = conns[0].open_uni().await.unwrap();
    s.write_all(&(100u32 << 20).to_be_bytes()).await.unwrap();
    let _ = s.finish();
    // On every connection, every stream it grants announces 4 MiB, sends 3 and stops.
    let mut writers = Vec::new();
    for c in &conns {
        for _ in 0..16 {
            let c = c.clone();
            writers.push(tokio::spawn(async move {
                let Ok(Ok(mut s)) =
                    tokio::time::timeout(Duration::from_secs(2), c.open_uni()).await
                else {
                    return;
                };
                let _ = s.write_all(&(4u32 << 20).to_be_bytes()).await;
                let _ = s.write_all(&vec![7u8; 3 << 20]).await;
                // Held open, unfinished, until the POP gives up on it.
                let _ = s.stopped().await;
            }));
        }
    }
    // Meanwhile the POP replicates with its good peer.
    client(&b, &rows_sql(["during".to_owned()])).await;
    converged(&[&a, &b], 2).await;
    // It gives up on every unfinished frame after the frame deadline, and counts them apart
    // from authentication refusals.
    let peak = std::sync::atomic::AtomicU64::new(0);
    let s = a
        .wait_status("the hostile streams dropped", |s| {
            peak.fetch_max(rss_mib(pid), Ordering::Relaxed);
            s["stream_errors"].as_u64().unwrap() > conns.len() as u64 * 2
        })
        .await;
    let peak = peak.into_inner();
    assert_eq!(s["peers_refused"], 0, "{s}");
    // Streams whose bytes never got past the full window were never seen by the POP and
    // cost it nothing; their writers would wait for ever.
    for w in writers {
        w.abort();
    }
    // At most 4 connections x (8 MiB of frames + a 4 MiB window), and some allocator slack.
    eprintln!("hostile member: RSS {baseline} MiB before, {peak} MiB at most during");
    assert!(
        peak.saturating_sub(baseline) < 80,
        "RSS went from {baseline} MiB to {peak} MiB"
    );
    client(&b, &rows_sql(["after".to_owned()])).await;
    converged(&[&a, &b], 3).await;
}

/// A member speaks for itself only: what another member's certificate says for it (its
/// node id, its SWIM identity, its policy report) is refused, and a POP will not start
/// under a name its certificate does not carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_speaks_only_for_the_pop_its_certificate_names() {
    use edgeproxy::adapters::cluster::membership::Identity;
    use edgeproxy::adapters::cluster::wire::{self, Message};
    use edgeproxy::domain::replication::NodeId;
    use edgeproxy::domain::rollout::{FleetRecord, FleetValue, PopPolicies};
    use foca::Codec as _;

    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    let b = fleet.pop("b", 2, &[1]);
    a.wait_members(1).await;
    let b_node =
        NodeId(u64::from_str_radix(b.wait_members(1).await["node"].as_str().unwrap(), 16).unwrap());
    let refused = |s: &Value| s["peers_refused"].as_u64().unwrap();
    let before = refused(&a.status().await.unwrap());

    let endpoint = fleet.member_endpoint("rogue", 99);
    let rows = endpoint
        .connect(SocketAddr::new(fleet.ip(1), 4002), "edgeproxy")
        .unwrap()
        .await
        .unwrap();
    let report = |pop: &str, region: &str| FleetRecord {
        version: edgeproxy::domain::replication::Version {
            hlc: edgeproxy::domain::replication::Hlc::from_millis(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64,
            ),
            node: NodeId(99),
        },
        value: FleetValue::Pop(PopPolicies {
            pop: pop.into(),
            region: region.into(),
            ..Default::default()
        }),
    };
    let push = |from: NodeId, records: Vec<FleetRecord>| {
        let rows = rows.clone();
        async move {
            let mut s = rows.open_uni().await.unwrap();
            let frame = wire::encode(&Message::FleetPush { from, records });
            wire::write_frame(&mut s, &frame).await.unwrap();
            s.finish().unwrap();
        }
    };
    // b's node id from the rogue's certificate: refused, and answered so.
    let (mut send, mut recv) = rows.open_bi().await.unwrap();
    let ask = wire::encode(&Message::FleetSync {
        from: b_node,
        digest: 0,
    });
    wire::write_frame(&mut send, &ask).await.unwrap();
    send.finish().unwrap();
    let reply = wire::read_frame(&mut recv, wire::MAX_FRAME).await.unwrap();
    match wire::decode(&reply).unwrap() {
        Message::Refused { reason } => assert!(reason.contains("speaks for node"), "{reason}"),
        other => panic!("answered {}", other.kind()),
    }
    // b's report under an id of its own: the report is refused, b's own stays.
    push(NodeId(99), vec![report("b", "forged")]).await;
    push(b_node, vec![report("b", "forged")]).await;
    a.wait_status("the forged reports refused", |s| refused(s) >= before + 3)
        .await;
    // Its own report is taken (the same path refuses only what it may not say).
    push(NodeId(99), vec![report("rogue", "its-own")]).await;
    let s = a
        .wait_status("the rogue's own report", |s| {
            s["policies"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["pop"] == "rogue")
        })
        .await;
    assert!(
        s["policies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["region"] != "forged"),
        "{s}"
    );

    // A SWIM packet from the rogue's certificate signed as b: dropped before SWIM sees it.
    let gossip = endpoint
        .connect(SocketAddr::new(fleet.ip(1), 4001), "edgeproxy")
        .unwrap()
        .await
        .unwrap();
    let posing = Identity {
        node: b_node,
        name: "b".into(),
        gossip: SocketAddr::new(fleet.ip(99), 4001),
        transport: SocketAddr::new(fleet.ip(99), 4002),
        bump: u64::MAX,
    };
    let header = foca::Header {
        src: posing.clone(),
        src_incarnation: 0,
        dst: posing,
        message: foca::Message::Ping(1),
    };
    let mut packet = Vec::new();
    foca::PostcardCodec
        .encode_header(&header, &mut packet)
        .unwrap();
    let now = refused(&a.status().await.unwrap());
    gossip.send_datagram(packet.into()).unwrap();
    a.wait_status("the posing SWIM packet refused", |s| refused(s) > now)
        .await;
    // b is still b, alive, at its own address; rows still flow.
    let s = a.wait_members(1).await;
    let member = &s["members"][0];
    assert_eq!(member["name"], "b");
    assert_eq!(member["gossip"], format!("{}:4001", fleet.ip(2)));
    client(&b, &rows_sql(["after".to_owned()])).await;
    converged(&[&a, &b], 1).await;

    // A POP whose certificate is for another name does not start, and says why.
    let (cert, key) = fleet.cert(&fleet.dir.path().join("ca"), "a");
    let mut c = edgeproxy();
    c.env("EDGEPROXY_DB_PATH", fleet.dir.path().join("z.db"))
        .envs(a.env.iter().map(|(k, v)| (k, v)))
        .env("EDGEPROXY_REPLICATION_NODE_ID", "z")
        .env("EDGEPROXY_REPLICATION_CERT_FILE", &cert)
        .env("EDGEPROXY_REPLICATION_KEY_FILE", &key)
        .env("EDGEPROXY_LISTEN_ADDR", format!("{}:8080", fleet.ip(7)))
        .env("EDGEPROXY_ADMIN_ADDR", format!("{}:9090", fleet.ip(7)))
        .env(
            "EDGEPROXY_REPLICATION_GOSSIP_ADDR",
            format!("{}:4001", fleet.ip(7)),
        )
        .env(
            "EDGEPROXY_REPLICATION_TRANSPORT_ADDR",
            format!("{}:4002", fleet.ip(7)),
        );
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(r#"is made for POP "a", but this POP is named "z""#),
        "{err}"
    );
}

/// The certificate a POP's rows endpoint presents to a new connection (the client is a
/// member with a certificate of its own).
async fn presented_certificate(fleet: &Fleet, n: u8) -> Vec<u8> {
    let endpoint = fleet.member_endpoint("probe", 98);
    let conn = endpoint
        .connect(SocketAddr::new(fleet.ip(n), 4002), "edgeproxy")
        .unwrap()
        .await
        .unwrap();
    let certs = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .unwrap();
    conn.close(0u32.into(), b"done");
    certs[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_files_are_taken_without_a_restart() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let fleet = Fleet::new();
    let a = fleet.pop("a", 1, &[]);
    let b = fleet.pop("b", 2, &[1]);
    a.wait_members(1).await;
    let certs = fleet.dir.path().join("certs");
    let old = CertificateDer::from_pem_file(certs.join("a.pem")).unwrap();
    assert_eq!(presented_certificate(&fleet, 1).await, old.to_vec());
    // A new certificate and key for the same POP, copied over the old files.
    let rotated = fleet.dir.path().join("rotated");
    let mut c = edgeproxy();
    c.args(["cluster", "cert", "a", "--ca-dir"])
        .arg(fleet.dir.path().join("ca"))
        .arg("--dir")
        .arg(&rotated);
    run_ok(c);
    // The certificate first, with the old key: a set that does not load is refused and
    // the running one kept.
    std::fs::copy(rotated.join("a.pem"), certs.join("a.pem")).unwrap();
    a.wait_status("the mismatched set refused", |_| {
        a.logs().contains("new credentials not taken")
    })
    .await;
    assert_eq!(presented_certificate(&fleet, 1).await, old.to_vec());
    std::fs::copy(rotated.join("a.key"), certs.join("a.key")).unwrap();
    let new = CertificateDer::from_pem_file(rotated.join("a.pem")).unwrap();
    assert_ne!(new, old);
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while presented_certificate(&fleet, 1).await != new.to_vec() {
        assert!(tokio::time::Instant::now() < deadline, "{}", a.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.logs().contains("credentials reloaded"), "{}", a.logs());
    // And the fleet goes on replicating.
    client(&b, &rows_sql(["after-rotation".to_owned()])).await;
    converged(&[&a, &b], 1).await;
}

#[test]
fn the_cluster_demo_routes_a_write_everywhere_and_heals_a_partition() {
    let mut c = edgeproxy();
    c.args(["demo", "--cluster"]);
    let out = run_ok(c);
    for line in [
        "all three POPs see each other",
        "pop-b routes a client to fra-1",
        "pop-c routes a client to fra-1",
        "pop-a sees pop-c down",
        "pop-b routes to fra-2",
        "all three tables equal",
        "pop-c routes to fra-2",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_mode_is_chosen_explicitly_and_cannot_join_an_authenticated_cluster() {
    let fleet = Fleet::new();
    let plain = [("EDGEPROXY_REPLICATION_PLAINTEXT", "true")];
    let a = fleet.pop_with("a", 1, &[], &plain);
    let b = fleet.pop_with("b", 2, &[1], &plain);
    a.wait_members(1).await;
    add(&a, "x", "10.0.0.1:1".parse().unwrap());
    converged(&[&a, &b], 1).await;
    assert!(a.logs().contains("PLAINTEXT MODE"), "{}", a.logs());

    // A plaintext POP presents no certificate: an authenticated cluster refuses it.
    let secure = fleet.pop("secure", 3, &[]);
    let c = fleet.pop_with("c", 4, &[3], &plain);
    secure
        .wait_status("the plaintext POP refused", |s| {
            s["peers_refused"].as_u64().unwrap() >= 1
        })
        .await;
    let s = c.wait_status("its admin API", |_| true).await;
    assert!(
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["name"] != "secure"),
        "{s}"
    );
}

/// A backend registers at one POP and is routed at the other; its heartbeats stop and it
/// leaves rotation in both; a heartbeat at the other POP adopts it and brings it back
/// everywhere. Heartbeats in between write nothing anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_and_its_expiry_reach_every_pop() {
    let fleet = Fleet::new();
    let api_a = SocketAddr::new(fleet.ip(1), 8081);
    let api_b = SocketAddr::new(fleet.ip(2), 8081);
    // a expires silent backends after 1 s; b, which adopts one later, only after 30 s.
    let (listen_a, listen_b) = (api_a.to_string(), api_b.to_string());
    fn api<'a>(listen: &'a str, ttl: &'a str) -> [(&'a str, &'a str); 4] {
        [
            ("EDGEPROXY_API_ENABLED", "true"),
            ("EDGEPROXY_API_LISTEN_ADDR", listen),
            ("EDGEPROXY_HEARTBEAT_TTL_SECS", ttl),
            // The test's backends are on loopback.
            ("EDGEPROXY_API_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ]
    }
    let a = fleet.pop_with("a", 1, &[], &api(&listen_a, "1"));
    let b = fleet.pop_with("b", 2, &[1], &api(&listen_b, "30"));
    a.wait_members(1).await;
    b.wait_members(1).await;
    let backend = Backend::start("joiner").await;
    let (code, body) = send(
        api_a,
        "POST",
        "/api/v1/register",
        &[],
        &registration("j-1", "app", backend.addr),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // In the table at b while it beats at a ...
    wait_row(&b, "j-1", true, || {
        send(api_a, "POST", "/api/v1/heartbeat/j-1", &[], "")
    })
    .await;
    // ... out of rotation at b once its beats stop for a's TTL.
    wait_row(&b, "j-1", false, || async { (0, String::new()) }).await;
    // A beat at b adopts it there and writes it back everywhere; then beats write nothing.
    assert_eq!(
        send(api_b, "POST", "/api/v1/heartbeat/j-1", &[], "")
            .await
            .0,
        200
    );
    wait_row(&a, "j-1", true, || async { (0, String::new()) }).await;
    let digest = converged(&[&a, &b], 1).await;
    let sent = b.status().await.unwrap()["changes_sent"].clone();
    for _ in 0..3 {
        assert_eq!(
            send(api_b, "POST", "/api/v1/heartbeat/j-1", &[], "")
                .await
                .0,
            200
        );
    }
    assert_eq!(b.status().await.unwrap()["changes_sent"], sent);
    assert_eq!(converged(&[&a, &b], 1).await, digest);
}

/// Waits until `pop`'s table says `id` is `healthy`, calling `meanwhile` on each try.
async fn wait_row<F: std::future::Future<Output = (u16, String)>>(
    pop: &Pop,
    id: &str,
    healthy: bool,
    meanwhile: impl Fn() -> F,
) {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        meanwhile().await;
        let rows = pop.rows();
        if rows
            .iter()
            .any(|r| r["id"] == id && r["healthy"] == healthy)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never healthy = {healthy} at {}: {rows:?}\n{}",
            pop.name,
            pop.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `edgeproxy policy ARGS` against `pop`'s admin API, as its operator would run it.
fn policy_cli(pop: &Pop, args: &[&str]) -> std::process::Output {
    let mut c = edgeproxy();
    c.arg("policy")
        .args(args)
        .env("EDGEPROXY_ADMIN_ADDR", pop.admin.to_string())
        .env("EDGEPROXY_DB_PATH", &pop.db);
    c.output().unwrap()
}

fn policy_ok(pop: &Pop, args: &[&str]) -> Value {
    let out = policy_cli(pop, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "policy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What `pop`'s report (as `seen_from` has it replicated) says about `role`.
fn reported<'a>(status: &'a Value, pop: &str, role: &str) -> &'a Value {
    status["policies"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pop"] == pop))
        .map_or(&Value::Null, |p| &p[role])
}

/// The SHA-256 of the live policy `pop` itself says it runs.
async fn live_hash(pop: &Pop) -> String {
    let status = crate::support::admin_json(pop.admin, "/status").await;
    status["policy"]["hash"].as_str().unwrap().to_owned()
}

/// Deploys go to the POPs named (by name, by region), every POP reports what it runs in
/// `cluster status`, a corrupt component is refused by every POP it is for while the
/// previous policy keeps serving, and rollbacks bring each POP back to what it ran before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_deploys_reach_the_selected_pops_and_corrupt_ones_are_refused_everywhere() {
    let fleet = Fleet::new();
    let a = fleet.pop_with("a", 1, &[], &[("EDGEPROXY_REGION", "eu")]);
    let b = fleet.pop_with("b", 2, &[1], &[("EDGEPROXY_REGION", "eu")]);
    let c = fleet.pop_with("c", 3, &[1], &[("EDGEPROXY_REGION", "us")]);
    for p in [&a, &b, &c] {
        p.wait_members(2).await;
    }
    let backend = Backend::start("berlin").await;
    add(&a, "berlin-1", backend.addr);
    converged(&[&a, &b, &c], 1).await;
    let embedded = live_hash(&a).await;
    let least = crate::support::policy_component("examples/policies/least-connections");
    let chaos = crate::support::chaos_component();
    let hash_of = |p: &Path| edgeproxy::domain::rollout::content_hash(&std::fs::read(p).unwrap());
    let (least_hash, chaos_hash) = (hash_of(&least), hash_of(&chaos));

    // Live to POP b alone, deployed through a.
    let d1 = policy_ok(
        &a,
        &["deploy", least.to_str().unwrap(), "--live", "--pops", "b"],
    );
    assert_eq!(d1["hash"], least_hash.as_str());
    let s = a
        .wait_status("b running the deployment", |s| {
            reported(s, "b", "live")["deployment"] == d1["id"]
                && reported(s, "a", "live").is_object()
                && reported(s, "c", "live").is_object()
        })
        .await;
    assert_eq!(reported(&s, "b", "live")["hash"], least_hash.as_str());
    assert_eq!(live_hash(&b).await, least_hash);
    for p in [&a, &c] {
        assert_eq!(live_hash(p).await, embedded, "{} is not selected", p.name);
        assert_eq!(reported(&s, &p.name, "live")["deployment"], Value::Null);
    }

    // A restarted POP runs its deployment again, from its own store.
    let b = {
        let mut b = b;
        b.stop();
        b.start()
    };
    b.wait_members(2).await;
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while live_hash(&b).await != least_hash {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b did not run its deployment again after a restart:\n{}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Shadow to region eu (a and b); c has none.
    let d2 = policy_ok(
        &c,
        &[
            "deploy",
            chaos.to_str().unwrap(),
            "--shadow",
            "--regions",
            "eu",
        ],
    );
    c.wait_status("eu running the shadow", |s| {
        ["a", "b"]
            .iter()
            .all(|p| reported(s, p, "shadow")["deployment"] == d2["id"])
    })
    .await;
    for p in [&a, &b] {
        let shadow = crate::support::admin_json(p.admin, "/policy/shadow").await;
        assert_eq!(shadow["policy"]["hash"], chaos_hash.as_str());
    }
    let (code, _) = crate::support::http(c.admin, "GET", "/policy/shadow", &[]).await;
    assert_eq!(code, 404, "c is in region us");

    // A component that does not compile, sent past the local check, to every POP.
    let broken = fleet.dir.path().join("broken.wasm");
    let bytes = std::fs::read(&least).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let refused = policy_cli(&a, &["deploy", broken.to_str().unwrap(), "--live"]);
    assert!(!refused.status.success(), "the local check stops it");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("policy check"));
    let d3 = policy_ok(
        &a,
        &["deploy", broken.to_str().unwrap(), "--live", "--no-check"],
    );
    let s = a
        .wait_status("every POP refusing the broken component", |s| {
            ["a", "b", "c"].iter().all(|p| {
                s["policies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["pop"] == *p && r["refused"][0]["deployment"] == d3["id"])
            })
        })
        .await;
    let cause = s["policies"][0]["refused"][0]["cause"].as_str().unwrap();
    assert!(
        cause.contains("compil") || cause.contains("component"),
        "{cause}"
    );
    assert_eq!(live_hash(&a).await, embedded);
    assert_eq!(
        live_hash(&b).await,
        least_hash,
        "b keeps its previous deployment"
    );
    assert_eq!(live_hash(&c).await, embedded);
    for p in [&a, &b, &c] {
        assert_eq!(
            crate::support::served_by("127.0.0.1", p.listen).await,
            "berlin"
        );
    }

    // A hash mismatch: the only copy (at a) of a component no POP has seen is corrupted
    // before b and c fetch it.
    let latency = crate::support::policy_component("examples/policies/latency-aware");
    b.signal("-STOP");
    c.signal("-STOP");
    let d4 = policy_ok(
        &a,
        &[
            "deploy",
            latency.to_str().unwrap(),
            "--live",
            "--pops",
            "b,c",
        ],
    );
    let store =
        rusqlite::Connection::open(edgeproxy::adapters::outbound::sqlite_fleet::path_for(&a.db))
            .unwrap();
    let n = store
        .execute(
            "UPDATE components SET bytes = x'0061736d' WHERE hash = ?1",
            [&hash_of(&latency)],
        )
        .unwrap();
    assert_eq!(n, 1);
    b.signal("-CONT");
    c.signal("-CONT");
    let s = b
        .wait_status("b and c refusing the mismatched copy", |s| {
            ["b", "c"].iter().all(|p| {
                s["policies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["pop"] == *p && r["refused"][0]["deployment"] == d4["id"])
            })
        })
        .await;
    let b_report = s["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pop"] == "b")
        .unwrap();
    assert!(
        b_report["refused"][0]["cause"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{b_report}"
    );
    assert_eq!(live_hash(&b).await, least_hash);
    assert_eq!(live_hash(&c).await, embedded);

    // One command per deployment undoes it everywhere: the newest first.
    for _ in 0..3 {
        policy_ok(&b, &["rollback", "--fleet"]);
    }
    policy_ok(&b, &["rollback", "--fleet", "--shadow"]);
    c.wait_status("every POP back on its configuration", |s| {
        ["a", "b", "c"].iter().all(|p| {
            reported(s, p, "live")["deployment"] == Value::Null
                && reported(s, p, "live").is_object()
                && reported(s, p, "shadow").is_null()
        })
    })
    .await;
    for p in [&a, &b, &c] {
        assert_eq!(live_hash(p).await, embedded);
    }
    let out = policy_cli(&a, &["rollback", "--fleet"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no live deployment"));
    let text = {
        let mut cmd = edgeproxy();
        cmd.args(["cluster", "status"])
            .env("EDGEPROXY_ADMIN_ADDR", a.admin.to_string());
        run_ok(cmd)
    };
    assert!(
        text.contains("rolled back") && text.contains("live policy"),
        "{text}"
    );
}

/// What POP `pop`'s DNS answers for `name` (A) asked for a client in `subnet` (ECS).
async fn dns_a(pop: &Pop, name: &str, subnet: &str) -> Vec<IpAddr> {
    use hickory_proto::rr::RecordType;
    let server = SocketAddr::new(pop.listen.ip(), 5353);
    let q = crate::dns::question(name, RecordType::A, Some(subnet));
    crate::dns::addrs(&crate::dns::ask(server, "127.0.0.1", &q).await)
}

async fn wait_dns(
    pop: &Pop,
    name: &str,
    subnet: &str,
    what: &str,
    cond: impl Fn(&[IpAddr]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let got = dns_a(pop, name, subnet).await;
        if cond(&got) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: {name} for {subnet}: {what} not reached; last {got:?}\nlog:\n{}",
            pop.name,
            pop.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pops_names_and_the_front_name_follow_the_fleets_liveness() {
    let fleet = Fleet::new();
    let geo = fleet.dir.path().join("geo.mmdb");
    crate::support::write_mmdb(
        &geo,
        crate::support::GeoFormat::IpLocationDb,
        crate::support::TEST_GEO,
    );
    let (brazil, germany) = ("198.51.100.0/24", "203.0.113.0/24");
    let pop = |name: &str, n: u8, region: &str, seeds: &[u8]| {
        let env = [
            ("EDGEPROXY_REGION", region.to_owned()),
            ("EDGEPROXY_GEOIP_PATH", geo.display().to_string()),
            ("EDGEPROXY_DNS_ENABLED", "true".to_owned()),
            ("EDGEPROXY_DNS_LISTEN_ADDR", format!("{}:5353", fleet.ip(n))),
            ("EDGEPROXY_DNS_FRONT_NAME", "edge.example.com".to_owned()),
            ("EDGEPROXY_DNS_FRONT_ANSWERS", "3".to_owned()),
            ("EDGEPROXY_DNS_TTL_SECS", "3".to_owned()),
            ("EDGEPROXY_DRAIN_TIMEOUT_SECS", "10".to_owned()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        fleet.pop_with(name, n, seeds, &env)
    };
    let a = pop("a", 1, "eu", &[]);
    let mut b = pop("b", 2, "eu", &[1]);
    let c = pop("c", 3, "sa", &[1]);
    for p in [&a, &b, &c] {
        p.wait_members(2).await;
    }
    let (ia, ib, ic) = (fleet.ip(1), fleet.ip(2), fleet.ip(3));

    // <region>.pops: every POP answers with the POPs SWIM sees alive there.
    for p in [&a, &b, &c] {
        wait_dns(p, "eu.pops.internal.", germany, "a and b", |got| {
            let mut got = got.to_vec();
            got.sort();
            got == [ia, ib]
        })
        .await;
    }
    wait_dns(&a, "sa.pops.internal.", brazil, "c", |got| got == [ic]).await;
    // The front name: the client's region first, and the same answer from every POP.
    wait_dns(&a, "edge.example.com.", brazil, "c first", |got| {
        got.first() == Some(&ic) && got.len() == 3
    })
    .await;
    let from_a = dns_a(&a, "edge.example.com.", germany).await;
    assert_eq!(from_a.len(), 3);
    assert!(
        from_a[..2].contains(&ia) && from_a[..2].contains(&ib),
        "{from_a:?}"
    );
    // Once b's record has reached c too (membership alone can arrive first).
    wait_dns(&c, "edge.example.com.", germany, "a's answer", |got| {
        got == from_a
    })
    .await;

    // A frozen POP leaves the answers within SWIM's detection time, and comes back.
    c.signal("-STOP");
    wait_dns(&a, "edge.example.com.", brazil, "no c", |got| {
        !got.contains(&ic) && got.len() == 2
    })
    .await;
    wait_dns(
        &b,
        "sa.pops.internal.",
        brazil,
        "no live POP in sa",
        <[IpAddr]>::is_empty,
    )
    .await;
    c.signal("-CONT");
    wait_dns(&a, "edge.example.com.", brazil, "c back first", |got| {
        got.first() == Some(&ic)
    })
    .await;

    // A POP killed (its record still says it takes clients) and back without a front name
    // withdraws its record: alive under its region, gone from the front name.
    let mut c = c;
    c.kill();
    c.env.retain(|(k, _)| k != "EDGEPROXY_DNS_FRONT_NAME");
    let c = c.start();
    wait_dns(&a, "sa.pops.internal.", brazil, "c alive again", |got| {
        got == [ic]
    })
    .await;
    // (Alive from here on: only a withdrawn record keeps it out.)
    wait_dns(&a, "edge.example.com.", brazil, "c withdrawn", |got| {
        !got.contains(&ic)
    })
    .await;
    drop(c);

    // A draining POP leaves the answers while it still accepts.
    b.signal("-TERM");
    wait_dns(&a, "edge.example.com.", germany, "no b", |got| {
        !got.contains(&ib) && got == [ia]
    })
    .await;
    let still = tokio::net::TcpStream::connect(b.listen).await;
    assert!(
        still.is_ok(),
        "b stopped accepting before it left the front name's answers"
    );
    b.stop();
}

/// Every `edgeproxy_*` series `file` (under `deploy/`) queries.
fn queried_metrics(file: &str) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("edgeproxy_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_served() {
    let fleet = Fleet::new();
    let (cert, key) = fleet.cert(&fleet.dir.path().join("ca"), "a");
    let pop = |name: &str, n: u8, seeds: &[u8]| {
        let env = [
            ("EDGEPROXY_DNS_ENABLED", "true".to_owned()),
            ("EDGEPROXY_DNS_LISTEN_ADDR", format!("{}:5353", fleet.ip(n))),
            ("EDGEPROXY_TLS_ENABLED", "true".to_owned()),
            ("EDGEPROXY_TLS_LISTEN_ADDR", format!("{}:8443", fleet.ip(n))),
            ("EDGEPROXY_TLS_CERT", cert.display().to_string()),
            ("EDGEPROXY_TLS_KEY", key.display().to_string()),
            ("EDGEPROXY_HEALTH_CHECK_ENABLED", "true".to_owned()),
            ("EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS", "0.2".to_owned()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        fleet.pop_with(name, n, seeds, &env)
    };
    let a = pop("a", 1, &[]);
    let b = pop("b", 2, &[1]);
    for p in [&a, &b] {
        p.wait_members(1).await;
    }
    let backend = Backend::start("web-1").await;
    add(&a, "web-1", backend.addr);
    let deadline = tokio::time::Instant::now() + CONVERGE;
    let wanted: std::collections::BTreeSet<String> = queried_metrics("grafana/edgeproxy.json")
        .into_iter()
        .chain(queried_metrics("prometheus/alerts.yml"))
        .collect();
    loop {
        // A connection through (the connect histogram and RTT), a DNS query; then every
        // family must be in the text.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), served_by("127.0.0.1", a.listen)).await;
        let _ = dns_a(&a, "web.internal.", "198.51.100.0/24").await;
        let (_, text) = crate::support::http(a.admin, "GET", "/metrics", &[]).await;
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|m| {
                !text
                    .lines()
                    .any(|l| l.starts_with(m.as_str()) && l[m.len()..].starts_with(['{', ' ']))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not in /metrics: {missing:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(wanted.len() > 35, "{wanted:?}");
}
