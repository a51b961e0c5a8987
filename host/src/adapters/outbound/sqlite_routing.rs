//! The routing table in SQLite (`backends`), edgeProxy's schema.
//!
//! The proxy opens the file read-only for every load, so it never blocks or is blocked by
//! a writer in WAL mode, and picks up a replaced file as well as an edited one. Rows are
//! validated one by one: a bad row is skipped and reported, the rest loads. Deleted rows
//! (`deleted != 0`) are left out. Creating a missing file is the only write it does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};

use crate::domain::ports::{BackendRepository, LoadedBackends, RoutingError, SkippedRow};
use crate::domain::{Backend, BackendId, Region};

/// The schema `edgeproxy` creates; existing edgeProxy databases have the same columns.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS backends (
    id          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    region      TEXT NOT NULL,
    country     TEXT NOT NULL,
    wg_ip       TEXT NOT NULL,
    port        INTEGER NOT NULL,
    healthy     INTEGER NOT NULL DEFAULT 1,
    weight      INTEGER NOT NULL DEFAULT 1,
    soft_limit  INTEGER NOT NULL DEFAULT 100,
    hard_limit  INTEGER NOT NULL DEFAULT 0,
    deleted     INTEGER NOT NULL DEFAULT 0
)";

pub(crate) const COLUMNS: [&str; 11] = [
    "id",
    "app",
    "region",
    "country",
    "wg_ip",
    "port",
    "healthy",
    "weight",
    "soft_limit",
    "hard_limit",
    "deleted",
];

pub use crate::domain::replication::API_OWNER;

/// Who manages each row, beside `backends` so its schema stays edgeProxy's (scripts that
/// insert positional values keep working): a row without an entry is an operator's; the
/// registration API's rows are [`API_OWNER`]'s. Replicated with its row.
const OWNERS: &str =
    "CREATE TABLE IF NOT EXISTS _edgeproxy_owners (id TEXT PRIMARY KEY, owner TEXT NOT NULL)";

/// Creates the owners table where missing; a file that had registrations before it
/// existed has them marked as the API's, and where the file replicates, those rows are
/// noted as changed so the marking replicates too. A file this connection cannot write
/// (a read-only listing) gets an empty table of the connection's own instead.
pub(crate) fn ensure_owners(conn: &Connection) -> rusqlite::Result<()> {
    let exists = |name: &str| {
        conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = ?1",
            [name],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
    };
    if exists("_edgeproxy_owners")? {
        return Ok(());
    }
    let mark = match exists("_edgeproxy_registrations")? {
        true => format!(
            "INSERT OR IGNORE INTO _edgeproxy_owners SELECT id, '{API_OWNER}'
                FROM _edgeproxy_registrations WHERE id IN (SELECT id FROM backends);"
        ),
        false => String::new(),
    };
    let note = match exists("_edgeproxy_dirty")? {
        true => "INSERT OR IGNORE INTO _edgeproxy_dirty (id) SELECT id FROM _edgeproxy_owners;",
        false => "",
    };
    let made = conn.execute_batch(&format!(
        "SAVEPOINT edgeproxy_owners; {OWNERS}; {mark} {note} RELEASE edgeproxy_owners;"
    ));
    match made {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO edgeproxy_owners; RELEASE edgeproxy_owners;");
            match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::ReadOnly) => {
                    conn.execute_batch(&OWNERS.replace("CREATE TABLE", "CREATE TEMP TABLE"))
                }
                _ => Err(e),
            }
        }
    }
}

/// `SELECT` of whole rows as [`crate::adapters::outbound::sqlite_editor::backend_row`]
/// reads them: every column, then the owner.
pub(crate) fn rows_sql() -> String {
    let cols = COLUMNS.map(|c| format!("b.{c}")).join(", ");
    format!("SELECT {cols}, o.owner FROM backends b LEFT JOIN _edgeproxy_owners o ON o.id = b.id")
}

/// Writes a whole row, its owner included.
pub(crate) fn write_row(
    conn: &Connection,
    row: &crate::domain::replication::BackendRow,
) -> rusqlite::Result<()> {
    conn.execute(&upsert_sql(), rusqlite::params_from_iter(row.values()))?;
    write_owner(conn, &row.id, row.owner.as_deref())
}

/// Records who manages `id` (None: an operator).
pub(crate) fn write_owner(
    conn: &Connection,
    id: &str,
    owner: Option<&str>,
) -> rusqlite::Result<()> {
    match owner {
        Some(o) => conn.execute(
            "INSERT OR REPLACE INTO _edgeproxy_owners VALUES (?1, ?2)",
            [id, o],
        ),
        None => conn.execute("DELETE FROM _edgeproxy_owners WHERE id = ?1", [id]),
    }
    .map(drop)
}

pub struct SqliteBackendRepository {
    path: PathBuf,
}

