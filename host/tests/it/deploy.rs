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
