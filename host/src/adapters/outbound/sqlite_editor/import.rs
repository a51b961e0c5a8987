//! `edgeproxy db import`: a `.sql` script or a `.csv` file with a header, loaded in one
//! transaction through the editor's row checks; one bad statement or row rejects the
//! whole file, named by line, and leaves the table as it was.

use std::path::Path;

use rusqlite::Connection;
use rusqlite::fallible_iterator::FallibleIterator as _;
use rusqlite::types::Value;

use super::{EditError, Imported, RoutingEditor, err_at, message};
use crate::adapters::outbound::sqlite_routing::{COLUMNS, schema_problem, upsert_sql};

impl RoutingEditor {
    fn live_count(conn: &Connection) -> rusqlite::Result<usize> {
        conn.query_row("SELECT count(*) FROM backends WHERE deleted = 0", [], |r| {
            r.get(0)
        })
    }

    /// Loads `file` (`.sql` statements or `.csv` with a header) in one transaction: any
    /// bad statement or row rejects the whole file, named by line, and leaves the table
    /// as it was.
    pub fn import(&mut self, file: &Path) -> Result<Imported, EditError> {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file)
            .map_err(|e| EditError::Rejected(format!("{name}: {e}")))?;
        let kind = file
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let path = self.path.clone();
        let tx = self.begin()?;
        let before = Self::live_count(&tx).map_err(|e| err_at(&path, e))?;
        let rows = match kind.as_deref() {
            Some("sql") => import_sql(&tx, &text),
            Some("csv") => import_csv(&tx, &text),
            _ => Err("expected a .sql or .csv file".into()),
        }
        .map_err(|e| EditError::Rejected(format!("{name}: {e}; nothing was imported")))?;
        let unusable = |why: String| {
            EditError::Rejected(format!(
                "{name}: the backends table is unusable after the import ({why}); nothing was imported"
            ))
        };
        let after = Self::live_count(&tx).map_err(|e| unusable(e.to_string()))?;
        // A script that dropped and recreated the table dropped the row checks with it:
        // every row is checked again before anything is committed.
        if let Some(problem) = schema_problem(&tx).map_err(|e| unusable(e.to_string()))? {
            return Err(unusable(problem));
        }
        let columns = COLUMNS.join(", ");
        tx.query_row(
            &format!("SELECT count(edgeproxy_check_row({columns})) FROM main.backends"),
            [],
            |_| Ok(()),
        )
        .map_err(|e| {
            EditError::Rejected(format!("{name}: {}; nothing was imported", message(e)))
        })?;
        tx.commit().map_err(|e| err_at(&path, e))?;
        self.check_schema()?;
        Ok(Imported {
            rows,
            before,
            after,
        })
    }
}

/// Runs each statement in turn; an error names the line its statement starts on.
fn import_sql(conn: &Connection, text: &str) -> Result<usize, String> {
    let mut batch = rusqlite::Batch::new(conn, text);
    let mut cursor = 0;
    let mut rows = 0;
    loop {
        let line_of = |at: usize| text[..at].matches('\n').count() + 1;
        let mut stmt = match batch.next() {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(rows),
            Err(e) => return Err(format!("after line {}: {}", line_of(cursor), message(e))),
        };
        // The statement's own text is a slice of the file: find where it starts.
        let sql = stmt.expanded_sql().unwrap_or_default();
        let sql = skip_trivia(&sql).trim_end();
        let start = match text[cursor..].find(sql) {
            Some(i) if !sql.is_empty() => cursor + i,
            _ => cursor,
        };
        cursor = start + sql.len();
        let changed = stmt
            .raw_execute()
            .map_err(|e| format!("line {}: {}", line_of(start), message(e)))?;
        if !stmt.readonly() {
            rows += changed;
        }
    }
}

/// `sql` from its first token on: past whitespace and `--`/`/* */` comments.
fn skip_trivia(mut sql: &str) -> &str {
    loop {
        sql = sql.trim_start();
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = sql.strip_prefix("/*") {
            sql = rest.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return sql;
        }
    }
}

/// A header line names the columns: id, app, region, country, wg_ip and port are
/// required; healthy, weight, soft_limit, hard_limit and deleted take the schema's
/// defaults when absent. Rows replace rows with the same id.
fn import_csv(conn: &Connection, text: &str) -> Result<usize, String> {
    const REQUIRED: [&str; 6] = ["id", "app", "region", "country", "wg_ip", "port"];
    const DEFAULTS: [(&str, i64); 5] = [
        ("healthy", 1),
        ("weight", 1),
        ("soft_limit", 100),
        ("hard_limit", 0),
        ("deleted", 0),
    ];
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| format!("line 1: {e}"))?
        .iter()
        .map(str::to_ascii_lowercase)
        .collect();
    if let Some(unknown) = header.iter().find(|h| !COLUMNS.contains(&h.as_str())) {
        return Err(format!(
            "line 1: unknown column {unknown:?} (columns: {})",
            COLUMNS.join(", ")
        ));
    }
    if let Some(missing) = REQUIRED.iter().find(|c| !header.iter().any(|h| h == *c)) {
        return Err(format!("line 1: the header lacks the column {missing:?}"));
    }
    let position = |col: &str| header.iter().position(|h| h == col);
    let mut insert = conn.prepare(&upsert_sql()).map_err(message)?;
    let mut rows = 0;
    for record in reader.records() {
        let record = record.map_err(|e| e.to_string())?;
        let line = record.position().map_or(0, |p| p.line());
        let values: Vec<Value> = COLUMNS
            .iter()
            .enumerate()
            .map(|(i, col)| {
                let field = position(col).and_then(|p| record.get(p));
                match (field, i) {
                    // Numbers as integers, so the check sees what SQLite would store.
                    (Some(f), 5..) => f
                        .parse::<i64>()
                        .map_or_else(|_| Value::Text(f.to_owned()), Value::Integer),
                    (Some(f), _) => Value::Text(f.to_owned()),
                    (None, _) => Value::Integer(
                        DEFAULTS
                            .iter()
                            .find(|(c, _)| c == col)
                            .map_or(0, |(_, d)| *d),
                    ),
                }
            })
            .collect();
        // An operator's row from now on, whoever managed the id before.
        let id = values[0].clone();
        insert
            .execute(rusqlite::params_from_iter(values))
            .map_err(|e| format!("line {line}: {}", message(e)))?;
        conn.execute("DELETE FROM _edgeproxy_owners WHERE id = ?1", [id])
            .map_err(|e| format!("line {line}: {}", message(e)))?;
        rows += 1;
    }
    Ok(rows)
}
