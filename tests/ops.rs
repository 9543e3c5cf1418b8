//! Operations: configuration precedence and errors, `doctor` on this host, the admin
//! endpoint under a small load, the paced drain with connected clients, SIGHUP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{expect_deliver, expect_send_ack, http, login, metric, node_config, spawn_node};
use gatehouse::ids::UserId;
use gatehouse::proto::{GoAwayReason, ServerFrame};

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

fn gatehouse(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run gatehouse")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn configuration_precedence_is_defaults_file_environment_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("g.toml");
    std::fs::write(&cfg, "[server]\nshards = 3\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    let out = gatehouse(&["check-config", "--config", cfg], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("(3 shards)"),
        "file beats defaults: {}",
        text(&out)
    );
    let out = gatehouse(
        &["check-config", "--config", cfg],
        &[("GATEHOUSE_SERVER__SHARDS", "5")],
    );
    assert!(
        text(&out).contains("(5 shards)"),
        "env beats file: {}",
        text(&out)
    );
    // A flag beats the environment.
    let out = gatehouse(
        &[
            "check-config",
            "--config",
            cfg,
            "--data-dir",
            "/nonexistent/flag",
        ],
        &[("GATEHOUSE_STORE__DATA_DIR", "/nonexistent/env")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("data_dir /nonexistent/flag"),
        "{}",
        text(&out)
    );
    let out = gatehouse(
        &["check-config", "--config", cfg],
        &[("GATEHOUSE_STORE__DATA_DIR", "/nonexistent/env")],
    );
    assert!(
        text(&out).contains("data_dir /nonexistent/env"),
        "{}",
        text(&out)
    );

    // Errors name the offending variable or key and exit non-zero.
    let out = gatehouse(
        &["check-config", "--config", cfg],
        &[("GATEHOUSE_SERVER__SHARDZ", "5")],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("GATEHOUSE_SERVER__SHARDZ"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("shardz"), "{}", text(&out));
    let out = gatehouse(
        &["check-config", "--config", cfg],
        &[("GATEHOUSE_LIMITS__DELIVERY_WINDOW", "0")],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("limits.delivery_window"),
        "{}",
        text(&out)
    );
    let out = gatehouse(
        &["check-config", "--config", cfg],
        &[("GATEHOUSE_LOG__FORMAT", "xml")],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("GATEHOUSE_LOG__FORMAT"),
        "{}",
        text(&out)
    );
    let out = gatehouse(&["version"], &[]);
    assert!(text(&out).starts_with("gatehouse "), "{}", text(&out));
}

fn hard_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r.rlim_max
}

#[test]
fn doctor_fails_past_this_hosts_file_limit_and_passes_below_it() {
    let hard = hard_nofile();
    if hard == libc::RLIM_INFINITY {
        eprintln!("unlimited open files here; the failing half cannot be shown");
        return;
    }
    // More connections than this host's hard limit allows: that check must fail.
    let too_many = (hard + 1).to_string();
    let out = gatehouse(&["doctor", "--connections", &too_many], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().nth(1).unwrap();
    assert!(header.starts_with("CHECK") && header.contains("CURRENT") && header.contains("FIX"));
    let row = table
        .lines()
        .find(|l| l.starts_with("open files (hard limit)"))
        .expect("open files row");
    assert!(
        row.contains(&hard.to_string()) && row.contains("FAIL"),
        "{row}"
    );

    // JSON, few connections: the descriptor checks pass.
    let out = gatehouse(&["doctor", "--connections", "100", "--json"], &[]);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let checks = checks.as_array().unwrap();
    let status = |name: &str| {
        checks
            .iter()
            .find(|c| c["check"] == name)
            .map(|c| c["status"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(status("open files (hard limit)"), "ok");
    assert_eq!(status("fs.nr_open"), "ok");
    let failed = checks.iter().any(|c| c["status"] == "fail");
    assert_eq!(
        out.status.success(),
        !failed,
        "exit status follows the checks"
    );
}

#[test]
fn strict_start_refuses_a_host_that_cannot_hold_the_configured_connections() {
    let hard = hard_nofile();
    if hard == libc::RLIM_INFINITY {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "run",
            "--strict",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
        ])
        .args(["--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env(
            "GATEHOUSE_SERVER__MAX_CONNECTIONS_PER_SHARD",
            (hard + 1).to_string(),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("--strict") && t.contains("open files (hard limit)"),
        "{t}"
    );
}

#[test]
fn admin_endpoint_serves_metrics_health_and_readiness_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(common::config(dir.path()));
    let admin = server.admin_addr.expect("admin enabled");
    let addr = server.local_addr;
    let (a, b) = (
        common::user_on_shard(1000, 0, 2),
        common::user_on_shard(1000, 1, 2),
    );
    let mut ca = login(addr, a, 1);
    let mut cb = login(addr, b, 1);
    for i in 0..20u64 {
        ca.send_message(i, UserId(b), b"hello").unwrap();
        expect_send_ack(&mut ca, i);
        let (id, _, _) = expect_deliver(&mut cb);
        cb.ack(&[id]).unwrap();
    }
    // A bad client: a malformed frame is counted as a protocol error and a close.
    let mut bad = gatehouse::client::Client::connect(addr, Duration::from_secs(5)).unwrap();
    bad.send_raw(&[0, 0, 0, 1, 0x7f]).unwrap();
    let _ = bad.read_until_closed(Duration::from_secs(5));

    assert_eq!(http(admin, "GET", "/healthz"), (200, "ok\n".into()));
    assert_eq!(http(admin, "GET", "/readyz"), (200, "ready\n".into()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = http(admin, "GET", "/metrics");
        assert_eq!(status, 200);
        // Deletes (and their receipts) commit asynchronously; wait until all are counted.
        if metric(&body, "gatehouse_acks_total", "") >= 20.0
            && metric(
                &body,
                "gatehouse_connections_closed_total",
                "protocol_error",
            ) >= 1.0
            || Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.ends_with("# EOF\n"));
    assert_eq!(metric(&body, "gatehouse_connections", ""), 2.0, "{body}");
    assert_eq!(metric(&body, "gatehouse_sessions", ""), 2.0);
    assert_eq!(metric(&body, "gatehouse_logins_total", ""), 2.0);
    assert_eq!(metric(&body, "gatehouse_messages_accepted_total", ""), 20.0);
    assert!(metric(&body, "gatehouse_deliveries_total", "") >= 20.0);
    assert_eq!(metric(&body, "gatehouse_acks_total", ""), 20.0);
    assert!(metric(&body, "gatehouse_frames_in_total", "") >= 44.0);
    assert!(metric(&body, "gatehouse_bytes_out_total", "") > 0.0);
    assert!(
        metric(&body, "gatehouse_envelopes_routed_total", "") >= 20.0,
        "a and b live on different shards"
    );
    assert!(metric(&body, "gatehouse_store_commits_total", "") > 0.0);
    assert!(metric(&body, "gatehouse_store_commit_seconds_count", "") > 0.0);
    assert!(metric(&body, "gatehouse_deliver_latency_seconds_count", "") >= 1.0);
    assert_eq!(
        metric(
            &body,
            "gatehouse_connections_closed_total",
            "protocol_error"
        ),
        1.0
    );
    assert_eq!(
        metric(&body, "gatehouse_errors_sent_total", "code=\"3\""),
        1.0,
        "unknown frame type"
    );
    assert_eq!(metric(&body, "gatehouse_scrape_shards_unanswered", ""), 0.0);
    assert_eq!(metric(&body, "gatehouse_ready", ""), 1.0);

    // A client that leaves is counted by reason.
    drop(cb);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &http(admin, "GET", "/metrics").1,
        "gatehouse_connections_closed_total",
        "reason=\"peer\"",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "peer close not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Bad requests get a clear answer and do not disturb anything.
    assert_eq!(http(admin, "GET", "/nope").0, 404);
    assert_eq!(http(admin, "DELETE", "/metrics").0, 405);
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"garbage\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    ca.send_message(99, UserId(b), b"still served").unwrap();
    expect_send_ack(&mut ca, 99);
    server.shutdown().unwrap();
}

#[test]
fn sigterm_drains_at_the_paced_rate_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // 60 clients at 100 GO_AWAYs/s: the drain takes about 0.6 s.
    let cfg = node_config(
        dir.path(),
        "drain_goaway_per_s = 100\ndrain_deadline_ms = 20000",
    );
    let log = dir.path().join("stderr.log");
    let (mut child, addr, admin) = spawn_node(&cfg, &log);
    let recipient = 1_000_000u64;
    let mut sender = login(addr, 7, 1);
    let mut acked = Vec::new();
    for i in 0..30u64 {
        sender
            .send_message(i, UserId(recipient), format!("m{i}").as_bytes())
            .unwrap();
        acked.push(expect_send_ack(&mut sender, i));
    }
    let mut clients: Vec<_> = (0..59u64).map(|u| login(addr, 100 + u, 1)).collect();
    clients.push(sender);

    let start = Instant::now();
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = http(admin, "GET", "/readyz");
        if status == 503 {
            assert_eq!(body, "draining\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz stayed ready after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Scrapes are still answered by every shard during the drain.
    let (status, body) = http(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&body, "gatehouse_draining", ""), 1.0, "{body}");
    assert_eq!(metric(&body, "gatehouse_scrape_shards_unanswered", ""), 0.0);
    assert_eq!(http(admin, "GET", "/healthz").0, 200);
    // Not accepting any more.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        gatehouse::client::Client::connect(addr, Duration::from_secs(1))
            .and_then(|mut c| c.recv_frame())
            .is_err(),
        "a new connection was served during the drain"
    );
    // Each client waits on its own thread, so arrival times are the server's pacing.
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.set_timeout(Duration::from_secs(15)).unwrap();
                let reason = common::expect_frame(&mut c, |f| match f {
                    ServerFrame::GoAway { reason, .. } => Some(*reason),
                    _ => None,
                });
                assert_eq!(reason, GoAwayReason::Shutdown);
                start.elapsed()
            })
        })
        .collect();
    let told: Vec<Duration> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let spread = *told.iter().max().unwrap() - *told.iter().min().unwrap();
    assert!(
        spread >= Duration::from_millis(300),
        "GO_AWAYs were not paced: all within {spread:?}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("draining"), "{log_text}");

    // Restart on the same data: every acknowledged message is there, in order.
    let (mut child, addr, _) = spawn_node(&cfg, &log);
    let mut r = login(addr, recipient, 1);
    for want in &acked {
        let (id, from, _) = expect_deliver(&mut r);
        assert_eq!((id, from), (*want, UserId(7)));
        r.ack(&[id]).unwrap();
    }
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn admin_drain_trigger_and_sighup_reload() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), "");
    let log = dir.path().join("stderr.log");
    let (mut child, addr, admin) = spawn_node(&cfg, &log);
    let mut c = login(addr, 5, 1);

    // SIGHUP with a new log level and a changed key that needs a restart.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("shards = 2\n", "shards = 2\nbacklog = 100\n") + "[log]\nlevel = \"debug\"\n",
    )
    .unwrap();
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = std::fs::read_to_string(&log).unwrap();
        if t.contains("SIGHUP: reloaded the log filter") && t.contains("only after a restart") {
            assert!(t.contains("debug"), "{t}");
            assert!(t.contains("server"), "{t}");
            break;
        }
        assert!(Instant::now() < deadline, "no reload lines: {t}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A broken file on SIGHUP keeps the running configuration.
    std::fs::write(&cfg, "[server]\nbogus = 1\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("not reloaded")
    {
        assert!(Instant::now() < deadline, "bad reload not reported");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.send_message(1, UserId(6), b"still here").unwrap();
    expect_send_ack(&mut c, 1);

    assert_eq!(http(admin, "POST", "/drain"), (202, "draining\n".into()));
    let frame = common::expect_frame(&mut c, |f| match f {
        ServerFrame::GoAway { reason, .. } => Some(*reason),
        _ => None,
    });
    assert_eq!(frame, GoAwayReason::Shutdown);
    assert!(child.wait().unwrap().success());
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), "");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap() + "[log]\nformat = \"json\"\n",
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let (mut child, _, _) = spawn_node(&cfg, &log);
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(text.contains("gatehouse serving") && lines >= 2, "{text}");
}

