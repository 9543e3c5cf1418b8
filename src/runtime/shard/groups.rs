//! Groups, on the shard that owns each group (`owner_shard` of the group id).
//!
//! The owner shard keeps the member list (in its store, `Op::PutGroup`, cached in memory once
//! used) and is where every request and message for the group goes:
//!
//! ```text
//! member's shard ── Group{request} ──▶ group's shard: check membership and role
//!                                       GROUP_SEND: id, then per member shard:
//!                       ◀── GroupFanout{item, members there} (one envelope per shard)
//! member shards: one group log record for the online members (log.rs), an append to each
//!                other member's queue (group commit), deliver live,
//!                ── FanoutDone ──▶ group's shard: when every member shard has committed,
//!                                  SEND_ACK to the sender (the durability contract)
//! ```
//!
//! Membership changes are applied to the cached list at once, written through the group
//! commit (GROUP_OK answers once it commits), and announced to the members as a queued
//! GROUP_EVENT sent down the same per-shard channels as the messages, so members see events
//! and messages in the order the group's shard handled them.
//!
//! Must never: acknowledge a group message before every member shard has committed it, copy a
//! body per member in memory, or let a non-admin change membership.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Completion, ConnRef, Envelope, Shard};
use crate::ids::{owner_node, owner_shard, DeviceId, ServerMsgId, ShardId, UserId};
use crate::proto::{group_body_bytes_max, ErrorCode, GroupOp, GroupRole, ServerFrame};
use crate::runtime::conn::Conn;
use crate::runtime::now_ms;
use crate::store::{Item, Op, TallyRecord};

/// A request for a group's shard.
#[derive(Clone, Debug)]
pub enum GroupRequest {
    /// Create, add, remove, leave or list.
    Op {
        /// Echoed in the answer.
        request_id: u64,
        /// The group.
        group: u64,
        /// What to do.
        op: GroupOp,
        /// Users named.
        users: Vec<UserId>,
    },
    /// A message to the members.
    Send {
        /// Echoed in the answer.
        client_msg_id: u64,
        /// The group.
        group: u64,
        /// Opaque body.
        body: Bytes,
    },
}

/// A group message waiting, on the group's shard, for its member shards' commits.
#[derive(Debug)]
pub(super) struct FanoutWait {
    shards_left: usize,
    to: ConnRef,
    client_msg_id: u64,
    msg_id: ServerMsgId,
    ts_ms: u64,
    failed: bool,
}

/// A member shard's part of one fan-out: its appends left to commit.
#[derive(Debug)]
pub(crate) struct FanoutPart {
    origin: ShardId,
    fanout: u64,
    left: Cell<usize>,
    failed: Cell<bool>,
}

/// The shard that owns `group`.
pub(super) fn group_shard(group: u64, shards: usize) -> ShardId {
    owner_shard(UserId(group), shards)
}

type Members = Vec<(UserId, GroupRole)>;

fn role_of(members: &Members, user: UserId) -> Option<GroupRole> {
    members
        .binary_search_by_key(&user, |(u, _)| *u)
        .ok()
        .map(|i| members[i].1)
}

impl Shard {
    /// A GROUP or GROUP_SEND on the member's connection: checked, then to the group's shard.
    pub(super) fn group_command(
        &self,
        slot: u32,
        conn: &Rc<Conn>,
        user: UserId,
        device: DeviceId,
        request: GroupRequest,
    ) {
        let (ref_id, group) = match &request {
            GroupRequest::Op {
                request_id, group, ..
            } => (*request_id, *group),
            GroupRequest::Send {
                client_msg_id,
                group,
                ..
            } => (*client_msg_id, *group),
        };
        if group == 0 {
            conn.push_frame(&ServerFrame::error(
                ErrorCode::GroupUnknown,
                ref_id,
                "group 0 is not a group",
            ));
            return;
        }
        let node = owner_node(UserId(group), self.params.nodes as usize);
        if node != self.params.node_id {
            conn.push_frame(&ServerFrame::error(
                ErrorCode::WrongNode,
                ref_id,
                format!(
                    "group {group} belongs to node {node}; cross-node groups are not supported yet"
                ),
            ));
            return;
        }
        if let GroupRequest::Send { body, .. } = &request {
            let max = group_body_bytes_max(self.cfg.max_frame_bytes);
            if body.len() > max {
                conn.push_frame(&ServerFrame::error(
                    ErrorCode::BodyTooLarge,
                    ref_id,
                    format!("body of {} bytes exceeds the maximum of {max}", body.len()),
                ));
                return;
            }
            conn.send_started();
        }
        let from = ConnRef {
            shard: self.id,
            slot,
            gen: conn.gen,
        };
        self.route(
            group_shard(group, self.shards),
            Envelope::Group {
                from,
                user,
                device,
                request,
            },
        );
    }

