//! Configuration: the control plane.
//!
//! Parsed once from TOML (unknown keys are errors), overridden by CLI flags, validated into a
//! [`Config`] whose values the hot path copies into per-shard plain fields. Every key, its
//! default and its meaning is listed in `docs/configuration.md`; `gatehouse
//! print-default-config` prints the same defaults as TOML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::limits;

/// A configuration problem, naming the key and why.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax error or unknown key.
    #[error("config file {path}: {message}")]
    Parse {
        /// File path.
        path: String,
        /// Parser message, naming the key.
        message: String,
    },
    /// An environment override that names no key or holds a value of the wrong type.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable, e.g. `GATEHOUSE_SERVER__SHARDS`.
        var: String,
        /// Why it is refused.
        message: String,
    },
    /// A value outside its allowed range.
    #[error("invalid value for `{key}`: {why}")]
    Invalid {
        /// Dotted key name.
        key: &'static str,
        /// Why it is refused.
        why: String,
    },
}

/// When the store forces its writes to stable storage. Every policy survives `kill -9` of the
/// gateway (committed pages are in the kernel's page cache); they differ on power loss or
/// kernel crash. See `docs/configuration.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// fsync in every group commit, before any acknowledgement goes out. Loses nothing.
    Always,
    /// Commit without fsync, acknowledge, and fsync every `store.sync_interval_ms`. On power
    /// loss, loses at most the acknowledged messages of the last interval.
    Batch,
    /// Never fsync; the kernel writes back on its own schedule (about 30 s on Linux).
    None,
}

/// `[server]`: listeners and shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address every shard's SO_REUSEPORT listener binds.
    pub listen: SocketAddr,
    /// Shards (pinned executors); 0 means one per CPU this process may run on.
    pub shards: usize,
    /// First CPU to pin shard 0 to; shard i runs on CPU `(first_cpu + i) % cpus`.
    pub first_cpu: usize,
    /// listen(2) backlog of each shard's listener (capped by net.core.somaxconn).
    pub backlog: u32,
    /// Connections one shard holds at most; further ones get ERROR(overloaded) and a close.
    pub max_connections_per_shard: usize,
    /// Graceful drain: GO_AWAY(shutdown) frames sent per second by the whole node, so that
    /// millions of clients do not reconnect elsewhere in one thundering herd.
    pub drain_goaway_per_s: u64,
    /// Graceful drain: how long the node keeps accepting after it turns not-ready, ms, so that
    /// load balancers polling `/readyz` stop sending new clients before connects are refused.
    /// Part of `drain_deadline_ms`. 0: stop accepting at once.
    pub drain_unready_ms: u64,
    /// Graceful drain: the node exits by this time after the drain starts, ms. Connections
    /// still open when the paced GO_AWAYs would overrun it get theirs at once.
    pub drain_deadline_ms: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:7400".parse().expect("valid literal"),
            shards: 0,
            first_cpu: 0,
            backlog: 4096,
            max_connections_per_shard: 1_000_000,
            drain_goaway_per_s: 10_000,
            drain_unready_ms: 0,
            drain_deadline_ms: 30_000,
        }
    }
}

/// `[runtime]`: executor settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    /// glommio's registered (locked) I/O memory per shard, KiB. TCP does not use it; keep it
    /// small so that many processes fit under RLIMIT_MEMLOCK.
    pub io_memory_kib: usize,
    /// io_uring ring depth per shard. Deep rings matter with many connections: glommio cancels
    /// its preemption timers on every reactor turn, and the kernel looks each cancelled
    /// request up in the poll table first, whose bucket count grows with the ring (8 buckets
    /// at 128 entries, the maximum of 256 from 4096). With every idle connection's poll in that
    /// table, a shallow ring makes each turn scan thousands of them (docs/architecture.md).
    pub ring_depth: usize,
    /// Heartbeat period per shard, ms: bounds glommio 0.9's executor stall (0 disables).
    pub heartbeat_ms: u64,
    /// A shard that has queued work but makes no progress for this long counts as stalled.
    pub stall_threshold_ms: u64,
    /// glommio's preemption timer, µs: how long one task queue may run before the executor
    /// polls io_uring and lets other queues run. glommio's default (100 ms) puts up to that
    /// much latency on every message under load; see docs/benchmarks.md.
    pub preempt_timer_us: u64,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            io_memory_kib: 64,
            ring_depth: 4096,
            heartbeat_ms: limits::HEARTBEAT_MS_DEFAULT,
            stall_threshold_ms: 200,
            preempt_timer_us: 500,
        }
    }
}

