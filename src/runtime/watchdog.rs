//! Stall watchdog: counts shards that had queued work but made no progress.
//!
//! glommio 0.9.0 can park an executor in `io_cqring_wait` while its task queues are still
//! runnable (`run_task_queues()` returns false once `need_preempt()` is set, and the loop
//! parks). Measured here: 4 stalls in 8 runs of 53+53 processes, each lasting 580-700 s until
//! unrelated I/O woke the executor. The defense has two parts:
//! 1. every shard runs a heartbeat timer (`runtime.heartbeat_ms`), so a parked executor is
//!    woken by its own timer within one period and the stall is bounded by it;
//! 2. this watchdog, on a plain OS thread outside glommio, reads each shard's [`Pulse`] and
//!    counts (and logs) every episode where a shard had envelopes waiting but neither its
//!    heartbeat nor its drained-envelope count advanced for `runtime.stall_threshold_ms`.
//!
//! The decision logic ([`StallDetector`]) is pure and tested with synthetic time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Nudge period while executors start (see [`spawn`]'s `started`), whatever the heartbeat.
pub const STARTUP_NUDGE_MS: u64 = 5;

/// Progress counters one shard publishes for the watchdog. Written by the shard's own thread
/// (relaxed atomics: only the watchdog and the metrics scrape read them).
#[derive(Debug, Default)]
pub struct Pulse {
    /// Heartbeat ticks so far.
    pub beats: AtomicU64,
    /// Envelopes other shards handed to this shard's channels.
    pub envelopes_in: AtomicU64,
    /// Envelopes this shard's drain tasks have handled.
    pub envelopes_done: AtomicU64,
    /// Stall episodes the watchdog counted for this shard.
    pub stalls: AtomicU64,
    /// Connections this shard adopted from other shards after their login (hand-overs).
    pub handovers_in: AtomicU64,
    /// Connections this shard holds now.
    pub connections: AtomicU64,
}

/// One observation of a shard's pulse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PulseSample {
    /// Heartbeat ticks.
    pub beats: u64,
    /// Envelopes handed in.
    pub envelopes_in: u64,
    /// Envelopes handled.
    pub envelopes_done: u64,
}

impl Pulse {
    /// Reads the counters.
    pub fn sample(&self) -> PulseSample {
        PulseSample {
            beats: self.beats.load(Ordering::Relaxed),
            envelopes_in: self.envelopes_in.load(Ordering::Relaxed),
            envelopes_done: self.envelopes_done.load(Ordering::Relaxed),
        }
    }
}

/// Per-shard stall detection state. Pure: time is passed in.
#[derive(Debug)]
pub struct StallDetector {
    threshold_ms: u64,
    last: Option<PulseSample>,
    last_progress_ms: u64,
    in_stall: bool,
}

/// What one check concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Progressing, or idle with nothing queued.
    Fine,
    /// A new stall episode began: work queued, no progress for at least the threshold.
    StallStarted {
        /// How long without progress, ms.
        for_ms: u64,
        /// Envelopes waiting.
        queued: u64,
    },
    /// The stall that was reported goes on.
    StillStalled,
    /// A reported stall ended.
    Recovered,
}

impl StallDetector {
    /// A detector that flags `threshold_ms` without progress.
    pub fn new(threshold_ms: u64) -> StallDetector {
        StallDetector {
            threshold_ms,
            last: None,
            last_progress_ms: 0,
            in_stall: false,
        }
    }

    /// Feeds one sample taken at `now_ms`.
    pub fn check(&mut self, s: PulseSample, now_ms: u64) -> Verdict {
        // With envelopes queued, only handling them counts as progress: heartbeats keep
        // coming from outside (see `Nudge`) even while a drain task is stuck.
        let progressed = match self.last {
            None => true,
            Some(prev) => s.envelopes_done != prev.envelopes_done,
        };
        self.last = Some(s);
        let queued = s.envelopes_in.saturating_sub(s.envelopes_done);
        if progressed || queued == 0 {
            self.last_progress_ms = now_ms;
            if self.in_stall {
                self.in_stall = false;
                return Verdict::Recovered;
            }
            return Verdict::Fine;
        }
        let for_ms = now_ms.saturating_sub(self.last_progress_ms);
        if for_ms < self.threshold_ms {
            return Verdict::Fine;
        }
        if self.in_stall {
            return Verdict::StillStalled;
        }
        self.in_stall = true;
        Verdict::StallStarted { for_ms, queued }
    }
}

