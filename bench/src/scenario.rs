//! Scenarios: who connects where, what is published, and what every subscriber must see.
//!
//! One run of a scenario against one server:
//! 1. connect every subscriber and one publisher per channel (bounded concurrency) and
//!    time it: the connect rate;
//! 2. sync: each publisher sends a sync frame every 20 ms until every subscriber of its
//!    channel has seen one, which proves all are joined and that whatever history the
//!    server replays (earlier join frames, frames of other runs) lies behind them;
//! 3. measure: publishers send `frames` data frames, flat out (within a window, below) or
//!    at a fixed rate; each carries magic, run id, channel, sequence number and the send
//!    time. Subscribers check that they get each sequence number exactly once and in order,
//!    and record the latency of each. Deliveries/s is all frames received over the time
//!    from the start signal to the last frame received.
//!
//! Flat out is bounded by a window: a publisher may be at most `window` frames ahead of
//! the slowest subscriber of its channel. Without it the publisher outruns any relay that
//! fans out to many members, and then a relay with bounded per-member queues (mles: 1024
//! frames) rightly disconnects members as too slow, while an unbounded one just buffers
//! the backlog. With a window of a few hundred frames the servers always have work queued
//! (so throughput is theirs, not the publisher's), every queue stays within mles's bound,
//! and the comparison is like for like. `--window 0` removes it.
//!
//! `cluster-fanout` runs the same measurement across a cluster (see `cluster.rs`): the
//! publisher joins s1 and subscriber i joins `subscribers[i % n]` (s2 and s3), so every
//! delivery crosses the NATS backplane. Server CPU is then that of every process of the
//! cluster, nats-server included.
//!
//! Every wait is bounded: each connect by `CONNECT_TIMEOUT`, the whole run by the scenario
//! timeout (reported as TIMEOUT), and a run whose subscribers stop making progress after
//! all publishers are done ends as FAIL after `STALL`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::client::{encode_frame, Conn, Target, OP_BINARY, OP_CLOSE, OP_PING};
use crate::procs;
use crate::stats::Histogram;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SYNC_INTERVAL: Duration = Duration::from_millis(20);
const STALL: Duration = Duration::from_secs(5);
/// Frames a flat-out publisher encodes into one write: the overload publishers always, the
/// throughput ones unless `--batch` says otherwise.
pub const BATCH: u64 = 32;
/// Settling time before an idle scenario reads the server's memory.
const IDLE_SETTLE: Duration = Duration::from_millis(500);

pub const DATA: [u8; 8] = *b"MLESBNCH";
pub const SYNC: [u8; 8] = *b"MLESSYNC";
/// magic 8, run id 8, channel 4, sequence 8, send time 8.
pub const HEADER: usize = 36;

pub const OP_PONG: u8 = 0xA;

/// Scenario names of this module: issue 13's first (they run by default), then the others.
pub const NAMES: [&str; 9] = [
    "fanout-100",
    "channels-100x10",
    "fanout-1000-1k",
    "idle-10k",
    "idle-10k-tls",
    "fanout-100-tls",
    "latency-1k",
    "channels-scaling",
    "cluster-fanout",
];

/// Those of [`NAMES`] that run by default (issue 13's).
pub const DEFAULT: [&str; 5] = [
    "fanout-100",
    "channels-100x10",
    "fanout-1000-1k",
    "idle-10k",
    "idle-10k-tls",
];

/// One measured configuration (a scenario has one, channels-scaling one per point).
#[derive(Clone, Debug)]
pub struct Spec {
    pub label: String,
    pub channels: usize,
    /// Subscribers per channel; each channel also has one publisher.
    pub subs: usize,
    /// Data frames per publisher.
    pub frames: u64,
    pub size: usize,
    /// Frames per second per publisher; None: flat out.
    pub rate: Option<u64>,
    pub tls: bool,
    /// Connect, join and hold: measure memory, publish nothing.
    pub idle: bool,
    /// Publisher on one server of a NATS cluster, subscribers on the others.
    pub cluster: bool,
}

