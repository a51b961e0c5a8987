//! The routing table and the client in their WIT form (`wit/policy.wit`): regions and
//! apps interned as indices, countries packed as two bytes. A table is converted once per
//! version of its rows and shared by every instance: this POP's own verdicts (checks,
//! ejections) are not in it but leave backends out of a decision's candidates, so a
//! backend going down here costs no instance a copy of the table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::bindings::edgeproxy::policy::types as wit;
use super::bindings::v1::edgeproxy::policy::types as v1;
use super::bindings::v2::edgeproxy::policy::types as v2;
use crate::domain::server_names::TlsHello;
use crate::domain::{Client, CountryCode, Region, RoutingTable};

/// The routing table in its WIT form, built once per version and shared by all instances.
pub struct WitTable {
    /// The table's rows version ([`RoutingTable::rows_version`]).
    pub version: u64,
    pub table: wit::RoutingTable,
    /// The same table for components of the 0.1.0 and 0.2.0 contracts, made when one
    /// asks.
    v1: std::sync::OnceLock<v1::RoutingTable>,
    v2: std::sync::OnceLock<v2::RoutingTable>,
    pub regions: Vec<Region>,
    /// `table.apps` by name: every decision looks its app up.
    app_ids: HashMap<Arc<str>, u32>,
}

/// `pop_region` first, then the client regions, then any other region a backend names.
pub fn build(table: &RoutingTable, pop_region: &Region, client_regions: &[Region]) -> WitTable {
    let mut regions: Vec<Region> = Vec::new();
    let intern = |r: &Region, regions: &mut Vec<Region>| match index_of(regions, r) {
        Some(i) => i,
        None => {
            regions.push(r.clone());
            (regions.len() - 1) as u32
        }
    };
    let pop = intern(pop_region, &mut regions);
    for r in client_regions {
        intern(r, &mut regions);
    }
    // Apps by name: a table can have as many apps as backends, and a linear search made
    // building it quadratic (seconds at 100,000 backends in 10,000 apps).
    let mut app_ids: HashMap<Arc<str>, u32> = HashMap::new();
    let mut apps: Vec<String> = Vec::new();
    let backends = table
        .backends()
        .iter()
        .map(|rb| {
            let b = &rb.backend;
            let app = match app_ids.get(&*b.app) {
                Some(&i) => i,
                None => {
                    apps.push(b.app.to_string());
                    let i = (apps.len() - 1) as u32;
                    app_ids.insert(Arc::clone(&b.app), i);
                    i
                }
            };
            wit::Backend {
                id: b.id.to_string(),
                app,
                region: intern(&b.region, &mut regions),
                country: country_code(b.country),
                weight: b.weight,
                soft_limit: b.soft_limit,
                hard_limit: b.hard_limit,
                healthy: b.healthy,
            }
        })
        .collect();
    WitTable {
        version: table.rows_version(),
        table: wit::RoutingTable {
            version: table.rows_version(),
            pop_region: pop,
            regions: regions.iter().map(|r| r.as_str().to_owned()).collect(),
            apps,
            backends,
        },
        regions,
        app_ids,
        v1: std::sync::OnceLock::new(),
        v2: std::sync::OnceLock::new(),
    }
}

fn index_of(regions: &[Region], r: &Region) -> Option<u32> {
    regions.iter().position(|x| x == r).map(|i| i as u32)
}

/// "BR" -> 0x4252, as the WIT contract packs countries.
pub fn country_code(c: CountryCode) -> u16 {
    u16::from_be_bytes(c.bytes())
}

impl WitTable {
    /// The client as the contract passes it.
    pub fn client(&self, client: &Client) -> wit::Client {
        wit::Client {
            ip: match client.ip {
                IpAddr::V4(v4) => wit::IpAddress::Ipv4(v4.to_bits()),
                IpAddr::V6(v6) => {
                    let bits = v6.to_bits();
                    wit::IpAddress::Ipv6(((bits >> 64) as u64, bits as u64))
                }
            },
            country: client.country.map(country_code),
            region: client
                .region
                .as_ref()
                .and_then(|r| index_of(&self.regions, r)),
            via_proxy_protocol: client.via_proxy_protocol,
            tls: client.tls.is_some(),
        }
    }

    /// The table as the 0.1.0 contract has it (the same records, other types).
    pub fn v1(&self) -> &v1::RoutingTable {
        self.v1.get_or_init(|| older_table!(&self.table, v1))
    }

    /// The table as the 0.2.0 contract has it (the same records, other types).
    pub fn v2(&self) -> &v2::RoutingTable {
        self.v2.get_or_init(|| older_table!(&self.table, v2))
    }

    /// The index of `app` in the table's app list.
    pub fn app(&self, app: Option<&str>) -> Option<u32> {
        self.app_ids.get(app?).copied()
    }
}

/// The TLS ClientHello as the contract passes it (0.3.0's `host.client-hello`, 0.2.0's
/// client fields).
pub fn tls_hello(hello: &TlsHello) -> wit::TlsHello {
    wit::TlsHello {
        sni: hello.sni.as_deref().map(str::to_owned),
        alpn: hello.policy_alpn().iter().map(|p| p.to_string()).collect(),
    }
}

/// A table in an older contract's types: the same records, generated anew per version.
macro_rules! older_table {
    ($t:expr, $m:ident) => {{
        let t: &wit::RoutingTable = $t;
        $m::RoutingTable {
            version: t.version,
            pop_region: t.pop_region,
            regions: t.regions.clone(),
            apps: t.apps.clone(),
            backends: t
                .backends
                .iter()
                .map(|b| $m::Backend {
                    id: b.id.clone(),
                    app: b.app,
                    region: b.region,
                    country: b.country,
                    weight: b.weight,
                    soft_limit: b.soft_limit,
                    hard_limit: b.hard_limit,
                    healthy: b.healthy,
                })
                .collect(),
        }
    }};
}
use older_table;
