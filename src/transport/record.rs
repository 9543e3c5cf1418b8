//! The TLS 1.3 record layer of an established connection, after rustls hands over its keys.
//!
//! Why: an established rustls session holds about 2.2 KB (1,120 B inline, ~1,065 B of heap:
//! AEAD contexts, key schedule, buffers; `examples/tls_session_memory.rs`), more than a whole
//! idle plain connection. Once the handshake is done, the connection needs only its two traffic
//! keys, IVs and sequence numbers, which rustls gives up through `dangerous_extract_secrets`,
//! the API meant for kernel TLS. This module then does what kernel TLS does: it seals and opens
//! records (RFC 8446 section 5) with aws-lc-rs's AEAD, building the AEAD context only for the
//! duration of one read or write, so an idle connection holds ~130 bytes of TLS state.
//!
//! Scope: TLS 1.3 only (TLS 1.2 sessions stay in rustls). The handshake, certificate choice,
//! tickets and alerts during the handshake remain rustls's. After extraction, this layer
//! handles application data, close_notify, fatal alerts and the client's KeyUpdate (rustls's
//! `KernelConnection` derives the next traffic secrets; we answer an update request with our
//! own KeyUpdate). Any other post-handshake message ends the connection with a clear error.
//! Before the AEAD's confidentiality limit the server updates its own sending key.
//!
//! Must never: reuse a nonce (the sequence number only grows, and the connection ends before
//! it could wrap), or hand out plaintext from a record that failed authentication.

use aws_lc_rs::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext in one record (RFC 8446 5.1).
const PLAINTEXT_MAX: usize = 16_384;
/// Largest ciphertext body of one record: plaintext, content type, padding, tag (5.2).
const CIPHERTEXT_MAX: usize = PLAINTEXT_MAX + 256;
const HEADER_BYTES: usize = 5;
const TAG_BYTES: usize = 16;
/// Records one direction may seal or open under one key: the smallest of the confidentiality
/// limits of the suites here (AES-GCM: 2^24.5, RFC 8446 5.5), rounded down.
pub const RECORDS_PER_KEY_MAX: u64 = 1 << 24;
/// The server updates its sending key this many records before the limit.
const KEY_UPDATE_MARGIN: u64 = 1 << 10;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;

/// Why the record layer ended the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// A record failed authentication, or is malformed.
    #[error("bad record: {0}")]
    BadRecord(&'static str),
    /// The peer sent a fatal alert.
    #[error("peer sent fatal alert {0}")]
    Alert(u8),
    /// A post-handshake handshake message other than KeyUpdate, or a malformed one.
    #[error("unexpected post-handshake message (type {0})")]
    PostHandshake(u8),
    /// rustls could not derive the next traffic secret.
    #[error("key update failed: {0}")]
    KeyUpdate(String),
    /// A key reached its record limit.
    #[error("key usage limit reached (reconnect to continue)")]
    KeyExhausted,
    /// The suite is not one this layer implements (never for rustls's TLS 1.3 suites).
    #[error("unsupported cipher suite for record offload")]
    Unsupported,
}

/// One direction's key, IV and next sequence number: 16 or 32 key bytes, not an AEAD context.
struct Direction {
    secrets: ConnectionTrafficSecrets,
    seq: u64,
}

impl Direction {
    fn key(&self) -> Result<LessSafeKey, RecordError> {
        let (alg, key) = match &self.secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, .. } => (&AES_128_GCM, key),
            ConnectionTrafficSecrets::Aes256Gcm { key, .. } => (&AES_256_GCM, key),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, .. } => (&CHACHA20_POLY1305, key),
            _ => return Err(RecordError::Unsupported),
        };
        UnboundKey::new(alg, key.as_ref())
            .map(LessSafeKey::new)
            .map_err(|_| RecordError::Unsupported)
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 5.3); advances it.
    /// `limit`: sealing stops at the key's confidentiality limit (we update our key before
    /// it); opening does not, since a peer may keep its key longer (many never send KeyUpdate)
    /// and only the sender is bound by it. A sequence number never wraps either way.
    fn next_nonce(&mut self, limit: bool) -> Result<Nonce, RecordError> {
        if (limit && self.seq >= RECORDS_PER_KEY_MAX) || self.seq == u64::MAX {
            return Err(RecordError::KeyExhausted);
        }
        let iv = match &self.secrets {
            ConnectionTrafficSecrets::Aes128Gcm { iv, .. }
            | ConnectionTrafficSecrets::Aes256Gcm { iv, .. }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { iv, .. } => iv,
            _ => return Err(RecordError::Unsupported),
        };
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(iv.as_ref());
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// What opening some input produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The peer sent close_notify.
    pub peer_closed: bool,
}

