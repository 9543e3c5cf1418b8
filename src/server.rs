//! Starting and stopping a node: every shard of one process.
//!
//! [`start`] validates the configuration, opens each shard's store (bumping its epoch),
//! binds the SO_REUSEPORT listeners, wires the shard-to-shard channels, spawns one pinned
//! glommio executor per shard and a watchdog thread, and returns once every shard serves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};

use crate::admin::{self, NodeState, ShardControl};
use crate::config::Config;
use crate::ids::ShardId;
use crate::limits;
use crate::runtime::listener::bind_reuseport;
use crate::runtime::shard::{Batch, Shard, ShardConfig, ShardSeed};
use crate::runtime::watchdog::{self, Nudge, Pulse, StartProbe};
use crate::session::SessionParams;
use crate::store::{QueueLimits, Store};
use crate::transport::tls::CertSummary;
use crate::transport::{ListenerKind, TlsContext};

/// How long the starter waits for a shard before it checks whether the shard parked before
/// running (and kicks it; see `StartProbe`). A shard normally starts within a millisecond.
const START_KICK_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// A running node.
pub struct ServerHandle {
    /// Address the listeners are bound to (the real port when configured with port 0).
    pub local_addr: SocketAddr,
    /// Address of the admin endpoint, when enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Address of the TLS listener, when enabled.
    pub tls_addr: Option<SocketAddr>,
    /// Address of the WebSocket listener, when enabled (`wss` when `websocket.tls`).
    pub ws_addr: Option<SocketAddr>,
    tls: Option<Arc<TlsContext>>,
    state: Arc<NodeState>,
    admin: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    shards: Vec<glommio::ExecutorJoinHandle<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    /// Stops the watchdog: only once the shards have exited, so that heartbeats (and with
    /// them `/healthz`, scrapes and the stall defence) keep running through a drain.
    watchdog_stop: Arc<AtomicBool>,
    pulses: Vec<Arc<Pulse>>,
}

impl ServerHandle {
    /// The flag that stops the node when set (for signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Readiness and drain state (shared with the admin endpoint).
    pub fn state(&self) -> Arc<NodeState> {
        self.state.clone()
    }

    /// Re-reads the TLS certificate and key (SIGHUP, `POST /reload-tls`). New handshakes use
    /// the new certificate; on error the old one stays and the error says why.
    pub fn reload_tls(&self) -> anyhow::Result<CertSummary> {
        reload_tls(self.tls.as_deref())
    }

    /// The node's TLS context (for reloading from elsewhere), when TLS is configured.
    pub fn tls_context(&self) -> Option<Arc<TlsContext>> {
        self.tls.clone()
    }

    /// Per-shard progress counters (heartbeats, envelopes, stalls).
    pub fn pulses(&self) -> &[Arc<Pulse>] {
        &self.pulses
    }

