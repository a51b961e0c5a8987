//! Defects found by review (issue 10), each with the test that showed it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// A backend that records how many connections it held at once.
struct Counting {
    addr: std::net::SocketAddr,
    max_open: Arc<AtomicUsize>,
}

async fn counting_backend() -> Counting {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (open, max_open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let max = max_open.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(now, Ordering::SeqCst);
            let open = open.clone();
            tokio::spawn(async move {
                let _ = sock.write_all(b"x").await;
                let mut rest = Vec::new();
                let _ = sock.read_to_end(&mut rest).await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Counting { addr, max_open }
}

on_both_data_paths! {
/// 200 clients at once through 4 accept loops on 4 worker threads: a backend with
/// `hard_limit` 2 never holds more than 2 of them. The race this guards against (two
/// threads see one free slot and both take it) has a window of a few instructions here;
/// `BackendStats::try_acquire`'s unit test shows the check-then-add pattern failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hard_limit_holds_under_simultaneous_clients() {
    let backend = counting_backend().await;
    let mut row = Row::new("only", "sa", "BR", backend.addr);
    row.hard_limit = 2;
    let db = Db::new(&[row]);
    let p = Proxy::start_with(
        &db,
        ProxyOptions {
            file: edgeproxy::config::Layer::from_toml("binding_ttl_secs = 0").unwrap(),
            listener: None,
            listener_copies: 4,
            ..ProxyOptions::default()
        },
    )
    .await;
    let release = Arc::new(tokio::sync::Notify::new());
    let (served, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let (release, addr) = (release.clone(), p.addr);
            let (served, answered) = (served.clone(), answered.clone());
            tokio::spawn(async move {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut b = [0u8; 1];
                if let Ok(Ok(1)) = tokio::time::timeout(WAIT, c.read(&mut b)).await {
                    served.fetch_add(1, Ordering::SeqCst);
                }
                answered.fetch_add(1, Ordering::SeqCst);
                release.notified().await;
            })
        })
        .collect();
    // Every client has its answer (a byte, or the close of a refused connection).
    wait_until(|| answered.load(Ordering::SeqCst) == 200).await;
    release.notify_waiters();
    for c in clients {
        let _ = c.await;
    }
    assert!(
        backend.max_open.load(Ordering::SeqCst) <= 2,
        "the backend held {} connections at once",
        backend.max_open.load(Ordering::SeqCst)
    );
    assert!(served.load(Ordering::SeqCst) >= 2);
    p.stop().await;
}
}

on_both_data_paths! {
/// Many small exchanges in both directions on 4 worker threads, each bounded in time: a
/// direction whose wake-up was lost would hang its exchange. The race the relay guards
/// against (an event arriving between a short read and the readiness clear) is a window
/// of a few instructions, so this is a guard, not a reproduction: with readiness cleared
/// from a snapshot taken after the read it passed here too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_exchanges_on_many_threads_never_stall() {
    let backend = Backend::start("echo").await;
    let db = Db::new(&[Row::new("echo", "sa", "BR", backend.addr)]);
    let p = Proxy::start_with(
        &db,
        ProxyOptions {
            file: edgeproxy::config::Layer::from_toml("binding_ttl_secs = 0").unwrap(),
            listener_copies: 4,
            ..ProxyOptions::default()
        },
    )
    .await;
    let clients: Vec<_> = (0..48)
        .map(|c| {
            let addr = p.addr;
            tokio::spawn(async move {
                let (_, mut conn) = open("127.0.0.2", addr).await;
                let mut back = [0u8; 200];
                for round in 0..200usize {
                    let len = 1 + (round * 7 + c) % 150;
                    let msg: Vec<u8> = (0..len).map(|i| (i + round) as u8).collect();
                    conn.get_mut().write_all(&msg).await.unwrap();
                    tokio::time::timeout(WAIT, conn.read_exact(&mut back[..len]))
                        .await
                        .unwrap_or_else(|_| panic!("client {c} stalled in round {round}"))
                        .unwrap();
                    assert_eq!(back[..len], msg[..]);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    p.stop().await;
}
}

on_both_data_paths! {
/// A backend that answers part of a response and then resets: the client sees the reset
/// too, not a FIN that would make the truncated answer look complete.
#[tokio::test]
async fn a_backend_reset_reaches_the_client_as_a_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        sock.write_all(b"partial\n").await.unwrap();
        // Wait for the client's request, then abort.
        let mut b = [0u8; 1];
        let _ = sock.read(&mut b).await;
        socket2::SockRef::from(&sock)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(sock);
    });
    let db = Db::new(&[Row::new("resets", "sa", "BR", addr)]);
    let p = Proxy::start(&db, "").await;
    let (greeting, mut conn) = open("127.0.0.2", p.addr).await;
    assert_eq!(greeting, "partial");
    conn.get_mut().write_all(b"?").await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the client");
    let err = end.expect_err("a clean end (FIN) after the backend's reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    p.stop().await;
}
}

on_both_data_paths! {
/// The idle timeout aborts: the client sees a reset, not a FIN.
#[tokio::test]
async fn the_idle_timeout_resets_the_client() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "idle_timeout_secs = 1").await;
    let (_, mut conn) = open("127.0.0.2", p.addr).await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("idle close");
    assert_eq!(
        end.expect_err("a FIN after the idle timeout").kind(),
        std::io::ErrorKind::ConnectionReset
    );
    p.stop().await;
}
}

on_both_data_paths! {
/// At `max_connections` accepting pauses (once, not in a loop) and resumes when a
/// connection closes; the client waiting meanwhile is served then.
#[tokio::test]
async fn accepting_pauses_at_max_connections() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "max_connections = 2\nbinding_ttl_secs = 0").await;
    let first = open("127.0.0.2", p.addr).await;
    let second = open("127.0.0.2", p.addr).await;
    let slots = p.host.telemetry.slots.clone().unwrap();
    let pauses = || slots.pauses.load(Ordering::Relaxed);
    wait_until(|| pauses() >= 1).await;
    // The third client waits in the backlog, not accepted, until a slot frees.
    let third = tokio::spawn(greeted(
        connect_from("127.0.0.2".parse().unwrap(), p.addr).await,
    ));
    drop(first);
    let (name, third) = tokio::time::timeout(WAIT, third).await.unwrap().unwrap();
    assert_eq!(name, "a");
    // One pause per time the cap was reached, not a spinning loop.
    assert!(pauses() <= 2, "{} pauses", pauses());
    let scraped = crate::admin::scrape(p.admin).await;
    assert_eq!(
        crate::admin::value(&scraped, "edgeproxy_connections_limit", &[]),
        2.0
    );
    assert!(crate::admin::value(&scraped, "edgeproxy_accept_pauses_total", &[]) >= 1.0);
    drop((second, third));
    p.stop().await;
}
}

