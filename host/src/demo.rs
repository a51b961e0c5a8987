//! `edgeproxy demo`: a whole POP on loopback in one command. Three echo backends stand in
//! for backends in São Paulo, Frankfurt and Virginia; clients from different countries are
//! simulated with PROXY protocol headers, and the tour prints who served whom. A second
//! listener shows TLS: two server names on one port, one terminated, one passed through;
//! the POP's DNS answers the same decisions by name.

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

    let tls = tls::setup(dir, &conn, stop.clone()).await?;
    drop(conn);

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy = listener.local_addr()?;
    let listener_config = ListenerConfig {
        app: Some("demo".into()),
        proxy_protocol: true,
        trusted_proxies: vec!["127.0.0.0/8".parse()?],
        ..ListenerConfig::plain(proxy)
    };
    let tls_listener = TcpListener::bind("127.0.0.1:0").await?;
    let tls_addr = tls_listener.local_addr()?;
    let tls_config = ListenerConfig {
        tls: Some(crate::config::TlsMode::Passthrough),
        server_names: tls::names(),
        alpn: vec!["h2".into(), "http/1.1".into()],
        ..ListenerConfig::plain(tls_addr)
    };
    let file = Layer::default()
        .with("db_path", db.display().to_string())
        .with("region", "sa")
        .with("tls_cert_dir", tls.cert_dir.display().to_string())
        .with("dns_enabled", true)
        .with("dns_listen_addr", "127.0.0.1:0");
    let config = Config::resolve(file, Layer::default(), Layer::default())?;
    let host = Arc::new(Host::build(&config).await?);
    let dns_sockets = crate::adapters::inbound::dns_server::bind("127.0.0.1:0".parse()?, 1)?;
    let dns = dns_sockets.local_addr()?;
    let proxy_stop = CancellationToken::new();
    let running = {
        let (host, stop) = (Arc::clone(&host), proxy_stop.clone());
        let listeners = vec![(listener, listener_config), (tls_listener, tls_config)];
        tokio::spawn(async move {
            let sockets = crate::Sockets {
                listeners,
                dns: Some(dns_sockets),
                ..Default::default()
            };
            host.run(sockets, stop).await
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

    println!(
        "\nDNS on {dns}: the same decision by name (_demo._tcp.internal SRV, the client as EDNS Client Subnet):"
    );
    for (ip, _) in &CLIENTS[..3] {
        let targets = srv_lookup(dns, "_demo._tcp.internal.", &format!("{ip}/24")).await?;
        println!(
            "  for {:<18} => {}",
            format!("{ip}/24"),
            targets.join(", then ")
        );
    }

    println!(
        "\nTLS on {tls_addr}: two names on one port, routed by the ClientHello's server name:"
    );
    for name in [tls::TERMINATED, tls::PASSED] {
        let seen = tls.ask(tls_addr, name).await?;
        println!("  {name:<18} -> {seen}");
    }

    if hold {
        println!(
            "\nThe proxy keeps running on {proxy} (PROXY protocol from 127.0.0.0/8); Ctrl-C to stop.\n\
             Try: printf 'PROXY TCP4 85.214.132.117 127.0.0.1 1 {}\\r\\nhello\\n' | nc -q1 {} {}\n\
             and: openssl s_client -connect {tls_addr} -servername {} -alpn h2 -quiet",
            proxy.port(),
            proxy.ip(),
            proxy.port(),
            tls::TERMINATED,
        );
        shutdown.cancelled().await;
    }
    proxy_stop.cancel();
    running.await??;
    stop.cancel();
    Ok(())
}

/// Asks `server` for `name`'s SRV records over UDP as a client in `subnet` (EDNS Client
/// Subnet): each target's backend id and address, in priority order.
async fn srv_lookup(server: SocketAddr, name: &str, subnet: &str) -> anyhow::Result<Vec<String>> {
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut q = Message::new(1, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(Name::from_ascii(name)?, RecordType::SRV));
    let mut edns = Edns::new();
    let subnet: ClientSubnet = subnet.parse()?;
    edns.options_mut().insert(EdnsOption::Subnet(subnet));
    q.set_edns(edns);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.send_to(&q.to_vec()?, server).await?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        socket.recv_from(&mut buf),
    )
    .await
    .context("no DNS answer")??;
    let answer = Message::from_vec(&buf[..n])?;
    let mut srv: Vec<_> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    srv.sort_by_key(|s| s.priority);
    Ok(srv
        .iter()
        .map(|s| {
            let target = s.target.to_ascii();
            let id = target.split('.').next().unwrap_or_default().to_owned();
            let ip = answer.additionals.iter().find_map(|r| match &r.data {
                RData::A(a) if r.name == s.target => Some(IpAddr::V4(a.0)),
                _ => None,
            });
            match ip {
                Some(ip) => format!("{id} ({})", SocketAddr::new(ip, s.port)),
                None => id,
            }
        })
        .collect())
}

/// The demo's TLS part: `secure.demo.test` terminated here with a certificate the demo
/// makes, `pass.demo.test` passed through to a backend that holds its own.
mod tls {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use crate::adapters::net::tls::provider;
    use crate::config::{NameEntry, TlsMode};

    pub const TERMINATED: &str = "secure.demo.test";
    pub const PASSED: &str = "pass.demo.test";

    pub struct DemoTls {
        pub cert_dir: std::path::PathBuf,
        pop_cert: CertificateDer<'static>,
        backend_cert: CertificateDer<'static>,
    }

    pub fn names() -> BTreeMap<String, NameEntry> {
        BTreeMap::from([
            (
                TERMINATED.to_owned(),
                NameEntry::Route {
                    app: "secure".into(),
                    tls: Some(TlsMode::Terminate),
                },
            ),
            (PASSED.to_owned(), NameEntry::App("pass".into())),
        ])
    }

    /// The POP's certificate in a `tls_cert_dir`, a plain backend for the terminated
    /// name and a TLS one for the other, both in the routing table.
    pub async fn setup(
        dir: &std::path::Path,
        db: &rusqlite::Connection,
        stop: CancellationToken,
    ) -> anyhow::Result<DemoTls> {
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(&cert_dir)?;
        let pop = rcgen::generate_simple_self_signed(vec![TERMINATED.into()])?;
        std::fs::write(cert_dir.join("secure.pem"), pop.cert.pem())?;
        std::fs::write(cert_dir.join("secure.key"), pop.signing_key.serialize_pem())?;
        let backend = rcgen::generate_simple_self_signed(vec![PASSED.into()])?;
        let key = PrivateKeyDer::Pkcs8(backend.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![backend.cert.der().clone()], key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let plain = TcpListener::bind("127.0.0.1:0").await?;
        let tls = TcpListener::bind("127.0.0.1:0").await?;
        for (id, app, l) in [("secure-1", "secure", &plain), ("pass-1", "pass", &tls)] {
            db.execute(
                "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit)
                 VALUES (?1, ?2, 'sa', 'BR', '127.0.0.1', ?3, 1, 1, 100, 0)",
                rusqlite::params![id, app, l.local_addr()?.port()],
            )?;
        }
        tokio::spawn(super::echo_backend("secure-1", plain, stop.clone()));
        tokio::spawn(async move {
            loop {
                let (s, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = tls.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(s).await {
                        let _ = s.write_all(b"pass-1\n").await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        Ok(DemoTls {
            cert_dir,
            pop_cert: pop.cert.der().clone(),
            backend_cert: backend.cert.der().clone(),
        })
    }

    impl DemoTls {
        /// A TLS client (rustls) asking for `name`: who served it, whose certificate
        /// answered, and the protocol agreed.
        pub async fn ask(&self, addr: SocketAddr, name: &str) -> anyhow::Result<String> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.pop_cert.clone())?;
            roots.add(self.backend_cert.clone())?;
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(addr).await?;
            let tls = connector
                .connect(ServerName::try_from(name.to_owned())?, tcp)
                .await?;
            let (_, session) = tls.get_ref();
            let whose = match session.peer_certificates().and_then(|c| c.first()) {
                Some(c) if *c == self.pop_cert => "terminated here, the POP's certificate",
                Some(c) if *c == self.backend_cert => {
                    "passed through, the backend's own certificate"
                }
                _ => "an unknown certificate",
            };
            let alpn = session
                .alpn_protocol()
                .map(|p| format!(", ALPN {}", String::from_utf8_lossy(p)))
                .unwrap_or_default();
            let mut line = String::new();
            BufReader::new(tls).read_line(&mut line).await?;
            Ok(format!("{:<9} ({whose}{alpn})", line.trim()))
        }
    }
}
