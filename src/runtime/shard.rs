//! One shard: a pinned glommio executor that owns a slice of users.
//!
//! A shard owns, for the users that hash to it: their sessions, their delivery windows, and
//! their queues in the shard's own LMDB environment. It shares nothing with other shards: it
//! reaches them only by [`Envelope`]s sent in batches over bounded `shared_channel`s.
//!
//! Tasks per shard, each in its own task queue so one kind of work cannot starve another:
//! - `accept`: accepts on the shard's SO_REUSEPORT listener and spawns connection tasks;
//! - `io`: one task per connection ([`super::conn`]);
//! - `cross`: one drain task per peer shard (receives batches, handles them synchronously,
//!   never awaits a send) and one flusher per peer shard (sends batches, never receives).
//!   Keeping receive and send in separate tasks avoids glommio's channel deadlock (#555);
//! - `store`: the group committer (one LMDB write transaction in flight at a time, run on the
//!   blocking pool) and, with `sync = "batch"`, the periodic fsync (on the pool's second
//!   thread, so that it does not hold up a commit);
//! - `housekeeping`: the heartbeat (bounds glommio 0.9's executor stall, see
//!   [`super::watchdog`]) and the timeout sweep.
//!
//! Must never: block the reactor on a write transaction, await a channel send inside a drain
//! task, or hold a per-connection read buffer while a connection is idle.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future::poll_fn;
use glommio::channels::shared_channel::{
    ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::net::{TcpListener, TcpStream};
use glommio::{Latency, Shares, TaskQueueHandle};
use hdrhistogram::Histogram;
use slab::Slab;
use smallvec::SmallVec;

mod groups;
mod log;
mod presence;

pub use groups::GroupRequest;
pub use presence::PresenceNote;

use super::conn::{self, Conn};
use super::watchdog::Pulse;
use super::{blocking, mono_ms, now_ms};
use crate::admin::ShardControl;
use crate::config::SyncPolicy;
use crate::ids::{
    owner_node, owner_shard, DeviceId, ServerMsgId, ShardId, UserId, MSG_ID_COUNTER_BITS,
};
use crate::limits;
use crate::metrics::{Buckets, CloseReason, ShardSnapshot, BATCH_BOUNDS, LATENCY_BOUNDS_US};
use crate::proto::{
    body_bytes_max, deliver_header, ErrorCode, GoAwayReason, ReceiptKind, ServerFrame,
    DELIVER_HEADER_BYTES,
};
use crate::ratelimit::TokenBucket;
use crate::session::{Command, Handshake, InFlight, Phase, SessionParams, Step};
use crate::store::{Item, Op, OpOutcome, QueueLimits, Store, StoreError};
use crate::transport::{Layers, ListenerKind, TlsContext};

/// A batch of envelopes, the unit sent between shards.
pub type Batch = Vec<Envelope>;

/// Names one connection on one shard. The generation makes a stale reference (to a
/// connection that closed and whose slot was reused) miss instead of hitting a stranger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    /// Shard holding the connection.
    pub shard: ShardId,
    /// Slot in that shard's connection table.
    pub slot: u32,
    /// Generation of the connection in that slot.
    pub gen: u32,
}

/// Work one shard hands another.
#[derive(Debug)]
pub enum Envelope {
    /// A SEND, to the recipient's owner shard.
    Send {
        /// The sender's connection, for the answer.
        from: ConnRef,
        /// Sender.
        sender: UserId,
        /// Sender's device.
        sender_device: DeviceId,
        /// Client's id for the answer.
        client_msg_id: u64,
        /// Recipient.
        recipient: UserId,
        /// Opaque body.
        body: Bytes,
    },
    /// The answer to a SEND, back to the sender's shard.
    SendResult {
        /// Sender's connection.
        to: ConnRef,
        /// Client's id.
        client_msg_id: u64,
        /// Server id and timestamp, or why it was refused.
        result: Result<(ServerMsgId, u64), (ErrorCode, String)>,
    },
    /// A receipt to queue for `to`, on `to`'s owner shard.
    Receipt {
        /// The original sender, who receives the receipt.
        to: UserId,
        /// Delivered or read.
        kind: ReceiptKind,
        /// The original recipient.
        from: UserId,
        /// The original message.
        msg_id: ServerMsgId,
        /// When.
        ts_ms: u64,
    },
    /// A connection logged in on the wrong shard, moving to its user's owner shard.
    Handover {
        /// The socket (a dup; the accepting shard closed its copy).
        fd: OwnedFd,
        /// Logged-in user.
        user: UserId,
        /// Logged-in device.
        device: DeviceId,
        /// Bytes the client sent after LOGIN that were not processed yet.
        leftover: Vec<u8>,
        /// The connection's TLS and WebSocket state (`None` on plain TCP).
        layers: Option<Box<Layers>>,
    },
    /// A connection follows these users' presence (to their owner shard).
    Subscribe {
        /// The following connection.
        sub: ConnRef,
        /// Its user (a target that blocks it sees it get "offline", no last-seen).
        subscriber: UserId,
        /// Users owned by the destination shard.
        targets: Vec<UserId>,
    },
    /// A connection stops following these users (or closed).
    Unsubscribe {
        /// The connection.
        sub: ConnRef,
        /// Users owned by the destination shard.
        targets: Vec<UserId>,
    },
    /// Presence states for connections of the destination shard: one envelope per
    /// destination shard per change (or per subscribe request), however many followers.
    Presence {
        /// One per following connection.
        notes: Vec<PresenceNote>,
    },
    /// Subscriptions the targets' shard refused (a target at its follower limit).
    PresenceRefused {
        /// The connection.
        to: ConnRef,
        /// Refused targets.
        targets: Vec<UserId>,
    },
    /// A group request or message, to the group's owner shard.
    Group {
        /// The requesting connection.
        from: ConnRef,
        /// Its user.
        user: UserId,
        /// Its device.
        device: DeviceId,
        /// What it asks.
        request: GroupRequest,
    },
    /// A frame for one connection (answers to group requests).
    Reply {
        /// The connection.
        to: ConnRef,
        /// The frame.
        frame: ServerFrame,
    },
    /// A group message or event for members owned by the destination shard: one envelope per
    /// member shard, however many members there.
    GroupFanout {
        /// The group's shard.
        origin: ShardId,
        /// For a message: the id under which the origin waits for every member shard's commit.
        fanout: Option<u64>,
        /// What to queue (the body is shared, not copied, between members).
        item: Item,
        /// Members owned by the destination shard.
        recipients: Vec<UserId>,
    },
    /// A member read these group messages (GROUP_READ): to the group's shard, which keeps the
    /// tallies.
    GroupRead {
        /// The group.
        group: u64,
        /// The messages' group ids.
        msg_ids: Vec<ServerMsgId>,
        /// The member (a read counts only from a member of the group).
        member: UserId,
    },
    /// Members' devices acknowledged group messages, and the deletes committed: per
    /// (group, group message id), how many members, to the group's shard. One envelope per
    /// destination shard per commit, not one per member (measured: one per member cost about
    /// 8% of the gateway's CPU per member-delivery, docs/benchmarks.md).
    GroupDelivered {
        /// Sorted by group and id.
        counts: Vec<DeliveredCount>,
    },
    /// A member shard has committed its part of a fan-out.
    FanoutDone {
        /// The fan-out.
        fanout: u64,
        /// Its commit failed.
        failed: bool,
    },
    /// A typing indicator, to the recipient's owner shard; never stored.
    Typing {
        /// Who types.
        from: UserId,
        /// Who sees it.
        to: UserId,
        /// Composing or paused.
        state: crate::proto::TypingState,
    },
}

/// Plain per-shard copies of the configuration the hot path needs.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Largest frame.
    pub max_frame_bytes: usize,
    /// Idle timeout, ms.
    pub idle_timeout_ms: u64,
    /// Delivery window per device.
    pub delivery_window: usize,
    /// Outbound bytes per connection before it is a slow consumer.
    pub outbound_bytes_max: usize,
    /// Queue limits.
    pub queue: QueueLimits,
    /// Connections per shard.
    pub max_connections: usize,
    /// Pending store ops before the shard stops reading client input.
    pub pending_ops_max: usize,
    /// Store sync policy.
    pub sync: SyncPolicy,
    /// fsync period with `sync = batch`, ms.
    pub sync_interval_ms: u64,
    /// Heartbeat period, ms (0 = off).
    pub heartbeat_ms: u64,
    /// A connection whose queued output has not moved for this long is closed, ms.
    pub write_stall_timeout_ms: u64,
    /// Outbound bytes queued over all connections before reading stops (back-pressure).
    pub shard_outbound_bytes_max: usize,
    /// New connections per second this shard accepts from one source address (0: no limit).
    pub connect_rate_per_source: u32,
    /// SENDs per second per connection (0: no limit); bursts of twice that.
    pub send_rate_per_s: u32,
    /// Drain: GO_AWAY frames this shard sends per second.
    pub drain_goaway_per_s: u64,
    /// Drain: the shard keeps accepting this long after it sees the stop flag, ms.
    pub drain_unready_ms: u64,
    /// Drain: the shard finishes this long after it sees the stop flag, ms.
    pub drain_deadline_ms: u64,
    /// Presence subscriptions one connection may hold.
    pub presence_subscriptions_max: usize,
    /// Connections that may follow one user (on its owner shard).
    pub presence_subscribers_max: usize,
    /// Typing indicators per second per connection (0: no limit); bursts of twice that.
    pub typing_rate_per_s: u32,
    /// Members one group may have.
    pub group_members_max: usize,
    /// Test hook, never for production: silently drop every n-th message delivery (delete it
    /// as if acknowledged, send nothing), so that tests can prove the loadgen's loss check
    /// fails. Set only by the `GATEHOUSE_TEST_DROP_DELIVERY_EVERY` environment variable.
    pub test_drop_delivery_every: u64,
    /// Test hook, never for production: every commit that holds an `Op::Unlog` fails, and so
    /// does its retry, so that tests reach the give-up path (`log_pin`). Set only by the
    /// `GATEHOUSE_TEST_FAIL_LOG_MOVES=1` environment variable.
    pub test_fail_log_moves: bool,
}

/// What a committed op must trigger.
#[derive(Debug)]
/// A committed item to deliver live: to one user, or a group log record to its members.
enum Live {
    One(UserId, ServerMsgId, Item),
    Log(ServerMsgId, Item, Vec<UserId>),
}

enum Completion {
    None,
    /// After the delete of an acknowledged message commits: tell its sender (once, however many
    /// devices acknowledge, and only if the delete really removed it).
    Receipt {
        to: UserId,
        from: UserId,
        msg_id: ServerMsgId,
        ts_ms: u64,
    },
    SendAck {
        to: ConnRef,
        client_msg_id: u64,
        ts_ms: u64,
    },
    /// One member's append of a group message: the part of a fan-out this shard owes.
    Fanout(Rc<groups::FanoutPart>),
    /// A group log record for `n` live members: that many members of the fan-out's part.
    Log {
        part: Option<Rc<groups::FanoutPart>>,
        n: usize,
    },
    /// After the delete of an acknowledged group message commits: count it in the message's
    /// tally on the group's shard.
    GroupDelivered {
        group: u64,
        msg_id: ServerMsgId,
    },
    /// A group's new member list: answer GROUP_OK once it commits.
    GroupOk {
        to: ConnRef,
        request_id: u64,
        group: u64,
    },
}

