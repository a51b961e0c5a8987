//! The common query, read and answered in place: one question with a plain name, at most
//! an OPT record carrying at most a Client Subnet (and a cookie), answered with address
//! records. This is
//! what a resolver sends for `<app>.<domain>` nearly every time, and it is answered
//! without the allocations of hickory's `Message` (a third of a lookup's time before).
//! Anything else, and any answer this does not write (negative, SRV, truncated), goes
//! through hickory-proto in the parent module; a test holds both to the same bytes.

use std::net::IpAddr;

const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const OPTION_SUBNET: u16 = 8;
const OPTION_COOKIE: u16 = 10;
const OPTION_PADDING: u16 = 12;
/// A name of at most 255 wire bytes reads as at most 253 characters.
const NAME_MAX: usize = 253;

/// A query of the common shape, borrowing its packet.
pub struct Query<'a> {
    pub id: u16,
    pub recursion_desired: bool,
    pub qtype: u16,
    pub qclass: u16,
    /// The question as it came (name, type, class), echoed in the reply.
    question: &'a [u8],
    /// The name in lower case, labels joined by dots, no trailing dot.
    name: [u8; NAME_MAX],
    name_len: usize,
    pub edns: Option<Edns>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub payload: u16,
    pub subnet: Option<Subnet>,
}

/// An EDNS Client Subnet (RFC 7871) as asked: the address and its source prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: IpAddr,
    pub source: u8,
}

impl<'a> Query<'a> {
    /// The query in `packet` when it has the common shape; None sends it to hickory.
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        let header = packet.get(..HEADER)?;
        // A query (QR clear), opcode QUERY, not truncated; AA and RD are a client's to set.
        if header[2] & 0xfa != 0 {
            return None;
        }
        let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
        if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
            return None;
        }
        let mut name = [0u8; NAME_MAX];
        let mut name_len = 0;
        let mut at = HEADER;
        loop {
            let len = usize::from(*packet.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            // Compression pointers and extended label types have their top bits set.
            let label = packet.get(at..at + len).filter(|_| len <= 63)?;
            // Letters, digits, '-' (not first) and '_' only: hickory's path reads every
            // other byte, and a leading '-', escaped (`\-x`), and decides those names.
            if label.first() == Some(&b'-')
                || !label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
            {
                return None;
            }
            let start = name_len + usize::from(name_len > 0);
            let end = start + len;
            if end > NAME_MAX {
                return None;
            }
            if name_len > 0 {
                name[name_len] = b'.';
            }
            for (to, from) in name[start..end].iter_mut().zip(label) {
                *to = from.to_ascii_lowercase();
            }
            name_len = end;
            at += len;
        }
        if name_len == 0 {
            return None;
        }
        let fixed = packet.get(at..at + 4)?;
        let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
        let question = &packet[HEADER..at + 4];
        at += 4;
        let edns = match count(10) {
            0 => None,
            _ => {
                let (edns, end) = opt(packet, at)?;
                at = end;
                Some(edns)
            }
        };
        // Trailing bytes are hickory's to judge.
        if at != packet.len() {
            return None;
        }
        Some(Query {
            id: count(0),
            recursion_desired: header[2] & 0x01 != 0,
            qtype,
            qclass,
            question,
            name,
            name_len,
            edns,
        })
    }

    /// The name asked, lower case, no trailing dot.
    pub fn name(&self) -> &str {
        // Invariant: built from ASCII letters, digits, '-', '_' and '.'.
        std::str::from_utf8(&self.name[..self.name_len]).unwrap_or_default()
    }

    /// Writes into `out` the authoritative NOERROR reply holding `addrs` (each an A or
    /// AAAA record owned by the question's name) and, when the query had EDNS, an OPT
    /// advertising `payload` with the Client Subnet echoed at `scope`.
    pub fn answer(&self, addrs: &[IpAddr], ttl: u32, payload: u16, scope: u8, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.id.to_be_bytes());
        // QR, AA, and RD as asked; RA clear, NOERROR.
        out.extend_from_slice(&[0x84 | u8::from(self.recursion_desired), 0]);
        let answers = u16::try_from(addrs.len()).unwrap_or(u16::MAX);
        for n in [1, answers, 0, u16::from(self.edns.is_some())] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(self.question);
        for ip in addrs {
            // The owner: a pointer to the question's name, right after the header.
            out.extend_from_slice(&[0xc0, HEADER as u8]);
            let (rtype, data): (u16, &[u8]) = match ip {
                IpAddr::V4(a) => (TYPE_A, &a.octets()),
                IpAddr::V6(a) => (TYPE_AAAA, &a.octets()),
            };
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&1u16.to_be_bytes()); // IN
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
        let Some(edns) = self.edns else { return };
        out.push(0); // the root
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&payload.to_be_bytes());
        // Extended rcode 0, version 0, no flags.
        out.extend_from_slice(&[0, 0, 0, 0]);
        match edns.subnet {
            None => out.extend_from_slice(&[0, 0]),
            Some(s) => {
                let (family, bytes): (u16, &[u8]) = match masked(s.addr, s.source) {
                    IpAddr::V4(a) => (1, &a.octets()),
                    IpAddr::V6(a) => (2, &a.octets()),
                };
                let bytes = &bytes[..usize::from(s.source).div_ceil(8)];
                let len = 4 + bytes.len() as u16;
                out.extend_from_slice(&(len + 4).to_be_bytes());
                out.extend_from_slice(&OPTION_SUBNET.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&family.to_be_bytes());
                out.extend_from_slice(&[s.source, scope]);
                out.extend_from_slice(bytes);
            }
        }
    }
}

