//! `edgeproxy backend …` and `edgeproxy db …`: the routing table from the command line,
//! on the same SQLite file a running proxy reads (it picks each change up by itself).
//! Output is an aligned table, or JSON with `--json`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::output::{self, emit, yes_no};
use crate::adapters::outbound::postgres::{PgEditor, PgSettings};
use crate::adapters::outbound::sqlite_editor::{BackendRow, RoutingEditor, RowChanges};
use crate::domain::ports::BackendEditor;

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// List backends (live ones; --all adds removed ones).
    List {
        #[arg(long)]
        app: Option<String>,
        /// Include removed (soft-deleted) backends.
        #[arg(long)]
        all: bool,
        /// Join the running proxy's view (its admin API): up here or not, the last
        /// health check, ejection and its backoff, heartbeat age.
        #[arg(long)]
        live: bool,
    },
    /// Add a backend.
    Add(AddArgs),
    /// Change fields of a backend.
    Update {
        id: String,
        #[command(flatten)]
        changes: ChangeArgs,
    },
    /// Remove a backend (soft delete: `deleted = 1`, the row stays).
    Remove { id: String },
    /// Stop sending new clients to a backend (`healthy = 0`); open connections stay.
    Drain { id: String },
    /// Undo a drain (`healthy = 1`).
    Undrain { id: String },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    pub id: String,
    #[arg(long)]
    pub app: String,
    #[arg(long)]
    pub region: String,
    /// ISO 3166-1 alpha-2 country code.
    #[arg(long)]
    pub country: String,
    /// The backend's WireGuard overlay IP.
    #[arg(long = "wg-ip", visible_alias = "ip")]
    pub wg_ip: String,
    #[arg(long)]
    pub port: u16,
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    #[arg(long, default_value_t = 100)]
    pub soft_limit: u32,
    /// 0: unlimited.
    #[arg(long, default_value_t = 0)]
    pub hard_limit: u32,
    /// Add it drained (`healthy = 0`).
    #[arg(long)]
    pub drained: bool,
}

#[derive(Debug, Args)]
pub struct ChangeArgs {
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    #[arg(long)]
    pub country: Option<String>,
    #[arg(long = "wg-ip", visible_alias = "ip")]
    pub wg_ip: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub weight: Option<u32>,
    #[arg(long)]
    pub soft_limit: Option<u32>,
    #[arg(long)]
    pub hard_limit: Option<u32>,
    #[arg(long)]
    pub healthy: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Create the routing database with the schema (nothing happens to an existing one).
    Init,
    /// Load backends from FILE.sql (statements) or FILE.csv (with a header line) in one
    /// transaction; one bad row rejects the whole file.
    Import { file: PathBuf },
}

/// A running proxy's `/backends` entries, by id.
pub type Live = std::collections::HashMap<String, serde_json::Value>;

/// The routing table a command works on: the SQLite file, or the PostgreSQL database.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Postgres(PgSettings),
}

