//! The routing table in PostgreSQL: a throwaway server each test starts itself (Debian's
//! `postgresql` package, a cluster in a temp dir, on loopback), an in-process proxy
//! reading it, and the built binary editing it as an operator would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// A PostgreSQL server of the test's own, stopped (by its data directory) when dropped.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// More server options (`-c key=value …`).
    options: String,
}

/// What `initdb` is told about authentication.
const TRUST: &[&str] = &["--auth=trust"];

fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .filter(|b| b.join("initdb").exists())
        .expect("PostgreSQL's server binaries (Debian: apt-get install postgresql)")
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(tempfile::tempdir().unwrap(), "", TRUST)
    }

    /// A server in `dir` (which may hold its certificates and password file) with more
    /// server `options`, and `auth` for initdb.
    pub fn start_with(dir: tempfile::TempDir, options: &str, auth: &[&str]) -> Self {
        let bin = bin_dir();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self {
            dir,
            bin,
            port,
            options: options.to_owned(),
        };
        // initdb refuses to run as root: the server runs as the `postgres` user then.
        if rustix::process::geteuid().is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let data = pg.data();
        let mut args = vec![
            "-D",
            data.as_str(),
            "-U",
            "edgeproxy",
            "--no-sync",
            "-E",
            "UTF8",
        ];
        args.extend_from_slice(auth);
        pg.run("initdb", &args);
        pg.ctl("start");
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let path = self.bin.join(tool);
        let mut c = if rustix::process::geteuid().is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = c.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ctl(&self, what: &str) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {}",
            self.port,
            self.dir.path().display(),
            self.options
        );
        let log = self.dir.path().join("server.log").display().to_string();
        match what {
            "start" => self.run(
                "pg_ctl",
                &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
            ),
            _ => self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]),
        }
    }

    pub fn stop(&self) {
        self.ctl("stop");
    }

    pub fn restart(&self) {
        self.ctl("start");
    }

    pub fn url(&self) -> String {
        format!("postgres://edgeproxy@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` (on a thread of its own: the blocking client must not run on the
    /// test's runtime).
    pub fn exec(&self, sql: &str) {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut c = postgres::Client::connect(&self.url(), postgres::NoTls).unwrap();
                c.batch_execute(sql).unwrap();
            })
            .join()
            .unwrap()
        });
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| self.stop());
    }
}

/// `edgeproxy ARGS` with the table in `pg`; (success, stdout, stderr).
async fn cli(pg: &Postgres, args: &[&str]) -> (bool, String, String) {
    let url = pg.url();
    edgeproxy_run(&[&["--db-url", url.as_str()], args].concat()).await
}

async fn ok(pg: &Postgres, args: &[&str]) -> String {
    let (success, stdout, stderr) = cli(pg, args).await;
    assert!(success, "{args:?}: {stderr}");
    stdout
}

async fn add(pg: &Postgres, id: &str, country: &str, addr: SocketAddr) {
    ok(
        pg,
        &[
            "backend",
            "add",
            id,
            "--app",
            "web",
            "--region",
            "eu",
            "--country",
            country,
            "--wg-ip",
            "127.0.0.1",
            "--port",
            &addr.port().to_string(),
        ],
    )
    .await;
}

