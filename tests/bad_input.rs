//! Bad input: every case gets an ERROR frame naming the problem (and a close where the stream
//! cannot continue); other connections and acknowledged messages are unaffected.

mod common;

use std::time::Duration;

use common::*;
use gatehouse::client::Client;
use gatehouse::ids::{DeviceId, ServerMsgId, UserId};
use gatehouse::proto::{ClientFrame, ErrorCode, ServerFrame, HELLO_MAGIC};

fn hello(c: &mut Client) {
    c.send(&ClientFrame::Hello {
        magic: HELLO_MAGIC,
        min_version: 1,
        max_version: 1,
    })
    .unwrap();
    assert!(matches!(
        c.recv_frame().unwrap(),
        ServerFrame::HelloOk { .. }
    ));
}

fn fresh(addr: std::net::SocketAddr) -> Client {
    Client::connect(addr, TIMEOUT).unwrap()
}

/// Sends `bytes` on a new connection (after `setup`) and expects a fatal `code` then a close.
fn expect_fatal(
    addr: std::net::SocketAddr,
    setup: impl FnOnce(&mut Client),
    bytes: &[u8],
    code: ErrorCode,
) -> String {
    let mut c = fresh(addr);
    setup(&mut c);
    c.send_raw(bytes).unwrap();
    let msg = match c.recv_frame().unwrap() {
        ServerFrame::Error {
            code: got,
            fatal,
            message,
            ..
        } => {
            assert_eq!(got, code as u16, "message: {message}");
            assert!(fatal, "{code:?} must be fatal");
            message
        }
        other => panic!("expected ERROR {code:?}, got {other:?}"),
    };
    expect_closed(&mut c);
    msg
}

fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    v.push(ty);
    v.extend_from_slice(payload);
    v
}

#[test]
fn every_bad_input_gets_a_named_error_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_frame_bytes = 4096;
    // A full member list must fit a frame: 400 members take 3,620 bytes.
    cfg.limits.group_members_max = 400;
    let server = start(cfg);
    let addr = server.local_addr;
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));

    // A good pair with one acknowledged message waiting, and one online session.
    let mut ca = login(addr, a, 1);
    ca.send_message(1, UserId(b), b"before the storm").unwrap();
    let acked = expect_send_ack(&mut ca, 1);

    let none = |_: &mut Client| {};
    let logged_in = |c: &mut Client| {
        hello(c);
        c.send(&ClientFrame::Login {
            user: UserId(77),
            device: DeviceId(1),
            token: token(77, 1).into_bytes().into(),
        })
        .unwrap();
        let f = c.recv_frame().unwrap();
        assert!(matches!(f, ServerFrame::LoginOk { .. }), "{f:?}");
    };

    // Oversized frame, before and after login.
    // Before login the limit is 1024 bytes (HELLO and LOGIN are small); after login it is the
    // configured maximum (4096 here).
    let msg = expect_fatal(addr, none, &[0, 1, 0, 0, 1], ErrorCode::FrameTooLarge);
    assert!(msg.contains("65536") && msg.contains("1024"), "{msg}");
    let mut pre_login = 2000u32.to_be_bytes().to_vec();
    pre_login.push(1);
    expect_fatal(addr, none, &pre_login, ErrorCode::FrameTooLarge);
    let mut big = 5000u32.to_be_bytes().to_vec();
    big.push(3);
    let msg = expect_fatal(addr, logged_in, &big, ErrorCode::FrameTooLarge);
    assert!(msg.contains("4096"), "{msg}");
    // An HTTP request is not a Gatehouse client: its first bytes read as a huge length.
    expect_fatal(
        addr,
        none,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ErrorCode::FrameTooLarge,
    );
    // Empty frame, unknown type, malformed fields (truncated PING, trailing bytes).
    expect_fatal(addr, none, &[0, 0, 0, 0], ErrorCode::MalformedFrame);
    expect_fatal(
        addr,
        logged_in,
        &frame(0x7f, b""),
        ErrorCode::UnknownFrameType,
    );
    let msg = expect_fatal(
        addr,
        logged_in,
        &frame(0x06, &[1, 2, 3]),
        ErrorCode::MalformedFrame,
    );
    assert!(msg.contains("PING"), "{msg}");
    expect_fatal(
        addr,
        logged_in,
        &frame(0x04, &[0, 2, 0, 0, 0, 0, 0, 0, 0, 1]),
        ErrorCode::MalformedFrame,
    );
    // Server frame types from a client are unknown.
    expect_fatal(
        addr,
        logged_in,
        &frame(0x84, &[0; 30]),
        ErrorCode::UnknownFrameType,
    );
    // Frames before HELLO / before LOGIN / HELLO twice.
    let send = frame(0x03, &[0; 16]);
    let msg = expect_fatal(addr, none, &send, ErrorCode::UnexpectedFrame);
    assert!(msg.contains("HELLO"), "{msg}");
    let msg = expect_fatal(addr, hello, &send, ErrorCode::UnexpectedFrame);
    assert!(msg.contains("LOGIN"), "{msg}");
    expect_fatal(
        addr,
        logged_in,
        &frame(0x01, b"GHSE\0\x01\0\x01"),
        ErrorCode::UnexpectedFrame,
    );
    // Version and magic.
    expect_fatal(
        addr,
        none,
        &frame(0x01, b"GHSE\0\x02\0\x05"),
        ErrorCode::UnsupportedVersion,
    );
    expect_fatal(
        addr,
        none,
        &frame(0x01, b"XXXX\0\x01\0\x01"),
        ErrorCode::UnsupportedVersion,
    );
    // Tokens: garbage, forged, other user, expired.
    let login_frame = |user: u64, tok: &str| {
        let mut b = bytes::BytesMut::new();
        ClientFrame::Login {
            user: UserId(user),
            device: DeviceId(1),
            token: tok.as_bytes().to_vec().into(),
        }
        .encode(&mut b);
        b.to_vec()
    };
    let msg = expect_fatal(addr, hello, &login_frame(5, "garbage"), ErrorCode::BadToken);
    assert!(msg.contains("malformed"), "{msg}");
    let forged = token(5, 1).replace("v1.5.1.", "v1.5.1.9");
    expect_fatal(addr, hello, &login_frame(5, &forged), ErrorCode::BadToken);
    let msg = expect_fatal(
        addr,
        hello,
        &login_frame(6, &token(5, 1)),
        ErrorCode::BadToken,
    );
    assert!(msg.contains("user 5"), "{msg}");
    let expired = keys().mint(UserId(5), DeviceId(1), 1_000);
    let msg = expect_fatal(
        addr,
        hello,
        &login_frame(5, &expired),
        ErrorCode::TokenExpired,
    );
    assert!(msg.contains("expired"), "{msg}");
    expect_fatal(
        addr,
        hello,
        &login_frame(0, &token(0, 1)),
        ErrorCode::BadToken,
    );
    // Truncated frame then EOF: the server just closes that connection.
    let mut c = fresh(addr);
    c.send_raw(&[0, 0, 0, 20, 3, 1, 2]).unwrap();
    c.stream().shutdown(std::net::Shutdown::Write).unwrap();
    expect_closed(&mut c);

    // Non-fatal errors keep the connection: unknown ACK, recipient 0.
    let mut c = login(addr, 77, 1);
    c.ack(&[ServerMsgId(424242)]).unwrap();
    let message = expect_error_with(&mut c, ErrorCode::UnknownAck, false, 424242);
    assert!(message.contains("424242"), "{message}");
    c.send_message(5, UserId(0), b"to nobody").unwrap();
    expect_error_with(&mut c, ErrorCode::BadRecipient, false, 5);
    // A body that fits a SEND frame but not the larger DELIVER frame is refused by name.
    let body_max = gatehouse::proto::body_bytes_max(4096);
    c.send_message(6, UserId(b), &vec![1u8; body_max + 1])
        .unwrap();
    let message = expect_error_with(&mut c, ErrorCode::BodyTooLarge, false, 6);
    assert!(message.contains(&body_max.to_string()), "{message}");
    c.send_message(7, UserId(b), &vec![1u8; body_max]).unwrap();
    expect_send_ack(&mut c, 7);
    c.send(&ClientFrame::Ping { nonce: 3 }).unwrap();
    assert_eq!(c.recv_frame().unwrap(), ServerFrame::Pong { nonce: 3 });

    // Nothing acknowledged was lost and the good session still works.
    ca.send(&ClientFrame::Ping { nonce: 8 }).unwrap();
    assert_eq!(ca.recv_frame().unwrap(), ServerFrame::Pong { nonce: 8 });
    let mut cb = login(addr, b, 1);
    let (id, _, body) = expect_deliver(&mut cb);
    assert_eq!((id, body.as_slice()), (acked, &b"before the storm"[..]));
    // The largest body arrives whole in a DELIVER within the frame limit.
    let (_, _, body) = expect_deliver(&mut cb);
    assert_eq!(body.len(), body_max);
    server.shutdown().unwrap();
}

