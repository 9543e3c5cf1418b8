//! Frame layouts, encoding and decoding.
//!
//! Every frame on the wire is `len: u32 BE` followed by `len` bytes: a type byte and the
//! payload. Integers are big-endian. Variable-length fields come last or carry a length.

use bytes::{BufMut, Bytes, BytesMut};

use super::{ErrorCode, GoAwayReason, ProtoError};
use crate::ids::{DeviceId, ServerMsgId, UserId};
use crate::limits::{ACK_IDS_MAX, FRAME_HEADER_BYTES, REASON_BYTES_MAX, TOKEN_BYTES_MAX};

/// Frame type bytes. Client-to-server types have the high bit clear, server-to-client set.
pub mod frame_type {
    /// Client: version handshake.
    pub const HELLO: u8 = 0x01;
    /// Client: authenticate.
    pub const LOGIN: u8 = 0x02;
    /// Client: send a message to a user.
    pub const SEND: u8 = 0x03;
    /// Client: acknowledge deliveries and receipts.
    pub const ACK: u8 = 0x04;
    /// Client: mark messages from one sender as read.
    pub const READ: u8 = 0x05;
    /// Client: keepalive.
    pub const PING: u8 = 0x06;
    /// Client: follow the presence of these users.
    pub const SUBSCRIBE: u8 = 0x07;
    /// Client: stop following the presence of these users.
    pub const UNSUBSCRIBE: u8 = 0x08;
    /// Client: a typing indicator (chat state) for one user.
    pub const TYPING: u8 = 0x09;
    /// Client: privacy settings (hide last-seen).
    pub const PRIVACY: u8 = 0x0A;
    /// Client: block a user.
    pub const BLOCK: u8 = 0x0B;
    /// Client: unblock a user.
    pub const UNBLOCK: u8 = 0x0C;
    /// Client: a membership request (create, add, remove, leave, list) for a group.
    pub const GROUP: u8 = 0x0D;
    /// Client: send a message to a group.
    pub const GROUP_SEND: u8 = 0x0E;
    /// Client: mark group messages as read.
    pub const GROUP_READ: u8 = 0x0F;
    /// Server: handshake accepted.
    pub const HELLO_OK: u8 = 0x81;
    /// Server: login accepted.
    pub const LOGIN_OK: u8 = 0x82;
    /// Server: message accepted (durably stored).
    pub const SEND_ACK: u8 = 0x83;
    /// Server: a message for this user.
    pub const DELIVER: u8 = 0x84;
    /// Server: a delivered or read receipt for a message this user sent.
    pub const RECEIPT: u8 = 0x85;
    /// Server: keepalive answer.
    pub const PONG: u8 = 0x86;
    /// Server: the session ends, with a reason.
    pub const GO_AWAY: u8 = 0x87;
    /// Server: an error, with a code.
    pub const ERROR: u8 = 0x88;
    /// Server: a followed user's presence (online, or offline with last-seen).
    pub const PRESENCE: u8 = 0x89;
    /// Server: a typing indicator from another user.
    pub const TYPING_FROM: u8 = 0x8A;
    /// Server: a group request succeeded (with the member list for LIST).
    pub const GROUP_OK: u8 = 0x8B;
    /// Server: a group message for this user.
    pub const GROUP_DELIVER: u8 = 0x8C;
    /// Server: a membership change in a group this user is (or was) in.
    pub const GROUP_EVENT: u8 = 0x8D;
    /// Server: how many members have received and read a group message this user sent.
    pub const GROUP_RECEIPT: u8 = 0x8E;
}

/// What a GROUP frame asks, and what a GROUP_EVENT reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GroupOp {
    /// Create the group with the sender as its admin and the listed users as members.
    Create = 1,
    /// Add the listed users (admins only).
    Add = 2,
    /// Remove the listed users (admins only).
    Remove = 3,
    /// Leave the group (no users listed).
    Leave = 4,
    /// List the members (no users listed; members only).
    List = 5,
}

impl GroupOp {
    /// Decodes a wire value.
    pub fn from_u8(v: u8) -> Option<GroupOp> {
        match v {
            1 => Some(GroupOp::Create),
            2 => Some(GroupOp::Add),
            3 => Some(GroupOp::Remove),
            4 => Some(GroupOp::Leave),
            5 => Some(GroupOp::List),
            _ => None,
        }
    }
}

/// A member's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum GroupRole {
    /// Can change membership.
    Admin = 1,
    /// Sends and receives.
    Member = 2,
}

impl GroupRole {
    /// Decodes a wire value.
    pub fn from_u8(v: u8) -> Option<GroupRole> {
        match v {
            1 => Some(GroupRole::Admin),
            2 => Some(GroupRole::Member),
            _ => None,
        }
    }
}

/// A typing indicator's state (chat state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TypingState {
    /// Stopped typing (or paused).
    Paused = 0,
    /// Typing now.
    Composing = 1,
}

impl TypingState {
    /// Decodes a wire value.
    pub fn from_u8(v: u8) -> Option<TypingState> {
        match v {
            0 => Some(TypingState::Paused),
            1 => Some(TypingState::Composing),
            _ => None,
        }
    }
}

/// Kind of a receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReceiptKind {
    /// A device of the recipient acknowledged the message.
    Delivered = 1,
    /// The recipient marked the message as read.
    Read = 2,
}

