//! Between the generated bindings and a [`Policy`]: keeps the table of the last
//! `set-table` and turns the per-call integers into borrowed [`Candidate`] views.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::bindings;
use crate::bindings::edgeproxy::policy::types::IpAddress;
use crate::{Backend, Candidate, Client, Context, Country, Policy, RegionId, Table};

thread_local! {
    // A component instance runs on one thread; this is its table.
    static TABLE: RefCell<Option<Table>> = const { RefCell::new(None) };
    // Candidate views, kept empty between calls so a decision does not allocate them.
    static VIEWS: RefCell<Vec<Candidate<'static>>> = const { RefCell::new(Vec::new()) };
}

pub fn set_table(t: bindings::RoutingTable) {
    let table = Table {
        version: t.version,
        pop_region: RegionId(t.pop_region),
        regions: t.regions,
        apps: t.apps,
        backends: t
            .backends
            .into_iter()
            .map(|b| Backend {
                id: b.id,
                app: b.app,
                region: RegionId(b.region),
                country: Country(b.country),
                weight: b.weight,
                soft_limit: b.soft_limit,
                hard_limit: b.hard_limit,
                healthy: b.healthy,
            })
            .collect(),
    };
    TABLE.with(|t| *t.borrow_mut() = Some(table));
}

fn client(c: bindings::Client) -> Client {
    // From the host since 0.3.0 (in the call's arguments it pushed them out of
    // registers), asked only where there is one: a call into the host costs as much.
    let mut hello = match c.tls {
        true => bindings::edgeproxy::policy::host::client_hello(),
        false => None,
    };
    Client {
        ip: match c.ip {
            IpAddress::Ipv4(v4) => IpAddr::V4(Ipv4Addr::from_bits(v4)),
            IpAddress::Ipv6((hi, lo)) => {
                IpAddr::V6(Ipv6Addr::from_bits(u128::from(hi) << 64 | u128::from(lo)))
            }
        },
        country: c.country.map(Country),
        region: c.region.map(RegionId),
        via_proxy_protocol: c.via_proxy_protocol,
        sni: hello.as_mut().and_then(|h| h.sni.take()),
        alpn: hello.map_or_else(Vec::new, |h| h.alpn),
    }
}

pub fn pick<P: Policy>(app: Option<u32>, c: bindings::Client, candidates: Vec<u32>) -> Option<u32> {
    let answer = decide(app, &candidates, |ctx, views| {
        P::pick(ctx, &client(c), views)
    })??;
    u32::try_from(answer).ok()
}

/// One ranking per client, over one set of candidate views.
pub fn rank<P: Policy>(
    app: Option<u32>,
    clients: Vec<bindings::Client>,
    candidates: Vec<u32>,
    count: u32,
) -> Vec<Vec<u32>> {
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    let asked = clients.len();
    let ranked = decide(app, &candidates, |ctx, views| {
        clients
            .into_iter()
            .map(|c| {
                P::rank(ctx, &client(c), views, count)
                    .into_iter()
                    .filter_map(|i| u32::try_from(i).ok())
                    .collect()
            })
            .collect()
    });
    // As a pick without a table refuses: every client refused.
    ranked.unwrap_or_else(|| vec![Vec::new(); asked])
}

/// Runs `f` over the candidates' views; None without a table or with a candidate the
/// table does not have.
fn decide<R>(
    app: Option<u32>,
    candidates: &[u32],
    f: impl FnOnce(&Context<'_>, &[Candidate<'_>]) -> R,
) -> Option<R> {
    TABLE.with(|t| {
        let guard = t.borrow();
        // The host always sends a table first; without one there is nothing to choose from.
        let table = guard.as_ref()?;
        VIEWS.with(|v| {
            // An empty Vec holds no borrows: collecting it in place only changes the
            // lifetime and keeps the allocation.
            let mut views: Vec<Candidate<'_>> =
                v.take().into_iter().map(|_| unreachable!()).collect();
            let mut valid = true;
            for c in candidates.chunks_exact(3) {
                match table.backends.get(c[0] as usize) {
                    Some(backend) => views.push(Candidate {
                        backend,
                        active: c[1],
                        rtt_us: c[2],
                    }),
                    None => valid = false,
                }
            }
            let app = app
                .and_then(|a| table.apps.get(a as usize))
                .map(String::as_str);
            let answer = valid.then(|| f(&Context { table, app }, &views));
            views.clear();
            v.replace(views.into_iter().map(|_| unreachable!()).collect());
            answer
        })
    })
}
