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

/// Runs the heartbeat of one executor: waits for each nudge and counts a beat. Spawn it on
/// the executor (gateway shards and loadgen executors both do).
pub async fn heartbeat(nudge: Arc<Nudge>, pulse: Arc<Pulse>) {
    loop {
        nudge.wait().await;
        pulse.beats.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the watchdog on its own OS thread until `stop` is set: nudges every executor each
/// `heartbeat_ms` (0: never) and checks for stalls every `threshold_ms / 4`.
pub fn spawn(
    pulses: Vec<Arc<Pulse>>,
    nudges: Vec<Arc<Nudge>>,
    heartbeat_ms: u64,
    threshold_ms: u64,
    stop: Arc<AtomicBool>,
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
                std::thread::sleep(tick);
                if heartbeat_ms > 0 {
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
