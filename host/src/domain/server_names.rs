//! TLS server names (SNI) to routes, as nginx's `map $ssl_preread_server_name` or
//! Envoy's `server_names`: exact names first, then `*.` wildcards, the longest suffix
//! winning (`*.example.com` matches `a.example.com` and `a.b.example.com`). Names compare
//! case-insensitively, a trailing dot ignored.

use std::collections::HashMap;
use std::sync::Arc;

/// What a TLS client said in its ClientHello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsHello {
    /// The server name it asked for (normalised: lower case, no trailing dot).
    pub sni: Option<Arc<str>>,
    /// The application protocols it offered, in its order.
    pub alpn: Vec<Arc<str>>,
    /// The one agreed, where the TLS handshake was ours (termination).
    pub negotiated: Option<Arc<str>>,
}

impl TlsHello {
    /// The protocols a policy is told: the one agreed where the TLS was ours, else the
    /// ones offered.
    pub fn policy_alpn(&self) -> &[Arc<str>] {
        match &self.negotiated {
            Some(agreed) => std::slice::from_ref(agreed),
            None => &self.alpn,
        }
    }
}

/// Where the connections for a name go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRoute {
    pub app: Arc<str>,
    /// End TLS here (with this POP's certificate for the name) rather than pass it on.
    pub terminate: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ServerNames {
    exact: HashMap<Box<str>, NameRoute>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<Box<str>, NameRoute>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("server name {0:?} is not a DNS name (letters, digits, '-' and '.'; labels of 1-63)")]
    Invalid(String),
    #[error(
        "server name {0:?}: a wildcard is allowed only as the whole first label (`*.example.com`)"
    )]
    Wildcard(String),
    #[error("server name {0:?} is listed twice (names compare case-insensitively)")]
    Duplicate(String),
}

impl ServerNames {
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    pub fn insert(&mut self, name: &str, route: NameRoute) -> Result<(), NameError> {
        let normal = normalise(name);
        let (map, host) = match normal.strip_prefix("*.") {
            Some(rest) => (&mut self.wildcard, rest),
            None => (&mut self.exact, normal.as_str()),
        };
        if host.contains('*') {
            return Err(NameError::Wildcard(name.to_owned()));
        }
        if !is_dns_name(host) {
            return Err(NameError::Invalid(name.to_owned()));
        }
        match map.insert(host.into(), route) {
            Some(_) => Err(NameError::Duplicate(name.to_owned())),
            None => Ok(()),
        }
    }

    /// The route for `name` (already normalised, as `TlsHello::sni` is).
    pub fn route(&self, name: &str) -> Option<&NameRoute> {
        if let Some(r) = self.exact.get(name) {
            return Some(r);
        }
        // Longest suffix first: drop one label at a time from the left.
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(r) = self.wildcard.get(suffix) {
                return Some(r);
            }
            rest = suffix;
        }
        None
    }

    /// Whether any name is terminated here (the listener then needs certificates).
    pub fn terminates(&self) -> bool {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .any(|r| r.terminate)
    }

    /// Every app a name routes to.
    pub fn apps(&self) -> impl Iterator<Item = &str> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .map(|r| &*r.app)
    }
}

/// Lower case, without a trailing dot.
pub fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(app: &str) -> NameRoute {
        NameRoute {
            app: app.into(),
            terminate: false,
        }
    }

    fn names(entries: &[(&str, &str)]) -> ServerNames {
        let mut n = ServerNames::default();
        for (name, app) in entries {
            n.insert(name, route(app)).unwrap();
        }
        n
    }

    fn app_of(n: &ServerNames, name: &str) -> Option<String> {
        n.route(&normalise(name)).map(|r| r.app.to_string())
    }

    #[test]
    fn exact_names_win_then_the_longest_wildcard() {
        let n = names(&[
            ("api.example.com", "api"),
            ("*.example.com", "www"),
            ("*.eu.example.com", "eu"),
        ]);
        assert_eq!(app_of(&n, "api.example.com").as_deref(), Some("api"));
        assert_eq!(app_of(&n, "shop.example.com").as_deref(), Some("www"));
        assert_eq!(app_of(&n, "a.b.example.com").as_deref(), Some("www"));
        assert_eq!(app_of(&n, "shop.eu.example.com").as_deref(), Some("eu"));
        // A wildcard needs a label in its place.
        assert_eq!(app_of(&n, "example.com"), None);
        assert_eq!(app_of(&n, "example.org"), None);
    }

    #[test]
    fn names_compare_case_insensitively_without_the_trailing_dot() {
        let n = names(&[("API.Example.com.", "api")]);
        assert_eq!(app_of(&n, "api.example.com").as_deref(), Some("api"));
        assert_eq!(app_of(&n, "Api.EXAMPLE.com.").as_deref(), Some("api"));
    }

    #[test]
    fn bad_and_duplicate_names_are_refused_by_name() {
        let mut n = names(&[("a.example.com", "x")]);
        assert_eq!(
            n.insert("A.example.com", route("y")),
            Err(NameError::Duplicate("A.example.com".into()))
        );
        for bad in ["", "a..b", "köln.de", "a b.com", "-a.com", "x.*.com", "*"] {
            assert!(n.insert(bad, route("y")).is_err(), "{bad:?}");
        }
        assert!(matches!(
            n.insert("a*.example.com", route("y")),
            Err(NameError::Wildcard(_))
        ));
    }
}
