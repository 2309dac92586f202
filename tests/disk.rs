//! Disk attacks of issue 11 on history persistence (`--cache DIR`), performed against the
//! real `mles` binary on loopback with graceful restarts (SIGTERM, then a new process on the
//! same port and cache): the log of a channel must stay within about twice `--limit`
//! records across restarts, a channel name of 250 characters (valid: names may have 256)
//! must keep its history, and a large log must not be read whole at start.
//!
//! The tests find a channel's log by scanning `DIR/history/` rather than by its name, since
//! the file naming is the store's business (it changes from the hex of the name to a hash
//! with the full name inside). They read records in the store's format, `len:u32le
//! crc32:u32le body`, and the large-log test writes them (see [`record`]).

mod common;
use common::*;

use std::ffi::OsStr;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1 << 20;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A server on `port` with history in `cache` and `--limit limit`.
async fn with_cache(port: u16, cache: &Path, limit: usize) -> Process {
    let limit = limit.to_string();
    let args = [
        OsStr::new("--cache"),
        cache.as_os_str(),
        OsStr::new("--limit"),
        OsStr::new(&limit),
    ];
    spawn_binary(port, &args).await
}

/// Joins `channel` as `uid`, sends `messages`, and leaves; returns once the server has
/// answered the close, which it does only after taking every frame sent before it.
async fn publish(addr: SocketAddr, uid: &str, channel: &str, messages: &[String]) {
    let mut ws = join(addr, uid, channel).await;
    for m in messages {
        send_text(&mut ws, m).await;
    }
    tokio::time::timeout(WAIT, ws.send(Message::Close(None)))
        .await
        .expect("close in time")
        .expect("close sent");
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the server answers the close in time")
        {
            Some(Ok(Message::Close(_))) | None => return,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("{uid} leaving {channel}: {e}"),
        }
    }
}

/// Everything a new member of `channel` is replayed: text frames until `want` have come,
/// then on for [`DUPLICATE_QUIET`] so that any extra frame would show. Join frames count.
async fn replayed(addr: SocketAddr, channel: &str, want: usize) -> Vec<String> {
    let mut ws = join(addr, "checker", channel).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < want {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => got.push(t.to_string()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("replaying {channel}: {other:?} after {got:?}"),
            Err(_) => panic!(
                "only {} of {want} frames of history replayed for {channel:?}: {got:?}",
                got.len()
            ),
        }
    }
    let quiet = tokio::time::Instant::now() + DUPLICATE_QUIET;
    loop {
        match tokio::time::timeout_at(quiet, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Text(t)))) => got.push(t.to_string()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("expected history or nothing, got {other:?}"),
        }
    }
    got
}

/// The history logs under `cache`: every file in `cache/history/` but temporary ones.
fn logs(cache: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(cache.join("history")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = dir
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "tmp"))
        .collect();
    files.sort();
    files
}

/// The one history log under `cache` (the tests use one channel per cache).
fn only_log(cache: &Path) -> PathBuf {
    let files = logs(cache);
    assert_eq!(files.len(), 1, "one channel, one log: {files:?}");
    files.into_iter().next().unwrap()
}

/// The bodies of the records of the log at `path`, checked against their CRCs; panics on a
/// damaged record (a gracefully stopped server leaves none).
fn records(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let header = data
            .get(at..at + 8)
            .unwrap_or_else(|| panic!("{}: truncated header at {at}", path.display()));
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
        let body = data
            .get(at + 8..at + 8 + len)
            .unwrap_or_else(|| panic!("{}: truncated record at {at}", path.display()));
        assert_eq!(
            crc32fast::hash(body),
            crc,
            "{}: bad CRC at {at}",
            path.display()
        );
        out.push(body.to_vec());
        at += 8 + len;
    }
    out
}

/// Issue 11: a log closed after 60 s idle and reopened restarted its record count, so
/// compaction never ran and the file grew by every frame (26 → 52 → 78 records at
/// `--limit 5`). Here: rounds of 15 frames (three times the limit) on one channel at
/// `--limit 5`, each ended by a graceful restart. After each round the channel's log must
/// hold at most 2 × limit + 2 records: "about twice the limit", plus one for a header
/// record naming the channel and one for a compaction that runs just past twice the limit.
/// And each restarted server must replay exactly the last 5 frames.
#[tokio::test]
async fn the_history_log_stays_within_twice_the_limit_across_restarts() {
    const LIMIT: usize = 5;
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 3 * LIMIT;
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = loopback(port);
    let mut counts = Vec::new();
    let mut last: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let mut server = with_cache(port, cache.path(), LIMIT).await;
        if round > 0 {
            assert_eq!(
                replayed(addr, "bounded", LIMIT).await,
                last,
                "round {round}: the restarted server replays exactly the last {LIMIT} frames"
            );
        }
        let messages: Vec<String> = (0..PER_ROUND).map(|i| format!("r{round} m{i}")).collect();
        publish(addr, "writer", "bounded", &messages).await;
        last = messages[PER_ROUND - LIMIT..].to_vec();
        server.terminate().await;
        let log = only_log(cache.path());
        counts.push((records(&log).len(), std::fs::metadata(&log).unwrap().len()));
    }
    let server = with_cache(port, cache.path(), LIMIT).await;
    assert_eq!(replayed(addr, "bounded", LIMIT).await, last);
    drop(server);
    eprintln!("records (bytes) in the log after each round of {PER_ROUND} frames at --limit {LIMIT}: {counts:?}");
    for (round, (n, _)) in counts.iter().enumerate() {
        assert!(
            *n <= 2 * LIMIT + 2,
            "after round {round} the log holds {n} records at --limit {LIMIT}: {counts:?}"
        );
    }
}

