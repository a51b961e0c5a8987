//! What the internal DNS server answers (edgeProxy's `EDGEPROXY_DNS_*`), in the domain's
//! terms: addresses, SRV targets, or why there are none. The wire format, sockets and rate
//! limits are the adapter's (`adapters::inbound::dns_server`).
//!
//! `<app>` answers the decision a connection from the asking client would get: the live
//! policy's pick among the eligible backends (table health, this POP's checks and
//! ejections, hard limits), then its next picks as a connection would fail over, with no
//! binding read or made. Answers follow the routing snapshot, so a backend drained or
//! down is gone at the next lookup.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::domain::dns::{Name, Pop, Zone, front_pops};
use crate::domain::ports::{PickRequest, PopDirectory};
use crate::domain::{Client, RoutedBackend};

use super::client_limits::{ClientLimiter, ClientLimits, client_prefix};
use super::proxy_service::ProxyService;
use super::telemetry::Histogram;

/// The client prefixes DNS counts and orders by (BIND's RRL defaults): /24 and /56.
const PREFIX: (u8, u8) = (24, 56);

/// A limiter per client prefix ([`PREFIX`]), tracking at most `tracked` of them.
pub fn prefix_limiter(
    rate: Option<f64>,
    max_open: Option<u32>,
    tracked: usize,
) -> Arc<ClientLimiter> {
    ClientLimiter::new(ClientLimits {
        rate: rate.map(|r| (r, r)),
        max_open,
        v4_prefix: PREFIX.0,
        v6_prefix: PREFIX.1,
        exempt: Vec::new(),
        max_tracked: tracked,
    })
}

#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub zone: Zone,
    /// Of every answer and of the SOA's negative caching.
    pub ttl: u32,
    /// Backends an `<app>` answer gives after the pick.
    pub alternates: usize,
    /// POPs a front-name answer gives.
    pub front_answers: usize,
    /// `ns.<domain>`: where this POP's DNS listener is reached.
    pub name_server: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn has(self, ip: IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// The record types answered; anything else gets no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Addr(Family),
    Srv,
    Soa,
    Ns,
    /// ANY: answered as A (RFC 8482's minimal answer), never everything.
    Any,
    Other,
}

/// A question as [`Dns::answer_many`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    /// Lower case, no trailing dot.
    pub name: &'a str,
    pub wanted: Wanted,
    /// The EDNS Client Subnet address, else the query's source.
    pub client: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    /// 0 for the pick, then 1, 2... in the order a connection fails over.
    pub priority: u16,
    pub port: u16,
    /// `<id>.<app>.<domain>`, answered in the additional section too.
    pub target: String,
    pub addr: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Outside the domain: never resolved (not an open resolver).
    Refused,
    NxDomain,
    /// The name exists without records of that type.
    NoData,
    /// `per_client`: the answer depends on who asks (the ECS scope is then the source's).
    Addrs {
        addrs: Vec<IpAddr>,
        per_client: bool,
    },
    Srv(Vec<Srv>),
    Soa,
    Ns,
}

/// Queries by type and response code, for `/metrics` and `/status`.
pub const QTYPES: [&str; 7] = ["A", "AAAA", "SRV", "SOA", "NS", "ANY", "other"];
pub const RCODES: [&str; 7] = [
    "NOERROR", "NXDOMAIN", "REFUSED", "FORMERR", "NOTIMP", "BADVERS", "SERVFAIL",
];

#[derive(Debug)]
pub struct DnsStats {
    queries: [[AtomicU64; RCODES.len()]; QTYPES.len()],
    /// Responses over UDP that did not fit and were sent truncated (TC).
    pub truncated: AtomicU64,
    /// Over a client prefix's rate: dropped, or sent truncated so a real client retries
    /// over TCP (the slip).
    pub rate_dropped: AtomicU64,
    pub rate_slipped: AtomicU64,
    /// Packets that are no DNS query at all (no answer is sent).
    pub malformed: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub time: Histogram,
}

