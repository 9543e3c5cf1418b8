//! A worker process: one pinned glommio executor per core, each driving its slice of the
//! worker's users over real connections, and reporting progress and results as JSON lines on
//! stdout for the coordinator.
//!
//! Users of a worker only message users of the same worker (and of the same gateway node), so
//! each worker checks its own losses exactly; the coordinator adds the reports up.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::future::poll_fn;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use gatehouse::auth::TokenKeys;
use gatehouse::ids::{owner_node, DeviceId, ServerMsgId, UserId};
use gatehouse::proto::{
    split_frame, ClientFrame, ErrorCode, ReceiptKind, ServerFrame, HELLO_MAGIC, PROTOCOL_VERSION,
};
use gatehouse::runtime::watchdog::{self, Nudge, Pulse, StartProbe};

use crate::args::{parse_src_ips, RunArgs, Scenario};
use crate::stats::{check_loss, encode_hist, histogram, Counters, LossReport, PairSeq};
use crate::wire::{client_msg_id, split_client_msg_id, BodyHeader};

/// Client-side output buffered per connection before sends are skipped (counted).
const OUT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Offline scenario: SENDs one sender keeps in flight.
const OFFLINE_WINDOW: u32 = 256;
/// Marks the nonce of the final PING (idle), so keepalive PONGs are not counted as answers.
const FINAL_PING: u64 = 1 << 63;
/// Read scratch per executor.
const SCRATCH_BYTES: usize = 64 * 1024;

/// A client connection's byte stream: TCP, or TLS over TCP (rustls, via futures-rustls).
enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_close(cx),
        }
    }
}

/// `--tls`: the client settings every connection starts from, and the name to check.
struct TlsSetup {
    base: Arc<rustls::ClientConfig>,
    server_name: rustls::pki_types::ServerName<'static>,
}

/// What a worker prints on stdout, one JSON object per line.
#[derive(Debug, Serialize, Deserialize)]
pub enum WorkerLine {
    /// Once a second.
    Progress {
        /// Counters so far (boxed: the enum's other variant is a pointer).
        counters: Box<Counters>,
        /// Send→deliver latency of the last interval (serialized histogram).
        deliver_hist: String,
    },
    /// At the end.
    Result(Box<WorkerResult>),
}

/// A worker's final result.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    /// Counters.
    pub counters: Counters,
    /// Loss accounting.
    pub loss: LossReport,
    /// Histograms (serialized): login, ack (intended send → SEND_ACK), deliver (intended
    /// send → DELIVER), drain (offline: recipient login → delivery).
    pub hists: HashMap<String, String>,
    /// Seconds the connect phase took.
    pub connect_s: f64,
    /// Seconds the main phase took.
    pub main_s: f64,
    /// Seconds the final drain took (chat/churn: until acked messages arrived; offline: the
    /// recipients' drain).
    pub drain_s: f64,
    /// Connections answering the final PING (idle).
    pub final_pongs: u64,
    /// Handshake: logins in the reconnect phase.
    #[serde(default)]
    pub reconnect_logins: u64,
    /// Handshake with --gateway-pids: gateway CPU seconds in the connect and reconnect phases.
    #[serde(default)]
    pub gateway_cpu_s: Option<(f64, f64)>,
}

/// State shared by the executors of one worker.
struct Shared {
    args: RunArgs,
    epoch: Instant,
    keys: TokenKeys,
    src_ips: Vec<Ipv4Addr>,
    /// Global user indices of this worker, grouped by gateway node.
    by_node: Vec<Vec<u32>>,
    /// Online flag per global index − worker's first index.
    online: Vec<AtomicBool>,
    first_index: u32,
    /// Executors that finished the current phase.
    phase_done: AtomicUsize,
    /// Sends not yet answered, all executors.
    inflight: AtomicU64,
    acked: AtomicU64,
    /// Distinct messages delivered (duplicates not counted).
    delivered: AtomicU64,
    /// `--reconnect`: acknowledged messages not yet seen delivered, and messages delivered
    /// before their SEND_ACK came (a DELIVER can overtake it). The drain then waits for every
    /// acknowledged message itself, not a count: after a restart, messages stored but never
    /// acknowledged (their SEND_ACK died with the gateway) are delivered too.
    unmatched: std::sync::Mutex<(HashSet<PairSeq>, HashSet<PairSeq>)>,
    receipts: AtomicU64,
    stop: AtomicBool,
    connect_gap_ns: u64,
    cores: usize,
    tls: Option<TlsSetup>,
    /// When each user of this worker last sent LOGIN (ns since `epoch`), for the presence
    /// latency.
    login_ns: Vec<AtomicU64>,
    /// The main phase has begun (presence latencies count from then on, not during the
    /// connect ramp, when subscriptions and logins race).
    main_phase: AtomicBool,
    /// Groups: every group of this worker, as its member indices (the first creates it).
    groups: Vec<Vec<u32>>,
    /// Groups: the group of each member index.
    group_of: HashMap<u32, usize>,
    /// Groups: GROUP_OKs received for the creates.
    groups_ready: AtomicU64,
    /// Groups: member-deliveries expected and received so far (all executors).
    group_expected: AtomicU64,
    group_delivered: AtomicU64,
    /// Groups with `--reconnect`: the exact check (see [`GroupCheck`]).
    group_check: std::sync::Mutex<GroupCheck>,
}

/// Groups with `--reconnect`: a gateway restart can redeliver a message (at least once) and
/// deliver one whose SEND_ACK died with it, so counting GROUP_DELIVERs proves nothing. Instead
/// `group_delivered` counts distinct (member, message) pairs of acknowledged messages only,
/// kept exact whichever comes first, the SEND_ACK or a delivery. A group's sender and members
/// are in one worker process, so each process checks its own groups.
#[derive(Default)]
struct GroupCheck {
    acked: HashSet<u64>,
    seen: HashMap<u64, HashSet<u32>>,
}

/// Group ids used by the groups scenario: this base plus the first member's user id.
const GROUP_ID_BASE: u64 = 1 << 48;

