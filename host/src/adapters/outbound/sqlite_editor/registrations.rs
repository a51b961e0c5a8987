//! Self-registered backends in the routing file (`RegistrationStore`): their rows go
//! through the editor's validation like any operator's write; which ids this POP
//! registered is kept in `_edgeproxy_registrations`, a table the replication triggers do
//! not watch, so it stays this POP's own.

use std::path::Path;
// One connection, used by one request at a time; a panic cannot leave it half-written
// (SQLite rolls the transaction back), so a poisoned lock is recovered.
use std::sync::{Mutex, PoisonError};

use rusqlite::{OptionalExtension as _, params};

use super::{EditError, RoutingEditor, err_at, row_by_id};
use crate::adapters::outbound::sqlite_routing::write_row;
use crate::domain::ports::{Registered, RegistrationError, RegistrationStore};
use crate::domain::replication::{API_OWNER, BackendRow};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS _edgeproxy_registrations (
    id TEXT PRIMARY KEY,
    registered_at INTEGER NOT NULL DEFAULT (unixepoch())
)";

pub struct SqliteRegistrations {
    editor: Mutex<RoutingEditor>,
}

impl SqliteRegistrations {
    pub fn open(path: &Path) -> Result<Self, EditError> {
        let editor = RoutingEditor::open(path)?;
        editor
            .conn
            .execute_batch(SCHEMA)
            .map_err(|e| err_at(path, e))?;
        Ok(Self {
            editor: Mutex::new(editor),
        })
    }

    fn editor(&self) -> std::sync::MutexGuard<'_, RoutingEditor> {
        self.editor.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn store(e: impl std::fmt::Display) -> RegistrationError {
    RegistrationError::Store(e.to_string())
}

fn edit(e: EditError) -> RegistrationError {
    match e {
        EditError::Rejected(m) => RegistrationError::Invalid(m),
        other => store(other),
    }
}

impl RegistrationStore for SqliteRegistrations {
    fn register(&self, row: &BackendRow) -> Result<Registered, RegistrationError> {
        let mut editor = self.editor();
        let path = editor.path.clone();
        let tx = editor.begin().map_err(edit)?;
        let existing = row_by_id(&tx, &row.id).map_err(|e| store(err_at(&path, e)))?;
        if let Some(old) = existing.as_ref().filter(|o| !o.deleted) {
            not_operators(old)?;
        }
        let outcome = match &existing {
            Some(old) if !old.deleted && old.app != row.app => {
                return Err(RegistrationError::Conflict(format!(
                    "backend {:?} belongs to app {:?}, not {:?}",
                    row.id, old.app, row.app
                )));
            }
            Some(old) if old == row => Registered::Unchanged,
            Some(_) => Registered::Updated,
            None => Registered::Created,
        };
        if outcome != Registered::Unchanged {
            write_row(&tx, row).map_err(|e| RegistrationError::Invalid(super::message(e)))?;
        }
        tx.execute(
            "INSERT OR IGNORE INTO _edgeproxy_registrations (id) VALUES (?1)",
            [&row.id],
        )
        .map_err(|e| store(err_at(&path, e)))?;
        tx.commit().map_err(|e| store(err_at(&path, e)))?;
        Ok(outcome)
    }

    fn set_healthy(&self, id: &str, healthy: bool) -> Result<bool, RegistrationError> {
        let editor = self.editor();
        editor
            .conn
            .execute(
                "UPDATE backends SET healthy = ?2 WHERE id = ?1 AND healthy != ?2 AND deleted = 0
                    AND id IN (SELECT id FROM _edgeproxy_owners WHERE owner = ?3)",
                params![id, healthy, API_OWNER],
            )
            .map(|n| n > 0)
            .map_err(|e| store(err_at(&editor.path, e)))
    }

    fn adopt(&self, id: &str) -> Result<bool, RegistrationError> {
        let editor = self.editor();
        match row_by_id(&editor.conn, id).map_err(|e| store(err_at(&editor.path, e)))? {
            Some(row) if !row.deleted => not_operators(&row)?,
            _ => return Ok(false),
        }
        editor
            .conn
            .execute(
                "INSERT OR IGNORE INTO _edgeproxy_registrations (id) VALUES (?1)",
                [id],
            )
            .map_err(|e| store(err_at(&editor.path, e)))?;
        self.is_registered(&editor, id)
    }

    fn deregister(&self, id: &str) -> Result<bool, RegistrationError> {
        let mut editor = self.editor();
        let path = editor.path.clone();
        let tx = editor.begin().map_err(edit)?;
        let known = tx
            .execute("DELETE FROM _edgeproxy_registrations WHERE id = ?1", [id])
            .map_err(|e| store(err_at(&path, e)))?;
        if known == 0 {
            return Ok(false);
        }
        match row_by_id(&tx, id).map_err(|e| store(err_at(&path, e)))? {
            // An operator took the row over since: it stays, and is no longer this API's.
            Some(row) if !row.deleted && row.owner.as_deref() != Some(API_OWNER) => {
                tx.commit().map_err(|e| store(err_at(&path, e)))?;
                not_operators(&row)?;
            }
            _ => {
                tx.execute("UPDATE backends SET deleted = 1 WHERE id = ?1", [id])
                    .map_err(|e| store(err_at(&path, e)))?;
                tx.commit().map_err(|e| store(err_at(&path, e)))?;
            }
        }
        Ok(true)
    }

    fn registered(&self) -> Result<Vec<String>, RegistrationError> {
        let editor = self.editor();
        let mut stmt = editor
            .conn
            .prepare("SELECT id FROM _edgeproxy_registrations ORDER BY id")
            .map_err(|e| store(err_at(&editor.path, e)))?;
        stmt.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| store(err_at(&editor.path, e)))
    }

    fn get(&self, id: &str) -> Result<Option<BackendRow>, RegistrationError> {
        self.editor().get(id).map_err(edit)
    }
}

/// Refuses `row` unless the registration API created it: an operator's row is not the
/// API's to change, adopt, expire or delete.
pub(crate) fn not_operators(row: &BackendRow) -> Result<(), RegistrationError> {
    match row.owner.as_deref() {
        Some(API_OWNER) => Ok(()),
        owner => Err(RegistrationError::Conflict(format!(
            "backend {:?} is {}, not one registered through this API; the API changes only \
             the backends it created (register under another id, or have an operator remove it)",
            row.id,
            match owner {
                None => "an operator's row".to_owned(),
                Some(o) => format!("managed by {o:?}"),
            }
        ))),
    }
}

impl SqliteRegistrations {
    fn is_registered(&self, editor: &RoutingEditor, id: &str) -> Result<bool, RegistrationError> {
        editor
            .conn
            .query_row(
                "SELECT 1 FROM _edgeproxy_registrations WHERE id = ?1",
                [id],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| store(err_at(&editor.path, e)))
    }
}
