//! Inbound PROXY protocol v1 and v2 (via the `ppp` crate), so a load balancer in front
//! keeps the real client address for geo and affinity.
//!
//! Only peers in a listener's trusted CIDRs are expected to send a header; from them a
//! missing or malformed header closes the connection. Bytes that arrive after the header in
//! the same read are returned so the backend still receives them first.

use std::net::SocketAddr;
use std::time::Duration;

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

/// The header's source address (None for LOCAL/UNKNOWN, meaning "use the socket peer")
/// and any payload bytes read past the header.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: Option<SocketAddr>,
    pub rest: Vec<u8>,
}

pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyHeaderError> {
    tokio::time::timeout(timeout, read(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

async fn read(stream: &mut TcpStream) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut buf = Vec::with_capacity(256);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        if let Some(parsed) = parse(&buf)? {
            return Ok(parsed);
        }
        if buf.len() >= MAX_HEADER {
            return Err(ProxyHeaderError::TooLong);
        }
        buf.reserve(512);
    }
}

/// `Ok(None)` while the header is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Ok(None);
    }
    let (len, source) = match result {
        HeaderResult::V1(Ok(h)) => (
            h.header.len(),
            match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            },
        ),
        HeaderResult::V2(Ok(h)) => (
            h.len(),
            match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            },
        ),
        HeaderResult::V1(Err(e)) => return Err(ProxyHeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => return Err(ProxyHeaderError::Malformed(e.to_string())),
    };
    Ok(Some(ProxyHeader {
        source,
        rest: buf[len..].to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
