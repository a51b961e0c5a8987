//! edgeproxy's load generator for `bench/compare.sh`: test backends (echo, sink) and the
//! loads (connection rate with latency, bulk throughput, idle connections), loopback
//! only, every loop bounded by count and time. Each load prints one JSON line; with
//! `--pid` it also reports the proxy's CPU time and memory, read from /proc.
//!
//! One thread (a current-thread runtime), so it stays on the core it is pinned to.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo backend: writes back what it reads (on every --listen address).
    Echo {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Bulk backend: reads and discards; at EOF answers the byte count (8 bytes, BE).
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// New connections: CONCURRENCY slots, each connect, write SIZE bytes, read the echo,
    /// close. WARMUP seconds uncounted, then DURATION seconds counted.
    Rate {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long)]
        pid: Option<u32>,
        /// Connect from this many source addresses (127.2.0.0 up, in turn) instead of
        /// 127.0.0.1: that many distinct clients, for per-client limits.
        #[arg(long, default_value_t = 0)]
        sources: u32,
        /// At most this many new connections a second in all (0: as fast as they go).
        #[arg(long, default_value_t = 0)]
        max_rate: u32,
        /// Each connection a full TLS handshake (no resumption) before its echo.
        #[arg(long)]
        tls: bool,
    },
    /// Throughput: STREAMS connections writing 64 KiB chunks for DURATION seconds to a
    /// sink; counts what the sink received.
    Bulk {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long)]
        pid: Option<u32>,
        /// Through TLS sessions.
        #[arg(long)]
        tls: bool,
    },
    /// Opens COUNT connections through the proxy, one echo each so both legs are live,
    /// and reports the proxy's resident memory before and while holding them, and the
    /// time it took to open them (64 at a time), from 1,024 source addresses in
    /// 127.0.0.0/8.
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        count: usize,
        #[arg(long)]
        pid: u32,
        /// Each connection a TLS session (held after its echo).
        #[arg(long)]
        tls: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Backends spawn a local task per connection.
    let local = tokio::task::LocalSet::new();
    rt.block_on(local.run_until(async {
        match cli.command {
            Command::Echo { listen } => {
                let all: Vec<_> = listen
                    .into_iter()
                    .map(|addr| tokio::task::spawn_local(serve(addr, echo)))
                    .collect();
                // Runs until killed; the first to fail ends it.
                for one in all {
                    one.await??;
                }
                Ok(())
            }
            Command::Sink { listen } => serve(listen, sink).await,
            Command::Rate {
                target,
                concurrency,
                size,
                warmup,
                duration,
                pid,
                sources,
                max_rate,
                tls,
            } => {
                rate(
                    target,
                    concurrency,
                    size,
                    (warmup, duration),
                    pid,
                    (sources, max_rate),
                    tls.then(tls_client),
                )
                .await
            }
            Command::Bulk {
                target,
                streams,
                duration,
                pid,
                tls,
            } => bulk(target, streams, duration, pid, tls.then(tls_client)).await,
            Command::Idle {
                target,
                count,
                pid,
                tls,
            } => idle(target, count, pid, tls.then(tls_client)).await,
        }
    }))
}

fn loopback(addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("{addr}: loopback addresses only");
    }
    Ok(())
}

async fn serve<F, Fut>(listen: SocketAddr, handler: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + 'static,
{
    loopback(listen)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    loop {
        let (s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::task::spawn_local(handler(s));
    }
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let (mut r, mut w) = s.split();
    tokio::io::copy(&mut r, &mut w).await.map(|_| ())
}

async fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await? {
            0 => break,
            n => total += n as u64,
        }
    }
    s.write_all(&total.to_be_bytes()).await
}

/// The proxy's CPU seconds (user + system, children included) and resident KiB.
struct ProcStat {
    cpu_s: f64,
    rss_kib: u64,
}

