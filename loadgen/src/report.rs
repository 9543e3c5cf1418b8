//! The run's report: progress lines, the final summary table, and the JSON file with the
//! configuration, machine facts, counters, loss accounting and full latency percentiles.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::{RunArgs, Scenario};
use crate::stats::{decode_hist, histogram, Counters, LossReport, Percentiles};
use crate::worker::WorkerResult;

/// Sum of RssAnon (KiB) over `pids`; `None` without pids or if one is unreadable.
pub fn rss_anon_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find(|l| l.starts_with("RssAnon:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        total += kib;
    }
    Some(total)
}

/// CPU time (user + system) the `pids` have used so far, seconds; `None` without pids or if
/// one is unreadable. From /proc/PID/stat (fields 14 and 15, in clock ticks).
pub fn cpu_s(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces; count fields after its ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    }
    Some(total as f64 / ticks)
}

/// Prints one progress line (to stderr, so stdout stays clean for scripts).
pub fn progress_line(
    elapsed: Duration,
    prev: &Counters,
    now: &Counters,
    dt: Duration,
    interval: &Histogram<u64>,
) {
    let s = dt.as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / s;
    let p = |q| {
        if interval.is_empty() {
            0
        } else {
            interval.value_at_quantile(q)
        }
    };
    let errors = if now.errors.is_empty() {
        "0".to_string()
    } else {
        now.errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    eprintln!(
        "[{:>5.0}s] connected {:>8} (+{:>6.0}/s)  sent {:>8.0}/s  acked {:>8.0}/s  delivered {:>8.0}/s  deliver p50 {:>6}us p99 {:>7}us p99.9 {:>7}us  errors {}",
        elapsed.as_secs_f64(),
        now.connected,
        rate(now.logins, prev.logins),
        rate(now.sent, prev.sent),
        rate(now.acked, prev.acked),
        rate(now.delivered, prev.delivered),
        p(0.5),
        p(0.99),
        p(0.999),
        errors,
    );
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Facts about the machine the run used.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// CPUs online.
    pub cpus: usize,
    /// Memory, KiB.
    pub mem_total_kib: Option<u64>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// CPU model.
    pub cpu_model: Option<String>,
    /// Relevant sysctls.
    pub sysctls: BTreeMap<String, String>,
    /// This process's RLIMIT_NOFILE (soft).
    pub nofile_limit: u64,
}

impl Machine {
    fn read(nofile_limit: u64) -> Machine {
        let sysctls = [
            "net/core/somaxconn",
            "net/ipv4/tcp_max_syn_backlog",
            "net/ipv4/ip_local_port_range",
            "net/ipv4/tcp_mem",
            "net/ipv4/tcp_rmem",
            "net/ipv4/tcp_wmem",
            "fs/file-max",
            "fs/nr_open",
            "kernel/io_uring_disabled",
        ]
        .iter()
        .filter_map(|k| read(&format!("/proc/sys/{k}")).map(|v| (k.replace('/', "."), v)))
        .collect();
        let meminfo = read("/proc/meminfo").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_total_kib: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok()),
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu_model: read("/proc/cpuinfo").and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            }),
            sysctls,
            nofile_limit,
        }
    }
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Options of the run.
    pub config: RunArgs,
    /// Worker processes.
    pub procs: usize,
    /// Machine facts.
    pub machine: Machine,
    /// Wall time of the run, s.
    pub elapsed_s: f64,
    /// Counters, all workers.
    pub counters: Counters,
    /// Loss accounting, all workers.
    pub loss: LossReport,
    /// Latency percentiles by name (login, ack, deliver).
    pub latency: BTreeMap<String, Percentiles>,
    /// Most connections logged in at once.
    pub max_connected: u64,
    /// Connect phase, s (slowest worker).
    pub connect_s: f64,
    /// Logins per second during the connect phase.
    pub login_rate: f64,
    /// Handshake scenario: logins per second when everyone reconnects (with --tls, resumed
    /// sessions).
    #[serde(default)]
    pub reconnect_rate: f64,
    /// Handshake scenario: logins in the reconnect phase.
    #[serde(default)]
    pub reconnect_logins: u64,
    /// Handshake scenario with --gateway-pids: logins per second of gateway CPU time in the
    /// connect phase (full handshakes with --tls) and the reconnect phase (resumed), i.e.
    /// per core the gateway used.
    #[serde(default)]
    pub logins_per_gateway_cpu_s: Option<(f64, f64)>,
    /// Main phase, s (slowest worker).
    pub main_s: f64,
    /// Drain phase, s (slowest worker).
    pub drain_s: f64,
    /// Acknowledged messages per second over the main phase.
    pub acked_per_s: f64,
    /// Offline: messages delivered per second over the drain phase.
    pub drain_per_s: f64,
    /// Groups: member-deliveries per second the main phase asked for (GROUP_SENDs written,
    /// times the other members of a group, over the main phase). An achieved rate close to
    /// it means the run was bounded by `--rate`, not by the gateway.
    #[serde(default)]
    pub group_offered_per_s: f64,
    /// Idle: connections that answered the final PING.
    pub final_pongs: u64,
    /// Chat/churn: distinct deliveries for which no delivered receipt came back (receipts are
    /// at-least-once, so duplicates can hide a missing one; this is a lower bound).
    pub receipts_missing: u64,
    /// Gateway RssAnon before the run, KiB (with --gateway-pids).
    pub gateway_rss_before_kib: Option<u64>,
    /// Gateway RssAnon with the connections up, KiB.
    pub gateway_rss_connected_kib: Option<u64>,
    /// Gateway memory per connection, bytes.
    pub gateway_bytes_per_connection: Option<f64>,
    /// CPU time (user + system) over the whole run, connect phase included: the gateway
    /// processes' (with --gateway-pids) and the loadgen's own (its workers and itself).
    pub cpu: RunCpu,
}

