//! The group log of a member shard: a group message for this shard's online members is
//! stored once (`store::Op::LogPut`), not appended to each member's queue, and its deliveries
//! and ACKs are kept here, in memory (docs/architecture.md, Groups, "The group log").
//!
//! - A member is *live* for a message when it has a session on this shard at fan-out and
//!   holds fewer than `limits::GROUP_LIVE_PER_USER_MAX` log messages, the body is at most
//!   `limits::GROUP_LOG_BODY_BYTES_MAX` and the log's bodies stay within
//!   `limits::GROUP_LOG_BYTES_MAX`; the others get an append to their own queue, as before.
//! - Keys are server-assigned message ids and verified user ids, hashed with foldhash like
//!   the shard's sessions (docs/architecture.md, Hashing).
//! - The record lists the live members. An ACK removes the member here only; the record is
//!   dropped (`Op::LogDrop`) once every live member acknowledged or was moved out.
//! - A member whose last session ends is moved out: `Op::Unlog` appends the record's item to
//!   its own queue under the same id, so its next session reads it like any queued item.
//!   Until that commits, the items stay here (`unlogging`) for a session that comes back.
//! - `Store::open` moves every record left by a stop or a crash into its members' queues: a
//!   member that had acknowledged it before the crash gets it again (delivery is at least
//!   once; the id is the same, so clients drop it).
//!
//! Must never: deliver an item whose record has not committed, or drop a record while a
//! member it lists has neither acknowledged it nor been moved out.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use super::groups::{group_shard, FanoutPart};
use super::{Completion, Shard};
use crate::ids::{ServerMsgId, ShardId, UserId};
use crate::limits;
use crate::store::{Item, Op};

/// One log message held in memory.
struct Entry {
    item: Item,
    /// The live members (to undo their state when the record's commit fails).
    users: Vec<UserId>,
    /// Live members that have neither acknowledged it nor been moved out.
    pending: usize,
    /// The record's commit succeeded: it may be delivered.
    committed: bool,
    /// A member's move out of the record failed twice: the record must stay for
    /// `Store::open` (no drop).
    pinned: bool,
}

/// What an entry counts against `limits::GROUP_LOG_BYTES_MAX`: its body (the rest is small
/// and bounded by the entry count).
fn body_bytes(item: &Item) -> usize {
    match item {
        Item::GroupMessage { body, .. } => body.len(),
        _ => 0,
    }
}

/// The shard's group log state (see the module doc).
#[derive(Default)]
pub(super) struct GroupLog {
    entries: RefCell<foldhash::HashMap<ServerMsgId, Entry>>,
    /// Per live user: the log messages it holds, in increasing order.
    live: RefCell<foldhash::HashMap<UserId, VecDeque<ServerMsgId>>>,
    /// Per user moved out whose `Op::Unlog` has not committed yet: those items.
    unlogging: RefCell<foldhash::HashMap<UserId, Vec<(ServerMsgId, Item)>>>,
    /// Acknowledged log deliveries not yet counted on their groups' shards:
    /// (group's shard, group, group message id).
    delivered: RefCell<Vec<(ShardId, u64, ServerMsgId)>>,
    /// Body bytes of `entries` (bounded by `limits::GROUP_LOG_BYTES_MAX`).
    bytes: std::cell::Cell<usize>,
}

impl GroupLog {
    /// Removes entry `id` (its bytes no longer count).
    fn remove(
        &self,
        entries: &mut foldhash::HashMap<ServerMsgId, Entry>,
        id: ServerMsgId,
    ) -> Option<Entry> {
        let e = entries.remove(&id)?;
        self.bytes.set(self.bytes.get() - body_bytes(&e.item));
        Some(e)
    }
}

impl Shard {
    /// Group log messages held in memory (the metrics' gauge).
    pub(super) fn log_messages(&self) -> usize {
        self.glog.entries.borrow().len()
    }

