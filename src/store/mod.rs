//! The offline store: one LMDB environment per shard holding each user's queue in order.
//!
//! Owns the on-disk layout and the blocking write path. Every function that writes is
//! blocking and must run off the reactor thread (the runtime's committer does that inside one
//! `spawn_blocking` closure, because LMDB ties a write transaction to a thread). Reads are
//! lock-free MVCC snapshots and bounded by the caller.
//!
//! Layout of `<data_dir>/shard-<i>/` (databases inside one environment):
//! - `queue`: `user:u64 BE | id:u64 BE` → encoded [`Item`]. Ids increase per shard, so a
//!   user's keys sort in arrival order.
//! - `meta`: `"layout"` → `shard:u16 shards:u16`; `"epoch"` → `u16`;
//!   `'c' | user:u64` → `messages:u32 receipts:u32` (queue counts for the per-user limit);
//!   `'p' | user:u64` → `last_seen_ms:u64 flags:u8` (presence: when the user was last online,
//!   bit 0 = hide last-seen); `'b' | blocker:u64 | blocked:u64` → empty (a block);
//!   `'g' | group:u64` → `(user:u64 role:u8)*` (the members of a group this shard owns);
//!   `'D' | group_msg_id:u64` → `body` and `'R' | group_msg_id:u64` → `refs:u32` (a group
//!   message's body of at least `limits::GROUP_BODY_SHARED_MIN_BYTES`, stored once per shard:
//!   each member's queue item on this shard refers to it, and the last delete removes both).
//!   The count has a record of its own so that an acknowledgement rewrites 4 bytes, not the
//!   body. Before that, `'B' | group_msg_id:u64` → `refs:u32 body`; [`Store::open`] converts
//!   such records.
//! - `meta`, on a member's shard: `'L' | id:u64` → `users:u16 (user:u64)* item` (the group
//!   log: a group message stored once for the shard's online members, [`Op::LogPut`]; its
//!   ACKs are kept in memory, and [`Store::open`] moves what is left into the members' queues).
//! - `meta`, on a group's shard: `'T' | group_msg_id:u64` → `group:u64 sender:u64 members:u16
//!   delivered:u16 read:u16 reported:u8` (a group message's receipt tally, [`TallyRecord`]:
//!   checkpointed by the shard, so that aggregated receipts go on after a restart).

use std::collections::hash_map::Entry;
// The overlays of one transaction hash with foldhash: SipHash was 9% of a fan-out commit's
// cycles in `perf record` of benches/store.rs. Their keys can be chosen by clients (the count
// overlay's are recipients' user ids), but each map lives for one transaction, bounded by the
// commit's op limit, gets a seed of its own (foldhash seeds every map at random), and its
// hashes are never observable: there is nothing to learn a collision from.
use foldhash::{HashMap, HashMapExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use heed::types::Bytes as RawBytes;
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, PutFlags};
use thiserror::Error;

use crate::config::SyncPolicy;
use crate::ids::{DeviceId, ServerMsgId, ShardId, UserId};
use crate::proto::{GroupOp, GroupRole, ReceiptKind};

/// A store failure. Every one is an environment problem (disk, permissions, full map), not a
/// peer's fault: the affected sends are refused with STORE_FAILED and nothing is acknowledged.
#[derive(Debug, Error)]
pub enum StoreError {
    /// LMDB or file-system error.
    #[error("LMDB error in {path}: {source}")]
    Lmdb {
        /// Environment path.
        path: PathBuf,
        /// Cause.
        source: heed::Error,
    },
    /// The data directory was written by a node with a different shard layout.
    #[error(
        "{path} belongs to shard {found_shard} of {found_shards}, but this node runs shard \
         {shard} of {shards}; start with server.shards = {found_shards} (resharding an existing \
         data directory is not supported yet)"
    )]
    LayoutMismatch {
        /// Environment path.
        path: PathBuf,
        /// Recorded shard.
        found_shard: u16,
        /// Recorded shard count.
        found_shards: u16,
        /// Requested shard.
        shard: u16,
        /// Requested shard count.
        shards: u16,
    },
    /// A stored value does not decode: the file is damaged or from an unknown version.
    #[error("corrupt record in {path}: {why}")]
    Corrupt {
        /// Environment path.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}

/// What a user's queue holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A chat message.
    Message {
        /// Sender.
        sender: UserId,
        /// Sender's device.
        sender_device: DeviceId,
        /// Server timestamp, ms since the Unix epoch.
        ts_ms: u64,
        /// Opaque body, shared (not copied) between the pending batch and live delivery.
        body: Bytes,
    },
    /// A message to a group this user is in (one copy per member's queue; the body is shared
    /// in memory, stored per queue).
    GroupMessage {
        /// The group.
        group: u64,
        /// The message's id in the group (its SEND_ACK id).
        msg_id: ServerMsgId,
        /// Sender.
        sender: UserId,
        /// Sender's device.
        sender_device: DeviceId,
        /// When the group's shard accepted it.
        ts_ms: u64,
        /// Opaque body.
        body: Bytes,
    },
    /// A membership change in a group this user is or was in.
    GroupEvent {
        /// The group.
        group: u64,
        /// When.
        ts_ms: u64,
        /// What changed.
        op: GroupOp,
        /// Who changed it.
        actor: UserId,
        /// Whom it concerns.
        users: Vec<UserId>,
    },
    /// Tallies of a group message this user sent: how many members received and read it.
    GroupReceipt {
        /// The group.
        group: u64,
        /// The message (its SEND_ACK id).
        msg_id: ServerMsgId,
        /// Members it was sent to.
        members: u16,
        /// Members whose device acknowledged it.
        delivered: u16,
        /// Members who marked it read.
        read: u16,
        /// When.
        ts_ms: u64,
    },
    /// A receipt for a message this user sent.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The original message's recipient.
        from: UserId,
        /// The original message's id.
        msg_id: ServerMsgId,
        /// When it was delivered or read.
        ts_ms: u64,
    },
}

const ITEM_MESSAGE: u8 = 1;
const ITEM_RECEIPT: u8 = 2;
const ITEM_GROUP_MESSAGE: u8 = 3;
const ITEM_GROUP_EVENT: u8 = 4;
const ITEM_GROUP_RECEIPT: u8 = 5;
/// A group message whose body is stored once per shard under `body_key(msg_id)`; the queue
/// item holds the header only (37 bytes).
const ITEM_GROUP_MESSAGE_REF: u8 = 6;

impl Item {
    /// Encodes for storage.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Item::Message {
                sender,
                sender_device,
                ts_ms,
                body,
            } => {
                let mut v = Vec::with_capacity(21 + body.len());
                v.push(ITEM_MESSAGE);
                v.extend_from_slice(&sender.0.to_be_bytes());
                v.extend_from_slice(&sender_device.0.to_be_bytes());
                v.extend_from_slice(&ts_ms.to_be_bytes());
                v.extend_from_slice(body);
                v
            }
            Item::GroupMessage {
                group,
                msg_id,
                sender,
                sender_device,
                ts_ms,
                body,
            } => {
                let mut v = Vec::with_capacity(37 + body.len());
                v.push(ITEM_GROUP_MESSAGE);
                v.extend_from_slice(&group.to_be_bytes());
                v.extend_from_slice(&msg_id.0.to_be_bytes());
                v.extend_from_slice(&sender.0.to_be_bytes());
                v.extend_from_slice(&sender_device.0.to_be_bytes());
                v.extend_from_slice(&ts_ms.to_be_bytes());
                v.extend_from_slice(body);
                v
            }
            Item::GroupReceipt {
                group,
                msg_id,
                members,
                delivered,
                read,
                ts_ms,
            } => {
                let mut v = Vec::with_capacity(31);
                v.push(ITEM_GROUP_RECEIPT);
                v.extend_from_slice(&group.to_be_bytes());
                v.extend_from_slice(&msg_id.0.to_be_bytes());
                v.extend_from_slice(&members.to_be_bytes());
                v.extend_from_slice(&delivered.to_be_bytes());
                v.extend_from_slice(&read.to_be_bytes());
                v.extend_from_slice(&ts_ms.to_be_bytes());
                v
            }
            Item::GroupEvent {
                group,
                ts_ms,
                op,
                actor,
                users,
            } => {
                let mut v = Vec::with_capacity(28 + 8 * users.len());
                v.push(ITEM_GROUP_EVENT);
                v.extend_from_slice(&group.to_be_bytes());
                v.extend_from_slice(&ts_ms.to_be_bytes());
                v.push(*op as u8);
                v.extend_from_slice(&actor.0.to_be_bytes());
                v.extend_from_slice(&(users.len() as u16).to_be_bytes());
                users
                    .iter()
                    .for_each(|u| v.extend_from_slice(&u.0.to_be_bytes()));
                v
            }
            Item::Receipt {
                kind,
                from,
                msg_id,
                ts_ms,
            } => {
                let mut v = Vec::with_capacity(26);
                v.push(ITEM_RECEIPT);
                v.push(*kind as u8);
                v.extend_from_slice(&from.0.to_be_bytes());
                v.extend_from_slice(&msg_id.0.to_be_bytes());
                v.extend_from_slice(&ts_ms.to_be_bytes());
                v
            }
        }
    }

    /// Decodes a stored value.
    pub fn decode(v: &[u8]) -> Option<Item> {
        let u64_at = |i: usize| {
            v.get(i..i + 8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        };
        match *v.first()? {
            ITEM_MESSAGE if v.len() >= 21 => Some(Item::Message {
                sender: UserId(u64_at(1)?),
                sender_device: DeviceId(u32::from_be_bytes(v[9..13].try_into().ok()?)),
                ts_ms: u64_at(13)?,
                body: Bytes::copy_from_slice(&v[21..]),
            }),
            ITEM_GROUP_MESSAGE if v.len() >= 37 => Some(Item::GroupMessage {
                group: u64_at(1)?,
                msg_id: ServerMsgId(u64_at(9)?),
                sender: UserId(u64_at(17)?),
                sender_device: DeviceId(u32::from_be_bytes(v[25..29].try_into().ok()?)),
                ts_ms: u64_at(29)?,
                body: Bytes::copy_from_slice(&v[37..]),
            }),
            ITEM_GROUP_RECEIPT if v.len() == 31 => {
                let u16_at = |i: usize| u16::from_be_bytes([v[i], v[i + 1]]);
                Some(Item::GroupReceipt {
                    group: u64_at(1)?,
                    msg_id: ServerMsgId(u64_at(9)?),
                    members: u16_at(17),
                    delivered: u16_at(19),
                    read: u16_at(21),
                    ts_ms: u64_at(23)?,
                })
            }
            ITEM_GROUP_EVENT if v.len() >= 28 => {
                let count = usize::from(u16::from_be_bytes(v[26..28].try_into().ok()?));
                if v.len() != 28 + 8 * count {
                    return None;
                }
                Some(Item::GroupEvent {
                    group: u64_at(1)?,
                    ts_ms: u64_at(9)?,
                    op: GroupOp::from_u8(v[17])?,
                    actor: UserId(u64_at(18)?),
                    users: (0..count)
                        .map(|i| u64_at(28 + 8 * i).map(UserId))
                        .collect::<Option<_>>()?,
                })
            }
            ITEM_RECEIPT if v.len() == 26 => Some(Item::Receipt {
                kind: ReceiptKind::from_u8(v[1])?,
                from: UserId(u64_at(2)?),
                msg_id: ServerMsgId(u64_at(10)?),
                ts_ms: u64_at(18)?,
            }),
            _ => None,
        }
    }

    fn is_receipt(&self) -> bool {
        matches!(self, Item::Receipt { .. } | Item::GroupReceipt { .. })
    }
}

