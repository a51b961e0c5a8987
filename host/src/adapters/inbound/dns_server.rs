//! The internal DNS server on the wire: UDP (one socket per worker thread, SO_REUSEPORT)
//! and TCP (RFC 7766 framing, several queries per connection), messages read and written
//! by hickory-proto. The loop is ours rather than hickory-server's: answers are computed
//! per query (no zone to load), and the EDNS Client Subnet scope, the per-prefix response
//! rate limit and truncation are decided here.
//!
//! Authoritative only: names outside the domain get REFUSED, never a recursive answer.
//! Over UDP a client prefix past its response rate gets nothing, or every second time a
//! truncated empty answer (BIND's RRL "slip"), so a real client behind a spoofed flood
//! retries over TCP, which cannot be spoofed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::application::client_limits::ClientLimiter;
use crate::application::dns::{Answer, Dns, Family, QTYPES, RCODES, Wanted};

/// What a UDP answer may take without EDNS (RFC 1035), and at most with it: 1232 bytes
/// fit any path's MTU unfragmented (DNS flag day 2020).
const UDP_PLAIN: usize = 512;
const UDP_MAX: usize = 1232;
/// TCP connections served at once; past it new ones wait in the backlog.
const TCP_MAX: usize = 256;
/// Of which one client prefix (/24, /56) may hold this many.
const TCP_PER_CLIENT: u32 = 16;
/// A TCP connection with no complete query for this long is closed (RFC 7766 asks for
/// seconds, not minutes).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The listening sockets: UDP copies sharing the port, and one TCP listener.
pub struct DnsSockets {
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: TcpListener,
}

impl DnsSockets {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// How often a UDP thread waiting for queries looks whether it should stop.
const UDP_STOP_CHECK: Duration = Duration::from_millis(200);

/// Binds `copies` UDP sockets (SO_REUSEPORT: the kernel spreads queries over them) and a
/// TCP listener on `addr`; port 0 picks one port for both.
pub fn bind(addr: SocketAddr, copies: usize) -> std::io::Result<DnsSockets> {
    use socket2::{Domain, Protocol, Socket, Type};
    let tcp = crate::adapters::inbound::tcp_server::bind(addr, 1)?
        .pop()
        .expect("one listener bound");
    let addr = tcp.local_addr()?;
    let mut udp = Vec::new();
    for _ in 0..copies.max(1) {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            s.set_only_v6(false)?;
        }
        #[cfg(unix)]
        s.set_reuse_port(true)?;
        s.set_read_timeout(Some(UDP_STOP_CHECK))?;
        // Bursts queue in the kernel rather than being dropped while a thread is busy.
        let _ = s.set_recv_buffer_size(4 << 20);
        s.bind(&addr.into())?;
        udp.push(s.into());
    }
    Ok(DnsSockets { udp, tcp })
}

/// Serves until `stop`. Each UDP socket has a thread of its own that blocks in the
/// kernel for queries (no readiness events, no task switches: a query costs its receive,
/// its answer and a share of one send), as Knot's and gdnsd's UDP workers do; the
/// proxy's workers never run UDP queries, nor wait behind a flood of them.
pub async fn serve(
    sockets: DnsSockets,
    dns: Arc<Dns>,
    limiter: Option<Arc<ClientLimiter>>,
    stop: CancellationToken,
) {
    let tasks = tokio_util::task::TaskTracker::new();
    let slip = Arc::new(AtomicU64::new(0));
    for socket in sockets.udp {
        let (dns, limiter, stop, slip) = (
            Arc::clone(&dns),
            limiter.clone(),
            stop.clone(),
            Arc::clone(&slip),
        );
        tasks.spawn_blocking(move || udp_thread(socket, &dns, limiter.as_ref(), &slip, &stop));
    }
    tasks.spawn(tcp_loop(sockets.tcp, dns, stop));
    tasks.close();
    tasks.wait().await;
}

/// Queries read at once before the answers go out in one `sendmmsg`: a busy socket costs
/// one send call (and one wake-up of each client) per batch, not per answer.
const BATCH: usize = 32;

