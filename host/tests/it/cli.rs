//! The `edgeproxy` binary: env-only start-up as existing edgeProxy deployments do it,
//! start-up errors that name the problem, SIGTERM, and the demo.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::support::*;

fn edgeproxy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgeproxy"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c
}

/// Kills the child if the test fails before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn env_only_start_creates_the_db_serves_and_stops_on_sigterm() {
    let backend_rt = tokio::runtime::Runtime::new().unwrap();
    let backend = backend_rt.block_on(Backend::start("only"));
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("fresh.db");
    let child = edgeproxy()
        .env("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0")
        .env("EDGEPROXY_DB_PATH", &db_path)
        .env("EDGEPROXY_REGION", "us")
        .env("EDGEPROXY_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("proxy exited before listening")
            .unwrap();
        if line.contains("\"listening\"") {
            let start = line.find("\"addr\":\"").unwrap() + 8;
            let end = start + line[start..].find('"').unwrap();
            break line[start..end].parse::<std::net::SocketAddr>().unwrap();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    // The database was created with the schema; add a backend and see it used.
    let db = Db {
        path: db_path.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    db.insert(&Row::new("only", "us", "US", backend.addr));
    let served = backend_rt.block_on(async {
        // The proxy reloads on the file change; until then it refuses. A separate
        // process offers no readiness signal, so poll, bounded.
        for _ in 0..500 {
            if !refused("127.0.0.1", addr).await {
                return served_by("127.0.0.1", addr).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("routing change never picked up");
    });
    assert_eq!(served, "only");
    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

fn start_error(cmd: &mut Command) -> String {
    let out = cmd
        .env("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn bad_configuration_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edgeproxy.toml");
    std::fs::write(&cfg, "region = \"eu\"\nbinding_tll_secs = 5\n").unwrap();
    let err = start_error(edgeproxy().arg("--config").arg(&cfg));
    assert!(err.contains("binding_tll_secs"), "{err}");

    let err = start_error(edgeproxy().env("EDGEPROXY_BINDING_TTL_SECS", "ten"));
    assert!(err.contains("EDGEPROXY_BINDING_TTL_SECS"), "{err}");

    let geo = dir.path().join("broken.mmdb");
    std::fs::write(&geo, b"not a database").unwrap();
    let err = start_error(
        edgeproxy()
            .env("EDGEPROXY_DB_PATH", dir.path().join("r.db"))
            .env("EDGEPROXY_GEOIP_PATH", &geo),
    );
    assert!(err.contains("broken.mmdb"), "{err}");
}

#[test]
fn demo_shows_geo_routing() {
    let out = edgeproxy().arg("demo").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let served = |ip: &str| {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(ip))
            .unwrap();
        line.rsplit("-> ").next().unwrap().trim().to_owned()
    };
    assert_eq!(served("200.147.3.157"), "sa-gru-1");
    assert_eq!(served("85.214.132.117"), "eu-fra-1");
    assert_eq!(served("8.8.8.8"), "us-iad-1");
}
