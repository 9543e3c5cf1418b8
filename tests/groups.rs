//! Group chat end to end: membership with roles and caps, fan-out across shards with the
//! durability contract, events in order with messages, persistence, bad input.

mod common;

use common::*;
use gatehouse::client::Client;
use gatehouse::ids::{ServerMsgId, UserId};
use gatehouse::proto::{ClientFrame, ErrorCode, GroupOp, GroupRole, ServerFrame};

fn group(c: &mut Client, request_id: u64, g: u64, op: GroupOp, users: &[u64]) {
    c.send(&ClientFrame::Group {
        request_id,
        group: g,
        op,
        users: users.iter().map(|u| UserId(*u)).collect(),
    })
    .unwrap();
}

/// Reads until GROUP_OK for `request_id`, ACKing group events on the way; returns the list.
fn expect_ok(c: &mut Client, request_id: u64) -> Vec<(UserId, GroupRole)> {
    loop {
        match c.recv_frame().unwrap() {
            ServerFrame::GroupOk {
                request_id: r,
                members,
                ..
            } if r == request_id => return members,
            ServerFrame::GroupEvent { server_msg_id, .. } => c.ack(&[server_msg_id]).unwrap(),
            ServerFrame::GroupReceipt { receipt_id, .. } => c.ack(&[receipt_id]).unwrap(),
            ServerFrame::Presence { .. } => {}
            other => panic!("expected GROUP_OK {request_id}, got {other:?}"),
        }
    }
}

/// The next frame that is not a GROUP_EVENT (events on the way are ACKed: an actor is a member
/// and gets its own events, in any order with its answers).
fn next_non_event(c: &mut Client) -> ServerFrame {
    loop {
        match c.recv_frame().unwrap() {
            ServerFrame::GroupEvent { server_msg_id, .. } => c.ack(&[server_msg_id]).unwrap(),
            other => return other,
        }
    }
}

/// The next frame that is neither a GROUP_EVENT nor a GROUP_RECEIPT (both ACKed on the way).
fn next_answer(c: &mut Client) -> ServerFrame {
    loop {
        match next_non_event(c) {
            ServerFrame::GroupReceipt { receipt_id, .. } => c.ack(&[receipt_id]).unwrap(),
            other => return other,
        }
    }
}

fn expect_err(c: &mut Client, code: ErrorCode, ref_id: u64) -> String {
    match next_answer(c) {
        ServerFrame::Error {
            code: got,
            fatal,
            ref_id: r,
            message,
        } => {
            assert_eq!(
                (got, fatal, r),
                (code as u16, code.is_fatal(), ref_id),
                "{message}"
            );
            message
        }
        other => panic!("expected ERROR {code:?}, got {other:?}"),
    }
}

fn expect_ack(c: &mut Client, client_msg_id: u64) {
    match next_answer(c) {
        ServerFrame::SendAck {
            client_msg_id: got, ..
        } => assert_eq!(got, client_msg_id),
        other => panic!("expected SEND_ACK {client_msg_id}, got {other:?}"),
    }
}

/// The next GROUP_EVENT (ACKed): (op, actor, users).
fn expect_event(c: &mut Client) -> (GroupOp, u64, Vec<u64>) {
    match c.recv_frame().unwrap() {
        ServerFrame::GroupEvent {
            server_msg_id,
            op,
            actor,
            users,
            ..
        } => {
            c.ack(&[server_msg_id]).unwrap();
            (op, actor.0, users.iter().map(|u| u.0).collect())
        }
        other => panic!("expected GROUP_EVENT, got {other:?}"),
    }
}

/// The next GROUP_DELIVER (ACKed): (group, sender, body).
fn expect_group_message(c: &mut Client) -> (u64, u64, Vec<u8>) {
    match c.recv_frame().unwrap() {
        ServerFrame::GroupDeliver {
            server_msg_id,
            group,
            sender,
            body,
            ..
        } => {
            c.ack(&[server_msg_id]).unwrap();
            (group, sender.0, body.to_vec())
        }
        other => panic!("expected GROUP_DELIVER, got {other:?}"),
    }
}

fn group_send(c: &mut Client, client_msg_id: u64, g: u64, body: &[u8]) {
    c.send(&ClientFrame::GroupSend {
        client_msg_id,
        group: g,
        body: body.to_vec().into(),
    })
    .unwrap();
}