fn udp_thread(
    socket: std::net::UdpSocket,
    dns: &Dns,
    limiter: Option<&Arc<ClientLimiter>>,
    slip: &AtomicU64,
    stop: &CancellationToken,
) {
    // A query longer than this is not one we answer (a question and an OPT record).
    let mut buf = vec![0u8; 4096];
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    while !stop.is_cancelled() {
        // The first query of a batch is waited for; the rest are those already queued.
        let mut read = 0;
        while read < BATCH {
            let got = match read {
                0 => socket.recv_from(&mut buf),
                _ => recv_queued(&socket, &mut buf),
            };
            read += 1;
            let (n, peer) = match got {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                // ICMP errors of earlier sends surface here; nothing to do with them.
                Err(e) => {
                    tracing::debug!(error = %e, "dns: udp receive");
                    continue;
                }
            };
            let now = Instant::now();
            let source = peer.ip().to_canonical();
            let limited = limiter.is_some_and(|l| l.admit(source, now).is_err());
            let reply = match limited {
                false => respond(dns, &buf[..n], source, Some(UDP_PLAIN), now),
                // Every second refused response goes out truncated and empty.
                true if slip.fetch_add(1, Relaxed).is_multiple_of(2) => {
                    dns.stats.rate_slipped.fetch_add(1, Relaxed);
                    slipped(&buf[..n])
                }
                true => {
                    dns.stats.rate_dropped.fetch_add(1, Relaxed);
                    None
                }
            };
            if let Some(reply) = reply {
                replies.push((reply, peer));
            }
        }
        send_all(&socket, &mut replies);
    }
}

/// A query already queued on the socket, without waiting for one.
#[cfg(target_os = "linux")]
fn recv_queued(
    socket: &std::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    use rustix::net::{RecvFlags, recvfrom};
    let (n, _, addr) = recvfrom(socket, buf, RecvFlags::DONTWAIT)?;
    let addr = addr
        .and_then(|a| SocketAddr::try_from(a).ok())
        .ok_or_else(|| std::io::Error::other("a datagram without an IP source"))?;
    Ok((n, addr))
}

#[cfg(not(target_os = "linux"))]
fn recv_queued(_: &std::net::UdpSocket, _: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    Err(std::io::ErrorKind::WouldBlock.into())
}

/// Sends `replies` (emptying it), as few calls as the kernel takes; a reply the kernel
/// refuses (its client's port unreachable, say) is dropped.
fn send_all(socket: &std::net::UdpSocket, replies: &mut Vec<(Vec<u8>, SocketAddr)>) {
    let mut sent = 0;
    while sent < replies.len() {
        match send_batch(socket, &replies[sent..]) {
            Ok(n) => sent += n.max(1),
            Err(e) => {
                tracing::debug!(error = %e, peer = %replies[sent].1, "dns: udp send");
                sent += 1;
            }
        }
    }
    replies.clear();
}

#[cfg(target_os = "linux")]
fn send_batch(
    socket: &std::net::UdpSocket,
    replies: &[(Vec<u8>, SocketAddr)],
) -> std::io::Result<usize> {
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny, sendmmsg};
    let addrs: Vec<SocketAddrAny> = replies
        .iter()
        .map(|(_, a)| SocketAddrAny::from(*a))
        .collect();
    let iovs: Vec<[std::io::IoSlice<'_>; 1]> = replies
        .iter()
        .map(|(r, _)| [std::io::IoSlice::new(r)])
        .collect();
    let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = replies
        .iter()
        .map(|_| SendAncillaryBuffer::default())
        .collect();
    let mut msgs: Vec<MMsgHdr<'_>> = addrs
        .iter()
        .zip(&iovs)
        .zip(controls.iter_mut())
        .map(|((addr, iov), control)| MMsgHdr::new_with_addr(addr, iov, control))
        .collect();
    Ok(sendmmsg(socket, &mut msgs, SendFlags::empty())?)
}

#[cfg(not(target_os = "linux"))]
fn send_batch(
    socket: &std::net::UdpSocket,
    replies: &[(Vec<u8>, SocketAddr)],
) -> std::io::Result<usize> {
    let (reply, peer) = &replies[0];
    socket.send_to(reply, *peer).map(|_| 1)
}

async fn tcp_loop(listener: TcpListener, dns: Arc<Dns>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(TCP_MAX));
    // One client prefix cannot take every slot (and with them the TCP fallback the rate
    // limit's slip sends real clients to).
    let per_client = crate::application::dns::prefix_limiter(None, Some(TCP_PER_CLIENT), 10_000);
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = Arc::clone(&slots).acquire_owned() => p,
        };
        let Ok(permit) = permit else { return };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "dns: tcp accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let client = peer.ip().to_canonical();
        let Ok(admitted) = per_client.admit(client, Instant::now()) else {
            continue; // dropped: closed at once
        };
        dns.stats.tcp_connections.fetch_add(1, Relaxed);
        let (dns, stop) = (Arc::clone(&dns), stop.clone());
        tokio::spawn(async move {
            let _held = (permit, admitted);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tcp_connection(stream, client, &dns) => {}
            }
        });
    }
}