    /// The group envelopes.
    pub(super) fn handle_group_envelope(&self, env: Envelope) {
        match env {
            Envelope::Group {
                from,
                user,
                device,
                request,
            } => match request {
                GroupRequest::Op {
                    request_id,
                    group,
                    op,
                    users,
                } => self.group_op(from, user, request_id, group, op, users),
                GroupRequest::Send {
                    client_msg_id,
                    group,
                    body,
                } => self.group_send(from, user, device, client_msg_id, group, body),
            },
            Envelope::Reply { to, frame } => {
                if let Some(c) = self.conn_by_ref(to) {
                    c.push_frame(&frame);
                }
            }
            Envelope::GroupFanout {
                origin,
                fanout,
                item,
                recipients,
            } => {
                let part = fanout.map(|fanout| {
                    Rc::new(FanoutPart {
                        origin,
                        fanout,
                        left: Cell::new(recipients.len()),
                        failed: Cell::new(false),
                    })
                });
                // Online members share one log record; the others get their own append.
                let recipients = if matches!(item, Item::GroupMessage { .. }) {
                    let (live, others) = self.split_live(recipients, &item);
                    if !live.is_empty() {
                        self.log_put(item.clone(), live, part.clone());
                    }
                    others
                } else {
                    recipients
                };
                for user in recipients {
                    let id = self.next_msg_id();
                    let completion = match &part {
                        Some(p) => Completion::Fanout(p.clone()),
                        None => Completion::None,
                    };
                    self.enqueue_op(
                        Op::Append {
                            user,
                            id,
                            item: item.clone(),
                        },
                        completion,
                    );
                }
            }
            Envelope::GroupRead {
                group,
                msg_ids,
                member,
            } => {
                // A read only counts from a member (a GROUP_READ can name any ids).
                let is_member = self
                    .members_of(group)
                    .ok()
                    .flatten()
                    .is_some_and(|m| role_of(&m, member).is_some());
                if !is_member {
                    return;
                }
                for msg_id in msg_ids {
                    self.tally(group, msg_id, true, 1);
                }
            }
            Envelope::GroupDelivered { counts } => {
                // Delivered counts come from the members' own queues.
                for (group, msg_id, n) in counts {
                    self.tally(group, msg_id, false, n);
                }
            }
            Envelope::FanoutDone { fanout, failed } => {
                let done = {
                    let mut f = self.fanouts.borrow_mut();
                    let Some(w) = f.get_mut(&fanout) else {
                        return;
                    };
                    w.failed |= failed;
                    w.shards_left -= 1;
                    if w.shards_left == 0 {
                        f.remove(&fanout)
                    } else {
                        None
                    }
                };
                if let Some(w) = done {
                    self.answer_group_send(w);
                }
            }
            other => unreachable!("not a group envelope: {other:?}"),
        }
    }

    /// One member's append committed (or failed): when the shard's part is done, tell the
    /// group's shard.
    pub(super) fn fanout_part_done(&self, part: &FanoutPart, failed: bool) {
        part.failed.set(part.failed.get() || failed);
        let left = part.left.get() - 1;
        part.left.set(left);
        if left == 0 {
            self.route(
                part.origin,
                Envelope::FanoutDone {
                    fanout: part.fanout,
                    failed: part.failed.get(),
                },
            );
        }
    }

