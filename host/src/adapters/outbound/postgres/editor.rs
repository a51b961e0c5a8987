//! Operators' writes (`BackendEditor`) and self-registrations (`RegistrationStore`) on the
//! PostgreSQL table. Every row goes through the loader's checks before it is written, as
//! with SQLite; each command is one transaction. This POP's registrations are its rows of
//! `edgeproxy_registrations` (keyed by the POP's name, since the database is shared).

use std::cell::RefCell;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use postgres::{Client, GenericClient, Transaction};

use super::{PgSettings, describe_error};
use crate::adapters::outbound::sqlite_editor::RoutingEditor;
use crate::adapters::outbound::sqlite_editor::registrations::not_operators;
use crate::adapters::outbound::sqlite_routing::check_as_live;
use crate::domain::ports::{
    BackendEditor, EditError, Imported, Registered, RegistrationError, RegistrationStore,
    RowChanges,
};
use crate::domain::replication::{API_OWNER, BackendRow};

const SELECT: &str = "SELECT b.id::text, b.app::text, b.region::text, b.country::text, \
    b.wg_ip::text, b.port::int8, b.healthy::int8, b.weight::int8, b.soft_limit::int8, \
    b.hard_limit::int8, coalesce(b.deleted, 0)::int8, o.owner::text \
    FROM backends b LEFT JOIN edgeproxy_owners o ON o.id = b.id";

const UPSERT: &str = "INSERT INTO backends \
    (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted) \
    VALUES ($1, $2, $3, $4, $5, $6::int8, $7::int8, $8::int8, $9::int8, $10::int8, $11::int8) \
    ON CONFLICT (id) DO UPDATE SET app = $2, region = $3, country = $4, wg_ip = $5, \
    port = $6, healthy = $7, weight = $8, soft_limit = $9, hard_limit = $10, deleted = $11";

pub struct PgEditor {
    settings: PgSettings,
    /// Borrowed mutably for each statement (reads included: the driver needs `&mut`).
    client: RefCell<Client>,
}

fn row(r: &postgres::Row) -> Result<BackendRow, String> {
    let id: String = r.get(0);
    let int = |i: usize, what: &str| -> Result<i64, String> {
        r.get::<_, Option<i64>>(i)
            .ok_or_else(|| format!("backend {id:?}: {what} is NULL"))
    };
    let fit = |i: usize, what: &str| -> Result<u32, String> {
        let v = int(i, what)?;
        u32::try_from(v).map_err(|_| format!("backend {id:?}: {what} = {v} is out of range"))
    };
    let port = int(5, "port")?;
    Ok(BackendRow {
        app: r.get::<_, Option<String>>(1).unwrap_or_default(),
        region: r.get::<_, Option<String>>(2).unwrap_or_default(),
        country: r.get::<_, Option<String>>(3).unwrap_or_default(),
        wg_ip: r.get::<_, Option<String>>(4).unwrap_or_default(),
        port: u16::try_from(port)
            .map_err(|_| format!("backend {id:?}: port = {port} is out of range"))?,
        healthy: int(6, "healthy")? != 0,
        weight: fit(7, "weight")?,
        soft_limit: fit(8, "soft_limit")?,
        hard_limit: fit(9, "hard_limit")?,
        deleted: int(10, "deleted")? != 0,
        owner: r.get(11),
        id,
    })
}

/// The loader's checks (whatever `deleted` says), then the write.
fn upsert(c: &mut impl GenericClient, r: &BackendRow) -> Result<(), EditError> {
    check_as_live(r.values().to_vec())
        .map_err(|e| EditError::Rejected(format!("backend {:?}: {e}", r.id)))?;
    c.execute(
        UPSERT,
        &[
            &r.id,
            &r.app,
            &r.region,
            &r.country,
            &r.wg_ip,
            &i64::from(r.port),
            &i64::from(r.healthy),
            &i64::from(r.weight),
            &i64::from(r.soft_limit),
            &i64::from(r.hard_limit),
            &i64::from(r.deleted),
        ],
    )
    .map_err(|e| EditError::Rejected(describe_error(&e)))?;
    let owner = match &r.owner {
        Some(o) => c.execute(
            "INSERT INTO edgeproxy_owners (id, owner) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET owner = $2",
            &[&r.id, o],
        ),
        None => c.execute("DELETE FROM edgeproxy_owners WHERE id = $1", &[&r.id]),
    };
    owner
        .map(drop)
        .map_err(|e| EditError::Rejected(describe_error(&e)))
}