/// One write in a group commit.
#[derive(Clone, Debug)]
pub enum Op {
    /// Append `item` to `user`'s queue under `id`, unless the queue is at its limit.
    Append {
        /// Queue owner.
        user: UserId,
        /// Server id (key).
        id: ServerMsgId,
        /// What to store.
        item: Item,
    },
    /// Remove `id` from `user`'s queue (acknowledged by a device). Absent ids are ignored.
    Delete {
        /// Queue owner.
        user: UserId,
        /// Server id.
        id: ServerMsgId,
    },
    /// Record when `user` was last online (its last session ended).
    LastSeen {
        /// The user.
        user: UserId,
        /// When, ms since the Unix epoch.
        ms: u64,
    },
    /// Set `user`'s privacy setting.
    Privacy {
        /// The user.
        user: UserId,
        /// Hide last-seen from followers.
        hide_last_seen: bool,
    },
    /// Write a group's member list (or delete the group when it is empty).
    PutGroup {
        /// The group.
        group: u64,
        /// Members and roles, sorted by user.
        members: Vec<(UserId, GroupRole)>,
    },
    /// Add (`on`) or remove a block of `blocked` by `blocker`.
    Block {
        /// Who blocks.
        blocker: UserId,
        /// Who is blocked.
        blocked: UserId,
        /// Block or unblock.
        on: bool,
    },
    /// Store a group message once for `users`, members of this shard with an online device
    /// (the group log, `'L' | id`): their deliveries and ACKs then happen in memory, and only
    /// the record's removal ([`Op::LogDrop`]) or a member's move to its own queue
    /// ([`Op::Unlog`]) writes again. [`Store::open`] moves every record left by a stop or a
    /// crash into its members' queues, so the message is as durable as `users` appends.
    LogPut {
        /// The message's id on this shard (the key; also the members' delivery id).
        id: ServerMsgId,
        /// The group message.
        item: Item,
        /// The members it is for.
        users: Vec<UserId>,
    },
    /// Remove log record `id`: every member it was for acknowledged it or was moved.
    LogDrop {
        /// The record.
        id: ServerMsgId,
    },
    /// Move `user` out of log records `ids`: each record's item is appended to the user's own
    /// queue under the same id (whatever the queue's limit: it was acknowledged to its sender
    /// already) and the user is removed from the record (the record too, when it was the
    /// last). Ids whose record is gone or does not name the user are skipped.
    Unlog {
        /// The member.
        user: UserId,
        /// Log records, in increasing order.
        ids: Vec<ServerMsgId>,
        /// About how many bytes the moved items take (for the commit's size bound,
        /// [`batch_len`]); 0 when unknown.
        bytes: usize,
    },
    /// Write group message `msg_id`'s receipt tally (`None`: delete it, the tally is over).
    Tally {
        /// The group (not part of the key; lets a failed write be marked for a retry).
        group: u64,
        /// The group message (its id on the group's shard).
        msg_id: ServerMsgId,
        /// The tally.
        record: Option<TallyRecord>,
    },
}

/// LMDB's largest page: a new environment takes the system's page size up to this (mdb.c,
/// `MAX_PAGESIZE` without `MDB_DEVEL`), so 4 KiB on x86-64 and 32 KiB on ARM64 kernels built
/// with 64 KiB pages.
pub const LMDB_PAGE_MAX: usize = 32 * 1024;

/// Bytes that a value of `len` bytes under a key of `key` bytes takes beyond its leaf page,
/// with LMDB pages of `page` bytes. As in mdb.c: the node (an 8-byte header, the key, the
/// value) stays in the leaf while it is at most `me_nodemax`, half a page less the page header
/// (2,038 bytes at 4 KiB, so values up to 2,014 bytes under our 16-byte queue keys); a larger
/// value gets overflow pages of its own, after a 16-byte page header (`OVPAGES`).
fn overflow_bytes(key: usize, len: usize, page: usize) -> usize {
    let nodemax = (((page - 16) / 2) & !1) - 2;
    if 8 + key + len <= nodemax {
        0
    } else {
        (len + 16).div_ceil(page) * page
    }
}

/// How many of `ops` (at least one, at most `max_ops`) make one commit whose new pages,
/// estimated, stay within `max_bytes`, with LMDB pages of `page` bytes
/// ([`Store::page_bytes`]). Each op counts one page: the leaf of its key, which every op of a
/// commit may find in a different place (users' count records are dense, about 200 to a page,
/// and branch pages few). A large value adds its overflow pages. A group body of
/// `limits::GROUP_BODY_SHARED_MIN_BYTES` or more, shared with the op before (one fan-out's
/// appends are consecutive), counts once per run of such ops, as the store keeps it once per
/// shard.
pub fn batch_len<'a>(
    ops: impl Iterator<Item = &'a Op>,
    max_ops: usize,
    max_bytes: usize,
    page: usize,
) -> usize {
    let mut n = 0;
    let mut bytes = 0usize;
    let mut last_shared: Option<*const u8> = None;
    for op in ops.take(max_ops) {
        let mut b = page;
        let mut shared = None;
        match op {
            // Value lengths as `Item::encode` writes them; queue keys are 16 bytes, `meta`
            // keys (shared bodies, member lists) 9.
            Op::Append { item, .. } => match item {
                Item::Message { body, .. } => b += overflow_bytes(16, 21 + body.len(), page),
                Item::GroupMessage { body, .. } => {
                    if shares_body(body) {
                        // The queue item is the 37-byte header; the body is a record of its
                        // own, stored once per run of appends.
                        shared = Some(body.as_ptr());
                        if shared != last_shared {
                            b += overflow_bytes(9, body.len(), page);
                        }
                    } else {
                        b += overflow_bytes(16, 37 + body.len(), page);
                    }
                }
                Item::GroupEvent { users, .. } => {
                    b += overflow_bytes(16, 28 + 8 * users.len(), page)
                }
                Item::GroupReceipt { .. } | Item::Receipt { .. } => {}
            },
            Op::PutGroup { members, .. } => b += overflow_bytes(9, 9 * members.len(), page),
            Op::LogPut { item, users, .. } => {
                let body = match item {
                    Item::GroupMessage { body, .. } => body.len(),
                    _ => 0,
                };
                b += overflow_bytes(9, 2 + 8 * users.len() + 37 + body, page);
            }
            // Each id: the user's new queue item and the rewritten record (bodies are small
            // next to the map; a member holds at most `limits::GROUP_LIVE_PER_USER_MAX`).
            Op::Unlog { ids, bytes, .. } => b += 2 * (page * ids.len() + bytes),
            Op::Delete { .. }
            | Op::LogDrop { .. }
            | Op::LastSeen { .. }
            | Op::Privacy { .. }
            | Op::Block { .. }
            | Op::Tally { .. } => {}
        }
        last_shared = shared;
        if n > 0 && bytes + b > max_bytes {
            break;
        }
        bytes += b;
        n += 1;
    }
    n
}

/// How many members received and read one group message, and which aggregated receipts its
/// sender has been sent: kept in memory by the group's shard, checkpointed to its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TallyRecord {
    /// The group.
    pub group: u64,
    /// Who sent the message (gets the receipts).
    pub sender: UserId,
    /// Members it went to (the sender excluded).
    pub members: u16,
    /// Members whose device acknowledged it.
    pub delivered: u16,
    /// GROUP_READs counted (at most `members`).
    pub read: u16,
    /// Receipts sent, bits: first delivered, all delivered, first read, all read.
    pub reported: u8,
}

const TALLY_RECORD_BYTES: usize = 23;

impl TallyRecord {
    fn encode(&self) -> [u8; TALLY_RECORD_BYTES] {
        let mut v = [0u8; TALLY_RECORD_BYTES];
        v[..8].copy_from_slice(&self.group.to_be_bytes());
        v[8..16].copy_from_slice(&self.sender.0.to_be_bytes());
        v[16..18].copy_from_slice(&self.members.to_be_bytes());
        v[18..20].copy_from_slice(&self.delivered.to_be_bytes());
        v[20..22].copy_from_slice(&self.read.to_be_bytes());
        v[22] = self.reported;
        v
    }

    fn decode(v: &[u8]) -> Option<TallyRecord> {
        let v: &[u8; TALLY_RECORD_BYTES] = v.try_into().ok()?;
        let u16_at = |i: usize| u16::from_be_bytes([v[i], v[i + 1]]);
        Some(TallyRecord {
            group: u64::from_be_bytes(v[..8].try_into().ok()?),
            sender: UserId(u64::from_be_bytes(v[8..16].try_into().ok()?)),
            members: u16_at(16),
            delivered: u16_at(18),
            read: u16_at(20),
            reported: v[22],
        })
    }
}

/// A user's stored presence facts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PresenceRecord {
    /// When the user was last online, ms since the Unix epoch (0: never seen).
    pub last_seen_ms: u64,
    /// Followers see no last-seen time.
    pub hide_last_seen: bool,
}

/// Outcome of one [`Op`] in a committed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpOutcome {
    /// Appended (durable per the sync policy once the batch returns).
    Appended,
    /// Not appended: the user's queue holds `queue_messages_max` messages (or receipts
    /// beyond their allowance).
    QueueFull,
    /// Deleted (`true`) or was not there (`false`).
    Deleted(bool),
    /// A presence, privacy or block record was written.
    Written,
}

/// Queue-length limits applied inside the write transaction.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// Messages per user.
    pub messages_max: u32,
    /// Receipts per user.
    pub receipts_max: u32,
}

/// A user's queue counts (messages, receipts) within one write transaction.
struct CountsInTxn {
    /// As read from the store.
    stored: (u32, u32),
    /// After this transaction's ops so far.
    now: (u32, u32),
    /// The stored record is exactly what `put_counts` would write for `stored` (so an
    /// unchanged count need not be written).
    canonical: bool,
}

/// One write transaction's limits and accounting overlays (see [`Store::apply`]).
struct InTxn {
    limits: QueueLimits,
    counts: HashMap<UserId, CountsInTxn>,
    bodies: HashMap<ServerMsgId, BodyRefs>,
}

/// What a queue delete removed: the item's kind byte and, for group items, the message id
/// (bytes 9..17), copied out of the database.
#[derive(Clone, Copy)]
struct Deleted {
    kind: Option<u8>,
    msg_id: Option<u64>,
}

impl Deleted {
    fn of(v: &[u8]) -> Deleted {
        Deleted {
            kind: v.first().copied(),
            msg_id: v.get(9..17).and_then(u64_be),
        }
    }
}

/// A queue append of [`Store::apply`]'s batch that fits: its key and its op's index (the value
/// is encoded when it is written, so a commit never holds a second copy of every body).
type KeyedAppend = ([u8; 16], usize);

/// A queue delete of [`Store::apply`]'s batch, by key.
struct KeyedDelete {
    key: [u8; 16],
    /// Its index in the batch.
    op: usize,
    found: Option<Deleted>,
}

/// Items the delete cursor passes without deleting before it starts again at the next key
/// (see `Store::delete_in_key_order`).
const DELETE_WALK_SKIP_MAX: usize = 32;

/// A shared group body's reference count within one write transaction.
struct BodyRefs {
    /// References after this transaction's ops so far.
    refs: u32,
    /// The record exists in the store (as of the transaction's start).
    stored: bool,
    /// The body to store with the record when it is new.
    new_body: Option<Bytes>,
}

/// One shard's store. Cheap to clone; `Send + Sync`, so a clone moves into the blocking
/// commit closure.
#[derive(Clone)]
pub struct Store {
    env: Env,
    queue: Database<'static, RawBytes, RawBytes>,
    meta: Database<'static, RawBytes, RawBytes>,
    path: PathBuf,
}

