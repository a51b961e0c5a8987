//! What makes every POP's routing table converge: row versions from a hybrid logical clock,
//! the last-writer-wins merge rule, and the bucketed digest two POPs compare.
//!
//! A backend row is one routing record, so the whole row is the unit of conflict (a column
//! merge could pair one writer's `wg_ip` with another's `port`). A version is the writer's
//! HLC then its node id; versions are unique per write, so "the greater (version, row)
//! wins" is a total order and the merge is commutative, associative and idempotent: the
//! same writes give the same table on every POP whatever order they arrive in.
//!
//! Every write also has a [`Dot`]: its origin and the origin's count of writes, 1, 2, 3...
//! A POP keeps the dots it has [`Seen`], per origin a few ranges. That bookkeeping, not any
//! clock, says what is news: a dot seen is never taken again, and a dot seen but no longer
//! held was superseded here (by a newer write, or a delete since purged). So a tombstone can
//! be purged without a deleted row coming back, and a POP that joins or was wiped takes
//! every row it has not seen, whatever its age.

use std::collections::BTreeMap;

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
    /// Who manages the row: None for an operator, [`API_OWNER`] for the registration API.
    pub owner: Option<String>,
}

/// The `owner` of rows the registration API created: the only rows it may change.
pub const API_OWNER: &str = "api";

/// A row with the version of the write that made it: what POPs exchange and store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionedRow {
    pub version: Version,
    /// The writer's count of its writes at this one (with `version.node`, its [`Dot`]).
    pub seq: u64,
    pub row: BackendRow,
}

impl VersionedRow {
    pub fn dot(&self) -> Dot {
        Dot {
            node: self.version.node,
            seq: self.seq,
        }
    }

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

/// One write's name: who wrote it and how many writes that node had made by then.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Dot {
    pub node: NodeId,
    pub seq: u64,
}

/// The writes a POP has taken account of, per origin: sorted, disjoint, non-adjacent
/// inclusive ranges of sequence numbers (one range per origin once nothing is missing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen(BTreeMap<NodeId, Vec<(u64, u64)>>);

/// Most ranges a peer's [`Seen`] may carry: a well-formed one has a few per origin, or at
/// worst one per row of the table; past this it is refused, not stored.
pub const MAX_SEEN_RANGES: usize = 1 << 20;

impl Seen {
    pub fn contains(&self, d: Dot) -> bool {
        self.0.get(&d.node).is_some_and(|rs| {
            let i = rs.partition_point(|&(_, hi)| hi < d.seq);
            rs.get(i).is_some_and(|&(lo, _)| lo <= d.seq)
        })
    }

    /// Adds `d`; false when it was already there.
    pub fn insert(&mut self, d: Dot) -> bool {
        if self.contains(d) {
            return false;
        }
        self.insert_range(d.node, d.seq, d.seq);
        true
    }

    pub fn insert_range(&mut self, node: NodeId, lo: u64, hi: u64) {
        if lo > hi {
            return;
        }
        let rs = self.0.entry(node).or_default();
        // Ranges touching [lo, hi] (overlapping or adjacent) merge with it.
        let start = rs.partition_point(|&(_, h)| h.saturating_add(1) < lo);
        let end = rs.partition_point(|&(l, _)| l <= hi.saturating_add(1));
        let (mut lo, mut hi) = (lo, hi);
        if start < end {
            lo = lo.min(rs[start].0);
            hi = hi.max(rs[end - 1].1);
        }
        rs.splice(start..end, [(lo, hi)]);
    }

    pub fn union(&mut self, other: &Seen) {
        for (node, lo, hi) in other.ranges() {
            self.insert_range(node, lo, hi);
        }
    }

    /// What `self` has that `other` lacks.
    pub fn minus(&self, other: &Seen) -> Seen {
        let mut out = Seen::default();
        for (node, mine) in &self.0 {
            let theirs = other.0.get(node).map_or(&[][..], Vec::as_slice);
            let mut t = theirs.iter().peekable();
            for &(lo, hi) in mine {
                let mut from = lo;
                while let Some(&&(tlo, thi)) = t.peek() {
                    if thi < from {
                        t.next();
                        continue;
                    }
                    if tlo > hi {
                        break;
                    }
                    if tlo > from {
                        out.insert_range(*node, from, tlo - 1);
                    }
                    from = thi.saturating_add(1);
                    if thi >= hi {
                        break;
                    }
                    t.next();
                }
                if from <= hi && from >= lo {
                    out.insert_range(*node, from, hi);
                }
            }
        }
        out
    }

    /// The highest sequence number seen of `node` (0: none).
    pub fn last(&self, node: NodeId) -> u64 {
        self.0
            .get(&node)
            .and_then(|rs| rs.last())
            .map_or(0, |r| r.1)
    }

    pub fn ranges(&self) -> impl Iterator<Item = (NodeId, u64, u64)> + '_ {
        self.0
            .iter()
            .flat_map(|(n, rs)| rs.iter().map(move |&(lo, hi)| (*n, lo, hi)))
    }

    pub fn origin(&self, node: NodeId) -> &[(u64, u64)] {
        self.0.get(&node).map_or(&[], Vec::as_slice)
    }

    pub fn is_empty(&self) -> bool {
        self.0.values().all(Vec::is_empty)
    }

    pub fn range_count(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    /// A peer's bookkeeping as it may be used: well formed (sorted, disjoint, no sequence
    /// number 0) and of bounded size, or why not.
    pub fn checked(self) -> Result<Seen, String> {
        if self.range_count() > MAX_SEEN_RANGES {
            return Err(format!(
                "{} ranges of writes seen (at most {MAX_SEEN_RANGES})",
                self.range_count()
            ));
        }
        for (node, rs) in &self.0 {
            let ordered = rs.iter().all(|&(lo, hi)| lo >= 1 && lo <= hi)
                && rs.windows(2).all(|w| w[0].1.saturating_add(1) < w[1].0);
            if !ordered {
                return Err(format!("malformed ranges of writes seen for node {node}"));
            }
        }
        Ok(self)
    }
}

