use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;

use super::*;
use crate::domain::replication::{BUCKETS, BackendRow};

fn open() -> (tempfile::TempDir, SqliteReplica) {
    let dir = tempfile::tempdir().unwrap();
    let r = SqliteReplica::open(&dir.path().join("routing.db"), Duration::from_secs(60)).unwrap();
    (dir, r)
}

/// A replica on a clock the test moves.
fn open_at(clock: &Arc<AtomicU64>) -> (tempfile::TempDir, SqliteReplica) {
    let dir = tempfile::tempdir().unwrap();
    let c = clock.clone();
    let r = SqliteReplica::open_with(
        &dir.path().join("routing.db"),
        Duration::from_secs(60),
        Arc::new(move || c.load(Ordering::SeqCst)),
    )
    .unwrap();
    (dir, r)
}

fn shell(r: &SqliteReplica, sql: &str) {
    // Another client, as the sqlite3 shell would be.
    Connection::open(&r.path)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

fn row(id: &str, port: u16) -> String {
    format!("INSERT INTO backends VALUES ('{id}','web','eu','DE','10.0.0.1',{port},1,1,10,0,0);")
}

fn port(r: &SqliteReplica, id: &str) -> Option<i64> {
    r.conn
        .query_row(
            "SELECT port FROM backends WHERE id = ?1 AND deleted = 0",
            [id],
            |x| x.get(0),
        )
        .optional()
        .unwrap()
}

/// One full exchange, as a sync round runs it: `from` answers `to`, then `to` answers
/// `from` with what it has that `from` lacks.
fn sync(to: &mut SqliteReplica, from: &mut SqliteReplica) {
    let head = from.head_for(to.seen(), &to.digest());
    let (rows, _) = from.news_for(to.seen(), None, usize::MAX);
    to.apply(rows, &head.cleared).unwrap();
    to.drop_superseded(&head).unwrap();
    let (rows, _) = to.news_for(&head.seen, None, usize::MAX);
    let cleared = to.book.cleared_for(&head.seen);
    from.apply(rows, &cleared).unwrap();
}

fn consistent(r: &SqliteReplica) {
    let reread = Book::load(&r.conn).unwrap();
    assert_eq!(
        r.book.digest,
        Digest::of(r.rows()),
        "kept digest = recomputed"
    );
    assert_eq!(reread.digest, r.book.digest, "memory = file");
    assert_eq!(reread.seen, r.book.seen, "memory = file");
    for row in r.rows() {
        assert!(r.seen().contains(row.dot()), "held but not seen: {row:?}");
    }
}

#[test]
fn any_clients_writes_are_captured_and_a_hard_delete_becomes_a_tombstone() {
    let (_d, mut r) = open();
    shell(&r, &row("a", 80));
    let (stamped, bad) = r.stamp_local().unwrap();
    assert!(bad.is_empty());
    assert_eq!(stamped.len(), 1);
    assert_eq!(
        stamped[0].dot(),
        Dot {
            node: r.node(),
            seq: 1
        }
    );
    assert!(r.stamp_local().unwrap().0.is_empty(), "stamped once");

    shell(&r, "DELETE FROM backends WHERE id = 'a'");
    let (stamped, _) = r.stamp_local().unwrap();
    assert!(stamped[0].row.deleted, "{stamped:?}");
    assert_eq!(stamped[0].seq, 2);
    let deleted: i64 = r
        .conn
        .query_row("SELECT deleted FROM backends WHERE id = 'a'", [], |x| {
            x.get(0)
        })
        .unwrap();
    assert_eq!(deleted, 1, "the row stays, as a tombstone");
    assert_eq!(r.counts(), (0, 1));
    consistent(&r);
}

#[test]
fn upserts_replaces_multi_row_statements_and_client_transactions_are_captured() {
    let (_d, mut r) = open();
    shell(&r, &row("a", 80));
    r.stamp_local().unwrap();
    // An UPSERT of an existing row failed with "UNIQUE constraint failed:
    // _edgeproxy_dirty.id" while the dirty list was keyed by id.
    shell(
        &r,
        "INSERT INTO backends VALUES ('a','web','eu','DE','10.0.0.1',81,1,1,10,0,0)
         ON CONFLICT(id) DO UPDATE SET port = excluded.port",
    );
    assert_eq!(r.stamp_local().unwrap().0[0].row.port, 81);
    shell(
        &r,
        "INSERT OR REPLACE INTO backends VALUES ('a','web','eu','DE','10.0.0.1',82,1,1,10,0,0)",
    );
    assert_eq!(r.stamp_local().unwrap().0[0].row.port, 82);
    shell(
        &r,
        "BEGIN; INSERT INTO backends VALUES ('b','web','eu','DE','10.0.0.2',1,1,1,10,0,0),
                                            ('c','web','eu','DE','10.0.0.3',1,1,1,10,0,0);
         UPDATE backends SET port = 83 WHERE id = 'a';
         UPDATE backends SET port = 84 WHERE id = 'a'; COMMIT;",
    );
    let (stamped, _) = r.stamp_local().unwrap();
    let mut ports: Vec<_> = stamped
        .iter()
        .map(|s| (s.row.id.as_str(), s.row.port))
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [("a", 84), ("b", 1), ("c", 1)],
        "one version per row"
    );
    consistent(&r);
}

