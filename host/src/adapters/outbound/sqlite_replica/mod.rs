//! The replicated side of the routing file: each row's version, the writes this POP has
//! seen, and the capture of every local write, whoever makes it.
//!
//! - `capture`: triggers in the file (so they fire for the `sqlite3` shell as much as for
//!   `edgeproxy backend`) and the stamping of captured writes with versions.
//! - `exchange`: what a peer is sent (rows it has not seen, writes seen here and no longer
//!   held) and how what a peer sends is taken in.
//! - `book`: the in-memory copy (rows, dots held, writes seen, digest) that answers peers
//!   without touching the file; changed only after the transaction that wrote it commits.
//! - `gc`: purging tombstones after the window, by this POP's own elapsed time.
//!
//! Only this struct writes versions and bookkeeping; its writes set `applying` inside their
//! transaction, which the triggers skip, so remote rows are never re-captured as local ones.
//! SQLite serialises writers, and remote rows are applied in the transaction that first
//! stamps pending local edits, so a local edit and a remote one are always ordered.

mod book;
mod capture;
mod exchange;
mod gc;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior};

use self::book::{Book, Entry};
pub use self::exchange::Applied;
use super::sqlite_routing::SCHEMA;
use crate::domain::replication::{Clock, Digest, Dot, Hlc, NodeId, Seen, Version, VersionedRow};

/// Where a POP reads wall time (unix ms): the system clock, or a test's.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn system_clock() -> WallClock {
    Arc::new(wall_ms)
}

#[derive(Debug, thiserror::Error)]
#[error("replicated routing table {path}: {reason}")]
pub struct ReplicaError {
    pub path: String,
    pub reason: String,
}

/// Local rows that cannot be replicated because the loader would skip them: (id, reason).
pub type Unreplicable = Vec<(String, String)>;

pub struct SqliteReplica {
    path: PathBuf,
    conn: Connection,
    node: NodeId,
    clock: Clock,
    book: Book,
    data_version: i64,
    wall: WallClock,
    /// How far the fleet's clocks (their median, this POP's included) are from this POP's:
    /// what "too far ahead" is measured against, so a POP whose own clock is behind still
    /// takes the fleet's writes while one peer far ahead moves nothing.
    fleet_offset_ms: i64,
    /// Ids written while no replicator held the file (noted by its triggers): the book
    /// loaded their current contents, not what was replicated, so they get a new version
    /// at the first stamp whatever they hold.
    unsure: std::collections::HashSet<String>,
    /// Held for this replica's life (or to [`Self::release`]): two replicators of one file
    /// would share a node id and number different writes alike.
    lock: std::fs::File,
}

impl SqliteReplica {
    /// Lets another process replicate the file: this one has stopped (a handover).
    pub fn release(&self) {
        if let Err(e) = self.lock.unlock() {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot release the replica lock");
        }
    }

    /// Opens (creating if missing) the routing file for replication on the system clock.
    pub fn open(path: &Path, max_skew: Duration) -> Result<Self, ReplicaError> {
        Self::open_with(path, max_skew, system_clock())
    }

