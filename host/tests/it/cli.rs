//! The `edgeproxy` binary: env-only start-up as existing edgeProxy deployments do it,
//! start-up errors that name the problem, SIGTERM, and the demo.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::support::*;

fn edgeproxy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgeproxy"));
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("EDGEPROXY_DATA_PATH", data_path());
    c
}

/// `edgeproxy` with a clean environment, run by `sh` after `ulimit ARGS` (descriptor limits).
fn edgeproxy_under_ulimit(args: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "ulimit {args} && exec {}",
            env!("CARGO_BIN_EXE_edgeproxy")
        ))
        .env_clear()
        .env("EDGEPROXY_DATA_PATH", data_path());
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
    let (mut child, addr, _log) = start_logged(
        edgeproxy()
            .env("EDGEPROXY_DB_PATH", &db_path)
            .env("EDGEPROXY_REGION", "us"),
    );
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

/// Starts `cmd` (a proxy listening on 127.0.0.1:0 with JSON logs) and waits until it
/// listens. Returns the process, its address, and its log lines from then on (a thread
/// keeps draining them, so the child never blocks on a full pipe).
fn start_logged(
    cmd: &mut Command,
) -> (
    Running,
    std::net::SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    let child = cmd
        .env("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0")
        .env("EDGEPROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("EDGEPROXY_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let (addr, before) = listening_addr(&mut lines);
    // The log from the start: what came before "listening" first.
    let (tx, rx) = std::sync::mpsc::channel();
    for line in before {
        let _ = tx.send(line);
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, addr, rx)
}

/// Reads the JSON log until the "listening" event: its address, and the lines before it.
fn listening_addr(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
) -> (std::net::SocketAddr, Vec<String>) {
    let mut before = Vec::new();
    loop {
        let line = lines
            .next()
            .expect("proxy exited before listening")
            .unwrap();
        if line.contains("\"listening\"") {
            let start = line.find("\"addr\":\"").unwrap() + 8;
            let end = start + line[start..].find('"').unwrap();
            return (line[start..end].parse().unwrap(), before);
        }
        before.push(line);
    }
}

fn start_error(cmd: &mut Command) -> String {
    let out = cmd
        .env("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0")
        .env("EDGEPROXY_ADMIN_ADDR", "127.0.0.1:0")
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
    // The DNS lookup beside it: the same pick, by name.
    let dns = |ip: &str| {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("for {ip}/24")))
            .unwrap_or_else(|| panic!("no DNS line for {ip}: {stdout}"));
        line.split("=> ").nth(1).unwrap().to_owned()
    };
    assert!(
        dns("200.147.3.157").starts_with("sa-gru-1 (127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        dns("85.214.132.117").starts_with("eu-fra-1 (127.0.0.1:"),
        "{stdout}"
    );
    // Two TLS names on one port: one terminated, one passed through.
    assert!(
        served("secure.demo.test").starts_with("secure-1  (terminated here"),
        "{stdout}"
    );
    assert!(
        served("pass.demo.test").starts_with("pass-1    (passed through"),
        "{stdout}"
    );
}

on_both_data_paths! {
#[test]
fn accept_loop_survives_running_out_of_descriptors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(Backend::start("b"));
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(&[Row::new("b", "sa", "BR", backend.addr)]);
    // 64 descriptors: enough to start, far too few for 100 proxied connections (2 each).
    let (mut child, addr, log_rx) = start_logged(
        edgeproxy_under_ulimit("-n 64")
            .env("EDGEPROXY_DB_PATH", &db.path)
            .env("EDGEPROXY_NATIVE_POLICY", "1")
            .current_dir(dir.path()),
    );
    rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..100 {
            // Connects succeed at the kernel's backlog whether or not the proxy accepts.
            if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
                held.push(s);
            }
        }
        // The proxy reports exhaustion instead of dying ...
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = log_rx
                .recv_timeout(WAIT)
                .expect("an accept error in the log");
            if line.contains("out of resources") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline);
        }
        drop(held);
        // ... and serves again once descriptors are free. Until the backlog's stale
        // connections are gone, some clients may still be closed without a backend
        // (served_by reads "").
        let mut served = String::new();
        for _ in 0..500 {
            served = served_by("127.0.0.1", addr).await;
            if !served.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(served, "b");
    });
    assert!(child.0.try_wait().unwrap().is_none(), "edgeproxy exited");
}
}

