//! The connection state machine: typed phases, no I/O, no clock (time is passed in).
//!
//! A connection goes `AwaitHello → AwaitLogin → Active` and ends in `Closed`. The runtime
//! feeds every decoded frame to [`Handshake::handle_frame`] and acts on the returned [`Step`];
//! once active, the per-device [`DeliveryWindow`] decides what may be delivered next.
//! Everything here is deterministic and unit-tested with synthetic time.

use crate::auth::{TokenError, TokenKeys};
use crate::ids::{owner_node, DeviceId, ServerMsgId, UserId};
use crate::proto::{
    ClientFrame, ErrorCode, ProtoError, ServerFrame, HELLO_MAGIC, PROTOCOL_VERSION,
};
use bytes::Bytes;
use std::collections::VecDeque;

/// Phase of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for HELLO.
    AwaitHello,
    /// HELLO accepted; waiting for LOGIN.
    AwaitLogin,
    /// Logged in.
    Active {
        /// Who.
        user: UserId,
        /// Which device.
        device: DeviceId,
    },
    /// A fatal error was sent; nothing more is read.
    Closed,
}

/// A request from a logged-in client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Send `body` to `recipient`.
    Send {
        /// Echoed in the answer.
        client_msg_id: u64,
        /// Recipient.
        recipient: UserId,
        /// Opaque body.
        body: Bytes,
    },
    /// Acknowledge deliveries and receipts.
    Ack {
        /// Ids.
        ids: Vec<ServerMsgId>,
    },
    /// Messages from `sender` were read.
    Read {
        /// Original sender.
        sender: UserId,
        /// Ids.
        ids: Vec<ServerMsgId>,
    },
    /// Follow (`true`) or stop following (`false`) these users' presence.
    Subscribe {
        /// Subscribe or unsubscribe.
        add: bool,
        /// Targets.
        users: Vec<UserId>,
    },
    /// Forward a typing indicator.
    Typing {
        /// Recipient.
        to: UserId,
        /// Composing or paused.
        state: crate::proto::TypingState,
    },
    /// Change the privacy setting.
    Privacy {
        /// Hide last-seen from followers.
        hide_last_seen: bool,
    },
    /// Block (`true`) or unblock (`false`) a user.
    Block {
        /// Block or unblock.
        block: bool,
        /// The other user.
        user: UserId,
    },
    /// A group membership request.
    Group {
        /// Echoed in the answer.
        request_id: u64,
        /// The group.
        group: u64,
        /// What to do.
        op: crate::proto::GroupOp,
        /// Users named.
        users: Vec<UserId>,
    },
    /// Group messages were read.
    GroupRead {
        /// The group.
        group: u64,
        /// The messages' group ids.
        ids: Vec<ServerMsgId>,
    },
    /// A message to a group.
    GroupSend {
        /// Echoed in the answer.
        client_msg_id: u64,
        /// The group.
        group: u64,
        /// Opaque body.
        body: Bytes,
    },
}

/// What the runtime must do after one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write this frame; keep reading.
    Reply(ServerFrame),
    /// Token verified: register the session on the user's owner shard (hand-over if another
    /// shard), which then sends LOGIN_OK.
    LoggedIn {
        /// Who.
        user: UserId,
        /// Which device.
        device: DeviceId,
    },
    /// Carry out a client request.
    Command(Command),
    /// Write this ERROR frame and close the connection.
    Fatal(ServerFrame),
}

/// Fixed parameters of the state machine (copied from config once per shard).
#[derive(Clone, Debug)]
pub struct SessionParams {
    /// Token keys.
    pub keys: TokenKeys,
    /// Largest frame accepted, announced in HELLO_OK.
    pub max_frame_bytes: usize,
    /// Idle timeout announced in HELLO_OK, ms.
    pub idle_timeout_ms: u64,
    /// Time allowed from accept to login, ms.
    pub login_timeout_ms: u64,
    /// This node's index among `nodes` (users of other nodes are refused).
    pub node_id: u32,
    /// Nodes side by side.
    pub nodes: u32,
}

/// The pre-login part of a connection plus its phase after login.
#[derive(Clone, Debug)]
pub struct Handshake {
    phase: Phase,
    accepted_at_ms: u64,
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> Step {
    Step::Fatal(ServerFrame::error(code, 0, message))
}

/// Maps a decoder error to the fatal step that reports it.
pub fn protocol_error(e: &ProtoError) -> Step {
    fatal(e.code(), e.to_string())
}

impl Handshake {
    /// A connection accepted at `now_ms` (ms since the Unix epoch).
    pub fn new(now_ms: u64) -> Handshake {
        Handshake {
            phase: Phase::AwaitHello,
            accepted_at_ms: now_ms,
        }
    }