    /// Asks every shard to stop (GO_AWAY, commit, sync) and waits for them.
    pub fn shutdown(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Waits until the node stops (after [`ServerHandle::stop_flag`] is set).
    pub fn wait(mut self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for (i, h) in self.shards.drain(..).enumerate() {
            if let Err(e) = h.join() {
                failed.push(format!("shard {i}: {e}"));
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        self.watchdog_stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        self.state.exited.store(true, Ordering::Relaxed);
        if let Some(a) = self.admin.take() {
            if a.join().is_err() {
                failed.push("admin thread panicked".to_string());
            }
        }
        if !failed.is_empty() {
            bail!("shards failed: {}", failed.join("; "));
        }
        Ok(())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.watchdog_stop.store(true, Ordering::Relaxed);
        self.state.exited.store(true, Ordering::Relaxed);
    }
}

/// CPUs this process may run on (its affinity mask), in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1))
                .collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The loss-check test hook (see `ShardConfig::test_drop_delivery_every`), from the
/// environment. Loud, because a node with it set loses messages on purpose.
fn test_drop_delivery_every() -> u64 {
    let every = std::env::var("GATEHOUSE_TEST_DROP_DELIVERY_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if every > 0 {
        tracing::error!(every, "TEST HOOK ACTIVE: dropping every n-th delivery on purpose; never use this in production");
    }
    every
}

/// The group log's give-up test hook (see `ShardConfig::test_fail_log_moves`), from the
/// environment. Loud, because a node with it set refuses sends on purpose.
fn test_fail_log_moves() -> bool {
    let on = std::env::var("GATEHOUSE_TEST_FAIL_LOG_MOVES").is_ok_and(|v| v == "1");
    if on {
        tracing::error!("TEST HOOK ACTIVE: every commit that moves a member out of the group log fails; never use this in production");
    }
    on
}

/// Reloads the certificate of `tls`, logging the outcome.
pub fn reload_tls(tls: Option<&TlsContext>) -> anyhow::Result<CertSummary> {
    let Some(ctx) = tls else {
        bail!("TLS is not configured (no [tls] or wss listener)");
    };
    match ctx.reload() {
        Ok(summary) => {
            tracing::info!(%summary, "TLS certificate reloaded; new handshakes use it");
            Ok(summary)
        }
        Err(e) => {
            tracing::error!(error = %e, "TLS certificate reload refused; the current certificate stays");
            Err(e.into())
        }
    }
}

/// Starts a node on `config`; returns once every shard is serving.
pub fn start(config: Config) -> anyhow::Result<ServerHandle> {
    config.validate()?;
    let shards = config.shard_count();
    let keys = config.token_keys().context("loading token keys")?;
    let params = SessionParams {
        keys,
        max_frame_bytes: config.limits.max_frame_bytes,
        idle_timeout_ms: config.limits.idle_timeout_ms,
        login_timeout_ms: config.limits.login_timeout_ms,
        node_id: config.cluster.node_id,
        nodes: config.cluster.nodes,
    };
    let cfg = ShardConfig {
        max_frame_bytes: config.limits.max_frame_bytes,
        idle_timeout_ms: config.limits.idle_timeout_ms,
        delivery_window: config.limits.delivery_window,
        outbound_bytes_max: config.limits.outbound_bytes_max,
        queue: QueueLimits {
            messages_max: config.limits.queue_messages_max,
            receipts_max: config
                .limits
                .queue_messages_max
                .saturating_mul(limits::QUEUE_RECEIPTS_FACTOR),
        },
        max_connections: config.server.max_connections_per_shard,
        pending_ops_max: config.limits.pending_ops_max,
        sync: config.store.sync,
        sync_interval_ms: config.store.sync_interval_ms,
        heartbeat_ms: config.runtime.heartbeat_ms,
        drain_goaway_per_s: (config.server.drain_goaway_per_s / shards as u64).max(1),
        shard_outbound_bytes_max: config.limits.shard_outbound_bytes_max,
        write_stall_timeout_ms: config.limits.write_stall_timeout_ms,
        connect_rate_per_source: match config.limits.connect_rate_per_source {
            0 => 0,
            r => (r / shards as u32).max(1),
        },
        send_rate_per_s: config.limits.send_rate_per_s,
        drain_deadline_ms: config.server.drain_deadline_ms,
        drain_unready_ms: config.server.drain_unready_ms,
        presence_subscriptions_max: config.limits.presence_subscriptions_max,
        presence_subscribers_max: config.limits.presence_subscribers_max,
        typing_rate_per_s: config.limits.typing_rate_per_s,
        group_members_max: config.limits.group_members_max,
        test_drop_delivery_every: test_drop_delivery_every(),
        test_fail_log_moves: test_fail_log_moves(),
    };

    let mut opened = Vec::with_capacity(shards);
    for i in 0..shards {
        let o = Store::open(
            &config.store.data_dir,
            ShardId(i as u16),
            shards,
            config.store.map_size_mib,
            config.store.sync,
        )?;
        opened.push(o);
    }
    let tls = if config.tls.enabled || (config.websocket.enabled && config.websocket.tls) {
        let (ctx, summary) = TlsContext::new(&config.tls).context("setting up TLS")?;
        tracing::info!(%summary, groups = ?config.tls.kx_groups, versions = ?config.tls.versions, tickets = config.tls.session_tickets, "TLS certificate loaded");
        Some(Arc::new(ctx))
    } else {
        None
    };
    let mut kinds = vec![(ListenerKind::Tcp, config.server.listen)];
    if config.tls.enabled {
        kinds.push((ListenerKind::Tls, config.tls.listen));
    }
    if config.websocket.enabled {
        let kind = if config.websocket.tls {
            ListenerKind::Wss
        } else {
            ListenerKind::Ws
        };
        kinds.push((kind, config.websocket.listen));
    }
    // Per shard: one socket per listener kind.
    let mut listeners: Vec<Vec<(std::os::fd::OwnedFd, ListenerKind)>> =
        (0..shards).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for (kind, addr) in kinds {
        let (fds, at) = bind_reuseport(addr, shards, config.server.backlog)
            .with_context(|| format!("binding the {} listener {addr}", kind.name()))?;
        for (i, fd) in fds.into_iter().enumerate() {
            listeners[i].push((fd, kind));
        }
        bound.push((kind, at));
    }
    let addr_of =
        |want: fn(ListenerKind) -> bool| bound.iter().find(|(k, _)| want(*k)).map(|(_, a)| *a);
    let local_addr = addr_of(|k| k == ListenerKind::Tcp).expect("the TCP listener is bound");
    let tls_addr = addr_of(|k| k == ListenerKind::Tls);
    let ws_addr = addr_of(|k| k.websocket());

    // One SPSC channel per ordered pair of shards.
    let mut senders: Vec<Vec<Option<SharedSender<Batch>>>> = (0..shards)
        .map(|_| (0..shards).map(|_| None).collect())
        .collect();
    let mut receivers: Vec<Vec<SharedReceiver<Batch>>> = (0..shards).map(|_| Vec::new()).collect();
    for (src, row) in senders.iter_mut().enumerate() {
        for (dst, slot) in row.iter_mut().enumerate() {
            if src != dst {
                let (tx, rx) = shared_channel::new_bounded(limits::CHANNEL_BATCHES_DEFAULT);
                *slot = Some(tx);
                receivers[dst].push(rx);
            }
        }
    }

    // The admin endpoint: bound now so that a taken port fails the start at once; each shard
    // gets a control mailbox it polls on its heartbeat (see `Shard::poll_control`).
    let mut admin_listener = None;
    let mut controls: Vec<Option<ShardControl>> = (0..shards).map(|_| None).collect();
    let mut links = Vec::new();
    if config.admin.enabled {
        let (l, addr) = admin::bind(config.admin.listen)
            .with_context(|| format!("binding the admin endpoint {}", config.admin.listen))?;
        admin_listener = Some((l, addr));
        for c in controls.iter_mut() {
            let (link, control) = admin::control_pair();
            links.push(link);
            *c = Some(control);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let state = Arc::new(NodeState::new(stop.clone()));
    let pulses: Vec<Arc<Pulse>> = (0..shards).map(|_| Arc::new(Pulse::default())).collect();
    let nudges: Vec<Arc<Nudge>> = (0..shards).map(|_| Arc::new(Nudge::default())).collect();
    // The watchdog runs before the first shard does. A shard's start connects its channels to
    // every other shard, and glommio 0.9 can park an executor with work still queued: with no
    // foreign wake to end the park, its peers spin in `SharedSender::connect` until some I/O
    // wakes it. Until every shard has started, the watchdog nudges every few ms, even with
    // the heartbeat off. A nudge needs a waker, so it covers only a shard whose root future
    // has run; one that parked before that is woken by the probes below (`StartProbe`).
    let watchdog_stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let watchdog = watchdog::spawn(
        pulses.clone(),
        nudges.clone(),
        config.runtime.heartbeat_ms,
        config.runtime.stall_threshold_ms,
        watchdog_stop.clone(),
        Some(started.clone()),
    );
    // Stops the watchdog if the start fails from here on.
    struct StopOnDrop(Option<Arc<AtomicBool>>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            if let Some(s) = &self.0 {
                s.store(true, Ordering::Relaxed);
            }
        }
    }
    let mut stop_watchdog = StopOnDrop(Some(watchdog_stop.clone()));
    let probes: Vec<Arc<StartProbe>> = (0..shards).map(|_| Arc::new(StartProbe::new())).collect();
    let cpus = allowed_cpus();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::with_capacity(shards);
    let seeds = opened
        .into_iter()
        .zip(listeners)
        .zip(senders)
        .zip(receivers)
        .zip(controls)
        .enumerate();
    for (i, ((((o, listener), senders), receivers), control)) in seeds {
        let seed = ShardSeed {
            id: ShardId(i as u16),
            shards,
            listeners: listener,
            tls: tls.clone(),
            blockers: o
                .store
                .blockers()
                .with_context(|| format!("reading shard {i}'s block list"))?,
            tallies: o
                .store
                .tallies()
                .with_context(|| format!("reading shard {i}'s group receipt tallies"))?,
            store: o.store,
            epoch: o.epoch,
            senders,
            receivers,
            params: params.clone(),
            cfg: cfg.clone(),
            pulses: pulses.clone(),
            control,
            drained: drained.clone(),
            stop: stop.clone(),
            nudge: nudges[i].clone(),
            start: probes[i].clone(),
            ready: ready_tx.clone(),
        };
        let cpu = cpus[(config.server.first_cpu + i) % cpus.len()];
        // Placement::Fixed pins the thread before the reactor allocates, so core_affinity is
        // not needed. The blocking pool (LMDB commits) is left unbound so the kernel can run a
        // commit on whichever core is idle. It has two threads so that the periodic fsync of
        // `sync = "batch"` (an fdatasync that takes no LMDB lock) runs beside a commit instead
        // of in front of it; the committer still keeps one write transaction in flight at a
        // time (docs/architecture.md, Group commit).
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            // Threads are named `gh-shard-N-ID` (glommio adds its executor id; the kernel
            // keeps 15 bytes). The start probe finds the shard's thread by that name.
            .name(&format!("gh-shard-{i}"))
            .io_memory(config.runtime.io_memory_kib * 1024)
            .ring_depth(config.runtime.ring_depth)
            .preempt_timer(std::time::Duration::from_micros(
                config.runtime.preempt_timer_us,
            ))
            .blocking_thread_pool_placement(PoolPlacement::Unbound(2))
            .spawn(move || Shard::run(seed))
            .map_err(|e| anyhow::anyhow!("starting shard {i} on CPU {cpu}: {e}"))?;
        probes[i].set_thread(handle.thread());
        handles.push(handle);
    }
    drop(ready_tx);
    // A shard that neither starts nor fails within this time is reported instead of hanging
    // the caller (a glommio executor can wedge; see runtime/watchdog.rs).
    let ready_deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut started_shards = 0;
    while started_shards < shards {
        let left = ready_deadline.saturating_duration_since(std::time::Instant::now());
        match ready_rx.recv_timeout(left.min(START_KICK_AFTER)) {
            Ok(Ok(())) => started_shards += 1,
            Ok(Err(e)) => bail!("shard failed to start: {e}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                // A shard that parked before its root future ran (glommio 0.9) sleeps until
                // some I/O arrives; a signal ends that sleep (see `StartProbe`).
                for (i, p) in probes.iter().enumerate() {
                    if p.kick_if_parked() {
                        tracing::warn!(
                            shard = i,
                            kicks = p.kicks(),
                            "shard parked before it ran: woken with a signal"
                        );
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                stop.store(true, Ordering::Relaxed);
                bail!("a shard did not start within 30 s");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("a shard exited during start (see log)")
            }
        }
    }
    started.store(true, Ordering::Relaxed);
    let (admin, admin_addr) = match admin_listener {
        Some((l, addr)) => {
            let h = admin::spawn(l, links, state.clone(), pulses.clone(), tls.clone())
                .context("starting the admin thread")?;
            (Some(h), Some(addr))
        }
        None => (None, None),
    };
    state.ready.store(true, Ordering::Relaxed);
    stop_watchdog.0 = None;
    tracing::info!(%local_addr, tls = ?tls_addr, websocket = ?ws_addr, admin = ?admin_addr, shards, data_dir = %config.store.data_dir.display(), sync = ?config.store.sync, "gatehouse serving");
    Ok(ServerHandle {
        local_addr,
        admin_addr,
        tls_addr,
        ws_addr,
        tls,
        state,
        admin,
        stop,
        shards: handles,
        watchdog: Some(watchdog),
        watchdog_stop,
        pulses,
    })
}
