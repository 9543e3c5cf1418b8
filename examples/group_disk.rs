//! Measures what group messages cost on disk, with bodies shared once per shard (group
//! messages of `limits::GROUP_BODY_SHARED_MIN_BYTES` or more) against one copy per member
//! (what a one-to-one message to each member would store).
//!
//! Opens two real LMDB stores in a temporary directory, appends `--messages` messages of
//! `--body` bytes to `--members` offline members (the members one shard owns), one commit per
//! message as the gateway's fan-out does, and reports the B-tree bytes each store uses
//! (`Store::stats`) and the commit time per message. Then every member acknowledges
//! every message, and the bytes left are reported (the shared bodies go with their last
//! reference).
//!
//! ```text
//! cargo run --release --example group_disk -- --members 256 --messages 1000 --body 1024
//! ```

use std::time::Instant;

use bytes::Bytes;
use gatehouse::config::SyncPolicy;
use gatehouse::ids::{DeviceId, ServerMsgId, ShardId, UserId};
use gatehouse::store::{Item, Op, QueueLimits, Store};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                eprintln!("group_disk: {name} needs a number");
                std::process::exit(2)
            }),
        None => default,
    }
}

struct Run {
    bytes_full: u64,
    bytes_after_acks: u64,
    us_per_message: f64,
    ns_per_ack: f64,
}

fn run(dir: &std::path::Path, shared: bool, members: u64, messages: u64, body: usize) -> Run {
    // Room for the copied case, with margin for partly filled pages and copy-on-write; the
    // file is sparse.
    let map_mib = (3 * members * messages * (body as u64 + 256) / (1 << 20) + 64) as usize;
    let store = Store::open(dir, ShardId(0), 1, map_mib, SyncPolicy::None)
        .expect("open store")
        .store;
    let limits = QueueLimits {
        messages_max: u32::MAX,
        receipts_max: u32::MAX,
    };
    let body = Bytes::from(vec![0xA5u8; body]);
    let start = Instant::now();
    let mut next_id = 1u64;
    for m in 0..messages {
        let msg_id = ServerMsgId(1_000_000 + m);
        let item = if shared {
            Item::GroupMessage {
                group: 7,
                msg_id,
                sender: UserId(1),
                sender_device: DeviceId(1),
                ts_ms: m,
                body: body.clone(),
            }
        } else {
            Item::Message {
                sender: UserId(1),
                sender_device: DeviceId(1),
                ts_ms: m,
                body: body.clone(),
            }
        };
        let ops: Vec<Op> = (0..members)
            .map(|u| {
                next_id += 1;
                Op::Append {
                    user: UserId(100 + u),
                    id: ServerMsgId(next_id),
                    item: item.clone(),
                }
            })
            .collect();
        store.apply(&ops, limits).expect("append");
    }
    let us_per_message = start.elapsed().as_secs_f64() * 1e6 / messages as f64;
    store.sync().expect("sync");
    let bytes_full = store.stats().expect("stat").stored_bytes;
    // Every member reads and acknowledges everything, one commit per member.
    let acks = Instant::now();
    for u in 0..members {
        let user = UserId(100 + u);
        let ids: Vec<Op> = store
            .read_queue(user, None, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|(id, _)| Op::Delete { user, id })
            .collect();
        assert_eq!(ids.len() as u64, messages, "every message queued");
        store.apply(&ids, limits).expect("delete");
    }
    let ns_per_ack = acks.elapsed().as_secs_f64() * 1e9 / (members * messages) as f64;
    let bytes_after_acks = store.stats().expect("stat").stored_bytes;
    Run {
        bytes_full,
        bytes_after_acks,
        us_per_message,
        ns_per_ack,
    }
}

fn main() {
    let members = arg("--members", 256);
    let messages = arg("--messages", 1000);
    let body = arg("--body", 1024) as usize;
    println!(
        "{members} members x {messages} messages of {body} B (shared when >= {} B)",
        gatehouse::limits::GROUP_BODY_SHARED_MIN_BYTES
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut results = Vec::new();
    for (name, shared) in [("shared", true), ("copied", false)] {
        let dir = tmp.path().join(name);
        let r = run(&dir, shared, members, messages, body);
        let per = r.bytes_full as f64 / (members * messages) as f64;
        println!(
            "{name:7} {:>12} B stored ({per:.0} B per member-delivery), {:>9} B after every ack, {:.0} us per message commit, {:.0} ns per read and ack",
            r.bytes_full, r.bytes_after_acks, r.us_per_message, r.ns_per_ack
        );
        results.push(r.bytes_full);
    }
    println!(
        "shared / copied: {:.3}",
        results[0] as f64 / results[1] as f64
    );
}
