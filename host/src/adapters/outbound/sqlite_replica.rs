//! The replicated side of the routing file: versions beside `backends`, and the capture of
//! every local write, whoever makes it.
//!
//! Triggers in the file itself (so they fire for the `sqlite3` shell as much as for
//! `edgeproxy backend`) note each written id in `_edgeproxy_dirty` and turn a hard `DELETE`
//! into a tombstone (`deleted = 1`). The replicator stamps dirty ids with a fresh version
//! and broadcasts them; its own writes set `applying` inside their transaction, which the
//! triggers skip, so remote rows are never re-captured as local ones. SQLite serialises
//! writers, and remote rows are applied in the same transaction that first stamps pending
//! local edits, so a local edit and a remote one cannot overwrite each other unordered.
//!
//! An in-memory copy of every versioned row answers digests and sync requests without
//! touching the file; only this struct writes versions, so the copy stays exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use super::sqlite_editor::backend_row;
use super::sqlite_routing::{COLUMNS, SCHEMA, check_as_live, upsert_sql};
use crate::domain::replication::{
    BackendRow, Clock, ClockAhead, Digest, Hlc, NodeId, Version, VersionedRow, bucket_of,
};

const REPLICATION_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _edgeproxy_versions (
    id TEXT PRIMARY KEY, hlc INTEGER NOT NULL, node INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS _edgeproxy_dirty (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS _edgeproxy_state (key TEXT PRIMARY KEY, value);
INSERT OR IGNORE INTO _edgeproxy_state VALUES ('applying', 0);
CREATE TRIGGER IF NOT EXISTS _edgeproxy_capture_insert AFTER INSERT ON backends
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN INSERT OR IGNORE INTO _edgeproxy_dirty VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS _edgeproxy_capture_update AFTER UPDATE ON backends
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN
    INSERT OR IGNORE INTO _edgeproxy_dirty VALUES (NEW.id);
    INSERT OR IGNORE INTO _edgeproxy_dirty VALUES (OLD.id);
END;
CREATE TRIGGER IF NOT EXISTS _edgeproxy_tombstone BEFORE DELETE ON backends
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN
    UPDATE backends SET deleted = 1 WHERE id = OLD.id;
    SELECT RAISE(IGNORE);
END;
-- Rows written before replication was switched on are this node's to announce.
INSERT OR IGNORE INTO _edgeproxy_dirty
    SELECT id FROM backends WHERE id NOT IN (SELECT id FROM _edgeproxy_versions);
";

/// Longest id or text column accepted from a peer: a routing row is small, a huge one is
/// an attack or a bug, and either way must not fill every POP's disk.
const MAX_TEXT: usize = 256;

#[derive(Debug, thiserror::Error)]
#[error("replicated routing table {path}: {reason}")]
pub struct ReplicaError {
    pub path: String,
    pub reason: String,
}

/// What applying a batch of remote rows did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Rows that won and were written.
    pub applied: Vec<VersionedRow>,
    /// Rows this node already had, or had newer.
    pub stale: usize,
    /// Rows that failed validation: (id, reason).
    pub rejected: Vec<(String, String)>,
    /// Rows written by a clock too far ahead, left for a later sync.
    pub ahead: Vec<(String, ClockAhead)>,
    /// Local edits found pending and stamped first (to broadcast).
    pub stamped: Vec<VersionedRow>,
}

/// Local rows that cannot be replicated because the loader would skip them: (id, reason).
pub type Unreplicable = Vec<(String, String)>;

pub struct SqliteReplica {
    path: PathBuf,
    conn: Connection,
    node: NodeId,
    clock: Clock,
    rows: Rows,
    data_version: i64,
    /// Tombstones older than this were purged here: an unknown row older than it is a
    /// deleted row coming back, not news.
    gc_watermark: Hlc,
    /// Wall time (ms) of the last anti-entropy round this node completed.
    last_sync_ms: u64,
}

pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SqliteReplica {
    /// Opens (creating if missing) the routing file for replication: installs the version
    /// tables and capture triggers, and restores this node's id and clock.
    pub fn open(path: &Path, max_skew: Duration) -> Result<Self, ReplicaError> {
        let err = |e: rusqlite::Error| ReplicaError {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let conn = super::sqlite_routing::open_writer(path, SCHEMA).map_err(err)?;
        if let Some(reason) = super::sqlite_routing::schema_problem(&conn).map_err(err)? {
            return Err(ReplicaError {
                path: path.display().to_string(),
                reason,
            });
        }
        conn.execute_batch(REPLICATION_SCHEMA).map_err(err)?;
        let state = |key: &str| -> rusqlite::Result<Option<i64>> {
            conn.query_row(
                "SELECT value FROM _edgeproxy_state WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()
        };
        let node = match state("node").map_err(err)? {
            Some(n) => NodeId(n as u64),
            None => {
                // Never 0, which reads as "unset" in logs and wire messages.
                let n = fastrand::u64(1..);
                conn.execute(
                    "INSERT INTO _edgeproxy_state VALUES ('node', ?1)",
                    [n as i64],
                )
                .map_err(err)?;
                NodeId(n)
            }
        };
        let last = Hlc(state("last_hlc").map_err(err)?.unwrap_or(0) as u64);
        let gc_watermark = Hlc(state("gc_watermark").map_err(err)?.unwrap_or(0) as u64);
        let last_sync_ms = state("last_sync").map_err(err)?.unwrap_or(0) as u64;
        let mut replica = Self {
            path: path.to_owned(),
            conn,
            node,
            clock: Clock::new(last, max_skew.as_millis() as u64),
            rows: Rows::default(),
            data_version: -1,
            gc_watermark,
            last_sync_ms,
        };
        for r in replica.read_versioned().map_err(err)? {
            replica.rows.put(r);
        }
        Ok(replica)
    }

    fn err(&self, e: rusqlite::Error) -> ReplicaError {
        ReplicaError {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    fn read_versioned(&self) -> rusqlite::Result<Vec<VersionedRow>> {
        let cols = COLUMNS.map(|c| format!("b.{c}")).join(", ");
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {cols}, v.hlc, v.node FROM backends b JOIN _edgeproxy_versions v ON v.id = b.id"
        ))?;
        let mut out = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            // A row that no longer reads (edited by hand since) is re-announced when its
            // edit is stamped; until then it is not offered to peers.
            if let Ok(row) = backend_row(r) {
                let version = Version {
                    hlc: Hlc(r.get::<_, i64>(11)? as u64),
                    node: NodeId(r.get::<_, i64>(12)? as u64),
                };
                out.push(VersionedRow { version, row });
            }
        }
        Ok(out)
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

    /// Whether any connection committed since the last call (`PRAGMA data_version`).
    pub fn changed(&mut self) -> Result<bool, ReplicaError> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(std::mem::replace(&mut self.data_version, v) != v)
    }

    /// Stamps pending local edits with fresh versions: the rows to broadcast, and the ones
    /// the loader would skip (not replicated until fixed).
    pub fn stamp_local(&mut self) -> Result<(Vec<VersionedRow>, Unreplicable), ReplicaError> {
        // An import or a hand-made migration may have recreated the table, and with it
        // dropped the triggers: put them back and pick up rows that went unnoticed.
        self.conn
            .execute_batch(REPLICATION_SCHEMA)
            .map_err(|e| err_at(&self.path, e))?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| err_at(&self.path, e))?;
        let out = stamp(&tx, &mut self.clock, self.node, &self.rows.by_id)
            .map_err(|e| err_at(&self.path, e))?;
        tx.commit().map_err(|e| err_at(&self.path, e))?;
        for r in &out.0 {
            self.rows.put(r.clone());
        }
        Ok(out)
    }

    /// Merges remote rows: each is validated as the loader would, and written only when it
    /// supersedes what this node has. Pending local edits are stamped first, in the same
    /// transaction, so they take part in the comparison.
    pub fn apply(&mut self, incoming: Vec<VersionedRow>) -> Result<Applied, ReplicaError> {
        let now = wall_ms();
        let path = self.path.clone();
        let e = |e| err_at(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(e)?;
        let (stamped, _) = stamp(&tx, &mut self.clock, self.node, &self.rows.by_id).map_err(e)?;
        for r in &stamped {
            self.rows.put(r.clone());
        }
        let mut out = Applied {
            stamped,
            ..Applied::default()
        };
        as_replicator(&tx, || {
            for r in incoming {
                if let Err(reason) = validate(&r.row) {
                    out.rejected.push((r.row.id.clone(), reason));
                    continue;
                }
                let held = self.rows.by_id.get(&r.row.id);
                if !r.supersedes(held) || (held.is_none() && r.version.hlc < self.gc_watermark) {
                    out.stale += 1;
                    continue;
                }
                if let Err(ahead) = self.clock.observe(r.version.hlc, now) {
                    out.ahead.push((r.row.id.clone(), ahead));
                    continue;
                }
                tx.execute(&upsert_sql(), rusqlite::params_from_iter(r.row.values()))?;
                write_version(&tx, &r.row.id, r.version)?;
                self.rows.put(r.clone());
                out.applied.push(r);
            }
            Ok(())
        })
        .map_err(e)?;
        save_clock(&tx, self.clock.last()).map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(out)
    }

    pub fn gc_watermark(&self) -> Hlc {
        self.gc_watermark
    }

    pub fn last_sync_ms(&self) -> u64 {
        self.last_sync_ms
    }

    /// Records a completed anti-entropy round that started at `at_ms`.
    pub fn synced(&mut self, at_ms: u64) -> Result<(), ReplicaError> {
        self.last_sync_ms = self.last_sync_ms.max(at_ms);
        self.conn
            .execute(
                "INSERT OR REPLACE INTO _edgeproxy_state VALUES ('last_sync', ?1)",
                [self.last_sync_ms as i64],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Purges tombstones stamped before `cutoff_ms` (wall ms) and raises the watermark to
    /// it. Returns how many went.
    pub fn purge_tombstones(&mut self, cutoff_ms: u64) -> Result<usize, ReplicaError> {
        let cutoff = Hlc::from_millis(cutoff_ms);
        let old: Vec<String> = self
            .rows
            .by_id
            .values()
            .filter(|r| r.row.deleted && r.version.hlc < cutoff)
            .map(|r| r.row.id.clone())
            .collect();
        // Only if still a tombstone: an undelete may have committed since.
        self.forget(&old, cutoff, "AND deleted != 0")?;
        Ok(old.len())
    }

    /// After a peer's full table showed this node was away longer than the tombstone window
    /// (`watermark`, the peer's): drops the rows older than it that the peer does not hold,
    /// since they are deletes this node missed. Newer rows stay and merge as usual.
    pub fn reset_to(
        &mut self,
        peer_ids: &std::collections::HashSet<String>,
        watermark: Hlc,
    ) -> Result<Vec<String>, ReplicaError> {
        let gone: Vec<String> = self
            .rows
            .by_id
            .values()
            .filter(|r| r.version.hlc < watermark && !peer_ids.contains(&r.row.id))
            .map(|r| r.row.id.clone())
            .collect();
        self.forget(&gone, watermark, "")?;
        Ok(gone)
    }

    /// Removes `ids` for good (no tombstone: the replicator's own write) and raises the
    /// watermark to `watermark`.
    fn forget(&mut self, ids: &[String], watermark: Hlc, only: &str) -> Result<(), ReplicaError> {
        let path = self.path.clone();
        let e = |e| err_at(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(e)?;
        as_replicator(&tx, || {
            for id in ids {
                tx.execute(&format!("DELETE FROM backends WHERE id = ?1 {only}"), [id])?;
                tx.execute("DELETE FROM _edgeproxy_versions WHERE id = ?1", [id])?;
            }
            Ok(())
        })
        .map_err(e)?;
        let watermark = self.gc_watermark.max(watermark);
        tx.execute(
            "INSERT OR REPLACE INTO _edgeproxy_state VALUES ('gc_watermark', ?1)",
            [watermark.0 as i64],
        )
        .map_err(e)?;
        tx.commit().map_err(e)?;
        self.gc_watermark = watermark;
        for id in ids {
            self.rows.remove(id);
        }
        Ok(())
    }

    pub fn digest(&self) -> Digest {
        self.rows.digest.clone()
    }

    /// Every versioned row in the given digest buckets.
    pub fn in_buckets(&self, buckets: &[usize]) -> Vec<VersionedRow> {
        self.page(buckets, None, usize::MAX).0
    }

    /// Up to `limit` rows of the given buckets with ids after `after`, in id order, and
    /// the id to continue after when there are more.
    pub fn page(
        &self,
        buckets: &[usize],
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<VersionedRow>, Option<String>) {
        use std::ops::Bound;
        let from = match after {
            Some(id) => Bound::Excluded(id.to_owned()),
            None => Bound::Unbounded,
        };
        let mut rows = self
            .rows
            .by_id
            .range((from, Bound::Unbounded))
            .map(|(_, r)| r)
            .filter(|r| buckets.contains(&bucket_of(&r.row.id)));
        let page: Vec<VersionedRow> = rows.by_ref().take(limit).cloned().collect();
        let next = match rows.next() {
            Some(_) => page.last().map(|r| r.row.id.clone()),
            None => None,
        };
        (page, next)
    }

    pub fn rows(&self) -> impl Iterator<Item = &VersionedRow> {
        self.rows.by_id.values()
    }

    /// Live rows and tombstones.
    pub fn counts(&self) -> (usize, usize) {
        let dead = self.rows.tombstones;
        (self.rows.by_id.len() - dead, dead)
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

/// The versioned rows, with the table digest kept up to date as they change (a sync round
/// compares digests several times a second; recomputing them would cost a pass over every
/// row each time).
struct Rows {
    by_id: BTreeMap<String, VersionedRow>,
    digest: Digest,
    tombstones: usize,
}

impl Default for Rows {
    fn default() -> Self {
        Self {
            by_id: BTreeMap::new(),
            digest: Digest::of([]),
            tombstones: 0,
        }
    }
}

impl Rows {
    fn put(&mut self, r: VersionedRow) {
        let bucket = bucket_of(&r.row.id);
        self.digest.0[bucket] ^= r.fingerprint();
        self.tombstones += usize::from(r.row.deleted);
        if let Some(old) = self.by_id.insert(r.row.id.clone(), r) {
            self.forgot(&old);
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            self.forgot(&old);
        }
    }

    fn forgot(&mut self, old: &VersionedRow) {
        self.digest.0[bucket_of(&old.row.id)] ^= old.fingerprint();
        self.tombstones -= usize::from(old.row.deleted);
    }
}

fn err_at(path: &Path, e: rusqlite::Error) -> ReplicaError {
    ReplicaError {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The loader's own checks, plus size caps for what comes from the network.
fn validate(row: &BackendRow) -> Result<(), String> {
    let texts = [&row.id, &row.app, &row.region, &row.country, &row.wg_ip];
    if let Some(long) = texts.iter().find(|t| t.len() > MAX_TEXT) {
        return Err(format!(
            "a column is {} bytes (at most {MAX_TEXT})",
            long.len()
        ));
    }
    check_as_live(row.values().to_vec())
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

fn write_version(conn: &Connection, id: &str, v: Version) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO _edgeproxy_versions VALUES (?1, ?2, ?3)",
        params![id, v.hlc.0 as i64, v.node.0 as i64],
    )
    .map(drop)
}

fn save_clock(conn: &Connection, hlc: Hlc) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO _edgeproxy_state VALUES ('last_hlc', ?1)",
        [hlc.0 as i64],
    )
    .map(drop)
}

/// Turns every dirty id into a versioned row (a vanished id, renamed away, becomes a
/// tombstone of its last replicated contents) and clears the dirty list.
fn stamp(
    tx: &Connection,
    clock: &mut Clock,
    node: NodeId,
    known: &BTreeMap<String, VersionedRow>,
) -> rusqlite::Result<(Vec<VersionedRow>, Unreplicable)> {
    let dirty: Vec<String> = tx
        .prepare("SELECT id FROM _edgeproxy_dirty")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if dirty.is_empty() {
        return Ok(Default::default());
    }
    let (mut out, mut bad) = (Vec::new(), Vec::new());
    let select = format!("SELECT {} FROM backends WHERE id = ?1", COLUMNS.join(", "));
    for id in dirty {
        let current = tx.query_row(&select, [&id], backend_row).optional();
        let row = match current {
            Ok(Some(row)) => row,
            Ok(None) => match known.get(&id) {
                Some(k) if !k.row.deleted => {
                    let row = BackendRow {
                        deleted: true,
                        ..k.row.clone()
                    };
                    as_replicator(tx, || {
                        tx.execute(&upsert_sql(), rusqlite::params_from_iter(row.values()))
                    })?;
                    row
                }
                _ => continue,
            },
            Err(e) => {
                bad.push((id, e.to_string()));
                continue;
            }
        };
        if let Err(reason) = validate(&row) {
            bad.push((id, reason));
            continue;
        }
        let version = Version {
            hlc: clock.tick(wall_ms()),
            node,
        };
        write_version(tx, &row.id, version)?;
        out.push(VersionedRow { version, row });
    }
    tx.execute("DELETE FROM _edgeproxy_dirty", [])?;
    save_clock(tx, clock.last())?;
    Ok((out, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, SqliteReplica) {
        let dir = tempfile::tempdir().unwrap();
        let r =
            SqliteReplica::open(&dir.path().join("routing.db"), Duration::from_secs(60)).unwrap();
        (dir, r)
    }

    fn shell(r: &SqliteReplica, sql: &str) {
        // Another client, as the sqlite3 shell would be.
        Connection::open(&r.path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    const ROW: &str = "INSERT INTO backends VALUES ('a','web','eu','DE','10.0.0.1',80,1,1,10,0,0);";

    #[test]
    fn any_clients_writes_are_captured_and_a_hard_delete_becomes_a_tombstone() {
        let (_d, mut r) = open();
        shell(&r, ROW);
        let (stamped, bad) = r.stamp_local().unwrap();
        assert!(bad.is_empty());
        assert_eq!(stamped.len(), 1);
        assert_eq!(stamped[0].version.node, r.node());
        assert!(r.stamp_local().unwrap().0.is_empty(), "stamped once");

        shell(&r, "DELETE FROM backends WHERE id = 'a'");
        let (stamped, _) = r.stamp_local().unwrap();
        assert!(stamped[0].row.deleted, "{stamped:?}");
        let deleted: i64 = r
            .conn
            .query_row("SELECT deleted FROM backends WHERE id = 'a'", [], |x| {
                x.get(0)
            })
            .unwrap();
        assert_eq!(deleted, 1, "the row stays, as a tombstone");
        assert_eq!(r.counts(), (0, 1));
    }

    #[test]
    fn remote_rows_merge_by_version_and_are_not_recaptured() {
        let (_d, mut a) = open();
        let (_d2, mut b) = open();
        shell(&a, ROW);
        let (rows, _) = a.stamp_local().unwrap();
        let applied = b.apply(rows.clone()).unwrap();
        assert_eq!(applied.applied.len(), 1);
        assert!(
            b.stamp_local().unwrap().0.is_empty(),
            "a remote row is not re-broadcast"
        );
        assert_eq!(a.digest(), b.digest());
        assert_eq!(
            b.apply(rows).unwrap().stale,
            1,
            "a duplicate changes nothing"
        );

        // B edits after seeing A's write: B's version is later and wins at A.
        shell(&b, "UPDATE backends SET port = 81 WHERE id = 'a'");
        let (rows, _) = b.stamp_local().unwrap();
        assert_eq!(a.apply(rows).unwrap().applied.len(), 1);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest(), Digest::of(a.rows()), "kept digest = recomputed");
    }

    #[test]
    fn a_pending_local_edit_is_stamped_before_remote_rows_are_compared() {
        let (_d, mut a) = open();
        let (_d2, mut b) = open();
        shell(&a, ROW);
        let (old, _) = a.stamp_local().unwrap();
        b.apply(old.clone()).unwrap();
        shell(&b, "UPDATE backends SET port = 99 WHERE id = 'a'");
        // A's stale row arrives before B's replicator noticed its own edit.
        let out = b.apply(old).unwrap();
        assert_eq!(out.stamped.len(), 1);
        assert_eq!(out.stale, 1);
        let port: i64 = b
            .conn
            .query_row("SELECT port FROM backends WHERE id = 'a'", [], |x| x.get(0))
            .unwrap();
        assert_eq!(port, 99, "the local edit survives");
    }

    #[test]
    fn bad_remote_rows_are_rejected_with_the_reason() {
        let (_d, mut r) = open();
        let mut row = VersionedRow {
            version: Version {
                hlc: Hlc::from_millis(wall_ms()),
                node: NodeId(7),
            },
            row: BackendRow {
                id: "x".into(),
                app: "web".into(),
                region: "eu".into(),
                country: "DE".into(),
                wg_ip: "not-an-ip".into(),
                port: 80,
                healthy: true,
                weight: 1,
                soft_limit: 1,
                hard_limit: 0,
                deleted: false,
            },
        };
        let out = r.apply(vec![row.clone()]).unwrap();
        assert!(out.rejected[0].1.contains("wg_ip"), "{out:?}");
        row.row.wg_ip = "10.0.0.1".into();
        row.version.hlc = Hlc::from_millis(wall_ms() + 3_600_000);
        let out = r.apply(vec![row]).unwrap();
        assert_eq!(out.ahead.len(), 1, "{out:?}");
        assert!(out.applied.is_empty());
        assert_eq!(r.counts(), (0, 0));
    }

    #[test]
    fn purged_tombstones_do_not_come_back_from_a_node_that_was_away() {
        let (_d, mut a) = open();
        let (_d2, mut b) = open();
        shell(&a, ROW);
        let (live, _) = a.stamp_local().unwrap();
        b.apply(live.clone()).unwrap();
        // B goes away; A deletes the row and, past the window, purges the tombstone.
        shell(&a, "DELETE FROM backends WHERE id = 'a'");
        a.stamp_local().unwrap();
        a.purge_tombstones(wall_ms() + 1).unwrap();
        assert_eq!(a.counts(), (0, 0));
        // B's old live row is not news to A...
        assert_eq!(a.apply(live).unwrap().stale, 1);
        assert_eq!(a.counts(), (0, 0));
        // ...and B, shown A's full table and watermark, drops it.
        let ids = a.rows().map(|r| r.row.id.clone()).collect();
        assert_eq!(b.reset_to(&ids, a.gc_watermark()).unwrap(), ["a"]);
        assert_eq!(b.counts(), (0, 0));
        assert_eq!(a.digest(), b.digest());
        for r in [&a, &b] {
            assert_eq!(r.digest(), Digest::of(r.rows()), "kept digest = recomputed");
        }
        // A new write of the same id is newer than the window, and is accepted.
        shell(&b, ROW);
        let (again, _) = b.stamp_local().unwrap();
        assert_eq!(a.apply(again).unwrap().applied.len(), 1);
    }

    #[test]
    fn rows_page_in_id_order_with_a_cursor() {
        let (_d, mut r) = open();
        for id in ["a", "b", "c", "d", "e"] {
            shell(
                &r,
                &format!(
                    "INSERT INTO backends VALUES ('{id}','web','eu','DE','10.0.0.1',80,1,1,10,0,0)"
                ),
            );
        }
        r.stamp_local().unwrap();
        let all: Vec<usize> = (0..crate::domain::replication::BUCKETS).collect();
        let ids = |rows: Vec<VersionedRow>| rows.into_iter().map(|r| r.row.id).collect::<Vec<_>>();
        let (first, next) = r.page(&all, None, 2);
        assert_eq!(
            (ids(first), next.as_deref()),
            (vec!["a".to_owned(), "b".into()], Some("b"))
        );
        let (second, next) = r.page(&all, Some("b"), 2);
        assert_eq!(
            (ids(second), next.as_deref()),
            (vec!["c".to_owned(), "d".into()], Some("d"))
        );
        let (last, next) = r.page(&all, Some("d"), 2);
        assert_eq!((ids(last), next), (vec!["e".to_owned()], None));
    }

    #[test]
    fn node_id_and_clock_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let mut r = SqliteReplica::open(&path, Duration::from_secs(60)).unwrap();
        shell(&r, ROW);
        let (rows, _) = r.stamp_local().unwrap();
        let node = r.node();
        drop(r);
        let r = SqliteReplica::open(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(r.node(), node);
        assert!(r.clock() >= rows[0].version.hlc);
        assert_eq!(r.rows().count(), 1);
    }
}
