//! History: each channel replays its last frames, in order, to every new member, and the
//! switch from history to live traffic has no gap and no duplicate.

mod common;
use common::*;
use std::collections::HashSet;

#[tokio::test]
async fn a_late_joiner_gets_the_last_limit_frames_in_order_then_live_ones() {
    let server = start_with(|c| c.hub.history_limit = 5).await;
    let mut a = join(server.addr, "a", "h").await;
    for i in 0..10 {
        send_text(&mut a, &format!("{i}")).await;
    }
    // Wait until the server has stored all ten before the late join.
    let shared = server.shared.clone();
    wait_until("history stored", WAIT, async || {
        shared.metrics.messages_in.get() == 10
    })
    .await;
    let mut late = join(server.addr, "late", "h").await;
    assert_eq!(
        recv_texts(&mut late, 5).await,
        vec!["5", "6", "7", "8", "9"]
    );
    send_text(&mut a, "live").await;
    assert_eq!(recv_text(&mut late).await, "live");
}

#[tokio::test]
async fn join_frames_are_kept_in_history_without_auth() {
    let server = start().await;
    let mut a = connect(server.addr).await;
    let token = mles::protocol::auth_token("a", "auth-h", None);
    send_text(
        &mut a,
        &format!(r#"{{"uid":"a","channel":"auth-h","auth":"{token}","x":1}}"#),
    )
    .await;
    send_text(&mut a, "hi").await;
    let mut b = join(server.addr, "b", "auth-h").await;
    assert_eq!(
        recv_text(&mut b).await,
        r#"{"uid":"a","channel":"auth-h","x":1}"#
    );
    assert_eq!(recv_text(&mut b).await, "hi");
}

#[tokio::test]
async fn history_survives_everyone_leaving() {
    let server = start().await;
    let mut a = join(server.addr, "a", "kept").await;
    send_text(&mut a, "remember me").await;
    drop(a);
    let shared = server.shared.clone();
    wait_until("a left", WAIT, async || {
        shared.hub.channel("kept").map(|c| c.member_count()) == Some(0)
    })
    .await;
    let mut b = join(server.addr, "b", "kept").await;
    assert_eq!(recv_text(&mut b).await, join_frame("a", "kept"));
    assert_eq!(recv_text(&mut b).await, "remember me");
}

#[tokio::test]
async fn joining_during_heavy_traffic_has_no_gap_and_no_duplicate() {
    const FRAMES: usize = 3000;
    let server = start_with(|c| {
        c.hub.history_limit = 200;
        c.hub.queue_frames = 4096;
        c.session.message_rate = None; // the publisher floods on purpose
    })
    .await;
    let mut publisher = join(server.addr, "pub", "busy").await;
    let addr = server.addr;
    let sender = tokio::spawn(async move {
        for i in 0..FRAMES {
            send_text(&mut publisher, &format!("{i}")).await;
        }
        publisher
    });
    // Join while the publisher is mid-stream.
    let shared = server.shared.clone();
    wait_until("traffic under way", WAIT, async || {
        shared.metrics.messages_in.get() >= 500
    })
    .await;
    let mut late = join(addr, "late", "busy").await;
    let mut seen = Vec::new();
    loop {
        let text = recv_text(&mut late).await;
        if text.starts_with('{') {
            continue; // the publisher's join frame, if still in history
        }
        let n: usize = text.parse().unwrap();
        seen.push(n);
        if n == FRAMES - 1 {
            break;
        }
    }
    let _publisher = sender.await.unwrap();
    let first = seen[0];
    assert!(
        first > 0,
        "history started at {first}: the limit was not applied"
    );
    let expected: Vec<usize> = (first..FRAMES).collect();
    assert_eq!(seen.len(), expected.len(), "gap or duplicate");
    assert_eq!(seen, expected);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len());
}
