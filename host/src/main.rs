//! The composition root: build the host from the configuration, bind the listeners and
//! run until SIGTERM/SIGINT. The command line and the operator commands are
//! `adapters::cli::commands`.

use std::process::ExitCode;

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;

use edgeproxy::Host;
use edgeproxy::adapters::cli::commands::{self, Cli};
#[cfg(target_os = "linux")]
use edgeproxy::adapters::inbound::handover::{self, Inherited, Role, Shared};
use edgeproxy::adapters::inbound::{dns_server, tcp_server};
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
    let mut binder = Binder::default();
    #[cfg(target_os = "linux")]
    let endpoint = match &config.settings.handover_socket {
        Some(path) => {
            let endpoint = handover::Endpoint::bind(path)?;
            binder.inherited = handover::Inherited::connect(path)?;
            if binder.inherited.is_some() {
                tracing::info!(socket = %path.display(), "taking over from the process serving now");
            }
            Some(endpoint)
        }
        None => None,
    };
    // Always handled: SIGHUP's default would end the process.
    #[cfg(target_os = "linux")]
    handover::successor_on_sighup(config.settings.handover_socket.is_some());
    // One accept loop per worker thread, each on its own SO_REUSEPORT socket.
    let copies = match config.settings.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut listeners = Vec::new();
    for lc in &config.listeners {
        let bound = binder
            .tcp(Role::Listener, lc.addr, copies)
            .with_context(|| format!("binding listener {}", lc.addr))?;
        listeners.extend(bound.into_iter().map(|l| (l, lc.clone())));
    }
    let admin = match &config.admin {
        Some(a) => Some(binder.tcp_one(Role::Admin, a.addr).with_context(|| {
            format!(
                "binding the admin listener {} (admin_addr; set it empty to turn the admin API off)",
                a.addr
            )
        })?),
        None => None,
    };
    let api = match &config.api {
        Some(a) => {
            if let Some(wanted) = a.narrowed_from {
                tracing::warn!(%wanted, serving = %a.addr, "the registration API has no token (api_token / EDGEPROXY_API_TOKEN), so it is served on loopback only");
            }
            Some(binder.tcp_one(Role::Api, a.addr).with_context(|| {
                format!("binding the registration API {} (api_listen_addr)", a.addr)
            })?)
        }
        None => None,
    };
    let dns = match &config.dns {
        Some(d) => Some(
            binder
                .dns(d.addr, copies)
                .with_context(|| format!("binding the DNS server {} (dns_listen_addr)", d.addr))?,
        ),
        None => None,
    };
    let metrics = match config.metrics.as_ref().and_then(|m| Some((m.listen?, m))) {
        Some((addr, m)) => {
            if let Some(wanted) = m.narrowed_from {
                tracing::warn!(%wanted, serving = %addr, "the metrics listener has no admin_token (EDGEPROXY_ADMIN_TOKEN) nor admin_allow_remote, so it is served on loopback only");
            }
            Some(binder.tcp_one(Role::Metrics, addr).with_context(|| {
                format!("binding the metrics listener {addr} (metrics_listen_addr)")
            })?)
        }
        None => None,
    };
    // Every socket is bound (or taken) before the host is built: the start-up checks that
    // can fail come before the process taken over from stops replicating.
    #[cfg(target_os = "linux")]
    let from = binder
        .inherited
        .as_ref()
        .map(|i| i as &dyn edgeproxy::TakeOver);
    #[cfg(not(target_os = "linux"))]
    let from = None;
    let host = Host::build_taking_over(&config, from).await?;
    let sockets = edgeproxy::Sockets {
        listeners,
        admin,
        api,
        dns,
        metrics,
        #[cfg(target_os = "linux")]
        handover: endpoint.map(|endpoint| edgeproxy::Handover {
            endpoint,
            shared: binder.shared,
            inherited: binder.inherited,
        }),
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

/// Binds the sockets the settings ask for, or takes those a process being taken over
/// handed over, and keeps a copy of each for a later successor.
#[derive(Default)]
struct Binder {
    #[cfg(target_os = "linux")]
    inherited: Option<Inherited>,
    #[cfg(target_os = "linux")]
    shared: Shared,
}

#[cfg(not(target_os = "linux"))]
#[derive(Clone, Copy)]
enum Role {
    Listener,
    Admin,
    Api,
    Metrics,
}

impl Binder {
    /// The stream sockets for `role` at `addr`: handed over, or `copies` bound here.
    fn tcp(
        &mut self,
        role: Role,
        addr: SocketAddr,
        copies: usize,
    ) -> std::io::Result<Vec<TcpListener>> {
        #[cfg(target_os = "linux")]
        {
            let taken = self.inherited.as_mut().map(|i| i.tcp(role, addr));
            let bound = match taken.filter(|t| !t.is_empty()) {
                Some(taken) => {
                    // More workers than the old process had copies: more copies beside
                    // them, where they share the port (SO_REUSEPORT).
                    let more = copies.saturating_sub(taken.len());
                    let at = taken[0].local_addr()?;
                    let shared = rustix::net::sockopt::socket_reuseport(&taken[0])?;
                    let mut all: Vec<TcpListener> =
                        taken.into_iter().map(to_tokio).collect::<Result<_, _>>()?;
                    if more > 0 && shared {
                        all.extend(tcp_server::bind_shared(at, more)?);
                    }
                    all
                }
                None => tcp_server::bind(addr, copies)?,
            };
            for l in &bound {
                self.shared.add(role, addr, l);
            }
            Ok(bound)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = role;
            tcp_server::bind(addr, copies)
        }
    }

    fn tcp_one(&mut self, role: Role, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let mut bound = self.tcp(role, addr, 1)?;
        match bound.len() {
            1 => Ok(bound.remove(0)),
            n => Err(std::io::Error::other(format!(
                "{n} sockets handed over where one serves"
            ))),
        }
    }

    fn dns(&mut self, addr: SocketAddr, copies: usize) -> std::io::Result<dns_server::DnsSockets> {
        #[cfg(target_os = "linux")]
        {
            let taken = self
                .inherited
                .as_mut()
                .map(|i| (i.tcp(Role::DnsTcp, addr), i.udp(Role::DnsUdp, addr)));
            let sockets = match taken {
                Some((mut tcp, udp)) if tcp.len() == 1 && !udp.is_empty() => {
                    dns_server::DnsSockets {
                        tcp: to_tokio(tcp.remove(0))?,
                        udp,
                    }
                }
                _ => dns_server::bind(addr, copies)?,
            };
            self.shared.add(Role::DnsTcp, addr, &sockets.tcp);
            for u in &sockets.udp {
                self.shared.add(Role::DnsUdp, addr, u);
            }
            Ok(sockets)
        }
        #[cfg(not(target_os = "linux"))]
        dns_server::bind(addr, copies)
    }
}

#[cfg(target_os = "linux")]
fn to_tokio(l: std::net::TcpListener) -> std::io::Result<TcpListener> {
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}