/// Issue 11: channel names longer than about 125 bytes were never persisted (`File name
/// too long` for each frame, as the file was named by the name in hex), though names up
/// to 256 characters are valid. A 250-character name must keep its history across a
/// graceful restart like any other.
#[tokio::test]
async fn a_250_character_channel_name_keeps_its_history_across_a_restart() {
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = loopback(port);
    // Printable ASCII, with characters a file name could trip on.
    let channel: String = "long/channel name:"
        .chars()
        .chain(('a'..='z').cycle())
        .take(250)
        .collect();
    assert_eq!(channel.len(), 250);
    let messages: Vec<String> = (0..3).map(|i| format!("long {i}")).collect();
    let mut server = with_cache(port, cache.path(), 10).await;
    publish(addr, "writer", &channel, &messages).await;
    server.terminate().await;
    let _server = with_cache(port, cache.path(), 10).await;
    let got = replayed(addr, &channel, 1 + messages.len()).await;
    assert_eq!(
        got[0],
        join_frame("writer", &channel),
        "the writer's join frame first: {got:?}"
    );
    assert_eq!(&got[1..], &messages[..], "then its messages");
}

/// A history record in the store's format: `len:u32le crc32:u32le body`, body =
/// `live:u8 kind:u8 origin_len:u8 origin seq:u64le position:u64le payload` (kind 0 text, 1 binary). The
/// CRC of a body ending in a long payload is combined from the payload's, computed once.
fn record(
    out: &mut impl Write,
    kind: u8,
    seq: u64,
    payload: &[u8],
    payload_crc: &crc32fast::Hasher,
) -> std::io::Result<u64> {
    const ORIGIN: &[u8] = b"attacker#1";
    let mut prefix = vec![1u8, kind, ORIGIN.len() as u8];
    prefix.extend_from_slice(ORIGIN);
    prefix.extend_from_slice(&seq.to_le_bytes());
    // Its position in the channel: after everything the server wrote.
    prefix.extend_from_slice(&(1_000_000 + seq).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&prefix);
    crc.combine(payload_crc);
    let len = (prefix.len() + payload.len()) as u32;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&crc.finalize().to_le_bytes())?;
    out.write_all(&prefix)?;
    out.write_all(payload)?;
    Ok(8 + len as u64)
}

fn crc_of(data: &[u8]) -> crc32fast::Hasher {
    let mut crc = crc32fast::Hasher::new();
    crc.update(data);
    crc
}

/// Issue 11: a large history log was read whole at start (a 299 MiB log took the server to
/// 607 MiB RSS). Here the binary first writes the channel's log (so the file has whatever
/// header the store puts first), then the test appends 150 records of 2 MiB and the last 5
/// messages: a 300 MiB log at `--limit 5`, of which history needs 5 small frames. The
/// restarted server's peak RSS must stay below 100 MiB (a third of the file; an idle
/// server of this build takes about 15 MiB), and it must replay exactly those 5.
#[tokio::test]
async fn a_large_history_log_is_not_read_whole_at_start() {
    const BIG: usize = 150;
    const LIMIT: usize = 5;
    const BOUND: u64 = 100 * MIB;
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = loopback(port);
    let mut server = with_cache(port, cache.path(), LIMIT).await;
    publish(addr, "writer", "large", &["seed".to_string()]).await;
    let idle = server.memory();
    server.terminate().await;

    let log = only_log(cache.path());
    let written = Instant::now();
    let tail: Vec<String> = (0..LIMIT).map(|i| format!("tail {i}")).collect();
    {
        let file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let big = vec![0x17u8; 2 * MIB as usize];
        let big_crc = crc_of(&big);
        let mut seq = 1;
        for _ in 0..BIG {
            record(&mut out, 1, seq, &big, &big_crc).unwrap();
            seq += 1;
        }
        for text in &tail {
            record(&mut out, 0, seq, text.as_bytes(), &crc_of(text.as_bytes())).unwrap();
            seq += 1;
        }
        out.into_inner().unwrap().sync_all().unwrap();
    }
    let size = std::fs::metadata(&log).unwrap().len();
    let write_time = written.elapsed();

    let started = Instant::now();
    let server = with_cache(port, cache.path(), LIMIT).await;
    let got = replayed(addr, "large", LIMIT).await;
    let load_time = started.elapsed();
    let memory = server.memory();
    eprintln!(
        "large log: {:.1} MiB written in {write_time:.1?}; server before: RSS {:.1} MiB (peak \
         {:.1}); after start with it: RSS {:.1} MiB, peak {:.1} MiB (bound {:.1}); started and \
         replayed in {load_time:.1?}",
        mib(size),
        mib(idle.rss),
        mib(idle.peak),
        mib(memory.rss),
        mib(memory.peak),
        mib(BOUND)
    );
    assert!(size >= 300 * MIB, "the log is {size} bytes");
    assert!(
        memory.peak < BOUND,
        "a {:.0} MiB log took the server's RSS to {:.1} MiB at start (history needs 5 small frames)",
        mib(size),
        mib(memory.peak)
    );
    assert_eq!(got, tail, "the last {LIMIT} frames are replayed");
}