    /// A connection that was already logged in on another shard (hand-over).
    pub fn active(user: UserId, device: DeviceId, now_ms: u64) -> Handshake {
        Handshake {
            phase: Phase::Active { user, device },
            accepted_at_ms: now_ms,
        }
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Marks the connection closed (after a fatal step or a go-away).
    pub fn close(&mut self) {
        self.phase = Phase::Closed;
    }

    /// If the login deadline passed at `now_ms`, the fatal step to take.
    pub fn check_login_timeout(&mut self, now_ms: u64, params: &SessionParams) -> Option<Step> {
        let waiting = matches!(self.phase, Phase::AwaitHello | Phase::AwaitLogin);
        if waiting && now_ms.saturating_sub(self.accepted_at_ms) >= params.login_timeout_ms {
            self.phase = Phase::Closed;
            return Some(fatal(
                ErrorCode::LoginTimeout,
                format!("no login within {} ms", params.login_timeout_ms),
            ));
        }
        None
    }

    /// Handles one frame. `now_ms` is wall-clock ms since the Unix epoch (token expiry).
    pub fn handle_frame(
        &mut self,
        frame_type: u8,
        payload: &[u8],
        now_ms: u64,
        params: &SessionParams,
    ) -> Step {
        let frame = match ClientFrame::decode(frame_type, payload) {
            Ok(f) => f,
            Err(e) => {
                self.phase = Phase::Closed;
                return protocol_error(&e);
            }
        };
        let step = self.handle(frame, now_ms, params);
        if matches!(step, Step::Fatal(_)) {
            self.phase = Phase::Closed;
        }
        step
    }

    fn handle(&mut self, frame: ClientFrame, now_ms: u64, params: &SessionParams) -> Step {
        match (self.phase, frame) {
            (Phase::Closed, _) => fatal(ErrorCode::UnexpectedFrame, "connection is closing"),
            (
                Phase::AwaitHello,
                ClientFrame::Hello {
                    magic,
                    min_version,
                    max_version,
                },
            ) => {
                if magic != HELLO_MAGIC {
                    return fatal(
                        ErrorCode::UnsupportedVersion,
                        "bad HELLO magic (want \"GHSE\")",
                    );
                }
                if !(min_version..=max_version).contains(&PROTOCOL_VERSION) {
                    return fatal(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "client speaks versions {min_version}..={max_version}; server speaks {PROTOCOL_VERSION}"
                        ),
                    );
                }
                self.phase = Phase::AwaitLogin;
                Step::Reply(ServerFrame::HelloOk {
                    version: PROTOCOL_VERSION,
                    max_frame_bytes: params.max_frame_bytes as u32,
                    idle_timeout_ms: params.idle_timeout_ms as u32,
                    server_time_ms: now_ms,
                })
            }
            (Phase::AwaitHello, other) => fatal(
                ErrorCode::UnexpectedFrame,
                format!(
                    "expected HELLO as the first frame, got {}",
                    frame_name(&other)
                ),
            ),
            (
                Phase::AwaitLogin,
                ClientFrame::Login {
                    user,
                    device,
                    token,
                },
            ) => {
                if user.0 == 0 {
                    return fatal(ErrorCode::BadToken, "user id 0 is reserved");
                }
                match params.keys.verify(&token, user, device, now_ms / 1000) {
                    Ok(()) if owner_node(user, params.nodes as usize) != params.node_id => {
                        let node = owner_node(user, params.nodes as usize);
                        Step::Fatal(ServerFrame::Error {
                            code: ErrorCode::WrongNode as u16,
                            fatal: true,
                            ref_id: 0,
                            message: format!(
                                "user {user} belongs to node {node} of {}, not node {}",
                                params.nodes, params.node_id
                            ),
                        })
                    }
                    Ok(()) => {
                        self.phase = Phase::Active { user, device };
                        Step::LoggedIn { user, device }
                    }
                    Err(e @ TokenError::Expired(_)) => {
                        fatal(ErrorCode::TokenExpired, e.to_string())
                    }
                    Err(e) => fatal(ErrorCode::BadToken, e.to_string()),
                }
            }
            (Phase::AwaitLogin, other) => fatal(
                ErrorCode::UnexpectedFrame,
                format!("expected LOGIN, got {}", frame_name(&other)),
            ),
            (Phase::Active { .. }, frame) => match frame {
                ClientFrame::Send {
                    client_msg_id,
                    recipient,
                    body,
                } => Step::Command(Command::Send {
                    client_msg_id,
                    recipient,
                    body,
                }),
                ClientFrame::Ack { ids } => Step::Command(Command::Ack { ids }),
                ClientFrame::Read { sender, ids } => Step::Command(Command::Read { sender, ids }),
                ClientFrame::Ping { nonce } => Step::Reply(ServerFrame::Pong { nonce }),
                ClientFrame::Subscribe { users } => {
                    Step::Command(Command::Subscribe { add: true, users })
                }
                ClientFrame::Unsubscribe { users } => {
                    Step::Command(Command::Subscribe { add: false, users })
                }
                ClientFrame::Typing { to, state } => Step::Command(Command::Typing { to, state }),
                ClientFrame::Privacy { hide_last_seen } => {
                    Step::Command(Command::Privacy { hide_last_seen })
                }
                ClientFrame::Block { user } => Step::Command(Command::Block { block: true, user }),
                ClientFrame::Unblock { user } => {
                    Step::Command(Command::Block { block: false, user })
                }
                ClientFrame::Group {
                    request_id,
                    group,
                    op,
                    users,
                } => Step::Command(Command::Group {
                    request_id,
                    group,
                    op,
                    users,
                }),
                ClientFrame::GroupRead { group, ids } => {
                    Step::Command(Command::GroupRead { group, ids })
                }
                ClientFrame::GroupSend {
                    client_msg_id,
                    group,
                    body,
                } => Step::Command(Command::GroupSend {
                    client_msg_id,
                    group,
                    body,
                }),
                other @ (ClientFrame::Hello { .. } | ClientFrame::Login { .. }) => fatal(
                    ErrorCode::UnexpectedFrame,
                    format!("{} after login", frame_name(&other)),
                ),
            },
        }
    }
}

fn frame_name(f: &ClientFrame) -> &'static str {
    match f {
        ClientFrame::Hello { .. } => "HELLO",
        ClientFrame::Login { .. } => "LOGIN",
        ClientFrame::Send { .. } => "SEND",
        ClientFrame::Ack { .. } => "ACK",
        ClientFrame::Read { .. } => "READ",
        ClientFrame::Ping { .. } => "PING",
        ClientFrame::Subscribe { .. } => "SUBSCRIBE",
        ClientFrame::Unsubscribe { .. } => "UNSUBSCRIBE",
        ClientFrame::Typing { .. } => "TYPING",
        ClientFrame::Privacy { .. } => "PRIVACY",
        ClientFrame::Block { .. } => "BLOCK",
        ClientFrame::Unblock { .. } => "UNBLOCK",
        ClientFrame::Group { .. } => "GROUP",
        ClientFrame::GroupSend { .. } => "GROUP_SEND",
        ClientFrame::GroupRead { .. } => "GROUP_READ",
    }
}

