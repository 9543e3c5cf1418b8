//! Presence, typing indicators and blocks, end to end over real sockets with a real store.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gatehouse::client::Client;
use gatehouse::ids::UserId;
use gatehouse::proto::{ClientFrame, ErrorCode, ServerFrame, TypingState};

fn subscribe(c: &mut Client, users: &[u64]) {
    c.send(&ClientFrame::Subscribe {
        users: users.iter().map(|u| UserId(*u)).collect(),
    })
    .unwrap();
}

/// The next PRESENCE frame about `user` (other frames are skipped).
fn presence_of(c: &mut Client, user: u64) -> (bool, u64) {
    expect_frame(c, |f| match f {
        ServerFrame::Presence {
            user: u,
            online,
            last_seen_ms,
        } if u.0 == user => Some((*online, *last_seen_ms)),
        _ => None,
    })
}

/// Asserts that nothing but the PONG arrives within `wait` after now (a PING fences it).
fn expect_quiet(c: &mut Client, wait: Duration) {
    std::thread::sleep(wait);
    c.send(&ClientFrame::Ping { nonce: 77 }).unwrap();
    match c.recv_frame().unwrap() {
        ServerFrame::Pong { nonce: 77 } => {}
        other => panic!("expected nothing before the PONG, got {other:?}"),
    }
}

fn now_ms() -> u64 {
    gatehouse::runtime::now_ms()
}

#[test]
fn presence_follows_logins_and_logouts_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path()));
    let addr = node.local_addr;
    let w = user_on_shard(100, 0, 2);
    let t = user_on_shard(100, 1, 2);
    let mut cw = login(addr, w, 1);
    subscribe(&mut cw, &[t]);
    assert_eq!(presence_of(&mut cw, t), (false, 0), "never seen");
    let ct = login(addr, t, 1);
    assert_eq!(presence_of(&mut cw, t), (true, 0));
    // A second device of an online user changes nothing.
    let ct2 = login(addr, t, 2);
    drop(ct);
    expect_quiet(&mut cw, Duration::from_millis(300));
    let before = now_ms();
    drop(ct2);
    let (online, seen) = presence_of(&mut cw, t);
    assert!(!online);
    assert!(
        seen >= before && seen <= now_ms(),
        "last seen {seen} not in [{before}, now]"
    );
    // Unsubscribed: no more news.
    cw.send(&ClientFrame::Unsubscribe {
        users: vec![UserId(t)],
    })
    .unwrap();
    expect_quiet(&mut cw, Duration::from_millis(100));
    let _ct = login(addr, t, 1);
    expect_quiet(&mut cw, Duration::from_millis(300));
    node.shutdown().unwrap();
}

#[test]
fn a_change_crosses_shards_in_one_envelope_per_shard() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path()));
    let addr = node.local_addr;
    let admin = node.admin_addr.unwrap();
    let t = user_on_shard(5000, 1, 2);
    // 20 followers, all owned by shard 0.
    let mut followers: Vec<Client> = Vec::new();
    let mut u = 1;
    while followers.len() < 20 {
        u = user_on_shard(u + 1, 0, 2);
        let mut c = login(addr, u, 1);
        subscribe(&mut c, &[t]);
        assert_eq!(presence_of(&mut c, t), (false, 0));
        followers.push(c);
    }
    let routed = |body: &str| metric(body, "gatehouse_envelopes_routed_total", "shard=\"1\"");
    let before = routed(&http(admin, "GET", "/metrics").1);
    let ct = login(addr, t, 1);
    for c in &mut followers {
        assert_eq!(presence_of(c, t), (true, 0));
    }
    let after = routed(&http(admin, "GET", "/metrics").1);
    assert_eq!(
        after - before,
        1.0,
        "one envelope from shard 1 to shard 0 for 20 followers"
    );
    let body = http(admin, "GET", "/metrics").1;
    assert_eq!(metric(&body, "gatehouse_presence_subscriptions", ""), 20.0);
    // Followers that close are forgotten by the target's shard.
    followers.truncate(5);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let n = metric(
            &http(admin, "GET", "/metrics").1,
            "gatehouse_presence_subscriptions",
            "",
        );
        if n == 5.0 {
            break;
        }
        assert!(Instant::now() < deadline, "still {n} subscriptions");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(ct);
    for c in &mut followers {
        assert!(!presence_of(c, t).0);
    }
    node.shutdown().unwrap();
}

