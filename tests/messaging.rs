//! End-to-end messaging over real loopback sockets and real LMDB directories.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use gatehouse::ids::{ServerMsgId, UserId};
use gatehouse::proto::{ClientFrame, GoAwayReason, ReceiptKind, ServerFrame};

#[test]
fn online_delivery_and_receipts_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let a = user_on_shard(1000, 0, 2);
    let b = user_on_shard(1000, 1, 2);
    let mut ca = login(server.local_addr, a, 1);
    let mut cb = login(server.local_addr, b, 1);

    ca.send_message(7, UserId(b), b"hello across shards")
        .unwrap();
    let sid = expect_send_ack(&mut ca, 7);
    let (id, sender, body) = expect_deliver(&mut cb);
    assert_eq!(
        (id, sender, body.as_slice()),
        (sid, UserId(a), &b"hello across shards"[..])
    );

    cb.ack(&[id]).unwrap();
    cb.send(&ClientFrame::Read {
        sender: UserId(a),
        ids: vec![id],
    })
    .unwrap();
    let mut receipts = Vec::new();
    for _ in 0..2 {
        match ca.recv_frame().unwrap() {
            ServerFrame::Receipt {
                receipt_id,
                kind,
                from,
                server_msg_id,
                ..
            } => {
                assert_eq!((from, server_msg_id), (UserId(b), sid));
                receipts.push((receipt_id, kind));
            }
            other => panic!("expected RECEIPT, got {other:?}"),
        }
    }
    // The delivered receipt waits for the delete to commit, so the read receipt may come
    // first (protocol.md 9.5); both must come, once each.
    let mut kinds: Vec<u8> = receipts.iter().map(|r| r.1 as u8).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![ReceiptKind::Delivered as u8, ReceiptKind::Read as u8]
    );
    ca.ack(&receipts.iter().map(|r| r.0).collect::<Vec<_>>())
        .unwrap();
    // Acknowledged receipts go away once their deletes commit (asynchronously: a reconnect
    // right after the ACK may still see them once, at-least-once). Within a bound, a new
    // session of `a` finds nothing queued, and anything redelivered meanwhile is one of the
    // acknowledged receipts, never something new.
    ca.send(&ClientFrame::Ping { nonce: 1 }).unwrap();
    assert_eq!(ca.recv_frame().unwrap(), ServerFrame::Pong { nonce: 1 });
    drop(ca);
    let acked: Vec<_> = receipts.iter().map(|r| r.0).collect();
    let mut clean = false;
    for attempt in 0..50u64 {
        let mut ca2 = login(server.local_addr, a, 1);
        ca2.send(&ClientFrame::Ping { nonce: attempt }).unwrap();
        match ca2.recv_frame().unwrap() {
            ServerFrame::Pong { .. } => {
                clean = true;
                break;
            }
            ServerFrame::Receipt { receipt_id, .. } => {
                assert!(
                    acked.contains(&receipt_id),
                    "unexpected receipt {receipt_id:?}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        clean,
        "acknowledged receipts were still redelivered after 50 reconnects"
    );
    server.shutdown().unwrap();
}

#[test]
fn same_shard_and_self_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let a = user_on_shard(1, 0, 2);
    let b = user_on_shard(a + 1, 0, 2);
    let mut ca = login(server.local_addr, a, 1);
    let mut cb = login(server.local_addr, b, 1);
    ca.send_message(1, UserId(b), b"same shard").unwrap();
    let sid = expect_send_ack(&mut ca, 1);
    assert_eq!(expect_deliver(&mut cb).0, sid);
    ca.send_message(2, UserId(a), b"note to self").unwrap();
    // Own message comes back as a delivery; order of ack and delivery may vary.
    let mut got_ack = false;
    let mut got_deliver = false;
    while !(got_ack && got_deliver) {
        match ca.recv_frame().unwrap() {
            ServerFrame::SendAck {
                client_msg_id: 2, ..
            } => got_ack = true,
            ServerFrame::Deliver { body, .. } => {
                assert_eq!(&body[..], b"note to self");
                got_deliver = true
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    server.shutdown().unwrap();
}

#[test]
fn hand_over_moves_logins_to_the_owner_shard_with_pipelined_frames() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let target = user_on_shard(5000, 1, 2);
    let mut rx = login(server.local_addr, target, 1);
    // Many users, each pipelining HELLO, LOGIN and a SEND in one write: about half are
    // accepted on the non-owner shard and must carry the SEND across the hand-over.
    let users: Vec<u64> = (100..140).collect();
    let mut clients = Vec::new();
    for &u in &users {
        let mut c = gatehouse::client::Client::connect(server.local_addr, TIMEOUT).unwrap();
        let mut buf = bytes::BytesMut::new();
        ClientFrame::Hello {
            magic: *b"GHSE",
            min_version: 1,
            max_version: 1,
        }
        .encode(&mut buf);
        ClientFrame::Login {
            user: UserId(u),
            device: gatehouse::ids::DeviceId(1),
            token: token(u, 1).into_bytes().into(),
        }
        .encode(&mut buf);
        ClientFrame::Send {
            client_msg_id: u,
            recipient: UserId(target),
            body: u.to_be_bytes().to_vec().into(),
        }
        .encode(&mut buf);
        c.send_raw(&buf).unwrap();
        clients.push((u, c));
    }
    for (u, c) in clients.iter_mut() {
        assert!(matches!(
            c.recv_frame().unwrap(),
            ServerFrame::HelloOk { .. }
        ));
        assert!(matches!(
            c.recv_frame().unwrap(),
            ServerFrame::LoginOk { .. }
        ));
        expect_send_ack(c, *u);
    }
    let mut senders = Vec::new();
    let mut ids = Vec::new();
    for _ in &users {
        let (id, sender, body) = expect_deliver(&mut rx);
        assert_eq!(body, sender.0.to_be_bytes());
        senders.push(sender.0);
        ids.push(id);
    }
    senders.sort();
    assert_eq!(senders, users);
    let handovers: u64 = server
        .pulses()
        .iter()
        .map(|p| p.handovers_in.load(Ordering::Relaxed))
        .sum();
    assert!(
        handovers > 0,
        "no connection was handed over; the test did not exercise hand-over"
    );
    // Handed-over connections keep working in both directions.
    for (u, c) in clients.iter_mut() {
        c.send(&ClientFrame::Ping { nonce: *u }).unwrap();
        assert_eq!(c.recv_frame().unwrap(), ServerFrame::Pong { nonce: *u });
    }
    rx.ack(&ids[..10]).unwrap();
    server.shutdown().unwrap();
}

#[test]
fn offline_queue_drains_in_order_through_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.limits.delivery_window = 8;
    let server = start(c);
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let mut ca = login(server.local_addr, a, 1);
    const N: u64 = 300;
    for i in 0..N {
        ca.send_message(i, UserId(b), &i.to_be_bytes()).unwrap();
    }
    let acked: Vec<ServerMsgId> = (0..N).map(|i| expect_send_ack(&mut ca, i)).collect();
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "server ids increase per pair"
    );

    let mut cb = login(server.local_addr, b, 1);
    let mut got = Vec::new();
    while got.len() < N as usize {
        // Without ACKs the window caps what is in flight.
        let mut batch = Vec::new();
        for _ in 0..8.min(N as usize - got.len()) {
            batch.push(expect_deliver(&mut cb));
        }
        cb.set_timeout(std::time::Duration::from_millis(200))
            .unwrap();
        assert!(
            cb.recv_frame().is_err(),
            "more than the window was delivered without ACKs"
        );
        cb.set_timeout(TIMEOUT).unwrap();
        cb.ack(&batch.iter().map(|d| d.0).collect::<Vec<_>>())
            .unwrap();
        got.extend(batch);
    }
    let bodies: Vec<u64> = got
        .iter()
        .map(|d| u64::from_be_bytes(d.2.clone().try_into().unwrap()))
        .collect();
    assert_eq!(
        bodies,
        (0..N).collect::<Vec<_>>(),
        "order per sender and recipient is kept"
    );
    assert_eq!(got.iter().map(|d| d.0).collect::<Vec<_>>(), acked);
    server.shutdown().unwrap();
}

/// Small bodies are copied into the connection's own output and large ones are queued shared
/// (`limits::COPIED_BODY_BYTES_MAX`); a window that mixes both, including an empty body and
/// bodies at the bound, arrives whole and in order.
#[test]
fn copied_and_shared_bodies_arrive_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let bound = gatehouse::limits::COPIED_BODY_BYTES_MAX;
    let sizes = [
        0,
        1,
        100,
        bound - 1,
        bound,
        bound + 1,
        4000,
        3,
        60_000,
        7,
        bound,
        20_000,
        0,
        5,
    ];
    let body = |i: usize, n: usize| -> Vec<u8> { (0..n).map(|k| (i * 31 + k) as u8).collect() };
    let mut ca = login(server.local_addr, a, 1);
    for (i, &n) in sizes.iter().enumerate() {
        ca.send_message(i as u64, UserId(b), &body(i, n)).unwrap();
        expect_send_ack(&mut ca, i as u64);
    }
    // All queued before b logs in, so the first window goes out in one burst of writes.
    let mut cb = login(server.local_addr, b, 1);
    let mut ids = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let (id, from, got) = expect_deliver(&mut cb);
        assert_eq!(from, UserId(a));
        assert_eq!(got.len(), n, "message {i}: body length");
        assert_eq!(got, body(i, n), "message {i}: body bytes");
        ids.push(id);
    }
    cb.ack(&ids).unwrap();
    // And live, while b is online: the same mix, delivered as it commits.
    for (i, &n) in sizes.iter().enumerate() {
        let i = i + sizes.len();
        ca.send_message(i as u64, UserId(b), &body(i, n)).unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let i = i + sizes.len();
        let (id, _, got) = expect_deliver(&mut cb);
        assert_eq!(got, body(i, n), "live message {i}");
        cb.ack(&[id]).unwrap();
    }
    server.shutdown().unwrap();
}

