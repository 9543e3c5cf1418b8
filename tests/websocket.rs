//! WebSocket end to end: a real WebSocket client (tungstenite) against the gateway's
//! WebSocket listener, plain and over TLS, talking to plain TCP users.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use common::*;
use gatehouse::ids::{DeviceId, UserId};
use gatehouse::proto::{split_frame, ClientFrame, ServerFrame, HELLO_MAGIC};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// A Gatehouse session over a WebSocket.
struct WsClient<S: Read + Write> {
    ws: WebSocket<S>,
    buf: BytesMut,
}

impl<S: Read + Write> WsClient<S> {
    fn send(&mut self, frames: &[ClientFrame]) {
        let mut b = BytesMut::new();
        for f in frames {
            f.encode(&mut b);
        }
        self.ws.send(Message::Binary(b.freeze())).unwrap();
    }

    /// The next server frame; asserts every binary message holds whole frames.
    fn recv(&mut self) -> ServerFrame {
        loop {
            if let Some(raw) = split_frame(&self.buf, 1 << 24).unwrap() {
                let f = ServerFrame::decode(raw.frame_type, raw.payload).unwrap();
                let n = raw.total_bytes;
                self.buf.advance(n);
                return f;
            }
            assert!(self.buf.is_empty(), "a message ended inside a frame");
            match self.ws.read().expect("websocket read") {
                Message::Binary(b) => self.buf.extend_from_slice(&b),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    fn log_in(&mut self, user: u64) {
        // HELLO and LOGIN in one message, as a browser would send them.
        self.send(&[
            ClientFrame::Hello {
                magic: HELLO_MAGIC,
                min_version: 1,
                max_version: 1,
            },
            ClientFrame::Login {
                user: UserId(user),
                device: DeviceId(1),
                token: token(user, 1).into_bytes().into(),
            },
        ]);
        assert!(matches!(self.recv(), ServerFrame::HelloOk { .. }));
        assert!(matches!(self.recv(), ServerFrame::LoginOk { .. }));
    }
}

fn ws_connect(addr: SocketAddr) -> WsClient<TcpStream> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/chat"), tcp).expect("upgrade");
    assert_eq!(resp.status(), 101);
    WsClient {
        ws,
        buf: BytesMut::new(),
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn wss_connect(addr: SocketAddr, pki: &TestPki) -> WsClient<TlsStream> {
    let tls = pki.client();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let conn = rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone()).unwrap();
    let stream = rustls::StreamOwned::new(conn, tcp);
    let (ws, resp) =
        tungstenite::client(format!("wss://localhost:{}/", addr.port()), stream).expect("upgrade");
    assert_eq!(resp.status(), 101);
    WsClient {
        ws,
        buf: BytesMut::new(),
    }
}

fn exchange<S: Read + Write>(
    ws: &mut WsClient<S>,
    ws_user: u64,
    tcp: &mut gatehouse::client::Client,
    tcp_user: u64,
) {
    ws.send(&[ClientFrame::Send {
        client_msg_id: 1,
        recipient: UserId(tcp_user),
        body: b"from the websocket".to_vec().into(),
    }]);
    assert!(matches!(
        ws.recv(),
        ServerFrame::SendAck {
            client_msg_id: 1,
            ..
        }
    ));
    let (id, from, body) = expect_deliver(tcp);
    assert_eq!(
        (from, body.as_slice()),
        (UserId(ws_user), &b"from the websocket"[..])
    );
    tcp.ack(&[id]).unwrap();
    assert!(matches!(ws.recv(), ServerFrame::Receipt { .. }));
    let big = vec![3u8; 70_000];
    tcp.send_message(2, UserId(ws_user), &big).unwrap();
    expect_send_ack(tcp, 2);
    match ws.recv() {
        ServerFrame::Deliver {
            sender,
            body,
            server_msg_id,
            ..
        } => {
            assert_eq!(sender, UserId(tcp_user));
            assert_eq!(body.as_ref(), &big[..]);
            ws.send(&[ClientFrame::Ack {
                ids: vec![server_msg_id],
            }]);
        }
        other => panic!("expected DELIVER, got {other:?}"),
    }
    // A burst that mixes bodies copied into the connection's output (up to
    // `limits::COPIED_BODY_BYTES_MAX`) and bodies queued shared: each arrives whole, in its own
    // binary message, in order.
    let bound = gatehouse::limits::COPIED_BODY_BYTES_MAX;
    let sizes = [1, bound - 1, bound, bound + 1, 4000, 0, 3, 70_000, 7, bound];
    let body = |i: usize, n: usize| -> Vec<u8> { (0..n).map(|k| (i * 7 + k) as u8).collect() };
    for (i, &n) in sizes.iter().enumerate() {
        tcp.send_message(10 + i as u64, UserId(ws_user), &body(i, n))
            .unwrap();
        expect_send_ack(tcp, 10 + i as u64);
    }
    let mut ids = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        match ws.recv() {
            ServerFrame::Deliver {
                body: got,
                server_msg_id,
                ..
            } => {
                assert_eq!(got.as_ref(), &body(i, n)[..], "message {i} ({n} bytes)");
                ids.push(server_msg_id);
            }
            other => panic!("expected DELIVER {i}, got {other:?}"),
        }
    }
    ws.send(&[ClientFrame::Ack { ids }]);
}

#[test]
fn websocket_users_talk_to_tcp_users_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ws_config(dir.path(), None);
    cfg.limits.max_frame_bytes = 128 * 1024;
    let node = start(cfg);
    let ws_addr = node.ws_addr.expect("WebSocket listener");
    for shard in 0..2u16 {
        let w = user_on_shard(100 + u64::from(shard) * 100, shard, 2);
        let t = user_on_shard(1000, 1 - shard, 2);
        let mut ws = ws_connect(ws_addr);
        ws.log_in(w);
        let mut tcp = login(node.local_addr, t, 1);
        exchange(&mut ws, w, &mut tcp, t);
        // Ping/pong at the WebSocket level is answered too.
        ws.ws.send(Message::Ping(b"hi".to_vec().into())).unwrap();
        match ws.ws.read().unwrap() {
            Message::Pong(p) => assert_eq!(p.as_ref(), b"hi"),
            other => panic!("expected a pong, got {other:?}"),
        }
        // A clean close is answered with a Close.
        ws.ws.close(None).unwrap();
        loop {
            match ws.ws.read() {
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed) => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    let (_, body) = http(node.admin_addr.unwrap(), "GET", "/metrics");
    assert_eq!(
        metric(&body, "gatehouse_websocket_upgrades_total", ""),
        2.0,
        "{body}"
    );
    node.shutdown().unwrap();
}

#[test]
fn secure_websocket_works_and_gets_a_clean_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut cfg = ws_config(&dir.path().join("data"), Some(&pki));
    cfg.limits.max_frame_bytes = 128 * 1024;
    let node = start(cfg);
    let addr = node.ws_addr.unwrap();
    let w = user_on_shard(100, 1, 2);
    let t = user_on_shard(100, 0, 2);
    let mut ws = wss_connect(addr, &pki);
    ws.log_in(w);
    let mut tcp = login(node.local_addr, t, 1);
    exchange(&mut ws, w, &mut tcp, t);
    // Draining the node: GO_AWAY in a binary message, then a Close frame (1000).
    node.state()
        .stop
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(ws.recv(), ServerFrame::GoAway { .. }));
    match ws.ws.read() {
        Ok(Message::Close(Some(c))) => assert_eq!(c.code, CloseCode::Normal),
        other => panic!("expected a Close frame, got {other:?}"),
    }
    drop(tcp);
    node.wait().unwrap();
}

fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Reads until EOF; returns everything.
fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn close_code(frame: &[u8]) -> u16 {
    assert_eq!(frame.first(), Some(&0x88), "a Close frame: {frame:?}");
    u16::from_be_bytes([frame[2], frame[3]])
}

#[test]
fn bad_websocket_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ws_config(dir.path(), None);
    cfg.limits.login_timeout_ms = 600;
    cfg.limits.max_frame_bytes = 128 * 1024;
    let node = start(cfg);
    let addr = node.ws_addr.unwrap();
    let w = user_on_shard(100, 0, 2);
    let t = user_on_shard(100, 1, 2);
    let mut ws = ws_connect(addr);
    ws.log_in(w);
    let mut tcp = login(node.local_addr, t, 1);