/// How a sync answer opens: the answerer's bookkeeping, from one snapshot of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Every write the answerer has seen.
    pub seen: Seen,
    /// Writes the answerer has seen and no longer holds that the caller has not seen: the
    /// caller marks them seen, so they are refused should anyone offer them later.
    pub cleared: Seen,
    /// Digest buckets in which the caller holds live rows that differ from the answerer's,
    /// and the dots of the answerer's live rows in them: a live row of the caller whose dot
    /// the answerer has seen but does not hold there was superseded (by a delete purged
    /// since, say), and goes.
    pub buckets: Vec<u16>,
    pub live: Vec<Dot>,
}

impl Head {
    /// A peer's head as it may be used: its bookkeeping well formed, its lists bounded.
    pub fn checked(self) -> Result<Head, String> {
        if let Some(b) = self.buckets.iter().find(|&&b| usize::from(b) >= BUCKETS) {
            return Err(format!("digest bucket {b} (there are {BUCKETS})"));
        }
        if self.live.len() > MAX_SEEN_RANGES {
            return Err(format!(
                "{} live rows listed (at most {MAX_SEEN_RANGES})",
                self.live.len()
            ));
        }
        Ok(Head {
            seen: self.seen.checked()?,
            cleared: self.cleared.checked()?,
            ..self
        })
    }
}

/// Digest buckets: rows are spread by id so a difference is found by comparing 64 numbers,
/// then only the rows of the buckets that differ.
pub const BUCKETS: usize = 64;

pub fn bucket_of(id: &str) -> usize {
    (fnv1a(id.as_bytes()) % BUCKETS as u64) as usize
}

/// XOR of the fingerprints of the live rows in each bucket: order-free and cheap to keep
/// up. Tombstones are left out: each POP purges them at its own pace, and what must match
/// between POPs is what they route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest(pub Vec<u64>);

impl Digest {
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a VersionedRow>) -> Self {
        let mut buckets = vec![0u64; BUCKETS];
        for r in rows.into_iter().filter(|r| !r.row.deleted) {
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
            seq: hlc,
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
                owner: None,
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
            // then an exchange (anti-entropy) runs between every pair: the rows of the
            // buckets whose live digests differ, and every write the other lacks.
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
                    let differing = da.differing(&db);
                    let rows: Vec<_> = replicas[a].values()
                        .filter(|r| differing.contains(&bucket_of(&r.row.id))
                            || replicas[b].get(&r.row.id) != Some(*r))
                        .cloned().collect();
                    rows.iter().for_each(|r| apply(&mut replicas[b], r));
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

    proptest! {
        #[test]
        fn seen_behaves_as_a_set_of_dots(
            a in prop::collection::vec((0u64..3, 1u64..40, 0u64..6), 0..30),
            b in prop::collection::vec((0u64..3, 1u64..40, 0u64..6), 0..30),
        ) {
            use std::collections::BTreeSet;
            let build = |spec: &[(u64, u64, u64)]| {
                let (mut seen, mut model) = (Seen::default(), BTreeSet::new());
                for &(n, lo, len) in spec {
                    seen.insert_range(NodeId(n), lo, lo + len);
                    model.extend((lo..=lo + len).map(|s| (n, s)));
                }
                (seen, model)
            };
            let ((sa, ma), (sb, mb)) = (build(&a), build(&b));
            let dots = |s: &Seen| -> BTreeSet<(u64, u64)> {
                s.ranges().flat_map(|(n, lo, hi)| (lo..=hi).map(move |x| (n.0, x))).collect()
            };
            prop_assert_eq!(dots(&sa), ma.clone());
            prop_assert!(sa.clone().checked().is_ok(), "normalised: {:?}", sa);
            let diff = sa.minus(&sb);
            prop_assert_eq!(dots(&diff), ma.difference(&mb).copied().collect::<BTreeSet<_>>());
            prop_assert!(diff.checked().is_ok());
            let mut u = sa.clone();
            u.union(&sb);
            prop_assert_eq!(dots(&u), ma.union(&mb).copied().collect::<BTreeSet<_>>());
            for n in 0..3 {
                for s in 0..50 {
                    prop_assert_eq!(sa.contains(Dot { node: NodeId(n), seq: s }), ma.contains(&(n, s)));
                }
            }
        }
    }

    #[test]
    fn a_malformed_seen_from_a_peer_is_refused() {
        let bad = |rs: Vec<(u64, u64)>| Seen([(NodeId(1), rs)].into()).checked();
        assert!(bad(vec![(1, 5), (7, 9)]).is_ok());
        assert!(bad(vec![(5, 1)]).is_err(), "reversed");
        assert!(bad(vec![(0, 1)]).is_err(), "sequence 0");
        assert!(bad(vec![(1, 5), (6, 9)]).is_err(), "adjacent, not merged");
        assert!(bad(vec![(3, 5), (1, 2)]).is_err(), "unsorted");
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