on_both_data_paths! {
/// A client that stops reading while its backend streams: the relay holds one buffer or
/// pipe, the socket buffers fill, nothing moves, and the idle timeout ends it.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_by_the_idle_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streamed = Arc::new(AtomicUsize::new(0));
    let counted = streamed.clone();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        sock.write_all(b"stream\n").await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while sock.write_all(&chunk).await.is_ok() {
            counted.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    });
    let db = Db::new(&[Row::new("stream", "sa", "BR", addr)]);
    let p = Proxy::start(&db, "idle_timeout_secs = 1").await;
    let (_, conn) = open("127.0.0.2", p.addr).await;
    // The proxy's connection ends (the backend sees its write fail) while the client
    // still reads nothing.
    wait_until(|| p.active() == 0).await;
    let held = streamed.load(Ordering::Relaxed);
    assert!(held < 64 << 20, "{held} bytes were taken from the backend");
    drop(conn);
    p.stop().await;
}
}

/// During a drain the admin API and `/metrics` still answer, and `abort` (a second
/// SIGTERM/SIGINT) ends the drain at once instead of after its timeout.
#[tokio::test]
async fn metrics_answer_during_the_drain_and_a_second_signal_ends_it() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "drain_timeout_secs = 3600").await;
    let (_, _held) = open("127.0.0.2", p.addr).await;
    p.shutdown.cancel();
    // The drain has begun once the listener is gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(p.addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::task::yield_now().await;
    }
    let scraped = crate::admin::scrape(p.admin).await;
    assert!(!scraped.samples.is_empty());
    p.host.abort.cancel();
    assert_eq!(p.stop().await.cut_off, 1);
}