/// Lookups take from a microsecond to a WebAssembly policy's budget.
const DNS_BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 1e-3, 10e-3,
];

impl Default for DnsStats {
    fn default() -> Self {
        Self {
            queries: Default::default(),
            truncated: AtomicU64::new(0),
            rate_dropped: AtomicU64::new(0),
            rate_slipped: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            tcp_connections: AtomicU64::new(0),
            time: Histogram::new(DNS_BUCKETS),
        }
    }
}

impl DnsStats {
    /// `qtype` and `rcode` index [`QTYPES`] and [`RCODES`].
    pub fn query(&self, qtype: usize, rcode: usize, took: Duration) {
        if let Some(n) = self.queries.get(qtype).and_then(|r| r.get(rcode)) {
            n.fetch_add(1, Relaxed);
        }
        self.time.observe(took);
    }

    /// (type, rcode, count) for every count above zero.
    pub fn queries(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (t, row) in QTYPES.iter().zip(&self.queries) {
            for (r, n) in RCODES.iter().zip(row) {
                match n.load(Relaxed) {
                    0 => {}
                    n => out.push((*t, *r, n)),
                }
            }
        }
        out
    }

    pub fn total(&self) -> u64 {
        self.queries.iter().flatten().map(|n| n.load(Relaxed)).sum()
    }
}

pub struct Dns {
    proxy: Arc<ProxyService>,
    pops: Arc<dyn PopDirectory>,
    pub settings: DnsSettings,
    pub stats: DnsStats,
}

impl Dns {
    pub fn new(
        proxy: Arc<ProxyService>,
        pops: Arc<dyn PopDirectory>,
        settings: DnsSettings,
    ) -> Self {
        Self {
            proxy,
            pops,
            settings,
            stats: DnsStats::default(),
        }
    }

    pub fn zone(&self) -> &Zone {
        &self.settings.zone
    }

    /// The routing table's version (the SOA serial moves with it).
    pub fn routing_version(&self) -> u64 {
        self.proxy.routing.current().version()
    }