    /// GROUP_READ on a member's connection: the tallies live on the group's shard.
    pub(super) fn group_read(&self, conn: &Conn, user: UserId, group: u64, ids: Vec<ServerMsgId>) {
        if group == 0 {
            conn.push_frame(&ServerFrame::error(
                ErrorCode::GroupUnknown,
                0,
                "group 0 is not a group",
            ));
            return;
        }
        self.route(
            group_shard(group, self.shards),
            Envelope::GroupRead {
                group,
                msg_ids: ids,
                member: user,
            },
        );
    }

    /// Counts `n` deliveries or reads of a group message, and queues an aggregated receipt for
    /// its sender at the first and at the last member of each kind: at most four receipts per
    /// message, whatever the group's size. (Deliveries arrive counted per commit of the
    /// member's shard, so the "first" receipt can already count several members.) Tallies of
    /// unknown messages (older than the tallies kept) are ignored; the tallies survive a
    /// restart (`checkpoint_tallies`).
    fn tally(&self, group: u64, msg_id: ServerMsgId, read: bool, n: u32) {
        let report = {
            let mut tallies = self.tallies.borrow_mut();
            let Some(t) = tallies.get_mut(&(group, msg_id)) else {
                return;
            };
            let (count, first_bit, all_bit) = if read {
                (&mut t.read, 4u8, 8u8)
            } else {
                (&mut t.delivered, 1u8, 2u8)
            };
            // A member that reads twice counts twice; the count stops at the member count.
            let before = *count;
            let n = u16::try_from(n).unwrap_or(u16::MAX);
            *count = before.saturating_add(n).min(t.members);
            let count = *count;
            if count == before {
                return; // nothing changed, so nothing to report or to write
            }
            self.tallies_dirty.borrow_mut().insert((group, msg_id));
            let mut bit = 0;
            if before == 0 && t.reported & first_bit == 0 {
                bit |= first_bit;
            }
            if count == t.members && t.reported & all_bit == 0 {
                bit |= all_bit;
            }
            if bit == 0 {
                return;
            }
            t.reported |= bit;
            let item = Item::GroupReceipt {
                group,
                msg_id,
                members: t.members,
                delivered: t.delivered,
                read: t.read,
                ts_ms: now_ms(),
            };
            let sender = t.sender;
            if t.reported & (2 | 8) == (2 | 8) {
                tallies.remove(&(group, msg_id));
            }
            (sender, item)
        };
        let (sender, item) = report;
        self.route(
            owner_shard(sender, self.shards),
            Envelope::GroupFanout {
                origin: self.id,
                fanout: None,
                item,
                recipients: vec![sender],
            },
        );
    }

    /// Starts the tally of a message sent to `members` others (bounded: the oldest is
    /// forgotten past `limits::GROUP_TALLIES_MAX`).
    fn start_tally(&self, group: u64, msg_id: ServerMsgId, sender: UserId, members: usize) {
        if members == 0 {
            return;
        }
        let mut tallies = self.tallies.borrow_mut();
        let mut order = self.tally_order.borrow_mut();
        let mut dirty = self.tallies_dirty.borrow_mut();
        while order.len() >= crate::limits::GROUP_TALLIES_MAX {
            // An ended tally was deleted from the store when it ended.
            if let Some(old) = order.pop_front() {
                if tallies.remove(&old).is_some() {
                    dirty.insert(old);
                }
            }
        }
        order.push_back((group, msg_id));
        dirty.insert((group, msg_id));
        tallies.insert(
            (group, msg_id),
            TallyRecord {
                group,
                sender,
                members: members.min(u16::MAX as usize) as u16,
                delivered: 0,
                read: 0,
                reported: 0,
            },
        );
    }