impl Spec {
    pub fn connections(&self) -> usize {
        self.channels * (self.subs + 1)
    }

    pub fn deliveries(&self) -> u64 {
        (self.channels * self.subs) as u64 * self.frames
    }

    pub fn describe(&self) -> String {
        if self.idle {
            return format!(
                "{} channels × {} members, idle",
                self.channels,
                self.subs + 1
            );
        }
        let rate = match self.rate {
            Some(r) => format!("{r}/s"),
            None => "flat out".into(),
        };
        format!(
            "{} ch × {} subs × {} frames of {} B, {rate}{}{}",
            self.channels,
            self.subs,
            self.frames,
            self.size,
            if self.tls { ", TLS" } else { "" },
            if self.cluster {
                ", publisher on s1, subs split over s2/s3 (3 mles + NATS JetStream)"
            } else {
                ""
            }
        )
    }
}

/// The configurations of scenario `name`, or None if there is no such scenario.
pub fn specs(name: &str, quick: bool) -> Option<Vec<Spec>> {
    let q = |full: u64, small: u64| if quick { small } else { full };
    let base = Spec {
        label: name.to_string(),
        channels: 1,
        subs: 100,
        frames: q(50_000, 1_000),
        size: 128,
        rate: None,
        tls: false,
        idle: false,
        cluster: false,
    };
    Some(match name {
        "fanout-100" => vec![base],
        // The same load as fanout-100, every delivery across NATS.
        "cluster-fanout" => vec![Spec {
            cluster: true,
            frames: q(10_000, 1_000),
            ..base
        }],
        "channels-100x10" => vec![Spec {
            channels: 100,
            subs: 10,
            frames: q(5_000, 100),
            ..base
        }],
        "fanout-1000-1k" => vec![Spec {
            subs: q(1_000, 200) as usize,
            frames: q(5_000, 200),
            size: 1024,
            ..base
        }],
        // 10,000 joined connections over 100 channels (99 subscribers and a publisher each).
        "idle-10k" | "idle-10k-tls" => vec![Spec {
            channels: 100,
            subs: q(99, 9) as usize,
            frames: 0,
            idle: true,
            tls: name.ends_with("-tls"),
            ..base
        }],
        "fanout-100-tls" => vec![Spec {
            tls: true,
            frames: q(10_000, 1_000),
            ..base
        }],
        "latency-1k" => vec![Spec {
            frames: q(5_000, 1_000),
            rate: Some(1_000),
            ..base
        }],
        "channels-scaling" => {
            let points: &[usize] = if quick {
                &[1, 10, 100]
            } else {
                &[1, 10, 100, 1000]
            };
            let subs = 4;
            let total = q(400_000, 40_000);
            points
                .iter()
                .map(|&channels| Spec {
                    label: format!("channels-scaling/{channels}"),
                    channels,
                    subs,
                    frames: total / (channels * subs) as u64,
                    ..base.clone()
                })
                .collect()
        }
        _ => return None,
    })
}

/// Knobs shared by every run.
#[derive(Clone, Debug)]
pub struct Opts {
    pub window: u64,
    /// Frames a flat-out publisher writes per write call.
    pub batch: u64,
    pub timeout: Duration,
    pub connect_concurrency: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass,
    Fail(String),
    Timeout,
    Error(String),
    /// Not run here, and why (e.g. no nats-server); not a failure.
    Skipped(String),
}

impl Verdict {
    pub fn short(&self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail(_) => "FAIL",
            Verdict::Timeout => "TIMEOUT",
            Verdict::Error(_) => "ERROR",
            Verdict::Skipped(_) => "SKIPPED",
        }
    }
}

/// Where a run's clients connect.
#[derive(Clone)]
pub struct Targets {
    /// Every publisher.
    pub publisher: Target,
    /// Subscriber `i` of each channel connects to `subscribers[i % len]`.
    pub subscribers: Vec<Target>,
}