#[test]
fn a_group_message_reaches_every_member_across_shards_before_its_ack() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path()));
    let addr = node.local_addr;
    let (a, b, c) = (
        user_on_shard(100, 0, 2),
        user_on_shard(100, 1, 2),
        user_on_shard(200, 0, 2),
    );
    let g = 77;
    let mut ca = login(addr, a, 1);
    let mut cb = login(addr, b, 1);
    let mut cc = login(addr, c, 1);
    group(&mut ca, 1, g, GroupOp::Create, &[b, c]);
    expect_ok(&mut ca, 1);
    for cl in [&mut cb, &mut cc] {
        let (op, actor, mut users) = expect_event(cl);
        users.sort_unstable();
        let mut all = vec![a, b, c];
        all.sort_unstable();
        assert_eq!((op, actor, users), (GroupOp::Create, a, all));
    }
    group_send(&mut ca, 10, g, b"hello group");
    match next_answer(&mut ca) {
        ServerFrame::SendAck {
            client_msg_id: 10,
            server_msg_id,
            ..
        } => assert_ne!(server_msg_id, ServerMsgId(0)),
        other => panic!("expected SEND_ACK, got {other:?}"),
    }
    for cl in [&mut cb, &mut cc] {
        assert_eq!(expect_group_message(cl), (g, a, b"hello group".to_vec()));
    }
    // The sender's own connection gets no copy of its message.
    ca.send(&ClientFrame::Ping { nonce: 1 }).unwrap();
    assert_eq!(next_answer(&mut ca), ServerFrame::Pong { nonce: 1 });

    // A large group with offline members: acknowledged once stored for all of them; a member
    // who logs in later finds it in its queue.
    let members: Vec<u64> = (1000..1300).collect();
    group(&mut ca, 2, g + 1, GroupOp::Create, &members);
    expect_ok(&mut ca, 2);
    // The store's size once every member's create event is queued (they travel on their own).
    let admin = node.admin_addr.unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let stored_before = loop {
        let body = http(admin, "GET", "/metrics").1;
        if metric(&body, "gatehouse_queue_items", "") >= 300.0 {
            break metric(&body, "gatehouse_store_bytes", "");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "create events not queued"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    group_send(&mut ca, 11, g + 1, &[7u8; 5000]);
    expect_ack(&mut ca, 11);
    // The 5,000-byte body is stored once per member shard, not once per member: 300 copies
    // would take about 2.4 MB of overflow pages; two copies and 300 references, tens of KB.
    let added = metric(
        &http(admin, "GET", "/metrics").1,
        "gatehouse_store_bytes",
        "",
    ) - stored_before;
    assert!(
        (10_000.0..200_000.0).contains(&added),
        "the message added {added} B to the stores"
    );
    let mut late = login(addr, 1150, 1);
    assert_eq!(expect_event(&mut late).0, GroupOp::Create);
    assert_eq!(expect_group_message(&mut late), (g + 1, a, vec![7u8; 5000]));
    let body = http(node.admin_addr.unwrap(), "GET", "/metrics").1;
    // Member-deliveries of messages: 2 for the first group, 300 for the second.
    assert_eq!(metric(&body, "gatehouse_group_deliveries_total", ""), 302.0);
    node.shutdown().unwrap();
}

#[test]
fn only_admins_change_membership_and_every_change_is_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.group_members_max = 4;
    let node = start(cfg);
    let addr = node.local_addr;
    let (a, b, c, d) = (11, 12, 13, 14);
    let g = 500;
    let mut ca = login(addr, a, 1);
    let mut cb = login(addr, b, 1);
    let mut cc = login(addr, c, 1);
    // Caps: 5 members would pass the cap of 4.
    group(&mut ca, 1, g, GroupOp::Create, &[b, c, d, 15]);
    let msg = expect_err(&mut ca, ErrorCode::GroupFull, 1);
    assert!(msg.contains("cap of 4"), "{msg}");
    group(&mut ca, 2, g, GroupOp::Create, &[b]);
    expect_ok(&mut ca, 2);
    assert_eq!(expect_event(&mut cb).0, GroupOp::Create);
    group(&mut ca, 3, g, GroupOp::Create, &[c]);
    expect_err(&mut ca, ErrorCode::GroupExists, 3);
    // A member is not an admin.
    group(&mut cb, 4, g, GroupOp::Add, &[c]);
    let msg = expect_err(&mut cb, ErrorCode::GroupForbidden, 4);
    assert!(msg.contains("admin"), "{msg}");
    // The admin adds C: everyone, C included, hears it.
    group(&mut ca, 5, g, GroupOp::Add, &[c]);
    expect_ok(&mut ca, 5);
    assert_eq!(expect_event(&mut cb), (GroupOp::Add, a, vec![c]));
    assert_eq!(expect_event(&mut cc), (GroupOp::Add, a, vec![c]));
    group(&mut ca, 6, g, GroupOp::Add, &[d, 15, 16]);
    expect_err(&mut ca, ErrorCode::GroupFull, 6);
    // LIST: members only, with roles.
    group(&mut cc, 7, g, GroupOp::List, &[]);
    assert_eq!(
        expect_ok(&mut cc, 7),
        vec![
            (UserId(a), GroupRole::Admin),
            (UserId(b), GroupRole::Member),
            (UserId(c), GroupRole::Member)
        ]
    );
    let mut cd = login(addr, d, 1);
    group(&mut cd, 8, g, GroupOp::List, &[]);
    expect_err(&mut cd, ErrorCode::GroupForbidden, 8);
    group_send(&mut cd, 9, g, b"let me in");
    expect_err(&mut cd, ErrorCode::GroupForbidden, 9);
    // Remove B: B hears it and gets no more messages.
    group(&mut ca, 10, g, GroupOp::Remove, &[b]);
    expect_ok(&mut ca, 10);
    assert_eq!(expect_event(&mut cb), (GroupOp::Remove, a, vec![b]));
    assert_eq!(expect_event(&mut cc), (GroupOp::Remove, a, vec![b]));
    group_send(&mut cc, 11, g, b"without b");
    expect_ack(&mut cc, 11);
    match next_answer(&mut ca) {
        ServerFrame::GroupDeliver { body, .. } => assert_eq!(body.as_ref(), b"without b"),
        other => panic!("expected GROUP_DELIVER, got {other:?}"),
    }
    cb.send(&ClientFrame::Ping { nonce: 2 }).unwrap();
    assert_eq!(cb.recv_frame().unwrap(), ServerFrame::Pong { nonce: 2 });
    // The only admin leaves: the remaining member becomes admin.
    group(&mut ca, 12, g, GroupOp::Leave, &[]);
    expect_ok(&mut ca, 12);
    assert_eq!(expect_event(&mut cc), (GroupOp::Leave, a, vec![a]));
    group(&mut cc, 13, g, GroupOp::List, &[]);
    assert_eq!(expect_ok(&mut cc, 13), vec![(UserId(c), GroupRole::Admin)]);
    // Unknown groups.
    group(&mut cc, 14, 999, GroupOp::Add, &[a]);
    expect_err(&mut cc, ErrorCode::GroupUnknown, 14);
    group_send(&mut cc, 15, 999, b"x");
    expect_err(&mut cc, ErrorCode::GroupUnknown, 15);
    node.shutdown().unwrap();
}