fn proc_stat(pid: u32) -> anyhow::Result<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14-17 (11-14 after the name and state).
    let ticks: u64 = f[11..15]
        .iter()
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    // USER_HZ is 100 on Linux for every architecture this runs on.
    Ok(ProcStat {
        cpu_s: ticks as f64 / 100.0,
        rss_kib,
    })
}

/// A TLS client that does the least a client must (no resumption, no certificate
/// checks: the proxy's side of the handshake is what is measured), X25519 as the peers'
/// OpenSSL picks.
fn tls_client() -> tokio_rustls::TlsConnector {
    #[derive(Debug)]
    struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// Connects to `target` (from `source`), through a TLS session when `tls` is given.
async fn connect(
    target: SocketAddr,
    source: Option<std::net::Ipv4Addr>,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> std::io::Result<Box<dyn Stream>> {
    let s = match source {
        None => TcpStream::connect(target).await?,
        Some(src) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(src.into(), 0))?;
            sock.connect(target).await?
        }
    };
    s.set_nodelay(true)?;
    match tls {
        None => Ok(Box::new(s)),
        Some(c) => {
            let name = rustls::pki_types::ServerName::try_from("bench.test").expect("a name");
            Ok(Box::new(c.connect(name, s).await?))
        }
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn one_exchange(
    target: SocketAddr,
    source: Option<std::net::Ipv4Addr>,
    tls: Option<&tokio_rustls::TlsConnector>,
    msg: &[u8],
    buf: &mut [u8],
) -> std::io::Result<()> {
    let mut s = connect(target, source, tls).await?;
    s.write_all(msg).await?;
    s.read_exact(buf).await?;
    Ok(())
}

async fn rate(
    target: SocketAddr,
    concurrency: usize,
    size: usize,
    (warmup, duration): (u64, u64),
    pid: Option<u32>,
    (sources, max_rate): (u32, u32),
    tls: Option<tokio_rustls::TlsConnector>,
) -> anyhow::Result<()> {
    loopback(target)?;
    let next_source = std::rc::Rc::new(std::cell::Cell::new(0u32));
    let start = Instant::now();
    let counted_from = start + Duration::from_secs(warmup);
    let end = counted_from + Duration::from_secs(duration);
    let local = tokio::task::LocalSet::new();
    let before = std::cell::Cell::new(None);
    let results = local
        .run_until(async {
            let mut slots = Vec::new();
            for _ in 0..concurrency {
                let next_source = next_source.clone();
                let tls = tls.clone();
                slots.push(tokio::task::spawn_local(async move {
                    let msg = vec![b'x'; size];
                    let mut buf = vec![0u8; size];
                    let (mut lat, mut errors) = (Vec::new(), 0u64);
                    // Paced: each slot's share of the rate, one exchange per interval.
                    let every = (max_rate > 0)
                        .then(|| Duration::from_secs_f64(concurrency as f64 / max_rate as f64));
                    let mut next = Instant::now();
                    loop {
                        if let Some(every) = every {
                            tokio::time::sleep_until(next.into()).await;
                            next += every;
                        }
                        let t = Instant::now();
                        if t >= end {
                            break;
                        }
                        let source = (sources > 0).then(|| {
                            let n = next_source.get();
                            next_source.set((n + 1) % sources);
                            std::net::Ipv4Addr::from_bits(0x7f02_0000 + n)
                        });
                        let ok = one_exchange(target, source, tls.as_ref(), &msg, &mut buf)
                            .await
                            .is_ok();
                        if t >= counted_from {
                            match ok {
                                true => lat.push(t.elapsed().as_micros() as u32),
                                false => errors += 1,
                            }
                        } else if !ok {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    (lat, errors)
                }));
            }
            tokio::time::sleep_until(counted_from.into()).await;
            before.set(pid.map(proc_stat).transpose()?);
            let mut lat = Vec::new();
            let mut errors = 0;
            for s in slots {
                let (l, e) = s.await?;
                lat.extend(l);
                errors += e;
            }
            anyhow::Ok((lat, errors))
        })
        .await?;
    let (mut lat, errors) = results;
    let after = pid.map(proc_stat).transpose()?;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let conns = lat.len() as f64;
    let mut out = serde_json::json!({
        "test": "rate", "conns": lat.len(), "errors": errors,
        "cps": conns / duration as f64, "p50_us": pct(0.50), "p99_us": pct(0.99),
    });
    if let (Some(b), Some(a)) = (before.take(), after) {
        out["proxy_cpu_us_per_conn"] = ((a.cpu_s - b.cpu_s) * 1e6 / conns.max(1.0)).into();
    }
    println!("{out}");
    Ok(())
}

async fn bulk(
    target: SocketAddr,
    streams: usize,
    duration: u64,
    pid: Option<u32>,
    tls: Option<tokio_rustls::TlsConnector>,
) -> anyhow::Result<()> {
    loopback(target)?;
    let before = pid.map(proc_stat).transpose()?;
    let start = Instant::now();
    let end = start + Duration::from_secs(duration);
    let local = tokio::task::LocalSet::new();
    let received = local
        .run_until(async {
            let mut tasks = Vec::new();
            for _ in 0..streams {
                let tls = tls.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let mut s = connect(target, None, tls.as_ref()).await?;
                    let chunk = vec![0x5au8; 64 * 1024];
                    while Instant::now() < end {
                        s.write_all(&chunk).await?;
                    }
                    s.shutdown().await?;
                    let mut count = [0u8; 8];
                    s.read_exact(&mut count).await?;
                    anyhow::Ok(u64::from_be_bytes(count))
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            anyhow::Ok(total)
        })
        .await?;
    let secs = start.elapsed().as_secs_f64();
    let after = pid.map(proc_stat).transpose()?;
    let mut out = serde_json::json!({
        "test": "bulk", "streams": streams, "bytes": received,
        "gbps": received as f64 * 8.0 / secs / 1e9,
    });
    if let (Some(b), Some(a)) = (before, after) {
        out["proxy_cpu_s_per_gb"] = ((a.cpu_s - b.cpu_s) / (received as f64 / 1e9)).into();
    }
    println!("{out}");
    Ok(())
}

async fn idle(
    target: SocketAddr,
    count: usize,
    pid: u32,
    tls: Option<tokio_rustls::TlsConnector>,
) -> anyhow::Result<()> {
    loopback(target)?;
    let before = proc_stat(pid)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let mut held = Vec::with_capacity(count);
    let mut opening = tokio::task::JoinSet::new();
    let open = |i: usize| {
        let tls = tls.clone();
        async move {
            // 1,024 clients from 127.1.0.0 up (never the proxy's or the backends' address):
            // a proxy with sticky bindings spreads them over its backends, as it would real
            // clients, and no source runs out of ports.
            let src = std::net::Ipv4Addr::from_bits(0x7f01_0000 + (i % 1024) as u32);
            let mut s = connect(target, Some(src), tls.as_ref()).await?;
            let mut buf = [0u8; 64];
            s.write_all(&[b'i'; 64]).await?;
            s.read_exact(&mut buf).await?;
            anyhow::Ok(s)
        }
    };
    for i in 0..count {
        if opening.len() >= 64
            && let Some(s) = opening.join_next().await
        {
            held.push(s??);
        }
        if Instant::now() > deadline {
            bail!("opened only {} connections in 120 s", held.len());
        }
        opening.spawn(open(i));
    }
    while let Some(s) = opening.join_next().await {
        held.push(s??);
    }
    let open_s = start.elapsed().as_secs_f64();
    // Let the proxy settle (its per-chunk buffers go back to the pool) before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let holding = proc_stat(pid)?;
    let per_conn = (holding.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / count as f64;
    println!(
        "{}",
        serde_json::json!({
            "test": "idle", "conns": count, "rss0_kib": before.rss_kib,
            "rssN_kib": holding.rss_kib, "bytes_per_conn": per_conn, "open_s": open_s,
        })
    );
    drop(held);
    Ok(())
}
