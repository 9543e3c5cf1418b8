//! Heap held by one idle, established server TLS session (`transport::TlsSession`), measured
//! with a counting allocator: N sessions are handshaken in process against rustls clients,
//! the clients are dropped, and the live heap that remains is divided by N.
//!
//! ```text
//! cargo run --release --example tls_session_memory -- [--n 1000]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use gatehouse::config::TlsSection;
use gatehouse::transport::{TlsContext, TlsSession};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn handshake(server: &mut TlsSession, client: &mut rustls::ClientConnection) {
    let (mut plain, mut wire) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        if !to_server.is_empty() {
            server
                .handle_input(&mut to_server, &mut plain, &mut wire)
                .unwrap();
        }
        if !wire.is_empty() {
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
            wire.clear();
        }
        if server.is_established() && !client.is_handshaking() && !client.wants_write() {
            return;
        }
    }
    panic!("handshake did not finish");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--n")
        .and_then(|i| args.get(i + 1))
        .map_or(1000, |v| v.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    println!(
        "size_of::<TlsSession>() = {} B",
        std::mem::size_of::<TlsSession>()
    );
    for (label, versions, groups, tickets) in [
        (
            "TLS 1.3, x25519, tickets",
            vec!["1.3"],
            vec!["x25519"],
            true,
        ),
        (
            "TLS 1.3, x25519, no tickets",
            vec!["1.3"],
            vec!["x25519"],
            false,
        ),
        (
            "TLS 1.3, x25519mlkem768, tickets",
            vec!["1.3"],
            vec!["x25519mlkem768"],
            true,
        ),
        (
            "TLS 1.2, x25519, tickets",
            vec!["1.2"],
            vec!["x25519"],
            true,
        ),
    ] {
        let section = TlsSection {
            enabled: true,
            cert_file: dir.path().join("c.pem"),
            key_file: dir.path().join("k.pem"),
            versions: versions.iter().map(|s| s.to_string()).collect(),
            kx_groups: groups.iter().map(|s| s.to_string()).collect(),
            session_tickets: tickets,
            ..TlsSection::default()
        };
        let ctx = TlsContext::new(&section).unwrap().0;
        let client_cfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        );
        for suite in ["AES_128_GCM", "CHACHA20"] {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider
                .cipher_suites
                .retain(|s| format!("{:?}", s.suite()).contains(suite));
            let mut cc = (*client_cfg).clone();
            cc = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(
                    cc.alpn_protocols
                        .is_empty()
                        .then_some(&[&rustls::version::TLS13, &rustls::version::TLS12][..])
                        .unwrap(),
                )
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            cc.resumption = rustls::client::Resumption::disabled();
            let cc = Arc::new(cc);
            let before = LIVE.load(Ordering::Relaxed);
            let mut servers = Vec::with_capacity(n);
            for _ in 0..n {
                let mut s = TlsSession::new(ctx.config.clone()).unwrap();
                let mut c =
                    rustls::ClientConnection::new(cc.clone(), "localhost".try_into().unwrap())
                        .unwrap();
                handshake(&mut s, &mut c);
                drop(c);
                servers.push(s);
            }
            let per = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64
                - std::mem::size_of::<TlsSession>() as f64;
            println!(
                "{label:36} {suite:12}: {:.0} B heap per idle session (+{} B inline)",
                per,
                std::mem::size_of::<TlsSession>()
            );
        }
    }
}