#[test]
fn events_and_messages_arrive_in_the_order_they_were_made() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path()));
    let addr = node.local_addr;
    let (a, x, y) = (
        user_on_shard(10, 0, 2),
        user_on_shard(10, 1, 2),
        user_on_shard(20, 1, 2),
    );
    let g = 4242;
    let mut ca = login(addr, a, 1);
    let mut cx = login(addr, x, 1);
    let mut cy = login(addr, y, 1);
    group(&mut ca, 1, g, GroupOp::Create, &[y]);
    expect_ok(&mut ca, 1);
    assert_eq!(expect_event(&mut cy).0, GroupOp::Create);
    // Pipelined: add X, message 1, remove Y, message 2.
    group(&mut ca, 2, g, GroupOp::Add, &[x]);
    group_send(&mut ca, 3, g, b"one");
    group(&mut ca, 4, g, GroupOp::Remove, &[y]);
    group_send(&mut ca, 5, g, b"two");
    assert_eq!(expect_event(&mut cx), (GroupOp::Add, a, vec![x]));
    assert_eq!(expect_group_message(&mut cx).2, b"one");
    assert_eq!(expect_event(&mut cx), (GroupOp::Remove, a, vec![y]));
    assert_eq!(expect_group_message(&mut cx).2, b"two");
    // Y: the add, message one, its removal, and not message two.
    assert_eq!(expect_event(&mut cy), (GroupOp::Add, a, vec![x]));
    assert_eq!(expect_group_message(&mut cy).2, b"one");
    assert_eq!(expect_event(&mut cy), (GroupOp::Remove, a, vec![y]));
    cy.send(&ClientFrame::Ping { nonce: 3 }).unwrap();
    assert_eq!(cy.recv_frame().unwrap(), ServerFrame::Pong { nonce: 3 });
    node.shutdown().unwrap();
}

#[test]
fn membership_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let node = start(cfg.clone());
    let mut ca = login(node.local_addr, 1, 1);
    group(&mut ca, 1, 31, GroupOp::Create, &[2, 3]);
    expect_ok(&mut ca, 1);
    group(&mut ca, 2, 31, GroupOp::Remove, &[3]);
    expect_ok(&mut ca, 2);
    drop(ca);
    node.shutdown().unwrap();
    let node = start(cfg);
    let mut cb = login(node.local_addr, 2, 1);
    // B's queue still holds the two events; the list is as it was.
    assert_eq!(expect_event(&mut cb).0, GroupOp::Create);
    assert_eq!(expect_event(&mut cb).0, GroupOp::Remove);
    group(&mut cb, 3, 31, GroupOp::List, &[]);
    assert_eq!(
        expect_ok(&mut cb, 3),
        vec![
            (UserId(1), GroupRole::Admin),
            (UserId(2), GroupRole::Member)
        ]
    );
    group_send(&mut cb, 4, 31, b"after restart");
    expect_ack(&mut cb, 4);
    // A (the actor) may or may not have ACKed its own events before the restart.
    let mut ca = login(node.local_addr, 1, 1);
    match next_answer(&mut ca) {
        ServerFrame::GroupDeliver { body, .. } => assert_eq!(body.as_ref(), b"after restart"),
        other => panic!("expected GROUP_DELIVER, got {other:?}"),
    }
    node.shutdown().unwrap();
}