/// Counters of one shard. Plain cells: only the shard's own thread touches them.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Connections accepted or adopted.
    pub conns_opened: Cell<u64>,
    /// Connections closed, by `CloseReason` (hand-overs are not closes).
    pub conns_closed: [Cell<u64>; CloseReason::ALL.len()],
    /// Connections refused at the per-shard limit.
    pub conns_refused: Cell<u64>,
    /// Successful logins (counted on the shard that verified the token).
    pub logins_ok: Cell<u64>,
    /// Connections closed with a fatal protocol or auth error.
    pub fatal_errors: Cell<u64>,
    /// Connections handed over to another shard.
    pub handovers_out: Cell<u64>,
    /// Messages stored (acknowledged to their sender).
    pub messages_accepted: Cell<u64>,
    /// Messages refused (queue full or store failure).
    pub messages_refused: Cell<u64>,
    /// Items written to sockets (deliveries and receipts).
    pub deliveries: Cell<u64>,
    /// Receipts dropped because the sender's receipt allowance was full.
    pub receipts_dropped: Cell<u64>,
    /// Group commits.
    pub commits: Cell<u64>,
    /// Group commits that failed.
    pub commit_failures: Cell<u64>,
    /// Deletes of failed commits committed again on their own.
    pub deletes_retried: Cell<u64>,
    /// Envelopes queued for other shards.
    pub envelopes_routed: Cell<u64>,
    /// ACKed ids received from devices.
    pub acks: Cell<u64>,
    /// Batches that found a shard-to-shard channel full.
    pub channel_full: Cell<u64>,
    /// Episodes in which the shard stopped reading client input (back-pressure).
    pub backpressure_pauses: Cell<u64>,
    /// New connections refused by the per-source rate limit.
    pub conns_rate_limited: Cell<u64>,
    /// SENDs refused by the per-connection rate limit.
    pub sends_rate_limited: Cell<u64>,
    /// Connections from new sources let through untracked because the table was full.
    pub sources_untracked: Cell<u64>,
    /// TLS handshakes completed: [full, resumed].
    pub tls_handshakes: [Cell<u64>; 2],
    /// WebSocket upgrades completed.
    pub ws_upgrades: Cell<u64>,
    /// PRESENCE frames queued to followers.
    pub presence_sent: Cell<u64>,
    /// Presence subscriptions refused at a limit.
    pub presence_refused: Cell<u64>,
    /// Typing indicators forwarded to an online recipient's connections.
    pub typing_forwarded: Cell<u64>,
    /// Typing indicators dropped: over the sender's rate, recipient offline, or blocked.
    pub typing_dropped: Cell<u64>,
    /// SENDs refused because the recipient blocks the sender.
    pub sends_blocked: Cell<u64>,
    /// Group messages appended to members' queues on this shard (member-deliveries).
    pub group_deliveries: Cell<u64>,
    /// Group messages and events a member did not get: its queue was full.
    pub group_queue_full: Cell<u64>,
    /// Member-deliveries stored through the group log (one record per message and shard).
    pub group_log_deliveries: Cell<u64>,
    /// Members whose move out of the group log failed twice (left for the next start).
    pub group_log_moves_failed: Cell<u64>,
    /// Group receipt tallies written to (or deleted from) the store by checkpoints.
    pub group_tally_writes: Cell<u64>,
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// A shard-to-shard outbox: envelopes waiting for the flusher task.
struct Outbox {
    queue: RefCell<Vec<Envelope>>,
    waker: RefCell<Option<Waker>>,
}

/// Task queues of a shard.
#[derive(Clone, Copy)]
struct Queues {
    accept: TaskQueueHandle,
    io: TaskQueueHandle,
    cross: TaskQueueHandle,
    store: TaskQueueHandle,
    housekeeping: TaskQueueHandle,
}

/// Everything a shard thread needs to start; `Send`, built by [`crate::server`].
pub struct ShardSeed {
    /// This shard.
    pub id: ShardId,
    /// Shards in the node.
    pub shards: usize,
    /// The shard's listening sockets, with what each speaks.
    pub listeners: Vec<(OwnedFd, ListenerKind)>,
    /// The node's TLS context, when a TLS or wss listener is configured.
    pub tls: Option<Arc<TlsContext>>,
    /// Users of this shard who block anyone (from the store).
    pub blockers: std::collections::HashSet<UserId>,
    /// The group message tallies checkpointed in the store, oldest first.
    pub tallies: Vec<(ServerMsgId, crate::store::TallyRecord)>,
    /// The shard's store.
    pub store: Store,
    /// Epoch for message ids.
    pub epoch: u16,
    /// Senders to each other shard (`None` at this shard's own index).
    pub senders: Vec<Option<SharedSender<Batch>>>,
    /// Receivers from each other shard.
    pub receivers: Vec<SharedReceiver<Batch>>,
    /// State machine parameters.
    pub params: SessionParams,
    /// Hot-path configuration.
    pub cfg: ShardConfig,
    /// Every shard's pulse (own at `id`).
    pub pulses: Vec<Arc<Pulse>>,
    /// The admin endpoint's control mailbox (metrics requests in, snapshots out), if the
    /// endpoint is enabled.
    pub control: Option<ShardControl>,
    /// Shards of the node that have finished their drain (shared by all shards).
    pub drained: Arc<std::sync::atomic::AtomicUsize>,
    /// Set to stop the node.
    pub stop: Arc<AtomicBool>,
    /// Woken by the watchdog thread every heartbeat period.
    pub nudge: Arc<super::watchdog::Nudge>,
    /// Tells the starter that this shard's root future ran (see `watchdog::StartProbe`).
    pub start: Arc<super::watchdog::StartProbe>,
    /// Told once the shard serves (or failed to start).
    pub ready: std::sync::mpsc::Sender<Result<(), String>>,
}

/// Reactor-local state of one shard.
pub struct Shard {
    /// This shard.
    pub id: ShardId,
    shards: usize,
    /// Hot-path configuration.
    pub cfg: ShardConfig,
    /// State machine parameters.
    pub params: SessionParams,
    store: Store,
    epoch: u16,
    counter: Cell<u64>,
    conns: RefCell<Slab<Rc<Conn>>>,
    next_gen: Cell<u32>,
    /// Owner-side sessions: user → slots of its devices' connections (inline for ≤ 2). Looked
    /// up for every delivery: hashed with foldhash (seeded at random; only verified logins
    /// insert, so the keys are user ids from verified tokens), not SipHash. Maps keyed by what
    /// clients choose (group ids, addresses) keep SipHash (docs/architecture.md, Hashing).
    sessions: RefCell<foldhash::HashMap<UserId, SmallVec<[u32; 2]>>>,
    outboxes: Vec<Outbox>,
    pending: RefCell<Vec<(Op, Completion)>>,
    committer_waker: RefCell<Option<Waker>>,
    paused: RefCell<Vec<Rc<Conn>>>,
    /// Read buffer shared by every connection of the shard (idle connections hold none).
    pub scratch: RefCell<Box<[u8]>>,
    /// Decrypted TLS input, and plaintext gathered for encryption (shared, like `scratch`).
    pub plain_scratch: RefCell<Vec<u8>>,
    /// WebSocket payloads of one read (shared, like `scratch`).
    pub app_scratch: RefCell<Vec<u8>>,
    /// The node's TLS context (shared by every shard: certificate and ticket keys).
    tls: Option<Arc<TlsContext>>,
    /// Presence followers of this shard's users: target → (following connection, its user).
    watchers: RefCell<HashMap<UserId, presence::Followers>>,
    /// Users of this shard who block anyone: only their blocks are looked up in the store.
    blockers: RefCell<std::collections::HashSet<UserId>>,
    /// Members of the groups this shard owns that were used since start (read from the store
    /// on first use).
    groups: RefCell<HashMap<u64, Vec<(UserId, crate::proto::GroupRole)>>>,
    /// Group messages waiting for their member shards' commits, by fan-out id (the shard's
    /// own counter: foldhash, like `sessions`).
    fanouts: RefCell<foldhash::HashMap<u64, groups::FanoutWait>>,
    /// Group messages stored once for this shard's online members (`log.rs`).
    glog: log::GroupLog,
    next_fanout: Cell<u64>,
    /// Delivered/read tallies of recent group messages sent through this shard's groups.
    tallies: RefCell<HashMap<(u64, ServerMsgId), crate::store::TallyRecord>>,
    /// Tally keys in creation order, for the bound.
    tally_order: RefCell<std::collections::VecDeque<(u64, ServerMsgId)>>,
    /// Tallies changed, started or dropped since the last checkpoint to the store.
    tallies_dirty: RefCell<std::collections::HashSet<(u64, ServerMsgId)>>,
    /// Counters.
    pub stats: ShardStats,
    /// Group commit latency, µs.
    pub commit_us: RefCell<Histogram<u64>>,
    /// Ops per group commit.
    pub commit_ops: RefCell<Histogram<u64>>,
    /// Server-side send→deliver latency of live deliveries, µs (1 ms resolution).
    pub deliver_us: RefCell<Histogram<u64>>,
    /// Per-source connection rate buckets (bounded by `limits::SOURCES_TRACKED_MAX`).
    sources: RefCell<HashMap<std::net::IpAddr, TokenBucket>>,
    pulses: Vec<Arc<Pulse>>,
    control: Option<ShardControl>,
    control_answered: Cell<u64>,
    /// Shards of the node that have finished their drain (the drain barrier).
    drained: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
    dirty: Cell<bool>,
    committing: Cell<bool>,
    queues: Queues,
}

/// Refuses a just-accepted connection in the listener's language: the ERROR frame on TCP, an
/// HTTP 503 on plain WebSocket (a browser shows it), and a plain close on TLS (nothing can be
/// said before a handshake).
fn refuse(stream: &TcpStream, kind: ListenerKind, frame: &[u8], why: &str) {
    match kind {
        ListenerKind::Tcp => conn::send_best_effort(stream, frame),
        ListenerKind::Ws => {
            let body = format!("{why}\n");
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            conn::send_best_effort(stream, resp.as_bytes());
        }
        ListenerKind::Tls | ListenerKind::Wss => {}
    }
}

/// Waits until `ready()` holds, parking the task in `slot` until someone wakes it.
fn wait_until<'a>(
    slot: &'a RefCell<Option<Waker>>,
    mut ready: impl FnMut() -> bool + 'a,
) -> impl Future<Output = ()> + 'a {
    poll_fn(move |cx| {
        if ready() {
            return Poll::Ready(());
        }
        *slot.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    })
}