/// Queries one after another on one connection, each a two-byte length and a message.
async fn tcp_connection(mut stream: TcpStream, peer: IpAddr, dns: &Dns) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; u16::MAX as usize];
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(r) => usize::from(r?),
            Err(_) => return Ok(()),
        };
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf[..len]))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let Some(reply) = respond(dns, &buf[..len], peer, None, Instant::now()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        tokio::time::timeout(TCP_IDLE, stream.write_all(&framed))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
    }
}

/// The reply to one query packet, or None for a packet that gets none (not a query).
/// `udp`: the payload a reply may take without EDNS; None over TCP (no limit).
fn respond(
    dns: &Dns,
    packet: &[u8],
    source: IpAddr,
    udp: Option<usize>,
    started: Instant,
) -> Option<Vec<u8>> {
    let query = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => {
            let reply = header_only(packet, ResponseCode::FormErr);
            match reply {
                Some(_) => dns.stats.query(
                    QTYPES.len() - 1,
                    rcode_index(ResponseCode::FormErr),
                    started.elapsed(),
                ),
                None => {
                    dns.stats.malformed.fetch_add(1, Relaxed);
                }
            }
            return reply;
        }
    };
    if query.metadata.message_type != MessageType::Query {
        dns.stats.malformed.fetch_add(1, Relaxed);
        return None;
    }
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    let limit = udp.map(|plain| match &query.edns {
        Some(e) => usize::from(e.max_payload()).clamp(plain, UDP_MAX),
        None => plain,
    });
    let other = QTYPES.len() - 1;
    let subnet = query
        .edns
        .as_ref()
        .and_then(|e| match e.option(EdnsCode::Subnet) {
            Some(EdnsOption::Subnet(s)) => Some(*s),
            _ => None,
        });
    let (qtype, rcode, per_client) = match (query.metadata.op_code, &query.queries[..]) {
        // RFC 6891: an EDNS version this server does not speak.
        _ if query.edns.as_ref().is_some_and(|e| e.version() > 0) => {
            (other, ResponseCode::BADVERS, false)
        }
        (OpCode::Query, [q]) => {
            reply.add_query(q.clone());
            answer(dns, q, subnet, source, &mut reply)
        }
        (OpCode::Query, _) => (other, ResponseCode::FormErr, false),
        _ => (other, ResponseCode::NotImp, false),
    };
    reply.metadata.response_code = rcode;
    // An OPT in the reply exactly when the query had one (RFC 6891), whatever the answer.
    if query.edns.is_some() {
        let mut out = Edns::new();
        out.set_max_payload(UDP_MAX as u16);
        if let Some(s) = subnet {
            // Scope: the answer holds for the whole subnet the resolver sent (the policy
            // saw no more of the address), or for anyone when it did not depend on who
            // asked (RFC 7871).
            let scope = if per_client { s.source_prefix() } else { 0 };
            out.options_mut()
                .insert(EdnsOption::Subnet(ClientSubnet::new(
                    masked(s.addr(), s.source_prefix()),
                    s.source_prefix(),
                    scope,
                )));
        }
        reply.set_edns(out);
    }
    let mut bytes = reply.to_vec().ok()?;
    if let Some(limit) = limit
        && bytes.len() > limit
    {
        dns.stats.truncated.fetch_add(1, Relaxed);
        bytes = reply.truncate().to_vec().ok()?;
    }
    dns.stats
        .query(qtype, rcode_index(rcode), started.elapsed());
    Some(bytes)
}

