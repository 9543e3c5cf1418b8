//! Presence, typing indicators and blocks, on the shard that owns each user.
//!
//! A user's presence lives on its owner shard: online while it has a session there, else
//! offline with the last-seen time kept in the shard's store (`Op::LastSeen`). A connection
//! follows users with SUBSCRIBE; the subscription is recorded twice, on the connection (its
//! list, bounded by `limits.presence_subscriptions_max`, for cleanup when it closes) and on
//! each target's owner shard (its followers, bounded by `limits.presence_subscribers_max`).
//! The target's shard answers with the current state at once and with every change after;
//! it sends **one envelope per destination shard** per change, whatever the number of
//! followers there, and the destination shard writes the PRESENCE frames.
//!
//! Blocks live on the blocker's owner shard (`Op::Block`), which is also where messages,
//! typing indicators and presence requests for the blocker arrive: a blocked user's SEND is
//! refused with ERROR(blocked), its typing indicators are dropped, and it sees the blocker as
//! offline with no last-seen time. Only users listed in `Shard::blockers` are looked up in the
//! store, so routing pays nothing for users who block no one.
//!
//! Must never: store a typing indicator, send one envelope per follower across shards, or
//! keep a closed connection among a target's followers.

use std::collections::HashMap;
use std::rc::Rc;

use super::{bump, Completion, ConnRef, Envelope, Shard};
use crate::ids::{owner_node, owner_shard, ShardId, UserId};
use crate::proto::{ErrorCode, ServerFrame, TypingState};
use crate::runtime::conn::Conn;
use crate::runtime::mono_ms;
use crate::session::Phase;
use crate::store::Op;

/// The connections following one user, with their users (for block checks).
pub(super) type Followers = smallvec::SmallVec<[(ConnRef, UserId); 2]>;

/// One follower's view of one user, carried to the follower's shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceNote {
    /// The following connection.
    pub to: ConnRef,
    /// The followed user.
    pub user: UserId,
    /// Online now.
    pub online: bool,
    /// Last seen (0: online, never seen, hidden, or blocked).
    pub last_seen_ms: u64,
}

impl Shard {
    /// Routes one envelope per owner shard of `users` (grouped), built by `make`.
    pub(super) fn route_by_owner(
        &self,
        users: Vec<UserId>,
        make: impl Fn(Vec<UserId>) -> Envelope,
    ) {
        let mut by_shard: HashMap<ShardId, Vec<UserId>> = HashMap::new();
        for u in users {
            by_shard
                .entry(owner_shard(u, self.shards))
                .or_default()
                .push(u);
        }
        for (shard, group) in by_shard {
            self.route(shard, make(group));
        }
    }

    /// Whether `blocker` blocks `blocked` (a store read only for users who block anyone).
    pub(super) fn is_blocked(&self, blocker: UserId, blocked: UserId) -> bool {
        if !self.blockers.borrow().contains(&blocker) {
            return false;
        }
        self.store
            .is_blocked(blocker, blocked)
            .unwrap_or_else(|e| {
                tracing::warn!(shard = self.id.0, error = %e, "block lookup failed; treating as not blocked");
                false
            })
    }

    /// Validates the users of a presence or typing request: non-zero and of this node.
    fn check_targets(&self, conn: &Conn, users: &[UserId], ref_id: u64) -> bool {
        if users.iter().any(|u| u.0 == 0) {
            conn.push_frame(&ServerFrame::error(
                ErrorCode::BadRecipient,
                ref_id,
                "user 0 is not a user",
            ));
            return false;
        }
        let nodes = self.params.nodes as usize;
        if let Some(u) = users
            .iter()
            .find(|u| owner_node(**u, nodes) != self.params.node_id)
        {
            let why = format!(
                "user {u} belongs to node {}; cross-node presence is not supported yet",
                owner_node(*u, nodes)
            );
            conn.push_frame(&ServerFrame::error(ErrorCode::WrongNode, ref_id, why));
            return false;
        }
        true
    }

