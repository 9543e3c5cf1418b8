//! What a shard reports when the admin endpoint is scraped, and its Prometheus encoding.
//!
//! Shards count in plain `Cell`s on their own thread (no atomics on the hot path). On a
//! scrape the admin executor asks each shard over its control channel; the shard answers
//! with a [`ShardSnapshot`] (plain data, `Send`), and [`encode`] writes every shard's
//! series with a `shard` label in the OpenMetrics text format via `prometheus-client`.
//! Latency histograms are hdrhistograms, exported as Prometheus histograms with fixed
//! bucket bounds. `docs/operations.md` lists every metric.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// Why a connection ended; one counter per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum CloseReason {
    /// The client closed it (EOF), or it ended without a server decision.
    #[default]
    Peer = 0,
    /// A socket error (reset, broken pipe).
    Io,
    /// The client broke the protocol (malformed frame, wrong frame, too large).
    Protocol,
    /// Login refused (bad or expired token, wrong node).
    Auth,
    /// No login within `limits.login_timeout_ms`.
    LoginTimeout,
    /// No frame within `limits.idle_timeout_ms`.
    Idle,
    /// The client did not read: its outbound queue passed `limits.outbound_bytes_max`.
    SlowConsumer,
    /// A newer login of the same device replaced it.
    Replaced,
    /// The node drained or stopped.
    Shutdown,
    /// The server could not serve it (store read failure).
    Internal,
    /// Over a rate limit: kept sending past the SEND limit.
    RateLimited,
    /// TLS failed: not TLS (a plaintext client on a TLS port), a bad handshake, an alert.
    Tls,
    /// WebSocket failed: not an upgrade request, or a framing violation.
    WebSocket,
    /// The TLS handshake or WebSocket upgrade did not finish within the login timeout.
    HandshakeTimeout,
}

impl CloseReason {
    /// Every reason, in counter order.
    pub const ALL: [CloseReason; 14] = [
        CloseReason::Peer,
        CloseReason::Io,
        CloseReason::Protocol,
        CloseReason::Auth,
        CloseReason::LoginTimeout,
        CloseReason::Idle,
        CloseReason::SlowConsumer,
        CloseReason::Replaced,
        CloseReason::Shutdown,
        CloseReason::Internal,
        CloseReason::RateLimited,
        CloseReason::Tls,
        CloseReason::WebSocket,
        CloseReason::HandshakeTimeout,
    ];

    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Peer => "peer",
            CloseReason::Io => "io_error",
            CloseReason::Protocol => "protocol_error",
            CloseReason::Auth => "auth_failed",
            CloseReason::LoginTimeout => "login_timeout",
            CloseReason::Idle => "idle",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Replaced => "replaced",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Internal => "internal",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::Tls => "tls_error",
            CloseReason::WebSocket => "websocket_error",
            CloseReason::HandshakeTimeout => "handshake_timeout",
        }
    }
}

/// Error codes (`proto::ErrorCode`, 1..) counted per code; larger codes share the last slot.
pub const ERROR_CODES_MAX: usize = 32;

