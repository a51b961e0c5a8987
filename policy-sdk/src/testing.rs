//! Helpers for a policy's native unit tests: backends, clients and a `pick` that builds
//! the candidate views as the host would. Regions are "sa", "us", "eu", "ap"; the POP
//! is in "us"; a client's region is edgeProxy's default region of its country.

use crate::{
    Backend, Candidate, Client, Context, Country, Policy, RegionId, Table, default_region_of,
};

const REGIONS: [&str; 4] = ["sa", "us", "eu", "ap"];

fn region(name: &str) -> RegionId {
    let i = REGIONS
        .iter()
        .position(|r| *r == name)
        .unwrap_or_else(|| panic!("test regions are {REGIONS:?}, not {name:?}"));
    RegionId(i as u32)
}

/// A healthy backend of app 0: weight 1, soft limit 10, no hard limit.
pub fn backend(id: &str, region_name: &str, country: &str) -> Backend {
    Backend {
        id: id.into(),
        app: 0,
        region: region(region_name),
        country: Country::new(country).expect("a two-letter country"),
        weight: 1,
        soft_limit: 10,
        hard_limit: 0,
        healthy: true,
    }
}

/// A client in `country` (None: GeoIP did not know it).
pub fn client(country: Option<&str>) -> Client {
    let country = country.map(|c| Country::new(c).expect("a two-letter country"));
    Client {
        ip: "203.0.113.7".parse().expect("valid IP"),
        country,
        region: country.map(|c| region(default_region_of(c))),
        via_proxy_protocol: false,
        sni: None,
        alpn: Vec::new(),
    }
}

/// `P`'s pick among `backends`, each with its (active connections, connect RTT in us).
pub fn pick_measured<P: Policy>(
    backends: &[&Backend],
    live: &[(u32, u32)],
    client: &Client,
) -> Option<usize> {
    assert_eq!(backends.len(), live.len(), "one (active, rtt) per backend");
    let table = Table {
        version: 1,
        pop_region: region("us"),
        regions: REGIONS.map(String::from).to_vec(),
        apps: vec!["web".into()],
        backends: backends.iter().map(|b| (*b).clone()).collect(),
    };
    let candidates: Vec<Candidate<'_>> = table
        .backends
        .iter()
        .zip(live)
        .map(|(backend, &(active, rtt_us))| Candidate {
            backend,
            active,
            rtt_us,
        })
        .collect();
    let ctx = Context {
        table: &table,
        app: Some("web"),
    };
    P::pick(&ctx, client, &candidates)
}

/// `P`'s pick among `backends` with `active` connections each and no RTT measured yet.
pub fn pick<P: Policy>(backends: &[&Backend], active: &[u32], client: &Client) -> Option<usize> {
    let live: Vec<(u32, u32)> = active.iter().map(|&a| (a, 0)).collect();
    pick_measured::<P>(backends, &live, client)
}
