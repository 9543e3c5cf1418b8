//! Measures the gateway's memory per idle, logged-in connection.
//!
//! Starts the real `gatehouse` binary as a child process, logs in `--conns` users (blocking
//! clients, each its own connection), waits, and reports the growth of the gateway's RssAnon
//! (heap and anonymous mappings; kernel socket memory is not included) divided by the number
//! of connections. Then pings every connection to prove all are alive.
//!
//! With `--tls`, the connections use the TLS listener (a fresh test CA and certificate), so the
//! figure includes the server's per-connection TLS state.
//!
//! ```text
//! cargo build --release && cargo run --release --example idle_memory -- --conns 9000 [--tls]
//! ```

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse::auth::{parse_key_hex, TokenKeys};
use gatehouse::client::Client;
use gatehouse::ids::{DeviceId, UserId};
use gatehouse::proto::{ClientFrame, ServerFrame};

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let conns: u64 = arg("--conns", "9000").parse().unwrap();
    let shards = arg("--shards", "2");
    let binary = arg("--binary", "target/release/gatehouse");
    let tls = std::env::args().any(|a| a == "--tls");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("g.toml");
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshards = {shards}\n[store]\ndata_dir = {:?}\nmap_size_mib = 64\n[auth]\nkey_hex = \"{KEY}\"\n[limits]\nconnect_rate_per_source = 0\n",
        dir.path().join("data")
    );
    let tls_client = tls.then(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        text.push_str(&format!(
            "[tls]\nenabled = true\nlisten = \"127.0.0.1:0\"\ncert_file = {c:?}\nkey_file = {k:?}\n"
        ));
        gatehouse::client::TlsClientConfig::from_ca_file(&c, "localhost", &[], 0).unwrap()
    });
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(&binary)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("GATEHOUSE_LOG", "warn")
        .env("GATEHOUSE_ADMIN__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {binary}: {e} (build with cargo build --release)")
        });
    // The TCP address, then (with --tls) the TLS one.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut addr_line = || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim().rsplit(' ').next().unwrap().parse().unwrap()
    };
    let mut addr: std::net::SocketAddr = addr_line();
    if tls {
        addr = addr_line();
    }
    let keys = TokenKeys::new(parse_key_hex(KEY, "key").unwrap(), None);
    let expiry = gatehouse::runtime::now_ms() / 1000 + 3600;
    let login = |u: u64| {
        let timeout = Duration::from_secs(10);
        let mut c = match &tls_client {
            Some(t) => Client::connect_tls(addr, t, timeout).unwrap(),
            None => Client::connect(addr, timeout).unwrap(),
        };
        c.log_in(
            UserId(u),
            DeviceId(1),
            &keys.mint(UserId(u), DeviceId(1), expiry),
        )
        .unwrap();
        c
    };

    // Warm up allocator arenas and tables, then measure the rest.
    let warm = 200;
    let mut clients: Vec<Client> = (1..=warm).map(login).collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_anon_kib(child.id());
    let t0 = Instant::now();
    clients.extend((warm + 1..=warm + conns).map(login));
    let login_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_anon_kib(child.id());
    let mut pongs = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&ClientFrame::Ping { nonce: i as u64 }).unwrap();
        if c.recv_frame().unwrap() == (ServerFrame::Pong { nonce: i as u64 }) {
            pongs += 1;
        }
    }
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / conns as f64;
    println!("gateway shards:               {shards}");
    println!(
        "transport:                    {}",
        if tls {
            "TLS (rustls, unbuffered)"
        } else {
            "TCP"
        }
    );
    println!("idle logged-in connections:   {conns} (+{warm} warm-up)");
    println!(
        "sequential logins:            {:.0}/s (one blocking client)",
        conns as f64 / login_s
    );
    println!("RssAnon before / after:       {before} KiB / {after} KiB");
    println!("server memory per connection: {per_conn:.0} bytes");
    println!("connections answering PING:   {pongs} of {}", clients.len());
    child.kill().unwrap();
    child.wait().unwrap();
}
