//! Memory attacks of issue 11, performed against the real `mles` binary on loopback, with
//! the server's resident memory read from `/proc/<pid>/status`: a history flood from one
//! client address, a soak that touches hundreds of new channels a round, and slow readers
//! of a large static file. Each asserts the defence (`--max-memory`, channels without
//! members keep only `--limit` frames and are evicted first near the budget, static files
//! streamed with a write timeout) and fails on a server without it: there the same attack
//! took the server's RSS to 650 MiB (flood), +33 MB a round (soak) and 1.16 GB (slow
//! readers).
//!
//! The tests run one at a time (see [`SERIAL`]): each loads a 2-core machine hard, and
//! one's load would stretch another's waits.

mod common;
use common::*;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1 << 20;

/// One memory test at a time (see the module header). A tokio mutex, since a failed test
/// must not poison the others.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The reason a client is given when the memory budget refuses it something.
const OUT_OF_MEMORY: (u16, &str) = (1013, "server memory budget reached");

fn os<'a>(args: &'a [&'a str]) -> Vec<&'a OsStr> {
    args.iter().map(OsStr::new).collect()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The server's metrics, from its `--metrics-bind` listener (which is not charged to the
/// budget, so reading it never competes with the attack).
async fn metrics(addr: SocketAddr) -> String {
    let reply = http_client::get(addr, "/metrics").await;
    assert_eq!(reply.status, 200, "metrics answer");
    reply.text()
}

/// The value of the metric line `name value`.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing from metrics:\n{text}"))
        .trim()
        .parse::<f64>()
        .unwrap() as u64
}

/// The sum over every label set of the metric family `name` (0 when none is there yet).
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The next text frame that is not a join frame.
async fn next_message(ws: &mut Ws) -> String {
    loop {
        let text = recv_text(ws).await;
        if !text.starts_with('{') {
            return text;
        }
    }
}

/// How a flooding client's connection ended.
#[derive(Debug)]
enum Flooded {
    /// Every frame went in and the server answered the client's close normally.
    Served,
    /// The server closed the connection with this code and reason.
    Closed(u16, String),
    /// The connection failed without a close frame from the server.
    Broken(String),
}

/// The longest a flooding client may take, start to end.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);

/// One attacking client: joins its own channel and sends `frames` copies of `frame`,
/// reporting each frame sent on `progress`, then leaves. The server's close frame is read
/// concurrently with the sending, since a refused frame is answered while its sender may
/// still be writing it.
async fn flooder(
    addr: SocketAddr,
    n: usize,
    frames: usize,
    frame: Bytes,
    progress: mpsc::UnboundedSender<()>,
) -> Flooded {
    let ws = match connect_with(addr, Some("mles-websocket")).await {
        Ok(ws) => ws,
        Err(e) => return Flooded::Broken(format!("connect: {e}")),
    };
    let (mut tx, mut rx) = ws.split();
    let closed = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(FLOOD_LIMIT, rx.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return Ok((u16::from(f.code), f.reason.to_string()))
                }
                Ok(Some(Ok(Message::Close(None)))) => return Ok((1005, String::new())),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(format!("receive error: {e}")),
                Ok(None) => return Err("ended without a close frame".to_string()),
                Err(_) => return Err("no close frame in time".to_string()),
            }
        }
    });
    let join = join_frame(&format!("flooder{n}"), &format!("flood-{n}"));
    let mut sent = 0;
    if let Ok(Ok(())) = tokio::time::timeout(WAIT, tx.send(Message::text(join))).await {
        while sent < frames {
            match tokio::time::timeout(WAIT, tx.send(Message::Binary(frame.clone()))).await {
                Ok(Ok(())) => {
                    sent += 1;
                    let _ = progress.send(());
                }
                _ => break,
            }
        }
    }
    if sent == frames {
        // Leave. The server answers the close after it has taken every frame before it.
        let _ = tokio::time::timeout(WAIT, tx.send(Message::Close(None))).await;
    }
    match tokio::time::timeout(FLOOD_LIMIT, closed).await {
        Ok(Ok(Ok((1000 | 1005, _)))) if sent == frames => Flooded::Served,
        Ok(Ok(Ok((code, reason)))) => Flooded::Closed(code, reason),
        Ok(Ok(Err(e))) => Flooded::Broken(format!("after {sent} frames: {e}")),
        Ok(Err(e)) => Flooded::Broken(format!("reader task: {e}")),
        Err(_) => Flooded::Broken("no end in time".into()),
    }
}

