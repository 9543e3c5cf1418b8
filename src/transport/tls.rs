//! TLS termination with rustls's *unbuffered* API.
//!
//! Owns two things: the node-wide [`TlsContext`] (one `rustls::ServerConfig` shared by every
//! shard, with a certificate that can be swapped while the node runs) and the per-connection
//! [`TlsSession`] driver. The driver never reads a socket or a clock: ciphertext comes in as a
//! slice, plaintext and bytes to transmit go out into buffers the caller lends (the shard's
//! scratch buffers), so an idle connection holds only rustls's own state and no TLS buffers.
//! rustls's buffered `ServerConnection` keeps about 6.3 KB per idle connection; see
//! `docs/benchmarks.md` for what this layout costs.
//!
//! Must never: hold a ciphertext buffer while idle (only a split record waits here), or let a
//! bad certificate replace a good one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerConnectionData, UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};
use rustls::{HandshakeKind, ServerConfig, SupportedProtocolVersion};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::config::TlsSection;

/// Why the TLS context (or a reload of it) could not be built. Names the file or key.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{path}: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate {
        /// The file.
        path: String,
    },
    /// The key file holds no usable private key.
    #[error("{path}: no usable PEM private key ({why})")]
    BadKey {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// The key does not belong to the certificate.
    #[error("the private key in {key} does not match the certificate in {cert}: {why}")]
    Mismatch {
        /// Certificate file.
        cert: String,
        /// Key file.
        key: String,
        /// rustls's reason.
        why: String,
    },
    /// A setting rustls refuses (an unknown group, no protocol version).
    #[error("tls.{key}: {why}")]
    Setting {
        /// The config key under `[tls]`.
        key: &'static str,
        /// Why.
        why: String,
    },
}

/// The certificate every new handshake gets; swapped whole on reload, never mutated.
#[derive(Debug)]
struct CertSlot {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What a (re)load installed, for the log line and the admin answer.
#[derive(Clone, Debug)]
pub struct CertSummary {
    /// Certificates in the chain (leaf first).
    pub chain_len: usize,
    /// SHA-256 of the leaf certificate's DER, hex: tells operators which certificate serves.
    pub leaf_sha256: String,
}

impl std::fmt::Display for CertSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} certificate(s), leaf sha256 {}",
            self.chain_len, self.leaf_sha256
        )
    }
}

/// The node's TLS setup: one `ServerConfig` for every shard and listener (TLS and wss).
///
/// Shared across shards behind an `Arc`: it is control-plane state read once per handshake
/// (the certificate through a lock-free `ArcSwap`, the session-ticket key through rustls's
/// rotating ticketer), so that a client resuming on another shard of the node is understood.
#[derive(Debug)]
pub struct TlsContext {
    /// Handed to every new session.
    pub config: Arc<ServerConfig>,
    slot: Arc<CertSlot>,
    provider: Arc<CryptoProvider>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// The key-exchange groups the provider knows, by their configuration names.
pub fn kx_group_names() -> Vec<String> {
    rustls::crypto::aws_lc_rs::ALL_KX_GROUPS
        .iter()
        .map(|g| format!("{:?}", g.name()).to_ascii_lowercase())
        .collect()
}

/// The provider's groups named in `names` (case-insensitive), in that order.
pub fn kx_groups_by_name(
    names: &[String],
) -> Result<Vec<&'static dyn rustls::crypto::SupportedKxGroup>, TlsSetupError> {
    let mut groups = Vec::with_capacity(names.len());
    for name in names {
        let want = name.to_ascii_lowercase();
        let g = rustls::crypto::aws_lc_rs::ALL_KX_GROUPS
            .iter()
            .find(|g| format!("{:?}", g.name()).to_ascii_lowercase() == want)
            .ok_or_else(|| TlsSetupError::Setting {
                key: "kx_groups",
                why: format!(
                    "unknown group `{name}`; known: {}",
                    kx_group_names().join(", ")
                ),
            })?;
        groups.push(*g);
    }
    Ok(groups)
}

fn provider_for(section: &TlsSection) -> Result<CryptoProvider, TlsSetupError> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let groups = kx_groups_by_name(&section.kx_groups)?;
    if groups.is_empty() {
        return Err(TlsSetupError::Setting {
            key: "kx_groups",
            why: "needs at least one group".into(),
        });
    }
    provider.kx_groups = groups;
    Ok(provider)
}