/// `[limits]`: per-connection and per-user bounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest frame (type byte + payload) accepted, bytes.
    pub max_frame_bytes: usize,
    /// Time from accept to a completed login, ms.
    pub login_timeout_ms: u64,
    /// Time without a frame from a logged-in client before GO_AWAY(idle), ms.
    pub idle_timeout_ms: u64,
    /// Deliveries a device may leave unacknowledged.
    pub delivery_window: usize,
    /// Outbound bytes queued per connection before it is closed as a slow consumer.
    pub outbound_bytes_max: usize,
    /// Messages one user's offline queue holds at most.
    pub queue_messages_max: u32,
    /// Store writes waiting for the next group commit, per shard, before every connection of
    /// the shard stops reading (back-pressure).
    pub pending_ops_max: usize,
    /// A connection whose queued output has not moved at all for this long (the client stopped
    /// reading) gets ERROR(slow_consumer) and is closed, ms; what it was sent stays queued.
    pub write_stall_timeout_ms: u64,
    /// Outbound bytes queued over all connections of one shard before every connection of the
    /// shard stops reading (back-pressure): the memory budget for in-flight data.
    pub shard_outbound_bytes_max: usize,
    /// New connections per second accepted from one source address, node-wide (split evenly
    /// over the shards); past it, ERROR(rate_limited) and a close. 0 turns the limit off.
    pub connect_rate_per_source: u32,
    /// SENDs per second one connection may make (bursts of twice that); past it,
    /// ERROR(rate_limited) for each refused SEND, and a close after
    /// `limits::SEND_REFUSALS_MAX` refusals in a row. 0 turns the limit off.
    pub send_rate_per_s: u32,
    /// Presence subscriptions one connection may hold (its contacts); past it, SUBSCRIBE gets
    /// ERROR(presence_limit) and adds none.
    pub presence_subscriptions_max: usize,
    /// Connections that may follow one user's presence; past it, the extra subscriptions get
    /// ERROR(presence_limit) naming the user.
    pub presence_subscribers_max: usize,
    /// Typing indicators per second one connection may send (bursts of twice that); past it
    /// they are dropped (counted). 0 turns the limit off.
    pub typing_rate_per_s: u32,
    /// Members one group may have; past it, GROUP create/add gets ERROR(group_full).
    pub group_members_max: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_frame_bytes: limits::FRAME_BYTES_MAX_DEFAULT,
            login_timeout_ms: limits::LOGIN_TIMEOUT_MS_DEFAULT,
            idle_timeout_ms: limits::IDLE_TIMEOUT_MS_DEFAULT,
            delivery_window: limits::DELIVERY_WINDOW_DEFAULT,
            outbound_bytes_max: limits::OUTBOUND_BYTES_MAX_DEFAULT,
            queue_messages_max: limits::QUEUE_MESSAGES_MAX_DEFAULT,
            pending_ops_max: limits::PENDING_OPS_HIGH_WATER,
            shard_outbound_bytes_max: limits::SHARD_OUTBOUND_BYTES_MAX_DEFAULT,
            write_stall_timeout_ms: limits::WRITE_STALL_TIMEOUT_MS_DEFAULT,
            connect_rate_per_source: limits::CONNECT_RATE_PER_SOURCE_DEFAULT,
            send_rate_per_s: limits::SEND_RATE_PER_S_DEFAULT,
            presence_subscriptions_max: limits::PRESENCE_SUBSCRIPTIONS_MAX_DEFAULT,
            presence_subscribers_max: limits::PRESENCE_SUBSCRIBERS_MAX_DEFAULT,
            typing_rate_per_s: limits::TYPING_RATE_PER_S_DEFAULT,
            group_members_max: limits::GROUP_MEMBERS_MAX_DEFAULT,
        }
    }
}