#[test]
fn remote_rows_merge_by_version_and_are_not_recaptured() {
    let (_d, mut a) = open();
    let (_d2, mut b) = open();
    shell(&a, &row("a", 80));
    let (rows, _) = a.stamp_local().unwrap();
    let applied = b.apply(rows.clone(), &Seen::default()).unwrap();
    assert_eq!(applied.applied.len(), 1);
    assert!(
        b.stamp_local().unwrap().0.is_empty(),
        "a remote row is not re-pushed"
    );
    assert_eq!(a.digest(), b.digest());
    assert_eq!(
        b.apply(rows, &Seen::default()).unwrap().stale,
        1,
        "a duplicate changes nothing"
    );

    // B edits after seeing A's write: B's version is later and wins at A.
    shell(&b, "UPDATE backends SET port = 81 WHERE id = 'a'");
    let (rows, _) = b.stamp_local().unwrap();
    assert_eq!(a.apply(rows, &Seen::default()).unwrap().applied.len(), 1);
    assert_eq!(a.digest(), b.digest());
    consistent(&a);
    consistent(&b);
}

#[test]
fn a_pending_local_edit_is_stamped_before_remote_rows_are_compared() {
    // Versions come from stamping: on a real clock A's stamp and B's can
    // fall in one millisecond, and the node id then decides.
    let clock = Arc::new(AtomicU64::new(1_000_000_000_000));
    let (_d, mut a) = open_at(&clock);
    let (_d2, mut b) = open_at(&clock);
    shell(&a, &row("a", 80));
    let (old, _) = a.stamp_local().unwrap();
    b.apply(old.clone(), &Seen::default()).unwrap();
    shell(&b, "UPDATE backends SET port = 99 WHERE id = 'a'");
    // A newer write from A arrives before B's replicator noticed its own edit.
    shell(&a, "UPDATE backends SET port = 98 WHERE id = 'a'");
    let (newer, _) = a.stamp_local().unwrap();
    clock.fetch_add(1, Ordering::SeqCst);
    let out = b.apply(newer, &Seen::default()).unwrap();
    assert_eq!(out.stamped.len(), 1, "B's edit was stamped first");
    assert_eq!(out.stale, 1, "and is newer than A's");
    assert_eq!(port(&b, "a"), Some(99), "the local edit survives");
}

