//! Host checks: can this box hold N connections with this configuration?
//!
//! Two halves, kept apart so the judgement is testable without the host: [`Host::read`]
//! gathers facts from `/proc`, `/sys` and `getrlimit` (no root needed), and [`evaluate`] turns
//! facts plus a target into [`Check`]s, each with what is, what is wanted, a status and a fix.
//! `gatehouse doctor` prints them; `gatehouse run` runs the same checks at start and logs the
//! ones that are not OK (`--strict` makes a failed check fatal). `docs/tuning.md` explains
//! every knob named here.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::config::Config;

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Meets the target.
    Ok,
    /// Works, but not as well as it could (or only after gatehouse adjusts it itself).
    Warn,
    /// Stops the node from holding the target.
    Fail,
    /// A fact worth seeing; nothing to judge.
    Info,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Info => "INFO",
        }
    }
}

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What is checked (a sysctl name, a limit).
    pub check: &'static str,
    /// The value found.
    pub current: String,
    /// The value wanted for the target.
    pub want: String,
    /// Verdict.
    pub status: Status,
    /// How to fix it (empty when OK).
    pub fix: String,
}

/// A NIC and where its interrupts may run.
#[derive(Clone, Debug, Default)]
pub struct Nic {
    /// Interface name.
    pub name: String,
    /// (irq, CPUs it may run on) for each of its interrupts that `/proc/interrupts` shows.
    pub irqs: Vec<(u32, Vec<usize>)>,
}

/// Facts read from the host. `None` where the kernel does not expose the value.
#[derive(Clone, Debug, Default)]
pub struct Host {
    /// RLIMIT_NOFILE (soft, hard).
    pub nofile: (u64, u64),
    /// RLIMIT_MEMLOCK soft, bytes (`u64::MAX` for unlimited).
    pub memlock_bytes: u64,
    /// fs.nr_open.
    pub nr_open: Option<u64>,
    /// fs.file-max.
    pub file_max: Option<u64>,
    /// kernel.io_uring_disabled (absent before Linux 6.6).
    pub io_uring_disabled: Option<u64>,
    /// net.core.somaxconn.
    pub somaxconn: Option<u64>,
    /// net.ipv4.tcp_max_syn_backlog.
    pub syn_backlog: Option<u64>,
    /// net.ipv4.tcp_mem, pages (min, pressure, max).
    pub tcp_mem_pages: Option<[u64; 3]>,
    /// net.ipv4.tcp_rmem, bytes (min, default, max).
    pub tcp_rmem: Option<[u64; 3]>,
    /// net.ipv4.tcp_wmem, bytes (min, default, max).
    pub tcp_wmem: Option<[u64; 3]>,
    /// net.netfilter.nf_conntrack_max (absent when conntrack is not loaded).
    pub conntrack_max: Option<u64>,
    /// net.ipv4.ip_local_port_range.
    pub port_range: Option<(u64, u64)>,
    /// The selected transparent huge page mode (`always`, `madvise`, `never`).
    pub thp: Option<String>,
    /// Page size, bytes.
    pub page_bytes: u64,
    /// CPUs this process may run on.
    pub cpus: Vec<usize>,
    /// NUMA nodes and their CPUs.
    pub numa: Vec<Vec<usize>>,
    /// Network interfaces other than loopback.
    pub nics: Vec<Nic>,
}

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn sysctl(name: &str) -> Option<String> {
    read_trim(Path::new("/proc/sys").join(name.replace('.', "/")))
}

fn sysctl_u64(name: &str) -> Option<u64> {
    sysctl(name)?.parse().ok()
}

fn sysctl3(name: &str) -> Option<[u64; 3]> {
    let v: Vec<u64> = sysctl(name)?
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.len() == 3).then(|| [v[0], v[1], v[2]])
}

fn rlimit(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return (0, 0);
    }
    let conv = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            v
        }
    };
    (conv(r.rlim_cur), conv(r.rlim_max))
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b.min(a + 65_536));
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    out
}