/// `[store]`: the per-shard LMDB environments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// Directory holding `shard-N/` LMDB environments and the default token key.
    pub data_dir: PathBuf,
    /// LMDB map size per shard, MiB (address space reserved, not memory used).
    pub map_size_mib: usize,
    /// When writes reach stable storage.
    pub sync: SyncPolicy,
    /// With `sync = "batch"`: fsync period, ms.
    pub sync_interval_ms: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            data_dir: PathBuf::from("gatehouse-data"),
            map_size_mib: 4096,
            sync: SyncPolicy::Batch,
            sync_interval_ms: 100,
        }
    }
}

/// `[auth]`: token keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Current key as 64 hex digits, inline. Takes precedence over `key_file`.
    pub key_hex: Option<String>,
    /// File holding the current key (64 hex digits). Default `<data_dir>/token.key`, created
    /// with a random key if missing.
    pub key_file: Option<PathBuf>,
    /// File holding the previous key, still accepted during rotation.
    pub previous_key_file: Option<PathBuf>,
}

/// `[cluster]`: this node's place among nodes that run side by side, each owning a disjoint
/// slice of users (`ids::owner_node`). Cross-node routing does not exist yet: a user logs in
/// to its own node and can message users of the same node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's index, `0..nodes`.
    pub node_id: u32,
    /// Nodes in the deployment.
    pub nodes: u32,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            node_id: 0,
            nodes: 1,
        }
    }
}

/// `[admin]`: the operator's HTTP endpoint (metrics, health, readiness, drain).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Serve the admin endpoint at all.
    pub enabled: bool,
    /// Address of the admin listener: loopback by default, since it can drain the node.
    pub listen: SocketAddr,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            enabled: true,
            listen: "127.0.0.1:7401".parse().expect("valid literal"),
        }
    }
}

/// `[tls]`: the TLS listener, and the certificate it and a `wss` WebSocket listener use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Serve the TLS listener.
    pub enabled: bool,
    /// Address of every shard's SO_REUSEPORT TLS listener.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first. Re-read on SIGHUP and `POST /reload-tls`.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: PathBuf,
    /// Key-exchange groups the server accepts (`x25519mlkem768`, `x25519`, `secp256r1`,
    /// `secp384r1`, ...). rustls takes the first group in the *client's* order that is in
    /// this list, so the list is a set: drop `x25519mlkem768` to refuse the post-quantum
    /// hybrid (cheaper handshakes), or list only it to require it.
    pub kx_groups: Vec<String>,
    /// Protocol versions: `"1.3"` and/or `"1.2"`.
    pub versions: Vec<String>,
    /// Stateless session tickets, so that a reconnecting client resumes without a full
    /// handshake (no certificate signature; TLS 1.3 still does a fresh key exchange).
    pub session_tickets: bool,
    /// Once a TLS 1.3 handshake is done, take the traffic keys out of rustls and protect
    /// records in the gateway (as kernel TLS does), freeing rustls's ~2 KB per connection.
    /// A client KeyUpdate is followed (and answered when it asks for one), as rustls would.
    pub record_offload: bool,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            enabled: false,
            listen: "127.0.0.1:7443".parse().expect("valid literal"),
            cert_file: PathBuf::from("certs/server.pem"),
            key_file: PathBuf::from("certs/server.key"),
            kx_groups: vec!["x25519mlkem768".into(), "x25519".into(), "secp256r1".into()],
            versions: vec!["1.3".into(), "1.2".into()],
            session_tickets: true,
            record_offload: true,
        }
    }
}

/// `[websocket]`: the WebSocket listener for browsers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketSection {
    /// Serve the WebSocket listener.
    pub enabled: bool,
    /// Address of every shard's SO_REUSEPORT WebSocket listener.
    pub listen: SocketAddr,
    /// Terminate TLS on it (`wss://`), with the certificate of `[tls]`.
    pub tls: bool,
}

