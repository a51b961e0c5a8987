//! Every local write captured, whoever makes it: triggers in the file note each written id
//! in `_edgeproxy_dirty` and turn a hard `DELETE` into a tombstone (`deleted = 1`); stamping
//! turns the noted ids into versioned rows.
//!
//! The dirty list is keyed by its own sequence, not by id, so a trigger's insert can never
//! conflict: an outer `INSERT ... ON CONFLICT DO UPDATE` or `INSERT OR REPLACE` imposes its
//! conflict policy on the trigger's statements (SQLite documents this), which made an
//! id-keyed `INSERT OR IGNORE` fail every UPSERT of an existing row.
//!
//! A script that drops and recreates `backends` drops the triggers with it; stamping
//! notices, puts them back, and compares the whole table with what it holds, so the rows
//! the script changed, added or left out are all replicated.

use rusqlite::{Connection, OptionalExtension as _};

use super::{Txn, Unreplicable, WallClock, as_replicator, state, validate};
use crate::adapters::outbound::sqlite_editor::backend_row;
use crate::adapters::outbound::sqlite_routing::{rows_sql, write_row};
use crate::domain::replication::{BackendRow, NodeId, VersionedRow};

/// The bookkeeping's layout; 2 added write sequence numbers and the writes seen.
const LAYOUT: i64 = 2;

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS _edgeproxy_state (key TEXT PRIMARY KEY, value);
INSERT OR IGNORE INTO _edgeproxy_state VALUES ('applying', 0);
CREATE TABLE IF NOT EXISTS _edgeproxy_versions (
    id TEXT PRIMARY KEY, hlc INTEGER NOT NULL, node INTEGER NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0, at INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS _edgeproxy_seen (
    node INTEGER NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL, PRIMARY KEY (node, lo));
CREATE TABLE IF NOT EXISTS _edgeproxy_dirty (seq INTEGER PRIMARY KEY, id TEXT);
";

const TRIGGER_NAMES: [&str; 3] = [
    "_edgeproxy_capture_insert",
    "_edgeproxy_capture_update",
    "_edgeproxy_tombstone",
];

const TRIGGERS: &str = "
CREATE TRIGGER IF NOT EXISTS _edgeproxy_capture_insert AFTER INSERT ON backends
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN INSERT INTO _edgeproxy_dirty (id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS _edgeproxy_capture_update AFTER UPDATE ON backends
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN
    INSERT INTO _edgeproxy_dirty (id) VALUES (NEW.id);
    INSERT INTO _edgeproxy_dirty (id) SELECT OLD.id WHERE OLD.id IS NOT NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS _edgeproxy_tombstone BEFORE DELETE ON backends
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN
    UPDATE backends SET deleted = 1 WHERE id = OLD.id;
    SELECT RAISE(IGNORE);
END;
";

const OWNER_TRIGGER_NAMES: [&str; 3] = [
    "_edgeproxy_capture_owner_insert",
    "_edgeproxy_capture_owner_update",
    "_edgeproxy_capture_owner_delete",
];

/// Changes of who manages a row are changes of the row.
const OWNER_TRIGGERS: &str = "
CREATE TRIGGER IF NOT EXISTS _edgeproxy_capture_owner_insert AFTER INSERT ON _edgeproxy_owners
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN INSERT INTO _edgeproxy_dirty (id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS _edgeproxy_capture_owner_update AFTER UPDATE ON _edgeproxy_owners
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN
    INSERT INTO _edgeproxy_dirty (id) VALUES (NEW.id);
    INSERT INTO _edgeproxy_dirty (id) SELECT OLD.id WHERE OLD.id IS NOT NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS _edgeproxy_capture_owner_delete AFTER DELETE ON _edgeproxy_owners
WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
BEGIN INSERT INTO _edgeproxy_dirty (id) VALUES (OLD.id); END;
";

/// Local writes stamped (to push) and local rows the loader would skip (not replicated).
pub(super) type Stamped = (Vec<VersionedRow>, Unreplicable);

/// Installs (or upgrades) the bookkeeping and triggers in `tx`; returns this node's id.
pub(super) fn install(tx: &Connection, wall: &WallClock) -> rusqlite::Result<NodeId> {
    tx.execute_batch("CREATE TABLE IF NOT EXISTS _edgeproxy_state (key TEXT PRIMARY KEY, value);")?;
    let node = match state(tx, "node")? {
        Some(n) => NodeId(n as u64),
        None => {
            // Never 0, which reads as "unset" in logs and wire messages.
            let n = fastrand::u64(1..);
            tx.execute(
                "INSERT INTO _edgeproxy_state VALUES ('node', ?1)",
                [n as i64],
            )?;
            NodeId(n)
        }
    };
    let layout = state(tx, "layout")?.unwrap_or(0);
    if layout < LAYOUT {
        upgrade(tx, node, wall())?;
    }
    tx.execute_batch(TABLES)?;
    tx.execute_batch(TRIGGERS)?;
    tx.execute_batch(OWNER_TRIGGERS)?;
    // Rows written before replication was switched on are this node's to announce.
    tx.execute_batch(
        "INSERT INTO _edgeproxy_dirty (id)
            SELECT id FROM backends WHERE id NOT IN (SELECT id FROM _edgeproxy_versions)",
    )?;
    Ok(node)
}

/// From layout 1 (versions without sequence numbers, an id-keyed dirty list): the rows
/// held become this node's writes with their clocks kept, so the newest still wins when
/// POPs that upgraded meet, and the triggers are replaced.
fn upgrade(tx: &Connection, node: NodeId, now: u64) -> rusqlite::Result<()> {
    for t in TRIGGER_NAMES {
        tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {t}"))?;
    }
    let old_dirty: bool = tx.query_row(
        "SELECT count(*) = 1 FROM pragma_table_info('_edgeproxy_dirty') WHERE name = 'id' AND pk = 1",
        [],
        |r| r.get(0),
    )?;
    if old_dirty {
        tx.execute_batch(
            "CREATE TABLE _edgeproxy_dirty_2 (seq INTEGER PRIMARY KEY, id TEXT);
             INSERT INTO _edgeproxy_dirty_2 (id) SELECT id FROM _edgeproxy_dirty;
             DROP TABLE _edgeproxy_dirty;
             ALTER TABLE _edgeproxy_dirty_2 RENAME TO _edgeproxy_dirty;",
        )?;
    }
    let versions: Vec<String> = tx
        .prepare("SELECT name FROM pragma_table_info('_edgeproxy_versions')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if !versions.is_empty() && !versions.iter().any(|c| c == "seq") {
        tx.execute_batch(
            "ALTER TABLE _edgeproxy_versions ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE _edgeproxy_versions ADD COLUMN at INTEGER NOT NULL DEFAULT 0;",
        )?;
    }
    tx.execute_batch(TABLES)?;
    let ids: Vec<String> = tx
        .prepare("SELECT id FROM _edgeproxy_versions WHERE seq = 0 ORDER BY hlc, id")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for (i, id) in ids.iter().enumerate() {
        tx.execute(
            "UPDATE _edgeproxy_versions SET node = ?1, seq = ?2, at = ?3 WHERE id = ?4",
            rusqlite::params![node.0 as i64, i as i64 + 1, now as i64, id],
        )?;
    }
    if !ids.is_empty() {
        tx.execute(
            "INSERT INTO _edgeproxy_seen VALUES (?1, 1, ?2)",
            [node.0 as i64, ids.len() as i64],
        )?;
    }
    tx.execute(
        "INSERT OR REPLACE INTO _edgeproxy_state VALUES ('layout', ?1)",
        [LAYOUT],
    )?;
    Ok(())
}

/// Puts back the triggers a recreated `backends` or owners table lost (with the owners
/// table itself); true when it had to (the caller then compares the whole table).
fn restore_triggers(tx: &Connection) -> rusqlite::Result<bool> {
    let names = TRIGGER_NAMES.iter().chain(&OWNER_TRIGGER_NAMES);
    let present: i64 = tx.query_row(
        &format!(
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN ({})",
            names
                .clone()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        [],
        |r| r.get(0),
    )?;
    if present == names.count() as i64 {
        return Ok(false);
    }
    crate::adapters::outbound::sqlite_routing::ensure_owners(tx)?;
    tx.execute_batch(TRIGGERS)?;
    tx.execute_batch(OWNER_TRIGGERS)?;
    tx.execute_batch(
        "INSERT INTO _edgeproxy_dirty (id)
            SELECT id FROM backends UNION SELECT id FROM _edgeproxy_versions",
    )?;
    Ok(true)
}

/// Turns every dirty id into a versioned row and clears the dirty list. A row gone from
/// the table (a recreated table left it out) or marked deleted becomes a tombstone with
/// the last contents that replicated, so even a row the loader would skip can be deleted;
/// a row whose contents did not change gets no new version.
pub(super) fn stamp(t: &mut Txn<'_>) -> rusqlite::Result<Stamped> {
    if restore_triggers(t.tx)? {
        tracing::warn!(
            "cluster: the backends or owners table was recreated (capture triggers were gone); \
             comparing it with the replicated rows and replicating the differences"
        );
    }
    let dirty: Vec<String> =
        t.tx.prepare_cached("SELECT DISTINCT id FROM _edgeproxy_dirty WHERE id IS NOT NULL")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
    if dirty.is_empty() {
        return Ok(Default::default());
    }
    let (mut out, mut bad) = (Vec::new(), Vec::new());
    let select = format!("{} WHERE b.id = ?1", rows_sql());
    for id in dirty {
        let deleted: Option<bool> =
            t.tx.query_row(
                "SELECT coalesce(deleted, 0) != 0 FROM backends WHERE id = ?1",
                [&id],
                |r| r.get(0),
            )
            .optional()?;
        let current = t.tx.query_row(&select, [&id], backend_row).optional();
        let held = t.held(&id).cloned();
        let row = match (deleted, current) {
            (Some(false), Ok(Some(row))) => match validate(&row) {
                Ok(()) => row,
                Err(reason) => {
                    bad.push((id, reason));
                    continue;
                }
            },
            (Some(false), Err(e)) => {
                bad.push((id, e.to_string()));
                continue;
            }
            // Deleted, or gone: a tombstone, of the current contents when they would
            // replicate, else of the last ones that did.
            (_, current) => {
                let valid = current
                    .ok()
                    .flatten()
                    .map(|row| BackendRow {
                        deleted: true,
                        ..row
                    })
                    .filter(|row| validate(row).is_ok());
                let Some(row) = valid.or_else(|| {
                    held.as_ref().map(|h| BackendRow {
                        deleted: true,
                        ..h.row.clone()
                    })
                }) else {
                    // Never replicated: there is nothing to delete elsewhere.
                    continue;
                };
                if held.as_ref().is_some_and(|h| h.row.deleted) && deleted.is_none() {
                    // A tombstone the recreated table left out: put it back as it was.
                    let h = held.clone().expect("checked above");
                    as_replicator(t.tx, || write_row(t.tx, &h.row))?;
                    continue;
                }
                row
            }
        };
        if held.as_ref().is_some_and(|h| h.row == row) && !t.unsure.contains(&id) {
            continue;
        }
        let (version, seq) = t.next_version();
        let r = VersionedRow { version, seq, row };
        t.put(r.clone())?;
        out.push(r);
    }
    t.tx.execute("DELETE FROM _edgeproxy_dirty", [])?;
    Ok((out, bad))
}
