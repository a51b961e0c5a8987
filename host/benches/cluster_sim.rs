//! The cluster at sizes one machine cannot run as processes: N nodes in this process on the
//! in-memory network, each with real foca, the real merge code and its own SQLite file.
//! For each N: time for membership to form, for one write to reach every node, and for a
//! 10,000-row import at one node to reach every node; then idle cost per node.
//!
//!     cargo bench -p edgeproxy --bench cluster_sim            # N = 5, 50, 200
//!     SIM_NODES=5,20 SIM_IMPORT=1000 cargo bench -p edgeproxy --bench cluster_sim
//!
//! Intervals are the defaults (gossip 1 s, sync 2 s). Prints a markdown table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgeproxy::adapters::cluster::transport::MemoryNetwork;
use edgeproxy::adapters::cluster::{Cluster, Node};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const GIVE_UP: Duration = Duration::from_secs(300);

fn addr(i: usize, port: u16) -> SocketAddr {
    SocketAddr::from(([10, 8, (i / 250) as u8, (i % 250) as u8 + 1], port))
}

/// Process CPU seconds (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

async fn wait(what: &str, started: Instant, cond: impl Fn() -> bool) -> Option<Duration> {
    while !cond() {
        if started.elapsed() > GIVE_UP {
            eprintln!("{what}: not reached within {GIVE_UP:?}");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(started.elapsed())
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("did not converge".into(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

async fn run(n: usize, import: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let net = MemoryNetwork::new();
    let stop = CancellationToken::new();
    let mut nodes = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let node = Node {
            name: format!("n{i}"),
            gossip: addr(i, 4001),
            transport: addr(i, 4002),
            seeds: if i == 0 {
                vec![]
            } else {
                vec![addr(0, 4001).to_string()]
            },
            gossip_interval: Duration::from_millis(1000),
            sync_interval: Duration::from_millis(2000),
            tombstone_ttl: Duration::from_secs(7 * 86_400),
            purge_every: Duration::from_secs(3600),
            wall: edgeproxy::adapters::outbound::sqlite_replica::system_clock(),
        };
        let db = dir.path().join(format!("n{i}.db"));
        let (c, _) = Cluster::in_memory(&net, node, &db, stop.clone()).unwrap();
        nodes.push((c, db));
    }
    let nodes = Arc::new(nodes);
    let all_see = |want: usize| {
        let nodes = nodes.clone();
        move || {
            nodes.iter().all(|(c, _)| {
                c.status()
                    .members
                    .iter()
                    .filter(|m| m.state == "alive")
                    .count()
                    == want
            })
        }
    };
    let formed = wait("membership", started, all_see(n - 1)).await;

    let converged = |rows: usize| {
        let nodes = nodes.clone();
        move || {
            let first = nodes[0].0.status();
            first.rows == rows && nodes.iter().all(|(c, _)| c.status().digest == first.digest)
        }
    };
    let t = Instant::now();
    rusqlite::Connection::open(&nodes[n / 2].1)
        .unwrap()
        .execute(
            "INSERT INTO backends VALUES ('one','web','eu','DE','10.0.0.1',80,1,1,10,0,0)",
            [],
        )
        .unwrap();
    let one = wait("one write", t, converged(1)).await;

    let t = Instant::now();
    {
        let mut conn = rusqlite::Connection::open(&nodes[0].1).unwrap();
        let tx = conn.transaction().unwrap();
        for k in 0..import {
            tx.execute(
                "INSERT INTO backends VALUES (?1,'web','eu','DE','10.0.0.1',?2,1,1,10,0,0)",
                rusqlite::params![format!("bulk-{k}"), 1 + (k % 60_000) as i64],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let bulk = wait("bulk import", t, converged(1 + import)).await;

    // Idle: what membership and anti-entropy cost when nothing changes (after two sync
    // intervals, so rounds begun before convergence have ended).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let bytes = |nodes: &[(Cluster, std::path::PathBuf)]| {
        let rows: u64 = nodes
            .iter()
            .map(|(c, _)| {
                let s = c.status();
                s.bytes_in + s.bytes_out
            })
            .sum::<u64>()
            / 2;
        rows + net.datagram_bytes.load(Ordering::Relaxed)
    };
    let (b0, c0, t0) = (bytes(&nodes), cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = t0.elapsed().as_secs_f64();
    let per_node_bps = (bytes(&nodes) - b0) as f64 / idle / n as f64;
    let cpu_per_node = (cpu_seconds() - c0) / idle / n as f64 * 100.0;
    stop.cancel();
    format!(
        "| {n} | {} | {} | {} | {:.0} B/s | {:.2}% |",
        secs(formed),
        secs(one),
        secs(bulk),
        per_node_bps,
        cpu_per_node
    )
}

fn main() {
    let sizes: Vec<usize> = std::env::var("SIM_NODES")
        .unwrap_or_else(|_| "5,50,200".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let import: usize = std::env::var("SIM_IMPORT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| nodes | membership formed | one write everywhere | {import}-row import everywhere | idle traffic per node (SWIM + sync) | idle CPU per node (of one core) |"
    );
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        println!("{}", rt.block_on(run(n, import)));
    }
}