/// Fills `reply` for question `q`: the type's index in [`QTYPES`], the response code,
/// and whether the answer depends on who asked.
fn answer(
    dns: &Dns,
    q: &Query,
    subnet: Option<ClientSubnet>,
    source: IpAddr,
    reply: &mut Message,
) -> (usize, ResponseCode, bool) {
    let (wanted, qtype) = match q.query_type() {
        RecordType::A => (Wanted::Addr(Family::V4), 0),
        RecordType::AAAA => (Wanted::Addr(Family::V6), 1),
        RecordType::SRV => (Wanted::Srv, 2),
        RecordType::SOA => (Wanted::Soa, 3),
        RecordType::NS => (Wanted::Ns, 4),
        RecordType::ANY => (Wanted::Any, 5),
        _ => (Wanted::Other, 6),
    };
    // The client the answer is for: the EDNS Client Subnet when the resolver sent one
    // (RFC 7871; a source prefix of 0 asks for an answer fit for anyone), else the source.
    let client = match subnet {
        Some(s) if s.source_prefix() > 0 => masked(s.addr(), s.source_prefix()),
        _ => source,
    };
    // A label holding a dot (`a\.internal`, one label) is no name of ours, whatever its
    // text looks like.
    let plain = !q.name().iter().any(|label| label.contains(&b'.'));
    let qname = q
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let result = match (q.query_class(), plain) {
        (DNSClass::IN, true) => dns.answer(&qname, wanted, client),
        _ => Answer::Refused,
    };
    // Negative answers carry the SOA of the zone asked about: the front name's own, or
    // the domain's.
    let zone = match dns.zone().front() {
        Some(front) if front == qname => front,
        _ => dns.zone().apex(),
    };
    let ttl = dns.settings.ttl;
    let owner = q.name().clone();
    let mut per_client = false;
    let rcode = match result {
        Answer::Refused => return (qtype, ResponseCode::Refused, false),
        Answer::NxDomain => {
            reply.add_authority(soa(dns, zone));
            ResponseCode::NXDomain
        }
        Answer::NoData => {
            reply.add_authority(soa(dns, zone));
            ResponseCode::NoError
        }
        Answer::Addrs {
            addrs,
            per_client: p,
        } => {
            per_client = p;
            if addrs.is_empty() {
                reply.add_authority(soa(dns, zone));
            }
            for ip in addrs {
                reply.add_answer(address(owner.clone(), ttl, ip));
            }
            ResponseCode::NoError
        }
        Answer::Srv(targets) => {
            per_client = true;
            for t in targets {
                let Ok(target) = Name::from_ascii(format!("{}.", t.target)) else {
                    continue;
                };
                let srv = SRV::new(t.priority, 1, t.port, target.clone());
                reply.add_answer(Record::from_rdata(owner.clone(), ttl, RData::SRV(srv)));
                reply.add_additional(address(target, ttl, t.addr));
            }
            if reply.answers.is_empty() {
                reply.add_authority(soa(dns, zone));
            }
            ResponseCode::NoError
        }
        Answer::Soa => {
            reply.add_answer(soa(dns, zone));
            ResponseCode::NoError
        }
        Answer::Ns => {
            let ns = ns_name(dns);
            reply.add_answer(Record::from_rdata(owner, ttl, RData::NS(NS(ns.clone()))));
            for ip in &dns.settings.name_server {
                reply.add_additional(address(ns.clone(), ttl, *ip));
            }
            ResponseCode::NoError
        }
    };
    reply.metadata.authoritative = true;
    (qtype, rcode, per_client)
}

fn address(name: Name, ttl: u32, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(a) => RData::A(A(a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(a)),
    };
    Record::from_rdata(name, ttl, data)
}

fn ns_name(dns: &Dns) -> Name {
    Name::from_ascii(format!("ns.{}.", dns.zone().apex())).unwrap_or_else(|_| Name::root())
}

/// The SOA of `zone` (the domain or the front name): its serial is the routing table's
/// version, so it moves with every change; negative answers are cached for the TTL.
fn soa(dns: &Dns, zone: &str) -> Record {
    let ttl = dns.settings.ttl;
    let serial = dns.routing_version() as u32;
    let name = |n: String| Name::from_ascii(n).unwrap_or_else(|_| Name::root());
    let rname = name(format!("hostmaster.{zone}."));
    let data = SOA::new(ns_name(dns), rname, serial, 3600, 600, 86_400, ttl);
    Record::from_rdata(name(format!("{zone}.")), ttl, RData::SOA(data))
}

fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    ipnet::IpNet::new(ip, prefix).map_or(ip, |n| n.trunc().addr())
}

fn rcode_index(rcode: ResponseCode) -> usize {
    let name = match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::BADVERS => "BADVERS",
        _ => "SERVFAIL",
    };
    RCODES
        .iter()
        .position(|r| *r == name)
        .unwrap_or(RCODES.len() - 1)
}

/// A reply of just the header (FORMERR for a query hickory cannot read): the query's id
/// and opcode, no question. None when the packet is no query (a response, or shorter
/// than a header): answering those could loop between two servers.
fn header_only(packet: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    let header: [u8; 12] = packet.get(..12)?.try_into().ok()?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let mut reply = [0u8; 12];
    reply[..2].copy_from_slice(&header[..2]);
    // QR set, the query's opcode and RD kept.
    reply[2] = 0x80 | (header[2] & 0x79);
    reply[3] = u16::from(rcode) as u8 & 0x0f;
    Some(reply.to_vec())
}

/// The truncated empty reply a rate-limited query gets every second time: the question
/// echoed with TC set, so a real client retries over TCP. Nothing for a non-query.
fn slipped(packet: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.truncation = true;
    reply.add_queries(query.queries.iter().cloned());
    reply.to_vec().ok()
}