#[test]
fn queued_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (user_on_shard(1, 1, 2), user_on_shard(1, 0, 2));
    let ids: Vec<ServerMsgId> = {
        let server = start(config(dir.path()));
        let mut ca = login(server.local_addr, a, 1);
        let ids = (0..20).map(|i| {
            ca.send_message(i, UserId(b), format!("m{i}").as_bytes())
                .unwrap();
            expect_send_ack(&mut ca, i)
        });
        let ids = ids.collect();
        server.shutdown().unwrap();
        ids
    };
    let server = start(config(dir.path()));
    let mut cb = login(server.local_addr, b, 1);
    for (i, id) in ids.iter().enumerate() {
        let (got, sender, body) = expect_deliver(&mut cb);
        assert_eq!(
            (got, sender, body),
            (*id, UserId(a), format!("m{i}").into_bytes())
        );
        cb.ack(&[got]).unwrap();
    }
    // New ids after the restart sort after the old ones (new epoch).
    let mut ca = login(server.local_addr, a, 1);
    ca.send_message(99, UserId(b), b"after restart").unwrap();
    // Delivered receipts for the 20 messages are queued for `a` too; skip them.
    let new_id = expect_frame(&mut ca, |f| match f {
        ServerFrame::SendAck {
            client_msg_id: 99,
            server_msg_id,
            ..
        } => Some(*server_msg_id),
        ServerFrame::Receipt {
            kind: ReceiptKind::Delivered,
            ..
        } => None,
        other => panic!("unexpected {other:?}"),
    });
    assert!(new_id > *ids.last().unwrap());
    server.shutdown().unwrap();
}

