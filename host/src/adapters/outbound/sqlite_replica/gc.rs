//! Tombstones purged after the window. Age is this POP's own elapsed time since it took the
//! tombstone in (its wall clock read twice), so a clock that is off by any constant amount
//! neither purges early nor keeps tombstones for ever. A purged write stays seen: if a POP
//! that was away offers the row it deleted, it is refused, and told it was superseded.

use std::time::Duration;

use super::{ReplicaError, SqliteReplica};
use crate::domain::replication::{Dot, VersionedRow};

impl SqliteReplica {
    /// Purges the tombstones held longer than `ttl`; returns how many went, and local
    /// edits stamped on the way (to push).
    pub fn purge_tombstones(
        &mut self,
        ttl: Duration,
    ) -> Result<(usize, Vec<VersionedRow>), ReplicaError> {
        let cutoff = self.now().saturating_sub(ttl.as_millis() as u64);
        let old: Vec<(String, Dot)> = self
            .book
            .entries()
            .filter(|e| e.row.row.deleted && e.at <= cutoff)
            .map(|e| (e.row.row.id.clone(), e.row.dot()))
            .collect();
        // Only those still that tombstone: an undelete may be stamped first.
        let (purged, stamped) = self.forget_held(old)?;
        Ok((purged.len(), stamped))
    }
}
