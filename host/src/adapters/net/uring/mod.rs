//! The io_uring data path's socket technology: one ring per data-path thread, driven from
//! that thread's current-thread tokio runtime (so timers, `spawn_local` and everything
//! async in the application work unchanged), and the operations a connection needs as
//! futures over it.
//!
//! Submissions queue up in the ring and go to the kernel in one `io_uring_enter` just
//! before the runtime parks (or 32 at a time while it is busy); completions are read by
//! a task woken when the ring's descriptor turns readable in tokio's epoll. Under load
//! one system call thus carries the accepts, connects, receives and sends of many
//! connections.
//!
//! Drop safety: an operation's future may be dropped while the kernel still works on it
//! (a timeout, a drain cut-off, the other direction failing). Whatever the kernel may
//! still touch (a send's bytes, a connect's address) lives in the operation's slot, not
//! the future, and stays there until its last completion; the drop asks the kernel to
//! cancel. A receive takes its buffer from a ring of provided buffers only when data
//! arrives, so a connection waiting for bytes holds no buffer at all.

#![allow(unsafe_code)]

pub mod relay;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// Submission queue entries per ring; the completion queue is four times as large (and the
/// kernel keeps overflowing completions rather than dropping them).
const ENTRIES: u32 = 1024;
/// Provided buffers per ring and their size: a receive takes one only when bytes arrive,
/// and gives it back once they are sent on. A direction whose reads fill half a buffer
/// switches to splice, so bulk never holds these.
const BUFFERS: u16 = 128;
pub const BUFFER_SIZE: usize = 16 * 1024;
const BUFFER_GROUP: u16 = 0;
/// Queued entries that go to the kernel at once instead of at the runtime's next park.
const EAGER_BATCH: usize = 32;
/// The `user_data` of entries whose completion nobody waits for (cancellations).
const IGNORED: u64 = u64::MAX;

/// Whether this kernel lets this process use io_uring with what the data path needs
/// (multishot accept, provided buffer rings: Linux 5.19). Err names why not.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::Connect::CODE, "connect"),
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::PollAdd::CODE, "poll"),
        (opcode::Shutdown::CODE, "shutdown"),
        (opcode::Close::CODE, "close"),
        (opcode::AsyncCancel::CODE, "cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::other(format!(
                "io_uring has no {name} operation here"
            )));
        }
    }
    // Provided buffer rings and multishot accept came together (5.19).
    BufRing::new(&ring, 1, BUFFER_GROUP).map(drop)
}

/// The ring of one thread, shared by every operation started on it.
#[derive(Clone)]
pub struct Driver(Rc<RefCell<Inner>>);

