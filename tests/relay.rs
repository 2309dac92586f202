//! Relay: frames go byte-exact to every other member of the channel, and nowhere else.

mod common;
use common::*;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn text_frames_reach_every_other_member_in_order() {
    let server = start().await;
    let mut a = join_now(&server, "a", "room").await;
    let mut b = join_now(&server, "b", "room").await;
    let mut c = join(server.addr, "c", "room").await;
    // b and c first see the join frames of those before them.
    assert_eq!(recv_text(&mut b).await, join_frame("a", "room"));
    assert_eq!(
        recv_texts(&mut c, 2).await,
        vec![join_frame("a", "room"), join_frame("b", "room")]
    );
    for i in 0..20 {
        send_text(&mut a, &format!("msg {i}")).await;
    }
    let want: Vec<String> = (0..20).map(|i| format!("msg {i}")).collect();
    assert_eq!(recv_texts(&mut b, 20).await, want);
    assert_eq!(recv_texts(&mut c, 20).await, want);
}

#[tokio::test]
async fn binary_frames_arrive_byte_exact_and_as_binary() {
    let server = start().await;
    let mut a = join_now(&server, "a", "bin").await;
    let mut b = join(server.addr, "b", "bin").await;
    recv_text(&mut b).await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    send_binary(&mut a, &payload).await;
    send_text(&mut a, "ünïcödé ✓").await;
    assert_eq!(recv(&mut b).await, Message::binary(payload));
    assert_eq!(recv(&mut b).await, Message::text("ünïcödé ✓"));
}

#[tokio::test]
async fn a_sender_never_gets_its_own_frames_back() {
    let server = start().await;
    let mut a = join_now(&server, "a", "echo").await;
    let mut b = join(server.addr, "b", "echo").await;
    recv_text(&mut b).await;
    send_text(&mut a, "from a").await;
    assert_eq!(recv_text(&mut b).await, "from a");
    send_text(&mut b, "from b").await;
    // a joined first, so b's join frame is not live for it: the next frame is b's message.
    assert_eq!(recv_text(&mut a).await, "from b");
    expect_nothing(&mut b, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn channels_are_isolated_from_each_other() {
    let server = start().await;
    let mut a = join(server.addr, "a", "one").await;
    let mut b = join(server.addr, "b", "two").await;
    send_text(&mut a, "only for one").await;
    expect_nothing(&mut b, Duration::from_millis(300)).await;
    // Same uid on different channels is fine.
    let mut a2 = join(server.addr, "a", "two").await;
    send_text(&mut b, "for two").await;
    assert_eq!(recv_text(&mut a2).await, join_frame("b", "two"));
    assert_eq!(recv_text(&mut a2).await, "for two");
}

#[tokio::test]
async fn a_second_connection_with_the_same_uid_is_refused_and_the_first_carries_on() {
    let server = start().await;
    let mut first = join_now(&server, "dup", "room").await;
    let mut other = join(server.addr, "other", "room").await;
    recv_text(&mut other).await;
    let mut second = join(server.addr, "dup", "room").await;
    let (code, reason) = expect_close(&mut second).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("uid"), "reason: {reason}");
    send_text(&mut first, "still here").await;
    assert_eq!(recv_text(&mut other).await, "still here");
}
