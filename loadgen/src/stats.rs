//! Counters, latency histograms, and the loss accounting, plus their (de)serialization for the
//! worker → coordinator pipe.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Serializes a histogram (HdrHistogram V2, base64) for the pipe and the report.
pub fn encode_hist(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serialize into memory");
    STANDARD.encode(buf)
}

/// Inverse of [`encode_hist`].
pub fn decode_hist(s: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = STANDARD.decode(s)?;
    Ok(Deserializer::new().deserialize(&mut &bytes[..])?)
}

/// Percentiles of a histogram, for lines and the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Microseconds.
    pub p50_us: u64,
    /// Microseconds.
    pub p90_us: u64,
    /// Microseconds.
    pub p99_us: u64,
    /// Microseconds.
    pub p99_9_us: u64,
    /// Microseconds.
    pub p99_99_us: u64,
    /// Microseconds.
    pub max_us: u64,
}

impl Percentiles {
    /// Reads the percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p99_9_us: h.value_at_quantile(0.999),
            p99_99_us: h.value_at_quantile(0.9999),
            max_us: h.max(),
        }
    }
}

/// Event counters of a worker (or, merged, of the run).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Connections that reached LOGIN_OK.
    pub logins: u64,
    /// Connections open and logged in right now.
    pub connected: u64,
    /// Most connections logged in at once (per executor; summed when merged, which equals the
    /// true peak when the executors peak together, as they do after the connect phase).
    pub connected_peak: u64,
    /// Connect or login attempts that failed.
    pub connect_failures: u64,
    /// SENDs written.
    pub sent: u64,
    /// SEND_ACKs received.
    pub acked: u64,
    /// SENDs answered with an ERROR (not stored).
    pub refused: u64,
    /// DELIVERs received (duplicates included).
    pub delivered: u64,
    /// Delivered receipts received.
    pub receipts_delivered: u64,
    /// Read receipts received.
    pub receipts_read: u64,
    /// PINGs sent.
    pub pings: u64,
    /// PONGs received.
    pub pongs: u64,
    /// Sends skipped because the sending connection's client-side buffer was full.
    pub send_skipped: u64,
    /// Reconnects made by `--reconnect` after the gateway closed or refused a connection.
    #[serde(default)]
    pub reconnects: u64,
    /// PRESENCE frames received (presence scenario).
    #[serde(default)]
    pub presence: u64,
    /// Groups: member-deliveries expected (every acknowledged message times the other members).
    #[serde(default)]
    pub group_expected: u64,
    /// Groups: GROUP_DELIVERs received.
    #[serde(default)]
    pub group_delivered: u64,
    /// Groups with `--reconnect`: GROUP_DELIVERs of a (member, message) pair seen before
    /// (delivery is at least once; after a gateway restart some come again).
    #[serde(default)]
    pub group_duplicates: u64,
    /// Groups: aggregated GROUP_RECEIPTs received by senders.
    #[serde(default)]
    pub group_receipts: u64,
    /// TLS handshakes completed in full.
    #[serde(default)]
    pub tls_full: u64,
    /// TLS handshakes completed by resuming a session.
    #[serde(default)]
    pub tls_resumed: u64,
    /// ERROR and GO_AWAY frames and connection failures, by reason.
    pub errors: BTreeMap<String, u64>,
}

impl Counters {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &Counters) {
        self.logins += o.logins;
        self.connected += o.connected;
        self.connected_peak += o.connected_peak;
        self.connect_failures += o.connect_failures;
        self.sent += o.sent;
        self.acked += o.acked;
        self.refused += o.refused;
        self.delivered += o.delivered;
        self.receipts_delivered += o.receipts_delivered;
        self.receipts_read += o.receipts_read;
        self.pings += o.pings;
        self.pongs += o.pongs;
        self.send_skipped += o.send_skipped;
        self.tls_full += o.tls_full;
        self.presence += o.presence;
        self.group_expected += o.group_expected;
        self.group_delivered += o.group_delivered;
        self.group_duplicates += o.group_duplicates;
        self.group_receipts += o.group_receipts;
        self.tls_resumed += o.tls_resumed;
        self.reconnects += o.reconnects;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    /// Counts one error by reason.
    pub fn error(&mut self, reason: &str) {
        *self.errors.entry(reason.to_string()).or_default() += 1;
    }
}

/// One (sender, recipient, seq) triple.
pub type PairSeq = (u32, u32, u32);

/// What the loss check found.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LossReport {
    /// Messages the gateway acknowledged.
    pub acked: u64,
    /// Distinct messages delivered.
    pub delivered_distinct: u64,
    /// Acknowledged messages never delivered.
    pub lost: u64,
    /// Deliveries of a message already delivered (legal: at-least-once).
    pub duplicates: u64,
    /// Deliveries that arrived after a later message of the same pair.
    pub reordered: u64,
    /// Up to 10 lost (sender, recipient, seq) for the report.
    pub lost_examples: Vec<PairSeq>,
}

impl LossReport {
    /// Adds another worker's report (workers' pairs are disjoint).
    pub fn add(&mut self, o: &LossReport) {
        self.acked += o.acked;
        self.delivered_distinct += o.delivered_distinct;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        for e in &o.lost_examples {
            if self.lost_examples.len() < 10 {
                self.lost_examples.push(*e);
            }
        }
    }
}

/// Compares what the gateway acknowledged with what was delivered. `delivered` must be in
/// arrival order per recipient (each recipient is served by one executor, which appends in
/// arrival order).
pub fn check_loss(acked: &[PairSeq], delivered: &[PairSeq]) -> LossReport {
    let mut r = LossReport {
        acked: acked.len() as u64,
        ..Default::default()
    };
    let mut seen: HashMap<(u32, u32), (HashSet<u32>, u32)> = HashMap::new();
    for &(s, d, seq) in delivered {
        let (set, max) = seen.entry((s, d)).or_default();
        if !set.insert(seq) {
            r.duplicates += 1;
            continue;
        }
        if seq < *max {
            r.reordered += 1;
        }
        *max = (*max).max(seq);
        r.delivered_distinct += 1;
    }
    for &(s, d, seq) in acked {
        if !seen.get(&(s, d)).is_some_and(|(set, _)| set.contains(&seq)) {
            r.lost += 1;
            if r.lost_examples.len() < 10 {
                r.lost_examples.push((s, d, seq));
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_check_finds_lost_duplicated_and_reordered() {
        let acked = [(1, 2, 1), (1, 2, 2), (1, 2, 3), (3, 2, 1)];
        let clean = check_loss(&acked, &[(1, 2, 1), (3, 2, 1), (1, 2, 2), (1, 2, 3)]);
        assert_eq!((clean.lost, clean.duplicates, clean.reordered), (0, 0, 0));
        let bad = check_loss(&acked, &[(1, 2, 1), (1, 2, 3), (1, 2, 1), (1, 2, 2)]);
        assert_eq!(bad.lost, 1, "(3,2,1) never arrived");
        assert_eq!(bad.lost_examples, vec![(3, 2, 1)]);
        assert_eq!(bad.duplicates, 1);
        assert_eq!(bad.reordered, 1, "seq 2 after seq 3");
        // Delivered but never acknowledged (e.g. ack lost in a crash) is not a loss.
        let extra = check_loss(&[(1, 2, 1)], &[(1, 2, 1), (1, 2, 2)]);
        assert_eq!(extra.lost, 0);
    }

    #[test]
    fn histograms_survive_the_pipe() {
        let mut h = histogram();
        h.record(100).unwrap();
        h.record(2_000).unwrap();
        let back = decode_hist(&encode_hist(&h)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.max(), h.max());
    }
}
