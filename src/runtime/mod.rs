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

use std::panic::AssertUnwindSafe;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// Runs `f` on the shard's blocking thread pool and returns its result.
///
/// glommio 0.9.0 workaround: if the closure given to `spawn_blocking` panics, the future never
/// completes and the awaiting task hangs forever (silently wedging, e.g., a shard's committer).
/// We catch the panic on the blocking thread and re-raise it here, on the shard's thread, so a
/// bug crashes loudly instead of hanging.
pub async fn blocking<R, F>(f: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let caught = glommio::executor()
        .spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(f)))
        .await;
    match caught {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