#[test]
fn bad_group_input_gets_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path()));
    let addr = node.local_addr;
    let mut bystander = login(addr, 50, 1);
    let mut c = login(addr, 1, 1);
    group(&mut c, 1, 0, GroupOp::Create, &[2]);
    expect_err(&mut c, ErrorCode::GroupUnknown, 1);
    group(&mut c, 2, 5, GroupOp::Create, &[0]);
    expect_err(&mut c, ErrorCode::BadRecipient, 2);
    // An unknown operation: fatal MALFORMED_FRAME naming it.
    let mut raw = bytes::BytesMut::new();
    ClientFrame::Group {
        request_id: 3,
        group: 5,
        op: GroupOp::List,
        users: vec![],
    }
    .encode(&mut raw);
    raw[4 + 1 + 16] = 9; // the op byte
    c.send_raw(&raw).unwrap();
    let msg = expect_error_with(&mut c, ErrorCode::MalformedFrame, true, 0);
    assert!(msg.contains("unknown group operation"), "{msg}");
    // A user list longer than any group: fatal MALFORMED_FRAME.
    let mut c = login(addr, 2, 1);
    let mut raw = bytes::BytesMut::new();
    ClientFrame::Group {
        request_id: 4,
        group: 5,
        op: GroupOp::Add,
        users: (1..=1025).map(UserId).collect(),
    }
    .encode(&mut raw);
    c.send_raw(&raw).unwrap();
    let msg = expect_error_with(&mut c, ErrorCode::MalformedFrame, true, 0);
    assert!(msg.contains("too many users"), "{msg}");
    // The bystander is fine.
    bystander.send(&ClientFrame::Ping { nonce: 9 }).unwrap();
    assert_eq!(
        bystander.recv_frame().unwrap(),
        ServerFrame::Pong { nonce: 9 }
    );
    node.shutdown().unwrap();
}

/// A node process without a send rate limit, for kill -9 tests: (config, log, node, client
/// address, admin address).
fn unlimited_node(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Gateway,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let cfg = node_config(dir, "[limits]\nsend_rate_per_s = 0\n");
    let log = dir.join("node.log");
    let (node, addr, admin) = spawn_node_env(&cfg, &log, env);
    (cfg, log, node, addr, admin)
}

#[test]
fn kill_9_during_group_sends_loses_no_acknowledged_member_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, log, mut node, addr, _) = unlimited_node(dir.path(), &[]);
    let (sender, g) = (user_on_shard(100, 0, 2), 9_001);
    let members: Vec<u64> = vec![
        user_on_shard(200, 0, 2),
        user_on_shard(200, 1, 2),
        user_on_shard(300, 1, 2),
        user_on_shard(400, 0, 2),
    ];
    let mut cs = login(addr, sender, 1);
    group(&mut cs, 1, g, GroupOp::Create, &members);
    expect_ok(&mut cs, 1);
    // A writer thread streams GROUP_SENDs; this thread reads acks and kills the node after 300.
    let mut writer = cs.stream().try_clone().unwrap();
    let streaming = std::thread::spawn(move || {
        use std::io::Write;
        let mut seq = 10u64;
        let mut buf = bytes::BytesMut::new();
        loop {
            buf.clear();
            for _ in 0..32 {
                // 600 bytes: stored once per shard, members' items refer to it.
                let mut body = seq.to_be_bytes().to_vec();
                body.resize(600, 0xab);
                ClientFrame::GroupSend {
                    client_msg_id: seq,
                    group: g,
                    body: body.into(),
                }
                .encode(&mut buf);
                seq += 1;
            }
            if writer.write_all(&buf).is_err() {
                return;
            }
        }
    });
    let mut acked = Vec::new();
    loop {
        match cs.recv_frame() {
            Ok(ServerFrame::SendAck { client_msg_id, .. }) => {
                acked.push(client_msg_id);
                if acked.len() == 300 {
                    node.kill().unwrap(); // SIGKILL while group sends stream in
                    node.wait().unwrap();
                }
            }
            Ok(ServerFrame::GroupEvent { .. }) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break, // the node is gone
        }
    }
    streaming.join().unwrap();
    assert!(acked.len() >= 300, "{} acked", acked.len());
    eprintln!(
        "group crash: {} acknowledged before SIGKILL (last {:?})",
        acked.len(),
        acked.last()
    );
    // Restart on the same data: every member has every acknowledged message, in order.
    let (_node, addr, _) = spawn_node(&cfg, &log);
    let last = *acked.iter().max().unwrap();
    for m in members {
        let mut c = login(addr, m, 1);
        let mut seen = Vec::new();
        while seen.last().is_none_or(|s| *s < last) {
            match next_non_event(&mut c) {
                ServerFrame::GroupDeliver {
                    server_msg_id,
                    body,
                    ..
                } => {
                    c.ack(&[server_msg_id]).unwrap();
                    assert_eq!(body.len(), 600);
                    seen.push(u64::from_be_bytes(body[..8].try_into().unwrap()));
                }
                other => panic!("member {m}: unexpected {other:?}"),
            }
        }
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "member {m}: out of order"
        );
        for a in &acked {
            assert!(
                seen.binary_search(a).is_ok(),
                "member {m} lost acknowledged message {a}"
            );
        }
    }
}

/// The next GROUP_RECEIPT (ACKed), skipping events: (delivered, read, members).
fn expect_group_receipt(c: &mut Client, msg: ServerMsgId) -> (u16, u16, u16) {
    match next_non_event(c) {
        ServerFrame::GroupReceipt {
            receipt_id,
            group_msg_id,
            members,
            delivered,
            read,
            ..
        } => {
            assert_eq!(group_msg_id, msg);
            c.ack(&[receipt_id]).unwrap();
            (delivered, read, members)
        }
        other => panic!("expected GROUP_RECEIPT, got {other:?}"),
    }
}