/// An established TLS 1.3 connection's record protection.
pub struct RecordLayer {
    tx: Direction,
    rx: Direction,
    /// rustls's key schedule, for KeyUpdate.
    kernel: KernelConnection<ServerConnectionData>,
    close_notify_sent: bool,
}

impl std::fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordLayer")
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .finish()
    }
}

impl RecordLayer {
    /// Takes over from rustls with the extracted secrets and any unprocessed input.
    pub fn new(
        secrets: rustls::ExtractedSecrets,
        kernel: KernelConnection<ServerConnectionData>,
    ) -> RecordLayer {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        RecordLayer {
            tx: Direction {
                secrets: tx,
                seq: tx_seq,
            },
            rx: Direction {
                secrets: rx,
                seq: rx_seq,
            },
            kernel,
            close_notify_sent: false,
        }
    }

    /// Sends a KeyUpdate (update_not_requested) under the old key and switches to the next
    /// sending key.
    fn update_tx(&mut self, wire: &mut Vec<u8>) -> Result<(), RecordError> {
        let key = self.tx.key()?;
        self.seal_one(
            &key,
            CONTENT_HANDSHAKE,
            &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0],
            wire,
        )?;
        let (seq, secrets) = self
            .kernel
            .update_tx_secret()
            .map_err(|e| RecordError::KeyUpdate(e.to_string()))?;
        self.tx = Direction { secrets, seq };
        Ok(())
    }

    /// Seals `data` as application-data records appended to `wire`.
    pub fn seal(&mut self, data: &[u8], wire: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_typed(CONTENT_APPLICATION_DATA, data, wire)
    }

    /// Appends a close_notify alert (once).
    pub fn close_notify(&mut self, wire: &mut Vec<u8>) {
        if !self.close_notify_sent {
            self.close_notify_sent = true;
            // A warning-level close_notify; failure (key exhausted) just leaves it out.
            let _ = self.seal_typed(CONTENT_ALERT, &[1, 0], wire);
        }
    }

    fn seal_typed(&mut self, typ: u8, data: &[u8], wire: &mut Vec<u8>) -> Result<(), RecordError> {
        if data.is_empty() {
            return Ok(());
        }
        // The AEAD context lives for this write only: idle connections keep raw keys.
        let mut key = self.tx.key()?;
        for chunk in data.chunks(PLAINTEXT_MAX) {
            if self.tx.seq >= RECORDS_PER_KEY_MAX - KEY_UPDATE_MARGIN {
                self.update_tx(wire)?;
                key = self.tx.key()?;
            }
            self.seal_one(&key, typ, chunk, wire)?;
        }
        Ok(())
    }

    /// Seals one record of at most `PLAINTEXT_MAX` bytes under `key` (this direction's).
    fn seal_one(
        &mut self,
        key: &LessSafeKey,
        typ: u8,
        chunk: &[u8],
        wire: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        debug_assert!(chunk.len() <= PLAINTEXT_MAX);
        {
            let body_len = chunk.len() + 1 + TAG_BYTES;
            let header = [
                CONTENT_APPLICATION_DATA,
                0x03,
                0x03,
                (body_len >> 8) as u8,
                body_len as u8,
            ];
            let nonce = self.tx.next_nonce(true)?;
            let start = wire.len();
            wire.extend_from_slice(&header);
            wire.extend_from_slice(chunk);
            wire.push(typ);
            let tag = key
                .seal_in_place_separate_tag(
                    nonce,
                    Aad::from(header),
                    &mut wire[start + HEADER_BYTES..],
                )
                .map_err(|_| RecordError::BadRecord("seal failed"))?;
            wire.extend_from_slice(tag.as_ref());
        }
        Ok(())
    }

    /// Opens the records in `fresh`, joined to the split record the caller kept in `pending`
    /// (and keeps there what is left split), appending application data to `plain` and any
    /// answer (a KeyUpdate) to `wire`.
    pub fn open(
        &mut self,
        pending: &mut Vec<u8>,
        fresh: &mut [u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> Result<Opened, RecordError> {
        if pending.is_empty() {
            let (used, r) = self.open_records(fresh, plain, wire);
            if r.is_ok() && used < fresh.len() {
                *pending = fresh[used..].to_vec();
            }
            r
        } else {
            let mut buf = std::mem::take(pending);
            buf.extend_from_slice(fresh);
            let (used, r) = self.open_records(&mut buf, plain, wire);
            // Keep only the split record, in a buffer of its own size (not the joined one's).
            if r.is_ok() && used < buf.len() {
                *pending = buf[used..].to_vec();
            }
            r
        }
    }

    /// Opens whole records from the front of `buf`; returns the bytes consumed.
    fn open_records(
        &mut self,
        buf: &mut [u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> (usize, Result<Opened, RecordError>) {
        let mut off = 0;
        let mut opened = Opened::default();
        let mut key = None;
        while buf.len() - off >= HEADER_BYTES {
            let header: [u8; HEADER_BYTES] =
                buf[off..off + HEADER_BYTES].try_into().expect("5 bytes");
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != CONTENT_APPLICATION_DATA || header[1] != 0x03 {
                return (
                    off,
                    Err(RecordError::BadRecord("not an encrypted TLS 1.3 record")),
                );
            }
            if !(TAG_BYTES + 1..=CIPHERTEXT_MAX).contains(&len) {
                return (
                    off,
                    Err(RecordError::BadRecord("record length out of range")),
                );
            }
            if buf.len() - off < HEADER_BYTES + len {
                break;
            }
            if key.is_none() {
                key = match self.rx.key() {
                    Ok(k) => Some(k),
                    Err(e) => return (off, Err(e)),
                };
            }
            let nonce = match self.rx.next_nonce(false) {
                Ok(n) => n,
                Err(e) => return (off, Err(e)),
            };
            let body = &mut buf[off + HEADER_BYTES..off + HEADER_BYTES + len];
            let Ok(inner) =
                key.as_ref()
                    .expect("set above")
                    .open_in_place(nonce, Aad::from(header), body)
            else {
                return (off, Err(RecordError::BadRecord("authentication failed")));
            };
            off += HEADER_BYTES + len;
            // Strip the zero padding; the last non-zero byte is the real content type.
            let Some(end) = inner.iter().rposition(|b| *b != 0) else {
                return (
                    off,
                    Err(RecordError::BadRecord("record without a content type")),
                );
            };
            let (content, typ) = (&inner[..end], inner[end]);
            match typ {
                CONTENT_APPLICATION_DATA => plain.extend_from_slice(content),
                CONTENT_ALERT => {
                    if content.len() == 2 && content[1] == 0 {
                        opened.peer_closed = true;
                        // Nothing after close_notify counts (RFC 8446 6.1).
                        return (buf.len(), Ok(opened));
                    }
                    return (
                        off,
                        Err(RecordError::Alert(content.get(1).copied().unwrap_or(0))),
                    );
                }
                CONTENT_HANDSHAKE => {
                    // KeyUpdate: type 24, length 1, request_update 0 or 1 (RFC 8446 4.6.3).
                    let [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request] = *content else {
                        return (
                            off,
                            Err(RecordError::PostHandshake(
                                content.first().copied().unwrap_or(0),
                            )),
                        );
                    };
                    if request > 1 {
                        return (off, Err(RecordError::PostHandshake(HANDSHAKE_KEY_UPDATE)));
                    }
                    match self.kernel.update_rx_secret() {
                        Ok((seq, secrets)) => self.rx = Direction { secrets, seq },
                        Err(e) => return (off, Err(RecordError::KeyUpdate(e.to_string()))),
                    }
                    // Later records use the new key.
                    key = None;
                    if request == 1 {
                        if let Err(e) = self.update_tx(wire) {
                            return (off, Err(e));
                        }
                    }
                }
                _ => return (off, Err(RecordError::BadRecord("unexpected content type"))),
            }
        }
        (off, Ok(opened))
    }
}
