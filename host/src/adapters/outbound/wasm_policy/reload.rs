//! Hot reload of a policy file: a file notification (or the periodic check, for
//! filesystems without notifications) triggers a load once writes have settled; a file
//! that fails to read, compile, link or pass its self-test is rejected with a log line
//! and the running policy keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::runtime::Runtime;
use super::{LoadedPolicy, WasmPolicy};
use crate::adapters::inbound::file_watch;

/// Periodic check, in case notifications are lost (network filesystems, some editors).
const POLL: Duration = Duration::from_millis(500);
/// A file must stay unchanged this long before it is loaded (editors and `cp` in place
/// write in several steps; a write still going on is caught on the next wake-up).
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("policy {path}: {reason}")]
pub struct PolicyFileError {
    pub path: String,
    pub reason: String,
}

/// Reads and loads a policy file (blocking).
pub fn load_file(runtime: &Runtime, path: &Path) -> Result<LoadedPolicy, PolicyFileError> {
    let err = |reason: String| PolicyFileError {
        path: path.display().to_string(),
        reason,
    };
    // Taken before reading: if the file changes in between, the watcher sees a change
    // and loads again, rather than missing one.
    let source = signature(path);
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut loaded = LoadedPolicy::load(runtime, &path.display().to_string(), &bytes)
        .map_err(|e| err(e.to_string()))?;
    loaded.source = source;
    Ok(loaded)
}

/// What identifies one version of the file without reading it.
pub(super) fn signature(path: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Watches `path` and swaps each new good version in, until `shutdown`.
pub async fn run(policy: Arc<WasmPolicy>, path: PathBuf, shutdown: CancellationToken) {
    let changed = Arc::new(Notify::new());
    let _watch = file_watch::watch(&path, Arc::clone(&changed))
        .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "cannot watch the policy file; polling only"))
        .ok();
    let mut poll = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed.notified() => {}
            _ = poll.tick() => {}
        }
        // What is serving (or was last tried), not what this task saw last: a write that
        // landed before it started, or a reload through the admin API, counts too.
        let now = signature(&path);
        if policy.held() || now.is_none() || now == policy.current().source {
            continue;
        }
        // Load only a file that stayed the same for SETTLE (a write may be in progress).
        tokio::time::sleep(SETTLE).await;
        if signature(&path) != now {
            continue;
        }
        let p = Arc::clone(&policy);
        if let Err(e) = tokio::task::spawn_blocking(move || p.reload_file()).await {
            tracing::error!(error = %e, "policy loader failed");
        }
    }
}