/// The cross-thread half of a shard's heartbeat: the shard's heartbeat task parks its waker
/// here, and the watchdog thread wakes it every period.
///
/// Why a wake from another thread and not a glommio timer: a timer only wakes a parked
/// executor while it is armed. Once it has fired, its task is merely queued, and if the
/// executor then parks with that task still queued (the 0.9.0 bug), nothing is armed any
/// more. Measured here: loadgen executors with a repeating 250 ms timer stayed parked in
/// `io_cqring_wait` for minutes, using no CPU, during a 120,000-connection run. A waker called
/// from a foreign thread makes glommio write the executor's eventfd, which ends any park.
#[derive(Debug, Default)]
pub struct Nudge {
    waker: std::sync::Mutex<Option<std::task::Waker>>,
    pending: AtomicBool,
}

impl Nudge {
    /// Called from the watchdog thread: wakes the heartbeat task (and so its executor).
    pub fn nudge(&self) {
        self.pending.store(true, Ordering::Release);
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            w.wake_by_ref();
        }
    }

    /// Lends the calling task's waker to the watchdog until the heartbeat task registers its
    /// own. Await it first thing in an executor's root future: otherwise an executor that
    /// parks (the 0.9.0 bug) before its heartbeat task first ran has no waker to be nudged
    /// through. Measured: a loadgen worker parked for minutes right after start that way.
    pub async fn attach(&self) {
        futures_lite::future::poll_fn(|cx| {
            let mut w = self.waker.lock().unwrap_or_else(|e| e.into_inner());
            if w.is_none() {
                *w = Some(cx.waker().clone());
            }
            std::task::Poll::Ready(())
        })
        .await
    }

    /// Awaited by the heartbeat task on its executor: resolves at the next nudge.
    pub async fn wait(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.pending.swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            if self.pending.swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// The start of one executor, watched from outside it.
///
/// glommio 0.9 can park a new executor before it ever polls its root future: the loop arms
/// a 500 µs preemption timer, and if the OS deschedules the thread for longer before the
/// first `need_preempt()` check, `run_task_queues()` returns at once and the executor parks
/// with its root task still queued. No task has run, so no waker exists for a [`Nudge`] to
/// use, and the park lasts until unrelated I/O arrives. Measured on this 2-core box: about 1
/// start in 300 (4 in 109 runs of `tests/messaging.rs`, 12 servers each), with the parked
/// shard's peers spinning in `SharedSender::connect` for seconds to minutes.
///
/// The cure from outside: a signal. glommio treats `EINTR` from its sleeping
/// `io_uring_enter` as a normal wake-up (`Reactor::intr_ok`), loops, and runs the root task.
/// The starter gives each probe its executor's thread ([`StartProbe::set_thread`], right
/// after the spawn) and calls [`StartProbe::kick_if_parked`] for each executor that has not
/// polled its root future within a few milliseconds; it signals only a thread that is asleep,
/// with
/// `SIGURG` and a handler that does nothing (the signal Go's runtime uses to preempt threads,
/// for the same reason: its default action is to ignore it, and nothing else sends it to a
/// thread unless asked to).
#[derive(Debug, Default)]
pub struct StartProbe {
    /// The executor thread's name as the kernel keeps it (at most 15 bytes). glommio names it
    /// `{name}-{executor id}`, ids being unique in the process, so nodes started side by side
    /// in one process (the tests) are told apart; its blocking-pool threads share the name.
    comm: std::sync::OnceLock<String>,
    polled: AtomicBool,
    kicks: AtomicU64,
}

/// `io_uring_enter`'s syscall number on x86-64 and aarch64 alike.
const SYS_IO_URING_ENTER: i64 = 426;

impl StartProbe {
    /// A probe with no thread yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells the probe the executor's thread (`ExecutorJoinHandle::thread`). Keep executor
    /// names short (the kernel keeps 15 bytes of `{name}-{id}`), so that ids stay in them.
    pub fn set_thread(&self, thread: &std::thread::Thread) {
        let name: String = thread.name().unwrap_or_default().chars().take(15).collect();
        let _ = self.comm.set(name);
    }

    /// Call first thing in the root future.
    pub fn polled(&self) {
        self.polled.store(true, Ordering::Release);
    }

    /// Whether the root future has run.
    pub fn has_polled(&self) -> bool {
        self.polled.load(Ordering::Acquire)
    }

    /// Signals the executor's thread if its root future has not run yet and the thread is
    /// asleep in `io_uring_enter` (a parked glommio executor; its blocking-pool threads
    /// share the name but sleep in `futex`, and are left alone). Returns whether it did.
    pub fn kick_if_parked(&self) -> bool {
        let Some(comm) = self.comm.get().filter(|c| !c.is_empty()) else {
            return false;
        };
        if self.has_polled() {
            return false;
        }
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return false;
        };
        let mut sent = false;
        for t in tasks.flatten() {
            let path = t.path();
            let same =
                std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim_end() == comm);
            if !same || !parked_in_uring(&path) {
                continue;
            }
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            install_kick_handler();
            if self.has_polled() {
                break; // it started meanwhile
            }
            // SAFETY: tgkill to a thread of this process; SIGURG has a no-op handler
            // (installed above), so at worst it interrupts a syscall, which glommio's sleep
            // takes as a wake-up.
            if unsafe { libc::tgkill(libc::getpid(), tid, libc::SIGURG) } == 0 {
                self.kicks.fetch_add(1, Ordering::Relaxed);
                sent = true;
            }
        }
        sent
    }

    /// Signals sent so far.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Relaxed)
    }
}

