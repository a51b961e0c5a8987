//! Writes to the routing table for operators (`edgeproxy backend …`, `edgeproxy db …`),
//! safe while a proxy reads the same file: WAL mode, a busy timeout, and one immediate
//! transaction per command, so the proxy sees each change whole or not at all.
//!
//! Every row written goes through the same validation the proxy's loader applies (a
//! temporary trigger calls it), so nothing the proxy would skip can be written here, and
//! an import with one bad row is rolled back whole, naming the line (`import`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::functions::FunctionFlags;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

mod import;
pub mod registrations;

use super::sqlite_routing::{
    COLUMNS, SCHEMA, check_as_live, ensure_owners, rows_sql, schema_problem, write_row,
};

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::domain::ports::{BackendEditor, EditError, Imported, RowChanges};
pub use crate::domain::replication::BackendRow;

impl BackendRow {
    pub(crate) fn values(&self) -> [Value; 11] {
        [
            Value::Text(self.id.clone()),
            Value::Text(self.app.clone()),
            Value::Text(self.region.clone()),
            Value::Text(self.country.clone()),
            Value::Text(self.wg_ip.clone()),
            Value::Integer(self.port.into()),
            Value::Integer(self.healthy.into()),
            Value::Integer(self.weight.into()),
            Value::Integer(self.soft_limit.into()),
            Value::Integer(self.hard_limit.into()),
            Value::Integer(self.deleted.into()),
        ]
    }
}

pub struct RoutingEditor {
    path: PathBuf,
    conn: Connection,
}

impl RoutingEditor {
    /// Opens an existing routing database for writing.
    pub fn open(path: &Path) -> Result<Self, EditError> {
        if !path.exists() {
            return Err(EditError::Db {
                path: path.display().to_string(),
                message: "file does not exist (create it with `edgeproxy db init`)".into(),
            });
        }
        let editor = Self::connect(path)?;
        editor.check_schema()?;
        Ok(editor)
    }

    /// Creates the database (WAL mode) with the schema if it is missing; an existing
    /// table must have every column. Returns true when the table was created.
    pub fn init(path: &Path) -> Result<(Self, bool), EditError> {
        let editor = Self::connect(path)?;
        let existed = editor.has_table()?;
        if !existed {
            editor
                .conn
                .pragma_update(None, "journal_mode", "WAL")
                .and_then(|_| editor.conn.execute_batch(SCHEMA))
                .map_err(|e| editor.err(e))?;
        }
        editor.check_schema()?;
        Ok((editor, !existed))
    }

