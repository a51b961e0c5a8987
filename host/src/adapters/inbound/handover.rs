//! Restarts and upgrades that refuse no connection, as HAProxy's `expose-fd listeners` and
//! nginx's binary upgrade do it: a new process takes this one's listening sockets over a
//! Unix socket (SCM_RIGHTS). The sockets themselves, with the kernel's accept queues and
//! the clients waiting in them, carry over; the old process stops accepting only once the
//! new one accepts, then drains as on SIGTERM.
//!
//! The conversation, one `SOCK_SEQPACKET` message each (boundaries kept, in order):
//! - successor `sockets`; old: manifests (JSON), each with up to 253 descriptors attached
//!   in order (SCM_MAX_FD), then `end`;
//! - successor `cluster` (when it replicates); old stops replicating, so one process at a
//!   time writes the replica and holds the cluster port; old: `released`;
//! - successor `bindings`; old: its sticky bindings, in messages of at most 64 KiB, then
//!   `end` (bindings made in the moments until it stops accepting are not carried);
//! - successor `ready` once it accepts; old: `bye`, stops accepting and drains; until it
//!   has drained it reports its connections per backend every 200 ms (`held` messages, a
//!   snapshot ending with `held-end`), which the successor counts as its own against hard
//!   limits and in the load the policy sees.
//!
//! A successor that exits or closes early (bad settings, a policy that does not load)
//! leaves the old process serving.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context as _, bail};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::model::BackendId;
use crate::domain::ports::{BindingEntry, BindingKey, BindingRepository};

/// What a socket serves; with its configured address it names the socket across versions.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Listener,
    Admin,
    Api,
    Metrics,
    DnsTcp,
    DnsUdp,
    /// A role a later version hands over: not taken, closed at `ready`.
    #[serde(other)]
    Other,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    version: u32,
    sockets: Vec<Slot>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Slot {
    role: Role,
    /// As configured (`0.0.0.0:8080`, or a port 0 a test bound), not as bound.
    configured: SocketAddr,
}

const VERSION: u32 = 1;
/// SCM_MAX_FD: the most descriptors one message carries.
const MAX_FDS: usize = 253;
/// A manifest of 253 sockets is under 16 KiB.
const MAX_MESSAGE: usize = 64 * 1024;
/// The old process answers at once, or after its replication stopped (a few seconds);
/// either side writing to a peer that stopped reading gives up as late.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// A successor compiles its policy between `sockets` and `ready`; one silent for longer is
/// given up on, so a later one can take over.
const SUCCESSOR_TIMEOUT: Duration = Duration::from_secs(600);

/// The sockets this process hands over: duplicates of those it serves.
#[derive(Default)]
pub struct Shared {
    slots: Vec<(Slot, OwnedFd)>,
}

impl Shared {
    pub fn add(&mut self, role: Role, configured: SocketAddr, socket: impl AsFd) {
        match socket.as_fd().try_clone_to_owned() {
            Ok(fd) => self.slots.push((Slot { role, configured }, fd)),
            // Out of descriptors at start: the successor binds this one itself.
            Err(e) => {
                tracing::warn!(?role, %configured, error = %e, "cannot keep a socket for the handover")
            }
        }
    }
}

/// The handover socket a successor connects to: bound at a temporary name, and put at
/// the configured path by [`Self::publish`] once this process serves (until then the
/// path still leads to the process it takes over from).
pub struct Endpoint {
    listener: OwnedFd,
    temporary: PathBuf,
    path: PathBuf,
}

impl Endpoint {
    /// Whoever connects may take every listening socket: the socket is this user's only
    /// (0600), and belongs in a directory only this user can write (systemd's
    /// `RuntimeDirectory`).
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        let temporary = path.with_extension(format!("{}.new", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let listener = seqpacket(SocketFlags::NONBLOCK)?;
        // Created 0600: no moment in which another user may connect.
        let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = rustix::net::bind(&listener, &SocketAddrUnix::new(temporary.as_path())?);
        rustix::process::umask(umask);
        bound.with_context(|| format!("binding the handover socket {}", temporary.display()))?;
        let endpoint = Self {
            listener,
            temporary,
            path: path.to_owned(),
        };
        rustix::net::listen(&endpoint.listener, 4)?;
        Ok(endpoint)
    }

    /// Makes this process the one the next successor finds (an atomic rename).
    pub fn publish(&self) -> std::io::Result<()> {
        std::fs::rename(&self.temporary, &self.path)
    }
}

impl Drop for Endpoint {
    /// A process that never published (it failed to start) leaves no file behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.temporary);
    }
}