fn by_id(c: &mut impl GenericClient, id: &str, lock: bool) -> Result<Option<BackendRow>, String> {
    let sql = format!(
        "{SELECT} WHERE b.id = $1{}",
        if lock { " FOR UPDATE OF b" } else { "" }
    );
    match c
        .query_opt(sql.as_str(), &[&id])
        .map_err(|e| describe_error(&e))?
    {
        Some(r) => row(&r).map(Some),
        None => Ok(None),
    }
}

impl PgEditor {
    /// Connects to a database whose `backends` table exists.
    pub fn open(settings: &PgSettings) -> Result<Self, EditError> {
        let mut editor = Self::connect(settings)?;
        if !editor.has_table()? {
            return Err(editor.db("no table named backends (create it with `edgeproxy db init`)"));
        }
        // Who manages each row, beside the table (as in SQLite): a database made before
        // gets the table, and the rows registered through the API so far become the API's.
        let client = editor.client.get_mut();
        if let Err(e) = client.batch_execute(super::OWNERS) {
            // A role that may not create it (a read-only one listing the table) gets an
            // empty table of its session's own: every row reads as an operator's. Any
            // other failure is one.
            use postgres::error::SqlState;
            let denied = [
                SqlState::INSUFFICIENT_PRIVILEGE,
                SqlState::READ_ONLY_SQL_TRANSACTION,
            ];
            if !e.code().is_some_and(|c| denied.contains(c)) {
                return Err(editor.db(&describe_error(&e)));
            }
            client
                .batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS edgeproxy_owners (id TEXT PRIMARY KEY, owner TEXT NOT NULL)",
                )
                .map_err(|_| editor.db(&describe_error(&e)))?;
        }
        Ok(editor)
    }

    /// Creates the table, the change trigger and the registrations table where missing;
    /// true when the table was created.
    pub fn init(settings: &PgSettings) -> Result<(Self, bool), EditError> {
        let mut editor = Self::connect(settings)?;
        let existed = editor.has_table()?;
        editor
            .client
            .get_mut()
            .batch_execute(&format!("{}{}", super::SCHEMA, super::OWNERS))
            .map_err(|e| editor.db(&describe_error(&e)))?;
        Ok((editor, !existed))
    }

    fn connect(settings: &PgSettings) -> Result<Self, EditError> {
        let client = settings.connect().map_err(|message| EditError::Db {
            path: settings.describe(),
            message,
        })?;
        Ok(Self {
            settings: settings.clone(),
            client: RefCell::new(client),
        })
    }

    fn db(&self, message: &str) -> EditError {
        EditError::Db {
            path: self.settings.describe(),
            message: message.into(),
        }
    }

    fn has_table(&mut self) -> Result<bool, EditError> {
        let found = self
            .client
            .get_mut()
            .query_one("SELECT to_regclass('backends') IS NOT NULL", &[])
            .map_err(|e| self.db(&describe_error(&e)))?;
        Ok(found.get(0))
    }

    fn live_count(c: &mut impl GenericClient) -> Result<usize, String> {
        c.query_one("SELECT count(*) FROM backends WHERE deleted = 0", &[])
            .map(|r| r.get::<_, i64>(0) as usize)
            .map_err(|e| describe_error(&e))
    }

    /// One transaction: `f` (given how to name a database failure), then the commit.
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Transaction<'_>, &dyn Fn(String) -> EditError) -> Result<T, EditError>,
    ) -> Result<T, EditError> {
        let describe = self.settings.describe();
        let db = |message: String| EditError::Db {
            path: describe.clone(),
            message,
        };
        let mut tx = self
            .client
            .get_mut()
            .transaction()
            .map_err(|e| db(describe_error(&e)))?;
        let out = f(&mut tx, &db)?;
        tx.commit().map_err(|e| db(describe_error(&e)))?;
        Ok(out)
    }

    /// One transaction: `f`, then the written row read back, then the commit.
    fn write(
        &mut self,
        id: &str,
        f: impl FnOnce(&mut Transaction<'_>, &dyn Fn(String) -> EditError) -> Result<(), EditError>,
    ) -> Result<BackendRow, EditError> {
        self.transaction(|tx, db| {
            f(tx, db)?;
            by_id(tx, id, false).map_err(db)?.ok_or_else(|| {
                EditError::Rejected(format!("backend {id:?} vanished while writing"))
            })
        })
    }

    fn change(
        &mut self,
        id: &str,
        apply: impl FnOnce(&mut BackendRow),
    ) -> Result<BackendRow, EditError> {
        self.write(id, |tx, db| {
            let mut r = by_id(tx, id, true)
                .map_err(db)?
                .ok_or_else(|| EditError::Rejected(format!("no backend {id:?}")))?;
            apply(&mut r);
            upsert(tx, &r)
        })
    }
}

