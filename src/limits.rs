//! One home for every limit and default (TIGER_STYLE: put a limit on everything).
//!
//! The configuration layer (`config.rs`) lets operators move the configurable ones; the
//! `const` assertions at the bottom pin how the limits relate to each other.

/// Length prefix of every frame, in bytes.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Smallest maximum frame an operator may configure (must hold every fixed-size frame).
pub const FRAME_BYTES_MAX_FLOOR: usize = 1024;
/// Largest maximum frame an operator may configure.
pub const FRAME_BYTES_MAX_CEILING: usize = 16 * 1024 * 1024;
/// Default maximum frame length (type byte + payload), in bytes.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 * 1024;
/// Most ids in one ACK or READ frame.
pub const ACK_IDS_MAX: usize = 1024;
/// Longest login token accepted, in bytes.
pub const TOKEN_BYTES_MAX: usize = 512;
/// Longest human-readable text in an ERROR or GO_AWAY frame, in bytes.
pub const REASON_BYTES_MAX: usize = 256;

/// Per-shard scratch buffer that every read goes through, in bytes. Idle connections hold
/// no read buffer of their own.
pub const READ_SCRATCH_BYTES: usize = 64 * 1024;
/// Reads one connection may do in one poll before yielding to others on the shard.
pub const READS_PER_POLL_MAX: usize = 8;
/// Bytes of encoded frames written in one `sendmsg` call at most.
pub const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;
/// iovecs in one `sendmsg` call at most (well under IOV_MAX = 1024).
pub const WRITE_IOVECS_MAX: usize = 64;
/// Message bodies up to this size are copied into a connection's output with their header
/// (cheaper than an allocation and a shared reference per frame); larger ones are queued
/// shared, not copied per recipient.
pub const COPIED_BODY_BYTES_MAX: usize = 512;
/// Small frames are copied one after another into one owned piece of output up to this size;
/// then a new piece starts (bounds what one append may reallocate and copy). A frame larger
/// than this is queued as a piece of its own.
pub const OWNED_PIECE_BYTES_MAX: usize = 64 * 1024;
/// First capacity of an owned piece of output, in bytes (it grows as frames are added).
pub const OWNED_PIECE_BYTES_FIRST: usize = 256;

/// Default deliveries (messages and receipts) a device may have unacknowledged at once.
pub const DELIVERY_WINDOW_DEFAULT: usize = 64;
/// Largest delivery window an operator may configure.
pub const DELIVERY_WINDOW_MAX: usize = 4096;
/// Default outbound bytes queued for one connection before it counts as a slow consumer.
pub const OUTBOUND_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Default messages a user's offline queue may hold; further sends get QUEUE_FULL.
pub const QUEUE_MESSAGES_MAX_DEFAULT: u32 = 10_000;
/// Receipts may exceed the message limit by this factor before they are dropped (and
/// counted), so that receipts never block a sender from being told about delivery.
pub const QUEUE_RECEIPTS_FACTOR: u32 = 2;

/// Default capacity of each shard-to-shard channel, in batches.
pub const CHANNEL_BATCHES_DEFAULT: usize = 256;
/// Envelopes in one cross-shard batch at most.
pub const BATCH_ENVELOPES_MAX: usize = 256;
/// Envelopes waiting in one shard's outbox to another shard before connections on the
/// sending shard stop reading (back-pressure).
pub const OUTBOX_ENVELOPES_HIGH_WATER: usize = 16 * 1024;

/// Operations in one LMDB write transaction at most (group commit). Larger commits dirty each
/// B-tree page once for more operations: measured, a 1M-message offline drain over 1,000
/// queues ran at 146–158k msg/s with 4,096 and 274–291k msg/s with 16,384, and group fan-out
/// to 1,024 online members, offered 510k member-deliveries/s, went from 393–411k/s with
/// 16,384 to 448–494k/s with 65,536 (docs/benchmarks.md). Under chat load commits rarely
/// reach the bound.
pub const COMMIT_OPS_MAX: usize = 64 * 1024;
/// A commit's completion (answers, live deliveries) yields the shard's thread to its other
/// tasks and I/O after this many milliseconds of work.
pub const COMPLETE_SLICE_MS: u64 = 10;
/// Default operations waiting for the next commit before connections on the shard stop
/// reading (`limits.pending_ops_max`).
pub const PENDING_OPS_HIGH_WATER: usize = 64 * 1024;