thread_local! {
    /// This thread's ring, for the runtime's park hook.
    static CURRENT: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

/// What a data-path thread's runtime runs before it parks: the queued entries go to the
/// kernel. (Completions are read by the ring's reader task, inside the `LocalSet`: a
/// connection woken from here would wake the `LocalSet` from outside, a write to the
/// runtime's eventfd per park.)
pub fn before_park() {
    CURRENT.with(|c| {
        if let Some(d) = &*c.borrow() {
            d.0.borrow_mut().submit();
        }
    });
}

struct Inner {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Freed with the ring unless the kernel may still use them (`leak`).
    buffers: std::mem::ManuallyDrop<BufRing>,
    /// Operations outlived the thread's end: what they may touch is never freed.
    leak: bool,
}

#[derive(Default)]
struct Slot {
    state: State,
    completions: VecDeque<Completion>,
    waker: Option<Waker>,
    /// What the kernel may still read or write until the last completion.
    keep: Keep,
}

#[derive(Default, PartialEq)]
enum State {
    #[default]
    Free,
    InFlight,
    /// No more completions will come.
    Finished,
    /// The future was dropped; the slot is freed at the last completion.
    Abandoned,
}

#[derive(Default)]
enum Keep {
    #[default]
    Nothing,
    // Held, never read: the kernel reads them.
    Bytes(#[allow(dead_code)] Vec<u8>),
    /// A connect's address and socket (closed only after the connect's completion).
    Connect(#[allow(dead_code)] Box<socket2::SockAddr>, OwnedFd),
    /// A provided buffer a send reads from.
    Buffer(u16),
    /// A multishot accept: completions not taken are descriptors to close.
    Accepts,
}

/// What the kernel reported for one operation.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    result: i32,
    flags: u32,
}

impl Driver {
    fn new(buffers: u16) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(ENTRIES * 4)
            .setup_clamp()
            .build(ENTRIES)?;
        let buffers = BufRing::new(&ring, buffers, BUFFER_GROUP)?;
        Ok(Self(Rc::new(RefCell::new(Inner {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            buffers: std::mem::ManuallyDrop::new(buffers),
            leak: false,
        }))))
    }

    /// Makes this the ring `before_park` turns on this thread.
    fn install(&self) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// Sends what is queued and hands out what completed.
    fn turn(&self) {
        let mut inner = self.0.borrow_mut();
        inner.submit();
        inner.reap();
    }

    /// A ring for this thread, installed for `before_park` and read whenever its
    /// descriptor turns readable (a local task, for the thread's life). Must run inside
    /// the thread's runtime and `LocalSet`.
    pub fn start() -> io::Result<Self> {
        Self::start_with(BUFFERS)
    }

    fn start_with(buffers: u16) -> io::Result<Self> {
        let driver = Self::new(buffers)?;
        let ring = driver.0.borrow().ring.as_raw_fd();
        // SAFETY: the ring's descriptor stays open while the driver (holding the ring)
        // lives, and the task below holds the driver beside the registration.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        driver.install();
        let reader = driver.clone();
        tokio::task::spawn_local(async move {
            loop {
                let Ok(mut ready) = fd.readable().await else {
                    tracing::error!("the io_uring ring's descriptor failed in epoll");
                    return;
                };
                ready.clear_ready();
                reader.turn();
            }
        });
        Ok(driver)
    }

    fn push(&self, entry: squeue::Entry, keep: Keep) -> Op {
        let mut inner = self.0.borrow_mut();
        let index = match inner.free.pop() {
            Some(i) => i,
            None => {
                inner.slots.push(Slot::default());
                inner.slots.len() - 1
            }
        };
        let slot = &mut inner.slots[index];
        slot.state = State::InFlight;
        slot.keep = keep;
        inner.submit_entry(entry.user_data(index as u64));
        Op {
            driver: self.clone(),
            index,
        }
    }

    /// Accepts on `listener` until stopped: every connection as it comes, one submission
    /// for all of them.
    pub fn accept_many(&self, listener: RawFd) -> Op {
        let flags = libc_flags::SOCK_NONBLOCK | libc_flags::SOCK_CLOEXEC;
        let entry = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(flags)
            .build();
        self.push(entry, Keep::Accepts)
    }

    /// Connects `socket` to `addr`; the socket is handed back connected.
    pub async fn connect(&self, socket: OwnedFd, addr: SocketAddr) -> io::Result<OwnedFd> {
        let addr = Box::new(socket2::SockAddr::from(addr));
        let entry = opcode::Connect::new(
            types::Fd(socket.as_raw_fd()),
            addr.as_ptr().cast(),
            addr.len(),
        )
        .build();
        // The socket stays open while the connect may still use it, even when this
        // future is dropped (a timeout): it is closed after the cancelled completion.
        let mut op = self.push(entry, Keep::Connect(addr, socket));
        let done = (&mut op).await;
        let Keep::Connect(_, socket) = op.take_keep() else {
            unreachable!("a connect's slot keeps its socket");
        };
        match done.result() {
            Ok(_) => Ok(socket),
            // Some kernels hand a non-blocking connect's progress back: wait for it to
            // finish and read its outcome.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc_flags::EINPROGRESS | libc_flags::EALREADY)
                ) =>
            {
                self.poll(socket.as_raw_fd(), false).await?;
                match socket2::SockRef::from(&socket).take_error()? {
                    None => Ok(socket),
                    Some(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Waits until `fd` has bytes (or an end) to read: `readable` or for room to write.
    pub async fn poll(&self, fd: RawFd, readable: bool) -> io::Result<()> {
        let events = match readable {
            true => libc_flags::POLLIN | libc_flags::POLLRDHUP,
            false => libc_flags::POLLOUT,
        };
        let entry = opcode::PollAdd::new(types::Fd(fd), events).build();
        self.push(entry, Keep::Nothing).await.result().map(drop)
    }

    /// One receive into a provided buffer: the bytes (empty at the end of the stream).
    pub async fn recv(&self, fd: RawFd) -> io::Result<Received> {
        match self.received(self.start_recv(fd).await) {
            // Every provided buffer is out (connections whose peers stopped reading hold
            // them; the kernel says so at once, bytes or not): wait for bytes holding
            // nothing, then take one if it came back, else bring one of its own.
            Err(e) if e.raw_os_error() == Some(libc_flags::ENOBUFS) => {
                Box::pin(self.recv_when_dry(fd)).await
            }
            r => r,
        }
    }

    async fn recv_when_dry(&self, fd: RawFd) -> io::Result<Received> {
        self.poll(fd, true).await?;
        match self.received(self.start_recv(fd).await) {
            Err(e) if e.raw_os_error() == Some(libc_flags::ENOBUFS) => {
                self.recv_into_heap(fd).await
            }
            r => r,
        }
    }

    /// What a receive into a provided buffer got. A buffer the completion carries is
    /// ours, error or not: given back when the `Received` drops.
    fn received(&self, done: Completion) -> io::Result<Received> {
        let mut received = Received {
            driver: self.clone(),
            id: done.buffer(),
            heap: Vec::new(),
            len: 0,
        };
        let n = done.result()?;
        if received.id.is_some() {
            received.len = n as usize;
        }
        Ok(received)
    }

    /// A receive into a provided buffer, the kernel's pick when bytes arrive.
    pub(super) fn start_recv(&self, fd: RawFd) -> Op {
        let entry = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), BUFFER_SIZE as u32)
            .buf_group(BUFFER_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        self.push(entry, Keep::Nothing)
    }

    /// A send of `len` bytes of provided buffer `id` from `offset`; the buffer travels with
    /// the send's slot (`Op::take_buffer` when it completes; given back at its last
    /// completion if the operation is dropped first).
    pub(super) fn start_send(&self, fd: RawFd, id: u16, offset: usize, len: usize) -> Op {
        let at = self.0.borrow().buffers.address(id).wrapping_add(offset);
        let entry = opcode::Send::new(types::Fd(fd), at, len as u32)
            .flags(libc_flags::MSG_NOSIGNAL)
            .build();
        self.push(entry, Keep::Buffer(id))
    }

    pub(super) fn start_shutdown(&self, fd: RawFd) -> Op {
        let entry = opcode::Shutdown::new(types::Fd(fd), libc_flags::SHUT_WR).build();
        self.push(entry, Keep::Nothing)
    }

    /// Puts provided buffer `id` back in the ring.
    pub(super) fn give_back(&self, id: u16) {
        self.0.borrow_mut().buffers.give_back(id);
    }

    /// One receive into a buffer of its own (kept by the slot while the kernel has it).
    pub(super) async fn recv_into_heap(&self, fd: RawFd) -> io::Result<Received> {
        let mut buf = vec![0u8; BUFFER_SIZE];
        let entry = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), BUFFER_SIZE as u32).build();
        let mut op = self.push(entry, Keep::Bytes(buf));
        let done = (&mut op).await;
        let Keep::Bytes(heap) = op.take_keep() else {
            unreachable!("a receive's slot keeps its buffer");
        };
        let n = done.result()? as usize;
        Ok(Received {
            driver: self.clone(),
            id: None,
            heap,
            len: n,
        })
    }

    /// Sends all of `bytes`.
    pub async fn send_all(&self, fd: RawFd, bytes: &[u8]) -> io::Result<()> {
        let mut sent = 0;
        while sent < bytes.len() {
            // The bytes go into the slot: the kernel may read them after this future is gone.
            let rest = bytes[sent..].to_vec();
            let entry = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
                .flags(libc_flags::MSG_NOSIGNAL)
                .build();
            let n = self.push(entry, Keep::Bytes(rest)).await.result()?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += n as usize;
        }
        Ok(())
    }

    /// Ends the sending half of `fd` (a FIN after what is queued).
    pub async fn shutdown_write(&self, fd: RawFd) -> io::Result<()> {
        self.start_shutdown(fd).await.result().map(drop)
    }

    /// Closes `fd` through the ring (no system call of its own); nobody waits for it.
    pub fn close(&self, fd: OwnedFd) {
        let entry = opcode::Close::new(types::Fd(fd.into_raw_fd())).build();
        self.0.borrow_mut().submit_entry(entry.user_data(IGNORED));
    }
}

impl Inner {
    fn submit_entry(&mut self, entry: squeue::Entry) {
        // SAFETY: everything the entry points at lives in its slot (or the ring's
        // buffers) until its last completion.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            // Full: hand the queue to the kernel and try again.
            self.submit();
            self.reap();
        }
        // A busy runtime may go a while without parking (tokio then polls for events
        // without its park hook): entries go in batches rather than wait for it.
        if self.ring.submission().len() >= EAGER_BATCH {
            self.submit();
        }
    }

    /// Hands the queued entries to the kernel; when it is busy (completions it could not
    /// post yet), completions are read first and it is asked again.
    fn submit(&mut self) {
        for _ in 0..8 {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc_flags::EINTR) => {}
                    Some(libc_flags::EBUSY | libc_flags::EAGAIN) => self.reap(),
                    _ => {
                        tracing::error!(error = %e, "io_uring submission failed");
                        return;
                    }
                },
            }
        }
    }

    fn reap(&mut self) {
        let completions: Vec<(u64, Completion)> = self
            .ring
            .completion()
            .map(|c| {
                let done = Completion {
                    result: c.result(),
                    flags: c.flags(),
                };
                (c.user_data(), done)
            })
            .collect();
        for (data, done) in completions {
            if data == IGNORED {
                continue;
            }
            let index = data as usize;
            let last = !cqueue::more(done.flags);
            let slot = &mut self.slots[index];
            if slot.state == State::Abandoned {
                // Nobody takes what this completion carries: give it back.
                self.discard(index, done);
                if last {
                    self.free_slot(index);
                }
                continue;
            }
            slot.completions.push_back(done);
            if last {
                slot.state = State::Finished;
            }
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    /// Gives back what a completion nobody takes carries: a buffer, an accepted socket.
    fn discard(&mut self, index: usize, done: Completion) {
        if let Some(id) = cqueue::buffer_select(done.flags) {
            self.buffers.give_back(id);
        }
        if done.result >= 0 && matches!(self.slots[index].keep, Keep::Accepts) {
            // SAFETY: an accept's result is a new descriptor nobody else owns.
            drop(unsafe { OwnedFd::from_raw_fd(done.result) });
        }
    }

    fn free_slot(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        if let Keep::Buffer(id) = std::mem::take(&mut slot.keep) {
            self.buffers.give_back(id);
        }
        *slot = Slot::default();
        self.free.push(index);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // What is queued still goes in: closes of connections cut off as the thread ended.
        self.submit();
        match self.leak {
            true => std::mem::forget(std::mem::take(&mut self.slots)),
            // SAFETY: nothing is in flight (`finish_current`), so the kernel no longer
            // writes to the buffers; dropped once, here.
            false => unsafe { std::mem::ManuallyDrop::drop(&mut self.buffers) },
        }
    }
}

/// At a data-path thread's end, once its tasks are gone: cancels what is still in flight
/// and waits (about a second at most) for the kernel to let go of it; what it still
/// holds after that is leaked rather than freed under it.
pub fn finish_current() {
    let Some(driver) = CURRENT.with(|c| c.borrow_mut().take()) else {
        return;
    };
    let mut inner = driver.0.borrow_mut();
    let busy = |inner: &Inner| {
        inner
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.state, State::InFlight | State::Abandoned))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    for index in busy(&inner) {
        let cancel = opcode::AsyncCancel::new(index as u64)
            .build()
            .user_data(IGNORED);
        inner.submit_entry(cancel);
    }
    let wait = types::Timespec::new().nsec(50_000_000);
    for _ in 0..20 {
        inner.submit();
        inner.reap();
        if busy(&inner).is_empty() {
            return;
        }
        let args = types::SubmitArgs::new().timespec(&wait);
        let _ = inner.ring.submitter().submit_with_args(1, &args);
    }
    inner.reap();
    inner.leak = !busy(&inner).is_empty();
}

