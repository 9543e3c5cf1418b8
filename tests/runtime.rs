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
    // While the shards start, the watchdog nudges them whatever the heartbeat (a start that
    // parks must be woken); let the last of those nudges land first.
    std::thread::sleep(Duration::from_millis(50));
    let before = beats(&server);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        beats(&server),
        before,
        "an idle shard turned without a heartbeat"
    );
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

/// An executor asleep in `io_uring_enter` whose root future has not reported in: the probe
/// finds its thread by name, signals it, and the executor lives on (a no-op handler; glommio
/// takes the interrupted sleep as a wake-up).
#[test]
fn a_start_probe_signals_only_an_executor_parked_before_it_ran() {
    use gatehouse::runtime::watchdog::StartProbe;
    use std::sync::Arc;
    let probe = Arc::new(StartProbe::new());
    let sleeper = |name: &str| {
        let (tx, rx) = std::sync::mpsc::channel();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .name(name)
            .io_memory(64 * 1024)
            .spawn(move || async move {
                // Stands for an executor that parked before its root future ran: asleep in
                // io_uring_enter, and the probe not told.
                glommio::timer::sleep(Duration::from_millis(700)).await;
                let _ = tx.send(());
            })
            .unwrap();
        (ex, rx)
    };
    let (ex, rx) = sleeper("gh-probe");
    assert!(!probe.kick_if_parked(), "no thread given yet");
    probe.set_thread(ex.thread());
    // Another executor of the same name (another node in this process: glommio names the
    // thread `{name}-{executor id}`) and a thread with exactly the executor's name asleep
    // elsewhere (like glommio's blocking pool, in futex) are left alone.
    let (ex2, rx2) = sleeper("gh-probe");
    let (hold, held) = std::sync::mpsc::channel::<()>();
    let other = std::thread::Builder::new()
        .name(ex.thread().name().unwrap().to_string())
        .spawn(move || {
            let _ = held.recv();
        })
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while !probe.kick_if_parked() {
        assert!(
            std::time::Instant::now() < deadline,
            "the parked executor was not found"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(probe.kicks(), 1, "only the executor's thread is signalled");
    // Once the root future has reported in, the probe never signals again.
    probe.polled();
    assert!(!probe.kick_if_parked());
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the executor did not survive the signal");
    ex.join().unwrap();
    rx2.recv_timeout(Duration::from_secs(10)).unwrap();
    ex2.join().unwrap();
    drop(hold);
    other.join().unwrap();
}

/// A task cancelled while its blocking job runs (the syncer at shutdown) must not let the
/// executor exit before the job's result comes back: glommio 0.9's pool thread panics
/// ("failed to send response") when the executor is gone.
#[test]
fn an_executor_outlives_the_blocking_job_of_a_cancelled_task() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .spawn(move || async move {
            let task = glommio::spawn_local(async move {
                gatehouse::runtime::blocking(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    d.store(true, Ordering::SeqCst);
                })
                .await
            });
            glommio::timer::sleep(Duration::from_millis(20)).await;
            task.cancel().await;
            let idle = gatehouse::runtime::blocking_idle(Duration::from_secs(10)).await;
            (idle, done.load(Ordering::SeqCst))
        })
        .unwrap();
    let (idle, finished) = ex.join().unwrap();
    assert!(idle, "blocking_idle gave up");
    assert!(
        finished,
        "the executor went on before the cancelled task's job ended"
    );
}
