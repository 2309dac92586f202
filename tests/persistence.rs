//! History on disk: a restart, graceful or `kill -9`, brings channel history back; damaged
//! history files are detected and skipped without taking the server down.

mod common;
use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

async fn with_cache(cache: &Path) -> TestServer {
    let cache = cache.to_path_buf();
    start_with(move |c| c.cache = Some(cache)).await
}

/// Data frames (not join frames) in a late joiner's history: `expect` of them, and any
/// more that follow (which the callers' comparisons then refuse).
async fn history_of(addr: SocketAddr, channel: &str, expect: usize) -> Vec<String> {
    let mut ws = join(addr, "reader", channel).await;
    collect(&mut ws, expect, WAIT).await
}

/// Whether some history log under `dir` holds `bytes` (a frame's payload is stored as it
/// is).
fn logs_contain(dir: &Path, bytes: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path()).ok())
        .any(|data| data.windows(bytes.len()).any(|w| w == bytes))
}

#[tokio::test]
async fn history_comes_back_after_a_graceful_restart() {
    let cache = tempfile::tempdir().unwrap();
    let server = with_cache(cache.path()).await;
    let mut a = join(server.addr, "a", "saved").await;
    for i in 0..25 {
        send_text(&mut a, &format!("m{i}")).await;
    }
    send_binary(&mut a, &[0, 1, 2, 255]).await;
    let shared = server.shared.clone();
    wait_until("stored", WAIT, async || {
        shared.metrics.messages_in.get() == 26
    })
    .await;
    drop(a);
    server.stop().await;

    let server = with_cache(cache.path()).await;
    let mut b = join(server.addr, "b", "saved").await;
    assert_eq!(recv_text(&mut b).await, join_frame("a", "saved"));
    for i in 0..25 {
        assert_eq!(recv_text(&mut b).await, format!("m{i}"));
    }
    assert_eq!(
        recv(&mut b).await,
        tokio_tungstenite::tungstenite::Message::binary(vec![0u8, 1, 2, 255])
    );
}

