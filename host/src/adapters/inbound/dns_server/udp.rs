//! Datagrams in batches: every query already queued is read by one `recvmmsg`, and the
//! answers go out by one `sendmmsg`, so a busy socket costs two system calls (and one
//! wake-up of each client) per batch, not two per query.

use std::net::{SocketAddr, UdpSocket};

/// A query longer than this is not one we answer (a question and an OPT record).
const DATAGRAM: usize = 4096;

/// Receive buffers for a batch of datagrams, and (Linux) the headers pointing at them:
/// built once, never resized, so the pointers stay valid while the batch lives.
pub struct Batch {
    data: Vec<u8>,
    /// Of each datagram received: its buffer, length and sender.
    got: Vec<(usize, usize, SocketAddr)>,
    #[cfg(target_os = "linux")]
    headers: Headers,
}

#[cfg(target_os = "linux")]
struct Headers {
    addrs: Vec<libc::sockaddr_storage>,
    _iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    #[allow(unsafe_code)]
    pub fn new(size: usize) -> Self {
        let mut data = vec![0; size * DATAGRAM];
        #[cfg(target_os = "linux")]
        let headers = {
            // SAFETY: all-zero is a valid sockaddr_storage and mmsghdr.
            let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; size];
            let mut iovs: Vec<libc::iovec> = data
                .chunks_mut(DATAGRAM)
                .map(|buf| libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                })
                .collect();
            let msgs = addrs
                .iter_mut()
                .zip(iovs.iter_mut())
                .map(|(addr, iov)| {
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name = std::ptr::from_mut(addr).cast();
                    m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            Headers {
                addrs,
                _iovs: iovs,
                msgs,
            }
        };
        Self {
            data,
            got: Vec::with_capacity(size),
            #[cfg(target_os = "linux")]
            headers,
        }
    }

    /// The datagrams of the last [`Batch::recv`]: their bytes and senders.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.got
            .iter()
            .map(|&(at, len, peer)| (&self.data[at * DATAGRAM..][..len], peer))
    }

    /// Waits for a datagram (up to the socket's read timeout), then takes every one
    /// already queued behind it, as many as fit.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    pub fn recv(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.got.clear();
        let Headers { addrs, msgs, .. } = &mut self.headers;
        for m in msgs.iter_mut() {
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
        }
        // SAFETY: every header points at a buffer, an iovec and an address of its own in
        // this batch, which outlives the call and was never resized; the kernel writes no
        // more than their lengths.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as u32,
                // c_int on glibc, c_uint on musl.
                libc::MSG_WAITFORONE as _,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (at, (m, addr)) in msgs.iter().zip(addrs.iter()).take(n as usize).enumerate() {
            // Datagrams from something other than IP (none on a UDP socket) are skipped.
            if let Some(peer) = socket_addr(addr) {
                self.got.push((at, m.msg_len as usize, peer));
            }
        }
        Ok(self.got.len())
    }

    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        self.got.clear();
        let (len, peer) = socket.recv_from(&mut self.data[..DATAGRAM])?;
        self.got.push((0, len, peer));
        Ok(1)
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn socket_addr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{SocketAddrV4, SocketAddrV6};
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*std::ptr::from_ref(addr).cast::<libc::sockaddr_in>() };
            let ip = u32::from_be(a.sin_addr.s_addr);
            Some(SocketAddrV4::new(ip.into(), u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*std::ptr::from_ref(addr).cast::<libc::sockaddr_in6>() };
            let ip = a.sin6_addr.s6_addr.into();
            let port = u16::from_be(a.sin6_port);
            Some(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id).into())
        }
        _ => None,
    }
}

/// Sends `replies` (emptying it), as few calls as the kernel takes; a reply the kernel
/// refuses (its client's port unreachable, say) is dropped.
pub fn send_all(socket: &UdpSocket, replies: &mut Vec<(Vec<u8>, SocketAddr)>) {
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
fn send_batch(socket: &UdpSocket, replies: &[(Vec<u8>, SocketAddr)]) -> std::io::Result<usize> {
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
fn send_batch(socket: &UdpSocket, replies: &[(Vec<u8>, SocketAddr)]) -> std::io::Result<usize> {
    let (reply, peer) = &replies[0];
    socket.send_to(reply, *peer).map(|_| 1)
}
