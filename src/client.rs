//! A small blocking client for protocol v1, over `std::net`, in plain TCP or TLS (rustls).
//!
//! Used by the tests, the `gatehouse` CLI tools and the loadgen's workers. It speaks the
//! wire format through [`crate::proto`], so it doubles as an executable example of
//! `docs/protocol.md`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use bytes::{Buf, BytesMut};
use thiserror::Error;

use crate::ids::{DeviceId, ServerMsgId, UserId};
use crate::limits::FRAME_BYTES_MAX_CEILING;
use crate::proto::{
    split_frame, ClientFrame, ErrorCode, ProtoError, ServerFrame, HELLO_MAGIC, PROTOCOL_VERSION,
};

/// Client-side failures.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Socket error (including read timeouts).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that do not decode.
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    /// The server closed the connection.
    #[error("connection closed by server")]
    Closed,
    /// The server answered with an ERROR frame.
    #[error("server error {code} ({name}): {message}")]
    Server {
        /// Raw code.
        code: u16,
        /// Its name, if known.
        name: &'static str,
        /// Detail.
        message: String,
    },
    /// A frame other than the expected one.
    #[error("unexpected frame: {0:?}")]
    Unexpected(Box<ServerFrame>),
    /// The TLS settings could not be built (CA file, server name, groups).
    #[error("TLS setup: {0}")]
    TlsSetup(String),
}

/// How a client speaks TLS: the roots it trusts, the name it checks, and (shared across
/// connections) the session cache that makes reconnects resume.
#[derive(Clone, Debug)]
pub struct TlsClientConfig {
    /// rustls settings; clone the `Arc` to share the session cache between connections.
    pub config: Arc<rustls::ClientConfig>,
    /// Name the server's certificate must carry.
    pub server_name: ServerName<'static>,
}

impl TlsClientConfig {
    /// Trusts the CA certificates in `ca_file` (PEM), checks `server_name`, offers `kx_groups`
    /// (most preferred first; empty = rustls's defaults) and keeps up to `sessions` tickets
    /// for resumption (0 = never resume).
    pub fn from_ca_file(
        ca_file: &Path,
        server_name: &str,
        kx_groups: &[String],
        sessions: usize,
    ) -> Result<TlsClientConfig, ClientError> {
        let pem = std::fs::read(ca_file)
            .map_err(|e| ClientError::TlsSetup(format!("{}: {e}", ca_file.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| ClientError::TlsSetup(format!("{}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::TlsSetup(format!("{}: {e}", ca_file.display())))?;
        }
        if roots.is_empty() {
            return Err(ClientError::TlsSetup(format!(
                "{}: no PEM certificate",
                ca_file.display()
            )));
        }
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        if !kx_groups.is_empty() {
            provider.kx_groups = crate::transport::tls::kx_groups_by_name(kx_groups)
                .map_err(|e| ClientError::TlsSetup(e.to_string()))?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::TlsSetup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = if sessions == 0 {
            rustls::client::Resumption::disabled()
        } else {
            rustls::client::Resumption::in_memory_sessions(sessions)
        };
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::TlsSetup(format!("server name {server_name:?}: {e}")))?;
        Ok(TlsClientConfig {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// The client's byte stream: TCP, or TLS over TCP.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl ClientError {
    /// The error code, when the server sent an ERROR.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }
}

/// A blocking connection to a gateway.
pub struct Client {
    stream: Stream,
    buf: BytesMut,
}

impl Client {
    /// Connects (no handshake yet). Reads time out after `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, ClientError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream: Stream::Plain(stream),
            buf: BytesMut::with_capacity(4096),
        })
    }

    /// Connects and completes a TLS handshake (no protocol handshake yet).
    pub fn connect_tls(
        addr: SocketAddr,
        tls: &TlsClientConfig,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        tcp.set_nodelay(true)?;
        let conn = rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone())
            .map_err(|e| ClientError::TlsSetup(e.to_string()))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Client {
            stream: Stream::Tls(Box::new(s)),
            buf: BytesMut::with_capacity(4096),
        })
    }

    /// Whether the TLS session was resumed (`None` on plain TCP).
    pub fn tls_resumed(&self) -> Option<bool> {
        match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(s) => Some(matches!(
                s.conn.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed)
            )),
        }
    }