/// A policy that traps on every call is suspended after a few faults: the native scorer
/// decides the rest without paying for a fresh instance per connection, and `/status`
/// and `/metrics` say so.
#[tokio::test]
async fn a_policy_that_always_faults_is_suspended() {
    let a = Backend::start("a").await;
    let mut row = Row::new("a", "sa", "BR", a.addr);
    row.app = "trap";
    let db = Db::new(&[row]);
    let p = Proxy::start_with(
        &db,
        ProxyOptions {
            file: edgeproxy::config::Layer::from_toml(&format!(
                "binding_ttl_secs = 0\npolicy_path = {:?}",
                chaos_component().display().to_string()
            ))
            .unwrap(),
            listener: Some(edgeproxy::config::ListenerConfig {
                app: Some("trap".into()),
                ..edgeproxy::config::ListenerConfig::plain("127.0.0.1:0".parse().unwrap())
            }),
            ..ProxyOptions::default()
        },
    )
    .await;
    let connections = 3 * edgeproxy::domain::breaker::TRIP as u64;
    for _ in 0..connections {
        assert_eq!(served_by("127.0.0.2", p.addr).await, "a");
    }
    let wasm = p.host.wasm_policy.clone().unwrap();
    let traps = wasm.faults.traps.load(Ordering::Relaxed);
    let suspended = wasm.suspended_decisions.load(Ordering::Relaxed);
    assert!(
        traps < connections,
        "{traps} of {connections} calls trapped"
    );
    assert_eq!(traps + suspended, connections);
    let scraped = crate::admin::scrape(p.admin).await;
    assert!(crate::admin::value(&scraped, "edgeproxy_policy_suspensions_total", &[]) >= 1.0);
    p.stop().await;
}

/// `POST /reload` of a policy file that has not changed does not compile it again; a
/// changed file is compiled once, whether the watcher or the API gets to it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_an_unchanged_policy_file_does_not_recompile_it() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let policy = db.dir.path().join("policy.wasm");
    std::fs::copy(chaos_component(), &policy).unwrap();
    let p = Proxy::start(
        &db,
        &format!("policy_path = {:?}", policy.display().to_string()),
    )
    .await;
    let wasm = p.host.wasm_policy.clone().unwrap();
    let loads = || wasm.file_loads.load(Ordering::Relaxed);
    for _ in 0..3 {
        let (code, body) = http(p.admin, "POST", "/reload", &[]).await;
        assert_eq!(code, 200, "{body}");
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(report["policy"], "unchanged", "{body}");
    }
    assert_eq!(loads(), 0);
    // A new version (the default policy's bytes), then the API and the watcher race.
    let mut events = wasm.reload_events();
    let next = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/geo-load/geo-load.wasm"
    ))
    .unwrap();
    std::fs::write(&policy, next).unwrap();
    let _ = http(p.admin, "POST", "/reload", &[]).await;
    tokio::time::timeout(WAIT, events.changed())
        .await
        .unwrap()
        .unwrap();
    let _ = http(p.admin, "POST", "/reload", &[]).await;
    assert_eq!(loads(), 1);
    assert!(wasm.current().name.ends_with("policy.wasm"));
    assert_eq!(wasm.reloads.load(Ordering::Relaxed), 1);
    p.stop().await;
}

