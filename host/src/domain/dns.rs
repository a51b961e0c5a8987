//! The names the internal DNS server answers, and which POPs the fleet's front name gives
//! a client. Names are compared in lower case without the trailing dot.
//!
//! Under the domain (`internal` by default):
//! - `<app>`: the policy's pick for the asking client, then its next picks;
//! - `<id>.<app>`: one backend (the targets of the SRV records);
//! - `_<app>._tcp`: SRV records, since backends differ in port;
//! - `<region>.backends`, `<region>.pops`: every eligible backend, every live POP there;
//! - `ns`: this POP's name server address; the apex holds the SOA and NS records.
//!
//! `backends`, `pops` and `ns` are reserved: an app with one of those names is not
//! answered by name (its backends still are, by region and SRV).

use std::net::IpAddr;

/// What a query name is, before the routing table says whether it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name<'a> {
    Apex,
    NameServer,
    App(&'a str),
    Backend {
        app: &'a str,
        id: &'a str,
    },
    Service(&'a str),
    RegionBackends(&'a str),
    RegionPops(&'a str),
    /// The fleet's public name.
    Front,
    /// A name with names below it and no records of its own (`backends.<domain>`).
    Interior,
    /// Under the domain, but no name of this shape exists.
    Unknown,
    /// Not ours: refused, never resolved.
    Outside,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    apex: String,
    front: Option<String>,
}

/// A DNS name as compared here, or why it is not one.
pub fn normalise(name: &str) -> Result<String, String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{name:?} is not a DNS name (1 to 253 characters)"));
    }
    for label in name.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!(
                "{name:?} is not a DNS name: label {label:?} (1 to 63 letters, digits, '-' or '_')"
            ));
        }
    }
    Ok(name)
}

impl Zone {
    pub fn new(apex: &str, front: Option<&str>) -> Result<Self, String> {
        Ok(Self {
            apex: normalise(apex)?,
            front: front.map(normalise).transpose()?,
        })
    }

    pub fn apex(&self) -> &str {
        &self.apex
    }

    pub fn front(&self) -> Option<&str> {
        self.front.as_deref()
    }

    /// `qname` in lower case without the trailing dot.
    pub fn classify<'a>(&self, qname: &'a str) -> Name<'a> {
        if self.front.as_deref() == Some(qname) {
            return Name::Front;
        }
        if qname == self.apex {
            return Name::Apex;
        }
        let Some(below) = qname
            .strip_suffix(self.apex.as_str())
            .and_then(|q| q.strip_suffix('.'))
        else {
            return Name::Outside;
        };
        let mut labels = below.rsplit('.');
        match (labels.next(), labels.next(), labels.next()) {
            (Some("ns"), None, _) => Name::NameServer,
            (Some("backends" | "pops" | "_tcp"), None, _) => Name::Interior,
            (Some("backends"), Some(region), None) => Name::RegionBackends(region),
            (Some("pops"), Some(region), None) => Name::RegionPops(region),
            (Some("_tcp"), Some(service), None) => match service.strip_prefix('_') {
                Some(app) if !app.is_empty() => Name::Service(app),
                _ => Name::Unknown,
            },
            (Some(app), None, _) if !app.starts_with('_') => Name::App(app),
            (Some(app), Some(id), None) if !app.starts_with('_') => Name::Backend { app, id },
            _ => Name::Unknown,
        }
    }
}

/// A POP as the front name and `<region>.pops` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pop {
    pub name: String,
    pub region: String,
    /// Where services in the overlay reach it (its cluster address).
    pub overlay: IpAddr,
    /// Where clients reach it under the front name; empty: not a front.
    pub public: Vec<IpAddr>,
    /// SWIM sees it alive (this POP always is).
    pub alive: bool,
    pub draining: bool,
}