/// Issue 11: one client address made the server hold 650 MiB in 8 s with 40 channels × 8
/// frames of 2 MiB, and kept it after everyone left. Here the same flood, all 40 at once,
/// goes against `--max-memory 96M` while two members of another channel hold a small
/// conversation, one message for each flood frame that goes in.
///
/// The RSS bound is baseline + budget + 32 MiB. The budget counts the bytes clients make
/// the server hold (payloads from the moment a frame's header announces them, connections,
/// channels); the 32 MiB slack (a third of the budget) is for what it does not count: the
/// allocator's overhead and fragmentation (2 MiB buffers freed out of order by 40 tasks on
/// two worker threads' arenas), the frames being encoded to the calm member, code pages
/// touched for the first time. Without the defence RSS goes past 600 MiB, far beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_flood_from_one_address_stays_within_the_memory_budget() {
    let _serial = SERIAL.lock().await;
    const BUDGET: u64 = 96 * MIB;
    const SLACK: u64 = 32 * MIB;
    const CHANNELS: usize = 40;
    const FRAMES: usize = 8;
    let (port, metrics_port) = (free_port(), free_port());
    let (addr, metrics_addr) = (loopback(port), loopback(metrics_port));
    let metrics_bind = metrics_addr.to_string();
    let server = spawn_binary(
        port,
        &os(&["--max-memory", "96M", "--metrics-bind", &metrics_bind]),
    )
    .await;

    let mut alice = join(addr, "alice", "calm").await;
    let mut bob = join(addr, "bob", "calm").await;
    send_text(&mut alice, "calm 0").await;
    assert_eq!(next_message(&mut bob).await, "calm 0");
    let baseline = server.memory();

    // Frames of exactly the default --max-message-size, all sharing one buffer here.
    let frame = Bytes::from(vec![0xa5u8; 2 * MIB as usize]);
    let (progress_tx, mut progress) = mpsc::unbounded_channel();
    let mut flood = tokio::task::JoinSet::new();
    for n in 0..CHANNELS {
        flood.spawn(flooder(addr, n, FRAMES, frame.clone(), progress_tx.clone()));
    }
    drop(progress_tx);
    let started = Instant::now();
    // The conversation goes on throughout: a message for each flood frame taken, each of
    // which bob must get, in order. `progress` ends once every flooder has finished, and
    // each flooder is bounded in time, so this loop is too (at most 320 messages).
    let mut said = 0;
    while tokio::time::timeout(FLOOD_LIMIT, progress.recv())
        .await
        .expect("flooders end in time")
        .is_some()
    {
        said += 1;
        let text = format!("calm {said}");
        send_text(&mut alice, &text).await;
        assert_eq!(
            next_message(&mut bob).await,
            text,
            "bob gets every message during the flood"
        );
    }
    let outcomes: Vec<Flooded> = flood.join_all().await;
    let flood_time = started.elapsed();
    send_text(&mut alice, "calm end").await;
    assert_eq!(next_message(&mut bob).await, "calm end");

    let text = metrics(metrics_addr).await;
    let used = metric(&text, "mles_memory_used_bytes");
    let budget = metric(&text, "mles_memory_budget_bytes");
    let refusals = metric_sum(&text, "mles_memory_refusals_total");
    let memory = server.memory();
    let served = outcomes
        .iter()
        .filter(|o| matches!(o, Flooded::Served))
        .count();
    let closed: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Flooded::Closed(code, reason) => Some((*code, reason.as_str())),
            _ => None,
        })
        .collect();
    let broken: Vec<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Flooded::Broken(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    eprintln!(
        "history flood: {CHANNELS} channels x {FRAMES} frames of 2 MiB in {flood_time:.1?}: \
         {served} flooders served, {} refused, {} broken; calm messages {said}; \
         baseline RSS {:.1} MiB (peak {:.1}); after: RSS {:.1} MiB, peak {:.1} MiB \
         (bound {:.1}); budget used {:.1} of {:.1} MiB; refusals counted {refusals}",
        closed.len(),
        broken.len(),
        mib(baseline.rss),
        mib(baseline.peak),
        mib(memory.rss),
        mib(memory.peak),
        mib(baseline.peak + BUDGET + SLACK),
        mib(used),
        mib(budget),
    );
    assert_eq!(budget, BUDGET, "--max-memory 96M is the budget");
    assert!(
        memory.peak <= baseline.peak + BUDGET + SLACK,
        "the server's RSS peaked at {:.1} MiB, past baseline {:.1} + budget 96 + slack 32 MiB",
        mib(memory.peak),
        mib(baseline.peak)
    );
    assert!(used <= BUDGET, "{used} bytes charged, over the budget");
    assert!(
        broken.is_empty(),
        "every flooder is served or told why not: {broken:?}"
    );
    assert!(
        closed.iter().all(|c| *c == OUT_OF_MEMORY),
        "refusals say why: {closed:?}"
    );
    assert!(
        !closed.is_empty(),
        "640 MiB of history held at once cannot fit a 96 MiB budget: some must be refused"
    );
    assert!(
        refusals >= closed.len() as u64,
        "{} flooders refused, {refusals} refusals counted",
        closed.len()
    );

    // Everyone has left: a newcomer still gets a channel and its messages through.
    let mut carol = join(addr, "carol", "after-flood").await;
    let mut dave = join(addr, "dave", "after-flood").await;
    send_text(&mut carol, "still here").await;
    assert_eq!(next_message(&mut dave).await, "still here");
}

