//! The admin endpoint: `GET /metrics`, `GET /healthz`, `GET /readyz`, `POST /drain`,
//! `POST /reload-tls`.
//!
//! Control plane, kept off the data plane: it runs on its own plain threads (not pinned, so
//! it never takes a shard's core for itself) with its own listener, loopback by default since
//! it can drain the node. A scrape raises each shard's requested sequence number; every shard
//! polls its mailbox on a short timer ([`crate::limits::CONTROL_POLL_MS`]) and answers with a
//! [`ShardSnapshot`] over a bounded channel, and the scrape encodes the answers that came
//! within [`SCRAPE_TIMEOUT_MS`] (`metrics.rs`). Shards never see HTTP, never block on the
//! admin side, and are never woken by it.
//!
//! HTTP/1.1 is served minimally: one request per connection (`Connection: close`), a head of at
//! most [`REQUEST_HEAD_BYTES_MAX`] parsed by `httparse`, no body. That is all Prometheus and
//! load balancers' health checks need.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{NodeFacts, ShardSnapshot};
use crate::runtime::watchdog::Pulse;

/// How long a scrape waits for the shards' answers.
pub const SCRAPE_TIMEOUT_MS: u64 = 2_000;
/// Largest request head accepted.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Time a client gets to send its request head (and to take the response).
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Admin connections served at once (a thread each); more are closed at once.
pub const CONNECTIONS_MAX: usize = 16;
/// A shard whose heartbeat has not advanced for this long makes `/healthz` fail.
pub const HEALTH_STALE_MS: u64 = 2_000;
/// Replies a shard may have waiting (answers to scrapes that timed out, then the current one).
pub const REPLIES_QUEUED_MAX: usize = 8;

/// Node state shared by the admin endpoint, the signal handling in `main` and the shards.
#[derive(Debug)]
pub struct NodeState {
    /// Set to start the drain (SIGTERM, SIGINT, `POST /drain`); shards watch it.
    pub stop: Arc<AtomicBool>,
    /// Set once every shard serves.
    pub ready: AtomicBool,
    /// Set when the node has stopped; the admin thread exits.
    pub exited: AtomicBool,
    /// When the node started.
    pub started: Instant,
}

impl NodeState {
    /// A node that is starting (not ready).
    pub fn new(stop: Arc<AtomicBool>) -> NodeState {
        NodeState {
            stop,
            ready: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// Serving and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed)
    }
}

/// The admin endpoint's side of one shard's control mailbox.
pub struct ShardLink {
    /// Highest scrape sequence number asked of the shard.
    pub requested: Arc<AtomicU64>,
    /// The shard's answers.
    pub replies: Receiver<Box<ShardSnapshot>>,
}

/// A shard's side of its control mailbox: it polls `requested` on a short timer and answers
/// with `try_send`, so it never blocks and awaits nothing but its own timer.
pub struct ShardControl {
    /// Highest scrape sequence number asked of the shard.
    pub requested: Arc<AtomicU64>,
    /// Where the answers go.
    pub replies: SyncSender<Box<ShardSnapshot>>,
}

/// A linked pair for one shard.
pub fn control_pair() -> (ShardLink, ShardControl) {
    let requested = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::sync_channel(REPLIES_QUEUED_MAX);
    (
        ShardLink {
            requested: requested.clone(),
            replies: rx,
        },
        ShardControl {
            requested,
            replies: tx,
        },
    )
}

/// Binds the admin listener (so that a taken port fails the start at once) and returns it
/// with its real address.
pub fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)?;
    let a = l.local_addr()?;
    Ok((l, a))
}

struct Admin {
    /// One scrape at a time (so each shard has at most one request outstanding): the last
    /// sequence number and the shards' links.
    scraping: Mutex<(u64, Vec<ShardLink>)>,
    state: Arc<NodeState>,
    pulses: Vec<Arc<Pulse>>,
    /// (beats, when seen) per shard, for `/healthz`.
    beats_seen: Mutex<Vec<(u64, Instant)>>,
    open: AtomicUsize,
    /// The node's TLS context, for `POST /reload-tls`.
    tls: Option<Arc<crate::transport::TlsContext>>,
}

/// Starts the admin endpoint on its own thread; it serves until `state.exited` is set.
///
/// Plain threads with blocking sockets, not a glommio executor: a glommio executor about to
/// sleep issues `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which interrupts every core
/// running this process, shards included. Scraping from an executor raised the chat p99
/// measurably (docs/benchmarks.md, Admin endpoint).
pub fn spawn(
    listener: TcpListener,
    links: Vec<ShardLink>,
    state: Arc<NodeState>,
    pulses: Vec<Arc<Pulse>>,
    tls: Option<Arc<crate::transport::TlsContext>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let now = Instant::now();
    let admin = Arc::new(Admin {
        beats_seen: Mutex::new(
            pulses
                .iter()
                .map(|p| (p.beats.load(Ordering::Relaxed), now))
                .collect(),
        ),
        scraping: Mutex::new((0, links)),
        state,
        pulses,
        open: AtomicUsize::new(0),
        tls,
    });
    std::thread::Builder::new()
        .name("gatehouse-admin".into())
        .spawn(move || admin.accept_loop(listener))
}