    /// The answers to `questions`, in their order: each as [`Dns::answer`] gives it, but
    /// the `<app>` address questions of one app and family are decided together, by one
    /// call of the policy (one read of a busy UDP socket takes in dozens of queries).
    pub fn answer_many(&self, questions: &[Question<'_>]) -> Vec<Answer> {
        let mut answers: Vec<Option<Answer>> = questions.iter().map(|_| None).collect();
        let mut apps: Vec<(&str, Family, Vec<usize>)> = Vec::new();
        for (i, q) in questions.iter().enumerate() {
            match (self.settings.zone.classify(q.name), q.wanted) {
                (Name::App(app), Wanted::Addr(family)) => {
                    match apps.iter_mut().find(|(a, f, _)| *a == app && *f == family) {
                        Some((.., asking)) => asking.push(i),
                        None => apps.push((app, family, vec![i])),
                    }
                }
                _ => answers[i] = Some(self.answer(q.name, q.wanted, q.client)),
            }
        }
        for (app, family, asking) in apps {
            let clients: Vec<IpAddr> = asking.iter().map(|&i| questions[i].client).collect();
            for (i, answer) in asking
                .into_iter()
                .zip(self.app(app, Some(family), &clients))
            {
                answers[i] = Some(answer);
            }
        }
        // (Every question was answered above.)
        answers
            .into_iter()
            .map(|a| a.unwrap_or(Answer::Refused))
            .collect()
    }

    /// The answer for `qname` (lower case, no trailing dot) asked by a client at `client`
    /// (its EDNS Client Subnet address, else the query's source).
    pub fn answer(&self, qname: &str, wanted: Wanted, client: IpAddr) -> Answer {
        let family = match wanted {
            Wanted::Addr(f) => Some(f),
            Wanted::Any => Some(Family::V4),
            _ => None,
        };
        match self.settings.zone.classify(qname) {
            Name::Outside => Answer::Refused,
            Name::Unknown => Answer::NxDomain,
            Name::Interior => Answer::NoData,
            Name::Apex => match wanted {
                Wanted::Soa | Wanted::Any => Answer::Soa,
                Wanted::Ns => Answer::Ns,
                _ => Answer::NoData,
            },
            Name::NameServer => addrs(&self.settings.name_server, family, false),
            Name::App(app) => self
                .app(app, family, &[client])
                .pop()
                .unwrap_or(Answer::NxDomain),
            Name::Service(app) => match wanted {
                Wanted::Srv => self.service(app, client),
                _ => match self.proxy.routing.current().app_named(app) {
                    Some(_) => Answer::NoData,
                    None => Answer::NxDomain,
                },
            },
            Name::Backend { app, id } => self.backend(app, id, family),
            Name::RegionBackends(region) => self.region_backends(region, family),
            Name::RegionPops(region) => {
                let pops = self.pops.pops();
                let there: Vec<&Pop> = pops.iter().filter(|p| p.region == region).collect();
                if there.is_empty() {
                    return Answer::NxDomain;
                }
                let ips: Vec<IpAddr> = there
                    .iter()
                    .filter(|p| p.alive)
                    .map(|p| p.overlay)
                    .collect();
                addrs(&ips, family, false)
            }
            Name::Front if matches!(wanted, Wanted::Soa) => Answer::Soa,
            Name::Front => {
                let Some(family) = family else {
                    return Answer::NoData;
                };
                // Only POPs reachable in the family asked count towards the answer's size.
                let pops: Vec<Pop> = self
                    .pops
                    .pops()
                    .iter()
                    .filter(|p| p.public.iter().any(|ip| family.has(*ip)))
                    .cloned()
                    .collect();
                let located = self.proxy.locate(client, false);
                let prefix = client_prefix(client, PREFIX.0, PREFIX.1);
                let front = front_pops(
                    &pops,
                    located.region.as_ref().map(|r| r.as_str()),
                    &prefix_bytes(prefix),
                    self.settings.front_answers,
                );
                let ips: Vec<IpAddr> = front
                    .iter()
                    .flat_map(|p| p.public.iter().copied())
                    .collect();
                addrs(&ips, Some(family), true)
            }
        }
    }

    /// The answers to `<app>` address questions from `clients`, decided together.
    fn app(&self, app: &str, family: Option<Family>, clients: &[IpAddr]) -> Vec<Answer> {
        let table = self.proxy.routing.current();
        let Some((app, candidates)) = table.app_named(app) else {
            return clients.iter().map(|_| Answer::NxDomain).collect();
        };
        let Some(family) = family else {
            return clients.iter().map(|_| Answer::NoData).collect();
        };
        let candidates = keeping(candidates, |c| family.has(c.backend.addr.ip()));
        let rankings = self.picks(&table, app, &candidates, clients);
        rankings
            .into_iter()
            .map(|picks| {
                // Two backends on one address (different ports) are one A record.
                let mut addrs: Vec<IpAddr> = Vec::with_capacity(picks.len());
                for ip in picks.iter().map(|&i| candidates[i].backend.addr.ip()) {
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
                Answer::Addrs {
                    addrs,
                    per_client: true,
                }
            })
            .collect()
    }

    /// For each client, the pick and its alternates.
    fn picks(
        &self,
        table: &crate::domain::RoutingTable,
        app: &str,
        candidates: &[RoutedBackend],
        clients: &[IpAddr],
    ) -> Vec<Vec<usize>> {
        let mut located: Vec<Client> = Vec::with_capacity(clients.len());
        for &ip in clients {
            // A resolver sends many queries from one address: located once a run of them.
            let client = match located.last() {
                Some(last) if last.ip == ip => last.clone(),
                _ => self.proxy.locate(ip, false),
            };
            located.push(client);
        }
        let requests: Vec<PickRequest<'_>> = located
            .iter()
            .map(|client| PickRequest {
                table,
                pop_region: &self.proxy.settings.pop_region,
                app: Some(app),
                client,
            })
            .collect();
        let rankings = self
            .proxy
            .ranked(&requests, candidates, 1 + self.settings.alternates);
        for &i in rankings.iter().flatten() {
            candidates[i].stats.dns_answers.fetch_add(1, Relaxed);
        }
        rankings
    }

    fn service(&self, app: &str, client: IpAddr) -> Answer {
        let table = self.proxy.routing.current();
        let Some((app, candidates)) = table.app_named(app) else {
            return Answer::NxDomain;
        };
        // A target must be a name this server answers: backends whose id is no DNS
        // label (a dot, a space) are left out of SRV answers.
        if !is_label(app) {
            return Answer::NoData;
        }
        let candidates = keeping(candidates, |c| is_label(c.backend.id.as_str()));
        let picks = self
            .picks(&table, app, &candidates, &[client])
            .pop()
            .unwrap_or_default();
        let apex = self.settings.zone.apex();
        Answer::Srv(
            picks
                .iter()
                .map(|&i| &candidates[i])
                .zip(0u16..)
                .map(|(b, priority)| Srv {
                    priority,
                    port: b.backend.addr.port(),
                    target: format!(
                        "{}.{}.{apex}",
                        b.backend.id.as_str().to_ascii_lowercase(),
                        app.to_ascii_lowercase()
                    ),
                    addr: b.backend.addr.ip(),
                })
                .collect(),
        )
    }

    fn backend(&self, app: &str, id: &str, family: Option<Family>) -> Answer {
        let table = self.proxy.routing.current();
        let Some((_, candidates)) = table.app_named(app) else {
            return Answer::NxDomain;
        };
        let Some(b) = candidates
            .iter()
            .find(|c| c.backend.id.as_str().eq_ignore_ascii_case(id))
        else {
            return Answer::NxDomain;
        };
        match b.is_eligible() {
            true => addrs(&[b.backend.addr.ip()], family, false),
            false => Answer::NoData,
        }
    }

    fn region_backends(&self, region: &str, family: Option<Family>) -> Answer {
        let table = self.proxy.routing.current();
        let there: Vec<&RoutedBackend> = table
            .backends()
            .iter()
            .filter(|b| b.backend.region.as_str().eq_ignore_ascii_case(region))
            .collect();
        if there.is_empty() {
            return Answer::NxDomain;
        }
        let mut ips: Vec<IpAddr> = there
            .iter()
            .filter(|b| b.is_eligible())
            .map(|b| b.backend.addr.ip())
            .collect();
        ips.sort();
        ips.dedup();
        addrs(&ips, family, false)
    }
}

/// `ips` of `family`; no family (another type asked of an address name): no data.
fn addrs(ips: &[IpAddr], family: Option<Family>, per_client: bool) -> Answer {
    let Some(family) = family else {
        return Answer::NoData;
    };
    let addrs: Vec<IpAddr> = ips.iter().copied().filter(|ip| family.has(*ip)).collect();
    Answer::Addrs { addrs, per_client }
}

/// The candidates `keep` accepts, copied only when it refuses some.
fn keeping(
    candidates: &[RoutedBackend],
    keep: impl Fn(&RoutedBackend) -> bool,
) -> std::borrow::Cow<'_, [RoutedBackend]> {
    match candidates.iter().all(&keep) {
        true => candidates.into(),
        false => candidates
            .iter()
            .filter(|c| keep(c))
            .cloned()
            .collect::<Vec<_>>()
            .into(),
    }
}

/// One DNS label as this server reads names: what `<id>.<app>.<domain>` can hold.
fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn prefix_bytes(net: ipnet::IpNet) -> Vec<u8> {
    match net.network() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// This POP alone, when it is in no fleet: `<region>.pops` and the front name give it.
pub struct LonePop(pub Arc<Vec<Pop>>);

impl PopDirectory for LonePop {
    fn pops(&self) -> Arc<Vec<Pop>> {
        Arc::clone(&self.0)
    }
}