/// What the server remembers of one delivery until the device acknowledges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// The delivered item's id.
    pub id: ServerMsgId,
    /// For messages: the sender, who gets a delivered receipt on ACK. `None` for receipts.
    pub receipt_to: Option<UserId>,
    /// For group messages: the group and the message's group id, whose tally the ACK feeds.
    pub group: Option<(u64, ServerMsgId)>,
}

/// Per-device delivery state: which queue items are out and unacknowledged, how far the
/// device has been fed, and whether it has seen everything committed so far.
///
/// Invariant: every id in `in_flight` is ≤ `cursor`, and `in_flight.len() ≤ window`.
#[derive(Debug, Default)]
pub struct DeliveryWindow {
    /// In delivery order (ids increase). Devices ACK mostly in that order, so an ACK usually
    /// takes the front: a ring makes that O(1), where a `Vec` moved every later entry (48
    /// bytes each, up to the window) for each ACK.
    in_flight: VecDeque<InFlight>,
    cursor: Option<ServerMsgId>,
    caught_up: bool,
}

impl DeliveryWindow {
    /// Free slots under a window of `window`.
    pub fn room(&self, window: usize) -> usize {
        window.saturating_sub(self.in_flight.len())
    }

    /// Highest id delivered so far in this session.
    pub fn cursor(&self) -> Option<ServerMsgId> {
        self.cursor
    }

    /// Whether every committed item up to now has been handed to this device.
    pub fn caught_up(&self) -> bool {
        self.caught_up
    }

