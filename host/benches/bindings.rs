//! How cost grows with sticky bindings (issue 14). For 10,000, 100,000 and 1,000,000
//! clients:
//! - held: heap bytes per binding (a counting allocator);
//! - sweep: one GC sweep over the table when nothing has expired (the common case: it
//!   only reads) and when half has;
//! - latency: connections through a real proxy in this process (one worker thread, as
//!   benchmarked against nginx) holding 1,000,000 bindings, a 64-byte echo each, opened
//!   at a fixed rate from addresses across 127.0.0.0/8, while the GC sweeps every
//!   `SWEEP_EVERY`: p99 of the connections that overlapped a sweep against those that
//!   did not. The load is open (a stalled proxy makes connections late, not fewer).
//!
//! Run:
//!
//!     cargo bench -p edgeproxy --bench bindings      # markdown, and target/bindings.csv

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use edgeproxy::Host;
use edgeproxy::adapters::outbound::binding_table::BindingTable;
use edgeproxy::adapters::outbound::sqlite_routing::SqliteBackendRepository;
use edgeproxy::application::bindings_gc;
use edgeproxy::config::{Config, Layer};
use edgeproxy::domain::BackendId;
use edgeproxy::domain::ports::{BindingKey, BindingRepository};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[path = "support/counting.rs"]
mod counting;

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
const TTL: Duration = Duration::from_secs(600);
/// Connections per second while latency is measured, and for how long per phase.
const RATE: u64 = 1_000;
const PHASE: Duration = Duration::from_secs(8);
/// Far more often than the default 60 s, so a phase sees many sweeps.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Client `i`, a distinct address per binding (10.0.0.0/8, not used by the load).
fn key(i: usize) -> BindingKey {
    BindingKey {
        client: IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 + i as u32)),
        app: None,
    }
}

