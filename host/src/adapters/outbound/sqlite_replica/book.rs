//! The in-memory copy of the replicated table: every held row with its version, the dots
//! held per origin, the writes seen, and the live digest kept up as rows change (a sync
//! round compares digests several times a second; recomputing them would cost a pass over
//! every row each time). A transaction stages its changes; they reach the book only after
//! it commits.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::Connection;

use crate::adapters::outbound::sqlite_editor::backend_row;
use crate::adapters::outbound::sqlite_routing::COLUMNS;
use crate::domain::replication::{
    Digest, Dot, Hlc, NodeId, Seen, Version, VersionedRow, bucket_of,
};

pub(super) struct Entry {
    pub row: VersionedRow,
    /// This POP's wall time (ms) when the version was written here: tombstones age by it,
    /// so a clock that is off by a constant amount still keeps them for the whole window.
    pub at: u64,
}

pub(super) struct Book {
    by_id: BTreeMap<String, Entry>,
    held: BTreeMap<NodeId, BTreeSet<u64>>,
    pub seen: Seen,
    pub digest: Digest,
    tombstones: usize,
}

/// What one transaction changes, read through by its later steps.
#[derive(Default)]
pub(super) struct Staged {
    puts: BTreeMap<String, Entry>,
    removed: BTreeSet<String>,
    pub seen: Seen,
}

impl Staged {
    pub fn held<'a>(&'a self, book: &'a Book, id: &str) -> Option<&'a VersionedRow> {
        if let Some(e) = self.puts.get(id) {
            return Some(&e.row);
        }
        if self.removed.contains(id) {
            return None;
        }
        book.by_id.get(id).map(|e| &e.row)
    }

    pub fn put(&mut self, e: Entry) {
        self.removed.remove(&e.row.row.id);
        self.puts.insert(e.row.row.id.clone(), e);
    }

    pub fn remove(&mut self, id: &str) {
        self.puts.remove(id);
        self.removed.insert(id.to_owned());
    }
}