impl ReceiptKind {
    /// Decodes a wire value.
    pub fn from_u8(v: u8) -> Option<ReceiptKind> {
        match v {
            1 => Some(ReceiptKind::Delivered),
            2 => Some(ReceiptKind::Read),
            _ => None,
        }
    }
}

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// `magic[4] min_version:u16 max_version:u16`
    Hello {
        /// Must be [`super::HELLO_MAGIC`].
        magic: [u8; 4],
        /// Lowest version the client speaks.
        min_version: u16,
        /// Highest version the client speaks.
        max_version: u16,
    },
    /// `user:u64 device:u32 token_len:u16 token[token_len]`
    Login {
        /// Who logs in.
        user: UserId,
        /// From which device.
        device: DeviceId,
        /// Token minted by `gatehouse token` (or the operator's auth service).
        token: Bytes,
    },
    /// `client_msg_id:u64 recipient:u64 body[..]`
    Send {
        /// Client-chosen id echoed in SEND_ACK or ERROR.
        client_msg_id: u64,
        /// Recipient user.
        recipient: UserId,
        /// Opaque (end-to-end encrypted) body.
        body: Bytes,
    },
    /// `count:u16 ids[count]:u64`
    Ack {
        /// Server ids of deliveries and receipts the device has durably received.
        ids: Vec<ServerMsgId>,
    },
    /// `sender:u64 count:u16 ids[count]:u64`
    Read {
        /// The user who sent the messages.
        sender: UserId,
        /// Server ids of the messages now read.
        ids: Vec<ServerMsgId>,
    },
    /// `nonce:u64`
    Ping {
        /// Echoed in PONG.
        nonce: u64,
    },
    /// `count:u16 users[count]:u64`
    Subscribe {
        /// Users whose presence to follow (1..=1024).
        users: Vec<UserId>,
    },
    /// `count:u16 users[count]:u64`
    Unsubscribe {
        /// Users to stop following (1..=1024).
        users: Vec<UserId>,
    },
    /// `to:u64 state:u8`
    Typing {
        /// Who sees the indicator.
        to: UserId,
        /// Composing or paused.
        state: TypingState,
    },
    /// `hide_last_seen:u8` (0 or 1)
    Privacy {
        /// Followers see "offline" without a last-seen time.
        hide_last_seen: bool,
    },
    /// `user:u64`
    Block {
        /// The user to block.
        user: UserId,
    },
    /// `user:u64`
    Unblock {
        /// The user to unblock.
        user: UserId,
    },
    /// `request_id:u64 group:u64 op:u8 count:u16 users[count]:u64` (count may be 0)
    Group {
        /// Echoed in GROUP_OK or ERROR.
        request_id: u64,
        /// The group (non-zero).
        group: u64,
        /// What to do.
        op: GroupOp,
        /// Users it names (create, add, remove); empty for leave and list.
        users: Vec<UserId>,
    },
    /// `client_msg_id:u64 group:u64 body[..]`
    GroupSend {
        /// Echoed in SEND_ACK or ERROR.
        client_msg_id: u64,
        /// The group.
        group: u64,
        /// Opaque body.
        body: Bytes,
    },
    /// `group:u64 count:u16 group_msg_ids[count]:u64`
    GroupRead {
        /// The group.
        group: u64,
        /// The messages' group ids (`group_msg_id` of GROUP_DELIVER), 1..=1024.
        ids: Vec<ServerMsgId>,
    },
}

/// Frames the server sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    /// `version:u16 max_frame_bytes:u32 idle_timeout_ms:u32 server_time_ms:u64`
    HelloOk {
        /// Chosen version.
        version: u16,
        /// Largest frame (type + payload) the server accepts.
        max_frame_bytes: u32,
        /// The client must send something (PING) at least this often once logged in.
        idle_timeout_ms: u32,
        /// Server clock, milliseconds since the Unix epoch.
        server_time_ms: u64,
    },
    /// `user:u64 device:u32`
    LoginOk {
        /// Logged-in user.
        user: UserId,
        /// Logged-in device.
        device: DeviceId,
    },
    /// `client_msg_id:u64 server_msg_id:u64 server_ts_ms:u64`
    SendAck {
        /// From the SEND.
        client_msg_id: u64,
        /// Id under which the recipient will see the message.
        server_msg_id: ServerMsgId,
        /// When the server accepted it (ms since the Unix epoch).
        server_ts_ms: u64,
    },
    /// `server_msg_id:u64 sender:u64 sender_device:u32 server_ts_ms:u64 body[..]`
    Deliver {
        /// Id to ACK.
        server_msg_id: ServerMsgId,
        /// Who sent it.
        sender: UserId,
        /// From which device.
        sender_device: DeviceId,
        /// When the server accepted it.
        server_ts_ms: u64,
        /// Opaque body.
        body: Bytes,
    },
    /// `receipt_id:u64 kind:u8 from:u64 server_msg_id:u64 ts_ms:u64`
    Receipt {
        /// Id of this receipt, to ACK like a delivery.
        receipt_id: ServerMsgId,
        /// Delivered or read.
        kind: ReceiptKind,
        /// The recipient of the original message.
        from: UserId,
        /// The original message's server id (from SEND_ACK).
        server_msg_id: ServerMsgId,
        /// When the recipient's device acknowledged or read it.
        ts_ms: u64,
    },
    /// `nonce:u64`
    Pong {
        /// From the PING.
        nonce: u64,
    },
    /// `reason:u8 message[..]` (UTF-8)
    GoAway {
        /// Why.
        reason: GoAwayReason,
        /// Human-readable detail.
        message: String,
    },
    /// `user:u64 online:u8 last_seen_ms:u64`
    Presence {
        /// The followed user.
        user: UserId,
        /// Logged in on at least one device.
        online: bool,
        /// When offline: when the user was last online (ms since the Unix epoch); 0 when
        /// online, never seen, or hidden by the user's privacy setting.
        last_seen_ms: u64,
    },
    /// `from:u64 state:u8`
    Typing {
        /// Who is typing.
        from: UserId,
        /// Composing or paused.
        state: TypingState,
    },
    /// `request_id:u64 group:u64 count:u16 (user:u64 role:u8)[count]` (members for LIST only)
    GroupOk {
        /// From the GROUP request.
        request_id: u64,
        /// The group.
        group: u64,
        /// LIST: every member with its role; empty otherwise.
        members: Vec<(UserId, GroupRole)>,
    },
    /// `server_msg_id:u64 group:u64 group_msg_id:u64 sender:u64 sender_device:u32
    /// server_ts_ms:u64 body[..]`
    GroupDeliver {
        /// Id to ACK (this member's queue id).
        server_msg_id: ServerMsgId,
        /// The group.
        group: u64,
        /// The message's id in the group (the sender's SEND_ACK id; GROUP_READ names it).
        group_msg_id: ServerMsgId,
        /// Who sent it.
        sender: UserId,
        /// From which device.
        sender_device: DeviceId,
        /// When the group's shard accepted it.
        server_ts_ms: u64,
        /// Opaque body.
        body: Bytes,
    },
    /// `server_msg_id:u64 group:u64 ts_ms:u64 op:u8 actor:u64 count:u16 users[count]:u64`
    GroupEvent {
        /// Id to ACK.
        server_msg_id: ServerMsgId,
        /// The group.
        group: u64,
        /// When the change was made.
        ts_ms: u64,
        /// Create, add, remove or leave.
        op: GroupOp,
        /// Who made it.
        actor: UserId,
        /// Who it concerns (every member for create).
        users: Vec<UserId>,
    },
    /// `receipt_id:u64 group:u64 group_msg_id:u64 members:u16 delivered:u16 read:u16 ts_ms:u64`
    GroupReceipt {
        /// Id to ACK.
        receipt_id: ServerMsgId,
        /// The group.
        group: u64,
        /// The message (its SEND_ACK id).
        group_msg_id: ServerMsgId,
        /// Members it was sent to.
        members: u16,
        /// Members whose device acknowledged it.
        delivered: u16,
        /// Members who marked it read.
        read: u16,
        /// When the latest of those happened.
        ts_ms: u64,
    },
    /// `code:u16 fatal:u8 ref_id:u64 message[..]` (UTF-8)
    Error {
        /// Raw code (see [`ErrorCode`]); kept raw so a client survives codes added later.
        code: u16,
        /// The server closes the connection after a fatal error.
        fatal: bool,
        /// What it refers to: a client_msg_id, an acked id, or 0.
        ref_id: u64,
        /// Human-readable detail naming the problem.
        message: String,
    },
}

