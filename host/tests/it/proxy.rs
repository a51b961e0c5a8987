//! End-to-end behaviour of one POP: real sockets on 127.0.0.1, real SQLite files, generated
//! GeoIP files. Clients in different countries are loopback source addresses that the test
//! GeoIP file places (see `support::TEST_GEO`), or PROXY protocol headers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use edgeproxy::config::ListenerConfig;
use edgeproxy::domain::ports::{BindingKey, BindingRepository, PickRequest};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

on_both_data_paths! {
#[tokio::test]
async fn geo_preference_country_then_region_then_pop_region() {
    let br = Backend::start("br").await;
    let ar = Backend::start("ar").await;
    let de = Backend::start("de").await;
    let jp = Backend::start("jp").await;
    let db = Db::new(&[
        Row::new("br", "sa", "BR", br.addr),
        Row::new("ar", "sa", "AR", ar.addr),
        Row::new("de", "eu", "DE", de.addr),
        Row::new("jp", "ap", "JP", jp.addr),
    ]);
    // POP region "eu"; bindings off so every connection is a fresh decision.
    let p = Proxy::start(&db, "binding_ttl_secs = 0").await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "br"); // BR client: same country
    assert_eq!(served_by("127.0.0.3", p.addr).await, "ar"); // CL: same region (tie -> smaller id)
    assert_eq!(served_by("127.0.0.4", p.addr).await, "de"); // KE (region us, none): POP region
    assert_eq!(served_by("127.0.0.5", p.addr).await, "jp"); // JP: same country
    assert_eq!(served_by("127.0.0.1", p.addr).await, "de"); // unknown: POP region
    p.stop().await;
}
}

#[tokio::test]
async fn maxmind_city_format_is_understood() {
    let br = Backend::start("br").await;
    let de = Backend::start("de").await;
    let db = Db::new(&[
        Row::new("br", "sa", "BR", br.addr),
        Row::new("de", "eu", "DE", de.addr),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let geo = dir.path().join("GeoLite2-Country.mmdb");
    write_mmdb(&geo, GeoFormat::MaxMind, &[("127.0.0.2/32", "BR")]);
    let p = Proxy::start(
        &db,
        &format!("geoip_path = {:?}", geo.display().to_string()),
    )
    .await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "br");
    assert_eq!(served_by("127.0.0.6", p.addr).await, "de"); // not in this file: POP region
    p.stop().await;
}

#[tokio::test]
async fn load_spreads_by_soft_limit_and_weight() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut ra = Row::new("a", "sa", "BR", a.addr);
    let mut rb = Row::new("b", "sa", "BR", b.addr);
    ra.soft_limit = 10;
    rb.soft_limit = 10;
    rb.weight = 3;
    let db = Db::new(&[ra, rb]);
    let p = Proxy::start(&db, "binding_ttl_secs = 0").await;
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(open("127.0.0.2", p.addr).await);
    }
    let on_a = held.iter().filter(|(n, _)| n == "a").count();
    // Lowest (active/soft_limit)/weight each time: 40 connections settle at 10 vs 30.
    assert_eq!((on_a, held.len() - on_a), (10, 30));
    assert_eq!(p.active(), 40);
    drop(held);
    assert_eq!(p.stop().await.cut_off, 0);
}