impl SqliteBackendRepository {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the database with the schema when the file does not exist yet (WAL mode, so
    /// operators' writes never block the proxy's reads).
    pub fn create_if_missing(&self) -> Result<bool, RoutingError> {
        if self.path.exists() {
            return Ok(false);
        }
        let err = |e: rusqlite::Error| RoutingError::Unreadable {
            location: self.path.display().to_string(),
            reason: e.to_string(),
        };
        let conn = Connection::open(&self.path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(true)
    }

    fn read(&self) -> Result<LoadedBackends, RoutingError> {
        let location = || self.path.display().to_string();
        let unreadable = |e: rusqlite::Error| RoutingError::Unreadable {
            location: location(),
            reason: e.to_string(),
        };
        if !self.path.exists() {
            return Err(RoutingError::Unreadable {
                location: location(),
                reason: "file does not exist".into(),
            });
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(unreadable)?;
        conn.busy_timeout(Duration::from_secs(2))
            .map_err(unreadable)?;

        if let Some(reason) = schema_problem(&conn).map_err(unreadable)? {
            return Err(RoutingError::Schema {
                location: location(),
                reason,
            });
        }

        let sql = format!("SELECT rowid, {} FROM backends", COLUMNS.join(", "));
        let mut stmt = conn.prepare(&sql).map_err(unreadable)?;
        let mut rows = stmt.query([]).map_err(unreadable)?;
        let mut out = LoadedBackends::default();
        while let Some(row) = rows.next().map_err(unreadable)? {
            let rowid: i64 = row.get(0).map_err(unreadable)?;
            let values: Vec<Value> = (1..=COLUMNS.len())
                .map(|i| row.get::<_, Value>(i))
                .collect::<Result<_, _>>()
                .map_err(unreadable)?;
            match parse_row(&values) {
                Ok(Some(backend)) => out.backends.push(backend),
                Ok(None) => {} // soft-deleted
                Err(reason) => out.skipped.push(SkippedRow {
                    id: match &values[0] {
                        Value::Text(id) => id.clone(),
                        _ => format!("rowid {rowid}"),
                    },
                    reason,
                }),
            }
        }
        Ok(out)
    }
}

/// Why the `backends` table of `conn` cannot be routed from (missing, or lacking a
/// column), or None when it has every column.
pub(crate) fn schema_problem(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let present: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('backends')")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())?;
    if present.is_empty() {
        return Ok(Some("no table named backends".into()));
    }
    let missing: Vec<&str> = COLUMNS
        .iter()
        .copied()
        .filter(|c| !present.iter().any(|p| p.eq_ignore_ascii_case(c)))
        .collect();
    Ok((!missing.is_empty())
        .then(|| format!("table backends lacks column(s) {}", missing.join(", "))))
}

/// A connection for a long-lived writer of `path` (created if missing): WAL mode, so
/// the proxy's reads never wait on it, a busy timeout for other writers, and `schema`.
pub(crate) fn open_writer(path: &Path, schema: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(schema)?;
    Ok(conn)
}

/// `INSERT OR REPLACE INTO backends (…every column…) VALUES (?1, …)`.
pub(crate) fn upsert_sql() -> String {
    let placeholders = (1..=COLUMNS.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT OR REPLACE INTO backends ({}) VALUES ({placeholders})",
        COLUMNS.join(", ")
    )
}

impl BackendRepository for SqliteBackendRepository {
    fn load(&self) -> Result<LoadedBackends, RoutingError> {
        self.read()
    }

    /// Length and modification time of the file and of its WAL.
    fn marker(&self) -> Option<String> {
        let of = |p: &std::path::Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| format!("{}@{:?}", m.len(), m.modified().ok()))
        };
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        Some(format!(
            "{:?}|{:?}",
            of(&self.path),
            of(std::path::Path::new(&wal))
        ))
    }
}

fn text<'a>(col: &str, v: &'a Value) -> Result<&'a str, String> {
    match v {
        Value::Text(s) => Ok(s),
        Value::Null => Err(format!("{col} is NULL")),
        other => Err(format!("{col} is {:?}, expected text", other.data_type())),
    }
}

fn int(col: &str, v: &Value) -> Result<i64, String> {
    match v {
        Value::Integer(i) => Ok(*i),
        Value::Null => Err(format!("{col} is NULL")),
        Value::Text(s) => Err(format!("{col} is text {s:?}, expected an integer")),
        other => Err(format!(
            "{col} is {:?}, expected an integer",
            other.data_type()
        )),
    }
}

fn ranged<T: TryFrom<i64>>(col: &str, v: &Value, min: i64) -> Result<T, String> {
    let i = int(col, v)?;
    if i < min {
        return Err(format!("{col} = {i} is below {min}"));
    }
    T::try_from(i).map_err(|_| format!("{col} = {i} is out of range"))
}

/// The loader's checks on a row whatever its `deleted` flag: undeleting a row must not bring
/// back one the proxy would skip.
pub(crate) fn check_as_live(mut values: Vec<Value>) -> Result<(), String> {
    values[10] = Value::Integer(0);
    parse_row(&values).map(drop)
}