fn versions_for(
    section: &TlsSection,
) -> Result<Vec<&'static SupportedProtocolVersion>, TlsSetupError> {
    let mut out = Vec::new();
    for v in &section.versions {
        match v.as_str() {
            "1.3" => out.push(&rustls::version::TLS13),
            "1.2" => out.push(&rustls::version::TLS12),
            other => {
                return Err(TlsSetupError::Setting {
                    key: "versions",
                    why: format!("unknown version `{other}`; use \"1.3\" and/or \"1.2\""),
                })
            }
        }
    }
    if out.is_empty() {
        return Err(TlsSetupError::Setting {
            key: "versions",
            why: "needs at least one version".into(),
        });
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a PEM chain and key and checks that they belong together.
fn load_certified_key(
    provider: &CryptoProvider,
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Arc<CertifiedKey>, CertSummary), TlsSetupError> {
    let cert_pem = read_file(cert_file)?;
    let key_pem = read_file(key_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsSetupError::NoCertificate {
            path: cert_file.display().to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: cert_file.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsSetupError::BadKey {
        path: key_file.display().to_string(),
        why: e.to_string(),
    })?;
    let signing =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsSetupError::BadKey {
                path: key_file.display().to_string(),
                why: e.to_string(),
            })?;
    let summary = CertSummary {
        chain_len: chain.len(),
        leaf_sha256: Sha256::digest(chain[0].as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    };
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| TlsSetupError::Mismatch {
        cert: cert_file.display().to_string(),
        key: key_file.display().to_string(),
        why: e.to_string(),
    })?;
    Ok((Arc::new(ck), summary))
}

impl TlsContext {
    /// Builds the context from `[tls]`: loads and checks the certificate and key, picks the
    /// key-exchange groups and versions, and enables stateless session tickets when asked.
    pub fn new(section: &TlsSection) -> Result<(TlsContext, CertSummary), TlsSetupError> {
        let cert_file = section.cert_file.clone();
        let key_file = section.key_file.clone();
        let provider = Arc::new(provider_for(section)?);
        let (ck, summary) = load_certified_key(&provider, &cert_file, &key_file)?;
        let slot = Arc::new(CertSlot {
            current: ArcSwap::new(ck),
        });
        let versions = versions_for(section)?;
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| TlsSetupError::Setting {
                key: "versions",
                why: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        if section.session_tickets {
            // Stateless tickets: the server keeps nothing per client, and every shard shares
            // the (rotating) ticket key through this one config.
            config.ticketer =
                rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| TlsSetupError::Setting {
                    key: "session_tickets",
                    why: e.to_string(),
                })?;
            config.send_tls13_tickets = 1;
        } else {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        config.alpn_protocols = Vec::new();
        Ok((
            TlsContext {
                config: Arc::new(config),
                slot,
                provider,
                cert_file,
                key_file,
            },
            summary,
        ))
    }

    /// Re-reads the certificate and key files. New handshakes get the new certificate;
    /// established connections keep theirs. On any error the current certificate stays.
    pub fn reload(&self) -> Result<CertSummary, TlsSetupError> {
        let (ck, summary) = load_certified_key(&self.provider, &self.cert_file, &self.key_file)?;
        self.slot.current.store(ck);
        Ok(summary)
    }
}

/// A TLS failure on one connection: what the peer did wrong (or a broken TLS state).
#[derive(Debug, Error)]
pub enum TlsError {
    /// rustls refused the peer's input (garbage, a bad handshake, an alert).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// Early data is not enabled; rustls never hands it out (defensive).
    #[error("unexpected early data")]
    EarlyData,
    /// rustls would encrypt no more under these keys.
    #[error("encrypter exhausted")]
    Exhausted,
}

/// What came of a chunk of input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TlsProgress {
    /// The handshake completed during this input (count it once).
    pub established_now: bool,
    /// The peer sent close_notify: no more input will come.
    pub peer_closed: bool,
}

/// One connection's TLS state, driven by the connection task.
pub struct TlsSession {
    conn: UnbufferedServerConnection,
    /// Ciphertext received but not yet processed: a record split across reads. Empty (no
    /// allocation) between records, so idle connections hold nothing here.
    pending_in: Vec<u8>,
    established: bool,
    close_notify_sent: bool,
    /// Some input has been fed (tells a plaintext client's first bytes from a ClientHello).
    had_input: bool,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("pending_in", &self.pending_in.len())
            .field("established", &self.established)
            .finish()
    }
}

