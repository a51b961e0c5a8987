//! The internal DNS server over real UDP and TCP sockets on loopback, with the embedded
//! WebAssembly policy deciding and the test GeoIP file locating clients.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::support::*;

const DNS: &str = "[dns]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"\n";

fn rows() -> Vec<Row<'static>> {
    let at = |s: &str| s.parse::<SocketAddr>().unwrap();
    vec![
        Row::new("br-1", "sa", "BR", at("10.1.0.1:7001")),
        Row::new("de-1", "eu", "DE", at("10.2.0.1:7002")),
        Row::new("us-1", "us", "US", at("10.3.0.1:7003")),
    ]
}

pub(crate) fn question(name: &str, rtype: RecordType, ecs: Option<&str>) -> Message {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(subnet) = ecs {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        let s: ClientSubnet = subnet.parse().unwrap();
        edns.options_mut().insert(EdnsOption::Subnet(s));
        m.set_edns(edns);
    }
    m
}

/// One query over UDP from `source`, its answer.
pub(crate) async fn ask(dns: SocketAddr, source: &str, m: &Message) -> Message {
    let sock = UdpSocket::bind((source.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    sock.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("a DNS answer")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

async fn ask_tcp(dns: SocketAddr, m: &Message) -> Message {
    let mut s = TcpStream::connect(dns).await.unwrap();
    let bytes = m.to_vec().unwrap();
    s.write_u16(bytes.len() as u16).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let len = s.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

pub(crate) fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn subnet(m: &Message) -> Option<ClientSubnet> {
    match m.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(s) => Some(*s),
        _ => None,
    }
}

#[tokio::test]
async fn app_names_answer_the_policys_pick_for_the_asking_clients_location() {
    let db = Db::new(&rows());
    let proxy = Proxy::start(&db, DNS).await;
    let dns = proxy.dns.unwrap();

    // By source address: Brazil, then Germany; the pick first, then one alternate.
    let a = ask(
        dns,
        "127.0.0.2",
        &question("app.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(addrs(&a).len(), 2, "{a:?}");
    assert_eq!(addrs(&a)[0], ip("10.1.0.1"));
    assert_eq!(a.answers[0].ttl, 10);
    let a = ask(
        dns,
        "127.0.0.6",
        &question("APP.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&a)[0], ip("10.2.0.1"));

    // By EDNS Client Subnet: the subnet decides, not the source, and the scope says the
    // answer holds for the whole subnet sent.
    let a = ask(
        dns,
        "127.0.0.2",
        &question("app.internal.", RecordType::A, Some("203.0.113.0/24")),
    )
    .await;
    assert_eq!(addrs(&a)[0], ip("10.2.0.1"));
    let s = subnet(&a).expect("ECS echoed");
    assert_eq!(
        (s.addr(), s.source_prefix(), s.scope_prefix()),
        (ip("203.0.113.0"), 24, 24)
    );
    let a = ask(
        dns,
        "127.0.0.6",
        &question("app.internal.", RecordType::A, Some("198.51.100.77/24")),
    )
    .await;
    assert_eq!(addrs(&a)[0], ip("10.1.0.1"));

    // A lookup makes no binding: the client's next connection is decided afresh.
    use edgeproxy::domain::ports::BindingRepository as _;
    assert_eq!(proxy.host.bindings.as_ref().unwrap().len(), 0);
    let metrics = http(proxy.admin, "GET", "/metrics", &[]).await.1;
    assert!(
        metrics.contains("edgeproxy_dns_queries_total{type=\"A\",rcode=\"NOERROR\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgeproxy_dns_answers_total{backend=\"br-1\",app=\"app\",region=\"sa\"}"),
        "{metrics}"
    );
    let status = admin_json(proxy.admin, "/status").await;
    assert_eq!(status["dns"]["domain"], "internal");
    assert_eq!(status["dns"]["queries"], 4);
    proxy.stop().await;
}

#[tokio::test]
async fn answers_follow_the_table_drained_and_down_backends_leave_at_the_next_lookup() {
    let db = Db::new(&rows());
    let proxy = Proxy::start(&db, &format!("{DNS}alternates = 5\n")).await;
    let dns = proxy.dns.unwrap();
    let q = question("app.internal.", RecordType::A, None);
    assert_eq!(addrs(&ask(dns, "127.0.0.2", &q).await).len(), 3);

    let v = proxy.version();
    db.exec("UPDATE backends SET healthy = 0 WHERE id = 'br-1'", []);
    proxy.wait_version_after(v).await;
    let a = ask(dns, "127.0.0.2", &q).await;
    assert!(!addrs(&a).contains(&ip("10.1.0.1")), "{a:?}");
    assert_eq!(addrs(&a).len(), 2);
    let sa = ask(
        dns,
        "127.0.0.2",
        &question("sa.backends.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(sa.metadata.response_code, ResponseCode::NoError);
    assert!(addrs(&sa).is_empty(), "a drained backend is in no answer");

    let v = proxy.version();
    db.exec("UPDATE backends SET deleted = 1 WHERE id != 'br-1'", []);
    proxy.wait_version_after(v).await;
    let a = ask(dns, "127.0.0.2", &q).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(addrs(&a).is_empty(), "{a:?}");
    assert!(
        matches!(a.authorities[0].data, RData::SOA(_)),
        "NODATA carries the SOA"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_zone_is_authoritative_and_refuses_other_names() {
    let db = Db::new(&rows());
    let proxy = Proxy::start(&db, DNS).await;
    let dns = proxy.dns.unwrap();
    let rcode = |m: &Message| m.metadata.response_code;

    let out = ask(
        dns,
        "127.0.0.2",
        &question("example.com.", RecordType::A, None),
    )
    .await;
    assert_eq!(rcode(&out), ResponseCode::Refused);
    assert!(out.answers.is_empty() && !out.metadata.authoritative);
    let none = ask(
        dns,
        "127.0.0.2",
        &question("nope.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(rcode(&none), ResponseCode::NXDomain);
    assert!(matches!(none.authorities[0].data, RData::SOA(_)));
    // The app has IPv4 backends only: the name exists, AAAA has no data.
    let v6 = ask(
        dns,
        "127.0.0.2",
        &question("app.internal.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(rcode(&v6), ResponseCode::NoError);
    assert!(v6.answers.is_empty());
    let soa = ask(
        dns,
        "127.0.0.2",
        &question("internal.", RecordType::SOA, None),
    )
    .await;
    let RData::SOA(s) = &soa.answers[0].data else {
        panic!("{soa:?}")
    };
    assert_eq!(u64::from(s.serial), proxy.version());
    let ns = ask(
        dns,
        "127.0.0.2",
        &question("internal.", RecordType::NS, None),
    )
    .await;
    assert!(matches!(ns.answers[0].data, RData::NS(_)), "{ns:?}");

    // SRV: ports and targets, the targets' addresses in the additional section.
    let srv = ask(
        dns,
        "127.0.0.6",
        &question("_app._tcp.internal.", RecordType::SRV, None),
    )
    .await;
    let RData::SRV(first) = &srv.answers[0].data else {
        panic!("{srv:?}")
    };
    assert_eq!((first.priority, first.port), (0, 7002));
    assert_eq!(first.target.to_ascii(), "de-1.app.internal.");
    assert!(
        srv.additionals
            .iter()
            .any(|r| matches!(&r.data, RData::A(a) if IpAddr::V4(a.0) == ip("10.2.0.1")))
    );
    let target = ask(
        dns,
        "127.0.0.6",
        &question("de-1.app.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&target), [ip("10.2.0.1")]);
    let region = ask(
        dns,
        "127.0.0.6",
        &question("us.backends.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&region), [ip("10.3.0.1")]);
    assert_eq!(
        rcode(
            &ask(
                dns,
                "127.0.0.6",
                &question("mars.backends.internal.", RecordType::A, None)
            )
            .await
        ),
        ResponseCode::NXDomain
    );
    // A lone POP is its region's only POP; the name server is where the DNS listens.
    let pops = ask(
        dns,
        "127.0.0.6",
        &question("eu.pops.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&pops), [ip("127.0.0.1")]);
    assert_eq!(
        addrs(&ask_tcp(dns, &question("ns.internal.", RecordType::A, None)).await),
        [ip("127.0.0.1")]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn bad_packets_get_formerr_or_nothing_and_the_server_keeps_answering() {
    let db = Db::new(&rows());
    let proxy = Proxy::start(&db, DNS).await;
    let dns = proxy.dns.unwrap();
    let sock = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let good = question("app.internal.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let mut response = good.clone();
    response[2] |= 0x80;
    let mut two = question("app.internal.", RecordType::A, None);
    two.add_query(Query::query(
        Name::from_ascii("x.internal.").unwrap(),
        RecordType::A,
    ));
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x42],
        good[..good.len() - 3].to_vec(), // cut short
        vec![0xff; 600],
        response, // a response is never answered (no loops between servers)
    ];
    for g in &garbage {
        sock.send_to(g, dns).await.unwrap();
    }
    // The cut-short query has a header: FORMERR with its id. Nothing else answers.
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let formerr = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(formerr.metadata.id, 0x4242);
    let two = ask(dns, "127.0.0.2", &two).await;
    assert_eq!(two.metadata.response_code, ResponseCode::FormErr);
    // Still serving, and nothing else came back on the first socket.
    let again = ask(
        dns,
        "127.0.0.2",
        &question("app.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&again)[0], ip("10.1.0.1"), "{again:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf))
            .await
            .is_err()
    );
    let status = admin_json(proxy.admin, "/status").await;
    assert!(
        status["dns"]["malformed"].as_u64().unwrap() >= 3,
        "{status}"
    );

    // A TCP client that sends half a message and goes quiet holds nothing for long, and
    // garbage over TCP ends that connection only.
    let mut quiet = TcpStream::connect(dns).await.unwrap();
    quiet.write_all(&[0, 40, 1, 2]).await.unwrap();
    let mut junk = TcpStream::connect(dns).await.unwrap();
    junk.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    let mut end = [0u8; 16];
    let n = tokio::time::timeout(WAIT, junk.read(&mut end))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    // From 127.0.0.1, a client of no known country: the POP's own region (eu).
    assert_eq!(
        addrs(&ask_tcp(dns, &question("app.internal.", RecordType::A, None)).await)[0],
        ip("10.2.0.1")
    );
    drop(quiet);
    proxy.stop().await;
}

#[tokio::test]
async fn an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() {
    let at = |i: u32| SocketAddr::from(([10, 9, (i / 200) as u8, (i % 200) as u8 + 1], 7000));
    let ids: Vec<String> = (0..120).map(|i| format!("big-{i:03}")).collect();
    let rows: Vec<Row<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Row::new(id, "eu", "DE", at(i as u32)))
        .collect();
    let db = Db::new(&rows);
    let proxy = Proxy::start(&db, DNS).await;
    let dns = proxy.dns.unwrap();
    let q = question("eu.backends.internal.", RecordType::A, None);
    let udp = ask(dns, "127.0.0.6", &q).await;
    assert!(
        udp.metadata.truncation,
        "120 A records do not fit 512 bytes"
    );
    assert!(udp.answers.is_empty());
    let tcp = ask_tcp(dns, &q).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(addrs(&tcp).len(), 120);
    proxy.stop().await;
}

#[tokio::test]
async fn a_flood_from_one_prefix_is_limited_while_another_client_is_answered() {
    let db = Db::new(&rows());
    let proxy = Proxy::start(&db, &format!("{DNS}rate_limit = 20\n")).await;
    let dns = proxy.dns.unwrap();
    let flood = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let q = question("app.internal.", RecordType::A, None)
        .to_vec()
        .unwrap();
    for _ in 0..500 {
        flood.send_to(&q, dns).await.unwrap();
    }
    // Whatever came back: at most the bucket answered in full, the rest at most half
    // (truncated, empty: the slip).
    let mut buf = vec![0u8; 2048];
    let (mut full, mut slipped) = (0, 0);
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(300), flood.recv_from(&mut buf)).await
    {
        let m = Message::from_vec(&buf[..n]).unwrap();
        match m.metadata.truncation {
            true => slipped += 1,
            false => full += 1,
        }
    }
    assert!(full <= 40, "{full} full answers");
    assert!(slipped > 0 && slipped <= 260, "{slipped}");
    // Another prefix (127.0.1.x is another /24) is answered meanwhile.
    let other = ask(
        dns,
        "127.0.1.9",
        &question("app.internal.", RecordType::A, None),
    )
    .await;
    assert!(!other.metadata.truncation && !addrs(&other).is_empty());
    let status = admin_json(proxy.admin, "/status").await;
    assert!(
        status["dns"]["rate_limited"]["dropped"].as_u64().unwrap() > 100,
        "{status}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn replies_keep_edns_and_the_front_name_is_its_own_zone() {
    let db = Db::new(&rows());
    let toml = format!("{DNS}front_name = \"edge.example.com\"\nfront_addrs = \"192.0.2.10\"\n");
    let proxy = Proxy::start(&db, &toml).await;
    let dns = proxy.dns.unwrap();
    let with_edns = |name: &str, rtype| question(name, rtype, Some("198.51.100.0/24"));

    // EDNS version 1: BADVERS, with an OPT of version 0.
    let mut v1 = with_edns("app.internal.", RecordType::A);
    let mut e = v1.edns.clone().unwrap();
    e.set_version(1);
    v1.set_edns(e);
    let bad = ask(dns, "127.0.0.2", &v1).await;
    // 16 is BADVERS in an answer to a query without TSIG (hickory reads it as BADSIG).
    assert_eq!(u16::from(bad.metadata.response_code), 16, "{bad:?}");
    assert_eq!(bad.edns.as_ref().map(Edns::version), Some(0));
    // A refusal still carries the OPT the query had.
    let refused = ask(dns, "127.0.0.2", &with_edns("example.com.", RecordType::A)).await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(refused.edns.is_some(), "{refused:?}");
    // One label that only looks like a name of ours is not one.
    let escaped = ask(
        dns,
        "127.0.0.2",
        &question("app\\.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(escaped.metadata.response_code, ResponseCode::Refused);

    // A lone POP is the front name's only POP; its negative answers and SOA are the front
    // name's own zone, not the internal domain's.
    let front = ask(
        dns,
        "127.0.0.2",
        &with_edns("edge.example.com.", RecordType::A),
    )
    .await;
    assert_eq!(addrs(&front), [ip("192.0.2.10")]);
    assert_eq!(subnet(&front).unwrap().scope_prefix(), 24);
    let v6 = ask(
        dns,
        "127.0.0.2",
        &question("edge.example.com.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(v6.metadata.response_code, ResponseCode::NoError);
    assert_eq!(v6.authorities[0].name.to_ascii(), "edge.example.com.");
    let soa = ask(
        dns,
        "127.0.0.2",
        &question("edge.example.com.", RecordType::SOA, None),
    )
    .await;
    assert_eq!(soa.answers[0].name.to_ascii(), "edge.example.com.");
    proxy.stop().await;
}

#[tokio::test]
async fn one_client_prefix_cannot_hold_every_tcp_slot() {
    let db = Db::new(&rows());
    let proxy = Proxy::start(&db, DNS).await;
    let dns = proxy.dns.unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(TcpStream::connect(dns).await.unwrap());
    }
    // The 17th from the same /24 is closed at once; another prefix still gets in.
    let mut extra = TcpStream::connect(dns).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(WAIT, extra.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let mut other = connect_from(ip("127.0.1.3"), dns).await;
    let mut framed = question("app.internal.", RecordType::A, None)
        .to_vec()
        .unwrap();
    framed.splice(0..0, (framed.len() as u16).to_be_bytes());
    other.write_all(&framed).await.unwrap();
    let len = other.read_u16().await.unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    other.read_exact(&mut reply).await.unwrap();
    assert!(!addrs(&Message::from_vec(&reply).unwrap()).is_empty());
    // Held connections still answer.
    let first = &mut held[0];
    first.write_all(&framed).await.unwrap();
    assert!(first.read_u16().await.unwrap() > 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_backend_this_pops_checks_find_down_leaves_the_answers() {
    let (up_1, up_2) = (Backend::start("up-1").await, Backend::start("up-2").await);
    let down = refusing_addr().await;
    let db = Db::new(&[
        Row::new("up-1", "eu", "DE", up_1.addr),
        Row::new("up-2", "eu", "DE", up_2.addr),
        Row::new("down-1", "eu", "DE", down),
    ]);
    let toml = format!(
        "{DNS}alternates = 5\n[health_check]\nenabled = true\ninterval_secs = 0.1\ntimeout_secs = 0.5\nfall = 1\n"
    );
    let proxy = Proxy::start(&db, &toml).await;
    let dns = proxy.dns.unwrap();
    wait_backend(proxy.admin, "down-1", |b| b["up_here"] == false).await;
    let srv = ask(
        dns,
        "127.0.0.6",
        &question("_app._tcp.internal.", RecordType::SRV, None),
    )
    .await;
    let targets: Vec<String> = srv
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.target.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(targets.len(), 2, "{targets:?}");
    assert!(targets.iter().all(|t| t.starts_with("up-")), "{targets:?}");
    let one = ask(
        dns,
        "127.0.0.6",
        &question("down-1.app.internal.", RecordType::A, None),
    )
    .await;
    assert!(addrs(&one).is_empty(), "{one:?}");
    proxy.stop().await;
}

/// A policy of the ranking world answers the pick and its alternates in one call, with
/// the budgets of as many picks; one that ranks a backend twice, or whose pick is out of
/// range, is a fault, and the native scorer answers instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policys_ranking_answers_in_one_call_and_a_bad_ranking_is_answered_natively() {
    let at = |s: &str| s.parse::<SocketAddr>().unwrap();
    let mut rows = rows();
    for app in ["rank-twice", "garbage", "log-some"] {
        for (id, region, country, addr) in [
            ("br", "sa", "BR", "10.1.0.2:7001"),
            ("de", "eu", "DE", "10.2.0.2:7002"),
        ] {
            let id = format!("{id}-{app}").leak();
            let mut row = Row::new(id, region, country, at(addr));
            row.app = app;
            rows.push(row);
        }
    }
    let db = Db::new(&rows);
    let policy = chaos_component();
    let config = format!("policy_path = {:?}\n{DNS}", policy.display().to_string());
    let proxy = Proxy::start(&db, &config).await;
    let dns = proxy.dns.unwrap();
    let faults = || {
        let f = proxy.host.admin.status().policy.faults;
        f.traps + f.bad_answers
    };

    // The chaos policy picks the last eligible backend: its ranking is the ids backwards,
    // wherever the client is.
    let a = ask(
        dns,
        "127.0.0.2",
        &question("app.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&a), [ip("10.3.0.1"), ip("10.2.0.1")], "{a:?}");
    assert_eq!(faults(), 0);

    // Logging 6 KiB a pick, two picks in one ranking: within its budget, no fault.
    let a = ask(
        dns,
        "127.0.0.2",
        &question("log-some.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&a), [ip("10.2.0.2"), ip("10.1.0.2")], "{a:?}");
    assert_eq!(faults(), 0);

    // Ranked twice, or a pick out of range: a fault each, and Brazil's client gets the
    // native scorer's ranking.
    for (app, n) in [("rank-twice", 1), ("garbage", 2)] {
        let name = format!("{app}.internal.");
        let a = ask(dns, "127.0.0.2", &question(&name, RecordType::A, None)).await;
        assert_eq!(addrs(&a), [ip("10.1.0.2"), ip("10.2.0.2")], "{app}: {a:?}");
        assert_eq!(faults(), n, "{app}");
    }
    proxy.stop().await;
}
