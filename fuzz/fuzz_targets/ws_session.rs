//! The WebSocket server side on arbitrary bytes, split at an arbitrary point: never a panic,
//! and the bytes it holds between reads stay within their documented bounds.
#![no_main]

use gatehouse::transport::ws::{WsSession, UPGRADE_HEAD_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn feed(ws: &mut WsSession, data: &[u8], cut: usize) {
    let (mut app, mut reply) = (Vec::new(), Vec::new());
    let cut = cut.min(data.len());
    for part in [&data[..cut], &data[cut..]] {
        if ws.handle_input(part, &mut app, &mut reply).is_err() {
            return;
        }
        assert!(
            ws.held_bytes() <= UPGRADE_HEAD_BYTES_MAX + 1,
            "held {}",
            ws.held_bytes()
        );
        if ws.is_open() {
            // After the upgrade only a split header (14) or a control payload (125) waits.
            assert!(ws.held_bytes() <= 125, "held {}", ws.held_bytes());
        }
    }
    assert!(app.len() <= data.len());
}

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| *b as usize);
    // From the start (the upgrade request is fuzzed too) ...
    feed(&mut WsSession::new(), data, cut);
    // ... and after a valid upgrade (frames are fuzzed).
    let mut ws = WsSession::new();
    let (mut app, mut reply) = (Vec::new(), Vec::new());
    ws.handle_input(UPGRADE, &mut app, &mut reply).unwrap();
    assert!(ws.is_open());
    feed(&mut ws, data, cut);
});
