//! TLS end to end: real sockets, real rustls on both ends, certificates from a test CA.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use gatehouse::client::{Client, ClientError, TlsClientConfig};
use gatehouse::ids::UserId;
use gatehouse::proto::{ErrorCode, ServerFrame};

#[test]
fn tls_clients_exchange_messages_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let node = start(tls_config(&dir.path().join("data"), &pki));
    let tls_addr = node.tls_addr.expect("TLS listener");
    let tls = pki.client();
    let a = user_on_shard(100, 0, 2);
    let b = user_on_shard(100, 1, 2);
    let mut ca = login_tls(tls_addr, &tls, a, 1);
    let mut cb = login_tls(tls_addr, &tls, b, 1);
    // A plain TCP user on the same node talks to both.
    let c = user_on_shard(500, 0, 2);
    let mut cc = login(node.local_addr, c, 1);
    ca.send_message(1, UserId(b), b"a to b over TLS").unwrap();
    expect_send_ack(&mut ca, 1);
    let (id, from, body) = expect_deliver(&mut cb);
    assert_eq!(
        (from, body.as_slice()),
        (UserId(a), &b"a to b over TLS"[..])
    );
    cb.ack(&[id]).unwrap();
    expect_frame(&mut ca, |f| {
        matches!(f, ServerFrame::Receipt { .. }).then_some(())
    });
    cb.send_message(2, UserId(c), b"b to plain c").unwrap();
    expect_send_ack(&mut cb, 2);
    let (_, from, body) = expect_deliver(&mut cc);
    assert_eq!((from, body.as_slice()), (UserId(b), &b"b to plain c"[..]));
    // Large bodies cross TLS record boundaries.
    let big = vec![7u8; 60_000];
    cc.send_message(3, UserId(a), &big).unwrap();
    expect_send_ack(&mut cc, 3);
    let (_, _, body) = expect_deliver(&mut ca);
    assert_eq!(body, big);
    drop((ca, cb, cc));
    node.shutdown().unwrap();
}

fn scrape(node: &gatehouse::server::ServerHandle) -> String {
    let (status, body) = http(node.admin_addr.unwrap(), "GET", "/metrics");
    assert_eq!(status, 200);
    body
}

#[test]
fn reconnects_resume_with_session_tickets() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let node = start(tls_config(&dir.path().join("data"), &pki));
    let addr = node.tls_addr.unwrap();
    let tls = pki.client();
    let first = login_tls(addr, &tls, 7, 1);
    assert_eq!(first.tls_resumed(), Some(false));
    drop(first);
    // Same client settings (same session cache): the reconnect resumes, on whichever shard
    // the kernel picks (the ticket key is node-wide).
    for _ in 0..4 {
        let again = login_tls(addr, &tls, 7, 1);
        assert_eq!(again.tls_resumed(), Some(true));
    }
    // A client without a cache does a full handshake.
    let cold = TlsClientConfig::from_ca_file(&pki.ca, "localhost", &[], 0).unwrap();
    assert_eq!(login_tls(addr, &cold, 8, 1).tls_resumed(), Some(false));
    let body = scrape(&node);
    assert_eq!(
        metric(&body, "gatehouse_tls_handshakes_full_total", ""),
        2.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "gatehouse_tls_handshakes_resumed_total", ""),
        4.0
    );
    node.shutdown().unwrap();
}

#[test]
fn key_exchange_groups_are_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut cfg = tls_config(&dir.path().join("data"), &pki);
    cfg.tls.kx_groups = vec!["secp256r1".into()];
    let node = start(cfg);
    let addr = node.tls_addr.unwrap();
    // A client offering x25519 first is steered to the server's only group.
    let c = login_tls(addr, &pki.client(), 9, 1);
    assert_eq!(c.tls_kx_group().as_deref(), Some("secp256r1"));
    // A client that offers no group in common fails its handshake.
    let x25519_only =
        TlsClientConfig::from_ca_file(&pki.ca, "localhost", &["x25519".into()], 0).unwrap();
    let err = Client::connect_tls(addr, &x25519_only, TIMEOUT)
        .err()
        .expect("no common group");
    assert!(
        err.to_string().contains("alert") || err.to_string().contains("Handshake"),
        "{err}"
    );
    node.shutdown().unwrap();

    // Unknown names are refused at start, naming the key and the known groups.
    let mut bad = tls_config(&dir.path().join("data2"), &pki);
    bad.tls.kx_groups = vec!["x448".into()];
    let err = gatehouse::server::start(bad)
        .err()
        .expect("unknown group refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("kx_groups") && msg.contains("x25519mlkem768"),
        "{msg}"
    );
}