    /// SUBSCRIBE / UNSUBSCRIBE on the follower's connection.
    pub(super) fn subscribe(
        &self,
        slot: u32,
        conn: &Rc<Conn>,
        user: UserId,
        add: bool,
        users: Vec<UserId>,
    ) {
        if add && !self.check_targets(conn, &users, 0) {
            return;
        }
        let max = self.cfg.presence_subscriptions_max;
        let changed = match conn.update_subs(add, &users, max, self.typing_burst()) {
            Ok(c) => c,
            Err(total) => {
                bump(&self.stats.presence_refused, 1);
                conn.push_frame(&ServerFrame::error(
                    ErrorCode::PresenceLimit,
                    0,
                    format!("{total} subscriptions would pass the limit of {max} per connection; none added"),
                ));
                return;
            }
        };
        if changed.is_empty() {
            return;
        }
        let me = ConnRef {
            shard: self.id,
            slot,
            gen: conn.gen,
        };
        if add {
            self.route_by_owner(changed, |targets| Envelope::Subscribe {
                sub: me,
                subscriber: user,
                targets,
            });
        } else {
            self.route_by_owner(changed, |targets| Envelope::Unsubscribe {
                sub: me,
                targets,
            });
        }
    }

    fn typing_burst(&self) -> u32 {
        self.cfg.typing_rate_per_s.saturating_mul(2)
    }

    /// TYPING on the sender's connection: rate-limited, then to the recipient's owner shard.
    pub(super) fn typing(&self, conn: &Conn, user: UserId, to: UserId, state: TypingState) {
        if !self.check_targets(conn, &[to], to.0) {
            return;
        }
        let rate = self.cfg.typing_rate_per_s;
        if !conn.charge_typing(mono_ms(), rate, self.typing_burst()) {
            // Ephemeral and best-effort: over the limit it is dropped, not answered.
            bump(&self.stats.typing_dropped, 1);
            return;
        }
        self.route(
            owner_shard(to, self.shards),
            Envelope::Typing {
                from: user,
                to,
                state,
            },
        );
    }

    /// BLOCK / UNBLOCK on the blocker's connection (its owner shard).
    pub(super) fn block(&self, conn: &Conn, user: UserId, other: UserId, on: bool) {
        if !self.check_targets(conn, &[other], other.0) {
            return;
        }
        if other == user {
            conn.push_frame(&ServerFrame::error(
                ErrorCode::BadRecipient,
                other.0,
                "a user cannot block itself",
            ));
            return;
        }
        if on {
            // Listed at once, so lookups start with the next message; the store answers them
            // once the block commits (the next group commit, milliseconds).
            self.blockers.borrow_mut().insert(user);
        }
        self.enqueue_op(
            Op::Block {
                blocker: user,
                blocked: other,
                on,
            },
            Completion::None,
        );
    }

    /// What `subscriber` (connection `to`) may see of `target`, owned by this shard.
    fn note_for(&self, to: ConnRef, subscriber: UserId, target: UserId) -> PresenceNote {
        let hidden = PresenceNote {
            to,
            user: target,
            online: false,
            last_seen_ms: 0,
        };
        if self.is_blocked(target, subscriber) {
            return hidden;
        }
        if self.sessions.borrow().contains_key(&target) {
            return PresenceNote {
                online: true,
                ..hidden
            };
        }
        match self.store.presence(target) {
            Ok(r) if !r.hide_last_seen => PresenceNote {
                last_seen_ms: r.last_seen_ms,
                ..hidden
            },
            Ok(_) => hidden,
            Err(e) => {
                tracing::warn!(shard = self.id.0, error = %e, "presence read failed");
                hidden
            }
        }
    }

    /// `user` (of this shard) came online or went offline: one envelope per shard that has
    /// followers of it.
    pub(super) fn presence_changed(&self, user: UserId, online: bool, last_seen_ms: u64) {
        let Some(followers) = self.watchers.borrow().get(&user).cloned() else {
            return;
        };
        let hide = !online
            && self
                .store
                .presence(user)
                .map(|r| r.hide_last_seen)
                .unwrap_or(true);
        let mut by_shard: HashMap<ShardId, Vec<PresenceNote>> = HashMap::new();
        for (to, subscriber) in followers {
            let visible = !self.is_blocked(user, subscriber);
            by_shard.entry(to.shard).or_default().push(PresenceNote {
                to,
                user,
                online: online && visible,
                last_seen_ms: if visible && !hide { last_seen_ms } else { 0 },
            });
        }
        for (shard, notes) in by_shard {
            self.route(shard, Envelope::Presence { notes });
        }
    }