    fn connect(path: &Path) -> Result<Self, EditError> {
        let conn = Connection::open(path).map_err(|e| err_at(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| err_at(path, e))?;
        Ok(Self {
            path: path.to_owned(),
            conn,
        })
    }

    fn err(&self, e: rusqlite::Error) -> EditError {
        err_at(&self.path, e)
    }

    /// A row the proxy would skip cannot be written: inserts and updates call the
    /// loader's own validation, and its message becomes the statement's error. The
    /// triggers are temporary (this connection's own), so the file is not changed.
    fn install_checks(&self) -> Result<(), EditError> {
        self.conn
            .create_scalar_function(
                "edgeproxy_check_row",
                COLUMNS.len() as i32,
                FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
                |ctx| {
                    let values: Vec<Value> = (0..ctx.len())
                        .map(|i| ctx.get::<Value>(i))
                        .collect::<Result<_, _>>()?;
                    let id = match &values[0] {
                        Value::Text(id) => id.clone(),
                        other => format!("{other:?}"),
                    };
                    match check_as_live(values) {
                        Ok(()) => Ok(1),
                        Err(reason) => Err(rusqlite::Error::UserFunctionError(
                            format!("backend {id:?}: {reason}").into(),
                        )),
                    }
                },
            )
            .map_err(|e| self.err(e))?;
        let new_cols = COLUMNS
            .iter()
            .map(|c| format!("NEW.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = ["INSERT", "UPDATE"]
            .map(|op| {
                format!(
                    "CREATE TEMP TRIGGER IF NOT EXISTS edgeproxy_check_{op} BEFORE {op} ON main.backends
                     BEGIN SELECT edgeproxy_check_row({new_cols}); END;"
                )
            })
            .join("\n");
        self.conn.execute_batch(&sql).map_err(|e| self.err(e))
    }

    fn has_table(&self) -> Result<bool, EditError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'backends'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    /// The table must have every column (and the owners table is made where missing);
    /// then writes to it are guarded (again after an import, which may have recreated the table and with
    /// it dropped the triggers).
    pub(super) fn check_schema(&self) -> Result<(), EditError> {
        match schema_problem(&self.conn).map_err(|e| self.err(e))? {
            Some(reason) => Err(self.rejected(&reason)),
            None => {
                ensure_owners(&self.conn).map_err(|e| self.err(e))?;
                self.install_checks()
            }
        }
    }

    fn rejected(&self, message: &str) -> EditError {
        EditError::Db {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    /// Every row, ordered by id; soft-deleted ones only with `deleted`.
    pub fn list(&self, app: Option<&str>, deleted: bool) -> Result<Vec<BackendRow>, EditError> {
        let sql = format!(
            "{} WHERE (?1 IS NULL OR b.app = ?1) AND (?2 OR b.deleted = 0) ORDER BY b.id",
            rows_sql()
        );
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![app, deleted], backend_row)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Each row's replication version, empty where replication never ran on this file.
    pub fn versions(
        &self,
    ) -> Result<std::collections::HashMap<String, crate::domain::replication::Version>, EditError>
    {
        use crate::domain::replication::{Hlc, NodeId, Version};
        let exists: bool = self
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = '_edgeproxy_versions'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.err(e))?;
        if !exists {
            return Ok(Default::default());
        }
        let mut stmt = self
            .conn
            .prepare("SELECT id, hlc, node FROM _edgeproxy_versions")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Version {
                        hlc: Hlc(r.get::<_, i64>(1)? as u64),
                        node: NodeId(r.get::<_, i64>(2)? as u64),
                    },
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    pub fn get(&self, id: &str) -> Result<Option<BackendRow>, EditError> {
        row_by_id(&self.conn, id).map_err(|e| self.err(e))
    }

    /// Adds a backend; an id already in use is refused unless that row was removed
    /// (soft-deleted), which `add` then replaces.
    pub fn add(&mut self, row: &BackendRow) -> Result<BackendRow, EditError> {
        let path = self.path.clone();
        let tx = self.begin()?;
        let existing: Option<i64> = tx
            .query_row(
                "SELECT deleted FROM backends WHERE id = ?1",
                [&row.id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| err_at(&path, e))?;
        if existing.is_some_and(|d| d == 0) {
            return Err(EditError::Rejected(format!(
                "backend {:?} exists; change it with `edgeproxy backend update`",
                row.id
            )));
        }
        // An operator's row from now on (owner None), whoever had the id before.
        write_row(&tx, row).map_err(rejected)?;
        commit_with_row(tx, &row.id, &path)
    }

    /// Applies `changes` to one existing backend.
    pub fn update(&mut self, id: &str, changes: &RowChanges) -> Result<BackendRow, EditError> {
        let sets: Vec<(&str, Value)> = [
            ("app", changes.app.clone().map(Value::Text)),
            ("region", changes.region.clone().map(Value::Text)),
            ("country", changes.country.clone().map(Value::Text)),
            ("wg_ip", changes.wg_ip.clone().map(Value::Text)),
            ("port", changes.port.map(|p| Value::Integer(p.into()))),
            ("healthy", changes.healthy.map(|h| Value::Integer(h.into()))),
            ("weight", changes.weight.map(|w| Value::Integer(w.into()))),
            (
                "soft_limit",
                changes.soft_limit.map(|w| Value::Integer(w.into())),
            ),
            (
                "hard_limit",
                changes.hard_limit.map(|w| Value::Integer(w.into())),
            ),
        ]
        .into_iter()
        .filter_map(|(col, v)| v.map(|v| (col, v)))
        .collect();
        if sets.is_empty() {
            return Err(EditError::Rejected("nothing to change".into()));
        }
        self.set(id, &sets)
    }

    /// Sets `deleted = 1`: the proxy stops routing to it, the row stays for the record.
    pub fn remove(&mut self, id: &str) -> Result<BackendRow, EditError> {
        self.set(id, &[("deleted", Value::Integer(1))])
    }

    /// Sets `healthy` (drain: 0, undrain: 1).
    pub fn set_healthy(&mut self, id: &str, healthy: bool) -> Result<BackendRow, EditError> {
        self.set(id, &[("healthy", Value::Integer(healthy.into()))])
    }

    fn set(&mut self, id: &str, sets: &[(&str, Value)]) -> Result<BackendRow, EditError> {
        let assignments = sets
            .iter()
            .enumerate()
            .map(|(i, (col, _))| format!("{col} = ?{}", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let mut values = vec![Value::Text(id.to_owned())];
        values.extend(sets.iter().map(|(_, v)| v.clone()));
        let path = self.path.clone();
        let tx = self.begin()?;
        let changed = tx
            .execute(
                &format!("UPDATE backends SET {assignments} WHERE id = ?1"),
                rusqlite::params_from_iter(values),
            )
            .map_err(rejected)?;
        if changed == 0 {
            return Err(EditError::Rejected(format!("no backend with id {id:?}")));
        }
        commit_with_row(tx, id, &path)
    }

    pub(super) fn begin(&mut self) -> Result<rusqlite::Transaction<'_>, EditError> {
        let path = self.path.clone();
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| err_at(&path, e))
    }
}

/// The written row, read inside the write's transaction and then committed: a reply of
/// success always means the change is on disk, and a failure that nothing was changed.
fn commit_with_row(
    tx: rusqlite::Transaction<'_>,
    id: &str,
    path: &Path,
) -> Result<BackendRow, EditError> {
    let row = row_by_id(&tx, id)
        .map_err(|e| err_at(path, e))?
        .ok_or_else(|| EditError::Rejected(format!("backend {id:?} vanished while writing")))?;
    tx.commit().map_err(|e| err_at(path, e))?;
    Ok(row)
}

fn row_by_id(conn: &Connection, id: &str) -> rusqlite::Result<Option<BackendRow>> {
    // Cached: the registration API reads one row per request.
    conn.prepare_cached(&format!("{} WHERE b.id = ?1", rows_sql()))?
        .query_row([id], backend_row)
        .optional()
}

pub(crate) fn backend_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BackendRow> {
    Ok(BackendRow {
        id: r.get(0)?,
        app: r.get(1)?,
        region: r.get(2)?,
        country: r.get(3)?,
        wg_ip: r.get(4)?,
        port: r.get(5)?,
        healthy: r.get::<_, i64>(6)? != 0,
        weight: r.get(7)?,
        soft_limit: r.get(8)?,
        hard_limit: r.get(9)?,
        deleted: r.get::<_, Option<i64>>(10)?.unwrap_or(0) != 0,
        owner: r.get(11)?,
    })
}

pub(super) fn err_at(path: &Path, e: rusqlite::Error) -> EditError {
    EditError::Db {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A write the validation refused: its message is the reason.
fn rejected(e: rusqlite::Error) -> EditError {
    EditError::Rejected(message(e))
}

/// SQLite's own message (a failed check's reason) without rusqlite's wrapping.
pub(super) fn message(e: rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(_, Some(msg)) => msg,
        other => other.to_string(),
    }
}

impl BackendEditor for RoutingEditor {
    fn list(&self, app: Option<&str>, deleted: bool) -> Result<Vec<BackendRow>, EditError> {
        RoutingEditor::list(self, app, deleted)
    }
    fn get(&self, id: &str) -> Result<Option<BackendRow>, EditError> {
        RoutingEditor::get(self, id)
    }
    fn add(&mut self, row: &BackendRow) -> Result<BackendRow, EditError> {
        RoutingEditor::add(self, row)
    }
    fn update(&mut self, id: &str, changes: &RowChanges) -> Result<BackendRow, EditError> {
        RoutingEditor::update(self, id, changes)
    }
    fn remove(&mut self, id: &str) -> Result<BackendRow, EditError> {
        RoutingEditor::remove(self, id)
    }
    fn set_healthy(&mut self, id: &str, healthy: bool) -> Result<BackendRow, EditError> {
        RoutingEditor::set_healthy(self, id, healthy)
    }
    fn import(&mut self, file: &Path) -> Result<Imported, EditError> {
        RoutingEditor::import(self, file)
    }
    fn versions(
        &self,
    ) -> Result<std::collections::HashMap<String, crate::domain::replication::Version>, EditError>
    {
        RoutingEditor::versions(self)
    }
}
