//! Overload degrades gracefully: when the server cannot write as fast as a publisher
//! sends, the publisher is slowed down (its socket is not read) instead of readers that keep
//! up being cut off; a reader that stops reading is cut and holds no one back; and a crowd
//! joining one channel at once forms it without anyone being cut.
//!
//! The rings here are small (`--queue-frames 64`), so each burst is far past what the
//! channel keeps: without the pause every reader would fall off the ring.

mod common;
use common::*;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// A server whose channels keep little, with no per-address limits (every test client is
/// 127.0.0.1).
async fn small_rings() -> TestServer {
    start_with(|c| {
        c.hub.history_limit = 16;
        c.hub.queue_frames = 64;
        c.ip_rate = None;
        c.per_ip_limit = None;
        c.session.message_rate = None;
    })
    .await
}

/// Reads until `want` binary frames arrived, checking they come in order; returns how
/// many arrived, or panics on a close frame.
async fn read_in_order(ws: &mut Ws, want: u32, limit: Duration) -> u32 {
    let mut next = 0u32;
    let deadline = tokio::time::Instant::now() + limit;
    while next < want {
        let msg = tokio::time::timeout_at(deadline, recv(ws))
            .await
            .unwrap_or_else(|_| panic!("only {next} of {want} frames in time"));
        match msg {
            Message::Binary(b) => {
                let n = u32::from_be_bytes(b[..4].try_into().unwrap());
                assert_eq!(n, next, "frames out of order or lost");
                next += 1;
            }
            Message::Text(_) => {} // join frames in history
            Message::Close(close) => panic!("cut off after {next} frames: {close:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    next
}

/// A frame numbered `n`, `size` bytes long.
fn numbered(n: u32, size: usize) -> Vec<u8> {
    let mut frame = vec![0u8; size];
    frame[..4].copy_from_slice(&n.to_be_bytes());
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_into_readers_that_keep_up_cuts_nobody_and_loses_nothing() {
    const READERS: usize = 20;
    const FRAMES: u32 = 3000;
    let server = small_rings().await;
    let mut readers = Vec::new();
    for i in 0..READERS {
        readers.push(join_now(&server, &format!("r{i}"), "burst").await);
    }
    let mut publisher = join_now(&server, "pub", "burst").await;
    let reading: Vec<_> = readers
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { read_in_order(&mut ws, FRAMES, WAIT * 6).await }))
        .collect();
    // Flat out: no window, every frame as fast as the socket takes it.
    for n in 0..FRAMES {
        send_binary(&mut publisher, &numbered(n, 128)).await;
    }
    for reader in reading {
        assert_eq!(reader.await.unwrap(), FRAMES);
    }
    assert_eq!(
        server.shared.metrics.slow_consumers.get(),
        0,
        "a reader was cut off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_cut_off_and_holds_no_one_back() {
    const READERS: usize = 5;
    const FRAMES: u32 = 3000;
    // Frames large enough that the stopped reader's socket buffers fill long before the end.
    const SIZE: usize = 16 * 1024;
    let server = small_rings().await;
    let mut stopped = join_now(&server, "stopped", "burst").await;
    let mut readers = Vec::new();
    for i in 0..READERS {
        readers.push(join_now(&server, &format!("r{i}"), "burst").await);
    }
    let mut publisher = join_now(&server, "pub", "burst").await;
    let reading: Vec<_> = readers
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { read_in_order(&mut ws, FRAMES, WAIT * 6).await }))
        .collect();
    for n in 0..FRAMES {
        send_binary(&mut publisher, &numbered(n, SIZE)).await;
    }
    for reader in reading {
        assert_eq!(
            reader.await.unwrap(),
            FRAMES,
            "a reader that keeps up lost frames"
        );
    }
    let shared = server.shared.clone();
    wait_until("the stopped reader is cut off", WAIT, async || {
        shared.metrics.slow_consumers.get() == 1
    })
    .await;
    // Reading at last, it finds what fitted its socket buffers, then the 1013.
    loop {
        match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut stopped))
            .await
            .expect("the stopped reader's stream ends in time")
        {
            Some(Ok(Message::Close(Some(close)))) => {
                assert_eq!(u16::from(close.code), 1013);
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a 1013 close, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_joining_one_channel_at_once_forms_it_and_everyone_gets_the_next_frame() {
    // Each join frame used to be walked past by every member that joined before, and a
    // crowd larger than the ring cut its earliest members off.
    const CROWD: usize = 500;
    let server = small_rings().await;
    let addr = server.addr;
    let joining: Vec<_> = (0..CROWD)
        .map(|i| tokio::spawn(async move { join(addr, &format!("m{i}"), "crowd").await }))
        .collect();
    let mut members = Vec::new();
    for member in joining {
        members.push(member.await.unwrap());
    }
    let shared = server.shared.clone();
    wait_until("the crowd joined", WAIT * 3, async || {
        shared
            .hub
            .channel("crowd")
            .is_some_and(|c| c.client_count() == CROWD)
    })
    .await;
    let mut publisher = join_now(&server, "pub", "crowd").await;
    send_text(&mut publisher, "hello, crowd").await;
    for (i, ws) in members.iter_mut().enumerate() {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, recv(ws))
                .await
                .unwrap_or_else(|_| panic!("member {i} never got the frame"));
            match msg {
                Message::Text(t) if t.as_str() == "hello, crowd" => break,
                Message::Text(_) => continue, // join frames in history
                other => panic!("member {i} got {other:?}"),
            }
        }
    }
    assert_eq!(server.shared.metrics.slow_consumers.get(), 0);
}
