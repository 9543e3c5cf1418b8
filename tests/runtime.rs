//! The defense against glommio 0.9's executor stall: every shard's heartbeat keeps its
//! executor turning even with no I/O at all, and the watchdog sees that as progress.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

fn beats(server: &gatehouse::server::ServerHandle) -> Vec<u64> {
    server
        .pulses()
        .iter()
        .map(|p| p.beats.load(Ordering::Relaxed))
        .collect()
}

#[test]
fn heartbeat_wakes_idle_shards_and_no_stall_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.runtime.heartbeat_ms = 5;
    let server = start(cfg);
    let before = beats(&server);
    std::thread::sleep(Duration::from_millis(500));
    let after = beats(&server);
    for (shard, (b, a)) in before.iter().zip(&after).enumerate() {
        // 100 periods elapsed; allow for a loaded 2-core CI machine.
        assert!(
            a - b >= 40,
            "shard {shard}: only {} heartbeats in 500 ms",
            a - b
        );
    }
    let stalls: u64 = server
        .pulses()
        .iter()
        .map(|p| p.stalls.load(Ordering::Relaxed))
        .sum();
    assert_eq!(stalls, 0);
    server.shutdown().unwrap();
}

#[test]
fn without_heartbeat_an_idle_shard_does_not_turn() {
    // Control for the test above: the beat counter moves only because of the heartbeat.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.runtime.heartbeat_ms = 0;
    // Without the admin endpoint: with it, a 10 ms control timer counts beats instead (so that
    // /healthz still works), which this control test must not see.
    cfg.admin.enabled = false;
    let server = start(cfg);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(beats(&server), vec![0, 0]);
    server.shutdown().unwrap();
}

#[test]
fn messages_flow_with_the_watchdog_watching() {
    // Cross-shard envelopes are counted in and out; after the traffic settles nothing is
    // left queued and no stall was reported.
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let mut ca = login(server.local_addr, a, 1);
    let mut cb = login(server.local_addr, b, 1);
    for i in 0..200 {
        ca.send_message(i, gatehouse::ids::UserId(b), b"x").unwrap();
    }
    for i in 0..200 {
        expect_send_ack(&mut ca, i);
        let (id, _, _) = expect_deliver(&mut cb);
        cb.ack(&[id]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    for p in server.pulses() {
        let s = p.sample();
        assert!(s.envelopes_in > 0);
        assert_eq!(s.envelopes_in, s.envelopes_done, "envelopes left unhandled");
        assert_eq!(p.stalls.load(Ordering::Relaxed), 0);
    }
    server.shutdown().unwrap();
}

#[test]
fn a_panic_in_a_blocking_call_reaches_the_shard_instead_of_hanging_it() {
    // glommio 0.9 leaves the awaiting future pending for ever when a spawn_blocking closure
    // panics; gatehouse::runtime::blocking re-raises the panic on the executor's thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 * 1024)
            .spawn(|| async {
                gatehouse::runtime::blocking(|| -> u32 { panic!("boom in the store") }).await
            })
            .unwrap();
        let _ = tx.send(ex.join().is_err());
    });
    let panicked = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the executor hung on a panicking blocking call");
    assert!(panicked, "the panic did not reach the executor");
}
