//! The TLS server driver on arbitrary bytes: before any handshake (rustls's input handling and
//! our buffering of split records, where an indexing bug was found), and after a real TLS 1.3
//! handshake, when the offloaded record layer opens records. Never a panic; after a handshake,
//! forged records yield no plaintext.
#![no_main]

use std::sync::{Arc, OnceLock};

use gatehouse::config::TlsSection;
use gatehouse::transport::{TlsContext, TlsSession};
use libfuzzer_sys::fuzz_target;

const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBuTCCAV+gAwIBAgIUXyFRS+0VnNLdvtMpACSVaOmqX+IwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNDAwMTQxNFoYDzIxMjYxMDMx
MDAxNDE0WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQgghxXHcBEugi0UQtTdZSwudyif5qqmRAM4ZKQ1UdS6+SQFE4DDSsQ
+198RUvX92B1vbZ9TOHHupi82dgwfBipo4GMMIGJMB0GA1UdDgQWBBQ0Q8owYpf6
IE/tluh0s0IgozWRZjAfBgNVHSMEGDAWgBQ0Q8owYpf6IE/tluh0s0IgozWRZjAU
BgNVHREEDTALgglsb2NhbGhvc3QwDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8EBAMC
B4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwCgYIKoZIzj0EAwIDSAAwRQIgQNaGv0ga
8INCat291wgDfCR7jxBO82ZFOzZV7fFtkUECIQC5tXGrGrA7DWwt8RsOa+V9p5Qn
A/4SYcTznCv9roiTow==
-----END CERTIFICATE-----";
const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQggZwNCT0K8bOvWRTu
hizh7CY8ziTeMFGvhIvMbiYy1mKhRANCAAQgghxXHcBEugi0UQtTdZSwudyif5qq
mRAM4ZKQ1UdS6+SQFE4DDSsQ+198RUvX92B1vbZ9TOHHupi82dgwfBip
-----END PRIVATE KEY-----";

struct Fixture {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gatehouse-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("c.pem"), CERT).unwrap();
        std::fs::write(dir.join("k.pem"), KEY).unwrap();
        let section = TlsSection {
            enabled: true,
            cert_file: dir.join("c.pem"),
            key_file: dir.join("k.pem"),
            ..TlsSection::default()
        };
        let ctx = TlsContext::new(&section).unwrap().0;
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(CERT.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Fixture {
            server: ctx.config.clone(),
            client: Arc::new(client),
        }
    })
}

fn established() -> TlsSession {
    let f = fixture();
    let mut s = TlsSession::new(f.server.clone()).unwrap();
    let mut c =
        rustls::ClientConnection::new(f.client.clone(), "localhost".try_into().unwrap()).unwrap();
    let (mut plain, mut wire) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).unwrap();
        }
        if !out.is_empty() {
            s.handle_input(&mut out, &mut plain, &mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
        wire.clear();
        if s.is_established() && !c.is_handshaking() && !c.wants_write() {
            break;
        }
    }
    assert!(s.is_established());
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cut = rest.first().map_or(0, |b| *b as usize).min(rest.len());
    let (mut plain, mut wire) = (Vec::new(), Vec::new());
    if mode & 1 == 0 {
        let mut s = TlsSession::new(fixture().server.clone()).unwrap();
        let (mut a, mut b) = (rest[..cut].to_vec(), rest[cut..].to_vec());
        if s.handle_input(&mut a, &mut plain, &mut wire).is_ok() {
            let _ = s.handle_input(&mut b, &mut plain, &mut wire);
        }
        // Nothing decrypts before a handshake.
        assert!(plain.is_empty());
    } else {
        let mut s = established();
        assert!(s.is_offloaded());
        let (mut a, mut b) = (rest[..cut].to_vec(), rest[cut..].to_vec());
        if s.handle_input(&mut a, &mut plain, &mut wire).is_ok() {
            let _ = s.handle_input(&mut b, &mut plain, &mut wire);
        }
        // The fuzzer cannot forge an authenticated record.
        assert!(plain.is_empty());
    }
});