#[test]
fn config_check_names_every_bad_key_and_show_says_where_values_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edgeproxy.toml");
    std::fs::write(&cfg, "db_reload_secs = 0\nregion = \"eu\"\n").unwrap();
    let out = edgeproxy()
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .env("EDGEPROXY_CONNECT_ATTEMPTS", "several")
        .env("EDGEPROXY_BINDING_TTL", "60")
        .env("EDGEPROXY_DATA_PATH", "uring")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("EDGEPROXY_DATA_PATH: must be one of epoll, io_uring"),
        "{err}"
    );
    assert!(
        err.contains("db_reload_secs: must be greater than 0"),
        "{err}"
    );
    assert!(
        err.contains("EDGEPROXY_CONNECT_ATTEMPTS: bad value \"several\""),
        "{err}"
    );
    assert!(
        err.contains(
            "EDGEPROXY_BINDING_TTL is not a setting (did you mean EDGEPROXY_BINDING_TTL_SECS?)"
        ),
        "{err}"
    );

    std::fs::write(&cfg, "db_reload_secs = 9\nregion = \"eu\"\n").unwrap();
    let out = edgeproxy()
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = edgeproxy()
        // Setting flags come before the command (`backend add --region` is another flag).
        .args(["--region", "ap", "config", "show", "--json", "--config"])
        .arg(&cfg)
        .env("EDGEPROXY_ADMIN_TOKEN", "s3cret")
        .env("EDGEPROXY_MDNS_ENABLED", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let setting = |key: &str| {
        let s = shown["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["key"] == key)
            .unwrap();
        (s["value"].clone(), s["origin"].as_str().unwrap().to_owned())
    };
    assert_eq!(setting("region"), ("ap".into(), "flag".into()));
    assert_eq!(setting("db_reload_secs"), (9.into(), "file".into()));
    assert_eq!(setting("admin_token"), ("********".into(), "env".into()));
    assert_eq!(setting("connect_attempts"), (3.into(), "default".into()));
    let warnings = shown["warnings"].to_string();
    assert!(
        warnings.contains("EDGEPROXY_MDNS_ENABLED is ignored"),
        "{warnings}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
}

#[test]
fn routing_commands_ignore_settings_they_do_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    for args in [&["db", "init"][..], &["backend", "list"]] {
        let out = edgeproxy()
            .args(args)
            .env("EDGEPROXY_DB_PATH", &db)
            // Would stop the proxy (remote admin without a token), not a routing command.
            .env("EDGEPROXY_ADMIN_ADDR", "0.0.0.0:9090")
            .env("EDGEPROXY_IDLE_TIMEOUT_SECS", "forever")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(db.exists());
}

/// The log lines a proxy started by `cmd` writes before it listens (JSON, a loopback
/// listener and admin API); the process is stopped afterwards.
fn start_up_log(cmd: &mut Command, db_dir: &std::path::Path) -> Vec<String> {
    let child = cmd
        .env("EDGEPROXY_DB_PATH", db_dir.join("r.db"))
        .env("EDGEPROXY_LISTEN_ADDR", "127.0.0.1:0")
        .env("EDGEPROXY_ADMIN_ADDR", "127.0.0.1:0")
        .env("EDGEPROXY_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    lines
        .map_while(Result::ok)
        .take_while(|l| !l.contains("\"listening\""))
        .collect()
}

#[test]
fn start_up_warns_about_unknown_and_unsupported_variables() {
    let dir = tempfile::tempdir().unwrap();
    let log = start_up_log(
        edgeproxy()
            .env("EDGEPROXY_MDNS_ENABLED", "true")
            .env("EDGEPROXY_BINDNIG_TTL_SECS", "5"),
        dir.path(),
    )
    .join("\n");
    assert!(
        log.contains("EDGEPROXY_MDNS_ENABLED is ignored: edgeproxy has no mDNS discovery"),
        "{log}"
    );
    assert!(
        log.contains("did you mean EDGEPROXY_BINDING_TTL_SECS"),
        "{log}"
    );
}

on_both_data_paths! {
/// When this POP runs out of descriptors between accepting a client and connecting to
/// its backend, the backend is not blamed (no "connect failed", no failover) and the
/// failure is named as the POP's own. Which descriptor runs out first (the accept's or
/// the connect's) depends on how many the process holds at start, so two limits of
/// different parity are tried; one of them ends on the connect. Ejection after a single
/// failure is on, and health checks run: neither may count this POP's own exhaustion
/// against the backend.
#[test]
fn connects_that_fail_for_want_of_descriptors_blame_no_backend() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(Backend::start("b"));
    let db = Db::new(&[Row::new("b", "sa", "BR", backend.addr)]);
    for limit in [64, 65] {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, addr, log_rx) = start_logged(
            edgeproxy_under_ulimit(&format!("-n {limit}"))
                .env("EDGEPROXY_DB_PATH", &db.path)
                .env("EDGEPROXY_NATIVE_POLICY", "1")
                .env("EDGEPROXY_CIRCUIT_FAILURE_THRESHOLD", "1")
                .env("EDGEPROXY_HEALTH_CHECK_ENABLED", "1")
                .env("EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS", "0.05")
                .current_dir(dir.path()),
        );
        let held = rt.block_on(async {
            let mut held = Vec::new();
            for _ in 0..limit {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut greeting = [0u8; 2];
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    tokio::io::AsyncReadExt::read(&mut c, &mut greeting),
                )
                .await;
                match read {
                    Ok(Ok(n)) if n > 0 => held.push(c),
                    // Accepted, then closed: the connect to the backend failed.
                    Ok(_) => return Some(held),
                    // Not accepted: the accept ran out first.
                    Err(_) => return None,
                }
            }
            panic!("{limit} descriptors held {} connections", held.len());
        });
        let Some(held) = held else {
            continue;
        };
        let mut log = String::new();
        while !log.contains("connection failed") {
            log += &log_rx
                .recv_timeout(WAIT)
                .expect("a connection failure in the log");
            log += "\n";
        }
        assert!(
            !log.contains("connect failed"),
            "a backend was blamed:\n{log}"
        );
        assert!(log.contains("this POP is out of resources"), "{log}");
        // Descriptors free again, the backend serves; then the whole log, to the exit.
        drop(held);
        rt.block_on(async {
            let deadline = tokio::time::Instant::now() + WAIT;
            while refused("127.0.0.1", addr).await {
                assert!(tokio::time::Instant::now() < deadline, "never served again");
            }
        });
        Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap();
        child.0.wait().unwrap();
        log.extend(log_rx.iter().map(|l| l + "\n"));
        assert!(
            !log.contains("down from this POP"),
            "this POP's exhaustion ejected or failed the backend:\n{log}"
        );
        return;
    }
    panic!("neither limit ran out on a connect");
}
}

