//! Watches a file (through its directory, so atomic renames and recreated files are seen)
//! and pokes a `Notify` when it or its SQLite WAL/journal changes. Reads and the
//! shared-memory index are ignored, so a reader reloading never triggers itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// Keeps the watch alive while held.
pub struct FileWatch {
    _watcher: RecommendedWatcher,
}

pub fn watch(path: &Path, changed: Arc<Notify>) -> notify::Result<FileWatch> {
    let path = std::path::absolute(path)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let relevant = move |p: &Path| {
        p.file_name().is_some_and(|f| {
            let f = f.to_string_lossy();
            f == name || f == format!("{name}-wal") || f == format!("{name}-journal")
        })
    };
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        let writes = matches!(
            ev.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        );
        if writes && ev.paths.iter().any(|p| relevant(p)) {
            changed.notify_one();
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(FileWatch { _watcher: watcher })
}

/// Pokes `changed` on any change in `dir` (certificates renewed by renaming files or
/// swapping symlinks, as certbot and Kubernetes secrets do).
pub fn watch_dir(dir: &Path, changed: Arc<Notify>) -> notify::Result<FileWatch> {
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && matches!(
                ev.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            )
        {
            changed.notify_one();
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(FileWatch { _watcher: watcher })
}
