//! The per-connection I/O task and the connection's shard-local state.
//!
//! Reads go through the shard's scratch buffer: an idle connection holds no read buffer,
//! only a partial frame when one is split across reads (freed when complete). Writes gather
//! the queued frames into one `sendmsg`: small frames are copied one after another into a
//! piece the connection owns (a few allocations per write, not two per frame), and large
//! message bodies are queued shared, with no copy. The task reads only when the connection
//! and the shard can take more work (back-pressure), and stops at a fatal error, a GO_AWAY,
//! EOF, or a hand-over.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use super::now_ms;
use super::shard::Shard;
use crate::ids::{DeviceId, ServerMsgId, UserId};
use crate::limits;
use crate::metrics::CloseReason;
use crate::proto::{split_frame, ServerFrame};
use crate::ratelimit::TokenBucket;
use crate::session::{
    protocol_error, DeliveryWindow, Handshake, InFlight, Phase, SessionParams, Step,
};
use crate::transport::{ws, Layers};

/// Wire counters of the shard that runs on this thread. Each shard is one thread, so these
/// are the shard's own plain counters (no atomics), read by its metrics snapshot.
#[derive(Debug, Default)]
pub struct IoCounts {
    /// Frames read from clients.
    pub frames_in: Cell<u64>,
    /// Bytes read from clients.
    pub bytes_in: Cell<u64>,
    /// Frames queued to clients.
    pub frames_out: Cell<u64>,
    /// Bytes written to clients.
    pub bytes_out: Cell<u64>,
    /// ERROR frames queued, by code.
    pub errors_sent: [Cell<u64>; crate::metrics::ERROR_CODES_MAX],
    /// Connections closed as slow consumers.
    pub slow_consumers: Cell<u64>,
    /// Outbound bytes queued on this shard's connections now.
    pub out_bytes_queued: Cell<u64>,
}

/// One piece of queued output.
///
/// Small frames are copied, one after another, onto the end of an `Owned` piece: a burst of
/// deliveries then costs one allocation that grows as frames arrive, not a header buffer, a
/// `Bytes` control block and a body reference per frame (measured in the groups benchmark:
/// glibc's malloc and `Bytes`' drop were 7% of the box's CPU at 40 groups; benchmarks.md,
/// Groups, tenth session). Bodies larger than [`limits::COPIED_BODY_BYTES_MAX`] stay `Shared`,
/// so a large group message is not copied per member. Both kinds are freed once written: an
/// idle connection holds no output buffer.
#[derive(Debug)]
enum Piece {
    Owned(Vec<u8>),
    Shared(Bytes),
}

impl std::ops::Deref for Piece {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Piece::Owned(v) => v,
            Piece::Shared(b) => b,
        }
    }
}

