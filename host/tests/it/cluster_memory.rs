//! The cluster in one process over the in-memory network: real foca, real merge, real
//! routing files, and faults the test decides (partitions, loss, crashes), so the
//! scenarios are the same on every run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use edgeproxy::adapters::cluster::transport::{MemoryNetwork, MemoryTransport};
use edgeproxy::adapters::cluster::{Cluster, Node};
use tokio_util::sync::CancellationToken;

const CONVERGE: Duration = Duration::from_secs(20);

struct SimNode {
    /// None once crashed: its tasks then let go of its files.
    cluster: Option<Cluster>,
    transport: Arc<MemoryTransport>,
    db: PathBuf,
    addrs: Vec<SocketAddr>,
    stop: CancellationToken,
}

struct Sim {
    net: Arc<MemoryNetwork>,
    dir: tempfile::TempDir,
    nodes: Vec<SimNode>,
    /// How far the simulated wall clock is ahead of the real one (ms): the test moves it.
    time: Arc<AtomicI64>,
    /// Each node's own clock error (ms), from its next start.
    skew: HashMap<usize, i64>,
    tombstone_ttl: Duration,
}

fn gossip_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 9, (i / 250) as u8, (i % 250) as u8 + 1], 4001))
}

impl Sim {
    fn new(n: usize) -> Self {
        Self::with(n, Duration::from_secs(3600))
    }

    /// `n` nodes keeping tombstones for `tombstone_ttl` of simulated time.
    fn with(n: usize, tombstone_ttl: Duration) -> Self {
        let mut sim = Self {
            net: MemoryNetwork::new(),
            dir: tempfile::tempdir().unwrap(),
            nodes: Vec::new(),
            time: Arc::default(),
            skew: HashMap::new(),
            tombstone_ttl,
        };
        for i in 0..n {
            sim.start(i, &[0]);
        }
        sim
    }

