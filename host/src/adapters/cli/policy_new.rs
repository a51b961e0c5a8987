//! `edgeproxy policy new NAME [--lang rust|c|python|js]`: a policy project that builds,
//! passes its own tests and `policy check` as generated. Each language's project is the
//! matching example policy (kept working by the test suite), with the WIT contract copied
//! in so the project stands alone.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    C,
    Python,
    Js,
}

static WIT: &str = include_str!("../../../../policy-sdk/wit/policy.wit");

macro_rules! example {
    ($path:literal) => {
        include_str!(concat!("../../../../examples/policies/", $path))
    };
}

/// The version of policy-sdk a new Rust project asks crates.io for.
const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes the project into `dir` (which must not exist, or be empty) and returns the
/// files written. A Rust project depends on policy-sdk from crates.io, or on the checkout
/// at `sdk` when given.
pub fn scaffold(dir: &Path, lang: Lang, sdk: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("the project needs a name (the directory's last component)")?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || !name.starts_with(|c: char| c.is_ascii_alphabetic())
    {
        bail!("{name:?}: a policy name is letters, digits, '-' and '_', starting with a letter");
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let wasm = format!("{name}.wasm");
    let files: Vec<(&str, String)> = match lang {
        Lang::Rust => {
            let sdk = match sdk {
                Some(path) => {
                    let path = std::fs::canonicalize(path)
                        .with_context(|| format!("policy-sdk at {}", path.display()))?;
                    format!("{{ path = {:?} }}", path.display().to_string())
                }
                None => format!("{SDK_VERSION:?}"),
            };
            vec![
                ("Cargo.toml", rust_manifest(name, &sdk)),
                (
                    "src/lib.rs",
                    example!("least-connections/src/lib.rs").into(),
                ),
                (".gitignore", "/target\n*.wasm\n".into()),
                ("README.md", readme(name, lang)),
            ]
        }
        Lang::C => vec![
            ("policy.c", example!("least-connections-c/policy.c").into()),
            (
                "edgeproxy_policy.h",
                example!("least-connections-c/edgeproxy_policy.h").into(),
            ),
            (
                "build.sh",
                example!("least-connections-c/build.sh").replace("least-connections-c.wasm", &wasm),
            ),
            ("README.md", readme(name, lang)),
        ],
        Lang::Python => vec![
            ("app.py", example!("geo-load-python/app.py").into()),
            (
                "build.sh",
                standalone(example!("geo-load-python/build.sh"))
                    .replace("geo-load-python.wasm", &wasm),
            ),
            (
                "test_app.py",
                standalone(example!("geo-load-python/test_app.py")),
            ),
            ("wit/policy.wit", WIT.into()),
            ("README.md", readme(name, lang)),
        ],
        Lang::Js => vec![
            ("app.js", example!("geo-load-js/app.js").into()),
            ("policy.js", example!("geo-load-js/policy.js").into()),
            (
                "policy.test.js",
                example!("geo-load-js/policy.test.js").into(),
            ),
            (
                "build.mjs",
                standalone(example!("geo-load-js/build.mjs")).replace("geo-load-js.wasm", &wasm),
            ),
            (
                "package.json",
                standalone(example!("geo-load-js/package.json"))
                    .replace("edgeproxy-geo-load-js", name)
                    .replace("geo-load-js.wasm", &wasm),
            ),
            ("wit/policy.wit", WIT.into()),
            (".gitignore", "node_modules/\n*.wasm\n".into()),
            ("README.md", readme(name, lang)),
        ],
    };
    let mut written = Vec::new();
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    #[cfg(unix)]
    if matches!(lang, Lang::C | Lang::Python) {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("build.sh");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(written)
}

/// An example's file with the contract read from the project's own `wit/`.
fn standalone(text: &str) -> String {
    text.replace("../../../wit", "wit")
}

fn rust_manifest(name: &str, sdk: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
policy-sdk = {sdk}

# A project of its own, not a member of an enclosing workspace.
[workspace]
"#
    )
}

fn readme(name: &str, lang: Lang) -> String {
    let steps = match lang {
        Lang::Rust => format!(
            "    cargo test                                  # the decision's unit tests\n    \
             edgeproxy policy build .                    # writes {name}.wasm\n    \
             edgeproxy policy check {name}.wasm\n\n\
             The policy in `src/lib.rs` is weighted least connections; change `pick`."
        ),
        Lang::C => format!(
            "    ./build.sh                                  # needs clang and lld; writes {name}.wasm\n    \
             edgeproxy policy check {name}.wasm\n\n\
             The policy in `policy.c` is weighted least connections; `edgeproxy_policy.h`\n\
             spells out the ABI."
        ),
        Lang::Python => format!(
            "    pip install componentize-py==0.25.1\n    \
             python3 test_app.py                         # the decision's unit tests\n    \
             ./build.sh                                  # writes {name}.wasm\n    \
             edgeproxy policy check {name}.wasm\n\n\
             The policy in `app.py` is edgeproxy's default (geo, then load); change `pick`."
        ),
        Lang::Js => format!(
            "    npm install\n    \
             npm test                                    # the decision's unit tests\n    \
             node build.mjs                              # writes {name}.wasm\n    \
             edgeproxy policy check {name}.wasm\n\n\
             The policy in `policy.js` is edgeproxy's default (geo, then load); change `pick`."
        ),
    };
    format!(
        "# {name}\n\nAn edgeproxy backend-selection policy.\n\n{steps}\n\n\
         Deploy: `policy_path = \"{name}.wasm\"`, or `edgeproxy policy deploy {name}.wasm --shadow`\n\
         to try it beside the live policy first. The contract is `wit/policy.wit` in edgeproxy's\n\
         repository; its `docs/POLICY-AUTHORS.md` says what a policy sees and may do.\n"
    )
}