impl Book {
    pub fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let mut book = Self {
            by_id: BTreeMap::new(),
            held: BTreeMap::new(),
            seen: Seen::default(),
            digest: Digest::of([]),
            tombstones: 0,
        };
        let cols = COLUMNS.map(|c| format!("b.{c}")).join(", ");
        let mut stmt = conn.prepare(&format!(
            "SELECT {cols}, o.owner, v.hlc, v.node, v.seq, v.at FROM backends b
                JOIN _edgeproxy_versions v ON v.id = b.id
                LEFT JOIN _edgeproxy_owners o ON o.id = b.id"
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            // A row that no longer reads (edited by hand since) is re-announced when its
            // edit is stamped; until then it is not offered to peers.
            if let Ok(row) = backend_row(r) {
                let n = COLUMNS.len() + 1;
                let version = Version {
                    hlc: Hlc(r.get::<_, i64>(n)? as u64),
                    node: NodeId(r.get::<_, i64>(n + 1)? as u64),
                };
                let row = VersionedRow {
                    version,
                    seq: r.get::<_, i64>(n + 2)? as u64,
                    row,
                };
                book.put(Entry {
                    at: r.get::<_, i64>(n + 3)? as u64,
                    row,
                });
            }
        }
        let mut stmt = conn.prepare("SELECT node, lo, hi FROM _edgeproxy_seen")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            book.seen.insert_range(
                NodeId(r.get::<_, i64>(0)? as u64),
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            );
        }
        // Every row held was seen, whatever the file says.
        let dots: Vec<Dot> = book.by_id.values().map(|e| e.row.dot()).collect();
        for d in dots {
            book.seen.insert(d);
        }
        Ok(book)
    }

    pub fn commit(&mut self, staged: Staged) {
        for id in &staged.removed {
            self.remove(id);
        }
        for (_, e) in staged.puts {
            self.put(e);
        }
        self.seen.union(&staged.seen);
    }

    fn put(&mut self, e: Entry) {
        let r = &e.row;
        if !r.row.deleted {
            self.digest.0[bucket_of(&r.row.id)] ^= r.fingerprint();
        }
        self.tombstones += usize::from(r.row.deleted);
        self.held.entry(r.version.node).or_default().insert(r.seq);
        if let Some(old) = self.by_id.insert(r.row.id.clone(), e) {
            self.forgot(&old.row);
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            self.forgot(&old.row);
        }
    }

    fn forgot(&mut self, old: &VersionedRow) {
        if !old.row.deleted {
            self.digest.0[bucket_of(&old.row.id)] ^= old.fingerprint();
        }
        self.tombstones -= usize::from(old.row.deleted);
        if let Some(seqs) = self.held.get_mut(&old.version.node) {
            seqs.remove(&old.seq);
        }
    }

    pub fn rows(&self) -> impl Iterator<Item = &VersionedRow> {
        self.by_id.values().map(|e| &e.row)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.by_id.values()
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.by_id.len() - self.tombstones, self.tombstones)
    }

    /// Writes seen here that `their` lacks and this POP no longer holds: superseded or
    /// purged here, so the peer can refuse them should they ever be offered.
    pub fn cleared_for(&self, their: &Seen) -> Seen {
        let mut out = Seen::default();
        for (node, lo, hi) in self.seen.minus(their).ranges() {
            let mut from = lo;
            if let Some(held) = self.held.get(&node) {
                for &s in held.range(lo..=hi) {
                    if s > from {
                        out.insert_range(node, from, s - 1);
                    }
                    from = s + 1;
                }
            }
            if from <= hi {
                out.insert_range(node, from, hi);
            }
        }
        out
    }

    /// Up to `limit` rows `their` has not seen, with ids after `after`, in id order, and
    /// the id to continue after when there are more.
    pub fn news_for(
        &self,
        their: &Seen,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<VersionedRow>, Option<String>) {
        use std::ops::Bound;
        let from = match after {
            Some(id) => Bound::Excluded(id.to_owned()),
            None => Bound::Unbounded,
        };
        let mut rows = self
            .by_id
            .range((from, Bound::Unbounded))
            .map(|(_, e)| &e.row)
            .filter(|r| !their.contains(r.dot()));
        let page: Vec<VersionedRow> = rows.by_ref().take(limit).cloned().collect();
        let next = match rows.next() {
            Some(_) => page.last().map(|r| r.row.id.clone()),
            None => None,
        };
        (page, next)
    }

    /// The dots of the live rows in `buckets`.
    pub fn live_dots(&self, buckets: &[usize]) -> Vec<Dot> {
        self.by_id
            .values()
            .map(|e| &e.row)
            .filter(|r| !r.row.deleted && buckets.contains(&bucket_of(&r.row.id)))
            .map(VersionedRow::dot)
            .collect()
    }
}

/// Writes the bookkeeping `staged` adds to the file, in the caller's transaction: each
/// origin it touched is rewritten as its merged ranges.
pub(super) fn persist(tx: &Connection, book: &Book, staged: &Staged) -> rusqlite::Result<()> {
    let origins: BTreeSet<NodeId> = staged.seen.ranges().map(|(n, _, _)| n).collect();
    for node in origins {
        let mut merged = Seen::default();
        for &(lo, hi) in book
            .seen
            .origin(node)
            .iter()
            .chain(staged.seen.origin(node))
        {
            merged.insert_range(node, lo, hi);
        }
        tx.execute(
            "DELETE FROM _edgeproxy_seen WHERE node = ?1",
            [node.0 as i64],
        )?;
        let mut insert = tx.prepare_cached("INSERT INTO _edgeproxy_seen VALUES (?1, ?2, ?3)")?;
        for (_, lo, hi) in merged.ranges() {
            insert.execute([node.0 as i64, lo as i64, hi as i64])?;
        }
    }
    Ok(())
}
