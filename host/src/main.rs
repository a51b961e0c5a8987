//! The composition root: parse the CLI, merge the configuration, set up logging, build the
//! host, bind the listeners and run until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use edgeproxy::adapters::inbound::cli_output::emit;
use edgeproxy::adapters::inbound::{policy_build, policy_tools, routing_cli, tcp_server};
use edgeproxy::config::{Config, Layer, LogFormat, PolicySource};
use edgeproxy::domain::Region;
use edgeproxy::{Host, demo, policy_limits};

#[derive(Parser)]
#[command(
    name = "edgeproxy",
    version,
    about = "Geo- and load-aware L4 edge proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Start three local echo backends in different regions and show which one serves
    /// clients from different countries.
    Demo {
        /// Keep the demo proxy running after the tour (Ctrl-C to stop).
        #[arg(long)]
        hold: bool,
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
}

fn parse_load(s: &str) -> Result<(String, u32), String> {
    let (id, n) = s.split_once('=').ok_or("expected ID=N")?;
    let n = n.parse().map_err(|_| format!("{n:?} is not a count"))?;
    Ok((id.to_owned(), n))
}

/// Flags override `EDGEPROXY_*` variables, which override the file (see `config`).
#[derive(Parser)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[arg(long)]
    listen_addr: Option<std::net::SocketAddr>,
    #[arg(long)]
    db_path: Option<PathBuf>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long)]
    db_reload_secs: Option<u64>,
    #[arg(long)]
    geoip_path: Option<PathBuf>,
    #[arg(long)]
    binding_ttl_secs: Option<u64>,
    #[arg(long)]
    binding_gc_interval_secs: Option<u64>,
    #[arg(long)]
    connect_timeout_ms: Option<u64>,
    #[arg(long)]
    connect_attempts: Option<u32>,
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    #[arg(long)]
    drain_timeout_secs: Option<u64>,
    #[arg(long)]
    log_format: Option<LogFormat>,
    #[arg(long)]
    debug: bool,
    #[arg(long)]
    default_region: Option<String>,
    /// Policy component (.wasm) to load and watch; unset: the embedded default.
    #[arg(long = "policy", visible_alias = "policy-path")]
    policy_path: Option<PathBuf>,
    /// Decide with the host's native scorer instead of a WebAssembly policy.
    #[arg(long)]
    native_policy: bool,
    #[arg(long)]
    policy_timeout_ms: Option<u64>,
    #[arg(long)]
    policy_memory_mib: Option<u64>,
    /// Runtime worker threads (0: one per core; 1: a single-threaded runtime).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Admin API and /metrics address ("" turns it off).
    #[arg(long)]
    admin_addr: Option<String>,
    /// Bearer token the admin API requires (prefer EDGEPROXY_ADMIN_TOKEN: flags show in ps).
    #[arg(long)]
    admin_token: Option<String>,
    /// Serve the admin API off loopback without a token.
    #[arg(long)]
    admin_allow_remote: bool,
}

impl RunArgs {
    fn layer(&self) -> Layer {
        Layer {
            listen_addr: self.listen_addr,
            db_path: self.db_path.clone(),
            region: self.region.clone(),
            db_reload_secs: self.db_reload_secs,
            geoip_path: self.geoip_path.clone(),
            binding_ttl_secs: self.binding_ttl_secs,
            binding_gc_interval_secs: self.binding_gc_interval_secs,
            connect_timeout_ms: self.connect_timeout_ms,
            connect_attempts: self.connect_attempts,
            idle_timeout_secs: self.idle_timeout_secs,
            drain_timeout_secs: self.drain_timeout_secs,
            log_format: self.log_format,
            debug: self.debug.then_some(true),
            default_region: self.default_region.clone(),
            policy_path: self.policy_path.clone(),
            native_policy: self.native_policy.then_some(true),
            policy_timeout_ms: self.policy_timeout_ms,
            policy_memory_mib: self.policy_memory_mib,
            worker_threads: self.worker_threads,
            admin_addr: self.admin_addr.clone(),
            admin_token: self.admin_token.clone(),
            admin_allow_remote: self.admin_allow_remote.then_some(true),
            regions: None,
            listener: None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let file = match &cli.run.config {
        Some(path) => Layer::from_file(path)?,
        None => Layer::default(),
    };
    let env = Layer::from_env(|k| std::env::var(k).ok())?;
    let config = Config::resolve(file, env, cli.run.layer())?;
    let db_path = |target: &DbTarget| target.db.clone().unwrap_or(config.db_path.clone());
    match cli.command {
        Some(Command::Backend { command, target }) => {
            return routing_cli::backend(&db_path(&target), command, target.json);
        }
        Some(Command::Db { command, target }) => {
            return routing_cli::db(&db_path(&target), command, target.json);
        }
        Some(Command::Policy(PolicyCommand::Check { file, app, json })) => {
            let report = policy_tools::check(&file, policy_limits(&config), &app)?;
            emit(json, &report, || policy_tools::render_check(&report))?;
            return match report.rejected {
                None => Ok(()),
                Some(_) => Err(anyhow::anyhow!("{} would be rejected", file.display())),
            };
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
            let simulation = policy_tools::simulate(policy_tools::SimulateInput {
                policy: policy.or_else(|| match &config.policy.source {
                    PolicySource::File(p) => Some(p.clone()),
                    _ => None,
                }),
                db: db.unwrap_or(config.db_path.clone()),
                geoip: config.geoip_path.clone(),
                client,
                pop_region: pop_region
                    .map(|r| Region::new(&r))
                    .unwrap_or(config.region.clone()),
                app,
                regions: config.regions.clone(),
                limits: policy_limits(&config),
                load,
            })?;
            return emit(json, &simulation, || {
                policy_tools::render_simulation(&simulation)
            });
        }
        _ => {}
    }
    init_tracing(&config);

    // One worker: a current-thread runtime, which skips the work-stealing scheduler's
    // cross-thread bookkeeping on every wake-up.
    let runtime = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("starting the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Some(Command::Demo { hold }) => demo::run(hold, shutdown_signal()).await,
            Some(Command::Policy(PolicyCommand::Build { dir, out })) => {
                let out = tokio::task::spawn_blocking(move || {
                    policy_build::build(&dir, out.as_deref(), None)
                })
                .await??;
                println!("{}", out.display());
                Ok(())
            }
            None => serve(config).await,
            Some(
                Command::Backend { .. }
                | Command::Db { .. }
                | Command::Policy(PolicyCommand::Check { .. } | PolicyCommand::Simulate { .. }),
            ) => unreachable!("handled above"),
        }
    })
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let host = Host::build(&config).await?;
    // One accept loop per worker thread, each on its own SO_REUSEPORT socket.
    let copies = match config.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut listeners = Vec::new();
    for lc in &config.listeners {
        let bound = tcp_server::bind(lc.addr, copies)
            .with_context(|| format!("binding listener {}", lc.addr))?;
        listeners.extend(bound.into_iter().map(|l| (l, lc.clone())));
    }
    let admin = match &config.admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a.addr)
                .await
                .with_context(|| {
                    format!(
                        "binding the admin listener {} (admin_addr; set it empty to turn the admin API off)",
                        a.addr
                    )
                })?,
        ),
        None => None,
    };
    let drained = host.run(listeners, admin, shutdown_signal()).await?;
    tracing::info!(cut_off = drained.cut_off, "stopped");
    Ok(())
}

/// Cancelled on the first SIGTERM or SIGINT.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let default = if config.debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
