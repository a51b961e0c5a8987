//! The routing table in PostgreSQL: the same `backends` table and row checks as the SQLite
//! file, for operators who run one control-plane database with regional read replicas.
//!
//! - Loads read every row as text and hand them to the SQLite loader's own checks, so a
//!   bad row is skipped with the same warning whichever database holds it.
//! - A statement trigger (`edgeproxy db init` installs it) sends `NOTIFY edgeproxy_backends`
//!   on every write; one listening connection per POP turns it into a reload, and the
//!   periodic reload (`db_reload_secs`) stays behind it for notifications lost while the
//!   connection was down, and for replicas, which do not forward them.
//! - A connection that fails is dropped and made again on the next load; the listener
//!   reconnects with a backoff and asks for a reload when it is back. Credentials come
//!   from the URL or a password file and are never logged; TLS verifies the server
//!   against a CA file (rustls).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postgres::{Client, NoTls};
use rusqlite::types::Value;
use tokio::sync::Notify;

use super::sqlite_routing::{COLUMNS, parse_row};
use crate::domain::ports::{BackendRepository, LoadedBackends, RoutingError, SkippedRow};

/// Channel the trigger notifies on.
pub const CHANNEL: &str = "edgeproxy_backends";

/// The schema `edgeproxy db init` creates: edgeProxy's columns (integers for the flags, as
/// in SQLite), the change trigger, and each POP's record of the backends registered
/// through it.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS backends (
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
);
CREATE OR REPLACE FUNCTION edgeproxy_backends_changed() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('edgeproxy_backends', ''); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS edgeproxy_backends_changed ON backends;
CREATE TRIGGER edgeproxy_backends_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON backends FOR EACH STATEMENT EXECUTE FUNCTION edgeproxy_backends_changed();
CREATE TABLE IF NOT EXISTS edgeproxy_registrations (
    pop TEXT NOT NULL,
    id  TEXT NOT NULL,
    PRIMARY KEY (pop, id)
);
";

/// Who manages each row (none: an operator; `api`: the registration API), beside the
/// table so its columns stay edgeProxy's. Made where missing, with the rows registered
/// through the API before it existed marked as the API's.
pub const OWNERS: &str = "
DO $$ BEGIN
    -- POPs starting together: one makes the table, the others find it made.
    PERFORM pg_advisory_xact_lock(7426548530);
    IF to_regclass('edgeproxy_owners') IS NULL THEN
        CREATE TABLE edgeproxy_owners (id TEXT PRIMARY KEY, owner TEXT NOT NULL);
        IF to_regclass('edgeproxy_registrations') IS NOT NULL THEN
            INSERT INTO edgeproxy_owners
                SELECT DISTINCT id, 'api' FROM edgeproxy_registrations
                WHERE id IN (SELECT id FROM backends);
        END IF;
    END IF;
END $$;
";

/// Longest a statement, or a connection that stopped answering, may take.
const STALL: Duration = Duration::from_secs(5);

/// Where the table is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// `postgres://user[:password]@host[:port]/db[?sslmode=…]`, or key=value pairs.
    pub url: String,
    /// Verify the server against this CA (PEM) over TLS; None: no TLS.
    pub ca_file: Option<PathBuf>,
    /// The password, when it is not in the URL.
    pub password_file: Option<PathBuf>,
}

impl PgSettings {
    /// `host:port/db` (user, password and options left out), for logs and errors.
    pub fn describe(&self) -> String {
        match self.url.parse::<postgres::Config>() {
            Ok(c) => {
                let host = c
                    .get_hosts()
                    .first()
                    .map(|h| match h {
                        postgres::config::Host::Tcp(h) => h.clone(),
                        postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .unwrap_or_else(|| "localhost".into());
                let port = c.get_ports().first().copied().unwrap_or(5432);
                format!(
                    "postgres {host}:{port}/{}",
                    c.get_dbname().unwrap_or("(default database)")
                )
            }
            Err(_) => "postgres (unparsable db_url)".into(),
        }
    }

    fn config(&self) -> Result<postgres::Config, String> {
        // The parser's message never quotes the URL, so no password reaches a log.
        let mut c: postgres::Config = self
            .url
            .parse()
            .map_err(|e| format!("db_url does not parse: {e}"))?;
        if let Some(file) = &self.password_file {
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("db_password_file {}: {e}", file.display()))?;
            c.password(password.trim_end_matches(['\n', '\r']));
        }
        c.connect_timeout(Duration::from_secs(5));
        c.application_name("edgeproxy");
        // A server or path that stops answering fails a statement within seconds instead
        // of holding the reload (and the registration API) for the kernel's minutes.
        c.tcp_user_timeout(STALL);
        c.keepalives(true);
        c.keepalives_idle(STALL);
        // The URL's own `options` come after, so a statement_timeout given there wins.
        let timeout = format!("-c statement_timeout={}", STALL.as_millis());
        let options = match c.get_options() {
            Some(given) => format!("{timeout} {given}"),
            None => timeout,
        };
        c.options(&options);
        Ok(c)
    }

    /// A new connection (blocking).
    pub fn connect(&self) -> Result<Client, String> {
        let c = self.config()?;
        let result = match &self.ca_file {
            Some(ca) => c.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(
                ca,
            )?)),
            None => c.connect(NoTls),
        };
        result.map_err(|e| format!("{}: {}", self.describe(), describe_error(&e)))
    }
}

/// rustls verifying the server against the CA in `ca` (and nothing else).
fn tls_config(ca: &Path) -> Result<rustls::ClientConfig, String> {
    crate::adapters::net::tls::client_trusting(ca).map_err(|e| format!("db_ca_file {e}"))
}