fn read_numa() -> Vec<Vec<usize>> {
    let mut nodes: Vec<(usize, Vec<usize>)> = std::fs::read_dir("/sys/devices/system/node")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let idx: usize = name.strip_prefix("node")?.parse().ok()?;
            Some((idx, parse_cpu_list(&read_trim(e.path().join("cpulist"))?)))
        })
        .collect();
    nodes.sort();
    nodes.into_iter().map(|(_, c)| c).collect()
}

fn read_nics() -> Vec<Nic> {
    let interrupts = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    let mut nics = Vec::new();
    for e in std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        // Only interfaces backed by a device (skips lo, bridges, ifb, veth).
        let Ok(dev) = std::fs::read_link(e.path().join("device")) else {
            continue;
        };
        let dev = dev
            .file_name()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The device's MSI vectors name its IRQs exactly (mlx5, i40e, virtio alike); without
        // them, match the interface or device name in /proc/interrupts.
        // (virtio NICs keep them on the parent PCI function.)
        let msi: Vec<u32> = ["device/msi_irqs", "device/../msi_irqs"]
            .iter()
            .flat_map(|p| {
                std::fs::read_dir(e.path().join(p))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter_map(|m| m.file_name().to_str()?.parse().ok())
            .collect();
        let mut irqs = Vec::new();
        for line in interrupts.lines() {
            let Some((irq, rest)) = line.trim_start().split_once(':') else {
                continue;
            };
            let Ok(irq) = irq.parse::<u32>() else {
                continue;
            };
            let label = rest.split_whitespace().last().unwrap_or("");
            let mine = msi.contains(&irq)
                || label.starts_with(&format!("{name}-"))
                || label == name
                || (!dev.is_empty()
                    && (label.starts_with(&format!("{dev}-input"))
                        || label.starts_with(&format!("{dev}-output"))));
            if mine {
                let cpus = read_trim(format!("/proc/irq/{irq}/smp_affinity_list"))
                    .map(|s| parse_cpu_list(&s))
                    .unwrap_or_default();
                irqs.push((irq, cpus));
            }
        }
        nics.push(Nic { name, irqs });
    }
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

impl Host {
    /// Reads this host (no root needed).
    pub fn read() -> Host {
        let thp = read_trim("/sys/kernel/mm/transparent_hugepage/enabled").and_then(|s| {
            let start = s.find('[')?;
            let end = s[start..].find(']')? + start;
            Some(s[start + 1..end].to_string())
        });
        Host {
            nofile: rlimit(libc::RLIMIT_NOFILE),
            memlock_bytes: rlimit(libc::RLIMIT_MEMLOCK).0,
            nr_open: sysctl_u64("fs.nr_open"),
            file_max: sysctl_u64("fs.file-max"),
            io_uring_disabled: sysctl_u64("kernel.io_uring_disabled"),
            somaxconn: sysctl_u64("net.core.somaxconn"),
            syn_backlog: sysctl_u64("net.ipv4.tcp_max_syn_backlog"),
            tcp_mem_pages: sysctl3("net.ipv4.tcp_mem"),
            tcp_rmem: sysctl3("net.ipv4.tcp_rmem"),
            tcp_wmem: sysctl3("net.ipv4.tcp_wmem"),
            conntrack_max: sysctl_u64("net.netfilter.nf_conntrack_max"),
            port_range: sysctl("net.ipv4.ip_local_port_range").and_then(|s| {
                let mut it = s.split_whitespace().filter_map(|x| x.parse().ok());
                Some((it.next()?, it.next()?))
            }),
            thp,
            // SAFETY: sysconf has no preconditions.
            page_bytes: u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096),
            cpus: crate::server::allowed_cpus(),
            numa: read_numa(),
            nics: read_nics(),
        }
    }
}

/// What the checks aim at.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Connections this node must hold.
    pub connections: u64,
    /// Shards it runs.
    pub shards: usize,
    /// First CPU index (into the allowed CPUs) of shard 0.
    pub first_cpu: usize,
    /// listen(2) backlog asked for.
    pub backlog: u64,
    /// Locked memory each shard registers, bytes.
    pub io_memory_bytes: u64,
}