    // 1. A plain HTTP request without the upgrade: 426 with the reason.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let text = String::from_utf8(read_all(&mut s)).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 426 ") && text.contains("speaks WebSocket"),
        "{text}"
    );

    // 2. A TCP Gatehouse client on the WebSocket port: 400 naming the problem.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut hello = BytesMut::new();
    ClientFrame::Hello {
        magic: HELLO_MAGIC,
        min_version: 1,
        max_version: 1,
    }
    .encode(&mut hello);
    s.write_all(&hello).unwrap();
    let text = String::from_utf8_lossy(&read_all(&mut s)).to_string();
    assert!(
        text.starts_with("HTTP/1.1 400 ") && text.contains("speaks WebSocket"),
        "{text}"
    );

    // 3. A text message: Close 1003 with the reason.
    let mut c = ws_connect(addr);
    c.ws.send(Message::Text("hello".into())).unwrap();
    match c.ws.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Unsupported);
            assert!(f.reason.contains("binary"), "{}", f.reason);
        }
        other => panic!("expected Close 1003, got {other:?}"),
    }

    // 4. An unmasked client frame: Close 1002.
    let mut s = raw_upgrade(addr);
    s.write_all(&[0x82, 0x01, 0x00]).unwrap();
    assert_eq!(close_code(&read_all(&mut s)), 1002);

    // 5. A broken Gatehouse frame inside a good WebSocket message: the protocol's own ERROR,
    // in a binary message, then Close.
    let mut c = ws_connect(addr);
    c.ws.send(Message::Binary(vec![0, 0, 0, 0].into())).unwrap();
    match c.recv() {
        ServerFrame::Error {
            code, fatal: true, ..
        } => {
            assert_eq!(code, gatehouse::proto::ErrorCode::MalformedFrame as u16)
        }
        other => panic!("expected a fatal ERROR, got {other:?}"),
    }

    // 6. A slow upgrade: half a request head, then silence, is cut at the login timeout.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost:").unwrap();
    let started = std::time::Instant::now();
    let got = read_all(&mut s);
    assert!(got.is_empty(), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The logged-in users never noticed.
    exchange(&mut ws, w, &mut tcp, t);
    let (_, body) = http(node.admin_addr.unwrap(), "GET", "/metrics");
    assert!(closed_by(&body, "websocket_error") >= 4.0, "{body}");
    assert_eq!(closed_by(&body, "handshake_timeout"), 1.0);
    node.shutdown().unwrap();
}
