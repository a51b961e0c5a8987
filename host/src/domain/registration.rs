//! What a self-registration may ask for: ids a URL can carry, bounded numbers, and a
//! destination the proxy may be sent to. A backend host holds the registration token, so
//! what it registers is checked as input from outside: it must not point the fleet at the
//! POP itself (a loop every POP would follow), at loopback or link-local services (cloud
//! metadata lives at 169.254.169.254), or anywhere the operator did not allow.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// Longest id, app or region a registration may use.
pub const MAX_NAME: usize = 128;
/// Largest weight, and soft or hard limit, a registration may ask for.
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_LIMIT: u32 = 1_000_000;

/// Why `id` cannot name a registered backend: it appears in URLs
/// (`/api/v1/heartbeat/{id}`), so only RFC 3986's unreserved characters.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("id must not be empty".into());
    }
    if id.len() > MAX_NAME {
        return Err(format!("id is {} bytes (at most {MAX_NAME})", id.len()));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~".contains(*c)))
    {
        Some(c) => Err(format!(
            "id {id:?} has {c:?}: ids are letters, digits, '-', '.', '_' and '~' (they are \
             part of the heartbeat URL)"
        )),
        None => Ok(()),
    }
}

/// Why `name` (an app or region) cannot be used: empty, too long or holding control
/// characters.
pub fn check_name(field: &str, name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "{field} is {} bytes (at most {MAX_NAME})",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{field} {name:?} holds control characters"));
    }
    Ok(())
}

/// The kind of address no backend should be at unless an operator says so.
pub fn special(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("a link-local address (cloud metadata services live there)")
        }
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        _ => None,
    }
}

/// Whether `addr` is one of the listeners `own`: the same address, or the port of one
/// bound to a wildcard address on an IP that is this host's (`local`).
pub fn is_own_listener(
    own: &[SocketAddr],
    addr: SocketAddr,
    mut local: impl FnMut(IpAddr) -> bool,
) -> bool {
    let ip = addr.ip().to_canonical();
    own.iter().any(|o| {
        o.port() == addr.port()
            && (o.ip().to_canonical() == ip || (o.ip().is_unspecified() && local(ip)))
    })
}

/// Where registered backends may be: the operator's networks and ports (empty: any),
/// never this POP's own listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    pub networks: Vec<IpNet>,
    pub ports: Vec<RangeInclusive<u16>>,
    /// This POP's listening addresses (proxy, admin, API, cluster).
    pub own: Vec<SocketAddr>,
}

impl Destinations {
    /// Why a backend may not be registered at `addr`. `local` says whether an IP is one of
    /// this host's (a listener bound to a wildcard address is reached at any of them).
    pub fn check(&self, addr: SocketAddr, local: impl Fn(IpAddr) -> bool) -> Result<(), String> {
        let ip = addr.ip().to_canonical();
        if is_own_listener(&self.own, addr, local) {
            return Err(format!(
                "{addr} is this POP's own listener: the proxy would connect to itself"
            ));
        }
        let listed = self.networks.iter().any(|n| n.contains(&ip));
        if !self.networks.is_empty() && !listed {
            return Err(format!(
                "{ip} is outside the networks backends may register in ({})",
                self.networks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        // An operator who lists such a network means it (a test fleet on loopback).
        if let Some(kind) = special(ip).filter(|_| !listed) {
            return Err(format!(
                "{ip} is {kind}; a backend there is refused unless api_allowed_networks lists it"
            ));
        }
        if !self.ports.is_empty() && !self.ports.iter().any(|r| r.contains(&addr.port())) {
            return Err(format!(
                "port {} is not one backends may register on ({})",
                addr.port(),
                self.ports
                    .iter()
                    .map(|r| match r.start() == r.end() {
                        true => r.start().to_string(),
                        false => format!("{}-{}", r.start(), r.end()),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(())
    }
}

/// `10.0.0.0/8, fd00::/8` (a bare address is a /32 or /128).
pub fn parse_networks(text: &str) -> Result<Vec<IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("{s:?} is not a network (like 10.0.0.0/8) or an address"))
        })
        .collect()
}

/// `80, 443, 8000-8999`.
pub fn parse_ports(text: &str) -> Result<Vec<RangeInclusive<u16>>, String> {
    let port = |s: &str| match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port (1 to 65535)")),
    };
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                match a <= b {
                    true => Ok(a..=b),
                    false => Err(format!("{s:?} is an empty range")),
                }
            }
            None => port(s).map(|p| p..=p),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_url_safe_and_bounded() {
        assert!(check_id("api-köln-1").unwrap_err().contains("'ö'"));
        assert!(check_id("api köln").is_err());
        assert!(check_id("a/b").is_err());
        assert!(check_id(&"x".repeat(129)).is_err());
        assert!(check_id("").is_err());
        check_id("web-1.fra_A~2").unwrap();
        assert!(check_name("app", "a\nb").is_err());
        assert!(check_name("region", " ").is_err());
    }

    #[test]
    fn destinations_refuse_loops_specials_and_what_the_operator_did_not_allow() {
        let none = |_: IpAddr| false;
        let open = Destinations {
            own: vec![
                "0.0.0.0:8080".parse().unwrap(),
                "10.0.0.5:9090".parse().unwrap(),
            ],
            ..Default::default()
        };
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        open.check(at("10.1.2.3:8080"), none).unwrap();
        // A wildcard listener is reached at any of this host's addresses.
        let err = open.check(at("10.1.2.3:8080"), |_| true).unwrap_err();
        assert!(err.contains("own listener"), "{err}");
        assert!(open.check(at("10.0.0.5:9090"), none).is_err());
        open.check(at("10.0.0.6:9090"), none).unwrap();
        for (addr, kind) in [
            ("127.0.0.1:80", "loopback"),
            ("[::1]:80", "loopback"),
            ("[::ffff:127.0.0.1]:80", "loopback"),
            ("169.254.169.254:80", "metadata"),
            ("0.0.0.0:80", "unspecified"),
            ("224.0.0.1:80", "multicast"),
            ("255.255.255.255:80", "broadcast"),
            ("[fe80::1]:80", "link-local"),
        ] {
            let err = open.check(at(addr), none).unwrap_err();
            assert!(err.contains(kind), "{addr}: {err}");
        }
        // An operator's list: only there, and a special network it lists is allowed.
        let listed = Destinations {
            networks: parse_networks("10.0.0.0/8, 127.0.0.0/8").unwrap(),
            ports: parse_ports("80, 8000-8999").unwrap(),
            own: vec![at("127.0.0.1:8080")],
        };
        listed.check(at("127.0.0.1:80"), none).unwrap();
        listed.check(at("10.9.9.9:8500"), none).unwrap();
        assert!(
            listed
                .check(at("192.168.1.1:80"), none)
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            listed
                .check(at("10.9.9.9:443"), none)
                .unwrap_err()
                .contains("8000-8999")
        );
        assert!(
            listed
                .check(at("127.0.0.1:8080"), none)
                .unwrap_err()
                .contains("own")
        );
        assert!(parse_networks("10.0.0.0/33").is_err());
        assert!(parse_ports("9-8").is_err());
        assert!(parse_ports("0").is_err());
        assert_eq!(
            parse_networks("10.1.2.3").unwrap()[0].to_string(),
            "10.1.2.3/32"
        );
    }
}