impl Target {
    /// The target for `connections` with `config`'s shards, backlog and io_memory.
    pub fn new(config: &Config, connections: u64) -> Target {
        Target {
            connections,
            shards: config.shard_count(),
            first_cpu: config.server.first_cpu,
            backlog: u64::from(config.server.backlog),
            io_memory_bytes: config.runtime.io_memory_kib as u64 * 1024,
        }
    }
}

/// Descriptors a node needs beyond one per connection: listeners, io_uring rings, LMDB
/// files, the admin endpoint, log files.
pub const FILES_HEADROOM: u64 = 1024;
/// Locked memory glommio needs per shard beyond `io_memory` (rings and their setup); with
/// fewer than 512 KiB in all, startup fails (measured, shared/ARCHITECTURE.md).
pub const MEMLOCK_PER_SHARD_EXTRA_BYTES: u64 = 512 * 1024;
/// Kernel socket buffer memory budgeted per connection for `tcp_mem`: idle sockets hold
/// none, so this is an average over a box where some connections have data in flight.
pub const TCP_MEM_PER_CONN_BYTES: u64 = 4096;
/// Largest tcp_rmem / tcp_wmem default wanted at 100,000 connections or more: the initial
/// buffer of a socket that receives a burst, so small defaults keep busy sockets cheap.
pub const TCP_BUF_DEFAULT_MAX_BYTES: u64 = 16_384;

fn fmt_bytes(b: u64) -> String {
    if b == u64::MAX {
        "unlimited".into()
    } else if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KiB", b / 1024)
    }
}

fn missing(check: &'static str, want: String) -> Check {
    Check {
        check,
        current: "not readable".into(),
        want,
        status: Status::Info,
        fix: String::new(),
    }
}

fn at_least(
    check: &'static str,
    current: Option<u64>,
    want: u64,
    fail: Status,
    fix: &str,
) -> Check {
    match current {
        None => missing(check, format!(">= {want}")),
        Some(v) => Check {
            check,
            current: v.to_string(),
            want: format!(">= {want}"),
            status: if v >= want { Status::Ok } else { fail },
            fix: if v >= want {
                String::new()
            } else {
                fix.to_string()
            },
        },
    }
}