/// Result of looking for one frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// Type byte.
    pub frame_type: u8,
    /// Payload after the type byte.
    pub payload: &'a [u8],
    /// Bytes of `buf` the frame occupies, length prefix included.
    pub total_bytes: usize,
}

/// Splits the first frame off `buf`. `Ok(None)` means more bytes are needed; an error means
/// the stream cannot continue. `frame_bytes_max` bounds the length prefix (type + payload).
pub fn split_frame(buf: &[u8], frame_bytes_max: usize) -> Result<Option<RawFrame<'_>>, ProtoError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    if len > frame_bytes_max {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: frame_bytes_max,
        });
    }
    let total = FRAME_HEADER_BYTES + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(RawFrame {
        frame_type: buf[4],
        payload: &buf[5..total],
        total_bytes: total,
    }))
}

/// Bounds-checked reader over a payload; every `take` names the frame for error messages.
struct Fields<'a> {
    rest: &'a [u8],
    frame: &'static str,
}

impl<'a> Fields<'a> {
    fn new(payload: &'a [u8], frame: &'static str) -> Self {
        Fields {
            rest: payload,
            frame,
        }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.rest.len() < n {
            return Err(ProtoError::Malformed {
                frame: self.frame,
                why: "truncated field",
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed {
                frame: self.frame,
                why: "trailing bytes",
            })
        }
    }
    /// `count:u16 users[count]:u64` to the end of the frame; the count may be 0.
    fn user_list(&mut self) -> Result<Vec<UserId>, ProtoError> {
        let count = usize::from(self.u16()?);
        if count > ACK_IDS_MAX {
            return Err(ProtoError::Malformed {
                frame: self.frame,
                why: "too many users",
            });
        }
        if self.rest.len() != count * 8 {
            return Err(ProtoError::Malformed {
                frame: self.frame,
                why: "user count does not match frame length",
            });
        }
        (0..count).map(|_| self.u64().map(UserId)).collect()
    }
    fn users(&mut self) -> Result<Vec<UserId>, ProtoError> {
        Ok(self.ids()?.into_iter().map(|id| UserId(id.0)).collect())
    }
    fn ids(&mut self) -> Result<Vec<ServerMsgId>, ProtoError> {
        let count = usize::from(self.u16()?);
        if count == 0 {
            return Err(ProtoError::Malformed {
                frame: self.frame,
                why: "empty id list",
            });
        }
        if count > ACK_IDS_MAX {
            return Err(ProtoError::Malformed {
                frame: self.frame,
                why: "too many ids",
            });
        }
        if self.rest.len() != count * 8 {
            return Err(ProtoError::Malformed {
                frame: self.frame,
                why: "id count does not match frame length",
            });
        }
        (0..count).map(|_| self.u64().map(ServerMsgId)).collect()
    }
    /// Reason text: lossy UTF-8, cut to `REASON_BYTES_MAX` like the encoder does, so that a
    /// decoded frame encodes back to itself (found by the `frame_decoder` fuzz target: invalid
    /// bytes grow into 3-byte U+FFFD and passed the limit).
    fn text(&mut self) -> String {
        truncate_utf8(&String::from_utf8_lossy(self.rest()), REASON_BYTES_MAX).to_string()
    }
}

impl ClientFrame {
    /// Decodes a client frame from its type byte and payload.
    pub fn decode(frame_type: u8, payload: &[u8]) -> Result<ClientFrame, ProtoError> {
        use self::frame_type as t;
        let frame = match frame_type {
            t::HELLO => {
                let mut f = Fields::new(payload, "HELLO");
                let mut magic = [0u8; 4];
                magic.copy_from_slice(f.bytes(4)?);
                let frame = ClientFrame::Hello {
                    magic,
                    min_version: f.u16()?,
                    max_version: f.u16()?,
                };
                f.end()?;
                frame
            }
            t::LOGIN => {
                let mut f = Fields::new(payload, "LOGIN");
                let user = UserId(f.u64()?);
                let device = DeviceId(f.u32()?);
                let token_len = usize::from(f.u16()?);
                if token_len > TOKEN_BYTES_MAX {
                    return Err(ProtoError::Malformed {
                        frame: "LOGIN",
                        why: "token too long",
                    });
                }
                let token = Bytes::copy_from_slice(f.bytes(token_len)?);
                f.end()?;
                ClientFrame::Login {
                    user,
                    device,
                    token,
                }
            }
            t::SEND => {
                let mut f = Fields::new(payload, "SEND");
                let client_msg_id = f.u64()?;
                let recipient = UserId(f.u64()?);
                let body = Bytes::copy_from_slice(f.rest());
                ClientFrame::Send {
                    client_msg_id,
                    recipient,
                    body,
                }
            }
            t::ACK => ClientFrame::Ack {
                ids: Fields::new(payload, "ACK").ids()?,
            },
            t::READ => {
                let mut f = Fields::new(payload, "READ");
                let sender = UserId(f.u64()?);
                ClientFrame::Read {
                    sender,
                    ids: f.ids()?,
                }
            }
            t::PING => {
                let mut f = Fields::new(payload, "PING");
                let nonce = f.u64()?;
                f.end()?;
                ClientFrame::Ping { nonce }
            }
            t::SUBSCRIBE => ClientFrame::Subscribe {
                users: Fields::new(payload, "SUBSCRIBE").users()?,
            },
            t::UNSUBSCRIBE => ClientFrame::Unsubscribe {
                users: Fields::new(payload, "UNSUBSCRIBE").users()?,
            },
            t::TYPING => {
                let mut f = Fields::new(payload, "TYPING");
                let to = UserId(f.u64()?);
                let state = TypingState::from_u8(f.u8()?).ok_or(ProtoError::Malformed {
                    frame: "TYPING",
                    why: "unknown typing state",
                })?;
                f.end()?;
                ClientFrame::Typing { to, state }
            }
            t::PRIVACY => {
                let mut f = Fields::new(payload, "PRIVACY");
                let hide_last_seen = match f.u8()? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(ProtoError::Malformed {
                            frame: "PRIVACY",
                            why: "hide_last_seen must be 0 or 1",
                        })
                    }
                };
                f.end()?;
                ClientFrame::Privacy { hide_last_seen }
            }
            t::GROUP => {
                let mut f = Fields::new(payload, "GROUP");
                let request_id = f.u64()?;
                let group = f.u64()?;
                let op = GroupOp::from_u8(f.u8()?).ok_or(ProtoError::Malformed {
                    frame: "GROUP",
                    why: "unknown group operation",
                })?;
                let users = f.user_list()?;
                ClientFrame::Group {
                    request_id,
                    group,
                    op,
                    users,
                }
            }
            t::GROUP_SEND => {
                let mut f = Fields::new(payload, "GROUP_SEND");
                let client_msg_id = f.u64()?;
                let group = f.u64()?;
                ClientFrame::GroupSend {
                    client_msg_id,
                    group,
                    body: Bytes::copy_from_slice(f.rest()),
                }
            }
            t::GROUP_READ => {
                let mut f = Fields::new(payload, "GROUP_READ");
                let group = f.u64()?;
                ClientFrame::GroupRead {
                    group,
                    ids: f.ids()?,
                }
            }
            t::BLOCK | t::UNBLOCK => {
                let name = if frame_type == t::BLOCK {
                    "BLOCK"
                } else {
                    "UNBLOCK"
                };
                let mut f = Fields::new(payload, name);
                let user = UserId(f.u64()?);
                f.end()?;
                if frame_type == t::BLOCK {
                    ClientFrame::Block { user }
                } else {
                    ClientFrame::Unblock { user }
                }
            }
            other => return Err(ProtoError::UnknownType(other)),
        };
        Ok(frame)
    }

    /// Appends the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        use self::frame_type as t;
        let start = begin_frame(out);
        match self {
            ClientFrame::Hello {
                magic,
                min_version,
                max_version,
            } => {
                out.put_u8(t::HELLO);
                out.put_slice(magic);
                out.put_u16(*min_version);
                out.put_u16(*max_version);
            }
            ClientFrame::Login {
                user,
                device,
                token,
            } => {
                out.put_u8(t::LOGIN);
                out.put_u64(user.0);
                out.put_u32(device.0);
                out.put_u16(token.len() as u16);
                out.put_slice(token);
            }
            ClientFrame::Send {
                client_msg_id,
                recipient,
                body,
            } => {
                out.put_u8(t::SEND);
                out.put_u64(*client_msg_id);
                out.put_u64(recipient.0);
                out.put_slice(body);
            }
            ClientFrame::Ack { ids } => {
                out.put_u8(t::ACK);
                out.put_u16(ids.len() as u16);
                ids.iter().for_each(|id| out.put_u64(id.0));
            }
            ClientFrame::Read { sender, ids } => {
                out.put_u8(t::READ);
                out.put_u64(sender.0);
                out.put_u16(ids.len() as u16);
                ids.iter().for_each(|id| out.put_u64(id.0));
            }
            ClientFrame::Ping { nonce } => {
                out.put_u8(t::PING);
                out.put_u64(*nonce);
            }
            ClientFrame::Subscribe { users } | ClientFrame::Unsubscribe { users } => {
                out.put_u8(if matches!(self, ClientFrame::Subscribe { .. }) {
                    t::SUBSCRIBE
                } else {
                    t::UNSUBSCRIBE
                });
                out.put_u16(users.len() as u16);
                users.iter().for_each(|u| out.put_u64(u.0));
            }
            ClientFrame::Typing { to, state } => {
                out.put_u8(t::TYPING);
                out.put_u64(to.0);
                out.put_u8(*state as u8);
            }
            ClientFrame::Privacy { hide_last_seen } => {
                out.put_u8(t::PRIVACY);
                out.put_u8(u8::from(*hide_last_seen));
            }
            ClientFrame::Block { user } => {
                out.put_u8(t::BLOCK);
                out.put_u64(user.0);
            }
            ClientFrame::Unblock { user } => {
                out.put_u8(t::UNBLOCK);
                out.put_u64(user.0);
            }
            ClientFrame::Group {
                request_id,
                group,
                op,
                users,
            } => {
                out.put_u8(t::GROUP);
                out.put_u64(*request_id);
                out.put_u64(*group);
                out.put_u8(*op as u8);
                out.put_u16(users.len() as u16);
                users.iter().for_each(|u| out.put_u64(u.0));
            }
            ClientFrame::GroupSend {
                client_msg_id,
                group,
                body,
            } => {
                out.put_u8(t::GROUP_SEND);
                out.put_u64(*client_msg_id);
                out.put_u64(*group);
                out.put_slice(body);
            }
            ClientFrame::GroupRead { group, ids } => {
                out.put_u8(t::GROUP_READ);
                out.put_u64(*group);
                out.put_u16(ids.len() as u16);
                ids.iter().for_each(|id| out.put_u64(id.0));
            }
        }
        end_frame(out, start);
    }
}

