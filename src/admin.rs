//! The admin endpoint: `GET /metrics`, `GET /healthz`, `GET /readyz`, `POST /drain`.
//!
//! Control plane, kept off the data plane: it runs on its own small glommio executor (not
//! pinned, so it never takes a shard's core for itself) with its own listener, loopback by
//! default since it can drain the node. A scrape asks every shard for a
//! [`ShardSnapshot`] over its control channel, waits for the answers (bounded by
//! [`SCRAPE_TIMEOUT_MS`]) and encodes them (`metrics.rs`). Shards never see HTTP.
//!
//! HTTP/1.1 is served minimally: one request per connection (`Connection: close`), a head of at
//! most [`REQUEST_HEAD_BYTES_MAX`] parsed by `httparse`, no body. That is all Prometheus and
//! load balancers' health checks need.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::shared_channel::{
    ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

use crate::metrics::{NodeFacts, ShardSnapshot};
use crate::runtime::watchdog::Pulse;

/// How long a scrape waits for the shards' answers.
pub const SCRAPE_TIMEOUT_MS: u64 = 2_000;
/// Largest request head accepted.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Time a client gets to send its request head.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Admin connections served at once; more wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 64;
/// A shard whose heartbeat has not advanced for this long makes `/healthz` fail.
pub const HEALTH_STALE_MS: u64 = 2_000;

/// Node state shared by the admin endpoint, the signal handling in `main` and the shards.
#[derive(Debug)]
pub struct NodeState {
    /// Set to start the drain (SIGTERM, SIGINT, `POST /drain`); shards watch it.
    pub stop: Arc<AtomicBool>,
    /// Set once every shard serves.
    pub ready: AtomicBool,
    /// Set when the node has stopped; the admin executor exits.
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

/// The admin executor's ends of the shards' control channels.
pub struct AdminChannels {
    /// Scrape requests to each shard.
    pub requests: Vec<SharedSender<u64>>,
    /// Snapshots from each shard.
    pub replies: Vec<SharedReceiver<Box<ShardSnapshot>>>,
}

/// Binds the admin listener (so that a taken port fails the start at once) and returns it
/// with its real address.
pub fn bind(addr: SocketAddr) -> std::io::Result<(std::net::TcpListener, SocketAddr)> {
    let l = std::net::TcpListener::bind(addr)?;
    let a = l.local_addr()?;
    Ok((l, a))
}

struct Admin {
    requests: Vec<ConnectedSender<u64>>,
    replies: Vec<ConnectedReceiver<Box<ShardSnapshot>>>,
    scraping: glommio::sync::Semaphore,
    seq: Cell<u64>,
    state: Arc<NodeState>,
    pulses: Vec<Arc<Pulse>>,
    /// (beats, when seen) per shard, for `/healthz`.
    beats_seen: std::cell::RefCell<Vec<(u64, Instant)>>,
    open: Cell<usize>,
}

/// Starts the admin executor on its own thread; it serves until `state.exited` is set.
pub fn spawn(
    listener: std::net::TcpListener,
    channels: AdminChannels,
    state: Arc<NodeState>,
    pulses: Vec<Arc<Pulse>>,
    io_memory_bytes: usize,
) -> anyhow::Result<glommio::ExecutorJoinHandle<()>> {
    let fd = listener.into_raw_fd();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("gatehouse-admin")
        .io_memory(io_memory_bytes)
        .ring_depth(64)
        .spawn(move || async move {
            // SAFETY: `fd` is a bound, listening TCP socket whose ownership moves here.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            let mut requests = Vec::new();
            for s in channels.requests {
                requests.push(s.connect().await);
            }
            let mut replies = Vec::new();
            for r in channels.replies {
                replies.push(r.connect().await);
            }
            let now = Instant::now();
            let admin = Rc::new(Admin {
                beats_seen: std::cell::RefCell::new(
                    pulses
                        .iter()
                        .map(|p| (p.beats.load(Ordering::Relaxed), now))
                        .collect(),
                ),
                requests,
                replies,
                scraping: glommio::sync::Semaphore::new(1),
                seq: Cell::new(0),
                state,
                pulses,
                open: Cell::new(0),
            });
            let a = admin.clone();
            let acceptor = glommio::spawn_local(async move { a.accept_loop(listener).await });
            // This periodic timer also bounds glommio 0.9's executor stall (an executor can
            // park with runnable tasks) to its period on this executor.
            while !admin.state.exited.load(Ordering::Relaxed) {
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
            acceptor.cancel().await;
        })
        .map_err(|e| anyhow::anyhow!("starting the admin executor: {e}"))
}

impl Admin {
    async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    if self.open.get() >= CONNECTIONS_MAX {
                        continue; // Dropped: closes the connection.
                    }
                    self.open.set(self.open.get() + 1);
                    let a = self.clone();
                    glommio::spawn_local(async move {
                        a.serve(stream).await;
                        a.open.set(a.open.get() - 1);
                    })
                    .detach();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn serve(&self, mut stream: TcpStream) {
        let head = glommio::timer::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), async {
            Ok(read_head(&mut stream).await)
        })
        .await;
        let (status, ctype, body) = match head {
            Ok(Ok(buf)) => self.respond(&buf).await,
            Ok(Err(why)) => (400, "text/plain", format!("{why}\n")),
            Err(_) => (
                408,
                "text/plain",
                "request head not received in time\n".into(),
            ),
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
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.flush().await;
        let _ = stream.close().await;
    }

    async fn respond(&self, buf: &[u8]) -> (u16, &'static str, String) {
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
        match (method, path) {
            ("GET", "/metrics") => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.scrape().await,
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
                let already = self.state.stop.swap(true, Ordering::Relaxed);
                if !already {
                    tracing::info!("drain requested through the admin endpoint");
                }
                (202, text, "draining\n".into())
            }
            (_, "/metrics" | "/healthz" | "/readyz" | "/drain") => (
                405,
                text,
                format!("{method} is not allowed on {path} (GET /metrics, /healthz, /readyz; POST /drain)\n"),
            ),
            _ => (
                404,
                text,
                format!("no such endpoint {path:?} (GET /metrics, /healthz, /readyz; POST /drain)\n"),
            ),
        }
    }

