//! Micro-benchmark of one shard's store in the group fan-out shape: each commit appends a
//! batch of group-message items to online members' queues and deletes the previous batch
//! (their acknowledgements), as `Store::apply` sees it under `loadgen groups`. Two shapes:
//! `fan_out_commit_*`, 6 messages each to all 5,120 members of the shard, and
//! `groups_commit_*`, 25 messages spread over 40 groups of 128 members on the shard (the
//! gateway's average commit in that run held about 6,300 ops). Real LMDB files
//! in a temporary directory (tmpfs where there is one); commits write the page cache
//! (`sync = none`: the fsync runs beside the commit in the gateway, see docs/architecture.md,
//! Group commit).
//!
//! `cargo bench --bench store`

use std::cell::Cell;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gatehouse::config::SyncPolicy;
use gatehouse::ids::{DeviceId, ServerMsgId, ShardId, UserId};
use gatehouse::store::{Item, Op, QueueLimits, Store};

/// Members on this shard: 40 groups of 256 over 2 shards, as in docs/benchmarks.md.
const MEMBERS: u64 = 5_120;
/// Group messages per commit: 6 × 5,120 member items and as many deletes, 61,440 ops (the
/// gateway commits at most 65,536).
const MESSAGES_PER_COMMIT: u64 = 6;

fn fan_out(first_msg: u64, body: &Bytes) -> Vec<Op> {
    let mut ops = Vec::with_capacity((MEMBERS * MESSAGES_PER_COMMIT) as usize);
    for m in first_msg..first_msg + MESSAGES_PER_COMMIT {
        for u in 0..MEMBERS {
            ops.push(Op::Append {
                user: UserId(u * 2 + 1),
                id: ServerMsgId(m),
                item: Item::GroupMessage {
                    group: m % 40,
                    msg_id: ServerMsgId(m),
                    sender: UserId(7),
                    sender_device: DeviceId(1),
                    ts_ms: 1_700_000_000_000,
                    body: body.clone(),
                },
            });
        }
    }
    ops
}

/// Groups in the `groups_commit` shape, members of each on this shard, messages per commit.
const GROUPS: u64 = 40;
const GROUP_MEMBERS_HERE: u64 = 128;
const GROUP_MESSAGES_PER_COMMIT: u64 = 25;

/// Member `k` on this shard of group `g`: the loadgen gives each group consecutive user ids,
/// and about every other one is owned by this shard.
fn member(g: u64, k: u64) -> UserId {
    UserId(g * 256 + 2 * k + 1)
}

/// One commit of the `groups_commit` shape: messages `first..first + 25` appended (message
/// `m` to group `m % 40`), and those of the commit two before deleted: acknowledgements lag,
/// so members hold some items.
fn groups_commit(first: u64, body: &Bytes) -> Vec<Op> {
    let members = |m: u64| (0..GROUP_MEMBERS_HERE).map(move |k| member(m % GROUPS, k));
    let mut ops = Vec::with_capacity((2 * GROUP_MEMBERS_HERE * GROUP_MESSAGES_PER_COMMIT) as usize);
    for m in first..first + GROUP_MESSAGES_PER_COMMIT {
        ops.extend(members(m).map(|user| Op::Append {
            user,
            id: ServerMsgId(m),
            item: Item::GroupMessage {
                group: m % GROUPS,
                msg_id: ServerMsgId(m),
                sender: UserId(7),
                sender_device: DeviceId(1),
                ts_ms: 1_700_000_000_000,
                body: body.clone(),
            },
        }));
    }
    let acked = first.saturating_sub(3 * GROUP_MESSAGES_PER_COMMIT);
    for m in acked..acked.max(first.saturating_sub(2 * GROUP_MESSAGES_PER_COMMIT)) {
        ops.extend(members(m).map(|user| Op::Delete {
            user,
            id: ServerMsgId(m),
        }));
    }
    ops
}

fn acks(first_msg: u64) -> impl Iterator<Item = Op> {
    (first_msg..first_msg + MESSAGES_PER_COMMIT).flat_map(|m| {
        (0..MEMBERS).map(move |u| Op::Delete {
            user: UserId(u * 2 + 1),
            id: ServerMsgId(m),
        })
    })
}

/// On tmpfs where there is one (`/dev/shm`), so that the disk's writeback does not add its noise
/// to a measure of the commit's CPU; elsewhere in the system's temporary directory.
fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir")
}

/// A new store (kept while the directory lives) and a body of `body_bytes`.
fn store_and_body(body_bytes: usize) -> (tempfile::TempDir, Store, Bytes) {
    let dir = temp_dir();
    let store = Store::open(dir.path(), ShardId(0), 1, 1024, SyncPolicy::None)
        .expect("open store")
        .store;
    (dir, store, Bytes::from(vec![0x5a; body_bytes]))
}

fn bench(c: &mut Criterion) {
    let limits = QueueLimits {
        messages_max: 10_000,
        receipts_max: 10_000,
    };
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    g.throughput(Throughput::Elements(MEMBERS * MESSAGES_PER_COMMIT));
    // 64 B bodies stay inline in each member's item; 1 KiB bodies are stored once per shard.
    for body_bytes in [64usize, 1024] {
        let (_dir, store, body) = store_and_body(body_bytes);
        let next = Cell::new(1u64);
        store
            .apply(&fan_out(0, &body), limits)
            .expect("first batch");
        g.bench_function(format!("fan_out_commit_body_{body_bytes}B"), |b| {
            b.iter_batched(
                || {
                    let m = next.get() * MESSAGES_PER_COMMIT;
                    next.set(next.get() + 1);
                    let mut ops = fan_out(m, &body);
                    ops.extend(acks(m - MESSAGES_PER_COMMIT));
                    ops
                },
                |ops| store.apply(&ops, limits).expect("apply"),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
    let mut g = c.benchmark_group("store");
    g.sample_size(50);
    g.throughput(Throughput::Elements(
        GROUP_MEMBERS_HERE * GROUP_MESSAGES_PER_COMMIT,
    ));
    for body_bytes in [64usize, 1024] {
        let (_dir, store, body) = store_and_body(body_bytes);
        // Every group's members hold a few unacknowledged items, as online members do.
        let mut next = 0;
        while next < 4 * GROUPS {
            store
                .apply(&groups_commit(next, &body), limits)
                .expect("warm-up");
            next += GROUP_MESSAGES_PER_COMMIT;
        }
        let next = Cell::new(next);
        g.bench_function(format!("groups_commit_body_{body_bytes}B"), |b| {
            b.iter_batched(
                || {
                    let m = next.get();
                    next.set(m + GROUP_MESSAGES_PER_COMMIT);
                    groups_commit(m, &body)
                },
                |ops| store.apply(&ops, limits).expect("apply"),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
