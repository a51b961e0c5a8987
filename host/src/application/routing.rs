//! Keeps the routing snapshot fresh: loads the table off the hot path (blocking thread),
//! joins it with live stats and swaps it in atomically. A failed load keeps the last good
//! snapshot serving and is logged on every attempt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::domain::RoutingTable;
use crate::domain::ports::{BackendRepository, MetricsStore, RoutingError, SkippedRow};

pub struct Routing {
    table: ArcSwap<RoutingTable>,
    repo: Arc<dyn BackendRepository>,
    metrics: Arc<dyn MetricsStore>,
    version: watch::Sender<u64>,
    /// Skipped rows of the last load, so each bad row is reported once, not every period.
    skipped: Mutex<Vec<SkippedRow>>,
}

/// Why a wake-up of the reloader found nothing to do, or what it did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Unchanged,
    Changed { version: u64, backends: usize },
}

impl Routing {
    pub fn new(repo: Arc<dyn BackendRepository>, metrics: Arc<dyn MetricsStore>) -> Self {
        Self {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            repo,
            metrics,
            version: watch::Sender::new(0),
            skipped: Mutex::default(),
        }
    }

    /// The snapshot to route one connection with.
    pub fn current(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Changes to the table version, for whoever must react to a reload (and tests).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub async fn reload(&self) -> Result<Reloaded, RoutingError> {
        let repo = Arc::clone(&self.repo);
        let loaded = tokio::task::spawn_blocking(move || repo.load())
            .await
            .map_err(|e| RoutingError::Unreadable {
                location: "routing loader".into(),
                reason: e.to_string(),
            })??;
        {
            // Invariant: the lock is never held across a panic-prone call.
            let mut last = self.skipped.lock().expect("skipped-rows lock");
            for row in loaded.skipped.iter().filter(|r| !last.contains(r)) {
                tracing::warn!(backend = %row.id, reason = %row.reason, "skipping routing row");
            }
            *last = loaded.skipped;
        }
        let current = self.table.load();
        if current.version() > 0 && current.same_rows(&loaded.backends) {
            return Ok(Reloaded::Unchanged);
        }
        let version = current.version() + 1;
        let count = loaded.backends.len();
        let table = RoutingTable::new(version, loaded.backends, |id| {
            self.metrics.backend_stats(id)
        });
        self.metrics.retain(&|id| {
            table
                .backends()
                .binary_search_by(|b| b.backend.id.cmp(id))
                .is_ok()
        });
        self.table.store(Arc::new(table));
        self.version.send_replace(version);
        Ok(Reloaded::Changed {
            version,
            backends: count,
        })
    }

    async fn reload_and_log(&self) {
        match self.reload().await {
            Ok(Reloaded::Changed { version, backends }) => {
                tracing::info!(version, backends, "routing table loaded")
            }
            Ok(Reloaded::Unchanged) => {}
            Err(e) => {
                tracing::error!(error = %e, "routing reload failed; keeping the last good table")
            }
        }
    }

    /// Reloads every `every` and shortly after each `changed` notification until shutdown.
    pub async fn run(&self, every: Duration, changed: Arc<Notify>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the caller already loaded once
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = changed.notified() => {
                    // Let a burst of writes (statement + WAL + checkpoint) settle into one load.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            self.reload_and_log().await;
        }
    }
}