/// An 8-byte big-endian integer; `None` when `b` is not 8 bytes.
/// Whether a group message's body is stored once per shard (see [`stored_value`]). Tiny
/// bodies stay inline (see the limit).
fn shares_body(body: &Bytes) -> bool {
    body.len() >= crate::limits::GROUP_BODY_SHARED_MIN_BYTES
}

/// The queue value of `item`. The body of a group message, once per shard: the first member's
/// append stores it (counted by `Store::admit`), every append counts a reference, and the
/// queue item is the header.
fn stored_value(item: &Item) -> Vec<u8> {
    let mut v = item.encode();
    if let Item::GroupMessage { body, .. } = item {
        if shares_body(body) {
            v.truncate(37);
            v[0] = ITEM_GROUP_MESSAGE_REF;
        }
    }
    v
}

fn u64_be(b: &[u8]) -> Option<u64> {
    b.try_into().ok().map(u64::from_be_bytes)
}

fn queue_key(user: UserId, id: ServerMsgId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&user.0.to_be_bytes());
    k[8..].copy_from_slice(&id.0.to_be_bytes());
    k
}

/// A metadata key: a one-byte tag, then a big-endian u64 (a user, group or message id).
fn tagged_key(tag: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn presence_key(user: UserId) -> [u8; 9] {
    tagged_key(b'p', user.0)
}

fn body_key(msg_id: ServerMsgId) -> [u8; 9] {
    tagged_key(b'D', msg_id.0)
}

fn body_refs_key(msg_id: ServerMsgId) -> [u8; 9] {
    tagged_key(b'R', msg_id.0)
}

/// Prefix of shared group bodies as the first builds stored them: `refs:u32 body` in one record.
const LEGACY_BODY_PREFIX: u8 = b'B';

fn group_key(group: u64) -> [u8; 9] {
    tagged_key(b'g', group)
}

fn block_key(blocker: UserId, blocked: UserId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'b';
    k[1..9].copy_from_slice(&blocker.0.to_be_bytes());
    k[9..].copy_from_slice(&blocked.0.to_be_bytes());
    k
}

fn count_key(user: UserId) -> [u8; 9] {
    tagged_key(b'c', user.0)
}

fn log_key(id: ServerMsgId) -> [u8; 9] {
    tagged_key(LOG_PREFIX, id.0)
}

/// Group log records: `'L' | id:u64` → `users:u16 (user:u64)* item` (see [`Op::LogPut`]).
const LOG_PREFIX: u8 = b'L';

fn encode_log(users: &[UserId], item: &Item) -> Vec<u8> {
    let item = item.encode();
    let mut v = Vec::with_capacity(2 + 8 * users.len() + item.len());
    v.extend_from_slice(&(users.len() as u16).to_be_bytes());
    users
        .iter()
        .for_each(|u| v.extend_from_slice(&u.0.to_be_bytes()));
    v.extend_from_slice(&item);
    v
}

/// A log record's members and item; `None` when malformed.
fn decode_log(v: &[u8]) -> Option<(Vec<UserId>, Item)> {
    let n = u16::from_be_bytes(v.get(..2)?.try_into().ok()?) as usize;
    let users = v
        .get(2..2 + 8 * n)?
        .chunks_exact(8)
        .map(|b| UserId(u64::from_be_bytes(b.try_into().expect("8 bytes"))))
        .collect();
    let item = Item::decode(&v[2 + 8 * n..])?;
    Some((users, item))
}

fn tally_key(msg_id: ServerMsgId) -> [u8; 9] {
    tagged_key(TALLY_PREFIX, msg_id.0)
}

const TALLY_PREFIX: u8 = b'T';

/// Sizes of one shard's store ([`Store::stats`]). Bytes are B-tree pages (branch, leaf and
/// overflow) in use; free pages are not counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStats {
    /// Items queued (messages and receipts of every user).
    pub queue_items: u64,
    /// Bytes of the queue table's pages.
    pub queue_bytes: u64,
    /// Bytes of the queue and metadata tables together: queue items, shared group bodies,
    /// counts, presence, groups and blocks.
    pub stored_bytes: u64,
}

/// What [`Store::open`] found and set.
pub struct Opened {
    /// The store.
    pub store: Store,
    /// This run's epoch for [`ServerMsgId`]s (already durably bumped).
    pub epoch: u16,
}

impl Store {
    /// The error a test hook reports for a commit it fails on purpose.
    pub fn test_failure(&self, why: &'static str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            why,
        }
    }
}

impl StoreError {
    /// What a client is told: the kind of failure, never server paths or internals (those go
    /// to the log).
    pub fn client_message(&self) -> String {
        match self {
            StoreError::Lmdb {
                source: heed::Error::Mdb(heed::MdbError::MapFull),
                ..
            } => "message not stored: the server's store is full; retry later".into(),
            StoreError::Lmdb {
                source: heed::Error::Io(e),
                ..
            } if e.raw_os_error() == Some(libc::ENOSPC) => {
                "message not stored: the server's disk is full; retry later".into()
            }
            _ => "message not stored: the server could not write it; retry later".into(),
        }
    }
}

impl Store {
    /// Path of shard `shard`'s environment under `data_dir`.
    pub fn shard_dir(data_dir: &Path, shard: ShardId) -> PathBuf {
        data_dir.join(format!("shard-{}", shard.0))
    }

