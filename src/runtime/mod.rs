//! Runtime glue: the only layer that touches sockets, threads or the clock.
//!
//! - [`shard`]: one pinned glommio executor per core; sessions, routing, group commit.
//! - [`conn`]: the per-connection I/O task (reads through a per-shard scratch buffer).
//! - [`listener`]: SO_REUSEPORT listening sockets built with socket2.
//! - [`watchdog`]: detects shards that stall with work queued (glommio 0.9 bug defense).

pub mod conn;
pub mod listener;
pub mod shard;
pub mod watchdog;

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch (timestamps on the wire, token expiry).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Monotonic milliseconds since the first call in this process: for timers that must not jump
/// with the wall clock (write stalls, rate limits).
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

thread_local! {
    /// Jobs this executor has on its blocking pool whose results have not come back yet.
    static BLOCKING_IN_FLIGHT: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` on the shard's blocking thread pool and returns its result.
///
/// Two glommio 0.9.0 workarounds:
/// - If the closure given to `spawn_blocking` panics, the future never completes and the
///   awaiting task hangs forever (silently wedging, e.g., a shard's committer). We catch the
///   panic on the blocking thread and re-raise it here, on the shard's thread, so a bug
///   crashes loudly instead of hanging.
/// - If the executor exits while a job runs (its caller was cancelled, like the syncer at
///   shutdown), the pool thread panics with "failed to send response" when the job ends.
///   Seen in about 1 run in 6 of `tests/messaging.rs`. So the job is awaited by a detached
///   task of its own, which a cancelled caller does not drop, and a shard calls
///   [`blocking_idle`] before its executor exits.
pub async fn blocking<R, F>(f: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let job =
        glommio::executor().spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(f)));
    BLOCKING_IN_FLIGHT.with(|n| n.set(n.get() + 1));
    let caught = glommio::spawn_local(async move {
        let r = job.await;
        BLOCKING_IN_FLIGHT.with(|n| n.set(n.get() - 1));
        r
    })
    .detach()
    .await
    .expect("a blocking job's task is cancelled only when its executor exits");
    match caught {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Waits until every [`blocking`] job this executor started has come back, or `limit` has
/// passed; returns whether none is left. Await it last thing before an executor exits.
pub async fn blocking_idle(limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while BLOCKING_IN_FLIGHT.with(Cell::get) > 0 {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    true
}