impl Targets {
    /// Everyone on one server.
    pub fn single(target: Target) -> Targets {
        Targets {
            publisher: target.clone(),
            subscribers: vec![target],
        }
    }

    fn subscriber(&self, i: usize) -> &Target {
        &self.subscribers[i % self.subscribers.len()]
    }
}

/// Sums a per-process figure over `pids`; None if there are none or one is unreadable.
fn sum_over(pids: &[u32], f: fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| f(p)).sum()
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    pub connect_rate: Option<f64>,
    pub deliveries: u64,
    pub per_sec: Option<f64>,
    /// p50, p99, p99.9 in nanoseconds.
    pub latency: Option<[u64; 3]>,
    pub server_cpu_per_delivery: Option<f64>,
    /// Server CPU time over wall time while measuring.
    pub server_cores: Option<f64>,
    /// Busy cores of the whole machine while measuring (ours and everyone else's: the
    /// machine is shared, and a busy neighbour shows here).
    pub machine_cores: Option<f64>,
    /// The same per server process (several only in a cluster): a name (the pid, unless the
    /// caller names it) and its cores, in the order of the pids.
    pub server_cores_each: Vec<(String, f64)>,
    pub bench_cpu_per_delivery: Option<f64>,
    pub rss_per_conn: Option<f64>,
    /// Server RSS in bytes before the clients connected and after they settled (idle).
    pub rss_before_after: Option<(u64, u64)>,
}

