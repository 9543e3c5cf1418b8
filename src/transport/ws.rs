//! WebSocket (RFC 6455) server side: the HTTP upgrade and the framing.
//!
//! Gatehouse frames travel as the payload of binary WebSocket messages; the payloads, joined
//! in order, form the same byte stream a TCP client sends, so the protocol layer above sees no
//! difference. The server sends each protocol frame as one binary message.
//!
//! tungstenite supplies the frame-header codec and the accept-key derivation; httparse the
//! request head. Its `WebSocket` type is not used: it owns a read buffer per connection and
//! wants a blocking `Read + Write` stream, where the gateway reads every connection through
//! one per-shard scratch buffer. Payloads are unmasked straight into the caller's buffer as
//! they arrive, so a large message is never held here; only a split frame header (at most
//! 14 bytes), a control frame's payload (at most 125 bytes) or an unfinished request head waits.
//!
//! Must never: do I/O, read a clock, or accept an unmasked client frame.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::limits;

/// A WebSocket failure on one connection; the bytes for the peer (an HTTP error response or a
/// Close frame) are already in the reply buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("websocket: {message}")]
pub struct WsError {
    /// Close code sent (or HTTP status for a refused upgrade).
    pub code: u16,
    /// What was wrong.
    pub message: String,
}

#[derive(Debug)]
enum Rx {
    /// Waiting for (the rest of) an HTTP request head.
    Upgrade,
    /// Waiting for (the rest of) a frame header.
    Header,
    /// Inside a frame's payload.
    Payload {
        left: u64,
        mask: [u8; 4],
        pos: usize,
        kind: Kind,
    },
    /// A Close was exchanged or sent: input is ignored.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Data,
    Ping,
    Pong,
    Close,
}

/// One connection's WebSocket state.
#[derive(Debug)]
pub struct WsSession {
    rx: Rx,
    /// Unfinished request head, split frame header, or control payload; empty when idle.
    held: Vec<u8>,
    /// A fragmented data message is in progress (continuation frames are expected).
    in_message: bool,
}

/// What a chunk of input produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WsProgress {
    /// The upgrade completed during this input.
    pub upgraded_now: bool,
    /// The peer sent Close (answered in the reply buffer): no more input will come.
    pub peer_closed: bool,
}

/// Largest HTTP request head accepted for the upgrade.
pub const UPGRADE_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Headers parsed in the upgrade request.
const UPGRADE_HEADERS_MAX: usize = 32;

/// Header of a server-to-client binary frame carrying `len` payload bytes, written at the end
/// of `out` (2, 4 or 10 bytes; servers do not mask).
pub fn binary_header(len: usize, out: &mut [u8; limits::WS_HEADER_BYTES_MAX]) -> usize {
    out[0] = 0x82;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A server Close frame with `code` and a reason (truncated to fit a control frame).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut reason = &reason.as_bytes()[..reason.len().min(limits::WS_CONTROL_PAYLOAD_MAX - 2)];
    while std::str::from_utf8(reason).is_err() {
        reason = &reason[..reason.len() - 1];
    }
    let mut f = Vec::with_capacity(4 + reason.len());
    let header = FrameHeader {
        opcode: OpCode::Control(Control::Close),
        ..FrameHeader::default()
    };
    header
        .format(2 + reason.len() as u64, &mut f)
        .expect("writing to a Vec cannot fail");
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(reason);
    f
}

fn control_frame(control: Control, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(2 + payload.len());
    let header = FrameHeader {
        opcode: OpCode::Control(control),
        ..FrameHeader::default()
    };
    header
        .format(payload.len() as u64, &mut f)
        .expect("writing to a Vec cannot fail");
    f.extend_from_slice(payload);
    f
}

fn http_error(status: u16, reason: &str, detail: &str, reply: &mut Vec<u8>) -> WsError {
    let body = format!("{detail}\n");
    reply.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n{body}",
            body.len(),
            if status == 426 { "Sec-WebSocket-Version: 13\r\n" } else { "" },
        )
        .as_bytes(),
    );
    WsError {
        code: status,
        message: detail.to_string(),
    }
}

fn protocol_close(code: u16, message: &str, reply: &mut Vec<u8>) -> WsError {
    reply.extend_from_slice(&close_frame(code, message));
    WsError {
        code,
        message: message.to_string(),
    }
}