on_both_data_paths! {
#[tokio::test]
async fn hard_limit_is_never_exceeded() {
    let near = Backend::start("near").await;
    let far = Backend::start("far").await;
    let mut r = Row::new("near", "sa", "BR", near.addr);
    r.hard_limit = 2;
    let db = Db::new(&[r, Row::new("far", "ap", "JP", far.addr)]);
    let p = Proxy::start(&db, "binding_ttl_secs = 0").await;
    let c1 = open("127.0.0.2", p.addr).await;
    let c2 = open("127.0.0.2", p.addr).await;
    let c3 = open("127.0.0.2", p.addr).await;
    assert_eq!([&c1.0, &c2.0, &c3.0], ["near", "near", "far"]);
    drop(c1);
    // With the far one gone and near full, the connection is refused.
    db.exec("UPDATE backends SET deleted = 1 WHERE id = 'far'", []);
    let v = p.version();
    p.wait_version_after(v).await;
    // c1's slot frees when the proxy sees its close; wait for that readiness.
    let stats = p.host.routing.current().candidates(None)[0].stats.clone();
    tokio::time::timeout(WAIT, async {
        while stats.active() != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let c4 = open("127.0.0.2", p.addr).await;
    assert_eq!(c4.0, "near");
    assert!(refused("127.0.0.2", p.addr).await);
    drop((c2, c3, c4));
    p.stop().await;
}
}

on_both_data_paths! {
#[tokio::test]
async fn bindings_stick_until_the_backend_becomes_unhealthy() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "").await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a");
    // A better backend appears (same country, smaller id, no load): the client stays.
    let v = p.version();
    db.insert(&Row::new("0-better", "sa", "BR", b.addr));
    p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a");
    // A new client goes to the better one.
    assert_eq!(served_by("127.0.0.3", p.addr).await, "b");
    // Its bound backend turns unhealthy: binding dropped, re-picked.
    let v = p.version();
    db.exec("UPDATE backends SET healthy = 0 WHERE id = 'a'", []);
    p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "b");
    let bindings = p.host.bindings.as_ref().unwrap();
    let key = BindingKey {
        client: "127.0.0.2".parse().unwrap(),
        app: None,
    };
    assert_eq!(
        bindings
            .get(&key, tokio::time::Instant::now())
            .unwrap()
            .as_str(),
        "0-better"
    );
    p.stop().await;
}
}

#[tokio::test(start_paused = true)]
async fn binding_holds_until_ttl_then_repicks() {
    let db = Db::new(&[Row::new("a", "sa", "BR", "127.0.0.1:1".parse().unwrap())]);
    let p = Proxy::start(&db, "binding_ttl_secs = 60").await;
    let svc = &p.host.service;
    let client = svc.locate("127.0.0.2".parse().unwrap(), false);
    let key = BindingKey {
        client: client.ip,
        app: None,
    };
    let region = edgeproxy::domain::Region::new("eu");
    let pick = |table: &edgeproxy::domain::RoutingTable| {
        let req = PickRequest {
            table,
            pop_region: &region,
            app: None,
            client: &client,
        };
        let c = table.candidates(None);
        c[svc.choose(&req, &key, c).unwrap()].backend.id.to_string()
    };
    assert_eq!(pick(&p.host.routing.current()), "a");
    db.insert(&Row::new(
        "0-better",
        "sa",
        "BR",
        "127.0.0.1:2".parse().unwrap(),
    ));
    p.host.routing.reload().await.unwrap();
    let table = p.host.routing.current();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(pick(&table), "a"); // refreshed at t=59
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(pick(&table), "a"); // refreshed at t=118
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(pick(&table), "0-better"); // expired: re-picked
}

on_both_data_paths! {
#[tokio::test]
async fn failover_when_a_backend_refuses() {
    let alive = Backend::start("alive").await;
    let dead = refusing_addr().await;
    let db = Db::new(&[
        Row::new("dead", "sa", "BR", dead),
        Row::new("alive", "eu", "DE", alive.addr),
    ]);
    let p = Proxy::start(&db, "").await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "alive");
    let dead_stats = p.stats("dead");
    assert_eq!(dead_stats.connect_failures(), 1);
    assert_eq!(dead_stats.active(), 0);
    // The binding went to the backend that answered, so the dead one is not retried.
    assert_eq!(served_by("127.0.0.2", p.addr).await, "alive");
    assert_eq!(dead_stats.connect_failures(), 1);
    p.stop().await;
}
}

on_both_data_paths! {
#[tokio::test]
async fn every_backend_refusing_closes_the_client_only() {
    let db = Db::new(&[Row::new("dead", "sa", "BR", refusing_addr().await)]);
    let p = Proxy::start(&db, "connect_attempts = 2").await;
    assert!(refused("127.0.0.2", p.addr).await);
    assert!(refused("127.0.0.2", p.addr).await);
    assert_eq!(p.active(), 0);
    assert_eq!(p.stop().await.cut_off, 0);
}
}