async fn ids(pg: &Postgres) -> Vec<String> {
    let out = ok(pg, &["backend", "list", "--json"]).await;
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A proxy on the PostgreSQL table (its SQLite `db` is never opened).
async fn proxy(pg: &Postgres, unused: &Db) -> Proxy {
    Proxy::start(
        unused,
        &format!("db_url = \"{}\"\nbinding_ttl_secs = 0", pg.url()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_from_postgres_follows_pushed_changes_and_outlives_the_database() {
    let pg = Postgres::start();
    ok(&pg, &["db", "init"]).await;
    let de = Backend::start("de").await;
    let de2 = Backend::start("de2").await;
    add(&pg, "de-1", "DE", de.addr).await;
    // A row the loader skips (edgeProxy's schema lets it in): the rest loads.
    pg.exec("INSERT INTO backends VALUES ('bad','web','eu','DE','not-an-ip',80,1,1,10,0,0)");
    let unused = Db::new(&[]);
    let p = proxy(&pg, &unused).await;
    assert_eq!(served_by("127.0.0.6", p.addr).await, "de");
    let skipped = p.host.routing.skipped();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].reason.contains("not-an-ip"), "{skipped:?}");

    // The periodic reload is an hour away: the change arrives by NOTIFY, also after the
    // listener has waited idle for a while (this pause is the scenario, not a wait for a
    // condition: a listener that stopped listening after its first idle wait once passed
    // a test that wrote at once).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = p.version();
    ok(&pg, &["backend", "drain", "de-1"]).await;
    add(&pg, "de-2", "DE", de2.addr).await;
    p.wait_version_after(v).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while served_by("127.0.0.6", p.addr).await != "de2" {
        assert!(tokio::time::Instant::now() < deadline, "de-2 never routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The database goes away: the last good table keeps serving.
    pg.stop();
    let (code, _) = http(p.admin, "POST", "/reload", &[]).await;
    assert_eq!(code, 500, "a failed reload is reported");
    for _ in 0..5 {
        assert_eq!(served_by("127.0.0.6", p.addr).await, "de2");
    }
    // And comes back: the listener reconnects, and changes are pushed again.
    pg.restart();
    let v = p.version();
    ok(&pg, &["backend", "undrain", "de-1"]).await;
    ok(&pg, &["backend", "remove", "de-2"]).await;
    let mut rx = p.host.routing.subscribe();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|n| *n > v))
        .await
        .expect("a change after the database came back is routed")
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while served_by("127.0.0.6", p.addr).await != "de" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "de-1 never routed again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stop().await;
}

#[tokio::test]
async fn the_cli_round_trips_and_a_bad_import_is_refused_whole() {
    let pg = Postgres::start();
    assert!(ok(&pg, &["db", "init"]).await.contains("created"));
    assert!(
        ok(&pg, &["db", "init"])
            .await
            .contains("already initialised")
    );
    let addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    add(&pg, "a", "DE", addr).await;
    let (success, _, stderr) = cli(
        &pg,
        &[
            "backend",
            "add",
            "a",
            "--app",
            "web",
            "--region",
            "eu",
            "--country",
            "DE",
            "--wg-ip",
            "127.0.0.1",
            "--port",
            "1",
        ],
    )
    .await;
    assert!(!success && stderr.contains("exists"), "{stderr}");
    let updated = ok(&pg, &["backend", "update", "a", "--weight", "7", "--json"]).await;
    assert!(updated.contains("\"weight\": 7"), "{updated}");
    let (success, _, stderr) = cli(&pg, &["backend", "update", "a", "--wg-ip", "nonsense"]).await;
    assert!(
        !success && stderr.contains("nonsense"),
        "a row the loader would skip is refused: {stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.csv");
    std::fs::write(
        &good,
        "id,app,region,country,wg_ip,port\nb,web,eu,FR,10.0.0.2,80\nc,web,us,US,10.0.0.3,80\n",
    )
    .unwrap();
    let out = ok(&pg, &["db", "import", good.to_str().unwrap(), "--json"]).await;
    assert!(out.contains("\"after\": 3"), "{out}");
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "id,app,region,country,wg_ip,port\nd,web,eu,FR,10.0.0.4,80\ne,web,eu,FR,10.0.0.5,99999\n",
    )
    .unwrap();
    let (success, _, stderr) = cli(&pg, &["db", "import", bad.to_str().unwrap()]).await;
    assert!(!success && stderr.contains("line 3"), "{stderr}");
    assert_eq!(
        ids(&pg).await,
        ["a", "b", "c"],
        "nothing of the bad file was imported"
    );
    ok(&pg, &["backend", "remove", "c"]).await;
    assert_eq!(ids(&pg).await, ["a", "b"]);
}

/// The credentials never reach a log or an error, and a missing table is named.
#[tokio::test]
async fn errors_name_the_database_without_credentials() {
    let pg = Postgres::start();
    let url = format!(
        "postgres://edgeproxy:hunter2@127.0.0.1:{}/postgres",
        pg.port
    );
    let out = edgeproxy_cli(&["--db-url", url.as_str(), "backend", "list"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no table named backends") && stderr.contains(&pg.port.to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A POP (fra1) on the table in `pg`, with the registration API on (its backends are on
/// loopback); `unused` is the SQLite file it is not given.
async fn registering_pop(pg: &Postgres, unused: &Db) -> Proxy {
    Proxy::start(
        unused,
        &format!(
            "db_url = \"{}\"\nbinding_ttl_secs = 0\ncluster_node_id = \"fra1\"\n[api]\nenabled = true\nallowed_networks = \"127.0.0.0/8\"\n",
            pg.url()
        ),
    )
    .await
}

/// Self-registration writes the shared table (and this POP's record of what it registered),
/// and the proxy routes to what registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_go_to_postgres_and_are_routed() {
    let pg = Postgres::start();
    ok(&pg, &["db", "init"]).await;
    let be = Backend::start("joiner").await;
    let unused = Db::new(&[]);
    let p = registering_pop(&pg, &unused).await;
    let api = p.api.unwrap();
    let v = p.version();
    let (code, body) = register(api, &registration("joiner-1", "web", be.addr)).await;
    assert_eq!(code, 200, "{body}");
    p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.6", p.addr).await, "joiner");
    assert_eq!(ids(&pg).await, ["joiner-1"]);
    let registered = std::thread::scope(|s| {
        s.spawn(|| {
            let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
            c.query("SELECT pop, id FROM edgeproxy_registrations", &[])
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    });
    assert_eq!(registered, [("fra1".to_owned(), "joiner-1".to_owned())]);
    let (code, _) = send(api, "DELETE", "/api/v1/backends/joiner-1", &[], "").await;
    assert_eq!(code, 200);
    assert!(ids(&pg).await.is_empty());
    // An operator's row is not the API's, in the shared table too.
    add(&pg, "op-1", "DE", be.addr).await;
    for (method, path, body) in [
        (
            "POST",
            "/api/v1/register",
            registration("op-1", "web", be.addr),
        ),
        ("POST", "/api/v1/heartbeat/op-1", String::new()),
    ] {
        let (code, answer) = send(api, method, path, &[], &body).await;
        assert_eq!(code, 409, "{path}: {answer}");
        assert!(answer.contains("an operator's row"), "{answer}");
    }
    assert_eq!(ids(&pg).await, ["op-1"]);
    p.stop().await;
}

/// A CA (PEM) and a server certificate and key for `localhost` signed by it, in `dir`.
fn certificates(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&paths.0, ca_pem).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&paths.2, std::fs::Permissions::from_mode(0o600)).unwrap();
    paths
}

/// With `db_ca_file` the connection is TLS and the server must prove itself with a
/// certificate from that CA; another CA's is refused.
#[tokio::test]
async fn tls_verifies_the_server_against_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "server");
    let (other_ca, _, _) = certificates(dir.path(), "other");
    let pg = Postgres::start_with(
        dir,
        &format!(
            "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            cert.display(),
            key.display()
        ),
        TRUST,
    );
    let url = format!(
        "postgres://edgeproxy@localhost:{}/postgres?sslmode=require",
        pg.port
    );
    let with_ca = |ca: &std::path::Path| {
        let (url, ca) = (url.clone(), ca.display().to_string());
        async move {
            edgeproxy_cli(&[
                "--db-url",
                url.as_str(),
                "--db-ca-file",
                ca.as_str(),
                "db",
                "init",
            ])
            .await
        }
    };
    let out = with_ca(&ca).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_ca(&other_ca).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("certificate"),
        "{stderr}"
    );
}

