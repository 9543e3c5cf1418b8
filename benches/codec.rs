//! Micro-benchmarks of the wire codec: decoding client frames and encoding deliveries.
//!
//! `cargo bench --bench codec`

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use gatehouse::ids::{DeviceId, ServerMsgId, UserId};
use gatehouse::proto::{deliver_header, split_frame, ClientFrame};

fn bench(c: &mut Criterion) {
    let mut wire = BytesMut::new();
    for i in 0..64u64 {
        ClientFrame::Send {
            client_msg_id: i,
            recipient: UserId(i + 1),
            body: Bytes::from(vec![7u8; 100]),
        }
        .encode(&mut wire);
    }
    let wire = wire.freeze();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(64));
    g.bench_function("decode_64_sends_100B", |b| {
        b.iter(|| {
            let mut rest = &wire[..];
            while let Some(raw) = split_frame(rest, 65536).unwrap() {
                black_box(ClientFrame::decode(raw.frame_type, raw.payload).unwrap());
                rest = &rest[raw.total_bytes..];
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("deliver_header", |b| {
        b.iter(|| {
            black_box(deliver_header(
                ServerMsgId(black_box(1)),
                UserId(2),
                DeviceId(3),
                4,
                100,
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