#[tokio::test]
async fn db_edits_are_picked_up_without_restart() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let db = Db::new(&[]);
    let p = Proxy::start(&db, "").await;
    assert!(refused("127.0.0.2", p.addr).await); // empty table
    let v = p.version();
    db.insert(&Row::new("a", "eu", "DE", a.addr));
    p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a");
    // Replacing the whole file (atomic rename) is seen too.
    let other = Db::new(&[Row::new("b", "eu", "DE", b.addr)]);
    let v = p.version();
    std::fs::rename(&other.path, &db.path).unwrap();
    p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.4", p.addr).await, "b");
    p.stop().await;
}

#[tokio::test]
async fn corrupt_or_wrong_db_keeps_the_last_good_table() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "eu", "DE", a.addr)]);
    let p = Proxy::start(&db, "").await;
    let v = p.version();
    // Garbage in place of the database.
    let garbage = db.dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    std::fs::rename(&garbage, &db.path).unwrap();
    let err = p.host.routing.reload().await.unwrap_err();
    assert!(err.to_string().contains("routing.db"), "{err}");
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a");
    // A database without the backends table.
    std::fs::remove_file(&db.path).unwrap();
    rusqlite::Connection::open(&db.path)
        .unwrap()
        .execute_batch("CREATE TABLE other (x)")
        .unwrap();
    let err = p.host.routing.reload().await.unwrap_err().to_string();
    assert!(err.contains("wrong schema"), "{err}");
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a");
    assert_eq!(p.version(), v);
    p.stop().await;
}

#[tokio::test]
async fn bad_rows_are_skipped_and_the_rest_loads() {
    let a = Backend::start("a").await;
    let db = Db::new(&[]);
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    conn.execute_batch(
        "DROP TABLE backends;
         CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT, region TEXT, country TEXT, wg_ip TEXT,
           port INTEGER, healthy INTEGER, weight INTEGER, soft_limit INTEGER, hard_limit INTEGER, deleted INTEGER DEFAULT 0);
         INSERT INTO backends VALUES ('broken', 'app', 'sa', NULL, '127.0.0.1', 1, 1, 1, 1, 0, 0);",
    )
    .unwrap();
    db.insert(&Row::new("a", "sa", "BR", a.addr));
    let p = Proxy::start(&db, "").await;
    assert_eq!(p.host.routing.current().backends().len(), 1);
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a");
    p.stop().await;
}

on_both_data_paths! {
#[tokio::test]
async fn half_close_still_delivers_the_reply() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "").await;
    let mut s = connect_from("127.0.0.2".parse().unwrap(), p.addr).await;
    s.write_all(b"request body").await.unwrap();
    s.shutdown().await.unwrap(); // our write side is done; the read side stays open
    let mut reply = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "a\nrequest body");
    p.stop().await;
}
}