/// A soft descriptor limit below the hard one (1024 under a default systemd unit) is
/// raised to the hard one at start, and the result logged.
#[test]
fn start_up_raises_the_soft_descriptor_limit() {
    let dir = tempfile::tempdir().unwrap();
    let log = start_up_log(&mut edgeproxy_under_ulimit("-S -n 256"), dir.path());
    let line = log
        .iter()
        .find(|l| l.contains("open-file limit"))
        .expect("the limit in the start-up log");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let (soft, hard) = (&v["fields"]["soft"], &v["fields"]["hard"]);
    assert_eq!(soft, hard, "{line}");
    assert!(soft.as_u64().unwrap() > 256, "{line}");
}

/// The first SIGTERM starts a drain (here an hour long, with one connection open); the
/// second ends it at once.
#[test]
fn a_second_sigterm_ends_the_drain() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(Backend::start("b"));
    let db = Db::new(&[Row::new("b", "sa", "BR", backend.addr)]);
    let (mut child, addr, log_rx) = start_logged(
        edgeproxy()
            .env("EDGEPROXY_DB_PATH", &db.path)
            .env("EDGEPROXY_DRAIN_TIMEOUT_SECS", "3600"),
    );
    let _held = rt.block_on(open("127.0.0.1", addr));
    let term = || {
        Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap()
    };
    term();
    // Wait for the drain to start, then signal again.
    while !log_rx
        .recv_timeout(WAIT)
        .expect("the drain in the log")
        .contains("draining connections")
    {}
    term();
    let deadline = std::time::Duration::from_secs(10);
    let started = tokio::time::Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < deadline,
            "still draining after a second SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// During an outage every client fails its connects, but the log gets at most one such
