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

use super::record::RecordLayer;
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
    // Server preference (see `ignore_client_order` below): AES-128-GCM with SHA-256 first. Its
    // handshake hashing uses SHA-256, which x86 CPUs accelerate (SHA-NI); clients list
    // AES-256-GCM-SHA384 first, whose SHA-384 runs in software and was the largest single
    // cost of a full handshake measured here (docs/benchmarks.md).
    provider.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        (
            !name.starts_with("TLS13"),
            !name.contains("AES_128_GCM"),
            !name.contains("CHACHA20"),
        )
    });
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
        config.ignore_client_order = true;
        // Lets an established TLS 1.3 session hand its keys to `record::RecordLayer`.
        config.enable_secret_extraction = section.record_offload;
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
    /// A state the driver does not expect (a bug of ours, reported instead of losing data).
    #[error("TLS driver: {0}")]
    Unexpected(&'static str),
    /// The offloaded record layer refused input or ran out of key usage.
    #[error("{0}")]
    Record(#[from] super::record::RecordError),
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
///
/// rustls runs the handshake; an established TLS 1.3 session then gives its keys to a
/// [`RecordLayer`] (with `tls.record_offload`), and the rustls state is freed.
pub struct TlsSession {
    /// rustls, until the keys move to `records` (boxed so that its 1,120 bytes go with it).
    conn: Option<Box<UnbufferedServerConnection>>,
    /// The record layer of an established TLS 1.3 session after key extraction.
    records: Option<RecordLayer>,
    /// Full or resumed, kept from rustls.
    kind: Option<HandshakeKind>,
    /// Offload the record layer once established (`tls.record_offload`).
    offload: bool,
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
            offload: config.enable_secret_extraction,
            conn: Some(Box::new(UnbufferedServerConnection::new(config)?)),
            records: None,
            kind: None,
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
        self.kind
    }

    /// Whether the record layer runs here rather than in rustls (after key extraction).
    pub fn is_offloaded(&self) -> bool {
        self.records.is_some()
    }

    /// rustls, while it runs the connection.
    fn rustls(&mut self) -> &mut UnbufferedServerConnection {
        self.conn
            .as_mut()
            .expect("rustls runs the connection until offload")
    }

    /// Moves an established TLS 1.3 session's keys to a [`RecordLayer`] and frees rustls,
    /// when nothing is in flight inside rustls (no split record held).
    fn try_offload(&mut self) -> Result<(), TlsError> {
        let Some(conn) = &self.conn else {
            return Ok(());
        };
        if !self.established
            || !self.pending_in.is_empty()
            || !self.offload
            || conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3)
        {
            return Ok(());
        }
        let conn = self.conn.take().expect("checked above");
        let (secrets, kernel) = conn.dangerous_into_kernel_connection()?;
        self.records = Some(RecordLayer::new(secrets, kernel));
        Ok(())
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
        if let Some(records) = &mut self.records {
            let opened = records.open(&mut self.pending_in, fresh, plain, wire)?;
            return Ok(TlsProgress {
                established_now: false,
                peer_closed: opened.peer_closed,
            });
        }
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
            // Keep only the unprocessed tail, in a buffer of its own size.
            if used < buf.len() {
                self.pending_in = buf[used..].to_vec();
            }
            r
        };
        if result.is_err() {
            self.drain_alerts(wire);
            self.pending_in = Vec::new();
        }
        let peer_closed = result?;
        if self.established {
            if self.kind.is_none() {
                self.kind = self.rustls().handshake_kind();
            }
            if !peer_closed {
                self.try_offload()?;
            }
        }
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
        // Bounded: a state either consumes input (every record is at least 5 bytes, and each
        // app-data record is one state), emits output, or stops; so at most a state per 5
        // bytes of input plus a few for output. A fixed cap would leave records of a burst of
        // small ones unprocessed until more input came.
        let states_max = buf.len() / 5 + crate::limits::TLS_STATES_PER_INPUT_MAX;
        for _ in 0..states_max {
            let UnbufferedStatus { discard, state } = self
                .conn
                .as_mut()
                .expect("rustls runs the connection")
                .process_tls_records(&mut buf[used..]);
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
    /// than that makes it index out of bounds. And it calls rustls only while an alert is
    /// queued (`wants_write`): rustls hands queued records out before it reads input, but with
    /// nothing queued it would parse the bad input again and raise a second fatal alert (a
    /// debug assertion in rustls; found by the `tls_session` fuzz target).
    fn drain_alerts(&mut self, wire: &mut Vec<u8>) {
        for _ in 0..4 {
            let conn = self.conn.as_mut().expect("rustls runs the connection");
            if !conn.wants_write() {
                return;
            }
            let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut self.pending_in);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode_into(&mut e, wire),
                _ => return,
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
            let UnbufferedStatus { discard, state } = self
                .conn
                .as_mut()
                .expect("rustls runs the connection")
                .process_tls_records(&mut self.pending_in);
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
                // Undrained input would make rustls answer ReadTraffic here, and the data to
                // encrypt would be lost: `process` always drains it, so this is a bug.
                ConnectionState::ReadTraffic(_) => {
                    return Err(TlsError::Unexpected("received data left undrained"))
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
        if let Some(records) = &mut self.records {
            return Ok(records.seal(data, wire)?);
        }
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
        if let Some(records) = &mut self.records {
            records.close_notify(wire);
            return;
        }
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

    fn roots(dir: &Path) -> rustls::RootCertStore {
        let pem = std::fs::read(dir.join("c.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }

    fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
        let roots = roots(dir);
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }

    /// Moves client output into the server in pieces of `piece` bytes; returns what the
    /// server decrypted and sends its answer back to the client.
    fn pump(
        server: &mut TlsSession,
        client: &mut rustls::ClientConnection,
        piece: usize,
    ) -> Result<(Vec<u8>, TlsProgress), TlsError> {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        let (mut plain, mut wire) = (Vec::new(), Vec::new());
        let mut progress = TlsProgress::default();
        for chunk in to_server.chunks_mut(piece.max(1)) {
            let p = server.handle_input(chunk, &mut plain, &mut wire)?;
            progress.established_now |= p.established_now;
            progress.peer_closed |= p.peer_closed;
        }
        feed_client(client, &wire);
        Ok((plain, progress))
    }

    /// Gives `wire` to the client (rustls reads at most one buffer's worth per call).
    fn feed_client(client: &mut rustls::ClientConnection, wire: &[u8]) {
        let mut rd = wire;
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
    }

    fn established(dir: &Path) -> (TlsSession, rustls::ClientConnection) {
        let ctx = context(dir);
        let mut s = TlsSession::new(ctx.config.clone()).unwrap();
        let mut c =
            rustls::ClientConnection::new(client_config(dir), "localhost".try_into().unwrap())
                .unwrap();
        for _ in 0..10 {
            pump(&mut s, &mut c, usize::MAX).unwrap();
            if s.is_established() && !c.is_handshaking() && !c.wants_write() {
                break;
            }
        }
        assert!(s.is_established());
        (s, c)
    }

    fn client_reads(c: &mut rustls::ClientConnection, wire: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut rd = wire;
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
            let _ = std::io::Read::read_to_end(&mut c.reader(), &mut got);
        }
        got
    }

    #[test]
    fn offloaded_records_interoperate_with_rustls_both_ways() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let (mut s, mut c) = established(dir.path());
        assert!(
            s.is_offloaded(),
            "TLS 1.3 sessions move to the record layer"
        );
        // Client to server, fed in pieces of every size from 1 byte.
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        for piece in [1, 5, 7, 100, 16_405, usize::MAX] {
            c.writer().write_all(&data).unwrap();
            let (got, _) = pump(&mut s, &mut c, piece).unwrap();
            assert!(got == data, "piece {piece}: {} bytes", got.len());
            assert_eq!(s.pending_input_bytes(), 0);
        }
        // Server to client: several records.
        let mut wire = Vec::new();
        s.encrypt(&data, &mut wire).unwrap();
        s.encrypt(b"", &mut wire).unwrap();
        s.encrypt(b"tail", &mut wire).unwrap();
        let mut want = data.clone();
        want.extend_from_slice(b"tail");
        let got = client_reads(&mut c, &wire);
        assert!(got == want, "{} of {} bytes", got.len(), want.len());
    }

    #[test]
    fn a_client_key_update_is_followed_and_answered() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let (mut s, mut c) = established(dir.path());
        assert!(s.is_offloaded());
        for round in 0..3u8 {
            // rustls sends KeyUpdate(update_requested); we switch our receive key, answer with
            // our own KeyUpdate and switch our send key.
            c.refresh_traffic_keys().unwrap();
            c.writer().write_all(&[round; 100]).unwrap();
            let (got, _) = pump(&mut s, &mut c, 3).unwrap();
            assert_eq!(got, vec![round; 100]);
            let mut wire = Vec::new();
            s.encrypt(&[round + 10; 50], &mut wire).unwrap();
            assert_eq!(client_reads(&mut c, &wire), vec![round + 10; 50]);
        }
    }

    #[test]
    fn close_notify_tampering_and_stray_messages() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        // The client's close_notify ends input cleanly.
        let (mut s, mut c) = established(dir.path());
        c.send_close_notify();
        let (_, p) = pump(&mut s, &mut c, usize::MAX).unwrap();
        assert!(p.peer_closed);
        // Our close_notify reaches rustls as a clean close.
        let mut wire = Vec::new();
        s.close_notify(&mut wire);
        c.read_tls(&mut &wire[..]).unwrap();
        let state = c.process_new_packets().unwrap();
        assert!(state.peer_has_closed());

        // A flipped bit fails authentication; nothing of that record comes out.
        let (mut s, mut c) = established(dir.path());
        c.writer().write_all(b"secret").unwrap();
        let mut to_server = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut to_server).unwrap();
        }
        let last = to_server.len() - 1;
        to_server[last] ^= 1;
        let (mut plain, mut out) = (Vec::new(), Vec::new());
        let err = s
            .handle_input(&mut to_server, &mut plain, &mut out)
            .unwrap_err();
        assert!(err.to_string().contains("authentication"), "{err}");
        assert!(plain.is_empty());

        // A plaintext record after the handshake is refused.
        let (mut s, _c) = established(dir.path());
        let mut junk = vec![0x16, 0x03, 0x03, 0x00, 0x01, 0x00];
        let err = s.handle_input(&mut junk, &mut plain, &mut out).unwrap_err();
        assert!(err.to_string().contains("not an encrypted"), "{err}");
    }

    #[test]
    fn tls12_sessions_stay_in_rustls() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let cc = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(dir.path()))
            .with_no_client_auth(),
        );
        let mut s = TlsSession::new(ctx.config.clone()).unwrap();
        let mut c = rustls::ClientConnection::new(cc, "localhost".try_into().unwrap()).unwrap();
        for _ in 0..10 {
            pump(&mut s, &mut c, usize::MAX).unwrap();
        }
        assert!(s.is_established() && !s.is_offloaded());
        c.writer().write_all(b"over 1.2").unwrap();
        assert_eq!(pump(&mut s, &mut c, 2).unwrap().0, b"over 1.2");
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
            // Found by the tls_session fuzz target: bytes that are no record type at all.
            // Draining the alert used to parse them a second time (a second fatal alert).
            (&[0x0a][..], true),
            (&[0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a][..], true),
        ] {
            // Whole, and split after the record header.
            for cut in [input.len(), input.len().min(5)] {
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
