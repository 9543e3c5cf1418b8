//! The connection state machine fed an arbitrary byte stream, frame by frame, as the shard
//! does: never a panic, a fatal step ends the stream, and no login succeeds (the fuzzer does
//! not know the key, so a login would be a forged token), so no command is ever carried out.
#![no_main]

use gatehouse::auth::TokenKeys;
use gatehouse::proto::split_frame;
use gatehouse::session::{Handshake, Phase, SessionParams, Step};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let params = SessionParams {
        keys: TokenKeys::new([7u8; 32], None),
        max_frame_bytes: 64 * 1024,
        idle_timeout_ms: 300_000,
        login_timeout_ms: 10_000,
        node_id: 0,
        nodes: 1,
    };
    let mut hs = Handshake::new(0);
    let mut off = 0;
    let mut now = 1_700_000_000_000u64;
    while off < data.len() {
        let max = match hs.phase() {
            Phase::AwaitHello | Phase::AwaitLogin => 1024,
            _ => params.max_frame_bytes,
        };
        let raw = match split_frame(&data[off..], max) {
            Ok(Some(raw)) => raw,
            _ => break,
        };
        off += raw.total_bytes;
        now += 1;
        let before = hs.phase();
        match hs.handle_frame(raw.frame_type, raw.payload, now, &params) {
            Step::Fatal(_) => {
                assert!(matches!(hs.phase(), Phase::Closed));
                break;
            }
            Step::LoggedIn { user, .. } => panic!("user {user} logged in without a valid token"),
            Step::Command(_) => panic!("a command before login (phase {before:?})"),
            Step::Reply(_) => {}
        }
    }
});