#[test]
fn bad_remote_rows_are_rejected_with_the_reason_and_not_marked_seen() {
    let (_d, mut r) = open();
    let mut bad = VersionedRow {
        version: Version {
            hlc: Hlc::from_millis(wall_ms()),
            node: NodeId(7),
        },
        seq: 1,
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
            owner: None,
        },
    };
    let out = r.apply(vec![bad.clone()], &Seen::default()).unwrap();
    assert!(out.rejected[0].1.contains("wg_ip"), "{out:?}");
    assert!(
        !r.seen().contains(bad.dot()),
        "a refused row is not taken for seen"
    );
    bad.row.wg_ip = "10.0.0.1".into();
    bad.version.hlc = Hlc::from_millis(wall_ms() + 3_600_000);
    let out = r.apply(vec![bad.clone()], &Seen::default()).unwrap();
    assert_eq!(out.ahead.len(), 1, "{out:?}");
    assert!(!r.seen().contains(bad.dot()));
    bad.seq = 0;
    bad.version.hlc = Hlc::from_millis(wall_ms());
    assert_eq!(
        r.apply(vec![bad], &Seen::default()).unwrap().rejected.len(),
        1
    );
    assert_eq!(r.counts(), (0, 0));
}

#[test]
fn a_new_or_wiped_pop_takes_every_row_whatever_its_age_and_the_window() {
    let clock = Arc::new(AtomicU64::new(1_000_000_000_000));
    let (_d, mut a) = open_at(&clock);
    for i in 0..20 {
        shell(&a, &row(&format!("r{i}"), 80));
    }
    shell(
        &a,
        &format!("{} DELETE FROM backends WHERE id = 'gone';", row("gone", 1)),
    );
    a.stamp_local().unwrap();
    // A year later, past any window; the tombstone is purged.
    clock.fetch_add(365 * 86_400_000, Ordering::SeqCst);
    assert_eq!(
        a.purge_tombstones(Duration::from_secs(7 * 86_400))
            .unwrap()
            .0,
        1
    );
    let (_d2, mut fresh) = open_at(&clock);
    sync(&mut fresh, &mut a);
    assert_eq!(fresh.counts(), (20, 0));
    assert_eq!(fresh.digest(), a.digest());
    assert_eq!(fresh.seen(), a.seen(), "the purged delete is known as seen");
    consistent(&fresh);
}

#[test]
fn a_deleted_row_does_not_come_back_from_a_pop_away_longer_than_the_window() {
    let clock = Arc::new(AtomicU64::new(1_000_000_000_000));
    let (_d, mut a) = open_at(&clock);
    let (_d2, mut b) = open_at(&clock);
    let (_d3, mut c) = open_at(&clock);
    shell(&a, &format!("{}{}", row("x", 1), row("kept", 2)));
    a.stamp_local().unwrap();
    sync(&mut b, &mut a);
    sync(&mut c, &mut b);
    // B and C go away together and keep syncing with each other; A deletes x, and
    // weeks later purges the tombstone; B writes a row of its own meanwhile.
    shell(&a, "DELETE FROM backends WHERE id = 'x'");
    a.stamp_local().unwrap();
    clock.fetch_add(30 * 86_400_000, Ordering::SeqCst);
    a.purge_tombstones(Duration::from_secs(86_400)).unwrap();
    assert_eq!(a.counts(), (1, 0));
    shell(&b, &row("away", 3));
    b.stamp_local().unwrap();
    sync(&mut c, &mut b);
    // Back: A refuses their old x (it has seen that write), and tells them it was
    // superseded; B's new row reaches A.
    sync(&mut b, &mut a);
    sync(&mut a, &mut c);
    sync(&mut c, &mut b);
    for (name, r) in [("a", &a), ("b", &b), ("c", &c)] {
        assert_eq!(port(r, "x"), None, "{name} holds x");
        assert_eq!(port(r, "kept"), Some(2), "{name}");
        assert_eq!(port(r, "away"), Some(3), "{name}");
        consistent(r);
    }
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.digest(), c.digest());
}