/// One soak client: joins `channel`, sends `frames` copies of `frame`, leaves, and
/// checks that the server took it all (it answers the close only after every frame
/// before it) rather than refusing something.
async fn touch(
    addr: SocketAddr,
    channel: String,
    frames: usize,
    frame: Bytes,
) -> Result<(), String> {
    let mut ws = connect_with(addr, Some("mles-websocket"))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let work = async {
        ws.send(Message::text(join_frame("soaker", &channel)))
            .await?;
        for _ in 0..frames {
            ws.send(Message::Binary(frame.clone())).await?;
        }
        ws.send(Message::Close(None)).await?;
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    let sent = tokio::time::timeout(WAIT, work).await;
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(None)))) if matches!(sent, Ok(Ok(()))) => return Ok(()),
            Ok(Some(Ok(Message::Close(Some(f)))))
                if u16::from(f.code) == 1000 && matches!(sent, Ok(Ok(()))) =>
            {
                return Ok(())
            }
            Ok(Some(Ok(Message::Close(f)))) => return Err(format!("{channel}: closed {f:?}")),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(format!("{channel}: {e} (sending: {sent:?})")),
            Ok(None) => return Err(format!("{channel}: ended (sending: {sent:?})")),
            Err(_) => return Err(format!("{channel}: no close in time")),
        }
    }
}

