//! The frame splitter and both decoders on arbitrary bytes: never a panic, and every frame a
//! decoder accepts encodes back to a frame that decodes to the same value.
#![no_main]

use bytes::BytesMut;
use gatehouse::proto::{split_frame, ClientFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut off = 0;
    while off < data.len() {
        match split_frame(&data[off..], 64 * 1024) {
            Ok(Some(raw)) => {
                off += raw.total_bytes;
                if let Ok(f) = ClientFrame::decode(raw.frame_type, raw.payload) {
                    let mut b = BytesMut::new();
                    f.encode(&mut b);
                    let again = split_frame(&b, 64 * 1024).unwrap().unwrap();
                    assert_eq!(ClientFrame::decode(again.frame_type, again.payload).unwrap(), f);
                }
                if let Ok(f) = ServerFrame::decode(raw.frame_type, raw.payload) {
                    let mut b = BytesMut::new();
                    f.encode(&mut b);
                    let again = split_frame(&b, 64 * 1024).unwrap().unwrap();
                    assert_eq!(ServerFrame::decode(again.frame_type, again.payload).unwrap(), f);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
