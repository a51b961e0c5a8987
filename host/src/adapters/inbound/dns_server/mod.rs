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
use crate::application::dns::{Answer, Dns, Family, QTYPES, Question, RCODES, Wanted};

mod udp;
mod wire;

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

/// Queries read at once (one `recvmmsg`) before their answers go out (one `sendmmsg`).
const BATCH: usize = 32;

fn udp_thread(
    socket: std::net::UdpSocket,
    dns: &Dns,
    limiter: Option<&Arc<ClientLimiter>>,
    slip: &AtomicU64,
    stop: &CancellationToken,
) {
    let mut batch = udp::Batch::new(BATCH);
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    while !stop.is_cancelled() {
        match batch.recv(&socket) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // ICMP errors of earlier sends surface here; nothing to do with them.
            Err(e) => tracing::debug!(error = %e, "dns: udp receive"),
        }
        // One clock read a batch: its queries arrived together, and a query's time is
        // counted from then, its wait behind the batch's earlier ones included.
        let now = Instant::now();
        // The admitted queries are answered together: one policy call per app.
        let mut admitted: Vec<(&[u8], IpAddr)> = Vec::with_capacity(BATCH);
        let mut peers = Vec::with_capacity(BATCH);
        for (packet, peer) in batch.datagrams() {
            let source = peer.ip().to_canonical();
            let reply = match limiter.is_some_and(|l| l.admit(source, now).is_err()) {
                false => {
                    admitted.push((packet, source));
                    peers.push(peer);
                    continue;
                }
                // Every second refused response goes out truncated and empty.
                true if slip.fetch_add(1, Relaxed).is_multiple_of(2) => {
                    dns.stats.rate_slipped.fetch_add(1, Relaxed);
                    slipped(packet)
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
        let answered = respond_all(dns, &admitted, Some(UDP_PLAIN), now);
        for (reply, peer) in answered.into_iter().zip(peers) {
            if let Some(reply) = reply {
                replies.push((reply, peer));
            }
        }
        udp::send_all(&socket, &mut replies);
    }
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
    respond_all(dns, &[(packet, source)], udp, started)
        .pop()
        .flatten()
}

/// The replies to query packets from their sources, in their order, as [`respond`] gives
/// each; the common queries' questions are answered together (one policy call per app).
fn respond_all(
    dns: &Dns,
    packets: &[(&[u8], IpAddr)],
    udp: Option<usize>,
    started: Instant,
) -> Vec<Option<Vec<u8>>> {
    // A class other than IN is for no name of ours: refused without asking.
    let ours = |q: &wire::Query<'_>| q.qclass == CLASS_IN;
    let queries: Vec<Option<wire::Query<'_>>> = packets
        .iter()
        .map(|(packet, _)| wire::Query::parse(packet))
        .collect();
    let questions: Vec<Question<'_>> = queries
        .iter()
        .zip(packets)
        .filter_map(|(q, &(_, source))| Some(question(q.as_ref().filter(|q| ours(q))?, source)))
        .collect();
    // In the order of the queries that are ours.
    let mut answers = dns.answer_many(&questions).into_iter();
    queries
        .iter()
        .zip(packets)
        .map(|(q, &(packet, source))| match q {
            Some(q) => {
                let answer = match ours(q) {
                    true => answers.next().unwrap_or(Answer::Refused),
                    false => Answer::Refused,
                };
                finish(dns, q, packet, source, udp, started, answer)
            }
            None => respond_any(dns, packet, source, udp, started, None),
        })
        .collect()
}

/// A query of the common shape (class IN) as the application asks it.
fn question<'a>(q: &'a wire::Query<'_>, source: IpAddr) -> Question<'a> {
    Question {
        name: q.name(),
        wanted: wanted(q.qtype).1,
        client: client(q.edns.and_then(|e| e.subnet), source),
    }
}

/// The reply to query `q` (of `packet`) with its `answer` decided: written in place when
/// it is an address answer that fits, else by hickory's path, which takes the answer
/// so no lookup is decided twice.
fn finish(
    dns: &Dns,
    q: &wire::Query<'_>,
    packet: &[u8],
    source: IpAddr,
    udp: Option<usize>,
    started: Instant,
    answer: Answer,
) -> Option<Vec<u8>> {
    let (qtype, wanted) = wanted(q.qtype);
    if let (Wanted::Addr(_), Answer::Addrs { addrs, per_client }) = (wanted, &answer)
        && !addrs.is_empty()
    {
        let scope = match q.edns.and_then(|e| e.subnet) {
            Some(s) if *per_client => s.source,
            _ => 0,
        };
        let mut reply = Vec::with_capacity(128);
        q.answer(addrs, dns.settings.ttl, UDP_MAX as u16, scope, &mut reply);
        let limit = reply_limit(udp, q.edns.map(|e| e.payload));
        if limit.is_none_or(|l| reply.len() <= l) {
            dns.stats.query(qtype, RCODE_NOERROR, started.elapsed());
            return Some(reply);
        }
    }
    respond_any(dns, packet, source, udp, started, Some(answer))
}

/// Any query, read and written by hickory-proto; `decided`: the answer already decided
/// for its question.
fn respond_any(
    dns: &Dns,
    packet: &[u8],
    source: IpAddr,
    udp: Option<usize>,
    started: Instant,
    decided: Option<Answer>,
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
    let limit = reply_limit(udp, query.edns.as_ref().map(Edns::max_payload));
    let other = QTYPES.len() - 1;
    let subnet = query
        .edns
        .as_ref()
        .and_then(|e| match e.option(EdnsCode::Subnet) {
            Some(EdnsOption::Subnet(s)) => Some(wire::Subnet {
                addr: s.addr(),
                source: s.source_prefix(),
            }),
            _ => None,
        });
    let (qtype, rcode, per_client) = match (query.metadata.op_code, &query.queries[..]) {
        // RFC 6891: an EDNS version this server does not speak.
        _ if query.edns.as_ref().is_some_and(|e| e.version() > 0) => {
            (other, ResponseCode::BADVERS, false)
        }
        (OpCode::Query, [q]) => {
            reply.add_query(q.clone());
            answer(dns, q, subnet, source, decided, &mut reply)
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
            let scope = if per_client { s.source } else { 0 };
            out.options_mut()
                .insert(EdnsOption::Subnet(ClientSubnet::new(
                    wire::masked(s.addr, s.source),
                    s.source,
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

/// What a reply may take: over UDP the client's EDNS payload size within [512, 1232], or
/// 512 without EDNS; no limit over TCP (`udp` None).
fn reply_limit(udp: Option<usize>, edns_payload: Option<u16>) -> Option<usize> {
    udp.map(|plain| match edns_payload {
        Some(payload) => usize::from(payload).clamp(plain, UDP_MAX),
        None => plain,
    })
}

const CLASS_IN: u16 = 1;
const RCODE_NOERROR: usize = 0;

/// What a question's type asks for, and its index in [`QTYPES`].
fn wanted(rtype: u16) -> (usize, Wanted) {
    match RecordType::from(rtype) {
        RecordType::A => (0, Wanted::Addr(Family::V4)),
        RecordType::AAAA => (1, Wanted::Addr(Family::V6)),
        RecordType::SRV => (2, Wanted::Srv),
        RecordType::SOA => (3, Wanted::Soa),
        RecordType::NS => (4, Wanted::Ns),
        RecordType::ANY => (5, Wanted::Any),
        _ => (6, Wanted::Other),
    }
}

/// The client an answer is for: the EDNS Client Subnet when the resolver sent one (RFC
/// 7871; a source prefix of 0 asks for an answer fit for anyone), else the source.
fn client(subnet: Option<wire::Subnet>, source: IpAddr) -> IpAddr {
    match subnet {
        Some(s) if s.source > 0 => wire::masked(s.addr, s.source),
        _ => source,
    }
}

/// Fills `reply` for question `q` (with `decided`, its answer when already decided): the
/// type's index in [`QTYPES`], the response code, and whether the answer depends on who
/// asked.
fn answer(
    dns: &Dns,
    q: &Query,
    subnet: Option<wire::Subnet>,
    source: IpAddr,
    decided: Option<Answer>,
    reply: &mut Message,
) -> (usize, ResponseCode, bool) {
    let (qtype, wanted) = wanted(u16::from(q.query_type()));
    // A label holding a dot (`a\.internal`, one label) is no name of ours, whatever its
    // text looks like.
    let plain = !q.name().iter().any(|label| label.contains(&b'.'));
    let qname = q
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let result = match (decided, q.query_class(), plain) {
        (Some(answer), ..) => answer,
        (None, DNSClass::IN, true) => dns.answer(&qname, wanted, client(subnet, source)),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
    use hickory_proto::rr::{Name, RecordType};
    use tokio::time::Instant;

    use super::{respond, respond_any, wire};
    use crate::application::dns::{Dns, DnsSettings, Family, LonePop, Question, Wanted};
    use crate::application::proxy_service::ProxyService;
    use crate::application::routing::Routing;
    use crate::domain::RoutedBackend;
    use crate::domain::dns::Zone;
    use crate::domain::ports::{
        BackendRepository, LoadedBackends, PickRequest, RoutingError, ScoringPolicy,
    };
    use crate::domain::sample;
    use crate::domain::services::NativeScorer;

    struct Rows;
    impl BackendRepository for Rows {
        fn load(&self) -> Result<LoadedBackends, RoutingError> {
            let at = |id, region, country, addr: &str| {
                let mut b = sample::backend("app", id, region, country, 7000);
                b.addr = addr.parse().unwrap();
                b
            };
            Ok(LoadedBackends {
                backends: vec![
                    at("de-1", "eu", "DE", "10.2.0.1:7002"),
                    at("sa-1", "sa", "BR", "10.1.0.1:7001"),
                    at("sa-6", "sa", "BR", "[fd00::1]:7001"),
                    at("us-1", "us", "US", "10.3.0.1:7003"),
                ],
                skipped: Vec::new(),
            })
        }
    }

    async fn dns() -> Dns {
        dns_deciding_by(Arc::new(NativeScorer)).await
    }

    async fn dns_deciding_by(policy: Arc<dyn ScoringPolicy>) -> Dns {
        let routing = Arc::new(Routing::new(Arc::new(Rows), Arc::default(), 50));
        routing.reload().await.unwrap();
        let service = ProxyService::for_tests(routing, policy, None);
        let settings = DnsSettings {
            zone: Zone::new("internal", None).unwrap(),
            ttl: 10,
            alternates: 1,
            front_answers: 2,
            name_server: vec!["127.0.0.1".parse().unwrap()],
        };
        Dns::new(
            Arc::new(service),
            Arc::new(LonePop(Arc::default())),
            settings,
        )
    }

    /// Queries of the common shape, and their near misses.
    fn queries() -> Vec<Message> {
        let mut out = Vec::new();
        let names = [
            "app.internal.",
            "ApP.InTeRnAl.",
            "nope.internal.",
            "app.example.com.",
        ];
        let types = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::ANY,
            RecordType::TXT,
        ];
        let subnets = [
            None,
            Some(("177.0.0.0", 24)),
            Some(("2001:db8::", 56)),
            Some(("8.8.8.8", 0)),
            Some(("81.2.69.142", 32)),
        ];
        for (i, name) in names.iter().enumerate() {
            for rtype in types {
                for edns in [None, Some(512), Some(4096)] {
                    for subnet in subnets {
                        if edns.is_none() && subnet.is_some() {
                            continue;
                        }
                        let mut m = Message::query();
                        m.metadata.id = 1000 + i as u16;
                        m.metadata.recursion_desired = i % 2 == 0;
                        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
                        if let Some(payload) = edns {
                            let mut e = Edns::new();
                            e.set_max_payload(payload);
                            if let Some((addr, prefix)) = subnet {
                                e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
                                    addr.parse().unwrap(),
                                    prefix,
                                    0,
                                )));
                            }
                            // A client cookie (RFC 7873) every other time, as resolvers send.
                            if payload == 4096 && i % 2 == 1 {
                                let cookie = EdnsOption::Unknown(10, vec![7; 8]);
                                e.options_mut().insert(cookie);
                            }
                            m.set_edns(e);
                        }
                        out.push(m);
                    }
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn the_common_query_is_answered_in_place_with_the_bytes_hickory_would_write() {
        let dns = dns().await;
        let mut in_place = 0;
        for query in queries() {
            let packet = query.to_vec().unwrap();
            for source in ["177.0.0.1", "81.2.69.142", "::1"] {
                let source = source.parse().unwrap();
                let now = Instant::now();
                let fast = respond(&dns, &packet, source, Some(512), now);
                let slow = respond_any(&dns, &packet, source, Some(512), now, None);
                assert_eq!(fast, slow, "{query:?} from {source}");
                let q = wire::Query::parse(&packet).expect("the common shape");
                let answered = fast
                    .as_ref()
                    .is_some_and(|r| !Message::from_vec(r).unwrap().answers.is_empty());
                in_place += usize::from(matches!(q.qtype, 1 | 28) && answered);
            }
        }
        // Both cases of the app's name, A and AAAA, 11 EDNS variants, 3 sources: every
        // one of them was answered in place (and compared).
        assert_eq!(in_place, 2 * 2 * 11 * 3);
    }

    #[test]
    fn near_misses_of_the_common_shape_go_to_hickory() {
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("app.internal.").unwrap(),
            RecordType::A,
        ));
        let good = q.to_vec().unwrap();
        assert!(wire::Query::parse(&good).is_some());
        let mut two = q.clone();
        two.add_query(Query::query(
            Name::from_ascii("b.internal.").unwrap(),
            RecordType::A,
        ));
        let mut dotted = Message::query();
        dotted.add_query(Query::query(
            Name::from_labels(vec!["a.b".as_bytes(), b"internal"]).unwrap(),
            RecordType::A,
        ));
        let mut version = q.clone();
        let mut e = Edns::new();
        e.set_version(1);
        version.set_edns(e);
        let mut dash = Message::query();
        let name = Name::from_labels(vec![&b"-x"[..], b"app", b"internal"]).unwrap();
        dash.add_query(Query::query(name, RecordType::A));
        let mut nsid = q.clone();
        let mut e = Edns::new();
        e.options_mut().insert(EdnsOption::Unknown(3, Vec::new()));
        nsid.set_edns(e);
        let mut trailing = good.clone();
        trailing.push(0);
        let mut response = good.clone();
        response[2] |= 0x80;
        for packet in [
            two.to_vec().unwrap(),
            dotted.to_vec().unwrap(),
            version.to_vec().unwrap(),
            nsid.to_vec().unwrap(),
            dash.to_vec().unwrap(),
            trailing,
            response,
            good[..good.len() - 1].to_vec(),
            good[..11].to_vec(),
        ] {
            assert!(wire::Query::parse(&packet).is_none(), "{packet:?}");
        }
    }

    /// The native scorer, recording how many clients each `rank` call was for.
    #[derive(Default)]
    struct Batches(std::sync::Mutex<Vec<usize>>);
    impl ScoringPolicy for Batches {
        fn name(&self) -> &str {
            "batches"
        }
        fn pick(&self, req: &PickRequest<'_>, candidates: &[RoutedBackend]) -> Option<usize> {
            NativeScorer.pick(req, candidates)
        }
        fn rank(
            &self,
            requests: &[PickRequest<'_>],
            candidates: &[RoutedBackend],
            n: usize,
        ) -> Vec<Vec<usize>> {
            self.0.lock().unwrap().push(requests.len());
            NativeScorer.rank(requests, candidates, n)
        }
    }

    #[tokio::test]
    async fn a_batchs_address_questions_for_one_app_are_ranked_in_one_call() {
        let batches = Arc::new(Batches::default());
        let batched = dns_deciding_by(batches.clone()).await;
        let one_by_one = dns().await;
        let (brazil, britain) = ("177.0.0.1", "81.2.69.142");
        let asked = [
            ("app", Wanted::Addr(Family::V4), brazil),
            ("internal", Wanted::Ns, brazil),
            ("app", Wanted::Addr(Family::V4), britain),
            ("app", Wanted::Addr(Family::V4), britain),
            ("app", Wanted::Addr(Family::V6), britain),
            ("nope", Wanted::Addr(Family::V4), brazil),
            ("app", Wanted::Any, britain),
            ("app", Wanted::Addr(Family::V4), "81.2.69.143"),
        ];
        let names: Vec<String> = asked
            .iter()
            .map(|(n, ..)| match *n {
                "internal" => "internal".to_owned(),
                n => format!("{n}.internal"),
            })
            .collect();
        let questions: Vec<Question<'_>> = asked
            .iter()
            .zip(&names)
            .map(|(&(_, wanted, ip), name)| Question {
                name,
                wanted,
                client: ip.parse().unwrap(),
            })
            .collect();
        let answers = batched.answer_many(&questions);
        // Each answer is the one its question gets alone ...
        for (q, answer) in questions.iter().zip(&answers) {
            assert_eq!(
                *answer,
                one_by_one.answer(q.name, q.wanted, q.client),
                "{q:?}"
            );
        }
        // ... which differ by client (Brazil's backend first for Brazil) ...
        assert_ne!(answers[0], answers[2]);
        // ... and app's address questions were ranked in one call per family (after ANY,
        // answered on its own as it comes).
        assert_eq!(*batches.0.lock().unwrap(), [1, 4, 1]);
    }
}
