//! `mles-bench soak`: a fresh mles under a mixed, changing load for `--minutes`, its RSS
//! sampled every second.
//!
//! The load, all on loopback, every loop bounded by the end time:
//! - `--channels` channels, each with a publisher sending `--rate` frames of 512 B per
//!   second and `--readers` steady readers joined before the first frame, which must get
//!   every frame of their channel exactly once, in order, and never be cut off;
//! - churners: `--churn` new clients per second join a random channel, check that the
//!   frames they see (history, then live) are contiguous, and leave after 0.2–3 s, half of
//!   them with a close frame, half by dropping the connection;
//! - slow readers: one per channel with a small receive buffer, reading 4 KiB every 200 ms
//!   (less than the channel carries), so the server should cut it off (1013); it then comes
//!   back after a second;
//! - bad clients: `--bad` per second, in turn: garbage instead of an HTTP request, a
//!   non-JSON join, a binary first frame, a join with invalid UTF-8, and an oversize frame
//!   after a valid join (over `--max-message-size`, which the soak sets to 64 KiB); each
//!   must be closed by the server within 5 s.
//!
//! At the end the publishers send their end marker and the steady readers are checked.
//! Printed: an RSS timeline, whether RSS after the warm-up stays within 5 % of what it was
//! right after it (baseline: the median of the first 30 samples after the warm-up), and the
//! counts of every kind of client.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{
    close_code, encode_frame, Conn, SocketOpts, Target, OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT,
};
use crate::procs::{self, Kind, Launch};
use crate::reader::{self, Publisher, Tally, TRY_AGAIN_LATER};
use crate::scenario::{u64_at, DATA, HEADER, OP_PONG};

/// The soak's --max-message-size for mles: small, so oversize frames are cheap to send.
const MAX_MESSAGE: usize = 64 * 1024;
const FRAME: usize = 512;

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Seconds of warm-up before RSS must stay flat (default: a quarter of the run, at most
    /// 120).
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Steady readers per channel.
    #[arg(long, default_value_t = 5)]
    pub readers: usize,
    /// Frames per second each channel's publisher sends.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// New churning clients per second.
    #[arg(long, default_value_t = 20)]
    pub churn: u64,
    /// Bad clients per second.
    #[arg(long, default_value_t = 5)]
    pub bad: u64,
    /// The mles binary (default: `mles` next to this binary).
    #[arg(long)]
    pub mles: Option<std::path::PathBuf>,
    /// Extra flag for mles (repeatable).
    #[arg(long = "mles-arg", allow_hyphen_values = true)]
    pub mles_args: Vec<String>,
}

#[derive(Default)]
struct Counts {
    churn_sessions: AtomicUsize,
    churn_failed: AtomicUsize,
    churn_frames: AtomicU64,
    churn_gaps: AtomicU64,
    churn_closed_by_server: AtomicUsize,
    slow_sessions: AtomicUsize,
    slow_cut: AtomicUsize,
    slow_other: AtomicUsize,
    /// Slow sessions that ended without any close frame (the server dropped them).
    slow_dropped: AtomicUsize,
    /// Seconds slow sessions lasted, all together.
    slow_secs: AtomicU64,
    bad_sent: AtomicUsize,
    bad_closed: AtomicUsize,
    bad_hung: AtomicUsize,
    /// Close codes the bad clients got, by kind.
    bad_codes: Mutex<std::collections::BTreeMap<String, std::collections::BTreeMap<String, usize>>>,
}