/// Issue 11: a channel kept `--limit` + `--queue-frames` frames after its members left,
/// so a soak touching 321 new channels a round grew RSS by 33 MB a round, for good. Here
/// each round touches 300 new channels with 8 frames of 8 KiB each (twice `--limit 4`),
/// and every member leaves; `--max-memory 32M` fills within the first rounds. After that
/// warm-up the server must (1) still serve every new client, evicting the history of
/// channels without members to make room, (2) keep at most `--limit` frames per channel
/// without members, (3) keep its budget, and (4) not grow: RSS at the end of the last
/// round within 8 MiB (a quarter of the budget, for allocator noise) of the end of
/// warm-up, and the peak within baseline + budget + a third of it (the flood test's slack,
/// scaled).
///
/// Issue 11's soak grew by 33 MB a round with ~80-byte frames past 1,224 per channel; here
/// frames are larger and fewer so that the budget, not the frame count, is what fills.
///
/// `--ip-rate 0`: 2,400 connections from one address in a few seconds would otherwise be
/// refused by the per-address accept rate, and an attacker with many addresses is not
/// slowed by it; the memory defence is what is under test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_of_new_channels_does_not_grow_memory_round_after_round() {
    let _serial = SERIAL.lock().await;
    const BUDGET: u64 = 32 * MIB;
    const LIMIT: u64 = 4;
    const ROUNDS: usize = 8;
    const WARM_UP: usize = 4;
    const CHANNELS: usize = 300;
    const FRAMES: usize = 8;
    const TOLERANCE: u64 = 8 * MIB;
    let (port, metrics_port) = (free_port(), free_port());
    let (addr, metrics_addr) = (loopback(port), loopback(metrics_port));
    let metrics_bind = metrics_addr.to_string();
    let server = spawn_binary(
        port,
        &os(&[
            "--max-memory",
            "32M",
            "--limit",
            "4",
            "--ip-rate",
            "0",
            "--metrics-bind",
            &metrics_bind,
        ]),
    )
    .await;
    let baseline = server.memory();
    let frame = Bytes::from(vec![0x3cu8; 8 * 1024]);

    struct Round {
        rss: u64,
        used: u64,
        channels: u64,
        frames: u64,
        refusals: u64,
        failed: Vec<String>,
        took: Duration,
    }
    let mut rounds: Vec<Round> = Vec::new();
    for round in 0..ROUNDS {
        let started = Instant::now();
        let frame = frame.clone();
        // 16 clients at a time: well under --per-ip-limit (128).
        let results: Vec<Result<(), String>> = futures::stream::iter(0..CHANNELS)
            .map(|i| touch(addr, format!("soak-{round}-{i}"), FRAMES, frame.clone()))
            .buffer_unordered(16)
            .collect()
            .await;
        let text = metrics(metrics_addr).await;
        rounds.push(Round {
            rss: server.memory().rss,
            used: metric(&text, "mles_memory_used_bytes"),
            channels: metric(&text, "mles_channels"),
            frames: metric(&text, "mles_history_frames"),
            refusals: metric_sum(&text, "mles_memory_refusals_total"),
            failed: results.into_iter().filter_map(Result::err).collect(),
            took: started.elapsed(),
        });
    }
    eprintln!(
        "soak: {CHANNELS} new channels x {FRAMES} frames of 8 KiB a round, --limit 4, \
         --max-memory 32M; baseline RSS {:.1} MiB",
        mib(baseline.rss)
    );
    for (n, r) in rounds.iter().enumerate() {
        eprintln!(
            "  round {n}: RSS {:.1} MiB, budget used {:.1} MiB, {} channels holding {} frames, \
             {} refusals counted, {} clients not served, {:.1?}",
            mib(r.rss),
            mib(r.used),
            r.channels,
            r.frames,
            r.refusals,
            r.failed.len(),
            r.took
        );
    }
    let peak = server.memory().peak;
    let text = metrics(metrics_addr).await;
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("mles_memory_refusals_total"))
        .collect();
    eprintln!("  peak RSS {:.1} MiB; {refusals:?}", mib(peak));
    for (n, r) in rounds.iter().enumerate() {
        assert!(
            r.failed.is_empty(),
            "round {n}: {} of {CHANNELS} new clients were not served, e.g. {:?}",
            r.failed.len(),
            r.failed.first()
        );
        assert!(
            r.frames <= LIMIT * r.channels,
            "round {n}: {} channels without members hold {} frames, more than --limit 4 each",
            r.channels,
            r.frames
        );
        assert!(r.used <= BUDGET, "round {n}: {} bytes charged", r.used);
    }
    let warm = rounds[WARM_UP - 1].rss;
    let last = rounds[ROUNDS - 1].rss;
    assert!(
        last <= warm + TOLERANCE,
        "RSS grew from {:.1} MiB after warm-up to {:.1} MiB after round {}",
        mib(warm),
        mib(last),
        ROUNDS - 1
    );
    assert!(
        peak <= baseline.peak + BUDGET + BUDGET / 3,
        "RSS peaked at {:.1} MiB, past baseline + budget + a third",
        mib(peak)
    );
}

/// The server-side state of the TCP connection from `client` to the server's `port`, from
/// `/proc/net/tcp` (e.g. `01` established, `04` FIN_WAIT1; `None`: gone).
fn server_side_state(port: u16, client: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    let remote = format!("0100007F:{client:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| fields[3].to_string())
    })
}

