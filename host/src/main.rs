//! The composition root: build the host from the configuration, bind the listeners and
//! run until SIGTERM/SIGINT. The command line and the operator commands are
//! `adapters::cli::commands`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

use edgeproxy::Host;
use edgeproxy::adapters::cli::commands::{self, Cli};
use edgeproxy::adapters::inbound::tcp_server;
use edgeproxy::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli, |config| Box::pin(serve(config))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the host, binds every listener and serves until SIGTERM/SIGINT, then drains.
async fn serve(config: Config) -> anyhow::Result<()> {
    // Besides the proxy's connections: health probes in flight and the HTTP listeners'.
    let http = edgeproxy::adapters::inbound::http::MAX_CONNECTIONS;
    let others = [
        (
            config.health.any_checks(),
            edgeproxy::application::health_monitor::MAX_IN_FLIGHT,
        ),
        (config.admin.is_some(), http),
        (config.api.is_some(), http),
        (
            config.metrics.as_ref().is_some_and(|m| m.listen.is_some()),
            http,
        ),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| n)
    .sum();
    raise_fd_limit(config.settings.max_connections, others);
    let host = Host::build(&config).await?;
    // One accept loop per worker thread, each on its own SO_REUSEPORT socket.
    let copies = match config.settings.worker_threads {
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
    let api = match &config.api {
        Some(a) => {
            if let Some(wanted) = a.narrowed_from {
                tracing::warn!(%wanted, serving = %a.addr, "the registration API has no token (api_token / EDGEPROXY_API_TOKEN), so it is served on loopback only");
            }
            Some(
                tokio::net::TcpListener::bind(a.addr)
                    .await
                    .with_context(|| {
                        format!("binding the registration API {} (api_listen_addr)", a.addr)
                    })?,
            )
        }
        None => None,
    };
    let dns = match &config.dns {
        Some(d) => Some(
            edgeproxy::adapters::inbound::dns_server::bind(d.addr, copies)
                .with_context(|| format!("binding the DNS server {} (dns_listen_addr)", d.addr))?,
        ),
        None => None,
    };
    let metrics = match config.metrics.as_ref().and_then(|m| Some((m.listen?, m))) {
        Some((addr, m)) => {
            if let Some(wanted) = m.narrowed_from {
                tracing::warn!(%wanted, serving = %addr, "the metrics listener has no admin_token (EDGEPROXY_ADMIN_TOKEN) nor admin_allow_remote, so it is served on loopback only");
            }
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("binding the metrics listener {addr} (metrics_listen_addr)")
            })?)
        }
        None => None,
    };
    let sockets = edgeproxy::Sockets {
        listeners,
        admin,
        api,
        dns,
        metrics,
    };
    let drained = host
        .run(sockets, commands::shutdown_signal_then(host.abort.clone()))
        .await?;
    tracing::info!(cut_off = drained.cut_off, "stopped");
    Ok(())
}

/// Raises the soft descriptor limit to the hard one, and says when even that cannot hold
/// `max_connections` (two descriptors each), `others` (health probes, HTTP connections)
/// and a reserve for listeners, files and pipes.
fn raise_fd_limit(max_connections: usize, others: usize) {
    #[cfg(target_os = "linux")]
    match edgeproxy::adapters::net::raise_fd_limit() {
        Ok((soft, hard)) => {
            let needed = (max_connections as u64)
                .saturating_mul(2)
                .saturating_add(others as u64)
                .saturating_add(1024);
            if max_connections > 0 && soft < needed {
                tracing::warn!(
                    soft,
                    hard,
                    max_connections,
                    needed,
                    "the open-file limit cannot hold max_connections; raise LimitNOFILE (systemd) or ulimit -Hn, or lower max_connections"
                );
            } else {
                tracing::info!(soft, hard, "open-file limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (max_connections, others);
}