/// One submitted operation; awaiting it gives its next completion.
pub struct Op {
    driver: Driver,
    index: usize,
}

impl Op {
    fn take_keep(&mut self) -> Keep {
        std::mem::take(&mut self.driver.0.borrow_mut().slots[self.index].keep)
    }

    /// The provided buffer a completed send read from.
    pub(super) fn take_buffer(&mut self) -> Option<u16> {
        match self.take_keep() {
            Keep::Buffer(id) => Some(id),
            _ => None,
        }
    }

    /// The next completion of a multishot operation; None once it has ended.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<i32>>> {
        let mut inner = self.driver.0.borrow_mut();
        let slot = &mut inner.slots[self.index];
        if let Some(done) = slot.completions.pop_front() {
            return Poll::Ready(Some(done.result()));
        }
        if slot.state == State::Finished {
            return Poll::Ready(None);
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next connection a multishot accept took; None once it has ended.
    pub fn poll_accepted(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<OwnedFd>>> {
        self.poll_next(cx).map(|next| {
            // SAFETY: an accept's result is a new descriptor nobody else owns.
            next.map(|r| r.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
        })
    }

    /// Whether more completions will come.
    pub fn is_finished(&self) -> bool {
        let inner = self.driver.0.borrow();
        let slot = &inner.slots[self.index];
        slot.state == State::Finished && slot.completions.is_empty()
    }

    /// Asks the kernel to stop this operation; its remaining completions still come.
    pub fn cancel(&self) {
        let entry = opcode::AsyncCancel::new(self.index as u64)
            .build()
            .user_data(IGNORED);
        self.driver.0.borrow_mut().submit_entry(entry);
    }
}

impl Future for Op {
    type Output = Completion;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        let mut inner = self.driver.0.borrow_mut();
        let slot = &mut inner.slots[self.index];
        match slot.completions.pop_front() {
            Some(done) => Poll::Ready(done),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let mut inner = self.driver.0.borrow_mut();
        let slot = &mut inner.slots[self.index];
        match slot.state {
            State::Finished => {
                // Completions not taken (a multishot accept's last descriptors) close here.
                for done in std::mem::take(&mut slot.completions) {
                    inner.discard(self.index, done);
                }
                inner.free_slot(self.index);
            }
            _ => {
                slot.state = State::Abandoned;
                slot.waker = None;
                for done in std::mem::take(&mut slot.completions) {
                    inner.discard(self.index, done);
                }
                let entry = opcode::AsyncCancel::new(self.index as u64)
                    .build()
                    .user_data(IGNORED);
                inner.submit_entry(entry);
            }
        }
    }
}

impl Completion {
    /// The provided buffer this completion filled.
    pub(super) fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    pub(super) fn result(&self) -> io::Result<i32> {
        match self.result {
            n if n >= 0 => Ok(n),
            e => Err(io::Error::from_raw_os_error(-e)),
        }
    }
}

/// Bytes a receive put in a provided buffer (given back to the ring on drop), or in a
/// buffer of its own when the ring ran dry.
pub struct Received {
    driver: Driver,
    id: Option<u16>,
    pub(super) heap: Vec<u8>,
    len: usize,
}

impl Received {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> &[u8] {
        match self.id {
            // SAFETY: the buffer is this value's until it drops, and the ring's memory
            // lives as long as the driver this value holds.
            Some(id) => unsafe {
                std::slice::from_raw_parts(self.driver.0.borrow().buffers.address(id), self.len)
            },
            None => &self.heap[..self.len],
        }
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut inner = self.driver.0.borrow_mut();
            inner.buffers.give_back(id);
        }
    }
}

/// A ring of provided buffers registered with one io_uring: the kernel takes the next
/// one when a receive has bytes, and the application gives them back.
struct BufRing {
    /// The ring's entries (page aligned, as the kernel needs).
    entries: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    /// The buffers, `BUFFER_SIZE` each; pages are only touched once used.
    memory: Box<[u8]>,
    count: u16,
    tail: u16,
}

impl BufRing {
    /// `count` buffers (a power of two) registered with `ring` as group `group`.
    fn new(ring: &IoUring, count: u16, group: u16) -> io::Result<Self> {
        let size = usize::from(count) * std::mem::size_of::<types::BufRingEntry>();
        let layout = std::alloc::Layout::from_size_align(size, 4096).map_err(io::Error::other)?;
        // SAFETY: a non-zero size.
        let entries = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut buffers = Self {
            entries,
            layout,
            memory: vec![0; usize::from(count) * BUFFER_SIZE].into_boxed_slice(),
            count,
            tail: 0,
        };
        // SAFETY: the entries stay allocated (and in place) until this value drops, after
        // the ring (see `Inner`'s field order).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, group, 0)?;
        }
        for id in 0..count {
            buffers.give_back(id);
        }
        Ok(buffers)
    }

    fn address(&self, id: u16) -> *const u8 {
        self.memory[usize::from(id) * BUFFER_SIZE..].as_ptr()
    }

    /// Puts buffer `id` back in the ring for the kernel to take.
    fn give_back(&mut self, id: u16) {
        let at = usize::from(self.tail & (self.count - 1));
        // SAFETY: `at` is within the ring's `count` entries; the kernel only reads entries
        // before the published tail, and this one is past it.
        let entry = unsafe { &mut *self.entries.add(at) };
        entry.set_addr(self.address(id) as u64);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the ring's first entry; the kernel reads it
        // with acquire ordering.
        unsafe {
            let tail =
                types::BufRingEntry::tail(self.entries).cast::<std::sync::atomic::AtomicU16>();
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring using it is gone.
        unsafe { std::alloc::dealloc(self.entries.cast(), self.layout) };
    }
}

mod libc_flags {
    pub const SOCK_NONBLOCK: i32 = 0o4000;
    pub const SOCK_CLOEXEC: i32 = 0o2000000;
    pub const POLLIN: u32 = 0x1;
    pub const POLLOUT: u32 = 0x4;
    pub const POLLRDHUP: u32 = 0x2000;
    pub const MSG_NOSIGNAL: i32 = 0x4000;
    pub const SHUT_WR: i32 = 1;
    pub const ENOBUFS: i32 = 105;
    pub const EINPROGRESS: i32 = 115;
    pub const EALREADY: i32 = 114;
    pub const EBUSY: i32 = 16;
    pub const EAGAIN: i32 = 11;
    pub const EINTR: i32 = 4;
}

/// A socket closed through the ring when dropped: the close then comes after every
/// entry already queued for it (a close(2) could free its number for another socket
/// while a queued entry still names it).
pub struct RingFd {
    driver: Driver,
    fd: Option<OwnedFd>,
}

impl RingFd {
    pub fn new(driver: &Driver, fd: OwnedFd) -> Self {
        Self {
            driver: driver.clone(),
            fd: Some(fd),
        }
    }

    pub fn get(&self) -> &OwnedFd {
        self.fd.as_ref().expect("present until dropped")
    }
}

impl Drop for RingFd {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            self.driver.close(fd);
        }
    }
}

