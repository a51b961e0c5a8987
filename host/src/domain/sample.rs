//! A synthetic routing table: one healthy backend in each built-in region (`a-sa` in BR,
//! `b-eu` in DE, `c-us` in US, `d-ap` in JP), weight 1, soft limit 10, no hard limit. The
//! wasm policy's self-test, `policy check` and the unit tests decide on it, so they agree
//! on what an ordinary table looks like.

use std::sync::Arc;

use super::model::{Backend, BackendId, Client, Region};

const BACKENDS: [(&str, &str, &str); 4] = [
    ("a-sa", "sa", "BR"),
    ("b-eu", "eu", "DE"),
    ("c-us", "us", "US"),
    ("d-ap", "ap", "JP"),
];

/// One backend of `app` at 10.0.0.1, port `port`.
pub fn backend(app: &str, id: &str, region: &str, country: &str, port: u16) -> Backend {
    Backend {
        id: BackendId::new(id),
        app: Arc::from(app),
        region: Region::new(region),
        country: country.parse().expect("a valid sample country"),
        addr: std::net::SocketAddr::from(([10, 0, 0, 1], port)),
        healthy: true,
        weight: 1,
        soft_limit: 10,
        hard_limit: 0,
    }
}

/// The four backends, sorted by id (as a routing table holds them).
pub fn backends(app: &str) -> Vec<Backend> {
    (1..)
        .zip(BACKENDS)
        .map(|(port, (id, region, country))| backend(app, id, region, country, port))
        .collect()
}

pub fn client(ip: &str, country: Option<&str>, region: Option<&str>) -> Client {
    Client {
        ip: ip.parse().expect("a valid sample IP"),
        country: country.map(|c| c.parse().expect("a valid sample country")),
        region: region.map(Region::new),
        via_proxy_protocol: false,
        tls: None,
    }
}

/// A client in Brazil (region sa).
pub fn client_in_brazil() -> Client {
    client("200.147.3.157", Some("BR"), Some("sa"))
}