/// What this process hands a successor.
pub struct Handing {
    pub sockets: Shared,
    /// Stops this process's replication for a successor that starts its own, and returns
    /// the sockets it hands over for it.
    pub release: Box<dyn Fn() -> Vec<OwnedFd> + Send + Sync>,
    pub bindings: Option<Arc<dyn BindingRepository>>,
    /// This process's connections by backend id.
    pub held: Held,
    /// Fires once this process has drained.
    pub drained: CancellationToken,
}

pub type Held = Arc<dyn Fn() -> Vec<(String, u32)> + Send + Sync>;

/// How often a draining process tells its successor what it still holds.
const HELD_EVERY: Duration = Duration::from_millis(200);

/// Serves successors until one takes over (then `handed_over` fires) or `stop` does.
pub async fn serve(
    endpoint: Endpoint,
    handing: Handing,
    handed_over: CancellationToken,
    stop: CancellationToken,
) {
    let handing = Arc::new(handing);
    // Tokio's listener only accepts here (the syscall does not care for the socket type);
    // the conversations are blocking, on SOCK_SEQPACKET connections.
    let listener = endpoint
        .listener
        .try_clone()
        .map(std::os::unix::net::UnixListener::from)
        .and_then(tokio::net::UnixListener::from_std);
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the handover socket");
            return;
        }
    };
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r.and_then(|(c, _)| c.into_std()),
        };
        let conn = match conn.and_then(|c| c.set_nonblocking(false).map(|()| c)) {
            Ok(c) => Arc::new(OwnedFd::from(c)),
            Err(e) => {
                tracing::warn!(error = %e, "handover socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (handing, talking) = (Arc::clone(&handing), Arc::clone(&conn));
        let conversing = Arc::clone(&handing);
        let mut conversation = tokio::task::spawn_blocking(move || converse(&talking, &conversing));
        let outcome = tokio::select! {
            r = &mut conversation => r,
            _ = stop.cancelled() => {
                // Stopping: the conversation's blocked read ends, and with it the copies
                // of the sockets (nothing may keep them listening while this one drains).
                let _ = rustix::net::shutdown(&*conn, rustix::net::Shutdown::Both);
                let _ = conversation.await;
                return;
            }
        };
        match outcome {
            Ok(Ok(pid)) => {
                tracing::info!(
                    successor = pid,
                    "handed the listening sockets over; stopping accepting and draining"
                );
                handed_over.cancel();
                // Detached: it ends when the drain does or the successor goes away. It
                // keeps no copy of the sockets (handing's go with this task).
                let (held, drained) = (Arc::clone(&handing.held), handing.drained.clone());
                std::thread::spawn(move || report_held(&conn, &held, &drained));
                return;
            }
            Ok(Err(e)) => tracing::warn!("handover: {e:#}; still serving"),
            Err(e) => tracing::error!(error = %e, "handover: the conversation failed"),
        }
    }
}

/// Tells the successor what this process holds per backend until it has drained (then an
/// empty snapshot, and the connection closes).
fn report_held(conn: &OwnedFd, held: &Held, drained: &CancellationToken) {
    loop {
        let drained = drained.is_cancelled();
        let held = if drained { Vec::new() } else { held() };
        // In messages under the size a read takes (ids have no length limit).
        let mut chunk = String::new();
        let mut sent = Ok(());
        for pair in &held {
            let item = serde_json::to_string(pair).unwrap_or_default();
            if chunk.len() + item.len() + 1 > MAX_MESSAGE - 16 {
                sent = sent.and_then(|()| held_message(conn, &std::mem::take(&mut chunk)));
            }
            chunk.push_str(&item);
            chunk.push('\n');
        }
        sent = sent
            .and_then(|()| held_message(conn, &chunk))
            .and_then(|()| send(conn, "held-end", &[]));
        if drained || sent.is_err() {
            return;
        }
        std::thread::sleep(HELD_EVERY);
    }
}

/// One `(id, count)` JSON pair per line.
fn held_message(conn: &OwnedFd, lines: &str) -> anyhow::Result<()> {
    match lines.is_empty() {
        true => Ok(()),
        false => send(conn, &format!("held\n{lines}"), &[]),
    }
}

/// One successor, to its `ready` (its pid) or an error.
fn converse(conn: &OwnedFd, handing: &Handing) -> anyhow::Result<u32> {
    let shared = &handing.sockets;
    let pid = same_user(conn).context("refused a new process")?;
    sockopt::set_socket_timeout(conn, sockopt::Timeout::Recv, Some(SUCCESSOR_TIMEOUT))?;
    sockopt::set_socket_timeout(conn, sockopt::Timeout::Send, Some(ANSWER_TIMEOUT))?;
    let mut released = false;
    let result = (|| loop {
        match receive(conn, &mut Vec::new())?.as_deref() {
            None => {
                bail!("the new process (pid {pid}) ended the handover before accepting")
            }
            Some("sockets") => {
                for chunk in shared.slots.chunks(MAX_FDS) {
                    let manifest = Manifest {
                        version: VERSION,
                        sockets: chunk.iter().map(|(s, _)| *s).collect(),
                    };
                    let fds: Vec<_> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
                    send(conn, &serde_json::to_string(&manifest)?, &fds)?;
                }
                send(conn, "end", &[])?;
                tracing::info!(
                    successor = pid,
                    sockets = shared.slots.len(),
                    "a new process is taking over"
                );
            }
            Some("cluster") => {
                tracing::info!(successor = pid, "stopping replication for the new process");
                let sockets = (handing.release)();
                released = true;
                let fds: Vec<_> = sockets.iter().map(|fd| fd.as_fd()).collect();
                send(conn, "released", &fds)?;
            }
            Some("bindings") => {
                let held = handing.bindings.as_ref();
                let all = held.map(|b| b.export(Instant::now())).unwrap_or_default();
                let mut chunk = String::new();
                for entry in &all {
                    let wire = (
                        entry.key.client,
                        entry.key.app.as_deref(),
                        entry.backend.as_str(),
                        entry.expires_in.as_millis() as u64,
                    );
                    let item = serde_json::to_string(&wire)?;
                    if chunk.len() + item.len() + 1 > MAX_MESSAGE - 16 {
                        send(conn, &format!("bindings\n{chunk}"), &[])?;
                        chunk.clear();
                    }
                    chunk.push_str(&item);
                    chunk.push('\n');
                }
                if !chunk.is_empty() {
                    send(conn, &format!("bindings\n{chunk}"), &[])?;
                }
                send(conn, "end", &[])?;
                tracing::info!(
                    successor = pid,
                    bindings = all.len(),
                    "handed the bindings over"
                );
            }
            Some("ready") => {
                // Before this process may exit: systemd must follow the new main process
                // first, or it takes the service for stopped and stops the new one too.
                notify_systemd(&format!("MAINPID={pid}\n"));
                send(conn, "bye", &[])?;
                return Ok(pid);
            }
            // A later version asking for more than this one hands over.
            Some(other) => {
                tracing::info!(successor = pid, request = other, "handover: not known here");
                send(conn, "unknown", &[])?;
            }
        }
    })();
    if released && result.is_err() {
        tracing::error!(
            successor = pid,
            "replication was stopped for a new process that did not take over: this process \
             serves on with the table as it was; restart it"
        );
    }
    result
}

/// What the process taken over from handed over, for the successor to take by role and
/// configured address.
pub struct Inherited {
    conn: OwnedFd,
    slots: Vec<(Slot, Option<OwnedFd>)>,
}

impl Inherited {
    /// Asks the process serving at `path` for its sockets; `None` when none does (a first
    /// start, or a socket file left by a process gone).
    pub fn connect(path: &Path) -> anyhow::Result<Option<Self>> {
        let conn = seqpacket(SocketFlags::empty())?;
        // Bounds the connect too (a listener whose queue is full).
        sockopt::set_socket_timeout(&conn, sockopt::Timeout::Send, Some(ANSWER_TIMEOUT))?;
        match rustix::net::connect(&conn, &SocketAddrUnix::new(path)?) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => return Ok(None),
            Err(e) => {
                return Err(std::io::Error::from(e)).with_context(|| {
                    format!("connecting to the handover socket {}", path.display())
                });
            }
        }
        same_user(&conn).with_context(|| {
            format!("the process serving the handover socket {}", path.display())
        })?;
        sockopt::set_socket_timeout(&conn, sockopt::Timeout::Recv, Some(ANSWER_TIMEOUT))?;
        send(&conn, "sockets", &[])?;
        let mut slots = Vec::new();
        loop {
            let mut fds = Vec::new();
            let message = receive(&conn, &mut fds)?
                .context("the running process closed the handover socket")?;
            if message == "end" {
                break;
            }
            let manifest: Manifest =
                serde_json::from_str(&message).context("the running process's socket list")?;
            if manifest.version != VERSION || manifest.sockets.len() != fds.len() {
                bail!(
                    "the running process speaks handover version {} with {} of {} sockets; this one speaks {VERSION}",
                    manifest.version,
                    fds.len(),
                    manifest.sockets.len()
                );
            }
            slots.extend(manifest.sockets.into_iter().zip(fds.into_iter().map(Some)));
        }
        Ok(Some(Self { conn, slots }))
    }

    /// The stream sockets handed over for `role` at `configured`.
    pub fn tcp(&mut self, role: Role, configured: SocketAddr) -> Vec<std::net::TcpListener> {
        self.take(role, configured, SocketType::STREAM)
            .filter(|fd| sockopt::socket_acceptconn(fd).unwrap_or(false))
            .map(std::net::TcpListener::from)
            .collect()
    }

    pub fn udp(&mut self, role: Role, configured: SocketAddr) -> Vec<std::net::UdpSocket> {
        self.take(role, configured, SocketType::DGRAM)
            .map(std::net::UdpSocket::from)
            .collect()
    }

    fn take(
        &mut self,
        role: Role,
        configured: SocketAddr,
        kind: SocketType,
    ) -> impl Iterator<Item = OwnedFd> + '_ {
        self.slots
            .iter_mut()
            .filter(move |(s, _)| s.role == role && s.configured == configured)
            .filter_map(|(_, fd)| fd.take())
            .filter(move |fd| sockopt::socket_type(fd).is_ok_and(|t| t == kind))
    }

    /// Stops the old process's replication; its replica and its gossip and transport
    /// sockets (none when it ran no cluster) are ours next.
    pub fn release_cluster(&self) -> anyhow::Result<Option<[std::net::UdpSocket; 2]>> {
        send(&self.conn, "cluster", &[])?;
        let mut fds = Vec::new();
        match receive(&self.conn, &mut fds)?.as_deref() {
            Some("released") => {}
            other => bail!("the running process did not stop replicating: {other:?}"),
        }
        let udp = fds
            .into_iter()
            .filter(|fd| sockopt::socket_type(fd).is_ok_and(|t| t == SocketType::DGRAM))
            .map(std::net::UdpSocket::from);
        Ok(<[_; 2]>::try_from(udp.collect::<Vec<_>>()).ok())
    }

    /// Takes the old process's sticky bindings into `into`; returns how many.
    pub fn bindings(&self, into: &dyn BindingRepository) -> anyhow::Result<usize> {
        send(&self.conn, "bindings", &[])?;
        let now = Instant::now();
        let mut n = 0;
        loop {
            let message = receive(&self.conn, &mut Vec::new())?
                .context("the old process closed the handover socket")?;
            match message.as_str() {
                "end" => return Ok(n),
                "unknown" => bail!("the old process's version hands no bindings over"),
                _ => {}
            }
            let lines = message
                .strip_prefix("bindings\n")
                .with_context(|| format!("the old process sent {message:.40?}"))?;
            for line in lines.lines() {
                let (client, app, backend, ms): (std::net::IpAddr, Option<&str>, &str, u64) =
                    serde_json::from_str(line).context("a binding from the old process")?;
                into.restore(
                    BindingEntry {
                        key: BindingKey {
                            client,
                            app: app.map(Arc::from),
                        },
                        backend: BackendId::new(backend),
                        expires_in: Duration::from_millis(ms),
                    },
                    now,
                );
                n += 1;
            }
        }
    }

    /// Tells the old process this one accepts, so it stops. Sockets not taken (their
    /// listener is gone from the settings) close here. Then, until the old process has
    /// drained, `on_held` gets what it still holds per backend (an empty list at its end),
    /// and then `gone` is cancelled.
    pub fn ready(
        self,
        mut on_held: impl FnMut(Vec<(String, u32)>) + Send + 'static,
        gone: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<()> {
        let Self { conn, slots } = self;
        for (slot, fd) in slots {
            if fd.is_some() {
                tracing::info!(role = ?slot.role, addr = %slot.configured, "no longer configured; closed");
            }
        }
        send(&conn, "ready", &[])?;
        match receive(&conn, &mut Vec::new())?.as_deref() {
            Some("bye") => {}
            other => bail!("the old process did not confirm: {other:?}"),
        }
        std::thread::spawn(move || {
            let mut snapshot = Vec::new();
            // Ends when the old process closes (drained, or gone) or goes silent.
            while let Ok(Some(message)) = receive(&conn, &mut Vec::new()) {
                if message == "held-end" {
                    on_held(std::mem::take(&mut snapshot));
                } else if let Some(lines) = message.strip_prefix("held\n") {
                    for line in lines.lines() {
                        match serde_json::from_str::<(String, u32)>(line) {
                            Ok(pair) => snapshot.push(pair),
                            Err(e) => {
                                tracing::warn!(error = %e, "handover: a count from the old process")
                            }
                        }
                    }
                }
            }
            on_held(Vec::new());
            gone.cancel();
        });
        Ok(())
    }
}