impl Source {
    fn editor(&self) -> anyhow::Result<Box<dyn BackendEditor>> {
        Ok(match self {
            Source::File(path) => Box::new(RoutingEditor::open(path)?),
            Source::Postgres(pg) => Box::new(PgEditor::open(pg)?),
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Postgres(pg) => pg.describe(),
        }
    }
}

/// Runs one `backend` command on the routing table at `source`; `live` is the running
/// proxy's view for `list --live`.
pub fn backend(
    source: &Source,
    command: BackendCommand,
    json: bool,
    live: Option<Live>,
) -> anyhow::Result<()> {
    let mut editor = source.editor()?;
    let row = match command {
        BackendCommand::List { app, all, .. } => {
            let rows = editor.list(app.as_deref(), all)?;
            if let Some(live) = live {
                return print_live(&rows, &live, json);
            }
            if json {
                // With replication on, each row's version: when, and which POP wrote it.
                let versions = editor.versions()?;
                let rows: Vec<_> = rows
                    .into_iter()
                    .map(|row| VersionedJson {
                        version: versions.get(&row.id).map(|v| VersionJson {
                            written_at: humantime::format_rfc3339_millis(
                                std::time::UNIX_EPOCH
                                    + std::time::Duration::from_millis(v.hlc.millis()),
                            )
                            .to_string(),
                            node: v.node.to_string(),
                            hlc: v.hlc.0,
                        }),
                        row,
                    })
                    .collect();
                return emit(true, &rows, String::new);
            }
            return print_rows(&rows, all, json);
        }
        BackendCommand::Add(a) => {
            // What the registration API refuses, an operator may mean: said, not refused.
            if let Some(kind) = a
                .wg_ip
                .trim()
                .parse()
                .ok()
                .and_then(crate::domain::registration::special)
            {
                eprintln!(
                    "warning: {} is {kind}; the proxy will connect there from every POP",
                    a.wg_ip
                );
            }
            editor.add(&BackendRow {
                id: a.id,
                app: a.app,
                region: a.region,
                country: a.country,
                wg_ip: a.wg_ip,
                port: a.port,
                healthy: !a.drained,
                weight: a.weight,
                soft_limit: a.soft_limit,
                hard_limit: a.hard_limit,
                deleted: false,
                owner: None,
            })?
        }
        BackendCommand::Update { id, changes: c } => editor.update(
            &id,
            &RowChanges {
                app: c.app,
                region: c.region,
                country: c.country,
                wg_ip: c.wg_ip,
                port: c.port,
                healthy: c.healthy,
                weight: c.weight,
                soft_limit: c.soft_limit,
                hard_limit: c.hard_limit,
            },
        )?,
        BackendCommand::Remove { id } => editor.remove(&id)?,
        BackendCommand::Drain { id } => editor.set_healthy(&id, false)?,
        BackendCommand::Undrain { id } => editor.set_healthy(&id, true)?,
    };
    print_rows(std::slice::from_ref(&row), true, json)
}

/// Runs one `db` command on the routing table at `source`.
pub fn db(source: &Source, command: DbCommand, json: bool) -> anyhow::Result<()> {
    let db = source.describe();
    match command {
        DbCommand::Init => {
            let created = match source {
                Source::File(path) => RoutingEditor::init(path)?.1,
                Source::Postgres(pg) => PgEditor::init(pg)?.1,
            };
            let message = if created {
                "created"
            } else {
                "already initialised"
            };
            emit(
                json,
                &serde_json::json!({ "db": db, "created": created }),
                || format!("{db}: {message}\n"),
            )
        }
        DbCommand::Import { file } => {
            let imported = source.editor()?.import(&file)?;
            emit(json, &imported, || {
                format!(
                    "{}: {} row(s) written; live backends {} -> {}\n",
                    file.display(),
                    imported.rows,
                    imported.before,
                    imported.after
                )
            })
        }
    }
}

#[derive(serde::Serialize)]
struct VersionedJson {
    #[serde(flatten)]
    row: BackendRow,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<VersionJson>,
}

#[derive(serde::Serialize)]
struct VersionJson {
    written_at: String,
    node: String,
    hlc: u64,
}

/// Rows with this POP's view of each: JSON adds it as `live`; the table as columns.
fn print_live(rows: &[BackendRow], live: &Live, json: bool) -> anyhow::Result<()> {
    if json {
        let joined: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["live"] = live.get(&r.id).cloned().unwrap_or_default();
                v
            })
            .collect();
        return emit(true, &joined, String::new);
    }
    let header = [
        "ID",
        "APP",
        "ADDRESS",
        "HEALTHY",
        "HERE",
        "CHECK",
        "EJECTED",
        "HEARTBEAT",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let l = live.get(&r.id);
            let field = |f: &dyn Fn(&serde_json::Value) -> Option<String>| {
                l.and_then(f).unwrap_or_else(|| "-".into())
            };
            vec![
                r.id.clone(),
                r.app.clone(),
                format!("{}:{}", r.wg_ip, r.port),
                yes_no(r.healthy),
                field(&|l| {
                    Some(match (l["up_here"].as_bool()?, l["app_in_panic"] == true) {
                        (_, true) => "panic".into(),
                        (up, false) => yes_no(up),
                    })
                }),
                field(&|l| {
                    let c = l.get("check").filter(|c| !c.is_null())?;
                    Some(format!(
                        "{} ({})",
                        c["state"].as_str()?,
                        c["last_result"].as_str().unwrap_or("not yet")
                    ))
                }),
                field(&|l| {
                    let e = l.get("ejection").filter(|e| !e.is_null())?;
                    Some(format!(
                        "{:.0}s left: {}",
                        e["remaining_secs"].as_f64()?,
                        e["reason"].as_str()?
                    ))
                }),
                field(&|l| Some(format!("{:.0}s ago", l["heartbeat_age_secs"].as_f64()?))),
            ]
        })
        .collect();
    emit(false, &rows, || output::render(&header, &cells))
}

fn print_rows(rows: &[BackendRow], with_deleted: bool, json: bool) -> anyhow::Result<()> {
    emit(json, &rows, || table(rows, with_deleted))
}

/// Rows as a table, the DELETED column only when asked for.
fn table(rows: &[BackendRow], with_deleted: bool) -> String {
    let mut header = vec![
        "ID", "APP", "REGION", "COUNTRY", "ADDRESS", "HEALTHY", "WEIGHT", "SOFT", "HARD",
    ];
    if with_deleted {
        header.push("DELETED");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let addr = match r.wg_ip.parse::<std::net::IpAddr>() {
                Ok(ip) => std::net::SocketAddr::new(ip, r.port).to_string(),
                Err(_) => format!("{}:{}", r.wg_ip, r.port),
            };
            let mut row = vec![
                r.id.clone(),
                r.app.clone(),
                r.region.clone(),
                r.country.clone(),
                addr,
                yes_no(r.healthy),
                r.weight.to_string(),
                r.soft_limit.to_string(),
                r.hard_limit.to_string(),
            ];
            if with_deleted {
                row.push(yes_no(r.deleted));
            }
            row
        })
        .collect();
    output::render(&header, &cells)
}