    /// Sets the caught-up flag (after a store read reached the end, or when an item could not
    /// be delivered live).
    pub fn set_caught_up(&mut self, v: bool) {
        self.caught_up = v;
    }

    /// Records a delivery. Ids must increase.
    pub fn delivered(&mut self, f: InFlight) {
        assert!(
            self.cursor.is_none_or(|c| f.id > c),
            "deliveries must be in id order"
        );
        self.cursor = Some(f.id);
        self.in_flight.push_back(f);
    }

    /// Moves the cursor past `id` without a delivery (the loss-check test hook drops it).
    pub fn skipped(&mut self, id: ServerMsgId) {
        assert!(
            self.cursor.is_none_or(|c| id > c),
            "deliveries must be in id order"
        );
        self.cursor = Some(id);
    }

    /// Removes an acknowledged id; `None` if it was not in flight.
    pub fn acked(&mut self, id: ServerMsgId) -> Option<InFlight> {
        // An in-order ACK is found first and removed from the front, moving nothing
        // (`VecDeque::remove` shifts the shorter side).
        let pos = self.in_flight.iter().position(|f| f.id == id)?;
        let f = self.in_flight.remove(pos);
        if self.in_flight.is_empty() {
            // Give back the allocation: idle sessions hold no buffers.
            self.in_flight = VecDeque::new();
        }
        f
    }

    /// Number of unacknowledged deliveries.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KEY_BYTES;
    use crate::proto::frame_type as t;
    use bytes::BytesMut;

    fn params() -> SessionParams {
        SessionParams {
            keys: TokenKeys::new([3; KEY_BYTES], None),
            max_frame_bytes: 4096,
            idle_timeout_ms: 60_000,
            login_timeout_ms: 1_000,
            node_id: 0,
            nodes: 1,
        }
    }

    fn feed(h: &mut Handshake, f: ClientFrame, now_ms: u64) -> Step {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        h.handle_frame(b[4], &b[5..], now_ms, &params())
    }

    fn hello() -> ClientFrame {
        ClientFrame::Hello {
            magic: HELLO_MAGIC,
            min_version: 1,
            max_version: 3,
        }
    }

    fn code(step: &Step) -> Option<ErrorCode> {
        match step {
            Step::Fatal(ServerFrame::Error {
                code, fatal: true, ..
            }) => ErrorCode::from_u16(*code),
            _ => None,
        }
    }

    #[test]
    fn happy_path_hello_login_commands() {
        let p = params();
        let mut h = Handshake::new(0);
        assert!(matches!(
            feed(&mut h, hello(), 5),
            Step::Reply(ServerFrame::HelloOk { version: 1, .. })
        ));
        let token = p.keys.mint(UserId(7), DeviceId(2), 100);
        let login = ClientFrame::Login {
            user: UserId(7),
            device: DeviceId(2),
            token: token.into(),
        };
        assert_eq!(
            feed(&mut h, login, 99_000),
            Step::LoggedIn {
                user: UserId(7),
                device: DeviceId(2)
            }
        );
        assert_eq!(
            feed(&mut h, ClientFrame::Ping { nonce: 4 }, 0),
            Step::Reply(ServerFrame::Pong { nonce: 4 })
        );
        let send = ClientFrame::Send {
            client_msg_id: 1,
            recipient: UserId(8),
            body: Bytes::from_static(b"x"),
        };
        assert!(matches!(
            feed(&mut h, send, 0),
            Step::Command(Command::Send {
                client_msg_id: 1,
                ..
            })
        ));
    }

    #[test]
    fn frames_out_of_phase_are_fatal() {
        let mut h = Handshake::new(0);
        let s = feed(&mut h, ClientFrame::Ping { nonce: 1 }, 0);
        assert_eq!(code(&s), Some(ErrorCode::UnexpectedFrame));
        assert_eq!(h.phase(), Phase::Closed);

        let mut h = Handshake::new(0);
        feed(&mut h, hello(), 0);
        let send = ClientFrame::Send {
            client_msg_id: 1,
            recipient: UserId(8),
            body: Bytes::new(),
        };
        assert_eq!(
            code(&feed(&mut h, send, 0)),
            Some(ErrorCode::UnexpectedFrame)
        );
    }

