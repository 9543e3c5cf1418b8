//! The `gatehouse` command: run a node, mint tokens, inspect configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gatehouse::config::{Config, LogFormat, SyncPolicy};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `doctor` found a failed check (already printed; exit 1 without another message).
#[derive(Debug)]
struct DoctorFailed;

impl std::fmt::Display for DoctorFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a host check failed")
    }
}

impl std::error::Error for DoctorFailed {}
use gatehouse::ids::{DeviceId, UserId};

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Thread-per-core chat edge gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// Options shared by every subcommand that reads configuration.
#[derive(clap::Args, Clone, Default)]
struct ConfigArgs {
    /// TOML configuration file (defaults are embedded; see `print-default-config`).
    #[arg(long, short = 'c', env = "GATEHOUSE_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides store.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Who a command-line client logs in as, and where.
#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// User id to log in as.
    #[arg(long)]
    user: u64,
    /// Device id to log in as.
    #[arg(long, default_value_t = 1)]
    device: u32,
    /// Gateway address (default: server.listen from the configuration).
    #[arg(long)]
    server: Option<std::net::SocketAddr>,
    /// Login token (default: minted with the configured key, valid 1 h).
    #[arg(long)]
    token: Option<String>,
    /// Connect with TLS, trusting the CA certificate(s) in this PEM file (default address:
    /// tls.listen from the configuration).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Name the server's certificate must carry, with --tls-ca.
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (the default).
    Run {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[command(flatten)]
        flags: RunOverrides,
    },
    /// Check that this host can hold N connections with this configuration; prints
    /// CHECK CURRENT WANT STATUS FIX and exits 1 when a check fails.
    Doctor {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Connections this node must hold (default: shards × server.max_connections_per_shard).
        #[arg(long)]
        connections: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the version.
    Version,
    /// Mint a login token signed with the configured key.
    Token {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// User id (> 0).
        #[arg(long)]
        user: u64,
        /// Device id.
        #[arg(long, default_value_t = 1)]
        device: u32,
        /// Lifetime, e.g. 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = gatehouse::auth::parse_ttl)]
        ttl: u64,
    },
    /// Send one message as --user to --to and wait until the server has stored it.
    Send {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[command(flatten)]
        who: ClientArgs,
        /// Recipient user id.
        #[arg(long)]
        to: u64,
        /// Message text (sent as the opaque body).
        text: String,
    },
    /// Log in as --user, print queued and arriving messages and receipts, acknowledge each, and
    /// exit after --wait without traffic.
    Recv {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[command(flatten)]
        who: ClientArgs,
        /// Quiet time before exiting, e.g. 1s, 30s.
        #[arg(long, default_value = "1s", value_parser = gatehouse::auth::parse_ttl)]
        wait: u64,
        /// Do not acknowledge (messages stay queued and come again next time).
        #[arg(long)]
        no_ack: bool,
    },
    /// Print the embedded defaults as TOML.
    PrintDefaultConfig,
    /// Validate a configuration file; exits non-zero naming the offending key.
    CheckConfig {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

fn parse_sync(s: &str) -> Result<SyncPolicy, String> {
    match s {
        "always" => Ok(SyncPolicy::Always),
        "batch" => Ok(SyncPolicy::Batch),
        "none" => Ok(SyncPolicy::None),
        _ => Err(format!(
            "unknown sync policy {s:?} (use always, batch or none)"
        )),
    }
}

/// Defaults < file < `GATEHOUSE_<SECTION>__<KEY>` environment < flags (applied by callers).
fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    let mut c = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(d) = &args.data_dir {
        c.store.data_dir = d.clone();
    }
    Ok(c)
}

/// Changes the log filter of the running process (SIGHUP).
type LogReload =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The filter: `GATEHOUSE_LOG` when set (it wins), else `log.level`.
fn log_filter(config: &Config) -> (tracing_subscriber::EnvFilter, String) {
    match std::env::var("GATEHOUSE_LOG") {
        Ok(v) if tracing_subscriber::EnvFilter::try_new(&v).is_ok() => {
            (tracing_subscriber::EnvFilter::new(&v), v)
        }
        _ => (
            tracing_subscriber::EnvFilter::new(&config.log.level),
            config.log.level.clone(),
        ),
    }
}

fn init_logging(config: &Config) -> LogReload {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let (filter, _) = log_filter(config);
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = match config.log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    handle
}

/// SIGHUP: re-reads the configuration (file and environment) and applies what can change
/// while running: the log filter and the TLS certificate (re-read from its files). Says what
/// it reloaded and what needs a restart.
fn reload(
    cfg: &ConfigArgs,
    running: &Config,
    log: &LogReload,
    tls: Option<&gatehouse::transport::TlsContext>,
) {
    if tls.is_some() {
        // Logs its own outcome; a bad new certificate leaves the current one serving.
        let _ = gatehouse::server::reload_tls(tls);
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
    match load(cfg).and_then(|c| c.validate().map(|()| c).map_err(Into::into)) {
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: configuration not reloaded; the running one stays")
        }
        Ok(new) => {
            let (filter, level) = log_filter(&new);
            match log.reload(filter) {
                Ok(()) => tracing::info!(log_level = %level, "SIGHUP: reloaded the log filter"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: log filter not reloaded"),
            }
            let mut restart = Vec::new();
            let sections: [(&str, bool); 10] = [
                ("server", new.server != running.server),
                ("runtime", new.runtime != running.runtime),
                ("limits", new.limits != running.limits),
                ("store", new.store != running.store),
                ("auth", new.auth != running.auth),
                ("cluster", new.cluster != running.cluster),
                ("admin", new.admin != running.admin),
                ("log.format", new.log.format != running.log.format),
                ("tls", new.tls != running.tls),
                ("websocket", new.websocket != running.websocket),
            ];
            for (name, changed) in sections {
                if changed {
                    restart.push(name);
                }
            }
            if !restart.is_empty() {
                tracing::warn!(changed = ?restart, "SIGHUP: these changed and take effect only after a restart");
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Runs the host checks for `config` at start: logs every check that is not OK; with
/// `strict`, a failed check stops the start.
fn startup_checks(config: &Config, strict: bool) -> anyhow::Result<()> {
    use gatehouse::doctor::{evaluate, failed, Host, Status, Target};
    match gatehouse::doctor::raise_nofile_soft_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(
                before,
                after,
                "raised the open-files soft limit to the hard limit"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files soft limit"),
    }
    let capacity = (config.shard_count() as u64)
        .saturating_mul(config.server.max_connections_per_shard as u64);
    let checks = evaluate(&Host::read(), &Target::new(config, capacity));
    for c in checks
        .iter()
        .filter(|c| matches!(c.status, Status::Warn | Status::Fail))
    {
        tracing::warn!(check = c.check, current = %c.current, want = %c.want, status = ?c.status, fix = %c.fix, connections = capacity, "host check");
    }
    if strict && failed(&checks) {
        let names: Vec<&str> = checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.check)
            .collect();
        anyhow::bail!(
            "--strict: host checks failed for {capacity} connections: {} (run `gatehouse doctor` for the fixes)",
            names.join(", ")
        );
    }
    Ok(())
}

/// Flag overrides of `gatehouse run` (they win over the file and the environment).
#[derive(clap::Args, Clone, Default)]
struct RunOverrides {
    /// Overrides server.listen.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Overrides server.shards (0 = one per CPU).
    #[arg(long)]
    shards: Option<usize>,
    /// Overrides store.sync (always, batch, none).
    #[arg(long, value_parser = parse_sync)]
    sync: Option<SyncPolicy>,
    /// Overrides cluster.node_id.
    #[arg(long)]
    node_id: Option<u32>,
    /// Overrides cluster.nodes.
    #[arg(long)]
    nodes: Option<u32>,
    /// Overrides admin.listen (the admin endpoint's address; port 0 picks a free port).
    #[arg(long)]
    admin_listen: Option<std::net::SocketAddr>,
    /// Refuse to start when a host check fails (see `gatehouse doctor`).
    #[arg(long)]
    strict: bool,
}

fn run(cfg: &ConfigArgs, o: RunOverrides) -> anyhow::Result<()> {
    let RunOverrides {
        listen,
        shards,
        sync,
        node_id,
        nodes,
        admin_listen,
        strict,
    } = o;
    let mut config = load(cfg)?;
    // What SIGHUP compares a re-read against: file and environment, before the flags (which
    // a reload cannot see, so they must not count as changes).
    let loaded = config.clone();
    if let Some(a) = admin_listen {
        config.admin.listen = a;
    }
    if let Some(n) = node_id {
        config.cluster.node_id = n;
    }
    if let Some(n) = nodes {
        config.cluster.nodes = n;
    }
    if let Some(l) = listen {
        config.server.listen = l;
    }
    if let Some(s) = shards {
        config.server.shards = s;
    }
    if let Some(s) = sync {
        config.store.sync = s;
    }
    config.validate()?;
    let log = init_logging(&config);
    startup_checks(&config, strict)?;
    // A broken invariant in any thread (a shard, the committer's blocking pool) must take the
    // whole node down loudly, not leave it half alive: log, then abort.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let drain_deadline_ms = config.server.drain_deadline_ms;
    let handle = gatehouse::server::start(config.clone())?;
    let stop = handle.stop_flag();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handler")?;
    }
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .context("installing signal handler")?;
    // One write for the banner lines, errors ignored: a parent that reads the first line and
    // closes the pipe must not make a later print fail (and the panic hook abort).
    let mut banner = format!("gatehouse listening on {}\n", handle.local_addr);
    if let Some(a) = handle.tls_addr {
        banner.push_str(&format!("gatehouse tls listening on {a}\n"));
    }
    if let Some(a) = handle.ws_addr {
        let scheme = if loaded.websocket.tls { "wss" } else { "ws" };
        banner.push_str(&format!(
            "gatehouse websocket listening on {scheme}://{a}/\n"
        ));
    }
    if let Some(a) = handle.admin_addr {
        banner.push_str(&format!("gatehouse admin on http://{a}\n"));
    }
    let tls = handle.tls_context();
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes());
        let _ = out.flush();
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(handle.wait());
    });
    // The control loop: SIGHUP reloads; once a drain starts (SIGTERM, SIGINT, POST /drain),
    // tell systemd and enforce the deadline even if a shard hangs (everything acknowledged is
    // already committed, so exiting loses nothing acknowledged).
    let mut hard_deadline: Option<std::time::Instant> = None;
    let result = loop {
        match done_rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(anyhow::anyhow!("the node's waiter thread died"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if hup.swap(false, Ordering::Relaxed) {
            if stop.load(Ordering::Relaxed) {
                // Draining: systemd was told STOPPING=1, so no RELOADING/READY now.
                tracing::warn!("SIGHUP during a drain: ignored");
            } else {
                reload(cfg, &loaded, &log, tls.as_deref());
            }
        }
        if hard_deadline.is_none() && stop.load(Ordering::Relaxed) {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            tracing::info!(
                deadline_ms = drain_deadline_ms,
                "draining: not ready, not accepting, sending GO_AWAY at the paced rate"
            );
            hard_deadline = Some(
                std::time::Instant::now()
                    + std::time::Duration::from_millis(drain_deadline_ms + DRAIN_GRACE_MS),
            );
        }
        if hard_deadline.is_some_and(|d| std::time::Instant::now() > d) {
            tracing::error!(
                "drain overran its deadline by {DRAIN_GRACE_MS} ms; exiting without waiting further"
            );
            std::process::exit(1);
        }
    };
    result?;
    tracing::info!("gatehouse stopped");
    Ok(())
}

/// Time past `server.drain_deadline_ms` after which the process exits regardless.
const DRAIN_GRACE_MS: u64 = 5_000;

/// Logs in as `who`, with the address and key taken from the configuration where not given.
fn client_login(cfg: &ConfigArgs, who: &ClientArgs) -> anyhow::Result<gatehouse::client::Client> {
    let config = load(cfg)?;
    config.validate()?;
    let default_addr = if who.tls_ca.is_some() {
        config.tls.listen
    } else {
        config.server.listen
    };
    let mut addr = who.server.unwrap_or(default_addr);
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let token = match &who.token {
        Some(t) => t.clone(),
        None => {
            let expiry = gatehouse::runtime::now_ms() / 1000 + 3600;
            config
                .token_keys()?
                .mint(UserId(who.user), DeviceId(who.device), expiry)
        }
    };
    let timeout = std::time::Duration::from_secs(10);
    (|| {
        let mut c = match &who.tls_ca {
            Some(ca) => {
                let tls = gatehouse::client::TlsClientConfig::from_ca_file(
                    ca,
                    &who.tls_server_name,
                    &[],
                    0,
                )?;
                gatehouse::client::Client::connect_tls(addr, &tls, timeout)?
            }
            None => gatehouse::client::Client::connect(addr, timeout)?,
        };
        c.log_in(UserId(who.user), DeviceId(who.device), &token)?;
        Ok::<_, gatehouse::client::ClientError>(c)
    })()
    .with_context(|| {
        format!(
            "logging in to {addr} as user {} device {}",
            who.user, who.device
        )
    })
}

fn send(cfg: &ConfigArgs, who: &ClientArgs, to: u64, text: &str) -> anyhow::Result<()> {
    use gatehouse::proto::ServerFrame;
    let mut c = client_login(cfg, who)?;
    let client_msg_id = gatehouse::runtime::now_ms();
    c.send_message(client_msg_id, UserId(to), text.as_bytes())?;
    loop {
        match c.recv()? {
            ServerFrame::SendAck {
                server_msg_id,
                server_ts_ms,
                ..
            } => {
                println!(
                    "stored for user {to} as message {} at {server_ts_ms}",
                    server_msg_id.0
                );
                return Ok(());
            }
            // Receipts and messages for the sender stay queued for its next `recv`.
            ServerFrame::Receipt { .. } | ServerFrame::Deliver { .. } => continue,
            other => anyhow::bail!("unexpected answer: {other:?}"),
        }
    }
}

fn recv(cfg: &ConfigArgs, who: &ClientArgs, wait_s: u64, no_ack: bool) -> anyhow::Result<()> {
    use gatehouse::client::ClientError;
    use gatehouse::proto::ServerFrame;
    let mut c = client_login(cfg, who)?;
    c.set_timeout(std::time::Duration::from_secs(wait_s))?;
    loop {
        let id = match c.recv() {
            Ok(ServerFrame::Deliver {
                server_msg_id,
                sender,
                sender_device,
                server_ts_ms,
                body,
            }) => {
                println!(
                    "message {} from user {} device {} at {server_ts_ms}: {}",
                    server_msg_id.0,
                    sender.0,
                    sender_device.0,
                    String::from_utf8_lossy(&body)
                );
                server_msg_id
            }
            Ok(ServerFrame::Receipt {
                receipt_id,
                kind,
                from,
                server_msg_id,
                ts_ms,
            }) => {
                println!(
                    "receipt {kind:?} from user {} for message {} at {ts_ms}",
                    from.0, server_msg_id.0
                );
                receipt_id
            }
            Ok(other) => {
                println!("{other:?}");
                continue;
            }
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if !no_ack {
            c.ack(&[id])?;
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_run = Cmd::Run {
        cfg: ConfigArgs::default(),
        flags: RunOverrides::default(),
    };
    let result = match cli.command.unwrap_or(default_run) {
        Cmd::Run { cfg, flags } => run(&cfg, flags),
        Cmd::Doctor {
            cfg,
            connections,
            json,
        } => (|| {
            use gatehouse::doctor::{evaluate, failed, table, Host, Target};
            let config = load(&cfg)?;
            config.validate()?;
            let n = connections.unwrap_or_else(|| {
                (config.shard_count() as u64)
                    .saturating_mul(config.server.max_connections_per_shard as u64)
            });
            let checks = evaluate(&Host::read(), &Target::new(&config, n));
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                println!(
                    "host checks for {n} connections, {} shards",
                    config.shard_count()
                );
                print!("{}", table(&checks));
            }
            if failed(&checks) {
                return Err(DoctorFailed.into());
            }
            Ok(())
        })(),
        Cmd::Version => {
            println!("gatehouse {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Cmd::Token {
            cfg,
            user,
            device,
            ttl,
        } => (|| {
            anyhow::ensure!(user > 0, "--user must be > 0 (0 is reserved)");
            let config = load(&cfg)?;
            config.validate()?;
            let keys = config.token_keys()?;
            let expiry = gatehouse::runtime::now_ms() / 1000 + ttl;
            println!("{}", keys.mint(UserId(user), DeviceId(device), expiry));
            Ok(())
        })(),
        Cmd::Send { cfg, who, to, text } => send(&cfg, &who, to, &text),
        Cmd::Recv {
            cfg,
            who,
            wait,
            no_ack,
        } => recv(&cfg, &who, wait, no_ack),
        Cmd::PrintDefaultConfig => {
            print!("{}", Config::default_toml());
            Ok(())
        }
        Cmd::CheckConfig { cfg } => (|| {
            let config = load(&cfg)?;
            config.validate()?;
            println!(
                "configuration OK ({} shards): listen {}, data_dir {}, admin {}",
                config.shard_count(),
                config.server.listen,
                config.store.data_dir.display(),
                if config.admin.enabled {
                    config.admin.listen.to_string()
                } else {
                    "off".into()
                }
            );
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<DoctorFailed>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gatehouse: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