pub fn main(args: SoakArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mles-bench soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(soak(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mles-bench soak: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pick(n: usize, salt: u64) -> usize {
    // A cheap, well-spread pseudo-random index (splitmix64 of the salt).
    let mut z = salt.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % n.max(1) as u64) as usize
}

async fn soak(args: SoakArgs) -> Result<bool, String> {
    procs::raise_nofile();
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let warmup = Duration::from_secs(
        args.warmup
            .unwrap_or_else(|| (duration.as_secs() / 4).min(120)),
    );
    let mles = args.mles.clone().unwrap_or_else(|| procs::sibling("mles"));
    let mut mles_args: Vec<String> = ["--ip-rate=0", "--per-ip-limit=0", "--message-rate=0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    mles_args.push(format!("--max-message-size={MAX_MESSAGE}"));
    mles_args.extend(args.mles_args.iter().cloned());
    let launch = Launch {
        mles,
        mles_args: mles_args.clone(),
        relay: std::env::current_exe().map_err(|e| e.to_string())?,
        nats_server: None,
        workdir: std::env::temp_dir().join(format!("mles-bench-soak-{}", std::process::id())),
    };
    let mut server = launch.start(Kind::Mles, false).await?;
    let target = Target {
        addr: server.addr,
        tls: None,
    };
    let pid = server.pid;
    println!();
    println!(
        "`mles-bench soak --minutes {} --channels {} --readers {} --rate {} --churn {} --bad {}` \
         against a fresh `mles {}`; warm-up {} s",
        args.minutes,
        args.channels,
        args.readers,
        args.rate,
        args.churn,
        args.bad,
        mles_args.join(" "),
        warmup.as_secs()
    );
    let run = crate::scenario::now_ns() ^ ((std::process::id() as u64) << 40);
    let started = Instant::now();
    let end_at = tokio::time::Instant::now() + duration;
    let (stop_tx, stop) = watch::channel(false);
    // Steady readers stop at their end marker; this only bounds them if it never comes.
    let (steady_stop_tx, steady_stop) = watch::channel(false);
    let counts = Arc::new(Counts::default());
    let tally = Arc::new(Tally::default());

    // Steady readers, then publishers (each syncs its readers before its first frame).
    let mut steady = JoinSet::new();
    for c in 0..args.channels {
        for r in 0..args.readers {
            let conn = Conn::connect(&target, &format!("r{c}-{r}"), &chan(run, c), 64 * 1024)
                .await
                .map_err(|e| format!("steady reader: {e}"))?;
            let (tally, stop) = (tally.clone(), steady_stop.clone());
            steady.spawn(async move {
                (
                    c,
                    reader::read(conn, run, u64::MAX, &tally, None, stop).await,
                )
            });
        }
    }
    let published = Arc::new(AtomicU64::new(0));
    let mut publishers = JoinSet::new();
    let mut pubs = Vec::new();
    for c in 0..args.channels {
        let mut p = Publisher::connect(
            &target,
            SocketOpts::default(),
            &format!("p{c}"),
            &chan(run, c),
            c as u32,
            run,
            FRAME,
        )
        .await
        .map_err(|e| format!("publisher: {e}"))?;
        let want = (c + 1) * args.readers;
        p.sync_until(
            &tally,
            |t| t.synced.load(Ordering::SeqCst) >= want,
            Duration::from_millis(20),
            tokio::time::Instant::now() + Duration::from_secs(10),
        )
        .await
        .map_err(|e| format!("publisher: {e}"))?;
        pubs.push(p);
    }
    // Every channel's publisher sends the same count, so each steady reader expects it.
    let per_tick = (args.rate / 100).max(1);
    for (c, mut p) in pubs.into_iter().enumerate() {
        let published = published.clone();
        let stop = stop.clone();
        publishers.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut seq = 0;
            while !*stop.borrow() {
                tick.tick().await;
                if p.data(seq, seq + per_tick).await.is_err() {
                    return (c, seq, false);
                }
                seq += per_tick;
                if c == 0 {
                    published.store(seq, Ordering::Relaxed);
                }
            }
            let ok = p.end().await.is_ok();
            (c, seq, ok)
        });
    }

    let mut load = JoinSet::new();
    // Churners.
    {
        let (target, counts, stop) = (target.clone(), counts.clone(), stop.clone());
        let channels = args.channels;
        let every = Duration::from_secs_f64(1.0 / args.churn.max(1) as f64);
        load.spawn(async move {
            let mut sessions = JoinSet::new();
            let mut tick = tokio::time::interval(every);
            let mut n = 0u64;
            while !*stop.borrow() {
                tick.tick().await;
                n += 1;
                let (target, counts) = (target.clone(), counts.clone());
                let c = pick(channels, n);
                let stay = Duration::from_millis(200 + pick(2800, n ^ 0xabcd) as u64);
                sessions.spawn(churner(target, chan(run, c), n, stay, run, counts));
                while sessions.try_join_next().is_some() {}
            }
            while sessions.join_next().await.is_some() {}
        });
    }
    // Slow readers, one per channel, coming back after each cut.
    for c in 0..args.channels {
        let (target, counts, stop) = (target.clone(), counts.clone(), stop.clone());
        load.spawn(async move {
            let mut wake = stop.clone();
            let mut n = 0;
            while !*stop.borrow() {
                n += 1;
                slow_reader(
                    &target,
                    &chan(run, c),
                    &format!("slow{c}-{n}"),
                    &counts,
                    &stop,
                )
                .await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = wake.wait_for(|s| *s) => {}
                }
            }
        });
    }
    // Bad clients.
    {
        let (target, counts, stop) = (target.clone(), counts.clone(), stop.clone());
        let every = Duration::from_secs_f64(1.0 / args.bad.max(1) as f64);
        load.spawn(async move {
            let mut sessions = JoinSet::new();
            let mut tick = tokio::time::interval(every);
            let mut n = 0usize;
            while !*stop.borrow() {
                tick.tick().await;
                n += 1;
                sessions.spawn(bad_client(target.clone(), run, n, counts.clone()));
                while sessions.try_join_next().is_some() {}
            }
            while sessions.join_next().await.is_some() {}
        });
    }

    // RSS every second until the end.
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_print = Instant::now();
    while tokio::time::Instant::now() < end_at {
        tick.tick().await;
        if let Some(rss) = procs::rss_bytes(pid) {
            samples.push((started.elapsed().as_secs_f64(), rss));
        }
        if !server.alive() {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(30) {
            last_print = Instant::now();
            eprintln!(
                "   {:>4.0} s: RSS {:.1} MB, {} frames per channel, {} churn sessions, {} slow \
                 cut, {} bad",
                started.elapsed().as_secs_f64(),
                samples.last().map_or(0.0, |s| s.1 as f64 / 1e6),
                published.load(Ordering::Relaxed),
                counts.churn_sessions.load(Ordering::Relaxed),
                counts.slow_cut.load(Ordering::Relaxed),
                counts.bad_sent.load(Ordering::Relaxed),
            );
        }
    }
    let alive = server.alive();
    let _ = stop_tx.send(true);
    let mut sent = Vec::new();
    while let Some(done) = publishers.join_next().await {
        if let Ok(r) = done {
            sent.push(r);
        }
    }
    sent.sort();
    // Steady readers end at the end marker; bounded in case it never comes.
    let mut steady_results = Vec::new();
    let collect = async {
        while let Some(done) = steady.join_next().await {
            if let Ok(r) = done {
                steady_results.push(r);
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), collect).await;
    let _ = steady_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while load.join_next().await.is_some() {}
    })
    .await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&launch.workdir);

    // Each steady reader must have exactly what its channel's publisher sent.
    let sent_by: std::collections::HashMap<usize, u64> = sent.iter().map(|s| (s.0, s.1)).collect();
    let max_sent = sent.iter().map(|s| s.1).max().unwrap_or(0);
    let min_sent = sent.iter().map(|s| s.1).min().unwrap_or(0);
    let all_pubs_ok = sent.iter().all(|s| s.2) && sent.len() == args.channels;
    let readers_total = args.channels * args.readers;
    let exact = steady_results
        .iter()
        .filter(|(c, r)| {
            r.ended && r.errors == 0 && r.close.is_none() && Some(&r.received) == sent_by.get(c)
        })
        .count();
    let lost_any = exact < readers_total;
    let steady_ok = all_pubs_ok && exact == readers_total;
    let steady_results: Vec<reader::ReadResult> =
        steady_results.into_iter().map(|(_, r)| r).collect();

    // RSS: flat after warm-up?
    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warmup.as_secs_f64())
        .map(|s| s.1)
        .collect();
    let median = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    };
    let baseline = median(&after[..after.len().min(30)]);
    let max_after = after.iter().copied().max();
    let min_after = after.iter().copied().min();
    let last_minute = median(&after[after.len().saturating_sub(60)..]);
    let flat = match (baseline, max_after, min_after) {
        (Some(b), Some(hi), Some(lo)) => {
            (hi as f64) <= b as f64 * 1.05 && (lo as f64) >= b as f64 * 0.95
        }
        _ => false,
    };
    let mb = |v: Option<u64>| v.map_or("–".into(), |b| format!("{:.1} MB", b as f64 / 1e6));

    println!();
    println!("RSS of mles, sampled every second (every 30th sample shown):");
    println!();
    println!("| t | RSS |");
    println!("|---:|---:|");
    for (t, rss) in samples.iter().step_by(30) {
        println!("| {t:.0} s | {:.1} MB |", *rss as f64 / 1e6);
    }
    if let Some((t, rss)) = samples.last() {
        println!("| {t:.0} s | {:.1} MB |", *rss as f64 / 1e6);
    }
    println!();
    println!("| check | result |");
    println!("|---|---|");
    println!(
        "| server alive to the end | {} |",
        if alive { "yes" } else { "**no**" }
    );
    println!(
        "| RSS after the {} s warm-up within 5 % of its baseline | {} (baseline {}, min {}, max {}, \
         last minute's median {}; {} samples) |",
        warmup.as_secs(),
        if flat { "**flat**" } else { "**not flat**" },
        mb(baseline),
        mb(min_after),
        mb(max_after),
        mb(last_minute),
        after.len()
    );
    println!(
        "| steady readers (keep up) got every frame exactly once, in order | {} ({} of {} readers; \
         {}–{} frames per channel, {} channels) |",
        if steady_ok { "**PASS**" } else { "**FAIL**" },
        exact,
        readers_total,
        min_sent,
        max_sent,
        args.channels
    );
    if lost_any || !steady_ok {
        let cut = steady_results
            .iter()
            .filter(|r| r.close == Some(TRY_AGAIN_LATER))
            .count();
        let errors: u64 = steady_results.iter().map(|r| r.errors).sum();
        let short: usize = steady_results
            .iter()
            .filter(|r| r.received < max_sent)
            .count();
        println!(
            "| steady readers' problems | {cut} cut off (1013), {errors} frames out of sequence, \
             {short} short of the most sent, {} finished of {readers_total}; publishers ok: \
             {all_pubs_ok}, sent {min_sent}–{max_sent} |",
            steady_results.len()
        );
    }
    let c = &counts;
    println!(
        "| churners | {} sessions, {} failed to connect, {} frames seen, {} gaps or duplicates, \
         {} closed by the server |",
        c.churn_sessions.load(Ordering::Relaxed),
        c.churn_failed.load(Ordering::Relaxed),
        c.churn_frames.load(Ordering::Relaxed),
        c.churn_gaps.load(Ordering::Relaxed),
        c.churn_closed_by_server.load(Ordering::Relaxed),
    );
    let slow_ended = c.slow_cut.load(Ordering::Relaxed)
        + c.slow_other.load(Ordering::Relaxed)
        + c.slow_dropped.load(Ordering::Relaxed);
    println!(
        "| slow readers (read 20 KB/s of a channel carrying about 100 KB/s) | {} sessions, {} \
         closed with 1013, {} closed with another code, {} dropped without a close frame (the \
         reader got to the end of what was sent before the drop), ended sessions lasted {:.0} s \
         on average, the rest were still open at the end |",
        c.slow_sessions.load(Ordering::Relaxed),
        c.slow_cut.load(Ordering::Relaxed),
        c.slow_other.load(Ordering::Relaxed),
        c.slow_dropped.load(Ordering::Relaxed),
        c.slow_secs.load(Ordering::Relaxed) as f64 / slow_ended.max(1) as f64,
    );
    let codes = c.bad_codes.lock().unwrap_or_else(|e| e.into_inner());
    let by_kind: Vec<String> = codes
        .iter()
        .map(|(kind, codes)| {
            let list: Vec<String> = codes
                .iter()
                .map(|(code, n)| format!("{code} ×{n}"))
                .collect();
            format!("{kind}: {}", list.join(", "))
        })
        .collect();
    println!(
        "| bad clients | {} sent, {} closed by the server, {} not closed within 5 s; {} |",
        c.bad_sent.load(Ordering::Relaxed),
        c.bad_closed.load(Ordering::Relaxed),
        c.bad_hung.load(Ordering::Relaxed),
        by_kind.join("; ")
    );
    println!();
    println!("Soak took {:.0} s.", started.elapsed().as_secs_f64());
    Ok(alive
        && flat
        && steady_ok
        && c.churn_gaps.load(Ordering::Relaxed) == 0
        && c.bad_hung.load(Ordering::Relaxed) == 0)
}