/// Whether the thread at `task` (a `/proc/self/task/TID` path) sleeps in `io_uring_enter`.
/// Where `syscall` cannot be read (a non-dumpable process, such as a binary given file
/// capabilities, has it owned by root), any sleep counts: a stray `SIGURG` only interrupts a
/// syscall, and glommio, std and LMDB retry those.
fn parked_in_uring(task: &std::path::Path) -> bool {
    let sleeping = std::fs::read_to_string(task.join("stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('S')))
        .unwrap_or(false);
    if !sleeping {
        return false;
    }
    match std::fs::read_to_string(task.join("syscall")) {
        Ok(s) => {
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<i64>().ok())
                == Some(SYS_IO_URING_ENTER)
        }
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(error = %e, "start probe: cannot read /proc/self/task/*/syscall; a sleeping executor that has not started is signalled whatever it waits in");
            });
            true
        }
    }
}

extern "C" fn ignore_kick(_: libc::c_int) {}

/// Installs a do-nothing `SIGURG` handler once, without `SA_RESTART` (so a sleep returns
/// `EINTR`), unless the process already has a handler of its own for it.
fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: plain sigaction calls on zeroed structs; the handler is async-signal-safe
        // (it does nothing).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGURG, std::ptr::null(), &mut old) != 0 {
                return;
            }
            if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
                // Someone's handler: it interrupts sleeps as well, but it runs on each kick.
                tracing::warn!("start probe: SIGURG already has a handler; it runs when a parked executor is woken");
                return;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = ignore_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut act.sa_mask);
            act.sa_flags = 0;
            libc::sigaction(libc::SIGURG, &act, std::ptr::null_mut());
        }
    });
}

