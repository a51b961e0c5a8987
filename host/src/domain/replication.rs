//! What makes every POP's routing table converge: row versions from a hybrid logical clock,
//! the last-writer-wins merge rule, and the bucketed digest two POPs compare.
//!
//! A backend row is one routing record, so the whole row is the unit of conflict (a column
//! merge could pair one writer's `wg_ip` with another's `port`). A version is the writer's
//! HLC then its node id; versions are unique per write, so "the greater (version, row)
//! wins" is a total order and the merge is commutative, associative and idempotent: the
//! same writes give the same table on every POP whatever order they arrive in.

use serde::{Deserialize, Serialize};

/// A node's identity in the cluster: random, created with its database, so a wiped
/// database comes back as a new writer (like cr-sqlite's site id).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Hybrid logical clock reading: unix milliseconds in the high 48 bits, a counter in the
/// low 16, so it orders like wall time but never repeats or goes back on one node.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Hlc(pub u64);

impl Hlc {
    const COUNTER_BITS: u32 = 16;

    pub fn from_millis(ms: u64) -> Self {
        Self(ms << Self::COUNTER_BITS)
    }

    pub fn millis(self) -> u64 {
        self.0 >> Self::COUNTER_BITS
    }
}

/// The version of one write: compared by clock, then by the writer's id.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Version {
    pub hlc: Hlc,
    pub node: NodeId,
}

/// A remote clock further ahead of ours than the allowed skew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("clock {ahead_ms} ms ahead of this node's (allowed skew {max_skew_ms} ms)")]
pub struct ClockAhead {
    pub ahead_ms: u64,
    pub max_skew_ms: u64,
}

/// One node's hybrid logical clock. Wall time is passed in, so tests drive it.
#[derive(Debug, Clone)]
pub struct Clock {
    last: Hlc,
    max_skew_ms: u64,
}

impl Clock {
    /// Restarts from the last reading persisted, so a restart never reuses a version.
    pub fn new(last: Hlc, max_skew_ms: u64) -> Self {
        Self { last, max_skew_ms }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A reading for a local write: after every reading this clock has given or seen.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        self.last = Hlc(self.last.0.max(Hlc::from_millis(wall_ms).0) + 1);
        self.last
    }

    /// Takes in a remote reading, so later local writes order after it. A reading more than
    /// the allowed skew ahead of our wall clock is refused and leaves the clock alone: one
    /// node with a bad clock must not drag every POP's clock (and its writes' rank) ahead.
    /// What it wrote waits until our clock is within the skew (anti-entropy offers it again).
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), ClockAhead> {
        let ahead_ms = remote.millis().saturating_sub(wall_ms);
        if ahead_ms > self.max_skew_ms {
            return Err(ClockAhead {
                ahead_ms,
                max_skew_ms: self.max_skew_ms,
            });
        }
        self.last = self.last.max(remote);
        Ok(())
    }
}

/// One `backends` row as stored, deleted rows (tombstones) included.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendRow {
    pub id: String,
    pub app: String,
    pub region: String,
    pub country: String,
    pub wg_ip: String,
    pub port: u16,
    pub healthy: bool,
    pub weight: u32,
    pub soft_limit: u32,
    pub hard_limit: u32,
    pub deleted: bool,
}

/// A row with the version of the write that made it: what POPs exchange and store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionedRow {
    pub version: Version,
    pub row: BackendRow,
}

impl VersionedRow {
    /// The merge rule: `self` replaces `current` when it is greater, version first. Equal
    /// versions with different contents (only a bug or a forged node could make them) are
    /// settled by the contents, so even then every POP keeps the same row.
    pub fn supersedes(&self, current: Option<&VersionedRow>) -> bool {
        current.is_none_or(|c| self > c)
    }

    /// This row's share of the table digest: stable across builds and platforms.
    pub fn fingerprint(&self) -> u64 {
        let bytes = postcard::to_stdvec(self).expect("a row always serializes");
        fnv1a(&bytes)
    }
}

/// Digest buckets: rows are spread by id so a difference is found by comparing 64 numbers,
/// then only the rows of the buckets that differ.
pub const BUCKETS: usize = 64;

pub fn bucket_of(id: &str) -> usize {
    (fnv1a(id.as_bytes()) % BUCKETS as u64) as usize
}

/// XOR of the fingerprints of the rows in each bucket: order-free and cheap to keep up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest(pub Vec<u64>);

