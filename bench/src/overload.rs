//! Overload scenarios: what a server does when more arrives than it can pass on at once.
//! They report; they never assert timing.
//!
//! - `burst`: one publisher sends 10,000 frames of 128 B flat out (no window) into a
//!   channel of 100 subscribers that all read as fast as they can. Reported: readers cut
//!   off (close 1013) or closed otherwise, frames lost, whether every reader that was not
//!   cut off got every frame once and in order, how long publishing and delivering took.
//! - `burst-stalled`: the same plus one subscriber (a small receive buffer) that stops
//!   reading once joined. It should be cut off (1013) and hold no one back: when the others
//!   are done it reads again, and what it then gets (frames, close code) is reported.
//! - `join-burst-2500`, `join-burst-15000`: that many clients join one channel, their
//!   connects spread evenly over 0.5 s and 3 s. Reported: how many were cut off, how long
//!   the joins and the channel's forming took (formed: every member has seen a sync frame
//!   published after the joins), and whether one frame then published reached all of them
//!   exactly once.
//!
//! Every run starts its server afresh. Each wait is bounded by a stall time (no reader
//! made progress) and by the scenario timeout.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{Conn, SocketOpts, Target};
use crate::procs::{self, Kind, Launch};
use crate::reader::{self, Publisher, ReadResult, Stall, Tally, TRY_AGAIN_LATER};
use crate::stats::si;

/// Scenario names of this module.
pub const NAMES: [&str; 4] = [
    "burst",
    "burst-stalled",
    "join-burst-2500",
    "join-burst-15000",
];

const STALL: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Receive buffer of the stalled reader, so that it stops taking frames soon.
const STALLED_RCVBUF: u32 = 4096;

#[derive(Clone, Debug)]
pub struct Spec {
    pub label: String,
    kind: Scenario,
}

#[derive(Clone, Debug)]
enum Scenario {
    Burst {
        subs: usize,
        frames: u64,
        size: usize,
        stalled: bool,
    },
    JoinBurst {
        members: usize,
        spread: Duration,
    },
}

impl Spec {
    pub fn describe(&self) -> String {
        match &self.kind {
            Scenario::Burst {
                subs,
                frames,
                size,
                stalled,
            } => format!(
                "1 ch × {subs} subs, {frames} frames of {size} B flat out, no window{}",
                if *stalled {
                    ", plus 1 subscriber that stops reading"
                } else {
                    ""
                }
            ),
            Scenario::JoinBurst { members, spread } => format!(
                "{members} clients join 1 channel, connects spread over {:.1} s; then 1 frame",
                spread.as_secs_f64()
            ),
        }
    }

    /// Connections held at once.
    pub fn connections(&self) -> usize {
        match &self.kind {
            Scenario::Burst { subs, .. } => subs + 2,
            Scenario::JoinBurst { members, .. } => members + 1,
        }
    }
}

pub fn specs(name: &str, quick: bool) -> Option<Vec<Spec>> {
    let q = |full: usize, small: usize| if quick { small } else { full };
    let kind = match name {
        "burst" | "burst-stalled" => Scenario::Burst {
            subs: 100,
            frames: q(10_000, 2_000) as u64,
            size: 128,
            stalled: name == "burst-stalled",
        },
        "join-burst-2500" => Scenario::JoinBurst {
            members: q(2_500, 500),
            spread: Duration::from_millis(500),
        },
        "join-burst-15000" => Scenario::JoinBurst {
            members: q(15_000, 1_500),
            spread: Duration::from_secs(3),
        },
        _ => return None,
    };
    Some(vec![Spec {
        label: name.to_string(),
        kind,
    }])
}

