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
    Client {
        ip: match c.ip {
            IpAddress::Ipv4((a, b, c, d)) => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
                IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
            }
        },
        country: c.country.map(Country),
        region: c.region.map(RegionId),
        via_proxy_protocol: c.via_proxy_protocol,
    }
}

pub fn pick<P: Policy>(
    app: Option<u32>,
    c: bindings::Client,
    candidates: Vec<bindings::Candidate>,
) -> Option<u32> {
    let client = client(c);
    TABLE.with(|t| {
        let guard = t.borrow();
        // The host always sends a table first; without one there is nothing to choose from.
        let table = guard.as_ref()?;
        let views = candidates
            .iter()
            .map(|c| {
                Some(Candidate {
                    backend: table.backends.get(c.backend as usize)?,
                    active: c.active,
                    rtt_us: c.rtt_us,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let app = app
            .and_then(|a| table.apps.get(a as usize))
            .map(String::as_str);
        let answer = P::pick(&Context { table, app }, &client, &views)?;
        u32::try_from(answer).ok()
    })
}
