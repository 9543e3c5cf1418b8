//! Command-line options, shared by the coordinator and its workers (a worker gets the same
//! options plus its index), and recorded in the report.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// The scenario to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Connect and log in N users, hold them with keepalive pings, ping all at the end.
    Idle,
    /// N users online, each sending to random online peers at an open-loop total rate.
    Chat,
    /// Messages to offline users, then those users log in and drain their queues.
    Offline,
    /// Chat while users disconnect and reconnect at a rate.
    Churn,
    /// Presence: every user follows --contacts others; users disconnect and reconnect at
    /// --churn-rate (and chat at --rate, 0 for none); measures PRESENCE frames and the time
    /// from a user's LOGIN_OK to its followers' "online".
    Presence,
    /// Groups: users in groups of --group-size (created at the start); members send to their
    /// group at --rate messages/s; measures member-deliveries/s and latency, and checks that
    /// every acknowledged message reached every other member.
    Groups,
    /// Connection setup cost: every user connects and logs in (with --tls: a full handshake),
    /// all disconnect, then all connect again (with --tls: resumed from a session ticket).
    /// Reports both rates.
    Handshake,
}

/// Every option of a run.
#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct RunArgs {
    /// Scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Gateway addresses, one per node, in node order (user u goes to node owner_node(u)).
    #[arg(
        long = "gateway",
        default_value = "127.0.0.1:7400",
        value_delimiter = ','
    )]
    pub gateways: Vec<SocketAddr>,
    /// Token key as 64 hex digits (the gateway's `auth.key_hex`). Never written to the report.
    #[arg(long, conflicts_with = "key_file")]
    pub key_hex: Option<String>,
    /// File with the token key (default: gatehouse-data/token.key, the gateway's default).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Users (= connections), numbered from --first-user.
    #[arg(long, default_value_t = 1000)]
    pub users: u64,
    /// First user id.
    #[arg(long, default_value_t = 1)]
    pub first_user: u64,
    /// Worker processes; 0 derives it from the users and the open-file limit.
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    /// Executors (pinned threads) per worker process; 0 = one per allowed CPU.
    #[arg(long, default_value_t = 0)]
    pub cores: usize,
    /// Source addresses to spread connections over: a range `A-B` or a list `A,B,...`,
    /// inside 127.0.0.0/8 for loopback runs (local addresses for real networks).
    #[arg(long, default_value = "127.0.0.1")]
    pub src_ips: String,
    /// New connections per second, all workers together (a ramp).
    #[arg(long, default_value_t = 20_000)]
    pub connect_rate: u64,
    /// How long the scenario's main phase lasts (idle: hold; chat/churn: sending), seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Idle: seconds between keepalive pings of one connection.
    #[arg(long, default_value_t = 30)]
    pub ping_interval_s: u64,
    /// Chat/churn: messages per second, all workers together (open loop).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Message body size, bytes (at least 24: the loadgen's own header).
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Offline: messages to queue, all workers together.
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Churn: reconnects per second, all workers together.
    #[arg(long, default_value_t = 10)]
    pub churn_rate: u64,
    /// Presence: users each user follows (from the same worker and node).
    #[arg(long, default_value_t = 20)]
    pub contacts: u32,
    /// Groups: members per group (each user is in at most one group).
    #[arg(long, default_value_t = 256)]
    pub group_size: u32,
    /// After sending stops: longest wait for outstanding deliveries and receipts (idle: for
    /// the answers to the final PING), seconds.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Gateway process ids, to report gateway memory per connection.
    #[arg(long, value_delimiter = ',')]
    pub gateway_pids: Vec<u32>,
    /// JSON report file.
    #[arg(long, default_value = "loadgen-report.json")]
    pub report: PathBuf,
    /// Reconnect (and log in again) when the gateway closes a connection or a connect fails,
    /// with backoff from 100 ms doubling to 2 s, until the run ends: for runs that kill and
    /// restart the gateway (scripts/crash-under-load.sh). The loss check still holds every
    /// acknowledged message to delivery.
    #[arg(long)]
    pub reconnect: bool,
    /// ACK deliveries this many milliseconds after reading them, in batches (a client that
    /// stores before it acknowledges; crash runs use it so that kills find unACKed
    /// deliveries); 0 = in the same write as the read.
    #[arg(long, default_value_t = 0)]
    pub ack_delay_ms: u64,
    /// Overall time limit of the run, seconds: every phase stops by then.
    #[arg(long, default_value_t = 600)]
    pub max_run_s: u64,
    /// Connect with TLS (the --gateway addresses are then the gateways' TLS listeners).
    #[arg(long)]
    pub tls: bool,
    /// With --tls: the CA certificate(s) to trust (PEM), e.g. from scripts/make-certs.sh.
    #[arg(long, default_value = "certs/ca.pem")]
    pub tls_ca: PathBuf,
    /// With --tls: the name the gateway's certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,
    /// With --tls: key-exchange groups to offer, most preferred first (default: rustls's).
    #[arg(long, value_delimiter = ',')]
    pub tls_kx_groups: Vec<String>,
    /// With --tls: never resume sessions (every connection does a full handshake).
    #[arg(long)]
    pub tls_no_resume: bool,
}

/// Parses `--src-ips`.
pub fn parse_src_ips(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.parse().map_err(|_| format!("bad address {a:?}"))?;
            let b: Ipv4Addr = b.parse().map_err(|_| format!("bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if a > b || b - a > 1 << 20 {
                return Err(format!("bad range {part:?}"));
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else {
            out.push(part.parse().map_err(|_| format!("bad address {part:?}"))?);
        }
    }
    if out.is_empty() {
        return Err("no source address".into());
    }
    Ok(out)
}

impl RunArgs {
    /// Checks ranges; the error names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.users > 0, "--users must be > 0");
        anyhow::ensure!(
            self.first_user > 0,
            "--first-user must be > 0 (user 0 is reserved)"
        );
        anyhow::ensure!(
            self.body_bytes >= crate::wire::BODY_HEADER_BYTES,
            "--body-bytes must be at least 24"
        );
        anyhow::ensure!(self.connect_rate > 0, "--connect-rate must be > 0");
        anyhow::ensure!(!self.gateways.is_empty(), "--gateway is required");
        parse_src_ips(&self.src_ips).map_err(|e| anyhow::anyhow!("--src-ips: {e}"))?;
        if matches!(
            self.scenario,
            Scenario::Chat | Scenario::Churn | Scenario::Presence
        ) {
            anyhow::ensure!(self.users >= 2, "chat needs at least 2 users");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn src_ip_ranges_and_lists() {
        assert_eq!(parse_src_ips("127.0.0.1").unwrap().len(), 1);
        assert_eq!(parse_src_ips("127.0.1.1-127.0.1.250").unwrap().len(), 250);
        assert_eq!(
            parse_src_ips("127.0.0.1,127.0.0.2").unwrap()[1],
            Ipv4Addr::new(127, 0, 0, 2)
        );
        assert!(parse_src_ips("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_src_ips("x").is_err());
    }
}