fn wake(slot: &RefCell<Option<Waker>>) {
    if let Some(w) = slot.borrow_mut().take() {
        w.wake();
    }
}

impl Shard {
    /// Runs a shard on the current (glommio) thread until the node stops.
    pub async fn run(seed: ShardSeed) {
        seed.start.polled();
        // Give the watchdog a waker at once (see `Nudge::attach`).
        seed.nudge.attach().await;
        let ex = glommio::executor();
        let queues = Queues {
            accept: ex.create_task_queue(Shares::Static(100), Latency::NotImportant, "accept"),
            io: ex.create_task_queue(Shares::Static(1000), Latency::NotImportant, "io"),
            cross: ex.create_task_queue(Shares::Static(1000), Latency::NotImportant, "cross"),
            store: ex.create_task_queue(Shares::Static(500), Latency::NotImportant, "store"),
            housekeeping: ex.create_task_queue(
                Shares::Static(50),
                Latency::Matters(Duration::from_millis(seed.cfg.heartbeat_ms.max(1))),
                "housekeeping",
            ),
        };
        let hist = || Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds");
        let shard = Rc::new(Shard {
            id: seed.id,
            shards: seed.shards,
            cfg: seed.cfg,
            params: seed.params,
            store: seed.store,
            epoch: seed.epoch,
            counter: Cell::new(0),
            conns: RefCell::new(Slab::new()),
            next_gen: Cell::new(0),
            sessions: RefCell::default(),
            outboxes: (0..seed.shards)
                .map(|_| Outbox {
                    queue: RefCell::new(Vec::new()),
                    waker: RefCell::new(None),
                })
                .collect(),
            pending: RefCell::new(Vec::new()),
            committer_waker: RefCell::new(None),
            paused: RefCell::new(Vec::new()),
            scratch: RefCell::new(vec![0u8; limits::READ_SCRATCH_BYTES].into_boxed_slice()),
            plain_scratch: RefCell::new(Vec::new()),
            app_scratch: RefCell::new(Vec::new()),
            tls: seed.tls,
            watchers: RefCell::new(HashMap::new()),
            groups: RefCell::new(HashMap::new()),
            fanouts: RefCell::default(),
            glog: log::GroupLog::default(),
            next_fanout: Cell::new(0),
            tallies: RefCell::new(HashMap::new()),
            tally_order: RefCell::new(std::collections::VecDeque::new()),
            tallies_dirty: RefCell::new(std::collections::HashSet::new()),
            blockers: RefCell::new(seed.blockers),
            stats: ShardStats::default(),
            commit_us: RefCell::new(hist()),
            commit_ops: RefCell::new(hist()),
            deliver_us: RefCell::new(hist()),
            pulses: seed.pulses,
            sources: RefCell::new(HashMap::new()),
            control: seed.control,
            control_answered: Cell::new(0),
            drained: seed.drained,
            stop: seed.stop,
            dirty: Cell::new(false),
            committing: Cell::new(false),
            queues,
        });
        shard.restore_tallies(seed.tallies);

        let mut tasks = Vec::new();
        for (peer, sender) in seed.senders.into_iter().enumerate() {
            if let Some(sender) = sender {
                let s = shard.clone();
                tasks.push(glommio::spawn_local_into(
                    async move { s.flusher(peer, sender.connect().await).await },
                    queues.cross,
                ));
            }
        }
        for receiver in seed.receivers {
            let s = shard.clone();
            tasks.push(glommio::spawn_local_into(
                async move { s.drain(receiver.connect().await).await },
                queues.cross,
            ));
        }
        let spawn = |fut, q| glommio::spawn_local_into(fut, q).expect("spawn shard task");
        let s = shard.clone();
        let committer = spawn(
            Box::pin(async move { s.committer().await })
                as std::pin::Pin<Box<dyn Future<Output = ()>>>,
            queues.store,
        );
        let s = shard.clone();
        let syncer = spawn(Box::pin(async move { s.syncer().await }), queues.store);
        let pulse = shard.pulses[shard.id.index()].clone();
        let s = shard.clone();
        let nudge = seed.nudge.clone();
        let heartbeat = spawn(
            Box::pin(async move {
                loop {
                    nudge.wait().await;
                    pulse.beats.fetch_add(1, Ordering::Relaxed);
                    s.poll_control();
                }
            }),
            queues.housekeeping,
        );
        let s = shard.clone();
        let sweeper = spawn(
            Box::pin(async move { s.sweeper().await }),
            queues.housekeeping,
        );
        // With the heartbeat disabled, a timer polls the control mailbox instead, and counts
        // the beats that `/healthz` watches.
        let control = (shard.control.is_some() && shard.cfg.heartbeat_ms == 0).then(|| {
            let s = shard.clone();
            spawn(
                Box::pin(async move {
                    loop {
                        glommio::timer::sleep(Duration::from_millis(limits::CONTROL_POLL_MS)).await;
                        s.pulses[s.id.index()].beats.fetch_add(1, Ordering::Relaxed);
                        s.poll_control();
                    }
                }),
                queues.housekeeping,
            )
        });
        let acceptors: Vec<_> = seed
            .listeners
            .into_iter()
            .map(|(fd, kind)| {
                // SAFETY: the fd is a listening TCP socket we own; it moves into the listener.
                let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
                let s = shard.clone();
                spawn(
                    Box::pin(async move { s.accept_loop(listener, kind).await }),
                    queues.accept,
                )
            })
            .collect();
        let cross: Vec<_> = tasks
            .into_iter()
            .map(|t| t.expect("spawn cross task").detach())
            .collect();
        let _ = seed.ready.send(Ok(()));
        tracing::debug!(shard = shard.id.0, epoch = shard.epoch, "shard serving");

        // Serve until told to stop.
        while !shard.stop.load(Ordering::Relaxed) {
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        // Not ready already (readyz says so); keep accepting while load balancers notice.
        let drain_start = Instant::now();
        if shard.cfg.drain_unready_ms > 0 {
            glommio::timer::sleep(Duration::from_millis(shard.cfg.drain_unready_ms)).await;
        }
        for a in acceptors {
            a.cancel().await;
        }
        shard.shutdown(drain_start).await;
        // Stay a peer until every shard has drained: a shard that stopped its drain tasks early
        // would leave the others' envelopes for it piling up in their outboxes (and their
        // readers paused by that back-pressure) for the rest of their drains.
        shard.drained.fetch_add(1, Ordering::AcqRel);
        let wait_until_ms = shard.cfg.drain_deadline_ms + 1_000;
        while shard.drained.load(Ordering::Acquire) < shard.shards
            && drain_start.elapsed() < Duration::from_millis(wait_until_ms)
        {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        // Within the process's own bound on a drain (`DRAIN_GRACE_MS` past the deadline).
        let flush_by = drain_start + Duration::from_millis(shard.cfg.drain_deadline_ms + 3_000);
        shard.flush_tallies(flush_by).await;
        for t in [syncer, committer] {
            t.cancel().await;
        }
        // A cancelled syncer or committer may have left a job on the blocking pool: the
        // executor must outlive it (see `runtime::blocking`). The heartbeat still runs, so
        // this wait's timer cannot strand the executor in a park (glommio 0.9).
        if !super::blocking_idle(Duration::from_secs(10)).await {
            tracing::warn!(
                shard = shard.id.0,
                "shutdown: a store job still runs after 10 s; exiting without its result"
            );
        } else {
            // A commit cut off by the deadline may have finished on one pool thread while the
            // last sync ran on the other: sync once more, now that no job runs.
            let store = shard.store.clone();
            if let Err(e) = blocking(move || store.sync()).await {
                tracing::error!(shard = shard.id.0, error = %e, "shutdown: last sync failed");
            }
        }
        for t in [sweeper, heartbeat].into_iter().chain(control) {
            t.cancel().await;
        }
        for t in cross {
            t.cancel();
        }
    }

    /// Drains a shard (the acceptor is already stopped): GO_AWAY(shutdown) to its
    /// connections at the paced rate, everyone left at once when the pace would overrun the
    /// deadline, then commit everything pending, fsync, and give connections a moment to
    /// flush. Connections not yet told keep being served meanwhile.
    async fn shutdown(self: &Rc<Self>, drain_start: Instant) {
        let start = Instant::now();
        let deadline = drain_start + Duration::from_millis(self.cfg.drain_deadline_ms);
        // The last fifth of the deadline (at most SHUTDOWN_FLUSH_MS) is kept for the final
        // commit and sync.
        let reserve = (self.cfg.drain_deadline_ms / 5).min(limits::SHUTDOWN_FLUSH_MS);
        let pace_until = deadline - Duration::from_millis(reserve);
        // One snapshot of the connections, walked in order: O(1) per GO_AWAY even at a
        // million connections. Hand-overs adopted meanwhile are caught by the final sweep.
        // Weak: a connection that ends meanwhile must be freed (with its queued output, which
        // counts against the shard's outbound budget), not kept alive by this list.
        let conns: Vec<std::rc::Weak<Conn>> = self
            .conns
            .borrow()
            .iter()
            .map(|(_, c)| Rc::downgrade(c))
            .collect();
        let total = conns.len();
        let mut next = 0;
        while next < conns.len() {
            // Credit by elapsed time, so any rate (even below one per tick) is kept exactly.
            let allowed =
                1 + self.cfg.drain_goaway_per_s as u128 * start.elapsed().as_millis() / 1000;
            let n = if Instant::now() >= pace_until {
                conns.len() - next
            } else {
                (allowed.saturating_sub(next as u128) as usize).min(conns.len() - next)
            };
            for c in conns[next..next + n].iter().filter_map(|w| w.upgrade()) {
                if !c.is_closing() && !c.is_handing_over() {
                    self.go_away(&c, GoAwayReason::Shutdown, "server shutting down");
                }
            }
            next += n;
            if next < conns.len() {
                glommio::timer::sleep(Duration::from_millis(limits::DRAIN_TICK_MS)).await;
            }
        }
        drop(conns);
        let late: Vec<Rc<Conn>> = self.conns.borrow().iter().map(|(_, c)| c.clone()).collect();
        for c in late
            .iter()
            .filter(|c| !c.is_closing() && !c.is_handing_over())
        {
            self.go_away(c, GoAwayReason::Shutdown, "server shutting down");
        }
        drop(late);
        tracing::info!(
            shard = self.id.0,
            connections = total,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "drain: every connection told to go away"
        );
        let deadline = deadline.max(Instant::now() + Duration::from_millis(100));
        while !self.store_idle() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        // Group log ACKs counted since the last commit, before the node's drain barrier.
        self.flush_log_delivered();
        if !self.pending.borrow().is_empty() {
            tracing::error!(shard = self.id.0, ops = self.pending.borrow().len(), "shutdown: store writes still pending at the deadline (none of them was acknowledged)");
        }
        let store = self.store.clone();
        if let Err(e) = blocking(move || store.sync()).await {
            tracing::error!(shard = self.id.0, error = %e, "shutdown: final sync failed");
        }
        let deadline = deadline.min(Instant::now() + Duration::from_millis(1_000));
        while !self.conns.borrow().is_empty() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    // ---------------------------------------------------------------- connections

    /// Adds a connection in `hs`'s phase; returns its slot and state.
    pub fn insert_conn(&self, hs: Handshake, now_ms: u64) -> (u32, Rc<Conn>) {
        let gen = self.next_gen.get().wrapping_add(1);
        self.next_gen.set(gen);
        let conn = Rc::new(Conn::new(gen, hs, now_ms, self.send_burst()));
        let slot = self.conns.borrow_mut().insert(conn.clone());
        self.pulses[self.id.index()]
            .connections
            .fetch_add(1, Ordering::Relaxed);
        self.stats
            .conns_opened
            .set(self.stats.conns_opened.get() + 1);
        (u32::try_from(slot).expect("slot fits u32"), conn)
    }

    /// Removes a finished connection and its session entry.
    pub fn remove_conn(&self, slot: u32) {
        let conn = self.conns.borrow_mut().remove(slot as usize);
        if !conn.is_handing_over() {
            bump(&self.stats.conns_closed[conn.close_reason() as usize], 1);
        }
        // A connection parked by back-pressure must not outlive its close in the list (it
        // would hold its queued bytes, and with them the shard's budget, for good).
        if conn.parked.replace(false) {
            self.paused.borrow_mut().retain(|c| !Rc::ptr_eq(c, &conn));
        }
        self.pulses[self.id.index()]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        let subs = conn.take_subs();
        if !subs.is_empty() {
            let me = ConnRef {
                shard: self.id,
                slot,
                gen: conn.gen,
            };
            self.route_by_owner(subs, |targets| Envelope::Unsubscribe { sub: me, targets });
        }
        if let Some(user) = conn.session_of.get() {
            let went_offline = {
                let mut sessions = self.sessions.borrow_mut();
                match sessions.get_mut(&user) {
                    Some(list) => {
                        list.retain(|s| *s != slot);
                        list.is_empty() && sessions.remove(&user).is_some()
                    }
                    None => false,
                }
            };
            if went_offline {
                let now = now_ms();
                self.log_user_offline(user);
                self.enqueue_op(Op::LastSeen { user, ms: now }, Completion::None);
                self.presence_changed(user, false, now);
            }
        }
    }

    fn conn_at(&self, slot: u32) -> Option<Rc<Conn>> {
        self.conns.borrow().get(slot as usize).cloned()
    }

    fn conn_by_ref(&self, r: ConnRef) -> Option<Rc<Conn>> {
        debug_assert_eq!(r.shard, self.id);
        self.conn_at(r.slot).filter(|c| c.gen == r.gen)
    }

    /// Burst allowance of the per-connection SEND limit.
    fn send_burst(&self) -> u32 {
        self.cfg.send_rate_per_s.saturating_mul(2)
    }

    /// Whether a new connection from `ip` is within the per-source rate limit (and counts
    /// it). The table of sources is bounded: past it, new sources pass untracked.
    fn admit_source(&self, ip: std::net::IpAddr, now: u64) -> bool {
        let rate = self.cfg.connect_rate_per_source;
        if rate == 0 {
            return true;
        }
        let mut sources = self.sources.borrow_mut();
        if let Some(b) = sources.get_mut(&ip) {
            return b.take(now, rate, rate);
        }
        if sources.len() >= limits::SOURCES_TRACKED_MAX {
            bump(&self.stats.sources_untracked, 1);
            return true;
        }
        let mut b = TokenBucket::full(rate, now);
        let ok = b.take(now, rate, rate);
        sources.insert(ip, b);
        ok
    }

    /// Whether new client input must wait: the store, an outbox or the shard's outbound
    /// bytes are over their high-water marks.
    pub fn backpressured(&self) -> bool {
        conn::IO_COUNTS.with(|c| c.out_bytes_queued.get())
            > self.cfg.shard_outbound_bytes_max as u64
            || self.pending.borrow().len() >= self.cfg.pending_ops_max
            || self
                .outboxes
                .iter()
                .any(|o| o.queue.borrow().len() >= limits::OUTBOX_ENVELOPES_HIGH_WATER)
    }

    /// Parks a connection until back-pressure eases; each connection is in the list at most
    /// once (`Conn::parked`), and waking clears the flag.
    pub fn park_reader(&self, conn: &Rc<Conn>) {
        if !conn.parked.replace(true) {
            if self.paused.borrow().is_empty() {
                bump(&self.stats.backpressure_pauses, 1);
            }
            self.paused.borrow_mut().push(conn.clone());
        }
    }

    /// Wakes the connections parked by back-pressure once it has eased.
    pub fn wake_paused(&self) {
        if self.paused.borrow().is_empty() || self.backpressured() {
            return;
        }
        let paused = std::mem::take(&mut *self.paused.borrow_mut());
        for conn in paused {
            conn.parked.set(false);
            conn.wake();
        }
    }

    fn go_away(&self, conn: &Conn, reason: GoAwayReason, message: &str) {
        conn.push_frame(&ServerFrame::GoAway {
            reason,
            message: message.to_string(),
        });
        conn.close_as(match reason {
            GoAwayReason::Shutdown => CloseReason::Shutdown,
            GoAwayReason::Replaced => CloseReason::Replaced,
            GoAwayReason::Idle => CloseReason::Idle,
        });
    }

    /// Acts on one step of a connection's state machine.
    pub fn apply_step(&self, slot: u32, conn: &Rc<Conn>, step: Step, now_ms: u64) {
        match step {
            Step::Reply(frame) => conn.push_frame(&frame),
            Step::Fatal(frame) => {
                if let ServerFrame::Error { code, message, .. } = &frame {
                    tracing::debug!(shard = self.id.0, slot, code, %message, "closing connection on fatal error");
                }
                self.stats
                    .fatal_errors
                    .set(self.stats.fatal_errors.get() + 1);
                let reason = match &frame {
                    ServerFrame::Error { code, .. }
                        if [
                            ErrorCode::BadToken,
                            ErrorCode::TokenExpired,
                            ErrorCode::WrongNode,
                        ]
                        .iter()
                        .any(|c| *c as u16 == *code) =>
                    {
                        CloseReason::Auth
                    }
                    _ => CloseReason::Protocol,
                };
                conn.push_frame(&frame);
                conn.close_as(reason);
            }
            Step::LoggedIn { user, device } => {
                self.stats.logins_ok.set(self.stats.logins_ok.get() + 1);
                if owner_shard(user, self.shards) == self.id {
                    self.register_session(slot, conn, user, device);
                } else {
                    conn.start_handover(user, device);
                }
            }
            Step::Command(cmd) => {
                if let Phase::Active { user, device } = conn.phase() {
                    self.handle_command(slot, conn, user, device, cmd, now_ms);
                }
            }
        }
    }

    /// Makes `conn` the session of (user, device) on this (owner) shard: replaces an older
    /// session of the same device, answers LOGIN_OK and starts delivering the queue.
    fn register_session(&self, slot: u32, conn: &Rc<Conn>, user: UserId, device: DeviceId) {
        let came_online = !self.sessions.borrow().contains_key(&user);
        let replaced: SmallVec<[u32; 2]> = {
            let mut sessions = self.sessions.borrow_mut();
            let list = sessions.entry(user).or_default();
            let conns = self.conns.borrow();
            let (old, keep): (SmallVec<[u32; 2]>, SmallVec<[u32; 2]>) = list
                .iter()
                .copied()
                .partition(|&s| matches!(conns.get(s as usize).map(|c| c.phase()), Some(Phase::Active { device: d, .. }) if d == device));
            *list = keep;
            list.push(slot);
            old
        };
        conn.session_of.set(Some(user));
        for old in replaced {
            if let Some(c) = self.conn_at(old) {
                self.go_away(
                    &c,
                    GoAwayReason::Replaced,
                    "replaced by a newer login of this device",
                );
            }
        }
        conn.push_frame(&ServerFrame::LoginOk { user, device });
        self.pull(conn, user);
        if came_online {
            self.presence_changed(user, true, 0);
        }
    }

    /// Adopts a connection handed over by another shard.
    fn adopt(
        self: &Rc<Self>,
        fd: OwnedFd,
        user: UserId,
        device: DeviceId,
        leftover: Vec<u8>,
        layers: Option<Box<Layers>>,
    ) {
        debug_assert_eq!(owner_shard(user, self.shards), self.id);
        let now = now_ms();
        // SAFETY: `fd` is a connected TCP socket whose ownership moves into the stream.
        let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
        let (slot, conn) = self.insert_conn(Handshake::active(user, device, now), now);
        self.pulses[self.id.index()]
            .handovers_in
            .fetch_add(1, Ordering::Relaxed);
        conn.set_partial(leftover);
        conn.set_layers(layers);
        self.register_session(slot, &conn, user, device);
        self.spawn_conn(stream, slot, conn);
    }

    fn spawn_conn(self: &Rc<Self>, stream: TcpStream, slot: u32, conn: Rc<Conn>) {
        let s = self.clone();
        match glommio::spawn_local_into(conn::serve(s, stream, slot, conn), self.queues.io) {
            Ok(t) => {
                t.detach();
            }
            Err(e) => {
                tracing::error!(shard = self.id.0, error = %e, "cannot spawn connection task");
                self.remove_conn(slot);
            }
        }
    }

    /// Called by a connection task that finished its login here but belongs to another shard.
    pub fn hand_over(
        &self,
        fd: OwnedFd,
        user: UserId,
        device: DeviceId,
        leftover: Vec<u8>,
        layers: Option<Box<Layers>>,
    ) {
        self.stats
            .handovers_out
            .set(self.stats.handovers_out.get() + 1);
        let owner = owner_shard(user, self.shards);
        self.route(
            owner,
            Envelope::Handover {
                fd,
                user,
                device,
                leftover,
                layers,
            },
        );
    }

    /// Counts a completed TLS handshake by kind.
    pub fn count_tls_handshake(&self, kind: Option<rustls::HandshakeKind>) {
        let i = usize::from(matches!(kind, Some(rustls::HandshakeKind::Resumed)));
        bump(&self.stats.tls_handshakes[i], 1);
    }

    /// Counts a completed WebSocket upgrade.
    pub fn count_ws_upgrade(&self) {
        bump(&self.stats.ws_upgrades, 1);
    }

    // ---------------------------------------------------------------- commands

    fn handle_command(
        &self,
        slot: u32,
        conn: &Rc<Conn>,
        user: UserId,
        device: DeviceId,
        cmd: Command,
        now_ms: u64,
    ) {
        match cmd {
            Command::Send {
                client_msg_id,
                recipient,
                body,
            } => {
                let rate = self.cfg.send_rate_per_s;
                if rate > 0 {
                    if let Err(refused) = conn.charge_send(mono_ms(), rate, self.send_burst()) {
                        bump(&self.stats.sends_rate_limited, 1);
                        if refused > limits::SEND_REFUSALS_MAX {
                            conn.push_frame(&ServerFrame::Error {
                                code: ErrorCode::RateLimited as u16,
                                fatal: true,
                                ref_id: client_msg_id,
                                message: format!("kept sending past the limit of {rate} SENDs/s"),
                            });
                            conn.close_as(CloseReason::RateLimited);
                        } else {
                            let why = format!(
                                "over the limit of {rate} SENDs/s; not accepted, slow down"
                            );
                            conn.push_frame(&ServerFrame::error(
                                ErrorCode::RateLimited,
                                client_msg_id,
                                why,
                            ));
                        }
                        return;
                    }
                }
                if recipient.0 == 0 {
                    conn.push_frame(&ServerFrame::error(
                        ErrorCode::BadRecipient,
                        client_msg_id,
                        "recipient 0 is not a user",
                    ));
                    return;
                }
                let node = owner_node(recipient, self.params.nodes as usize);
                if node != self.params.node_id {
                    let why = format!("user {recipient} belongs to node {node}; cross-node routing is not supported yet");
                    conn.push_frame(&ServerFrame::error(
                        ErrorCode::WrongNode,
                        client_msg_id,
                        why,
                    ));
                    return;
                }
                let body_max = body_bytes_max(self.cfg.max_frame_bytes);
                if body.len() > body_max {
                    let why = format!(
                        "body of {} bytes exceeds the maximum of {body_max}",
                        body.len()
                    );
                    conn.push_frame(&ServerFrame::error(
                        ErrorCode::BodyTooLarge,
                        client_msg_id,
                        why,
                    ));
                    return;
                }
                conn.send_started();
                let from = ConnRef {
                    shard: self.id,
                    slot,
                    gen: conn.gen,
                };
                let env = Envelope::Send {
                    from,
                    sender: user,
                    sender_device: device,
                    client_msg_id,
                    recipient,
                    body,
                };
                self.route(owner_shard(recipient, self.shards), env);
            }
            Command::Ack { ids } => {
                bump(&self.stats.acks, ids.len() as u64);
                for id in ids {
                    match conn.acked(id) {
                        None => conn.push_frame(&ServerFrame::error(
                            ErrorCode::UnknownAck,
                            id.0,
                            format!(
                                "id {} is not awaiting acknowledgement on this connection",
                                id.0
                            ),
                        )),
                        Some(f) if f.group.is_some() && self.log_acked(user, id) => {}
                        Some(f) => {
                            // The delivered receipt goes out only once the delete commits and
                            // really removed the message (see `complete`).
                            let completion = match (f.group, f.receipt_to) {
                                (Some((group, msg_id)), _) => {
                                    Completion::GroupDelivered { group, msg_id }
                                }
                                (None, Some(to)) => Completion::Receipt {
                                    to,
                                    from: user,
                                    msg_id: id,
                                    ts_ms: now_ms,
                                },
                                (None, None) => Completion::None,
                            };
                            self.enqueue_op(Op::Delete { user, id }, completion);
                        }
                    }
                }
                if !conn.caught_up() {
                    self.pull(conn, user);
                }
            }
            Command::Read { sender, ids } => {
                if sender.0 == 0 {
                    conn.push_frame(&ServerFrame::error(
                        ErrorCode::BadRecipient,
                        0,
                        "sender 0 is not a user",
                    ));
                    return;
                }
                let node = owner_node(sender, self.params.nodes as usize);
                if node != self.params.node_id {
                    // A receipt for a user of another node could never be delivered and would
                    // stay stored for good.
                    let why = format!("user {sender} belongs to node {node}; cross-node routing is not supported yet");
                    conn.push_frame(&ServerFrame::error(ErrorCode::WrongNode, 0, why));
                    return;
                }
                for msg_id in ids {
                    let env = Envelope::Receipt {
                        to: sender,
                        kind: ReceiptKind::Read,
                        from: user,
                        msg_id,
                        ts_ms: now_ms,
                    };
                    self.route(owner_shard(sender, self.shards), env);
                }
            }
            Command::Subscribe { add, users } => self.subscribe(slot, conn, user, add, users),
            Command::Typing { to, state } => self.typing(conn, user, to, state),
            Command::Privacy { hide_last_seen } => self.enqueue_op(
                Op::Privacy {
                    user,
                    hide_last_seen,
                },
                Completion::None,
            ),
            Command::Block { block, user: other } => self.block(conn, user, other, block),
            Command::Group {
                request_id,
                group,
                op,
                users,
            } => self.group_command(
                slot,
                conn,
                user,
                device,
                GroupRequest::Op {
                    request_id,
                    group,
                    op,
                    users,
                },
            ),
            Command::GroupRead { group, ids } => self.group_read(conn, user, group, ids),
            Command::GroupSend {
                client_msg_id,
                group,
                body,
            } => self.group_command(
                slot,
                conn,
                user,
                device,
                GroupRequest::Send {
                    client_msg_id,
                    group,
                    body,
                },
            ),
        }
    }

    // ---------------------------------------------------------------- routing

    /// Sends `env` to shard `dest` (handled at once if that is this shard).
    fn route(&self, dest: ShardId, env: Envelope) {
        if dest == self.id {
            self.handle_envelope(env);
            return;
        }
        bump(&self.stats.envelopes_routed, 1);
        let outbox = &self.outboxes[dest.index()];
        outbox.queue.borrow_mut().push(env);
        wake(&outbox.waker);
    }

    /// Handles one envelope from another shard (or this one). Synchronous: never awaits.
    fn handle_envelope(&self, env: Envelope) {
        match env {
            Envelope::Send {
                from,
                sender,
                sender_device,
                client_msg_id,
                recipient,
                body,
            } => {
                if self.is_blocked(recipient, sender) {
                    bump(&self.stats.sends_blocked, 1);
                    self.route(
                        from.shard,
                        Envelope::SendResult {
                            to: from,
                            client_msg_id,
                            result: Err((
                                ErrorCode::Blocked,
                                format!("user {recipient} does not accept messages from you"),
                            )),
                        },
                    );
                    return;
                }
                let id = self.next_msg_id();
                let ts_ms = now_ms();
                let item = Item::Message {
                    sender,
                    sender_device,
                    ts_ms,
                    body,
                };
                self.enqueue_op(
                    Op::Append {
                        user: recipient,
                        id,
                        item,
                    },
                    Completion::SendAck {
                        to: from,
                        client_msg_id,
                        ts_ms,
                    },
                );
            }
            Envelope::SendResult {
                to,
                client_msg_id,
                result,
            } => {
                let Some(conn) = self.conn_by_ref(to) else {
                    return; // Sender gone: it retries after reconnecting (at-least-once).
                };
                conn.send_finished();
                let frame = match result {
                    Ok((server_msg_id, server_ts_ms)) => ServerFrame::SendAck {
                        client_msg_id,
                        server_msg_id,
                        server_ts_ms,
                    },
                    Err((code, message)) => ServerFrame::error(code, client_msg_id, message),
                };
                conn.push_frame(&frame);
            }
            Envelope::Receipt {
                to,
                kind,
                from,
                msg_id,
                ts_ms,
            } => {
                let id = self.next_msg_id();
                self.enqueue_op(
                    Op::Append {
                        user: to,
                        id,
                        item: Item::Receipt {
                            kind,
                            from,
                            msg_id,
                            ts_ms,
                        },
                    },
                    Completion::None,
                );
            }
            Envelope::Handover { .. } => unreachable!("handovers arrive through drain tasks"),
            env @ (Envelope::Group { .. }
            | Envelope::Reply { .. }
            | Envelope::GroupFanout { .. }
            | Envelope::GroupRead { .. }
            | Envelope::GroupDelivered { .. }
            | Envelope::FanoutDone { .. }) => self.handle_group_envelope(env),
            other => self.handle_presence_envelope(other),
        }
    }

    fn next_msg_id(&self) -> ServerMsgId {
        let c = self.counter.get();
        // 2^36 ids per shard per start; past that we refuse to wrap (ids must increase).
        assert!(
            c < (1 << MSG_ID_COUNTER_BITS),
            "message id counter exhausted: restart the node to begin a new epoch"
        );
        self.counter.set(c + 1);
        ServerMsgId::compose(self.epoch, self.id, c)
    }

    async fn flusher(self: Rc<Self>, peer: usize, sender: ConnectedSender<Batch>) {
        let outbox = &self.outboxes[peer];
        loop {
            wait_until(&outbox.waker, || !outbox.queue.borrow().is_empty()).await;
            let batch: Batch = {
                let mut q = outbox.queue.borrow_mut();
                let n = q.len().min(limits::BATCH_ENVELOPES_MAX);
                q.drain(..n).collect()
            };
            let n = batch.len() as u64;
            self.pulses[peer]
                .envelopes_in
                .fetch_add(n, Ordering::Relaxed);
            // Awaiting here is the back-pressure point; this task never receives.
            let sent = match sender.try_send(batch) {
                Ok(()) => true,
                Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(batch))) => {
                    bump(&self.stats.channel_full, 1);
                    sender.send(batch).await.is_ok()
                }
                Err(_) => false,
            };
            if !sent {
                tracing::debug!(shard = self.id.0, peer, "peer shard gone; flusher stops");
                return;
            }
            self.wake_paused();
        }
    }

    async fn drain(self: Rc<Self>, receiver: ConnectedReceiver<Batch>) {
        let pulse = self.pulses[self.id.index()].clone();
        while let Some(batch) = receiver.recv().await {
            let n = batch.len() as u64;
            for env in batch {
                match env {
                    Envelope::Handover {
                        fd,
                        user,
                        device,
                        leftover,
                        layers,
                    } => self.adopt(fd, user, device, leftover, layers),
                    other => self.handle_envelope(other),
                }
            }
            pulse.envelopes_done.fetch_add(n, Ordering::Relaxed);
        }
    }

    // ---------------------------------------------------------------- delivery

    /// Feeds `conn` from the store until its window is full or the queue is exhausted.
    fn pull(&self, conn: &Rc<Conn>, user: UserId) {
        let room = conn.room(self.cfg.delivery_window);
        if room == 0 || conn.is_closing() {
            return;
        }
        match self.store.read_queue(user, conn.cursor(), room) {
            Ok(mut items) => {
                // With the user's group log messages: the first `room` of both, by id, below
                // the first log message whose record has not committed (see `log_items`).
                let (logged, fence) = self.log_items(user, conn.cursor());
                if !logged.is_empty() {
                    items.extend(logged);
                    items.sort_unstable_by_key(|(id, _)| *id);
                    // A moved-out item is in both until this reactor sees the move commit.
                    items.dedup_by_key(|(id, _)| *id);
                }
                let mut n = items.len();
                if let Some(fence) = fence {
                    items.retain(|(id, _)| *id < fence);
                    // Not caught up: the rest follows once the record commits.
                    n = n.max(room);
                }
                items.truncate(room);
                for (i, (id, item)) in items.iter().enumerate() {
                    // Bound by bytes as well as by count: a window of large messages must
                    // not overflow the connection's outbound limit (it resumes after a flush).
                    // (A message larger than the room still goes out alone, on an empty queue.)
                    if (i > 0 || conn.out_bytes() > 0) && !self.has_out_room(conn, item) {
                        conn.set_caught_up(false);
                        return;
                    }
                    self.deliver(conn, *id, item);
                }
                conn.set_caught_up(n < room);
            }
            Err(e) => {
                tracing::error!(shard = self.id.0, %user, error = %e, "reading queue failed");
                conn.push_frame(&ServerFrame::error(
                    ErrorCode::Internal,
                    0,
                    "cannot read your queue; reconnect later",
                ));
                conn.close_as(CloseReason::Internal);
            }
        }
    }

    /// Whether `item` fits under half the connection's outbound limit.
    fn has_out_room(&self, conn: &Conn, item: &Item) -> bool {
        let len = match item {
            Item::Message { body, .. } => DELIVER_HEADER_BYTES + body.len(),
            Item::GroupMessage { body, .. } => {
                crate::proto::GROUP_DELIVER_HEADER_BYTES + body.len()
            }
            Item::GroupEvent { users, .. } => 40 + 8 * users.len(),
            Item::GroupReceipt { .. } => 64,
            Item::Receipt { .. } => 64,
        };
        conn.out_bytes() + len <= self.cfg.outbound_bytes_max / 2
    }

    /// Called by a connection task whose output drained: continue feeding it if it had
    /// stopped for lack of room.
    pub fn resume_delivery(&self, conn: &Rc<Conn>) {
        if let Some(user) = conn.session_of.get() {
            if !conn.caught_up() && !conn.is_closing() {
                self.pull(conn, user);
            }
        }
    }

    fn deliver(&self, conn: &Conn, id: ServerMsgId, item: &Item) {
        if matches!(item, Item::Message { .. }) && self.test_drop_due() {
            if let Some(user) = conn.session_of.get() {
                tracing::warn!(
                    shard = self.id.0,
                    id = id.0,
                    "test hook: dropping a delivery"
                );
                conn.skipped(id);
                self.stats.deliveries.set(self.stats.deliveries.get() + 1);
                self.enqueue_op(Op::Delete { user, id }, Completion::None);
                return;
            }
        }
        match item {
            Item::Message {
                sender,
                sender_device,
                ts_ms,
                body,
            } => {
                conn::IO_COUNTS.with(|c| bump(&c.frames_out, 1));
                let header = deliver_header(id, *sender, *sender_device, *ts_ms, body.len());
                conn.push_frame_parts(&header, body);
                conn.delivered(InFlight {
                    id,
                    receipt_to: Some(*sender),
                    group: None,
                });
            }
            Item::GroupReceipt {
                group,
                msg_id,
                members,
                delivered,
                read,
                ts_ms,
            } => {
                conn.push_frame(&ServerFrame::GroupReceipt {
                    receipt_id: id,
                    group: *group,
                    group_msg_id: *msg_id,
                    members: *members,
                    delivered: *delivered,
                    read: *read,
                    ts_ms: *ts_ms,
                });
                conn.delivered(InFlight {
                    id,
                    receipt_to: None,
                    group: None,
                });
            }
            Item::GroupMessage {
                group,
                msg_id,
                sender,
                sender_device,
                ts_ms,
                body,
            } => {
                conn::IO_COUNTS.with(|c| bump(&c.frames_out, 1));
                let header = crate::proto::group_deliver_header(
                    id,
                    *group,
                    *msg_id,
                    *sender,
                    *sender_device,
                    *ts_ms,
                    body.len(),
                );
                conn.push_frame_parts(&header, body);
                conn.delivered(InFlight {
                    id,
                    receipt_to: Some(*sender),
                    group: Some((*group, *msg_id)),
                });
            }
            Item::GroupEvent {
                group,
                ts_ms,
                op,
                actor,
                users,
            } => {
                conn.push_frame(&ServerFrame::GroupEvent {
                    server_msg_id: id,
                    group: *group,
                    ts_ms: *ts_ms,
                    op: *op,
                    actor: *actor,
                    users: users.clone(),
                });
                conn.delivered(InFlight {
                    id,
                    receipt_to: None,
                    group: None,
                });
            }
            Item::Receipt {
                kind,
                from,
                msg_id,
                ts_ms,
            } => {
                conn.push_frame(&ServerFrame::Receipt {
                    receipt_id: id,
                    kind: *kind,
                    from: *from,
                    server_msg_id: *msg_id,
                    ts_ms: *ts_ms,
                });
                conn.delivered(InFlight {
                    id,
                    receipt_to: None,
                    group: None,
                });
            }
        }
        self.stats.deliveries.set(self.stats.deliveries.get() + 1);
    }

    fn test_drop_due(&self) -> bool {
        let every = self.cfg.test_drop_delivery_every;
        every > 0 && (self.stats.deliveries.get() + 1) % every == 0
    }

    /// After a commit: hands a just-stored item to the user's online devices that are caught
    /// up, and makes the others pull it from the store.
    fn deliver_live(&self, user: UserId, id: ServerMsgId, item: &Item) {
        let slots: SmallVec<[u32; 2]> = match self.sessions.borrow().get(&user) {
            Some(list) => list.clone(),
            None => return,
        };
        for slot in slots {
            let Some(conn) = self.conn_at(slot) else {
                continue;
            };
            if conn.cursor().is_some_and(|c| id <= c) || conn.is_closing() {
                continue; // Already delivered by a pull that saw the committed item.
            }
            if conn.caught_up()
                && conn.room(self.cfg.delivery_window) > 0
                && self.has_out_room(&conn, item)
            {
                if let Item::Message { ts_ms, .. } = item {
                    let us = now_ms().saturating_sub(*ts_ms).saturating_mul(1000);
                    self.deliver_us.borrow_mut().saturating_record(us.max(1));
                }
                self.deliver(&conn, id, item);
            } else {
                conn.set_caught_up(false);
                self.pull(&conn, user);
            }
        }
    }

    /// [`Self::deliver_live`] for each member a committed item is for.
    fn deliver_live_all(&self, live: Live) {
        match live {
            Live::One(user, id, item) => self.deliver_live(user, id, &item),
            Live::Log(id, item, users) => {
                for user in users {
                    self.deliver_live(user, id, &item);
                }
            }
        }
    }

    // ---------------------------------------------------------------- store

    /// Nothing waits for the committer and no commit runs.
    fn store_idle(&self) -> bool {
        self.pending.borrow().is_empty() && !self.committing.get()
    }

    fn enqueue_op(&self, op: Op, completion: Completion) {
        self.pending.borrow_mut().push((op, completion));
        wake(&self.committer_waker);
    }

    /// Group commit: one write transaction in flight at a time, on the blocking pool; while
    /// it runs, new ops gather for the next one.
    async fn committer(self: Rc<Self>) {
        // A commit's new pages must fit in the map beside the data (LMDB reuses freed pages
        // only after a commit): bounded by an estimate of its pages, a quarter of the map, as
        // well as by ops. From a 1 GiB map up that is the op bound for small messages.
        let bytes_max = self.store.map_bytes() / 4;
        let page = self.store.page_bytes();
        loop {
            wait_until(&self.committer_waker, || !self.pending.borrow().is_empty()).await;
            let batch: Vec<(Op, Completion)> = {
                let mut p = self.pending.borrow_mut();
                let n = crate::store::batch_len(
                    p.iter().map(|(op, _)| op),
                    limits::COMMIT_OPS_MAX,
                    bytes_max,
                    page,
                );
                p.drain(..n).collect()
            };
            let (ops, completions): (Vec<Op>, Vec<Completion>) = batch.into_iter().unzip();
            let store = self.store.clone();
            let limits = self.cfg.queue;
            let started = Instant::now();
            self.committing.set(true);
            let fail_moves = self.cfg.test_fail_log_moves;
            let (ops, result, retried, log_retried) = blocking(move || {
                let apply = |ops: &[Op]| {
                    if fail_moves && ops.iter().any(|op| matches!(op, Op::Unlog { .. })) {
                        Err(store.test_failure("test hook: group log moves fail"))
                    } else {
                        store.apply(ops, limits)
                    }
                };
                // The ops of a failed batch that `keep` selects, applied again alone and in
                // order: their outcomes, or `None` when there are none or this failed too.
                let retry_alone = |keep: fn(&Op) -> bool, what: &str| {
                    let some: Vec<Op> = ops.iter().filter(|op| keep(op)).cloned().collect();
                    if some.is_empty() {
                        return None;
                    }
                    apply(&some)
                        .map_err(|e| tracing::error!(error = %e, "retrying {what} after a failed commit failed too"))
                        .ok()
                };
                let r = apply(&ops);
                let (mut retried, mut log_retried) = (None, None);
                if r.is_err() {
                    // Moves out of the group log and record drops first (a drop never passes
                    // the move it waits for; a delete of a moved item then finds it). Tried
                    // once: see `complete` for what a second failure does.
                    log_retried = retry_alone(
                        |op| matches!(op, Op::Unlog { .. } | Op::LogDrop { .. }),
                        "group log moves",
                    );
                    // A failed batch (e.g. the map is full) also rolled back its deletes.
                    // Retry them alone: they free space, and acknowledged messages must not
                    // come back. Their outcomes, in order, settle them as in any commit.
                    retried = retry_alone(|op| matches!(op, Op::Delete { .. }), "deletes");
                }
                (ops, r, retried, log_retried)
            })
            .await;
            let _ = self
                .commit_us
                .borrow_mut()
                .record(started.elapsed().as_micros() as u64);
            let _ = self.commit_ops.borrow_mut().record(ops.len() as u64);
            self.stats.commits.set(self.stats.commits.get() + 1);
            self.dirty.set(true);
            self.complete(ops, completions, result, retried, log_retried)
                .await;
            self.flush_log_delivered();
            // Only now: the store is not idle until what the commit owes is sent.
            self.committing.set(false);
            self.wake_paused();
        }
    }

    /// Acts on a commit's outcome, op by op: answers senders, counts group deliveries, delivers
    /// live. After `limits::COMPLETE_SLICE_MS` of it, it answers every remaining op at once
    /// and then delivers the rest live, yielding to the shard's other tasks and its I/O after
    /// each slice: a commit of 65,536 ops took up to 76 ms to complete in the groups
    /// benchmark, too long to hold connections waiting. A commit that completes within one
    /// slice (chat's, as a rule) is handled exactly as before the slices existed.
    /// (Yielding whenever glommio's 500 µs preemption timer fired split the output into more,
    /// smaller writes: the loadgen's CPU per member-delivery rose by a tenth, and throughput
    /// fell.)
    /// When the commit failed, `retried` holds the outcomes of its deletes committed again on
    /// their own, in order: they settle like any committed delete (delivered receipts and
    /// counts), and every other op is refused.
    async fn complete(
        &self,
        ops: Vec<Op>,
        completions: Vec<Completion>,
        result: Result<Vec<OpOutcome>, StoreError>,
        retried: Option<Vec<OpOutcome>>,
        log_retried: Option<Vec<OpOutcome>>,
    ) {
        if result.is_err() {
            // Tally writes are retried at the next checkpoint.
            let mut dirty = self.tallies_dirty.borrow_mut();
            for op in &ops {
                if let Op::Tally { group, msg_id, .. } = op {
                    dirty.insert((*group, *msg_id));
                }
            }
        }
        match result {
            Ok(outcomes) => {
                // Group messages whose delete committed: counted per message below.
                let mut delivered: Vec<(ShardId, u64, ServerMsgId)> = Vec::new();
                let mut rest = ops.into_iter().zip(completions).zip(outcomes);
                let slice_max = Duration::from_millis(limits::COMPLETE_SLICE_MS);
                let mut slice = Instant::now();
                let mut done = 0usize;
                while let Some(((op, completion), outcome)) = rest.next() {
                    if let Some(live) = self.settle(op, completion, outcome, &mut delivered) {
                        self.deliver_live_all(live);
                    }
                    done += 1;
                    if done % 256 == 0 && slice.elapsed() >= slice_max {
                        // Before the first yield, answer every remaining op: a recipient that
                        // reads a committed item during a yield must not make its sender hear
                        // of it (a READ receipt) before the SEND_ACK. Only live deliveries
                        // are left for the slices.
                        let live: Vec<Live> = rest
                            .by_ref()
                            .filter_map(|((op, c), o)| self.settle(op, c, o, &mut delivered))
                            .collect();
                        for (i, live) in live.into_iter().enumerate() {
                            if i % 256 == 0 && slice.elapsed() >= slice_max {
                                glommio::executor().yield_task_queue_now().await;
                                slice = Instant::now();
                            }
                            self.deliver_live_all(live);
                        }
                    }
                }
                self.send_delivered_counts(delivered);
            }
            Err(e) => {
                self.stats
                    .commit_failures
                    .set(self.stats.commit_failures.get() + 1);
                tracing::error!(shard = self.id.0, error = %e, ops = completions.len(), "group commit failed; refusing its sends");
                let mut retried = retried.map(Vec::into_iter);
                let mut log_retried = log_retried.map(Vec::into_iter);
                let mut delivered = Vec::new();
                for (op, completion) in ops.into_iter().zip(completions) {
                    if let Op::LogPut { id, .. } = &op {
                        self.log_committed(*id, false);
                    }
                    if matches!(op, Op::Unlog { .. } | Op::LogDrop { .. }) {
                        match log_retried.as_mut() {
                            Some(outcomes) => {
                                let outcome = outcomes.next().unwrap_or(OpOutcome::Written);
                                self.settle(op, completion, outcome, &mut delivered);
                            }
                            None => {
                                if let Op::Unlog { user, ids, .. } = op {
                                    // Not moved: the records keep the user, and
                                    // `Store::open` moves it; until then no drop may delete
                                    // them. (A drop not made is harmless: the record is moved
                                    // on open, and its members that ACKed get it again.)
                                    self.log_pin(user, &ids);
                                }
                            }
                        }
                        continue;
                    }
                    if let (Op::Delete { .. }, Some(outcomes)) = (&op, retried.as_mut()) {
                        // `apply` answers one outcome per op; were one missing, the delete
                        // would settle as not found rather than stop the shard.
                        let outcome = outcomes.next();
                        debug_assert!(outcome.is_some(), "one outcome per retried delete");
                        bump(&self.stats.deletes_retried, 1);
                        let outcome = outcome.unwrap_or(OpOutcome::Deleted(false));
                        self.settle(op, completion, outcome, &mut delivered);
                        continue;
                    }
                    match completion {
                        Completion::SendAck {
                            to, client_msg_id, ..
                        } => self.refuse(
                            to,
                            client_msg_id,
                            ErrorCode::StoreFailed,
                            e.client_message(),
                        ),
                        Completion::Fanout(part) => self.fanout_part_done(&part, true),
                        Completion::Log { part, n } => {
                            for _ in 0..n {
                                if let Some(part) = &part {
                                    self.fanout_part_done(part, true);
                                }
                            }
                        }
                        Completion::GroupOk {
                            to,
                            request_id,
                            group,
                        } => {
                            // The cached member list may hold the change that failed: read
                            // the group again from the store on next use.
                            self.groups.borrow_mut().remove(&group);
                            self.route(
                                to.shard,
                                Envelope::Reply {
                                    to,
                                    frame: ServerFrame::error(
                                        ErrorCode::StoreFailed,
                                        request_id,
                                        format!(
                                            "group {group} not changed: {}",
                                            e.client_message()
                                        ),
                                    ),
                                },
                            );
                        }
                        Completion::None
                        | Completion::Receipt { .. }
                        | Completion::GroupDelivered { .. } => {}
                    }
                }
                self.send_delivered_counts(delivered);
            }
        }
    }

    /// Tells a sender's connection (on its shard) whether its SEND was stored.
    fn answer(
        &self,
        to: ConnRef,
        client_msg_id: u64,
        result: Result<(ServerMsgId, u64), (ErrorCode, String)>,
    ) {
        self.route(
            to.shard,
            Envelope::SendResult {
                to,
                client_msg_id,
                result,
            },
        );
    }

    /// Refuses a SEND (counted): its sender gets an error naming why.
    fn refuse(&self, to: ConnRef, client_msg_id: u64, code: ErrorCode, message: String) {
        self.stats
            .messages_refused
            .set(self.stats.messages_refused.get() + 1);
        self.answer(to, client_msg_id, Err((code, message)));
    }

    /// One op's committed outcome: answers its sender, accounts a fan-out part, counts a
    /// group delivery into `delivered`, routes a delivered receipt. Returns the appended item
    /// to deliver live, if any.
    fn settle(
        &self,
        op: Op,
        completion: Completion,
        outcome: OpOutcome,
        delivered: &mut Vec<(ShardId, u64, ServerMsgId)>,
    ) -> Option<Live> {
        match (op, outcome) {
            (Op::Append { user, id, item }, OpOutcome::Appended) => {
                match completion {
                    Completion::SendAck {
                        to,
                        client_msg_id,
                        ts_ms,
                    } => {
                        self.stats
                            .messages_accepted
                            .set(self.stats.messages_accepted.get() + 1);
                        self.answer(to, client_msg_id, Ok((id, ts_ms)));
                    }
                    Completion::Fanout(part) => {
                        bump(&self.stats.group_deliveries, 1);
                        self.fanout_part_done(&part, false);
                    }
                    _ => {}
                }
                return Some(Live::One(user, id, item));
            }
            (Op::LogPut { id, item, users }, OpOutcome::Appended) => {
                self.log_committed(id, true);
                if let Completion::Log {
                    part: Some(part),
                    n,
                } = completion
                {
                    bump(&self.stats.group_deliveries, n as u64);
                    bump(&self.stats.group_log_deliveries, n as u64);
                    for _ in 0..n {
                        self.fanout_part_done(&part, false);
                    }
                }
                return Some(Live::Log(id, item, users));
            }
            (Op::Unlog { user, ids, .. }, _) => self.log_unlogged(user, &ids),
            (Op::LogPut { .. } | Op::LogDrop { .. }, _) => {}
            (Op::Append { user, .. }, OpOutcome::QueueFull) => match completion {
                Completion::SendAck {
                    to, client_msg_id, ..
                } => self.refuse(
                    to,
                    client_msg_id,
                    ErrorCode::QueueFull,
                    format!("offline queue of user {user} is full"),
                ),
                Completion::Fanout(part) => {
                    // The member's queue is full: it misses this one (counted); the
                    // others have it, so the send is still acknowledged.
                    bump(&self.stats.group_queue_full, 1);
                    tracing::debug!(shard = self.id.0, %user, "group item dropped: member's queue full");
                    self.fanout_part_done(&part, false);
                }
                Completion::None
                | Completion::Log { .. }
                | Completion::Receipt { .. }
                | Completion::GroupDelivered { .. }
                | Completion::GroupOk { .. } => {
                    self.stats
                        .receipts_dropped
                        .set(self.stats.receipts_dropped.get() + 1);
                    tracing::debug!(shard = self.id.0, %user, "receipt dropped: receipt allowance full");
                }
            },
            (Op::PutGroup { .. }, _) => {
                if let Completion::GroupOk {
                    to,
                    request_id,
                    group,
                } = completion
                {
                    self.route(
                        to.shard,
                        Envelope::Reply {
                            to,
                            frame: ServerFrame::GroupOk {
                                request_id,
                                group,
                                members: Vec::new(),
                            },
                        },
                    );
                }
            }
            (Op::Delete { .. }, OpOutcome::Deleted(true)) => {
                if let Completion::GroupDelivered { group, msg_id } = completion {
                    delivered.push((groups::group_shard(group, self.shards), group, msg_id));
                } else if let Completion::Receipt {
                    to,
                    from,
                    msg_id,
                    ts_ms,
                } = completion
                {
                    let env = Envelope::Receipt {
                        to,
                        kind: ReceiptKind::Delivered,
                        from,
                        msg_id,
                        ts_ms,
                    };
                    self.route(owner_shard(to, self.shards), env);
                }
            }
            (Op::Tally { .. }, _) => bump(&self.stats.group_tally_writes, 1),
            (Op::Delete { .. }, _)
            | (Op::Append { .. }, OpOutcome::Deleted(_) | OpOutcome::Written)
            | (Op::LastSeen { .. } | Op::Privacy { .. } | Op::Block { .. }, _) => {}
        }
        None
    }

    /// Sends the group's shards how many members' deletes of each group message committed:
    /// one `GroupDelivered` per destination shard.
    fn send_delivered_counts(&self, delivered: Vec<(ShardId, u64, ServerMsgId)>) {
        for (to, counts) in count_delivered(delivered) {
            self.route(to, Envelope::GroupDelivered { counts });
        }
    }

    /// With `sync = "batch"`: fsync every interval if anything was committed.
    async fn syncer(self: Rc<Self>) {
        if self.cfg.sync != SyncPolicy::Batch {
            return;
        }
        loop {
            glommio::timer::sleep(Duration::from_millis(self.cfg.sync_interval_ms)).await;
            if self.dirty.replace(false) {
                let store = self.store.clone();
                if let Err(e) = blocking(move || store.sync()).await {
                    tracing::error!(shard = self.id.0, error = %e, "periodic sync failed");
                }
            }
        }
    }

    // ---------------------------------------------------------------- housekeeping

    /// Enforces login and idle timeouts and the close grace period.
    async fn sweeper(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(Duration::from_millis(limits::SWEEP_INTERVAL_MS)).await;
            let now = now_ms();
            // Closes since the last tick may have freed budget: resume parked readers (they
            // are otherwise woken by commits, flushes and drained output).
            self.wake_paused();
            self.flush_log_delivered();
            self.checkpoint_tallies();
            // Forget sources that have been quiet long enough for their bucket to refill.
            let rate = self.cfg.connect_rate_per_source;
            let mono = mono_ms();
            self.sources
                .borrow_mut()
                .retain(|_, b| !b.is_full(mono, rate, rate));
            let conns: Vec<Rc<Conn>> = self.conns.borrow().iter().map(|(_, c)| c.clone()).collect();
            for c in conns {
                if let Some(closing_since) = c.closing_since() {
                    if now.saturating_sub(closing_since) >= limits::CLOSE_GRACE_MS {
                        c.abort();
                    }
                    continue;
                }
                if let Some(step) = c.check_login_timeout(now, &self.params) {
                    if !c.transport_ready() {
                        // A TLS handshake or WebSocket upgrade still unfinished: no frame can
                        // reach the client, so it is just closed.
                        tracing::debug!(shard = self.id.0, "closing a connection whose TLS handshake or WebSocket upgrade did not finish in time");
                        c.close_as(CloseReason::HandshakeTimeout);
                        continue;
                    }
                    self.stats
                        .fatal_errors
                        .set(self.stats.fatal_errors.get() + 1);
                    if let Step::Fatal(frame) = step {
                        c.push_frame(&frame);
                    }
                    c.close_as(CloseReason::LoginTimeout);
                } else if let Some(stalled) = Some(c.write_stalled_ms(mono))
                    .filter(|ms| *ms >= self.cfg.write_stall_timeout_ms)
                {
                    // It has stopped reading: what it was sent stays in the store for its next
                    // session.
                    conn::IO_COUNTS.with(|io| bump(&io.slow_consumers, 1));
                    c.push_frame(&ServerFrame::error(
                        ErrorCode::SlowConsumer,
                        0,
                        format!("none of {} queued bytes read for {stalled} ms: the client does not read", c.out_bytes()),
                    ));
                    c.close_as(CloseReason::SlowConsumer);
                } else if matches!(c.phase(), Phase::Active { .. })
                    && now.saturating_sub(c.last_rx_ms()) >= self.cfg.idle_timeout_ms
                {
                    self.go_away(&c, GoAwayReason::Idle, "no frame within the idle timeout");
                }
            }
        }
    }