on_both_data_paths! {
#[tokio::test]
async fn apps_are_served_by_their_own_listener() {
    let web = Backend::start("web").await;
    let api = Backend::start("api").await;
    let mut rw = Row::new("web-1", "sa", "BR", web.addr);
    rw.app = "web";
    let mut ra = Row::new("api-1", "sa", "BR", api.addr);
    ra.app = "api";
    let db = Db::new(&[rw, ra]);
    let lc = |app: &str| ListenerConfig {
        app: Some(app.into()),
        ..ListenerConfig::plain("127.0.0.1:0".parse().unwrap())
    };
    let p_api = Proxy::start_with(
        &db,
        ProxyOptions {
            listener: Some(lc("api")),
            ..Default::default()
        },
    )
    .await;
    let p_web = Proxy::start_with(
        &db,
        ProxyOptions {
            listener: Some(lc("web")),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(served_by("127.0.0.2", p_api.addr).await, "api");
    assert_eq!(served_by("127.0.0.2", p_web.addr).await, "web");
    p_api.stop().await;
    p_web.stop().await;
}
}

fn proxy_listener(trusted: &str) -> ProxyOptions {
    ProxyOptions {
        listener: Some(ListenerConfig {
            proxy_protocol: true,
            trusted_proxies: vec![trusted.parse().unwrap()],
            ..ListenerConfig::plain("127.0.0.1:0".parse().unwrap())
        }),
        ..Default::default()
    }
}

on_both_data_paths! {
#[tokio::test]
async fn proxy_protocol_from_trusted_sources_sets_the_client() {
    let br = Backend::start("br").await;
    let de = Backend::start("de").await;
    let jp = Backend::start("jp").await;
    let db = Db::new(&[
        Row::new("br", "sa", "BR", br.addr),
        Row::new("de", "eu", "DE", de.addr),
        Row::new("jp", "ap", "JP", jp.addr),
    ]);
    let p = Proxy::start_with(&db, proxy_listener("127.0.0.1/32")).await;

    // v1, with payload in the same segment as the header.
    let mut s = connect_from("127.0.0.1".parse().unwrap(), p.addr).await;
    s.write_all(b"PROXY TCP4 198.51.100.7 10.0.0.1 5555 80\r\nhello")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "br\nhello");

    // v2.
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "203.0.113.9:4000".parse::<std::net::SocketAddr>().unwrap(),
            "10.0.0.1:80".parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap();
    let mut s = connect_from("127.0.0.1".parse().unwrap(), p.addr).await;
    s.write_all(&header).await.unwrap();
    let (name, conn) = greeted(s).await;
    assert_eq!(name, "de");
    drop(conn);

    // The binding belongs to the PROXY client, not the load balancer's address.
    let bindings = p.host.bindings.as_ref().unwrap();
    let key = BindingKey {
        client: "203.0.113.9".parse().unwrap(),
        app: None,
    };
    assert!(bindings.get(&key, tokio::time::Instant::now()).is_some());

    // A malformed header closes that connection only; the listener goes on.
    let mut bad = connect_from("127.0.0.1".parse().unwrap(), p.addr).await;
    bad.write_all(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, bad.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(buf.is_empty());
    let mut s = connect_from("127.0.0.1".parse().unwrap(), p.addr).await;
    s.write_all(b"PROXY TCP4 198.51.100.7 10.0.0.1 5555 80\r\n")
        .await
        .unwrap();
    assert_eq!(greeted(s).await.0, "br");
    p.stop().await;
}
}

on_both_data_paths! {
#[tokio::test]
async fn proxy_protocol_from_untrusted_sources_is_not_honoured() {
    let br = Backend::start("br").await;
    let de = Backend::start("de").await;
    let db = Db::new(&[
        Row::new("br", "sa", "BR", br.addr),
        Row::new("de", "eu", "DE", de.addr),
    ]);
    let p = Proxy::start_with(&db, proxy_listener("10.0.0.0/8")).await;
    // 127.0.0.6 is DE in the test file; the header claims a BR client and must not count.
    let mut s = connect_from("127.0.0.6".parse().unwrap(), p.addr).await;
    s.write_all(b"PROXY TCP4 198.51.100.7 10.0.0.1 5555 80\r\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).await.unwrap();
    // Routed by the socket's address, and the bytes reach the backend untouched.
    assert_eq!(got, "de\nPROXY TCP4 198.51.100.7 10.0.0.1 5555 80\r\n");
    p.stop().await;
}
}

on_both_data_paths! {
#[tokio::test]
async fn shutdown_drains_open_connections() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "drain_timeout_secs = 30").await;
    let (_, mut conn) = open("127.0.0.2", p.addr).await;
    p.shutdown.cancel();
    // The listener closes: new clients are refused by the kernel.
    tokio::time::timeout(WAIT, async {
        while tokio::net::TcpStream::connect(p.addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    // The open connection still works, and the drain ends when it closes.
    conn.get_mut().write_all(b"still here").await.unwrap();
    conn.get_mut().shutdown().await.unwrap();
    let mut rest = String::new();
    conn.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "still here");
    let drained = tokio::time::timeout(WAIT, p.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(drained.cut_off, 0);
}
}

on_both_data_paths! {
#[tokio::test]
async fn drain_timeout_cuts_off_what_is_left() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "drain_timeout_secs = 0").await;
    let (_, mut conn) = open("127.0.0.2", p.addr).await;
    let host = Arc::clone(&p.host);
    assert_eq!(p.stop().await.cut_off, 1);
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest).await; // EOF or reset, not a hang
    assert_eq!(host.metrics.total_active(), 0);
}
}

on_both_data_paths! {
#[tokio::test]
async fn idle_connections_are_closed() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "idle_timeout_secs = 1").await;
    let (_, mut conn) = open("127.0.0.2", p.addr).await;
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("idle close");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(p.stop().await.cut_off, 0);
}
}