/// The OPT record at `at`, the packet's only additional record: version 0, at most one
/// Client Subnet, and no option but cookies and padding beside it. Its end.
fn opt(packet: &[u8], at: usize) -> Option<(Edns, usize)> {
    let fixed = packet.get(at..at + 11)?;
    let field = |i: usize| u16::from_be_bytes([fixed[i], fixed[i + 1]]);
    // Owned by the root; EDNS version 0 (another gets BADVERS from hickory's path).
    if fixed[0] != 0 || field(1) != TYPE_OPT || fixed[6] != 0 {
        return None;
    }
    let payload = field(3);
    let end = at + 11 + usize::from(field(9));
    let mut options = packet.get(at + 11..end)?;
    let mut subnet = None;
    while !options.is_empty() {
        let code = u16::from_be_bytes([*options.first()?, *options.get(1)?]);
        let len = usize::from(u16::from_be_bytes([*options.get(2)?, *options.get(3)?]));
        let data = options.get(4..4 + len)?;
        match code {
            OPTION_SUBNET if subnet.is_none() => subnet = Some(client_subnet(data)?),
            // What resolvers add as a matter of course, and hickory's path ignores too.
            OPTION_COOKIE | OPTION_PADDING => {}
            _ => return None,
        }
        options = &options[4 + len..];
    }
    Some((Edns { payload, subnet }, end))
}

/// RFC 7871's option data: family, source prefix, scope prefix (0 in a query), and just
/// the address bytes the source prefix covers.
fn client_subnet(data: &[u8]) -> Option<Subnet> {
    let (head, bytes) = (data.get(..4)?, &data[4..]);
    let source = head[2];
    if head[3] != 0 || bytes.len() != usize::from(source).div_ceil(8) {
        return None;
    }
    let addr = match (u16::from_be_bytes([head[0], head[1]]), source) {
        (1, 0..=32) => {
            let mut a = [0u8; 4];
            a[..bytes.len()].copy_from_slice(bytes);
            IpAddr::from(a)
        }
        (2, 0..=128) => {
            let mut a = [0u8; 16];
            a[..bytes.len()].copy_from_slice(bytes);
            IpAddr::from(a)
        }
        _ => return None,
    };
    Some(Subnet { addr, source })
}

/// `ip` with the bits past `prefix` cleared.
pub fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    ipnet::IpNet::new(ip, prefix).map_or(ip, |n| n.trunc().addr())
}