#[tokio::test]
async fn history_is_bounded_on_disk_by_compaction() {
    let cache = tempfile::tempdir().unwrap();
    async fn small(cache: &Path) -> TestServer {
        let cache = cache.to_path_buf();
        start_with(move |c| {
            c.cache = Some(cache);
            c.hub.history_limit = 10;
            c.hub.queue_frames = 10;
        })
        .await
    }
    let server = small(cache.path()).await;
    let mut a = join(server.addr, "a", "compact").await;
    for i in 0..500 {
        send_text(&mut a, &format!("frame {i:04}")).await;
    }
    let shared = server.shared.clone();
    wait_until("stored", WAIT, async || {
        shared.metrics.messages_in.get() == 500
    })
    .await;
    server.stop().await;
    let log = std::fs::read_dir(cache.path().join("history"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let size = log.metadata().unwrap().len();
    assert!(
        size < 60 * 50,
        "log holds {size} bytes for a 10-frame history"
    );
    let server = small(cache.path()).await;
    let got = history_of(server.addr, "compact", 10).await;
    let want: Vec<String> = (490..500).map(|i| format!("frame {i:04}")).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn damaged_history_files_are_detected_and_skipped() {
    let cache = tempfile::tempdir().unwrap();
    let server = with_cache(cache.path()).await;
    let mut a = join(server.addr, "a", "damaged").await;
    for i in 0..5 {
        send_text(&mut a, &format!("ok {i}")).await;
    }
    let shared = server.shared.clone();
    wait_until("stored", WAIT, async || {
        shared.metrics.messages_in.get() == 5
    })
    .await;
    drop(a);
    server.stop().await;
    let dir = cache.path().join("history");
    let log = mles::store::log_path(&dir, "damaged");
    let mut bytes = std::fs::read(&log).unwrap();
    let len = bytes.len();
    bytes[len - 3] ^= 0x55; // damage the last record
    bytes.extend_from_slice(&[1, 2, 3]); // and a torn write after it
    std::fs::write(&log, &bytes).unwrap();
    // A log of the earlier format (named by the channel in hex), damaged from its start.
    std::fs::write(
        dir.join(format!("{}.log", hex::encode("garbage"))),
        b"\xff\xff\xff\xffnot a log",
    )
    .unwrap();
    std::fs::write(dir.join("not-hex.log"), b"whatever").unwrap();

    let server = with_cache(cache.path()).await;
    // The old-format file is looked at when the server starts; a channel's own log when
    // the channel is next used.
    assert_eq!(server.shared.metrics.history_corrupt_files.get(), 1);
    let got = history_of(server.addr, "damaged", 4).await;
    assert_eq!(got, vec!["ok 0", "ok 1", "ok 2", "ok 3"]);
    assert_eq!(server.shared.metrics.history_corrupt_files.get(), 2);
    // The damaged channel and the rest of the server work as usual.
    let mut w = join(server.addr, "w", "damaged").await;
    let mut r = join_now(&server, "r", "fresh").await;
    send_text(&mut w, "new").await;
    let mut r2 = join(server.addr, "r2", "fresh").await;
    send_text(&mut r, "fresh works").await;
    assert_eq!(recv_text(&mut r2).await, join_frame("r", "fresh"));
    assert_eq!(recv_text(&mut r2).await, "fresh works");
}

#[tokio::test]
async fn history_survives_kill_9_within_the_documented_bound() {
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cache_arg = [std::ffi::OsStr::new("--cache"), cache.path().as_os_str()];
    let mut process = spawn_binary(port, &cache_arg).await;
    let mut a = join(addr, "a", "crash").await;
    let mut b = join(addr, "b", "crash").await;
    for i in 0..30 {
        send_text(&mut a, &format!("c{i}")).await;
    }
    // Acknowledged: another member has it (a's join frame comes first if a's join was
    // taken before b's).
    let want: Vec<String> = (0..30).map(|i| format!("c{i}")).collect();
    let mut got = Vec::new();
    while got.len() < want.len() {
        let text = recv_text(&mut b).await;
        if !text.starts_with('{') {
            got.push(text);
        }
    }
    assert_eq!(got, want);
    // The documented bound: frames reach the file within 100 ms (FLUSH_EVERY). Wait for
    // the last one to be in the channel's log, allowing three times that.
    let history = cache.path().join("history");
    wait_until(
        "the last frame in the history log",
        mles::store::FLUSH_EVERY * 3,
        async || logs_contain(&history, b"c29"),
    )
    .await;
    process.0.kill().unwrap(); // SIGKILL
    process.0.wait().unwrap();
    drop((a, b));

    let _process = spawn_binary(port, &cache_arg).await;
    assert_eq!(history_of(addr, "crash", 30).await, want);
}

#[tokio::test]
async fn a_channel_that_started_afresh_keeps_no_earlier_history_on_disk() {
    let cache = tempfile::tempdir().unwrap();
    let brief = |cache: &Path| {
        let cache = cache.to_path_buf();
        start_with(move |c| {
            c.cache = Some(cache);
            c.hub.lifespan = Some(Duration::from_millis(500));
        })
    };
    let server = brief(cache.path()).await;
    let mut a = join(server.addr, "a", "brief").await;
    send_text(&mut a, "old news").await;
    let (code, _) = expect_close(&mut a).await;
    assert_eq!(code, 1008, "the lifespan is over");
    let mut b = join(server.addr, "b", "brief").await;
    send_text(&mut b, "new news").await;
    let shared = server.shared.clone();
    wait_until("stored", WAIT, async || {
        shared.metrics.messages_in.get() == 2
    })
    .await;
    drop(b);
    server.stop().await;

    let server = brief(cache.path()).await;
    assert_eq!(history_of(server.addr, "brief", 1).await, ["new news"]);
}
