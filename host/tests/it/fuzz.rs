//! Bounded fuzzing of every input that comes from outside: arbitrary and mutated bytes
//! must be rejected with an error or handled, never crash the host. A run here tries a
//! few hundred inputs per target; `PROPTEST_CASES=100000 cargo test -p edgeproxy --test it
//! fuzz::` is the longer run (docs/RELIABILITY.md records one).

use std::net::IpAddr;
use std::sync::OnceLock;

use edgeproxy::adapters::inbound::proxy_protocol;
use edgeproxy::adapters::inbound::tls_hello::Parser;
use edgeproxy::adapters::outbound::maxmind_geo::MaxMindGeo;
use edgeproxy::adapters::outbound::sqlite_editor::RoutingEditor;
use edgeproxy::adapters::outbound::wasm_policy::LoadedPolicy;
use edgeproxy::adapters::outbound::wasm_policy::runtime::{Limits, Runtime};
use edgeproxy::config::{Config, Layer};
use edgeproxy::domain::ports::GeoResolver;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        // Failures are reported with their input; nothing is written to the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `base` with up to 8 bytes overwritten, and sometimes cut short or extended.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len().max(1);
    (
        proptest::collection::vec((0..len, any::<u8>()), 1..8),
        // Mostly whole, so mutations reach past the first checks a truncation fails.
        prop_oneof![4 => Just(len), 1 => 0..len],
        proptest::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(flips, cut, extra)| {
            let mut b = base.clone();
            for (at, v) in flips {
                if let Some(x) = b.get_mut(at) {
                    *x = v;
                }
            }
            b.truncate(cut.max(1));
            b.extend(extra);
            b
        })
}

fn v2_header() -> Vec<u8> {
    use ppp::v2;
    let src: std::net::SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
    let dst: std::net::SocketAddr = "[2001:db8::1]:80".parse().unwrap();
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn proxy_headers_never_crash(bytes in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        mutated(b"PROXY TCP4 200.147.3.157 10.0.0.1 5000 80\r\nhello".to_vec()),
        mutated(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 80\r\n".to_vec()),
        mutated(v2_header()),
    ]) {
        if let Ok(Some(h)) = proxy_protocol::parse(&bytes) {
            prop_assert!(bytes.ends_with(&h.rest));
        }
    }

    #[test]
    fn config_files_never_crash(text in prop_oneof![
        ".{0,200}",
        mutated(include_bytes!("../../../examples/edgeproxy.toml").to_vec())
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]) {
        if let Ok(file) = Layer::from_toml(&text) {
            let _ = Config::resolve(file, Layer::default(), Layer::default());
        }
    }
}

/// The ClientHellos real clients sent (OpenSSL, curl), kept as the fuzzing corpus
/// (`fuzz/`), and one of rustls's.
fn client_hellos() -> &'static [Vec<u8>] {
    static HELLOS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    HELLOS.get_or_init(|| {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/client_hello");
        let mut hellos: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        hellos.push(crate::tls::client_hello("a.example.com"));
        hellos
    })
}

#[test]
fn every_client_hello_of_the_corpus_is_read() {
    for hello in client_hellos() {
        let read = Parser::default().feed(hello);
        assert!(
            matches!(read, Ok(Some(_))),
            "{read:?} for {} bytes",
            hello.len()
        );
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// Any bytes, arriving split anywhere: a hello, a need for more, or a refusal.
    #[test]
    fn client_hellos_never_crash(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            (0..4usize).prop_flat_map(|i| mutated(client_hellos()[i % client_hellos().len()].clone())),
        ],
        split in any::<usize>(),
    ) {
        let mut p = Parser::default();
        let cut = split % (bytes.len() + 1);
        if let Ok(None) = p.feed(&bytes[..cut])
            && let Ok(Some(hello)) = p.feed(&bytes)
        {
            prop_assert!(hello.alpn.len() <= 8);
            if let Some(sni) = hello.sni {
                prop_assert_eq!(sni.to_string(), sni.to_ascii_lowercase());
            }
        }
    }
}

/// A small valid GeoIP database, the base the mutations start from.
fn small_mmdb() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.mmdb");
        write_mmdb(&path, GeoFormat::MaxMind, TEST_GEO);
        std::fs::read(path).unwrap()
    })
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn geoip_files_never_crash(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            mutated(small_mmdb().to_vec()),
        ],
        ips in proptest::collection::vec(any::<[u8; 16]>(), 8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzzed.mmdb");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(geo) = MaxMindGeo::open(&path) {
            for ip in ips {
                let _ = geo.country(IpAddr::from(ip));
                let _ = geo.country(IpAddr::from([ip[0], ip[1], ip[2], ip[3]]));
            }
        }
    }

    #[test]
    fn routing_imports_never_crash(
        text in prop_oneof![
            ".{0,200}",
            mutated(b"id,app,region,country,wg_ip,port\nb1,web,eu,DE,10.0.0.1,80\n".to_vec())
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            mutated(b"INSERT INTO backends (id, app, region, country, wg_ip, port) VALUES ('b', 'web', 'eu', 'DE', '10.0.0.1', 80);".to_vec())
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ],
        csv in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(if csv { "in.csv" } else { "in.sql" });
        std::fs::write(&file, &text).unwrap();
        let (mut editor, _) = RoutingEditor::init(&dir.path().join("r.db")).unwrap();
        let _ = editor.import(&file);
        // Whatever happened, the table still reads as the proxy would read it.
        prop_assert!(editor.list(None, true).is_ok());
    }
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::new(Limits::default()).unwrap())
}

proptest! {
    #![proptest_config(config(48))]

    /// Random and mutated components are rejected or, if they still load, contained by
    /// the sandbox; loading never takes the host down.
    #[test]
    fn policy_components_never_crash(bytes in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        mutated(std::fs::read(chaos_component()).unwrap()),
    ]) {
        let _ = LoadedPolicy::load(runtime(), "fuzzed", &bytes);
    }
}

/// Arbitrary bytes on the admin listener: each connection is answered or closed, and the
/// API keeps answering.
#[tokio::test]
async fn admin_requests_never_crash() {
    let db = Db::new(&[]);
    let p = Proxy::start(&db, "").await;
    let mut runner = proptest::test_runner::TestRunner::new(config(200));
    let strategy = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..400),
        mutated(b"GET /bindings?offset=0&limit=10 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        mutated(
            b"DELETE /bindings/127.0.0.2 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec()
        ),
    ];
    for _ in 0..runner.config().cases {
        let bytes = strategy.new_tree(&mut runner).unwrap().current();
        let mut c = tokio::net::TcpStream::connect(p.admin).await.unwrap();
        let _ = c.write_all(&bytes).await;
        let _ = c.shutdown().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut answer))
            .await
            .expect("an answer or a close");
    }
    let (code, _) = http(p.admin, "GET", "/status", &[]).await;
    assert_eq!(code, 200);
    p.stop().await;
}