#[test]
fn senders_get_aggregated_receipts_not_one_per_member() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path()));
    let addr = node.local_addr;
    let (a, g) = (user_on_shard(100, 0, 2), 606);
    let members: Vec<u64> = (1..=6)
        .map(|i| user_on_shard(1000 * i, (i % 2) as u16, 2))
        .collect();
    let mut ca = login(addr, a, 1);
    group(&mut ca, 1, g, GroupOp::Create, &members);
    expect_ok(&mut ca, 1);
    group_send(&mut ca, 2, g, b"count me");
    let msg = match next_non_event(&mut ca) {
        ServerFrame::SendAck { server_msg_id, .. } => server_msg_id,
        other => panic!("expected SEND_ACK, got {other:?}"),
    };
    // Each member receives, ACKs (delivered), then marks it read with its group id.
    let mut clients: Vec<Client> = members.iter().map(|m| login(addr, *m, 1)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let gmid = match next_non_event(c) {
            ServerFrame::GroupDeliver {
                server_msg_id,
                group_msg_id,
                ..
            } => {
                c.ack(&[server_msg_id]).unwrap();
                group_msg_id
            }
            other => panic!("expected GROUP_DELIVER, got {other:?}"),
        };
        assert_eq!(gmid, msg, "members see the sender's id");
        if i == 0 {
            // The first delivery is reported at once.
            assert_eq!(expect_group_receipt(&mut ca, msg), (1, 0, 6));
        }
    }
    // All six delivered: one more receipt, not five.
    assert_eq!(expect_group_receipt(&mut ca, msg), (6, 0, 6));
    for c in &mut clients {
        c.send(&ClientFrame::GroupRead {
            group: g,
            ids: vec![msg],
        })
        .unwrap();
    }
    assert_eq!(expect_group_receipt(&mut ca, msg).1, 1);
    assert_eq!(expect_group_receipt(&mut ca, msg), (6, 6, 6));
    // And nothing else: four receipts for six members.
    ca.send(&ClientFrame::Ping { nonce: 5 }).unwrap();
    assert_eq!(next_non_event(&mut ca), ServerFrame::Pong { nonce: 5 });
    node.shutdown().unwrap();
}

/// Answers to pipelined requests, by request (or client message) id, in any order: a refusal
/// comes at once, a GROUP_OK after its commit. Events and receipts on the way are ACKed.
fn answers(c: &mut Client, n: usize) -> std::collections::BTreeMap<u64, ServerFrame> {
    let mut got = std::collections::BTreeMap::new();
    while got.len() < n {
        let f = next_answer(c);
        let id = match &f {
            ServerFrame::GroupOk { request_id, .. } => *request_id,
            ServerFrame::Error { ref_id, .. } => *ref_id,
            ServerFrame::SendAck { client_msg_id, .. } => *client_msg_id,
            other => panic!("unexpected {other:?}"),
        };
        assert!(got.insert(id, f).is_none(), "two answers to {id}");
    }
    got
}

#[test]
fn a_group_emptied_by_its_last_member_is_gone_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let node = start(cfg.clone());
    let mut ca = login(node.local_addr, 1, 1);
    let g = 77;
    group(&mut ca, 1, g, GroupOp::Create, &[]);
    expect_ok(&mut ca, 1);
    // Pipelined behind the last member's leave, before its commit can have finished: the
    // group must already be gone (not read back from the store, which still has it).
    group(&mut ca, 2, g, GroupOp::Leave, &[]);
    group(&mut ca, 3, g, GroupOp::List, &[]);
    group_send(&mut ca, 4, g, b"to nobody");
    group(&mut ca, 5, g, GroupOp::Create, &[]);
    let got = answers(&mut ca, 4);
    let code = |id| match &got[&id] {
        ServerFrame::Error { code, .. } => Some(*code),
        _ => None,
    };
    assert!(
        matches!(got[&2], ServerFrame::GroupOk { .. }),
        "{:?}",
        got[&2]
    );
    assert_eq!(
        code(3),
        Some(ErrorCode::GroupUnknown as u16),
        "{:?}",
        got[&3]
    );
    assert_eq!(
        code(4),
        Some(ErrorCode::GroupUnknown as u16),
        "{:?}",
        got[&4]
    );
    assert!(
        matches!(got[&5], ServerFrame::GroupOk { .. }),
        "{:?}",
        got[&5]
    );
    // The new group is the one that stays, in the store too.
    group(&mut ca, 6, g, GroupOp::List, &[]);
    assert_eq!(expect_ok(&mut ca, 6), vec![(UserId(1), GroupRole::Admin)]);
    drop(ca);
    node.shutdown().unwrap();
    let node = start(cfg);
    let mut ca = login(node.local_addr, 1, 1);
    group(&mut ca, 7, g, GroupOp::List, &[]);
    assert_eq!(expect_ok(&mut ca, 7), vec![(UserId(1), GroupRole::Admin)]);
    node.shutdown().unwrap();
}