#[test]
fn a_recreated_table_is_compared_and_its_differences_replicated() {
    let (_d, mut a) = open();
    let (_d2, mut b) = open();
    shell(
        &a,
        &format!("{}{}{}", row("x", 1), row("y", 2), row("z", 3)),
    );
    a.stamp_local().unwrap();
    sync(&mut b, &mut a);
    // A script drops the table (and its triggers) and writes it anew: y changed, z left
    // out, w new, x as it was.
    shell(
        &a,
        &format!(
            "BEGIN; DROP TABLE backends; {}; {}{}{} COMMIT;",
            crate::adapters::outbound::sqlite_routing::SCHEMA,
            row("x", 1),
            row("y", 22),
            row("w", 4)
        ),
    );
    let (stamped, _) = a.stamp_local().unwrap();
    let mut ids: Vec<_> = stamped
        .iter()
        .map(|r| (r.row.id.as_str(), r.row.deleted))
        .collect();
    ids.sort();
    assert_eq!(ids, [("w", false), ("y", false), ("z", true)]);
    sync(&mut b, &mut a);
    assert_eq!(port(&b, "y"), Some(22));
    assert_eq!(port(&b, "z"), None);
    assert_eq!(port(&b, "w"), Some(4));
    // The triggers are back: the next plain write is captured too.
    shell(&a, "UPDATE backends SET port = 5 WHERE id = 'x'");
    assert_eq!(a.stamp_local().unwrap().0.len(), 1);
    consistent(&a);
}

#[test]
fn a_row_the_loader_would_skip_can_still_be_deleted_everywhere() {
    let (_d, mut a) = open();
    let (_d2, mut b) = open();
    shell(&a, &row("x", 1));
    a.stamp_local().unwrap();
    sync(&mut b, &mut a);
    // Broken by hand (not replicated), then deleted: the delete must reach B.
    shell(&a, "UPDATE backends SET wg_ip = 'nonsense' WHERE id = 'x'");
    let (stamped, bad) = a.stamp_local().unwrap();
    assert!(stamped.is_empty() && bad[0].1.contains("wg_ip"), "{bad:?}");
    shell(&a, "DELETE FROM backends WHERE id = 'x'");
    let (stamped, _) = a.stamp_local().unwrap();
    assert!(
        stamped[0].row.deleted && stamped[0].row.wg_ip == "10.0.0.1",
        "{stamped:?}"
    );
    sync(&mut b, &mut a);
    assert_eq!(port(&b, "x"), None);
}

