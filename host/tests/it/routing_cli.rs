//! `edgeproxy backend …` and `edgeproxy db …`, run as the built binary against the same
//! SQLite file a live in-process proxy reads.

use std::path::Path;

use crate::support::*;

/// Runs `edgeproxy ARGS --db DB` off the runtime; (success, stdout, stderr).
async fn cli(db: &Path, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.extend(["--db".as_ref(), db.as_os_str()]);
    edgeproxy_run(&all).await
}

async fn ok(db: &Path, args: &[&str]) -> String {
    let (success, stdout, stderr) = cli(db, args).await;
    assert!(success, "{args:?}: {stderr}");
    stdout
}

async fn rows(db: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let out = ok(db, &[args, &["--json"]].concat()).await;
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

#[tokio::test]
async fn backend_commands_change_what_a_running_proxy_routes_to() {
    let br = Backend::start("br").await;
    let cl = Backend::start("cl").await;
    let db = Db::new(&[Row::new("br", "sa", "BR", br.addr)]);
    let p = Proxy::start(&db, "binding_ttl_secs = 0").await;
    assert_eq!(served_by("127.0.0.3", p.addr).await, "br");

    // add: a backend in the client's own country wins.
    let v = p.version();
    let port = cl.addr.port().to_string();
    let (success, out, err) = cli(
        &db.path,
        &[
            "backend",
            "add",
            "cl",
            "--app",
            "app",
            "--region",
            "sa",
            "--country",
            "CL",
            "--wg-ip",
            "127.0.0.1",
            "--port",
            &port,
            "--weight",
            "2",
            "--json",
        ],
    )
    .await;
    // What the registration API would refuse, an operator is warned of, and may do.
    assert!(success, "{err}");
    assert!(
        err.contains("warning: 127.0.0.1 is a loopback address"),
        "{err}"
    );
    let added: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(added[0]["id"], "cl");
    assert_eq!(added[0]["weight"], 2);
    p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.3", p.addr).await, "cl");

    // drain: new clients go elsewhere; undrain brings it back.
    let v = p.version();
    let drained = rows(&db.path, &["backend", "drain", "cl"]).await;
    assert_eq!(drained[0]["healthy"], false);
    let v = p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.3", p.addr).await, "br");
    ok(&db.path, &["backend", "undrain", "cl"]).await;
    let v = p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.3", p.addr).await, "cl");

    // update: a port where nothing listens makes the proxy fail over.
    let dead = refusing_addr().await.port().to_string();
    let updated = rows(&db.path, &["backend", "update", "cl", "--port", &dead]).await;
    assert_eq!(updated[0]["port"].to_string(), dead);
    let v = p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.3", p.addr).await, "br");

    // remove: a soft delete; the row is still there with --all.
    ok(&db.path, &["backend", "remove", "cl"]).await;
    p.wait_version_after(v).await;
    assert_eq!(p.host.routing.current().backends().len(), 1);
    assert_eq!(rows(&db.path, &["backend", "list"]).await.len(), 1);
    let all = rows(&db.path, &["backend", "list", "--all"]).await;
    assert_eq!(
        (all.len(), &all[1]["deleted"]),
        (2, &serde_json::json!(true))
    );

    // The default output is a table with a header.
    let table = ok(&db.path, &["backend", "list"]).await;
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "{table}");
    assert!(lines.next().unwrap().starts_with("br "), "{table}");

    // Refusals name the problem and change nothing.
    let (success, _, err) = cli(
        &db.path,
        &[
            "backend",
            "add",
            "br",
            "--app",
            "app",
            "--region",
            "sa",
            "--country",
            "BR",
            "--wg-ip",
            "127.0.0.1",
            "--port",
            "1",
        ],
    )
    .await;
    assert!(!success && err.contains("\"br\" exists"), "{err}");
    let (success, _, err) = cli(&db.path, &["backend", "update", "br", "--country", "BRA"]).await;
    assert!(!success && err.contains("country"), "{err}");
    let (success, _, err) = cli(&db.path, &["backend", "drain", "ghost"]).await;
    assert!(!success && err.contains("ghost"), "{err}");
    assert_eq!(served_by("127.0.0.3", p.addr).await, "br");
    p.stop().await;
}

