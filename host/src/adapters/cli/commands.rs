//! The `edgeproxy` command line: its commands and options (clap), the configuration they
//! read, and what each does. Serving itself is the composition root's (`main.rs`), handed
//! in as [`Serve`].

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use super::output::emit;
use super::{
    cluster as cluster_cli, config as config_cli, policy_build, policy_check, policy_new,
    policy_replay, policy_simulate, routing as routing_cli, shadow as shadow_cli,
};
use crate::config::{Config, Flags, Layer, LogFormat, PolicySource, Scope};
use crate::domain::Region;
use crate::{demo, policy_limits, policy_runtime};

/// Builds the host from `config` and serves until SIGTERM/SIGINT (the composition root).
pub type Serve =
    fn(Config) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>;

/// The version, the commit it was built from and the policy contracts it loads.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EDGEPROXY_COMMIT"),
    "; policy contract edgeproxy:policy@0.3.0, and 0.2.0 and 0.1.0)"
);

#[derive(Parser)]
#[command(
    name = "edgeproxy",
    version = VERSION,
    about = "Geo- and load-aware L4 edge proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file; flags override `EDGEPROXY_*` variables, which override it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Subcommand)]
enum Command {
    /// Start three local echo backends in different regions and show which one serves
    /// clients from different countries.
    Demo {
        /// Keep the demo proxy running after the tour (Ctrl-C to stop).
        #[arg(long)]
        hold: bool,
        /// Instead: three POPs replicating one routing table, with a partition healed.
        #[arg(long, conflicts_with = "hold")]
        cluster: bool,
    },
    /// Work with policy components.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Edit the routing table (safe while the proxy runs; it reloads by itself).
    Backend {
        #[command(subcommand)]
        command: routing_cli::BackendCommand,
        #[command(flatten)]
        target: DbTarget,
    },
    /// Create or bulk-load the routing database.
    Db {
        #[command(subcommand)]
        command: routing_cli::DbCommand,
        #[command(flatten)]
        target: DbTarget,
    },
    /// Validate or print the configuration without starting the proxy.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Write the manual pages (roff, one per command) into DIR, for packages.
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// The fleet: make its credentials, see what this POP sees of it.
    #[command(subcommand)]
    Cluster(cluster_cli::ClusterCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration; exits non-zero naming every bad key.
    Check,
    /// Print every setting's effective value and where it came from (flag, environment,
    /// file, default); secrets are masked.
    Show {
        #[arg(long)]
        json: bool,
    },
}

/// Which routing database a `backend`/`db` command edits, and how it answers.
#[derive(clap::Args)]
struct DbTarget {
    /// Routing database (default: db_path from --config, EDGEPROXY_DB_PATH, or routing.db).
    #[arg(long, global = true)]
    db: Option<PathBuf>,
    /// Answer in JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Build a policy crate into a component: `cargo build --profile policy --target
    /// wasm32-unknown-unknown`, then wrap the module into a component.
    Build {
        /// The policy crate's directory.
        dir: PathBuf,
        /// Where to write the component (default: DIR/<crate>.wasm).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Start a policy project in DIR that builds, passes its own tests and `policy check`
    /// as generated.
    New {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "rust")]
        lang: policy_new::Lang,
        /// Depend on the policy-sdk checkout at this path instead of crates.io (Rust).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Load a component as the proxy would, run sample decisions, print its imports and a
    /// verdict; exits non-zero when the proxy would reject it.
    Check {
        file: PathBuf,
        /// The app the sample decisions are for (as a listener for that app passes it).
        #[arg(long, default_value = "web")]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Decide one client on a real routing table: every candidate with its fields, the
    /// client's GeoIP data, the policy's pick and the native scorer's.
    Simulate {
        /// Component to try (default: the embedded geo-load policy).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Routing database (default: db_path from the configuration).
        #[arg(long)]
        db: Option<PathBuf>,
        /// The client's IP address.
        #[arg(long)]
        client: std::net::IpAddr,
        /// The POP's region (default: region from the configuration).
        #[arg(long = "pop-region", visible_alias = "region")]
        pop_region: Option<String>,
        /// Decide among this app's backends only.
        #[arg(long)]
        app: Option<String>,
        /// Simulated open connections, as ID=N (repeatable).
        #[arg(long, value_parser = parse_load)]
        load: Vec<(String, u32)>,
        #[arg(long)]
        json: bool,
    },
    /// The shadow policy on the running proxy (its admin API).
    #[command(subcommand)]
    Shadow(shadow_cli::ShadowCommand),
    /// Make the shadow policy live on the running proxy (after a self-test); the policy
    /// it replaces is kept for `rollback`.
    Promote {
        /// Drop every binding, so each client's next connection is decided afresh.
        #[arg(long)]
        drop_bindings: bool,
        #[arg(long)]
        json: bool,
    },
    /// Bring back the policy that served before the last promotion; with --fleet, revoke
    /// the latest fleet deployment instead (every POP it reached goes back to what it ran
    /// before it).
    Rollback {
        #[arg(long, conflicts_with = "fleet")]
        drop_bindings: bool,
        /// Roll back the latest fleet deployment (of the live policy, or --shadow).
        #[arg(long)]
        fleet: bool,
        /// With --fleet: the latest shadow deployment.
        #[arg(long, requires = "fleet")]
        shadow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Deploy a component across the fleet through the running proxy: stored in the
    /// replicated state by its SHA-256, fetched, checked, compiled and self-tested by every
    /// POP it is for, then run as the live policy or the shadow.
    Deploy {
        file: PathBuf,
        /// Run it as the live policy.
        #[arg(long, required_unless_present = "shadow", conflicts_with = "shadow")]
        live: bool,
        /// Run it as the shadow, beside the live policy.
        #[arg(long)]
        shadow: bool,
        /// Only these POPs (comma-separated names); with --regions, those too.
        #[arg(long, value_delimiter = ',')]
        pops: Vec<String>,
        /// Only the POPs of these regions (comma-separated).
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
        /// Skip the local `policy check` before sending.
        #[arg(long)]
        no_check: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run a component over recorded decisions (the admin API's /decisions) on the
    /// routing table, offline: where it would pick as the live policy did, and where not.
    Replay {
        #[arg(long)]
        policy: PathBuf,
        /// JSON lines as `GET /decisions` gives them.
        #[arg(long)]
        decisions: PathBuf,
        /// Routing database (default: db_path from the configuration).
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_load(s: &str) -> Result<(String, u32), String> {
    let (id, n) = s.split_once('=').ok_or("expected ID=N")?;
    let n = n.parse().map_err(|_| format!("{n:?} is not a count"))?;
    Ok((id.to_owned(), n))
}

/// The configuration sources, read once; resolved for what each command needs.
struct Sources {
    file: Layer,
    env: Layer,
    flags: Layer,
    /// `EDGEPROXY_*` variables edgeproxy does not read.
    warnings: Vec<String>,
}

impl Sources {
    fn read(cli: &Cli) -> anyhow::Result<Self> {
        let file = match &cli.config {
            Some(path) => Layer::from_file(path)?,
            None => Layer::default(),
        };
        let (env, warnings) = Layer::from_env(std::env::vars());
        Ok(Self {
            file,
            env,
            flags: cli.flags.0.clone(),
            warnings,
        })
    }

    fn resolve(&self, scope: Scope) -> anyhow::Result<Config> {
        Config::resolve_for(
            scope,
            self.file.clone(),
            self.env.clone(),
            self.flags.clone(),
        )
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))
    }
}

/// Runs the command `cli` names; none serves, with `serve`.
pub fn run(cli: Cli, serve: Serve) -> anyhow::Result<()> {
    let sources = Sources::read(&cli)?;
    let tools = || sources.resolve(Scope::Tools);
    match cli.command {
        None => {
            let config = sources.resolve(Scope::Serve)?;
            init_tracing(config.settings.debug, config.settings.log_format);
            for w in &sources.warnings {
                tracing::warn!("{w}");
            }
            runtime(config.settings.worker_threads)?.block_on(serve(config))
        }
        #[cfg(target_os = "linux")]
        Some(Command::Demo { cluster: true, .. }) => {
            runtime(0)?.block_on(crate::demo_cluster::run())
        }
        Some(Command::Demo { hold, .. }) => {
            runtime(0)?.block_on(async { demo::run(hold, shutdown_signal()).await })
        }
        Some(Command::Man { dir }) => {
            std::fs::create_dir_all(&dir)?;
            // Pages of commands gone since the last run are not packaged.
            for old in std::fs::read_dir(&dir)?.flatten() {
                let name = old.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("edgeproxy") && name.ends_with(".1") {
                    std::fs::remove_file(old.path())?;
                }
            }
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir)
                .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
            Ok(())
        }
        Some(Command::Config(command)) => {
            let config = sources.resolve(Scope::Serve);
            eprint!("{}", config_cli::render_warnings(&sources.warnings));
            let config = config?;
            match command {
                ConfigCommand::Check => {
                    println!("configuration OK");
                    Ok(())
                }
                ConfigCommand::Show { json } => {
                    let file = cli.config.as_ref().map(|p| p.display().to_string());
                    let shown = config_cli::show(&config, file, sources.warnings.clone());
                    emit(json, &shown, || config_cli::render_show(&shown))
                }
            }
        }
        Some(Command::Cluster(command)) => {
            let admin = match &command {
                cluster_cli::ClusterCommand::Status { .. } => {
                    tools()?.admin.map(|a| (a.addr, a.token))
                }
                _ => None,
            };
            runtime(1)?.block_on(cluster_cli::run(command, admin))
        }
        Some(Command::Backend { command, target }) => {
            let source = routing_source(target.db, &tools)?;
            let live = match &command {
                routing_cli::BackendCommand::List { live: true, .. } => {
                    let entries: Vec<serde_json::Value> = admin_call(
                        &tools()?,
                        hyper::Method::GET,
                        "/backends",
                        "backend list --live",
                    )?;
                    Some(
                        entries
                            .into_iter()
                            .filter_map(|e| Some((e["id"].as_str()?.to_owned(), e)))
                            .collect(),
                    )
                }
                _ => None,
            };
            routing_cli::backend(&source, command, target.json, live)
        }
        Some(Command::Db { command, target }) => {
            let source = routing_source(target.db, &tools)?;
            routing_cli::db(&source, command, target.json)
        }
        Some(Command::Policy(PolicyCommand::Build { dir, out })) => {
            let out = policy_build::build(&dir, out.as_deref(), None)?;
            // Compiled into this machine's cache too, so a proxy here starts on it warm.
            match tools().and_then(|c| policy_runtime(&c)) {
                Ok(runtime) => {
                    if let Err(e) = std::fs::read(&out)
                        .map_err(anyhow::Error::from)
                        .and_then(|bytes| Ok(runtime.compile(&bytes)?))
                    {
                        eprintln!("edgeproxy: not precompiled: {e:#}");
                    }
                }
                Err(e) => eprintln!("edgeproxy: not precompiled: {e:#}"),
            }
            println!("{}", out.display());
            Ok(())
        }
        Some(Command::Policy(PolicyCommand::New { dir, lang, sdk })) => {
            for file in policy_new::scaffold(&dir, lang, sdk.as_deref())? {
                println!("{}", file.display());
            }
            Ok(())
        }
        Some(Command::Policy(PolicyCommand::Check { file, app, json })) => {
            let report = policy_check::check(&file, policy_runtime(&tools()?)?, &app)?;
            emit(json, &report, || policy_check::render_check(&report))?;
            match report.rejected {
                None => Ok(()),
                Some(_) => Err(anyhow::anyhow!("{} would be rejected", file.display())),
            }
        }
        Some(Command::Policy(PolicyCommand::Shadow(shadow_cli::ShadowCommand::Status {
            json,
        }))) => {
            let report: serde_json::Value = admin_call(
                &tools()?,
                hyper::Method::GET,
                "/policy/shadow",
                "shadow status",
            )?;
            emit(json, &report, || shadow_cli::render(&report))
        }
        Some(Command::Policy(PolicyCommand::Promote {
            drop_bindings,
            json,
        })) => promotion(&tools()?, "promote", drop_bindings, json),
        Some(Command::Policy(PolicyCommand::Rollback {
            fleet: true,
            shadow,
            json,
            ..
        })) => {
            let role = if shadow { "shadow" } else { "live" };
            let d: serde_json::Value = admin_call(
                &tools()?,
                hyper::Method::POST,
                &format!("/fleet/rollback?role={role}"),
                "policy rollback --fleet",
            )?;
            emit(json, &d, || {
                format!(
                    "rolled back {role} deployment {} ({}, {}): the POPs it reached go back to what they ran before it\n",
                    d["id"].as_str().unwrap_or("?"),
                    d["name"].as_str().unwrap_or("?"),
                    d["hash"].as_str().unwrap_or("?"),
                )
            })
        }
        Some(Command::Policy(PolicyCommand::Rollback {
            drop_bindings,
            json,
            ..
        })) => promotion(&tools()?, "rollback", drop_bindings, json),
        Some(Command::Policy(PolicyCommand::Deploy {
            file,
            live: _,
            shadow,
            pops,
            regions,
            no_check,
            json,
        })) => {
            let config = tools()?;
            if !no_check {
                let report = policy_check::check(&file, policy_runtime(&config)?, "web")?;
                if let Some(why) = &report.rejected {
                    anyhow::bail!(
                        "{} fails `policy check` ({why}); not deployed (--no-check sends it anyway):\n{}",
                        file.display(),
                        policy_check::render_check(&report)
                    );
                }
            }
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "policy.wasm".into());
            let enc = |s: &str| -> String {
                s.bytes()
                    .map(|b| match b {
                        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b',' => {
                            (b as char).to_string()
                        }
                        b => format!("%{b:02X}"),
                    })
                    .collect()
            };
            let mut path = format!(
                "/fleet/deploy?role={}&name={}&sha256={}",
                if shadow { "shadow" } else { "live" },
                enc(&name),
                crate::domain::rollout::content_hash(&bytes)
            );
            if !pops.is_empty() {
                path += &format!("&pops={}", enc(&pops.join(",")));
            }
            if !regions.is_empty() {
                path += &format!("&regions={}", enc(&regions.join(",")));
            }
            let admin = config
                .admin
                .clone()
                .context("the admin API is off (admin_addr); policy deploy goes through it")?;
            let body = runtime(1)?.block_on(cluster_cli::request_with(
                admin.addr,
                hyper::Method::POST,
                &path,
                admin.token,
                bytes,
            ))?;
            let d: serde_json::Value =
                serde_json::from_slice(&body).context("the admin API's /fleet/deploy answer")?;
            emit(json, &d, || {
                format!(
                    "deployment {}: {} ({}) as the {} policy for {}; `edgeproxy cluster status` shows each POP take it\n",
                    d["id"].as_str().unwrap_or("?"),
                    d["name"].as_str().unwrap_or("?"),
                    d["hash"].as_str().unwrap_or("?"),
                    d["role"].as_str().unwrap_or("?"),
                    describe_targets(&d["targets"]),
                )
            })
        }
        Some(Command::Policy(PolicyCommand::Replay {
            policy,
            decisions,
            db,
            json,
        })) => {
            let config = tools()?;
            let replay = policy_replay::replay(policy_replay::ReplayInput {
                policy,
                decisions,
                db: db.unwrap_or(config.settings.db_path.clone()),
                regions: config.regions.clone(),
                limits: policy_limits(&config),
            })?;
            emit(json, &replay, || {
                let mut text = format!(
                    "{} decisions replayed, {} skipped\n",
                    replay.decisions, replay.skipped
                );
                for why in &replay.skipped_examples {
                    text += &format!("  skipped {why}\n");
                }
                let report = serde_json::to_value(&replay.report).unwrap_or_default();
                text + &shadow_cli::render(&report)
            })
        }
        Some(Command::Policy(PolicyCommand::Simulate {
            policy,
            db,
            client,
            pop_region,
            app,
            load,
            json,
        })) => {
            let config = tools()?;
            let simulation = policy_simulate::simulate(policy_simulate::SimulateInput {
                policy: policy.or_else(|| match &config.policy.source {
                    PolicySource::File(p) => Some(p.clone()),
                    _ => None,
                }),
                db: db.unwrap_or(config.settings.db_path.clone()),
                geoip: config.settings.geoip_path.clone(),
                client,
                pop_region: pop_region
                    .map(|r| Region::new(&r))
                    .unwrap_or(config.region.clone()),
                app,
                regions: config.regions.clone(),
                limits: policy_limits(&config),
                load,
            })?;
            emit(json, &simulation, || {
                policy_simulate::render_simulation(&simulation)
            })
        }
    }
}

/// `--db FILE` when given, else the configuration's: `db_url` (PostgreSQL) or `db_path`.
fn routing_source(
    db: Option<PathBuf>,
    tools: &dyn Fn() -> anyhow::Result<Config>,
) -> anyhow::Result<routing_cli::Source> {
    if let Some(path) = db {
        return Ok(routing_cli::Source::File(path));
    }
    let config = tools()?;
    Ok(match crate::pg_settings(&config) {
        Some(pg) => routing_cli::Source::Postgres(pg),
        None => routing_cli::Source::File(config.settings.db_path),
    })
}

/// One request to the running proxy's admin API (`what` names the command asking), its
/// JSON answer decoded.
fn admin_call<T: serde::de::DeserializeOwned>(
    config: &Config,
    method: hyper::Method,
    path: &str,
    what: &str,
) -> anyhow::Result<T> {
    let admin = config
        .admin
        .clone()
        .with_context(|| format!("the admin API is off (admin_addr); {what} goes through it"))?;
    let body = runtime(1)?.block_on(cluster_cli::request(admin.addr, method, path, admin.token))?;
    serde_json::from_slice(&body).with_context(|| format!("the admin API's {path} answer"))
}

fn describe_targets(t: &serde_json::Value) -> String {
    let targets: crate::domain::rollout::Targets =
        serde_json::from_value(t.clone()).unwrap_or_default();
    targets.to_string()
}

/// `policy promote` or `policy rollback`: one POST to the running proxy's admin API.
fn promotion(config: &Config, what: &str, drop_bindings: bool, json: bool) -> anyhow::Result<()> {
    let path = match drop_bindings {
        true => format!("/policy/{what}?drop_bindings=true"),
        false => format!("/policy/{what}"),
    };
    let done: serde_json::Value = admin_call(config, hyper::Method::POST, &path, what)?;
    emit(json, &done, || {
        format!(
            "live: {}\nreplaced: {}\nbindings dropped: {}\n",
            done["live"].as_str().unwrap_or("?"),
            done["replaced"].as_str().unwrap_or("?"),
            done["bindings_dropped"]
        )
    })
}

/// One worker: a current-thread runtime, which skips the work-stealing scheduler's
/// cross-thread bookkeeping on every wake-up. 0: one per core.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if workers > 1 {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().context("starting the runtime")
}

/// Cancelled on the first SIGTERM or SIGINT; `abort` on the second.
pub fn shutdown_signal_then(abort: CancellationToken) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            tracing::info!("shutdown requested; a second SIGTERM or SIGINT ends the drain at once");
            t.cancel();
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            tracing::info!("second shutdown signal: ending the drain");
            abort.cancel();
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            t.cancel();
            let _ = tokio::signal::ctrl_c().await;
            abort.cancel();
        }
    });
    token
}

/// Cancelled on the first SIGTERM or SIGINT.
fn shutdown_signal() -> CancellationToken {
    shutdown_signal_then(CancellationToken::new())
}

fn init_tracing(debug: bool, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