#[test]
fn during_the_unready_window_the_node_still_accepts_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), "drain_unready_ms = 800");
    let (mut child, addr, admin) = spawn_node(&cfg, &dir.path().join("stderr.log"));
    assert_eq!(http(admin, "POST", "/drain").0, 202);
    // Not ready at once, for load balancers...
    assert_eq!(http(admin, "GET", "/readyz"), (503, "draining\n".into()));
    // ...while a client that was already routed here is still served (300 ms in: without the
    // window, the listeners close within 50 ms of the drain).
    std::thread::sleep(Duration::from_millis(300));
    let mut late = login(addr, 77, 1);
    late.send_message(1, UserId(78), b"made it").unwrap();
    expect_send_ack(&mut late, 1);
    // After the window, connects are refused.
    std::thread::sleep(Duration::from_millis(1_200));
    assert!(
        gatehouse::client::Client::connect(addr, Duration::from_secs(1))
            .and_then(|mut c| c.recv_frame())
            .is_err(),
        "still accepting after the unready window"
    );
    assert!(child.wait().unwrap().success());
}

#[test]
fn an_admin_client_trickling_its_request_is_cut_off_at_the_head_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(common::config(dir.path()));
    let admin = server.admin_addr.unwrap();
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    // One byte every 2 s: each read is within the 5 s timeout, the whole head is not.
    let mut answer = String::new();
    for b in b"GET /metrics HTTP/1.1\r\n".iter() {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
        if start.elapsed() > Duration::from_secs(6) {
            break;
        }
    }
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(start.elapsed() < Duration::from_secs(9));
    // The endpoint still answers others.
    assert_eq!(http(admin, "GET", "/healthz").0, 200);
    server.shutdown().unwrap();
}