/// The POPs the front name gives a client: alive, not draining, in the client's region
/// first, then ordered by rendezvous hash of the client's prefix and the POP's name, so
/// every POP gives the same client the same answer and clients spread over the fleet.
pub fn front_pops<'a>(
    pops: &'a [Pop],
    client_region: Option<&str>,
    client_prefix: &[u8],
    n: usize,
) -> Vec<&'a Pop> {
    let mut up: Vec<&Pop> = pops
        .iter()
        .filter(|p| p.alive && !p.draining && !p.public.is_empty())
        .collect();
    up.sort_by_cached_key(|p| {
        let far = client_region != Some(p.region.as_str());
        let mut key = client_prefix.to_vec();
        key.extend_from_slice(p.name.as_bytes());
        (far, super::replication::fnv1a(&key), p.name.clone())
    });
    up.truncate(n);
    up
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classify_under_the_apex_only() {
        let z = Zone::new("Internal.", Some("edge.example.com")).unwrap();
        assert_eq!(z.classify("internal"), Name::Apex);
        assert_eq!(z.classify("ns.internal"), Name::NameServer);
        assert_eq!(z.classify("api.internal"), Name::App("api"));
        assert_eq!(
            z.classify("b-1.api.internal"),
            Name::Backend {
                app: "api",
                id: "b-1"
            }
        );
        assert_eq!(z.classify("_api._tcp.internal"), Name::Service("api"));
        assert_eq!(
            z.classify("eu.backends.internal"),
            Name::RegionBackends("eu")
        );
        assert_eq!(z.classify("eu.pops.internal"), Name::RegionPops("eu"));
        assert_eq!(z.classify("pops.internal"), Name::Interior);
        assert_eq!(z.classify("_tcp.internal"), Name::Interior);
        assert_eq!(z.classify("a.eu.pops.internal"), Name::Unknown);
        assert_eq!(z.classify("a.b.api.internal"), Name::Unknown);
        assert_eq!(z.classify("__tcp.internal"), Name::Unknown);
        assert_eq!(z.classify("edge.example.com"), Name::Front);
        assert_eq!(z.classify("example.com"), Name::Outside);
        assert_eq!(z.classify("notinternal"), Name::Outside);
        assert_eq!(z.classify("xinternal"), Name::Outside);
    }

    #[test]
    fn bad_names_are_refused_with_the_label() {
        assert!(Zone::new("", None).is_err());
        let e = Zone::new("a..b", None).unwrap_err();
        assert!(e.contains("label \"\""), "{e}");
        assert!(
            Zone::new("ex ample", None)
                .unwrap_err()
                .contains("ex ample")
        );
        assert!(Zone::new(&"a".repeat(64), None).is_err());
    }

    fn pop(name: &str, region: &str, alive: bool, draining: bool) -> Pop {
        Pop {
            name: name.into(),
            region: region.into(),
            overlay: "10.0.0.1".parse().unwrap(),
            public: vec!["203.0.113.1".parse().unwrap()],
            alive,
            draining,
        }
    }

    #[test]
    fn the_front_gives_live_pops_of_the_clients_region_first_the_same_everywhere() {
        let pops = vec![
            pop("eu-1", "eu", true, false),
            pop("eu-2", "eu", true, true),
            pop("sa-1", "sa", true, false),
            pop("sa-2", "sa", false, false),
            pop("us-1", "us", true, false),
        ];
        let names = |v: Vec<&Pop>| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(front_pops(&pops, Some("sa"), &[10, 1, 2], 1)),
            ["sa-1"]
        );
        let two = names(front_pops(&pops, Some("eu"), &[10, 1, 2], 2));
        assert_eq!(two[0], "eu-1");
        assert_ne!(two[1], "eu-2", "draining");
        // Another POP's list in another order answers the same.
        let mut shuffled = pops.clone();
        shuffled.reverse();
        assert_eq!(
            names(front_pops(&pops, None, &[192, 0, 2], 3)),
            names(front_pops(&shuffled, None, &[192, 0, 2], 3))
        );
        // Clients of no POP's region spread over the fleet.
        let firsts: std::collections::HashSet<String> = (0..64u8)
            .map(|i| names(front_pops(&pops, None, &[198, 51, i], 1))[0].clone())
            .collect();
        assert_eq!(firsts.len(), 3, "{firsts:?}");
    }
}