#[test]
fn login_and_idle_timeouts_close_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.login_timeout_ms = 300;
    cfg.limits.idle_timeout_ms = 600;
    let server = start(cfg);
    let mut silent = fresh(server.local_addr);
    let msg = expect_error(&mut silent, ErrorCode::LoginTimeout);
    assert!(msg.contains("300"), "{msg}");
    expect_closed(&mut silent);

    let mut half = fresh(server.local_addr);
    hello(&mut half);
    expect_error(&mut half, ErrorCode::LoginTimeout);

    let mut idle = login(server.local_addr, 9, 1);
    let mut busy = login(server.local_addr, 10, 1);
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1_200) {
        busy.send(&ClientFrame::Ping { nonce: 1 }).unwrap();
        assert_eq!(busy.recv_frame().unwrap(), ServerFrame::Pong { nonce: 1 });
        std::thread::sleep(Duration::from_millis(100));
    }
    match idle.recv_frame().unwrap() {
        ServerFrame::GoAway { reason, .. } => {
            assert_eq!(reason, gatehouse::proto::GoAwayReason::Idle)
        }
        other => panic!("{other:?}"),
    }
    expect_closed(&mut idle);
    server.shutdown().unwrap();
}

#[test]
fn connection_limit_refuses_politely() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.server.shards = 1;
    cfg.server.max_connections_per_shard = 3;
    let server = start(cfg);
    let held: Vec<Client> = (1..=3).map(|u| login(server.local_addr, u, 1)).collect();
    let mut extra = fresh(server.local_addr);
    let msg = expect_error(&mut extra, ErrorCode::Overloaded);
    assert!(msg.contains("limit"), "{msg}");
    expect_closed(&mut extra);
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let _ok = login(server.local_addr, 4, 1);
    server.shutdown().unwrap();
}
