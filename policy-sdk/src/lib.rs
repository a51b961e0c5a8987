//! The SDK for edgeproxy policies: a policy is one function over the client and the
//! candidate backends, each already carrying its routing-table row and live state.
//!
//! ```ignore
//! use policy_sdk::{Candidate, Client, Context, Policy};
//!
//! struct LeastConnections;
//!
//! impl Policy for LeastConnections {
//!     fn pick(_ctx: &Context, _client: &Client, candidates: &[Candidate]) -> Option<usize> {
//!         candidates
//!             .iter()
//!             .enumerate()
//!             .filter(|(_, c)| c.is_eligible())
//!             .min_by_key(|(_, c)| c.active)
//!             .map(|(i, _)| i)
//!     }
//! }
//!
//! policy_sdk::export_policy!(LeastConnections);
//! ```
//!
//! The WIT contract (`wit/policy.wit`) sends the routing table once per version and only
//! integers per decision; this crate keeps the table between calls and hands the policy
//! borrowed views of it.

use std::fmt;
use std::net::IpAddr;

#[doc(hidden)]
pub mod glue;
pub mod testing;

/// What `wit-bindgen` generates from `wit/policy.wit`; used by [`export_policy!`].
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated: the flattened canonical ABI signatures
pub mod bindings {
    wit_bindgen::generate!({
        world: "ranking-policy",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_policy_world",
        default_bindings_module: "::policy_sdk::bindings",
    });
}

/// An ISO 3166-1 alpha-2 country code ("BR"), packed as the WIT contract carries it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country(pub u16);

impl Country {
    /// `Country::new("br")`; None unless two ASCII letters.
    pub fn new(code: &str) -> Option<Self> {
        match code.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => Some(Self(
                u16::from(a.to_ascii_uppercase()) << 8 | u16::from(b.to_ascii_uppercase()),
            )),
            _ => None,
        }
    }

    pub fn letters(self) -> [u8; 2] {
        self.0.to_be_bytes()
    }
}

impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b] = self.letters();
        write!(f, "{}{}", char::from(a), char::from(b))
    }
}

/// A region, as an index into [`Table::regions`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionId(pub u32);

/// One routing-table row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub id: String,
    /// Index into [`Table::apps`].
    pub app: u32,
    pub region: RegionId,
    pub country: Country,
    /// As configured; see [`Candidate::load`] for how 0 is read.
    pub weight: u32,
    pub soft_limit: u32,
    /// 0 = unlimited.
    pub hard_limit: u32,
    pub healthy: bool,
}

/// The routing table the host last sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub version: u64,
    pub pop_region: RegionId,
    pub regions: Vec<String>,
    pub apps: Vec<String>,
    pub backends: Vec<Backend>,
}

impl Table {
    pub fn region_name(&self, id: RegionId) -> Option<&str> {
        self.regions.get(id.0 as usize).map(String::as_str)
    }

    pub fn region_id(&self, name: &str) -> Option<RegionId> {
        self.regions
            .iter()
            .position(|r| r == name)
            .map(|i| RegionId(i as u32))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    pub country: Option<Country>,
    pub region: Option<RegionId>,
    pub via_proxy_protocol: bool,
    /// On listeners that read TLS: the server name the client asked for (lower case, no
    /// trailing dot).
    pub sni: Option<String>,
    /// On listeners that read TLS: the protocols (ALPN) the client offered, in its order;
    /// where the POP terminated the TLS, only the one agreed.
    pub alpn: Vec<String>,
}

/// A client nothing is known of, at 0.0.0.0: for tests, `Client { country, ..Default::default() }`.
impl Default for Client {
    fn default() -> Self {
        Client {
            ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            country: None,
            region: None,
            via_proxy_protocol: false,
            sni: None,
            alpn: Vec::new(),
        }
    }
}

/// A backend that may take this connection, with its live state.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub backend: &'a Backend,
    /// Connections open to it through this proxy now.
    pub active: u32,
    /// Smoothed connect RTT in microseconds; 0 until measured.
    pub rtt_us: u32,
}