/// Bytes of the DELIVER header before the body: length, type and fixed fields.
pub const DELIVER_HEADER_BYTES: usize = FRAME_HEADER_BYTES + 1 + 8 + 8 + 4 + 8;

/// Largest SEND body that still fits a DELIVER frame of at most `frame_bytes_max`.
pub fn body_bytes_max(frame_bytes_max: usize) -> usize {
    frame_bytes_max - (DELIVER_HEADER_BYTES - FRAME_HEADER_BYTES)
}

/// Encodes a DELIVER frame's header for a body of `body_len` bytes, so that the runtime can
/// queue the body apart from it: copied after it when small, or shared (`Bytes`, written with
/// the header in one vectored write and not copied) when large.
pub fn deliver_header(
    server_msg_id: ServerMsgId,
    sender: UserId,
    sender_device: DeviceId,
    server_ts_ms: u64,
    body_len: usize,
) -> [u8; DELIVER_HEADER_BYTES] {
    let mut h = [0u8; DELIVER_HEADER_BYTES];
    let len = (DELIVER_HEADER_BYTES - FRAME_HEADER_BYTES + body_len) as u32;
    h[0..4].copy_from_slice(&len.to_be_bytes());
    h[4] = frame_type::DELIVER;
    h[5..13].copy_from_slice(&server_msg_id.0.to_be_bytes());
    h[13..21].copy_from_slice(&sender.0.to_be_bytes());
    h[21..25].copy_from_slice(&sender_device.0.to_be_bytes());
    h[25..33].copy_from_slice(&server_ts_ms.to_be_bytes());
    h
}