/// Judges `host` against `target`.
pub fn evaluate(host: &Host, t: &Target) -> Vec<Check> {
    let mut out = Vec::new();
    let files = t.connections.saturating_add(FILES_HEADROOM);
    let (soft, hard) = host.nofile;
    out.push(Check {
        check: "open files (hard limit)",
        current: hard.to_string(),
        want: format!(">= {files}"),
        status: if hard >= files {
            Status::Ok
        } else {
            Status::Fail
        },
        fix: if hard >= files {
            String::new()
        } else {
            format!(
                "LimitNOFILE={files} in the systemd unit (or limits.conf); on a box where it \
                 cannot be raised, run ceil(N / {}) nodes side by side",
                hard.saturating_sub(FILES_HEADROOM).max(1)
            )
        },
    });
    out.push(Check {
        check: "open files (soft limit)",
        current: soft.to_string(),
        want: format!(">= {files}"),
        status: if soft >= files {
            Status::Ok
        } else if hard >= files {
            Status::Warn
        } else {
            Status::Fail
        },
        fix: if soft >= files {
            String::new()
        } else {
            "gatehouse raises the soft limit to the hard limit at start".into()
        },
    });
    out.push(at_least(
        "fs.nr_open",
        host.nr_open,
        files,
        Status::Fail,
        "sysctl fs.nr_open (caps the hard open-files limit); see tuning/99-gatehouse.conf",
    ));
    out.push(at_least(
        "fs.file-max",
        host.file_max,
        files,
        Status::Fail,
        "sysctl fs.file-max (all processes together); see tuning/99-gatehouse.conf",
    ));
    let memlock = (t.io_memory_bytes + MEMLOCK_PER_SHARD_EXTRA_BYTES) * t.shards as u64;
    out.push(Check {
        check: "memlock (RLIMIT_MEMLOCK)",
        current: fmt_bytes(host.memlock_bytes),
        want: format!(">= {}", fmt_bytes(memlock)),
        status: if host.memlock_bytes >= memlock {
            Status::Ok
        } else {
            Status::Fail
        },
        fix: if host.memlock_bytes >= memlock {
            String::new()
        } else {
            "LimitMEMLOCK=infinity in the systemd unit, or lower runtime.io_memory_kib / shards"
                .into()
        },
    });
    out.push(match host.io_uring_disabled {
        None => Check {
            check: "kernel.io_uring_disabled",
            current: "absent (kernel < 6.6)".into(),
            want: "0".into(),
            status: Status::Ok,
            fix: String::new(),
        },
        Some(v) => Check {
            check: "kernel.io_uring_disabled",
            current: v.to_string(),
            want: "0".into(),
            status: match v {
                0 => Status::Ok,
                1 => Status::Warn,
                _ => Status::Fail,
            },
            fix: match v {
                0 => String::new(),
                1 => "1 allows io_uring only for kernel.io_uring_group: add the service user \
                      to it, or set 0"
                    .into(),
                _ => "sysctl kernel.io_uring_disabled=0 (gatehouse needs io_uring)".into(),
            },
        },
    });
    let backlog_fix = "sysctl net.core.somaxconn and net.ipv4.tcp_max_syn_backlog (the kernel \
                       silently caps server.backlog)";
    out.push(at_least(
        "net.core.somaxconn",
        host.somaxconn,
        t.backlog,
        Status::Warn,
        backlog_fix,
    ));
    out.push(at_least(
        "net.ipv4.tcp_max_syn_backlog",
        host.syn_backlog,
        t.backlog,
        Status::Warn,
        backlog_fix,
    ));
    let tcp_mem_want = t.connections.saturating_mul(TCP_MEM_PER_CONN_BYTES);
    out.push(match host.tcp_mem_pages {
        None => missing("net.ipv4.tcp_mem (max)", fmt_bytes(tcp_mem_want)),
        Some(p) => {
            let max = p[2].saturating_mul(host.page_bytes);
            Check {
                check: "net.ipv4.tcp_mem (max)",
                current: format!("{} pages = {}", p[2], fmt_bytes(max)),
                want: format!(
                    ">= {} (N x {} B)",
                    fmt_bytes(tcp_mem_want),
                    TCP_MEM_PER_CONN_BYTES
                ),
                status: if max >= tcp_mem_want {
                    Status::Ok
                } else {
                    Status::Warn
                },
                fix: if max >= tcp_mem_want {
                    String::new()
                } else {
                    "raise net.ipv4.tcp_mem; past it the kernel drops and collapses socket \
                     buffers under load"
                        .into()
                },
            }
        }
    });
    for (check, v) in [
        ("net.ipv4.tcp_rmem (default)", host.tcp_rmem),
        ("net.ipv4.tcp_wmem (default)", host.tcp_wmem),
    ] {
        let big = t.connections >= 100_000;
        out.push(match v {
            None => missing(check, format!("<= {TCP_BUF_DEFAULT_MAX_BYTES}")),
            Some(v) => {
                let ok = !big || v[1] <= TCP_BUF_DEFAULT_MAX_BYTES;
                Check {
                    check,
                    current: v[1].to_string(),
                    want: if big {
                        format!("<= {TCP_BUF_DEFAULT_MAX_BYTES}")
                    } else {
                        "any (fewer than 100,000 connections)".into()
                    },
                    status: if ok { Status::Ok } else { Status::Warn },
                    fix: if ok {
                        String::new()
                    } else {
                        "smaller defaults keep millions of sockets cheap; see \
                         tuning/99-gatehouse.conf"
                            .into()
                    },
                }
            }
        });
    }
    out.push(match host.conntrack_max {
        None => Check {
            check: "net.netfilter.nf_conntrack_max",
            current: "conntrack not loaded".into(),
            want: format!(">= {} or NOTRACK", t.connections),
            status: Status::Ok,
            fix: String::new(),
        },
        Some(v) => Check {
            check: "net.netfilter.nf_conntrack_max",
            current: v.to_string(),
            want: format!(">= {} or NOTRACK", t.connections),
            status: if v >= t.connections {
                Status::Ok
            } else {
                Status::Warn
            },
            fix: if v >= t.connections {
                String::new()
            } else {
                "NOTRACK the gateway port in the raw table (docs/tuning.md), or raise \
                 nf_conntrack_max; a full table drops new connections"
                    .into()
            },
        },
    });
    out.push(match host.port_range {
        None => missing("net.ipv4.ip_local_port_range", String::new()),
        Some((lo, hi)) => {
            let span = hi.saturating_sub(lo) + 1;
            Check {
                check: "net.ipv4.ip_local_port_range",
                current: format!("{lo}-{hi} ({span} ports)"),
                want: "loadgen side: ports x source addresses >= N".into(),
                status: Status::Info,
                fix: if span >= t.connections {
                    String::new()
                } else {
                    format!(
                        "a loadgen on this box needs >= {} source addresses (--src-ips)",
                        t.connections.div_ceil(span.max(1))
                    )
                },
            }
        }
    });
    out.push(match &host.thp {
        None => missing("transparent huge pages", "madvise or never".into()),
        Some(mode) => Check {
            check: "transparent huge pages",
            current: mode.clone(),
            want: "madvise or never".into(),
            status: if mode == "always" {
                Status::Warn
            } else {
                Status::Ok
            },
            fix: if mode == "always" {
                "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (many small \
                 per-connection allocations; `always` inflates RSS)"
                    .into()
            } else {
                String::new()
            },
        },
    });
    let ncpu = host.cpus.len();
    out.push(Check {
        check: "CPUs vs shards",
        current: format!("{ncpu} CPUs allowed, {} shards", t.shards),
        want: "shards <= CPUs".into(),
        status: if t.shards <= ncpu {
            Status::Ok
        } else {
            Status::Warn
        },
        fix: if t.shards <= ncpu {
            String::new()
        } else {
            "two shards share a core: set server.shards to the CPUs this node may use".into()
        },
    });
    let shard_cpus: Vec<usize> = (0..t.shards)
        .filter_map(|i| host.cpus.get((t.first_cpu + i) % ncpu.max(1)).copied())
        .collect();
    let nodes_used = host
        .numa
        .iter()
        .filter(|cpus| shard_cpus.iter().any(|c| cpus.contains(c)))
        .count();
    out.push(Check {
        check: "NUMA layout",
        current: format!(
            "{} node(s); shards on {}",
            host.numa.len().max(1),
            nodes_used.max(1)
        ),
        want: "one gatehouse node per NUMA node".into(),
        status: if nodes_used <= 1 {
            Status::Ok
        } else {
            Status::Warn
        },
        fix: if nodes_used <= 1 {
            String::new()
        } else {
            "run one node per socket (server.first_cpu, server.shards) so each shard's memory \
             stays local"
                .into()
        },
    });
    if host.nics.iter().all(|n| n.irqs.is_empty()) {
        out.push(Check {
            check: "NIC IRQs",
            current: "none visible".into(),
            want: "queue IRQs on the serving socket".into(),
            status: Status::Info,
            fix: String::new(),
        });
    }
    for nic in host.nics.iter().filter(|n| !n.irqs.is_empty()) {
        let mut cpus: Vec<usize> = nic.irqs.iter().flat_map(|(_, c)| c.clone()).collect();
        cpus.sort_unstable();
        cpus.dedup();
        let mut current = format!("{}: {} IRQs on CPUs ", nic.name, nic.irqs.len());
        let _ = write!(current, "{cpus:?}");
        out.push(Check {
            check: "NIC IRQs",
            current,
            want: "queue IRQs on the serving socket".into(),
            status: Status::Info,
            fix: format!("scripts/pin-irqs.sh --iface {} (dry run first)", nic.name),
        });
    }
    out
}