    /// The presence and typing envelopes.
    pub(super) fn handle_presence_envelope(&self, env: Envelope) {
        match env {
            Envelope::Subscribe {
                sub,
                subscriber,
                targets,
            } => {
                let max = self.cfg.presence_subscribers_max;
                let mut accepted = Vec::with_capacity(targets.len());
                let mut refused = Vec::new();
                {
                    let mut w = self.watchers.borrow_mut();
                    for t in targets {
                        let list = w.entry(t).or_default();
                        if list.iter().any(|(r, _)| *r == sub) {
                            accepted.push(t);
                        } else if list.len() >= max {
                            refused.push(t);
                        } else {
                            list.push((sub, subscriber));
                            accepted.push(t);
                        }
                    }
                }
                let notes: Vec<PresenceNote> = accepted
                    .into_iter()
                    .map(|t| self.note_for(sub, subscriber, t))
                    .collect();
                if !notes.is_empty() {
                    self.route(sub.shard, Envelope::Presence { notes });
                }
                if !refused.is_empty() {
                    bump(&self.stats.presence_refused, refused.len() as u64);
                    self.route(
                        sub.shard,
                        Envelope::PresenceRefused {
                            to: sub,
                            targets: refused,
                        },
                    );
                }
            }
            Envelope::Unsubscribe { sub, targets } => {
                let mut w = self.watchers.borrow_mut();
                for t in targets {
                    if let Some(list) = w.get_mut(&t) {
                        list.retain(|(r, _)| *r != sub);
                        if list.is_empty() {
                            w.remove(&t);
                        }
                    }
                }
            }
            Envelope::Presence { notes } => {
                for n in notes {
                    // A connection that closed meanwhile misses it (its subscriptions are
                    // being removed by its own close).
                    if let Some(c) = self.conn_by_ref(n.to) {
                        bump(&self.stats.presence_sent, 1);
                        c.push_frame(&ServerFrame::Presence {
                            user: n.user,
                            online: n.online,
                            last_seen_ms: n.last_seen_ms,
                        });
                    }
                }
            }
            Envelope::PresenceRefused { to, targets } => {
                let Some(c) = self.conn_by_ref(to) else {
                    return;
                };
                let max = self.cfg.presence_subscribers_max;
                c.update_subs(false, &targets, usize::MAX, self.typing_burst())
                    .expect("removing never fails");
                // A later SUBSCRIBE for the same users may have been accepted meanwhile: undo
                // it on their shards too, so that no follower entry outlives this list.
                self.route_by_owner(targets.clone(), |t| Envelope::Unsubscribe {
                    sub: to,
                    targets: t,
                });
                for t in targets {
                    c.push_frame(&ServerFrame::error(
                        ErrorCode::PresenceLimit,
                        t.0,
                        format!("user {t} has the maximum of {max} followers; not subscribed"),
                    ));
                }
            }
            Envelope::Typing { from, to, state } => {
                if self.is_blocked(to, from) {
                    bump(&self.stats.typing_dropped, 1);
                    return;
                }
                let slots: Vec<u32> = self
                    .sessions
                    .borrow()
                    .get(&to)
                    .map(|l| l.to_vec())
                    .unwrap_or_default();
                if slots.is_empty() {
                    bump(&self.stats.typing_dropped, 1);
                    return;
                }
                for s in slots {
                    if let Some(c) = self.conn_at(s) {
                        if matches!(c.phase(), Phase::Active { .. }) {
                            bump(&self.stats.typing_forwarded, 1);
                            c.push_frame(&ServerFrame::Typing { from, state });
                        }
                    }
                }
            }
            other => unreachable!("not a presence envelope: {other:?}"),
        }
    }

    /// Presence subscriptions held on this shard's users (all targets together).
    pub(super) fn presence_watchers(&self) -> u64 {
        self.watchers
            .borrow()
            .values()
            .map(|l| l.len() as u64)
            .sum()
    }
}
