//! The loadgen's own header inside message bodies (opaque to the gateway) and the encoding of
//! client message ids.
//!
//! Body: `magic "LG01" | sender:u32 | recipient:u32 | seq:u32 | intended_send_ns:u64 |
//! padding`. Indices are the users' positions in the run (user id − first user), `seq` counts
//! per (sender, recipient) pair from 1, and the intended send time (ns since the worker's epoch)
//! makes latency coordinated-omission-free: it is when the open-loop schedule wanted the message
//! sent, not when the connection got round to it.

/// Bytes of the loadgen header at the start of each body.
pub const BODY_HEADER_BYTES: usize = 24;
const MAGIC: [u8; 4] = *b"LG01";

/// What a body says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyHeader {
    /// Sender index.
    pub sender: u32,
    /// Recipient index.
    pub recipient: u32,
    /// Sequence number in the pair, from 1.
    pub seq: u32,
    /// Intended send time, ns since the worker's epoch.
    pub intended_ns: u64,
}

impl BodyHeader {
    /// Encodes into a body of `len` bytes (≥ [`BODY_HEADER_BYTES`]).
    pub fn encode(&self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&self.sender.to_be_bytes());
        v.extend_from_slice(&self.recipient.to_be_bytes());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.intended_ns.to_be_bytes());
        v.resize(len.max(BODY_HEADER_BYTES), 0xAB);
        v
    }

    /// Decodes; `None` for bodies the loadgen did not write.
    pub fn decode(b: &[u8]) -> Option<BodyHeader> {
        if b.len() < BODY_HEADER_BYTES || b[..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Some(BodyHeader {
            sender: u32_at(4),
            recipient: u32_at(8),
            seq: u32_at(12),
            intended_ns: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        })
    }
}

/// Client message id of a send: recipient index and pair sequence, so that a SEND_ACK names
/// its pair without a lookup.
pub fn client_msg_id(recipient: u32, seq: u32) -> u64 {
    (u64::from(recipient) << 32) | u64::from(seq)
}

/// Inverse of [`client_msg_id`].
pub fn split_client_msg_id(id: u64) -> (u32, u32) {
    ((id >> 32) as u32, id as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_roundtrip() {
        let h = BodyHeader {
            sender: 1,
            recipient: 2,
            seq: 3,
            intended_ns: 4,
        };
        let b = h.encode(64);
        assert_eq!(b.len(), 64);
        assert_eq!(BodyHeader::decode(&b), Some(h));
        assert_eq!(BodyHeader::decode(b"hello"), None);
        assert_eq!(split_client_msg_id(client_msg_id(7, 9)), (7, 9));
    }
}
