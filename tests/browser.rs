//! The browser client page (docs/client.html) in headless Chromium against a real gateway:
//! a message from the page reaches a Rust client over TCP, and the Rust client's reply
//! reaches the page, which says so in a last message.
//!
//! Needs Chromium (`scripts/setup.sh` installs Debian's `chromium`). Without it the test
//! fails when `GATEHOUSE_REQUIRE_BROWSER=1` (set by `scripts/test.sh`, hence in CI), and
//! otherwise prints that it was skipped.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gatehouse::ids::UserId;

fn chromium() -> Option<String> {
    if let Ok(p) = std::env::var("GATEHOUSE_CHROMIUM") {
        return Some(p);
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|c| c.to_string())
}

/// Percent-encodes everything but unreserved characters (a token may hold `+` or `/`).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Kills the browser when the test ends, also on panic.
struct Browser(std::process::Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_browser_page_exchanges_messages_with_a_rust_client() {
    let Some(chrome) = chromium() else {
        assert!(
            std::env::var("GATEHOUSE_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "Chromium not found: run scripts/setup.sh (installs Debian's chromium) or set GATEHOUSE_CHROMIUM"
        );
        eprintln!("SKIPPED: Chromium not found (scripts/setup.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = start(ws_config(&dir.path().join("data"), None));
    let ws = node.ws_addr.unwrap();
    let (page_user, rust_user) = (user_on_shard(300, 0, 2), user_on_shard(300, 1, 2));
    let mut rust = login(node.local_addr, rust_user, 1);
    rust.set_timeout(Duration::from_secs(60)).unwrap();

    let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/client.html");
    let url = format!(
        "file://{}#url={}&user={page_user}&device=1&token={}&peer={rust_user}&auto=1",
        page.display(),
        encode(&format!("ws://{ws}/")),
        encode(&token(page_user, 1)),
    );
    let profile = dir.path().join("profile");
    let log = std::fs::File::create(dir.path().join("chromium.log")).unwrap();
    let _browser = Browser(
        Command::new(&chrome)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromium"),
    );
    let started = Instant::now();
    let browser_log =
        || std::fs::read_to_string(dir.path().join("chromium.log")).unwrap_or_default();
    let (id, from, body) = match rust.recv() {
        Ok(gatehouse::proto::ServerFrame::Deliver {
            server_msg_id,
            sender,
            body,
            ..
        }) => (server_msg_id, sender, body),
        other => panic!("no message from the page: {other:?}\n{}", browser_log()),
    };
    assert_eq!(
        (from, body.as_ref()),
        (UserId(page_user), &b"hello from the browser"[..])
    );
    eprintln!("browser: first message after {:?}", started.elapsed());
    rust.ack(&[id]).unwrap();
    rust.send_message(1, UserId(page_user), b"pong from rust")
        .unwrap();
    expect_send_ack(&mut rust, 1);
    // The page ACKs, which sends us a delivered receipt, then answers.
    let body = expect_frame(&mut rust, |f| match f {
        gatehouse::proto::ServerFrame::Deliver { body, .. } => Some(body.clone()),
        _ => None,
    });
    assert_eq!(body.as_ref(), b"browser got: pong from rust");
    let (_, metrics) = http(node.admin_addr.unwrap(), "GET", "/metrics");
    assert_eq!(
        metric(&metrics, "gatehouse_websocket_upgrades_total", ""),
        1.0
    );
    node.shutdown().unwrap();
}