/// A client's socket on the io_uring data path (the `DataPath` adapter).
pub struct Downstream {
    pub driver: Driver,
    pub client: RingFd,
}

impl crate::application::proxy_service::DataPath for Downstream {
    type Upstream = RingFd;

    async fn dial(
        &self,
        addr: SocketAddr,
        keepalive: Option<std::time::Duration>,
    ) -> io::Result<RingFd> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, socket_with};
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::INET,
            SocketAddr::V6(_) => AddressFamily::INET6,
        };
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        let socket = socket_with(family, SocketType::STREAM, flags, None)?;
        // Set before the connect: one fewer thing between connected and relaying.
        let _ = socket2::SockRef::from(&socket).set_tcp_nodelay(true);
        if let Some(idle) = keepalive {
            super::set_backend_keepalive(&socket, idle);
        }
        let socket = self.driver.connect(socket, addr).await?;
        Ok(RingFd::new(&self.driver, socket))
    }

    async fn send_early(&mut self, upstream: &mut RingFd, bytes: Vec<u8>) -> io::Result<()> {
        self.driver
            .send_all(upstream.get().as_raw_fd(), &bytes)
            .await
    }

    async fn relay(
        &mut self,
        upstream: RingFd,
        pool: &super::BufferPool,
        idle: Option<std::time::Duration>,
        traffic: &crate::domain::model::Traffic,
    ) -> io::Result<(u64, u64)> {
        let (client, backend) = (self.client.get(), upstream.get());
        let relayed = relay::relay(&self.driver, client, backend, pool, idle, traffic).await;
        if relayed.is_err() {
            // An abort on one side is an abort on both: a reset, not a FIN.
            for s in [client, backend] {
                let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
            }
        }
        relayed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// Receives that find every provided buffer taken (their peers stopped reading, say)
    /// still get their bytes.
    #[test]
    fn a_receive_gets_its_bytes_when_the_provided_buffers_are_all_out() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(before_park)
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let driver = Driver::start_with(2).unwrap();
            let mut held = Vec::new();
            let mut peers = Vec::new();
            for i in 0..3u8 {
                let (mut ours, theirs) = UnixStream::pair().unwrap();
                ours.write_all(&[i; 10]).unwrap();
                let got = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    driver.recv(theirs.as_raw_fd()),
                )
                .await
                .expect("a receive with the buffers all out waits forever")
                .unwrap();
                assert_eq!(got.bytes(), &[i; 10]);
                held.push(got);
                peers.push((ours, theirs));
            }
            // Two came from the ring, the third brought its own.
            assert_eq!(held.iter().filter(|r| r.id.is_some()).count(), 2);
        });
        drop(local);
        finish_current();
    }
}