impl Outcome {
    pub fn new(verdict: Verdict) -> Outcome {
        Outcome {
            verdict,
            connect_rate: None,
            deliveries: 0,
            per_sec: None,
            latency: None,
            server_cpu_per_delivery: None,
            server_cores: None,
            machine_cores: None,
            server_cores_each: Vec::new(),
            bench_cpu_per_delivery: None,
            rss_per_conn: None,
            rss_before_after: None,
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the bench started: the clock of payload timestamps.
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

pub fn write_header(p: &mut [u8], magic: &[u8; 8], run: u64, channel: u32, seq: u64, ts: u64) {
    p[0..8].copy_from_slice(magic);
    p[8..16].copy_from_slice(&run.to_le_bytes());
    p[16..20].copy_from_slice(&channel.to_le_bytes());
    p[20..28].copy_from_slice(&seq.to_le_bytes());
    p[28..36].copy_from_slice(&ts.to_le_bytes());
}

pub fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Marks a subscriber that is gone: publishers stop waiting for it.
const DEAD: u64 = u64::MAX;

/// One channel's shared state between its publisher and subscribers.
struct Chan {
    name: String,
    index: u32,
    /// Per subscriber: the next sequence number it expects (frames it holds), or DEAD.
    progress: Vec<AtomicU64>,
    synced: AtomicUsize,
    /// The publisher waits for window room; subscribers wake it.
    waiting: AtomicBool,
    wake: Notify,
}

impl Chan {
    fn min_progress(&self) -> u64 {
        self.progress
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .min()
            .unwrap_or(DEAD)
    }

    fn report(&self, sub: usize, value: u64) {
        self.progress[sub].store(value, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Waits until the publisher at `seq` may send at least `need` frames; returns how many.
    async fn room(&self, seq: u64, window: u64, need: u64) -> u64 {
        let room = || {
            self.min_progress()
                .saturating_add(window)
                .saturating_sub(seq)
        };
        loop {
            let r = room();
            if r >= need {
                return r;
            }
            self.waiting.store(true, Ordering::SeqCst);
            let r = room();
            if r < need {
                let _ = tokio::time::timeout(Duration::from_millis(2), self.wake.notified()).await;
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
    }
}

/// State of one run shared by all its clients.
struct Run {
    id: u64,
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// Subscribers the server closed (or that broke) before they were done.
    closed: AtomicUsize,
    published: AtomicUsize,
    error: Mutex<Option<String>>,
    connect: Semaphore,
}

impl Run {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        error.get_or_insert(why);
    }

    fn error(&self) -> String {
        let error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        error.clone().unwrap_or_else(|| "unknown error".into())
    }

    async fn connect(&self, target: &Target, uid: &str, channel: &str, buf: usize) -> Option<Conn> {
        let result = {
            let _permit = self.connect.acquire().await.ok()?;
            tokio::time::timeout(CONNECT_TIMEOUT, Conn::connect(target, uid, channel, buf)).await
        };
        match result {
            Ok(Ok(conn)) => {
                self.connected.fetch_add(1, Ordering::SeqCst);
                Some(conn)
            }
            Ok(Err(e)) => {
                self.fail(format!("connect {uid}: {e}"));
                None
            }
            Err(_) => {
                self.fail(format!("connect {uid}: timed out"));
                None
            }
        }
    }
}

#[derive(Default)]
struct SubResult {
    received: u64,
    /// Frames that were not the sequence number expected next (lost, duplicated, reordered).
    errors: u64,
    first_error: Option<String>,
    closed: bool,
    saw_last: bool,
    last_ns: u64,
    hist: Histogram,
}

async fn subscriber(
    run: Arc<Run>,
    target: Target,
    chan: Arc<Chan>,
    idx: usize,
    frames: u64,
    idle: bool,
) -> SubResult {
    let mut res = SubResult::default();
    let uid = format!("s{}-{idx}", chan.index);
    let buf = if idle { 1024 } else { 64 * 1024 };
    let Some(mut conn) = run.connect(&target, &uid, &chan.name, buf).await else {
        chan.report(idx, DEAD);
        res.closed = true;
        return res;
    };
    let mut synced = false;
    let mut next = 0u64;
    let mut pongs = Vec::new();
    'read: while idle || !res.saw_last {
        match conn.fill().await {
            Ok(0) | Err(_) => {
                res.closed = true;
                break;
            }
            Ok(_) => {}
        }
        let now = now_ns();
        loop {
            let (op, range) = match conn.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    res.closed = true;
                    break 'read;
                }
            };
            match op {
                OP_BINARY => {
                    let p = conn.payload(range);
                    if p.len() < HEADER || u64_at(p, 8) != run.id {
                        continue;
                    }
                    if p[..8] == DATA {
                        let seq = u64_at(p, 20);
                        if seq != next {
                            res.errors += 1;
                            res.first_error.get_or_insert_with(|| {
                                format!("{uid}: expected frame {next}, got {seq}")
                            });
                        }
                        next = seq + 1;
                        res.received += 1;
                        res.saw_last |= seq + 1 == frames;
                        res.hist.record(now.saturating_sub(u64_at(p, 28)));
                        res.last_ns = now;
                    } else if p[..8] == SYNC && !synced {
                        synced = true;
                        chan.synced.fetch_add(1, Ordering::SeqCst);
                    }
                }
                OP_PING => {
                    let payload = conn.payload(range).to_vec();
                    encode_frame(&mut pongs, OP_PONG, &payload, conn.mask);
                }
                OP_CLOSE => {
                    res.closed = true;
                    break 'read;
                }
                // Text: join frames replayed as history.
                _ => {}
            }
        }
        if !pongs.is_empty() {
            if conn.send(&pongs).await.is_err() {
                res.closed = true;
                break;
            }
            pongs.clear();
        }
        if !idle {
            chan.report(idx, next);
        }
    }
    if res.closed {
        run.closed.fetch_add(1, Ordering::SeqCst);
        chan.report(idx, DEAD);
    }
    res
}

struct PubParams {
    frames: u64,
    batch: u64,
    size: usize,
    rate: Option<u64>,
    subs: usize,
    window: u64,
}

async fn publisher(
    run: Arc<Run>,
    target: Target,
    chan: Arc<Chan>,
    params: Arc<PubParams>,
    go: watch::Receiver<bool>,
) {
    let uid = format!("p{}", chan.index);
    let Some(conn) = run.connect(&target, &uid, &chan.name, 1024).await else {
        return;
    };
    let mask = conn.mask;
    let (mut rd, mut wr) = tokio::io::split(conn.into_io());
    // Whatever the server sends a publisher (history, pings) is read and dropped.
    let drain = async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::pin!(drain);
    let open = tokio::select! {
        sent = publish(&run, &chan, &mut wr, mask, &params, go) => {
            if let Err(e) = sent {
                run.fail(format!("publisher {uid}: {e}"));
            }
            true
        }
        _ = &mut drain => {
            run.fail(format!("publisher {uid}: closed by the server"));
            false
        }
    };
    run.published.fetch_add(1, Ordering::SeqCst);
    if open {
        // Stay joined until the run ends (the task is aborted then).
        drain.await;
    }
}

async fn publish<W: tokio::io::AsyncWrite + Unpin>(
    run: &Run,
    chan: &Chan,
    wr: &mut W,
    mask: [u8; 4],
    p: &PubParams,
    mut go: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut payload = vec![0u8; p.size.max(HEADER)];
    let mut out = Vec::with_capacity(p.batch as usize * (payload.len() + 14));
    let mut sync = 0;
    while chan.synced.load(Ordering::SeqCst) < p.subs {
        write_header(&mut payload, &SYNC, run.id, chan.index, sync, now_ns());
        out.clear();
        encode_frame(&mut out, OP_BINARY, &payload[..HEADER], mask);
        wr.write_all(&out).await?;
        wr.flush().await?;
        sync += 1;
        tokio::time::sleep(SYNC_INTERVAL).await;
    }
    if go.wait_for(|go| *go).await.is_err() {
        return Ok(());
    }
    match p.rate {
        Some(rate) => {
            let start = tokio::time::Instant::now();
            let period_ns = 1_000_000_000 / rate.max(1);
            for seq in 0..p.frames {
                tokio::time::sleep_until(start + Duration::from_nanos(period_ns * seq)).await;
                write_header(&mut payload, &DATA, run.id, chan.index, seq, now_ns());
                out.clear();
                encode_frame(&mut out, OP_BINARY, &payload, mask);
                wr.write_all(&out).await?;
                wr.flush().await?;
            }
        }
        None => {
            let mut seq = 0;
            while seq < p.frames {
                let want = p.batch.min(p.frames - seq);
                let room = if p.window == 0 {
                    want
                } else {
                    chan.room(seq, p.window, want.min(p.window)).await
                };
                out.clear();
                for _ in 0..want.min(room) {
                    write_header(&mut payload, &DATA, run.id, chan.index, seq, now_ns());
                    encode_frame(&mut out, OP_BINARY, &payload, mask);
                    seq += 1;
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
            }
        }
    }
    Ok(())
}

/// Runs `spec` against the servers at `targets` (processes `pids`, when known, for their
/// CPU time and memory), within the timeout.
pub async fn run(spec: &Spec, targets: &Targets, pids: &[u32], opts: &Opts) -> Outcome {
    match tokio::time::timeout(opts.timeout, measure(spec, targets, pids, opts)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::new(Verdict::Timeout),
    }
}

async fn measure(spec: &Spec, targets: &Targets, pids: &[u32], opts: &Opts) -> Outcome {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let run = Arc::new(Run {
        id: seed ^ ((std::process::id() as u64) << 32) ^ now_ns(),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        published: AtomicUsize::new(0),
        error: Mutex::new(None),
        connect: Semaphore::new(opts.connect_concurrency.max(1)),
    });
    let chans: Vec<Arc<Chan>> = (0..spec.channels)
        .map(|c| {
            Arc::new(Chan {
                name: format!("bench-{:x}-{c}", run.id),
                index: c as u32,
                progress: (0..spec.subs).map(|_| AtomicU64::new(0)).collect(),
                synced: AtomicUsize::new(0),
                waiting: AtomicBool::new(false),
                wake: Notify::new(),
            })
        })
        .collect();
    let params = Arc::new(PubParams {
        frames: spec.frames,
        batch: opts.batch.max(1),
        size: spec.size,
        rate: spec.rate,
        subs: spec.subs,
        window: opts.window,
    });
    let (go_tx, go_rx) = watch::channel(false);
    // Dropping these (on return or timeout) aborts every client task.
    let mut subs = JoinSet::new();
    let mut pubs = JoinSet::new();
    let rss_before = sum_over(pids, procs::rss_bytes);
    let total = spec.connections();

    let started = Instant::now();
    for chan in &chans {
        for i in 0..spec.subs {
            subs.spawn(subscriber(
                run.clone(),
                targets.subscriber(i).clone(),
                chan.clone(),
                i,
                spec.frames,
                spec.idle,
            ));
        }
    }
    for chan in &chans {
        pubs.spawn(publisher(
            run.clone(),
            targets.publisher.clone(),
            chan.clone(),
            params.clone(),
            go_rx.clone(),
        ));
    }
    while run.connected.load(Ordering::SeqCst) < total {
        if run.failed.load(Ordering::SeqCst) > 0 {
            return Outcome::new(Verdict::Error(run.error()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let connect_rate = total as f64 / started.elapsed().as_secs_f64();
    while chans
        .iter()
        .any(|c| c.synced.load(Ordering::SeqCst) < spec.subs)
    {
        if run.failed.load(Ordering::SeqCst) > 0 {
            return Outcome::new(Verdict::Error(run.error()));
        }
        let closed = run.closed.load(Ordering::SeqCst);
        if closed > 0 {
            let why = format!("{closed} subscribers closed by the server before the start");
            return Outcome {
                connect_rate: Some(connect_rate),
                ..Outcome::new(Verdict::Fail(why))
            };
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    if spec.idle {
        // Settle: until two readings IDLE_SETTLE apart agree within 1 % (at most 10 s), so
        // memory the server frees or grows right after the joins is counted as it ends up.
        let mut rss_after = sum_over(pids, procs::rss_bytes);
        for _ in 0..10 {
            tokio::time::sleep(IDLE_SETTLE).await;
            let now = sum_over(pids, procs::rss_bytes);
            let stable = now
                .zip(rss_after)
                .is_some_and(|(a, b)| (a as f64 - b as f64).abs() <= b as f64 * 0.01);
            rss_after = now;
            if stable {
                break;
            }
        }
        let closed = run.closed.load(Ordering::SeqCst);
        let verdict = if closed == 0 {
            Verdict::Pass
        } else {
            Verdict::Fail(format!("{closed} idle connections closed"))
        };
        return Outcome {
            connect_rate: Some(connect_rate),
            rss_per_conn: rss_before
                .zip(rss_after)
                .map(|(b, a)| (a as f64 - b as f64) / total as f64),
            rss_before_after: rss_before.zip(rss_after),
            ..Outcome::new(verdict)
        };
    }

    let cpu_before = sum_over(pids, procs::cpu_ns);
    let each_before: Vec<Option<u64>> = pids.iter().map(|&p| procs::cpu_ns(p)).collect();
    let bench_before = procs::cpu_ns(std::process::id());
    let machine_before = procs::machine_busy_secs();
    let t0 = now_ns();
    let _ = go_tx.send(true);
    let mut results = Vec::with_capacity(spec.channels * spec.subs);
    let mut last_sum = 0;
    let mut last_change = Instant::now();
    let mut stalled = false;
    loop {
        tokio::select! {
            done = subs.join_next() => match done {
                Some(Ok(result)) => results.push(result),
                Some(Err(e)) => return Outcome::new(Verdict::Error(format!("subscriber task: {e}"))),
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let sum: u64 = chans
                    .iter()
                    .flat_map(|c| c.progress.iter())
                    .map(|p| p.load(Ordering::SeqCst))
                    .filter(|&p| p != DEAD)
                    .sum();
                if sum != last_sum {
                    last_sum = sum;
                    last_change = Instant::now();
                } else if run.published.load(Ordering::SeqCst) == spec.channels
                    && last_change.elapsed() > STALL
                {
                    stalled = true;
                    break;
                }
            }
        }
    }
    let cpu_after = sum_over(pids, procs::cpu_ns);
    let each_after: Vec<Option<u64>> = pids.iter().map(|&p| procs::cpu_ns(p)).collect();
    let bench_after = procs::cpu_ns(std::process::id());
    let machine_after = procs::machine_busy_secs();
    let wall = (now_ns() - t0) as f64 / 1e9;
    drop(pubs);

    let mut hist = Histogram::default();
    let mut received = 0;
    let mut errors = 0;
    let mut closed = 0;
    let mut short = 0;
    let mut first_error = None;
    let mut last = t0;
    for r in &results {
        hist.merge(&r.hist);
        received += r.received;
        errors += r.errors;
        closed += r.closed as u64;
        short += (r.received < spec.frames) as u64;
        last = last.max(r.last_ns);
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
    }
    if stalled {
        received = last_sum;
    }
    let mut problems = Vec::new();
    if stalled {
        problems.push(format!(
            "stalled with {} of {} deliveries",
            received,
            spec.deliveries()
        ));
    }
    if errors > 0 {
        problems.push(format!(
            "{errors} frames out of sequence (first: {})",
            first_error.unwrap_or_default()
        ));
    }
    if closed > 0 {
        problems.push(format!("{closed} subscribers closed by the server"));
    }
    if short > 0 {
        problems.push(format!("{short} subscribers missing frames"));
    }
    if run.failed.load(Ordering::SeqCst) > 0 {
        problems.push(run.error());
    }
    let verdict = if problems.is_empty() && received == spec.deliveries() {
        Verdict::Pass
    } else {
        if problems.is_empty() {
            problems.push(format!("{received} of {} deliveries", spec.deliveries()));
        }
        Verdict::Fail(problems.join("; "))
    };
    let elapsed = (last - t0) as f64 / 1e9;
    let per_delivery = |before: Option<u64>, after: Option<u64>| {
        before
            .zip(after)
            .filter(|_| received > 0)
            .map(|(b, a)| a.saturating_sub(b) as f64 / received as f64)
    };
    Outcome {
        verdict,
        connect_rate: Some(connect_rate),
        deliveries: received,
        per_sec: (elapsed > 0.0).then(|| received as f64 / elapsed),
        latency: (hist.count() > 0)
            .then(|| [0.5, 0.99, 0.999].map(|q| hist.quantile(q).expect("histogram is not empty"))),
        server_cpu_per_delivery: per_delivery(cpu_before, cpu_after),
        server_cores: cpu_before
            .zip(cpu_after)
            .filter(|_| elapsed > 0.0)
            .map(|(b, a)| a.saturating_sub(b) as f64 / 1e9 / elapsed),
        machine_cores: machine_before
            .zip(machine_after)
            .filter(|_| wall > 0.0)
            .map(|(b, a)| (a - b) / wall),
        server_cores_each: pids
            .iter()
            .zip(each_before.iter().zip(&each_after))
            .filter(|_| elapsed > 0.0 && pids.len() > 1)
            .map(|(pid, (b, a))| {
                let cores = match (b, a) {
                    (Some(b), Some(a)) => a.saturating_sub(*b) as f64 / 1e9 / elapsed,
                    _ => f64::NAN,
                };
                (pid.to_string(), cores)
            })
            .collect(),
        bench_cpu_per_delivery: per_delivery(bench_before, bench_after),
        rss_per_conn: None,
        rss_before_after: None,
    }
}