/// line a second (with the count held back), not several per client.
#[test]
fn connect_failures_are_logged_at_most_once_a_second() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dead = rt.block_on(refusing_addr());
    let db = Db::new(&[
        Row::new("dead-1", "sa", "BR", dead),
        Row::new("dead-2", "sa", "BR", dead),
    ]);
    let (_child, addr, log_rx) = start_logged(
        edgeproxy()
            .env("EDGEPROXY_DB_PATH", &db.path)
            .env("EDGEPROXY_BINDING_TTL_SECS", "0"),
    );
    let started = tokio::time::Instant::now();
    rt.block_on(async {
        for _ in 0..60 {
            assert!(refused("127.0.0.1", addr).await);
        }
    });
    let elapsed = started.elapsed().as_secs() + 1;
    // Everything logged so far: the lines arrive within the wait, or there are no more.
    let lines: Vec<String> = std::iter::from_fn(|| {
        log_rx
            .recv_timeout(std::time::Duration::from_millis(500))
            .ok()
    })
    .filter(|l| l.contains("connect failed") || l.contains("connection failed"))
    .collect();
    // 60 clients x 2 attempts, plus 60 "connection failed": 180 lines unthrottled.
    assert!(
        !lines.is_empty() && lines.len() as u64 <= 2 * elapsed + 2,
        "{} lines in {elapsed} s",
        lines.len()
    );
}

#[test]
fn version_names_the_commit_and_the_policy_contracts() {
    let out = edgeproxy().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("edgeproxy {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let commit = text
        .split("commit ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{text}"
    );
    assert!(
        text.contains("edgeproxy:policy@0.3.0, and 0.2.0 and 0.1.0"),
        "{text}"
    );
}

/// Where io_uring is refused (here by a seccomp filter, as container runtimes' default
/// profiles do), `data_path = "io_uring"` serves on epoll, saying so once.
#[test]
fn io_uring_refused_by_seccomp_falls_back_to_epoll_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("no-io-uring");
    let source = dir.path().join("no-io-uring.c");
    std::fs::write(&source, NO_IO_URING_C).unwrap();
    let built = Command::new("cc")
        .arg("-o")
        .arg(&wrapper)
        .arg(&source)
        .status();
    let Ok(status) = built else {
        eprintln!("skipped: no C compiler (cc) to build the seccomp wrapper");
        return;
    };
    assert!(status.success(), "building the seccomp wrapper");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(Backend::start("b"));
    let db = Db::new(&[Row::new("b", "sa", "BR", backend.addr)]);
    let (mut child, addr, log_rx) = start_logged(
        Command::new(&wrapper)
            .arg(env!("CARGO_BIN_EXE_edgeproxy"))
            .env_clear()
            .env("EDGEPROXY_DATA_PATH", "io_uring")
            .env("EDGEPROXY_WORKER_THREADS", "2")
            .env("EDGEPROXY_DB_PATH", &db.path)
            .env("EDGEPROXY_NATIVE_POLICY", "1")
            .current_dir(dir.path()),
    );
    // The lines up to "listening" are in the channel already (and any since).
    let fallbacks = log_rx.try_iter().filter(|l| l.contains("serving on epoll"));
    assert_eq!(fallbacks.count(), 1);
    assert_eq!(rt.block_on(served_by("127.0.0.1", addr)), "b");
    assert!(child.0.try_wait().unwrap().is_none(), "edgeproxy exited");
}

/// Runs its arguments with io_uring_setup(2) failing with EPERM.
const NO_IO_URING_C: &str = r#"
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof filter / sizeof filter[0], filter};
    if (argc < 2 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("seccomp");
        return 1;
    }
    execv(argv[1], argv + 1);
    perror("exec");
    return 1;
}
"#;