/// Bytes of the GROUP_DELIVER header before the body.
pub const GROUP_DELIVER_HEADER_BYTES: usize = FRAME_HEADER_BYTES + 1 + 8 + 8 + 8 + 8 + 4 + 8;

/// Largest GROUP_SEND body that still fits a GROUP_DELIVER frame of at most `frame_bytes_max`.
pub fn group_body_bytes_max(frame_bytes_max: usize) -> usize {
    frame_bytes_max - (GROUP_DELIVER_HEADER_BYTES - FRAME_HEADER_BYTES)
}

/// Encodes a GROUP_DELIVER header for a body of `body_len` bytes (the body is queued after it,
/// copied or shared, as for DELIVER).
pub fn group_deliver_header(
    server_msg_id: ServerMsgId,
    group: u64,
    group_msg_id: ServerMsgId,
    sender: UserId,
    sender_device: DeviceId,
    server_ts_ms: u64,
    body_len: usize,
) -> [u8; GROUP_DELIVER_HEADER_BYTES] {
    let mut h = [0u8; GROUP_DELIVER_HEADER_BYTES];
    let len = (GROUP_DELIVER_HEADER_BYTES - FRAME_HEADER_BYTES + body_len) as u32;
    h[0..4].copy_from_slice(&len.to_be_bytes());
    h[4] = frame_type::GROUP_DELIVER;
    h[5..13].copy_from_slice(&server_msg_id.0.to_be_bytes());
    h[13..21].copy_from_slice(&group.to_be_bytes());
    h[21..29].copy_from_slice(&group_msg_id.0.to_be_bytes());
    h[29..37].copy_from_slice(&sender.0.to_be_bytes());
    h[37..41].copy_from_slice(&sender_device.0.to_be_bytes());
    h[41..49].copy_from_slice(&server_ts_ms.to_be_bytes());
    h
}

impl ServerFrame {
    /// Builds an ERROR frame from a code; `fatal` follows the code.
    pub fn error(code: ErrorCode, ref_id: u64, message: impl Into<String>) -> ServerFrame {
        ServerFrame::Error {
            code: code as u16,
            fatal: code.is_fatal(),
            ref_id,
            message: message.into(),
        }
    }