impl Candidate<'_> {
    /// Healthy and under its hard limit: the only backends the host accepts as an answer.
    pub fn is_eligible(&self) -> bool {
        let b = self.backend;
        b.healthy && (b.hard_limit == 0 || self.active < b.hard_limit)
    }

    /// `(active / soft_limit) / weight`, with 0 read as 1 for both limits.
    pub fn load(&self) -> f64 {
        f64::from(self.active)
            / f64::from(self.backend.soft_limit.max(1))
            / f64::from(self.backend.weight.max(1))
    }
}

/// The decision's surroundings.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub table: &'a Table,
    /// The listener's app; None when it serves every app.
    pub app: Option<&'a str>,
}

/// The eligible candidate with the lowest key, skipping those whose key is None; of
/// equal keys the first wins (candidates come sorted by id, so decisions reproduce).
/// The loop most policies are.
pub fn lowest<K: PartialOrd>(
    candidates: &[Candidate<'_>],
    key: impl Fn(&Candidate<'_>) -> Option<K>,
) -> Option<usize> {
    let mut best: Option<(usize, K)> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.is_eligible() {
            continue;
        }
        let Some(k) = key(c) else { continue };
        if best.as_ref().is_none_or(|(_, b)| k < *b) {
            best = Some((i, k));
        }
    }
    best.map(|(i, _)| i)
}

/// The [`Policy::rank`] of a policy that picks by [`lowest`] with the same `key`: up to
/// `count` eligible candidates, lowest key first (equal keys in candidate order), which
/// is what `lowest` would pick with each earlier pick left out. Each key is computed once.
pub fn lowest_ranked<K: PartialOrd>(
    candidates: &[Candidate<'_>],
    count: usize,
    key: impl Fn(&Candidate<'_>) -> Option<K>,
) -> Vec<usize> {
    let mut keys: Vec<Option<K>> = candidates
        .iter()
        .map(|c| c.is_eligible().then(|| key(c)).flatten())
        .collect();
    let mut ranked = Vec::with_capacity(count.min(candidates.len()));
    while ranked.len() < count {
        let mut best: Option<(usize, &K)> = None;
        for (i, k) in keys.iter().enumerate() {
            let Some(k) = k else { continue };
            if best.is_none_or(|(_, b)| k < b) {
                best = Some((i, k));
            }
        }
        let Some((i, _)) = best else { break };
        ranked.push(i);
        keys[i] = None; // left out of the next picks
    }
    ranked
}

/// 0: the client's country; 1: the client's region; 2: the POP's region; 3: elsewhere.
pub fn geo_score(backend: &Backend, client: &Client, pop_region: RegionId) -> u32 {
    if client.country == Some(backend.country) {
        0
    } else if client.region == Some(backend.region) {
        1
    } else if backend.region == pop_region {
        2
    } else {
        3
    }
}

/// The default policy's score, lowest best: `geo_score * 100 + load`, so geography
/// decides and load breaks ties within it.
pub fn geo_load_score(c: &Candidate<'_>, client: &Client, pop_region: RegionId) -> f64 {
    f64::from(geo_score(c.backend, client, pop_region)) * 100.0 + c.load()
}

/// edgeProxy's default region of a country ("sa", "us", "eu", "ap"; "us" when unlisted).
/// The client's region from the host already reflects the POP's own configuration.
pub fn default_region_of(country: Country) -> &'static str {
    const SA: &[&[u8; 2]] = &[
        b"BR", b"AR", b"CL", b"PE", b"CO", b"UY", b"PY", b"BO", b"EC", b"VE",
    ];
    const EU: &[&[u8; 2]] = &[
        b"PT", b"ES", b"FR", b"DE", b"NL", b"IT", b"GB", b"IE", b"BE", b"CH", b"AT", b"PL", b"CZ",
        b"SE", b"NO", b"DK", b"FI", b"RU", b"UA",
    ];
    const AP: &[&[u8; 2]] = &[
        b"JP", b"KR", b"TW", b"HK", b"SG", b"MY", b"TH", b"VN", b"ID", b"PH", b"AU", b"NZ", b"CN",
        b"IN",
    ];
    let l = country.letters();
    if SA.contains(&&l) {
        "sa"
    } else if EU.contains(&&l) {
        "eu"
    } else if AP.contains(&&l) {
        "ap"
    } else {
        "us"
    }
}

/// A backend-selection policy. Implement it on a unit struct and export it with
/// [`export_policy!`].
pub trait Policy {
    /// Index into `candidates` of the backend for this client, or None to refuse it.
    /// Answering with an ineligible candidate (see [`Candidate::is_eligible`]) is a fault.
    fn pick(ctx: &Context<'_>, client: &Client, candidates: &[Candidate<'_>]) -> Option<usize>;

    /// Up to `count` candidates' indices, best first, in the order a connection fails
    /// over through them: what a DNS answer gives (the pick and its alternates). The
    /// host asks for a batch of DNS clients in one call and this runs for each. The
    /// default picks again with each pick left out; a policy that sorts its candidates
    /// anyway can answer at once.
    fn rank(
        ctx: &Context<'_>,
        client: &Client,
        candidates: &[Candidate<'_>],
        count: usize,
    ) -> Vec<usize> {
        rank_by_picks::<Self>(ctx, client, candidates, count)
    }
}

/// [`Policy::rank`] by asking `P::pick` again with each pick left out, as a connection
/// failing over would: for a `rank` that answers some apps itself and leaves the rest.
pub fn rank_by_picks<P: Policy + ?Sized>(
    ctx: &Context<'_>,
    client: &Client,
    candidates: &[Candidate<'_>],
    count: usize,
) -> Vec<usize> {
    let mut left: Vec<usize> = (0..candidates.len()).collect();
    let mut rest = candidates.to_vec();
    let mut ranked = Vec::new();
    while ranked.len() < count
        && let Some(i) = P::pick(ctx, client, &rest)
    {
        if i >= rest.len() {
            // Out of range, as `pick` answered: the host sees the fault it would have.
            ranked.push(candidates.len());
            break;
        }
        ranked.push(left.remove(i));
        rest.remove(i);
    }
    ranked
}

/// Writes to the host's log (debug level, under the policy's name).
pub fn log(message: &str) {
    bindings::edgeproxy::policy::host::log(message);
}

/// 64 random bits from the host.
pub fn random_u64() -> u64 {
    bindings::edgeproxy::policy::host::random()
}

/// Exports `$policy` (a type implementing [`Policy`]) as the component's `pick-backend`
/// and `rank-backends` (the `ranking-policy` world).
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        struct __EdgeproxyPolicyExport;

        impl $crate::bindings::Guest for __EdgeproxyPolicyExport {
            fn set_table(table: $crate::bindings::RoutingTable) {
                $crate::glue::set_table(table)
            }
            fn pick_backend(
                app: ::std::option::Option<u32>,
                client: $crate::bindings::Client,
                candidates: ::std::vec::Vec<u32>,
            ) -> ::std::option::Option<u32> {
                $crate::glue::pick::<$policy>(app, client, candidates)
            }
            fn rank_backends(
                app: ::std::option::Option<u32>,
                clients: ::std::vec::Vec<$crate::bindings::Client>,
                candidates: ::std::vec::Vec<u32>,
                count: u32,
            ) -> ::std::vec::Vec<::std::vec::Vec<u32>> {
                $crate::glue::rank::<$policy>(app, clients, candidates, count)
            }
        }

        $crate::bindings::__export_policy_world!(__EdgeproxyPolicyExport with_types_in $crate::bindings);
    };
}