/// One shard's counters, gauges and histograms at scrape time.
#[derive(Clone, Debug)]
pub struct ShardSnapshot {
    /// Shard index.
    pub shard: u16,
    /// Request sequence number this answers.
    pub seq: u64,
    /// Connections held now.
    pub connections: u64,
    /// Users with at least one session on this shard now.
    pub sessions: u64,
    /// Connections accepted here or adopted from another shard.
    pub conns_opened: u64,
    /// Connections refused at `server.max_connections_per_shard`.
    pub conns_refused: u64,
    /// Connections closed, by [`CloseReason`] (index = reason as usize).
    pub conns_closed: [u64; CloseReason::ALL.len()],
    /// Successful logins verified here.
    pub logins_ok: u64,
    /// ERROR frames sent, by code (index = code); login failures are codes 5 to 8 and 17.
    pub errors_sent: [u64; ERROR_CODES_MAX],
    /// Connections handed to their owner shard after login.
    pub handovers_out: u64,
    /// Connections adopted from other shards.
    pub handovers_in: u64,
    /// Frames read from clients.
    pub frames_in: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Frames queued to clients.
    pub frames_out: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Messages stored and acknowledged to their sender (SEND_ACK).
    pub messages_accepted: u64,
    /// Messages refused (queue full, store failure).
    pub messages_refused: u64,
    /// Envelopes sent to other shards.
    pub envelopes_routed: u64,
    /// Messages and receipts written to devices.
    pub deliveries: u64,
    /// ACKs received from devices.
    pub acks: u64,
    /// Receipts dropped at a sender's receipt allowance.
    pub receipts_dropped: u64,
    /// Items in this shard's offline queues (messages and receipts).
    pub queue_items: u64,
    /// Bytes of B-tree pages holding them.
    pub queue_bytes: u64,
    /// Bytes of B-tree pages of the whole store: the queues and the metadata (shared group
    /// bodies, counts, presence, groups, blocks).
    pub store_bytes: u64,
    /// Group commits.
    pub commits: u64,
    /// Group commits that failed.
    pub commit_failures: u64,
    /// Deletes (ACKs) of failed commits committed again on their own.
    pub deletes_retried: u64,
    /// Store writes waiting for the next commit.
    pub pending_ops: u64,
    /// Times a send to another shard found the channel full and had to wait.
    pub channel_full: u64,
    /// Times the shard stopped reading because store writes piled up.
    pub backpressure_pauses: u64,
    /// Connections closed as slow consumers.
    pub slow_consumers: u64,
    /// New connections refused by the per-source connection rate limit.
    pub conns_rate_limited: u64,
    /// SENDs refused by the per-connection rate limit.
    pub sends_rate_limited: u64,
    /// Connections from new source addresses not rate-limited because the shard's table was
    /// full.
    pub sources_untracked: u64,
    /// TLS handshakes completed in full (certificate signature).
    pub tls_handshakes_full: u64,
    /// TLS handshakes completed by resuming a session (ticket).
    pub tls_handshakes_resumed: u64,
    /// WebSocket upgrades completed.
    pub ws_upgrades: u64,
    /// Presence subscriptions held on the shard's users now.
    pub presence_watchers: u64,
    /// PRESENCE frames queued to followers.
    pub presence_sent: u64,
    /// Presence subscriptions refused at a limit.
    pub presence_refused: u64,
    /// Typing indicators forwarded.
    pub typing_forwarded: u64,
    /// Typing indicators dropped (rate, offline recipient, block).
    pub typing_dropped: u64,
    /// SENDs refused because the recipient blocks the sender.
    pub sends_blocked: u64,
    /// Group messages appended to members' queues (member-deliveries).
    pub group_deliveries: u64,
    /// Group messages and events a member missed: its queue was full.
    pub group_queue_full: u64,
    /// Member-deliveries stored through the group log (online members).
    pub group_log_deliveries: u64,
    /// Members whose move out of the group log failed twice (left for the next start).
    pub group_log_moves_failed: u64,
    /// Group messages held in memory for online members, each stored once in the group log.
    pub group_log_messages: u64,
    /// Group receipt tallies written to the store (checkpoints).
    pub group_tally_writes: u64,
    /// Outbound bytes queued on the shard's connections now (the memory budget's gauge).
    pub outbound_bytes_queued: u64,
    /// Group commit latency, µs, at [`LATENCY_BOUNDS_US`].
    pub commit_us: Buckets,
    /// Ops per group commit, at [`BATCH_BOUNDS`].
    pub commit_ops: Buckets,
    /// Server-side send→deliver latency of live deliveries, µs, at [`LATENCY_BOUNDS_US`]
    /// (1 ms resolution: from the message's server timestamp to the write to the recipient's
    /// connection).
    pub deliver_us: Buckets,
}

/// A histogram reduced to fixed bucket bounds on the shard, so that a scrape moves a few
/// hundred bytes instead of whole hdrhistograms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    /// Per-bucket (not cumulative) counts: one per bound, then the overflow bucket.
    pub counts: Vec<u64>,
    /// Sum of the recorded values (each taken at its hdrhistogram bucket's middle).
    pub sum: f64,
    /// Values recorded.
    pub count: u64,
}

impl Buckets {
    /// Reduces `h` to `bounds` (ascending) in one pass over its non-empty buckets.
    pub fn from_histogram(h: &Histogram<u64>, bounds: &[u64]) -> Buckets {
        let mut counts = vec![0u64; bounds.len() + 1];
        let mut sum = 0.0;
        // (An empty histogram's iterator would still walk every bucket.)
        for v in h.iter_recorded().take_while(|_| !h.is_empty()) {
            let value = v.value_iterated_to();
            let n = v.count_at_value();
            // hdrhistogram reports the top of its bucket: a value recorded exactly at a bound
            // (a commit of `COMMIT_OPS_MAX` ops) would otherwise land above it.
            let i = bounds.partition_point(|&b| b < h.lowest_equivalent(value));
            counts[i] += n;
            sum += h.median_equivalent(value) as f64 * n as f64;
        }
        Buckets {
            counts,
            sum,
            count: h.len(),
        }
    }
}