/// A reload that empties (or nearly empties) a populated table still applies (operators
/// do drain everything), but is reported loudly and counted.
#[tokio::test]
async fn a_reload_that_drops_most_backends_is_counted() {
    let a = Backend::start("a").await;
    let rows: Vec<Row<'_>> = ["a1", "a2", "a3", "a4"]
        .into_iter()
        .map(|id| Row::new(id, "sa", "BR", a.addr))
        .collect();
    let db = Db::new(&rows);
    let p = Proxy::start(&db, "").await;
    // One of four removed: ordinary.
    let v = p.version();
    db.exec("UPDATE backends SET deleted = 1 WHERE id = 'a1'", []);
    let v = p.wait_version_after(v).await;
    assert_eq!(p.host.routing.mass_drops.load(Ordering::Relaxed), 0);
    // The other three at once: 100% of what was there.
    db.exec("DELETE FROM backends", []);
    p.wait_version_after(v).await;
    assert_eq!(p.host.routing.current().backends().len(), 0);
    assert_eq!(p.host.routing.mass_drops.load(Ordering::Relaxed), 1);
    let scraped = crate::admin::scrape(p.admin).await;
    assert_eq!(
        crate::admin::value(&scraped, "edgeproxy_routing_mass_drops_total", &[]),
        1.0
    );
    p.stop().await;
}

/// Bindings are capped: clients past `max_bindings` evict the least recently used.
#[tokio::test]
async fn the_binding_table_is_capped() {
    let a = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "sa", "BR", a.addr)]);
    let p = Proxy::start(&db, "max_bindings = 16").await;
    for i in 2..=41 {
        assert_eq!(served_by(&format!("127.0.0.{i}"), p.addr).await, "a");
    }
    let scraped = crate::admin::scrape(p.admin).await;
    let held = crate::admin::value(&scraped, "edgeproxy_bindings", &[]);
    let evicted = crate::admin::value(&scraped, "edgeproxy_bindings_evicted_total", &[]);
    assert!(held <= 16.0, "{held}");
    assert_eq!(held + evicted, 40.0);
    p.stop().await;
}