/// One row -> a backend; `Ok(None)` for a soft-deleted row. The error names the column.
pub(crate) fn parse_row(v: &[Value]) -> Result<Option<Backend>, String> {
    // A NULL `deleted` reads as 0, the column's default in edgeProxy's schema.
    let deleted = match &v[10] {
        Value::Null => false,
        other => int("deleted", other)? != 0,
    };
    if deleted {
        return Ok(None);
    }
    let id = text("id", &v[0])?;
    if id.is_empty() {
        return Err("id is empty".into());
    }
    let region = text("region", &v[2])?;
    if region.trim().is_empty() {
        return Err("region is empty".into());
    }
    let country = text("country", &v[3])?
        .parse()
        .map_err(|e| format!("country: {e}"))?;
    let ip = text("wg_ip", &v[4])?;
    let ip: std::net::IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("wg_ip {ip:?} is not an IP address"))?;
    let port: u16 = ranged("port", &v[5], 1)?;
    Ok(Some(Backend {
        id: BackendId::new(id),
        app: Arc::from(text("app", &v[1])?),
        region: Region::new(region),
        country,
        addr: std::net::SocketAddr::new(ip, port),
        healthy: int("healthy", &v[6])? != 0,
        weight: ranged("weight", &v[7], 0)?,
        soft_limit: ranged("soft_limit", &v[8], 0)?,
        hard_limit: ranged("hard_limit", &v[9], 0)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_with(rows: &str) -> (tempfile::TempDir, SqliteBackendRepository) {
        let dir = tempfile::tempdir().unwrap();
        let repo = SqliteBackendRepository::new(dir.path().join("routing.db"));
        assert!(repo.create_if_missing().unwrap());
        let conn = Connection::open(repo.path()).unwrap();
        conn.execute_batch(rows).unwrap();
        (dir, repo)
    }

    #[test]
    fn loads_good_rows_skips_bad_and_deleted() {
        let (_dir, repo) = db_with(
            "INSERT INTO backends VALUES ('ok','web','sa','BR','10.50.1.1',8080,1,2,50,100,0);
             INSERT INTO backends VALUES ('gone','web','sa','BR','10.50.1.2',8080,1,1,10,0,1);
             INSERT INTO backends (id,app,region,country,wg_ip,port) VALUES ('v6','web','eu','de','fd00::1',443);
             CREATE TABLE loose AS SELECT * FROM backends WHERE 0;",
        );
        // Rows that only a schema without constraints (edgeProxy's) lets in.
        let conn = Connection::open(repo.path()).unwrap();
        conn.execute_batch(
            "ALTER TABLE backends RENAME TO strict_backends;
             CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT, region TEXT, country TEXT,
               wg_ip TEXT, port INTEGER, healthy INTEGER, weight INTEGER, soft_limit INTEGER,
               hard_limit INTEGER, deleted INTEGER DEFAULT 0);
             INSERT INTO backends SELECT * FROM strict_backends;
             INSERT INTO backends VALUES ('nullcountry','web','sa',NULL,'10.0.0.1',80,1,1,1,0,0);
             INSERT INTO backends VALUES ('bigport','web','sa','BR','10.0.0.1',70000,1,1,1,0,0);
             INSERT INTO backends VALUES ('textport','web','sa','BR','10.0.0.1','http',1,1,1,0,0);
             INSERT INTO backends VALUES ('badip','web','sa','BR','10.0.0',80,1,1,1,0,0);",
        )
        .unwrap();
        let loaded = repo.load().unwrap();
        let ids: Vec<&str> = loaded.backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["ok", "v6"]);
        let ok = &loaded.backends[0];
        assert_eq!(ok.addr, "10.50.1.1:8080".parse().unwrap());
        assert_eq!((ok.weight, ok.soft_limit, ok.hard_limit), (2, 50, 100));
        assert_eq!(loaded.backends[1].country.as_str(), "DE");
        let skipped: Vec<(&str, &str)> = loaded
            .skipped
            .iter()
            .map(|s| (s.id.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("nullcountry", "country is NULL"),
                ("bigport", "port = 70000 is out of range"),
                ("textport", "port is text \"http\", expected an integer"),
                ("badip", "wg_ip \"10.0.0\" is not an IP address"),
            ]
        );
    }

    #[test]
    fn wrong_schema_and_garbage_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE backends (id TEXT, app TEXT)")
            .unwrap();
        let err = SqliteBackendRepository::new(&path).load().unwrap_err();
        assert!(matches!(err, RoutingError::Schema { .. }), "{err}");
        assert!(err.to_string().contains("region"), "{err}");

        std::fs::write(
            &path,
            b"this is not a database, just bytes, many bytes............",
        )
        .unwrap();
        let err = SqliteBackendRepository::new(&path).load().unwrap_err();
        assert!(matches!(err, RoutingError::Unreadable { .. }), "{err}");
    }
}
