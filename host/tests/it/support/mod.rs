//! Test fixtures: echo backends on 127.0.0.1:0, routing databases in temp dirs, generated
//! GeoIP files, and a proxy running in-process on a port-0 listener.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use edgeproxy::Host;
use edgeproxy::config::{Config, Layer, ListenerConfig};
use maxminddb_writer::paths::IpAddrWithMask;
use rusqlite::Connection;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// The data path proxies started in this task use (`data_path`); epoll outside
    /// `on_both_data_paths!`.
    pub static DATA_PATH: &'static str;
}

thread_local! {
    /// `DATA_PATH` for tests that are not async (they start processes).
    pub static SYNC_DATA_PATH: std::cell::Cell<&'static str> = const { std::cell::Cell::new("epoll") };
}

/// The data path a proxy started now uses.
pub fn data_path() -> &'static str {
    DATA_PATH
        .try_with(|p| *p)
        .unwrap_or_else(|_| SYNC_DATA_PATH.get())
}

/// A test of what a connection does, run on both data paths: `<name>::epoll` and
/// `<name>::io_uring` (the same body, with `data_path` set for the proxies it starts, in
/// process through `Proxy::start*` and as processes through `edgeproxy_command`).
macro_rules! on_both_data_paths {
    ($(#[$attr:meta])* async fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$attr])*
            async fn epoll() $body
            $(#[$attr])*
            async fn io_uring() {
                $crate::support::DATA_PATH.scope("io_uring", async $body).await
            }
        }
    };
    ($(#[$attr:meta])* fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$attr])*
            fn epoll() $body
            $(#[$attr])*
            fn io_uring() {
                $crate::support::SYNC_DATA_PATH.set("io_uring");
                $body
            }
        }
    };
}

/// An echo server that greets with its name, counts connections and holds them open
/// until the client closes its side.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Listens on `addr` (a port another `Backend` used before, to bring it back).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (n, count, s) = (name.to_owned(), accepted.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                let (mut sock, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                count.fetch_add(1, Ordering::SeqCst);
                let greeting = format!("{n}\n");
                tokio::spawn(async move {
                    let _ = sock.write_all(greeting.as_bytes()).await;
                    let (mut r, mut w) = sock.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Self {
            addr,
            accepted,
            stop,
            task: Some(task),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listening socket (connections are refused from the return on).
    pub async fn stop_listening(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// A server that accepts connections and never sends a byte; held until dropped.
pub async fn silent_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    (addr, task)
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A port on which nothing listens (connections are refused).
pub async fn refusing_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

pub struct Row<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub region: &'a str,
    pub country: &'a str,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub weight: i64,
    pub soft_limit: i64,
    pub hard_limit: i64,
}

impl<'a> Row<'a> {
    pub fn new(id: &'a str, region: &'a str, country: &'a str, addr: SocketAddr) -> Self {
        Self {
            id,
            app: "app",
            region,
            country,
            addr,
            healthy: true,
            weight: 1,
            soft_limit: 100,
            hard_limit: 0,
        }
    }
}

/// A routing database in a temp dir, with the schema edgeproxy creates.
pub struct Db {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Db {
    pub fn new(rows: &[Row<'_>]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(edgeproxy::adapters::outbound::sqlite_routing::SCHEMA)
            .unwrap();
        let db = Self { dir, path };
        for r in rows {
            db.insert(r);
        }
        db
    }

    pub fn insert(&self, r: &Row<'_>) {
        self.exec(
            "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0)",
            rusqlite::params![r.id, r.app, r.region, r.country, r.addr.ip().to_string(), r.addr.port(), r.healthy, r.weight, r.soft_limit, r.hard_limit],
        );
    }

    pub fn exec(&self, sql: &str, params: impl rusqlite::Params) {
        let conn = Connection::open(&self.path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute(sql, params).unwrap();
    }
}

/// Which record layout a generated GeoIP file uses.
#[derive(Clone, Copy)]
pub enum GeoFormat {
    /// ip-location-db: `{country_code}`.
    IpLocationDb,
    /// MaxMind GeoIP2/GeoLite2 Country: `{country: {iso_code}}`.
    MaxMind,
}

/// Writes a small IPv4 .mmdb mapping each network to a country.
pub fn write_mmdb(path: &Path, format: GeoFormat, networks: &[(&str, &str)]) {
    use std::collections::BTreeMap;
    let mut db = maxminddb_writer::Database::default();
    db.metadata.database_type = "edgeproxy-test".into();
    db.metadata.binary_format_major_version = 2;
    for (net, country) in networks {
        let data = match format {
            GeoFormat::IpLocationDb => db
                .insert_value(BTreeMap::from([("country_code", *country)]))
                .unwrap(),
            GeoFormat::MaxMind => db
                .insert_value(BTreeMap::from([(
                    "country",
                    BTreeMap::from([("iso_code", *country)]),
                )]))
                .unwrap(),
        };
        db.insert_node(net.parse::<IpAddrWithMask>().unwrap(), data);
    }
    let file = std::fs::File::create(path).unwrap();
    db.write_to(std::io::BufWriter::new(file)).unwrap();
}

/// Loopback source addresses stand for clients in these countries in the test GeoIP file;
/// the documentation ranges stand for PROXY-protocol clients.
pub const TEST_GEO: &[(&str, &str)] = &[
    ("127.0.0.2/32", "BR"),
    ("127.0.0.3/32", "CL"),
    ("127.0.0.4/32", "KE"),
    ("127.0.0.5/32", "JP"),
    ("127.0.0.6/32", "DE"),
    ("198.51.100.0/24", "BR"),
    ("203.0.113.0/24", "DE"),
];

pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin API (and /metrics).
    pub admin: SocketAddr,
    /// The registration API, when the config turns it on.
    pub api: Option<SocketAddr>,
    /// The DNS server (UDP and TCP), when the config turns it on.
    pub dns: Option<SocketAddr>,
    /// The metrics-only listener, when the config asks for one.
    pub metrics: Option<SocketAddr>,
    pub host: Arc<Host>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<edgeproxy::Drained>>,
    _geo_dir: tempfile::TempDir,
    /// A test that fails before `stop` still stops the proxy, whose blocking threads (DNS
    /// over UDP) the runtime would otherwise wait for at its end, hanging the test.
    _stop_on_drop: tokio_util::sync::DropGuard,
}

#[derive(Default)]
pub struct ProxyOptions {
    pub file: Layer,
    pub listener: Option<ListenerConfig>,
    /// SO_REUSEPORT copies of the listener, as one per worker thread (0 or 1: one).
    pub listener_copies: usize,
    /// Decide with this instead of the configured policy.
    pub policy: Option<Arc<dyn edgeproxy::domain::ports::ScoringPolicy>>,
}

impl Proxy {
    pub async fn start(db: &Db, toml: &str) -> Self {
        Self::start_with(
            db,
            ProxyOptions {
                file: Layer::from_toml(toml).unwrap(),
                ..ProxyOptions::default()
            },
        )
        .await
    }

    pub async fn start_with(db: &Db, opts: ProxyOptions) -> Self {
        // Logs show with --nocapture (RUST_LOG to filter); harmless when already set.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let geo_dir = tempfile::tempdir().unwrap();
        let geo = geo_dir.path().join("test.mmdb");
        write_mmdb(&geo, GeoFormat::IpLocationDb, TEST_GEO);
        let defaults = Layer::default()
            .with("db_path", db.path.display().to_string())
            .with("geoip_path", geo.display().to_string())
            .with("region", "eu")
            .with("data_path", data_path())
            // Reloads in tests come from file notifications, not the timer.
            .with("db_reload_secs", 3600);
        let config =
            Config::resolve(opts.file.over(defaults), Layer::default(), Layer::default()).unwrap();
        let host = Arc::new(match opts.policy {
            Some(policy) => Host::with_policy(&config, policy).await.unwrap(),
            None => Host::build(&config).await.unwrap(),
        });
        let copies = edgeproxy::adapters::inbound::tcp_server::bind(
            "127.0.0.1:0".parse().unwrap(),
            opts.listener_copies,
        )
        .unwrap();
        let addr = copies[0].local_addr().unwrap();
        let lc = match opts.listener {
            Some(lc) => ListenerConfig { addr, ..lc },
            None => ListenerConfig {
                addr,
                ..config.listeners[0].clone()
            },
        };
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();
        let admin = Some(admin_listener);
        let api_listener = match &config.api {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        let api_addr = api_listener.as_ref().map(|l| l.local_addr().unwrap());
        let dns = config.dns.as_ref().map(|_| {
            edgeproxy::adapters::inbound::dns_server::bind("127.0.0.1:0".parse().unwrap(), 1)
                .unwrap()
        });
        let dns_addr = dns.as_ref().map(|d| d.local_addr().unwrap());
        let metrics = match config.metrics.as_ref().and_then(|m| m.listen) {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(|l| l.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = {
            let (host, shutdown) = (host.clone(), shutdown.clone());
            let sockets = edgeproxy::Sockets {
                listeners: copies.into_iter().map(|l| (l, lc.clone())).collect(),
                admin,
                api: api_listener,
                dns,
                metrics,
                ..Default::default()
            };
            tokio::spawn(async move { host.run(sockets, shutdown).await })
        };
        // Running once the admin API answers: the file watchers, started before it, are
        // in place, so a change the test makes next is seen.
        // (401 is an answer too, where a token is set.)
        let (code, _) = http(admin_addr, "GET", "/status", &[]).await;
        assert!(code == 200 || code == 401, "{code}");
        Self {
            addr,
            admin: admin_addr,
            api: api_addr,
            dns: dns_addr,
            metrics: metrics_addr,
            host,
            _stop_on_drop: shutdown.clone().drop_guard(),
            shutdown,
            task,
            _geo_dir: geo_dir,
        }
    }

    /// Waits until the routing table version moves past `from`.
    pub async fn wait_version_after(&self, from: u64) -> u64 {
        let mut rx = self.host.routing.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|v| *v > from))
            .await
            .expect("routing reload")
            .unwrap();
        *rx.borrow()
    }

    pub fn version(&self) -> u64 {
        self.host.routing.current().version()
    }

    pub fn active(&self) -> u64 {
        self.host.metrics.total_active()
    }

    /// Backend `id`'s live counts in the current table.
    pub fn stats(&self, id: &str) -> Arc<edgeproxy::domain::model::BackendStats> {
        let table = self.host.routing.current();
        let found = table
            .backends()
            .iter()
            .find(|b| b.backend.id.as_str() == id);
        Arc::clone(&found.unwrap_or_else(|| panic!("no backend {id}")).stats)
    }

    pub async fn stop(self) -> edgeproxy::Drained {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("drain")
            .unwrap()
            .unwrap()
    }
}

/// A connection from `source` (a 127.0.0.0/8 address) to `addr`.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(source, 0)).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Opens a connection and returns it with the name of the backend that greeted it.
pub async fn open(source: &str, addr: SocketAddr) -> (String, BufReader<TcpStream>) {
    let stream = connect_from(source.parse().unwrap(), addr).await;
    greeted(stream).await
}

pub async fn greeted(stream: TcpStream) -> (String, BufReader<TcpStream>) {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(WAIT, r.read_line(&mut line))
        .await
        .expect("greeting")
        .unwrap();
    (line.trim().to_owned(), r)
}

/// One short connection: the name of the backend that served `source`.
pub async fn served_by(source: &str, addr: SocketAddr) -> String {
    let (name, mut conn) = open(source, addr).await;
    conn.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("close")
        .unwrap();
    name
}

/// True when the proxy closed the connection without any backend greeting.
pub async fn refused(source: &str, addr: SocketAddr) -> bool {
    let mut s = connect_from(source.parse().unwrap(), addr).await;
    let _ = s.shutdown().await; // a backend that did answer then closes too
    let mut buf = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("close")
    {
        Ok(_) => buf.is_empty(),
        Err(_) => true, // reset
    }
}

/// The chaos test policy (`tests/fixtures/chaos-policy`), built once per test run.
pub fn chaos_component() -> PathBuf {
    policy_component("host/tests/fixtures/chaos-policy")
}

/// The policy crate at `dir` (relative to the workspace root) built into a component by
/// `edgeproxy policy build`, once per test run, under `target/test-fixtures`.
pub fn policy_component(dir: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    // Held while building: cargo serialises builds in one target dir anyway.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(d, _)| d == dir) {
        return path.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out_dir = root.join("target/test-fixtures");
    std::fs::create_dir_all(&out_dir).unwrap();
    let name = Path::new(dir).file_name().unwrap().to_str().unwrap();
    let out = out_dir.join(format!("{name}.wasm"));
    let path = edgeproxy::adapters::cli::policy_build::build(
        &root.join(dir),
        Some(&out),
        Some(&out_dir.join("cargo")),
    )
    .expect("building a policy (needs: rustup target add wasm32-unknown-unknown)");
    built.push((dir.to_owned(), path.clone()));
    path
}

/// The crate at `dir` (relative to the workspace root) built by plain
/// `cargo build --release --target TARGET`, as an author without edgeproxy's tools would
/// (for `wasm32-wasip2` the result is a component), once per test run.
pub fn cargo_built(dir: &str, target: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let key = format!("{dir} {target}");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(k, _)| *k == key) {
        return path.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = root.join("target/test-fixtures/cargo");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "--release", "--target", target, "--manifest-path"])
        .arg(root.join(dir).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building {dir} for {target} (needs: rustup target add {target}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = Path::new(dir).file_name().unwrap().to_str().unwrap();
    let path = target_dir
        .join(target)
        .join("release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    built.push((key, path.clone()));
    path
}

/// Waits until `policy` has finished `n` reload attempts in all.
pub async fn wait_reload_attempts(
    policy: &edgeproxy::adapters::outbound::wasm_policy::WasmPolicy,
    n: u64,
) {
    let mut rx = policy.reload_events();
    tokio::time::timeout(WAIT, rx.wait_for(|v| *v >= n))
        .await
        .expect("policy reload")
        .unwrap();
}

/// One HTTP/1.1 request to `addr`; the status code and the body.
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    send(addr, method, path, headers, "").await
}

/// One HTTP/1.1 request with a (JSON) body; the status code and the body of the answer.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: edgeproxy\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("an HTTP answer")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

/// A registration as edgeProxy's API takes it: `id` of `app` in region eu at `addr`.
/// `POST /api/v1/register` with `body`, no token: (status, body).
pub async fn register(api: SocketAddr, body: &str) -> (u16, String) {
    send(api, "POST", "/api/v1/register", &[], body).await
}

pub fn registration(id: &str, app: &str, addr: SocketAddr) -> String {
    serde_json::json!({ "id": id, "app": app, "region": "eu", "ip": addr.ip().to_string(), "port": addr.port() }).to_string()
}

/// GET `path` from the admin API as JSON, expecting 200.
pub async fn admin_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = http(addr, "GET", path, &[]).await;
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `cond` until it holds, for state that changes with no signal to wait on (the
/// moment a connection task ends after its client saw EOF). Bounded by [`WAIT`].
pub async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls the admin API's `/backends` until backend `id` satisfies `cond`; its entry and
/// how long that took. Bounded by [`WAIT`].
pub async fn wait_backend(
    admin: SocketAddr,
    id: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Duration) {
    let started = tokio::time::Instant::now();
    loop {
        let all = admin_json(admin, "/backends").await;
        let entry = all
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        if cond(&entry) {
            return (entry, started.elapsed());
        }
        assert!(
            started.elapsed() < WAIT,
            "backend {id} never met the condition; last seen: {entry:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the built `edgeproxy` with `args` and no inherited environment, off the runtime.
pub async fn edgeproxy_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgeproxy"));
    cmd.env_clear().args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// As [`edgeproxy_cli`]: (success, stdout, stderr).
pub async fn edgeproxy_run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = edgeproxy_cli(args).await;
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// As [`edgeproxy_cli`], expecting success: its standard output.
pub async fn edgeproxy_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = edgeproxy_cli(args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One page in headless Chromium, driven over WebDriver (Debian's `chromium-driver`): it
/// stays open, so what the page does by itself (polling, redrawing) can be watched.
pub struct Browser {
    driver: std::process::Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    pub async fn open(url: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = {
            std::process::Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("chromedriver (Debian's chromium-driver package)")
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = tokio::time::Instant::now() + WAIT;
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
        };
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1280,900",
        ];
        let caps = serde_json::json!({
            "capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": args}}}
        });
        let created = browser.call("POST", "/session", &caps).await;
        browser.session = created["sessionId"].as_str().expect("a session").to_owned();
        browser
            .call("POST", "/url", &serde_json::json!({ "url": url }))
            .await;
        browser
    }

    /// A WebDriver command (of the session, for paths other than `/session`): its value.
    async fn call(&self, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let path = match path {
            "/session" => path.to_owned(),
            _ => format!("/session/{}{path}", self.session),
        };
        let (code, answer) = self.request(method, &path, &body.to_string()).await;
        let v: serde_json::Value = serde_json::from_str(&answer)
            .unwrap_or_else(|_| panic!("WebDriver {path}: {code} {answer}"));
        assert_eq!(code, 200, "WebDriver {path}: {v}");
        v["value"].clone()
    }

    /// One HTTP exchange with the driver (which answers only a local `Host`).
    async fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let host = format!("Host: {}", self.addr);
        let request = format!(
            "{method} {path} HTTP/1.1\r\n{host}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        // It keeps the connection open: read to the end of the body its length gives.
        let read = async {
            let mut raw = Vec::new();
            let mut chunk = [0u8; 16384];
            loop {
                let n = s.read(&mut chunk).await?;
                raw.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&raw);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    });
                    if n == 0 || length.is_some_and(|len| body.len() >= len) {
                        let code = head.split(' ').nth(1).and_then(|c| c.parse().ok());
                        return Ok::<_, std::io::Error>((code.unwrap_or(0), body.to_owned()));
                    }
                } else if n == 0 {
                    return Ok((0, String::new()));
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("the driver answers")
            .unwrap()
    }

    /// What `script` (a function body) returns in the page; null while it cannot run
    /// (the page is loading anew).
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        let body = serde_json::json!({ "script": script, "args": [] });
        let path = format!("/session/{}/execute/sync", self.session);
        let (code, answer) = self.request("POST", &path, &body.to_string()).await;
        match (code, serde_json::from_str::<serde_json::Value>(&answer)) {
            (200, Ok(v)) => v["value"].clone(),
            _ => serde_json::Value::Null,
        }
    }

    /// Waits (bounded) until `script` returns `want`, and returns the page's text then.
    pub async fn wait_for(&self, script: &str, want: serde_json::Value) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.eval(script).await;
            if got == want {
                let text = self.eval("return document.body.innerText").await;
                return text.as_str().unwrap_or_default().to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{script} is {got}, never {want}; the page: {}",
                self.eval("return document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    /// Ends the session (the driver stops its browser), then stops the driver by its pid.
    fn drop(&mut self) {
        use std::io::{Read as _, Write as _};
        if let Ok(mut c) = std::net::TcpStream::connect(self.addr) {
            let _ = c.set_read_timeout(Some(WAIT));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.session, self.addr
            );
            let _ = c.write_all(request.as_bytes());
            let _ = c.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
