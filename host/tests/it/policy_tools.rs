//! `edgeproxy policy check` and `edgeproxy policy simulate`, run as the built binary on
//! real components, a real routing database and a generated GeoIP file.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// `edgeproxy ARGS` with only `env`; (success, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeproxy"));
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn geo_load() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies/geo-load/geo-load.wasm")
        .display()
        .to_string()
}

#[test]
fn check_passes_a_sound_component_and_rejects_broken_ones() {
    let (ok, out, err) = run(&["policy", "check", &geo_load()], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("contract:  edgeproxy:policy@0.3.0\nimports:   edgeproxy:policy/types@0.3.0, edgeproxy:policy/host@0.3.0"),
        "{out}"
    );
    assert!(out.contains("exports:   set-table, pick-backend"), "{out}");
    assert!(
        out.contains("every backend unhealthy") && out.contains("-> refused"),
        "{out}"
    );
    assert!(out.contains("verdict:   OK"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm at all").unwrap();
    let (ok, out, _) = run(&["policy", "check", garbage.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(out.contains("REJECTED: not a WebAssembly"), "{out}");

    // An empty core module: wrapping it into a policy component finds no exports.
    let empty = dir.path().join("empty.wasm");
    std::fs::write(&empty, b"\0asm\x01\0\0\0").unwrap();
    let (ok, out, _) = run(&["policy", "check", empty.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(out.contains("(8 bytes, core module"), "{out}");
    assert!(
        out.contains("REJECTED: cannot make a component") && out.contains("set-table"),
        "{out}"
    );

    // A component that loads but faults on the sample decisions (the chaos fixture traps
    // for app "trap"): each fault is shown and the verdict names the first.
    let chaos = chaos_component();
    let (ok, out, _) = run(
        &[
            "policy",
            "check",
            chaos.to_str().unwrap(),
            "--app",
            "trap",
            "--json",
        ],
        &[],
    );
    assert!(!ok);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["kind"], "component");
    let decisions = report["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 5);
    assert!(decisions.iter().all(|d| d["ok"] == false));
    let rejected = report["rejected"].as_str().unwrap();
    assert!(rejected.contains("trap"), "{rejected}");
}

#[test]
fn simulate_shows_candidates_geo_data_and_both_picks() {
    let dir = tempfile::tempdir().unwrap();
    let geo = dir.path().join("geo.mmdb");
    write_mmdb(&geo, GeoFormat::MaxMind, &[("203.0.113.0/24", "DE")]);
    let addr = |port: u16| std::net::SocketAddr::from(([10, 0, 0, 1], port));
    let db = Db::new(&[
        Row {
            hard_limit: 100,
            ..Row::new("eu-fra-1", "eu", "DE", addr(1))
        },
        Row::new("sa-gru-1", "sa", "BR", addr(2)),
        Row::new("us-iad-1", "us", "US", addr(3)),
    ]);
    let env = [("EDGEPROXY_GEOIP_PATH", geo.as_path())];
    let base = [
        "policy",
        "simulate",
        "--db",
        db.path.to_str().unwrap(),
        "--client",
        "203.0.113.7",
        "--pop-region",
        "us",
    ];

    // The embedded default: the client's own country wins, the native scorer agrees.
    let (ok, out, err) = run(&base, &env);
    assert!(ok, "{err}");
    assert!(
        out.contains("client:     203.0.113.7 (country DE, region eu)"),
        "{out}"
    );
    assert!(out.contains("geo.mmdb"), "{out}");
    let row = out.lines().find(|l| l.starts_with("eu-fra-1")).unwrap();
    assert!(row.contains(&addr(1).to_string()), "{row}");
    assert!(out.contains("policy pick: eu-fra-1"), "{out}");
    assert!(out.contains("native pick: eu-fra-1"), "{out}");

    // The DE backend at its hard limit: both move on, to the POP's region.
    let (ok, out, err) = run(
        &[&base[..], &["--load", "eu-fra-1=100", "--json"]].concat(),
        &env,
    );
    assert!(ok, "{err}");
    let sim: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sim["client"]["country"], "DE");
    assert_eq!(sim["candidates"].as_array().unwrap().len(), 3);
    assert_eq!(sim["candidates"][0]["active"], 100);
    assert_eq!(sim["candidates"][0]["geo_score"], 0);
    assert_eq!(sim["native_pick"], "us-iad-1");
    assert_eq!(sim["policy_pick"]["Ok"], "us-iad-1");

    // Simulated load on a backend that is not in the table is named, not ignored.
    let (ok, _, err) = run(&[&base[..], &["--load", "ghost-1=5"]].concat(), &env);
    assert!(!ok && err.contains("ghost-1"), "{err}");

    // Another policy: the chaos fixture picks the last eligible candidate, and the
    // output shows it beside the native pick.
    let chaos = chaos_component();
    let (ok, out, err) = run(
        &[&base[..], &["--policy", chaos.to_str().unwrap()]].concat(),
        &env,
    );
    assert!(ok, "{err}");
    assert!(out.contains("policy pick: us-iad-1"), "{out}");
    assert!(out.contains("native pick: eu-fra-1"), "{out}");
}

/// A policy crate of an author's own, outside this workspace (so without its `policy`
/// profile), builds with `policy build` and passes `policy check`.
#[test]
fn a_policy_crate_outside_the_workspace_builds_and_passes_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policy-sdk")
        .canonicalize()
        .unwrap();
    std::fs::create_dir_all(dir.path().join("src")).unwrap();
    std::fs::write(
        dir.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"my-policy\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\npolicy-sdk = {{ path = \"{}\" }}\n\n[workspace]\n",
            sdk.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("src/lib.rs"),
        "use policy_sdk::{Candidate, Client, Context, Policy};\n\
         pub struct First;\n\
         impl Policy for First {\n\
             fn pick(_: &Context<'_>, _: &Client, c: &[Candidate<'_>]) -> Option<usize> {\n\
                 c.iter().position(Candidate::is_eligible)\n\
             }\n\
         }\n\
         #[cfg(target_arch = \"wasm32\")]\n\
         policy_sdk::export_policy!(First);\n",
    )
    .unwrap();
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-fixtures/outside");
    let out = edgeproxy::adapters::cli::policy_build::build(dir.path(), None, Some(&target))
        .expect("an out-of-tree policy crate builds");
    assert_eq!(out, dir.path().join("my-policy.wasm"));
    let (ok, stdout, err) = run(&["policy", "check", out.to_str().unwrap()], &[]);
    assert!(ok, "{stdout}{err}");
}

/// `policy new` in each language: the project passes its own tests, builds with its own
/// tool and passes `policy check`, as generated. (The Rust one depends on this
/// checkout's policy-sdk with `--sdk`, as it would on crates.io; the JavaScript one
/// borrows the example's `node_modules`, which `npm ci` installed.)
#[test]
fn new_policy_projects_in_every_language_test_build_and_pass_their_check() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sdk = root.join("policy-sdk");
    let target = root.join("target/test-fixtures/new");
    let step = |program: &str, args: &[&str], cwd: &Path| {
        let out = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {}{}",
            cwd.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for lang in ["rust", "c", "python", "js"] {
        let project = dir.path().join(format!("my-{lang}"));
        let (ok, stdout, err) = run(
            &[
                "policy",
                "new",
                project.to_str().unwrap(),
                "--lang",
                lang,
                "--sdk",
                sdk.to_str().unwrap(),
            ],
            &[],
        );
        assert!(ok, "{stdout}{err}");
        match lang {
            "rust" => {
                step("cargo", &["test", "--quiet"], &project);
                edgeproxy::adapters::cli::policy_build::build(&project, None, Some(&target))
                    .expect("the new crate builds");
            }
            "c" => step("sh", &["build.sh"], &project),
            "python" => {
                step("python3", &["test_app.py"], &project);
                step("sh", &["build.sh"], &project);
            }
            _ => {
                std::os::unix::fs::symlink(
                    root.join("examples/policies/geo-load-js/node_modules"),
                    project.join("node_modules"),
                )
                .unwrap();
                step("node", &["--test"], &project);
                step("node", &["build.mjs"], &project);
            }
        }
        let wasm = project.join(format!("my-{lang}.wasm"));
        let (ok, stdout, err) = run(&["policy", "check", wasm.to_str().unwrap()], &[]);
        assert!(ok, "{lang}: {stdout}{err}");
    }
    // Not over an existing project.
    let (ok, _, err) = run(
        &[
            "policy",
            "new",
            dir.path().join("my-c").to_str().unwrap(),
            "--lang",
            "c",
        ],
        &[],
    );
    assert!(!ok && err.contains("not empty"), "{err}");
}

/// The embedded default policy is exactly what its sources build to (`policy build` makes
/// the same bytes on any machine); a stale committed component fails here.
#[test]
fn the_committed_default_policy_is_what_its_sources_build_to() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let built = edgeproxy::adapters::cli::policy_build::build(
        &root.join("policies/geo-load"),
        Some(&out.path().join("geo-load.wasm")),
        Some(&root.join("target/test-fixtures/cargo")),
    )
    .unwrap();
    assert!(
        std::fs::read(built).unwrap()
            == std::fs::read(root.join("policies/geo-load/geo-load.wasm")).unwrap(),
        "policies/geo-load/geo-load.wasm is stale: run 'cargo run -p edgeproxy -- policy build policies/geo-load' and commit it"
    );
}
