//! Listening sockets: one SO_REUSEPORT socket per shard, built with socket2 so that the
//! backlog and options are ours (glommio's `TcpListener::bind` hard-codes `listen(1024)`).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Binds `shards` listening sockets on `addr` with SO_REUSEPORT, so the kernel spreads new
/// connections over them. If `addr` has port 0, the first socket picks the port and the
/// others bind the same one. Returns the sockets and the bound address.
pub fn bind_reuseport(
    addr: SocketAddr,
    shards: usize,
    backlog: u32,
) -> std::io::Result<(Vec<OwnedFd>, SocketAddr)> {
    let mut bound = addr;
    let mut out = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM.cloexec(),
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nodelay(true)?;
        socket.bind(&bound.into())?;
        socket.listen(backlog.min(i32::MAX as u32) as i32)?;
        if bound.port() == 0 {
            bound = socket.local_addr()?.as_socket().expect("inet socket");
        }
        out.push(OwnedFd::from(socket));
    }
    Ok((out, bound))
}