fn fill(t: &BindingTable, n: usize, now: Instant, expiring_half: bool) {
    let backend = BackendId::new("b1");
    for i in 0..n {
        // With `expiring_half`, every other binding was made half a TTL earlier.
        let at = if expiring_half && i % 2 == 1 {
            now - TTL / 2
        } else {
            now
        };
        t.put(key(i), backend.clone(), at);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut csv = String::from("bindings,bytes_per_binding,sweep_none_ms,sweep_half_ms\n");
    println!(
        "| bindings | held (bytes/binding) | sweep, none expired (ms) | sweep, half expired (ms) |"
    );
    println!("|---|---|---|---|");
    for n in SIZES {
        let now = Instant::now();
        let before = counting::live();
        let t = BindingTable::with_cap(TTL, 0);
        fill(&t, n, now, false);
        let held = (counting::live() - before) as f64 / n as f64;
        let sweeps: Vec<Duration> = (0..3)
            .map(|_| {
                let s = Instant::now();
                assert_eq!(t.purge_expired(now + TTL / 2), 0);
                s.elapsed()
            })
            .collect();
        let none = *sweeps.iter().min().unwrap();
        drop(t);
        let t = BindingTable::with_cap(TTL, 0);
        fill(&t, n, now, true);
        let s = Instant::now();
        assert_eq!(t.purge_expired(now + TTL * 3 / 4), n / 2);
        let half = s.elapsed();
        println!("| {n} | {held:.0} | {:.2} | {:.2} |", ms(none), ms(half));
        csv += &format!("{n},{held:.1},{:.3},{:.3}\n", ms(none), ms(half));
    }
    drop(_guard);

    let r = latency_phase(1_000_000);
    println!(
        "\nconnections at {RATE}/s for {PHASE:?} through a proxy holding 1,000,000 bindings, swept every {SWEEP_EVERY:?} ({} sweeps, median {:.1} ms):\n",
        r.sweeps, r.sweep_ms
    );
    println!("| connections | count | p50 (us) | p99 (us) | p99.9 (us) | max (us) |");
    println!("|---|---|---|---|---|---|");
    let mut latency_csv = String::from("during_sweep,count,p50_us,p99_us,p999_us,max_us\n");
    for (label, during, lat) in [
        ("not during a sweep", 0, &r.clear),
        ("during a sweep", 1, &r.during),
    ] {
        let q = quantiles(lat);
        println!(
            "| {label} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            lat.len(),
            q[0],
            q[1],
            q[2],
            q[3]
        );
        latency_csv += &format!(
            "{during},{},{:.0},{:.0},{:.0},{:.0}\n",
            lat.len(),
            q[0],
            q[1],
            q[2],
            q[3]
        );
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::write(out.join("bindings.csv"), csv).unwrap();
    std::fs::write(out.join("bindings-latency.csv"), latency_csv).unwrap();
}

struct Phase {
    /// Latencies (us) of connections that overlapped a sweep, and of the rest.
    during: Vec<f64>,
    clear: Vec<f64>,
    sweeps: usize,
    sweep_ms: f64,
}

/// p50, p99, p99.9 and max of `lat`.
fn quantiles(lat: &[f64]) -> [f64; 4] {
    let mut l = lat.to_vec();
    l.sort_by(f64::total_cmp);
    let at = |q: f64| {
        l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    [
        at(0.5),
        at(0.99),
        at(0.999),
        l.last().copied().unwrap_or(f64::NAN),
    ]
}

/// A proxy holding `n` bindings, on a runtime of one worker thread; the load and the echo
/// backend on their own threads.
fn latency_phase(n: usize) -> Phase {
    let dir = tempfile::tempdir().unwrap();
    let backend_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let backend = backend_rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let stop = CancellationToken::new();
    let echo_thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            backend_rt.block_on(async move {
                loop {
                    let (mut s, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        a = backend.accept() => a.unwrap(),
                    };
                    tokio::spawn(async move {
                        let mut buf = [0u8; 64];
                        while let Ok(k) = s.read(&mut buf).await {
                            if k == 0 || s.write_all(&buf[..k]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            })
        })
    };

    let db = dir.path().join("routing.db");
    let repo = SqliteBackendRepository::new(&db);
    repo.create_if_missing().unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "INSERT INTO backends VALUES ('b1', 'app', 'eu', 'DE', '127.0.0.1', ?1, 1, 1, 100000, 0, 0)",
            [backend_addr.port()],
        )
        .unwrap();

    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let file = Layer::default()
        .with("db_path", db.display().to_string())
        .with("region", "eu")
        .with("listen_addr", "127.0.0.1:0")
        .with("max_bindings", 4_000_000)
        // The bench sweeps itself, so it knows when.
        .with("binding_gc_interval_secs", 86_400);
    let config = Config::resolve(file, Layer::default(), Layer::default()).unwrap();
    let host = Arc::new(proxy_rt.block_on(Host::build(&config)).unwrap());
    let bindings = host.bindings.clone().expect("bindings are on");
    let _guard = proxy_rt.enter();
    fill(&bindings, n, Instant::now(), false);
    let listener =
        edgeproxy::adapters::inbound::tcp_server::bind("127.0.0.1:0".parse().unwrap(), 0).unwrap();
    let addr = listener[0].local_addr().unwrap();
    let lc = edgeproxy::config::ListenerConfig {
        addr,
        ..config.listeners[0].clone()
    };
    let shutdown = CancellationToken::new();
    let served = {
        let (host, shutdown) = (host.clone(), shutdown.clone());
        let sockets = edgeproxy::Sockets {
            listeners: listener.into_iter().map(|l| (l, lc.clone())).collect(),
            ..Default::default()
        };
        proxy_rt.spawn(async move { host.run(sockets, shutdown).await })
    };
    let done = Arc::new(AtomicBool::new(false));
    // The GC task's own sweep, on the proxy's runtime as the GC task runs it, timed.
    let sweeper = {
        let (bindings, done) = (bindings.clone() as Arc<dyn BindingRepository>, done.clone());
        proxy_rt.spawn(async move {
            let mut windows = Vec::new();
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let s = Instant::now();
                bindings_gc::sweep(&bindings).await;
                windows.push((s, Instant::now()));
            }
            windows
        })
    };

    // The load: open-loop, from a new source address each time (a binding miss, then a
    // put), as clients arriving at an edge POP.
    let load_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lat: Vec<(Instant, Instant)> = load_rt.block_on(async move {
        let start = Instant::now();
        let total = RATE * PHASE.as_secs();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..total {
            tokio::time::sleep_until(start + Duration::from_micros(i * 1_000_000 / RATE)).await;
            tasks.spawn(async move {
                let began = Instant::now();
                let src = Ipv4Addr::from_bits(0x7f00_0000 + 2 + (i as u32 % 60_000) * 256);
                let sock = TcpSocket::new_v4().unwrap();
                sock.bind(SocketAddr::new(src.into(), 0)).unwrap();
                let mut s = sock.connect(addr).await.unwrap();
                s.write_all(&[7u8; 64]).await.unwrap();
                let mut buf = [0u8; 64];
                s.read_exact(&mut buf).await.unwrap();
                (began, Instant::now())
            });
        }
        let mut lat = Vec::new();
        while let Some(l) = tasks.join_next().await {
            lat.push(l.unwrap());
        }
        lat
    });
    done.store(true, Ordering::Relaxed);
    let windows = proxy_rt.block_on(sweeper).unwrap();
    shutdown.cancel();
    proxy_rt.block_on(served).unwrap().unwrap();
    stop.cancel();
    echo_thread.join().unwrap();

    let (mut during, mut clear) = (Vec::new(), Vec::new());
    for (began, ended) in lat {
        let us = (ended - began).as_secs_f64() * 1e6;
        match windows.iter().any(|&(s, e)| began < e && s < ended) {
            true => during.push(us),
            false => clear.push(us),
        }
    }
    let mut took: Vec<Duration> = windows.iter().map(|(s, e)| *e - *s).collect();
    took.sort();
    Phase {
        during,
        clear,
        sweeps: took.len(),
        sweep_ms: ms(took[took.len() / 2]),
    }
}
