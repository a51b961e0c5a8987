//! TLS listeners with real rustls clients and servers on loopback: routing by server
//! name, passthrough byte for byte, PROXY protocol to backends, bad hellos.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::admin::{scrape, value};
use crate::support::*;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate for `names`, and its key.
pub fn certificate(names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let c = rcgen::generate_simple_self_signed(names).unwrap();
    (
        c.cert.der().clone(),
        PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into()),
    )
}

/// A TLS echo server: greets with `name` (and the ALPN it agreed) once the handshake is
/// done, then echoes.
pub async fn tls_backend(name: &str, names: &[&str]) -> (SocketAddr, CertificateDer<'static>) {
    let (cert, key) = certificate(names);
    tls_backend_with(name, cert, key).await
}

pub async fn tls_backend_with(
    name: &str,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> (SocketAddr, CertificateDer<'static>) {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (acceptor, name) = (acceptor.clone(), name.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let alpn = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let (mut r, mut w) = tokio::io::split(tls);
                let greeting = format!("{name} {}\n", alpn.as_deref().unwrap_or("-"));
                let _ = w.write_all(greeting.as_bytes()).await;
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, cert)
}

/// A TLS client to `addr` asking for `sni`, trusting `roots`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&str],
    roots: &[CertificateDer<'static>],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

/// The greeting of the backend `sni` reaches, after a full TLS handshake.
pub async fn tls_greeting(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&str],
    roots: &[CertificateDer<'static>],
) -> std::io::Result<String> {
    let tls = tls_connect(addr, sni, alpn, roots).await?;
    let mut line = String::new();
    BufReader::new(tls).read_line(&mut line).await?;
    Ok(line.trim_end().to_owned())
}

fn rows<'a>(apps: &[(&'a str, &'a str, SocketAddr)]) -> Vec<Row<'a>> {
    apps.iter()
        .map(|(id, app, addr)| Row {
            app,
            ..Row::new(id, "eu", "DE", *addr)
        })
        .collect()
}

/// Whether the proxy closes the connection after `bytes` without answering.
async fn closed_after(addr: SocketAddr, bytes: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("closed in time"),
        Ok(0) | Err(_)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_by_server_name_and_relays_tls_unchanged() {
    let (api, api_cert) = tls_backend("api-1", &["api.example.com"]).await;
    let (www, www_cert) = tls_backend("www-1", &["*.example.com", "a.b.example.com"]).await;
    let db = Db::new(&rows(&[("api-1", "api", api), ("www-1", "www", www)]));
    let p = Proxy::start(
        &db,
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = "passthrough"
        [listener.server_names]
        "api.example.com" = "api"
        "*.Example.com." = "www"
        "#,
    )
    .await;
    let roots = [api_cert, www_cert];
    // The backends' own certificates answer: nothing was terminated on the way.
    assert_eq!(
        tls_greeting(p.addr, "api.example.com", &["h2"], &roots)
            .await
            .unwrap(),
        "api-1 h2"
    );
    assert_eq!(
        tls_greeting(p.addr, "shop.example.com", &[], &roots)
            .await
            .unwrap(),
        "www-1 -"
    );
    assert_eq!(
        tls_greeting(p.addr, "A.B.EXAMPLE.COM", &["http/1.1"], &roots)
            .await
            .unwrap(),
        "www-1 http/1.1"
    );

    // A megabyte each way through the TLS session (whose records authenticate every
    // byte), compared whole.
    let tls = tls_connect(p.addr, "api.example.com", &[], &roots)
        .await
        .unwrap();
    let (r, mut w) = tokio::io::split(tls);
    let sent: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
            w
        })
    };
    let mut r = BufReader::new(r);
    let mut greeting = String::new();
    r.read_line(&mut greeting).await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    let _w = writer.await.unwrap();
    assert!(
        echoed == sent,
        "{} bytes back, {} sent",
        echoed.len(),
        sent.len()
    );

    // No route for the name, not TLS at all, a broken hello: closed and counted.
    assert!(
        tls_greeting(p.addr, "example.org", &[], &roots)
            .await
            .is_err()
    );
    assert!(closed_after(p.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await);
    let mut hello = client_hello("api.example.com");
    hello[5] = 2; // a ServerHello where a ClientHello belongs
    assert!(closed_after(p.addr, &hello).await);
    let s = scrape(p.admin).await;
    let l = p.addr.to_string();
    for (reason, n) in [
        ("unknown_name", 1.0),
        ("not_tls", 1.0),
        ("malformed", 1.0),
        ("timeout", 0.0),
    ] {
        let labels = [("listener", l.as_str()), ("reason", reason)];
        assert_eq!(
            value(&s, "edgeproxy_tls_rejected_total", &labels),
            n,
            "{reason}"
        );
    }
}

