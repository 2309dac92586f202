//! One client must never hurt the others: slow readers, oversize frames, garbage bytes and
//! silent peers are dropped while everyone else carries on.

mod common;
use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_reader_that_stops_reading_is_dropped_and_nobody_else_waits() {
    let server = start_with(|c| {
        c.hub.queue_frames = 64;
        c.hub.history_limit = 16;
        c.hub.channel_bytes = 4 << 20;
        c.session.write_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = server.addr;
    let mut stalled = join(addr, "stalled", "busy").await; // never reads again
    let mut fast = join(addr, "fast", "busy").await;
    let mut publisher = join(addr, "pub", "busy").await;
    let mut elsewhere_a = join(addr, "a", "quiet").await;
    let mut elsewhere_b = join(addr, "b", "quiet").await;
    recv_texts(&mut fast, 1).await;
    recv_texts(&mut elsewhere_b, 1).await;

    // Far more than the stalled member's socket buffers and queue can take.
    const FRAMES: usize = 600;
    let payload = vec![7u8; 64 * 1024];
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < FRAMES {
            match recv(&mut fast).await {
                Message::Binary(b) => {
                    assert_eq!(b.len(), 64 * 1024);
                    got += 1;
                }
                Message::Text(_) => {}
                other => panic!("fast member got {other:?}"),
            }
        }
        (got, fast)
    });
    for _ in 0..FRAMES {
        send_binary(&mut publisher, &payload).await;
    }
    let (got, _fast) = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(got, FRAMES);

    // Another channel is unaffected meanwhile.
    send_text(&mut elsewhere_a, "hello").await;
    assert_eq!(recv_text(&mut elsewhere_b).await, "hello");

    let shared = server.shared.clone();
    wait_until("the stalled member is cut off", WAIT, async || {
        shared.metrics.slow_consumers.get() == 1
    })
    .await;
    wait_until("the stalled member left", WAIT, async || {
        shared.hub.channel("busy").unwrap().member_count() == 2
    })
    .await;
    // The stalled client, reading at last, finds its stream ends (close or reset), not
    // the rest of the traffic.
    let mut frames = 0;
    loop {
        match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut stalled))
            .await
            .unwrap()
        {
            Some(Ok(Message::Binary(_))) => frames += 1,
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1013);
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert!(frames < FRAMES, "stalled member got everything ({frames})");
}

#[tokio::test]
async fn a_frame_over_the_size_limit_closes_that_connection_with_1009() {
    let server = start_with(|c| c.session.max_message_size = 1024).await;
    let mut big = join_now(&server, "big", "sz").await;
    let mut other = join(server.addr, "other", "sz").await;
    recv_text(&mut other).await;
    send_binary(&mut big, &[1u8; 1000]).await;
    assert_eq!(recv(&mut other).await, Message::binary(vec![1u8; 1000]));
    let _ = futures::SinkExt::send(&mut big, Message::binary(vec![2u8; 5000])).await;
    let (code, _) = expect_close(&mut big).await;
    assert_eq!(code, 1009);
    expect_nothing(&mut other, Duration::from_millis(200)).await;
    let mut third = join(server.addr, "third", "sz").await;
    send_text(&mut third, "after").await;
    assert_eq!(recv_text(&mut other).await, "after");
    assert_eq!(server.shared.metrics.oversize_messages.get(), 1);
}

#[tokio::test]
async fn garbage_bytes_are_dropped_and_the_server_carries_on() {
    let server = start().await;
    // Raw sockets on purpose throughout: no client library sends garbage, or garbage
    // after an upgrade. Garbage instead of HTTP.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = tcp.write_all(&garbage).await;
    let mut sink = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut sink))
        .await
        .expect("closed in time");
    assert!(read.is_err() || sink.is_empty() || sink.starts_with(b"HTTP/1.1 4"));

    // Garbage after a valid upgrade: not WebSocket frames.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let upgrade =
        "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Protocol: mles-websocket\r\n\r\n";
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let _ = tcp.write_all(&garbage).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    drop(read);

    let mut a = join_now(&server, "a", "after-garbage").await;
    let mut b = join(server.addr, "b", "after-garbage").await;
    recv_text(&mut b).await;
    send_text(&mut a, "fine").await;
    assert_eq!(recv_text(&mut b).await, "fine");
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_missed_pings_while_a_live_one_stays() {
    let server = start_with(|c| {
        c.session.ping_interval = Duration::from_millis(200);
        c.session.missed_pongs = 2;
    })
    .await;
    let silent = join(server.addr, "silent", "pings").await; // never polled: never pongs
    let mut live = join(server.addr, "live", "pings").await;
    let shared = server.shared.clone();
    // The live client answers pings because it keeps reading.
    let watcher = tokio::spawn(async move {
        expect_nothing_but_history(&mut live, Duration::from_millis(1500)).await;
        live
    });
    wait_until("silent member dropped", WAIT, async || {
        shared.hub.channel("pings").unwrap().member_count() == 1
    })
    .await;
    let mut live = watcher.await.unwrap();
    send_text(&mut live, "still connected").await;
    assert_eq!(
        server.shared.hub.channel("pings").unwrap().member_count(),
        1
    );
    drop(silent);
}

/// Reads for `quiet`, allowing only the channel's history (join frames).
async fn expect_nothing_but_history(ws: &mut Ws, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, futures::StreamExt::next(ws)).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(t)))) if t.starts_with('{') => {}
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_half_open_tcp_connection_is_dropped_by_the_handshake_timeout() {
    let server = start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    // A raw socket on purpose: the request is never finished.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: local")
        .await
        .unwrap(); // never finished
    let mut buf = Vec::new();
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("server closes it");
    assert!(started.elapsed() < Duration::from_secs(5));
}