fn chan(run: u64, c: usize) -> String {
    format!("soak-{run:x}-{c}")
}

/// A client that joins, checks the frames it sees are contiguous, and leaves after `stay`.
async fn churner(
    target: Target,
    channel: String,
    n: u64,
    stay: Duration,
    run: u64,
    counts: Arc<Counts>,
) {
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        Conn::connect(&target, &format!("churn{n}"), &channel, 16 * 1024),
    )
    .await;
    let Ok(Ok(mut conn)) = conn else {
        counts.churn_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    counts.churn_sessions.fetch_add(1, Ordering::Relaxed);
    let mut last: Option<u64> = None;
    let mut pongs = Vec::new();
    let until = tokio::time::Instant::now() + stay;
    'read: loop {
        let filled = tokio::select! {
            f = conn.fill() => f,
            _ = tokio::time::sleep_until(until) => break,
        };
        if !matches!(filled, Ok(n) if n > 0) {
            counts
                .churn_closed_by_server
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        loop {
            let (op, range) = match conn.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => break 'read,
            };
            match op {
                OP_BINARY => {
                    let p = conn.payload(range);
                    if p.len() >= HEADER && p[..8] == DATA && u64_at(p, 8) == run {
                        let seq = u64_at(p, 20);
                        if last.is_some_and(|l| seq != l + 1) {
                            counts.churn_gaps.fetch_add(1, Ordering::Relaxed);
                        }
                        last = Some(seq);
                        counts.churn_frames.fetch_add(1, Ordering::Relaxed);
                    }
                }
                OP_PING => {
                    let payload = conn.payload(range).to_vec();
                    encode_frame(&mut pongs, OP_PONG, &payload, conn.mask);
                }
                OP_CLOSE => {
                    counts
                        .churn_closed_by_server
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ => {}
            }
        }
        if !pongs.is_empty() {
            let _ = conn.send(&pongs).await;
            pongs.clear();
        }
    }
    if n.is_multiple_of(2) {
        // A polite leave: a close frame (code 1000), then the connection is dropped.
        let mut out = Vec::new();
        encode_frame(&mut out, OP_CLOSE, &1000u16.to_be_bytes(), conn.mask);
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.send(&out)).await;
    }
}