    /// Opens (creating if needed) shard `shard` of `shards`, checks the layout and bumps the
    /// epoch durably. Blocking: call before the shard's reactor starts serving.
    pub fn open(
        data_dir: &Path,
        shard: ShardId,
        shards: usize,
        map_size_mib: usize,
        sync: SyncPolicy,
    ) -> Result<Opened, StoreError> {
        let path = Self::shard_dir(data_dir, shard);
        let lmdb = |source| StoreError::Lmdb {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&path).map_err(|e| lmdb(heed::Error::Io(e)))?;
        let mut flags = EnvFlags::empty();
        if sync != SyncPolicy::Always {
            // Commits write to the page cache only; the committer fsyncs per policy. A killed
            // process loses nothing: the kernel holds the written pages.
            flags |= EnvFlags::NO_SYNC;
        }
        // SAFETY: the environment is opened once per process per path (each shard owns its
        // own directory), and flags are set before any transaction.
        let env = unsafe {
            let mut opts = EnvOpenOptions::new();
            opts.map_size(map_size_mib * 1024 * 1024)
                .max_dbs(4)
                .max_readers(126);
            opts.flags(flags);
            opts.open(&path)
        }
        .map_err(lmdb)?;
        let wtxn = env.write_txn().map_err(lmdb)?;
        let (queue, meta) = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> Result<_, heed::Error> {
                let queue = opener.create_database::<RawBytes, RawBytes>(wtxn, Some("queue"))?;
                let meta = opener.create_database::<RawBytes, RawBytes>(wtxn, Some("meta"))?;
                Ok(CommitOrAbort::<_, ()>::Commit((queue, meta)))
            })
            .map_err(lmdb)?
            .unwrap_commit();
        let mut wtxn = env.write_txn().map_err(lmdb)?;
        let layout = [shard.0.to_be_bytes(), (shards as u16).to_be_bytes()].concat();
        match meta.get(&wtxn, b"layout").map_err(lmdb)? {
            Some(found) if found != layout.as_slice() => {
                let found_shard = u16::from_be_bytes([found[0], found[1]]);
                let found_shards = u16::from_be_bytes([found[2], found[3]]);
                return Err(StoreError::LayoutMismatch {
                    path,
                    found_shard,
                    found_shards,
                    shard: shard.0,
                    shards: shards as u16,
                });
            }
            Some(_) => {}
            None => meta.put(&mut wtxn, b"layout", &layout).map_err(lmdb)?,
        }
        let epoch = match meta.get(&wtxn, b"epoch").map_err(lmdb)? {
            Some(v) if v.len() == 2 => u16::from_be_bytes([v[0], v[1]]),
            Some(_) => {
                return Err(StoreError::Corrupt {
                    path,
                    why: "epoch record",
                })
            }
            None => 0,
        };
        let epoch = epoch.checked_add(1).ok_or(StoreError::Corrupt {
            path: path.clone(),
            why: "epoch exhausted (65535 restarts); see docs/operations.md",
        })?;
        meta.put(&mut wtxn, b"epoch", &epoch.to_be_bytes())
            .map_err(lmdb)?;
        wtxn.commit().map_err(lmdb)?;
        // Shared group bodies of the first format: split each into body and count, in
        // transactions of a bounded size (LMDB cannot reuse a transaction's freed pages within
        // it, so one transaction for all could fill the map). Each one is atomic, so a crash
        // between them leaves both formats side by side, and the next open goes on.
        loop {
            let mut wtxn = env.write_txn().map_err(lmdb)?;
            let legacy = meta
                .prefix_iter(&wtxn, &[LEGACY_BODY_PREFIX])
                .map_err(lmdb)?
                .take(crate::limits::LEGACY_BODIES_PER_TXN)
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<Vec<_>, _>>()
                .map_err(lmdb)?;
            if legacy.is_empty() {
                break;
            }
            for (k, v) in legacy {
                let id = k
                    .get(1..9)
                    .filter(|_| k.len() == 9 && v.len() >= 4)
                    .and_then(|b| b.try_into().ok())
                    .map(|b| ServerMsgId(u64::from_be_bytes(b)))
                    .ok_or(StoreError::Corrupt {
                        path: path.clone(),
                        why: "group message body (first format)",
                    })?;
                meta.put(&mut wtxn, &body_refs_key(id), &v[..4])
                    .map_err(lmdb)?;
                meta.put(&mut wtxn, &body_key(id), &v[4..]).map_err(lmdb)?;
                meta.delete(&mut wtxn, &k).map_err(lmdb)?;
            }
            wtxn.commit().map_err(lmdb)?;
        }
        let store = Store {
            env,
            queue,
            meta,
            path,
        };
        let moved = store.unlog_all()?;
        if moved > 0 {
            tracing::info!(
                shard = shard.0,
                items = moved,
                "group log moved into members' queues"
            );
        }
        // The epoch must be on disk before any id of this epoch can be acknowledged.
        store.sync()?;
        Ok(Opened { store, epoch })
    }

    fn err(&self, source: heed::Error) -> StoreError {
        StoreError::Lmdb {
            path: self.path.clone(),
            source,
        }
    }

    /// Applies `ops` in order in one write transaction and commits it (with fsync under
    /// `sync = always`). Blocking. Either every op takes effect or none does.
    ///
    /// The queue's writes are made in key order, not in the order of `ops`: a fan-out
    /// commit holds its messages one after the other, each to every member, so in op order
    /// each write would search the B-tree from its root (that search was about half of a
    /// fan-out commit's cycles in `perf record` of benches/store.rs). In key order one range
    /// cursor walks the deletes, across users, and one cursor makes the appends, which LMDB
    /// places without a search from the root while they fall on the cursor's page. The
    /// outcomes are those of applying `ops` in order: appends and deletes touch different
    /// keys (a delete is an ACK of a committed item), so only the accounting (queue limits,
    /// counts, shared bodies) depends on the order, and it is done in op order. A batch that
    /// appends and deletes one key is applied op by op.
    pub fn apply(&self, ops: &[Op], limits: QueueLimits) -> Result<Vec<OpOutcome>, StoreError> {
        self.apply_as(ops, limits, true)
    }

    /// [`Self::apply`]; with `by_key` false, always op by op (the reference its tests compare
    /// against).
    fn apply_as(
        &self,
        ops: &[Op],
        limits: QueueLimits,
        by_key: bool,
    ) -> Result<Vec<OpOutcome>, StoreError> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        let mut txn = InTxn {
            limits,
            // Queue counts, read once per user per transaction and written at most once (not at
            // all when unchanged): a user whose queue goes 0 → 1 → 0 within a batch (an online
            // member, appended then acknowledged) would otherwise insert and delete its record
            // each time.
            counts: HashMap::new(),
            // Shared group bodies' reference counts, likewise: a fan-out appends every member
            // of this shard in one batch, and acknowledgements come in batches.
            bodies: HashMap::new(),
        };
        // Deletes by key (their op's index breaks ties, so a repeated delete finds nothing).
        let mut deletes: Vec<KeyedDelete> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                Op::Delete { user, id } => Some(KeyedDelete {
                    key: queue_key(*user, *id),
                    op: i,
                    found: None,
                }),
                _ => None,
            })
            .collect();
        deletes.sort_unstable_by(|a, b| a.key.cmp(&b.key).then(a.op.cmp(&b.op)));
        let conflict = ops.iter().any(|op| match op {
            Op::Append { user, id, .. } => {
                let key = queue_key(*user, *id);
                deletes.binary_search_by(|d| d.key.cmp(&key)).is_ok()
            }
            _ => false,
        });
        // A move out of the log writes queue items where it stands, which the key-ordered
        // path cannot interleave with its deletes.
        let unlogs = ops.iter().any(|op| matches!(op, Op::Unlog { .. }));
        let out = if conflict || unlogs || !by_key {
            self.apply_ops(&mut wtxn, ops, &mut txn, None)?.0
        } else {
            self.apply_by_key(&mut wtxn, ops, deletes, &mut txn)?
        };
        let InTxn { counts, bodies, .. } = txn;
        // Only counts that changed are written: under steady fan-out a member's commit holds as
        // many acknowledgements as new items, and rewriting its unchanged record would dirty
        // the record's page in every commit.
        let mut counts: Vec<_> = counts
            .into_iter()
            .filter(|(_, c)| !(c.canonical && c.now == c.stored))
            .collect();
        counts.sort_unstable_by_key(|(u, _)| *u);
        for (user, c) in counts {
            self.put_counts(&mut wtxn, &count_key(user), c.now.0, c.now.1)?;
        }
        self.put_body_refs(&mut wtxn, bodies)?;
        wtxn.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// [`Self::apply`]'s ops in order, with their accounting. Without `deleted`, each queue
    /// write is made where its op is and no appends are returned; with it, the deletes were
    /// made already (`deleted` holds what they found, in op order) and the appends are
    /// returned for the caller to make.
    fn apply_ops(
        &self,
        wtxn: &mut heed::RwTxn,
        ops: &[Op],
        txn: &mut InTxn,
        mut deleted: Option<std::vec::IntoIter<KeyedDelete>>,
    ) -> Result<(Vec<OpOutcome>, Vec<KeyedAppend>), StoreError> {
        let mut appends = Vec::new();
        let mut out = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            out.push(match op {
                Op::Append { user, id, item } => {
                    if !self.admit(wtxn, txn, *user, item)? {
                        OpOutcome::QueueFull
                    } else {
                        let key = queue_key(*user, *id);
                        if deleted.is_some() {
                            appends.push((key, i));
                        } else {
                            self.queue
                                .put(wtxn, &key, &stored_value(item))
                                .map_err(|e| self.err(e))?;
                        }
                        OpOutcome::Appended
                    }
                }
                Op::Delete { user, id } => {
                    let found = match deleted.as_mut() {
                        Some(d) => d.next().and_then(|d| d.found),
                        None => self.delete_one(wtxn, &queue_key(*user, *id))?,
                    };
                    self.settle_delete(wtxn, txn, *user, found)?
                }
                Op::Unlog { user, ids, .. } => self.unlog(wtxn, txn, *user, ids)?,
                meta => self.apply_meta(wtxn, meta)?,
            });
        }
        Ok((out, appends))
    }

    /// Deletes `key` from the queue, if there.
    fn delete_one(
        &self,
        wtxn: &mut heed::RwTxn,
        key: &[u8; 16],
    ) -> Result<Option<Deleted>, StoreError> {
        // One B-tree descent: the cursor that finds the item deletes it (a `get` and a
        // `delete` would search the tree twice).
        let only = (
            std::ops::Bound::Included(&key[..]),
            std::ops::Bound::Included(&key[..]),
        );
        let mut at = self.queue.range_mut(wtxn, &only).map_err(|e| self.err(e))?;
        let Some(entry) = at.next() else {
            return Ok(None);
        };
        let (_, v) = entry.map_err(|e| self.err(e))?;
        let found = Deleted::of(v);
        // SAFETY: nothing borrowed from the database outlives this call (`found` holds
        // copies), as `del_current` requires.
        unsafe { at.del_current() }.map_err(|e| self.err(e))?;
        Ok(Some(found))
    }

    /// [`Self::apply`]'s ops with the queue's writes in key order: first every delete
    /// ([`Self::delete_in_key_order`]), then the accounting in op order, then every append
    /// (one cursor). `deletes` is sorted by key and holds no key that `ops` also appends.
    fn apply_by_key(
        &self,
        wtxn: &mut heed::RwTxn,
        ops: &[Op],
        mut deletes: Vec<KeyedDelete>,
        txn: &mut InTxn,
    ) -> Result<Vec<OpOutcome>, StoreError> {
        self.delete_in_key_order(wtxn, &mut deletes)?;
        deletes.sort_unstable_by_key(|d| d.op);
        let (out, mut appends) = self.apply_ops(wtxn, ops, txn, Some(deletes.into_iter()))?;
        // Stable: of two appends of one key, the later one's value stays, as in op order.
        appends.sort_by_key(|a| a.0);
        let mut at = self.queue.iter_mut(wtxn).map_err(|e| self.err(e))?;
        for (key, i) in &appends {
            let Op::Append { item, .. } = &ops[*i] else {
                unreachable!("appends are indices of Append ops");
            };
            let value = stored_value(item);
            // A plain insert through one cursor (flags 0, not MDB_CURRENT): LMDB starts from the
            // cursor's page when the key falls inside it (`mdb_cursor_set`).
            // SAFETY: the key and value are owned here; nothing borrowed from the database is
            // held, as `put_current_with_options` requires.
            unsafe { at.put_current_with_options::<RawBytes>(PutFlags::empty(), key, &value) }
                .map_err(|e| self.err(e))?;
        }
        Ok(out)
    }

    /// Deletes `deletes` (sorted by key) from the queue, noting in each what it found. One
    /// range cursor walks from the first key to the last, across users; one that passes
    /// [`DELETE_WALK_SKIP_MAX`] items it does not delete starts again at the next key (a
    /// search from the root), so far-apart deletes do not walk the queues between them.
    fn delete_in_key_order(
        &self,
        wtxn: &mut heed::RwTxn,
        deletes: &mut [KeyedDelete],
    ) -> Result<(), StoreError> {
        let (mut i, end) = (0, deletes.len());
        while i < end {
            let (first, last) = (deletes[i].key, deletes[end - 1].key);
            let range = (
                std::ops::Bound::Included(&first[..]),
                std::ops::Bound::Included(&last[..]),
            );
            let mut at = self
                .queue
                .range_mut(wtxn, &range)
                .map_err(|e| self.err(e))?;
            let mut skipped = 0;
            while i < end {
                let Some(entry) = at.next() else {
                    // The rest of the keys are not there.
                    i = end;
                    break;
                };
                let (k, v) = entry.map_err(|e| self.err(e))?;
                while i < end && deletes[i].key[..] < *k {
                    i += 1;
                }
                if i < end && deletes[i].key[..] == *k {
                    deletes[i].found = Some(Deleted::of(v));
                    // SAFETY: nothing borrowed from the database outlives this call (`found`
                    // holds copies, `k` is not used again), as `del_current` requires.
                    unsafe { at.del_current() }.map_err(|e| self.err(e))?;
                    // A repeated delete of the key finds nothing (ties sort by op).
                    let key = deletes[i].key;
                    while i < end && deletes[i].key == key {
                        i += 1;
                    }
                    skipped = 0;
                } else {
                    skipped += 1;
                    if skipped >= DELETE_WALK_SKIP_MAX {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `item` fits in `user`'s queue; if so, counts it (and its shared body's
    /// reference, see [`stored_value`]).
    fn admit(
        &self,
        rtxn: &heed::RoTxn,
        txn: &mut InTxn,
        user: UserId,
        item: &Item,
    ) -> Result<bool, StoreError> {
        let (msgs, rcpts) = self.counts_in(rtxn, &mut txn.counts, user)?;
        let (count, max) = if item.is_receipt() {
            (rcpts, txn.limits.receipts_max)
        } else {
            (msgs, txn.limits.messages_max)
        };
        if *count >= max {
            return Ok(false);
        }
        *count += 1;
        if let Item::GroupMessage { msg_id, body, .. } = item {
            if shares_body(body) {
                self.body_ref(rtxn, &mut txn.bodies, *msg_id, Some(body))?;
            }
        }
        Ok(true)
    }

    /// The outcome of a delete from `user`'s queue that found `found`, with its accounting:
    /// the queue's count and a shared body's reference.
    fn settle_delete(
        &self,
        rtxn: &heed::RoTxn,
        txn: &mut InTxn,
        user: UserId,
        found: Option<Deleted>,
    ) -> Result<OpOutcome, StoreError> {
        let Some(Deleted {
            kind: Some(kind),
            msg_id,
        }) = found
        else {
            return Ok(OpOutcome::Deleted(false));
        };
        if kind == ITEM_GROUP_MESSAGE_REF {
            let id = msg_id.ok_or(StoreError::Corrupt {
                path: self.path.clone(),
                why: "group message reference",
            })?;
            self.body_ref(rtxn, &mut txn.bodies, ServerMsgId(id), None)?;
        }
        let (msgs, rcpts) = self.counts_in(rtxn, &mut txn.counts, user)?;
        if kind == ITEM_RECEIPT || kind == ITEM_GROUP_RECEIPT {
            *rcpts = rcpts.saturating_sub(1)
        } else {
            *msgs = msgs.saturating_sub(1)
        }
        Ok(OpOutcome::Deleted(true))
    }

    /// [`Op::Unlog`]: moves `user` out of log records `ids` into its own queue.
    fn unlog(
        &self,
        wtxn: &mut heed::RwTxn,
        txn: &mut InTxn,
        user: UserId,
        ids: &[ServerMsgId],
    ) -> Result<OpOutcome, StoreError> {
        for &id in ids {
            let key = log_key(id);
            let Some(v) = self.meta.get(wtxn, &key).map_err(|e| self.err(e))? else {
                continue;
            };
            let (mut users, item) = decode_log(v).ok_or(StoreError::Corrupt {
                path: self.path.clone(),
                why: "group log record",
            })?;
            let Some(at) = users.iter().position(|u| *u == user) else {
                continue;
            };
            users.remove(at);
            let qkey = queue_key(user, id);
            // Present already when a crash came after this move's commit but the record was
            // read back from an older copy: never counted twice.
            if self
                .queue
                .get(wtxn, &qkey)
                .map_err(|e| self.err(e))?
                .is_none()
            {
                let (msgs, _) = self.counts_in(wtxn, &mut txn.counts, user)?;
                *msgs += 1;
                if let Item::GroupMessage { msg_id, body, .. } = &item {
                    if shares_body(body) {
                        self.body_ref(wtxn, &mut txn.bodies, *msg_id, Some(body))?;
                    }
                }
                self.queue
                    .put(wtxn, &qkey, &stored_value(&item))
                    .map_err(|e| self.err(e))?;
            }
            if users.is_empty() {
                self.meta.delete(wtxn, &key).map_err(|e| self.err(e))?;
            } else {
                self.meta
                    .put(wtxn, &key, &encode_log(&users, &item))
                    .map_err(|e| self.err(e))?;
            }
        }
        Ok(OpOutcome::Written)
    }

    /// Moves every group log record's members into their own queues ([`Op::Unlog`]), in
    /// transactions of a bounded size. Run by [`Store::open`]: a record left there means the
    /// node stopped or crashed while members were online. Returns the items moved.
    fn unlog_all(&self) -> Result<usize, StoreError> {
        let unlimited = QueueLimits {
            messages_max: u32::MAX,
            receipts_max: u32::MAX,
        };
        let mut moved = 0;
        let bytes_max = crate::limits::GROUP_LOG_MOVE_BYTES_PER_TXN.min(self.map_bytes() / 4);
        loop {
            // (record, member) pairs, at most `limits::GROUP_LOG_MOVES_PER_TXN` and about
            // `limits::GROUP_LOG_MOVE_BYTES_PER_TXN` written a transaction (a move writes
            // the item and rewrites the record): a record left partly moved is read again,
            // with the members left.
            let mut ops = Vec::new();
            {
                let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
                let (mut pairs, mut bytes) = (0, 0);
                for r in self
                    .meta
                    .prefix_iter(&rtxn, &[LOG_PREFIX])
                    .map_err(|e| self.err(e))?
                {
                    if pairs >= crate::limits::GROUP_LOG_MOVES_PER_TXN || bytes >= bytes_max {
                        break;
                    }
                    let (k, v) = r.map_err(|e| self.err(e))?;
                    let corrupt = || StoreError::Corrupt {
                        path: self.path.clone(),
                        why: "group log record",
                    };
                    let id = k
                        .get(1..)
                        .and_then(u64_be)
                        .map(ServerMsgId)
                        .ok_or_else(corrupt)?;
                    let (users, _) = decode_log(v).ok_or_else(corrupt)?;
                    if users.is_empty() {
                        ops.push(Op::LogDrop { id });
                    }
                    for user in users.into_iter() {
                        if pairs >= crate::limits::GROUP_LOG_MOVES_PER_TXN
                            || (pairs > 0 && bytes >= bytes_max)
                        {
                            break;
                        }
                        pairs += 1;
                        bytes += 2 * v.len();
                        ops.push(Op::Unlog {
                            user,
                            ids: vec![id],
                            bytes: v.len(),
                        });
                    }
                }
            }
            if ops.is_empty() {
                return Ok(moved);
            }
            moved += ops
                .iter()
                .filter(|op| matches!(op, Op::Unlog { .. }))
                .count();
            self.apply(&ops, unlimited)?;
        }
    }

    /// An op outside the queue: presence, privacy, a group's members, a block, a tally.
    fn apply_meta(&self, wtxn: &mut heed::RwTxn, op: &Op) -> Result<OpOutcome, StoreError> {
        let err = |e| self.err(e);
        match op {
            Op::Append { .. } | Op::Delete { .. } | Op::Unlog { .. } => {
                unreachable!("queue ops are applied apart")
            }
            Op::LogPut { id, item, users } => {
                self.meta
                    .put(wtxn, &log_key(*id), &encode_log(users, item))
                    .map_err(err)?;
                return Ok(OpOutcome::Appended);
            }
            Op::LogDrop { id } => {
                let gone = self.meta.delete(wtxn, &log_key(*id)).map_err(err)?;
                return Ok(OpOutcome::Deleted(gone));
            }
            Op::LastSeen { user, ms } => {
                let mut r = self.presence_in(wtxn, *user)?;
                r.last_seen_ms = *ms;
                self.put_presence(wtxn, *user, r)?;
            }
            Op::Privacy {
                user,
                hide_last_seen,
            } => {
                let mut r = self.presence_in(wtxn, *user)?;
                r.hide_last_seen = *hide_last_seen;
                self.put_presence(wtxn, *user, r)?;
            }
            Op::PutGroup { group, members } => {
                let key = group_key(*group);
                if members.is_empty() {
                    self.meta.delete(wtxn, &key).map_err(err)?;
                } else {
                    let mut v = Vec::with_capacity(9 * members.len());
                    for (u, r) in members {
                        v.extend_from_slice(&u.0.to_be_bytes());
                        v.push(*r as u8);
                    }
                    self.meta.put(wtxn, &key, &v).map_err(err)?;
                }
            }
            Op::Block {
                blocker,
                blocked,
                on,
            } => {
                let key = block_key(*blocker, *blocked);
                if *on {
                    self.meta.put(wtxn, &key, &[]).map_err(err)?;
                } else {
                    self.meta.delete(wtxn, &key).map_err(err)?;
                }
            }
            Op::Tally { msg_id, record, .. } => {
                let key = tally_key(*msg_id);
                match record {
                    Some(r) => self.meta.put(wtxn, &key, &r.encode()).map_err(err)?,
                    None => {
                        self.meta.delete(wtxn, &key).map_err(err)?;
                    }
                }
            }
        }
        Ok(OpOutcome::Written)
    }

    /// `user`'s queue counts in this transaction's overlay, read from the store on first use.
    fn counts_in<'c>(
        &self,
        txn: &heed::RoTxn,
        overlay: &'c mut HashMap<UserId, CountsInTxn>,
        user: UserId,
    ) -> Result<(&'c mut u32, &'c mut u32), StoreError> {
        let c = match overlay.entry(user) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let (stored, canonical) = self.counts_record(txn, &count_key(user))?;
                e.insert(CountsInTxn {
                    stored,
                    now: stored,
                    canonical,
                })
            }
        };
        Ok((&mut c.now.0, &mut c.now.1))
    }

    /// Counts a reference to group message `msg_id`'s body (`Some(body)`: a new member item,
    /// storing the body with the first) or drops one (`None`: a member item deleted, removing
    /// the body with the last), in this transaction's overlay: the body record is read at most
    /// once here and written once by [`Self::put_body_refs`], however many members one batch
    /// appends or acknowledges.
    fn body_ref(
        &self,
        txn: &heed::RoTxn,
        overlay: &mut HashMap<ServerMsgId, BodyRefs>,
        msg_id: ServerMsgId,
        body: Option<&Bytes>,
    ) -> Result<(), StoreError> {
        let rec = match overlay.entry(msg_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let stored = self
                    .meta
                    .get(txn, &body_refs_key(msg_id))
                    .map_err(|e| self.err(e))?;
                let refs = match stored {
                    None => None,
                    Some(v) if v.len() == 4 => {
                        Some(u32::from_be_bytes(v.try_into().expect("4 bytes")))
                    }
                    Some(_) => {
                        return Err(StoreError::Corrupt {
                            path: self.path.clone(),
                            why: "group message body",
                        })
                    }
                };
                e.insert(BodyRefs {
                    refs: refs.unwrap_or(0),
                    stored: refs.is_some(),
                    new_body: None,
                })
            }
        };
        match body {
            Some(b) => {
                if !rec.stored && rec.new_body.is_none() {
                    rec.new_body = Some(b.clone());
                }
                rec.refs += 1;
            }
            // Defensive: references never go below 0 (a record already gone stays gone).
            None => rec.refs = rec.refs.saturating_sub(1),
        }
        Ok(())
    }

    /// Writes the body reference counts of one transaction (see [`Self::body_ref`]): a body
    /// whose count reached 0 is deleted with its count, a new one is stored with its count, and
    /// an existing one gets its new count (4 bytes; the body is not rewritten).
    fn put_body_refs(
        &self,
        txn: &mut heed::RwTxn,
        overlay: HashMap<ServerMsgId, BodyRefs>,
    ) -> Result<(), StoreError> {
        let mut recs: Vec<_> = overlay.into_iter().collect();
        recs.sort_unstable_by_key(|(id, _)| *id);
        let err = |e| self.err(e);
        for (msg_id, rec) in recs {
            let (bkey, rkey) = (body_key(msg_id), body_refs_key(msg_id));
            match (rec.refs, rec.stored, rec.new_body) {
                (0, true, _) => {
                    self.meta.delete(txn, &rkey).map_err(err)?;
                    self.meta.delete(txn, &bkey).map_err(err)?;
                }
                (0, false, _) => {}
                (refs, true, _) => {
                    self.meta
                        .put(txn, &rkey, &refs.to_be_bytes())
                        .map_err(err)?;
                }
                (refs, false, Some(body)) => {
                    self.meta
                        .put(txn, &rkey, &refs.to_be_bytes())
                        .map_err(err)?;
                    self.meta.put(txn, &bkey, &body).map_err(err)?;
                }
                // Not reachable: an append adds its body with its first reference.
                (_, false, None) => {
                    return Err(StoreError::Corrupt {
                        path: self.path.clone(),
                        why: "group message reference without a body",
                    })
                }
            }
        }
        Ok(())
    }

    /// A stored queue value as an item; group messages get their body from the shard's copy.
    fn decode_stored(&self, txn: &heed::RoTxn, v: &[u8]) -> Result<Item, StoreError> {
        let corrupt = || StoreError::Corrupt {
            path: self.path.clone(),
            why: "queue item",
        };
        if v.first() == Some(&ITEM_GROUP_MESSAGE_REF) && v.len() == 37 {
            let msg_id = ServerMsgId(u64::from_be_bytes(v[9..17].try_into().expect("8 bytes")));
            let body = self
                .meta
                .get(txn, &body_key(msg_id))
                .map_err(|e| self.err(e))?
                .ok_or_else(corrupt)?;
            let mut inline = Vec::with_capacity(v.len() + body.len());
            inline.extend_from_slice(v);
            inline[0] = ITEM_GROUP_MESSAGE;
            inline.extend_from_slice(body);
            return Item::decode(&inline).ok_or_else(corrupt);
        }
        Item::decode(v).ok_or_else(corrupt)
    }

    fn presence_in(&self, txn: &heed::RoTxn, user: UserId) -> Result<PresenceRecord, StoreError> {
        Ok(
            match self
                .meta
                .get(txn, &presence_key(user))
                .map_err(|e| self.err(e))?
            {
                Some(v) if v.len() == 9 => PresenceRecord {
                    last_seen_ms: u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                    hide_last_seen: v[8] & 1 == 1,
                },
                _ => PresenceRecord::default(),
            },
        )
    }

    fn put_presence(
        &self,
        txn: &mut heed::RwTxn,
        user: UserId,
        r: PresenceRecord,
    ) -> Result<(), StoreError> {
        let mut v = [0u8; 9];
        v[..8].copy_from_slice(&r.last_seen_ms.to_be_bytes());
        v[8] = u8::from(r.hide_last_seen);
        self.meta
            .put(txn, &presence_key(user), &v)
            .map_err(|e| self.err(e))
    }

    /// `user`'s stored presence facts (defaults when none). A read snapshot.
    pub fn presence(&self, user: UserId) -> Result<PresenceRecord, StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        self.presence_in(&rtxn, user)
    }

    /// The members of `group` (owned by this shard), or `None` if it does not exist.
    pub fn group(&self, group: u64) -> Result<Option<Vec<(UserId, GroupRole)>>, StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let Some(v) = self
            .meta
            .get(&rtxn, &group_key(group))
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        let corrupt = || StoreError::Corrupt {
            path: self.path.clone(),
            why: "group record",
        };
        if v.len() % 9 != 0 {
            return Err(corrupt());
        }
        v.chunks(9)
            .map(|c| {
                let user = UserId(u64::from_be_bytes(c[..8].try_into().expect("8 bytes")));
                GroupRole::from_u8(c[8])
                    .map(|r| (user, r))
                    .ok_or_else(corrupt)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Whether `blocker` has blocked `blocked`. A read snapshot.
    pub fn is_blocked(&self, blocker: UserId, blocked: UserId) -> Result<bool, StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        Ok(self
            .meta
            .get(&rtxn, &block_key(blocker, blocked))
            .map_err(|e| self.err(e))?
            .is_some())
    }

    /// The group message tallies checkpointed on this shard, oldest message first (read at
    /// start).
    pub fn tallies(&self) -> Result<Vec<(ServerMsgId, TallyRecord)>, StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in self
            .meta
            .prefix_iter(&rtxn, &[TALLY_PREFIX])
            .map_err(|e| self.err(e))?
        {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let corrupt = || StoreError::Corrupt {
                path: self.path.clone(),
                why: "group receipt tally",
            };
            let id = k
                .get(1..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(corrupt)?;
            out.push((ServerMsgId(id), TallyRecord::decode(v).ok_or_else(corrupt)?));
        }
        Ok(out)
    }

    /// Users of this shard who block anyone (read at start, so that message routing checks
    /// the store only for them).
    pub fn blockers(&self) -> Result<std::collections::HashSet<UserId>, StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let mut out = std::collections::HashSet::new();
        for entry in self
            .meta
            .prefix_iter(&rtxn, b"b")
            .map_err(|e| self.err(e))?
        {
            let (k, _) = entry.map_err(|e| self.err(e))?;
            if k.len() == 17 {
                out.insert(UserId(u64::from_be_bytes(
                    k[1..9].try_into().expect("8 bytes"),
                )));
            }
        }
        Ok(out)
    }

    fn counts(&self, txn: &heed::RoTxn, key: &[u8]) -> Result<(u32, u32), StoreError> {
        Ok(self.counts_record(txn, key)?.0)
    }

    /// A count record's value, and whether the record is exactly what [`Self::put_counts`]
    /// writes for it (absent for (0, 0), 8 bytes otherwise); a malformed one reads as (0, 0).
    fn counts_record(
        &self,
        txn: &heed::RoTxn,
        key: &[u8],
    ) -> Result<((u32, u32), bool), StoreError> {
        Ok(match self.meta.get(txn, key).map_err(|e| self.err(e))? {
            None => ((0, 0), true),
            Some(v) if v.len() == 8 => {
                let c = (
                    u32::from_be_bytes(v[..4].try_into().expect("4 bytes")),
                    u32::from_be_bytes(v[4..].try_into().expect("4 bytes")),
                );
                (c, c != (0, 0))
            }
            Some(_) => ((0, 0), false),
        })
    }

    fn put_counts(
        &self,
        txn: &mut heed::RwTxn,
        key: &[u8],
        msgs: u32,
        rcpts: u32,
    ) -> Result<(), StoreError> {
        if msgs == 0 && rcpts == 0 {
            self.meta.delete(txn, key).map_err(|e| self.err(e))?;
        } else {
            let mut v = [0u8; 8];
            v[..4].copy_from_slice(&msgs.to_be_bytes());
            v[4..].copy_from_slice(&rcpts.to_be_bytes());
            self.meta.put(txn, key, &v).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The size of the environment's map, in bytes (`store.map_size_mib`).
    pub fn map_bytes(&self) -> usize {
        self.env.info().map_size
    }

    /// The environment's page size, bytes: the system's, at most [`LMDB_PAGE_MAX`], for a
    /// new environment; an existing one keeps the size it was created with.
    pub fn page_bytes(&self) -> usize {
        self.env.unnamed_database_stat().page_size as usize
    }

    /// Forces every committed write to stable storage (the `batch` policy's periodic sync).
    /// Blocking.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.env.force_sync().map_err(|e| self.err(e))
    }

    /// Up to `max` items of `user`'s queue with ids above `after` (all if `None`), in order.
    /// A read snapshot: never blocks on the writer.
    pub fn read_queue(
        &self,
        user: UserId,
        after: Option<ServerMsgId>,
        max: usize,
    ) -> Result<Vec<(ServerMsgId, Item)>, StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let start = match after {
            Some(id) if id.0 == u64::MAX => return Ok(Vec::new()),
            Some(id) => queue_key(user, ServerMsgId(id.0 + 1)),
            None => queue_key(user, ServerMsgId(0)),
        };
        let end = queue_key(user, ServerMsgId(u64::MAX));
        let range = (
            std::ops::Bound::Included(&start[..]),
            std::ops::Bound::Included(&end[..]),
        );
        let mut out = Vec::new();
        for entry in self
            .queue
            .range(&rtxn, &range)
            .map_err(|e| self.err(e))?
            .take(max)
        {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let id = ServerMsgId(u64::from_be_bytes(
                k[8..16].try_into().expect("16-byte key"),
            ));
            let item = self.decode_stored(&rtxn, v)?;
            out.push((id, item));
        }
        Ok(out)
    }

    /// Sizes of this shard's store, from one read snapshot (never blocks on the writer).
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let q = self.queue.stat(&rtxn).map_err(|e| self.err(e))?;
        let m = self.meta.stat(&rtxn).map_err(|e| self.err(e))?;
        Ok(StoreStats {
            queue_items: q.entries as u64,
            queue_bytes: q.non_free_page_size() as u64,
            stored_bytes: (q.non_free_page_size() + m.non_free_page_size()) as u64,
        })
    }

    /// Messages and receipts queued for `user`.
    pub fn queue_counts(&self, user: UserId) -> Result<(u32, u32), StoreError> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        self.counts(&rtxn, &count_key(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QueueLimits = QueueLimits {
        messages_max: 3,
        receipts_max: 1,
    };

    fn msg(n: u8) -> Item {
        Item::Message {
            sender: UserId(9),
            sender_device: DeviceId(1),
            ts_ms: 5,
            body: Bytes::from(vec![n; 3]),
        }
    }

    /// A shared body's reference count and length; `None` when neither record exists (one
    /// without the other fails the test).
    fn body_record(s: &Store, msg_id: ServerMsgId) -> Option<(u32, usize)> {
        let rtxn = s.env.read_txn().unwrap();
        let refs = s.meta.get(&rtxn, &body_refs_key(msg_id)).unwrap();
        let body = s.meta.get(&rtxn, &body_key(msg_id)).unwrap();
        match (refs, body) {
            (Some(r), Some(b)) => Some((u32::from_be_bytes(r.try_into().unwrap()), b.len())),
            (None, None) => None,
            other => panic!("a body record without its count, or the reverse: {other:?}"),
        }
    }

    /// The system's page size, which LMDB uses.
    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap()
    }

    /// A store of one shard in a new temporary directory (kept alive by the first value).
    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), ShardId(0), 1, 16, SyncPolicy::None)
            .unwrap()
            .store;
        (dir, store)
    }

    #[test]
    fn batch_len_bounds_ops_and_bytes_and_counts_a_shared_group_body_once() {
        let big = |n: usize| Item::Message {
            sender: UserId(9),
            sender_device: DeviceId(1),
            ts_ms: 5,
            body: Bytes::from(vec![1u8; n]),
        };
        let append = |id: u64, item: Item| Op::Append {
            user: UserId(id),
            id: ServerMsgId(id),
            item,
        };
        let small: Vec<Op> = (1..=10).map(|i| append(i, msg(1))).collect();
        assert_eq!(batch_len(small.iter(), 4, usize::MAX, 4096), 4);
        assert_eq!(batch_len(small.iter(), 100, usize::MAX, 4096), 10);
        assert_eq!(batch_len(small.iter().take(0), 100, 10, 4096), 0);
        // A page each: two fit in 8,292, not three.
        assert_eq!(batch_len(small.iter(), 100, 2 * 4096 + 100, 4096), 2);
        // A value that fits in a leaf adds nothing: 1,993 bytes of body are a 2,014-byte value,
        // the largest a leaf keeps at 4 KiB under a 16-byte key; one byte more overflows.
        let leaf: Vec<Op> = (1..=3).map(|i| append(i, big(1_993))).collect();
        assert_eq!(batch_len(leaf.iter(), 100, 3 * 4096, 4096), 3);
        let over: Vec<Op> = (1..=3).map(|i| append(i, big(1_994))).collect();
        assert_eq!(batch_len(over.iter(), 100, 3 * 4096, 4096), 1);
        assert_eq!(batch_len(over.iter(), 100, 3 * 2 * 4096, 4096), 3);
        // 10,000 bytes take 3 overflow pages: 4 pages an op. One op larger than the bound
        // still goes alone.
        let large: Vec<Op> = (1..=3).map(|i| append(i, big(10_000))).collect();
        assert_eq!(batch_len(large.iter(), 100, 1_000, 4096), 1);
        assert_eq!(batch_len(large.iter(), 100, 8 * 4096, 4096), 2);
        assert_eq!(batch_len(large.iter(), 100, 8 * 4096 - 1, 4096), 1);
        // A fan-out of one shared 10 kB body to 100 members counts the body once.
        let body = Bytes::from(vec![2u8; 10_000]);
        let member = |u: u64| {
            append(
                u,
                Item::GroupMessage {
                    group: 1,
                    msg_id: ServerMsgId(1),
                    sender: UserId(9),
                    sender_device: DeviceId(1),
                    ts_ms: 5,
                    body: body.clone(),
                },
            )
        };
        let fanout: Vec<Op> = (1..=100).map(member).collect();
        assert_eq!(
            batch_len(fanout.iter(), 1_000, 3 * 4096 + 100 * 4096, 4096),
            100
        );
        assert_eq!(
            batch_len(fanout.iter(), 1_000, 3 * 4096 + 100 * 4096 - 1, 4096),
            99
        );
        // With 32 KiB pages (LMDB's largest, on kernels with 64 KiB pages) an op is a 32 KiB
        // page, and 10,000 bytes fit in a leaf (up to 16,350 there).
        let p = LMDB_PAGE_MAX;
        assert_eq!(batch_len(large.iter(), 100, 3 * p, p), 3);
        assert_eq!(batch_len(large.iter(), 100, 3 * p - 1, p), 2);
        assert_eq!(batch_len(small.iter(), 100, 8 * 4096, p), 1);
        // 40,000 bytes do not: 2 overflow pages, 3 pages an op.
        let huge: Vec<Op> = (1..=3).map(|i| append(i, big(40_000))).collect();
        assert_eq!(batch_len(huge.iter(), 100, 6 * p, p), 2);
        assert_eq!(batch_len(huge.iter(), 100, 6 * p - 1, p), 1);
    }

    #[test]
    fn commits_bounded_by_batch_len_fit_a_map_that_one_commit_of_everything_overflows() {
        // 300 messages of 60 KiB, each appended and acknowledged: 19 MB of pages in one
        // transaction (LMDB reuses freed pages only after a commit), more than the 16 MiB map.
        let (_dir, store) = temp_store();
        let body = Bytes::from(vec![7u8; 60 * 1024]);
        let mut ops = Vec::new();
        for i in 1..=300u64 {
            ops.push(Op::Append {
                user: UserId(1),
                id: ServerMsgId(i),
                item: Item::Message {
                    sender: UserId(9),
                    sender_device: DeviceId(1),
                    ts_ms: 5,
                    body: body.clone(),
                },
            });
            ops.push(Op::Delete {
                user: UserId(1),
                id: ServerMsgId(i),
            });
        }
        assert!(
            matches!(
                store.apply(&ops, LIMITS),
                Err(StoreError::Lmdb {
                    source: heed::Error::Mdb(heed::MdbError::MapFull),
                    ..
                })
            ),
            "one commit of everything must overflow the map"
        );
        let max_bytes = store.map_bytes() / 4;
        assert_eq!(max_bytes, 4 * 1024 * 1024);
        assert_eq!(store.page_bytes(), page_size().min(LMDB_PAGE_MAX));
        let mut rest = &ops[..];
        let mut commits = 0;
        while !rest.is_empty() {
            let n = batch_len(rest.iter(), usize::MAX, max_bytes, store.page_bytes());
            let out = store.apply(&rest[..n], LIMITS).unwrap();
            assert!(out.iter().all(|o| !matches!(o, OpOutcome::QueueFull)));
            rest = &rest[n..];
            commits += 1;
        }
        assert!(commits >= 5, "{commits} commits");
        assert_eq!(store.queue_counts(UserId(1)).unwrap().0, 0);
    }

    #[test]
    fn tallies_are_written_read_back_in_message_order_and_deleted() {
        let (_dir, store) = temp_store();
        let rec = |group, delivered| TallyRecord {
            group,
            sender: UserId(u64::MAX - 1),
            members: 1024,
            delivered,
            read: 3,
            reported: 0b0101,
        };
        let put = |id: u64, r: Option<TallyRecord>| Op::Tally {
            group: r.map_or(0, |r| r.group),
            msg_id: ServerMsgId(id),
            record: r,
        };
        // Ids past 255 and 65,535 check that the keys sort as numbers.
        let ops = [
            put(70_000, Some(rec(7, 1))),
            put(300, Some(rec(u64::MAX, 2))),
            put(5, Some(rec(9, 3))),
        ];
        store.apply(&ops, LIMITS).unwrap();
        store
            .apply(&[put(300, Some(rec(u64::MAX, 900))), put(5, None)], LIMITS)
            .unwrap();
        assert_eq!(
            store.tallies().unwrap(),
            vec![
                (ServerMsgId(300), rec(u64::MAX, 900)),
                (ServerMsgId(70_000), rec(7, 1)),
            ]
        );
        // A damaged record is named, not skipped.
        let mut wtxn = store.env.write_txn().unwrap();
        store
            .meta
            .put(&mut wtxn, &tally_key(ServerMsgId(8)), b"short")
            .unwrap();
        wtxn.commit().unwrap();
        let e = store.tallies().unwrap_err().to_string();
        assert!(e.contains("group receipt tally"), "{e}");
    }

    #[test]
    fn a_group_body_is_stored_once_per_shard_and_freed_with_its_last_member() {
        let (_dir, store) = temp_store();
        let body = Bytes::from(vec![9u8; 10_000]);
        let item = Item::GroupMessage {
            group: 5,
            msg_id: ServerMsgId(77),
            sender: UserId(1),
            sender_device: DeviceId(2),
            ts_ms: 3,
            body: body.clone(),
        };
        let limits = QueueLimits {
            messages_max: 1,
            receipts_max: 1,
        };
        // Three members; the third's queue is already full.
        store
            .apply(
                &[Op::Append {
                    user: UserId(30),
                    id: ServerMsgId(1),
                    item: msg(1),
                }],
                limits,
            )
            .unwrap();
        let appends: Vec<Op> = [10, 20, 30]
            .iter()
            .enumerate()
            .map(|(i, u)| Op::Append {
                user: UserId(*u),
                id: ServerMsgId(100 + i as u64),
                item: item.clone(),
            })
            .collect();
        let out = store.apply(&appends, limits).unwrap();
        assert_eq!(
            out,
            vec![
                OpOutcome::Appended,
                OpOutcome::Appended,
                OpOutcome::QueueFull
            ]
        );
        let refs = |s: &Store| body_record(s, ServerMsgId(77));
        // One copy of the body, two references; each member reads the whole message.
        assert_eq!(refs(&store), Some((2, 10_000)));
        for u in [10, 20] {
            let got = store.read_queue(UserId(u), None, 10).unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].1, item);
        }
        // The queue items themselves are headers only.
        let bytes = store.stats().unwrap().queue_bytes;
        assert!(bytes < 20_000, "{bytes} bytes of queue pages");
        store
            .apply(
                &[Op::Delete {
                    user: UserId(10),
                    id: ServerMsgId(100),
                }],
                limits,
            )
            .unwrap();
        assert_eq!(refs(&store), Some((1, 10_000)));
        store
            .apply(
                &[Op::Delete {
                    user: UserId(20),
                    id: ServerMsgId(101),
                }],
                limits,
            )
            .unwrap();
        assert_eq!(refs(&store), None, "the last delete frees the body");
    }

    #[test]
    fn body_references_follow_appends_and_deletes_within_one_transaction() {
        let (_dir, store) = temp_store();
        let limits = QueueLimits {
            messages_max: 10,
            receipts_max: 10,
        };
        let group_msg = |m: u64| Item::GroupMessage {
            group: 5,
            msg_id: ServerMsgId(m),
            sender: UserId(1),
            sender_device: DeviceId(2),
            ts_ms: 3,
            body: Bytes::from(vec![m as u8; 600]),
        };
        let append = |u: u64, id: u64, m: u64| Op::Append {
            user: UserId(u),
            id: ServerMsgId(id),
            item: group_msg(m),
        };
        let delete = |u: u64, id: u64| Op::Delete {
            user: UserId(u),
            id: ServerMsgId(id),
        };
        let refs = |m: u64| body_record(&store, ServerMsgId(m));
        // Message 1: three members appended and one acknowledged in one batch. Message 2:
        // appended and acknowledged by both members in one batch, never written at all.
        let ops = [
            append(10, 1, 1),
            append(20, 2, 1),
            append(10, 3, 2),
            delete(10, 1),
            append(30, 4, 1),
            append(20, 5, 2),
            delete(10, 3),
            delete(20, 5),
        ];
        store.apply(&ops, limits).unwrap();
        assert_eq!(refs(1), Some((2, 600)));
        assert_eq!(refs(2), None);
        // A stored body: one more member and both earlier ones gone, in one batch.
        store
            .apply(&[append(40, 6, 1), delete(20, 2), delete(30, 4)], limits)
            .unwrap();
        assert_eq!(refs(1), Some((1, 600)));
        assert_eq!(
            store.read_queue(UserId(40), None, 10).unwrap(),
            vec![(ServerMsgId(6), group_msg(1))]
        );
        // The last one, with a delete of an absent item beside it.
        store
            .apply(&[delete(40, 6), delete(40, 6)], limits)
            .unwrap();
        assert_eq!(refs(1), None, "the last delete frees the body");
        assert_eq!(store.stats().unwrap().queue_items, 0);
    }

    /// One generated op of `applying_by_key_matches_applying_in_order`: (kind, user, id, m).
    type RawOp = (u8, u64, u64, u64);

    fn raw_op((kind, user, id, m): RawOp, batch: u64) -> Op {
        let (user, fresh) = (UserId(user), ServerMsgId(batch * 100 + id));
        let item = match kind {
            0 => msg(m as u8),
            1 => Item::Receipt {
                kind: ReceiptKind::Delivered,
                from: UserId(m),
                msg_id: ServerMsgId(m),
                ts_ms: 1,
            },
            // Shared bodies (600 bytes, one per message) and inline ones.
            2 | 3 => Item::GroupMessage {
                group: 1,
                msg_id: ServerMsgId(m),
                sender: UserId(1),
                sender_device: DeviceId(1),
                ts_ms: 2,
                body: Bytes::from(vec![m as u8; if kind == 2 { 600 } else { 20 }]),
            },
            4 => {
                return Op::LastSeen {
                    user,
                    ms: batch * 1000 + id,
                }
            }
            // Deletes of this batch's or any earlier batch's ids, mostly earlier ones.
            _ => {
                return Op::Delete {
                    user,
                    id: ServerMsgId(batch.saturating_sub(id % 3) * 100 + id),
                }
            }
        };
        Op::Append {
            user,
            id: fresh,
            item,
        }
    }

    /// Every queue, count, shared body and last-seen record of users 1..=4 and messages
    /// 1..=4.
    fn contents(s: &Store) -> Vec<String> {
        // Items, not bytes: how many pages hold them depends on the order of the writes.
        let mut all = vec![format!("{}", s.stats().unwrap().queue_items)];
        for u in 1..=4 {
            let u = UserId(u);
            // Ids, kinds and body lengths (the bodies follow from the ids).
            let queue: Vec<_> = s
                .read_queue(u, None, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(id, item)| (id.0, item.encode()[0], item.encode().len()))
                .collect();
            all.push(format!("{queue:?}"));
            all.push(format!("{:?}", s.queue_counts(u).unwrap()));
            all.push(format!("{:?}", s.presence(u).unwrap()));
        }
        for m in 1..=4 {
            all.push(format!("{:?}", body_record(s, ServerMsgId(m))));
        }
        all
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// `apply` writes the queue in key order unless a batch appends and deletes one key;
        /// either way its outcomes and the store it leaves are those of applying the ops one
        /// by one, in order.
        #[test]
        fn applying_by_key_matches_applying_in_order(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u8..8, 1u64..=4, 0u64..60, 1u64..=4), 0..80),
                1..6,
            ),
            roomy in proptest::bool::ANY,
        ) {
            let limits = if roomy {
                QueueLimits { messages_max: 1_000, receipts_max: 1_000 }
            } else {
                QueueLimits { messages_max: 6, receipts_max: 2 }
            };
            let ((_a, by_key), (_b, in_order)) = (temp_store(), temp_store());
            for (b, raw) in batches.into_iter().enumerate() {
                let ops: Vec<Op> = raw.into_iter().map(|r| raw_op(r, b as u64)).collect();
                let got = by_key.apply(&ops, limits).unwrap();
                let want = in_order.apply_as(&ops, limits, false).unwrap();
                proptest::prop_assert_eq!(got, want);
                proptest::prop_assert_eq!(contents(&by_key), contents(&in_order));
            }
        }
    }

    #[test]
    fn deletes_far_apart_in_one_queue_are_found_and_the_rest_kept() {
        let (_dir, store) = temp_store();
        let limits = QueueLimits {
            messages_max: 1_000,
            receipts_max: 1_000,
        };
        let u = UserId(3);
        let append = |user, id: u64| Op::Append {
            user,
            id: ServerMsgId(id),
            item: msg(id as u8),
        };
        let mut ops: Vec<Op> = (1..=200).map(|id| append(u, id)).collect();
        ops.extend((1..=5).map(|id| append(UserId(4), id)));
        store.apply(&ops, limits).unwrap();
        // 1, then 150 items later 151 (past the walk's restart), two repeats, one absent,
        // and the last; user 4's queue is next to it in the tree and stays whole.
        let gone = [1u64, 151, 151, 152, 200, 500, 1];
        let ops: Vec<Op> = gone
            .iter()
            .map(|&id| Op::Delete {
                user: u,
                id: ServerMsgId(id),
            })
            .collect();
        use OpOutcome::Deleted;
        assert_eq!(
            store.apply(&ops, limits).unwrap(),
            [true, true, false, true, true, false, false].map(Deleted)
        );
        let left: Vec<u64> = store
            .read_queue(u, None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id.0)
            .collect();
        let want: Vec<u64> = (2..=199).filter(|id| ![151, 152].contains(id)).collect();
        assert_eq!(left, want);
        assert_eq!(store.queue_counts(u).unwrap(), (196, 0));
        assert_eq!(store.read_queue(UserId(4), None, 10).unwrap().len(), 5);
    }

    #[test]
    fn counts_follow_appends_and_deletes_within_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { store, epoch } =
            Store::open(dir.path(), ShardId(0), 1, 16, SyncPolicy::None).unwrap();
        let (a, b) = (UserId(5), UserId(6));
        let id = |c| ServerMsgId::compose(epoch, ShardId(0), c);
        let append = |user, c| Op::Append {
            user,
            id: id(c),
            item: msg(c as u8),
        };
        // a fills its queue (3), one delete frees a place that the next append takes, the
        // append after that is refused; b's count is separate; an absent id changes nothing.
        let ops = [
            append(a, 1),
            append(b, 2),
            append(a, 3),
            append(a, 4),
            append(a, 5),
            Op::Delete { user: a, id: id(3) },
            append(a, 6),
            append(a, 7),
            Op::Delete {
                user: b,
                id: id(99),
            },
            Op::Delete { user: b, id: id(2) },
        ];
        let out = store.apply(&ops, LIMITS).unwrap();
        use OpOutcome::*;
        assert_eq!(
            out,
            vec![
                Appended,
                Appended,
                Appended,
                Appended,
                QueueFull,
                Deleted(true),
                Appended,
                QueueFull,
                Deleted(false),
                Deleted(true)
            ]
        );
        assert_eq!(store.queue_counts(a).unwrap(), (3, 0));
        assert_eq!(store.queue_counts(b).unwrap(), (0, 0));
        let ids: Vec<_> = store
            .read_queue(a, None, 10)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ids, vec![id(1), id(4), id(6)]);
        // The counts were written: the next transaction starts from them.
        let out = store
            .apply(
                &[
                    append(a, 8),
                    Op::Delete { user: a, id: id(1) },
                    append(a, 9),
                ],
                LIMITS,
            )
            .unwrap();
        assert_eq!(out, vec![QueueFull, Deleted(true), Appended]);
        // Unchanged (one out, one in), so not rewritten; still read back right.
        assert_eq!(store.queue_counts(a).unwrap(), (3, 0));
        // A malformed record reads as (0, 0) and is rewritten even when the transaction
        // leaves that unchanged (here: deleted, as a zero count has no record).
        let c = UserId(7);
        let mut wtxn = store.env.write_txn().unwrap();
        store.meta.put(&mut wtxn, &count_key(c), b"bad").unwrap();
        wtxn.commit().unwrap();
        let out = store
            .apply(
                &[
                    append(c, 10),
                    Op::Delete {
                        user: c,
                        id: id(10),
                    },
                ],
                LIMITS,
            )
            .unwrap();
        assert_eq!(out, vec![Appended, Deleted(true)]);
        let rtxn = store.env.read_txn().unwrap();
        assert_eq!(store.meta.get(&rtxn, &count_key(c)).unwrap(), None);
    }

    #[test]
    fn append_read_delete_in_order_with_limits() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { store, epoch } =
            Store::open(dir.path(), ShardId(0), 1, 16, SyncPolicy::Always).unwrap();
        assert_eq!(epoch, 1);
        let u = UserId(77);
        let id = |c| ServerMsgId::compose(epoch, ShardId(0), c);
        let ops: Vec<Op> = (1..=4)
            .map(|c| Op::Append {
                user: u,
                id: id(c),
                item: msg(c as u8),
            })
            .collect();
        let out = store.apply(&ops, LIMITS).unwrap();
        assert_eq!(
            out,
            vec![
                OpOutcome::Appended,
                OpOutcome::Appended,
                OpOutcome::Appended,
                OpOutcome::QueueFull
            ]
        );
        let all = store.read_queue(u, None, 10).unwrap();
        assert_eq!(
            all.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![id(1), id(2), id(3)]
        );
        assert_eq!(all[1].1, msg(2));
        assert_eq!(store.read_queue(u, Some(id(1)), 1).unwrap()[0].0, id(2));
        let out = store
            .apply(
                &[
                    Op::Delete { user: u, id: id(2) },
                    Op::Delete { user: u, id: id(2) },
                ],
                LIMITS,
            )
            .unwrap();
        assert_eq!(
            out,
            vec![OpOutcome::Deleted(true), OpOutcome::Deleted(false)]
        );
        assert_eq!(store.queue_counts(u).unwrap(), (2, 0));
        // Other users' queues are separate.
        assert!(store.read_queue(UserId(76), None, 10).unwrap().is_empty());
        let r = Item::Receipt {
            kind: ReceiptKind::Read,
            from: u,
            msg_id: id(1),
            ts_ms: 1,
        };
        let out = store
            .apply(
                &[
                    Op::Append {
                        user: u,
                        id: id(9),
                        item: r.clone(),
                    },
                    Op::Append {
                        user: u,
                        id: id(10),
                        item: r,
                    },
                ],
                LIMITS,
            )
            .unwrap();
        assert_eq!(out, vec![OpOutcome::Appended, OpOutcome::QueueFull]);
    }

    #[test]
    fn group_log_records_move_into_members_queues_once_and_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            Store::open(dir.path(), ShardId(0), 1, 16, SyncPolicy::None)
                .unwrap()
                .store
        };
        let (a, b, c) = (UserId(1), UserId(2), UserId(3));
        let item = |n: u8, len: usize| Item::GroupMessage {
            group: 7,
            msg_id: ServerMsgId(100 + u64::from(n)),
            sender: UserId(9),
            sender_device: DeviceId(1),
            ts_ms: 5,
            body: Bytes::from(vec![n; len]),
        };
        let queue = |s: &Store, u: UserId| -> Vec<(u64, Vec<u8>)> {
            let q = s.read_queue(u, None, 10).unwrap();
            q.into_iter().map(|(id, i)| (id.0, i.encode())).collect()
        };
        // A limit of one message: moves out of the log ignore it (the sender has its ack).
        let tight = QueueLimits {
            messages_max: 1,
            receipts_max: 1,
        };
        let (one, two) = (item(1, 64), item(2, 600));
        let s = open();
        let put = s
            .apply(
                &[
                    Op::LogPut {
                        id: ServerMsgId(10),
                        item: one.clone(),
                        users: vec![a, b, c],
                    },
                    Op::LogPut {
                        id: ServerMsgId(11),
                        item: two.clone(),
                        users: vec![a, b],
                    },
                ],
                tight,
            )
            .unwrap();
        assert_eq!(put, vec![OpOutcome::Appended, OpOutcome::Appended]);
        assert!(queue(&s, a).is_empty());
        assert_eq!(s.queue_counts(a).unwrap(), (0, 0));
        let both = vec![(10, one.encode()), (11, two.encode())];
        // b leaves: both move to its queue, in order, under the same ids; twice is once.
        for _ in 0..2 {
            let ids = vec![ServerMsgId(10), ServerMsgId(11)];
            let unlog = Op::Unlog {
                user: b,
                ids,
                bytes: 0,
            };
            s.apply(&[unlog], tight).unwrap();
            assert_eq!(queue(&s, b), both);
            assert_eq!(s.queue_counts(b).unwrap(), (2, 0));
        }
        // a ACKed 11 in memory and was the last: the record goes.
        let drop11 = Op::LogDrop {
            id: ServerMsgId(11),
        };
        assert_eq!(
            s.apply(std::slice::from_ref(&drop11), tight).unwrap(),
            vec![OpOutcome::Deleted(true)]
        );
        assert_eq!(
            s.apply(&[drop11], tight).unwrap(),
            vec![OpOutcome::Deleted(false)]
        );
        // A stop: 10 is still for a and c, and moves into their queues on open, once.
        drop(s);
        for _ in 0..2 {
            let s = open();
            for u in [a, c] {
                assert_eq!(queue(&s, u), vec![(10, one.encode())]);
                assert_eq!(s.queue_counts(u).unwrap(), (1, 0));
            }
            assert_eq!(queue(&s, b), both);
            assert_eq!(s.queue_counts(b).unwrap(), (2, 0));
            // The 600-byte body is stored once, referred to by b's item only.
            assert_eq!(body_record(&s, ServerMsgId(102)).map(|r| r.0), Some(1));
        }
    }

    #[test]
    fn reopen_bumps_epoch_keeps_data_and_checks_layout() {
        let dir = tempfile::tempdir().unwrap();
        let u = UserId(1);
        {
            let o = Store::open(dir.path(), ShardId(1), 2, 16, SyncPolicy::None).unwrap();
            let id = ServerMsgId::compose(o.epoch, ShardId(1), 0);
            o.store
                .apply(
                    &[Op::Append {
                        user: u,
                        id,
                        item: msg(1),
                    }],
                    LIMITS,
                )
                .unwrap();
        }
        let o = Store::open(dir.path(), ShardId(1), 2, 16, SyncPolicy::None).unwrap();
        assert_eq!(o.epoch, 2);
        assert_eq!(o.store.read_queue(u, None, 10).unwrap().len(), 1);
        drop(o);
        let err = Store::open(dir.path(), ShardId(1), 3, 16, SyncPolicy::None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("server.shards = 2"), "{err}");
    }

    #[test]
    fn shared_bodies_of_the_first_format_are_converted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let msg_id = ServerMsgId(77);
        let item = Item::GroupMessage {
            group: 5,
            msg_id,
            sender: UserId(1),
            sender_device: DeviceId(2),
            ts_ms: 3,
            body: Bytes::from(vec![7u8; 700]),
        };
        {
            let store = Store::open(dir.path(), ShardId(0), 1, 16, SyncPolicy::None)
                .unwrap()
                .store;
            let ops: Vec<Op> = [10, 20]
                .iter()
                .map(|u| Op::Append {
                    user: UserId(*u),
                    id: ServerMsgId(100 + u),
                    item: item.clone(),
                })
                .collect();
            store.apply(&ops, LIMITS).unwrap();
            // Rewrite the body as the first builds stored it: one record, count first.
            let mut wtxn = store.env.write_txn().unwrap();
            store
                .meta
                .delete(&mut wtxn, &body_refs_key(msg_id))
                .unwrap();
            store.meta.delete(&mut wtxn, &body_key(msg_id)).unwrap();
            let legacy_key = tagged_key(LEGACY_BODY_PREFIX, msg_id.0);
            let mut v = 2u32.to_be_bytes().to_vec();
            v.extend_from_slice(&[7u8; 700]);
            store.meta.put(&mut wtxn, &legacy_key, &v).unwrap();
            // More than one conversion transaction's worth of other bodies.
            for m in 0..crate::limits::LEGACY_BODIES_PER_TXN as u64 + 500 {
                let k = tagged_key(LEGACY_BODY_PREFIX, 1_000_000 + m);
                store.meta.put(&mut wtxn, &k, &[0, 0, 0, 1, 9, 9]).unwrap();
            }
            wtxn.commit().unwrap();
        }
        let store = Store::open(dir.path(), ShardId(0), 1, 16, SyncPolicy::None)
            .unwrap()
            .store;
        assert_eq!(body_record(&store, msg_id), Some((2, 700)));
        assert_eq!(
            body_record(&store, ServerMsgId(1_000_000 + 1_234)),
            Some((1, 2))
        );
        assert_eq!(
            store.read_queue(UserId(10), None, 10).unwrap(),
            vec![(ServerMsgId(110), item.clone())]
        );
        for u in [10, 20] {
            store
                .apply(
                    &[Op::Delete {
                        user: UserId(u),
                        id: ServerMsgId(100 + u),
                    }],
                    LIMITS,
                )
                .unwrap();
        }
        assert_eq!(body_record(&store, msg_id), None);
        let rtxn = store.env.read_txn().unwrap();
        assert_eq!(
            store
                .meta
                .prefix_iter(&rtxn, &[LEGACY_BODY_PREFIX])
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn item_codec_rejects_garbage() {
        assert_eq!(Item::decode(&msg(4).encode()), Some(msg(4)));
        assert_eq!(Item::decode(&[]), None);
        assert_eq!(Item::decode(&[ITEM_RECEIPT, 9]), None);
        assert_eq!(Item::decode(&[7; 30]), None);
    }
}