/// Largest record rustls emits, with header and tag: the slack reserved per 16 KiB of
/// plaintext when encrypting.
const RECORD_OVERHEAD_BYTES: usize = 5 + 1 + 16 + 256;

impl TlsSession {
    /// A server session under `config`.
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsSession, TlsError> {
        Ok(TlsSession {
            conn: UnbufferedServerConnection::new(config)?,
            pending_in: Vec::new(),
            established: false,
            close_notify_sent: false,
            had_input: false,
        })
    }

    /// Whether the handshake has completed (application data may flow).
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Full or resumed, once known.
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// Whether any input has been fed yet.
    pub fn has_input(&self) -> bool {
        self.had_input
    }

    /// Bytes of a split record waiting for the rest (they travel with a hand-over).
    pub fn pending_input_bytes(&self) -> usize {
        self.pending_in.len()
    }

    /// Feeds ciphertext `fresh` (the caller's scratch; decrypted in place where possible).
    /// Appends decrypted application data to `plain` and bytes to transmit (handshake
    /// messages, tickets, alerts) to `wire`. On error, `wire` holds the alert for the peer.
    pub fn handle_input(
        &mut self,
        fresh: &mut [u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> Result<TlsProgress, TlsError> {
        let was_established = self.established;
        self.had_input |= !fresh.is_empty();
        let result = if self.pending_in.is_empty() {
            let (used, r) = self.process(fresh, plain, wire);
            if used < fresh.len() {
                self.pending_in = fresh[used..].to_vec();
            }
            r
        } else {
            let mut buf = std::mem::take(&mut self.pending_in);
            buf.extend_from_slice(fresh);
            let (used, r) = self.process(&mut buf, plain, wire);
            buf.drain(..used);
            if !buf.is_empty() {
                self.pending_in = buf;
            }
            r
        };
        if result.is_err() {
            self.drain_alerts(wire);
            self.pending_in = Vec::new();
        }
        let peer_closed = result?;
        Ok(TlsProgress {
            established_now: self.established && !was_established,
            peer_closed,
        })
    }

    /// Runs rustls over `buf`; returns the bytes consumed and whether the peer closed.
    fn process(
        &mut self,
        buf: &mut [u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> (usize, Result<bool, TlsError>) {
        let mut used = 0;
        let mut peer_closed = false;
        // Bounded: every round either consumes input, emits output, or stops.
        for _ in 0..crate::limits::TLS_STATES_PER_INPUT_MAX {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut buf[used..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => return (used + discard, Err(e.into())),
            };
            let mut stop = false;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => plain.extend_from_slice(rec.payload),
                            Err(e) => return (used + discard, Err(e.into())),
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => encode_into(&mut e, wire),
                ConnectionState::TransmitTlsData(t) => {
                    // The caller transmits `wire` in order before anything encrypted later.
                    t.done();
                }
                ConnectionState::BlockedHandshake => stop = true,
                ConnectionState::WriteTraffic(_) => {
                    self.established = true;
                    stop = true;
                }
                ConnectionState::PeerClosed => peer_closed = true,
                ConnectionState::Closed => stop = true,
                ConnectionState::ReadEarlyData(_) => {
                    return (used + discard, Err(TlsError::EarlyData))
                }
                _ => stop = true,
            }
            used += discard;
            if stop {
                break;
            }
        }
        (used, Ok(peer_closed))
    }

    /// After an error rustls may have queued an alert; encode it for the peer.
    ///
    /// Like every call here that only wants output, it passes the retained input
    /// (`pending_in`), never an empty slice: rustls remembers how far into the buffer it has
    /// looked (a handshake message split over records stays in place), and a shorter buffer
    /// than that makes it index out of bounds.
    fn drain_alerts(&mut self, wire: &mut Vec<u8>) {
        for _ in 0..4 {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.pending_in);
            let go_on = match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    encode_into(&mut e, wire);
                    true
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    true
                }
                _ => false,
            };
            self.pending_in.drain(..discard);
            if !go_on {
                return;
            }
        }
    }