    /// Takes back the tallies checkpointed before a restart (oldest first; past the bound,
    /// the oldest are dropped from the store at the next checkpoint).
    pub(super) fn restore_tallies(&self, list: Vec<(ServerMsgId, TallyRecord)>) {
        let skip = list.len().saturating_sub(crate::limits::GROUP_TALLIES_MAX);
        let mut tallies = self.tallies.borrow_mut();
        let mut order = self.tally_order.borrow_mut();
        for (i, (msg_id, record)) in list.into_iter().enumerate() {
            let key = (record.group, msg_id);
            if i < skip {
                self.tallies_dirty.borrow_mut().insert(key);
            } else {
                tallies.insert(key, record);
                order.push_back(key);
            }
        }
    }

    /// Writes the tallies that changed since the last call to the store (one op each, through
    /// the group commit; called every sweep, and at shutdown by `flush_tallies`). A failed
    /// commit marks its tallies for the next call. A crash loses at most the changes of one
    /// sweep interval.
    pub(super) fn checkpoint_tallies(&self) {
        let mut keys: Vec<(u64, ServerMsgId)> = self.tallies_dirty.borrow_mut().drain().collect();
        if keys.is_empty() {
            return;
        }
        keys.sort_unstable_by_key(|(_, msg_id)| *msg_id);
        let tallies = self.tallies.borrow();
        for key in keys {
            let record = tallies.get(&key).copied();
            self.enqueue_op(
                Op::Tally {
                    group: key.0,
                    msg_id: key.1,
                    record,
                },
                Completion::None,
            );
        }
    }

