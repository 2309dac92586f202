//! Resume: a client that asks for position marks can reconnect with the last one and get
//! exactly what it missed — or is told it cannot and gets the history as usual. Plain
//! Mles v2 clients see nothing of it.

mod common;
use common::resume::*;
use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

async fn publish(addr: SocketAddr, channel: &str, from: std::ops::Range<usize>) {
    let mut publisher = join(addr, "publisher", channel).await;
    for i in from {
        send_text(&mut publisher, &format!("m{i}")).await;
    }
    // The publisher stays until its frames are in: its last one comes back to nobody, so
    // wait for the channel to hold it.
    drop(publisher);
}

fn frames(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Waits until the channel's ring holds `n` frames past its join frames.
async fn wait_for_frames(server: &TestServer, channel: &str, last: &str) {
    let shared = server.shared.clone();
    let last = last.to_string();
    wait_until("the frames stored", WAIT, async || {
        shared.hub.channel(channel).is_some_and(|c| {
            c.history()
                .iter()
                .any(|e| e.frame.as_text() == Some(last.as_str()))
        })
    })
    .await;
}

#[tokio::test]
async fn a_client_that_missed_k_frames_gets_exactly_those_k() {
    let server = start_with(|c| c.hub.history_limit = 50).await;
    publish(server.addr, "news", 0..10).await;
    wait_for_frames(&server, "news", "m9").await;
    let mut ws = join(server.addr, "reader", "news").await;
    // A plain join: no marks. Now one that asks for them.
    drop(ws);
    ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("reader2", "news", None)).await;
    let first = receive(&mut ws, 10).await;
    assert_eq!(first.data, frames(0..10));
    assert_eq!(first.recovered, None, "no since, no answer");
    let token = first.last_mark.expect("a position mark after the history");
    drop(ws);

    // Away while 7 frames go by.
    publish(server.addr, "news", 10..17).await;
    wait_for_frames(&server, "news", "m16").await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("reader2", "news", Some(&token))).await;
    let back = receive(&mut ws, 7).await;
    assert_eq!(back.recovered, Some(true));
    assert_eq!(back.data, frames(10..17), "exactly the missed frames");
    // Live frames follow with no gap and no duplicate.
    publish(server.addr, "news", 17..19).await;
    let live = receive(&mut ws, 2).await;
    assert_eq!(live.data, frames(17..19));
    let metrics = server.shared.metrics.render();
    assert!(
        metrics.contains(r#"mles_resumes_total{result="recovered"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_that_missed_nothing_gets_only_live_frames() {
    let server = start().await;
    publish(server.addr, "quiet", 0..5).await;
    wait_for_frames(&server, "quiet", "m4").await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("r", "quiet", None)).await;
    let token = receive(&mut ws, 5).await.last_mark.unwrap();
    drop(ws);
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("r", "quiet", Some(&token))).await;
    let back = receive(&mut ws, 0).await;
    assert_eq!(back.recovered, Some(true));
    assert!(back.data.is_empty(), "replayed {:?}", back.data);
    publish(server.addr, "quiet", 5..6).await;
    assert_eq!(receive(&mut ws, 1).await.data, frames(5..6));
}

#[tokio::test]
async fn a_token_older_than_the_history_gets_recovered_false_and_the_history() {
    let server = start_with(|c| c.hub.history_limit = 5).await;
    publish(server.addr, "fast", 0..3).await;
    wait_for_frames(&server, "fast", "m2").await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("r", "fast", None)).await;
    let token = receive(&mut ws, 3).await.last_mark.unwrap();
    drop(ws);
    publish(server.addr, "fast", 3..20).await;
    wait_for_frames(&server, "fast", "m19").await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("r", "fast", Some(&token))).await;
    let back = receive(&mut ws, 1).await;
    assert_eq!(back.recovered, Some(false));
    // The normal history: the last --limit frames (join frames among them filtered out).
    assert!(back.data.last().is_some_and(|l| l == "m19"), "{back:?}");
    assert!(back.data.len() <= 5);
}

#[tokio::test]
async fn garbage_overlong_and_other_channel_tokens_get_recovered_false() {
    let server = start().await;
    publish(server.addr, "a", 0..2).await;
    publish(server.addr, "b", 0..2).await;
    wait_for_frames(&server, "b", "m1").await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("r", "a", None)).await;
    let token_of_a = receive(&mut ws, 2).await.last_mark.unwrap();
    drop(ws);
    // Longer than any token, yet inside the join frame's own bound.
    let overlong = "A".repeat(1_000);
    for (i, token) in ["garbage", "", overlong.as_str(), token_of_a.as_str()]
        .iter()
        .enumerate()
    {
        let mut ws = connect(server.addr).await;
        send_text(&mut ws, &resuming_join(&format!("r{i}"), "b", Some(token))).await;
        let back = receive(&mut ws, 2).await;
        assert_eq!(back.recovered, Some(false), "token {i}");
        assert_eq!(back.data, frames(0..2), "token {i}: the normal history");
    }
    // A token that is not even a string is a bad token, not a refused join.
    let mut ws = connect(server.addr).await;
    send_text(
        &mut ws,
        r#"{"uid":"x","channel":"b","since":42,"positions":true}"#,
    )
    .await;
    let back = receive(&mut ws, 2).await;
    assert_eq!(back.recovered, Some(false));
}

