//! Reads a TLS ClientHello off a new connection, bounded in size and time, and says what
//! it asked for (SNI, ALPN). Parsing is rustls's (`server::Acceptor`), which reassembles a
//! hello split across records or segments; the bytes read are kept, so the connection can
//! still be relayed unchanged (passthrough) or handed to a TLS handshake (termination).

use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::domain::server_names::{TlsHello, normalise};

/// Larger than any ClientHello browsers send (post-quantum key shares and ECH included,
/// a few KiB); HAProxy's default buffer is the same.
pub const MAX_HELLO: usize = 16 * 1024;
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// ALPN protocols kept from one hello (a client may list many).
const MAX_ALPN: usize = 8;

/// Why a connection on a TLS listener was closed before routing, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not TLS (first bytes are not a handshake record)")]
    NotTls,
    #[error("malformed ClientHello")]
    Malformed,
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error("no complete ClientHello within {HELLO_TIMEOUT:?}")]
    Timeout,
    #[error("closed before a complete ClientHello")]
    Closed,
}

impl HelloError {
    pub const ALL: [HelloError; 5] = [
        HelloError::NotTls,
        HelloError::Malformed,
        HelloError::TooLarge,
        HelloError::Timeout,
        HelloError::Closed,
    ];

    /// The reason label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            HelloError::NotTls => "not_tls",
            HelloError::Malformed => "malformed",
            HelloError::TooLarge => "too_large",
            HelloError::Timeout => "timeout",
            HelloError::Closed => "closed",
        }
    }
}

/// Reads from `stream` (after `read`, bytes already taken off it) until a whole
/// ClientHello is in: the hello, and every byte read, in order.
pub async fn read(
    stream: &mut TcpStream,
    mut read: Vec<u8>,
) -> Result<(TlsHello, Vec<u8>), HelloError> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let mut parser = Parser::default();
    loop {
        if let Some(hello) = parser.feed(&read)? {
            // Kept until sent on: no spare room.
            read.shrink_to_fit();
            return Ok((hello, read));
        }
        if read.len() >= MAX_HELLO {
            return Err(HelloError::TooLarge);
        }
        // Room for a typical hello first, more only as it comes (never past the cap).
        let left = MAX_HELLO - read.len();
        read.reserve(read.len().max(2048).min(left));
        let mut room = (&mut read).limit(left);
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut room))
            .await
            .map_err(|_| HelloError::Timeout)?
            .map_err(|_| HelloError::Closed)?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
    }
}

/// Incremental: `feed` is given everything read so far and parses only what is new.
#[derive(Default)]
pub struct Parser {
    acceptor: rustls::server::Acceptor,
    fed: usize,
}

impl Parser {
    pub fn feed(&mut self, read: &[u8]) -> Result<Option<TlsHello>, HelloError> {
        // A handshake record starts 0x16, then a 3.x version: anything else (HTTP, SSH,
        // a port scan) is told apart at once rather than after a parse error.
        match read {
            [] => return Ok(None),
            [b, ..] if *b != 0x16 => return Err(HelloError::NotTls),
            [_, major, ..] if *major != 3 => return Err(HelloError::NotTls),
            _ => {}
        }
        let mut new = &read[self.fed..];
        while !new.is_empty() {
            match self.acceptor.read_tls(&mut new) {
                Ok(0) => break,
                Ok(_) => {}
                // rustls's buffer is full: more than a hello's worth.
                Err(_) => return Err(HelloError::TooLarge),
            }
        }
        self.fed = read.len();
        match self.acceptor.accept() {
            Ok(None) => Ok(None),
            Ok(Some(accepted)) => Ok(Some(hello_of(&accepted.client_hello()))),
            Err(_) => Err(HelloError::Malformed),
        }
    }
}

fn hello_of(hello: &rustls::server::ClientHello<'_>) -> TlsHello {
    TlsHello {
        sni: hello.server_name().map(|n| Arc::from(normalise(n))),
        alpn: hello
            .alpn()
            .into_iter()
            .flatten()
            .take(MAX_ALPN)
            .map(|p| Arc::from(String::from_utf8_lossy(p)))
            .collect(),
        negotiated: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, as rustls's client writes it.
    pub fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_hello_fed_byte_by_byte_is_read_once_whole() {
        let bytes = client_hello("API.example.com", &["h2", "http/1.1"]);
        let mut p = Parser::default();
        for end in 1..bytes.len() {
            assert_eq!(p.feed(&bytes[..end]), Ok(None), "{end}");
        }
        let hello = p.feed(&bytes).unwrap().unwrap();
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        let alpn: Vec<&str> = hello.alpn.iter().map(|p| &**p).collect();
        assert_eq!(alpn, ["h2", "http/1.1"]);
    }

    #[test]
    fn a_hello_split_across_records_is_reassembled() {
        let bytes = client_hello("a.example.com", &[]);
        // One handshake message in two records of the same type.
        let body = &bytes[5..];
        let (one, two) = body.split_at(body.len() / 2);
        let mut split = Vec::new();
        for part in [one, two] {
            split.extend_from_slice(&bytes[..3]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        let hello = Parser::default().feed(&split).unwrap().unwrap();
        assert_eq!(hello.sni.as_deref(), Some("a.example.com"));
        assert!(hello.alpn.is_empty());
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (client, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn a_hello_that_never_ends_is_cut_at_the_cap() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = pair().await;
        // A handshake message announcing 60,000 bytes, in records of 4,000.
        let mut bytes = vec![1, 0, 0xea, 0x60];
        bytes.resize(24_000, 0);
        let mut records = Vec::new();
        for chunk in bytes.chunks(4_000) {
            records.extend_from_slice(&[0x16, 3, 1]);
            records.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            records.extend_from_slice(chunk);
        }
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&records).await;
            client
        });
        assert_eq!(
            read(&mut server, Vec::new()).await.err(),
            Some(HelloError::TooLarge)
        );
        drop(writer.await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_or_short_hello_is_timed_out_or_closed() {
        use tokio::io::AsyncWriteExt;
        let bytes = client_hello("a.example.com", &[]);
        let (mut client, mut server) = pair().await;
        client.write_all(&bytes[..10]).await.unwrap();
        assert_eq!(
            read(&mut server, Vec::new()).await.err(),
            Some(HelloError::Timeout)
        );
        let (mut client, mut server) = pair().await;
        client.write_all(&bytes[..10]).await.unwrap();
        drop(client);
        assert_eq!(
            read(&mut server, Vec::new()).await.err(),
            Some(HelloError::Closed)
        );
        // Bytes already read (past a PROXY header) count as the hello's start.
        let (mut client, mut server) = pair().await;
        client.write_all(&bytes[10..]).await.unwrap();
        let (hello, all) = read(&mut server, bytes[..10].to_vec()).await.unwrap();
        assert_eq!(hello.sni.as_deref(), Some("a.example.com"));
        assert_eq!(all, bytes);
    }

    #[test]
    fn other_protocols_and_garbage_are_told_apart() {
        let mut p = Parser::default();
        assert_eq!(p.feed(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotTls));
        assert_eq!(
            Parser::default().feed(b"SSH-2.0-OpenSSH"),
            Err(HelloError::NotTls)
        );
        let mut bad = client_hello("a.example.com", &[]);
        // The handshake type of a ServerHello in a client's first record.
        bad[5] = 2;
        assert_eq!(Parser::default().feed(&bad), Err(HelloError::Malformed));
    }
}