/// Creates group `g` with `members` (the creator is `c`'s user), sends `body` to it and
/// returns the message's id from its SEND_ACK.
fn send_to_new_group(c: &mut Client, g: u64, members: &[u64], body: &[u8]) -> ServerMsgId {
    group(c, 1, g, GroupOp::Create, members);
    expect_ok(c, 1);
    group_send(c, 2, g, body);
    match next_non_event(c) {
        ServerFrame::SendAck { server_msg_id, .. } => server_msg_id,
        other => panic!("expected SEND_ACK, got {other:?}"),
    }
}

/// The next GROUP_DELIVER, skipping events, ACKed.
fn receive_and_ack(c: &mut Client) {
    match next_non_event(c) {
        ServerFrame::GroupDeliver { server_msg_id, .. } => c.ack(&[server_msg_id]).unwrap(),
        other => panic!("expected GROUP_DELIVER, got {other:?}"),
    }
}

#[test]
fn aggregated_receipts_go_on_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let node = start(cfg.clone());
    let (a, g) = (user_on_shard(200, 0, 2), 707);
    let (m1, m2) = (user_on_shard(2000, 1, 2), user_on_shard(3000, 0, 2));
    let mut ca = login(node.local_addr, a, 1);
    let msg = send_to_new_group(&mut ca, g, &[m1, m2], b"across a restart");
    // One member receives it before the restart, the other after.
    let mut c1 = login(node.local_addr, m1, 1);
    receive_and_ack(&mut c1);
    assert_eq!(expect_group_receipt(&mut ca, msg), (1, 0, 2));
    drop((ca, c1));
    node.shutdown().unwrap();

    let node = start(cfg);
    let mut c2 = login(node.local_addr, m2, 1);
    receive_and_ack(&mut c2);
    let mut ca = login(node.local_addr, a, 1);
    assert_eq!(expect_group_receipt(&mut ca, msg), (2, 0, 2));
    for c in [&mut c2, &mut login(node.local_addr, m1, 1)] {
        c.send(&ClientFrame::GroupRead {
            group: g,
            ids: vec![msg],
        })
        .unwrap();
    }
    assert_eq!(expect_group_receipt(&mut ca, msg), (2, 1, 2));
    assert_eq!(expect_group_receipt(&mut ca, msg), (2, 2, 2));
    node.shutdown().unwrap();
    // All four receipts sent: the tally is over and gone from the store too.
    for shard in 0..2 {
        let opened = gatehouse::store::Store::open(
            dir.path(),
            gatehouse::ids::ShardId(shard),
            2,
            64,
            gatehouse::config::SyncPolicy::None,
        )
        .unwrap();
        assert_eq!(opened.store.tallies().unwrap(), vec![]);
    }
}

#[test]
fn receipt_tallies_checkpointed_before_a_kill_9_go_on_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), "");
    let log = dir.path().join("node.log");
    let (mut node, addr, admin) = spawn_node(&cfg, &log);
    let (a, g) = (user_on_shard(200, 1, 2), 808);
    let (m1, m2) = (user_on_shard(2000, 0, 2), user_on_shard(3000, 1, 2));
    let mut ca = login(addr, a, 1);
    let msg = send_to_new_group(&mut ca, g, &[m1, m2], b"before the crash");
    // Tallies are written at the sweep after they change (every 250 ms). Wait for the new
    // tally's write, so that the next write is the one that holds the member's ACK.
    let wait_for_writes = |n: f64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let body = http(admin, "GET", "/metrics").1;
            let writes = metric(&body, "gatehouse_group_tally_writes_total", "");
            if writes >= n {
                return writes;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{writes} tally writes after 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let started = wait_for_writes(1.0);
    let mut c1 = login(addr, m1, 1);
    receive_and_ack(&mut c1);
    assert_eq!(expect_group_receipt(&mut ca, msg), (1, 0, 2));
    wait_for_writes(started + 1.0);
    node.kill().unwrap();
    node.wait().unwrap();

    let (_node, addr, _) = spawn_node(&cfg, &log);
    let mut c2 = login(addr, m2, 1);
    receive_and_ack(&mut c2);
    let mut ca = login(addr, a, 1);
    assert_eq!(expect_group_receipt(&mut ca, msg), (2, 0, 2));
}

#[test]
fn a_count_whose_delete_commits_during_the_drain_survives_a_planned_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let node = start(cfg.clone());
    let (a, g) = (user_on_shard(300, 0, 2), 909);
    let (m1, m2) = (user_on_shard(4000, 1, 2), user_on_shard(5000, 0, 2));
    let mut ca = login(node.local_addr, a, 1);
    let msg = send_to_new_group(&mut ca, g, &[m1, m2], b"acknowledged as the node stops");
    drop(ca);
    let mut c1 = login(node.local_addr, m1, 1);
    receive_and_ack(&mut c1);
    // The server has read the ACK (frames are handled in order) when the PONG comes; its
    // delete, and so the count, commit during the drain.
    c1.send(&ClientFrame::Ping { nonce: 1 }).unwrap();
    assert_eq!(next_non_event(&mut c1), ServerFrame::Pong { nonce: 1 });
    node.shutdown().unwrap();

    let node = start(cfg);
    let mut c2 = login(node.local_addr, m2, 1);
    receive_and_ack(&mut c2);
    let mut ca = login(node.local_addr, a, 1);
    // The first-delivered receipt may come first, if it was queued before the stop.
    let mut got = expect_group_receipt(&mut ca, msg);
    if got == (1, 0, 2) {
        got = expect_group_receipt(&mut ca, msg);
    }
    assert_eq!(got, (2, 0, 2));
    node.shutdown().unwrap();
}

