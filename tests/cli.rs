//! The user story of issue #2 with the real binary and its subcommands: run on defaults (plus a
//! free port), mint a token, exchange messages with `send`/`recv`, `kill -9`, restart on the
//! same data directory, and receive what was queued. Also `check-config` on bad input.

use std::path::Path;
use std::process::{Command, Output};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

fn run_gateway(data: &Path) -> (common::Gateway, String) {
    let (child, addr) = common::spawn_and_read_addr(
        Command::new(BIN)
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--shards",
                "2",
                "--admin-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data)
            .env("GATEHOUSE_LOG", "warn"),
    );
    (child, addr.to_string())
}

fn gatehouse(args: &[&str], data: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

fn ok_stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn send_recv_kill_9_restart_recv() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut gw, addr) = run_gateway(&data);

    let token = ok_stdout(gatehouse(&["token", "--user", "5", "--ttl", "10m"], &data));
    assert!(token.starts_with("v1.5.1."), "{token}");

    let sent = ok_stdout(gatehouse(
        &[
            "send",
            "--server",
            &addr,
            "--user",
            "1",
            "--to",
            "2",
            "hello bob",
        ],
        &data,
    ));
    assert!(sent.contains("stored for user 2"), "{sent}");
    let got = ok_stdout(gatehouse(
        &["recv", "--server", &addr, "--user", "2"],
        &data,
    ));
    assert!(
        got.contains("from user 1") && got.contains("hello bob"),
        "{got}"
    );
    // Acknowledged: a second recv gets nothing, and the sender gets a delivered receipt.
    assert!(!ok_stdout(gatehouse(
        &["recv", "--server", &addr, "--user", "2"],
        &data
    ))
    .contains("hello bob"));
    let receipts = ok_stdout(gatehouse(
        &["recv", "--server", &addr, "--user", "1"],
        &data,
    ));
    assert!(
        receipts.contains("receipt Delivered from user 2"),
        "{receipts}"
    );

    // Offline recipient, then kill -9 and restart on the same data directory.
    for i in 0..3 {
        let text = format!("queued {i}");
        ok_stdout(gatehouse(
            &["send", "--server", &addr, "--user", "1", "--to", "3", &text],
            &data,
        ));
    }
    gw.kill().unwrap();
    gw.wait().unwrap();
    let (mut gw, addr) = run_gateway(&data);
    let got = ok_stdout(gatehouse(
        &["recv", "--server", &addr, "--user", "3"],
        &data,
    ));
    let order: Vec<usize> = (0..3)
        .map(|i| {
            got.find(&format!("queued {i}"))
                .expect("queued message delivered")
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "order kept: {got}");

    // A wrong token is refused with a clear error and a non-zero exit.
    let out = gatehouse(
        &[
            "send",
            "--server",
            &addr,
            "--user",
            "1",
            "--to",
            "2",
            "--token",
            "v1.1.1.9.AAAA",
            "x",
        ],
        &data,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad_token"), "{err}");
    gw.kill().unwrap();
    gw.wait().unwrap();
}

/// Runs `gatehouse check-config --config FILE`.
fn check_config(file: &Path) -> Output {
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[limits]\ndelivery_window = 0\n").unwrap();
    let out = check_config(&f);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.delivery_window"));
    std::fs::write(&f, "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").unwrap();
    let out = check_config(&f);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    let out = Command::new(BIN)
        .args(["print-default-config"])
        .output()
        .unwrap();
    std::fs::write(&f, &out.stdout).unwrap();
    let out = check_config(&f);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
