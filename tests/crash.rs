//! Crash safety with the real binary: `kill -9` during a burst of sends loses no message that
//! the server acknowledged, and order per sender and recipient holds after the restart.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gatehouse::client::Client;
use gatehouse::ids::{DeviceId, UserId};
use gatehouse::proto::ServerFrame;

/// Starts `gatehouse run` on `dir` and returns the child and its address.
fn spawn_gateway(dir: &Path) -> (common::Gateway, SocketAddr) {
    let cfg = dir.join("gatehouse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\n[store]\ndata_dir = {:?}\nmap_size_mib = 256\nsync = \"batch\"\n[limits]\nsend_rate_per_s = 0\n[auth]\nkey_hex = \"{KEY_HEX}\"\n",
            dir.join("data")
        ),
    )
    .unwrap();
    spawn_and_read_addr(
        Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("GATEHOUSE_LOG", "warn")
            .env("GATEHOUSE_ADMIN__LISTEN", "127.0.0.1:0")
            .stderr(Stdio::inherit()),
    )
}

/// Streams numbered messages from `a` to `b` from a writer thread (so sends are always in
/// flight) while this thread reads acknowledgements; after `kill_after_acks` of them, kills
/// the gateway with SIGKILL. Returns the sequence numbers the server acknowledged.
fn burst_then_kill(
    child: &mut Child,
    addr: SocketAddr,
    a: u64,
    b: u64,
    first_seq: u64,
    kill_after_acks: usize,
) -> Vec<u64> {
    let mut c = Client::login(addr, UserId(a), DeviceId(1), &token(a, 1), TIMEOUT).unwrap();
    let mut writer = c.stream().try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        let mut seq = first_seq;
        let mut buf = bytes::BytesMut::new();
        loop {
            buf.clear();
            for _ in 0..64 {
                let f = gatehouse::proto::ClientFrame::Send {
                    client_msg_id: seq,
                    recipient: UserId(b),
                    body: seq.to_be_bytes().to_vec().into(),
                };
                f.encode(&mut buf);
                seq += 1;
            }
            if writer.write_all(&buf).is_err() {
                return seq - first_seq;
            }
        }
    });
    let mut acked = Vec::new();
    loop {
        match c.recv_frame() {
            Ok(ServerFrame::SendAck { client_msg_id, .. }) => {
                acked.push(client_msg_id);
                if acked.len() == kill_after_acks {
                    child.kill().unwrap(); // SIGKILL while sends stream in
                    child.wait().unwrap();
                }
            }
            Ok(ServerFrame::Receipt { .. }) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert!(
        acked.len() >= kill_after_acks,
        "gateway died before the kill"
    );
    let written = sender.join().unwrap();
    assert!(
        written > acked.len() as u64,
        "no send was in flight at the kill"
    );
    acked
}

#[test]
fn kill_9_during_a_burst_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let mut all_acked = Vec::new();
    let mut next_seq = 0;
    for (round, kill_after) in [(0, 3_000usize), (1, 1_500)] {
        let (mut child, addr) = spawn_gateway(dir.path());
        let acked = burst_then_kill(&mut child, addr, a, b, next_seq, kill_after);
        assert!(
            acked.len() >= kill_after,
            "round {round}: {} acks",
            acked.len()
        );
        next_seq = acked.last().unwrap() + 1_000_000; // beyond anything written this round
        all_acked.extend(acked);
    }

    let (mut child, addr) = spawn_gateway(dir.path());
    let mut cb = Client::login(addr, UserId(b), DeviceId(1), &token(b, 1), TIMEOUT).unwrap();
    let mut delivered = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    cb.set_timeout(Duration::from_millis(1500)).unwrap();
    loop {
        assert!(Instant::now() < deadline, "drain took too long");
        match cb.recv_frame() {
            Ok(ServerFrame::Deliver {
                server_msg_id,
                sender,
                body,
                ..
            }) => {
                assert_eq!(sender, UserId(a));
                delivered.push(u64::from_be_bytes(body[..].try_into().unwrap()));
                cb.ack(&[server_msg_id]).unwrap();
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break, // quiet for 1.5 s: queue drained
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let got: std::collections::HashSet<u64> = delivered.iter().copied().collect();
    let lost: Vec<u64> = all_acked
        .iter()
        .copied()
        .filter(|s| !got.contains(s))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let mut dedup = delivered.clone();
    dedup.dedup();
    assert!(
        dedup.windows(2).all(|w| w[0] < w[1]),
        "order per sender/recipient broken"
    );
    eprintln!(
        "crash test: {} acknowledged before two kill -9s, {} delivered after restart (includes stored-but-unacked)",
        all_acked.len(),
        delivered.len()
    );
}