    /// Opens the file with `wall` as this POP's clock: installs (or upgrades) the version
    /// tables and capture triggers, and restores this node's id, clock and bookkeeping.
    pub fn open_with(
        path: &Path,
        max_skew: Duration,
        wall: WallClock,
    ) -> Result<Self, ReplicaError> {
        let err = |e: rusqlite::Error| err_at(path, e);
        let lock = lock(path)?;
        let mut conn = super::sqlite_routing::open_writer(path, SCHEMA).map_err(err)?;
        if let Some(reason) = super::sqlite_routing::schema_problem(&conn).map_err(err)? {
            return Err(ReplicaError {
                path: path.display().to_string(),
                reason,
            });
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        super::sqlite_routing::ensure_owners(&tx).map_err(err)?;
        let node = capture::install(&tx, &wall).map_err(err)?;
        tx.commit().map_err(err)?;
        let last = Hlc(state(&conn, "last_hlc").map_err(err)?.unwrap_or(0) as u64);
        let book = Book::load(&conn).map_err(err)?;
        let unsure = conn
            .prepare("SELECT DISTINCT id FROM _edgeproxy_dirty WHERE id IS NOT NULL")
            .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
            .map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            conn,
            node,
            clock: Clock::new(last, max_skew.as_millis() as u64),
            book,
            data_version: -1,
            wall,
            fleet_offset_ms: 0,
            unsure,
            lock,
        })
    }

    fn err(&self, e: rusqlite::Error) -> ReplicaError {
        err_at(&self.path, e)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    pub fn now(&self) -> u64 {
        (self.wall)()
    }

    /// Sets how far the fleet's median clock is from this POP's (ms; see the field).
    pub fn set_fleet_offset(&mut self, ms: i64) {
        self.fleet_offset_ms = ms;
    }

    pub fn digest(&self) -> Digest {
        self.book.digest.clone()
    }

    pub fn seen(&self) -> &Seen {
        &self.book.seen
    }

    /// Every row held, tombstones included.
    pub fn rows(&self) -> impl Iterator<Item = &VersionedRow> {
        self.book.rows()
    }

    /// Live rows and tombstones.
    pub fn counts(&self) -> (usize, usize) {
        self.book.counts()
    }

    /// Whether any connection committed since the last call (`PRAGMA data_version`).
    pub fn changed(&mut self) -> Result<bool, ReplicaError> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(std::mem::replace(&mut self.data_version, v) != v)
    }

    /// Runs `write` in one immediate transaction that first stamps pending local edits
    /// (so they take part in whatever `write` compares), then commits, and only then
    /// updates the in-memory copy and the clock. On any error nothing in memory changed,
    /// and the next check for local writes looks again (a busy lock loses no write).
    fn transact<T>(
        &mut self,
        write: impl FnOnce(&mut Txn<'_>) -> rusqlite::Result<T>,
    ) -> Result<(T, capture::Stamped), ReplicaError> {
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut txn = Txn {
                tx: &tx,
                book: &self.book,
                unsure: &self.unsure,
                staged: book::Staged::default(),
                clock: self.clock.clone(),
                node: self.node,
                now: (self.wall)(),
                fleet_offset_ms: self.fleet_offset_ms,
            };
            let stamped = capture::stamp(&mut txn)?;
            let out = write(&mut txn)?;
            let (staged, clock) = (txn.staged, txn.clock);
            book::persist(&tx, &self.book, &staged)?;
            save_clock(&tx, clock.last())?;
            tx.commit()?;
            Ok((out, stamped, staged, clock))
        })();
        match result {
            Ok((out, stamped, staged, clock)) => {
                self.book.commit(staged);
                self.clock = clock;
                self.unsure.clear();
                Ok((out, stamped))
            }
            Err(e) => {
                self.data_version = -1;
                Err(self.err(e))
            }
        }
    }

    /// Removes for good each row `candidates` names that is still held at that write (a dot
    /// names one write, so a row changed since is left alone; pending local edits are
    /// stamped first, so one made meanwhile is a new write and stays). Returns the ids
    /// removed and the local edits stamped.
    fn forget_held(
        &mut self,
        candidates: Vec<(String, Dot)>,
    ) -> Result<(Vec<String>, Vec<VersionedRow>), ReplicaError> {
        if candidates.is_empty() {
            return Ok(Default::default());
        }
        let (gone, (stamped, _)) = self.transact(|t| {
            let mut gone = Vec::new();
            for (id, dot) in candidates {
                if t.held(&id).is_some_and(|h| h.dot() == dot) {
                    t.forget(&id)?;
                    gone.push(id);
                }
            }
            Ok(gone)
        })?;
        Ok((gone, stamped))
    }

    /// Peers learned by gossip, remembered so a restart finds the cluster without its
    /// bootstrap list.
    pub fn known_peers(&self) -> Vec<String> {
        self.conn
            .query_row(
                "SELECT value FROM _edgeproxy_state WHERE key = 'peers'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .ok()
            .flatten()
            .map(|s| {
                s.split(',')
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn remember_peers(&self, peers: &[String]) -> Result<(), ReplicaError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO _edgeproxy_state VALUES ('peers', ?1)",
                [peers.join(",")],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }
}

/// One write transaction: the file, what memory will become once it commits, and the
/// clock it advances.
struct Txn<'a> {
    tx: &'a Connection,
    book: &'a Book,
    unsure: &'a std::collections::HashSet<String>,
    staged: book::Staged,
    clock: Clock,
    node: NodeId,
    now: u64,
    fleet_offset_ms: i64,
}

impl Txn<'_> {
    /// The fleet's time: what a remote clock reading is checked against.
    fn fleet_now(&self) -> u64 {
        (self.now as i64)
            .saturating_add(self.fleet_offset_ms)
            .max(0) as u64
    }

    /// The row held for `id`, as this transaction leaves it so far.
    fn held(&self, id: &str) -> Option<&VersionedRow> {
        self.staged.held(self.book, id)
    }

    fn has_seen(&self, d: Dot) -> bool {
        self.book.seen.contains(d) || self.staged.seen.contains(d)
    }

    /// Writes `r` to `backends` and its version, as the replicator, and stages it.
    fn put(&mut self, r: VersionedRow) -> rusqlite::Result<()> {
        as_replicator(self.tx, || {
            super::sqlite_routing::write_row(self.tx, &r.row)
        })?;
        self.tx.execute(
            "INSERT OR REPLACE INTO _edgeproxy_versions (id, hlc, node, seq, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                r.row.id,
                r.version.hlc.0 as i64,
                r.version.node.0 as i64,
                r.seq as i64,
                self.now as i64
            ],
        )?;
        self.staged.seen.insert(r.dot());
        self.staged.put(Entry {
            row: r,
            at: self.now,
        });
        Ok(())
    }

    /// Removes `id` for good (no tombstone: a write superseded here, or one purged); its
    /// dot stays seen, so it is never taken again.
    fn forget(&mut self, id: &str) -> rusqlite::Result<()> {
        as_replicator(self.tx, || {
            self.tx
                .execute("DELETE FROM backends WHERE id = ?1", [id])?;
            // A row gone for good leaves no owner for a later row of its id to inherit.
            self.tx
                .execute("DELETE FROM _edgeproxy_owners WHERE id = ?1", [id])
        })?;
        self.tx
            .execute("DELETE FROM _edgeproxy_versions WHERE id = ?1", [id])?;
        self.staged.remove(id);
        Ok(())
    }

    /// A fresh version for a local write.
    fn next_version(&mut self) -> (Version, u64) {
        let seq = self
            .book
            .seen
            .last(self.node)
            .max(self.staged.seen.last(self.node))
            + 1;
        let version = Version {
            hlc: self.clock.tick(self.now),
            node: self.node,
        };
        (version, seq)
    }
}