/// What one run of an overload scenario saw.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub error: Option<String>,
    pub members: usize,
    /// Readers closed with 1013.
    pub cut: usize,
    /// Readers closed otherwise.
    pub closed: usize,
    /// Frames readers did not get, all of them together.
    pub lost: u64,
    /// Frames missing at readers that were not closed (an exactly-once failure).
    pub lost_open: u64,
    /// Frames out of sequence (duplicated, reordered, or after a gap).
    pub order_errors: u64,
    pub first_error: Option<String>,
    /// Burst: time to write every frame; join-burst: time to connect every member.
    pub phase1: Option<Duration>,
    /// Burst: until every reader is done; join-burst: until the channel formed.
    pub phase2: Option<Duration>,
    /// Join-burst: members the one frame reached exactly once.
    pub reached: usize,
    /// Burst-stalled: the stalled reader's frames and close code (None: not closed).
    pub stalled: Option<(u64, Option<u16>)>,
    pub server_cpu: Option<Duration>,
    pub rss_growth: Option<u64>,
}

impl Outcome {
    fn failed(why: String) -> Outcome {
        Outcome {
            error: Some(why),
            ..Outcome::default()
        }
    }

    /// Every reader that was not cut off got everything exactly once, in order.
    pub fn exactly_once(&self) -> bool {
        self.error.is_none() && self.lost_open == 0 && self.order_errors == 0
    }
}

fn run_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 40) ^ crate::scenario::now_ns()
}

pub async fn run(spec: &Spec, kind: Kind, launch: &Launch, timeout: Duration) -> Outcome {
    let mut server = match launch.start(kind, false).await {
        Ok(server) => server,
        Err(e) => return Outcome::failed(e),
    };
    let target = Target {
        addr: server.addr,
        tls: None,
    };
    let pid = server.pid;
    let rss_before = procs::rss_bytes(pid);
    let cpu_before = procs::cpu_ns(pid);
    let deadline = tokio::time::Instant::now() + timeout;
    let work = async {
        match &spec.kind {
            Scenario::Burst {
                subs,
                frames,
                size,
                stalled,
            } => burst(&target, *subs, *frames, *size, *stalled, deadline).await,
            Scenario::JoinBurst { members, spread } => {
                join_burst(&target, *members, *spread, deadline).await
            }
        }
    };
    let mut outcome = match tokio::time::timeout_at(deadline, work).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::failed(format!("timed out after {} s", timeout.as_secs())),
    };
    outcome.server_cpu = cpu_before
        .zip(procs::cpu_ns(pid))
        .map(|(b, a)| Duration::from_nanos(a.saturating_sub(b)));
    outcome.rss_growth = rss_before
        .zip(procs::rss_bytes(pid))
        .map(|(b, a)| a.saturating_sub(b));
    if !server.alive() {
        outcome.error = Some(format!("server process died: {}", server.log_tail()));
    }
    server.stop().await;
    outcome
}

/// Connects a reader and spawns it; its result comes out of `set`.
#[allow(clippy::too_many_arguments)]
fn spawn_reader(
    set: &mut JoinSet<Result<ReadResult, String>>,
    target: &Target,
    opts: SocketOpts,
    uid: String,
    channel: Arc<str>,
    run: u64,
    want: u64,
    tally: Arc<Tally>,
    stall: Option<Stall>,
    stop: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
    start_at: Option<tokio::time::Instant>,
) {
    let target = target.clone();
    set.spawn(async move {
        if let Some(at) = start_at {
            tokio::time::sleep_until(at).await;
        }
        let conn = {
            let _permit = permits.acquire().await.map_err(|e| e.to_string())?;
            tokio::time::timeout(
                CONNECT_TIMEOUT,
                Conn::connect_with(&target, opts, &uid, &channel, 4096),
            )
            .await
            .map_err(|_| format!("connect {uid}: timed out"))?
            .map_err(|e| format!("connect {uid}: {e}"))?
        };
        tally.connected.fetch_add(1, Ordering::SeqCst);
        tally.changed.notify_waiters();
        Ok(reader::read(conn, run, want, &tally, stall, stop).await)
    });
}