#[test]
fn a_write_whose_stamping_met_a_busy_lock_is_stamped_later() {
    let (_d, mut r) = open();
    r.conn.busy_timeout(Duration::ZERO).unwrap();
    assert!(!r.changed().unwrap() || r.stamp_local().is_ok());
    shell(&r, &row("a", 80));
    let holder = Connection::open(&r.path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert!(r.changed().unwrap());
    assert!(r.stamp_local().is_err(), "the lock is held");
    holder.execute_batch("COMMIT").unwrap();
    // No other commit happened since: the failed attempt must not have consumed it.
    assert!(r.changed().unwrap(), "the write is looked at again");
    assert_eq!(r.stamp_local().unwrap().0.len(), 1);
}

#[test]
fn a_failed_apply_changes_nothing_in_memory() {
    let (_d, mut a) = open();
    let (_d2, mut b) = open();
    let rows: String = (0..200)
        .map(|i| row(&format!("row-{i:04}-{}", "p".repeat(200)), 80))
        .collect();
    shell(&a, &rows);
    let (rows, _) = a.stamp_local().unwrap();
    // The disk is full: no page can be added to B's file.
    let pages: i64 = b
        .conn
        .query_row("PRAGMA page_count", [], |x| x.get(0))
        .unwrap();
    b.conn
        .execute_batch(&format!("PRAGMA max_page_count = {pages}"))
        .unwrap();
    let (digest, clock, seen) = (b.digest(), b.clock(), b.seen().clone());
    let err = b.apply(rows.clone(), &Seen::default()).unwrap_err();
    assert!(err.reason.contains("full"), "{err}");
    assert_eq!(
        (b.digest(), b.clock(), b.seen().clone()),
        (digest, clock, seen)
    );
    assert_eq!(b.counts(), (0, 0));
    b.conn
        .execute_batch("PRAGMA max_page_count = 1073741823")
        .unwrap();
    assert_eq!(b.apply(rows, &Seen::default()).unwrap().applied.len(), 200);
    consistent(&b);
}

#[test]
fn news_pages_in_id_order_with_a_cursor() {
    let (_d, mut r) = open();
    for id in ["a", "b", "c", "d", "e"] {
        shell(&r, &row(id, 80));
    }
    r.stamp_local().unwrap();
    let none = Seen::default();
    let ids = |rows: Vec<VersionedRow>| rows.into_iter().map(|r| r.row.id).collect::<Vec<_>>();
    let (first, next) = r.news_for(&none, None, 2);
    assert_eq!(
        (ids(first), next.as_deref()),
        (vec!["a".to_owned(), "b".into()], Some("b"))
    );
    let (second, next) = r.news_for(&none, Some("b"), 2);
    assert_eq!(
        (ids(second), next.as_deref()),
        (vec!["c".to_owned(), "d".into()], Some("d"))
    );
    let (last, next) = r.news_for(&none, Some("d"), 2);
    assert_eq!((ids(last), next), (vec!["e".to_owned()], None));
    assert!(
        r.news_for(r.seen(), None, 10).0.is_empty(),
        "nothing is news to itself"
    );
    let all: Vec<usize> = (0..BUCKETS).collect();
    assert_eq!(r.book.live_dots(&all).len(), 5);
}

#[test]
fn one_replicator_per_file() {
    let (_d, r) = open();
    let err = SqliteReplica::open(&r.path, Duration::from_secs(60))
        .err()
        .unwrap();
    assert!(err.reason.contains("another edgeproxy replicates"), "{err}");
    let path = r.path.clone();
    drop(r);
    SqliteReplica::open(&path, Duration::from_secs(60)).unwrap();
}

#[test]
fn node_id_clock_and_bookkeeping_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routing.db");
    let mut r = SqliteReplica::open(&path, Duration::from_secs(60)).unwrap();
    shell(&r, &row("a", 80));
    let (rows, _) = r.stamp_local().unwrap();
    let (node, seen) = (r.node(), r.seen().clone());
    drop(r);
    let mut r = SqliteReplica::open(&path, Duration::from_secs(60)).unwrap();
    assert_eq!(r.node(), node);
    assert!(r.clock() >= rows[0].version.hlc);
    assert_eq!(r.seen(), &seen);
    assert_eq!(r.rows().count(), 1);
    shell(&r, "UPDATE backends SET port = 1 WHERE id = 'a'");
    assert_eq!(r.stamp_local().unwrap().0[0].seq, 2, "numbering goes on");
}

#[test]
fn a_file_of_the_first_layout_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routing.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "{};
        CREATE TABLE _edgeproxy_versions (id TEXT PRIMARY KEY, hlc INTEGER NOT NULL, node INTEGER NOT NULL);
        CREATE TABLE _edgeproxy_dirty (id TEXT PRIMARY KEY);
        CREATE TABLE _edgeproxy_state (key TEXT PRIMARY KEY, value);
        INSERT INTO _edgeproxy_state VALUES ('applying', 0), ('node', 77), ('last_hlc', 5000);
        CREATE TRIGGER _edgeproxy_capture_update AFTER UPDATE ON backends
        WHEN (SELECT value FROM _edgeproxy_state WHERE key = 'applying') = 0
        BEGIN INSERT OR IGNORE INTO _edgeproxy_dirty VALUES (NEW.id); END;
        {}{}
        INSERT INTO _edgeproxy_versions VALUES ('x', 4000, 9), ('y', 3000, 8);
        INSERT INTO _edgeproxy_dirty VALUES ('y');",
        crate::adapters::outbound::sqlite_routing::SCHEMA,
        row("x", 1),
        row("y", 2)
    ))
    .unwrap();
    drop(conn);
    let mut r = SqliteReplica::open(&path, Duration::from_secs(60)).unwrap();
    assert_eq!(r.node(), NodeId(77));
    let mut held: Vec<_> = r
        .rows()
        .map(|v| (v.row.id.clone(), v.version.hlc.0, v.dot()))
        .collect();
    held.sort();
    let me = |seq| Dot {
        node: NodeId(77),
        seq,
    };
    assert_eq!(
        held,
        [("x".to_owned(), 4000, me(2)), ("y".to_owned(), 3000, me(1))]
    );
    // The pending edit of y is kept; an UPSERT now works.
    shell(&r, "UPDATE backends SET port = 9 WHERE id = 'y'");
    shell(
        &r,
        "INSERT INTO backends VALUES ('x','web','eu','DE','10.0.0.1',7,1,1,10,0,0)
         ON CONFLICT(id) DO UPDATE SET port = excluded.port",
    );
    let (stamped, _) = r.stamp_local().unwrap();
    assert_eq!(stamped.len(), 2);
    assert!(stamped.iter().all(|s| s.seq > 2 && s.version.hlc.0 > 5000));
    consistent(&r);
}

