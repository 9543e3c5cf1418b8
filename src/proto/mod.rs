//! Wire protocol v1: frame types, field encodings and the codec.
//!
//! Pure: no sockets, no clock, no allocation beyond the decoded frame itself. The full
//! specification a client author needs is `docs/protocol.md`; this module is its reference
//! implementation, and the tests at the bottom pin the byte layout.

mod codec;
mod error;

pub use codec::*;
pub use error::{ErrorCode, GoAwayReason, ProtoError};

/// The one protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// First four bytes of the HELLO payload: lets the server tell a Gatehouse client from a TLS
/// ClientHello or an HTTP request at once.
pub const HELLO_MAGIC: [u8; 4] = *b"GHSE";
