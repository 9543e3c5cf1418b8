//! A small blocking client for protocol v1, over `std::net`.
//!
//! Used by the tests, the `gatehouse` CLI tools and the loadgen's workers. It speaks the
//! wire format through [`crate::proto`], so it doubles as an executable example of
//! `docs/protocol.md`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    /// Connects (no handshake yet). Reads time out after `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, ClientError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: BytesMut::with_capacity(4096),
        })
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
        c.send(&ClientFrame::Hello {
            magic: HELLO_MAGIC,
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        })?;
        c.send(&ClientFrame::Login {
            user,
            device,
            token: token.as_bytes().to_vec().into(),
        })?;
        match c.recv()? {
            ServerFrame::HelloOk { .. } => {}
            other => return Err(ClientError::Unexpected(Box::new(other))),
        }
        match c.recv()? {
            ServerFrame::LoginOk { .. } => Ok(c),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Changes the read timeout.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), ClientError> {
        Ok(self.stream.set_read_timeout(Some(timeout))?)
    }

    /// Writes one frame.
    pub fn send(&mut self, f: &ClientFrame) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        self.send_raw(&b)
    }

    /// Writes raw bytes (tests use this for malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        Ok(self.stream.write_all(bytes)?)
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
                Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(frames)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The underlying socket (tests use it to half-close or inspect).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}
