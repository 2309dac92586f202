//! Limits on everything a client can make the server hold, each shown on both sides.

mod common;
use common::*;
use http::Method;
use std::net::SocketAddr;
use std::time::Duration;

/// True when the server closes a fresh connection from `from` without answering a request
/// (it is refused before any HTTP work); false when /health is answered.
async fn refused_at_accept(addr: SocketAddr, from: [u8; 4]) -> bool {
    let client = http_client::Http::with(http_client::HttpOptions {
        local_address: Some(from.into()),
        ..Default::default()
    });
    match client
        .try_send(Method::GET, addr, "/health", &[("host", "localhost")], b"")
        .await
    {
        Ok(reply) => {
            assert_eq!(reply.status, 200, "{reply:?}");
            false
        }
        Err(e) => {
            assert!(
                !e.is_timeout(),
                "neither answered nor closed in time: {e:?}"
            );
            true
        }
    }
}

/// Panics unless /metrics counts `n` connections refused for `reason`.
fn assert_refusals(server: &TestServer, reason: &str, n: u64) {
    let metrics = server.shared.metrics.render();
    let line = format!("mles_connections_refused_total{{reason=\"{reason}\"}} {n}\n");
    assert!(metrics.contains(&line), "no {line:?} in {metrics}");
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_until_one_closes() {
    let server = start_with(|c| c.max_connections = 3).await;
    let a = join(server.addr, "a", "full").await;
    let _b = join(server.addr, "b", "full").await;
    let _c = join(server.addr, "c", "full").await;
    assert!(refused_at_accept(server.addr, [127, 0, 0, 1]).await);
    drop(a);
    let shared = server.shared.clone();
    wait_until("a's permit returned", WAIT, async || {
        shared.metrics.connections_open.get() == 2
    })
    .await;
    let _d = join(server.addr, "d", "full").await;
    assert_refusals(&server, "max_connections", 1);
}

#[tokio::test]
async fn each_address_gets_its_connection_rate_and_no_more() {
    let server = start_with(|c| c.ip_rate = Some(5)).await;
    for _ in 0..5 {
        assert!(!refused_at_accept(server.addr, [127, 0, 0, 1]).await);
    }
    assert!(refused_at_accept(server.addr, [127, 0, 0, 1]).await);
    // Another loopback address has its own budget.
    assert!(!refused_at_accept(server.addr, [127, 0, 0, 2]).await);
    assert_refusals(&server, "ip_rate", 1);
}

#[tokio::test]
async fn each_address_holds_its_share_of_connections_until_one_closes() {
    let server = start_with(|c| c.per_ip_limit = Some(2)).await;
    let first = join(server.addr, "first", "share").await;
    let _second = join(server.addr, "second", "share").await;
    assert!(refused_at_accept(server.addr, [127, 0, 0, 1]).await);
    // Another address is not held back by this one.
    assert!(!refused_at_accept(server.addr, [127, 0, 0, 2]).await);
    assert_refusals(&server, "per_ip_limit", 1);
    // The place comes back when a connection closes.
    drop(first);
    wait_until("the place to come back", WAIT, async || {
        !refused_at_accept(server.addr, [127, 0, 0, 1]).await
    })
    .await;
}

#[tokio::test]
async fn a_client_over_its_message_rate_is_closed_and_one_under_it_is_not() {
    let server = start_with(|c| c.session.message_rate = Some((5, Duration::from_secs(60)))).await;
    let mut steady = join(server.addr, "steady", "rate").await;
    let mut flood = join(server.addr, "flood", "rate").await;
    for i in 0..5 {
        send_text(&mut steady, &format!("{i}")).await;
    }
    for i in 0..6 {
        let _ = futures::SinkExt::send(
            &mut flood,
            tokio_tungstenite::tungstenite::Message::text(format!("{i}")),
        )
        .await;
    }
    let (code, reason) = loop {
        match recv(&mut flood).await {
            tokio_tungstenite::tungstenite::Message::Close(Some(f)) => {
                break (u16::from(f.code), f.reason.to_string())
            }
            _ => continue,
        }
    };
    assert_eq!(
        (code, reason.as_str()),
        (1008, "message rate limit exceeded")
    );
    // The steady client got exactly the five frames the flooder was allowed.
    let texts: Vec<String> = recv_texts(&mut steady, 5).await;
    assert_eq!(texts, vec!["0", "1", "2", "3", "4"]);
    assert_eq!(server.shared.metrics.rate_limited.get(), 1);
}

#[tokio::test]
async fn idle_clients_are_closed_and_active_ones_are_not() {
    let server = start_with(|c| c.session.idle_timeout = Some(Duration::from_millis(600))).await;
    // Before connecting: the server's idle clock starts later, so this bounds it from below.
    let started = std::time::Instant::now();
    let mut idle = join(server.addr, "idle", "quiet").await;
    let mut busy = join(server.addr, "busy", "quiet").await;
    let keep_busy = tokio::spawn(async move {
        for _ in 0..8 {
            send_text(&mut busy, "tick").await;
            // The behaviour under test: a client that sends every 150 ms is never idle
            // for the 600 ms timeout.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        busy
    });
    let mut ticks = 0;
    let (code, reason) = loop {
        match recv(&mut idle).await {
            tokio_tungstenite::tungstenite::Message::Close(Some(f)) => {
                break (u16::from(f.code), f.reason.to_string())
            }
            _ => ticks += 1,
        }
    };
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(ticks > 0);
    let mut busy = keep_busy.await.unwrap();
    send_text(&mut busy, "still open").await;
    let shared = server.shared.clone();
    wait_until("busy still joined", WAIT, async || {
        shared.hub.channel("quiet").unwrap().member_count() == 1
    })
    .await;
}

#[tokio::test]
async fn connections_older_than_the_maximum_age_are_closed() {
    let server = start_with(|c| c.session.max_age = Some(Duration::from_millis(400))).await;
    let mut ws = join(server.addr, "old", "age").await;
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(
        (code, reason.as_str()),
        (1001, "maximum connection age reached")
    );
}

#[tokio::test]
async fn a_full_channel_refuses_another_member_but_other_channels_do_not() {
    let server = start_with(|c| c.hub.max_members = Some(2)).await;
    let _a = join(server.addr, "a", "small").await;
    let _b = join(server.addr, "b", "small").await;
    let mut c = join(server.addr, "c", "small").await;
    let (code, reason) = expect_close(&mut c).await;
    assert_eq!((code, reason.as_str()), (1008, "channel is full"));
    let mut d = join(server.addr, "d", "other").await;
    send_text(&mut d, "fine").await;
    expect_nothing(&mut d, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_channel_over_its_message_limit_closes_the_publisher() {
    // Two join frames and three messages: join frames count, as they take history too.
    let server = start_with(|c| c.hub.max_messages = Some(5)).await;
    let mut a = join_now(&server, "a", "capped").await;
    let mut b = join(server.addr, "b", "capped").await;
    recv_text(&mut b).await;
    for i in 0..4 {
        let _ = futures::SinkExt::send(
            &mut a,
            tokio_tungstenite::tungstenite::Message::text(format!("{i}")),
        )
        .await;
    }
    assert_eq!(recv_texts(&mut b, 3).await, vec!["0", "1", "2"]);
    let (code, reason) = expect_close(&mut a).await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "channel message limit reached")
    );
    expect_nothing(&mut b, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_channel_past_its_lifespan_closes_its_members_and_starts_afresh() {
    let server = start_with(|c| c.hub.lifespan = Some(Duration::from_millis(500))).await;
    let mut a = join(server.addr, "a", "brief").await;
    send_text(&mut a, "old news").await;
    let (code, reason) = expect_close(&mut a).await;
    assert_eq!((code, reason.as_str()), (1008, "channel lifespan over"));
    let mut b = join(server.addr, "b", "brief").await;
    expect_nothing(&mut b, Duration::from_millis(200)).await; // no old history
}

#[tokio::test]
async fn presence_notices_go_only_to_members_that_asked() {
    let server = start().await;
    let mut watcher = connect(server.addr).await;
    send_text(&mut watcher, r#"{"uid":"w","channel":"p","presence":true}"#).await;
    let mut plain = join(server.addr, "plain", "p").await;
    assert_eq!(
        recv_text(&mut watcher).await,
        r#"{"presence":"joined","uid":"plain","channel":"p"}"#
    );
    let bob = join(server.addr, "bob", "p").await;
    assert_eq!(
        recv_text(&mut watcher).await,
        r#"{"presence":"joined","uid":"bob","channel":"p"}"#
    );
    drop(bob);
    assert_eq!(
        recv_text(&mut watcher).await,
        r#"{"presence":"left","uid":"bob","channel":"p"}"#
    );
    // The plain member sees only the history it joined to: w's join frame.
    assert_eq!(
        recv_text(&mut plain).await,
        r#"{"uid":"w","channel":"p","presence":true}"#
    );
    expect_nothing(&mut plain, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn past_the_channel_cap_idle_channels_make_room_and_busy_ones_are_kept() {
    let server = start_with(|c| c.hub.max_channels = 2).await;
    let mut a = join(server.addr, "a", "first").await;
    send_text(&mut a, "old").await;
    drop(a);
    let shared = server.shared.clone();
    wait_until("first is idle", WAIT, async || {
        shared.metrics.messages_in.get() == 1
            && shared.hub.channel("first").map(|c| c.member_count()) == Some(0)
    })
    .await;
    let _b = join(server.addr, "b", "second").await;
    let _c = join(server.addr, "c", "third").await;
    wait_until("first evicted", WAIT, async || {
        shared.hub.channel("first").is_none()
    })
    .await;
    // Every channel has members now: a new one is refused, existing ones still join.
    let mut d = join(server.addr, "d", "fourth").await;
    let (code, reason) = expect_close(&mut d).await;
    assert_eq!(
        (code, reason.as_str()),
        (1013, "server channel limit reached")
    );
    let mut e = join(server.addr, "e", "second").await;
    assert_eq!(recv_text(&mut e).await, join_frame("b", "second"));
}