#[test]
fn bad_tls_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut cfg = tls_config(&dir.path().join("data"), &pki);
    cfg.limits.login_timeout_ms = 600;
    let node = start(cfg);
    let addr = node.tls_addr.unwrap();
    let tls = pki.client();
    let a = user_on_shard(100, 0, 2);
    let b = user_on_shard(100, 1, 2);
    let mut ca = login_tls(addr, &tls, a, 1);
    let mut cb = login_tls(addr, &tls, b, 1);
    ca.set_timeout(Duration::from_secs(30)).unwrap();

    // 1. A plaintext Gatehouse client on the TLS port gets a plaintext ERROR naming the problem.
    let mut plain = Client::connect(addr, TIMEOUT).unwrap();
    plain
        .send(&gatehouse::proto::ClientFrame::Hello {
            magic: gatehouse::proto::HELLO_MAGIC,
            min_version: 1,
            max_version: 1,
        })
        .unwrap();
    let msg = expect_error(&mut plain, ErrorCode::MalformedFrame);
    assert!(msg.contains("TLS"), "{msg}");
    expect_closed(&mut plain);

    // 2. A handshake record holding an empty ClientHello: rustls refuses it with an alert.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.set_read_timeout(Some(TIMEOUT)).unwrap();
    garbage.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04]).unwrap();
    garbage.write_all(&[0x01, 0x00, 0x00, 0x00]).unwrap();
    let mut got = Vec::new();
    let _ = garbage.read_to_end(&mut got);
    assert_eq!(
        got.first(),
        Some(&0x15),
        "a TLS alert record comes back: {got:?}"
    );

    // 3. A truncated ClientHello, then the client goes away.
    let mut truncated = TcpStream::connect(addr).unwrap();
    truncated
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    drop(truncated);

    // 4. A slow handshake: half a record, then silence, is cut at the login timeout.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(TIMEOUT)).unwrap();
    slow.write_all(&[0x16, 0x03, 0x01]).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // The logged-in TLS users never noticed.
    ca.send_message(1, UserId(b), b"still fine").unwrap();
    expect_send_ack(&mut ca, 1);
    let (_, _, body) = expect_deliver(&mut cb);
    assert_eq!(body, b"still fine");

    let body = scrape(&node);
    assert!(closed_by(&body, "tls_error") >= 2.0, "{body}");
    assert_eq!(closed_by(&body, "handshake_timeout"), 1.0);
    drop((ca, cb));
    node.shutdown().unwrap();
}