/// True when any check failed.
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

/// The checks as an aligned text table: `CHECK CURRENT WANT STATUS FIX`.
pub fn table(checks: &[Check]) -> String {
    let head = ["CHECK", "CURRENT", "WANT", "STATUS", "FIX"];
    let rows: Vec<[String; 5]> = checks
        .iter()
        .map(|c| {
            [
                c.check.to_string(),
                c.current.clone(),
                c.want.clone(),
                c.status.label().to_string(),
                c.fix.clone(),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 5]| {
        for (i, cell) in cells.iter().enumerate() {
            if i == 4 {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ", w = width[i]);
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
    }
    out
}

/// Raises the soft open-files limit to the hard limit (what a server holding many sockets
/// wants; the hard limit is the operator's). Returns (before, after).
pub fn raise_nofile_soft_limit() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = r.rlim_cur;
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok((before, r.rlim_cur))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_host() -> Host {
        Host {
            nofile: (4_000_000, 4_000_000),
            memlock_bytes: u64::MAX,
            nr_open: Some(4_000_000),
            file_max: Some(10_000_000),
            io_uring_disabled: Some(0),
            somaxconn: Some(65_535),
            syn_backlog: Some(65_535),
            tcp_mem_pages: Some([1_000_000, 2_000_000, 4_000_000]),
            tcp_rmem: Some([4096, 16_384, 1 << 24]),
            tcp_wmem: Some([4096, 16_384, 1 << 24]),
            conntrack_max: None,
            port_range: Some((1024, 65_535)),
            thp: Some("madvise".into()),
            page_bytes: 4096,
            cpus: (0..16).collect(),
            numa: vec![(0..8).collect(), (8..16).collect()],
            nics: vec![],
        }
    }

    fn target(connections: u64, shards: usize) -> Target {
        Target {
            connections,
            shards,
            first_cpu: 0,
            backlog: 4096,
            io_memory_bytes: 64 * 1024,
        }
    }

    fn status(checks: &[Check], name: &str) -> Status {
        checks.iter().find(|c| c.check == name).unwrap().status
    }

    #[test]
    fn a_tuned_host_passes_a_million() {
        let checks = evaluate(&good_host(), &target(1_000_000, 8));
        assert!(!failed(&checks), "{}", table(&checks));
        assert!(checks
            .iter()
            .all(|c| matches!(c.status, Status::Ok | Status::Info)));
    }

    #[test]
    fn limits_below_the_target_fail_and_say_how_to_fix() {
        let mut h = good_host();
        h.nofile = (1024, 20_000);
        h.memlock_bytes = 8 << 20;
        h.thp = Some("always".into());
        h.io_uring_disabled = Some(2);
        let checks = evaluate(&h, &target(1_000_000, 16));
        assert_eq!(status(&checks, "open files (hard limit)"), Status::Fail);
        assert_eq!(status(&checks, "open files (soft limit)"), Status::Fail);
        assert_eq!(status(&checks, "memlock (RLIMIT_MEMLOCK)"), Status::Fail);
        assert_eq!(status(&checks, "kernel.io_uring_disabled"), Status::Fail);
        assert_eq!(status(&checks, "transparent huge pages"), Status::Warn);
        // Shards on CPUs 0..15 cover both NUMA nodes.
        assert_eq!(status(&checks, "NUMA layout"), Status::Warn);
        assert!(failed(&checks));
        let t = table(&checks);
        assert!(t.starts_with("CHECK"), "{t}");
        assert!(t.contains("LimitNOFILE"), "{t}");
        // A small target on the same host needs no more files than it has.
        let small = evaluate(&h, &target(10_000, 1));
        assert_eq!(status(&small, "open files (hard limit)"), Status::Ok);
        assert_eq!(status(&small, "open files (soft limit)"), Status::Warn);
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
    }
}