/// Takes `<file>.replica-lock`, or says which file another process replicates.
fn lock(path: &Path) -> Result<std::fs::File, ReplicaError> {
    let lock_path = PathBuf::from(format!("{}.replica-lock", path.display()));
    let fail = |reason: String| ReplicaError {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| fail(format!("{}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(fail(format!(
            "another edgeproxy replicates this file (it holds {}); one replicator per routing file",
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(fail(format!("{}: {e}", lock_path.display()))),
    }
}

fn err_at(path: &Path, e: rusqlite::Error) -> ReplicaError {
    ReplicaError {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn state(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT value FROM _edgeproxy_state WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

/// Runs `write` as the replicator: the capture triggers skip what it writes. The flag is
/// set and cleared inside the caller's transaction, so no other connection ever sees it.
fn as_replicator<T>(
    tx: &Connection,
    write: impl FnOnce() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    tx.execute(
        "UPDATE _edgeproxy_state SET value = 1 WHERE key = 'applying'",
        [],
    )?;
    let out = write()?;
    tx.execute(
        "UPDATE _edgeproxy_state SET value = 0 WHERE key = 'applying'",
        [],
    )?;
    Ok(out)
}

fn save_clock(conn: &Connection, hlc: Hlc) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO _edgeproxy_state VALUES ('last_hlc', ?1)",
        [hlc.0 as i64],
    )
    .map(drop)
}

/// Longest id or text column accepted from a peer: a routing row is small, a huge one is
/// an attack or a bug, and either way must not fill every POP's disk.
const MAX_TEXT: usize = 256;

/// The loader's own checks (a tombstone's contents too, so a deleted row can come back as
/// it was), plus size caps for what comes from the network.
fn validate(row: &crate::domain::replication::BackendRow) -> Result<(), String> {
    let owner = row.owner.clone().unwrap_or_default();
    let texts = [
        &row.id,
        &row.app,
        &row.region,
        &row.country,
        &row.wg_ip,
        &owner,
    ];
    if let Some(long) = texts.iter().find(|t| t.len() > MAX_TEXT) {
        return Err(format!(
            "a column is {} bytes (at most {MAX_TEXT})",
            long.len()
        ));
    }
    super::sqlite_routing::check_as_live(row.values().to_vec())
}

#[cfg(test)]
mod tests;
