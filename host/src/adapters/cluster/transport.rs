//! What the cluster needs from a network, and an in-memory one for tests and simulations.
//!
//! Three ways to talk, all carrying encoded frames (`wire`): SWIM datagrams (best effort),
//! one-way messages (pushes), and calls (a request and its reply: sync rounds). QUIC
//! (`quic`) is the real one. `MemoryNetwork` delivers between nodes of one process and can
//! drop, delay and partition, so cluster behaviour is tested deterministically and 200
//! nodes are simulated on one machine with the real membership and merge code.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Outbound: how a node reaches its peers (by their gossip or transport address).
pub trait Transport: Send + Sync + 'static {
    fn datagram(&self, to: SocketAddr, data: Bytes);
    fn send(&self, to: SocketAddr, frame: Vec<u8>) -> BoxFuture<Result<(), String>>;
    /// `name` is the POP expected to answer: an answer from another is an error.
    fn call(
        &self,
        to: SocketAddr,
        name: &str,
        frame: Vec<u8>,
    ) -> BoxFuture<Result<Vec<u8>, String>>;
    /// Peers refused at authentication (the real transport's concern).
    fn refused(&self) -> u64 {
        0
    }
    /// Streams that failed or timed out and connections refused over a cap.
    fn stream_errors(&self) -> u64 {
        0
    }
    /// UDP bytes (in, out) on the wire, everything included, where the transport has a wire.
    fn wire_bytes(&self) -> Option<(u64, u64)> {
        None
    }
}

/// Inbound: what a node does with what arrives.
///
/// `peer` is the POP the sender proved to be (its certificate's name); None where the
/// transport proves nothing (plaintext mode).
pub trait Inbox: Send + Sync + 'static {
    /// A SWIM packet from `from` (the sender's gossip socket).
    fn datagram(&self, from: SocketAddr, data: Bytes, peer: Option<&str>);
    /// A frame from `from`; Some(reply) answers a call.
    fn frame(
        &self,
        from: SocketAddr,
        peer: Option<Arc<str>>,
        frame: Vec<u8>,
    ) -> BoxFuture<Option<Vec<u8>>>;
}

#[derive(Default)]
struct Faults {
    /// Pairs that cannot reach each other (both directions are listed).
    cut: HashSet<(SocketAddr, SocketAddr)>,
    /// Share of datagrams and frames lost, 0.0 to 1.0.
    loss: f64,
    delay: Duration,
}

/// Nodes of one process and the faults between them.
#[derive(Default)]
pub struct MemoryNetwork {
    nodes: Mutex<HashMap<SocketAddr, Weak<dyn Inbox>>>,
    faults: Mutex<Faults>,
    /// SWIM bytes delivered, for cost measurements (rows are counted by the nodes).
    pub datagram_bytes: std::sync::atomic::AtomicU64,
}

impl MemoryNetwork {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A node's transport; `addrs` are its gossip and transport addresses.
    /// `name` is what the node proves to be, as a certificate would.
    pub fn attach(
        self: &Arc<Self>,
        addrs: &[SocketAddr],
        name: &str,
        inbox: Weak<dyn Inbox>,
    ) -> Arc<MemoryTransport> {
        let mut nodes = self.nodes.lock().expect("network lock");
        for a in addrs {
            nodes.insert(*a, inbox.clone());
        }
        Arc::new(MemoryTransport {
            net: self.clone(),
            me: addrs[0],
            addrs: addrs.to_vec(),
            name: name.into(),
        })
    }

    /// Splits the nodes into groups that cannot reach each other (addresses of each node:
    /// both gossip and transport).
    pub fn partition(&self, groups: &[Vec<SocketAddr>]) {
        let mut f = self.faults.lock().expect("faults lock");
        f.cut.clear();
        for (i, g) in groups.iter().enumerate() {
            for other in groups.iter().skip(i + 1) {
                for a in g {
                    for b in other {
                        f.cut.insert((*a, *b));
                        f.cut.insert((*b, *a));
                    }
                }
            }
        }
    }

    pub fn heal(&self) {
        self.faults.lock().expect("faults lock").cut.clear();
    }

    pub fn set_loss(&self, loss: f64, delay: Duration) {
        let mut f = self.faults.lock().expect("faults lock");
        f.loss = loss;
        f.delay = delay;
    }

    /// The inbox at `to` if `from` may reach it now, after the configured delay; None for a
    /// lost message, a cut link or a node that is gone.
    async fn route(&self, from: &[SocketAddr], to: SocketAddr) -> Option<Arc<dyn Inbox>> {
        let (lost, delay) = {
            let f = self.faults.lock().expect("faults lock");
            let cut = from.iter().any(|a| f.cut.contains(&(*a, to)));
            (cut || (f.loss > 0.0 && fastrand::f64() < f.loss), f.delay)
        };
        if lost {
            return None;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.nodes.lock().expect("network lock").get(&to)?.upgrade()
    }
}

pub struct MemoryTransport {
    net: Arc<MemoryNetwork>,
    me: SocketAddr,
    addrs: Vec<SocketAddr>,
    name: Arc<str>,
}

impl MemoryTransport {
    /// Takes the node off the network (as a crash would).
    pub fn detach(&self) {
        let mut nodes = self.net.nodes.lock().expect("network lock");
        for a in &self.addrs {
            nodes.remove(a);
        }
    }
}

impl Transport for MemoryTransport {
    fn datagram(&self, to: SocketAddr, data: Bytes) {
        let (net, from, name) = (self.net.clone(), self.addrs.clone(), self.name.clone());
        tokio::spawn(async move {
            if let Some(inbox) = net.route(&from, to).await {
                net.datagram_bytes
                    .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                inbox.datagram(from[0], data, Some(&name));
            }
        });
    }

    fn send(&self, to: SocketAddr, frame: Vec<u8>) -> BoxFuture<Result<(), String>> {
        let (net, from, me, name) = (
            self.net.clone(),
            self.addrs.clone(),
            self.me,
            self.name.clone(),
        );
        Box::pin(async move {
            let inbox = net.route(&from, to).await.ok_or("unreachable")?;
            inbox.frame(me, Some(name), frame).await;
            Ok(())
        })
    }

    // Every node of a memory network is who it says: the expected name is not checked.
    fn call(
        &self,
        to: SocketAddr,
        _name: &str,
        frame: Vec<u8>,
    ) -> BoxFuture<Result<Vec<u8>, String>> {
        let (net, from, me, name) = (
            self.net.clone(),
            self.addrs.clone(),
            self.me,
            self.name.clone(),
        );
        Box::pin(async move {
            let inbox = net.route(&from, to).await.ok_or("unreachable")?;
            let reply = inbox.frame(me, Some(name), frame).await.ok_or("no reply")?;
            // The reply crosses the same faults on its way back.
            net.route(&[to], from[0]).await.ok_or("reply lost")?;
            Ok(reply)
        })
    }
}
