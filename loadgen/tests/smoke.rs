//! Smoke runs of every scenario against real gateway processes (a few hundred connections, a
//! few seconds), and proof that the loss check fails when the gateway really drops messages.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const KEY: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

/// The gateway binary, built by `cargo test --workspace` (or `cargo build --bin gatehouse`).
fn gatehouse_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>/deps/.. → target/<profile>
    let bin = dir.join("gatehouse");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --bin gatehouse` (or `cargo test --workspace`)",
        bin.display()
    );
    bin
}

struct Gateway {
    child: Child,
    addr: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway_once(dir: &Path, node: u32, nodes: u32, env: &[(&str, &str)]) -> Option<Gateway> {
    let cfg = dir.join(format!("node{node}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\n[store]\ndata_dir = {:?}\nmap_size_mib = 256\n[auth]\nkey_hex = \"{KEY}\"\n[cluster]\nnode_id = {node}\nnodes = {nodes}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.join(format!("data{node}"))
        ),
    )
    .unwrap();
    let mut cmd = Command::new(gatehouse_bin());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("GATEHOUSE_LOG", "error")
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if !line.contains("listening") {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    Some(Gateway { child, addr })
}

/// Starts a gateway process; one retry for the rare shard that never starts (the gateway
/// then exits after 30 s; see docs/architecture.md).
fn gateway(dir: &Path, node: u32, nodes: u32, env: &[(&str, &str)]) -> Gateway {
    gateway_once(dir, node, nodes, env)
        .or_else(|| gateway_once(dir, node, nodes, env))
        .expect("gateway starts")
}

/// Runs `loadgen run <args>`; returns its exit code and parsed report.
fn loadgen(dir: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("run")
        .args(args)
        .args(["--key-hex", KEY, "--report"])
        .arg(&report)
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read_to_string(&report)
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (code, json)
}

fn n(v: &serde_json::Value, path: &str) -> u64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path} missing in report"))
}

#[test]
fn idle_chat_offline_churn_against_two_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let g0 = gateway(dir.path(), 0, 2, &[]);
    let g1 = gateway(dir.path(), 1, 2, &[]);
    let gws = format!("{},{}", g0.addr, g1.addr);
    let common = [
        "--gateway",
        &gws,
        "--procs",
        "2",
        "--cores",
        "1",
        "--duration-s",
        "2",
        "--drain-timeout-s",
        "10",
        "--max-run-s",
        "60",
    ];

    let mut a = common.to_vec();
    a.extend(["idle", "--users", "300", "--ping-interval-s", "1"]);
    let (code, r) = loadgen(dir.path(), &a);
    assert_eq!(code, 0);
    assert_eq!(n(&r, "final_pongs"), 300);
    assert!(
        n(&r, "counters.pongs") > 300,
        "keepalive pings were answered too"
    );

    let mut a = common.to_vec();
    a.extend([
        "chat",
        "--users",
        "200",
        "--first-user",
        "1000",
        "--rate",
        "2000",
    ]);
    let (code, r) = loadgen(dir.path(), &a);
    assert_eq!(code, 0);
    assert!(n(&r, "loss.acked") > 2_000, "acked {}", n(&r, "loss.acked"));
    assert_eq!(n(&r, "loss.lost"), 0);
    assert_eq!(n(&r, "loss.reordered"), 0);
    assert_eq!(
        n(&r, "counters.receipts_delivered"),
        n(&r, "loss.acked"),
        "every delivery produced a receipt"
    );
    assert_eq!(n(&r, "receipts_missing"), 0);
    assert!(
        r["counters"]["errors"].get("wrong_node").is_none(),
        "users went to the wrong node"
    );
    assert!(n(&r, "latency.deliver.count") > 0);

    let mut a = common.to_vec();
    a.extend([
        "offline",
        "--users",
        "200",
        "--first-user",
        "2000",
        "--messages",
        "4000",
    ]);
    let (code, r) = loadgen(dir.path(), &a);
    assert_eq!(code, 0);
    assert_eq!(n(&r, "loss.acked"), 4000);
    assert_eq!(n(&r, "loss.delivered_distinct"), 4000);
    assert_eq!(n(&r, "loss.reordered"), 0);

    let mut a = common.to_vec();
    a.extend([
        "churn",
        "--users",
        "200",
        "--first-user",
        "3000",
        "--rate",
        "1000",
        "--churn-rate",
        "40",
    ]);
    let (code, r) = loadgen(dir.path(), &a);
    assert_eq!(code, 0);
    assert!(
        n(&r, "counters.logins") > 200,
        "churned users logged in again"
    );
    assert_eq!(n(&r, "loss.lost"), 0);
}

#[test]
fn loss_check_fails_when_the_gateway_drops_messages() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway(
        dir.path(),
        0,
        1,
        &[("GATEHOUSE_TEST_DROP_DELIVERY_EVERY", "25")],
    );
    let (code, r) = loadgen(
        dir.path(),
        &[
            "chat",
            "--gateway",
            &g.addr,
            "--users",
            "100",
            "--rate",
            "1000",
            "--duration-s",
            "2",
            "--procs",
            "1",
            "--cores",
            "1",
            "--drain-timeout-s",
            "2",
            "--max-run-s",
            "60",
        ],
    );
    assert_eq!(
        code, 1,
        "loadgen must exit 1 when acknowledged messages are lost"
    );
    assert!(n(&r, "loss.lost") > 0);
}

#[test]
fn bad_options_fail_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "chat", "--users", "1", "--key-hex", KEY])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 2 users"));
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["run", "idle", "--src-ips", "10.0.0.x", "--key-hex", KEY])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--src-ips"));
}

/// The crash test under load, small: chat with `--reconnect` while the gateway is killed with
/// SIGKILL twice and restarted on the same port and data; the loss check must find every
/// acknowledged message delivered, in order. (scripts/crash-under-load.sh is the bigger run.)
#[test]
fn kill_9_under_chat_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("GATEHOUSE_SERVER__LISTEN", listen.as_str()),
        ("GATEHOUSE_LIMITS__SEND_RATE_PER_S", "0"),
        ("GATEHOUSE_LIMITS__CONNECT_RATE_PER_SOURCE", "0"),
    ];
    let mut gw = gateway(dir.path(), 0, 1, &env);
    let report = dir.path().join("report.json");
    let lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "run",
            "chat",
            "--users",
            "60",
            "--rate",
            "2000",
            "--duration-s",
            "6",
        ])
        .args([
            "--reconnect",
            "--cores",
            "1",
            "--drain-timeout-s",
            "30",
            "--max-run-s",
            "90",
        ])
        .args(["--gateway", &listen, "--key-hex", KEY, "--report"])
        .arg(&report)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    for at_ms in [1_500u64, 3_500] {
        let at = std::time::Duration::from_millis(at_ms);
        std::thread::sleep(at.saturating_sub(start.elapsed()));
        gw.child.kill().unwrap(); // SIGKILL
        gw.child.wait().unwrap();
        gw = gateway(dir.path(), 0, 1, &env);
    }
    let out = lg.wait_with_output().unwrap();
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(n(&rep, "loss.lost"), 0);
    assert_eq!(n(&rep, "loss.reordered"), 0);
    assert!(
        n(&rep, "loss.acked") > 2_000,
        "too little traffic to mean anything"
    );
    assert!(
        n(&rep, "counters.reconnects") >= 60,
        "the kills did not cut the clients off"
    );
    drop(gw);
}

/// A gateway with its TLS listener on, with a CA and certificate made by
/// scripts/make-certs.sh; returns the gateway (TLS address) and the CA file.
fn tls_gateway(dir: &Path) -> (Gateway, PathBuf) {
    let certs = dir.join("certs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-certs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = certs.join("server.pem").display().to_string();
    let key = certs.join("server.key").display().to_string();
    let env = [
        ("GATEHOUSE_TLS__ENABLED", "true"),
        ("GATEHOUSE_TLS__LISTEN", "127.0.0.1:0"),
        ("GATEHOUSE_TLS__CERT_FILE", cert.as_str()),
        ("GATEHOUSE_TLS__KEY_FILE", key.as_str()),
    ];
    for _ in 0..2 {
        let cfg = dir.join("tls.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\n[store]\ndata_dir = {:?}\nmap_size_mib = 256\n[auth]\nkey_hex = \"{KEY}\"\n[admin]\nenabled = false\n",
                dir.join("tls-data")
            ),
        )
        .unwrap();
        let mut cmd = Command::new(gatehouse_bin());
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .env("GATEHOUSE_LOG", "error")
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let _tcp = lines.next();
        let tls = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        if tls.starts_with("gatehouse tls listening on") {
            let addr = tls.rsplit(' ').next().unwrap().to_string();
            return (Gateway { child, addr }, certs.join("ca.pem"));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("TLS gateway did not start twice");
}

#[test]
fn tls_handshake_and_chat_scenarios() {
    let dir = tempfile::tempdir().unwrap();
    let (g, ca) = tls_gateway(dir.path());
    let ca = ca.display().to_string();
    let common = [
        "--gateway",
        &g.addr,
        "--tls",
        "--tls-ca",
        &ca,
        "--procs",
        "1",
        "--cores",
        "1",
        "--max-run-s",
        "60",
    ];
    // Full handshakes, then every user reconnects and resumes from its own ticket.
    let mut a = common.to_vec();
    a.extend(["handshake", "--users", "200", "--connect-rate", "2000"]);
    let (code, r) = loadgen(dir.path(), &a);
    assert_eq!(code, 0);
    assert_eq!(n(&r, "counters.tls_full"), 200);
    assert_eq!(n(&r, "counters.tls_resumed"), 200);
    assert_eq!(n(&r, "reconnect_logins"), 200);
    // Chat over TLS: every acknowledged message delivered, with its receipt.
    let mut a = common.to_vec();
    a.extend([
        "chat",
        "--users",
        "100",
        "--rate",
        "2000",
        "--duration-s",
        "2",
        "--drain-timeout-s",
        "10",
        "--body-bytes",
        "2000",
    ]);
    let (code, r) = loadgen(dir.path(), &a);
    assert_eq!(code, 0);
    assert!(n(&r, "counters.acked") > 3000, "{r}");
    assert_eq!(n(&r, "loss.lost"), 0);
    assert_eq!(
        n(&r, "counters.receipts_delivered"),
        n(&r, "counters.acked")
    );
}

#[test]
fn presence_and_groups_scenarios() {
    let dir = tempfile::tempdir().unwrap();
    let g = gateway(dir.path(), 0, 1, &[]);
    let common = [
        "--gateway",
        &g.addr,
        "--procs",
        "1",
        "--cores",
        "2",
        "--duration-s",
        "2",
        "--drain-timeout-s",
        "20",
        "--max-run-s",
        "60",
    ];
    let mut a = common.to_vec();
    a.extend([
        "presence",
        "--users",
        "200",
        "--contacts",
        "5",
        "--churn-rate",
        "40",
        "--rate",
        "0",
    ]);
    let (code, r) = loadgen(dir.path(), &a);
    assert_eq!(code, 0);
    // 200 × 5 answers to the subscriptions, then churn notes.
    assert!(n(&r, "counters.presence") > 1000, "{r}");
    assert!(n(&r, "latency.presence.count") > 0, "{r}");

    let mut a = common.to_vec();
    let pid = g.child.id().to_string();
    a.extend([
        "groups",
        "--users",
        "128",
        "--group-size",
        "16",
        "--rate",
        "200",
        "--gateway-pids",
        &pid,
    ]);
    let (code, r) = loadgen(dir.path(), &a);
    assert_eq!(code, 0);
    let expected = n(&r, "counters.group_expected");
    assert!(expected > 300 * 15, "{r}");
    assert_eq!(n(&r, "counters.group_delivered"), expected);
    // The offered rate is the GROUP_SENDs written times the 15 other members, per second of
    // the main phase (the rate asked for: 200 messages/s, so about 3,000/s).
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    let offered = n(&r, "counters.sent") as f64 * 15.0 / f("main_s");
    assert!((f("group_offered_per_s") - offered).abs() < 1.0, "{r}");
    assert!((2_000.0..4_000.0).contains(&offered), "{r}");
    // CPU per member-delivery: the gateway's and the workers' (read after they were reaped:
    // before, RUSAGE_CHILDREN would still be 0) are there, and the workers' is in the total.
    let cpu = &r["cpu"];
    assert_eq!(cpu["unit"], "member-delivery", "{r}");
    assert_eq!(n(&r, "cpu.units"), expected);
    let s = |k: &str| {
        cpu[k]
            .as_f64()
            .unwrap_or_else(|| panic!("cpu.{k} missing: {r}"))
    };
    assert!(s("gateway_s") > 0.0 && s("gateway_s") < 120.0, "{r}");
    assert!(s("loadgen_workers_s") > 0.0, "{r}");
    assert!(s("loadgen_s") >= s("loadgen_workers_s"), "{r}");
}