    /// Why the node is unhealthy: a shard whose heartbeat has stopped.
    fn unhealthy(&self) -> Option<String> {
        let now = Instant::now();
        let mut seen = self.beats_seen.borrow_mut();
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

    /// Asks every shard for its snapshot and encodes the answers. One scrape at a time, so
    /// each shard has at most one request outstanding.
    async fn scrape(&self) -> String {
        let _one = self.scraping.acquire_permit(1).await;
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let mut asked = Vec::new();
        for (i, tx) in self.requests.iter().enumerate() {
            // A shard that has not taken the previous request is stuck: do not queue more.
            if tx.try_send(seq).is_ok() {
                asked.push(i);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(SCRAPE_TIMEOUT_MS);
        let mut snaps = Vec::new();
        let mut unanswered = (self.requests.len() - asked.len()) as u64;
        for i in asked {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let rx = &self.replies[i];
                match glommio::timer::timeout(left, async { Ok(rx.recv().await) }).await {
                    Ok(Some(s)) if s.seq == seq => {
                        snaps.push(*s);
                        break;
                    }
                    Ok(Some(_stale)) => continue, // An answer to a scrape that timed out.
                    _ => {
                        unanswered += 1;
                        break;
                    }
                }
            }
        }
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

/// Reads until the end of the request head; refuses heads over the limit.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return Err("connection closed before the end of the request head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
        if buf.len() > REQUEST_HEAD_BYTES_MAX {
            return Err(format!("request head over {REQUEST_HEAD_BYTES_MAX} bytes"));
        }
    }
}