impl Admin {
    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let fd = listener.as_raw_fd();
        while !self.state.exited.load(Ordering::Relaxed) {
            // Wait for a connection or 100 ms, so that the thread sees the node exit.
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for a socket we own.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.open.fetch_add(1, Ordering::Relaxed) >= CONNECTIONS_MAX {
                        self.open.fetch_sub(1, Ordering::Relaxed);
                        continue; // Dropped: closes the connection.
                    }
                    let a = self.clone();
                    let spawned = std::thread::Builder::new()
                        .name("gatehouse-admin-conn".into())
                        .spawn(move || {
                            a.serve(stream);
                            a.open.fetch_sub(1, Ordering::Relaxed);
                        });
                    if spawned.is_err() {
                        self.open.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn serve(&self, mut stream: TcpStream) {
        let timeout = Some(Duration::from_millis(REQUEST_TIMEOUT_MS));
        let _ = stream.set_read_timeout(timeout);
        let _ = stream.set_write_timeout(timeout);
        let (status, ctype, body) = match read_head(&mut stream) {
            Ok(buf) => self.respond(&buf),
            Err(HeadError::TimedOut) => (
                408,
                "text/plain",
                "request head not received in time\n".into(),
            ),
            Err(HeadError::Bad(why)) => (400, "text/plain", format!("{why}\n")),
        };
        let reason = match status {
            200 => "OK",
            202 => "Accepted",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            _ => "Service Unavailable",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body.as_bytes());
    }

    fn respond(&self, buf: &[u8]) -> (u16, &'static str, String) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return (400, "text/plain", "incomplete request head\n".into())
            }
            Err(e) => return (400, "text/plain", format!("bad request: {e}\n")),
        }
        let method = req.method.unwrap_or("");
        let path = req.path.unwrap_or("").split('?').next().unwrap_or("");
        let text = "text/plain; charset=utf-8";
        let endpoints = "GET /metrics, /healthz, /readyz; POST /drain, /reload-tls";
        match (method, path) {
            ("GET", "/metrics") => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.scrape(),
            ),
            ("GET", "/healthz") => match self.unhealthy() {
                None => (200, text, "ok\n".into()),
                Some(why) => (503, text, format!("{why}\n")),
            },
            ("GET", "/readyz") => {
                if self.state.is_ready() {
                    (200, text, "ready\n".into())
                } else if self.state.stop.load(Ordering::Relaxed) {
                    (503, text, "draining\n".into())
                } else {
                    (503, text, "starting\n".into())
                }
            }
            ("POST", "/drain") => {
                if !self.state.stop.swap(true, Ordering::Relaxed) {
                    tracing::info!("drain requested through the admin endpoint");
                }
                (202, text, "draining\n".into())
            }
            ("POST", "/reload-tls") => match crate::server::reload_tls(self.tls.as_deref()) {
                Ok(summary) => (200, text, format!("reloaded: {summary}\n")),
                Err(e) => (
                    409,
                    text,
                    format!("reload refused, the current certificate stays: {e:#}\n"),
                ),
            },
            (_, "/metrics" | "/healthz" | "/readyz" | "/drain" | "/reload-tls") => (
                405,
                text,
                format!("{method} is not allowed on {path} ({endpoints})\n"),
            ),
            _ => (
                404,
                text,
                format!("no such endpoint {path:?} ({endpoints})\n"),
            ),
        }
    }

    /// Why the node is unhealthy: a shard whose heartbeat has stopped.
    fn unhealthy(&self) -> Option<String> {
        let now = Instant::now();
        let mut seen = self.beats_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (i, p) in self.pulses.iter().enumerate() {
            let beats = p.beats.load(Ordering::Relaxed);
            if beats != seen[i].0 {
                seen[i] = (beats, now);
            } else if now.duration_since(seen[i].1) > Duration::from_millis(HEALTH_STALE_MS) {
                return Some(format!(
                    "shard {i}: no heartbeat for {} ms",
                    now.duration_since(seen[i].1).as_millis()
                ));
            }
        }
        None
    }

    /// Asks every shard for its snapshot and encodes the answers.
    fn scrape(&self) -> String {
        let mut guard = self.scraping.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 += 1;
        let (seq, links) = (guard.0, &guard.1);
        for l in links {
            l.requested.store(seq, Ordering::Release);
        }
        let deadline = Instant::now() + Duration::from_millis(SCRAPE_TIMEOUT_MS);
        let mut snaps = Vec::with_capacity(links.len());
        let mut unanswered = 0;
        for l in links {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match l.replies.recv_timeout(left) {
                    Ok(s) if s.seq == seq => {
                        snaps.push(*s);
                        break;
                    }
                    Ok(_stale) => continue, // An answer to a scrape that timed out.
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                        unanswered += 1;
                        break;
                    }
                }
            }
        }
        drop(guard);
        let facts = NodeFacts {
            stalls: self
                .pulses
                .iter()
                .map(|p| p.stalls.load(Ordering::Relaxed))
                .collect(),
            shards_unanswered: unanswered,
            ready: self.state.is_ready(),
            draining: self.state.stop.load(Ordering::Relaxed),
            uptime_s: self.state.started.elapsed().as_secs_f64(),
        };
        crate::metrics::encode(&snaps, &facts)
    }
}

enum HeadError {
    TimedOut,
    Bad(String),
}

/// Reads until the end of the request head; refuses heads over the limit.
fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    // One deadline for the whole head: a client trickling a byte at a time must not hold one
    // of the few admin connection slots for longer than that.
    let deadline = Instant::now() + Duration::from_millis(REQUEST_TIMEOUT_MS);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::TimedOut);
        }
        let _ = stream.set_read_timeout(Some(left));
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::TimedOut)
            }
            Err(e) => return Err(HeadError::Bad(format!("read failed: {e}"))),
        };
        if n == 0 {
            return Err(HeadError::Bad(
                "connection closed before the end of the request head".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
        if buf.len() > REQUEST_HEAD_BYTES_MAX {
            return Err(HeadError::Bad(format!(
                "request head over {REQUEST_HEAD_BYTES_MAX} bytes"
            )));
        }
    }
}
