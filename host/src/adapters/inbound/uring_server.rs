//! The io_uring data path's accept loops (`data_path = "io_uring"`): one thread per
//! worker, each with its own ring and current-thread runtime, accepting on its own
//! `SO_REUSEPORT` copy of every plain listener with one multishot accept each. A
//! connection then lives on the thread that accepted it, start to end: the same
//! admission (`tcp_server::admit`) and the same `ProxyService` as on the epoll path, with
//! the ring's operations as its data path.
//!
//! At `max_connections` the multishot accept is cancelled (new clients wait in the
//! kernel's backlog, as on the epoll path) and armed again when a slot frees; what it had
//! accepted already is served as slots come. At the drain it is cancelled and what it
//! accepted before the cancel is still served.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tcp_server::{self, Acceptor, Admitted};
use crate::adapters::net::uring::{self, Driver};
use crate::application::telemetry::ListenerStats;
use crate::config::ListenerConfig;

const ECANCELED: i32 = 125;

/// One listener copy a data-path thread accepts on.
pub struct Job {
    pub listener: std::net::TcpListener,
    pub config: ListenerConfig,
    pub stats: Arc<ListenerStats>,
}

/// Starts one data-path thread per entry of `threads`, accepting on its jobs; their
/// accept loops are tracked by `acceptors`. A thread ends once its loops stopped (at
/// `acceptor.shutdown`) and every connection is done, or at once when `gone` fires (the
/// host stopped).
pub fn start(
    threads: Vec<Vec<Job>>,
    acceptor: &Acceptor,
    acceptors: &TaskTracker,
    gone: &CancellationToken,
) -> io::Result<()> {
    for (i, jobs) in threads.into_iter().enumerate() {
        let (acceptor, gone) = (acceptor.clone(), gone.clone());
        // Counted before this returns: the host closes `acceptors` next and then waits.
        let loops = TaskTracker::new();
        let waited = loops.clone();
        let accepting = acceptors.track_future(async move { waited.wait().await });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(uring::before_park)
            .build()?;
        std::thread::Builder::new()
            .name(format!("edgeproxy-uring-{i}"))
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    serve_jobs(jobs, &acceptor, &loops);
                    loops.close();
                    let connections = acceptor.connections.clone();
                    // The host waits for the accept loops before it closes the connections'
                    // tracker; the thread waits for both.
                    let done = async move {
                        accepting.await;
                        connections.wait().await;
                    };
                    tokio::select! {
                        _ = done => {}
                        _ = gone.cancelled() => {}
                    }
                });
                // The connections' tasks are gone with the LocalSet: their operations are
                // cancelled, and the ring waits for the kernel to let go of them.
                drop(local);
                uring::finish_current();
            })?;
    }
    Ok(())
}

/// This thread's accept loops, on its ring, or on epoll where the ring cannot be set up.
fn serve_jobs(jobs: Vec<Job>, acceptor: &Acceptor, loops: &TaskTracker) {
    let driver = match Driver::start() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up this thread's io_uring ring; its listener copies run on epoll");
            for job in jobs {
                let Ok(listener) = tokio::net::TcpListener::from_std(job.listener) else {
                    continue;
                };
                let serve = tcp_server::serve(
                    listener,
                    job.config,
                    job.stats,
                    acceptor.clone(),
                    (None, None),
                );
                loops.spawn_local(serve);
            }
            return;
        }
    };
    for job in jobs {
        loops.spawn_local(accept_loop(driver.clone(), job, acceptor.clone()));
    }
}

async fn accept_loop(driver: Driver, job: Job, acceptor: Acceptor) {
    let Job {
        listener,
        config,
        stats,
    } = job;
    tcp_server::set_inherited_options(&listener, acceptor.service.settings.keepalive);
    let config = Arc::new(config);
    let app: Option<Arc<str>> = config.app.as_deref().map(Arc::from);
    let shutdown = &acceptor.shutdown;
    let mut accepts = None;
    loop {
        // At the cap the kernel stops accepting for us: new clients queue in the backlog
        // until a connection closes.
        if !stats.try_slot() {
            if let Some(op) = &accepts {
                uring::Op::cancel(op);
            }
            if !stats.slot(shutdown).await {
                break;
            }
        }
        let accepted = loop {
            let op = match &mut accepts {
                Some(op) => op,
                None => accepts.insert(driver.accept_many(listener.as_raw_fd())),
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => None,
                next = poll_fn(|cx| op.poll_accepted(cx)) => Some(next),
            };
            match next {
                None => break None,
                // Ended (cancelled at the cap, or after an error): armed again.
                Some(None) => accepts = None,
                Some(Some(Ok(fd))) => break Some(fd),
                Some(Some(Err(e))) if e.raw_os_error() == Some(ECANCELED) => {}
                Some(Some(Err(e))) => {
                    let pause = tcp_server::accept_pause(config.addr, &e);
                    tokio::select! {
                        _ = shutdown.cancelled() => break None,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        };
        let Some(fd) = accepted else {
            stats.unused_slot();
            break;
        };
        spawn(&driver, fd, &config, &app, &stats, &acceptor);
    }
    // Stopped: what the kernel accepted for us before the cancel is still served.
    if let Some(mut op) = accepts {
        op.cancel();
        while let Some(next) = poll_fn(|cx| op.poll_accepted(cx)).await {
            if let Ok(fd) = next {
                // Over the cap if need be: these clients were accepted already.
                stats.extra_slot();
                spawn(&driver, fd, &config, &app, &stats, &acceptor);
            }
        }
    }
}

fn spawn(
    driver: &Driver,
    fd: OwnedFd,
    config: &Arc<ListenerConfig>,
    app: &Option<Arc<str>>,
    stats: &Arc<ListenerStats>,
    acceptor: &Acceptor,
) {
    let open = stats.opened();
    let (driver, config, app, stats) = (driver.clone(), config.clone(), app.clone(), stats.clone());
    let (service, kill) = (acceptor.service.clone(), acceptor.kill.clone());
    let task = acceptor.connections.track_future(async move {
        let _open = open;
        tokio::select! {
            _ = connection(driver, fd, &config, app, &service, &stats) => {}
            _ = kill.cancelled() => {}
        }
    });
    tokio::task::spawn_local(task);
}

async fn connection(
    driver: Driver,
    fd: OwnedFd,
    config: &ListenerConfig,
    app: Option<Arc<str>>,
    service: &crate::application::proxy_service::ProxyService,
    stats: &ListenerStats,
) {
    // A multishot accept gives no address: one getpeername.
    let Some(peer) = peer_addr(&fd) else {
        driver.close(fd);
        return;
    };
    let mut client = uring::Downstream {
        client: uring::RingFd::new(&driver, fd),
        driver,
    };
    let Some(Admitted {
        mut inbound,
        source,
        destination,
        limit: _limit,
    }) = tcp_server::admit(&mut client, peer, config, app, service, stats).await
    else {
        return;
    };
    if let Some(version) = config.send_proxy_protocol {
        let fd = client.client.get();
        let header = tcp_server::proxy_header(version, fd, source, destination, None);
        inbound.set_proxy_header(header);
    }
    service.serve(client, inbound).await
}

fn peer_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    socket2::SockRef::from(fd).peer_addr().ok()?.as_socket()
}

impl super::proxy_protocol::ReadSome for uring::Downstream {
    async fn read_some(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let got = self.driver.recv(self.client.get().as_raw_fd()).await?;
        buf.extend_from_slice(got.bytes());
        Ok(got.len())
    }
}
