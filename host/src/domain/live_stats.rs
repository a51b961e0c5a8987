//! The live per-backend stats (active connections, connect RTT, traffic), by backend id,
//! kept across routing reloads so counts never reset or drift. The routing snapshot joins
//! each backend with its entry; the admin API and `/metrics` read them.

use std::sync::Arc;

use dashmap::DashMap;

use super::{BackendId, BackendStats};

#[derive(Debug, Default)]
pub struct LiveStats {
    backends: DashMap<BackendId, Arc<BackendStats>>,
}

impl LiveStats {
    /// This process's active connections summed over every backend known.
    pub fn total_active(&self) -> u64 {
        self.backends
            .iter()
            .map(|e| u64::from(e.value().own_active()))
            .sum()
    }

    /// The connections this POP holds by backend, where it holds any: this process's and
    /// those it inherited from a predecessor still draining (for a process taking over
    /// from this one while it drains).
    pub fn held(&self) -> Vec<(BackendId, u32)> {
        self.backends
            .iter()
            .map(|e| (e.key().clone(), e.value().active()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The stats of `id`, created on first use; the same `Arc` for the same id.
    pub fn backend_stats(&self, id: &BackendId) -> Arc<BackendStats> {
        if let Some(s) = self.backends.get(id) {
            return Arc::clone(&s);
        }
        Arc::clone(&self.backends.entry(id.clone()).or_default())
    }

    /// Forgets idle backends that `keep` rejects (called after a reload).
    pub fn retain(&self, keep: &dyn Fn(&BackendId) -> bool) {
        // Backends still serving connections stay, so their counts never drift.
        self.backends
            .retain(|id, s| keep(id) || s.own_active() > 0 || Arc::strong_count(s) > 1);
    }
}