on_both_data_paths! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_return_to_zero_after_a_burst_of_1000() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dead = refusing_addr().await;
    let db = Db::new(&[
        Row::new("a", "sa", "BR", a.addr),
        Row::new("b", "sa", "BR", b.addr),
        Row::new("c-dead", "sa", "BR", dead),
    ]);
    let p = Proxy::start(&db, "binding_ttl_secs = 0").await;
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let addr = p.addr;
        tasks.spawn(async move {
            let _permit = permit;
            let src = format!("127.0.0.{}", 2 + i % 5);
            served_by(&src, addr).await
        });
    }
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        assert!(["a", "b"].contains(&r.unwrap().as_str()));
        served += 1;
    }
    assert_eq!(served, 1000);
    assert_eq!(a.accepted() + b.accepted(), 1000);
    let host = Arc::clone(&p.host);
    assert_eq!(p.stop().await.cut_off, 0);
    for rb in host.routing.current().backends() {
        assert_eq!(rb.stats.active(), 0, "{}", rb.backend.id);
    }
}
}

on_both_data_paths! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfers_arrive_intact_both_ways() {
    // Large enough that both directions switch to splice (on Linux) after the first reads.
    const LEN: usize = 8 << 20;
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "").await;
    let s = connect_from("127.0.0.2".parse().unwrap(), p.addr).await;
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(LEN + 2);
    tokio::time::timeout(WAIT, r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(&got[..2], b"a\n");
    assert!(got[2..] == data[..], "echoed bytes differ");
    assert_eq!(p.stop().await.cut_off, 0);
}
}

on_both_data_paths! {
/// edgeProxy's `EDGEPROXY_RATE_LIMIT_*`: a client over its new-connection rate or its open
/// connections is refused at once, before any decision; other clients, and exempt ones,
/// are served; a listener's own limits apply to the address a trusted PROXY header gives.
#[tokio::test]
async fn per_client_limits_refuse_one_client_and_serve_the_others() {
    let b = Backend::start("b").await;
    let db = Db::new(&[Row::new("b", "eu", "DE", b.addr)]);
    let p = Proxy::start(
        &db,
        "[rate_limit]\nenabled = true\nmax_requests = 5\nwindow_secs = 60\nmax_open = 3\n\
         exempt = \"127.0.0.7/32\"\n",
    )
    .await;
    // Three held open, the fourth refused: its open connections.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open("127.0.0.2", p.addr).await);
    }
    assert!(refused("127.0.0.2", p.addr).await);
    drop(held);
    let telemetry = p.host.telemetry.clone();
    wait_until(|| telemetry.listeners()[0].active() == 0).await;
    // Five new connections a minute: the first two went above, three more, then refused.
    for _ in 0..2 {
        assert_eq!(served_by("127.0.0.2", p.addr).await, "b");
    }
    assert!(refused("127.0.0.2", p.addr).await);
    // Another client, and an exempt one however often it comes, are served.
    assert_eq!(served_by("127.0.0.3", p.addr).await, "b");
    for _ in 0..20 {
        assert_eq!(served_by("127.0.0.7", p.addr).await, "b");
    }
    let metrics = send(p.admin, "GET", "/metrics", &[], "").await.1;
    let listener = p.addr.to_string();
    for (reason, n) in [("rate", 1), ("open", 1)] {
        let line = format!(
            "edgeproxy_connections_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    assert!(
        metrics.contains("edgeproxy_client_limit_tracked{"),
        "{metrics}"
    );
    p.stop().await;

    // A listener's own limit, with the POP's off, on the client a trusted proxy names.
    let mut opts = proxy_listener("127.0.0.1/32");
    if let Some(l) = &mut opts.listener {
        l.rate_limit_max_open = Some(1);
    }
    let p = Proxy::start_with(&db, opts).await;
    let via_proxy = |client: &'static str| async move {
        let mut s = connect_from("127.0.0.1".parse().unwrap(), p.addr).await;
        s.write_all(format!("PROXY TCP4 {client} 10.0.0.1 5555 80\r\n").as_bytes())
            .await
            .unwrap();
        s
    };
    let (first, held) = greeted(via_proxy("198.51.100.7").await).await;
    assert_eq!(first, "b");
    let mut second = via_proxy("198.51.100.7").await;
    let mut got = Vec::new();
    second.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty(), "a second connection of one client: {got:?}");
    let (other, _) = greeted(via_proxy("203.0.113.9").await).await;
    assert_eq!(other, "b", "another client behind the same proxy");
    drop(held);
    p.stop().await;
}
}