/// Tokens are checksummed with a public hash, so anyone can forge one that parses: one
/// naming a place the channel has not reached (which would have the client skip every
/// frame up to it), or a numbering the channel never had. Both get recovered:false and
/// the normal history, and live frames follow.
#[tokio::test]
async fn forged_tokens_for_a_future_place_or_another_epoch_get_recovered_false() {
    use mles::protocol::Position;
    let server = start().await;
    publish(server.addr, "f", 0..2).await;
    wait_for_frames(&server, "f", "m1").await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("r", "f", None)).await;
    let real = receive(&mut ws, 2).await.last_mark.unwrap();
    drop(ws);
    let real = Position::from_token(&real, "f").expect("the server's own token parses");
    let future = Position {
        next: real.next + 1_000,
        ..real
    };
    let other_epoch = Position {
        epoch: real.epoch ^ 1,
        ..real
    };
    let mut history = frames(0..2);
    for (i, forged) in [future, other_epoch].iter().enumerate() {
        let mut ws = connect(server.addr).await;
        let token = forged.token("f");
        send_text(&mut ws, &resuming_join(&format!("r{i}"), "f", Some(&token))).await;
        let back = receive(&mut ws, history.len()).await;
        assert_eq!(back.recovered, Some(false), "forged token {i}");
        assert_eq!(back.data, history, "forged token {i}: the normal history");
        publish(server.addr, "f", 10 + i..11 + i).await;
        let live = receive(&mut ws, 1).await;
        assert_eq!(
            live.data,
            frames(10 + i..11 + i),
            "forged token {i}: live frames"
        );
        history.extend(live.data);
    }
}

#[tokio::test]
async fn resume_works_across_a_graceful_restart_with_a_cache() {
    let cache = tempfile::tempdir().unwrap();
    async fn with_cache(cache: &Path) -> TestServer {
        let cache = cache.to_path_buf();
        start_with(move |c| c.cache = Some(cache)).await
    }
    let server = with_cache(cache.path()).await;
    publish(server.addr, "kept", 0..4).await;
    wait_for_frames(&server, "kept", "m3").await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("r", "kept", None)).await;
    let token = receive(&mut ws, 4).await.last_mark.unwrap();
    drop(ws);
    publish(server.addr, "kept", 4..7).await;
    wait_for_frames(&server, "kept", "m6").await;
    server.stop().await;

    let server = with_cache(cache.path()).await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("r", "kept", Some(&token))).await;
    let back = receive(&mut ws, 3).await;
    assert_eq!(back.recovered, Some(true));
    assert_eq!(back.data, frames(4..7));
    server.stop().await;

    // Without a cache a restarted server cannot know the position.
    let plain = start().await;
    publish(plain.addr, "gone", 0..2).await;
    wait_for_frames(&plain, "gone", "m1").await;
    let mut ws = connect(plain.addr).await;
    send_text(&mut ws, &resuming_join("r", "gone", None)).await;
    let token = receive(&mut ws, 2).await.last_mark.unwrap();
    drop(ws);
    plain.stop().await;
    let plain = start().await;
    publish(plain.addr, "gone", 5..6).await;
    wait_for_frames(&plain, "gone", "m5").await;
    let mut ws = connect(plain.addr).await;
    send_text(&mut ws, &resuming_join("r", "gone", Some(&token))).await;
    assert_eq!(receive(&mut ws, 1).await.recovered, Some(false));
}

#[tokio::test]
async fn a_plain_mles_v2_client_sees_no_marks_and_no_answers() {
    let server = start().await;
    let mut plain = join_now(&server, "plain", "mixed").await;
    let mut modern = connect(server.addr).await;
    send_text(&mut modern, &resuming_join("modern", "mixed", None)).await;
    let mut publisher = join(server.addr, "publisher", "mixed").await;
    for i in 0..5 {
        send_text(&mut publisher, &format!("m{i}")).await;
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(recv_text(&mut plain).await);
    }
    // Exactly what mles v2 sends: the join frames of later members stay in history, so
    // the plain client gets just the five frames (and nothing more).
    let data: Vec<_> = got
        .iter()
        .filter(|t| !t.starts_with('{'))
        .cloned()
        .collect();
    assert_eq!(data, frames(0..5));
    assert!(
        !got.iter()
            .any(|t| t.contains("position") || t.contains("recovered")),
        "{got:?}"
    );
    expect_nothing(&mut plain, Duration::from_millis(300)).await;
    let modern = receive(&mut modern, 5).await;
    assert!(modern.marks >= 1);
}

#[tokio::test]
async fn a_resuming_client_does_not_get_its_own_frames_back() {
    let server = start().await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("talker", "own", None)).await;
    assert!(receive(&mut ws, 0).await.last_mark.is_some());
    let token;
    for i in 0..3 {
        send_text(&mut ws, &format!("mine {i}")).await;
    }
    // Marks move past its own frames.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = receive(&mut ws, 0).await;
        if let Some(mark) = got.last_mark {
            token = mark;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no mark after its own frames"
        );
    }
    drop(ws);
    publish(server.addr, "own", 0..2).await;
    wait_for_frames(&server, "own", "m1").await;
    let mut ws = connect(server.addr).await;
    send_text(&mut ws, &resuming_join("talker", "own", Some(&token))).await;
    let back = receive(&mut ws, 2).await;
    assert_eq!(back.recovered, Some(true));
    assert_eq!(back.data, frames(0..2), "only what others sent");
}