    /// Starts (or restarts, on its database) node `i`, joining through `seeds`.
    fn start(&mut self, i: usize, seeds: &[usize]) {
        let gossip = gossip_addr(i);
        let transport = SocketAddr::new(gossip.ip(), 4002);
        let node = Node {
            name: format!("n{i}"),
            gossip,
            transport,
            seeds: seeds
                .iter()
                .filter(|s| **s != i)
                .map(|s| gossip_addr(*s).to_string())
                .collect(),
            gossip_interval: Duration::from_millis(100),
            sync_interval: Duration::from_millis(200),
            tombstone_ttl: self.tombstone_ttl,
            purge_every: Duration::from_millis(50),
            wall: {
                let (time, skew) = (self.time.clone(), self.skew.get(&i).copied().unwrap_or(0));
                Arc::new(move || {
                    let real = edgeproxy::adapters::outbound::sqlite_replica::wall_ms() as i64;
                    (real + time.load(Ordering::SeqCst) + skew).max(0) as u64
                })
            },
        };
        let db = self.dir.path().join(format!("n{i}.db"));
        let stop = CancellationToken::new();
        // A crashed node's tasks let go of its file a moment after they are stopped (this
        // worker waits for them aside, so the runtime runs them meanwhile).
        let deadline = tokio::time::Instant::now() + CONVERGE;
        let (cluster, transport_handle) = tokio::task::block_in_place(|| {
            loop {
                match Cluster::in_memory(&self.net, node.clone(), &db, stop.clone()) {
                    Ok(started) => break started,
                    Err(e) if e.to_string().contains("another edgeproxy") => {
                        assert!(tokio::time::Instant::now() < deadline, "n{i}: {e}");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("n{i}: {e}"),
                }
            }
        });
        let sim_node = SimNode {
            cluster: Some(cluster),
            transport: transport_handle,
            db,
            addrs: vec![gossip, transport],
            stop,
        };
        match self.nodes.get_mut(i) {
            Some(slot) => *slot = sim_node,
            None => self.nodes.push(sim_node),
        }
    }

    /// Crashes node `i`: off the network, tasks stopped.
    fn crash(&mut self, i: usize) {
        self.nodes[i].transport.detach();
        self.nodes[i].stop.cancel();
        self.nodes[i].cluster = None;
    }

    fn status(&self, i: usize) -> edgeproxy::domain::ports::ClusterStatus {
        self.nodes[i]
            .cluster
            .as_ref()
            .expect("a running node")
            .status()
    }

    /// Moves every node's wall clock on by `d` (real time goes on as well).
    fn advance(&self, d: Duration) {
        self.time.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }

    /// Crashes node `i` and starts it again on an empty database.
    fn wipe(&mut self, i: usize, seeds: &[usize]) {
        self.crash(i);
        // The lock goes too: the crashed node's tasks may still hold it, on files now gone.
        for suffix in [
            "",
            "-wal",
            "-shm",
            ".replica-lock",
            ".fleet",
            ".fleet-wal",
            ".fleet-shm",
        ] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.nodes[i].db.display()));
        }
        self.start(i, seeds);
    }

    /// Node `i`'s rows as its file holds them: id -> deleted.
    fn held(&self, i: usize) -> HashMap<String, bool> {
        let conn = rusqlite::Connection::open(&self.nodes[i].db).unwrap();
        let mut stmt = conn.prepare("SELECT id, deleted FROM backends").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Node `i`'s live rows with their versions: id -> (port, hlc, node, seq).
    fn versions(&self, i: usize) -> std::collections::BTreeMap<String, (i64, i64, i64, i64)> {
        let conn = rusqlite::Connection::open(&self.nodes[i].db).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT b.id, b.port, v.hlc, v.node, v.seq FROM backends b
                 JOIN _edgeproxy_versions v ON v.id = b.id WHERE b.deleted = 0",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    fn live(&self, i: usize) -> std::collections::BTreeSet<String> {
        self.held(i)
            .into_iter()
            .filter(|(_, deleted)| !deleted)
            .map(|(id, _)| id)
            .collect()
    }

    fn write(&self, i: usize, sql: &str) {
        rusqlite::Connection::open(&self.nodes[i].db)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    fn insert(&self, i: usize, id: &str, port: u16) {
        self.write(
            i,
            &format!(
                "INSERT OR REPLACE INTO backends VALUES ('{id}','web','eu','DE','10.0.0.1',{port},1,1,10,0,0)"
            ),
        );
    }

    fn addrs(&self, nodes: &[usize]) -> Vec<SocketAddr> {
        nodes
            .iter()
            .flat_map(|i| self.nodes[*i].addrs.clone())
            .collect()
    }

    /// Waits until `nodes` report one digest over `rows` live rows.
    async fn converged(&self, nodes: &[usize], rows: usize) -> String {
        self.converged_to(nodes, rows, None).await
    }

    /// As `converged`, over `tombstones` deleted rows as well when given (a delete not yet
    /// taken in leaves the row count it had before, which `rows` alone cannot tell).
    async fn converged_to(
        &self,
        nodes: &[usize],
        rows: usize,
        tombstones: Option<usize>,
    ) -> String {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            let s: Vec<_> = nodes.iter().map(|i| self.status(*i)).collect();
            if s.iter().all(|x| {
                x.digest == s[0].digest
                    && x.rows == rows
                    && tombstones.is_none_or(|t| x.tombstones == t)
            }) {
                return s[0].digest.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no convergence on {rows} rows: {:?}",
                s.iter()
                    .map(|x| (&x.name, x.rows, &x.digest))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn members_up(&self, i: usize, n: usize) {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        while self
            .status(i)
            .members
            .iter()
            .filter(|m| m.state == "alive")
            .count()
            != n
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "n{i}: {:?}",
                self.status(i).members
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.stop.cancel();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_converge_through_partitions_and_loss() {
    let sim = Sim::new(5);
    for i in 0..5 {
        sim.members_up(i, 4).await;
    }
    sim.insert(2, "a", 1);
    sim.converged(&[0, 1, 2, 3, 4], 1).await;

    // {0,1,2} | {3,4}, writes on both sides, one id on both.
    sim.net
        .partition(&[sim.addrs(&[0, 1, 2]), sim.addrs(&[3, 4])]);
    sim.insert(0, "left", 2);
    sim.insert(4, "right", 3);
    sim.insert(1, "a", 11);
    sim.converged(&[0, 1, 2], 2).await;
    sim.converged(&[3, 4], 2).await;
    sim.insert(3, "a", 33); // later: wins once healed
    sim.converged(&[3, 4], 2).await;
    sim.net.heal();
    sim.converged(&[0, 1, 2, 3, 4], 3).await;
    let port: i64 = rusqlite::Connection::open(&sim.nodes[0].db)
        .unwrap()
        .query_row("SELECT port FROM backends WHERE id = 'a'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(port, 33);

    // A third of all messages lost: pushes go missing, anti-entropy still converges.
    sim.net.set_loss(0.33, Duration::ZERO);
    for k in 0..10 {
        sim.insert(k % 5, &format!("lossy-{k}"), 100 + k as u16);
    }
    sim.converged(&[0, 1, 2, 3, 4], 13).await;
    sim.net.set_loss(0.0, Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_restarts_on_its_database_and_catches_up() {
    let mut sim = Sim::new(3);
    for i in 0..3 {
        sim.members_up(i, 2).await;
    }
    sim.insert(0, "one", 1);
    sim.converged(&[0, 1, 2], 1).await;
    sim.crash(2);
    sim.members_up(0, 1).await;
    sim.insert(1, "two", 2);
    sim.write(0, "DELETE FROM backends WHERE id = 'one'");
    // Node 2 went down holding one live row too: the delete must be in before it is back.
    sim.converged_to(&[0, 1], 1, Some(1)).await;
    // Back, knowing only node 1: finds node 0 through it, and the table.
    sim.start(2, &[1]);
    sim.members_up(2, 2).await;
    sim.converged_to(&[0, 1, 2], 1, Some(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_neither_spread_nor_taken_in() {
    use edgeproxy::adapters::cluster::transport::Transport as _;
    use edgeproxy::adapters::cluster::wire::{self, Message};
    use edgeproxy::domain::replication::{BackendRow, Hlc, NodeId, Version, VersionedRow};

    let sim = Sim::new(2);
    sim.members_up(0, 1).await;
    // Written by hand past the CLI's checks: the origin's loader skips it, and so does
    // replication.
    sim.write(
        0,
        "INSERT INTO backends VALUES ('bad','web','eu','DE','not-an-ip',80,1,1,10,0,0);
         INSERT INTO backends VALUES ('good','web','eu','DE','10.0.0.1',80,1,1,10,0,0);",
    );
    sim.converged(&[0, 1], 1).await;

    // A peer that sends a bad row, garbage, and another schema: each counted, none applied.
    let bad = VersionedRow {
        version: Version {
            hlc: Hlc::from_millis(edgeproxy::adapters::outbound::sqlite_replica::wall_ms()),
            node: NodeId(42),
        },
        seq: 1,
        row: BackendRow {
            id: "evil".into(),
            app: "web".into(),
            region: "eu".into(),
            country: "DE".into(),
            wg_ip: "10.0.0.1".into(),
            port: 0,
            healthy: true,
            weight: 1,
            soft_limit: 1,
            hard_limit: 0,
            deleted: false,
            owner: None,
        },
    };
    let to = sim.nodes[1].addrs[1];
    let from = &sim.nodes[0].transport;
    let push = |schema, rows| {
        wire::encode(&Message::Push {
            schema,
            from: NodeId(42),
            rows,
        })
    };
    from.send(to, push(wire::SCHEMA, vec![bad.clone()]))
        .await
        .unwrap();
    from.send(to, vec![0xff; 7]).await.unwrap();
    from.send(to, push(wire::SCHEMA + 1, vec![bad]))
        .await
        .unwrap();
    let s = sim.status(1);
    assert_eq!(s.changes_rejected, 1, "{s:?}");
    assert_eq!(s.peers_refused, 2, "{s:?}");
    assert_eq!(s.rows, 1);
    // And the node goes on replicating.
    sim.insert(0, "after", 1);
    sim.converged(&[0, 1], 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_larger_than_a_page_move_in_pages() {
    let rows = 2 * edgeproxy::adapters::cluster::wire::PAGE_ROWS + 7;
    let mut sim = Sim::new(2);
    sim.members_up(0, 1).await;
    {
        let mut conn = rusqlite::Connection::open(&sim.nodes[0].db).unwrap();
        let tx = conn.transaction().unwrap();
        for k in 0..rows {
            tx.execute(
                "INSERT INTO backends VALUES (?1,'web','eu','DE','10.0.0.1',?2,1,1,10,0,0)",
                rusqlite::params![format!("bulk-{k:05}"), 1 + (k % 60_000) as i64],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    // Pushed in three frames...
    sim.converged(&[0, 1], rows).await;
    // ...and pulled in three pages by a node that has nothing.
    sim.start(2, &[1]);
    sim.converged(&[0, 1, 2], rows).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pops_away_together_longer_than_the_window_bring_back_no_delete() {
    let week = Duration::from_secs(7 * 86_400);
    let sim = Sim::with(3, week);
    for i in 0..3 {
        sim.members_up(i, 2).await;
    }
    sim.insert(0, "x", 1);
    sim.insert(0, "kept", 2);
    sim.converged(&[0, 1, 2], 2).await;
    // {0} | {1, 2}: 0 deletes x and, more than a week later, purges the tombstone; the
    // other two keep syncing with each other and write a row of their own.
    sim.net.partition(&[sim.addrs(&[0]), sim.addrs(&[1, 2])]);
    sim.write(0, "DELETE FROM backends WHERE id = 'x'");
    sim.converged_to(&[0], 1, Some(1)).await;
    sim.advance(week + Duration::from_secs(86_400));
    sim.converged_to(&[0], 1, Some(0)).await;
    sim.insert(1, "away", 3);
    sim.converged(&[1, 2], 3).await;
    sim.net.heal();
    sim.converged(&[0, 1, 2], 2).await;
    for i in 0..3 {
        assert_eq!(
            sim.live(i),
            ["away".to_owned(), "kept".into()].into(),
            "n{i}"
        );
    }
    let superseded: u64 = (1..3).map(|i| sim.status(i).changes_superseded).sum();
    assert_eq!(superseded, 2, "each of the two dropped x");
}

/// What the randomized run must end with: the rows written and never deleted, at every POP.
#[derive(Default)]
struct Model {
    live: std::collections::BTreeSet<String>,
    /// Ids updated at least once: never deleted afterwards, so no update races a delete
    /// and the expected table does not depend on which clock won.
    updated: std::collections::BTreeSet<String>,
    /// Writes a node made that no other node's file shows yet: (node, id, deleted).
    unconfirmed: Vec<(usize, String, bool)>,
}

/// Weeks of writes, deletes, restarts, wipes, joins, partitions and clock error, compressed
/// into seconds of simulated time on the in-memory network, then checked against the model:
/// every row written and never deleted is live at every POP, no deleted row is.
/// `EDGEPROXY_SIM_STEPS` (default 60) and `EDGEPROXY_SIM_SEED` (default 23) set the run;
/// `EDGEPROXY_SIM_STEPS=2000 cargo test -p edgeproxy --test it weeks_of` is the long one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weeks_of_faults_lose_no_row_and_bring_back_no_delete() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (steps, seed) = (
        env("EDGEPROXY_SIM_STEPS", 60),
        env("EDGEPROXY_SIM_SEED", 23),
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let day = Duration::from_secs(86_400);
    let mut sim = Sim::with(4, 7 * day);
    for i in 0..4 {
        sim.members_up(i, 3).await;
    }
    let mut up = vec![true; 4];
    let mut partitioned = false;
    let mut model = Model::default();
    let mut next_id = 0;
    // POPs whose clocks are far ahead do not write: their writes are refused by design (they
    // still have to hold every row); POPs behind by any amount do.
    let writer = |sim: &Sim, up: &[bool], rng: &mut fastrand::Rng| {
        let ok: Vec<usize> = (0..up.len())
            .filter(|&i| up[i] && sim.skew.get(&i).is_none_or(|s| *s < 30_000))
            .collect();
        (!ok.is_empty()).then(|| ok[rng.usize(..ok.len())])
    };
    let seeds_for = |up: &[bool], me: usize| -> Vec<usize> {
        (0..up.len()).filter(|&j| up[j] && j != me).collect()
    };
    let mut done = [0; 10];
    for _ in 0..steps {
        sim.advance(Duration::from_secs(rng.u64(60..3 * 86_400)));
        let action = rng.u32(0..100);
        match action {
            0..=39 => {
                if let Some(i) = writer(&sim, &up, &mut rng) {
                    let id = format!("r{next_id}");
                    next_id += 1;
                    sim.insert(i, &id, 1);
                    model.live.insert(id.clone());
                    model.unconfirmed.push((i, id, false));
                }
            }
            40..=54 => {
                if let Some(i) = writer(&sim, &up, &mut rng) {
                    let mine = sim.live(i);
                    let candidates: Vec<&String> = mine
                        .iter()
                        .filter(|id| model.live.contains(*id) && !model.updated.contains(*id))
                        .collect();
                    if let Some(id) = candidates.get(rng.usize(..candidates.len().max(1))) {
                        let id = (*id).clone();
                        sim.write(i, &format!("DELETE FROM backends WHERE id = '{id}'"));
                        model.live.remove(&id);
                        model.unconfirmed.push((i, id, true));
                    }
                }
            }
            55..=61 => {
                if let Some(i) = writer(&sim, &up, &mut rng) {
                    let mine: Vec<String> = sim
                        .live(i)
                        .into_iter()
                        .filter(|id| model.live.contains(id))
                        .collect();
                    if !mine.is_empty() {
                        let id = mine[rng.usize(..mine.len())].clone();
                        sim.write(
                            i,
                            &format!(
                                "UPDATE backends SET port = {} WHERE id = '{id}'",
                                rng.u16(2..60_000)
                            ),
                        );
                        model.updated.insert(id);
                    }
                }
            }
            62..=71 => {
                let i = rng.usize(..up.len());
                if up[i] && up.iter().filter(|u| **u).count() > 2 {
                    sim.crash(i);
                    up[i] = false;
                } else if !up[i] {
                    let seeds = seeds_for(&up, i);
                    sim.start(i, &seeds);
                    up[i] = true;
                }
            }
            72..=77 => {
                // A wipe loses what never left the POP: only POPs whose every write shows
                // elsewhere are wiped.
                let i = rng.usize(..up.len());
                let others: Vec<HashMap<String, bool>> = (0..up.len())
                    .filter(|&j| j != i)
                    .map(|j| sim.held(j))
                    .collect();
                let shown = |(_, id, deleted): &(usize, String, bool)| {
                    others.iter().any(|h| h.get(id) == Some(deleted))
                };
                model.unconfirmed.retain(|w| !shown(w));
                if up[i] && model.unconfirmed.iter().all(|w| w.0 != i) {
                    let seeds = seeds_for(&up, i);
                    sim.wipe(i, &seeds);
                }
            }
            78..=81 => {
                if up.len() < 7 {
                    let i = up.len();
                    let seeds = seeds_for(&up, i);
                    sim.start(i, &seeds);
                    up.push(true);
                }
            }
            82..=89 => {
                if partitioned {
                    sim.net.heal();
                    partitioned = false;
                } else {
                    let mut nodes: Vec<usize> = (0..up.len()).collect();
                    rng.shuffle(&mut nodes);
                    let cut = rng.usize(1..nodes.len());
                    sim.net
                        .partition(&[sim.addrs(&nodes[..cut]), sim.addrs(&nodes[cut..])]);
                    partitioned = true;
                }
            }
            90..=94 => {
                // A clock off by a little, or by a lot (one POP at a time: the guarantees
                // hold whatever any one POP's clock says), from the POP's next start.
                let i = rng.usize(..up.len());
                let far = [
                    400 * 86_400_000,
                    3 * 86_400_000,
                    -3 * 86_400_000,
                    -400 * 86_400_000,
                ];
                let skew: i64 = match rng.bool() {
                    true => far[rng.usize(..far.len())],
                    false => [20_000, -20_000, 0][rng.usize(..3)],
                };
                let mut restart = vec![i];
                if skew.abs() > 60_000 {
                    restart.extend(
                        sim.skew
                            .iter()
                            .filter(|(_, s)| s.abs() > 60_000)
                            .map(|(j, _)| *j),
                    );
                    sim.skew.retain(|_, s| s.abs() <= 60_000);
                }
                sim.skew.insert(i, skew);
                for j in restart {
                    if up[j] {
                        sim.crash(j);
                        let seeds = seeds_for(&up, j);
                        sim.start(j, &seeds);
                    }
                }
            }
            _ => sim.advance(8 * day),
        }
        done[(action / 10) as usize] += 1;
        // Real time between events, so pushes and rounds happen in between (or not).
        tokio::time::sleep(Duration::from_millis(rng.u64(0..80))).await;
    }
    sim.net.heal();
    for i in 0..up.len() {
        if !up[i] {
            let seeds = seeds_for(&up, i);
            sim.start(i, &seeds);
            up[i] = true;
        }
    }
    let all: Vec<usize> = (0..up.len()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let tables: Vec<_> = all.iter().map(|&i| sim.live(i)).collect();
        if tables.iter().all(|t| *t == model.live) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {seed}, {steps} steps: expected {:?}\n{}",
            model.live,
            tables
                .iter()
                .enumerate()
                .map(|(i, t)| format!(
                    "n{i}: missing {:?}, extra {:?}",
                    model.live.difference(t).collect::<Vec<_>>(),
                    t.difference(&model.live).collect::<Vec<_>>()
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the same versions everywhere.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let tables: Vec<_> = all.iter().map(|&i| sim.versions(i)).collect();
        if tables.iter().all(|t| *t == tables[0]) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let mut diff = Vec::new();
            for (i, t) in tables.iter().enumerate() {
                for (id, v) in t.iter().filter(|(id, v)| tables[0].get(*id) != Some(v)) {
                    diff.push(format!(
                        "n{i} {id} {v:?} vs n0 {:?}; skew {:?}",
                        tables[0].get(id),
                        sim.skew.get(&i)
                    ));
                }
            }
            panic!("seed {seed}: versions differ:\n{}", diff.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "seed {seed}, {steps} steps over {} simulated days, by tens of action: {done:?}; \
         {} POPs, {} live rows, {} ids written",
        sim.time.load(Ordering::SeqCst) / 86_400_000,
        all.len(),
        model.live.len(),
        next_id
    );
}
