//! Transports under the protocol: plain TCP, TLS, WebSocket, and WebSocket over TLS.
//!
//! A connection's [`Layers`] turn socket bytes into protocol bytes on the way in (TLS decrypt,
//! then WebSocket unframing) and protocol frames into socket bytes on the way out (WebSocket
//! framing when a frame is queued, TLS encryption when the queue is written). Plain TCP
//! connections carry no `Layers` at all. Nothing here touches a socket or a clock: the
//! connection task (`runtime::conn`) lends the buffers and does the I/O.
//!
//! A connection's layers travel with its socket when it moves to its user's owner shard after
//! login, like the unread bytes do.

pub mod record;
pub mod tls;
pub mod ws;

use std::sync::Arc;

pub use tls::{TlsContext, TlsError, TlsSession};
pub use ws::{WsError, WsSession};

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Gatehouse frames over TCP.
    Tcp,
    /// Gatehouse frames over TLS.
    Tls,
    /// Gatehouse frames in binary WebSocket messages.
    Ws,
    /// WebSocket over TLS (`wss://`).
    Wss,
}

impl ListenerKind {
    /// Its name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    /// Whether it terminates TLS.
    pub fn tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    /// Whether it speaks WebSocket.
    pub fn websocket(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

/// The transport state of one non-plain connection.
#[derive(Debug)]
pub struct Layers {
    /// TLS, when the listener terminates it.
    pub tls: Option<TlsSession>,
    /// WebSocket, when the listener speaks it (boxed: TLS-only connections pay 8 bytes).
    pub ws: Option<Box<WsSession>>,
    /// Bytes ready for the socket (ciphertext, or raw bytes on plain WebSocket) that it has
    /// not taken yet; written before anything else. Empty (no allocation) when idle.
    pub wire_out: Vec<u8>,
    /// How much of `wire_out` was already written.
    pub wire_off: usize,
    /// The close sequence (WebSocket Close, TLS close_notify) has been queued.
    pub goodbye_sent: bool,
}

impl Layers {
    /// Layers for a new connection on a `kind` listener (None for plain TCP).
    pub fn for_listener(
        kind: ListenerKind,
        tls: Option<&Arc<TlsContext>>,
    ) -> Result<Option<Box<Layers>>, TlsError> {
        if kind == ListenerKind::Tcp {
            return Ok(None);
        }
        let tls = match (kind.tls(), tls) {
            (true, Some(ctx)) => Some(TlsSession::new(ctx.config.clone())?),
            _ => None,
        };
        Ok(Some(Box::new(Layers {
            tls,
            ws: kind.websocket().then(|| Box::new(WsSession::new())),
            wire_out: Vec::new(),
            wire_off: 0,
            goodbye_sent: false,
        })))
    }

    /// Whether protocol frames can be sent: TLS established and WebSocket upgraded.
    pub fn ready(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| t.is_established())
            && self.ws.as_ref().is_none_or(|w| w.is_open())
    }

    /// Whether queued output may be written: the TLS handshake and the WebSocket upgrade are
    /// done (a WebSocket the peer has closed still writes what was queued before).
    pub fn can_flush(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| t.is_established())
            && self.ws.as_ref().is_none_or(|w| w.upgraded())
    }

    /// Whether protocol frames must be wrapped in WebSocket frames.
    pub fn frames_in_websocket(&self) -> bool {
        self.ws.as_ref().is_some_and(|w| w.is_open())
    }

    /// Bytes of `wire_out` not written yet.
    pub fn wire_pending(&self) -> usize {
        self.wire_out.len() - self.wire_off
    }

    /// Marks `n` more bytes of `wire_out` written; frees it once all are.
    pub fn wire_written(&mut self, n: usize) {
        self.wire_off += n;
        debug_assert!(self.wire_off <= self.wire_out.len());
        if self.wire_off == self.wire_out.len() {
            self.wire_out = Vec::new();
            self.wire_off = 0;
        }
    }

    /// Appends bytes that must reach the peer through TLS when there is TLS (WebSocket
    /// replies, the upgrade response): encrypted here, or queued raw on plain WebSocket.
    pub fn send_plain(&mut self, bytes: &[u8]) -> Result<(), TlsError> {
        match &mut self.tls {
            Some(t) if t.is_established() => t.encrypt(bytes, &mut self.wire_out),
            Some(_) => Ok(()),
            None => {
                self.wire_out.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// Queues the polite end of the connection once: a WebSocket Close (1000 or `code`) and a
    /// TLS close_notify.
    pub fn goodbye(&mut self, code: u16, reason: &str) {
        if self.goodbye_sent {
            return;
        }
        self.goodbye_sent = true;
        if let Some(ws) = &mut self.ws {
            if ws.is_open() {
                let frame = ws::close_frame(code, reason);
                ws.mark_closed();
                let _ = self.send_plain(&frame);
            }
        }
        if let Some(t) = &mut self.tls {
            t.close_notify(&mut self.wire_out);
        }
    }
}