async fn burst(
    target: &Target,
    subs: usize,
    frames: u64,
    size: usize,
    stalled: bool,
    deadline: tokio::time::Instant,
) -> Outcome {
    let run = run_id();
    let channel: Arc<str> = Arc::from(format!("burst-{run:x}"));
    let tally = Arc::new(Tally::default());
    let (stop_tx, stop) = watch::channel(false);
    let (resume_tx, resume) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(64));
    let mut readers = JoinSet::new();
    for i in 0..subs {
        spawn_reader(
            &mut readers,
            target,
            SocketOpts::default(),
            format!("s{i}"),
            channel.clone(),
            run,
            frames,
            tally.clone(),
            None,
            stop.clone(),
            permits.clone(),
            None,
        );
    }
    let mut stalled_reader = JoinSet::new();
    if stalled {
        spawn_reader(
            &mut stalled_reader,
            target,
            SocketOpts {
                recv_buffer: Some(STALLED_RCVBUF),
                ..SocketOpts::default()
            },
            "stalled".into(),
            channel.clone(),
            run,
            frames,
            tally.clone(),
            Some(Stall { resume }),
            stop.clone(),
            permits.clone(),
            None,
        );
    }
    let all = subs + stalled as usize;
    let mut publisher = match Publisher::connect(
        target,
        SocketOpts::default(),
        "p",
        &channel,
        0,
        run,
        size,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => return Outcome::failed(format!("publisher: {e}")),
    };
    let synced = publisher
        .sync_until(
            &tally,
            |t| t.synced.load(Ordering::SeqCst) >= all,
            Duration::from_millis(20),
            deadline.min(tokio::time::Instant::now() + Duration::from_secs(30)),
        )
        .await;
    match synced {
        Ok(true) => {}
        Ok(false) => {
            return Outcome::failed(format!(
                "only {} of {all} subscribers joined ({} cut, {} closed)",
                tally.synced.load(Ordering::SeqCst),
                tally.cut.load(Ordering::SeqCst),
                tally.closed.load(Ordering::SeqCst)
            ))
        }
        Err(e) => return Outcome::failed(format!("publisher: {e}")),
    }
    let t0 = Instant::now();
    if let Err(e) = publisher.data(0, frames).await {
        return Outcome::failed(publisher_error(&publisher, e));
    }
    let published = t0.elapsed();
    let _ = publisher.end().await;
    // Everyone but the stalled reader finishes: end marker, or closed.
    tally
        .wait_until(|t| t.gone() >= subs, STALL, deadline)
        .await;
    let delivered = t0.elapsed();
    let mut outcome = Outcome {
        members: subs,
        phase1: Some(published),
        phase2: Some(delivered),
        ..Outcome::default()
    };
    if stalled {
        let _ = resume_tx.send(true);
        tally.wait_until(|t| t.gone() > subs, STALL, deadline).await;
    }
    let _ = stop_tx.send(true);
    while let Some(done) = readers.join_next().await {
        match done {
            Ok(Ok(r)) => tally_reader(&mut outcome, &r, frames),
            Ok(Err(e)) => {
                outcome.error.get_or_insert(e);
            }
            Err(e) => {
                outcome.error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(Ok(Ok(r))) = stalled_reader.join_next().await {
        outcome.stalled = Some((r.received, r.close));
        outcome.order_errors += r.errors;
        if outcome.first_error.is_none() {
            outcome.first_error = r.first_error.map(|e| format!("stalled: {e}"));
        }
    }
    outcome
}

fn publisher_error(publisher: &Publisher, e: std::io::Error) -> String {
    if publisher.closed() {
        format!("the server closed the publisher ({e})")
    } else {
        format!("publisher: {e}")
    }
}

fn tally_reader(outcome: &mut Outcome, r: &ReadResult, want: u64) {
    let missing = want.saturating_sub(r.received);
    outcome.lost += missing;
    match r.close {
        Some(TRY_AGAIN_LATER) => outcome.cut += 1,
        Some(_) => outcome.closed += 1,
        None => outcome.lost_open += missing,
    }
    outcome.order_errors += r.errors;
    if outcome.first_error.is_none() {
        outcome.first_error.clone_from(&r.first_error);
    }
}

async fn join_burst(
    target: &Target,
    members: usize,
    spread: Duration,
    deadline: tokio::time::Instant,
) -> Outcome {
    let run = run_id();
    let channel: Arc<str> = Arc::from(format!("join-{run:x}"));
    let tally = Arc::new(Tally::default());
    let (stop_tx, stop) = watch::channel(false);
    // The publisher joins first, so every member joins a channel that already exists.
    let mut publisher =
        match Publisher::connect(target, SocketOpts::default(), "p", &channel, 0, run, 128).await {
            Ok(p) => p,
            Err(e) => return Outcome::failed(format!("publisher: {e}")),
        };
    let permits = Arc::new(Semaphore::new(256));
    let mut readers = JoinSet::new();
    let t0 = Instant::now();
    let start = tokio::time::Instant::now();
    for i in 0..members {
        let at = start + spread.mul_f64(i as f64 / members as f64);
        spawn_reader(
            &mut readers,
            target,
            SocketOpts::default(),
            format!("j{i}"),
            channel.clone(),
            run,
            1,
            tally.clone(),
            None,
            stop.clone(),
            permits.clone(),
            Some(at),
        );
    }
    // Joined: every member's join frame is sent (or it failed to connect).
    let connect_bound =
        deadline.min(tokio::time::Instant::now() + spread + Duration::from_secs(60));
    tally
        .wait_until(
            |t| t.connected.load(Ordering::SeqCst) >= members,
            STALL,
            connect_bound,
        )
        .await;
    let joined = t0.elapsed();
    let connected = tally.connected.load(Ordering::SeqCst);
    let mut outcome = Outcome {
        members,
        phase1: Some(joined),
        ..Outcome::default()
    };
    if connected < members {
        outcome.error = Some(format!("only {connected} of {members} connected"));
    }
    // Formed: every member still there has seen a sync frame published after the joins.
    let form_bound = deadline.min(tokio::time::Instant::now() + Duration::from_secs(60));
    let formed = publisher
        .sync_until(
            &tally,
            |t| {
                t.synced.load(Ordering::SeqCst)
                    + t.cut.load(Ordering::SeqCst)
                    + t.closed.load(Ordering::SeqCst)
                    >= connected
            },
            Duration::from_millis(100),
            form_bound,
        )
        .await;
    match formed {
        // Formed only if every member is there to see the sync: a channel whose members
        // were cut off did not form, however soon the rest saw it.
        Ok(true) if tally.synced.load(Ordering::SeqCst) >= members => {
            outcome.phase2 = Some(t0.elapsed())
        }
        Ok(_) if !publisher.closed() => {
            outcome.error.get_or_insert(format!(
                "did not form: {} of {connected} synced",
                tally.synced.load(Ordering::SeqCst)
            ));
        }
        Ok(_) => {
            outcome
                .error
                .get_or_insert("the server closed the publisher".into());
        }
        Err(e) => {
            outcome.error.get_or_insert(publisher_error(&publisher, e));
        }
    }
    // One frame, then the end marker: whoever sees the end has seen all it will get.
    let sent = async {
        publisher.data(0, 1).await?;
        publisher.end().await
    };
    if let Err(e) = sent.await {
        outcome.error.get_or_insert(publisher_error(&publisher, e));
    }
    let end_bound = deadline.min(tokio::time::Instant::now() + Duration::from_secs(60));
    tally
        .wait_until(|t| t.gone() >= connected, STALL, end_bound)
        .await;
    let _ = stop_tx.send(true);
    while let Some(done) = readers.join_next().await {
        match done {
            Ok(Ok(r)) => {
                tally_reader(&mut outcome, &r, 1);
                if r.received == 1 && r.errors == 0 {
                    outcome.reached += 1;
                }
            }
            Ok(Err(e)) => {
                outcome.error.get_or_insert(e);
            }
            Err(e) => {
                outcome.error.get_or_insert(e.to_string());
            }
        }
    }
    outcome
}

/// Runs every overload spec against each server, `repeat` times, each on a fresh server,
/// and prints one Markdown table row per run.
pub async fn measure_and_print(
    specs: &[Spec],
    kinds: &[Kind],
    launch: &Launch,
    repeat: usize,
    timeout: Duration,
) -> bool {
    let mut rows = Vec::new();
    let mut ok = true;
    for spec in specs {
        eprintln!("== {}: {}", spec.label, spec.describe());
        let started = Instant::now();
        let mut runs = Vec::new();
        for rep in 0..repeat.max(1) {
            let mut order: Vec<Kind> = kinds.to_vec();
            if rep % 2 == 1 {
                order.reverse();
            }
            for kind in order {
                let outcome = run(spec, kind, launch, timeout).await;
                eprintln!("   {:<12} {}", kind.name(), describe(spec, &outcome));
                ok &= outcome.exactly_once();
                runs.push((kind, outcome));
            }
        }
        // Rows by server, in the order given, each server's runs in the order they ran.
        runs.sort_by_key(|(kind, _)| kinds.iter().position(|k| k == kind));
        rows.push((spec.clone(), runs, started.elapsed()));
    }
    println!();
    println!(
        "Overload (reported, not asserted; every run on a freshly started server; one row per \
         run). burst: \"publish\" is the time to write every frame, \"deliver\" until every \
         reader got the end marker or was closed. join-burst: \"publish\" is the time until \
         every member's join frame was sent, \"deliver\" until every member had seen a sync \
         frame published after the joins (formed)."
    );
    println!();
    println!(
        "| scenario | server | cut off (1013) | closed otherwise | frames lost | exactly-once in order \
         (readers not cut off) | publish / joined | deliver / formed | 1 frame reached | \
         stalled reader | server CPU | RSS growth | scenario time |"
    );
    println!("|---|---|---:|---:|---:|:---:|---:|---:|---:|---|---:|---:|---:|");
    for (spec, runs, elapsed) in &rows {
        for (i, (kind, o)) in runs.iter().enumerate() {
            let secs = |d: Option<Duration>| d.map_or("–".into(), seconds);
            let is_join = matches!(spec.kind, Scenario::JoinBurst { .. });
            println!(
                "| {} | {} | {} of {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                spec.label,
                kind.name(),
                o.cut,
                o.members,
                o.closed,
                si(o.lost as f64),
                if o.exactly_once() {
                    "PASS".to_string()
                } else {
                    format!(
                        "FAIL ({})",
                        o.error
                            .clone()
                            .or_else(|| o.first_error.clone())
                            .unwrap_or_else(|| format!("{} frames missing", o.lost_open))
                    )
                },
                secs(o.phase1),
                secs(o.phase2),
                if is_join {
                    format!("{} of {}", o.reached, o.members)
                } else {
                    "–".into()
                },
                match o.stalled {
                    None => "–".into(),
                    Some((n, Some(code))) => format!("closed {code} after {n} frames"),
                    Some((n, None)) => format!("not closed, got {n} frames"),
                },
                o.server_cpu.map_or("–".into(), seconds),
                o.rss_growth
                    .map_or("–".into(), |b| format!("{:.1} MB", b as f64 / 1e6)),
                if i == 0 {
                    format!("{:.0} s", elapsed.as_secs_f64())
                } else {
                    String::new()
                },
            );
        }
    }
    ok
}

/// 0.0123 s as "12.3 ms", 1.5 s as "1.50 s".
pub fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn describe(spec: &Spec, o: &Outcome) -> String {
    let mut parts = vec![format!(
        "cut {} of {}, closed {}, lost {}",
        o.cut, o.members, o.closed, o.lost
    )];
    if matches!(spec.kind, Scenario::JoinBurst { .. }) {
        parts.push(format!("reached {}", o.reached));
    }
    if let Some(d) = o.phase1 {
        parts.push(format!("phase1 {}", seconds(d)));
    }
    if let Some(d) = o.phase2 {
        parts.push(format!("phase2 {}", seconds(d)));
    }
    if let Some(s) = o.stalled {
        parts.push(format!("stalled {s:?}"));
    }
    if let Some(e) = o.error.as_ref().or(o.first_error.as_ref()) {
        parts.push(format!("({e})"));
    }
    parts.join(", ")
}
