//! Error codes on the wire and the codec's own error type.

use thiserror::Error;

/// Error codes carried in ERROR frames. Stable: numbers never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame's fields do not match its type's layout. Fatal.
    MalformedFrame = 1,
    /// A frame's length prefix exceeds the maximum announced in HELLO_OK. Fatal.
    FrameTooLarge = 2,
    /// A frame type this version does not know. Fatal.
    UnknownFrameType = 3,
    /// A valid frame in the wrong phase (SEND before LOGIN, a second HELLO, ...). Fatal.
    UnexpectedFrame = 4,
    /// No protocol version in common (or a bad HELLO magic). Fatal.
    UnsupportedVersion = 5,
    /// The login token is malformed, forged, or for another user or device. Fatal.
    BadToken = 6,
    /// The login token's expiry has passed. Fatal.
    TokenExpired = 7,
    /// The client did not finish HELLO + LOGIN within the login timeout. Fatal.
    LoginTimeout = 8,
    /// An ACK named an id that is not awaiting acknowledgement on this connection. Not fatal.
    UnknownAck = 9,
    /// The recipient's offline queue is full; the message was not accepted. Not fatal.
    QueueFull = 10,
    /// The server could not store the message (disk full, I/O error); not accepted. Not fatal.
    StoreFailed = 11,
    /// The server is overloaded; the request was not accepted, retry later. Not fatal.
    Overloaded = 12,
    /// The recipient id is not a valid user (0). Not fatal.
    BadRecipient = 13,
    /// The client does not read what the server sends fast enough. Fatal.
    SlowConsumer = 14,
    /// A bug on the server's side. Fatal.
    Internal = 15,
    /// A SEND body too large to be delivered within the maximum frame size (the DELIVER frame
    /// carries 12 more bytes of header than the SEND). Not fatal.
    BodyTooLarge = 16,
    /// The user belongs to another node of a multi-node deployment: fatal at LOGIN (connect to
    /// the right node), not fatal for a SEND (cross-node routing does not exist yet).
    WrongNode = 17,
    /// A rate limit was exceeded: too many SENDs on this connection (the SEND was not accepted;
    /// slow down; fatal once the client keeps sending past the limit), or too many new
    /// connections from this source address (fatal: the connection is closed at once).
    RateLimited = 18,
    /// A presence subscription was refused: this connection holds its maximum of
    /// subscriptions (`ref_id` 0), or the target user has its maximum of subscribers (`ref_id`
    /// the target). Not fatal.
    PresenceLimit = 19,
    /// The recipient has blocked the sender: the message was not stored. Not fatal.
    Blocked = 20,
    /// No such group. Not fatal.
    GroupUnknown = 21,
    /// Not allowed in this group: not a member, or not an admin for a membership change.
    /// Not fatal.
    GroupForbidden = 22,
    /// The group would pass its member cap. Not fatal.
    GroupFull = 23,
    /// GROUP_CREATE for an id that exists. Not fatal.
    GroupExists = 24,
}

impl ErrorCode {
    /// Decodes a wire value; unknown values map to `None` (a newer server may add codes).
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => MalformedFrame,
            2 => FrameTooLarge,
            3 => UnknownFrameType,
            4 => UnexpectedFrame,
            5 => UnsupportedVersion,
            6 => BadToken,
            7 => TokenExpired,
            8 => LoginTimeout,
            9 => UnknownAck,
            10 => QueueFull,
            11 => StoreFailed,
            12 => Overloaded,
            13 => BadRecipient,
            14 => SlowConsumer,
            15 => Internal,
            16 => BodyTooLarge,
            17 => WrongNode,
            18 => RateLimited,
            19 => PresenceLimit,
            20 => Blocked,
            21 => GroupUnknown,
            22 => GroupForbidden,
            23 => GroupFull,
            24 => GroupExists,
            _ => return None,
        })
    }

    /// Whether the server closes the connection after sending this error.
    pub fn is_fatal(self) -> bool {
        !matches!(
            self,
            ErrorCode::UnknownAck
                | ErrorCode::QueueFull
                | ErrorCode::StoreFailed
                | ErrorCode::Overloaded
                | ErrorCode::BadRecipient
                | ErrorCode::BodyTooLarge
                | ErrorCode::WrongNode
                | ErrorCode::RateLimited
                | ErrorCode::PresenceLimit
                | ErrorCode::Blocked
                | ErrorCode::GroupUnknown
                | ErrorCode::GroupForbidden
                | ErrorCode::GroupFull
                | ErrorCode::GroupExists
        )
    }

    /// Stable lower-case name, used in logs and metrics.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MalformedFrame => "malformed_frame",
            FrameTooLarge => "frame_too_large",
            UnknownFrameType => "unknown_frame_type",
            UnexpectedFrame => "unexpected_frame",
            UnsupportedVersion => "unsupported_version",
            BadToken => "bad_token",
            TokenExpired => "token_expired",
            LoginTimeout => "login_timeout",
            UnknownAck => "unknown_ack",
            QueueFull => "queue_full",
            StoreFailed => "store_failed",
            Overloaded => "overloaded",
            BadRecipient => "bad_recipient",
            SlowConsumer => "slow_consumer",
            Internal => "internal",
            BodyTooLarge => "body_too_large",
            WrongNode => "wrong_node",
            RateLimited => "rate_limited",
            PresenceLimit => "presence_limit",
            Blocked => "blocked",
            GroupUnknown => "group_unknown",
            GroupForbidden => "group_forbidden",
            GroupFull => "group_full",
            GroupExists => "group_exists",
        }
    }
}

/// Why the server ends a session with GO_AWAY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GoAwayReason {
    /// The server is shutting down or draining; reconnect later (with backoff).
    Shutdown = 1,
    /// A newer login of the same user and device replaced this session; do not reconnect.
    Replaced = 2,
    /// No frame arrived within the idle timeout; reconnect when there is something to do.
    Idle = 3,
}

impl GoAwayReason {
    /// Decodes a wire value.
    pub fn from_u8(v: u8) -> Option<GoAwayReason> {
        match v {
            1 => Some(GoAwayReason::Shutdown),
            2 => Some(GoAwayReason::Replaced),
            3 => Some(GoAwayReason::Idle),
            _ => None,
        }
    }
}

/// What the decoder found wrong with the peer's bytes. Every variant is the peer's fault and
/// maps to a fatal [`ErrorCode`] sent before closing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// Length prefix above the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Allowed maximum.
        max: usize,
    },
    /// Length prefix of zero (a frame needs at least its type byte).
    #[error("empty frame (length 0)")]
    EmptyFrame,
    /// Type byte not defined in this version.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// Fields do not fit the type's layout.
    #[error("malformed {frame} frame: {why}")]
    Malformed {
        /// Frame type name.
        frame: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

impl ProtoError {
    /// The error code that reports this problem to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtoError::EmptyFrame | ProtoError::Malformed { .. } => ErrorCode::MalformedFrame,
            ProtoError::UnknownType(_) => ErrorCode::UnknownFrameType,
        }
    }
}