#[test]
fn last_seen_persists_and_can_be_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (w, t) = (user_on_shard(100, 0, 2), user_on_shard(100, 1, 2));
    let node = start(cfg.clone());
    let before = now_ms();
    drop(login(node.local_addr, t, 1));
    std::thread::sleep(Duration::from_millis(200));
    node.shutdown().unwrap();

    // After a restart the last-seen time is still known.
    let node = start(cfg.clone());
    let mut cw = login(node.local_addr, w, 1);
    subscribe(&mut cw, &[t]);
    let (online, seen) = presence_of(&mut cw, t);
    assert!(
        !online && seen >= before,
        "last seen {seen}, logged out after {before}"
    );
    // The user hides its last-seen: followers see "offline" with no time, also after a restart.
    let mut ct = login(node.local_addr, t, 1);
    assert_eq!(presence_of(&mut cw, t), (true, 0));
    ct.send(&ClientFrame::Privacy {
        hide_last_seen: true,
    })
    .unwrap();
    ct.send(&ClientFrame::Ping { nonce: 1 }).unwrap();
    expect_frame(&mut ct, |f| {
        matches!(f, ServerFrame::Pong { .. }).then_some(())
    });
    std::thread::sleep(Duration::from_millis(100)); // the setting's group commit
    drop(ct);
    assert_eq!(presence_of(&mut cw, t), (false, 0));
    drop(cw);
    node.shutdown().unwrap();
    let node = start(cfg);
    let mut cw = login(node.local_addr, w, 1);
    subscribe(&mut cw, &[t]);
    assert_eq!(presence_of(&mut cw, t), (false, 0));
    node.shutdown().unwrap();
}

#[test]
fn subscription_limits_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.presence_subscriptions_max = 3;
    cfg.limits.presence_subscribers_max = 2;
    let node = start(cfg);
    let addr = node.local_addr;
    let mut c = login(addr, 1, 1);
    // Four at once pass the per-connection limit of 3: none is added.
    subscribe(&mut c, &[10, 11, 12, 13]);
    let msg = expect_error_with(&mut c, ErrorCode::PresenceLimit, false, 0);
    assert!(msg.contains("limit of 3"), "{msg}");
    subscribe(&mut c, &[10, 11]);
    presence_of(&mut c, 10);
    presence_of(&mut c, 11);
    subscribe(&mut c, &[11, 12]); // 11 again counts once: 3 in all
    presence_of(&mut c, 12);
    subscribe(&mut c, &[13]);
    expect_error_with(&mut c, ErrorCode::PresenceLimit, false, 0);

    // A user with 2 followers refuses a third, naming itself.
    let target = 50;
    let mut f1 = login(addr, 2, 1);
    let mut f2 = login(addr, 3, 1);
    let mut f3 = login(addr, 4, 1);
    for f in [&mut f1, &mut f2] {
        subscribe(f, &[target]);
        presence_of(f, target);
    }
    subscribe(&mut f3, &[target]);
    let msg = expect_error_with(&mut f3, ErrorCode::PresenceLimit, false, target);
    assert!(msg.contains("maximum of 2 followers"), "{msg}");
    // A follower that leaves frees its place.
    drop(f1);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        subscribe(&mut f3, &[target]);
        match f3.recv_frame().unwrap() {
            ServerFrame::Presence { user, .. } if user.0 == target => break,
            ServerFrame::Error { code, .. } if code == ErrorCode::PresenceLimit as u16 => {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(20));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    node.shutdown().unwrap();
}