/// A ClientHello as a rustls client writes it.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_names_go_to_the_listeners_app_and_backends_get_a_proxy_v2_header() {
    // A backend that parses the PROXY header and answers with what it read.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                let header = loop {
                    n += sock.read(&mut buf[n..]).await.unwrap();
                    match ppp::v2::Header::try_from(&buf[..n]) {
                        Ok(h) => break h.to_owned(),
                        Err(
                            ppp::v2::ParseError::Incomplete(_) | ppp::v2::ParseError::Partial(..),
                        ) => continue,
                        Err(e) => panic!("{e}"),
                    }
                };
                let authority = header
                    .tlvs()
                    .flatten()
                    .find(|t| t.kind == ppp::v2::Type::Authority as u8)
                    .map(|t| String::from_utf8_lossy(&t.value).into_owned());
                let source = match header.addresses {
                    ppp::v2::Addresses::IPv4(a) => a.source_address.to_string(),
                    other => format!("{other:?}"),
                };
                // The client's first bytes follow the header unchanged: its hello.
                let after = buf[header.len()..n].first().copied();
                let answer = format!("{source} {authority:?} {after:?}\n");
                sock.write_all(answer.as_bytes()).await.unwrap();
            });
        }
    });
    let db = Db::new(&rows(&[("default-1", "default", backend)]));
    let p = Proxy::start(
        &db,
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        app = "default"
        tls = "passthrough"
        send_proxy_protocol = "v2"
        [listener.server_names]
        "api.example.com" = "api"
        "#,
    )
    .await;
    let mut s = connect_from("127.0.0.2".parse().unwrap(), p.addr).await;
    s.write_all(&client_hello("other.example.org"))
        .await
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(WAIT, BufReader::new(&mut s).read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        line.trim_end(),
        "127.0.0.2 Some(\"other.example.org\") Some(22)"
    );
}

