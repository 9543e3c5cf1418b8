//! The `gatehouse` command: run a node, mint tokens, inspect configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gatehouse::config::{Config, SyncPolicy};
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
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (the default).
    Run {
        #[command(flatten)]
        cfg: ConfigArgs,
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
    },
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

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    let mut c = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(d) = &args.data_dir {
        c.store.data_dir = d.clone();
    }
    Ok(c)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEHOUSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Flag overrides of `gatehouse run` (they win over the file).
struct RunOverrides {
    listen: Option<std::net::SocketAddr>,
    shards: Option<usize>,
    sync: Option<SyncPolicy>,
    node_id: Option<u32>,
    nodes: Option<u32>,
}

fn run(cfg: &ConfigArgs, o: RunOverrides) -> anyhow::Result<()> {
    let RunOverrides {
        listen,
        shards,
        sync,
        node_id,
        nodes,
    } = o;
    let mut config = load(cfg)?;
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
    // A broken invariant in any thread (a shard, the committer's blocking pool) must take the
    // whole node down loudly, not leave it half alive: log, then abort.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let handle = gatehouse::server::start(config)?;
    let stop = handle.stop_flag();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handler")?;
    }
    println!("gatehouse listening on {}", handle.local_addr);
    handle.wait()?;
    tracing::info!("gatehouse stopped");
    Ok(())
}

/// Logs in as `who`, with the address and key taken from the configuration where not given.
fn client_login(cfg: &ConfigArgs, who: &ClientArgs) -> anyhow::Result<gatehouse::client::Client> {
    let config = load(cfg)?;
    config.validate()?;
    let mut addr = who.server.unwrap_or(config.server.listen);
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
    gatehouse::client::Client::login(
        addr,
        UserId(who.user),
        DeviceId(who.device),
        &token,
        std::time::Duration::from_secs(10),
    )
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
        listen: None,
        shards: None,
        sync: None,
        node_id: None,
        nodes: None,
    };
    let result = match cli.command.unwrap_or(default_run) {
        Cmd::Run {
            cfg,
            listen,
            shards,
            sync,
            node_id,
            nodes,
        } => {
            init_logging();
            run(
                &cfg,
                RunOverrides {
                    listen,
                    shards,
                    sync,
                    node_id,
                    nodes,
                },
            )
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
            println!("configuration OK ({} shards)", config.shard_count());
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatehouse: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