    async fn accept_loop(self: Rc<Self>, listener: TcpListener, kind: ListenerKind) {
        let mut last_warn: Option<Instant> = None;
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    if self.conns.borrow().len() >= self.cfg.max_connections {
                        self.stats
                            .conns_refused
                            .set(self.stats.conns_refused.get() + 1);
                        // Overloaded is not fatal for a request, but here the connection
                        // is closed at once, so the frame says so.
                        let frame = ServerFrame::Error {
                            code: ErrorCode::Overloaded as u16,
                            fatal: true,
                            ref_id: 0,
                            message: "server is at its connection limit; retry later".into(),
                        }
                        .to_bytes();
                        refuse(
                            &stream,
                            kind,
                            &frame,
                            "server is at its connection limit; retry later",
                        );
                        continue;
                    }
                    let now = now_ms();
                    let source = stream.peer_addr().map(|a| a.ip());
                    if source.is_ok_and(|ip| !self.admit_source(ip, mono_ms())) {
                        bump(&self.stats.conns_rate_limited, 1);
                        let frame = ServerFrame::Error {
                            code: ErrorCode::RateLimited as u16,
                            fatal: true,
                            ref_id: 0,
                            message: "too many new connections from your address; retry later"
                                .into(),
                        }
                        .to_bytes();
                        refuse(
                            &stream,
                            kind,
                            &frame,
                            "too many new connections from your address; retry later",
                        );
                        continue;
                    }
                    let layers = match Layers::for_listener(kind, self.tls.as_ref()) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(shard = self.id.0, error = %e, "cannot start a TLS session; closing");
                            continue;
                        }
                    };
                    let (slot, conn) = self.insert_conn(Handshake::new(now), now);
                    conn.set_layers(layers);
                    self.spawn_conn(stream, slot, conn);
                }
                Err(e) => {
                    let e = std::io::Error::from(e);
                    // Out of descriptors or memory: back off instead of spinning; accepting
                    // resumes once connections close.
                    let exhausted = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        tracing::warn!(shard = self.id.0, error = %e, "accept failed");
                        last_warn = Some(Instant::now());
                    }
                    let backoff = if exhausted { 50 } else { 5 };
                    glommio::timer::sleep(Duration::from_millis(backoff)).await;
                }
            }
        }
    }

    /// Answers a scrape of the admin endpoint if one is waiting. Called on every heartbeat,
    /// so the admin side never wakes the shard (scrape latency: one heartbeat period).
    ///
    /// Never blocks: `try_send` on a bounded channel that has room for stale answers, since
    /// the admin side keeps at most one request outstanding. Not a glommio channel: the admin
    /// threads are not an executor (see admin.rs), and nothing here awaits, which also keeps
    /// clear of glommio's send-and-receive deadlock (issue #555).
    fn poll_control(&self) {
        let Some(c) = &self.control else {
            return;
        };
        let seq = c.requested.load(Ordering::Acquire);
        if seq > self.control_answered.get() {
            self.control_answered.set(seq);
            if c.replies.try_send(Box::new(self.snapshot(seq))).is_err() {
                tracing::debug!(
                    shard = self.id.0,
                    seq,
                    "metrics reply channel full; answer dropped"
                );
            }
        }
    }

    /// This shard's counters, gauges and histograms now.
    pub fn snapshot(&self, seq: u64) -> ShardSnapshot {
        let store = self.store.stats().unwrap_or_else(|e| {
            tracing::warn!(shard = self.id.0, error = %e, "reading store statistics failed");
            Default::default()
        });
        let st = &self.stats;
        let pulse = &self.pulses[self.id.index()];
        conn::IO_COUNTS.with(|io| ShardSnapshot {
            shard: self.id.0,
            seq,
            connections: self.conns.borrow().len() as u64,
            sessions: self.sessions.borrow().len() as u64,
            conns_opened: st.conns_opened.get(),
            conns_refused: st.conns_refused.get(),
            conns_closed: std::array::from_fn(|i| st.conns_closed[i].get()),
            logins_ok: st.logins_ok.get(),
            errors_sent: std::array::from_fn(|i| io.errors_sent[i].get()),
            handovers_out: st.handovers_out.get(),
            handovers_in: pulse.handovers_in.load(Ordering::Relaxed),
            frames_in: io.frames_in.get(),
            bytes_in: io.bytes_in.get(),
            frames_out: io.frames_out.get(),
            bytes_out: io.bytes_out.get(),
            messages_accepted: st.messages_accepted.get(),
            messages_refused: st.messages_refused.get(),
            envelopes_routed: st.envelopes_routed.get(),
            deliveries: st.deliveries.get(),
            acks: st.acks.get(),
            receipts_dropped: st.receipts_dropped.get(),
            queue_items: store.queue_items,
            queue_bytes: store.queue_bytes,
            store_bytes: store.stored_bytes,
            commits: st.commits.get(),
            commit_failures: st.commit_failures.get(),
            deletes_retried: st.deletes_retried.get(),
            pending_ops: self.pending.borrow().len() as u64,
            channel_full: st.channel_full.get(),
            backpressure_pauses: st.backpressure_pauses.get(),
            slow_consumers: io.slow_consumers.get(),
            conns_rate_limited: st.conns_rate_limited.get(),
            sends_rate_limited: st.sends_rate_limited.get(),
            sources_untracked: st.sources_untracked.get(),
            tls_handshakes_full: st.tls_handshakes[0].get(),
            tls_handshakes_resumed: st.tls_handshakes[1].get(),
            ws_upgrades: st.ws_upgrades.get(),
            presence_watchers: self.presence_watchers(),
            presence_sent: st.presence_sent.get(),
            presence_refused: st.presence_refused.get(),
            typing_forwarded: st.typing_forwarded.get(),
            typing_dropped: st.typing_dropped.get(),
            sends_blocked: st.sends_blocked.get(),
            group_deliveries: st.group_deliveries.get(),
            group_queue_full: st.group_queue_full.get(),
            group_log_deliveries: st.group_log_deliveries.get(),
            group_log_moves_failed: st.group_log_moves_failed.get(),
            group_log_messages: self.log_messages() as u64,
            group_tally_writes: st.group_tally_writes.get(),
            outbound_bytes_queued: io.out_bytes_queued.get(),
            commit_us: Buckets::from_histogram(&self.commit_us.borrow(), &LATENCY_BOUNDS_US),
            commit_ops: Buckets::from_histogram(&self.commit_ops.borrow(), &BATCH_BOUNDS),
            deliver_us: Buckets::from_histogram(&self.deliver_us.borrow(), &LATENCY_BOUNDS_US),
        })
    }

    /// Connections on this shard now.
    pub fn connection_count(&self) -> usize {
        self.conns.borrow().len()
    }
}