/// The server's message when there is one (the driver's own display is terse).
fn describe_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s = format!("{s}: {inner}");
                source = inner.source();
            }
            s
        }
    }
}

/// Every column as text (`NULL` kept), so a bad value is one skipped row, not a failed load.
fn select_sql() -> String {
    let cols: Vec<String> = COLUMNS.iter().map(|c| format!("{c}::text")).collect();
    format!("SELECT {} FROM backends", cols.join(", "))
}

/// One cell as the loader's checks take it: integers where the text is one.
fn cell(v: Option<String>, integer: bool) -> Value {
    match v {
        None => Value::Null,
        Some(s) if integer => s.parse::<i64>().map_or(Value::Text(s), Value::Integer),
        Some(s) => Value::Text(s),
    }
}

pub struct PgBackendRepository {
    settings: PgSettings,
    client: Mutex<Option<Client>>,
}

impl PgBackendRepository {
    pub fn new(settings: PgSettings) -> Self {
        Self {
            settings,
            client: Mutex::new(None),
        }
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    fn read(&self, client: &mut Client) -> Result<LoadedBackends, postgres::Error> {
        let mut out = LoadedBackends::default();
        for row in client.query(select_sql().as_str(), &[])? {
            let values: Vec<Value> = (0..COLUMNS.len())
                .map(|i| cell(row.get::<_, Option<String>>(i), i >= 5))
                .collect();
            match parse_row(&values) {
                Ok(Some(b)) => out.backends.push(b),
                Ok(None) => {}
                Err(reason) => out.skipped.push(SkippedRow {
                    id: match &values[0] {
                        Value::Text(id) => id.clone(),
                        _ => "(NULL id)".into(),
                    },
                    reason,
                }),
            }
        }
        Ok(out)
    }
}

/// The blocking client's drop waits on its own runtime, which must not happen on one of
/// the proxy's async threads (where the last `Arc` may go): it is dropped on a thread.
impl Drop for PgBackendRepository {
    fn drop(&mut self) {
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(client) = client {
            let _ = std::thread::Builder::new().spawn(move || drop(client));
        }
    }
}

impl BackendRepository for PgBackendRepository {
    fn load(&self) -> Result<LoadedBackends, RoutingError> {
        let location = || self.settings.describe();
        let mut guard = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            let client = self
                .settings
                .connect()
                .map_err(|reason| RoutingError::Unreadable {
                    location: location(),
                    reason,
                })?;
            *guard = Some(client);
        }
        let client = guard.as_mut().expect("connected above");
        match self.read(client) {
            Ok(loaded) => Ok(loaded),
            Err(e) => {
                let missing = e.code().is_some_and(|c| {
                    *c == postgres::error::SqlState::UNDEFINED_TABLE
                        || *c == postgres::error::SqlState::UNDEFINED_COLUMN
                });
                // A broken connection is made again on the next load.
                *guard = None;
                let reason = describe_error(&e);
                Err(match missing {
                    true => RoutingError::Schema {
                        location: location(),
                        reason,
                    },
                    false => RoutingError::Unreadable {
                        location: location(),
                        reason,
                    },
                })
            }
        }
    }
}

/// Listens for the trigger's notifications on a thread of its own, poking `changed` for
/// each one and after every reconnection (what changed meanwhile was not announced), until
/// `stop` is set. Reconnects with a backoff from 1 s to 30 s.
pub fn listen(settings: PgSettings, changed: Arc<Notify>, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("edgeproxy-pg-listen".into())
        .spawn(move || {
            let mut backoff = Duration::from_secs(1);
            let mut down_since_logged = false;
            while !stop.load(Ordering::Relaxed) {
                let mut client = match settings
                    .connect()
                    .and_then(|mut c| {
                        c.batch_execute(&format!("LISTEN {CHANNEL}"))
                            .map_err(|e| describe_error(&e))
                            .map(|()| c)
                    }) {
                    Ok(c) => c,
                    Err(e) => {
                        if !down_since_logged {
                            tracing::warn!(
                                "routing table: no change notifications from {}: {e}; the periodic reload goes on, retrying with a backoff",
                                settings.describe()
                            );
                            down_since_logged = true;
                        }
                        sleep_unless(&stop, backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                };
                if down_since_logged {
                    tracing::info!("routing table: notifications from {} again", settings.describe());
                }
                backoff = Duration::from_secs(1);
                changed.notify_one();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // A fresh iterator per wait: one whose timeout has passed never waits
                    // again (it spins, and misses what arrives).
                    let mut notifications = client.notifications();
                    let mut wait = notifications.timeout_iter(Duration::from_millis(500));
                    match postgres::fallible_iterator::FallibleIterator::next(&mut wait) {
                        Ok(Some(_)) => {
                            tracing::debug!("routing table: change notification");
                            changed.notify_one()
                        }
                        // A timeout: look at the stop flag (a dead connection ends in Err).
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(
                                "routing table: lost the notification connection to {}: {}",
                                settings.describe(),
                                describe_error(&e)
                            );
                            down_since_logged = true;
                            break;
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(
            "routing table: cannot start the notification listener: {e}; reloading on the timer only"
        );
    }
}

/// Sleeps `d` in short steps, ending early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let mut left = d;
    while !stop.load(Ordering::Relaxed) && !left.is_zero() {
        let step = left.min(Duration::from_millis(100));
        std::thread::sleep(step);
        left -= step;
    }
}

mod editor;
pub use editor::{PgEditor, PgRegistrations};