impl Shared {
    fn online(&self, idx: u32) -> bool {
        self.online[(idx - self.first_index) as usize].load(Ordering::Relaxed)
    }
    fn set_online(&self, idx: u32, v: bool) {
        self.online[(idx - self.first_index) as usize].store(v, Ordering::Relaxed)
    }
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
    fn user(&self, idx: u32) -> UserId {
        UserId(self.args.first_user + u64::from(idx))
    }
    fn node_of(&self, idx: u32) -> usize {
        owner_node(self.user(idx), self.args.gateways.len()) as usize
    }
    /// Presence scenario: the users `idx` follows, chosen at random (seeded by `idx`, so the
    /// same after a reconnect) among this worker's users of the same node.
    fn contacts(&self, idx: u32) -> Vec<UserId> {
        let group = &self.by_node[self.node_of(idx)];
        let want = (self.args.contacts as usize).min(group.len().saturating_sub(1));
        let mut rng = fastrand::Rng::with_seed(u64::from(idx));
        let mut out = std::collections::BTreeSet::new();
        while out.len() < want {
            let c = group[rng.usize(..group.len())];
            if c != idx {
                out.insert(c);
            }
        }
        out.into_iter().map(|c| self.user(c)).collect()
    }
    /// Waits until every executor reached its `generation`-th barrier (phases in lock-step).
    async fn barrier(&self, generation: usize) {
        self.phase_done.fetch_add(1, Ordering::SeqCst);
        while self.phase_done.load(Ordering::SeqCst) < generation * self.cores {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn push_acks(c: &LConn, acks: &[ServerMsgId]) {
    for chunk in acks.chunks(gatehouse::limits::ACK_IDS_MAX) {
        c.push(&ClientFrame::Ack {
            ids: chunk.to_vec(),
        });
    }
}

/// `--ack-delay-ms`: sends the deferred ACKs that are due, every few milliseconds, for as long
/// as the executor runs (a detached task, dropped with it).
async fn ack_later(ex: Rc<Exec>) {
    let tick = Duration::from_millis(ex.sh.args.ack_delay_ms.clamp(1, 10));
    loop {
        glommio::timer::sleep(tick).await;
        let now = ex.sh.now_ns();
        let conns: Vec<Rc<LConn>> = ex.conns.borrow().values().cloned().collect();
        for c in conns {
            let mut d = c.deferred.borrow_mut();
            while d.front().is_some_and(|(due, _)| *due <= now) {
                if let Some((_, acks)) = d.pop_front() {
                    push_acks(&c, &acks);
                }
            }
        }
    }
}

/// One client connection.
struct LConn {
    idx: u32,
    out: RefCell<Vec<u8>>,
    out_off: Cell<usize>,
    partial: RefCell<Vec<u8>>,
    waker: RefCell<Option<Waker>>,
    ready: Cell<bool>,
    closing: Cell<bool>,
    done: Cell<bool>,
    /// Closed on purpose by the churn scenario (which reconnects it itself).
    retired: Cell<bool>,
    inflight: Cell<u32>,
    started: Instant,
    /// `--ack-delay-ms`: ACKs read but not yet sent, with when they are due (ns since the
    /// run's epoch).
    deferred: RefCell<std::collections::VecDeque<(u64, Vec<ServerMsgId>)>>,
}

impl LConn {
    fn new(idx: u32) -> LConn {
        LConn {
            idx,
            out: RefCell::new(Vec::new()),
            out_off: Cell::new(0),
            partial: RefCell::new(Vec::new()),
            waker: RefCell::new(None),
            ready: Cell::new(false),
            closing: Cell::new(false),
            done: Cell::new(false),
            retired: Cell::new(false),
            inflight: Cell::new(0),
            started: Instant::now(),
            deferred: RefCell::new(std::collections::VecDeque::new()),
        }
    }
    fn push(&self, f: &ClientFrame) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        self.out.borrow_mut().extend_from_slice(&b);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Per-executor state.
struct Exec {
    sh: Arc<Shared>,
    users: Vec<u32>,
    conns: RefCell<HashMap<u32, Rc<LConn>>>,
    /// Set when the run ends: no more reconnects.
    stopping: Cell<bool>,
    /// Distinct (sender, recipient, seq) delivered to this executor's users.
    seen: RefCell<HashSet<PairSeq>>,
    /// `--reconnect`: failed attempts in a row per user index (for the backoff).
    retries: RefCell<HashMap<u32, u32>>,
    scratch: RefCell<Vec<u8>>,
    counters: RefCell<Counters>,
    acked: RefCell<Vec<PairSeq>>,
    delivered: RefCell<Vec<PairSeq>>,
    next_seq: RefCell<HashMap<(u32, u32), u32>>,
    intended: RefCell<HashMap<(u32, u64), u64>>,
    h_login: RefCell<Histogram<u64>>,
    h_ack: RefCell<Histogram<u64>>,
    h_deliver: RefCell<Histogram<u64>>,
    h_interval: RefCell<Histogram<u64>>,
    rng: RefCell<fastrand::Rng>,
    /// Barriers this executor has passed.
    barriers: Cell<usize>,
    /// This executor's index in the worker.
    index: usize,
    /// Answers to the final PING.
    final_pongs: Cell<u64>,
    /// `--tls`: each user's client settings with its own session cache (a real client keeps
    /// its tickets; one shared cache would hold only a few for the one server name).
    tls_configs: RefCell<HashMap<u32, Arc<rustls::ClientConfig>>>,
    /// TCP connect + TLS handshake time, µs.
    h_tls: RefCell<Histogram<u64>>,
    /// A user's LOGIN (sent) to a follower's PRESENCE(online), µs.
    h_presence: RefCell<Histogram<u64>>,
}

impl Exec {
    async fn barrier(&self) {
        let g = self.barriers.get() + 1;
        self.barriers.set(g);
        self.sh.barrier(g).await;
    }
}

fn record(h: &RefCell<Histogram<u64>>, us: u64) {
    let _ = h.borrow_mut().record(us.max(1));
}

impl Exec {
    fn token(&self, idx: u32) -> String {
        let expiry = gatehouse_now_s() + 24 * 3600;
        self.sh.keys.mint(self.sh.user(idx), DeviceId(1), expiry)
    }

    fn connect(&self, idx: u32) -> std::io::Result<TcpStream> {
        let gw = self.sh.args.gateways[self.sh.node_of(idx)];
        let sock = Socket::new(
            Domain::for_address(gw),
            Type::STREAM.cloexec(),
            Some(Protocol::TCP),
        )?;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        if gw.is_ipv4() {
            let src = self.sh.src_ips[idx as usize % self.sh.src_ips.len()];
            // IP_BIND_ADDRESS_NO_PORT: pick the port at connect time, per (src, dst) 4-tuple,
            // so that ephemeral ports are never the limit.
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a valid fd and a c_int option value.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &one as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
        }
        match sock.connect(&gw.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        // SAFETY: a connecting TCP socket we own; ownership moves into the stream.
        Ok(unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) })
    }

    /// Opens (or reopens) the connection of user `idx` and serves it until it ends.
    fn spawn_conn(self: &Rc<Self>, idx: u32) -> Rc<LConn> {
        let c = Rc::new(LConn::new(idx));
        self.conns.borrow_mut().insert(idx, c.clone());
        let ex = self.clone();
        let c2 = c.clone();
        glommio::spawn_local(async move { ex.serve(c2).await }).detach();
        c
    }

    /// The TLS settings of user `idx` (made on first use, then kept: its session cache).
    fn tls_config(&self, tls: &TlsSetup, idx: u32) -> Arc<rustls::ClientConfig> {
        self.tls_configs
            .borrow_mut()
            .entry(idx)
            .or_insert_with(|| {
                let mut c = (*tls.base).clone();
                if !self.sh.args.tls_no_resume {
                    c.resumption = rustls::client::Resumption::store(Arc::new(
                        rustls::client::ClientSessionMemoryCache::new(1),
                    ));
                }
                Arc::new(c)
            })
            .clone()
    }

    /// Connects user `idx`, with a TLS handshake when `--tls`.
    async fn open(&self, idx: u32) -> Result<Stream, String> {
        let t0 = Instant::now();
        let tcp = self
            .connect(idx)
            .map_err(|e| format!("connect: {}", e.kind()))?;
        let Some(tls) = &self.sh.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let connector = futures_rustls::TlsConnector::from(self.tls_config(tls, idx));
        let s = connector
            .connect(tls.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        record(&self.h_tls, t0.elapsed().as_micros() as u64);
        let resumed = matches!(
            s.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        let mut k = self.counters.borrow_mut();
        if resumed {
            k.tls_resumed += 1;
        } else {
            k.tls_full += 1;
        }
        Ok(Stream::Tls(Box::new(s)))
    }

    async fn serve(self: Rc<Self>, c: Rc<LConn>) {
        let mut stream = match self.open(c.idx).await {
            Ok(s) => s,
            Err(e) => {
                self.fail(&c, &e);
                self.maybe_reconnect(&c);
                return;
            }
        };
        // The presence latency counts from here: a follower can hear "online" before this
        // executor has read the LOGIN_OK (both travel separately), so not from LOGIN_OK.
        self.sh.login_ns[(c.idx - self.sh.first_index) as usize]
            .store(self.sh.now_ns(), Ordering::Relaxed);
        c.push(&ClientFrame::Hello {
            magic: HELLO_MAGIC,
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        });
        let token = self.token(c.idx);
        c.push(&ClientFrame::Login {
            user: self.sh.user(c.idx),
            device: DeviceId(1),
            token: token.into_bytes().into(),
        });
        let outcome = poll_fn(|cx| self.poll_conn(&c, &mut stream, cx)).await;
        drop(stream);
        match outcome {
            Err(e) => self.fail(&c, &format!("io: {}", e.kind())),
            Ok(()) => self.closed(&c),
        }
        self.maybe_reconnect(&c);
    }

    /// `--reconnect`: brings a connection that ended back, after a backoff, unless the run is
    /// ending or the churn scenario retired it.
    fn maybe_reconnect(self: &Rc<Self>, c: &LConn) {
        if !self.sh.args.reconnect || self.stopping.get() || c.retired.get() {
            return;
        }
        let idx = c.idx;
        let tries = {
            let mut r = self.retries.borrow_mut();
            let t = r.entry(idx).or_insert(0);
            *t = (*t + 1).min(5);
            *t
        };
        let backoff_ms = (100u64 << (tries - 1)).min(2_000);
        let ex = self.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_millis(backoff_ms)).await;
            if !ex.stopping.get() {
                ex.counters.borrow_mut().reconnects += 1;
                ex.spawn_conn(idx);
            }
        })
        .detach();
    }

    fn fail(&self, c: &LConn, why: &str) {
        let mut k = self.counters.borrow_mut();
        if !c.ready.get() {
            k.connect_failures += 1;
        }
        k.error(why);
        drop(k);
        self.closed(c);
    }

    fn closed(&self, c: &LConn) {
        if c.ready.replace(false) {
            self.counters.borrow_mut().connected -= 1;
            self.sh.set_online(c.idx, false);
        }
        self.sh
            .inflight
            .fetch_sub(u64::from(c.inflight.replace(0)), Ordering::Relaxed);
        c.done.set(true);
    }

    fn poll_conn(
        &self,
        c: &LConn,
        stream: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        *c.waker.borrow_mut() = Some(cx.waker().clone());
        for _ in 0..16 {
            // Flush.
            loop {
                let out = c.out.borrow();
                let off = c.out_off.get();
                if off >= out.len() {
                    break;
                }
                match Pin::new(&mut *stream).poll_write(cx, &out[off..]) {
                    Poll::Ready(Ok(n)) => {
                        drop(out);
                        c.out_off.set(off + n);
                        if off + n == c.out.borrow().len() {
                            c.out.borrow_mut().clear();
                            c.out_off.set(0);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            // TLS keeps written records until flushed (a no-op on TCP).
            if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
                return Poll::Ready(Err(e));
            }
            if c.closing.get() && c.out.borrow().is_empty() {
                return Poll::Ready(Ok(()));
            }
            let mut scratch = self.scratch.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if !c.closing.get() {
                        self.counters.borrow_mut().error("closed_by_server");
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(n)) => {
                    let mut partial = c.partial.borrow_mut();
                    if partial.is_empty() {
                        let used = self.process(c, &scratch[..n]);
                        partial.extend_from_slice(&scratch[used..n]);
                    } else {
                        partial.extend_from_slice(&scratch[..n]);
                        let used = self.process(c, &partial);
                        partial.drain(..used);
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Handles the frames in `data`; returns the bytes consumed.
    fn process(&self, c: &LConn, data: &[u8]) -> usize {
        let mut off = 0;
        let mut acks: Vec<ServerMsgId> = Vec::new();
        let now_ns = self.sh.now_ns();
        loop {
            let raw = match split_frame(&data[off..], gatehouse::limits::FRAME_BYTES_MAX_CEILING) {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => {
                    self.counters
                        .borrow_mut()
                        .error(&format!("bad frame from server: {e}"));
                    c.closing.set(true);
                    return data.len();
                }
            };
            off += raw.total_bytes;
            let frame = match ServerFrame::decode(raw.frame_type, raw.payload) {
                Ok(f) => f,
                Err(e) => {
                    self.counters
                        .borrow_mut()
                        .error(&format!("bad frame from server: {e}"));
                    continue;
                }
            };
            self.handle(c, frame, now_ns, &mut acks);
        }
        if self.sh.args.ack_delay_ms > 0 && !acks.is_empty() {
            let due = now_ns + self.sh.args.ack_delay_ms * 1_000_000;
            c.deferred.borrow_mut().push_back((due, acks));
        } else {
            push_acks(c, &acks);
        }
        off
    }

    fn handle(&self, c: &LConn, frame: ServerFrame, now_ns: u64, acks: &mut Vec<ServerMsgId>) {
        let mut k = self.counters.borrow_mut();
        match frame {
            ServerFrame::HelloOk { .. } => {}
            ServerFrame::Presence { user, online, .. } => {
                k.presence += 1;
                let idx = user.0.wrapping_sub(self.sh.args.first_user);
                let at = idx
                    .checked_sub(u64::from(self.sh.first_index))
                    .and_then(|i| self.sh.login_ns.get(i as usize));
                // Only changes count: the user logged in after this follower did (and so after
                // it subscribed); the first answer to a subscription is not a propagation.
                let mine = self.sh.login_ns[(c.idx - self.sh.first_index) as usize]
                    .load(Ordering::Relaxed);
                let measuring = self.sh.main_phase.load(Ordering::Relaxed);
                if let (true, true, Some(at)) = (measuring, online, at) {
                    let t = at.load(Ordering::Relaxed);
                    if t > mine {
                        record(&self.h_presence, now_ns.saturating_sub(t) / 1000);
                    }
                }
            }
            ServerFrame::Typing { .. } => {}
            ServerFrame::GroupOk { .. } => {
                self.sh.groups_ready.fetch_add(1, Ordering::Relaxed);
            }
            ServerFrame::GroupEvent { server_msg_id, .. } => acks.push(server_msg_id),
            ServerFrame::GroupReceipt { receipt_id, .. } => {
                acks.push(receipt_id);
                k.group_receipts += 1;
            }
            ServerFrame::GroupDeliver {
                server_msg_id,
                group_msg_id,
                body,
                ..
            } => {
                acks.push(server_msg_id);
                let counted = if self.sh.args.reconnect {
                    let mut check = self
                        .sh
                        .group_check
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let acked = check.acked.contains(&group_msg_id.0);
                    if !check.seen.entry(group_msg_id.0).or_default().insert(c.idx) {
                        k.group_duplicates += 1;
                        0
                    } else {
                        u64::from(acked)
                    }
                } else {
                    1
                };
                k.group_delivered += counted;
                self.sh
                    .group_delivered
                    .fetch_add(counted, Ordering::Relaxed);
                if let Some(h) = BodyHeader::decode(&body) {
                    let us = now_ns.saturating_sub(h.intended_ns) / 1000;
                    record(&self.h_deliver, us);
                    record(&self.h_interval, us);
                }
            }
            ServerFrame::SendAck { server_msg_id, .. }
                if self.sh.args.scenario == Scenario::Groups =>
            {
                if self.sh.args.reconnect {
                    // Deliveries seen before their SEND_ACK count now.
                    let mut check = self
                        .sh
                        .group_check
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if check.acked.insert(server_msg_id.0) {
                        let early = check.seen.get(&server_msg_id.0).map_or(0, |s| s.len());
                        k.group_delivered += early as u64;
                        self.sh
                            .group_delivered
                            .fetch_add(early as u64, Ordering::Relaxed);
                    }
                }
                k.acked += 1;
                c.inflight.set(c.inflight.get().saturating_sub(1));
                self.sh.inflight.fetch_sub(1, Ordering::Relaxed);
                self.sh.acked.fetch_add(1, Ordering::Relaxed);
                let others = u64::from(self.sh.args.group_size.saturating_sub(1));
                k.group_expected += others;
                self.sh.group_expected.fetch_add(others, Ordering::Relaxed);
            }
            ServerFrame::LoginOk { .. } => {
                if self.sh.args.scenario == Scenario::Presence {
                    c.push(&ClientFrame::Subscribe {
                        users: self.sh.contacts(c.idx),
                    });
                }
                c.ready.set(true);
                self.retries.borrow_mut().remove(&c.idx);
                k.logins += 1;
                k.connected += 1;
                k.connected_peak = k.connected_peak.max(k.connected);
                self.sh.set_online(c.idx, true);
                record(&self.h_login, c.started.elapsed().as_micros() as u64);
            }
            ServerFrame::SendAck { client_msg_id, .. } => {
                k.acked += 1;
                c.inflight.set(c.inflight.get().saturating_sub(1));
                self.sh.inflight.fetch_sub(1, Ordering::Relaxed);
                self.sh.acked.fetch_add(1, Ordering::Relaxed);
                let (recipient, seq) = split_client_msg_id(client_msg_id);
                self.acked.borrow_mut().push((c.idx, recipient, seq));
                if self.sh.args.reconnect {
                    let mut u = self.sh.unmatched.lock().unwrap_or_else(|e| e.into_inner());
                    if !u.1.remove(&(c.idx, recipient, seq)) {
                        u.0.insert((c.idx, recipient, seq));
                    }
                }
                if let Some(t) = self.intended.borrow_mut().remove(&(c.idx, client_msg_id)) {
                    record(&self.h_ack, now_ns.saturating_sub(t) / 1000);
                }
            }
            ServerFrame::Deliver {
                server_msg_id,
                body,
                ..
            } => {
                k.delivered += 1;
                acks.push(server_msg_id);
                match BodyHeader::decode(&body) {
                    Some(h) if h.recipient == c.idx => {
                        // The drain waits for distinct messages: after a gateway restart,
                        // redelivered duplicates must not stand in for missing ones.
                        let key = (h.sender, h.recipient, h.seq);
                        if self.seen.borrow_mut().insert(key) {
                            self.sh.delivered.fetch_add(1, Ordering::Relaxed);
                            if self.sh.args.reconnect {
                                let mut u =
                                    self.sh.unmatched.lock().unwrap_or_else(|e| e.into_inner());
                                if !u.0.remove(&key) {
                                    u.1.insert(key);
                                }
                            }
                        }
                        self.delivered
                            .borrow_mut()
                            .push((h.sender, h.recipient, h.seq));
                        let us = now_ns.saturating_sub(h.intended_ns) / 1000;
                        record(&self.h_deliver, us);
                        record(&self.h_interval, us);
                    }
                    _ => k.error("misdelivered"),
                }
            }
            ServerFrame::Receipt {
                receipt_id, kind, ..
            } => {
                acks.push(receipt_id);
                self.sh.receipts.fetch_add(1, Ordering::Relaxed);
                match kind {
                    ReceiptKind::Delivered => k.receipts_delivered += 1,
                    ReceiptKind::Read => k.receipts_read += 1,
                }
            }
            ServerFrame::Pong { nonce } => {
                k.pongs += 1;
                if nonce & FINAL_PING != 0 {
                    self.final_pongs.set(self.final_pongs.get() + 1);
                }
            }
            ServerFrame::GoAway { reason, .. } => {
                k.error(&format!("go_away_{reason:?}").to_lowercase());
                c.closing.set(true);
            }
            ServerFrame::Error {
                code,
                fatal,
                ref_id,
                ..
            } => {
                let name = ErrorCode::from_u16(code).map_or("unknown", ErrorCode::name);
                k.error(name);
                if matches!(
                    ErrorCode::from_u16(code),
                    Some(
                        ErrorCode::QueueFull
                            | ErrorCode::StoreFailed
                            | ErrorCode::Overloaded
                            | ErrorCode::WrongNode
                            | ErrorCode::BodyTooLarge
                            | ErrorCode::BadRecipient
                            | ErrorCode::RateLimited
                    )
                ) && ref_id != 0
                {
                    k.refused += 1;
                    c.inflight.set(c.inflight.get().saturating_sub(1));
                    self.sh.inflight.fetch_sub(1, Ordering::Relaxed);
                    self.intended.borrow_mut().remove(&(c.idx, ref_id));
                }
                if fatal {
                    c.closing.set(true);
                }
            }
        }
    }

    /// Queues a SEND from `sender` to `recipient`, intended at `intended_ns`.
    fn send(&self, sender: &LConn, recipient: u32, intended_ns: u64) -> bool {
        if sender.out.borrow().len() > OUT_BYTES_MAX {
            self.counters.borrow_mut().send_skipped += 1;
            return false;
        }
        let seq = {
            let mut m = self.next_seq.borrow_mut();
            let s = m.entry((sender.idx, recipient)).or_insert(0);
            *s += 1;
            *s
        };
        let body = BodyHeader {
            sender: sender.idx,
            recipient,
            seq,
            intended_ns,
        }
        .encode(self.sh.args.body_bytes);
        let id = client_msg_id(recipient, seq);
        self.intended
            .borrow_mut()
            .insert((sender.idx, id), intended_ns);
        sender.push(&ClientFrame::Send {
            client_msg_id: id,
            recipient: self.sh.user(recipient),
            body: body.into(),
        });
        sender.inflight.set(sender.inflight.get() + 1);
        self.sh.inflight.fetch_add(1, Ordering::Relaxed);
        self.counters.borrow_mut().sent += 1;
        true
    }

    /// Groups: this executor's creators create their groups; waits for every GROUP_OK.
    async fn create_groups(self: &Rc<Self>) {
        let sh = &self.sh;
        for (gi, members) in sh.groups.iter().enumerate() {
            let creator = members[0];
            if creator as usize % sh.cores != self.index {
                continue;
            }
            let Some(c) = self.conns.borrow().get(&creator).cloned() else {
                continue;
            };
            c.push(&ClientFrame::Group {
                request_id: gi as u64 + 1,
                group: GROUP_ID_BASE + sh.user(creator).0,
                op: gatehouse::proto::GroupOp::Create,
                users: members.iter().map(|m| sh.user(*m)).collect(),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while (sh.groups_ready.load(Ordering::Relaxed) as usize) < sh.groups.len()
            && Instant::now() < deadline
        {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Groups: open-loop GROUP_SENDs at this executor's share of `--rate`, from random online
    /// members among this executor's users.
    async fn group_chat(self: &Rc<Self>) {
        let sh = self.sh.clone();
        let rate = sh.args.rate as f64 / (sh.cores * num_workers()) as f64;
        let t0 = Instant::now();
        let t0_ns = sh.now_ns();
        let duration = Duration::from_secs(sh.args.duration_s);
        // By index: with --reconnect a user's connection is replaced after a restart.
        let senders: Vec<u32> = self
            .ready_conns()
            .into_iter()
            .map(|c| c.idx)
            .filter(|i| sh.group_of.contains_key(i))
            .collect();
        let mut k: u64 = 0;
        while t0.elapsed() < duration && !sh.stop.load(Ordering::Relaxed) {
            glommio::timer::sleep(Duration::from_millis(1)).await;
            let due = (t0.elapsed().as_secs_f64() * rate) as u64;
            while k < due {
                let intended_ns = t0_ns + (k as f64 * 1e9 / rate) as u64;
                k += 1;
                if senders.is_empty() {
                    self.counters.borrow_mut().error("no_group_member");
                    continue;
                }
                let idx = senders[self.rng.borrow_mut().usize(..senders.len())];
                let Some(s) = self.conns.borrow().get(&idx).cloned() else {
                    self.counters.borrow_mut().send_skipped += 1;
                    continue;
                };
                if !s.ready.get() || s.out.borrow().len() > OUT_BYTES_MAX {
                    self.counters.borrow_mut().send_skipped += 1;
                    continue;
                }
                let gi = sh.group_of[&s.idx];
                let body = BodyHeader {
                    sender: s.idx,
                    recipient: gi as u32,
                    seq: k as u32,
                    intended_ns,
                }
                .encode(sh.args.body_bytes);
                s.push(&ClientFrame::GroupSend {
                    client_msg_id: k,
                    group: GROUP_ID_BASE + sh.user(sh.groups[gi][0]).0,
                    body: body.into(),
                });
                s.inflight.set(s.inflight.get() + 1);
                sh.inflight.fetch_add(1, Ordering::Relaxed);
                self.counters.borrow_mut().sent += 1;
            }
        }
    }

    /// Connects `users` at the configured rate and waits until each logged in or failed.
    async fn connect_all(self: &Rc<Self>, users: &[u32]) {
        let gap = Duration::from_nanos(self.sh.connect_gap_ns);
        let start = Instant::now();
        for (i, &idx) in users.iter().enumerate() {
            let due = start + gap * (i as u32);
            let now = Instant::now();
            if due > now + Duration::from_millis(1) {
                glommio::timer::sleep(due - now).await;
            }
            if self.sh.stop.load(Ordering::Relaxed) {
                return;
            }
            self.spawn_conn(idx);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let pending = self
                .conns
                .borrow()
                .values()
                .filter(|c| !c.ready.get() && !c.done.get())
                .count();
            if pending == 0 {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }

    fn ready_conns(&self) -> Vec<Rc<LConn>> {
        self.conns
            .borrow()
            .values()
            .filter(|c| c.ready.get())
            .cloned()
            .collect()
    }

    /// Open-loop sending at this executor's share of `--rate` for `--duration-s`.
    async fn chat(self: &Rc<Self>, churn: bool) {
        let sh = self.sh.clone();
        let workers_cores = (sh.cores * num_workers()) as f64;
        let rate = sh.args.rate as f64 / workers_cores;
        let churn_rate = sh.args.churn_rate as f64 / workers_cores;
        let t0 = Instant::now();
        let t0_ns = sh.now_ns();
        let duration = Duration::from_secs(sh.args.duration_s);
        let mut k: u64 = 0;
        let mut churned: u64 = 0;
        let mut senders = self.ready_conns();
        let mut refreshed = Instant::now();
        while t0.elapsed() < duration && !sh.stop.load(Ordering::Relaxed) {
            glommio::timer::sleep(Duration::from_millis(1)).await;
            if refreshed.elapsed() > Duration::from_millis(200) {
                senders = self.ready_conns();
                refreshed = Instant::now();
            }
            let elapsed = t0.elapsed().as_secs_f64();
            let due = (elapsed * rate) as u64;
            while k < due {
                let intended = t0_ns + (k as f64 * 1e9 / rate) as u64;
                k += 1;
                if senders.is_empty() {
                    self.counters.borrow_mut().error("no_online_sender");
                    continue;
                }
                let s = &senders[self.rng.borrow_mut().usize(..senders.len())];
                if !s.ready.get() {
                    self.counters.borrow_mut().error("sender_offline");
                    continue;
                }
                let group = &sh.by_node[sh.node_of(s.idx)];
                let mut peer = None;
                for _ in 0..8 {
                    let p = group[self.rng.borrow_mut().usize(..group.len())];
                    if p != s.idx && sh.online(p) {
                        peer = Some(p);
                        break;
                    }
                }
                match peer {
                    Some(p) => {
                        self.send(s, p, intended);
                    }
                    None => self.counters.borrow_mut().error("no_online_peer"),
                }
            }
            if churn {
                let due = (elapsed * churn_rate) as u64;
                while churned < due {
                    churned += 1;
                    let ready = self.ready_conns();
                    if ready.is_empty() {
                        break;
                    }
                    let victim = ready[self.rng.borrow_mut().usize(..ready.len())].clone();
                    victim.retired.set(true);
                    victim.closing.set(true);
                    victim.wake();
                    let ex = self.clone();
                    glommio::spawn_local(async move {
                        while !victim.done.get() {
                            glommio::timer::sleep(Duration::from_millis(5)).await;
                        }
                        ex.spawn_conn(victim.idx);
                    })
                    .detach();
                }
            }
        }
    }

    /// Offline scenario, phase A: queue this executor's share of `--messages` from its senders
    /// to offline recipients of the same node, at most `OFFLINE_WINDOW` in flight per sender.
    async fn queue_offline(
        self: &Rc<Self>,
        senders: &[u32],
        recipients_by_node: &HashMap<usize, Vec<u32>>,
        count: u64,
    ) {
        let mut sent = 0u64;
        let mut i = 0usize;
        let deadline = Instant::now() + Duration::from_secs(self.sh.args.max_run_s);
        while sent < count && Instant::now() < deadline {
            let mut progressed = false;
            for _ in 0..senders.len() {
                // The sender's current connection (`--reconnect` replaces them).
                let Some(s) = self
                    .conns
                    .borrow()
                    .get(&senders[i % senders.len()])
                    .cloned()
                else {
                    i += 1;
                    continue;
                };
                i += 1;
                if !s.ready.get() || s.inflight.get() >= OFFLINE_WINDOW {
                    continue;
                }
                let Some(group) = recipients_by_node.get(&self.sh.node_of(s.idx)) else {
                    continue;
                };
                let r = group[(sent as usize) % group.len()];
                self.send(&s, r, self.sh.now_ns());
                sent += 1;
                progressed = true;
                if sent == count {
                    break;
                }
            }
            if !progressed || sent % 1024 == 0 {
                glommio::timer::sleep(Duration::from_micros(200)).await;
            }
        }
    }

    async fn ping_all_and_count(self: &Rc<Self>) -> u64 {
        let conns = self.ready_conns();
        for (i, c) in conns.iter().enumerate() {
            c.push(&ClientFrame::Ping {
                nonce: FINAL_PING | i as u64,
            });
        }
        self.counters.borrow_mut().pings += conns.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(self.sh.args.drain_timeout_s);
        while self.final_pongs.get() < conns.len() as u64 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        self.final_pongs.get()
    }

    /// Idle: keepalive pings spread over `--ping-interval-s` until the hold time ends.
    async fn hold(self: &Rc<Self>) {
        let hold = Duration::from_secs(self.sh.args.duration_s);
        let interval = self.sh.args.ping_interval_s.max(1) as f64;
        let t0 = Instant::now();
        let mut pinged = 0u64;
        while t0.elapsed() < hold && !self.sh.stop.load(Ordering::Relaxed) {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            let conns = self.ready_conns();
            let due = (t0.elapsed().as_secs_f64() / interval * conns.len() as f64) as u64;
            while pinged < due && !conns.is_empty() {
                conns[(pinged as usize) % conns.len()].push(&ClientFrame::Ping { nonce: pinged });
                pinged += 1;
                self.counters.borrow_mut().pings += 1;
            }
        }
    }

    /// Waits until everything acknowledged has arrived (and receipts, for chat), or timeout.
    async fn drain(&self, want_receipts: bool) -> f64 {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(self.sh.args.drain_timeout_s);
        let sh = &self.sh;
        while t0.elapsed() < timeout {
            let acked = sh.acked.load(Ordering::Relaxed);
            let all_delivered = if sh.args.reconnect {
                sh.unmatched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .0
                    .is_empty()
            } else {
                sh.delivered.load(Ordering::Relaxed) >= acked
            };
            let settled = sh.inflight.load(Ordering::Relaxed) == 0
                && all_delivered
                && (!want_receipts || sh.receipts.load(Ordering::Relaxed) >= acked);
            if settled {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        t0.elapsed().as_secs_f64()
    }
}

fn gatehouse_now_s() -> u64 {
    gatehouse::runtime::now_ms() / 1000
}

static WORKERS: AtomicUsize = AtomicUsize::new(1);
fn num_workers() -> usize {
    WORKERS.load(Ordering::Relaxed)
}

/// What one executor hands back at the end.
struct ExecOut {
    counters: Counters,
    acked: Vec<PairSeq>,
    delivered: Vec<PairSeq>,
    hists: Vec<(String, Histogram<u64>)>,
    connect_s: f64,
    main_s: f64,
    drain_s: f64,
    final_pongs: u64,
    /// Handshake scenario: logins in the reconnect phase.
    reconnect_logins: u64,
    /// Handshake scenario: gateway CPU seconds per phase (executor 0 samples them).
    gateway_cpu_s: Option<(f64, f64)>,
}

async fn run_exec(
    ex: Rc<Exec>,
    progress: mpsc::Sender<(usize, Counters, Histogram<u64>)>,
) -> ExecOut {
    let sh = ex.sh.clone();
    // Progress reporter: a snapshot of this executor once a second.
    let reporter = {
        let ex = ex.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(250)).await;
                let h = std::mem::replace(&mut *ex.h_interval.borrow_mut(), histogram());
                if progress
                    .send((ex.index, ex.counters.borrow().clone(), h))
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut out = ExecOut {
        counters: Counters::default(),
        acked: Vec::new(),
        delivered: Vec::new(),
        hists: Vec::new(),
        connect_s: 0.0,
        main_s: 0.0,
        drain_s: 0.0,
        final_pongs: 0,
        reconnect_logins: 0,
        gateway_cpu_s: None,
    };
    let t0 = Instant::now();
    match sh.args.scenario {
        Scenario::Idle => {
            ex.connect_all(&ex.users).await;
            out.connect_s = t0.elapsed().as_secs_f64();
            ex.barrier().await;
            let t1 = Instant::now();
            ex.hold().await;
            out.final_pongs = ex.ping_all_and_count().await;
            out.main_s = t1.elapsed().as_secs_f64();
        }
        Scenario::Chat | Scenario::Churn | Scenario::Presence => {
            ex.connect_all(&ex.users).await;
            out.connect_s = t0.elapsed().as_secs_f64();
            ex.barrier().await;
            sh.main_phase.store(true, Ordering::Relaxed);
            let t1 = Instant::now();
            ex.chat(sh.args.scenario != Scenario::Chat).await;
            out.main_s = t1.elapsed().as_secs_f64();
            ex.barrier().await;
            out.drain_s = ex.drain(true).await;
        }
        Scenario::Groups => {
            ex.connect_all(&ex.users).await;
            out.connect_s = t0.elapsed().as_secs_f64();
            ex.barrier().await;
            ex.create_groups().await;
            ex.barrier().await;
            let t1 = Instant::now();
            ex.group_chat().await;
            out.main_s = t1.elapsed().as_secs_f64();
            ex.barrier().await;
            let t2 = Instant::now();
            let timeout = Duration::from_secs(sh.args.drain_timeout_s);
            while t2.elapsed() < timeout
                && (sh.inflight.load(Ordering::Relaxed) > 0
                    || sh.group_delivered.load(Ordering::Relaxed)
                        < sh.group_expected.load(Ordering::Relaxed))
            {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            out.drain_s = t2.elapsed().as_secs_f64();
        }
        Scenario::Handshake => {
            // Phase 1: every user connects (full handshakes; tickets go into each user's
            // cache). Phase 2: all disconnect, then connect again (resumed).
            let cpu = || crate::report::cpu_s(&sh.args.gateway_pids);
            let cpu0 = cpu();
            ex.connect_all(&ex.users).await;
            out.connect_s = t0.elapsed().as_secs_f64();
            ex.barrier().await;
            let cpu1 = cpu();
            for c in ex.conns.borrow().values() {
                c.retired.set(true);
                c.closing.set(true);
                c.wake();
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while ex.conns.borrow().values().any(|c| !c.done.get()) && Instant::now() < deadline {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            ex.conns.borrow_mut().clear();
            ex.barrier().await;
            let cpu2 = cpu();
            let t1 = Instant::now();
            let logins_before = ex.counters.borrow().logins;
            ex.connect_all(&ex.users).await;
            out.main_s = t1.elapsed().as_secs_f64();
            out.reconnect_logins = ex.counters.borrow().logins - logins_before;
            ex.barrier().await;
            // One executor of one worker speaks for the gateway's CPU (all see the same).
            if ex.index == 0 && num_workers() == 1 {
                if let (Some(a), Some(b), Some(c), Some(d)) = (cpu0, cpu1, cpu2, cpu()) {
                    out.gateway_cpu_s = Some((b - a, d - c));
                }
            }
        }
        Scenario::Offline => {
            // Half the users send and half receive later, split by each executor's local
            // position so that every executor has both (its users are idx ≡ e mod cores).
            let is_recipient = |idx: u32| (idx as usize / sh.cores) % 2 == 1;
            let mut senders_idx = std::collections::HashSet::new();
            let mut recipients_by_node: HashMap<usize, Vec<u32>> = HashMap::new();
            for (node, group) in sh.by_node.iter().enumerate() {
                for &idx in group {
                    if is_recipient(idx) {
                        recipients_by_node.entry(node).or_default().push(idx);
                    } else if (idx as usize) % sh.cores == ex.index {
                        senders_idx.insert(idx);
                    }
                }
            }
            let mut senders_list: Vec<u32> = senders_idx.iter().copied().collect();
            senders_list.sort_unstable();
            ex.connect_all(&senders_list).await;
            out.connect_s = t0.elapsed().as_secs_f64();
            ex.barrier().await;
            let t1 = Instant::now();
            let senders: Vec<u32> = ex.ready_conns().iter().map(|c| c.idx).collect();
            let share = sh.args.messages / (sh.cores * num_workers()) as u64;
            if !recipients_by_node.is_empty() {
                ex.queue_offline(&senders, &recipients_by_node, share).await;
            }
            while sh.inflight.load(Ordering::Relaxed) > 0
                && t1.elapsed() < Duration::from_secs(sh.args.max_run_s)
            {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            out.main_s = t1.elapsed().as_secs_f64();
            ex.barrier().await;
            // Phase B: recipients log in and drain.
            let t2 = Instant::now();
            let mine: Vec<u32> = ex
                .users
                .iter()
                .copied()
                .filter(|u| !senders_idx.contains(u))
                .collect();
            ex.connect_all(&mine).await;
            ex.drain(false).await;
            out.drain_s = t2.elapsed().as_secs_f64();
        }
    }
    ex.barrier().await;
    reporter.cancel().await;
    ex.stopping.set(true);
    for c in ex.conns.borrow().values() {
        c.closing.set(true);
        c.wake();
    }
    out.counters = ex.counters.borrow().clone();
    out.acked = std::mem::take(&mut *ex.acked.borrow_mut());
    out.delivered = std::mem::take(&mut *ex.delivered.borrow_mut());
    out.hists = vec![
        ("login".into(), ex.h_login.borrow().clone()),
        ("ack".into(), ex.h_ack.borrow().clone()),
        ("deliver".into(), ex.h_deliver.borrow().clone()),
        ("tls".into(), ex.h_tls.borrow().clone()),
        ("presence".into(), ex.h_presence.borrow().clone()),
    ];
    glommio::timer::sleep(Duration::from_millis(50)).await;
    out
}

/// Runs worker `index` of `workers`: its slice of users, on its executors, printing JSON lines.
pub fn run(args: RunArgs, index: usize, workers: usize) -> anyhow::Result<()> {
    WORKERS.store(workers, Ordering::Relaxed);
    let cpus = gatehouse::server::allowed_cpus();
    let cores = if args.cores == 0 {
        cpus.len()
    } else {
        args.cores
    };
    let lo = (args.users * index as u64 / workers as u64) as u32;
    let hi = (args.users * (index as u64 + 1) / workers as u64) as u32;
    let keys = crate::load_keys(&args)?;
    let nodes = args.gateways.len();
    let mut by_node: Vec<Vec<u32>> = vec![Vec::new(); nodes];
    for idx in lo..hi {
        by_node[owner_node(UserId(args.first_user + u64::from(idx)), nodes) as usize].push(idx);
    }
    let per_worker_rate = args.connect_rate as f64 / workers as f64;
    // Groups scenario: each node's users of this worker, in full groups of --group-size.
    let groups: Vec<Vec<u32>> = if args.scenario == Scenario::Groups {
        by_node
            .iter()
            .flat_map(|users| users.chunks_exact(args.group_size.max(2) as usize))
            .map(|c| c.to_vec())
            .collect()
    } else {
        Vec::new()
    };
    let sh = Arc::new(Shared {
        epoch: Instant::now(),
        keys,
        src_ips: parse_src_ips(&args.src_ips).map_err(|e| anyhow::anyhow!(e))?,
        by_node,
        online: (lo..hi).map(|_| AtomicBool::new(false)).collect(),
        first_index: lo,
        phase_done: AtomicUsize::new(0),
        inflight: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        unmatched: std::sync::Mutex::new((HashSet::new(), HashSet::new())),
        receipts: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        connect_gap_ns: (1e9 * cores as f64 / per_worker_rate) as u64,
        cores,
        login_ns: (lo..hi).map(|_| AtomicU64::new(0)).collect(),
        main_phase: AtomicBool::new(false),
        groups_ready: AtomicU64::new(0),
        group_expected: AtomicU64::new(0),
        group_delivered: AtomicU64::new(0),
        group_check: Default::default(),
        groups: groups.clone(),
        group_of: groups
            .iter()
            .enumerate()
            .flat_map(|(gi, m)| m.iter().map(move |u| (*u, gi)))
            .collect(),
        tls: if args.tls {
            let t = gatehouse::client::TlsClientConfig::from_ca_file(
                &args.tls_ca,
                &args.tls_server_name,
                &args.tls_kx_groups,
                0,
            )
            .map_err(|e| anyhow::anyhow!("--tls: {e}"))?;
            Some(TlsSetup {
                base: t.config,
                server_name: t.server_name,
            })
        } else {
            None
        },
        args,
    });
    let (ptx, prx) = mpsc::channel::<(usize, Counters, Histogram<u64>)>();
    // The same stall defense as the gateway's shards (glommio 0.9 can park an executor with
    // work queued): a heartbeat task per executor, woken from a plain thread every 5 ms.
    let pulses: Vec<Arc<Pulse>> = (0..cores).map(|_| Arc::new(Pulse::default())).collect();
    let nudges: Vec<Arc<Nudge>> = (0..cores).map(|_| Arc::new(Nudge::default())).collect();
    let watchdog_stop = Arc::new(AtomicBool::new(false));
    // 5 ms with few processes; with many processes per core the wakeups themselves would cost
    // a noticeable share of the CPU, so the period grows (a stall is still bounded by it).
    let heartbeat_ms = if workers <= 4 { 5 } else { 50 };
    let watchdog = watchdog::spawn(
        pulses.clone(),
        nudges.clone(),
        heartbeat_ms,
        1000,
        watchdog_stop.clone(),
        // Started before the executors, with a heartbeat of at least 5 ms: the start is
        // covered by the ordinary nudges.
        None,
    );
    let mut handles = Vec::new();
    // An executor that parks before its root future runs is woken with a signal by the loop
    // below (see `StartProbe`; the gateway's shards have the same defense).
    let probes: Vec<Arc<StartProbe>> = (0..cores).map(|_| Arc::new(StartProbe::new())).collect();
    for e in 0..cores {
        let (pulse, nudge) = (pulses[e].clone(), nudges[e].clone());
        let probe = probes[e].clone();
        let sh = sh.clone();
        let ptx = ptx.clone();
        let users: Vec<u32> = (lo..hi).filter(|i| (*i as usize) % cores == e).collect();
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpus[(index * cores + e) % cpus.len()]))
            // Short, so that glommio's `-ID` suffix stays within the kernel's 15 bytes (the
            // probe finds the thread by that name).
            .name(&format!("lg-{index}-{e}"))
            .io_memory(64 * 1024)
            // As on the gateway (`runtime.ring_depth`): the kernel's poll table, which glommio
            // searches on every reactor turn, gets 256 buckets at 4096 entries and only 8 at
            // glommio's default of 128, where a 10,000-connection groups run spent a quarter
            // of the loadgen's CPU in `io_poll_find`.
            .ring_depth(4096)
            // glommio's 100 ms default would let one queue run that long between I/O polls,
            // adding its own latency to every measurement.
            .preempt_timer(Duration::from_micros(500))
            .spawn(move || async move {
                probe.polled();
                nudge.attach().await;
                glommio::spawn_local(watchdog::heartbeat(nudge, pulse)).detach();
                let ex = Rc::new(Exec {
                    sh,
                    users,
                    conns: RefCell::new(HashMap::new()),
                    stopping: Cell::new(false),
                    seen: RefCell::new(HashSet::new()),
                    retries: RefCell::new(HashMap::new()),
                    scratch: RefCell::new(vec![0u8; SCRATCH_BYTES]),
                    counters: RefCell::new(Counters::default()),
                    acked: RefCell::new(Vec::new()),
                    delivered: RefCell::new(Vec::new()),
                    next_seq: RefCell::new(HashMap::new()),
                    intended: RefCell::new(HashMap::new()),
                    h_login: RefCell::new(histogram()),
                    h_ack: RefCell::new(histogram()),
                    h_deliver: RefCell::new(histogram()),
                    h_interval: RefCell::new(histogram()),
                    rng: RefCell::new(fastrand::Rng::with_seed((index * 1000 + e) as u64)),
                    barriers: Cell::new(0),
                    index: e,
                    final_pongs: Cell::new(0),
                    tls_configs: RefCell::new(HashMap::new()),
                    h_tls: RefCell::new(histogram()),
                    h_presence: RefCell::new(histogram()),
                });
                if ex.sh.args.ack_delay_ms > 0 {
                    glommio::spawn_local(ack_later(ex.clone())).detach();
                }
                run_exec(ex, ptx).await
            })
            .map_err(|e| anyhow::anyhow!("starting executor: {e}"))?;
        probes[e].set_thread(h.thread());
        handles.push(h);
    }
    drop(ptx);
    // Aggregate progress once a second while executors run.
    let deadline = Instant::now() + Duration::from_secs(sh.args.max_run_s);
    let mut latest: HashMap<usize, Counters> = HashMap::new();
    let mut interval = histogram();
    let mut last_print = Instant::now();
    let (mut all_polled, mut last_kick, started_at) = (false, Instant::now(), Instant::now());
    loop {
        match prx.recv_timeout(Duration::from_millis(50)) {
            Ok((executor, counters, h)) => {
                latest.insert(executor, counters);
                let _ = interval.add(&h);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Bounded: an executor that died before its first poll ends the run anyway.
        if !all_polled
            && last_kick.elapsed() >= Duration::from_millis(20)
            && started_at.elapsed() < Duration::from_secs(30)
        {
            last_kick = Instant::now();
            for (e, p) in probes.iter().enumerate() {
                if p.kick_if_parked() {
                    eprintln!(
                        "loadgen: worker {index} executor {e} parked before it ran: woken with a signal"
                    );
                }
            }
            all_polled = probes.iter().all(|p| p.has_polled());
        }
        if last_print.elapsed() >= Duration::from_millis(250) {
            let mut total = Counters::default();
            latest.values().for_each(|c| total.add(c));
            let line = WorkerLine::Progress {
                counters: Box::new(total),
                deliver_hist: encode_hist(&interval),
            };
            println!("{}", serde_json::to_string(&line)?);
            interval = histogram();
            last_print = Instant::now();
        }
        if Instant::now() > deadline {
            sh.stop.store(true, Ordering::Relaxed);
        }
    }
    let mut result = WorkerResult::default();
    let mut acked = Vec::new();
    let mut delivered = Vec::new();
    let mut hists: HashMap<String, Histogram<u64>> = HashMap::new();
    for h in handles {
        let o = h
            .join()
            .map_err(|e| anyhow::anyhow!("executor failed: {e}"))?;
        result.counters.add(&o.counters);
        acked.extend(o.acked);
        delivered.extend(o.delivered);
        for (name, h) in o.hists {
            let _ = hists.entry(name).or_insert_with(histogram).add(&h);
        }
        result.connect_s = result.connect_s.max(o.connect_s);
        result.main_s = result.main_s.max(o.main_s);
        result.drain_s = result.drain_s.max(o.drain_s);
        result.final_pongs += o.final_pongs;
        result.reconnect_logins += o.reconnect_logins;
        result.gateway_cpu_s = result.gateway_cpu_s.or(o.gateway_cpu_s);
    }
    watchdog_stop.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    result.loss = check_loss(&acked, &delivered);
    result.hists = hists
        .iter()
        .map(|(k, h)| (k.clone(), encode_hist(h)))
        .collect();
    println!(
        "{}",
        serde_json::to_string(&WorkerLine::Result(Box::new(result)))?
    );
    Ok(())
}
