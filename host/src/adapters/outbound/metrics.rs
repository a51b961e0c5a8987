//! In-memory live metrics: per-backend stats shared with the routing table, kept across
//! reloads. The admin adapter exposes them (`/backends`, Prometheus `/metrics`).

use std::sync::Arc;

use dashmap::DashMap;

use crate::domain::ports::MetricsStore;
use crate::domain::{BackendId, BackendStats};

#[derive(Debug, Default)]
pub struct LiveMetrics {
    backends: DashMap<BackendId, Arc<BackendStats>>,
}

impl LiveMetrics {
    /// Active connections summed over every backend known.
    pub fn total_active(&self) -> u64 {
        self.backends
            .iter()
            .map(|e| u64::from(e.value().active()))
            .sum()
    }
}

impl MetricsStore for LiveMetrics {
    fn backend_stats(&self, id: &BackendId) -> Arc<BackendStats> {
        if let Some(s) = self.backends.get(id) {
            return Arc::clone(&s);
        }
        Arc::clone(&self.backends.entry(id.clone()).or_default())
    }

    fn retain(&self, keep: &dyn Fn(&BackendId) -> bool) {
        // Backends still serving connections stay, so their counts never drift.
        self.backends
            .retain(|id, s| keep(id) || s.active() > 0 || Arc::strong_count(s) > 1);
    }
}