/// CPU time of one run, and per unit of the scenario's work.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunCpu {
    /// Gateway processes, s (with --gateway-pids).
    pub gateway_s: Option<f64>,
    /// The loadgen's workers and coordinator, s.
    pub loadgen_s: f64,
    /// Of which the workers', s.
    pub loadgen_workers_s: f64,
    /// What one unit of work is ("member-delivery", "message delivered", ...), if the
    /// scenario has one.
    pub unit: Option<String>,
    /// Units done over the run.
    pub units: u64,
}

impl RunCpu {
    /// The unit of work of a scenario, and how many the run did.
    fn units(scenario: Scenario, c: &Counters, loss: &LossReport) -> (Option<String>, u64) {
        let (unit, n) = match scenario {
            Scenario::Groups => ("member-delivery", c.group_delivered),
            Scenario::Chat | Scenario::Churn | Scenario::Offline => {
                ("message delivered", loss.delivered_distinct)
            }
            Scenario::Presence => ("PRESENCE frame", c.presence),
            Scenario::Idle | Scenario::Handshake => return (None, 0),
        };
        (Some(unit.to_string()), n)
    }
}

/// CPU time (user + system) of this process and of its waited-for children, s: (both, the
/// children's).
pub fn own_cpu_s() -> (f64, f64) {
    let of = |who| {
        // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid `who` and a valid out-pointer.
        if unsafe { libc::getrusage(who, &mut r) } != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(r.ru_utime) + tv(r.ru_stime)
    };
    let children = of(libc::RUSAGE_CHILDREN);
    (of(libc::RUSAGE_SELF) + children, children)
}