    /// Splits a fan-out's `recipients` into live members (returned first) and the others.
    /// None is live when the body is over `limits::GROUP_LOG_BODY_BYTES_MAX` or the log's
    /// bodies would pass `limits::GROUP_LOG_BYTES_MAX`.
    pub(super) fn split_live(
        &self,
        recipients: Vec<UserId>,
        item: &Item,
    ) -> (Vec<UserId>, Vec<UserId>) {
        let body = body_bytes(item);
        if body > limits::GROUP_LOG_BODY_BYTES_MAX
            || self.glog.bytes.get() + body > limits::GROUP_LOG_BYTES_MAX
        {
            return (Vec::new(), recipients);
        }
        let sessions = self.sessions.borrow();
        let live = self.glog.live.borrow();
        recipients.into_iter().partition(|u| {
            sessions.contains_key(u)
                && live
                    .get(u)
                    .is_none_or(|q| q.len() < limits::GROUP_LIVE_PER_USER_MAX)
        })
    }

    /// Stores group message `item` once for live members `users`; `part` is the fan-out part
    /// it settles (one member each).
    pub(super) fn log_put(&self, item: Item, users: Vec<UserId>, part: Option<Rc<FanoutPart>>) {
        let id = self.next_msg_id();
        {
            let mut live = self.glog.live.borrow_mut();
            for u in &users {
                live.entry(*u).or_default().push_back(id);
            }
        }
        self.glog
            .bytes
            .set(self.glog.bytes.get() + body_bytes(&item));
        self.glog.entries.borrow_mut().insert(
            id,
            Entry {
                item: item.clone(),
                users: users.clone(),
                pending: users.len(),
                committed: false,
                pinned: false,
            },
        );
        let n = users.len();
        self.enqueue_op(Op::LogPut { id, item, users }, Completion::Log { part, n });
    }

    /// The record of `id` committed (`ok`) or failed. On failure every member's state of it
    /// is undone (the sender is refused through the fan-out part).
    pub(super) fn log_committed(&self, id: ServerMsgId, ok: bool) {
        let mut entries = self.glog.entries.borrow_mut();
        if ok {
            let Some(e) = entries.get_mut(&id) else {
                return;
            };
            e.committed = true;
            if e.pending == 0 {
                // Every member was moved out before the record committed.
                let pinned = e.pinned;
                self.glog.remove(&mut entries, id);
                drop(entries);
                if !pinned {
                    self.enqueue_op(Op::LogDrop { id }, Completion::None);
                }
            }
            return;
        }
        let Some(e) = self.glog.remove(&mut entries, id) else {
            return;
        };
        drop(entries);
        let mut live = self.glog.live.borrow_mut();
        let mut unlogging = self.glog.unlogging.borrow_mut();
        for u in e.users {
            if let Some(q) = live.get_mut(&u) {
                q.retain(|x| *x != id);
                if q.is_empty() {
                    live.remove(&u);
                }
            }
            if let Some(v) = unlogging.get_mut(&u) {
                v.retain(|(x, _)| *x != id);
            }
        }
    }

    /// An ACK of `id` by `user`: `true` when it was a live log message (settled here),
    /// `false` when the caller deletes it from the user's queue as usual.
    pub(super) fn log_acked(&self, user: UserId, id: ServerMsgId) -> bool {
        {
            let mut live = self.glog.live.borrow_mut();
            let Some(q) = live.get_mut(&user) else {
                return false;
            };
            // Usually the front: ACKs come in delivery order.
            let Some(at) = q.iter().position(|x| *x == id) else {
                return false;
            };
            q.remove(at);
            if q.is_empty() {
                live.remove(&user);
            }
        }
        self.log_release(id, true);
        true
    }

    /// One live member of `id` is done with it: acknowledged (counted for the group's
    /// tally) or moved out.
    fn log_release(&self, id: ServerMsgId, acked: bool) {
        let mut entries = self.glog.entries.borrow_mut();
        let Some(e) = entries.get_mut(&id) else {
            return;
        };
        e.pending -= 1;
        if acked {
            if let Item::GroupMessage { group, msg_id, .. } = &e.item {
                self.glog.delivered.borrow_mut().push((
                    group_shard(*group, self.shards),
                    *group,
                    *msg_id,
                ));
            }
        }
        if e.pending == 0 && e.committed {
            let pinned = e.pinned;
            self.glog.remove(&mut entries, id);
            drop(entries);
            if !pinned {
                self.enqueue_op(Op::LogDrop { id }, Completion::None);
            }
        }
    }