on_both_data_paths! {
/// HAProxy's `send-proxy`: the backend reads the client's address first, then the
/// client's bytes unchanged.
#[tokio::test]
async fn backends_get_a_proxy_header_before_the_clients_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                let (mut header, mut rest) = (String::new(), String::new());
                r.read_line(&mut header).await.unwrap();
                r.read_line(&mut rest).await.unwrap();
                let answer = format!("{}|{rest}", header.trim_end());
                r.into_inner().write_all(answer.as_bytes()).await.unwrap();
            });
        }
    });
    let db = Db::new(&[Row::new("a", "sa", "BR", backend)]);
    let toml = "[[listener]]\naddr = \"127.0.0.1:0\"\nsend_proxy_protocol = \"v1\"\n";
    let p = Proxy::start(&db, toml).await;
    let mut s = connect_from("127.0.0.2".parse().unwrap(), p.addr).await;
    let port = s.local_addr().unwrap().port();
    s.write_all(b"hello\n").await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(WAIT, BufReader::new(&mut s).read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let want = format!("PROXY TCP4 127.0.0.2 127.0.0.1 {port} {}|hello\n", p.addr.port());
    assert_eq!(line, want);
    drop(s);
    p.stop().await;
}
}

on_both_data_paths! {
/// A backend that never completes the handshake (its accept queue is full, so the
/// kernel drops the SYNs) costs the client `connect_timeout_ms`, then the next backend
/// serves it; the stuck one's failure is counted.
#[tokio::test]
async fn a_backend_that_never_answers_the_handshake_times_out_and_fails_over() {
    let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    stuck.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    stuck.listen(0).unwrap();
    let stuck_addr = stuck.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue until a connect hangs: that one's SYN was dropped.
    let mut fillers = Vec::new();
    loop {
        let attempt = tokio::net::TcpStream::connect(stuck_addr);
        match tokio::time::timeout(Duration::from_millis(300), attempt).await {
            Ok(s) => fillers.push(s.unwrap()),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    let b = Backend::start("b").await;
    // The client is in Brazil: the stuck backend is its first choice.
    let db = Db::new(&[
        Row::new("stuck", "sa", "BR", stuck_addr),
        Row::new("b", "eu", "DE", b.addr),
    ]);
    let p = Proxy::start(&db, "connect_timeout_ms = 300\nbinding_ttl_secs = 0").await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "b");
    assert_eq!(p.stats("stuck").connect_failures(), 1);
    assert_eq!(p.stats("b").connect_failures(), 0);
    p.stop().await;
}
}