/// The peer's pid, when it runs as this user or root (each side checks the other).
fn same_user(conn: &OwnedFd) -> anyhow::Result<u32> {
    let peer = sockopt::socket_peercred(conn)?;
    let pid = peer.pid.as_raw_nonzero().get() as u32;
    if peer.uid != rustix::process::geteuid() && !peer.uid.is_root() {
        bail!("pid {pid} runs as another user (uid {})", peer.uid.as_raw());
    }
    Ok(pid)
}

fn seqpacket(flags: SocketFlags) -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | flags,
        None,
    )?)
}

fn send(conn: &OwnedFd, text: &str, fds: &[std::os::fd::BorrowedFd<'_>]) -> anyhow::Result<()> {
    if fds.len() > MAX_FDS {
        bail!(
            "{} sockets to hand over; one message carries {MAX_FDS}",
            fds.len()
        );
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    rustix::net::sendmsg(
        conn,
        &[IoSlice::new(text.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .context("writing to the handover socket")?;
    Ok(())
}

/// The next message (`None` at the end), its descriptors appended to `fds`.
fn receive(conn: &OwnedFd, fds: &mut Vec<OwnedFd>) -> anyhow::Result<Option<String>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .context("reading the handover socket")?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.bytes == 0 {
        return Ok(None);
    }
    let text = std::str::from_utf8(&buf[..got.bytes.min(buf.len())])
        .context("a handover message that is not text")?;
    Ok(Some(text.to_owned()))
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) this process is ready and is now
/// the service's main process, so a successor started by `systemctl reload` (SIGHUP)
/// becomes the service when the old one exits. Nothing outside systemd.
pub fn notify_ready() {
    notify_systemd(&format!("MAINPID={}\nREADY=1\n", std::process::id()));
}

fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        use std::os::linux::net::SocketAddrExt as _;
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
        };
        socket.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot tell systemd this process is ready (NOTIFY_SOCKET)");
    }
}

/// On each SIGHUP, starts the program this process was started as (`argv[0]`, found as
/// the shell found it: after an upgrade in place, the new version) with the same arguments
/// and environment, to take over (`enabled`: a handover socket is set; else SIGHUP is
/// only logged). Its output is this process's; one that fails to start says why there and
/// this one serves on.
pub fn successor_on_sighup(enabled: bool) {
    let program = std::env::args_os().next().unwrap_or_default();
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            if hup.recv().await.is_none() {
                return;
            }
            if !enabled {
                tracing::warn!(
                    "SIGHUP: nothing done; set handover_socket to restart or upgrade without \
                     refusing a connection"
                );
                continue;
            }
            let child = std::process::Command::new(&program)
                .args(std::env::args_os().skip(1))
                .stdin(std::process::Stdio::null())
                .spawn();
            match child {
                Ok(mut child) => {
                    tracing::info!(pid = child.id(), program = ?program, "SIGHUP: started a new process to take over");
                    // Reaped if it exits first; a detached thread, since the runtime waits
                    // for its own blocking tasks before this process may exit.
                    std::thread::spawn(move || match child.wait() {
                        Ok(s) if !s.success() => {
                            tracing::warn!(status = %s, "the new process exited; still serving");
                        }
                        _ => {}
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, program = ?program, "SIGHUP: cannot start a new process");
                }
            }
        }
    });
}