#[tokio::test]
async fn db_init_and_imports_with_a_bad_import_rejected_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("routing.db");
    let out = ok(&db, &["db", "init"]).await;
    assert!(out.contains("created"), "{out}");
    let out = ok(&db, &["db", "init"]).await;
    assert!(out.contains("already initialised"), "{out}");

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/routing.sql");
    let out = ok(&db, &["db", "import", example.to_str().unwrap(), "--json"]).await;
    let imported: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&imported["before"], &imported["after"]),
        (&0.into(), &5.into())
    );

    let csv = dir.path().join("more.csv");
    std::fs::write(
        &csv,
        "id,app,region,country,wg_ip,port,weight\n\
         eu-ams-1,web,eu,NL,10.50.2.9,8080,3\n\
         sa-gru-1,web,sa,BR,10.50.1.1,9090,1\n",
    )
    .unwrap();
    ok(&db, &["db", "import", csv.to_str().unwrap()]).await;
    let listed = rows(&db, &["backend", "list"]).await;
    assert_eq!(listed.len(), 6);
    let find = |id: &str| listed.iter().find(|r| r["id"] == id).unwrap().clone();
    assert_eq!(
        (
            find("eu-ams-1")["weight"].as_u64(),
            find("eu-ams-1")["soft_limit"].as_u64()
        ),
        (Some(3), Some(100))
    );
    assert_eq!(find("sa-gru-1")["port"], 9090); // replaced by id

    // One bad row anywhere: the whole file is refused, by line, and nothing changes.
    let before = ok(&db, &["backend", "list", "--all", "--json"]).await;
    let bad_csv = dir.path().join("bad.csv");
    std::fs::write(
        &bad_csv,
        "id,app,region,country,wg_ip,port\n\
         new-1,web,eu,DE,10.9.9.1,80\n\
         new-2,web,eu,DE,10.9.9.2,eighty\n",
    )
    .unwrap();
    let (success, _, err) = cli(&db, &["db", "import", bad_csv.to_str().unwrap()]).await;
    assert!(!success, "{err}");
    assert!(
        err.contains("bad.csv: line 3") && err.contains("port"),
        "{err}"
    );
    let bad_sql = dir.path().join("bad.sql");
    std::fs::write(
        &bad_sql,
        "UPDATE backends SET weight = 9;\n\
         -- the next statement is wrong\n\
         INSERT INTO backends VALUES ('x','web','eu','DE','10.0.0',80,1,1,1,0,0);\n",
    )
    .unwrap();
    let (success, _, err) = cli(&db, &["db", "import", bad_sql.to_str().unwrap()]).await;
    assert!(!success, "{err}");
    assert!(
        err.contains("bad.sql: line 3") && err.contains("wg_ip"),
        "{err}"
    );
    let missing_column = dir.path().join("short.csv");
    std::fs::write(
        &missing_column,
        "id,app,region,country,port\nz,web,eu,DE,80\n",
    )
    .unwrap();
    let (success, _, err) = cli(&db, &["db", "import", missing_column.to_str().unwrap()]).await;
    assert!(!success && err.contains("wg_ip"), "{err}");
    // SQL with parameters binds nothing (NULL): refused, named, no panic.
    let params = dir.path().join("params.sql");
    std::fs::write(
        &params,
        "INSERT INTO backends (id, app, region, country, wg_ip, port) VALUES (?1, 'web', 'sa', 'BR', '10.0.0.1', :port);\n",
    )
    .unwrap();
    let (success, _, err) = cli(&db, &["db", "import", params.to_str().unwrap()]).await;
    assert!(
        !success && err.contains("params.sql: line 1") && !err.contains("panicked"),
        "{err}"
    );
    // Recreating the table drops the row checks with it: the rows are checked again.
    let recreate = dir.path().join("recreate.sql");
    std::fs::write(
        &recreate,
        "DROP TABLE backends;\n\
         CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT, region TEXT, country TEXT, wg_ip TEXT, port INTEGER, healthy INTEGER DEFAULT 1, weight INTEGER DEFAULT 1, soft_limit INTEGER DEFAULT 100, hard_limit INTEGER DEFAULT 0, deleted INTEGER DEFAULT 0);\n\
         INSERT INTO backends (id, app, region, country, wg_ip, port) VALUES ('x', 'web', 'sa', 'BRAZIL', '10.0.0.1', 99999);\n",
    )
    .unwrap();
    let (success, _, err) = cli(&db, &["db", "import", recreate.to_str().unwrap()]).await;
    assert!(!success, "{err}");
    assert!(
        err.contains("backend \"x\"") && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(
        ok(&db, &["backend", "list", "--all", "--json"]).await,
        before
    );
}

/// A row the proxy would skip, written behind the editor's back (a `sqlite3` shell):
/// adding another backend still says what happened to that backend, truthfully, instead
/// of failing on the unrelated row after the change was committed.
#[tokio::test]
async fn a_write_reports_its_own_row_whatever_else_the_table_holds() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    ok(&db, &["db", "init"]).await;
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
             VALUES ('bad', 'web', 'sa', 'BR', '10.0.0.1', 99999, 1, 1, 100, 0, 0)",
            [],
        )
        .unwrap();
    let (success, out, err) = cli(
        &db,
        &[
            "backend",
            "add",
            "good",
            "--app",
            "web",
            "--region",
            "eu",
            "--country",
            "DE",
            "--wg-ip",
            "10.0.0.2",
            "--port",
            "80",
            "--json",
        ],
    )
    .await;
    assert!(success, "{err}");
    let row: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(row[0]["id"], "good");
}

/// `backend list --live` joins the running proxy's view: a backend down by this POP's
/// checks shows as such, with the check's last result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_live_shows_this_pops_checks() {
    let up = Backend::start("up").await;
    let down = refusing_addr().await;
    let db = Db::new(&[
        Row::new("alive", "eu", "DE", up.addr),
        Row::new("dead", "eu", "DE", down),
    ]);
    let p = Proxy::start(
        &db,
        "[health_check]\nenabled = true\ninterval_secs = 0.1\nfall = 1\n",
    )
    .await;
    wait_backend(p.admin, "dead", |b| b["up_here"] == false).await;
    wait_backend(p.admin, "alive", |b| b["check"]["state"] == "up").await;
    let admin = p.admin.to_string();
    let table = ok(
        &db.path,
        &["--admin-addr", &admin, "backend", "list", "--live"],
    )
    .await;
    let dead = table.lines().find(|l| l.starts_with("dead")).unwrap();
    assert!(dead.contains("down (connect:"), "{table}");
    let alive = table.lines().find(|l| l.starts_with("alive")).unwrap();
    assert!(alive.contains("up (passed in"), "{table}");
    let json = rows(
        &db.path,
        &["--admin-addr", &admin, "backend", "list", "--live"],
    )
    .await;
    assert_eq!(json[1]["live"]["check"]["state"], "down", "{json:#?}");
    p.stop().await;
}