const ESTABLISHED: &str = "01";

/// Issue 11: static files were read whole into memory and written with no timeout: 20
/// connections asking for a 60 MB file and reading nothing took RSS from 13 MB to
/// 1.16 GB, still held 15 s later. Here the same 20 readers (each with a 4 KiB receive
/// buffer, so the kernel holds little for them) against `--write-timeout 2`: the server's
/// peak RSS must stay within baseline + 64 MiB (a file streamed in chunks costs a chunk per
/// connection, not the file; 64 MiB is one file's worth for all 20 together), and the
/// server must close every one of them once its write has stalled for the timeout, without
/// having sent the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_a_large_static_file_are_bounded_and_cut_off() {
    let _serial = SERIAL.lock().await;
    const SIZE: usize = 60_000_000;
    const READERS: usize = 20;
    const BOUND: u64 = 64 * MIB;
    let www = tempfile::tempdir().unwrap();
    let site = www.path().join("localhost");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "<p>small</p>").unwrap();
    {
        use std::io::Write;
        let mut file = std::fs::File::create(site.join("big.bin")).unwrap();
        let chunk = vec![0x42u8; 1 << 20];
        let mut left = SIZE;
        while left > 0 {
            let n = left.min(chunk.len());
            file.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
    }
    let port = free_port();
    let addr = loopback(port);
    let server = spawn_binary_in(port, www.path(), &os(&["--write-timeout", "2"])).await;
    // Warm up the HTTP path with a small file, then take the baseline.
    assert_eq!(http_client::get(addr, "/index.html").await.status, 200);
    let baseline = server.memory();

    let mut readers = Vec::new();
    for _ in 0..READERS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut tcp = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        tcp.write_all(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        readers.push(tcp);
    }
    // The answer has begun on every connection (a byte is waiting; none is read).
    let started = Instant::now();
    for tcp in &readers {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, tcp.peek(&mut byte))
            .await
            .expect("the response starts in time")
            .unwrap();
        assert_eq!(n, 1);
    }
    let answering = server.memory();
    // Each connection's server side must leave ESTABLISHED once its write has stalled for
    // the write timeout: bounded by the timeout and 10 s for the server to notice.
    let ports: Vec<u16> = readers
        .iter()
        .map(|t| t.local_addr().unwrap().port())
        .collect();
    let limit = Duration::from_secs(2 + 10);
    let mut open = ports.len();
    while started.elapsed() < limit {
        open = ports
            .iter()
            .filter(|p| server_side_state(port, **p).as_deref() == Some(ESTABLISHED))
            .count();
        if open == 0 {
            break;
        }
        tokio::time::sleep(STEP).await;
    }
    let cut_off = started.elapsed();
    let memory = server.memory();
    eprintln!(
        "slow readers: {READERS} x a {SIZE}-byte file; baseline RSS {:.1} MiB; when all \
         answers had begun RSS {:.1} MiB; peak {:.1} MiB (bound {:.1}); {open} of {READERS} \
         still open after {cut_off:.1?}",
        mib(baseline.rss),
        mib(answering.rss),
        mib(memory.peak),
        mib(baseline.peak + BOUND)
    );
    assert!(
        memory.peak <= baseline.peak + BOUND,
        "RSS peaked at {:.1} MiB serving {READERS} slow readers (baseline {:.1} MiB); and \
         {open} of {READERS} connections were still open after {cut_off:.1?}",
        mib(memory.peak),
        mib(baseline.peak)
    );
    assert_eq!(
        open, 0,
        "{open} of {READERS} stalled connections still open {cut_off:.1?} after their \
         answers began, with --write-timeout 2"
    );
    // Each reader now reads what the kernel still holds for it, and then the end: the
    // server gave up on the file, it did not send it.
    for mut tcp in readers {
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let end = tokio::time::timeout(WAIT, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => got += n,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("the connection ends in time");
        // A reset is an end too: the server may abort the connection.
        if let Err(e) = end {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        assert!(
            got < SIZE,
            "the whole file was sent to a reader that read nothing"
        );
    }
}

/// Reads what a new member is sent until the text `end` (which comes after its history):
/// the frames before it, in order.
async fn until(ws: &mut Ws, end: &str) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..1000 {
        let text = recv_text(ws).await;
        if text == end {
            return got;
        }
        got.push(text);
    }
    panic!("no {end:?} within 1000 frames: {got:?}");
}