impl Digest {
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a VersionedRow>) -> Self {
        let mut buckets = vec![0u64; BUCKETS];
        for r in rows {
            buckets[bucket_of(&r.row.id)] ^= r.fingerprint();
        }
        Self(buckets)
    }

    /// The buckets in which `self` and `other` differ (all of them if `other` is malformed).
    pub fn differing(&self, other: &Digest) -> Vec<usize> {
        (0..BUCKETS)
            .filter(|&b| self.0.get(b) != other.0.get(b))
            .collect()
    }

    /// One number for the whole table, for people comparing two POPs by eye.
    pub fn summary(&self) -> String {
        let bytes: Vec<u8> = self.0.iter().flat_map(|b| b.to_le_bytes()).collect();
        format!("{:016x}", fnv1a(&bytes))
    }
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn row(id: u8, port: u16, deleted: bool, hlc: u64, node: u64) -> VersionedRow {
        VersionedRow {
            version: Version {
                hlc: Hlc(hlc),
                node: NodeId(node),
            },
            row: BackendRow {
                id: format!("b{id}"),
                app: "web".into(),
                region: "eu".into(),
                country: "DE".into(),
                wg_ip: "10.0.0.1".into(),
                port,
                healthy: true,
                weight: 1,
                soft_limit: 10,
                hard_limit: 0,
                deleted,
            },
        }
    }

    type Table = BTreeMap<String, VersionedRow>;

    fn apply(table: &mut Table, r: &VersionedRow) {
        if r.supersedes(table.get(&r.row.id)) {
            table.insert(r.row.id.clone(), r.clone());
        }
    }

    fn writes() -> impl Strategy<Value = Vec<VersionedRow>> {
        // Few ids, nodes and clock values, so conflicts (and equal versions) are common.
        prop::collection::vec(
            (0u8..4, 1u16..4, any::<bool>(), 0u64..6, 0u64..3)
                .prop_map(|(id, port, del, hlc, node)| row(id, port, del, hlc, node)),
            0..24,
        )
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(ws in writes(), seed in any::<u64>()) {
            let mut in_order = Table::new();
            ws.iter().for_each(|w| apply(&mut in_order, w));
            // Any order, with every write delivered twice, gives the same table.
            let mut shuffled: Vec<_> = ws.iter().chain(ws.iter()).collect();
            fastrand::Rng::with_seed(seed).shuffle(&mut shuffled);
            let mut other = Table::new();
            shuffled.into_iter().for_each(|w| apply(&mut other, w));
            prop_assert_eq!(&in_order, &other);
            // Merging two partial replicas equals applying everything (associativity).
            let (a, b) = ws.split_at(ws.len() / 2);
            let (mut left, mut right) = (Table::new(), Table::new());
            a.iter().for_each(|w| apply(&mut left, w));
            b.iter().for_each(|w| apply(&mut right, w));
            right.values().for_each(|w| apply(&mut left, w));
            prop_assert_eq!(&in_order, &left);
            prop_assert_eq!(Digest::of(in_order.values()), Digest::of(left.values()));
        }

        #[test]
        fn replicas_converge_despite_drops_and_reordering(
            ws in writes(),
            deliveries in prop::collection::vec((0usize..4, any::<bool>()), 0..24),
            seed in any::<u64>(),
        ) {
            // Each write reaches each of 4 replicas or is lost (broadcast), in any order;
            // then a digest-driven exchange (anti-entropy) runs between every pair.
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut replicas = vec![Table::new(); 4];
            for (i, w) in ws.iter().enumerate() {
                let origin = i % 4;
                apply(&mut replicas[origin], w);
                for (to, lost) in &deliveries {
                    if !lost && rng.bool() {
                        apply(&mut replicas[*to], w);
                    }
                }
            }
            for a in 0..4 {
                for b in 0..4 {
                    let (da, db) = (Digest::of(replicas[a].values()), Digest::of(replicas[b].values()));
                    for bucket in da.differing(&db) {
                        let rows: Vec<_> = replicas[a].values()
                            .filter(|r| bucket_of(&r.row.id) == bucket).cloned().collect();
                        rows.iter().for_each(|r| apply(&mut replicas[b], r));
                    }
                }
            }
            let all: Table = { let mut t = Table::new(); ws.iter().for_each(|w| apply(&mut t, w)); t };
            for r in &replicas {
                prop_assert_eq!(r, &all);
            }
        }

        #[test]
        fn clock_is_monotonic_and_refuses_far_ahead(
            steps in prop::collection::vec((any::<bool>(), 0u64..10_000, 0u64..200_000), 1..50),
        ) {
            let mut clock = Clock::new(Hlc::default(), 60_000);
            let mut wall = 1_000_000u64;
            let mut last = clock.last();
            for (local, wall_step, remote_offset) in steps {
                wall += wall_step % 50; // wall time may stand still
                if local {
                    let t = clock.tick(wall);
                    prop_assert!(t > last, "tick went back");
                    prop_assert!(t.millis() >= wall);
                } else {
                    let remote = Hlc::from_millis(wall + remote_offset);
                    let ok = clock.observe(remote, wall).is_ok();
                    prop_assert_eq!(ok, remote_offset <= 60_000);
                    let floor = if ok { remote } else { last };
                    prop_assert!(clock.tick(wall) > floor);
                }
                prop_assert!(clock.last().millis() <= wall + 60_000 + 1, "clock dragged past the skew");
                prop_assert!(clock.last() >= last);
                last = clock.last();
            }
        }
    }

    #[test]
    fn later_writer_wins_and_node_breaks_ties() {
        let old = row(1, 80, false, 5, 9);
        let new = row(1, 81, false, 6, 1);
        assert!(new.supersedes(Some(&old)));
        assert!(!old.supersedes(Some(&new)));
        let tie = row(1, 82, false, 6, 2);
        assert!(tie.supersedes(Some(&new)));
        assert!(!new.supersedes(Some(&new)), "a row does not replace itself");
        let tombstone = row(1, 81, true, 7, 1);
        assert!(tombstone.supersedes(Some(&tie)));
    }
}