/// A password from `db_password_file` authenticates; without it the server refuses, and
/// neither the password nor the URL's appears in what is printed.
#[tokio::test]
async fn the_password_comes_from_the_password_file_and_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "correct-horse-battery\n").unwrap();
    let pwfile = file.display().to_string();
    let pg = Postgres::start_with(
        dir,
        "",
        &[
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--pwfile",
            &pwfile,
        ],
    );
    let url = format!("postgres://edgeproxy@127.0.0.1:{}/postgres", pg.port);
    let out = edgeproxy_cli(&["--db-url", url.as_str(), "db", "init"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("password"),
        "{stderr}"
    );
    let out = edgeproxy_cli(&[
        "--db-url",
        url.as_str(),
        "--db-password-file",
        pwfile.as_str(),
        "db",
        "init",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = format!(
        "postgres://edgeproxy:wrong-horse@127.0.0.1:{}/postgres",
        pg.port
    );
    let out = edgeproxy_cli(&["--db-url", wrong.as_str(), "backend", "list"]).await;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && printed.contains("authentication"),
        "{printed}"
    );
    assert!(
        !printed.contains("wrong-horse") && !printed.contains("correct-horse"),
        "{printed}"
    );
}

/// A statement the server does not finish (here: a table another session holds locked) is
/// cut off by edgeproxy's statement timeout: the registration gets 503 after five seconds
/// and the POP goes on, instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_statement_fails_in_seconds() {
    let pg = Postgres::start();
    ok(&pg, &["db", "init"]).await;
    let be = Backend::start("joiner").await;
    let unused = Db::new(&[]);
    let p = registering_pop(&pg, &unused).await;
    let api = p.api.unwrap();
    let (locked, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let holder = {
        let (locked, url) = (locked.0, pg.url());
        let release = release.1;
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let mut tx = c.transaction().unwrap();
            tx.batch_execute("LOCK TABLE backends IN ACCESS EXCLUSIVE MODE")
                .unwrap();
            locked.send(()).unwrap();
            let _ = release.recv();
            tx.rollback().unwrap();
        })
    };
    locked.1.recv().unwrap();
    let started = tokio::time::Instant::now();
    let (code, body) = register(api, &registration("j-1", "web", be.addr)).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("statement timeout"), "{body}");
    // edgeproxy's own statement timeout: five seconds.
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(4) && took < std::time::Duration::from_secs(9),
        "{took:?}"
    );
    release.0.send(()).unwrap();
    holder.join().unwrap();
    // Once the lock is gone, the same registration goes through.
    let (code, body) = register(api, &registration("j-1", "web", be.addr)).await;
    assert_eq!(code, 200, "{body}");
    p.stop().await;
}

/// A role that may only read the table lists it: the owners table it may not create is
/// its session's own, and every row reads as an operator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_role_lists_the_table() {
    let pg = Postgres::start();
    ok(&pg, &["db", "init"]).await;
    add(&pg, "a", "DE", "127.0.0.1:8080".parse().unwrap()).await;
    pg.exec(
        "DROP TABLE edgeproxy_owners;
         CREATE ROLE reader LOGIN;
         GRANT SELECT ON backends TO reader;",
    );
    let url = format!("postgres://reader@127.0.0.1:{}/postgres", pg.port);
    let (success, out, err) = edgeproxy_run(
        &[
            &["--db-url", url.as_str()][..],
            &["backend", "list", "--json"],
        ]
        .concat(),
    )
    .await;
    assert!(success, "{err}");
    assert!(out.contains("\"a\""), "{out}");
}