/// The uid of a join frame in history.
fn uid_of(join: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(join).expect("a join frame is JSON");
    value["uid"].as_str().expect("a uid").to_string()
}

/// Issue 11: 200 join-only connections left a late joiner with 200 join frames and none of
/// the messages. Here, on a `--limit 50` channel that has 20 messages, 200 connections with
/// distinct uids join (50 at a time, each staying until the server has sent it history);
/// a late joiner must still get the last 10 messages (in order, the newest last) and at
/// most 25 join frames (half the history), no uid twice. Then one uid joins and leaves 50
/// times on another channel: it must appear once in that channel's history. A server that
/// stores every join frame as history gives the late joiners 50 join frames and no message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_spam_cannot_flush_a_channels_messages_out_of_history() {
    let _serial = SERIAL.lock().await;
    const LIMIT: usize = 50;
    const SPAMMERS: usize = 200;
    const BATCH: usize = 50;
    let port = free_port();
    let addr = loopback(port);
    let _server = spawn_binary(port, &os(&["--limit", "50"])).await;

    let mut speaker = join(addr, "speaker", "spammed").await;
    let mut witness = join(addr, "witness", "spammed").await;
    let messages: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for m in &messages {
        send_text(&mut speaker, m).await;
    }
    // Every message is in the channel once the witness has it.
    for m in &messages {
        assert_eq!(&next_message(&mut witness).await, m);
    }
    for batch in 0..SPAMMERS / BATCH {
        let joined = (0..BATCH).map(|i| async move {
            let mut ws = join(addr, &format!("spam{}", batch * BATCH + i), "spammed").await;
            // History comes only once the join is taken.
            recv_text(&mut ws).await;
            ws
        });
        let batch_sockets = futures::future::join_all(joined).await;
        drop(batch_sockets);
    }
    let mut late = join(addr, "late", "spammed").await;
    send_text(&mut speaker, "end").await;
    let history = until(&mut late, "end").await;
    let (joins, said): (Vec<&String>, Vec<&String>) =
        history.iter().partition(|t| t.starts_with('{'));
    let said: Vec<String> = said.into_iter().cloned().collect();
    let uids: Vec<String> = joins.iter().map(|j| uid_of(j)).collect();
    let mut distinct = uids.clone();
    distinct.sort();
    distinct.dedup();
    eprintln!(
        "join spam: a late joiner of a --limit {LIMIT} channel with 20 messages, after \
         {SPAMMERS} joins, got {} frames: {} messages ({:?} .. {:?}), {} join frames \
         ({} distinct uids)",
        history.len(),
        said.len(),
        said.first(),
        said.last(),
        joins.len(),
        distinct.len()
    );
    assert!(
        said.len() >= 10 && messages.ends_with(&said),
        "the last 10 messages survive, in order: got {said:?}"
    );
    assert!(
        joins.len() <= LIMIT / 2,
        "{} join frames in history",
        joins.len()
    );
    assert_eq!(distinct.len(), uids.len(), "a uid twice: {uids:?}");

    // One uid joining and leaving 50 times.
    let mut host = join(addr, "host", "again").await;
    send_text(&mut host, "hello").await;
    for _ in 0..50 {
        let mut ws = join(addr, "returner", "again").await;
        // Joined once "hello" comes (history, or live if it raced the host's join).
        assert_eq!(next_message(&mut ws).await, "hello");
        // Leave; the server answers the close after it has removed the member, so the
        // next join of the same uid is not a duplicate.
        ws.send(Message::Close(None)).await.unwrap();
        loop {
            match tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("close answered in time")
            {
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("leaving: {e}"),
            }
        }
    }
    let mut late = join(addr, "late", "again").await;
    send_text(&mut host, "end").await;
    let history = until(&mut late, "end").await;
    let returns = history
        .iter()
        .filter(|t| t.starts_with('{') && uid_of(t) == "returner")
        .count();
    assert_eq!(
        returns, 1,
        "a uid that joined 50 times is in history once: {history:?}"
    );
}
