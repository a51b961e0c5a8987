//! What `deploy/` ships for running a fleet: the alert rules are valid and fire when they
//! should (`promtool`, from Debian's `prometheus` package). That the dashboard's and the
//! rules' metrics exist is checked against running POPs in `cluster.rs`.

use std::process::Command;

fn promtool(args: &[&str]) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect(
            "promtool runs (Debian's prometheus package; the README's test command installs it)",
        );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_fire_on_what_they_should() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 12 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_dashboard_is_grafana_json_with_a_query_in_every_panel() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/edgeproxy.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["uid"], "edgeproxy");
    let panels = dash["panels"].as_array().unwrap();
    let graphs: Vec<_> = panels.iter().filter(|p| p["type"] != "row").collect();
    assert!(graphs.len() >= 20, "{}", graphs.len());
    for p in graphs {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                expr.contains("edgeproxy_") && expr.contains("$instance"),
                "{}: {expr}",
                p["title"]
            );
        }
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/edgeproxy.service"
    ))
    .unwrap();
    // The binary as built here, where the package puts it at /usr/bin/edgeproxy.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgeproxy.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/edgeproxy", env!("CARGO_BIN_EXE_edgeproxy")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs (Debian's systemd package)");
    let said = String::from_utf8_lossy(&out.stderr);
    // It reports bad values and keeps going: anything said about the unit is a failure.
    assert!(
        out.status.success() && !said.contains("edgeproxy.service"),
        "{said}"
    );
}

/// Runs `program args` and returns its standard output, failing with everything it said.
fn run_ok(program: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}: {said}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Debian package, made by `cargo deb` (cargo-deb; metadata in host/Cargo.toml) from
/// the binary these tests run: unpacked into a throwaway root, it holds the unit, the
/// configuration (a conffile), the manual pages generated from the command line, and a
/// binary that runs `--version` and `config check` on that configuration.
#[test]
fn the_debian_package_unpacks_into_a_binary_that_runs() {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_edgeproxy"));
    // The manual pages, where the package's assets expect them.
    let man = workspace.join("target/man");
    run_ok(bin.to_str().unwrap(), &["man".as_ref(), man.as_os_str()]);
    let out = tempfile::tempdir().unwrap();
    // The test binary's profile (cargo-deb warns: it is for releases; CI builds one
    // profile), system gzip at its fastest: seconds, not minutes.
    run_ok(
        "cargo",
        &[
            "deb",
            "-p",
            "edgeproxy",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "-Z",
            "gz",
            "--compress-system",
            "-o",
        ]
        .map(std::ffi::OsStr::new)
        .into_iter()
        .chain([out.path().as_os_str()])
        .collect::<Vec<_>>(),
    );
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    let control = run_ok("dpkg-deb", &["-f".as_ref(), deb.as_os_str()]);
    // The unit's scripts: removing the package stops the service.
    let scripts = run_ok("dpkg-deb", &["-I".as_ref(), deb.as_os_str()]);
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(scripts.contains(script), "no {script}: {scripts}");
    }
    assert!(control.contains("Package: edgeproxy"), "{control}");
    assert!(control.contains("Depends: adduser"), "{control}");
    let root = out.path().join("root");
    run_ok(
        "dpkg-deb",
        &["-x".as_ref(), deb.as_os_str(), root.as_os_str()],
    );
    for installed in [
        "usr/bin/edgeproxy",
        "usr/lib/systemd/system/edgeproxy.service",
        "etc/edgeproxy/edgeproxy.toml",
        "usr/share/man/man1/edgeproxy.1.gz",
        "usr/share/man/man1/edgeproxy-backend-add.1.gz",
        "usr/share/doc/edgeproxy/copyright",
    ] {
        assert!(
            root.join(installed).exists(),
            "{installed} not in the package"
        );
    }
    let binary = root.join("usr/bin/edgeproxy");
    let version = run_ok(binary.to_str().unwrap(), &["--version".as_ref()]);
    assert!(version.starts_with("edgeproxy "), "{version}");
    let config = root.join("etc/edgeproxy/edgeproxy.toml");
    let checked = run_ok(
        binary.to_str().unwrap(),
        &[
            "config".as_ref(),
            "check".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    );
    assert!(checked.contains("configuration OK"), "{checked}");
}