#[test]
fn certificate_reload_keeps_connections_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let node = start(tls_config(&dir.path().join("data"), &pki));
    let addr = node.tls_addr.unwrap();
    let tls = TlsClientConfig::from_ca_file(&pki.ca, "localhost", &[], 0).unwrap();
    let a = user_on_shard(100, 0, 2);
    let b = user_on_shard(100, 1, 2);
    let mut ca = login_tls(addr, &tls, a, 1);
    let old_leaf = ca.tls_leaf_sha256().unwrap();

    // A new certificate: new handshakes get it, the established connection carries on.
    pki.issue();
    let summary = node.reload_tls().expect("reload");
    let mut cb = login_tls(addr, &tls, b, 1);
    let new_leaf = cb.tls_leaf_sha256().unwrap();
    assert_ne!(old_leaf, new_leaf);
    assert_eq!(summary.leaf_sha256, new_leaf);
    ca.send_message(1, UserId(b), b"across the reload").unwrap();
    expect_send_ack(&mut ca, 1);
    assert_eq!(expect_deliver(&mut cb).2, b"across the reload");

    // A broken certificate file is refused with a reason; the current one keeps serving.
    std::fs::write(&pki.cert, "not a certificate").unwrap();
    let err = node.reload_tls().expect_err("bad certificate refused");
    assert!(format!("{err:#}").contains("no PEM certificate"), "{err:#}");
    // A key that does not match the certificate is refused too.
    let other = TestPki::new(&dir.path().join("other").tap_mkdir());
    std::fs::copy(&other.cert, &pki.cert).unwrap();
    let err = node.reload_tls().expect_err("mismatched key refused");
    assert!(format!("{err:#}").contains("does not match"), "{err:#}");
    let c2 = login_tls(addr, &tls, 77, 1);
    assert_eq!(c2.tls_leaf_sha256().unwrap(), new_leaf);
    drop((ca, cb, c2));
    node.shutdown().unwrap();
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn the_binary_reloads_on_sighup_and_admin_post() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let cfg = node_config(
        dir.path(),
        &format!(
            "[tls]\nenabled = true\nlisten = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.cert, pki.key
        ),
    );
    let log = dir.path().join("node.log");
    let (mut node, banner) = spawn_node_banner(&cfg, &log);
    let tls_addr = banner.tls.expect("TLS banner line");
    let admin = banner.admin.expect("admin banner line");
    let tls = TlsClientConfig::from_ca_file(&pki.ca, "localhost", &[], 0).unwrap();
    let first = login_tls(tls_addr, &tls, 5, 1).tls_leaf_sha256().unwrap();

    pki.issue();
    let (status, body) = http(admin, "POST", "/reload-tls");
    assert_eq!(status, 200, "{body}");
    let second = login_tls(tls_addr, &tls, 5, 1).tls_leaf_sha256().unwrap();
    assert_ne!(first, second);
    assert!(body.contains(&second), "{body}");

    std::fs::write(&pki.key, "garbage").unwrap();
    let (status, body) = http(admin, "POST", "/reload-tls");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("private key"), "{body}");

    pki.issue();
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(node.id() as i32, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + TIMEOUT;
    let third = loop {
        let leaf = login_tls(tls_addr, &tls, 5, 1).tls_leaf_sha256().unwrap();
        if leaf != second || std::time::Instant::now() > deadline {
            break leaf;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(third, second, "SIGHUP reloaded the certificate");
    let _ = node.kill();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("TLS certificate reload refused"), "{text}");
    assert!(text.contains("TLS certificate reloaded"), "{text}");
}

#[test]
fn a_dead_peer_mid_handshake_is_not_an_error_for_others() {
    // Many clients that open TLS and vanish at once, interleaved with real logins.
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let node = start(tls_config(&dir.path().join("data"), &pki));
    let addr = node.tls_addr.unwrap();
    let tls = pki.client();
    for i in 0..20u64 {
        let s = TcpStream::connect(addr).unwrap();
        drop(s);
        let mut c = login_tls(addr, &tls, 1000 + i, 1);
        c.send(&gatehouse::proto::ClientFrame::Ping { nonce: i })
            .unwrap();
        expect_frame(&mut c, |f| {
            matches!(f, ServerFrame::Pong { .. }).then_some(())
        });
    }
    let _ = ClientError::Closed;
    node.shutdown().unwrap();
}

#[test]
fn make_certs_script_and_cli_clients_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = node_config(
        dir.path(),
        &format!(
            "[tls]\nenabled = true\nlisten = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n",
            certs.join("server.pem"),
            certs.join("server.key")
        ),
    );
    let (_node, banner) = spawn_node_banner(&cfg, &dir.path().join("node.log"));
    let addr = banner.tls.unwrap().to_string();
    let ca = certs.join("ca.pem");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .args(["--server", &addr, "--tls-ca"])
            .arg(&ca)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = cli(&["send", "--user", "1", "--to", "2", "over tls"]);
    assert!(ok, "{text}");
    let (ok, text) = cli(&["recv", "--user", "2"]);
    assert!(ok && text.contains("over tls"), "{text}");
    // The same CA does not vouch for another name.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["send", "--user", "1", "--to", "2", "x", "--config"])
        .arg(&cfg)
        .args([
            "--server",
            &addr,
            "--tls-server-name",
            "example.com",
            "--tls-ca",
        ])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn clients_pick_among_the_enabled_groups_in_their_own_order() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let node = start(tls_config(&dir.path().join("data"), &pki));
    let addr = node.tls_addr.unwrap();
    // A client that offers the hybrid first (as browsers do) gets it.
    let pq = TlsClientConfig::from_ca_file(
        &pki.ca,
        "localhost",
        &["x25519mlkem768".into(), "x25519".into()],
        0,
    )
    .unwrap();
    let c = login_tls(addr, &pq, 11, 1);
    assert_eq!(c.tls_kx_group().as_deref(), Some("x25519mlkem768"));
    // A client that lists x25519 first gets it: rustls follows the client's order among the
    // enabled groups (the server's list is a set), so no client pays a retry round trip.
    let classic = pki.client();
    let c2 = login_tls(addr, &classic, 12, 1);
    assert_eq!(c2.tls_kx_group().as_deref(), Some("x25519"));
    node.shutdown().unwrap();
}

#[test]
fn empty_bodies_and_bursts_of_small_records_go_through() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    // TLS 1.2: the session stays in rustls (no record offload), one rustls state per record.
    let mut cfg = tls_config(&dir.path().join("data"), &pki);
    cfg.tls.versions = vec!["1.2".into()];
    let node = start(cfg);
    let addr = node.tls_addr.unwrap();
    let tls = pki.client();
    let (a, b) = (user_on_shard(100, 0, 2), user_on_shard(100, 1, 2));
    let mut ca = login_tls(addr, &tls, a, 1);
    let mut cb = login_tls(addr, &tls, b, 1);
    let mut tcp = login(node.local_addr, user_on_shard(300, 0, 2), 1);
    // An empty body, delivered live over TLS and over TCP (it once spun the write loop).
    ca.send_message(1, UserId(b), b"").unwrap();
    expect_send_ack(&mut ca, 1);
    assert_eq!(expect_deliver(&mut cb).2, b"");
    cb.send_message(2, UserId(user_on_shard(300, 0, 2)), b"")
        .unwrap();
    expect_send_ack(&mut cb, 2);
    assert_eq!(expect_deliver(&mut tcp).2, b"");
    // 600 PINGs, each its own TLS record, before reading any answer: every one is answered.
    for n in 0..600u64 {
        ca.send(&gatehouse::proto::ClientFrame::Ping { nonce: n })
            .unwrap();
    }
    for n in 0..600u64 {
        match ca.recv_frame().unwrap() {
            ServerFrame::Pong { nonce } => assert_eq!(nonce, n),
            other => panic!("expected PONG {n}, got {other:?}"),
        }
    }
    node.shutdown().unwrap();
}
