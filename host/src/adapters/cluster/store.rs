//! The routing file as the cluster uses it: from blocking threads (SQLite calls must not
//! stall the runtime), with a summary published after each call so status requests never
//! wait on the file.

use std::sync::{Arc, Mutex};

use crate::adapters::outbound::sqlite_replica::SqliteReplica;

/// The routing file, used from blocking threads: SQLite calls must not stall the runtime.
/// After each call a summary is published, so status requests never wait on the file.
#[derive(Clone)]
pub struct Store {
    replica: Arc<Mutex<SqliteReplica>>,
    summary: Arc<arc_swap::ArcSwap<Summary>>,
}

/// What status reports of the table.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub rows: usize,
    pub tombstones: usize,
    pub digest: String,
    pub clock: u64,
}

impl Store {
    pub(super) fn new(replica: SqliteReplica) -> Self {
        let summary = Arc::new(arc_swap::ArcSwap::from_pointee(Self::summarise(&replica)));
        Self {
            replica: Arc::new(Mutex::new(replica)),
            summary,
        }
    }

    /// Once replication stopped: another process may replicate the file.
    pub(super) fn release(&self) {
        self.replica.lock().expect("replica lock").release();
    }

    fn summarise(r: &SqliteReplica) -> Summary {
        let (rows, tombstones) = r.counts();
        Summary {
            rows,
            tombstones,
            digest: r.digest().summary(),
            clock: r.clock().0,
        }
    }

    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqliteReplica) -> R + Send + 'static,
    ) -> R {
        let (replica, summary) = (self.replica.clone(), self.summary.clone());
        let call = move || {
            let mut r = replica.lock().expect("replica lock");
            let out = f(&mut r);
            summary.store(Arc::new(Self::summarise(&r)));
            out
        };
        blocking(call).await
    }

    pub fn summary(&self) -> Arc<Summary> {
        self.summary.load_full()
    }
}

/// Runs `call` on a blocking thread, off the proxy's workers: file I/O, hashing, decoding.
/// A panic there goes on in the caller; at shutdown the caller waits with the runtime.
pub(super) async fn blocking<R: Send + 'static>(call: impl FnOnce() -> R + Send + 'static) -> R {
    match tokio::task::spawn_blocking(call).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down and this task goes with it.
        Err(_) => std::future::pending().await,
    }
}
