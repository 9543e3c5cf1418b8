//! Helpers shared by the end-to-end tests: a real node on loopback with a real LMDB
//! directory, and logged-in clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
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

/// Starts a node. No retry: the shard that parked before it ran (1 start in about 300 on this
/// box) is woken by the starter since the fourth session (docs/architecture.md), so a start
/// that fails is a bug to see.
pub fn start(c: Config) -> ServerHandle {
    gatehouse::server::start(c).expect("server starts")
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
        let frame = c.recv_frame().unwrap_or_else(|e| {
            panic!("the expected frame did not come (read timeout or close): {e:?}")
        });
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
/// `gatehouse listening on ADDR` banner. No retry (see `start`).
pub fn spawn_and_read_addr(cmd: &mut std::process::Command) -> (Gateway, SocketAddr) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gatehouse");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if let Some(addr) = line.trim().rsplit(' ').next().and_then(|a| a.parse().ok()) {
        return (Gateway(child), addr);
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("gatehouse did not start: {line:?}");
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

/// `GET`/`POST` over a plain socket; returns (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Sum of every series of `name` (all shards) whose labels contain `label` (may be "").
pub fn metric(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(label))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Connections closed for `reason` (all shards), from a scrape.
pub fn closed_by(body: &str, reason: &str) -> f64 {
    metric(
        body,
        "gatehouse_connections_closed_total",
        &format!("reason=\"{reason}\""),
    )
}

/// Starts the binary with `config` text; returns the child, its address and admin address.
/// Stderr goes to `log`.
pub fn spawn_node(config: &Path, log: &Path) -> (Gateway, SocketAddr, SocketAddr) {
    let (g, b) = spawn_node_banner(config, log);
    (g, b.tcp.unwrap(), b.admin.expect("admin endpoint enabled"))
}

pub fn node_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let cfg = dir.join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\n{extra}\n[store]\ndata_dir = {:?}\nmap_size_mib = 64\n[auth]\nkey_hex = \"{KEY_HEX}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.join("data")
        ),
    )
    .unwrap();
    cfg
}

/// A gateway process that is killed when the test ends, also when it panics (a failed test must
/// not leave a node running). Derefs to the `Child`.
pub struct Gateway(pub Child);

impl std::ops::Deref for Gateway {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Gateway {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A test PKI in `dir`: a CA (`ca.pem`) and a server certificate for `localhost` and
/// 127.0.0.1 signed by it (`server.pem`, `server.key`). Returns the three paths.
pub struct TestPki {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestPki {
    pub fn new(dir: &Path) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Gatehouse test CA");
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            ca_cert,
            ca_key,
        };
        std::fs::write(&pki.ca, pki.ca_cert.pem()).unwrap();
        pki.issue();
        pki
    }

    /// Writes a fresh server key and certificate (a new leaf) over the old files.
    pub fn issue(&self) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        std::fs::write(&self.cert, cert.pem()).unwrap();
        std::fs::write(&self.key, key.serialize_pem()).unwrap();
    }

    /// Client settings that trust this CA, with a session cache for resumption.
    pub fn client(&self) -> gatehouse::client::TlsClientConfig {
        gatehouse::client::TlsClientConfig::from_ca_file(&self.ca, "localhost", &[], 64).unwrap()
    }
}

/// `config` with the TLS listener on (port 0) using `pki`.
pub fn tls_config(dir: &Path, pki: &TestPki) -> Config {
    let mut c = config(dir);
    c.tls.enabled = true;
    c.tls.listen = "127.0.0.1:0".parse().unwrap();
    c.tls.cert_file = pki.cert.clone();
    c.tls.key_file = pki.key.clone();
    c
}

pub fn login_tls(
    addr: SocketAddr,
    tls: &gatehouse::client::TlsClientConfig,
    user: u64,
    device: u32,
) -> Client {
    let mut c = Client::connect_tls(addr, tls, TIMEOUT).expect("TLS connect");
    c.log_in(UserId(user), DeviceId(device), &token(user, device))
        .expect("login over TLS");
    c
}

/// The addresses a `gatehouse run` printed.
#[derive(Debug, Default)]
pub struct Banner {
    pub tcp: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// Starts the binary with `config` and reads every banner line (up to the admin line).
pub fn spawn_node_banner(config: &Path, log: &Path) -> (Gateway, Banner) {
    spawn_node_banner_env(config, log, &[])
}

/// [`spawn_node`] with environment variables set (test hooks).
pub fn spawn_node_env(
    config: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> (Gateway, SocketAddr, SocketAddr) {
    let (g, b) = spawn_node_banner_env(config, log, env);
    (g, b.tcp.unwrap(), b.admin.expect("admin endpoint enabled"))
}

pub fn spawn_node_banner_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> (Gateway, Banner) {
    for _ in 0..2 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env_remove("GATEHOUSE_LOG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut banner = Banner::default();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while let Some(Ok(line)) = lines.next() {
            let addr: Option<SocketAddr> = line
                .rsplit(' ')
                .next()
                .map(|a| {
                    a.trim_start_matches("http://")
                        .trim_start_matches("wss://")
                        .trim_start_matches("ws://")
                        .trim_end_matches('/')
                })
                .and_then(|a| a.parse().ok());
            if line.starts_with("gatehouse listening on") {
                banner.tcp = addr;
            } else if line.starts_with("gatehouse tls listening on") {
                banner.tls = addr;
            } else if line.starts_with("gatehouse websocket listening on") {
                banner.ws = addr;
            } else if line.starts_with("gatehouse admin on") {
                banner.admin = addr;
                break;
            }
        }
        if banner.tcp.is_some() && banner.admin.is_some() {
            return (Gateway(child), banner);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("gatehouse did not start twice");
}

/// `config` with a WebSocket listener on (port 0); `wss` terminates TLS with `pki`.
pub fn ws_config(dir: &Path, pki: Option<&TestPki>) -> Config {
    let mut c = config(dir);
    c.websocket.enabled = true;
    c.websocket.listen = "127.0.0.1:0".parse().unwrap();
    if let Some(pki) = pki {
        c.websocket.tls = true;
        c.tls.cert_file = pki.cert.clone();
        c.tls.key_file = pki.key.clone();
    }
    c
}