/// (group, group message id, members) in a `GroupDelivered` envelope.
type DeliveredCount = (u64, ServerMsgId, u32);

/// Counts committed deletes of group messages: per destination shard, per (group, group
/// message id), how many members (`Shard::send_delivered_counts`).
fn count_delivered(
    mut delivered: Vec<(ShardId, u64, ServerMsgId)>,
) -> Vec<(ShardId, Vec<DeliveredCount>)> {
    delivered.sort_unstable();
    let mut out: Vec<(ShardId, Vec<DeliveredCount>)> = Vec::new();
    for (shard, group, msg_id) in delivered {
        if out.last().is_none_or(|(to, _)| *to != shard) {
            out.push((shard, Vec::new()));
        }
        let counts = &mut out.last_mut().expect("pushed above").1;
        match counts.last_mut() {
            Some((g, m, n)) if *g == group && *m == msg_id => *n += 1,
            _ => counts.push((group, msg_id, 1)),
        }
    }
    out
}

#[cfg(test)]
mod delivered_counts_tests {
    use super::*;

    #[test]
    fn deletes_are_counted_per_message_in_one_list_per_shard() {
        let (s0, s1) = (ShardId(0), ShardId(1));
        let (a, b) = (ServerMsgId(10), ServerMsgId(11));
        let out = count_delivered(vec![
            (s1, 7, a),
            (s0, 4, b),
            (s1, 7, a),
            (s0, 4, a),
            (s1, 9, a),
            (s0, 4, b),
            (s1, 7, a),
        ]);
        assert_eq!(
            out,
            vec![
                (s0, vec![(4, a, 1), (4, b, 2)]),
                (s1, vec![(7, a, 3), (9, a, 1)]),
            ]
        );
        assert!(count_delivered(Vec::new()).is_empty());
    }
}