/// Runs the heartbeat of one executor: waits for each nudge and counts a beat. Spawn it on
/// the executor (gateway shards and loadgen executors both do).
pub async fn heartbeat(nudge: Arc<Nudge>, pulse: Arc<Pulse>) {
    loop {
        nudge.wait().await;
        pulse.beats.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the watchdog on its own OS thread until `stop` is set: nudges every executor each
/// `heartbeat_ms` (0: never) and checks for stalls every `threshold_ms / 4`. With `started`,
/// it also nudges every [`STARTUP_NUDGE_MS`] until that flag is set, whatever the heartbeat:
/// start it before the executors, so that none can park unwoken while it starts.
pub fn spawn(
    pulses: Vec<Arc<Pulse>>,
    nudges: Vec<Arc<Nudge>>,
    heartbeat_ms: u64,
    threshold_ms: u64,
    stop: Arc<AtomicBool>,
    started: Option<Arc<AtomicBool>>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("gatehouse-watchdog".into())
        .spawn(move || {
            let start = Instant::now();
            let mut detectors: Vec<StallDetector> = pulses
                .iter()
                .map(|_| StallDetector::new(threshold_ms))
                .collect();
            let check_every = Duration::from_millis((threshold_ms / 4).clamp(5, 250));
            let tick = if heartbeat_ms == 0 {
                check_every
            } else {
                Duration::from_millis(heartbeat_ms)
            };
            let mut last_check = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                // While the executors start, nudge often whatever the heartbeat: a start
                // that parks with its channel connects queued would otherwise wait for I/O.
                let starting = started.as_ref().is_some_and(|s| !s.load(Ordering::Relaxed));
                std::thread::sleep(if starting {
                    tick.min(Duration::from_millis(STARTUP_NUDGE_MS))
                } else {
                    tick
                });
                if heartbeat_ms > 0 || starting {
                    nudges.iter().for_each(|n| n.nudge());
                }
                if last_check.elapsed() < check_every {
                    continue;
                }
                last_check = Instant::now();
                let now_ms = start.elapsed().as_millis() as u64;
                for (shard, (pulse, det)) in pulses.iter().zip(detectors.iter_mut()).enumerate() {
                    match det.check(pulse.sample(), now_ms) {
                        Verdict::StallStarted { for_ms, queued } => {
                            pulse.stalls.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                shard,
                                for_ms,
                                queued,
                                "shard stalled: work queued but no progress"
                            );
                        }
                        Verdict::Recovered => tracing::warn!(shard, "shard recovered from stall"),
                        Verdict::Fine | Verdict::StillStalled => {}
                    }
                }
            }
        })
        .expect("spawn watchdog thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(beats: u64, envelopes_in: u64, envelopes_done: u64) -> PulseSample {
        PulseSample {
            beats,
            envelopes_in,
            envelopes_done,
        }
    }

    #[test]
    fn idle_shard_without_heartbeat_is_not_a_stall() {
        let mut d = StallDetector::new(100);
        assert_eq!(d.check(s(0, 5, 5), 0), Verdict::Fine);
        assert_eq!(d.check(s(0, 5, 5), 1_000), Verdict::Fine);
    }

    #[test]
    fn queued_work_without_progress_is_one_stall_episode() {
        let mut d = StallDetector::new(100);
        assert_eq!(d.check(s(1, 5, 5), 0), Verdict::Fine);
        assert_eq!(d.check(s(1, 9, 5), 50), Verdict::Fine, "below threshold");
        assert_eq!(
            d.check(s(1, 9, 5), 120),
            Verdict::StallStarted {
                for_ms: 120,
                queued: 4
            }
        );
        assert_eq!(d.check(s(1, 12, 5), 500), Verdict::StillStalled);
        assert_eq!(d.check(s(2, 12, 12), 510), Verdict::Recovered);
        assert_eq!(d.check(s(3, 12, 12), 520), Verdict::Fine);
    }

    #[test]
    fn heartbeats_do_not_hide_a_stuck_drain() {
        let mut d = StallDetector::new(100);
        d.check(s(1, 9, 5), 0);
        assert_eq!(d.check(s(2, 9, 5), 50), Verdict::Fine);
        assert_eq!(
            d.check(s(3, 9, 5), 150),
            Verdict::StallStarted {
                for_ms: 150,
                queued: 4
            }
        );
    }
}