/// Writes a self-signed pair for `names` as `dir/stem.pem` and `dir/stem.key`; the
/// certificate.
fn write_pair(dir: &std::path::Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let c = rcgen::generate_simple_self_signed(names).unwrap();
    // Written aside and renamed in, as certbot and ACME clients replace files.
    for (ext, body) in [
        ("key", c.signing_key.serialize_pem()),
        ("pem", c.cert.pem()),
    ] {
        let tmp = dir.join(format!(".{stem}.{ext}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{stem}.{ext}"))).unwrap();
    }
    c.cert.der().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_listener_picks_certificates_by_name_and_rotates_them_live() {
    let a = Backend::start("a-1").await;
    let b = Backend::start("b-1").await;
    let (pass, pass_cert) = tls_backend("pass-1", &["pass.example.com"]).await;
    let db = Db::new(&rows(&[
        ("a-1", "a", a.addr),
        ("b-1", "b", b.addr),
        ("pass-1", "p", pass),
    ]));
    let certs = tempfile::tempdir().unwrap();
    let a_cert = write_pair(certs.path(), "a", &["a.example.com"]);
    let b_cert = write_pair(certs.path(), "b", &["b.example.com"]);
    let p = Proxy::start(
        &db,
        &format!(
            r#"
            decision_log_sample_percent = 100
            binding_ttl_secs = 0
            [tls]
            cert_dir = "{}"
            [[listener]]
            addr = "127.0.0.1:0"
            tls = "terminate"
            alpn = ["h2", "http/1.1"]
            [listener.server_names]
            "a.example.com" = "a"
            "b.example.com" = "b"
            "pass.example.com" = {{ app = "p", tls = "passthrough" }}
            "#,
            certs.path().display()
        ),
    )
    .await;
    // Each name gets its own certificate (the client trusts only that one); the
    // plaintext backends greet through the session.
    assert_eq!(
        tls_greeting(
            p.addr,
            "a.example.com",
            &["http/1.1"],
            std::slice::from_ref(&a_cert)
        )
        .await
        .unwrap(),
        "a-1"
    );
    assert_eq!(
        tls_greeting(p.addr, "b.example.com", &[], std::slice::from_ref(&b_cert))
            .await
            .unwrap(),
        "b-1"
    );
    assert!(
        tls_greeting(p.addr, "b.example.com", &[], std::slice::from_ref(&a_cert))
            .await
            .is_err()
    );
    // The policy was told the name and the protocol agreed; the decision log keeps both
    // (for `policy replay`).
    let (_, recorded) = http(p.admin, "GET", "/decisions", &[]).await;
    let first: serde_json::Value = serde_json::from_str(recorded.lines().next().unwrap()).unwrap();
    assert_eq!(first["sni"], "a.example.com", "{recorded}");
    assert_eq!(first["alpn"], serde_json::json!(["http/1.1"]), "{recorded}");
    // On the same port, a name passed through: the backend's own certificate answers.
    assert_eq!(
        tls_greeting(p.addr, "pass.example.com", &["h2"], &[pass_cert])
            .await
            .unwrap(),
        "pass-1 h2"
    );

    // Echo through a terminated session, with half-close: the client's EOF reaches the
    // backend, whose answer still comes back.
    let tls = tls_connect(p.addr, "a.example.com", &[], std::slice::from_ref(&a_cert))
        .await
        .unwrap();
    let (r, mut w) = tokio::io::split(tls);
    let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
            w
        })
    };
    let mut r = BufReader::new(r);
    let mut greeting = String::new();
    r.read_line(&mut greeting).await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    let _w = writer.await.unwrap();
    assert!(echoed == sent, "{} bytes back", echoed.len());

    // Session resumption: a client that keeps its session store resumes.
    let mut store = rustls::RootCertStore::empty();
    store.add(a_cert.clone()).unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
    );
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(p.addr).await.unwrap();
        let name = ServerName::try_from("a.example.com").unwrap();
        let tls = TlsConnector::from(Arc::clone(&client))
            .connect(name, tcp)
            .await
            .unwrap();
        kinds.push(tls.get_ref().1.handshake_kind());
        // The greeting comes after the session tickets: the client has them once read.
        let mut line = String::new();
        BufReader::new(tls).read_line(&mut line).await.unwrap();
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );

    // Rotation under load: clients trusting the old and the new certificate handshake
    // in a loop while the pair is replaced; none fails, and the new one takes over.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (old, new_dir) = (a_cert.clone(), tempfile::tempdir().unwrap());
    let new = write_pair(new_dir.path(), "a", &["a.example.com"]);
    let load = {
        let (stop, roots, addr) = (stop.clone(), vec![old.clone(), new.clone()], p.addr);
        tokio::spawn(async move {
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let tls = tls_connect(addr, "a.example.com", &[], &roots)
                    .await
                    .expect("handshake during rotation");
                drop(tls);
                done += 1;
            }
            done
        })
    };
    for ext in ["key", "pem"] {
        std::fs::copy(
            new_dir.path().join(format!("a.{ext}")),
            certs.path().join(format!(".a.{ext}.tmp")),
        )
        .unwrap();
    }
    for ext in ["key", "pem"] {
        std::fs::rename(
            certs.path().join(format!(".a.{ext}.tmp")),
            certs.path().join(format!("a.{ext}")),
        )
        .unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while tls_greeting(p.addr, "a.example.com", &[], std::slice::from_ref(&new))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(load.await.unwrap() > 0);

    // A renewal whose key does not match: refused, the last good pair keeps serving.
    let stray = rcgen::generate_simple_self_signed(vec!["a.example.com".into()]).unwrap();
    std::fs::write(
        certs.path().join("a.key"),
        stray.signing_key.serialize_pem(),
    )
    .unwrap();
    p.host.certificates.as_ref().unwrap().reload();
    assert_eq!(
        tls_greeting(p.addr, "a.example.com", &[], std::slice::from_ref(&new))
            .await
            .unwrap(),
        "a-1"
    );

    // A client that agrees on no protocol with the listener: refused and counted.
    assert!(
        tls_greeting(p.addr, "a.example.com", &["imap"], &[new])
            .await
            .is_err()
    );
    // Counted once the server's side of the handshake ends, which can be after the
    // client has read the alert.
    let listener = p.addr.to_string();
    let l = listener.as_str();
    let deadline = tokio::time::Instant::now() + WAIT;
    let count = loop {
        let s = scrape(p.admin).await;
        let count = move |reason| {
            value(
                &s,
                "edgeproxy_tls_rejected_total",
                &[("listener", l), ("reason", reason)],
            )
        };
        if count("incompatible") > 0.0 || tokio::time::Instant::now() > deadline {
            break count;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(count("incompatible"), 1.0);
    // The client that trusted another certificate, and the polls for the renewed one.
    assert!(count("peer_alert") >= 1.0);
    assert_eq!(count("handshake"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reencrypting_listener_speaks_tls_to_backends_that_chain_to_its_ca() {
    // The backend's certificate, self-signed, is the CA the listener trusts.
    let backend_cert = rcgen::generate_simple_self_signed(vec!["a.example.com".into()]).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let ca = certs.path().join("backend-ca.pem");
    std::fs::write(&ca, backend_cert.cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(backend_cert.signing_key.serialize_der().into());
    let (backend, _) = tls_backend_with("a-1", backend_cert.cert.der().clone(), key).await;
    let pop_dir = certs.path().join("pop");
    std::fs::create_dir(&pop_dir).unwrap();
    let pop_cert = write_pair(&pop_dir, "a", &["a.example.com"]);
    let config = |extra: &str| {
        format!(
            "{extra}\n[tls]\ncert_dir = {:?}\n[[listener]]\naddr = \"127.0.0.1:0\"\napp = \"a\"\ntls = \"terminate\"\nbackend_tls = true\nbackend_ca = {:?}\n",
            pop_dir.display().to_string(),
            ca.display().to_string()
        )
    };
    let greeting = |p: SocketAddr| {
        let pop_cert = pop_cert.clone();
        async move {
            let roots = std::slice::from_ref(&pop_cert);
            let greeting = tls_greeting(p, "a.example.com", &[], roots);
            tokio::time::timeout(WAIT, greeting).await
        }
    };
    let db = Db::new(&rows(&[("a-1", "a", backend)]));
    let p = Proxy::start(&db, &config("")).await;
    // The client sees the POP's certificate; the backend's greeting came over TLS (it
    // speaks nothing else): "-" is the ALPN it agreed with the POP, none.
    let answer = greeting(p.addr)
        .await
        .expect("a greeting: the backend answers only over TLS");
    assert_eq!(answer.unwrap(), "a-1 -");
    p.stop().await;

    // A backend that accepts and never answers its handshake: the client is closed after
    // the connect timeout, not held.
    let (silent, _held) = silent_backend().await;
    let db = Db::new(&rows(&[("a-1", "a", silent)]));
    let p = Proxy::start(&db, &config("connect_timeout_ms = 200")).await;
    let closed = greeting(p.addr)
        .await
        .expect("closed within the connect timeout, not held");
    assert!(closed.as_ref().map_or(true, |g| g.is_empty()), "{closed:?}");
}