#[test]
fn unacked_deliveries_are_redelivered_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let mut ca = login(server.local_addr, a, 1);
    let mut cb = login(server.local_addr, b, 1);
    ca.send_message(1, UserId(b), b"one").unwrap();
    let sid = expect_send_ack(&mut ca, 1);
    assert_eq!(expect_deliver(&mut cb).0, sid);
    drop(cb); // no ACK
    let mut cb = login(server.local_addr, b, 1);
    assert_eq!(
        expect_deliver(&mut cb).0,
        sid,
        "at-least-once: unacked message comes again"
    );
    server.shutdown().unwrap();
}

#[test]
fn duplicate_login_replaces_the_older_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let u = user_on_shard(1, 1, 2);
    let mut first = login(server.local_addr, u, 3);
    let mut other_device = login(server.local_addr, u, 4);
    let _second = login(server.local_addr, u, 3);
    match first.recv_frame().unwrap() {
        ServerFrame::GoAway { reason, .. } => assert_eq!(reason, GoAwayReason::Replaced),
        other => panic!("expected GO_AWAY(replaced), got {other:?}"),
    }
    expect_closed(&mut first);
    other_device.send(&ClientFrame::Ping { nonce: 9 }).unwrap();
    assert_eq!(
        other_device.recv_frame().unwrap(),
        ServerFrame::Pong { nonce: 9 },
        "other devices stay"
    );
    server.shutdown().unwrap();
}

