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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(
    cfg: &ConfigArgs,
    listen: Option<std::net::SocketAddr>,
    shards: Option<usize>,
    sync: Option<SyncPolicy>,
) -> anyhow::Result<()> {
    let mut config = load(cfg)?;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Cmd::Run {
        cfg: ConfigArgs::default(),
        listen: None,
        shards: None,
        sync: None,
    }) {
        Cmd::Run {
            cfg,
            listen,
            shards,
            sync,
        } => {
            init_logging();
            run(&cfg, listen, shards, sync)
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