#[test]
fn typing_reaches_online_recipients_only_and_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.typing_rate_per_s = 5;
    let node = start(cfg);
    let addr = node.local_addr;
    let (a, b) = (user_on_shard(100, 0, 2), user_on_shard(100, 1, 2));
    let mut ca = login(addr, a, 1);
    let typing = |to| ClientFrame::Typing {
        to: UserId(to),
        state: TypingState::Composing,
    };
    // Offline recipient: dropped, never stored.
    ca.send(&typing(b)).unwrap();
    ca.send(&ClientFrame::Ping { nonce: 1 }).unwrap();
    expect_frame(&mut ca, |f| {
        matches!(f, ServerFrame::Pong { .. }).then_some(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut cb = login(addr, b, 1);
    expect_quiet(&mut cb, Duration::from_millis(200));
    // Online recipient: forwarded, with the state.
    ca.send(&typing(b)).unwrap();
    assert_eq!(
        cb.recv_frame().unwrap(),
        ServerFrame::Typing {
            from: UserId(a),
            state: TypingState::Composing
        }
    );
    // 50 at once against 5/s (burst 10): at most about 10 get through.
    std::thread::sleep(Duration::from_millis(2100)); // refill the bucket
    for _ in 0..50 {
        ca.send(&typing(b)).unwrap();
    }
    ca.send(&ClientFrame::Ping { nonce: 2 }).unwrap();
    expect_frame(&mut ca, |f| {
        matches!(f, ServerFrame::Pong { .. }).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    cb.send(&ClientFrame::Ping { nonce: 3 }).unwrap();
    let mut got = 0;
    loop {
        match cb.recv_frame().unwrap() {
            ServerFrame::Typing { .. } => got += 1,
            ServerFrame::Pong { nonce: 3 } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (10..=12).contains(&got),
        "{got} typing indicators got through"
    );
    let body = http(node.admin_addr.unwrap(), "GET", "/metrics").1;
    assert!(
        metric(&body, "gatehouse_typing_dropped_total", "") >= 38.0,
        "{body}"
    );
    node.shutdown().unwrap();
}

#[test]
fn blocks_stop_messages_typing_and_presence_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (a, b) = (user_on_shard(100, 0, 2), user_on_shard(100, 1, 2));
    let node = start(cfg.clone());
    let mut ca = login(node.local_addr, a, 1);
    let mut cb = login(node.local_addr, b, 1);
    subscribe(&mut ca, &[b]);
    assert_eq!(presence_of(&mut ca, b), (true, 0));
    cb.send(&ClientFrame::Block { user: UserId(a) }).unwrap();
    // Blocking yourself is refused.
    cb.send(&ClientFrame::Block { user: UserId(b) }).unwrap();
    expect_error_with(&mut cb, ErrorCode::BadRecipient, false, b);
    std::thread::sleep(Duration::from_millis(100)); // the block's group commit
    ca.send_message(1, UserId(b), b"hello?").unwrap();
    let msg = expect_error_with(&mut ca, ErrorCode::Blocked, false, 1);
    assert!(msg.contains(&b.to_string()), "{msg}");
    ca.send(&ClientFrame::Typing {
        to: UserId(b),
        state: TypingState::Composing,
    })
    .unwrap();
    // A fresh subscription sees B offline without a last-seen time.
    let mut ca2 = login(node.local_addr, a, 2);
    subscribe(&mut ca2, &[b]);
    assert_eq!(presence_of(&mut ca2, b), (false, 0));
    expect_quiet(&mut cb, Duration::from_millis(200));
    drop((ca, ca2, cb));
    node.shutdown().unwrap();

    // Still blocked after a restart; unblocking lets messages through again.
    let node = start(cfg);
    let mut ca = login(node.local_addr, a, 1);
    ca.send_message(2, UserId(b), b"still?").unwrap();
    expect_error_with(&mut ca, ErrorCode::Blocked, false, 2);
    let mut cb = login(node.local_addr, b, 1);
    cb.send(&ClientFrame::Unblock { user: UserId(a) }).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    ca.send_message(3, UserId(b), b"friends again").unwrap();
    expect_send_ack(&mut ca, 3);
    assert_eq!(expect_deliver(&mut cb).2, b"friends again");
    node.shutdown().unwrap();
}

#[test]
fn bad_presence_input_gets_named_errors_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path()));
    let addr = node.local_addr;
    let mut bystander = login(addr, 9, 1);
    subscribe(&mut bystander, &[8]);
    presence_of(&mut bystander, 8);
    // User 0: non-fatal BAD_RECIPIENT.
    let mut c = login(addr, 1, 1);
    subscribe(&mut c, &[5, 0]);
    expect_error_with(&mut c, ErrorCode::BadRecipient, false, 0);
    // An empty list: fatal MALFORMED_FRAME naming the frame.
    let mut raw = bytes::BytesMut::new();
    ClientFrame::Subscribe { users: vec![] }.encode(&mut raw);
    c.send_raw(&raw).unwrap();
    let msg = expect_error_with(&mut c, ErrorCode::MalformedFrame, true, 0);
    assert!(msg.contains("SUBSCRIBE"), "{msg}");
    expect_closed(&mut c);
    // An unknown typing state: fatal MALFORMED_FRAME.
    let mut c = login(addr, 2, 1);
    c.send_raw(&[0, 0, 0, 10, 0x09, 0, 0, 0, 0, 0, 0, 0, 1, 7])
        .unwrap();
    let msg = expect_error_with(&mut c, ErrorCode::MalformedFrame, true, 0);
    assert!(msg.contains("typing state"), "{msg}");
    // SUBSCRIBE before login: fatal UNEXPECTED_FRAME.
    let mut c = Client::connect(addr, TIMEOUT).unwrap();
    subscribe(&mut c, &[1]);
    expect_error_with(&mut c, ErrorCode::UnexpectedFrame, true, 0);
    // The bystander still follows user 8.
    let _c8 = login(addr, 8, 1);
    assert_eq!(presence_of(&mut bystander, 8), (true, 0));
    node.shutdown().unwrap();
}