#[test]
fn full_queue_refuses_with_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.limits.queue_messages_max = 5;
    let server = start(c);
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let mut ca = login(server.local_addr, a, 1);
    for i in 0..5 {
        ca.send_message(i, UserId(b), b"x").unwrap();
        expect_send_ack(&mut ca, i);
    }
    ca.send_message(5, UserId(b), b"x").unwrap();
    let msg = expect_error(&mut ca, gatehouse::proto::ErrorCode::QueueFull);
    assert!(msg.contains("full"), "{msg}");
    // The connection stays usable and the five accepted messages are all there.
    let mut cb = login(server.local_addr, b, 1);
    let ids: Vec<_> = (0..5).map(|_| expect_deliver(&mut cb).0).collect();
    cb.ack(&ids).unwrap();
    cb.send(&ClientFrame::Ping { nonce: 0 }).unwrap();
    assert_eq!(cb.recv_frame().unwrap(), ServerFrame::Pong { nonce: 0 });
    ca.send_message(6, UserId(b), b"x").unwrap();
    expect_send_ack(&mut ca, 6);
    server.shutdown().unwrap();
}

#[test]
fn large_queued_messages_drain_within_the_outbound_limit() {
    // 20 bodies of 60 KB queued, outbound limit 128 KiB: the window (64) would put 1.2 MB in
    // flight; deliveries must pause for room instead of closing the device as a slow consumer.
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.limits.outbound_bytes_max = 128 * 1024;
    let server = start(c);
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let mut ca = login(server.local_addr, a, 1);
    for i in 0..20u64 {
        ca.send_message(i, UserId(b), &vec![i as u8; 60_000])
            .unwrap();
        expect_send_ack(&mut ca, i);
    }
    let mut cb = login(server.local_addr, b, 1);
    for i in 0..20u8 {
        let (id, _, body) = expect_deliver(&mut cb);
        assert_eq!((body.len(), body[0]), (60_000, i));
        cb.ack(&[id]).unwrap();
    }
    server.shutdown().unwrap();
}

#[test]
fn half_closed_client_still_gets_its_acks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let mut ca = login(server.local_addr, a, 1);
    for i in 0..50 {
        ca.send_message(i, UserId(b), b"then EOF").unwrap();
    }
    ca.stream().shutdown(std::net::Shutdown::Write).unwrap();
    for i in 0..50 {
        expect_send_ack(&mut ca, i);
    }
    server.shutdown().unwrap();
}

#[test]
fn one_delivered_receipt_per_message_with_two_devices() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let (a, b) = (user_on_shard(1, 0, 2), user_on_shard(1, 1, 2));
    let mut ca = login(server.local_addr, a, 1);
    let mut phone = login(server.local_addr, b, 1);
    let mut laptop = login(server.local_addr, b, 2);
    ca.send_message(1, UserId(b), b"to both devices").unwrap();
    let sid = expect_send_ack(&mut ca, 1);
    assert_eq!(expect_deliver(&mut phone).0, sid);
    assert_eq!(expect_deliver(&mut laptop).0, sid);
    phone.ack(&[sid]).unwrap();
    laptop.ack(&[sid]).unwrap();
    match ca.recv_frame().unwrap() {
        ServerFrame::Receipt {
            kind: ReceiptKind::Delivered,
            server_msg_id,
            ..
        } => assert_eq!(server_msg_id, sid),
        other => panic!("{other:?}"),
    }
    ca.set_timeout(std::time::Duration::from_millis(300))
        .unwrap();
    assert!(
        ca.recv_frame().is_err(),
        "a second delivered receipt arrived"
    );
    server.shutdown().unwrap();
}

#[test]
fn back_pressure_pauses_and_resumes_readers() {
    // A tiny pending-ops bound makes every burst hit back-pressure many times; every send must
    // still be answered (readers parked while the store catches up must be woken again).
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.limits.pending_ops_max = 8;
    let server = start(c);
    let mut senders: Vec<_> = (0..4)
        .map(|i| login(server.local_addr, 100 + i, 1))
        .collect();
    for (i, s) in senders.iter_mut().enumerate() {
        for n in 0..400u64 {
            s.send_message(n, UserId(200 + i as u64), b"burst").unwrap();
        }
    }
    for s in senders.iter_mut() {
        for n in 0..400u64 {
            expect_send_ack(s, n);
        }
    }
    let mut r = login(server.local_addr, 200, 1);
    for _ in 0..400 {
        let (id, _, _) = expect_deliver(&mut r);
        r.ack(&[id]).unwrap();
    }
    server.shutdown().unwrap();
}