    /// Decodes a server frame from its type byte and payload.
    pub fn decode(frame_type: u8, payload: &[u8]) -> Result<ServerFrame, ProtoError> {
        use self::frame_type as t;
        let frame = match frame_type {
            t::HELLO_OK => {
                let mut f = Fields::new(payload, "HELLO_OK");
                let frame = ServerFrame::HelloOk {
                    version: f.u16()?,
                    max_frame_bytes: f.u32()?,
                    idle_timeout_ms: f.u32()?,
                    server_time_ms: f.u64()?,
                };
                f.end()?;
                frame
            }
            t::LOGIN_OK => {
                let mut f = Fields::new(payload, "LOGIN_OK");
                let frame = ServerFrame::LoginOk {
                    user: UserId(f.u64()?),
                    device: DeviceId(f.u32()?),
                };
                f.end()?;
                frame
            }
            t::SEND_ACK => {
                let mut f = Fields::new(payload, "SEND_ACK");
                let frame = ServerFrame::SendAck {
                    client_msg_id: f.u64()?,
                    server_msg_id: ServerMsgId(f.u64()?),
                    server_ts_ms: f.u64()?,
                };
                f.end()?;
                frame
            }
            t::DELIVER => {
                let mut f = Fields::new(payload, "DELIVER");
                ServerFrame::Deliver {
                    server_msg_id: ServerMsgId(f.u64()?),
                    sender: UserId(f.u64()?),
                    sender_device: DeviceId(f.u32()?),
                    server_ts_ms: f.u64()?,
                    body: Bytes::copy_from_slice(f.rest()),
                }
            }
            t::RECEIPT => {
                let mut f = Fields::new(payload, "RECEIPT");
                let receipt_id = ServerMsgId(f.u64()?);
                let kind = ReceiptKind::from_u8(f.u8()?).ok_or(ProtoError::Malformed {
                    frame: "RECEIPT",
                    why: "unknown receipt kind",
                })?;
                let frame = ServerFrame::Receipt {
                    receipt_id,
                    kind,
                    from: UserId(f.u64()?),
                    server_msg_id: ServerMsgId(f.u64()?),
                    ts_ms: f.u64()?,
                };
                f.end()?;
                frame
            }
            t::PONG => {
                let mut f = Fields::new(payload, "PONG");
                let frame = ServerFrame::Pong { nonce: f.u64()? };
                f.end()?;
                frame
            }
            t::GO_AWAY => {
                let mut f = Fields::new(payload, "GO_AWAY");
                let reason = GoAwayReason::from_u8(f.u8()?).ok_or(ProtoError::Malformed {
                    frame: "GO_AWAY",
                    why: "unknown reason",
                })?;
                ServerFrame::GoAway {
                    reason,
                    message: f.text(),
                }
            }
            t::PRESENCE => {
                let mut f = Fields::new(payload, "PRESENCE");
                let user = UserId(f.u64()?);
                let online = match f.u8()? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(ProtoError::Malformed {
                            frame: "PRESENCE",
                            why: "online must be 0 or 1",
                        })
                    }
                };
                let frame = ServerFrame::Presence {
                    user,
                    online,
                    last_seen_ms: f.u64()?,
                };
                f.end()?;
                frame
            }
            t::TYPING_FROM => {
                let mut f = Fields::new(payload, "TYPING");
                let from = UserId(f.u64()?);
                let state = TypingState::from_u8(f.u8()?).ok_or(ProtoError::Malformed {
                    frame: "TYPING",
                    why: "unknown typing state",
                })?;
                f.end()?;
                ServerFrame::Typing { from, state }
            }
            t::GROUP_OK => {
                let mut f = Fields::new(payload, "GROUP_OK");
                let request_id = f.u64()?;
                let group = f.u64()?;
                let count = usize::from(f.u16()?);
                if f.rest.len() != count * 9 {
                    return Err(ProtoError::Malformed {
                        frame: "GROUP_OK",
                        why: "member count does not match frame length",
                    });
                }
                let mut members = Vec::with_capacity(count);
                for _ in 0..count {
                    let user = UserId(f.u64()?);
                    let role = GroupRole::from_u8(f.u8()?).ok_or(ProtoError::Malformed {
                        frame: "GROUP_OK",
                        why: "unknown role",
                    })?;
                    members.push((user, role));
                }
                ServerFrame::GroupOk {
                    request_id,
                    group,
                    members,
                }
            }
            t::GROUP_RECEIPT => {
                let mut f = Fields::new(payload, "GROUP_RECEIPT");
                let frame = ServerFrame::GroupReceipt {
                    receipt_id: ServerMsgId(f.u64()?),
                    group: f.u64()?,
                    group_msg_id: ServerMsgId(f.u64()?),
                    members: f.u16()?,
                    delivered: f.u16()?,
                    read: f.u16()?,
                    ts_ms: f.u64()?,
                };
                f.end()?;
                frame
            }
            t::GROUP_DELIVER => {
                let mut f = Fields::new(payload, "GROUP_DELIVER");
                ServerFrame::GroupDeliver {
                    server_msg_id: ServerMsgId(f.u64()?),
                    group: f.u64()?,
                    group_msg_id: ServerMsgId(f.u64()?),
                    sender: UserId(f.u64()?),
                    sender_device: DeviceId(f.u32()?),
                    server_ts_ms: f.u64()?,
                    body: Bytes::copy_from_slice(f.rest()),
                }
            }
            t::GROUP_EVENT => {
                let mut f = Fields::new(payload, "GROUP_EVENT");
                let server_msg_id = ServerMsgId(f.u64()?);
                let group = f.u64()?;
                let ts_ms = f.u64()?;
                let op = GroupOp::from_u8(f.u8()?).ok_or(ProtoError::Malformed {
                    frame: "GROUP_EVENT",
                    why: "unknown group operation",
                })?;
                let actor = UserId(f.u64()?);
                ServerFrame::GroupEvent {
                    server_msg_id,
                    group,
                    ts_ms,
                    op,
                    actor,
                    users: f.user_list()?,
                }
            }
            t::ERROR => {
                let mut f = Fields::new(payload, "ERROR");
                let code = f.u16()?;
                let fatal = f.u8()? != 0;
                let ref_id = f.u64()?;
                ServerFrame::Error {
                    code,
                    fatal,
                    ref_id,
                    message: f.text(),
                }
            }
            other => return Err(ProtoError::UnknownType(other)),
        };
        Ok(frame)
    }

    /// Appends the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        use self::frame_type as t;
        if let ServerFrame::Deliver {
            server_msg_id,
            sender,
            sender_device,
            server_ts_ms,
            body,
        } = self
        {
            out.put_slice(&deliver_header(
                *server_msg_id,
                *sender,
                *sender_device,
                *server_ts_ms,
                body.len(),
            ));
            out.put_slice(body);
            return;
        }
        let start = begin_frame(out);
        match self {
            ServerFrame::HelloOk {
                version,
                max_frame_bytes,
                idle_timeout_ms,
                server_time_ms,
            } => {
                out.put_u8(t::HELLO_OK);
                out.put_u16(*version);
                out.put_u32(*max_frame_bytes);
                out.put_u32(*idle_timeout_ms);
                out.put_u64(*server_time_ms);
            }
            ServerFrame::LoginOk { user, device } => {
                out.put_u8(t::LOGIN_OK);
                out.put_u64(user.0);
                out.put_u32(device.0);
            }
            ServerFrame::SendAck {
                client_msg_id,
                server_msg_id,
                server_ts_ms,
            } => {
                out.put_u8(t::SEND_ACK);
                out.put_u64(*client_msg_id);
                out.put_u64(server_msg_id.0);
                out.put_u64(*server_ts_ms);
            }
            ServerFrame::Deliver { .. } => unreachable!("handled above"),
            ServerFrame::Receipt {
                receipt_id,
                kind,
                from,
                server_msg_id,
                ts_ms,
            } => {
                out.put_u8(t::RECEIPT);
                out.put_u64(receipt_id.0);
                out.put_u8(*kind as u8);
                out.put_u64(from.0);
                out.put_u64(server_msg_id.0);
                out.put_u64(*ts_ms);
            }
            ServerFrame::Pong { nonce } => {
                out.put_u8(t::PONG);
                out.put_u64(*nonce);
            }
            ServerFrame::GoAway { reason, message } => {
                out.put_u8(t::GO_AWAY);
                out.put_u8(*reason as u8);
                out.put_slice(truncate_utf8(message, REASON_BYTES_MAX).as_bytes());
            }
            ServerFrame::Presence {
                user,
                online,
                last_seen_ms,
            } => {
                out.put_u8(t::PRESENCE);
                out.put_u64(user.0);
                out.put_u8(u8::from(*online));
                out.put_u64(*last_seen_ms);
            }
            ServerFrame::Typing { from, state } => {
                out.put_u8(t::TYPING_FROM);
                out.put_u64(from.0);
                out.put_u8(*state as u8);
            }
            ServerFrame::GroupOk {
                request_id,
                group,
                members,
            } => {
                out.put_u8(t::GROUP_OK);
                out.put_u64(*request_id);
                out.put_u64(*group);
                out.put_u16(members.len() as u16);
                for (u, r) in members {
                    out.put_u64(u.0);
                    out.put_u8(*r as u8);
                }
            }
            ServerFrame::GroupReceipt {
                receipt_id,
                group,
                group_msg_id,
                members,
                delivered,
                read,
                ts_ms,
            } => {
                out.put_u8(t::GROUP_RECEIPT);
                out.put_u64(receipt_id.0);
                out.put_u64(*group);
                out.put_u64(group_msg_id.0);
                out.put_u16(*members);
                out.put_u16(*delivered);
                out.put_u16(*read);
                out.put_u64(*ts_ms);
            }
            ServerFrame::GroupDeliver {
                server_msg_id,
                group,
                group_msg_id,
                sender,
                sender_device,
                server_ts_ms,
                body,
            } => {
                out.put_u8(t::GROUP_DELIVER);
                out.put_u64(server_msg_id.0);
                out.put_u64(*group);
                out.put_u64(group_msg_id.0);
                out.put_u64(sender.0);
                out.put_u32(sender_device.0);
                out.put_u64(*server_ts_ms);
                out.put_slice(body);
            }
            ServerFrame::GroupEvent {
                server_msg_id,
                group,
                ts_ms,
                op,
                actor,
                users,
            } => {
                out.put_u8(t::GROUP_EVENT);
                out.put_u64(server_msg_id.0);
                out.put_u64(*group);
                out.put_u64(*ts_ms);
                out.put_u8(*op as u8);
                out.put_u64(actor.0);
                out.put_u16(users.len() as u16);
                users.iter().for_each(|u| out.put_u64(u.0));
            }
            ServerFrame::Error {
                code,
                fatal,
                ref_id,
                message,
            } => {
                out.put_u8(t::ERROR);
                out.put_u16(*code);
                out.put_u8(u8::from(*fatal));
                out.put_u64(*ref_id);
                out.put_slice(truncate_utf8(message, REASON_BYTES_MAX).as_bytes());
            }
        }
        end_frame(out, start);
    }

    /// Encodes into a fresh `Bytes`.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(32);
        self.encode(&mut out);
        out.freeze()
    }
}