impl Report {
    /// Merges worker results.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        args: &RunArgs,
        procs: usize,
        fd_limit: u64,
        elapsed: Duration,
        results: Vec<WorkerResult>,
        rss_before: Option<u64>,
        rss_connected: Option<u64>,
        max_connected: u64,
        cpu: (Option<f64>, (f64, f64)),
    ) -> anyhow::Result<Report> {
        let mut counters = Counters::default();
        let mut loss = LossReport::default();
        let mut hists: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
        let (mut connect_s, mut main_s, mut drain_s, mut final_pongs) = (0f64, 0f64, 0f64, 0);
        let mut reconnect_logins = 0u64;
        for r in &results {
            counters.add(&r.counters);
            loss.add(&r.loss);
            for (name, h) in &r.hists {
                let _ = hists
                    .entry(name.clone())
                    .or_insert_with(histogram)
                    .add(decode_hist(h)?);
            }
            connect_s = connect_s.max(r.connect_s);
            main_s = main_s.max(r.main_s);
            drain_s = drain_s.max(r.drain_s);
            final_pongs += r.final_pongs;
            reconnect_logins += r.reconnect_logins;
        }
        let per_conn = match (rss_before, rss_connected) {
            (Some(a), Some(b)) if max_connected > 0 => {
                Some((b.saturating_sub(a)) as f64 * 1024.0 / max_connected as f64)
            }
            _ => None,
        };
        let mut config = args.clone();
        if config.key_hex.is_some() {
            config.key_hex = Some("<redacted>".into());
        }
        let (unit, units) = RunCpu::units(args.scenario, &counters, &loss);
        let cpu = RunCpu {
            gateway_s: cpu.0,
            loadgen_s: cpu.1 .0,
            loadgen_workers_s: cpu.1 .1,
            unit,
            units,
        };
        let receipts_missing = match args.scenario {
            Scenario::Chat | Scenario::Churn => loss
                .delivered_distinct
                .saturating_sub(counters.receipts_delivered),
            _ => 0,
        };
        Ok(Report {
            config,
            procs,
            machine: Machine::read(fd_limit),
            elapsed_s: elapsed.as_secs_f64(),
            login_rate: (counters.logins - reconnect_logins) as f64 / connect_s.max(1e-3),
            reconnect_rate: if args.scenario == Scenario::Handshake {
                reconnect_logins as f64 / main_s.max(1e-3)
            } else {
                0.0
            },
            reconnect_logins,
            logins_per_gateway_cpu_s: results.iter().find_map(|r| r.gateway_cpu_s).map(|(a, b)| {
                (
                    (counters.logins - reconnect_logins) as f64 / a.max(1e-3),
                    reconnect_logins as f64 / b.max(1e-3),
                )
            }),
            acked_per_s: counters.acked as f64 / main_s.max(1e-3),
            group_offered_per_s: if args.scenario == Scenario::Groups {
                (counters.sent * u64::from(args.group_size.saturating_sub(1))) as f64
                    / main_s.max(1e-3)
            } else {
                0.0
            },
            drain_per_s: if args.scenario == Scenario::Offline {
                loss.delivered_distinct as f64 / drain_s.max(1e-3)
            } else {
                0.0
            },
            latency: hists
                .iter()
                .map(|(k, h)| (k.clone(), Percentiles::of(h)))
                .collect(),
            counters,
            loss,
            max_connected,
            connect_s,
            main_s,
            drain_s,
            final_pongs,
            receipts_missing,
            gateway_rss_before_kib: rss_before,
            gateway_rss_connected_kib: rss_connected,
            gateway_bytes_per_connection: per_conn,
            cpu,
        })
    }

    /// Prints the summary table (stdout).
    pub fn print_summary(&self) {
        let c = &self.counters;
        println!("scenario            {:?}", self.config.scenario);
        println!("users / procs       {} / {}", self.config.users, self.procs);
        println!(
            "connected (max)     {}  (login failures {}, reconnects {})",
            self.max_connected, c.connect_failures, c.reconnects
        );
        println!(
            "connect phase       {:.1} s  ({:.0} logins/s)",
            self.connect_s, self.login_rate
        );
        println!("main phase          {:.1} s", self.main_s);
        if self.config.scenario == Scenario::Handshake {
            println!(
                "reconnect phase     {:.1} s  ({:.0} logins/s)",
                self.main_s, self.reconnect_rate
            );
            if let Some((a, b)) = self.logins_per_gateway_cpu_s {
                println!(
                    "per gateway core    {a:.0} logins/s connecting, {b:.0} logins/s reconnecting (per CPU-second of the gateway)"
                );
            }
        }
        if self.config.scenario == Scenario::Groups {
            println!(
                "group fan-out       {} member-deliveries of {} expected ({:.0}/s over sending and drain), {} missing",
                c.group_delivered,
                c.group_expected,
                c.group_delivered as f64 / (self.main_s + self.drain_s).max(1e-3),
                c.group_expected.saturating_sub(c.group_delivered)
            );
            if self.config.reconnect {
                println!(
                    "group duplicates    {} (a member got a message again after a restart; not counted above)",
                    c.group_duplicates
                );
            }
            println!(
                "group offered       {:.0} member-deliveries/s while sending (raise --rate until the achieved rate stops following it)",
                self.group_offered_per_s
            );
        }
        if self.config.scenario == Scenario::Presence {
            println!(
                "presence            {} PRESENCE frames ({:.0}/s over the run)",
                c.presence,
                c.presence as f64 / self.elapsed_s.max(1e-3)
            );
        }
        if self.config.tls {
            println!(
                "tls handshakes      {} full, {} resumed",
                c.tls_full, c.tls_resumed
            );
        }
        println!(
            "sent / acked        {} / {}  ({:.0} acked/s)  refused {}  skipped {}",
            c.sent, c.acked, self.acked_per_s, c.refused, c.send_skipped
        );
        println!(
            "delivered           {} distinct, {} duplicates, {} reordered",
            self.loss.delivered_distinct, self.loss.duplicates, self.loss.reordered
        );
        if self.config.scenario == Scenario::Offline {
            println!(
                "offline drain       {:.1} s  ({:.0} messages/s)",
                self.drain_s, self.drain_per_s
            );
        }
        println!(
            "receipts            {} delivered, {} read, {} missing",
            c.receipts_delivered, c.receipts_read, self.receipts_missing
        );
        if self.config.scenario == Scenario::Idle {
            println!(
                "final ping          {} of {} answered",
                self.final_pongs, self.max_connected
            );
        }
        println!("LOST (acked, never delivered)  {}", self.loss.lost);
        for (name, p) in &self.latency {
            if p.count > 0 {
                println!(
                    "latency {:<8}    n={} p50={}us p90={}us p99={}us p99.9={}us p99.99={}us max={}us",
                    name, p.count, p.p50_us, p.p90_us, p.p99_us, p.p99_9_us, p.p99_99_us, p.max_us
                );
            }
        }
        if !c.errors.is_empty() {
            println!("errors              {:?}", c.errors);
        }
        if let Some(b) = self.gateway_bytes_per_connection {
            println!("gateway memory      {b:.0} bytes per connection (RssAnon delta)");
        }
        let cpu = &self.cpu;
        let per = |s: f64| s * 1e6 / cpu.units.max(1) as f64;
        let gateway = cpu
            .gateway_s
            .map_or("- (no --gateway-pids)".to_string(), |g| format!("{g:.1} s"));
        let mut line = format!(
            "cpu (whole run)     gateway {gateway}, loadgen {:.1} s",
            cpu.loadgen_s
        );
        if let (Some(unit), true) = (&cpu.unit, cpu.units > 0) {
            line += &format!("; per {unit}:");
            if let Some(g) = cpu.gateway_s {
                line += &format!(" gateway {:.2} us,", per(g));
            }
            line += &format!(" loadgen {:.2} us", per(cpu.loadgen_s));
        }
        println!("{line}");
    }

    /// Exit status: 1 if any acknowledged message was lost, 3 if not every user connected or
    /// (idle) answered the final ping, else 0.
    pub fn verdict(&self) -> ExitCode {
        let group_missing = self
            .counters
            .group_expected
            .saturating_sub(self.counters.group_delivered);
        if self.config.scenario == Scenario::Groups && group_missing > 0 {
            eprintln!(
                "loadgen: FAILED: {group_missing} member-deliveries of acknowledged group messages never arrived"
            );
            return ExitCode::from(1);
        }
        if self.loss.lost > 0 {
            eprintln!(
                "loadgen: FAILED: {} acknowledged messages were lost, e.g. {:?}",
                self.loss.lost, self.loss.lost_examples
            );
            return ExitCode::from(1);
        }
        let expected = match self.config.scenario {
            Scenario::Offline => self.config.users / 2,
            _ => self.config.users,
        };
        if self.max_connected < expected {
            eprintln!(
                "loadgen: INCOMPLETE: only {} of {expected} users were connected at once",
                self.max_connected
            );
            return ExitCode::from(3);
        }
        if self.config.scenario == Scenario::Handshake && self.reconnect_logins < expected {
            eprintln!(
                "loadgen: INCOMPLETE: only {} of {expected} users logged in again",
                self.reconnect_logins
            );
            return ExitCode::from(3);
        }
        if self.config.scenario == Scenario::Idle && self.final_pongs < self.max_connected {
            eprintln!(
                "loadgen: INCOMPLETE: {} of {} connections answered the final ping",
                self.final_pongs, self.max_connected
            );
            return ExitCode::from(3);
        }
        ExitCode::SUCCESS
    }
}