    /// SHA-256 of the server's leaf certificate (hex), on TLS: tells which certificate served.
    pub fn tls_leaf_sha256(&self) -> Option<String> {
        use sha2::Digest;
        match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|leaf| {
                    sha2::Sha256::digest(leaf.as_ref())
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect()
                }),
        }
    }

    /// The negotiated key-exchange group, on TLS.
    pub fn tls_kx_group(&self) -> Option<String> {
        match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s
                .conn
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()).to_ascii_lowercase()),
        }
    }

    /// Says HELLO, logs in, and waits for LOGIN_OK (on a connected client).
    pub fn log_in(
        &mut self,
        user: UserId,
        device: DeviceId,
        token: &str,
    ) -> Result<(), ClientError> {
        self.send(&ClientFrame::Hello {
            magic: HELLO_MAGIC,
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        })?;
        self.send(&ClientFrame::Login {
            user,
            device,
            token: token.as_bytes().to_vec().into(),
        })?;
        match self.recv()? {
            ServerFrame::HelloOk { .. } => {}
            other => return Err(ClientError::Unexpected(Box::new(other))),
        }
        match self.recv()? {
            ServerFrame::LoginOk { .. } => Ok(()),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Connects, says HELLO, logs in, and waits for LOGIN_OK.
    pub fn login(
        addr: SocketAddr,
        user: UserId,
        device: DeviceId,
        token: &str,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let mut c = Client::connect(addr, timeout)?;
        c.log_in(user, device, token)?;
        Ok(c)
    }

    /// Changes the read timeout.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), ClientError> {
        Ok(self.stream.tcp().set_read_timeout(Some(timeout))?)
    }

    /// Writes one frame.
    pub fn send(&mut self, f: &ClientFrame) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        self.send_raw(&b)
    }

    /// Writes raw bytes (tests use this for malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(self.stream.flush()?)
    }

    /// Sends a message.
    pub fn send_message(
        &mut self,
        client_msg_id: u64,
        recipient: UserId,
        body: &[u8],
    ) -> Result<(), ClientError> {
        self.send(&ClientFrame::Send {
            client_msg_id,
            recipient,
            body: body.to_vec().into(),
        })
    }

    /// Acknowledges deliveries or receipts.
    pub fn ack(&mut self, ids: &[ServerMsgId]) -> Result<(), ClientError> {
        self.send(&ClientFrame::Ack { ids: ids.to_vec() })
    }

    /// Reads the next frame, whatever it is (ERROR frames are returned, not turned into
    /// errors).
    pub fn recv_frame(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            if let Some(raw) = split_frame(&self.buf, FRAME_BYTES_MAX_CEILING)? {
                let frame = ServerFrame::decode(raw.frame_type, raw.payload)?;
                let n = raw.total_bytes;
                self.buf.advance(n);
                return Ok(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads the next frame; an ERROR frame becomes [`ClientError::Server`].
    pub fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        match self.recv_frame()? {
            ServerFrame::Error { code, message, .. } => Err(ClientError::Server {
                code,
                name: ErrorCode::from_u16(code).map_or("unknown", ErrorCode::name),
                message,
            }),
            f => Ok(f),
        }
    }

    /// Whether the server has closed the connection (reads until EOF or `timeout`; frames
    /// read on the way are returned).
    pub fn read_until_closed(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<ServerFrame>, ClientError> {
        self.set_timeout(timeout)?;
        let mut frames = Vec::new();
        loop {
            match self.recv_frame() {
                Ok(f) => frames.push(f),
                Err(ClientError::Closed) => return Ok(frames),
                Err(ClientError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    return Ok(frames)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The underlying socket (tests use it to half-close or inspect).
    pub fn stream(&self) -> &TcpStream {
        self.stream.tcp()
    }
}