thread_local! {
    /// This thread's buffer for encoding a frame before it is copied into a connection's
    /// output, so that encoding allocates nothing once it has grown.
    static ENCODE_SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

thread_local! {
    /// This thread's (shard's) wire counters.
    pub static IO_COUNTS: IoCounts = IoCounts::default();
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// Mutable state of one connection.
#[derive(Debug)]
struct ConnState {
    hs: Handshake,
    out: VecDeque<Piece>,
    out_bytes: usize,
    out_offset: usize,
    partial: Vec<u8>,
    closing_since_ms: Option<u64>,
    aborted: bool,
    handover: Option<(UserId, DeviceId)>,
    last_rx_ms: u64,
    window: DeliveryWindow,
    sends_in_flight: u32,
    send_bucket: TokenBucket,
    send_refusals: u32,
    /// When queued output last moved (or began to wait), monotonic ms: a write stall's start.
    out_since_ms: u64,
    /// TLS and WebSocket state; `None` on plain TCP (which then costs nothing for them).
    /// `out` holds protocol bytes (already in WebSocket frames); `layers.wire_out` holds bytes
    /// for the socket. `out_bytes` counts both.
    layers: Option<Box<Layers>>,
}

impl ConnState {
    /// Counts `n` bytes newly added to `layers.wire_out` as queued output.
    fn wire_added(&mut self, n: usize) {
        if n > 0 {
            self.queued(n);
        }
    }

    /// Counts `n` bytes newly added to `out` (or to `layers.wire_out`) as queued output.
    fn queued(&mut self, n: usize) {
        if self.out_bytes == 0 {
            // The real clock, not the cached one: that is refreshed on reads, and a connection
            // parked by back-pressure is not read (its stall would start in the past).
            self.out_since_ms = super::mono_ms();
        }
        self.out_bytes += n;
        IO_COUNTS.with(|c| bump(&c.out_bytes_queued, n as u64));
    }

    /// Counts `n` bytes of `layers.wire_out` as written.
    fn wire_sent(&mut self, n: usize) {
        if let Some(l) = &mut self.layers {
            l.wire_written(n);
        }
        self.out_bytes -= n;
        IO_COUNTS.with(|c| c.out_bytes_queued.set(c.out_bytes_queued.get() - n as u64));
        if n > 0 {
            self.out_since_ms = super::mono_ms();
        }
    }

    /// Whether protocol frames can go out now (always on plain TCP).
    fn transport_ready(&self) -> bool {
        self.layers.as_ref().is_none_or(|l| l.ready())
    }
}

/// One connection's shard-local state, shared between its I/O task and the shard (which
/// queues frames to it and wakes it).
#[derive(Debug)]
pub struct Conn {
    /// Generation: tells this connection from a later one in the same slot.
    pub gen: u32,
    st: RefCell<ConnState>,
    waker: RefCell<Option<Waker>>,
    now_ms: Cell<u64>,
    /// The user whose session list on this shard holds this connection (set at login on the
    /// owner shard; kept after the phase moves to `Closed` so removal finds the entry).
    pub session_of: Cell<Option<UserId>>,
    /// Whether the task is parked in the shard's back-pressure list (at most once).
    pub parked: Cell<bool>,
    /// The client closed its sending side.
    eof: Cell<bool>,
    /// Why the server closes it (set by the first decision; the metrics label).
    close_reason: Cell<CloseReason>,
    /// Presence subscriptions and the typing limit, made on first use: a connection that never
    /// follows anyone or types pays 8 bytes for them.
    extras: RefCell<Option<Box<ConnExtras>>>,
}

/// State only some connections need.
#[derive(Debug)]
struct ConnExtras {
    /// Users whose presence this connection follows, sorted, at most
    /// `limits.presence_subscriptions_max`.
    subs: Vec<UserId>,
    /// Typing indicators this connection may still send (`limits.typing_rate_per_s`).
    typing: TokenBucket,
}

impl Conn {
    /// A connection in `hs`'s phase.
    pub fn new(gen: u32, hs: Handshake, now_ms: u64, send_burst: u32) -> Conn {
        Conn {
            gen,
            st: RefCell::new(ConnState {
                hs,
                out: VecDeque::new(),
                out_bytes: 0,
                out_offset: 0,
                partial: Vec::new(),
                closing_since_ms: None,
                aborted: false,
                handover: None,
                last_rx_ms: now_ms,
                window: DeliveryWindow::default(),
                sends_in_flight: 0,
                send_bucket: TokenBucket::full(send_burst, super::mono_ms()),
                send_refusals: 0,
                out_since_ms: super::mono_ms(),
                layers: None,
            }),
            waker: RefCell::new(None),
            now_ms: Cell::new(now_ms),
            session_of: Cell::new(None),
            parked: Cell::new(false),
            eof: Cell::new(false),
            close_reason: Cell::new(CloseReason::Peer),
            extras: RefCell::new(None),
        }
    }

    fn with_extras<R>(&self, typing_burst: u32, f: impl FnOnce(&mut ConnExtras) -> R) -> R {
        let mut e = self.extras.borrow_mut();
        let e = e.get_or_insert_with(|| {
            Box::new(ConnExtras {
                subs: Vec::new(),
                typing: TokenBucket::full(typing_burst, super::mono_ms()),
            })
        });
        f(e)
    }

    /// Adds (`add`) or removes presence subscriptions; returns the users that changed (new or
    /// removed ones, in order), or the would-be total when adding passes `max`.
    pub fn update_subs(
        &self,
        add: bool,
        users: &[UserId],
        max: usize,
        typing_burst: u32,
    ) -> Result<Vec<UserId>, usize> {
        if !add && self.extras.borrow().is_none() {
            return Ok(Vec::new());
        }
        self.with_extras(typing_burst, |e| {
            let mut changed = Vec::new();
            if add {
                let mut fresh: Vec<UserId> = users
                    .iter()
                    .copied()
                    .filter(|u| e.subs.binary_search(u).is_err())
                    .collect();
                fresh.sort_unstable();
                fresh.dedup();
                let total = e.subs.len() + fresh.len();
                if total > max {
                    return Err(total);
                }
                for u in fresh {
                    let at = e.subs.binary_search(&u).unwrap_err();
                    e.subs.insert(at, u);
                    changed.push(u);
                }
            } else {
                for u in users {
                    if let Ok(at) = e.subs.binary_search(u) {
                        e.subs.remove(at);
                        changed.push(*u);
                    }
                }
            }
            Ok(changed)
        })
    }

    /// Every presence subscription, removed (the connection is closing).
    pub fn take_subs(&self) -> Vec<UserId> {
        self.extras
            .borrow_mut()
            .as_mut()
            .map(|e| std::mem::take(&mut e.subs))
            .unwrap_or_default()
    }

    /// Charges one typing indicator to the connection's limit; false when over it.
    pub fn charge_typing(&self, now_ms: u64, rate_per_s: u32, burst: u32) -> bool {
        rate_per_s == 0 || self.with_extras(burst, |e| e.typing.take(now_ms, rate_per_s, burst))
    }

    /// Charges one SEND to the connection's rate limit: `Ok` when within it, else the number
    /// of SENDs refused in a row (this one included).
    pub fn charge_send(&self, now_ms: u64, rate_per_s: u32, burst: u32) -> Result<(), u32> {
        let mut st = self.st.borrow_mut();
        if st.send_bucket.take(now_ms, rate_per_s, burst) {
            st.send_refusals = 0;
            Ok(())
        } else {
            st.send_refusals += 1;
            Err(st.send_refusals)
        }
    }

    /// Closes with `reason` as the recorded cause (the first cause recorded wins).
    pub fn close_as(&self, reason: CloseReason) {
        if !self.is_closing() {
            self.close_reason.set(reason);
        }
        self.close();
    }

    /// The recorded cause of the close.
    pub fn close_reason(&self) -> CloseReason {
        self.close_reason.get()
    }

    /// Wakes the connection's task (if it is waiting).
    pub fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Phase of the state machine.
    pub fn phase(&self) -> Phase {
        self.st.borrow().hs.phase()
    }

    /// Queues encoded bytes (a frame, or a part of one) as a shared piece and wakes the task.
    fn push_bytes(&self, b: Bytes) {
        let mut st = self.st.borrow_mut();
        // An empty piece must not enter the queue: a write takes 0 bytes from it and never
        // removes it, and the write loop would spin forever.
        if st.aborted || b.is_empty() {
            return;
        }
        st.queued(b.len());
        st.out.push_back(Piece::Shared(b));
        drop(st);
        self.wake();
    }

    /// Queues the concatenation of `parts` (one frame, or its pieces) by copying it onto the
    /// end of the last queued piece when that piece is the connection's own and has room
    /// under [`limits::OWNED_PIECE_BYTES_MAX`]; else in a new owned piece. Wakes the task.
    fn push_copied(&self, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut st = self.st.borrow_mut();
        if st.aborted || len == 0 {
            return;
        }
        st.queued(len);
        // The front piece may be partly written (`out_offset`): appending leaves its written
        // prefix where it is, so the offset stays right.
        let fits = matches!(st.out.back(),
            Some(Piece::Owned(v)) if v.len() + len <= limits::OWNED_PIECE_BYTES_MAX);
        if !fits {
            let first = len.max(limits::OWNED_PIECE_BYTES_FIRST);
            st.out.push_back(Piece::Owned(Vec::with_capacity(first)));
        }
        let Some(Piece::Owned(tail)) = st.out.back_mut() else {
            unreachable!("the last piece is an owned one with room, or was just pushed");
        };
        // Grow by doubling, capped at the piece bound: `Vec`'s own growth could leave a piece
        // holding up to twice that bound, which the outbound limits (counted in bytes queued)
        // would not see.
        if tail.capacity() - tail.len() < len {
            let want = (tail.capacity() * 2)
                .min(limits::OWNED_PIECE_BYTES_MAX)
                .max(tail.len() + len);
            tail.reserve_exact(want - tail.len());
        }
        for p in parts {
            tail.extend_from_slice(p);
        }
        drop(st);
        self.wake();
    }

    /// Encodes and queues a frame (in a WebSocket binary message on WebSocket connections).
    pub fn push_frame(&self, f: &ServerFrame) {
        IO_COUNTS.with(|c| {
            bump(&c.frames_out, 1);
            if let ServerFrame::Error { code, .. } = f {
                let i = usize::from(*code).min(crate::metrics::ERROR_CODES_MAX - 1);
                bump(&c.errors_sent[i], 1);
            }
        });
        let Some(ws) = self.frame_wrapping() else {
            return;
        };
        ENCODE_SCRATCH.with(|cell| {
            let mut b = cell.borrow_mut();
            b.clear();
            // Leave room for the WebSocket header in front, so that it is written in place.
            let gap = if ws { limits::WS_HEADER_BYTES_MAX } else { 0 };
            b.resize(gap, 0);
            f.encode(&mut b);
            let mut start = 0;
            if ws {
                let mut h = [0u8; limits::WS_HEADER_BYTES_MAX];
                let n = ws::binary_header(b.len() - gap, &mut h);
                b[gap - n..gap].copy_from_slice(&h[..n]);
                start = gap - n;
            }
            // Server frames encoded here are small as a rule (a full group's member list, 1,024
            // members of 9 bytes, is about 9 KiB), so copying them is cheap.
            self.push_copied(&[&b[start..]]);
            // A rare large frame must not keep its buffer for good.
            if b.capacity() > limits::OWNED_PIECE_BYTES_MAX {
                *b = BytesMut::new();
            }
        });
    }

    /// Queues one frame given as an encoded head and a message body: a DELIVER's header and
    /// its body. A body up to [`limits::COPIED_BODY_BYTES_MAX`] is copied with the head into
    /// the connection's own output; a larger one is queued shared (not copied).
    pub fn push_frame_parts(&self, head: &[u8], body: &Bytes) {
        let Some(ws) = self.frame_wrapping() else {
            return;
        };
        let mut h = [0u8; limits::WS_HEADER_BYTES_MAX];
        let n = if ws {
            ws::binary_header(head.len() + body.len(), &mut h)
        } else {
            0
        };
        if body.len() <= limits::COPIED_BODY_BYTES_MAX {
            self.push_copied(&[&h[..n], head, body]);
        } else {
            self.push_copied(&[&h[..n], head]);
            self.push_bytes(body.clone());
        }
    }

    /// `Some(in_websocket)` when protocol frames can be queued; `None` while a TLS handshake
    /// or WebSocket upgrade is unfinished (only a timeout or a drain pushes frames then, and
    /// the connection is closing: the frame could not be sent, so it is dropped).
    fn frame_wrapping(&self) -> Option<bool> {
        let st = self.st.borrow();
        match &st.layers {
            None => Some(false),
            Some(l) if l.ready() => Some(l.frames_in_websocket()),
            Some(_) => None,
        }
    }

    /// Gives the connection its transport layers (TLS, WebSocket); before any I/O.
    pub fn set_layers(&self, layers: Option<Box<Layers>>) {
        self.st.borrow_mut().layers = layers;
    }

    /// Whether the TLS handshake and WebSocket upgrade (where there are any) are done.
    pub fn transport_ready(&self) -> bool {
        self.st.borrow().transport_ready()
    }

    /// Stops reading; the task flushes what is queued, then closes.
    pub fn close(&self) {
        let mut st = self.st.borrow_mut();
        if st.closing_since_ms.is_none() {
            st.closing_since_ms = Some(self.now_ms.get());
            st.hs.close();
        }
        drop(st);
        self.wake();
    }

    /// Drops the connection without flushing (close grace expired).
    pub fn abort(&self) {
        self.st.borrow_mut().aborted = true;
        self.wake();
    }

    /// How long queued output has waited without any of it being written, ms (0 if none is
    /// queued); `now_ms` is monotonic (`runtime::mono_ms`).
    pub fn write_stalled_ms(&self, now_ms: u64) -> u64 {
        let st = self.st.borrow();
        if st.out_bytes == 0 {
            0
        } else {
            now_ms.saturating_sub(st.out_since_ms)
        }
    }

    /// Whether the connection is moving to its owner shard (its end here is not a close).
    pub fn is_handing_over(&self) -> bool {
        self.st.borrow().handover.is_some()
    }

    /// Whether a close is under way.
    pub fn is_closing(&self) -> bool {
        self.st.borrow().closing_since_ms.is_some()
    }

    /// When the close began.
    pub fn closing_since(&self) -> Option<u64> {
        self.st.borrow().closing_since_ms
    }

    /// Marks the connection for hand-over to the user's owner shard once its output drains.
    pub fn start_handover(&self, user: UserId, device: DeviceId) {
        self.st.borrow_mut().handover = Some((user, device));
    }

    /// Unprocessed input carried over from another shard.
    pub fn set_partial(&self, bytes: Vec<u8>) {
        self.st.borrow_mut().partial = bytes;
    }

    /// A SEND left for routing.
    pub fn send_started(&self) {
        self.st.borrow_mut().sends_in_flight += 1;
    }

    /// A SEND was answered.
    pub fn send_finished(&self) {
        let mut st = self.st.borrow_mut();
        st.sends_in_flight = st.sends_in_flight.saturating_sub(1);
    }

    /// See [`DeliveryWindow::acked`].
    pub fn acked(&self, id: ServerMsgId) -> Option<InFlight> {
        self.st.borrow_mut().window.acked(id)
    }

    /// See [`DeliveryWindow::delivered`].
    pub fn delivered(&self, f: InFlight) {
        self.st.borrow_mut().window.delivered(f)
    }

    /// Outbound bytes queued.
    pub fn out_bytes(&self) -> usize {
        self.st.borrow().out_bytes
    }

    /// See [`DeliveryWindow::skipped`].
    pub fn skipped(&self, id: ServerMsgId) {
        self.st.borrow_mut().window.skipped(id)
    }

    /// See [`DeliveryWindow::room`].
    pub fn room(&self, window: usize) -> usize {
        self.st.borrow().window.room(window)
    }

    /// See [`DeliveryWindow::cursor`].
    pub fn cursor(&self) -> Option<ServerMsgId> {
        self.st.borrow().window.cursor()
    }

    /// See [`DeliveryWindow::caught_up`].
    pub fn caught_up(&self) -> bool {
        self.st.borrow().window.caught_up()
    }

    /// See [`DeliveryWindow::set_caught_up`].
    pub fn set_caught_up(&self, v: bool) {
        self.st.borrow_mut().window.set_caught_up(v)
    }

    /// When the last frame arrived.
    pub fn last_rx_ms(&self) -> u64 {
        self.st.borrow().last_rx_ms
    }

    /// See [`Handshake::check_login_timeout`].
    pub fn check_login_timeout(&self, now_ms: u64, params: &SessionParams) -> Option<Step> {
        self.now_ms.set(now_ms);
        self.st.borrow_mut().hs.check_login_timeout(now_ms, params)
    }

    fn can_read(&self, shard: &Shard) -> bool {
        let st = self.st.borrow();
        st.closing_since_ms.is_none()
            && st.handover.is_none()
            && st.out_bytes < shard.cfg.outbound_bytes_max / 2
            && st.sends_in_flight < limits::SENDS_IN_FLIGHT_MAX
    }

    fn advance(st: &mut ConnState, mut n: usize) {
        st.out_bytes -= n;
        IO_COUNTS.with(|c| c.out_bytes_queued.set(c.out_bytes_queued.get() - n as u64));
        while n > 0 {
            let front_left = st.out[0].len() - st.out_offset;
            if n >= front_left {
                n -= front_left;
                st.out.pop_front();
                st.out_offset = 0;
            } else {
                st.out_offset += n;
                n = 0;
            }
        }
        // Defensive: no empty piece may stay at the front (see `push_bytes`).
        while st.out.front().is_some_and(|b| b.len() == st.out_offset) {
            st.out.pop_front();
            st.out_offset = 0;
        }
        if st.out.is_empty() {
            // Give the ring buffer back: idle connections hold no buffers.
            st.out = VecDeque::new();
        }
    }

    /// Writes as much queued output as the socket takes: bytes the layers produced first,
    /// then queued frames (encrypted on the way on TLS). `Ok` also when it would block (write
    /// interest is then registered with the reactor).
    fn flush(&self, shard: &Shard, stream: &mut TcpStream, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            let mut guard = self.st.borrow_mut();
            let st = &mut *guard;
            let Some(layers) = st.layers.as_mut() else {
                drop(guard);
                return self.flush_frames(stream, cx);
            };
            let pending = layers.wire_pending();
            if pending > 0 {
                let front = &layers.wire_out[layers.wire_off..];
                // SAFETY: plain non-blocking send from a live buffer on a valid fd.
                let n = unsafe {
                    libc::send(
                        stream.as_raw_fd(),
                        front.as_ptr() as *const libc::c_void,
                        front.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n >= 0 {
                    IO_COUNTS.with(|c| bump(&c.bytes_out, n as u64));
                    st.wire_sent(n as usize);
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        let r = Pin::new(&mut *stream)
                            .poll_write(cx, &layers.wire_out[layers.wire_off..]);
                        match r {
                            Poll::Ready(Ok(n)) => {
                                IO_COUNTS.with(|c| bump(&c.bytes_out, n as u64));
                                st.wire_sent(n);
                                continue;
                            }
                            Poll::Ready(Err(e)) => return Err(e),
                            Poll::Pending => return Ok(()),
                        }
                    }
                    _ => return Err(err),
                }
            }
            if st.out.is_empty() || !layers.can_flush() {
                return Ok(());
            }
            if layers.tls.is_none() {
                // Plain WebSocket: the frames are already wrapped; write them without a copy.
                drop(guard);
                return self.flush_frames(stream, cx);
            }
            // TLS: gather queued frames into records (one record for many small frames).
            let mut plain = shard.plain_scratch.take();
            plain.clear();
            for (i, b) in st.out.iter().enumerate() {
                let s = if i == 0 { &b[st.out_offset..] } else { &b[..] };
                let room = limits::TLS_WRITE_PLAIN_BYTES_MAX - plain.len();
                if room == 0 {
                    break;
                }
                plain.extend_from_slice(&s[..s.len().min(room)]);
            }
            Self::advance(st, plain.len());
            let layers = st.layers.as_mut().expect("checked above");
            let before = layers.wire_out.len();
            let tls = layers.tls.as_mut().expect("checked above");
            let r = tls.encrypt(&plain, &mut layers.wire_out);
            let added = layers.wire_out.len() - before;
            shard.plain_scratch.replace(plain);
            st.wire_added(added);
            r.map_err(io::Error::other)?;
        }
    }

    /// Writes queued frames with one gathering `sendmsg` per batch (plain TCP, plain
    /// WebSocket).
    fn flush_frames(&self, stream: &mut TcpStream, cx: &mut Context<'_>) -> io::Result<()> {
        let mut st = self.st.borrow_mut();
        while !st.out.is_empty() {
            let mut iov: [libc::iovec; limits::WRITE_IOVECS_MAX] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
                limits::WRITE_IOVECS_MAX];
            let mut count = 0;
            let mut total = 0;
            for (i, b) in st.out.iter().enumerate() {
                if count == limits::WRITE_IOVECS_MAX || total >= limits::WRITE_BATCH_BYTES_MAX {
                    break;
                }
                let s = if i == 0 { &b[st.out_offset..] } else { &b[..] };
                iov[count] = libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                };
                count += 1;
                total += s.len();
            }
            // SAFETY: msghdr is zero-initialisable; iovecs point into `st.out`, which is not
            // touched until sendmsg returns.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = count as _;
                libc::sendmsg(
                    stream.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                IO_COUNTS.with(|c| bump(&c.bytes_out, n as u64));
                if n > 0 {
                    st.out_since_ms = super::mono_ms();
                }
                Self::advance(&mut st, n as usize);
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // Let glommio register write interest (it may also write a little).
                    let front = &st.out[0][st.out_offset..];
                    match Pin::new(&mut *stream).poll_write(cx, front) {
                        Poll::Ready(Ok(n)) => {
                            IO_COUNTS.with(|c| bump(&c.bytes_out, n as u64));
                            if n > 0 {
                                st.out_since_ms = super::mono_ms();
                            }
                            Self::advance(&mut st, n)
                        }
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => return Ok(()),
                    }
                }
                _ => return Err(err),
            }
        }
        Ok(())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Bytes never written (the connection ended with output queued) leave the gauge.
        let left = self.st.get_mut().out_bytes as u64;
        if left > 0 {
            IO_COUNTS.with(|c| c.out_bytes_queued.set(c.out_bytes_queued.get() - left));
        }
    }
}