impl Default for WebSocketSection {
    fn default() -> Self {
        WebSocketSection {
            enabled: false,
            listen: "127.0.0.1:7480".parse().expect("valid literal"),
            tls: false,
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (no colours unless stderr is a terminal).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[log]`: what is logged and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// `tracing` filter, e.g. `info` or `info,gatehouse::runtime=debug`. The `GATEHOUSE_LOG`
    /// environment variable, when set, wins. Reloaded on SIGHUP.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listeners and shards.
    pub server: ServerSection,
    /// Executors.
    pub runtime: RuntimeSection,
    /// Bounds.
    pub limits: LimitsSection,
    /// Storage.
    pub store: StoreSection,
    /// Tokens.
    pub auth: AuthSection,
    /// Multi-node slice.
    pub cluster: ClusterSection,
    /// Admin endpoint.
    pub admin: AdminSection,
    /// Logging.
    pub log: LogSection,
    /// TLS listener and certificate.
    pub tls: TlsSection,
    /// WebSocket listener.
    pub websocket: WebSocketSection,
}

/// Prefix of environment overrides; `__` separates the section from the key.
pub const ENV_PREFIX: &str = "GATEHOUSE_";

/// `GATEHOUSE_SERVER__MAX_CONNECTIONS_PER_SHARD` → (`server`, `max_connections_per_shard`).
fn env_key(var: &str) -> Result<(String, String), ConfigError> {
    let rest = &var[ENV_PREFIX.len()..];
    match rest.split_once("__") {
        Some((section, key)) if !section.is_empty() && !key.is_empty() && !key.contains("__") => {
            Ok((section.to_ascii_lowercase(), key.to_ascii_lowercase()))
        }
        _ => Err(ConfigError::Env {
            var: var.to_string(),
            message: "expected GATEHOUSE_<SECTION>__<KEY>".into(),
        }),
    }
}

/// The TOML value for one override, checked alone against `T` so that the error names the
/// variable: typed first, then as a string.
fn env_value<T: for<'de> Deserialize<'de>>(
    section: &str,
    key: &str,
    raw: &str,
) -> Result<toml::Value, String> {
    let one = |v: toml::Value| {
        let mut inner = toml::Table::new();
        inner.insert(key.to_string(), v);
        let mut outer = toml::Table::new();
        outer.insert(section.to_string(), toml::Value::Table(inner));
        T::deserialize(toml::Value::Table(outer)).map(|_| ())
    };
    let typed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let mut first_err = None;
    if let Some(v) = typed {
        match one(v.clone()) {
            Ok(()) => return Ok(v),
            Err(e) => first_err = Some(e.to_string()),
        }
    }
    let s = toml::Value::String(raw.to_string());
    match one(s.clone()) {
        Ok(()) => Ok(s),
        Err(e) => Err(first_err
            .unwrap_or_else(|| e.to_string())
            .trim()
            .to_string()),
    }
}

fn invalid(key: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        why: why.into(),
    }
}

impl Config {
    /// Parses TOML text (unknown keys are errors). Does not validate; call [`Config::validate`].
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Config::load(Some(path), std::iter::empty())
    }

    /// Builds the configuration from the embedded defaults, then the file (if any), then the
    /// environment overrides `GATEHOUSE_<SECTION>__<KEY>=value` found in `env` (later layers
    /// win; flags are applied by the caller on top). A value is read as a TOML value
    /// (`4`, `true`, `"x"`) and, when that does not fit the key, as a plain string
    /// (`GATEHOUSE_SERVER__LISTEN=0.0.0.0:7400`). An override that names no key is an error.
    pub fn load(
        path: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                let t: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?;
                (t, p.display().to_string())
            }
            None => (toml::Table::new(), "(embedded defaults)".to_string()),
        };
        let mut overrides: Vec<(String, String)> = env
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        overrides.sort();
        for (var, raw) in overrides {
            let (section, key) = env_key(&var)?;
            let value = env_value::<Config>(&section, &key, &raw)
                .map_err(|message| ConfigError::Env { var, message })?;
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => {
                    t.insert(key, value);
                }
                _ => {
                    return Err(ConfigError::Parse {
                        path: origin,
                        message: format!("`{section}` must be a table"),
                    })
                }
            }
        }
        Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
            path: origin,
            message: e.to_string(),
        })
    }

    /// The defaults as TOML.
    pub fn default_toml() -> String {
        toml::to_string_pretty(&Config::default()).expect("defaults serialize")
    }

    /// Shards this process runs: `server.shards`, or one per CPU it may use.
    pub fn shard_count(&self) -> usize {
        if self.server.shards > 0 {
            self.server.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// Checks every range; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if self.server.shards > crate::ids::SHARDS_MAX {
            return Err(invalid(
                "server.shards",
                format!("at most {}", crate::ids::SHARDS_MAX),
            ));
        }
        if self.server.backlog == 0 {
            return Err(invalid("server.backlog", "must be > 0"));
        }
        if self.server.max_connections_per_shard == 0 {
            return Err(invalid("server.max_connections_per_shard", "must be > 0"));
        }
        if !(limits::FRAME_BYTES_MAX_FLOOR..=limits::FRAME_BYTES_MAX_CEILING)
            .contains(&l.max_frame_bytes)
        {
            return Err(invalid(
                "limits.max_frame_bytes",
                format!(
                    "must be in {}..={}",
                    limits::FRAME_BYTES_MAX_FLOOR,
                    limits::FRAME_BYTES_MAX_CEILING
                ),
            ));
        }
        if l.login_timeout_ms == 0 || l.idle_timeout_ms == 0 {
            return Err(invalid(
                "limits.login_timeout_ms / limits.idle_timeout_ms",
                "must be > 0",
            ));
        }
        if l.idle_timeout_ms > u64::from(u32::MAX) {
            return Err(invalid(
                "limits.idle_timeout_ms",
                "must fit in 32 bits of milliseconds",
            ));
        }
        if !(1..=limits::DELIVERY_WINDOW_MAX).contains(&l.delivery_window) {
            return Err(invalid(
                "limits.delivery_window",
                format!("must be in 1..={}", limits::DELIVERY_WINDOW_MAX),
            ));
        }
        if l.outbound_bytes_max < l.max_frame_bytes * 2 {
            return Err(invalid(
                "limits.outbound_bytes_max",
                "must be at least 2 × limits.max_frame_bytes",
            ));
        }
        if l.shard_outbound_bytes_max < l.outbound_bytes_max {
            return Err(invalid(
                "limits.shard_outbound_bytes_max",
                "must be at least limits.outbound_bytes_max",
            ));
        }
        if l.connect_rate_per_source > limits::RATE_PER_S_MAX
            || l.send_rate_per_s > limits::RATE_PER_S_MAX
        {
            return Err(invalid(
                "limits.connect_rate_per_source / limits.send_rate_per_s",
                format!("at most {} (0 turns a limit off)", limits::RATE_PER_S_MAX),
            ));
        }
        if !(1..=limits::PRESENCE_LIMIT_CEILING).contains(&l.presence_subscriptions_max)
            || !(1..=limits::PRESENCE_LIMIT_CEILING).contains(&l.presence_subscribers_max)
        {
            return Err(invalid(
                "limits.presence_subscriptions_max / limits.presence_subscribers_max",
                format!("must be in 1..={}", limits::PRESENCE_LIMIT_CEILING),
            ));
        }
        if !(2..=limits::GROUP_MEMBERS_MAX_CEILING).contains(&l.group_members_max) {
            return Err(invalid(
                "limits.group_members_max",
                format!("must be in 2..={}", limits::GROUP_MEMBERS_MAX_CEILING),
            ));
        }
        // The member list (GROUP_OK for LIST: 9 bytes per member) must fit one frame.
        if 20 + 9 * l.group_members_max > l.max_frame_bytes {
            return Err(invalid(
                "limits.group_members_max",
                "a full member list (9 bytes per member, plus 20) must fit limits.max_frame_bytes; lower this or raise that",
            ));
        }
        if l.typing_rate_per_s > limits::RATE_PER_S_MAX {
            return Err(invalid(
                "limits.typing_rate_per_s",
                format!("at most {} (0 turns the limit off)", limits::RATE_PER_S_MAX),
            ));
        }
        if l.write_stall_timeout_ms == 0 {
            return Err(invalid("limits.write_stall_timeout_ms", "must be > 0"));
        }
        if l.pending_ops_max == 0 {
            return Err(invalid("limits.pending_ops_max", "must be > 0"));
        }
        if l.queue_messages_max == 0 {
            return Err(invalid("limits.queue_messages_max", "must be > 0"));
        }
        if self.store.map_size_mib < 16 {
            return Err(invalid("store.map_size_mib", "must be at least 16"));
        }
        if self.store.sync == SyncPolicy::Batch && self.store.sync_interval_ms == 0 {
            return Err(invalid(
                "store.sync_interval_ms",
                "must be > 0 with sync = \"batch\"",
            ));
        }
        if self.runtime.io_memory_kib < 16 {
            return Err(invalid("runtime.io_memory_kib", "must be at least 16"));
        }
        if !self.runtime.ring_depth.is_power_of_two() || self.runtime.ring_depth < 16 {
            return Err(invalid("runtime.ring_depth", "must be a power of two ≥ 16"));
        }
        if !(50..=100_000).contains(&self.runtime.preempt_timer_us) {
            return Err(invalid(
                "runtime.preempt_timer_us",
                "must be in 50..=100000",
            ));
        }
        if self.runtime.stall_threshold_ms == 0 {
            return Err(invalid("runtime.stall_threshold_ms", "must be > 0"));
        }
        if self.server.drain_goaway_per_s == 0 {
            return Err(invalid("server.drain_goaway_per_s", "must be > 0"));
        }
        if !(1..=limits::DRAIN_DEADLINE_MS_MAX).contains(&self.server.drain_deadline_ms) {
            return Err(invalid(
                "server.drain_deadline_ms",
                format!("must be in 1..={} (and below the supervisor's stop timeout, e.g. systemd's TimeoutStopSec, minus 5 s)", limits::DRAIN_DEADLINE_MS_MAX),
            ));
        }
        if self.server.drain_unready_ms >= self.server.drain_deadline_ms {
            return Err(invalid(
                "server.drain_unready_ms",
                "must be less than server.drain_deadline_ms",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", e.to_string()));
        }
        if self.cluster.nodes == 0 || self.cluster.node_id >= self.cluster.nodes {
            return Err(invalid(
                "cluster.node_id",
                "must be < cluster.nodes (and nodes > 0)",
            ));
        }
        if self.tls.enabled || (self.websocket.enabled && self.websocket.tls) {
            if self.tls.versions.is_empty()
                || self.tls.versions.iter().any(|v| v != "1.3" && v != "1.2")
            {
                return Err(invalid(
                    "tls.versions",
                    "a non-empty list of \"1.3\" and/or \"1.2\"",
                ));
            }
            if self.tls.kx_groups.is_empty() {
                return Err(invalid("tls.kx_groups", "needs at least one group"));
            }
            let known = crate::transport::tls::kx_group_names();
            if let Some(g) = self
                .tls
                .kx_groups
                .iter()
                .find(|g| !known.contains(&g.to_ascii_lowercase()))
            {
                return Err(invalid(
                    "tls.kx_groups",
                    format!("unknown group `{g}`; known: {}", known.join(", ")),
                ));
            }
        }
        let mut listeners = vec![("server.listen", self.server.listen)];
        if self.tls.enabled {
            listeners.push(("tls.listen", self.tls.listen));
        }
        if self.websocket.enabled {
            listeners.push(("websocket.listen", self.websocket.listen));
        }
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[..i]
                .iter()
                .find(|(_, a)| a.port() != 0 && a == addr)
            {
                return Err(invalid(key, format!("{addr} is also {other}")));
            }
        }
        if let Some(k) = &self.auth.key_hex {
            crate::auth::parse_key_hex(k, "auth.key_hex")
                .map_err(|e| invalid("auth.key_hex", e.to_string()))?;
        }
        Ok(())
    }

    /// Path of the current key file (explicit or the default under `data_dir`).
    pub fn key_file(&self) -> PathBuf {
        self.auth
            .key_file
            .clone()
            .unwrap_or_else(|| self.store.data_dir.join("token.key"))
    }

    /// Loads the token keys; creates the default key file if neither an inline key nor an
    /// explicit key file is configured.
    pub fn token_keys(&self) -> Result<crate::auth::TokenKeys, crate::auth::KeyError> {
        use crate::auth::{load_or_create_key_file, parse_key_hex, TokenKeys};
        let current = match &self.auth.key_hex {
            Some(k) => parse_key_hex(k, "auth.key_hex")?,
            None => load_or_create_key_file(&self.key_file(), self.auth.key_file.is_none())?,
        };
        let previous = match &self.auth.previous_key_file {
            Some(p) => Some(load_or_create_key_file(p, false)?),
            None => None,
        };
        Ok(TokenKeys::new(current, previous))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_roundtrip_and_validate() {
        let text = Config::default_toml();
        let c = Config::from_toml(&text, "defaults").unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err =
            Config::from_toml("[server]\nlisten_addr = \"1.2.3.4:5\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = Config::from_toml("[nope]\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let c = Config::from_toml("[limits]\nmax_frame_bytes = 10\n", "t").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("limits.max_frame_bytes"));
        let c = Config::from_toml("[store]\nsync = \"sometimes\"\n", "t");
        assert!(c.unwrap_err().to_string().contains("sometimes"));
        let c = Config::from_toml("[auth]\nkey_hex = \"zz\"\n", "t").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("auth.key_hex"));
    }

    #[test]
    fn tls_and_websocket_settings_are_checked() {
        let bad = |text: &str, key: &str| {
            let e = Config::from_toml(text, "t")
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        };
        bad(
            "[tls]\nenabled = true\nversions = [\"1.1\"]\n",
            "tls.versions",
        );
        bad("[tls]\nenabled = true\nkx_groups = []\n", "tls.kx_groups");
        bad(
            "[tls]\nenabled = true\nkx_groups = [\"x448\"]\n",
            "x25519mlkem768",
        );
        bad(
            "[websocket]\nenabled = true\ntls = true\n[tls]\nversions = []\n",
            "tls.versions",
        );
        bad(
            "[tls]\nenabled = true\nlisten = \"127.0.0.1:7400\"\n",
            "tls.listen",
        );
        // Disabled sections are not checked; case does not matter in group names.
        Config::from_toml("[tls]\nkx_groups = []\n", "t")
            .unwrap()
            .validate()
            .unwrap();
        Config::from_toml("[tls]\nenabled = true\nkx_groups = [\"X25519\"]\n", "t")
            .unwrap()
            .validate()
            .unwrap();
    }

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, "[server]\nshards = 3\nbacklog = 100\n").unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("GATEHOUSE_SERVER__SHARDS", "5"),
                ("GATEHOUSE_SERVER__LISTEN", "0.0.0.0:9000"),
                ("GATEHOUSE_STORE__SYNC", "always"),
                ("GATEHOUSE_LOG__LEVEL", "info,gatehouse=debug"),
                ("GATEHOUSE_ADMIN__ENABLED", "false"),
                // Not overrides: no `__`.
                ("GATEHOUSE_LOG", "debug"),
                ("GATEHOUSE_CONFIG", "/nonexistent"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.shards, 5, "env beats file");
        assert_eq!(c.server.backlog, 100, "file beats defaults");
        assert_eq!(c.server.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.store.sync, SyncPolicy::Always);
        assert_eq!(c.log.level, "info,gatehouse=debug");
        assert!(!c.admin.enabled);
        assert_eq!(c.limits, LimitsSection::default());
    }

    #[test]
    fn bad_environment_overrides_name_the_variable() {
        for (var, val, want) in [
            ("GATEHOUSE_SERVER__NOPE", "1", "nope"),
            ("GATEHOUSE_NOSECTION__X", "1", "nosection"),
            ("GATEHOUSE_SERVER__SHARDS", "many", "invalid type"),
            ("GATEHOUSE_SERVER__", "1", "GATEHOUSE_<SECTION>__<KEY>"),
        ] {
            let err = Config::load(None, env(&[(var, val)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var), "{err}");
            assert!(err.contains(want), "{var}: {err}");
        }
    }
}