/// Facts about the node the admin endpoint adds to the shards' reports.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    /// Per shard: stall episodes counted by the watchdog.
    pub stalls: Vec<u64>,
    /// Shards that did not answer this scrape in time.
    pub shards_unanswered: u64,
    /// Whether the node is ready (serving and not draining).
    pub ready: bool,
    /// Whether a drain is under way.
    pub draining: bool,
    /// Seconds since start.
    pub uptime_s: f64,
}

/// Histogram bucket bounds for latencies, µs (exported in seconds).
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
/// Histogram bucket bounds for ops per group commit.
pub const BATCH_BOUNDS: [u64; 14] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536,
];
const _: () =
    assert!(BATCH_BOUNDS[BATCH_BOUNDS.len() - 1] as usize >= crate::limits::COMMIT_OPS_MAX);

type Fam<'a> = &'a [(u16, &'a ShardSnapshot)];

/// One series per shard of a counter or a gauge, labelled `shard`.
fn per_shard(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    shards: Fam,
    f: impl Fn(&ShardSnapshot) -> u64,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (id, s) in shards {
        let labels = [("shard", id.to_string())];
        let series = m.encode_family(&labels)?;
        match ty {
            MetricType::Counter => ConstCounter::new(f(s)).encode(series)?,
            _ => ConstGauge::new(f(s) as i64).encode(series)?,
        }
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    shards: Fam,
    f: impl Fn(&ShardSnapshot) -> u64,
) -> std::fmt::Result {
    per_shard(enc, name, help, MetricType::Counter, shards, f)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    shards: Fam,
    f: impl Fn(&ShardSnapshot) -> u64,
) -> std::fmt::Result {
    per_shard(enc, name, help, MetricType::Gauge, shards, f)
}

/// `b`'s buckets with their bounds in units of `per` (1e6 turns µs into seconds), and the
/// sum. The last bucket's bound is `f64::MAX`, which the encoder writes as `+Inf`.
fn buckets(b: &Buckets, bounds: &[u64], per: f64) -> (f64, u64, Vec<(f64, u64)>) {
    let out = bounds
        .iter()
        .map(|&x| x as f64 / per)
        .chain(std::iter::once(f64::MAX))
        .zip(b.counts.iter().copied().chain(std::iter::repeat(0)))
        .collect();
    (b.sum / per, b.count, out)
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    shards: Fam,
    bounds: &[u64],
    per: f64,
    f: impl Fn(&ShardSnapshot) -> &Buckets,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (id, s) in shards {
        let labels = [("shard", id.to_string())];
        let (sum, count, b) = buckets(f(s), bounds, per);
        m.encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &b, None)?;
    }
    Ok(())
}

/// Writes every shard's metrics and the node facts as OpenMetrics text.
pub fn encode(snaps: &[ShardSnapshot], node: &NodeFacts) -> String {
    let mut out = String::new();
    let registry = prometheus_client::registry::Registry::with_prefix("gatehouse");
    let mut reg = registry;
    reg.register_collector(Box::new(Snapshots {
        snaps: snaps.to_vec(),
        node: node.clone(),
    }));
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

/// The collector that encodes one scrape's snapshots.
#[derive(Debug)]
struct Snapshots {
    snaps: Vec<ShardSnapshot>,
    node: NodeFacts,
}

impl prometheus_client::collector::Collector for Snapshots {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let fam: Vec<(u16, &ShardSnapshot)> = self.snaps.iter().map(|s| (s.shard, s)).collect();
        let f = &fam[..];
        let e = &mut enc;
        gauge(e, "connections", "Connections held now", f, |s| {
            s.connections
        })?;
        gauge(
            e,
            "sessions",
            "Users with a session on the shard now",
            f,
            |s| s.sessions,
        )?;
        counter(
            e,
            "connections_opened",
            "Connections accepted or adopted",
            f,
            |s| s.conns_opened,
        )?;
        counter(
            e,
            "connections_refused",
            "Connections refused at server.max_connections_per_shard",
            f,
            |s| s.conns_refused,
        )?;
        {
            let mut m = e.encode_descriptor(
                "connections_closed",
                "Connections closed, by reason",
                None,
                MetricType::Counter,
            )?;
            for (id, s) in f {
                for r in CloseReason::ALL {
                    let labels = [("shard", id.to_string()), ("reason", r.label().to_string())];
                    ConstCounter::new(s.conns_closed[r as usize])
                        .encode(m.encode_family(&labels)?)?;
                }
            }
        }
        counter(e, "logins", "Successful logins", f, |s| s.logins_ok)?;
        {
            let mut m = e.encode_descriptor(
                "errors_sent",
                "ERROR frames sent to clients, by code (docs/protocol.md)",
                None,
                MetricType::Counter,
            )?;
            for (id, s) in f {
                for (code, &n) in s.errors_sent.iter().enumerate().filter(|(_, n)| **n > 0) {
                    let labels = [("shard", id.to_string()), ("code", code.to_string())];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        counter(
            e,
            "handovers_out",
            "Connections handed to their owner shard",
            f,
            |s| s.handovers_out,
        )?;
        counter(
            e,
            "handovers_in",
            "Connections adopted from other shards",
            f,
            |s| s.handovers_in,
        )?;
        counter(e, "frames_in", "Frames read from clients", f, |s| {
            s.frames_in
        })?;
        counter(e, "bytes_in", "Bytes read from clients", f, |s| s.bytes_in)?;
        counter(e, "frames_out", "Frames queued to clients", f, |s| {
            s.frames_out
        })?;
        counter(e, "bytes_out", "Bytes written to clients", f, |s| {
            s.bytes_out
        })?;
        counter(
            e,
            "messages_accepted",
            "Messages stored and acknowledged to their sender",
            f,
            |s| s.messages_accepted,
        )?;
        counter(
            e,
            "messages_refused",
            "Messages refused (queue full, store)",
            f,
            |s| s.messages_refused,
        )?;
        counter(
            e,
            "envelopes_routed",
            "Envelopes sent to other shards",
            f,
            |s| s.envelopes_routed,
        )?;
        counter(
            e,
            "deliveries",
            "Messages and receipts written to devices",
            f,
            |s| s.deliveries,
        )?;
        counter(e, "acks", "ACKs received from devices", f, |s| s.acks)?;
        counter(
            e,
            "receipts_dropped",
            "Receipts dropped at the allowance",
            f,
            |s| s.receipts_dropped,
        )?;
        gauge(e, "queue_items", "Items in the offline queues", f, |s| {
            s.queue_items
        })?;
        gauge(
            e,
            "queue_bytes",
            "Bytes of LMDB pages holding the offline queues",
            f,
            |s| s.queue_bytes,
        )?;
        gauge(
            e,
            "store_bytes",
            "Bytes of LMDB pages in use: the offline queues, shared group bodies and other records",
            f,
            |s| s.store_bytes,
        )?;
        counter(e, "store_commits", "Group commits", f, |s| s.commits)?;
        counter(
            e,
            "store_commit_failures",
            "Group commits that failed",
            f,
            |s| s.commit_failures,
        )?;
        counter(
            e,
            "store_deletes_retried",
            "Deletes (ACKs) of failed group commits committed again on their own",
            f,
            |s| s.deletes_retried,
        )?;
        gauge(
            e,
            "store_pending_ops",
            "Store writes waiting for a commit",
            f,
            |s| s.pending_ops,
        )?;
        counter(
            e,
            "channel_full",
            "Sends to another shard that found its channel full (back-pressure)",
            f,
            |s| s.channel_full,
        )?;
        counter(
            e,
            "backpressure_pauses",
            "Times the shard stopped reading while store writes piled up",
            f,
            |s| s.backpressure_pauses,
        )?;
        counter(
            e,
            "slow_consumers",
            "Connections closed as slow consumers",
            f,
            |s| s.slow_consumers,
        )?;
        counter(
            e,
            "connections_rate_limited",
            "New connections refused by the per-source rate limit",
            f,
            |s| s.conns_rate_limited,
        )?;
        counter(
            e,
            "sends_rate_limited",
            "SENDs refused by the per-connection rate limit",
            f,
            |s| s.sends_rate_limited,
        )?;
        counter(
            e,
            "sources_untracked",
            "Connections from new sources not rate-limited because the table was full",
            f,
            |s| s.sources_untracked,
        )?;
        counter(
            e,
            "tls_handshakes_full",
            "TLS handshakes completed in full (with a certificate signature)",
            f,
            |s| s.tls_handshakes_full,
        )?;
        counter(
            e,
            "tls_handshakes_resumed",
            "TLS handshakes completed by resuming a session ticket",
            f,
            |s| s.tls_handshakes_resumed,
        )?;
        counter(
            e,
            "websocket_upgrades",
            "WebSocket upgrades completed",
            f,
            |s| s.ws_upgrades,
        )?;
        gauge(
            e,
            "presence_subscriptions",
            "Presence subscriptions held on the shard's users (limits.presence_subscribers_max each)",
            f,
            |s| s.presence_watchers,
        )?;
        counter(
            e,
            "presence_sent",
            "PRESENCE frames queued to followers",
            f,
            |s| s.presence_sent,
        )?;
        counter(
            e,
            "presence_refused",
            "Presence subscriptions refused at a limit",
            f,
            |s| s.presence_refused,
        )?;
        counter(
            e,
            "typing_forwarded",
            "Typing indicators written to a recipient's connections",
            f,
            |s| s.typing_forwarded,
        )?;
        counter(
            e,
            "typing_dropped",
            "Typing indicators dropped: over the sender's rate, recipient offline, or blocked",
            f,
            |s| s.typing_dropped,
        )?;
        counter(
            e,
            "sends_blocked",
            "SENDs refused with ERROR(blocked): the recipient blocks the sender",
            f,
            |s| s.sends_blocked,
        )?;
        counter(
            e,
            "group_deliveries",
            "Group messages stored for members: queue appends and group log members (member-deliveries; events not counted)",
            f,
            |s| s.group_deliveries,
        )?;
        counter(
            e,
            "group_queue_full",
            "Group messages and events a member missed because its queue was full",
            f,
            |s| s.group_queue_full,
        )?;
        counter(
            e,
            "group_log_deliveries",
            "Member-deliveries stored through the group log: one record per message for the shard's online members",
            f,
            |s| s.group_log_deliveries,
        )?;
        counter(
            e,
            "group_log_moves_failed",
            "Members whose move out of the group log into their own queue failed twice (a full map or disk): their records stay, and they get those messages after the next start",
            f,
            |s| s.group_log_moves_failed,
        )?;
        gauge(
            e,
            "group_log_messages",
            "Group messages held for online members, each stored once in the group log until every one of them ACKs or leaves",
            f,
            |s| s.group_log_messages,
        )?;
        counter(
            e,
            "group_tally_writes",
            "Group receipt tallies written to or deleted from the store (checkpoints every sweep and at shutdown)",
            f,
            |s| s.group_tally_writes,
        )?;
        gauge(
            e,
            "outbound_bytes_queued",
            "Outbound bytes queued on the shard's connections (limits.shard_outbound_bytes_max)",
            f,
            |s| s.outbound_bytes_queued,
        )?;
        histogram(
            e,
            "store_commit_seconds",
            "Group commit latency",
            f,
            &LATENCY_BOUNDS_US,
            1e6,
            |s| &s.commit_us,
        )?;
        histogram(
            e,
            "store_commit_ops",
            "Ops per group commit",
            f,
            &BATCH_BOUNDS,
            1.0,
            |s| &s.commit_ops,
        )?;
        histogram(
            e,
            "deliver_latency_seconds",
            "Server-side send to deliver latency of live deliveries (1 ms resolution)",
            f,
            &LATENCY_BOUNDS_US,
            1e6,
            |s| &s.deliver_us,
        )?;
        {
            let mut m = e.encode_descriptor(
                "shard_stalls",
                "Stall episodes the watchdog counted (glommio 0.9 executor parked with work)",
                None,
                MetricType::Counter,
            )?;
            for (i, n) in self.node.stalls.iter().enumerate() {
                let labels = [("shard", i.to_string())];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }
        let flag = |b: bool| i64::from(b);
        ConstGauge::new(self.node.shards_unanswered as i64).encode(e.encode_descriptor(
            "scrape_shards_unanswered",
            "Shards that did not answer this scrape within its timeout",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(flag(self.node.ready)).encode(e.encode_descriptor(
            "ready",
            "1 while serving and not draining",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(flag(self.node.draining)).encode(e.encode_descriptor(
            "draining",
            "1 while a drain is under way",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.node.uptime_s).encode(e.encode_descriptor(
            "uptime_seconds",
            "Seconds since the node started",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// A fresh latency histogram (1 µs to 60 s, 2 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(shard: u16) -> ShardSnapshot {
        ShardSnapshot {
            shard,
            seq: 1,
            connections: 3,
            sessions: 2,
            conns_opened: 10,
            conns_refused: 0,
            conns_closed: [0; CloseReason::ALL.len()],
            logins_ok: 5,
            errors_sent: [0; ERROR_CODES_MAX],
            handovers_out: 1,
            handovers_in: 1,
            frames_in: 100,
            bytes_in: 1000,
            frames_out: 90,
            bytes_out: 900,
            messages_accepted: 40,
            messages_refused: 0,
            envelopes_routed: 7,
            deliveries: 38,
            acks: 38,
            receipts_dropped: 0,
            queue_items: 2,
            queue_bytes: 8192,
            store_bytes: 12288,
            commits: 4,
            commit_failures: 0,
            deletes_retried: 0,
            pending_ops: 0,
            channel_full: 0,
            backpressure_pauses: 0,
            slow_consumers: 0,
            conns_rate_limited: 0,
            sends_rate_limited: 0,
            sources_untracked: 0,
            tls_handshakes_full: 0,
            tls_handshakes_resumed: 0,
            ws_upgrades: 0,
            presence_watchers: 0,
            presence_sent: 0,
            presence_refused: 0,
            typing_forwarded: 0,
            typing_dropped: 0,
            sends_blocked: 0,
            group_deliveries: 0,
            group_queue_full: 0,
            group_log_deliveries: 0,
            group_log_moves_failed: 0,
            group_log_messages: 0,
            group_tally_writes: 0,
            outbound_bytes_queued: 0,
            commit_us: Buckets::default(),
            commit_ops: Buckets::default(),
            deliver_us: Buckets::default(),
        }
    }

    #[test]
    fn a_value_recorded_at_a_bound_counts_in_that_bound_s_bucket() {
        let mut h = latency_histogram();
        let top = BATCH_BOUNDS[BATCH_BOUNDS.len() - 1];
        h.record(top).unwrap(); // a commit of exactly COMMIT_OPS_MAX ops
        h.record(16_384).unwrap();
        h.record(top * 2).unwrap();
        let b = Buckets::from_histogram(&h, &BATCH_BOUNDS);
        assert_eq!(b.counts[BATCH_BOUNDS.len() - 1], 1, "{:?}", b.counts);
        assert_eq!(b.counts[BATCH_BOUNDS.len() - 2], 1, "{:?}", b.counts);
        assert_eq!(b.counts[BATCH_BOUNDS.len()], 1, "overflow: {:?}", b.counts);
    }

    #[test]
    fn encodes_labelled_series_and_histograms() {
        let mut a = snap(0);
        a.conns_closed[CloseReason::Idle as usize] = 4;
        a.errors_sent[6] = 2;
        let mut h = latency_histogram();
        h.record(700).unwrap();
        h.record(3_000).unwrap();
        h.record(20_000_000).unwrap();
        a.commit_us = Buckets::from_histogram(&h, &LATENCY_BOUNDS_US);
        assert_eq!(a.commit_us.counts.iter().sum::<u64>(), 3);
        assert_eq!(
            a.commit_us.counts[LATENCY_BOUNDS_US.len()],
            1,
            "overflow bucket"
        );
        assert!((a.commit_us.sum - 20_003_700.0).abs() < 20_003_700.0 * 0.01);
        let text = encode(
            &[a, snap(1)],
            &NodeFacts {
                stalls: vec![0, 1],
                ready: true,
                ..NodeFacts::default()
            },
        );
        assert!(
            text.contains("gatehouse_connections{shard=\"0\"} 3"),
            "{text}"
        );
        assert!(text.contains("gatehouse_connections_closed_total{shard=\"0\",reason=\"idle\"} 4"));
        assert!(text.contains("gatehouse_errors_sent_total{shard=\"0\",code=\"6\"} 2"));
        assert!(text.contains("gatehouse_store_commit_seconds_count{shard=\"0\"} 3"));
        assert!(text.contains("gatehouse_store_commit_seconds_bucket{le=\"0.001\",shard=\"0\"} 1"));
        assert!(
            text.contains("gatehouse_store_commit_seconds_bucket{le=\"+Inf\",shard=\"0\"} 3"),
            "{text}"
        );
        assert!(text.contains("gatehouse_shard_stalls_total{shard=\"1\"} 1"));
        assert!(text.contains("gatehouse_ready 1"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
