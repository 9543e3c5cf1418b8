//! Gatehouse: a thread-per-core edge gateway for chat.
//!
//! Layers, bottom up (each only uses the ones above it in this list):
//! - [`ids`], [`limits`]: identifiers, the user-to-shard map, and every bound.
//! - [`proto`]: wire protocol v1 codec. Pure: no I/O, no clock.
//! - [`auth`]: HMAC login tokens. Pure: time is passed in.
//! - [`session`]: the connection state machine (handshake → login → active). No I/O.
//! - [`store`]: per-shard LMDB queues. Blocking; called off the reactor.
//! - [`config`]: the control plane, parsed and validated once.
//! - [`transport`]: TLS (rustls, unbuffered) and WebSocket layers under the protocol. No I/O.
//! - [`runtime`]: glommio shards, listeners, connections, routing, group commit, watchdog.
//!   The only layer that touches sockets or reads the clock.
//! - [`server`]: starts a node (all shards) and hands back a handle.
//! - [`client`]: a small blocking client used by tests, tools and the loadgen.
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod client;
pub mod config;
pub mod doctor;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod proto;
pub mod ratelimit;
pub mod runtime;
pub mod server;
pub mod session;
pub mod store;
pub mod transport;
