//! Rows between this POP and a peer: what a peer is sent (the rows it has not seen, the
//! writes seen here and no longer held, the live dots where digests differ), and how what a
//! peer sends is taken in. Whether a row is news is decided by the writes seen here, never
//! by a clock: a dot seen is not taken again, one not seen is merged by version.

use std::collections::HashSet;

use super::{ReplicaError, SqliteReplica, validate};
use crate::domain::replication::{
    BUCKETS, ClockAhead, Digest, Dot, Head, Seen, VersionedRow, bucket_of,
};

/// What taking in a peer's rows did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Rows that won and were written.
    pub applied: Vec<VersionedRow>,
    /// Rows this node had seen, or held newer.
    pub stale: usize,
    /// Rows that failed validation: (id, reason). Not marked seen: they are offered again
    /// and refused again, never taken for superseded.
    pub rejected: Vec<(String, String)>,
    /// Rows written by a clock too far ahead, left for a later sync.
    pub ahead: Vec<(String, ClockAhead)>,
    /// Live rows dropped because the peer saw them superseded.
    pub superseded: Vec<String>,
    /// Local edits found pending and stamped first (to push).
    pub stamped: Vec<VersionedRow>,
}

impl SqliteReplica {
    /// The opening of an answer to a peer that has seen `their_seen` and holds live rows
    /// digested as `their_digest`.
    pub fn head_for(&self, their_seen: &Seen, their_digest: &Digest) -> Head {
        // Buckets where the peer holds no live row (digest 0) need no list of ours: it has
        // nothing there to drop. A new POP's first round carries no list at all.
        let buckets: Vec<usize> = self
            .book
            .digest
            .differing(their_digest)
            .into_iter()
            .filter(|&b| their_digest.0.get(b).is_some_and(|&d| d != 0))
            .collect();
        Head {
            seen: self.book.seen.clone(),
            cleared: self.book.cleared_for(their_seen),
            live: self.book.live_dots(&buckets),
            buckets: buckets.into_iter().map(|b| b as u16).collect(),
        }
    }

    /// Up to `limit` rows (tombstones included) with dots `their_seen` lacks, ids after
    /// `after`, and the id to continue after when there are more.
    pub fn news_for(
        &self,
        their_seen: &Seen,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<VersionedRow>, Option<String>) {
        self.book.news_for(their_seen, after, limit)
    }

    /// Writes seen here, not by `their_seen`, and no longer held (see [`Head::cleared`]).
    pub fn cleared_for(&self, their_seen: &Seen) -> Seen {
        self.book.cleared_for(their_seen)
    }

    /// Merges a peer's rows: each is validated as the loader would, and written only when
    /// this node has not seen its write and it supersedes what is held; `cleared` (writes
    /// the peer saw superseded) are marked seen.
    pub fn apply(
        &mut self,
        incoming: Vec<VersionedRow>,
        cleared: &Seen,
    ) -> Result<Applied, ReplicaError> {
        let (mut out, (stamped, _)) = self.transact(|t| {
            let mut out = Applied::default();
            for r in incoming {
                if t.has_seen(r.dot()) {
                    out.stale += 1;
                    continue;
                }
                if r.seq == 0 {
                    out.rejected
                        .push((r.row.id.clone(), "write sequence 0".into()));
                    continue;
                }
                if let Err(reason) = validate(&r.row) {
                    out.rejected.push((r.row.id.clone(), reason));
                    continue;
                }
                if !r.supersedes(t.held(&r.row.id)) {
                    t.staged.seen.insert(r.dot());
                    out.stale += 1;
                    continue;
                }
                let fleet_now = t.fleet_now();
                if let Err(ahead) = t.clock.observe(r.version.hlc, fleet_now) {
                    out.ahead.push((r.row.id.clone(), ahead));
                    continue;
                }
                t.put(r.clone())?;
                out.applied.push(r);
            }
            t.staged.seen.union(cleared);
            Ok(out)
        })?;
        out.stamped = stamped;
        Ok(out)
    }

    /// Drops the live rows `head` shows superseded: in its differing buckets, rows whose
    /// write the peer has seen but does not hold live. Pending local edits are stamped
    /// first, so an edit made meanwhile is a new write and stays.
    pub fn drop_superseded(&mut self, head: &Head) -> Result<Applied, ReplicaError> {
        let buckets: HashSet<usize> = head
            .buckets
            .iter()
            .map(|&b| usize::from(b))
            .filter(|&b| b < BUCKETS)
            .collect();
        let live: HashSet<Dot> = head.live.iter().copied().collect();
        let gone = |r: &VersionedRow| {
            !r.row.deleted
                && buckets.contains(&bucket_of(&r.row.id))
                && head.seen.contains(r.dot())
                && !live.contains(&r.dot())
        };
        let candidates: Vec<(String, Dot)> = self
            .book
            .rows()
            .filter(|r| gone(r))
            .map(|r| (r.row.id.clone(), r.dot()))
            .collect();
        let (superseded, stamped) = self.forget_held(candidates)?;
        Ok(Applied {
            superseded,
            stamped,
            ..Applied::default()
        })
    }

    /// Stamps pending local edits with fresh versions: the rows to push, and the ones the
    /// loader would skip (not replicated until fixed).
    pub fn stamp_local(
        &mut self,
    ) -> Result<(Vec<VersionedRow>, super::Unreplicable), ReplicaError> {
        Ok(self.transact(|_| Ok(()))?.1)
    }
}