/// Default time a connection has from accept to a successful login, in milliseconds.
pub const LOGIN_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default time without any frame from a logged-in client before GO_AWAY(idle), in ms.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 300_000;
/// Period of the per-shard housekeeping sweep (timeouts), in milliseconds.
pub const SWEEP_INTERVAL_MS: u64 = 250;
/// Default period of the per-shard heartbeat that bounds glommio 0.9's executor stall.
pub const HEARTBEAT_MS_DEFAULT: u64 = 5;

const _: () = assert!(FRAME_BYTES_MAX_DEFAULT >= FRAME_BYTES_MAX_FLOOR);
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT <= FRAME_BYTES_MAX_CEILING);
// An ACK or READ with the most ids must fit in the smallest allowed frame... it does not at
// 1024 ids (8 KiB), so the decoder also bounds ids by the frame length; this pins the floor
// to hold at least the header fields plus one id.
const _: () = assert!(FRAME_BYTES_MAX_FLOOR > 1 + 2 + 8 + 8);
const _: () = assert!(TOKEN_BYTES_MAX + 1 + 8 + 4 + 2 < FRAME_BYTES_MAX_FLOOR);
const _: () = assert!(DELIVERY_WINDOW_DEFAULT <= DELIVERY_WINDOW_MAX);
const _: () = assert!(OWNED_PIECE_BYTES_FIRST <= OWNED_PIECE_BYTES_MAX);
// A frame with a copied body (a GROUP_DELIVER header of 49 bytes, a server WebSocket header of
// at most 10 and the body) is far smaller than an owned piece, so deliveries share pieces.
const _: () = assert!(49 + WS_HEADER_BYTES_MAX + COPIED_BODY_BYTES_MAX <= OWNED_PIECE_BYTES_MAX);
const _: () = assert!(OWNED_PIECE_BYTES_MAX <= WRITE_BATCH_BYTES_MAX);
const _: () = assert!(BATCH_ENVELOPES_MAX <= OUTBOX_ENVELOPES_HIGH_WATER);
const _: () = assert!(COMMIT_OPS_MAX <= PENDING_OPS_HIGH_WATER);
const _: () = assert!(SHARD_OUTBOUND_BYTES_MAX_DEFAULT >= OUTBOUND_BYTES_MAX_DEFAULT);

/// SENDs one connection may have awaiting their SEND_ACK before the server stops reading
/// from it (bounds the acknowledgements queued for one client).
pub const SENDS_IN_FLIGHT_MAX: u32 = 1024;
/// Time a closing connection gets to flush its last frames before it is dropped, in ms.
pub const CLOSE_GRACE_MS: u64 = 5_000;
/// Time a stopping shard waits for pending store writes before giving up, in ms.
pub const SHUTDOWN_FLUSH_MS: u64 = 10_000;
/// Default time queued output may sit without any byte written before the connection is
/// closed as a slow consumer, ms.
pub const WRITE_STALL_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Default memory budget for outbound data queued on one shard (all its connections).
pub const SHARD_OUTBOUND_BYTES_MAX_DEFAULT: usize = 256 << 20;
/// Default new connections per second per source address (node-wide). Generous, because many
/// users can share one address behind carrier NAT; it stops one host's reconnect loop or
/// flood, not a crowd.
pub const CONNECT_RATE_PER_SOURCE_DEFAULT: u32 = 2_000;
/// Source addresses whose connection rate one shard tracks at most; past it, new addresses are
/// not limited until the sweeper forgets quiet ones (fail open, counted).
pub const SOURCES_TRACKED_MAX: usize = 65_536;
/// Default SENDs per second per connection (bursts of twice that).
pub const SEND_RATE_PER_S_DEFAULT: u32 = 1_000;
/// Largest configurable rate (token buckets count in f32: exact far beyond this).
pub const RATE_PER_S_MAX: u32 = 1_000_000;
/// Refused SENDs in a row after which a connection that keeps sending is closed.
pub const SEND_REFUSALS_MAX: u32 = 64;
/// With `runtime.heartbeat_ms = 0`: how often a shard polls its admin control mailbox, ms.
pub const CONTROL_POLL_MS: u64 = 10;
/// Longest configurable drain deadline, ms (one hour).
pub const DRAIN_DEADLINE_MS_MAX: u64 = 3_600_000;
/// Drain: GO_AWAY frames go out in batches this often, ms.
pub const DRAIN_TICK_MS: u64 = 10;

