//! The commit `edgeproxy --version` names: `EDGEPROXY_COMMIT` when the build sets it (a
//! container build, which has no .git), else `git rev-parse` of the checkout being built,
//! "unknown" outside one (a source tarball).
use std::process::Command;

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    println!("cargo:rerun-if-env-changed=EDGEPROXY_COMMIT");
    let commit = std::env::var("EDGEPROXY_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EDGEPROXY_COMMIT={commit}");
    // Rebuilt when HEAD moves: HEAD itself (a checkout) and its reflog (every commit,
    // checkout and reset). Only paths that exist: cargo reruns a script whose watched
    // path is missing on every build.
    for path in ["HEAD", "logs/HEAD"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path])
            && std::path::Path::new(&p).exists()
        {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