/// How a connection task ended.
enum Exit {
    Closed,
    Io(io::Error),
    Handover(UserId, DeviceId),
}

/// Feeds `data` to the state machine frame by frame; returns how many bytes it consumed.
/// Stops early at a fatal error (the rest is discarded) or a hand-over (the rest travels).
fn process(shard: &Shard, slot: u32, conn: &Rc<Conn>, data: &[u8], now: u64) -> usize {
    let mut off = 0;
    loop {
        {
            let st = conn.st.borrow();
            if st.closing_since_ms.is_some() || st.handover.is_some() {
                return off;
            }
        }
        // Before login only HELLO and LOGIN are valid, and both are small: an unauthenticated
        // peer may not make the server hold a large partial frame.
        let frame_max = match conn.phase() {
            Phase::AwaitHello | Phase::AwaitLogin => limits::FRAME_BYTES_MAX_FLOOR,
            _ => shard.cfg.max_frame_bytes,
        };
        match split_frame(&data[off..], frame_max) {
            Ok(None) => return off,
            Err(e) => {
                shard.apply_step(slot, conn, protocol_error(&e), now);
                return data.len();
            }
            Ok(Some(raw)) => {
                off += raw.total_bytes;
                IO_COUNTS.with(|c| bump(&c.frames_in, 1));
                let step = {
                    let mut st = conn.st.borrow_mut();
                    st.last_rx_ms = now;
                    st.hs
                        .handle_frame(raw.frame_type, raw.payload, now, &shard.params)
                };
                shard.apply_step(slot, conn, step, now);
            }
        }
    }
}