fn begin_frame(out: &mut BytesMut) -> usize {
    let start = out.len();
    out.put_u32(0);
    start
}

fn end_frame(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start - FRAME_HEADER_BYTES) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::FRAME_BYTES_MAX_DEFAULT;
    use proptest::prelude::*;

    fn roundtrip_client(f: &ClientFrame) -> ClientFrame {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        let raw = split_frame(&b, FRAME_BYTES_MAX_DEFAULT).unwrap().unwrap();
        assert_eq!(raw.total_bytes, b.len());
        ClientFrame::decode(raw.frame_type, raw.payload).unwrap()
    }

    fn roundtrip_server(f: &ServerFrame) -> ServerFrame {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        let raw = split_frame(&b, FRAME_BYTES_MAX_DEFAULT).unwrap().unwrap();
        assert_eq!(raw.total_bytes, b.len());
        ServerFrame::decode(raw.frame_type, raw.payload).unwrap()
    }

    #[test]
    fn hello_layout_is_pinned() {
        let mut b = BytesMut::new();
        ClientFrame::Hello {
            magic: *b"GHSE",
            min_version: 1,
            max_version: 1,
        }
        .encode(&mut b);
        assert_eq!(
            &b[..],
            &[0, 0, 0, 9, 0x01, b'G', b'H', b'S', b'E', 0, 1, 0, 1]
        );
    }

    #[test]
    fn deliver_header_matches_encoder() {
        let f = ServerFrame::Deliver {
            server_msg_id: ServerMsgId(7),
            sender: UserId(9),
            sender_device: DeviceId(2),
            server_ts_ms: 123,
            body: Bytes::from_static(b"hello"),
        };
        let mut b = BytesMut::new();
        f.encode(&mut b);
        assert_eq!(b.len(), DELIVER_HEADER_BYTES + 5);
        assert_eq!(roundtrip_server(&f), f);
    }

    #[test]
    fn split_needs_whole_frame() {
        let mut b = BytesMut::new();
        ClientFrame::Ping { nonce: 5 }.encode(&mut b);
        for cut in 0..b.len() {
            assert_eq!(split_frame(&b[..cut], 1024).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_and_empty_frames_are_errors() {
        assert_eq!(
            split_frame(&[0, 0, 0, 0], 1024),
            Err(ProtoError::EmptyFrame)
        );
        assert!(matches!(
            split_frame(&[0, 1, 0, 0, 1], 1024),
            Err(ProtoError::FrameTooLarge {
                len: 65536,
                max: 1024
            })
        ));
    }

    #[test]
    fn malformed_payloads_are_named() {
        let err = ClientFrame::decode(frame_type::PING, &[1, 2, 3]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
        assert!(err.to_string().contains("PING"), "{err}");
        let err =
            ClientFrame::decode(frame_type::ACK, &[0, 2, 0, 0, 0, 0, 0, 0, 0, 1]).unwrap_err();
        assert!(err.to_string().contains("id count"), "{err}");
        assert_eq!(
            ClientFrame::decode(0x7f, &[]).unwrap_err(),
            ProtoError::UnknownType(0x7f)
        );
        // A server frame type sent by a client is unknown to the client decoder.
        assert_eq!(
            ClientFrame::decode(0x84, &[]).unwrap_err().code(),
            ErrorCode::UnknownFrameType
        );
    }

    fn client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>(), any::<u16>()).prop_map(
                |(magic, min_version, max_version)| ClientFrame::Hello {
                    magic,
                    min_version,
                    max_version
                }
            ),
            (
                any::<u64>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..TOKEN_BYTES_MAX)
            )
                .prop_map(|(u, d, t)| ClientFrame::Login {
                    user: UserId(u),
                    device: DeviceId(d),
                    token: t.into()
                }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..2000)
            )
                .prop_map(|(c, r, b)| ClientFrame::Send {
                    client_msg_id: c,
                    recipient: UserId(r),
                    body: b.into()
                }),
            proptest::collection::vec(any::<u64>().prop_map(ServerMsgId), 1..100)
                .prop_map(|ids| ClientFrame::Ack { ids }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u64>().prop_map(ServerMsgId), 1..100)
            )
                .prop_map(|(s, ids)| ClientFrame::Read {
                    sender: UserId(s),
                    ids
                }),
            any::<u64>().prop_map(|nonce| ClientFrame::Ping { nonce }),
            proptest::collection::vec(any::<u64>().prop_map(UserId), 1..100)
                .prop_map(|users| ClientFrame::Subscribe { users }),
            proptest::collection::vec(any::<u64>().prop_map(UserId), 1..100)
                .prop_map(|users| ClientFrame::Unsubscribe { users }),
            (any::<u64>(), any::<bool>()).prop_map(|(to, c)| ClientFrame::Typing {
                to: UserId(to),
                state: if c {
                    TypingState::Composing
                } else {
                    TypingState::Paused
                },
            }),
            any::<bool>().prop_map(|hide_last_seen| ClientFrame::Privacy { hide_last_seen }),
            any::<u64>().prop_map(|u| ClientFrame::Block { user: UserId(u) }),
            any::<u64>().prop_map(|u| ClientFrame::Unblock { user: UserId(u) }),
            (
                any::<u64>(),
                any::<u64>(),
                1u8..=5,
                proptest::collection::vec(any::<u64>().prop_map(UserId), 0..50)
            )
                .prop_map(|(request_id, group, op, users)| ClientFrame::Group {
                    request_id,
                    group,
                    op: GroupOp::from_u8(op).unwrap(),
                    users
                }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..500)
            )
                .prop_map(|(c, g, b)| ClientFrame::GroupSend {
                    client_msg_id: c,
                    group: g,
                    body: b.into()
                }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u64>().prop_map(ServerMsgId), 1..100)
            )
                .prop_map(|(group, ids)| ClientFrame::GroupRead { group, ids }),
        ]
    }

    proptest! {
        #[test]
        fn client_frames_roundtrip(f in client_frame()) {
            prop_assert_eq!(roundtrip_client(&f), f);
        }

        #[test]
        fn server_frames_roundtrip(id in any::<u64>(), n in any::<u64>(), text in ".{0,300}") {
            let frames = [
                ServerFrame::SendAck { client_msg_id: n, server_msg_id: ServerMsgId(id), server_ts_ms: n ^ id },
                ServerFrame::Receipt { receipt_id: ServerMsgId(id), kind: ReceiptKind::Read, from: UserId(n), server_msg_id: ServerMsgId(n), ts_ms: id },
                ServerFrame::Pong { nonce: n },
                ServerFrame::HelloOk { version: 1, max_frame_bytes: n as u32, idle_timeout_ms: id as u32, server_time_ms: n },
                ServerFrame::LoginOk { user: UserId(n), device: DeviceId(id as u32) },
                ServerFrame::Presence { user: UserId(n), online: id % 2 == 0, last_seen_ms: id },
                ServerFrame::Typing { from: UserId(id), state: TypingState::Composing },
                ServerFrame::GroupOk { request_id: n, group: id, members: vec![(UserId(n), GroupRole::Admin), (UserId(id), GroupRole::Member)] },
                ServerFrame::GroupDeliver { server_msg_id: ServerMsgId(id), group: n, group_msg_id: ServerMsgId(n ^ 5), sender: UserId(n), sender_device: DeviceId(3), server_ts_ms: id, body: Bytes::from(text.clone().into_bytes()) },
                ServerFrame::GroupReceipt { receipt_id: ServerMsgId(id), group: n, group_msg_id: ServerMsgId(n), members: 255, delivered: id as u16, read: n as u16, ts_ms: id },
                ServerFrame::GroupEvent { server_msg_id: ServerMsgId(n), group: id, ts_ms: n, op: GroupOp::Remove, actor: UserId(id), users: vec![UserId(n), UserId(1)] },
            ];
            for f in frames {
                prop_assert_eq!(roundtrip_server(&f), f);
            }
            // Text is truncated on a char boundary and never breaks the frame.
            let e = ServerFrame::Error { code: 1, fatal: true, ref_id: id, message: text.clone() };
            match roundtrip_server(&e) {
                ServerFrame::Error { message, .. } => prop_assert!(text.starts_with(&message)),
                other => prop_assert!(false, "decoded {:?}", other),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut rest = &bytes[..];
            while let Ok(Some(raw)) = split_frame(rest, 512) {
                let _ = ClientFrame::decode(raw.frame_type, raw.payload);
                let _ = ServerFrame::decode(raw.frame_type, raw.payload);
                rest = &rest[raw.total_bytes..];
            }
        }
    }

    /// Regression for fuzz/artifacts/frame_decoder/crash-eb667dce…: an ERROR whose text is 118
    /// invalid UTF-8 bytes decoded to 354 bytes of U+FFFD, which the encoder then cut to 256.
    #[test]
    fn reason_text_round_trips_after_lossy_decoding() {
        // code 0x2300, not fatal, ref_id 0x000288dededededede, then the text.
        let mut payload = vec![
            0x23, 0x00, 0x00, 0x00, 0x02, 0x88, 0xde, 0xde, 0xde, 0xde, 0xde,
        ];
        payload.extend(std::iter::repeat_n(0xde, 117));
        payload.push(0x92);
        let f = ServerFrame::decode(0x88, &payload[..]).unwrap();
        let ServerFrame::Error { message, .. } = &f else {
            panic!("{f:?}")
        };
        assert!(message.len() <= REASON_BYTES_MAX);
        let mut b = BytesMut::new();
        f.encode(&mut b);
        let raw = split_frame(&b, 1 << 16).unwrap().unwrap();
        assert_eq!(ServerFrame::decode(raw.frame_type, raw.payload).unwrap(), f);
    }
}