/// Reads `n` GROUP_DELIVERs (events ACKed on the way); ACKs those whose index is in `ack`.
/// Returns (server id, body) of each, in arrival order.
fn take_group_messages(
    c: &mut Client,
    n: usize,
    ack: impl Fn(usize) -> bool,
) -> Vec<(ServerMsgId, Vec<u8>)> {
    (0..n)
        .map(|i| match next_non_event(c) {
            ServerFrame::GroupDeliver {
                server_msg_id,
                body,
                ..
            } => {
                if ack(i) {
                    c.ack(&[server_msg_id]).unwrap();
                }
                (server_msg_id, body.to_vec())
            }
            other => panic!("expected GROUP_DELIVER {i}, got {other:?}"),
        })
        .collect()
}

/// Nothing but events arrives before the answer to a PING.
fn expect_nothing_queued(c: &mut Client, nonce: u64) {
    c.send(&ClientFrame::Ping { nonce }).unwrap();
    assert_eq!(next_non_event(c), ServerFrame::Pong { nonce });
}

/// Creates group `g` with `members` (the creator, user_on_shard(100, 0, 2), sends) and logs
/// every member in: (the creator's client, the members' clients in order).
fn online_group(addr: std::net::SocketAddr, g: u64, members: &[u64]) -> (Client, Vec<Client>) {
    let mut ca = login(addr, user_on_shard(100, 0, 2), 1);
    group(&mut ca, 1, g, GroupOp::Create, members);
    expect_ok(&mut ca, 1);
    let cs = members.iter().map(|m| login(addr, *m, 1)).collect();
    (ca, cs)
}

/// Online members get a group message from the member shard's group log (one record per
/// shard, ACKs in memory). One that leaves gets what it had not ACKed at its next login, with
/// the same ids, and nothing it had ACKed; the sender's receipts count ACKs made in memory.
#[test]
fn an_online_member_that_leaves_gets_what_it_had_not_acknowledged_at_its_next_login() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path()));
    let addr = node.local_addr;
    let g = 707;
    let (m, other) = (user_on_shard(200, 1, 2), user_on_shard(300, 0, 2));
    let (mut ca, mut cs) = online_group(addr, g, &[m, other]);
    let (mut co, mut cm) = (cs.pop().unwrap(), cs.pop().unwrap());
    for i in 0..5u8 {
        // 64 and 600 bytes: a body copied into the record and one shared on disk.
        let body = vec![i; if i % 2 == 0 { 64 } else { 600 }];
        group_send(&mut ca, 10 + u64::from(i), g, &body);
        expect_ack(&mut ca, 10 + u64::from(i));
    }
    // `other` ACKs everything; `m` only the first two.
    let seen_o = take_group_messages(&mut co, 5, |_| true);
    let seen = take_group_messages(&mut cm, 5, |i| i < 2);
    assert_eq!(
        seen.iter().map(|(_, b)| b[0]).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(seen_o.len(), 5);
    // The first message was delivered to both members, from memory: the sender hears of it.
    let first = match ca.recv_frame().unwrap() {
        ServerFrame::GroupReceipt {
            receipt_id,
            group_msg_id,
            delivered,
            members,
            ..
        } => {
            ca.ack(&[receipt_id]).unwrap();
            assert_eq!(members, 2);
            assert!(delivered >= 1, "{delivered}");
            group_msg_id
        }
        other => panic!("expected GROUP_RECEIPT, got {other:?}"),
    };
    assert!(first.0 > 0);
    expect_nothing_queued(&mut cm, 1);
    drop(cm);
    // Back: the three it had not ACKed, same ids, in order, and nothing else.
    let mut cm = login(addr, m, 1);
    let again = take_group_messages(&mut cm, 3, |_| true);
    assert_eq!(again, seen[2..].to_vec());
    expect_nothing_queued(&mut cm, 2);
    drop(cm);
    // Those ACKs delete from the queue through the group commit: a login before it commits
    // would get them again (at least once). Give it time, then nothing is left.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut cm = login(addr, m, 1);
    expect_nothing_queued(&mut cm, 3);
    // `other` never left: nothing came back for it either.
    expect_nothing_queued(&mut co, 4);
    node.shutdown().unwrap();
}

