//! `edgeproxy demo --cluster`: three POPs on loopback as three edgeproxy processes, each
//! with its own routing database, joined by certificates made on the spot. A backend
//! written at one POP is routed at the others; then one POP is cut off (frozen with
//! SIGSTOP), both sides take writes, and the tour shows it converge when it comes back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::adapters::cli::cluster::get;
use crate::adapters::cluster::tls;
use crate::adapters::outbound::sqlite_editor::{BackendRow, RoutingEditor};
use crate::domain::ports::ClusterStatus;

const LIMIT: Duration = Duration::from_secs(30);

struct Pop {
    name: &'static str,
    db: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    child: Child,
}

impl Drop for Pop {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }
}

impl Pop {
    fn start(dir: &Path, name: &'static str, n: u8, seed: Option<&Pop>) -> anyhow::Result<Self> {
        let ip = format!("127.0.77.{n}");
        let (cert, key) =
            tls::make_node_cert(&dir.join("ca"), &dir.join("certs"), name, "edgeproxy")?;
        let db = dir.join(format!("{name}.db"));
        RoutingEditor::init(&db)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(std::env::current_exe()?)
            .envs([
                ("EDGEPROXY_DB_PATH", db.display().to_string()),
                ("EDGEPROXY_LISTEN_ADDR", format!("{ip}:8080")),
                ("EDGEPROXY_ADMIN_ADDR", format!("{ip}:9090")),
                ("EDGEPROXY_WORKER_THREADS", "1".into()),
                ("EDGEPROXY_MAX_CONNECTIONS", "1000".into()),
                ("EDGEPROXY_REPLICATION_ENABLED", "true".into()),
                ("EDGEPROXY_REPLICATION_NODE_ID", name.into()),
                ("EDGEPROXY_REPLICATION_GOSSIP_ADDR", format!("{ip}:4001")),
                ("EDGEPROXY_REPLICATION_TRANSPORT_ADDR", format!("{ip}:4002")),
                (
                    "EDGEPROXY_REPLICATION_BOOTSTRAP_PEERS",
                    seed.map_or(String::new(), |s| format!("{}:4001", s.listen.ip())),
                ),
                ("EDGEPROXY_REPLICATION_GOSSIP_INTERVAL_MS", "200".into()),
                ("EDGEPROXY_REPLICATION_SYNC_INTERVAL_MS", "500".into()),
                (
                    "EDGEPROXY_REPLICATION_CA_FILE",
                    dir.join("ca/ca.pem").display().to_string(),
                ),
                (
                    "EDGEPROXY_REPLICATION_CERT_FILE",
                    cert.display().to_string(),
                ),
                ("EDGEPROXY_REPLICATION_KEY_FILE", key.display().to_string()),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a POP")?;
        Ok(Self {
            name,
            db,
            listen: format!("{ip}:8080").parse()?,
            admin: format!("{ip}:9090").parse()?,
            child,
        })
    }

    async fn status(&self) -> Option<ClusterStatus> {
        let body = get(self.admin, "/cluster", None).await.ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// The backend that greets a client of this POP, if any answers.
    async fn served_by(&self) -> Option<String> {
        let s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(self.listen))
            .await
            .ok()?
            .ok()?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(1),
            BufReader::new(s).read_line(&mut line),
        )
        .await
        .ok()?
        .ok()?;
        Some(line.trim().to_owned()).filter(|l| !l.is_empty())
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), sig);
    }
}

async fn until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {LIMIT:?} (logs in the demo directory)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn add(pop: &Pop, id: &str, region: &str, addr: SocketAddr) -> anyhow::Result<()> {
    RoutingEditor::open(&pop.db)?.add(&BackendRow {
        id: id.into(),
        app: "demo".into(),
        region: region.into(),
        country: "DE".into(),
        wg_ip: addr.ip().to_string(),
        port: addr.port(),
        healthy: true,
        weight: 1,
        soft_limit: 100,
        hard_limit: 0,
        deleted: false,
        owner: None,
    })?;
    Ok(())
}

pub async fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("edgeproxy-demo-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = tour(&dir).await;
    match &result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(_) => eprintln!("logs kept in {}", dir.display()),
    }
    result
}

async fn tour(dir: &Path) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let mut backends = Vec::new();
    for name in ["fra-1", "fra-2"] {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        backends.push(l.local_addr()?);
        tokio::spawn(crate::demo::echo_backend(name, l, stop.clone()));
    }
    tls::make_ca(&dir.join("ca"), "demo")?;
    let a = Pop::start(dir, "pop-a", 1, None)?;
    let b = Pop::start(dir, "pop-b", 2, Some(&a))?;
    let c = Pop::start(dir, "pop-c", 3, Some(&a))?;
    let pops = [&a, &b, &c];
    let t0 = Instant::now();
    let at = || format!("[{:5.2} s]", t0.elapsed().as_secs_f64());
    println!("edgeproxy demo --cluster: three POPs on 127.0.77.1-3, mutual TLS from a fresh CA");
    for p in pops {
        until("membership", async || {
            p.status()
                .await
                .filter(|s| s.members.iter().filter(|m| m.state == "alive").count() == 2)
        })
        .await?;
    }
    println!("{} all three POPs see each other (SWIM)", at());

    add(&a, "fra-1", "eu", backends[0])?;
    println!("{} backend fra-1 written at pop-a", at());
    for p in [&b, &c] {
        until("routing", async || {
            p.served_by().await.filter(|s| s == "fra-1")
        })
        .await?;
        println!("{} {} routes a client to fra-1", at(), p.name);
    }

    c.signal(rustix::process::Signal::STOP);
    println!("{} pop-c cut off (frozen)", at());
    until("pop-c down", async || {
        a.status().await.filter(|s| {
            s.members
                .iter()
                .any(|m| m.name == "pop-c" && m.state == "down")
        })
    })
    .await?;
    println!("{} pop-a sees pop-c down", at());
    add(&a, "fra-2", "eu", backends[1])?;
    RoutingEditor::open(&b.db)?.set_healthy("fra-1", false)?;
    println!(
        "{} while cut off: fra-2 added at pop-a, fra-1 drained at pop-b",
        at()
    );
    until("routing", async || {
        b.served_by().await.filter(|s| s == "fra-2")
    })
    .await?;
    println!(
        "{} pop-b routes to fra-2; pop-c still has the old table",
        at()
    );

    c.signal(rustix::process::Signal::CONT);
    println!("{} pop-c back", at());
    let digest = until("convergence", async || {
        let mut d = Vec::new();
        for p in pops {
            d.push(p.status().await?.digest);
        }
        d.iter().all(|x| *x == d[0]).then(|| d[0].clone())
    })
    .await?;
    println!("{} all three tables equal (digest {digest})", at());
    until("routing", async || {
        c.served_by().await.filter(|s| s == "fra-2")
    })
    .await?;
    println!("{} pop-c routes to fra-2, fra-1 drained", at());
    stop.cancel();
    Ok(())
}
