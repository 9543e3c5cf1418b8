//! `loadgen`: the Gatehouse load generator.
//!
//! The process you start is the **coordinator**: it splits the users into slices, starts one
//! **worker** process per slice (a process here may hold only so many files), prints one
//! progress line per second, merges the workers' results (counters, HdrHistograms, loss
//! accounting) and writes a JSON report. Workers run one pinned glommio executor per core.
//! See `docs/loadgen.md`.

mod args;
mod report;
mod stats;
mod wire;
mod worker;

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use args::RunArgs;
use gatehouse::auth::{load_or_create_key_file, parse_key_hex, TokenKeys};
use stats::{decode_hist, histogram, Counters};
use worker::WorkerLine;

#[derive(Parser)]
#[command(name = "loadgen", version, about = "Gatehouse load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario (the coordinator).
    Run(Box<RunArgs>),
    /// Internal: one worker process; its options arrive in LOADGEN_ARGS.
    #[command(hide = true)]
    Worker {
        /// This worker's index.
        #[arg(long)]
        index: usize,
        /// Workers in the run.
        #[arg(long)]
        of: usize,
    },
}

/// The token key, from `--key-hex`, `--key-file`, or the gateway's default key file.
pub fn load_keys(a: &RunArgs) -> anyhow::Result<TokenKeys> {
    let key = match (&a.key_hex, &a.key_file) {
        (Some(k), _) => parse_key_hex(k, "--key-hex")?,
        (None, Some(f)) => load_or_create_key_file(f, false)?,
        (None, None) => {
            load_or_create_key_file(std::path::Path::new("gatehouse-data/token.key"), false)
                .context(
                    "no --key-hex or --key-file, and gatehouse-data/token.key is not readable",
                )?
        }
    };
    Ok(TokenKeys::new(key, None))
}

fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    r.rlim_cur
}

/// Processes needed so that none holds more connections than its open-file limit allows.
fn derive_procs(users: u64, fd_limit: u64) -> usize {
    let per_proc = fd_limit.saturating_sub(256).max(64);
    users.div_ceil(per_proc).max(1) as usize
}

fn coordinate(args: RunArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    load_keys(&args)?; // fail early, with a clear message
    let fd_limit = nofile_limit();
    let procs = if args.procs > 0 {
        args.procs
    } else {
        derive_procs(args.users, fd_limit)
    };
    let per_proc = args.users.div_ceil(procs as u64);
    anyhow::ensure!(
        per_proc + 256 <= fd_limit,
        "{per_proc} connections per process exceed the open-file limit {fd_limit}; use --procs {} or more",
        derive_procs(args.users, fd_limit)
    );
    let gw_rss_before = report::rss_anon_kib(&args.gateway_pids);
    let gw_cpu_before = report::cpu_s(&args.gateway_pids);
    let json = serde_json::to_string(&args)?;
    let exe = std::env::current_exe()?;
    let (tx, rx) = mpsc::channel::<(usize, Option<WorkerLine>)>();
    let mut children = Vec::new();
    for i in 0..procs {
        let mut child = Command::new(&exe)
            .args([
                "worker",
                "--index",
                &i.to_string(),
                "--of",
                &procs.to_string(),
            ])
            .env("LOADGEN_ARGS", &json)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a worker process")?;
        let out = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                match serde_json::from_str::<WorkerLine>(&line) {
                    Ok(l) => {
                        let _ = tx.send((i, Some(l)));
                    }
                    Err(e) => eprintln!("loadgen: worker {i}: unreadable line ({e}): {line}"),
                }
            }
            let _ = tx.send((i, None));
        });
        children.push(child);
    }
    drop(tx);
    eprintln!(
        "loadgen: {:?} with {} users over {procs} worker processes (open-file limit {fd_limit}), gateways {:?}",
        args.scenario, args.users, args.gateways
    );

    let start = Instant::now();
    let mut latest: Vec<Counters> = vec![Counters::default(); procs];
    let mut results: Vec<Option<worker::WorkerResult>> = (0..procs).map(|_| None).collect();
    let mut interval = histogram();
    let mut last = (Instant::now(), Counters::default());
    let mut finished = 0;
    let mut gw_rss_connected: Option<u64> = None;
    let mut max_connected = 0u64;
    // Hard bound on the whole run: phases stop by themselves, but a worker whose executors
    // hang (e.g. a glommio stall the heartbeat did not catch) must not hang the run.
    let hard_deadline = start + Duration::from_secs(args.max_run_s + 3 * args.drain_timeout_s + 60);
    while finished < procs {
        if Instant::now() > hard_deadline {
            for c in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            anyhow::bail!(
                "workers still running past the hard deadline ({} s); killed them",
                hard_deadline.duration_since(start).as_secs()
            );
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((
                i,
                Some(WorkerLine::Progress {
                    counters,
                    deliver_hist,
                }),
            )) => {
                latest[i] = *counters;
                if let Ok(h) = decode_hist(&deliver_hist) {
                    let _ = interval.add(&h);
                }
            }
            Ok((i, Some(WorkerLine::Result(r)))) => results[i] = Some(*r),
            Ok((_, None)) => finished += 1,
            Err(_) => {}
        }
        if last.0.elapsed() >= Duration::from_secs(1) {
            let mut total = Counters::default();
            latest.iter().for_each(|c| total.add(c));
            if total.connected > max_connected {
                max_connected = total.connected;
                if total.connected >= args.users / 2 {
                    gw_rss_connected = report::rss_anon_kib(&args.gateway_pids);
                }
            }
            report::progress_line(
                start.elapsed(),
                &last.1,
                &total,
                last.0.elapsed(),
                &interval,
            );
            interval = histogram();
            last = (Instant::now(), total);
        }
    }
    for mut c in children {
        let status = c.wait()?;
        anyhow::ensure!(status.success(), "a worker process failed: {status}");
    }
    // Both after every worker was waited for: their CPU time is in RUSAGE_CHILDREN, and the
    // gateways' share of closing their connections is in.
    let lg_cpu = report::own_cpu_s();
    let gw_cpu = gw_cpu_before
        .zip(report::cpu_s(&args.gateway_pids))
        .map(|(a, b)| b - a);
    let results: Vec<worker::WorkerResult> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("worker {i} sent no result")))
        .collect::<anyhow::Result<_>>()?;
    let peak = results
        .iter()
        .map(|r| r.counters.connected_peak)
        .sum::<u64>();
    let max_connected = max_connected.max(peak);
    let rep = report::Report::build(
        &args,
        procs,
        fd_limit,
        start.elapsed(),
        results,
        gw_rss_before,
        gw_rss_connected,
        max_connected,
        (gw_cpu, lg_cpu),
    )?;
    rep.print_summary();
    std::fs::write(&args.report, serde_json::to_string_pretty(&rep)?)
        .with_context(|| format!("writing {}", args.report.display()))?;
    eprintln!("loadgen: report written to {}", args.report.display());
    Ok(rep.verdict())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => coordinate(*a),
        Cmd::Worker { index, of } => (|| {
            let json = std::env::var("LOADGEN_ARGS")
                .context("LOADGEN_ARGS not set (workers are started by `loadgen run`)")?;
            let a: RunArgs = serde_json::from_str(&json)?;
            worker::run(a, index, of)?;
            Ok(ExitCode::SUCCESS)
        })(),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn procs_follow_the_fd_limit() {
        assert_eq!(super::derive_procs(1_000, 20_000), 1);
        assert_eq!(super::derive_procs(1_000_000, 20_000), 51);
        assert_eq!(super::derive_procs(1_000_000, 1_048_576), 1);
    }
}
