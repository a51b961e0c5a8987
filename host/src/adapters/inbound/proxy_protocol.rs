//! Inbound PROXY protocol v1 and v2 (via the `ppp` crate), so a load balancer in front
//! keeps the real client address for geo and affinity.
//!
//! Only peers in a listener's trusted CIDRs are expected to send a header; from them a
//! missing or malformed header closes the connection. Bytes that arrive after the header in
//! the same read are returned so the backend still receives them first.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::config::SendVersion;
use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v2's fixed part is 16 bytes and its length field is a u16.
const MAX_HEADER: usize = 16 + u16::MAX as usize;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a complete PROXY header")]
    Closed,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// The header a backend is sent first (HAProxy's `send-proxy`/`send-proxy-v2`): the
/// client's address and the one it connected to, and in v2 the TLS server name
/// (`PP2_TYPE_AUTHORITY`) and ALPN (`PP2_TYPE_ALPN`) when known.
pub fn outbound_header(
    version: SendVersion,
    source: SocketAddr,
    destination: SocketAddr,
    hello: Option<&crate::domain::server_names::TlsHello>,
) -> Vec<u8> {
    let authority = hello.and_then(|h| h.sni.as_deref());
    let alpn = hello.and_then(|h| h.negotiated.as_deref());
    // v4 clients of a dual-stack listener come as v4-mapped v6: sent as v4 when both are.
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (source, destination) = (canonical(source), canonical(destination));
    // One family for both (a v4 client on a v6 listener): the v4 address mapped.
    let (source, destination) = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V6(d)) => (
            SocketAddr::new(s.ip().to_ipv6_mapped().into(), s.port()),
            d.into(),
        ),
        (SocketAddr::V6(s), SocketAddr::V4(d)) => (
            s.into(),
            SocketAddr::new(d.ip().to_ipv6_mapped().into(), d.port()),
        ),
        same => same,
    };
    match version {
        SendVersion::V1 => {
            let addresses = match (source, destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    v1::Addresses::new_tcp4(*s.ip(), *d.ip(), s.port(), d.port())
                }
                (s, d) => v1::Addresses::new_tcp6(to_v6(s.ip()), to_v6(d.ip()), s.port(), d.port()),
            };
            addresses.to_string().into_bytes()
        }
        SendVersion::V2 => {
            let mut b = v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                (source, destination),
            );
            // Writing to a Vec cannot fail, and each value is far below a TLV's u16 bound.
            for (kind, value) in [(v2::Type::ALPN, alpn), (v2::Type::Authority, authority)] {
                if let Some(v) = value.filter(|v| v.len() <= 255) {
                    b = b
                        .write_tlv(kind, v.as_bytes())
                        .unwrap_or_else(|_| unreachable!());
                }
            }
            b.build().unwrap_or_else(|_| unreachable!())
        }
    }
}

fn to_v6(ip: std::net::IpAddr) -> std::net::Ipv6Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    }
}

/// The header's source address (None for LOCAL/UNKNOWN, meaning "use the socket peer")
/// and any payload bytes read past the header.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: Option<SocketAddr>,
    /// The address the client connected to, as the header says (with `source`).
    pub destination: Option<SocketAddr>,
    pub rest: Vec<u8>,
}

pub async fn read_header(
    stream: &mut impl ReadSome,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyHeaderError> {
    tokio::time::timeout(timeout, read(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

/// A client socket the header is read from, on either data path.
pub trait ReadSome {
    /// Appends what one read gives to `buf`: how many bytes, 0 at the end of the stream.
    fn read_some(
        &mut self,
        buf: &mut Vec<u8>,
    ) -> impl std::future::Future<Output = std::io::Result<usize>>;
}

impl ReadSome for TcpStream {
    async fn read_some(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        buf.reserve(512);
        self.read_buf(buf).await
    }
}

async fn read(stream: &mut impl ReadSome) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut buf = Vec::with_capacity(256);
    loop {
        if stream.read_some(&mut buf).await? == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        if let Some(parsed) = parse(&buf)? {
            return Ok(parsed);
        }
        if buf.len() >= MAX_HEADER {
            return Err(ProxyHeaderError::TooLong);
        }
    }
}

/// `Ok(None)` while the header is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Ok(None);
    }
    let (len, addrs) = match result {
        HeaderResult::V1(Ok(h)) => (
            h.header.len(),
            match h.addresses {
                v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                v1::Addresses::Unknown => None,
            },
        ),
        HeaderResult::V2(Ok(h)) => (
            h.len(),
            match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (_, v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            },
        ),
        HeaderResult::V1(Err(e)) => return Err(ProxyHeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => return Err(ProxyHeaderError::Malformed(e.to_string())),
    };
    Ok(Some(ProxyHeader {
        source: addrs.map(|(s, _)| s),
        destination: addrs.map(|(_, d)| d),
        rest: buf[len..].to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_sent_read_back_with_their_tlvs() {
        let (src, dst) = (
            "203.0.113.7:5000".parse().unwrap(),
            "[::1]:443".parse().unwrap(),
        );
        let hello = crate::domain::server_names::TlsHello {
            sni: Some("a.example.com".into()),
            alpn: vec!["h2".into(), "http/1.1".into()],
            negotiated: Some("h2".into()),
        };
        let v1 = outbound_header(SendVersion::V1, src, dst, Some(&hello));
        assert_eq!(v1, b"PROXY TCP6 ::ffff:203.0.113.7 ::1 5000 443\r\n");
        // A v4 client of a dual-stack listener is sent as v4.
        let mapped = (
            "[::ffff:203.0.113.7]:5000".parse().unwrap(),
            "[::ffff:10.0.0.1]:443".parse().unwrap(),
        );
        let v1 = outbound_header(SendVersion::V1, mapped.0, mapped.1, None);
        assert_eq!(v1, b"PROXY TCP4 203.0.113.7 10.0.0.1 5000 443\r\n");
        let v2 = outbound_header(SendVersion::V2, src, dst, Some(&hello));
        let parsed = v2::Header::try_from(&v2[..]).unwrap();
        let tlvs: Vec<_> = parsed.tlvs().map(|t| t.unwrap()).collect();
        assert!(
            tlvs.iter()
                .any(|t| t.kind == v2::Type::Authority as u8 && &*t.value == b"a.example.com")
        );
        assert!(
            tlvs.iter()
                .any(|t| t.kind == v2::Type::ALPN as u8 && &*t.value == b"h2")
        );
        assert_eq!(
            parse(&v2).unwrap().unwrap().source,
            Some("[::ffff:203.0.113.7]:5000".parse().unwrap())
        );
    }

    #[test]
    fn v1_with_payload_and_partial() {
        let h = b"PROXY TCP4 200.147.3.157 10.0.0.1 5000 80\r\nhello";
        assert_eq!(parse(&h[..20]).unwrap(), None);
        let p = parse(h).unwrap().unwrap();
        assert_eq!(p.source, Some("200.147.3.157:5000".parse().unwrap()));
        assert_eq!(p.rest, b"hello");
        let unknown = parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap();
        assert_eq!(unknown.source, None);
    }

    #[test]
    fn v2_proxy_and_local() {
        let src: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        let mut h = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .unwrap();
        h.extend_from_slice(b"x");
        assert_eq!(parse(&h[..10]).unwrap(), None);
        let p = parse(&h).unwrap().unwrap();
        assert_eq!((p.source, p.rest), (Some(src), b"x".to_vec()));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(ProxyHeaderError::Malformed(_))
        ));
    }
}