impl BackendEditor for PgEditor {
    fn list(&self, app: Option<&str>, deleted: bool) -> Result<Vec<BackendRow>, EditError> {
        let sql = format!(
            "{SELECT} WHERE ($1::text IS NULL OR b.app = $1) AND ($2 OR b.deleted = 0) ORDER BY b.id"
        );
        self.client
            .borrow_mut()
            .query(sql.as_str(), &[&app, &deleted])
            .map_err(|e| self.db(&describe_error(&e)))?
            .iter()
            .map(|r| row(r).map_err(|m| self.db(&m)))
            .collect()
    }

    fn get(&self, id: &str) -> Result<Option<BackendRow>, EditError> {
        by_id(&mut *self.client.borrow_mut(), id, false).map_err(|m| self.db(&m))
    }

    fn add(&mut self, r: &BackendRow) -> Result<BackendRow, EditError> {
        self.write(&r.id.clone(), |tx, db| {
            let existing = by_id(tx, &r.id, true).map_err(db)?;
            if existing.is_some_and(|e| !e.deleted) {
                return Err(EditError::Rejected(format!(
                    "backend {:?} exists; change it with `edgeproxy backend update`",
                    r.id
                )));
            }
            upsert(tx, r)
        })
    }

    fn update(&mut self, id: &str, c: &RowChanges) -> Result<BackendRow, EditError> {
        if c.is_empty() {
            return Err(EditError::Rejected("nothing to change".into()));
        }
        let c = c.clone();
        self.change(id, move |r| *r = c.applied_to(r.clone()))
    }

    fn remove(&mut self, id: &str) -> Result<BackendRow, EditError> {
        self.change(id, |r| r.deleted = true)
    }

    fn set_healthy(&mut self, id: &str, healthy: bool) -> Result<BackendRow, EditError> {
        self.change(id, |r| r.healthy = healthy)
    }

    /// The file goes into a scratch SQLite table first, through the same parser and checks
    /// as a SQLite import (a bad row refuses the whole file); its rows are then upserted
    /// in one transaction. A script's deletes act on the scratch copy only.
    fn import(&mut self, file: &Path) -> Result<Imported, EditError> {
        let (mut local, _) = RoutingEditor::init(Path::new(":memory:"))?;
        local.import(file)?;
        let rows = local.list(None, true)?;
        self.transaction(|tx, db| {
            let before = Self::live_count(tx).map_err(db)?;
            for r in &rows {
                upsert(tx, r).map_err(|e| {
                    EditError::Rejected(format!("{}: {e}; nothing was imported", file.display()))
                })?;
            }
            let after = Self::live_count(tx).map_err(db)?;
            Ok(Imported {
                rows: rows.len(),
                before,
                after,
            })
        })
    }
}

/// Self-registrations on the shared table, recorded as this POP's (`pop`).
pub struct PgRegistrations {
    /// Always Some until dropped (see `Drop`).
    editor: Mutex<Option<PgEditor>>,
    pop: String,
}

