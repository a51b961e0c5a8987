//! `edgeproxy demo`: a whole POP on loopback in one command. Three echo backends stand in
//! for backends in São Paulo, Frankfurt and Virginia; clients from different countries are
//! simulated with PROXY protocol headers, and the tour prints who served whom.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::Host;
use crate::config::{Config, Layer, ListenerConfig};

struct DemoBackend {
    id: &'static str,
    region: &'static str,
    country: &'static str,
}

const BACKENDS: [DemoBackend; 3] = [
    DemoBackend {
        id: "sa-gru-1",
        region: "sa",
        country: "BR",
    },
    DemoBackend {
        id: "eu-fra-1",
        region: "eu",
        country: "DE",
    },
    DemoBackend {
        id: "us-iad-1",
        region: "us",
        country: "US",
    },
];

/// (client IP, what it stands for). Countries come from the embedded GeoIP database.
pub const CLIENTS: [(&str, &str); 6] = [
    ("200.147.3.157", "a client in Brazil"),
    ("85.214.132.117", "a client in Germany"),
    ("8.8.8.8", "a client in the USA"),
    ("190.98.248.1", "a client in Chile (same region)"),
    ("133.242.0.1", "a client in Japan (no backend in ap)"),
    ("192.0.2.1", "an address with no GeoIP entry"),
];

/// Echo server that first says who it is, so the tour can tell backends apart.
pub(crate) async fn echo_backend(id: &'static str, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (mut s, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        tokio::spawn(async move {
            let _ = s.write_all(format!("{id}\n").as_bytes()).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Connects through the proxy as `client`, returns the backend's greeting line.
pub async fn ask(proxy: SocketAddr, client: IpAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(proxy).await?;
    let header = match client {
        IpAddr::V4(ip) => format!("PROXY TCP4 {ip} 127.0.0.1 40000 {}\r\n", proxy.port()),
        IpAddr::V6(ip) => format!("PROXY TCP6 {ip} ::1 40000 {}\r\n", proxy.port()),
    };
    s.write_all(header.as_bytes()).await?;
    s.write_all(b"ping\n").await?;
    s.shutdown().await?;
    let mut lines = BufReader::new(s);
    let mut who = String::new();
    lines.read_line(&mut who).await?;
    let mut rest = String::new();
    lines.read_to_string(&mut rest).await?;
    anyhow::ensure!(rest == "ping\n", "echo came back as {rest:?}");
    Ok(who.trim().to_owned())
}

pub async fn run(hold: bool, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("edgeproxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = tour(&dir, hold, shutdown).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn tour(
    dir: &std::path::Path,
    hold: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let db = dir.join("routing.db");
    let conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch(crate::adapters::outbound::sqlite_routing::SCHEMA)?;
    for b in &BACKENDS {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        conn.execute(
            "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit)
             VALUES (?1, 'demo', ?2, ?3, '127.0.0.1', ?4, 1, 1, 100, 0)",
            rusqlite::params![b.id, b.region, b.country, port],
        )?;
        tokio::spawn(echo_backend(b.id, listener, stop.clone()));
    }
    drop(conn);

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy = listener.local_addr()?;
    let listener_config = ListenerConfig {
        proxy_protocol: true,
        trusted_proxies: vec!["127.0.0.0/8".parse()?],
        ..ListenerConfig::plain(proxy)
    };
    let file = Layer::default()
        .with("db_path", db.display().to_string())
        .with("region", "sa");
    let config = Config::resolve(file, Layer::default(), Layer::default())?;
    let host = Arc::new(Host::build(&config).await?);
    let proxy_stop = CancellationToken::new();
    let running = {
        let (host, stop) = (Arc::clone(&host), proxy_stop.clone());
        tokio::spawn(async move {
            host.run(vec![(listener, listener_config)], None, None, stop)
                .await
        })
    };

    let policy = host.wasm_policy.as_ref().map_or_else(
        || "native scorer".to_owned(),
        |w| format!("{} (WebAssembly)", w.current().name),
    );
    println!("edgeproxy demo: POP region \"sa\", proxy on {proxy}, policy {policy}, backends:");
    for b in &BACKENDS {
        println!(
            "  {:<9} region {:<2}  country {}",
            b.id, b.region, b.country
        );
    }
    println!();
    println!(
        "  {:<16} {:<38} {:<8} {:<7} -> backend",
        "client", "", "country", "region"
    );
    for (ip, what) in CLIENTS {
        let ip: IpAddr = ip.parse()?;
        let client = host.service.locate(ip, true);
        let served_by = ask(proxy, ip).await?;
        println!(
            "  {:<16} {:<38} {:<8} {:<7} -> {}",
            ip,
            what,
            client.country.map_or("-".into(), |c| c.to_string()),
            client.region.map_or("-".into(), |r| r.to_string()),
            served_by
        );
    }
    let again = ask(proxy, CLIENTS[0].0.parse()?).await?;
    println!("\n  {} again -> {again} (sticky binding)", CLIENTS[0].0);

    if hold {
        println!(
            "\nThe proxy keeps running on {proxy} (PROXY protocol from 127.0.0.0/8); Ctrl-C to stop.\n\
             Try: printf 'PROXY TCP4 85.214.132.117 127.0.0.1 1 {}\\r\\nhello\\n' | nc -q1 {} {}",
            proxy.port(),
            proxy.ip(),
            proxy.port()
        );
        shutdown.cancelled().await;
    }
    proxy_stop.cancel();
    running.await??;
    stop.cancel();
    Ok(())
}