/// rustls states handled for one chunk of input (or one encryption) at most: each state
/// consumes input, emits output or stops, so this only guards against a library bug looping.
pub const TLS_STATES_PER_INPUT_MAX: usize = 256;
/// Longest header of a server WebSocket frame (unmasked, 64-bit length).
pub const WS_HEADER_BYTES_MAX: usize = 10;
/// Longest header of a client WebSocket frame (masked, 64-bit length).
pub const WS_HEADER_BYTES_MAX_CLIENT: usize = 14;
/// Largest control-frame payload (RFC 6455 5.5).
pub const WS_CONTROL_PAYLOAD_MAX: usize = 125;
/// Largest payload of one client WebSocket data frame: a frame carries at most one maximum
/// protocol frame plus some of the next, and payloads stream through without being held.
pub const WS_FRAME_PAYLOAD_MAX: u64 = 2 * FRAME_BYTES_MAX_CEILING as u64;
/// The WebSocket subprotocol name echoed back when a client offers it.
pub const WS_SUBPROTOCOL: &str = "gatehouse.v1";
/// Bytes of application data encrypted into TLS records per write at most.
pub const TLS_WRITE_PLAIN_BYTES_MAX: usize = 64 * 1024;

const _: () = assert!(WS_HEADER_BYTES_MAX < WS_HEADER_BYTES_MAX_CLIENT);

/// Default presence subscriptions per connection (a user's contacts; WhatsApp-sized address
/// books rarely pass a few hundred who use the app).
pub const PRESENCE_SUBSCRIPTIONS_MAX_DEFAULT: usize = 2_000;
/// Default connections that may follow one user's presence (per node).
pub const PRESENCE_SUBSCRIBERS_MAX_DEFAULT: usize = 10_000;
/// Largest configurable presence limit (either kind).
pub const PRESENCE_LIMIT_CEILING: usize = 1_000_000;
/// Default typing indicators per second per connection (bursts of twice that).
pub const TYPING_RATE_PER_S_DEFAULT: u32 = 5;
/// Default members of one group (WhatsApp's cap).
pub const GROUP_MEMBERS_MAX_DEFAULT: usize = 1024;
/// Largest configurable group: a GROUP_EVENT for a create lists every member, and a list of
/// users in a frame holds at most `ACK_IDS_MAX`.
pub const GROUP_MEMBERS_MAX_CEILING: usize = ACK_IDS_MAX;

const _: () = assert!(GROUP_MEMBERS_MAX_DEFAULT <= GROUP_MEMBERS_MAX_CEILING);
/// Delivered/read tallies of group messages one shard keeps; past it the oldest is forgotten
/// (its later receipts are not aggregated).
pub const GROUP_TALLIES_MAX: usize = 65_536;
/// Group message bodies at least this large are stored once per shard (members' queue items
/// refer to them); smaller ones are copied into each member's item, which costs less than the
/// reference count's read and write per member.
pub const GROUP_BODY_SHARED_MIN_BYTES: usize = 512;
/// Shared group bodies of the first on-disk format converted per transaction when a store
/// opens (see `store`).
pub const LEGACY_BODIES_PER_TXN: usize = 1_000;
/// (Group log record, member) pairs moved into members' queues per transaction when a store
/// opens (see `store::Op::Unlog`).
pub const GROUP_LOG_MOVES_PER_TXN: usize = 10_000;
/// Group messages one online user may hold in the shard's memory, stored once in the group log
/// (delivered or waiting for room in the delivery window). Past it, further group messages go
/// to the user's own queue, as for an offline member (docs/architecture.md, Groups).
pub const GROUP_LIVE_PER_USER_MAX: usize = 512;
/// Group messages with larger bodies are not put in the group log: each member gets an append
/// (the body stored once per shard from `GROUP_BODY_SHARED_MIN_BYTES`). With
/// `GROUP_LIVE_PER_USER_MAX` this bounds what one member that never ACKs holds in memory to
/// 2 MiB, so it takes 32 of them to fill `GROUP_LOG_BYTES_MAX`.
pub const GROUP_LOG_BODY_BYTES_MAX: usize = 4096;
/// Bytes of group message bodies one shard's group log may hold in memory. Past it, fan-outs
/// append to each member's queue, as for offline members, until ACKs free room.
pub const GROUP_LOG_BYTES_MAX: usize = 64 << 20;
/// Bytes of group log records moved into members' queues per transaction when a store opens
/// (besides `GROUP_LOG_MOVES_PER_TXN`), and at most a quarter of the map, as for the group
/// commit: a transaction cannot reuse the pages it frees.
pub const GROUP_LOG_MOVE_BYTES_PER_TXN: usize = 64 << 20;
/// Group member lists one shard keeps in memory (the store holds them all).
pub const GROUP_CACHE_MAX: usize = 65_536;