/// A reader that reads less than its channel carries, until the server closes it.
async fn slow_reader(
    target: &Target,
    channel: &str,
    uid: &str,
    counts: &Counts,
    stop: &watch::Receiver<bool>,
) {
    let opts = SocketOpts {
        source: None,
        recv_buffer: Some(8 * 1024),
    };
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(10),
        Conn::connect_with(target, opts, uid, channel, 4096),
    )
    .await
    else {
        return;
    };
    counts.slow_sessions.fetch_add(1, Ordering::Relaxed);
    let began = Instant::now();
    let mut io = conn.into_io();
    let mut buf = vec![0u8; 4096];
    // The last bytes read, to find a close frame's code at the end of the stream.
    let mut tail: Vec<u8> = Vec::new();
    let mut stop = stop.clone();
    loop {
        let read = tokio::select! {
            r = io.read(&mut buf) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 256 {
                    tail.drain(..tail.len() - 256);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
    // A close frame from the server: 0x88, a length, then the code.
    let code = tail
        .windows(4)
        .rev()
        .find(|w| w[0] == 0x88 && (2..126).contains(&w[1]))
        .map(|w| u16::from_be_bytes([w[2], w[3]]));
    counts
        .slow_secs
        .fetch_add(began.elapsed().as_secs(), Ordering::Relaxed);
    match code {
        Some(TRY_AGAIN_LATER) => counts.slow_cut.fetch_add(1, Ordering::Relaxed),
        Some(_) => counts.slow_other.fetch_add(1, Ordering::Relaxed),
        None => counts.slow_dropped.fetch_add(1, Ordering::Relaxed),
    };
}

/// One bad client, of kind `n % 5`; records how the server ended it.
async fn bad_client(target: Target, run: u64, n: usize, counts: Arc<Counts>) {
    counts.bad_sent.fetch_add(1, Ordering::Relaxed);
    let kinds = [
        "garbage request",
        "non-JSON join",
        "binary first frame",
        "invalid UTF-8 join",
        "oversize frame",
    ];
    let kind = kinds[n % kinds.len()];
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        if n.is_multiple_of(kinds.len()) {
            let mut tcp = crate::client::tcp_connect(target.addr, SocketOpts::default())
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = tcp
                .write_all(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
                .await;
            let mut buf = [0u8; 512];
            let mut answer = Vec::new();
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => answer.extend_from_slice(&buf[..k]),
                }
            }
            let status = String::from_utf8_lossy(&answer)
                .split_whitespace()
                .nth(1)
                .map(|s| format!("HTTP {s}"))
                .unwrap_or_else(|| "closed".into());
            return Ok::<String, String>(status);
        }
        let (uid, channel) = (format!("bad{n}"), format!("soak-{run:x}-bad"));
        let mut conn = if n % kinds.len() == 4 {
            Conn::connect(&target, &uid, &channel, 4096)
                .await
                .map_err(|e| format!("connect: {e}"))?
        } else {
            Conn::connect_raw(&target)
                .await
                .map_err(|e| format!("connect: {e}"))?
        };
        let mut out = Vec::new();
        match n % kinds.len() {
            1 => encode_frame(&mut out, OP_TEXT, b"this is not json", conn.mask),
            2 => encode_frame(
                &mut out,
                OP_BINARY,
                b"{\"uid\":\"x\",\"channel\":\"y\"}",
                conn.mask,
            ),
            3 => encode_frame(
                &mut out,
                OP_TEXT,
                b"{\"uid\":\"\xff\xfe\",\"channel\":\"y\"}",
                conn.mask,
            ),
            _ => encode_frame(&mut out, OP_BINARY, &vec![0u8; MAX_MESSAGE + 1], conn.mask),
        }
        let _ = conn.send(&out).await;
        loop {
            match conn.fill().await {
                Ok(0) | Err(_) => return Ok("dropped".to_string()),
                Ok(_) => {}
            }
            while let Ok(Some((op, range))) = conn.next_frame() {
                if op == OP_CLOSE {
                    return Ok(format!("close {}", close_code(conn.payload(range))));
                }
            }
        }
    })
    .await;
    let label = match outcome {
        Ok(Ok(label)) => {
            counts.bad_closed.fetch_add(1, Ordering::Relaxed);
            label
        }
        Ok(Err(e)) => {
            counts.bad_closed.fetch_add(1, Ordering::Relaxed);
            e
        }
        Err(_) => {
            counts.bad_hung.fetch_add(1, Ordering::Relaxed);
            "not closed within 5 s".into()
        }
    };
    let mut codes = counts.bad_codes.lock().unwrap_or_else(|e| e.into_inner());
    *codes
        .entry(kind.to_string())
        .or_default()
        .entry(label)
        .or_default() += 1;
}