    /// Runs rustls until it takes application data, encoding what it wants sent first
    /// (tickets, key updates) into `wire`, then calls `f` with the write state. `Ok(None)`
    /// when the connection will never take any (closed).
    fn with_write_traffic<R>(
        &mut self,
        wire: &mut Vec<u8>,
        f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> R,
    ) -> Result<Option<R>, TlsError> {
        let mut f = Some(f);
        for _ in 0..crate::limits::TLS_STATES_PER_INPUT_MAX {
            // The retained input, not an empty slice (see `drain_alerts`).
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.pending_in);
            let out = match state? {
                ConnectionState::EncodeTlsData(mut e) => {
                    encode_into(&mut e, wire);
                    None
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::WriteTraffic(mut w) => {
                    let f = f.take().expect("called once: the loop ends here");
                    Some(Some(f(&mut w, wire)))
                }
                // Closed, or anything else: nothing can be sent any more.
                _ => Some(None),
            };
            self.pending_in.drain(..discard);
            if let Some(r) = out {
                return Ok(r);
            }
        }
        Ok(None)
    }

    /// Encrypts `data` (application bytes) and appends the records to `wire`. Only once
    /// established; anything rustls wants to send first (tickets, key updates) goes before.
    pub fn encrypt(&mut self, data: &[u8], wire: &mut Vec<u8>) -> Result<(), TlsError> {
        debug_assert!(self.established, "encrypt before the handshake completed");
        let r = self.with_write_traffic(wire, |w, wire| {
            let start = wire.len();
            let mut need = data.len() + (data.len() / 16_384 + 1) * RECORD_OVERHEAD_BYTES;
            loop {
                wire.resize(start + need, 0);
                match w.encrypt(data, &mut wire[start..]) {
                    Ok(n) => {
                        wire.truncate(start + n);
                        return Ok(());
                    }
                    Err(EncryptError::InsufficientSize(s)) if s.required_size > need => {
                        need = s.required_size;
                    }
                    Err(_) => {
                        wire.truncate(start);
                        return Err(TlsError::Exhausted);
                    }
                }
            }
        })?;
        r.unwrap_or(Ok(()))
    }

    /// Appends a close_notify alert to `wire` (once; only when established).
    pub fn close_notify(&mut self, wire: &mut Vec<u8>) {
        if !self.established || self.close_notify_sent {
            return;
        }
        self.close_notify_sent = true;
        let _ = self.with_write_traffic(wire, |w, wire| {
            let start = wire.len();
            wire.resize(start + 64, 0);
            match w.queue_close_notify(&mut wire[start..]) {
                Ok(n) => wire.truncate(start + n),
                Err(_) => wire.truncate(start),
            }
        });
    }
}

/// Encodes one pending handshake/alert record onto the end of `wire`.
fn encode_into<Data>(e: &mut rustls::unbuffered::EncodeTlsData<'_, Data>, wire: &mut Vec<u8>) {
    let start = wire.len();
    let mut need = 4096;
    loop {
        wire.resize(start + need, 0);
        match e.encode(&mut wire[start..]) {
            Ok(n) => {
                wire.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(s)) => need = s.required_size,
            Err(EncodeError::AlreadyEncoded) => {
                wire.truncate(start);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(dir: &Path) -> TlsContext {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
        let section = TlsSection {
            enabled: true,
            cert_file: dir.join("c.pem"),
            key_file: dir.join("k.pem"),
            ..TlsSection::default()
        };
        TlsContext::new(&section).unwrap().0
    }

    #[test]
    fn garbage_gets_an_alert() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        // (input, whether rustls answers with an alert: an oversized handshake message is
        // refused without one).
        for (input, alert) in [
            (
                &[
                    0x16u8, 0x03, 0x01, 0x00, 0x08, 0xde, 0xde, 0xde, 0xde, 0xde, 0xde, 0xde, 0xde,
                ][..],
                false,
            ),
            (&[0x17, 0x03, 0x03, 0x00, 0x02, 1, 2][..], true),
            (
                &[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00][..],
                true,
            ),
        ] {
            // Whole, and split after the record header.
            for cut in [input.len(), 5] {
                let mut s = TlsSession::new(ctx.config.clone()).unwrap();
                let (mut plain, mut wire) = (Vec::new(), Vec::new());
                let mut a = input[..cut].to_vec();
                let mut b = input[cut..].to_vec();
                let r1 = s.handle_input(&mut a, &mut plain, &mut wire);
                let r = match r1 {
                    Ok(_) if !b.is_empty() => s.handle_input(&mut b, &mut plain, &mut wire),
                    other => other,
                };
                assert!(r.is_err(), "{input:?} cut {cut}: {r:?}");
                if alert {
                    assert_eq!(
                        wire.first(),
                        Some(&0x15),
                        "{input:?} cut {cut}: {wire:?} {r:?}"
                    );
                }
            }
        }
    }
}
