//! Helpers shared by the end-to-end tests: a real node on loopback with a real LMDB
//! directory, and logged-in clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use gatehouse::auth::TokenKeys;
use gatehouse::client::{Client, ClientError};
use gatehouse::config::Config;
use gatehouse::ids::{owner_shard, DeviceId, ServerMsgId, UserId};
use gatehouse::proto::ServerFrame;
use gatehouse::server::ServerHandle;

pub const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn keys() -> TokenKeys {
    TokenKeys::new(
        gatehouse::auth::parse_key_hex(KEY_HEX, "test").unwrap(),
        None,
    )
}

pub fn token(user: u64, device: u32) -> String {
    let expiry = gatehouse::runtime::now_ms() / 1000 + 3600;
    keys().mint(UserId(user), DeviceId(device), expiry)
}

/// A test configuration: loopback, port 0, 2 shards, data in `dir`.
pub fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.shards = 2;
    c.store.data_dir = dir.to_path_buf();
    c.store.map_size_mib = 64;
    c.auth.key_hex = Some(KEY_HEX.to_string());
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c
}

/// Starts a node. One retry: about 1 in 250 starts on this 2-core box, one shard thread spins
/// inside glommio before it runs its first task, and `server::start` fails after 30 s (an
/// open bug, see docs/architecture.md). A second failure fails the test.
pub fn start(c: Config) -> ServerHandle {
    match gatehouse::server::start(c.clone()) {
        Ok(s) => s,
        Err(e) => {
            // The stuck shard thread of the failed start keeps its LMDB environment open, so
            // the retry uses a fresh directory beside it.
            eprintln!("server start failed ({e:#}); retrying once");
            let mut retry = c;
            retry.store.data_dir = retry.store.data_dir.join("retry");
            gatehouse::server::start(retry).expect("server starts")
        }
    }
}

pub fn login(addr: SocketAddr, user: u64, device: u32) -> Client {
    Client::login(
        addr,
        UserId(user),
        DeviceId(device),
        &token(user, device),
        TIMEOUT,
    )
    .expect("login")
}

/// First user id ≥ `from` owned by `shard` in a node of `shards` shards.
pub fn user_on_shard(from: u64, shard: u16, shards: usize) -> u64 {
    (from..)
        .find(|&u| owner_shard(UserId(u), shards).0 == shard)
        .unwrap()
}

/// Reads frames until `f` returns Some; fails on timeout or close.
pub fn expect_frame<T>(c: &mut Client, mut f: impl FnMut(&ServerFrame) -> Option<T>) -> T {
    loop {
        let frame = c.recv_frame().expect("frame");
        if let Some(t) = f(&frame) {
            return t;
        }
    }
}

/// Reads until the SEND_ACK for `client_msg_id`, skipping receipts (which arrive
/// asynchronously); any other frame fails the test.
pub fn expect_send_ack(c: &mut Client, client_msg_id: u64) -> ServerMsgId {
    loop {
        match c.recv_frame().expect("SEND_ACK") {
            ServerFrame::SendAck {
                client_msg_id: id,
                server_msg_id,
                ..
            } if id == client_msg_id => return server_msg_id,
            ServerFrame::Receipt { .. } => continue,
            other => panic!("expected SEND_ACK for {client_msg_id}, got {other:?}"),
        }
    }
}

/// Reads one DELIVER and returns (id, sender, body).
pub fn expect_deliver(c: &mut Client) -> (ServerMsgId, UserId, Vec<u8>) {
    match c.recv_frame().expect("DELIVER") {
        ServerFrame::Deliver {
            server_msg_id,
            sender,
            body,
            ..
        } => (server_msg_id, sender, body.to_vec()),
        other => panic!("expected DELIVER, got {other:?}"),
    }
}

/// Expects an ERROR frame with `code`; returns its message.
pub fn expect_error(c: &mut Client, code: gatehouse::proto::ErrorCode) -> String {
    match c.recv_frame() {
        Ok(ServerFrame::Error {
            code: got, message, ..
        }) => {
            assert_eq!(got, code as u16, "wrong error code; message: {message}");
            message
        }
        other => panic!("expected ERROR {code:?}, got {other:?}"),
    }
}

/// Asserts the server closes the connection (EOF) soon.
pub fn expect_closed(c: &mut Client) {
    match c.read_until_closed(TIMEOUT) {
        Ok(frames) => assert!(frames.is_empty(), "frames before close: {frames:?}"),
        Err(e) => panic!("connection not closed: {e}"),
    }
}

pub fn is_closed_err(e: &ClientError) -> bool {
    matches!(e, ClientError::Closed)
        || matches!(e, ClientError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset)
}

/// Starts a `gatehouse run` command (stdout piped) and reads the address from its
/// `gatehouse listening on ADDR` banner. One retry, for the rare shard that never starts
/// (the binary then exits after 30 s; see `start`).
pub fn spawn_and_read_addr(cmd: &mut std::process::Command) -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    for attempt in 0..2 {
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn gatehouse");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if let Some(addr) = line.trim().rsplit(' ').next().and_then(|a| a.parse().ok()) {
            return (child, addr);
        }
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("gatehouse did not start (attempt {attempt}): {line:?}");
    }
    panic!("gatehouse did not start twice");
}

/// Expects an ERROR frame with `code`, `fatal` and `ref_id`; returns its message.
pub fn expect_error_with(
    c: &mut Client,
    code: gatehouse::proto::ErrorCode,
    fatal: bool,
    ref_id: u64,
) -> String {
    match c.recv_frame() {
        Ok(ServerFrame::Error {
            code: got,
            fatal: f,
            ref_id: r,
            message,
        }) => {
            assert_eq!(
                (got, f, r),
                (code as u16, fatal, ref_id),
                "message: {message}"
            );
            message
        }
        other => panic!("expected ERROR {code:?}, got {other:?}"),
    }
}