/// A kill -9 while online members hold group messages they have not ACKed: the log records
/// are moved into their queues when the store opens, so nothing acknowledged to the sender is
/// lost (ACKed ones may come again, with the same ids: delivery is at least once).
#[test]
fn kill_9_with_online_members_holding_group_messages_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, log, mut node, addr, admin) = unlimited_node(dir.path(), &[]);
    let g = 808;
    let members = [
        user_on_shard(200, 0, 2),
        user_on_shard(300, 1, 2),
        user_on_shard(400, 1, 2),
    ];
    let (mut ca, mut cs) = online_group(addr, g, &members);
    for i in 0..20u64 {
        let mut body = i.to_be_bytes().to_vec();
        body.resize(if i % 2 == 0 { 64 } else { 600 }, 0xab);
        group_send(&mut ca, 100 + i, g, &body);
        expect_ack(&mut ca, 100 + i);
    }
    // Member 0 ACKs all, member 1 none, member 2 the first half.
    let acks: [fn(usize) -> bool; 3] = [|_| true, |_| false, |i| i < 10];
    let before: Vec<Vec<(ServerMsgId, Vec<u8>)>> = cs
        .iter_mut()
        .zip(acks)
        .map(|(c, ack)| take_group_messages(c, 20, ack))
        .collect();
    for (i, c) in cs.iter_mut().enumerate() {
        // The ACKs were read before the kill.
        expect_nothing_queued(c, i as u64);
    }
    // Every member was online: all 60 member-deliveries went through the log, and member 1
    // ACKed nothing, so all 20 messages are still held.
    let body = http(admin, "GET", "/metrics").1;
    assert_eq!(
        metric(&body, "gatehouse_group_log_deliveries_total", ""),
        60.0
    );
    assert_eq!(metric(&body, "gatehouse_group_log_messages", ""), 20.0);
    node.kill().unwrap();
    node.wait().unwrap();
    let (_node, addr, _) = spawn_node(&cfg, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("group log moved into members' queues"),
        "the restart found no group log to move:\n{text}"
    );
    for (k, m) in members.iter().enumerate() {
        let mut c = login(addr, *m, 1);
        let must: Vec<(ServerMsgId, Vec<u8>)> = match k {
            0 => Vec::new(),
            1 => before[1].clone(),
            _ => before[2][10..].to_vec(),
        };
        // What comes back: in order, each as before (same id and body), at least `must`.
        let mut got = Vec::new();
        c.send(&ClientFrame::Ping { nonce: 9 }).unwrap();
        let mut pings = 1;
        loop {
            match next_non_event(&mut c) {
                ServerFrame::GroupDeliver {
                    server_msg_id,
                    body,
                    ..
                } => {
                    c.ack(&[server_msg_id]).unwrap();
                    got.push((server_msg_id, body.to_vec()));
                }
                ServerFrame::Pong { nonce: 9 } if got.len() >= must.len() || pings == 50 => break,
                ServerFrame::Pong { nonce: 9 } => {
                    // The PING's answer can pass a window still being pulled: ask again, a
                    // bounded number of times (then the check below names what is missing).
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    c.send(&ClientFrame::Ping { nonce: 9 }).unwrap();
                    pings += 1;
                }
                other => panic!("member {m}: unexpected {other:?}"),
            }
        }
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "member {m}: order");
        for item in &must {
            assert!(got.contains(item), "member {m} lost {item:?}");
        }
        for item in &got {
            assert!(before[k].contains(item), "member {m}: unknown {item:?}");
        }
    }
}

/// The give-up path of the group log: a member's move into its own queue fails, and so does
/// its retry (a test hook fails every commit that holds a move). Its records must stay on
/// disk, whatever the other members ACK, and the member gets the messages after the next
/// start, with the same ids.
#[test]
fn a_member_whose_move_out_of_the_group_log_fails_gets_its_messages_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook = [("GATEHOUSE_TEST_FAIL_LOG_MOVES", "1")];
    let (cfg, log, mut node, addr, admin) = unlimited_node(dir.path(), &hook);
    let g = 909;
    let (m, other) = (user_on_shard(200, 1, 2), user_on_shard(300, 1, 2));
    let (mut ca, mut cs) = online_group(addr, g, &[m, other]);
    let (mut co, mut cm) = (cs.pop().unwrap(), cs.pop().unwrap());
    for i in 0..3u8 {
        group_send(&mut ca, 10 + u64::from(i), g, &[i; 64]);
        expect_ack(&mut ca, 10 + u64::from(i));
    }
    // `m` ACKs none and leaves: its move fails twice and is given up. Only then does `other`
    // ACK: the records, done with in memory, must not be dropped from the store.
    let seen_o = take_group_messages(&mut co, 3, |_| false);
    let held = take_group_messages(&mut cm, 3, |_| false);
    drop(cm);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let failed = || {
        let body = http(admin, "GET", "/metrics").1;
        metric(&body, "gatehouse_group_log_moves_failed_total", "")
    };
    while failed() < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no move given up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ids: Vec<ServerMsgId> = seen_o.iter().map(|(id, _)| *id).collect();
    co.ack(&ids).unwrap();
    expect_nothing_queued(&mut co, 1);
    // Every member is done with the three in memory (ACKed or given up).
    let body = http(admin, "GET", "/metrics").1;
    assert_eq!(metric(&body, "gatehouse_group_log_messages", ""), 0.0);
    assert_eq!(failed(), 1.0);
    // Until the next start `m` does not get them (documented); the records are kept.
    let mut cm = login(addr, m, 1);
    expect_nothing_queued(&mut cm, 2);
    drop(cm);
    node.kill().unwrap();
    node.wait().unwrap();
    let (_node, addr, _) = spawn_node(&cfg, &log);
    let mut cm = login(addr, m, 1);
    assert_eq!(take_group_messages(&mut cm, 3, |_| true), held);
    expect_nothing_queued(&mut cm, 3);
}