    /// Shutdown, once every shard has drained (or the wait for them timed out): the counts
    /// from the last deletes (also other shards', whose delivered counts may still be crossing)
    /// reach the store before the committer stops, and the store is synced, since the sweeper
    /// may have committed tallies after the drain's own sync. Gives up at `deadline`.
    pub(super) async fn flush_tallies(&self, deadline: Instant) {
        let wait_idle = || async {
            while !self.store_idle() && Instant::now() < deadline {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        };
        wait_idle().await;
        // A few rounds: a failing store marks its tallies again after every try.
        for _ in 0..3 {
            // Envelopes sent by other shards' last commits normally arrive within a few
            // reactor turns.
            glommio::timer::sleep(Duration::from_millis(10)).await;
            if self.tallies_dirty.borrow().is_empty() {
                break;
            }
            self.checkpoint_tallies();
            wait_idle().await;
        }
        if !self.tallies_dirty.borrow().is_empty() || !self.store_idle() {
            tracing::warn!(
                shard = self.id.0,
                "shutdown: group receipt tallies not all written (store failing, or the deadline passed)"
            );
        }
        let store = self.store.clone();
        if let Err(e) = crate::runtime::blocking(move || store.sync()).await {
            tracing::error!(shard = self.id.0, error = %e, "shutdown: syncing the last tallies failed");
        }
    }

    fn answer_group_send(&self, w: FanoutWait) {
        let result = if w.failed {
            Err((
                ErrorCode::StoreFailed,
                "message not stored for every member; retry later".to_string(),
            ))
        } else {
            Ok((w.msg_id, w.ts_ms))
        };
        self.route(
            w.to.shard,
            Envelope::SendResult {
                to: w.to,
                client_msg_id: w.client_msg_id,
                result,
            },
        );
    }

    /// Keeps `group`'s member list in the cache, which is bounded
    /// (`limits::GROUP_CACHE_MAX`): past it an arbitrary entry goes (the store is the truth,
    /// so a dropped entry is read again on next use). An entry whose latest change has not
    /// committed yet could be dropped and read back without it for the few milliseconds until
    /// the commit; that needs 65,536 other groups used within one group commit.
    fn cache_group(&self, group: u64, members: Members) {
        let mut cache = self.groups.borrow_mut();
        if cache.len() >= crate::limits::GROUP_CACHE_MAX && !cache.contains_key(&group) {
            if let Some(victim) = cache.keys().next().copied() {
                cache.remove(&victim);
            }
        }
        cache.insert(group, members);
    }

    /// The members of `group` (this shard owns it), from the cache or the store. An empty
    /// cached list is a tombstone: the group was emptied and its delete may not have
    /// committed yet, so the store's copy must not be read back.
    fn members_of(&self, group: u64) -> Result<Option<Members>, String> {
        if let Some(m) = self.groups.borrow().get(&group) {
            return Ok((!m.is_empty()).then(|| m.clone()));
        }
        match self.store.group(group) {
            Ok(Some(m)) => {
                self.cache_group(group, m.clone());
                Ok(Some(m))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::error!(shard = self.id.0, group, error = %e, "group read failed");
                Err(e.client_message())
            }
        }
    }

    /// Sends `item` to `recipients`, one envelope per member shard; with `wait`, returns the
    /// number of shards that will answer with FanoutDone.
    fn fan_out(&self, item: Item, recipients: Vec<UserId>, fanout: Option<u64>) -> usize {
        let mut by_shard: HashMap<ShardId, Vec<UserId>> = HashMap::new();
        for u in recipients {
            by_shard
                .entry(owner_shard(u, self.shards))
                .or_default()
                .push(u);
        }
        let n = by_shard.len();
        for (shard, recipients) in by_shard {
            self.route(
                shard,
                Envelope::GroupFanout {
                    origin: self.id,
                    fanout,
                    item: item.clone(),
                    recipients,
                },
            );
        }
        n
    }

    fn group_send(
        &self,
        from: ConnRef,
        user: UserId,
        device: DeviceId,
        client_msg_id: u64,
        group: u64,
        body: Bytes,
    ) {
        let refuse = |code, message: String| {
            self.route(
                from.shard,
                Envelope::SendResult {
                    to: from,
                    client_msg_id,
                    result: Err((code, message)),
                },
            )
        };
        let members = match self.members_of(group) {
            Ok(Some(m)) => m,
            Ok(None) => return refuse(ErrorCode::GroupUnknown, format!("no group {group}")),
            Err(why) => return refuse(ErrorCode::StoreFailed, why),
        };
        if role_of(&members, user).is_none() {
            return refuse(
                ErrorCode::GroupForbidden,
                format!("you are not a member of group {group}"),
            );
        }
        let msg_id = self.next_msg_id();
        let ts_ms = now_ms();
        let recipients: Vec<UserId> = members
            .iter()
            .map(|(u, _)| *u)
            .filter(|u| *u != user)
            .collect();
        let fanout = self.next_fanout.get();
        self.next_fanout.set(fanout + 1);
        let wait = FanoutWait {
            shards_left: 0,
            to: from,
            client_msg_id,
            msg_id,
            ts_ms,
            failed: false,
        };
        self.start_tally(group, msg_id, user, recipients.len());
        let item = Item::GroupMessage {
            group,
            msg_id,
            sender: user,
            sender_device: device,
            ts_ms,
            body,
        };
        let shards = self.fan_out(item, recipients, Some(fanout));
        if shards == 0 {
            // The sender is the only member: stored for nobody, acknowledged at once.
            self.answer_group_send(wait);
        } else {
            self.fanouts.borrow_mut().insert(
                fanout,
                FanoutWait {
                    shards_left: shards,
                    ..wait
                },
            );
        }
    }

    fn group_op(
        &self,
        from: ConnRef,
        user: UserId,
        request_id: u64,
        group: u64,
        op: GroupOp,
        users: Vec<UserId>,
    ) {
        let reply =
            |frame: ServerFrame| self.route(from.shard, Envelope::Reply { to: from, frame });
        let refuse = |code, message: String| reply(ServerFrame::error(code, request_id, message));
        let nodes = self.params.nodes as usize;
        if let Some(u) = users.iter().find(|u| u.0 == 0) {
            return refuse(ErrorCode::BadRecipient, format!("user {u} is not a user"));
        }
        if let Some(u) = users
            .iter()
            .find(|u| owner_node(**u, nodes) != self.params.node_id)
        {
            return refuse(
                ErrorCode::WrongNode,
                format!(
                    "user {u} belongs to another node; cross-node groups are not supported yet"
                ),
            );
        }
        let cap = self.cfg.group_members_max;
        let current = match self.members_of(group) {
            Ok(m) => m,
            Err(why) => return refuse(ErrorCode::StoreFailed, why),
        };
        let role = current.as_ref().and_then(|m| role_of(m, user));
        let (members, event_users, mut recipients): (Members, Vec<UserId>, Vec<UserId>) =
            match (op, current) {
                (GroupOp::Create, Some(_)) => {
                    return refuse(ErrorCode::GroupExists, format!("group {group} exists"))
                }
                (GroupOp::Create, None) => {
                    let mut m: BTreeMap<UserId, GroupRole> =
                        users.iter().map(|u| (*u, GroupRole::Member)).collect();
                    m.insert(user, GroupRole::Admin);
                    if m.len() > cap {
                        return refuse(
                            ErrorCode::GroupFull,
                            format!("{} members would pass the cap of {cap}", m.len()),
                        );
                    }
                    let members: Members = m.into_iter().collect();
                    let all: Vec<UserId> = members.iter().map(|(u, _)| *u).collect();
                    (members, all, Vec::new())
                }
                (_, None) => return refuse(ErrorCode::GroupUnknown, format!("no group {group}")),
                (GroupOp::List, Some(m)) => {
                    if role.is_none() {
                        return refuse(
                            ErrorCode::GroupForbidden,
                            format!("you are not a member of group {group}"),
                        );
                    }
                    return reply(ServerFrame::GroupOk {
                        request_id,
                        group,
                        members: m,
                    });
                }
                (GroupOp::Add | GroupOp::Remove, Some(_)) if role != Some(GroupRole::Admin) => {
                    return refuse(
                        ErrorCode::GroupForbidden,
                        format!("only an admin of group {group} changes its members"),
                    )
                }
                (GroupOp::Leave, Some(_)) if role.is_none() => {
                    return refuse(
                        ErrorCode::GroupForbidden,
                        format!("you are not a member of group {group}"),
                    )
                }
                (GroupOp::Add, Some(mut m)) => {
                    let mut added: Vec<UserId> = users
                        .iter()
                        .copied()
                        .filter(|u| role_of(&m, *u).is_none())
                        .collect();
                    added.sort_unstable();
                    added.dedup();
                    if m.len() + added.len() > cap {
                        return refuse(
                            ErrorCode::GroupFull,
                            format!(
                                "{} members would pass the cap of {cap}",
                                m.len() + added.len()
                            ),
                        );
                    }
                    m.extend(added.iter().map(|u| (*u, GroupRole::Member)));
                    m.sort_unstable();
                    (m, added, Vec::new())
                }
                (GroupOp::Remove | GroupOp::Leave, Some(mut m)) => {
                    let gone: Vec<UserId> = if op == GroupOp::Leave {
                        vec![user]
                    } else {
                        users
                            .iter()
                            .copied()
                            .filter(|u| role_of(&m, *u).is_some())
                            .collect()
                    };
                    m.retain(|(u, _)| !gone.contains(u));
                    // A group keeps an admin while it has members: the first by id takes over.
                    if !m.is_empty() && !m.iter().any(|(_, r)| *r == GroupRole::Admin) {
                        m[0].1 = GroupRole::Admin;
                    }
                    (m, gone.clone(), gone)
                }
            };
        // Members after the change hear of it, and so do those who left or were removed.
        recipients.extend(members.iter().map(|(u, _)| *u));
        // An emptied group stays in the cache as a tombstone (an empty list) until evicted:
        // until its delete commits, the store still has the old list.
        self.cache_group(group, members.clone());
        self.enqueue_op(
            Op::PutGroup { group, members },
            Completion::GroupOk {
                to: from,
                request_id,
                group,
            },
        );
        // Queued for the members now, down the same channels as the group's messages, so that
        // they see events and messages in the order this shard handled them.
        let event = Item::GroupEvent {
            group,
            ts_ms: now_ms(),
            op,
            actor: user,
            users: event_users,
        };
        self.fan_out(event, recipients, None);
    }
}