/// Where the protocol bytes of one read ended up after the transport layers.
enum Unwrapped {
    /// Decrypted into the plain buffer (TLS).
    Plain,
    /// Unframed into the app buffer (WebSocket, with or without TLS).
    App,
}

impl Conn {
    /// Queues the polite end of a layered connection (WebSocket Close, TLS close_notify).
    fn say_goodbye(&self) {
        let mut guard = self.st.borrow_mut();
        let st = &mut *guard;
        let Some(layers) = st.layers.as_mut() else {
            return;
        };
        let (code, why) = match self.close_reason.get() {
            CloseReason::Peer
            | CloseReason::Shutdown
            | CloseReason::Idle
            | CloseReason::Replaced => (1000, self.close_reason.get().label()),
            CloseReason::Internal | CloseReason::Io => (1011, self.close_reason.get().label()),
            other => (1008, other.label()),
        };
        let before = layers.wire_out.len();
        layers.goodbye(code, why);
        let added = layers.wire_out.len() - before;
        st.wire_added(added);
    }

    /// Runs one read through TLS and WebSocket. Bytes for the peer (handshake records,
    /// pongs, the upgrade response, alerts) are queued; protocol bytes land in `plain` or
    /// `app`. On a transport failure the peer's error answer is queued and the reason and a
    /// description are returned.
    fn unwrap_input(
        &self,
        shard: &Shard,
        fresh: &mut [u8],
        plain: &mut Vec<u8>,
        app: &mut Vec<u8>,
    ) -> Result<(Unwrapped, bool), (CloseReason, String)> {
        let mut guard = self.st.borrow_mut();
        let st = &mut *guard;
        let layers = st.layers.as_mut().expect("a layered connection");
        let before = layers.wire_out.len();
        let mut peer_closed = false;
        let mut out = Unwrapped::Plain;
        let mut fail = None;
        let mut queued_reply: Option<Bytes> = None;
        if let Some(tls) = &mut layers.tls {
            if !tls.is_established()
                && tls.pending_input_bytes() == 0
                && !tls.has_input()
                && fresh.first().is_some_and(|b| *b != 0x16)
            {
                // Not a TLS ClientHello: most likely a plaintext client on the TLS port. Answer
                // in plaintext, in its own language, so it can tell what is wrong.
                let answer: Vec<u8> = if layers.ws.is_some() {
                    let body = "this port speaks TLS: connect with wss://\n";
                    format!("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
                } else {
                    ServerFrame::Error {
                        code: crate::proto::ErrorCode::MalformedFrame as u16,
                        fatal: true,
                        ref_id: 0,
                        message: "this port speaks TLS: connect with TLS".into(),
                    }
                    .to_bytes()
                    .to_vec()
                };
                layers.wire_out.extend_from_slice(&answer);
                fail = Some((CloseReason::Tls, "plaintext on a TLS port".to_string()));
            } else {
                match tls.handle_input(fresh, plain, &mut layers.wire_out) {
                    Ok(p) => {
                        if p.established_now {
                            shard.count_tls_handshake(tls.handshake_kind());
                        }
                        peer_closed |= p.peer_closed;
                    }
                    Err(e) => fail = Some((CloseReason::Tls, format!("TLS: {e}"))),
                }
            }
        }
        if fail.is_none() {
            if let Some(ws) = &mut layers.ws {
                let input: &[u8] = if layers.tls.is_some() { plain } else { fresh };
                let was_upgraded = ws.upgraded();
                let mut reply = Vec::new();
                match ws.handle_input(input, app, &mut reply) {
                    Ok(p) => {
                        if p.upgraded_now {
                            shard.count_ws_upgrade();
                        }
                        peer_closed |= p.peer_closed;
                    }
                    Err(e) => fail = Some((CloseReason::WebSocket, e.to_string())),
                }
                out = Unwrapped::App;
                if !reply.is_empty() {
                    if was_upgraded {
                        // Pongs, Close replies and framing errors: whole frames, queued after
                        // the frames already queued, so they never land inside one.
                        queued_reply = Some(Bytes::from(reply));
                    } else if let Err(e) = layers.send_plain(&reply) {
                        // The upgrade's answer (or its refusal): nothing is queued before it.
                        fail = Some((CloseReason::Tls, format!("TLS: {e}")));
                    }
                }
            }
        }
        if fail.is_some() {
            // The error answer above is the connection's last word.
            layers.goodbye_sent = true;
        }
        let added = layers.wire_out.len() - before;
        st.wire_added(added);
        if let Some(b) = queued_reply {
            st.queued(b.len());
            st.out.push_back(Piece::Shared(b));
        }
        match fail {
            Some(f) => Err(f),
            None => Ok((out, peer_closed)),
        }
    }
}

/// Processes a read on a TLS or WebSocket connection: through the layers (with the shard's
/// scratch buffers), then into the protocol.
fn consume_layered(shard: &Shard, slot: u32, conn: &Rc<Conn>, fresh: &mut [u8], now: u64) {
    let mut plain = shard.plain_scratch.take();
    let mut app = shard.app_scratch.take();
    plain.clear();
    app.clear();
    match conn.unwrap_input(shard, fresh, &mut plain, &mut app) {
        Ok((which, peer_closed)) => {
            let data = match which {
                Unwrapped::Plain => &plain,
                Unwrapped::App => &app,
            };
            if !data.is_empty() {
                consume(shard, slot, conn, data, now);
            }
            if peer_closed {
                conn.eof.set(true);
                conn.close();
            }
        }
        Err((reason, why)) => {
            tracing::debug!(shard = shard.id.0, slot, reason = reason.label(), %why, "closing connection on a transport error");
            conn.close_as(reason);
        }
    }
    // Keep the scratch buffers' capacity, within bounds.
    for (cell, mut buf) in [(&shard.plain_scratch, plain), (&shard.app_scratch, app)] {
        if buf.capacity() > limits::READ_SCRATCH_BYTES * 4 {
            buf = Vec::new();
        }
        cell.replace(buf);
    }
}

/// Processes `fresh` input, joined to any partial frame kept from earlier reads.
fn consume(shard: &Shard, slot: u32, conn: &Rc<Conn>, fresh: &[u8], now: u64) {
    let mut partial = std::mem::take(&mut conn.st.borrow_mut().partial);
    let rest: Vec<u8> = if partial.is_empty() {
        let used = process(shard, slot, conn, fresh, now);
        fresh[used..].to_vec()
    } else {
        partial.extend_from_slice(fresh);
        let used = process(shard, slot, conn, &partial, now);
        partial.drain(..used);
        partial
    };
    let mut st = conn.st.borrow_mut();
    // A closing connection discards unread input; otherwise keep the split frame (bounded by
    // the maximum frame size, which `split_frame` enforces).
    st.partial = if st.closing_since_ms.is_some() || rest.is_empty() {
        Vec::new()
    } else {
        rest
    };
}

fn poll_conn(
    shard: &Shard,
    slot: u32,
    conn: &Rc<Conn>,
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
) -> Poll<Exit> {
    {
        let mut w = conn.waker.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
    }
    for _ in 0..limits::READS_PER_POLL_MAX {
        let had_output = conn.out_bytes() > 0;
        if let Err(e) = conn.flush(shard, stream, cx) {
            return Poll::Ready(Exit::Io(e));
        }
        if had_output && conn.out_bytes() == 0 {
            // Deliveries may have stopped for lack of outbound room; feed it again.
            shard.resume_delivery(conn);
            // The shard's outbound budget may have room again for parked readers.
            shard.wake_paused();
        }
        {
            let st = conn.st.borrow();
            if st.aborted {
                return Poll::Ready(Exit::Closed);
            }
            if st.out_bytes == 0 {
                // Before closing (EOF, a fatal error, GO_AWAY), wait for the answers to the
                // SENDs already accepted: they are being stored, and a client that gets their
                // SEND_ACKs need not resend them (bounded by the sweeper's close grace period).
                let owed = st.sends_in_flight > 0;
                if st.closing_since_ms.is_some() && !owed {
                    if st.layers.as_ref().is_some_and(|l| !l.goodbye_sent) {
                        // WebSocket Close and TLS close_notify, then flush them.
                        drop(st);
                        conn.say_goodbye();
                        continue;
                    }
                    return Poll::Ready(Exit::Closed);
                }
                if let Some((u, d)) = st.handover {
                    return Poll::Ready(Exit::Handover(u, d));
                }
            }
            if st.out_bytes > shard.cfg.outbound_bytes_max && st.closing_since_ms.is_none() {
                drop(st);
                conn.push_frame(&ServerFrame::error(
                    crate::proto::ErrorCode::SlowConsumer,
                    0,
                    "outbound queue over its limit: the client does not read",
                ));
                IO_COUNTS.with(|c| bump(&c.slow_consumers, 1));
                conn.close_as(CloseReason::SlowConsumer);
                continue;
            }
        }
        if !conn.can_read(shard) {
            return Poll::Pending;
        }
        if shard.backpressured() {
            shard.park_reader(conn);
            return Poll::Pending;
        }
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) => {
                // The client finished sending: flush what it is owed (SEND_ACKs for pipelined
                // sends), then close, within the close grace period.
                drop(scratch);
                conn.eof.set(true);
                conn.close();
                continue;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Exit::Io(e)),
            Poll::Ready(Ok(n)) => {
                IO_COUNTS.with(|c| bump(&c.bytes_in, n as u64));
                let now = now_ms();
                conn.now_ms.set(now);
                if conn.st.borrow().layers.is_some() {
                    consume_layered(shard, slot, conn, &mut scratch[..n], now);
                } else {
                    consume(shard, slot, conn, &scratch[..n], now);
                }
            }
        }
    }
    // Fairness: let other connections of this shard run, then continue.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Serves one connection until it closes or moves to another shard.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, slot: u32, conn: Rc<Conn>) {
    // Input handed over from another shard may already hold whole frames.
    let carried = std::mem::take(&mut conn.st.borrow_mut().partial);
    if !carried.is_empty() {
        consume(&shard, slot, &conn, &carried, now_ms());
    }
    let exit = poll_fn(|cx| poll_conn(&shard, slot, &conn, &mut stream, cx)).await;
    match exit {
        Exit::Handover(user, device) => {
            // glommio 0.9 has no into_raw_fd: dup the socket, then drop the stream (closing
            // only our copy) and send the dup to the owner shard, with the TLS and WebSocket
            // state and the unprocessed input.
            let leftover = std::mem::take(&mut conn.st.borrow_mut().partial);
            let layers = conn.st.borrow_mut().layers.take();
            // SAFETY: dup of a valid open fd; on success we own the new descriptor.
            let dup = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            drop(stream);
            shard.remove_conn(slot);
            if dup < 0 {
                tracing::warn!(shard = shard.id.0, error = %io::Error::last_os_error(), "hand-over dup failed; closing");
                return;
            }
            // SAFETY: `dup` is a fresh descriptor owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(dup) };
            shard.hand_over(fd, user, device, leftover, layers);
        }
        Exit::Io(e) => {
            tracing::debug!(shard = shard.id.0, slot, error = %e, "connection I/O error");
            drop(stream);
            if !conn.is_closing() {
                conn.close_reason.set(CloseReason::Io);
            }
            shard.remove_conn(slot);
        }
        Exit::Closed => {
            drop(stream);
            shard.remove_conn(slot);
        }
    }
}

/// Writes `bytes` if the socket takes them at once; used to refuse a connection politely.
pub fn send_best_effort(stream: &TcpStream, bytes: &[u8]) {
    // SAFETY: plain non-blocking send on a valid fd; the result is deliberately ignored.
    unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr() as *const libc::c_void,
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}