/// Edits made while no replicator held the file (edgeproxy stopped, an operator's shell)
/// are noted by the triggers in the file, and replicated at the next start: the book must
/// not take them for what was replicated before.
#[test]
fn edits_made_while_stopped_are_replicated_at_the_next_start() {
    let (dir, mut r) = open();
    shell(&r, &row("a", 80));
    let (first, _) = r.stamp_local().unwrap();
    assert_eq!(first.len(), 1);
    let path = r.path.clone();
    drop(r);
    let c = Connection::open(&path).unwrap();
    c.execute_batch("UPDATE backends SET port = 81 WHERE id = 'a'")
        .unwrap();
    drop(c);
    let mut r = SqliteReplica::open(&path, Duration::from_secs(60)).unwrap();
    let (again, _) = r.stamp_local().unwrap();
    assert_eq!(again.len(), 1, "the edit made while stopped");
    assert_eq!(again[0].row.port, 81);
    assert!(again[0].version > first[0].version);
    drop(dir);
}

/// Who manages a row replicates with it: a registration's owner, an owner-only change,
/// and the marking of registrations made before owners existed.
#[test]
fn owners_replicate_with_their_rows() {
    let (_da, mut a) = open();
    let (_db, mut b) = open();
    shell(&a, &row("x", 80));
    shell(&a, "INSERT INTO _edgeproxy_owners VALUES ('x', 'api')");
    a.stamp_local().unwrap();
    sync(&mut b, &mut a);
    let owner = |r: &SqliteReplica| -> Option<String> {
        r.conn
            .query_row(
                "SELECT owner FROM _edgeproxy_owners WHERE id = 'x'",
                [],
                |x| x.get(0),
            )
            .optional()
            .unwrap()
    };
    assert_eq!(owner(&b).as_deref(), Some("api"));
    // The operator takes it over: only the owner changes.
    shell(&a, "DELETE FROM _edgeproxy_owners WHERE id = 'x'");
    let (stamped, _) = a.stamp_local().unwrap();
    assert_eq!(stamped.len(), 1);
    assert_eq!(stamped[0].row.owner, None);
    sync(&mut b, &mut a);
    assert_eq!(owner(&b), None);
    assert_eq!(a.digest(), b.digest());
    // A script drops the owners table: it is made again, triggers and all, and what the
    // table said is compared and replicated as for a recreated `backends`.
    shell(&a, "INSERT INTO _edgeproxy_owners VALUES ('x', 'api')");
    a.stamp_local().unwrap();
    sync(&mut b, &mut a);
    assert_eq!(owner(&b).as_deref(), Some("api"));
    shell(&a, "DROP TABLE _edgeproxy_owners");
    let (stamped, _) = a.stamp_local().unwrap();
    assert_eq!(stamped.len(), 1, "{stamped:?}");
    assert_eq!(stamped[0].row.owner, None);
    shell(&a, "INSERT INTO _edgeproxy_owners VALUES ('x', 'api')");
    assert_eq!(a.stamp_local().unwrap().0.len(), 1, "captured again");
}
