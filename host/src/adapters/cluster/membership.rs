//! Membership and failure detection: foca (SWIM) carried in QUIC datagrams, so only peers
//! with the cluster's credentials take part.
//!
//! As in foca's own tokio agent, one task owns the `Foca` value and is fed by a channel;
//! after each call it drains the accumulating runtime: packets to send, timers (kept here
//! in deadline order and delivered in that order), and notifications, which become the
//! member list the rest of the cluster reads from a watch channel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, OwnedNotification, PeriodicParams, PostcardCodec, Timer};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::transport::Transport;
use crate::domain::replication::NodeId;

/// How a POP is known in SWIM: its id and name, where to reach it for SWIM (gossip) and
/// for rows (transport), and when this incarnation started (the newest wins a clash).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub node: NodeId,
    pub name: String,
    pub gossip: SocketAddr,
    pub transport: SocketAddr,
    pub bump: u64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.gossip)
    }
}

impl Identity {
    /// Stands for a bootstrap address before its owner has told us who it is.
    fn placeholder(gossip: SocketAddr) -> Self {
        Self {
            node: NodeId(0),
            name: String::new(),
            gossip,
            transport: gossip,
            bump: 0,
        }
    }
}

impl foca::Identity for Identity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// A member as the rest of the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: Identity,
    pub state: foca::State,
}

pub enum Input {
    Datagram(Bytes),
    /// Try to join through this gossip address (bootstrap or remembered peer).
    Announce(SocketAddr),
}

/// SWIM timing from the one knob edgeProxy has (`gossip_interval_ms`): probe every
/// interval, gossip twice as often, and look for members that were down every five
/// intervals, so a healed partition is noticed within seconds, not foca's minutes.
fn config(members: usize, interval: Duration) -> foca::Config {
    let size = NonZeroU32::new(members.max(1) as u32).expect("at least 1");
    let n = |v: usize| NonZeroUsize::new(v).expect("non-zero");
    foca::Config {
        probe_period: interval,
        probe_rtt: interval / 2,
        suspect_to_down_after: interval * 3,
        // QUIC datagrams must fit one packet of the smallest path MTU QUIC allows.
        max_packet_size: n(1100),
        periodic_gossip: Some(PeriodicParams {
            frequency: interval / 2,
            num_members: n(3),
        }),
        periodic_announce: Some(PeriodicParams {
            frequency: interval * 30,
            num_members: n(2),
        }),
        periodic_announce_to_down_members: Some(PeriodicParams {
            frequency: interval * 5,
            num_members: n(3),
        }),
        ..foca::Config::new_wan(size)
    }
}

pub struct Membership {
    pub inputs: mpsc::Sender<Input>,
    pub members: watch::Receiver<Vec<Member>>,
}

/// Starts the task that owns foca; it ends with `stop`.
pub fn start(
    me: Identity,
    interval: Duration,
    transport: Arc<dyn Transport>,
    stop: CancellationToken,
) -> Membership {
    let (tx, mut rx) = mpsc::channel::<Input>(1024);
    let (members_tx, members) = watch::channel(Vec::new());
    let rng: rand::rngs::StdRng = rand::make_rng();
    let mut foca = Foca::new(me, config(1, interval), rng, PostcardCodec);
    let inputs = tx.clone();
    tokio::spawn(async move {
        let mut runtime = AccumulatingRuntime::new();
        let mut timers: BTreeMap<(Instant, u64), Timer<Identity>> = BTreeMap::new();
        let mut seq = 0u64;
        loop {
            let next = timers.keys().next().map(|k| k.0);
            let result = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = foca.leave_cluster(&mut runtime);
                    drain_sends(&mut runtime, &*transport);
                    break;
                }
                input = rx.recv() => match input {
                    None => break,
                    Some(Input::Datagram(data)) => foca.handle_data(&data, &mut runtime),
                    Some(Input::Announce(addr)) => foca.announce(Identity::placeholder(addr), &mut runtime),
                },
                _ = sleep_until_opt(next) => {
                    let (_, timer) = timers.pop_first().expect("a timer was due");
                    foca.handle_timer(timer, &mut runtime)
                }
            };
            if let Err(e) = result {
                tracing::debug!("cluster: SWIM: {e}");
            }
            drain_sends(&mut runtime, &*transport);
            let now = Instant::now();
            while let Some((after, timer)) = runtime.to_schedule() {
                seq += 1;
                timers.insert((now + after, seq), timer);
            }
            let mut changed = false;
            while let Some(n) = runtime.to_notify() {
                match n {
                    OwnedNotification::MemberUp(id) => {
                        tracing::info!("cluster: {id:?} is up");
                        changed = true;
                    }
                    OwnedNotification::MemberDown(id) => {
                        tracing::warn!("cluster: {id:?} is down or left");
                        changed = true;
                    }
                    OwnedNotification::Rename(old, _) => {
                        tracing::info!("cluster: {old:?} came back as a new incarnation");
                        changed = true;
                    }
                    OwnedNotification::Idle => {
                        tracing::warn!("cluster: no other member reachable")
                    }
                    other => tracing::debug!("cluster: SWIM {other:?}"),
                }
            }
            if changed {
                let _ = foca.set_config(config(foca.num_members() + 1, interval));
            }
            let list: Vec<Member> = foca
                .iter_membership_state()
                .filter(|m| m.id().node != NodeId(0))
                .map(|m| Member {
                    id: m.id().clone(),
                    state: m.state(),
                })
                .collect();
            members_tx.send_if_modified(|old| {
                let differs = *old != list;
                if differs {
                    *old = list;
                }
                differs
            });
        }
    });
    Membership { inputs, members }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Hands foca's packets to the transport, which sends without waiting: a dial to a dead
/// peer takes seconds, and SWIM must go on meanwhile.
fn drain_sends(runtime: &mut AccumulatingRuntime<Identity>, transport: &dyn Transport) {
    while let Some((to, data)) = runtime.to_send() {
        transport.datagram(to.gossip, data);
    }
}