/// Whether the server closed `s` within `within` (a read sees EOF or a reset), without
/// reading anything it sent.
async fn closed_within(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(within, s.peek(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Hostile clients of the admin and registration listeners: thousands of idle
/// connections, one that pipelines requests and never reads, a body that stalls, one that
/// is slow but moves, garbage and oversized requests. Each listener keeps answering other
/// clients, and the data path serves a steady client throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_clients_are_bounded_and_cost_the_data_path_nothing() {
    use edgeproxy::adapters::inbound::http::{MAX_CONNECTIONS, MAX_PER_CLIENT};
    use std::net::IpAddr;
    use std::time::Duration;
    #[cfg(target_os = "linux")]
    let _ = edgeproxy::adapters::net::raise_fd_limit();
    let b = Backend::start("b").await;
    let db = Db::new(&[Row::new("b", "eu", "DE", b.addr)]);
    let p = Proxy::start(
        &db,
        "http_idle_timeout_secs = 1\nmetrics_listen_addr = \"127.0.0.1:0\"\n[api]\nenabled = true\ntoken = \"t0ken\"\nallowed_networks = \"127.0.0.0/8\"\n",
    )
    .await;
    let api = p.api.unwrap();
    let steady_stop = tokio_util::sync::CancellationToken::new();
    let steady = {
        let (stop, addr) = (steady_stop.clone(), p.addr);
        tokio::spawn(async move {
            let mut served = 0u64;
            while !stop.is_cancelled() {
                assert_eq!(served_by("127.0.0.9", addr).await, "b");
                served += 1;
            }
            served
        })
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();

    let metrics = p.metrics.expect("the metrics-only listener");
    for (listener, ok_path) in [
        (p.admin, "/status"),
        (api, "/health"),
        (metrics, "/metrics"),
    ] {
        // 5,000 connections from 1,000 addresses (fewer where the descriptor limit
        // cannot hold them and the proxy's): a few from each are held, the rest closed
        // at once, and never more than the listener's cap in all.
        let fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let n = 5000u32.min((fds.saturating_sub(1000) / 2) as u32);
        assert!(
            n as usize > MAX_CONNECTIONS,
            "a descriptor limit of {fds} is too low"
        );
        let mut held = Vec::new();
        for i in 0..n {
            // The first hundred from one address, the rest over a thousand.
            let source = match i < 100 {
                true => ip("127.0.99.1"),
                false => ip(&format!("127.0.{}.{}", 1 + i / 5 / 200, 1 + i / 5 % 200)),
            };
            let connect = connect_from(source, listener);
            if let Ok(s) = tokio::time::timeout(Duration::from_secs(2), connect).await {
                held.push((source, s));
            }
        }
        // Each looked at once, all at the same time.
        let looks: Vec<_> = held
            .into_iter()
            .map(|(source, mut s)| {
                tokio::spawn(async move {
                    let open = !closed_within(&mut s, Duration::from_millis(50)).await;
                    (source, s, open)
                })
            })
            .collect();
        let mut held = Vec::new();
        let mut open_by_ip = std::collections::HashMap::<IpAddr, usize>::new();
        let mut open = 0;
        for look in looks {
            let (source, s, is_open) = look.await.unwrap();
            if is_open {
                open += 1;
                *open_by_ip.entry(source).or_default() += 1;
            }
            held.push((source, s));
        }
        assert!(open <= MAX_CONNECTIONS, "{listener}: {open} held");
        assert!(open_by_ip.values().all(|n| *n <= MAX_PER_CLIENT));
        // Idle ones are closed after the idle timeout.
        for (_, s) in &mut held {
            assert!(
                closed_within(s, Duration::from_secs(5)).await,
                "{listener}: an idle connection stays"
            );
        }
        drop(held);
        // Then the listener answers again.
        let (code, _) = send(
            listener,
            "GET",
            ok_path,
            &["Authorization: bearer t0ken"],
            "",
        )
        .await;
        assert_eq!(code, 200, "{listener}: the token scheme in lower case");
        // Pipelined requests never read: the server stops reading, then closes.
        let mut s = connect_from(ip("127.1.0.1"), listener).await;
        let requests = format!("GET {ok_path} HTTP/1.1\r\nHost: x\r\n\r\n").repeat(2000);
        let write = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                s.write_all(requests.as_bytes()).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        })
        .await;
        assert!(
            matches!(write, Ok(Err(_))),
            "{listener}: a non-reader held: {write:?}"
        );
        // Garbage, and a header past hyper's limits: refused, the listener goes on.
        for junk in [
            "\x16\x03\x01garbage\r\n\r\n".to_owned(),
            // Past hyper's 408 KiB read buffer (a 200 KB one fits, and `/` is the status
            // page, open to all).
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(500_000)),
        ] {
            let mut s = connect_from(ip("127.1.0.2"), listener).await;
            let _ = s.write_all(junk.as_bytes()).await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
                "{answer}"
            );
        }
        let (code, _) = send(
            listener,
            "GET",
            ok_path,
            &["Authorization: Bearer t0ken"],
            "",
        )
        .await;
        assert_eq!(code, 200);
    }

    // A body that stalls is refused within the idle timeout; a slow one that moves is read.
    let body = registration("slow", "app", b.addr);
    let head = format!(
        "POST /api/v1/register HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = connect_from(ip("127.1.0.3"), api).await;
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..10]).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let mut s = connect_from(ip("127.1.0.3"), api).await;
    s.write_all(head.as_bytes()).await.unwrap();
    let (first, rest) = body.as_bytes().split_at(body.len() - 8);
    s.write_all(first).await.unwrap();
    for byte in rest {
        // Three idle timeouts in all, never one without a byte.
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(&[*byte]).await.unwrap();
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    steady_stop.cancel();
    let served = steady.await.unwrap();
    eprintln!("steady client: {served} connections served meanwhile");
    assert!(served > 10, "{served}");
    p.stop().await;
}