    /// `user`'s last session ended: moves its log messages into its own queue.
    pub(super) fn log_user_offline(&self, user: UserId) {
        let Some(ids) = self.glog.live.borrow_mut().remove(&user) else {
            return;
        };
        let ids: Vec<ServerMsgId> = ids.into();
        let mut bytes = 0;
        {
            let entries = self.glog.entries.borrow();
            let mut unlogging = self.glog.unlogging.borrow_mut();
            let held = unlogging.entry(user).or_default();
            for id in &ids {
                if let Some(e) = entries.get(id) {
                    // The record's header and members, the item's header and body.
                    bytes += 2 + 8 * e.users.len() + 37 + body_bytes(&e.item);
                    held.push((*id, e.item.clone()));
                }
            }
        }
        // The move goes ahead of any drop it causes (ops commit in order).
        self.enqueue_op(
            Op::Unlog {
                user,
                ids: ids.clone(),
                bytes,
            },
            Completion::None,
        );
        for id in ids {
            self.log_release(id, false);
        }
    }

    /// `Op::Unlog` for `user` committed: its items are in the user's queue now.
    pub(super) fn log_unlogged(&self, user: UserId, ids: &[ServerMsgId]) {
        let mut unlogging = self.glog.unlogging.borrow_mut();
        if let Some(v) = unlogging.get_mut(&user) {
            v.retain(|(x, _)| ids.binary_search(x).is_err());
            if v.is_empty() {
                unlogging.remove(&user);
            }
        }
    }

    /// `Op::Unlog` for `user` failed, alone too (a full map or disk, a damaged record): its
    /// records keep naming the user and must stay until `Store::open` moves it. Their drops,
    /// pending or to come, are cancelled; the user gets the items after the next start.
    pub(super) fn log_pin(&self, user: UserId, ids: &[ServerMsgId]) {
        super::bump(&self.stats.group_log_moves_failed, 1);
        tracing::error!(shard = self.id.0, %user, items = ids.len(), "group log: moving a member out failed; its records stay until the next start");
        self.log_unlogged(user, ids);
        let mut entries = self.glog.entries.borrow_mut();
        for id in ids {
            if let Some(e) = entries.get_mut(id) {
                e.pinned = true;
            }
        }
        drop(entries);
        self.pending
            .borrow_mut()
            .retain(|(op, _)| !matches!(op, Op::LogDrop { id } if ids.binary_search(id).is_ok()));
    }

    /// The committed log messages `user` holds with ids above `after`, in order (live ones
    /// and ones being moved out), and the lowest id above `after` whose record has not
    /// committed yet, if any. A read of the user's queue must stop below that id: the
    /// store's items after it may already be readable (its commit can have finished on the
    /// blocking thread before this reactor learns of it), and delivering them first would
    /// move the session's cursor past it.
    pub(super) fn log_items(
        &self,
        user: UserId,
        after: Option<ServerMsgId>,
    ) -> (Vec<(ServerMsgId, Item)>, Option<ServerMsgId>) {
        let entries = self.glog.entries.borrow();
        let above = |id: &ServerMsgId| after.is_none_or(|a| *id > a);
        let mut out: Vec<(ServerMsgId, Item)> = Vec::new();
        let mut fence: Option<ServerMsgId> = None;
        let mut take = |id: ServerMsgId, item: Option<&Item>| match entries.get(&id) {
            Some(e) if !e.committed => fence = Some(fence.map_or(id, |f| f.min(id))),
            Some(e) => out.push((id, item.unwrap_or(&e.item).clone())),
            // Gone: committed and dropped (a failed record is purged from both lists).
            None => out.extend(item.map(|i| (id, i.clone()))),
        };
        if let Some(q) = self.glog.live.borrow().get(&user) {
            q.iter()
                .filter(|id| above(id))
                .for_each(|id| take(*id, None));
        }
        if let Some(v) = self.glog.unlogging.borrow().get(&user) {
            v.iter()
                .filter(|(id, _)| above(id))
                .for_each(|(id, item)| take(*id, Some(item)));
            // Two increasing runs (a user that left and came back holds both).
            out.sort_unstable_by_key(|(id, _)| *id);
        }
        (out, fence)
    }

    /// Sends the counts of acknowledged log deliveries to their groups' shards.
    pub(super) fn flush_log_delivered(&self) {
        let delivered = std::mem::take(&mut *self.glog.delivered.borrow_mut());
        if !delivered.is_empty() {
            self.send_delivered_counts(delivered);
        }
    }
}