    #[test]
    fn bad_versions_and_tokens() {
        let mut h = Handshake::new(0);
        let s = feed(
            &mut h,
            ClientFrame::Hello {
                magic: *b"HTTP",
                min_version: 1,
                max_version: 1,
            },
            0,
        );
        assert_eq!(code(&s), Some(ErrorCode::UnsupportedVersion));
        let mut h = Handshake::new(0);
        let s = feed(
            &mut h,
            ClientFrame::Hello {
                magic: HELLO_MAGIC,
                min_version: 2,
                max_version: 9,
            },
            0,
        );
        assert_eq!(code(&s), Some(ErrorCode::UnsupportedVersion));

        let p = params();
        let expired = p.keys.mint(UserId(7), DeviceId(2), 10);
        let mut h = Handshake::new(0);
        feed(&mut h, hello(), 0);
        let s = feed(
            &mut h,
            ClientFrame::Login {
                user: UserId(7),
                device: DeviceId(2),
                token: expired.into(),
            },
            10_000,
        );
        assert_eq!(code(&s), Some(ErrorCode::TokenExpired));

        let other_user = p.keys.mint(UserId(8), DeviceId(2), 10);
        let mut h = Handshake::new(0);
        feed(&mut h, hello(), 0);
        let s = feed(
            &mut h,
            ClientFrame::Login {
                user: UserId(7),
                device: DeviceId(2),
                token: other_user.into(),
            },
            0,
        );
        assert_eq!(code(&s), Some(ErrorCode::BadToken));
    }

    #[test]
    fn malformed_frame_closes() {
        let mut h = Handshake::new(0);
        let s = h.handle_frame(t::HELLO, &[1, 2], 0, &params());
        assert_eq!(code(&s), Some(ErrorCode::MalformedFrame));
        assert_eq!(h.phase(), Phase::Closed);
    }

    #[test]
    fn login_timeout_uses_passed_time() {
        let p = params();
        let mut h = Handshake::new(1_000);
        assert_eq!(h.check_login_timeout(1_999, &p), None);
        assert_eq!(
            h.check_login_timeout(2_000, &p).as_ref().and_then(code),
            Some(ErrorCode::LoginTimeout)
        );
        let mut active = Handshake::active(UserId(1), DeviceId(1), 0);
        assert_eq!(active.check_login_timeout(u64::MAX, &p), None);
    }

    #[test]
    fn delivery_window_tracks_in_flight() {
        let mut w = DeliveryWindow::default();
        assert_eq!(w.room(2), 2);
        w.delivered(InFlight {
            id: ServerMsgId(5),
            receipt_to: Some(UserId(1)),
            group: None,
        });
        w.delivered(InFlight {
            id: ServerMsgId(9),
            receipt_to: None,
            group: None,
        });
        assert_eq!(w.room(2), 0);
        assert_eq!(w.cursor(), Some(ServerMsgId(9)));
        assert_eq!(w.acked(ServerMsgId(6)), None);
        assert_eq!(w.acked(ServerMsgId(5)).unwrap().receipt_to, Some(UserId(1)));
        assert_eq!(w.room(2), 1);
    }

    #[test]
    fn delivery_window_takes_acks_in_any_order() {
        let mut w = DeliveryWindow::default();
        for id in 1..=6 {
            w.delivered(InFlight {
                id: ServerMsgId(id),
                receipt_to: Some(UserId(id * 10)),
                group: None,
            });
        }
        // Front, middle, back, a repeat, then the rest.
        for (id, want) in [
            (1, true),
            (4, true),
            (6, true),
            (4, false),
            (2, true),
            (7, false),
        ] {
            let got = w.acked(ServerMsgId(id));
            assert_eq!(got.is_some(), want, "ACK of {id}");
            if let Some(f) = got {
                assert_eq!(
                    (f.id, f.receipt_to),
                    (ServerMsgId(id), Some(UserId(id * 10)))
                );
            }
        }
        assert_eq!(w.in_flight(), 2);
        assert_eq!(w.acked(ServerMsgId(5)).map(|f| f.id), Some(ServerMsgId(5)));
        assert_eq!(w.acked(ServerMsgId(3)).map(|f| f.id), Some(ServerMsgId(3)));
        assert_eq!((w.in_flight(), w.room(4)), (0, 4));
        assert_eq!(
            w.cursor(),
            Some(ServerMsgId(6)),
            "the cursor stays past what was sent"
        );
    }

    #[test]
    #[should_panic(expected = "id order")]
    fn delivery_window_rejects_out_of_order() {
        let mut w = DeliveryWindow::default();
        w.delivered(InFlight {
            id: ServerMsgId(5),
            receipt_to: None,
            group: None,
        });
        w.delivered(InFlight {
            id: ServerMsgId(4),
            receipt_to: None,
            group: None,
        });
    }
}