impl Default for WsSession {
    fn default() -> Self {
        Self::new()
    }
}

impl WsSession {
    /// A session waiting for its upgrade request.
    pub fn new() -> WsSession {
        WsSession {
            rx: Rx::Upgrade,
            held: Vec::new(),
            in_message: false,
        }
    }

    /// Whether the upgrade is done (protocol frames may be sent).
    pub fn is_open(&self) -> bool {
        !matches!(self.rx, Rx::Upgrade | Rx::Closed)
    }

    /// Whether the upgrade has been answered (101), even if the session has closed since.
    pub fn upgraded(&self) -> bool {
        !matches!(self.rx, Rx::Upgrade)
    }

    /// Bytes held for a split header or control payload.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// Marks the session closed after the server queued its own Close frame.
    pub fn mark_closed(&mut self) {
        self.rx = Rx::Closed;
        self.held = Vec::new();
    }

    /// Feeds input. Appends the payload of binary messages to `app` and bytes for the peer
    /// (the 101 response, pongs, Close replies, errors) to `reply`, which goes out as is.
    pub fn handle_input(
        &mut self,
        mut data: &[u8],
        app: &mut Vec<u8>,
        reply: &mut Vec<u8>,
    ) -> Result<WsProgress, WsError> {
        let mut progress = WsProgress::default();
        while !data.is_empty() {
            match &mut self.rx {
                Rx::Closed => return Ok(progress),
                Rx::Upgrade => {
                    let used = self.upgrade(data, reply)?;
                    data = &data[used..];
                    if self.is_open() {
                        progress.upgraded_now = true;
                    }
                }
                Rx::Header => {
                    let used = self.header(data, reply)?;
                    data = &data[used..];
                }
                Rx::Payload {
                    left,
                    mask,
                    pos,
                    kind,
                } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    let (chunk, rest) = data.split_at(n);
                    let out = if *kind == Kind::Data {
                        &mut *app
                    } else {
                        &mut self.held
                    };
                    let start = out.len();
                    out.extend_from_slice(chunk);
                    for (i, b) in out[start..].iter_mut().enumerate() {
                        *b ^= mask[(*pos + i) % 4];
                    }
                    *pos = (*pos + n) % 4;
                    *left -= n as u64;
                    data = rest;
                    if *left == 0 {
                        let kind = *kind;
                        self.rx = Rx::Header;
                        if self.control_done(kind, reply)? {
                            progress.peer_closed = true;
                            return Ok(progress);
                        }
                    }
                }
            }
        }
        // A zero-length payload completes without more input.
        if let Rx::Payload { left: 0, kind, .. } = self.rx {
            self.rx = Rx::Header;
            if self.control_done(kind, reply)? {
                progress.peer_closed = true;
            }
        }
        Ok(progress)
    }

    /// Handles a finished control frame's payload (in `held`); true when it was a Close.
    fn control_done(&mut self, kind: Kind, reply: &mut Vec<u8>) -> Result<bool, WsError> {
        let payload = std::mem::take(&mut self.held);
        match kind {
            Kind::Data | Kind::Pong => Ok(false),
            Kind::Ping => {
                reply.extend_from_slice(&control_frame(Control::Pong, &payload));
                Ok(false)
            }
            Kind::Close => {
                // Echo the peer's code (RFC 6455 5.5.1), or 1000 when it sent none.
                let code = if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1000
                };
                reply.extend_from_slice(&close_frame(code, ""));
                self.rx = Rx::Closed;
                Ok(true)
            }
        }
    }

    /// Parses one frame header from `held` + `data`; returns how much of `data` it used.
    fn header(&mut self, data: &[u8], reply: &mut Vec<u8>) -> Result<usize, WsError> {
        let joined;
        let (buf, held_before): (&[u8], usize) = if self.held.is_empty() {
            (data, 0)
        } else {
            let take = data.len().min(limits::WS_HEADER_BYTES_MAX_CLIENT);
            let mut v = std::mem::take(&mut self.held);
            let before = v.len();
            v.extend_from_slice(&data[..take]);
            joined = v;
            (&joined[..], before)
        };
        let mut cur = Cursor::new(buf);
        let parsed = FrameHeader::parse(&mut cur)
            .map_err(|e| protocol_close(1002, &format!("bad frame header: {e}"), reply))?;
        let Some((h, len)) = parsed else {
            // Keep the split header (at most 14 bytes) for the next read.
            self.held = buf.to_vec();
            return Ok(data.len());
        };
        let used = cur.position() as usize - held_before;
        if h.rsv1 || h.rsv2 || h.rsv3 {
            return Err(protocol_close(
                1002,
                "reserved bits set (no extension was negotiated)",
                reply,
            ));
        }
        let Some(mask) = h.mask else {
            return Err(protocol_close(1002, "client frames must be masked", reply));
        };
        let kind = match h.opcode {
            OpCode::Data(Data::Binary) if !self.in_message => Kind::Data,
            OpCode::Data(Data::Continue) if self.in_message => Kind::Data,
            OpCode::Data(Data::Text) => {
                return Err(protocol_close(
                    1003,
                    "text messages are not accepted: send Gatehouse frames as binary messages",
                    reply,
                ))
            }
            OpCode::Data(Data::Continue) => {
                return Err(protocol_close(
                    1002,
                    "continuation frame without a message",
                    reply,
                ))
            }
            OpCode::Data(_) => {
                return Err(protocol_close(
                    1002,
                    "new message before the last one finished",
                    reply,
                ))
            }
            OpCode::Control(c) => {
                if !h.is_final || len > limits::WS_CONTROL_PAYLOAD_MAX as u64 {
                    return Err(protocol_close(
                        1002,
                        "control frames must be final and at most 125 bytes",
                        reply,
                    ));
                }
                match c {
                    Control::Ping => Kind::Ping,
                    Control::Pong => Kind::Pong,
                    Control::Close => Kind::Close,
                    Control::Reserved(_) => {
                        return Err(protocol_close(1002, "reserved control opcode", reply))
                    }
                }
            }
        };
        if kind == Kind::Data {
            if len > limits::WS_FRAME_PAYLOAD_MAX {
                return Err(protocol_close(
                    1009,
                    &format!(
                        "frame of {len} bytes is over the limit of {}",
                        limits::WS_FRAME_PAYLOAD_MAX
                    ),
                    reply,
                ));
            }
            self.in_message = !h.is_final;
        }
        self.rx = Rx::Payload {
            left: len,
            mask,
            pos: 0,
            kind,
        };
        Ok(used)
    }

    /// Reads the upgrade request head; answers 101 when valid. Returns how much of `data` it
    /// used (bytes after the head are frames).
    fn upgrade(&mut self, data: &[u8], reply: &mut Vec<u8>) -> Result<usize, WsError> {
        let held_before = self.held.len();
        let room = UPGRADE_HEAD_BYTES_MAX.saturating_sub(held_before);
        let take = data.len().min(room + 1);
        self.held.extend_from_slice(&data[..take]);
        let mut headers = [httparse::EMPTY_HEADER; UPGRADE_HEADERS_MAX];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&self.held) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if self.held.len() > UPGRADE_HEAD_BYTES_MAX {
                    return Err(http_error(
                        431,
                        "Request Header Fields Too Large",
                        "request head over 8 KiB",
                        reply,
                    ));
                }
                return Ok(take);
            }
            Err(e) => {
                return Err(http_error(
                    400,
                    "Bad Request",
                    &format!("this port speaks WebSocket; expected an HTTP upgrade request ({e})"),
                    reply,
                ))
            }
        };
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::trim)
        };
        let has_token = |name: &str, token: &str| {
            header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        };
        if req.method != Some("GET") {
            return Err(http_error(
                405,
                "Method Not Allowed",
                "a WebSocket upgrade is a GET",
                reply,
            ));
        }
        if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
            return Err(http_error(
                426,
                "Upgrade Required",
                "this port speaks WebSocket: send Upgrade: websocket and Connection: Upgrade",
                reply,
            ));
        }
        if header("sec-websocket-version") != Some("13") {
            return Err(http_error(
                426,
                "Upgrade Required",
                "only WebSocket version 13 is supported",
                reply,
            ));
        }
        let Some(key) = header("sec-websocket-key").filter(|k| !k.is_empty()) else {
            return Err(http_error(
                400,
                "Bad Request",
                "missing Sec-WebSocket-Key",
                reply,
            ));
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        // Offer the subprotocol back only when the client asked for it.
        let proto = if has_token("sec-websocket-protocol", limits::WS_SUBPROTOCOL) {
            format!("Sec-WebSocket-Protocol: {}\r\n", limits::WS_SUBPROTOCOL)
        } else {
            String::new()
        };
        reply.extend_from_slice(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{proto}\r\n"
            )
            .as_bytes(),
        );
        let used = head_len - held_before;
        self.held = Vec::new();
        self.rx = Rx::Header;
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        if payload.len() < 126 {
            f.push(0x80 | payload.len() as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    const REQ: &str = "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn open() -> WsSession {
        let mut ws = WsSession::new();
        let (mut app, mut reply) = (Vec::new(), Vec::new());
        let p = ws
            .handle_input(REQ.as_bytes(), &mut app, &mut reply)
            .unwrap();
        assert!(p.upgraded_now);
        let text = String::from_utf8(reply).unwrap();
        // RFC 6455's worked example.
        assert!(
            text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{text}"
        );
        ws
    }

    #[test]
    fn upgrade_then_binary_split_anywhere() {
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut wire = masked(0x2, false, &payload[..200]);
        wire.extend(masked(0x9, true, b"hi"));
        wire.extend(masked(0x0, true, &payload[200..]));
        for cut in 0..wire.len() {
            let mut ws = open();
            let (mut app, mut reply) = (Vec::new(), Vec::new());
            ws.handle_input(&wire[..cut], &mut app, &mut reply).unwrap();
            ws.handle_input(&wire[cut..], &mut app, &mut reply).unwrap();
            assert_eq!(app, payload, "cut {cut}");
            assert_eq!(reply, control_frame(Control::Pong, b"hi"), "cut {cut}");
            assert_eq!(ws.held_bytes(), 0);
        }
    }

    #[test]
    fn refuses_unmasked_text_and_oversized_control() {
        for (frame, code) in [
            (vec![0x82, 0x01, 0x00], 1002),
            (masked(0x1, true, b"hello"), 1003),
            (masked(0x9, true, &[0u8; 126]), 1002),
            (masked(0x0, true, b"x"), 1002),
        ] {
            let mut ws = open();
            let (mut app, mut reply) = (Vec::new(), Vec::new());
            let e = ws.handle_input(&frame, &mut app, &mut reply).unwrap_err();
            assert_eq!(e.code, code, "{e}");
            assert_eq!(reply[0], 0x88, "a Close frame goes back");
            assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), code);
        }
    }

    #[test]
    fn refuses_non_upgrade_requests_with_http_errors() {
        for (req, status) in [
            ("POST / HTTP/1.1\r\n\r\n", 405),
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426),
            ("\x00\x00\x00\x0a\x01GHSE\x00\x01\x00\x01", 400),
        ] {
            let mut ws = WsSession::new();
            let (mut app, mut reply) = (Vec::new(), Vec::new());
            let e = ws
                .handle_input(req.as_bytes(), &mut app, &mut reply)
                .unwrap_err();
            assert_eq!(e.code, status, "{e}");
            let text = String::from_utf8_lossy(&reply);
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        }
        let mut ws = WsSession::new();
        let (mut app, mut reply) = (Vec::new(), Vec::new());
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(UPGRADE_HEAD_BYTES_MAX)
        );
        assert_eq!(
            ws.handle_input(big.as_bytes(), &mut app, &mut reply)
                .unwrap_err()
                .code,
            431
        );
    }

    #[test]
    fn close_is_echoed() {
        let mut ws = open();
        let (mut app, mut reply) = (Vec::new(), Vec::new());
        let p = ws
            .handle_input(
                &masked(0x8, true, &1001u16.to_be_bytes()),
                &mut app,
                &mut reply,
            )
            .unwrap();
        assert!(p.peer_closed);
        assert_eq!(reply, close_frame(1001, ""));
    }

    #[test]
    fn binary_header_lengths() {
        let mut h = [0u8; limits::WS_HEADER_BYTES_MAX];
        assert_eq!(binary_header(5, &mut h), 2);
        assert_eq!(&h[..2], &[0x82, 5]);
        assert_eq!(binary_header(300, &mut h), 4);
        assert_eq!(&h[..4], &[0x82, 126, 1, 44]);
        assert_eq!(binary_header(70_000, &mut h), 10);
        assert_eq!(h[1], 127);
    }
}