impl PgRegistrations {
    pub fn open(settings: &PgSettings, pop: String) -> Result<Self, EditError> {
        let (editor, _) = PgEditor::init(settings)?;
        Ok(Self {
            editor: Mutex::new(Some(editor)),
            pop,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PgEditor>> {
        self.editor.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The blocking client's drop waits on its own runtime, which must not happen on one of
/// the proxy's async threads: it is dropped on a thread.
impl Drop for PgRegistrations {
    fn drop(&mut self) {
        let editor = self
            .editor
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(editor) = editor {
            let _ = std::thread::Builder::new().spawn(move || drop(editor));
        }
    }
}

fn live(editor: &mut Option<PgEditor>) -> &mut PgEditor {
    editor
        .as_mut()
        .expect("the editor lives as long as the store")
}

fn store(e: impl std::fmt::Display) -> RegistrationError {
    RegistrationError::Store(e.to_string())
}

impl RegistrationStore for PgRegistrations {
    fn register(&self, r: &BackendRow) -> Result<Registered, RegistrationError> {
        let mut guard = self.lock();
        let editor = live(&mut guard);
        let mut tx = editor
            .client
            .get_mut()
            .transaction()
            .map_err(|e| store(describe_error(&e)))?;
        let existing = by_id(&mut tx, &r.id, true).map_err(store)?;
        if let Some(old) = existing.as_ref().filter(|o| !o.deleted) {
            not_operators(old)?;
        }
        let outcome = match &existing {
            Some(old) if !old.deleted && old.app != r.app => {
                return Err(RegistrationError::Conflict(format!(
                    "backend {:?} belongs to app {:?}, not {:?}",
                    r.id, old.app, r.app
                )));
            }
            Some(old) if old == r => Registered::Unchanged,
            Some(_) => Registered::Updated,
            None => Registered::Created,
        };
        if outcome != Registered::Unchanged {
            upsert(&mut tx, r).map_err(|e| match e {
                EditError::Rejected(m) => RegistrationError::Invalid(m),
                other => store(other),
            })?;
        }
        tx.execute(
            "INSERT INTO edgeproxy_registrations (pop, id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&self.pop, &r.id],
        )
        .map_err(|e| store(describe_error(&e)))?;
        tx.commit().map_err(|e| store(describe_error(&e)))?;
        Ok(outcome)
    }

    fn set_healthy(&self, id: &str, healthy: bool) -> Result<bool, RegistrationError> {
        live(&mut self.lock())
            .client
            .get_mut()
            .execute(
                "UPDATE backends SET healthy = $2::int8 WHERE id = $1 AND healthy != $2::int8
                    AND deleted = 0 AND id IN (SELECT id FROM edgeproxy_owners WHERE owner = $3)",
                &[&id, &i64::from(healthy), &API_OWNER],
            )
            .map(|n| n > 0)
            .map_err(|e| store(describe_error(&e)))
    }

    fn adopt(&self, id: &str) -> Result<bool, RegistrationError> {
        match self.get(id)? {
            Some(row) if !row.deleted => not_operators(&row)?,
            _ => return Ok(false),
        }
        live(&mut self.lock())
            .client
            .get_mut()
            .execute(
                "INSERT INTO edgeproxy_registrations (pop, id)
                 SELECT $1, id FROM backends WHERE id = $2 AND deleted = 0
                 ON CONFLICT DO NOTHING",
                &[&self.pop, &id],
            )
            .map_err(|e| store(describe_error(&e)))?;
        Ok(self.registered()?.iter().any(|r| r == id))
    }

    fn deregister(&self, id: &str) -> Result<bool, RegistrationError> {
        let mut guard = self.lock();
        let editor = live(&mut guard);
        let mut tx = editor
            .client
            .get_mut()
            .transaction()
            .map_err(|e| store(describe_error(&e)))?;
        let known = tx
            .execute(
                "DELETE FROM edgeproxy_registrations WHERE pop = $1 AND id = $2",
                &[&self.pop, &id],
            )
            .map_err(|e| store(describe_error(&e)))?;
        if known == 0 {
            return Ok(false);
        }
        match by_id(&mut tx, id, true).map_err(store)? {
            // An operator took the row over since: it stays, and is no longer this API's.
            Some(row) if !row.deleted && row.owner.as_deref() != Some(API_OWNER) => {
                tx.commit().map_err(|e| store(describe_error(&e)))?;
                not_operators(&row)?;
            }
            _ => {
                tx.execute("UPDATE backends SET deleted = 1 WHERE id = $1", &[&id])
                    .map_err(|e| store(describe_error(&e)))?;
                tx.commit().map_err(|e| store(describe_error(&e)))?;
            }
        }
        Ok(true)
    }

    fn registered(&self) -> Result<Vec<String>, RegistrationError> {
        live(&mut self.lock())
            .client
            .get_mut()
            .query(
                "SELECT id FROM edgeproxy_registrations WHERE pop = $1 ORDER BY id",
                &[&self.pop],
            )
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .map_err(|e| store(describe_error(&e)))
    }

    fn get(&self, id: &str) -> Result<Option<BackendRow>, RegistrationError> {
        by_id(live(&mut self.lock()).client.get_mut(), id, false).map_err(store)
    }
}
