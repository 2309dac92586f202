//! `reconnect-resume` (issue 15): what the resume extension saves a client that reconnects
//! often to a busy channel. Reported, never asserted on timing.
//!
//! A fresh mles per run. Three publishers send 50 frames of 128 B a second each (150 a
//! second into one channel), each frame carrying its publisher's index, a sequence number
//! and its send time; they publish long enough to fill the history (`--limit`) before the
//! client first joins, and stop `--run-seconds` after that. One client then leaves and
//! comes back every `--reconnect-every` seconds, staying away `--offline` seconds each time
//! (dropping the connection, as a phone losing its link does), until it has seen every
//! publisher's end marker. Each mode on a server of its own:
//!
//! - `plain`: a Mles v2 client; every rejoin replays the whole history.
//! - `resume`: joins with `"positions": true` and, after the first time, `"since"` the last
//!   position mark it got; it leaves right after a mark (within [`MARK_WAIT`] of its time to
//!   leave), so everything it has seen is behind the mark it resumes from.
//!
//! Counted for the client: bytes the server sent it (WebSocket payloads, and wire bytes:
//! everything read from the socket, upgrade responses included), data frames received,
//! duplicates (a publisher's sequence number seen before), missed frames (published after
//! its first join and never seen, leaving out those the history could not hold: more than
//! `--limit` frames published between it and the rejoin after it), the `recovered` answers,
//! and the catch-up of each rejoin: the data frames published before the rejoin (by their
//! send time) that the session brought, plus the text frames (join frames, answer, mark)
//! before its first live frame.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::client::{
    close_code, encode_frame, Conn, SocketOpts, Target, OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT,
};
use crate::procs::{self, Kind, Launch};
use crate::reader::{Publisher, END};
use crate::scenario::{now_ns, u64_at, DATA, HEADER, OP_PONG};

/// Scenario names of this module (none runs by default: each run takes `--run-seconds`).
pub const NAMES: [&str; 1] = ["reconnect-resume"];

const PUBLISHERS: u32 = 3;
/// Frames per second of each publisher.
const RATE_EACH: u64 = 50;
const SIZE: usize = 128;
/// How long past its time to leave the resuming client may wait for a mark.
const MARK_WAIT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Rejoins in a row that may fail before the run gives up.
const MAX_FAILED_JOINS: u64 = 5;
/// Longest warm-up, whatever `--limit` is.
const MAX_WARMUP: Duration = Duration::from_secs(15);

/// The timing flags of the scenario.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub every: f64,
    pub offline: f64,
    pub run: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub label: String,
    every: Duration,
    offline: Duration,
    run: Duration,
}

impl Spec {
    pub fn describe(&self) -> String {
        format!(
            "1 ch, {PUBLISHERS} publishers × {RATE_EACH} frames/s of {SIZE} B for {:.0} s; 1 client \
             away {:.1} s of every {:.1} s, plain v2 and then with resume, each on a fresh mles",
            self.run.as_secs_f64(),
            self.offline.as_secs_f64(),
            self.every.as_secs_f64()
        )
    }

    /// Connections held at once.
    pub fn connections(&self) -> usize {
        PUBLISHERS as usize + 1
    }
}

/// The spec of `name`, or None if it is not this module's; Err for flags out of range.
pub fn specs(name: &str, quick: bool, timing: Timing) -> Option<Result<Vec<Spec>, String>> {
    if !NAMES.contains(&name) {
        return None;
    }
    let run = timing.run.unwrap_or(if quick { 8.0 } else { 30.0 });
    let ok = |v: f64| v.is_finite() && v > 0.0 && v <= 3600.0;
    if !ok(timing.every) || !ok(timing.offline) || !ok(run) || timing.offline >= timing.every {
        return Some(Err(format!(
            "{name}: need 0 < --offline ({}) < --reconnect-every ({}) and 0 < --run-seconds \
             ({run}), all at most 3600",
            timing.offline, timing.every
        )));
    }
    Some(Ok(vec![Spec {
        label: name.to_string(),
        every: Duration::from_secs_f64(timing.every),
        offline: Duration::from_secs_f64(timing.offline),
        run: Duration::from_secs_f64(run),
    }]))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    Resume,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain v2",
            Mode::Resume => "resume",
        }
    }
}

/// What the reconnecting client saw in one run.
#[derive(Clone, Debug, Default)]
struct Outcome {
    error: Option<String>,
    /// Joins after the first that the server took.
    reconnects: u64,
    failed_joins: u64,
    /// Close codes the server sent the client.
    closes: Vec<u16>,
    data_frames: u64,
    duplicates: u64,
    missed: u64,
    /// Not seen, but the history could not hold them.
    beyond_history: u64,
    recovered_true: u64,
    recovered_false: u64,
    marks: u64,
    /// Payload bytes of the marks.
    mark_bytes: u64,
    /// Data frames published after the client's first join.
    published_since_join: u64,
    /// Times the resuming client left without a mark after [`MARK_WAIT`].
    left_without_mark: u64,
    payload_bytes: u64,
    wire_bytes: u64,
    /// Over every rejoin (not the first join).
    catchup_bytes: u64,
    catchup_frames: u64,
    published: u64,
    server_cpu: Option<Duration>,
    elapsed: Duration,
}

impl Outcome {
    fn failed(why: String) -> Outcome {
        Outcome {
            error: Some(why),
            ..Outcome::default()
        }
    }

    fn per_reconnect(&self, v: u64) -> Option<f64> {
        (self.reconnects > 0).then(|| v as f64 / self.reconnects as f64)
    }

    /// Nothing missed; and with resume, nothing twice and every resume honoured.
    fn pass(&self, mode: Mode) -> bool {
        self.error.is_none()
            && self.missed == 0
            && (mode == Mode::Plain || (self.duplicates == 0 && self.recovered_false == 0))
    }
}

fn run_id() -> u64 {
    now_ns() ^ ((std::process::id() as u64) << 40) ^ 0x7265_7375_6d65
}

/// One run: a fresh mles, the publishers and the client in `mode`.
async fn run(spec: &Spec, mode: Mode, launch: &Launch, limit: u64) -> Outcome {
    let started = Instant::now();
    let mut server = match launch.start(Kind::Mles, false).await {
        Ok(server) => server,
        Err(e) => return Outcome::failed(e),
    };
    let target = Target {
        addr: server.addr,
        tls: None,
    };
    let cpu_before = procs::cpu_ns(server.pid);
    let warmup = Duration::from_secs_f64(
        (limit as f64 / (RATE_EACH * PUBLISHERS as u64) as f64 + 0.5).min(MAX_WARMUP.as_secs_f64()),
    );
    let bound = warmup + spec.run + spec.every * 2 + Duration::from_secs(30);
    let work = exercise(spec, mode, &target, limit, warmup);
    let mut outcome = match tokio::time::timeout(bound, work).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::failed(format!("timed out after {} s", bound.as_secs())),
    };
    outcome.server_cpu = cpu_before
        .zip(procs::cpu_ns(server.pid))
        .map(|(b, a)| Duration::from_nanos(a.saturating_sub(b)));
    if !server.alive() {
        outcome.error = Some(format!("server process died: {}", server.log_tail()));
    }
    server.stop().await;
    outcome.elapsed = started.elapsed();
    outcome
}

async fn exercise(
    spec: &Spec,
    mode: Mode,
    target: &Target,
    limit: u64,
    warmup: Duration,
) -> Outcome {
    let run = run_id();
    let channel = format!("resume-{run:x}");
    // Frames published, all publishers together: each frame's place in publishing order.
    let counter = Arc::new(AtomicU64::new(0));
    let first_join = tokio::time::Instant::now() + warmup;
    let stop_at = first_join + spec.run;
    let mut publishers = JoinSet::new();
    let interval = Duration::from_secs(1) / RATE_EACH as u32;
    for p in 0..PUBLISHERS {
        let publisher = match Publisher::connect(
            target,
            SocketOpts::default(),
            &format!("pub{p}"),
            &channel,
            p,
            run,
            SIZE,
        )
        .await
        {
            Ok(publisher) => publisher,
            Err(e) => return Outcome::failed(format!("publisher {p}: {e}")),
        };
        let counter = counter.clone();
        // Spread the publishers over the interval.
        let start = tokio::time::Instant::now() + interval * p / PUBLISHERS;
        publishers.spawn(publish(publisher, p, counter, start, interval, stop_at));
    }
    tokio::time::sleep_until(first_join).await;
    let client = reconnecting_client(spec, mode, target, run, &channel, &counter).await;
    let mut order: Vec<Vec<u64>> = vec![Vec::new(); PUBLISHERS as usize];
    let mut outcome = client.outcome;
    while let Some(done) = publishers.join_next().await {
        match done {
            Ok(Ok((p, places))) => {
                outcome.published += places.len() as u64;
                order[p as usize] = places;
            }
            Ok(Err(e)) => {
                outcome.error.get_or_insert(e);
            }
            Err(e) => {
                outcome.error.get_or_insert(e.to_string());
            }
        }
    }
    // Missed: published after the first join, never seen, and held by the history when
    // the client next joined (or published while it was there).
    let Some(&first) = client.joins.first() else {
        return outcome;
    };
    for (p, places) in order.iter().enumerate() {
        for (seq, &place) in places.iter().enumerate() {
            if place < first {
                continue;
            }
            outcome.published_since_join += 1;
            if client.seen.contains(&(p as u32, seq as u64)) {
                continue;
            }
            let next_join = client.joins.iter().find(|&&j| j > place);
            match next_join {
                Some(&j) if j - place > limit => outcome.beyond_history += 1,
                _ => outcome.missed += 1,
            }
        }
    }
    outcome
}

/// Publishes one frame every `interval` from `start` until `stop_at`, then the end
/// marker. Returns each frame's place in the publishing order of all publishers.
async fn publish(
    mut publisher: Publisher,
    index: u32,
    counter: Arc<AtomicU64>,
    start: tokio::time::Instant,
    interval: Duration,
    stop_at: tokio::time::Instant,
) -> Result<(u32, Vec<u64>), String> {
    let mut tick = tokio::time::interval_at(start, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut places = Vec::new();
    let mut seq = 0u64;
    while tokio::time::Instant::now() < stop_at {
        tick.tick().await;
        publisher
            .data(seq, seq + 1)
            .await
            .map_err(|e| format!("publisher {index}: {e}"))?;
        places.push(counter.fetch_add(1, Ordering::SeqCst));
        seq += 1;
    }
    publisher
        .end()
        .await
        .map_err(|e| format!("publisher {index}: end marker: {e}"))?;
    Ok((index, places))
}

struct ClientResult {
    outcome: Outcome,
    /// (publisher, sequence) of every data frame seen.
    seen: HashSet<(u32, u64)>,
    /// Frames published (the counter) when each join was sent, the first one first.
    joins: Vec<u64>,
}

/// Joins, stays, leaves and comes back on a fixed schedule until it has seen every
/// publisher's end marker.
async fn reconnecting_client(
    spec: &Spec,
    mode: Mode,
    target: &Target,
    run: u64,
    channel: &str,
    counter: &AtomicU64,
) -> ClientResult {
    let mut res = ClientResult {
        outcome: Outcome::default(),
        seen: HashSet::new(),
        joins: Vec::new(),
    };
    let out = &mut res.outcome;
    let uid = "roamer";
    let mut token: Option<String> = None;
    let mut ends: HashSet<u32> = HashSet::new();
    let mut failed_in_a_row = 0;
    let start = tokio::time::Instant::now();
    // Bounded: the run plus a few cycles for the end markers.
    let cycles = (spec.run.as_secs_f64() / spec.every.as_secs_f64()).ceil() as u64 + 10;
    for cycle in 0..cycles {
        let cycle_start = start + spec.every * cycle as u32;
        tokio::time::sleep_until(cycle_start).await;
        let leave_at = cycle_start + spec.every - spec.offline;
        let rejoin = cycle > 0;
        let join = match mode {
            Mode::Plain => serde_json::json!({"uid": uid, "channel": channel}),
            Mode::Resume => {
                let mut join =
                    serde_json::json!({"uid": uid, "channel": channel, "positions": true});
                if let Some(t) = &token {
                    join["since"] = t.clone().into();
                }
                join
            }
        };
        let place = counter.load(Ordering::SeqCst);
        let join_ts = now_ns();
        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Conn::connect_join(
                target,
                SocketOpts::default(),
                uid,
                &join.to_string(),
                16 * 1024,
            ),
        )
        .await;
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                out.failed_joins += 1;
                failed_in_a_row += 1;
                out.error.get_or_insert(format!("join {cycle}: {e}"));
                if failed_in_a_row >= MAX_FAILED_JOINS || !rejoin {
                    break;
                }
                continue;
            }
            Err(_) => {
                out.failed_joins += 1;
                failed_in_a_row += 1;
                out.error
                    .get_or_insert(format!("join {cycle}: connect timed out"));
                if failed_in_a_row >= MAX_FAILED_JOINS || !rejoin {
                    break;
                }
                continue;
            }
        };
        failed_in_a_row = 0;
        res.joins.push(place);
        if rejoin {
            out.reconnects += 1;
        }
        let session = Session {
            mode,
            run,
            rejoin,
            join_ts,
            leave_at,
        };
        let ended = session
            .read(&mut conn, out, &mut res.seen, &mut token, &mut ends)
            .await;
        out.wire_bytes += conn.bytes_read;
        // Leave as a phone losing its link does: no close frame.
        drop(conn);
        match ended {
            Ok(true) => return res,
            Ok(false) => {}
            Err(e) => {
                out.error.get_or_insert(e);
                return res;
            }
        }
    }
    out.error.get_or_insert(format!(
        "saw the end marker of {} of {PUBLISHERS} publishers in {cycles} sessions",
        ends.len()
    ));
    res
}

/// One connection of the reconnecting client.
struct Session {
    mode: Mode,
    run: u64,
    rejoin: bool,
    /// Send time of the join frame (the clock of payload timestamps).
    join_ts: u64,
    leave_at: tokio::time::Instant,
}

impl Session {
    /// Reads until it is time to leave (for `resume`, right after a mark) or every end
    /// marker was seen (Ok(true)). A close from the server ends the session early.
    async fn read(
        &self,
        conn: &mut Conn,
        out: &mut Outcome,
        seen: &mut HashSet<(u32, u64)>,
        token: &mut Option<String>,
        ends: &mut HashSet<u32>,
    ) -> Result<bool, String> {
        let mut live = false;
        let mut pongs = Vec::new();
        let give_up = self.leave_at + MARK_WAIT;
        loop {
            while let Some((op, range)) = conn.next_frame().map_err(|e| e.to_string())? {
                let p = conn.payload(range);
                out.payload_bytes += p.len() as u64;
                let mut mark = false;
                match op {
                    OP_BINARY if p.len() >= HEADER && u64_at(p, 8) == self.run => {
                        let publisher = u32::from_le_bytes([p[16], p[17], p[18], p[19]]);
                        let seq = u64_at(p, 20);
                        let before_join = u64_at(p, 28) < self.join_ts;
                        if self.rejoin && before_join {
                            out.catchup_bytes += p.len() as u64;
                        }
                        if !before_join {
                            live = true;
                        }
                        if p[..8] == DATA {
                            out.data_frames += 1;
                            if self.rejoin && before_join {
                                out.catchup_frames += 1;
                            }
                            if !seen.insert((publisher, seq)) {
                                out.duplicates += 1;
                            }
                        } else if p[..8] == END {
                            ends.insert(publisher);
                        }
                    }
                    OP_TEXT => {
                        if self.rejoin && !live {
                            out.catchup_bytes += p.len() as u64;
                        }
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(p) {
                            if let Some(t) = v.get("position").and_then(|t| t.as_str()) {
                                out.marks += 1;
                                out.mark_bytes += p.len() as u64;
                                *token = Some(t.to_string());
                                mark = true;
                            } else if let Some(r) = v.get("recovered").and_then(|r| r.as_bool()) {
                                if r {
                                    out.recovered_true += 1;
                                } else {
                                    out.recovered_false += 1;
                                }
                            }
                        }
                    }
                    OP_PING => {
                        let payload = p.to_vec();
                        encode_frame(&mut pongs, OP_PONG, &payload, conn.mask);
                    }
                    OP_CLOSE => {
                        out.closes.push(close_code(p));
                        return Ok(false);
                    }
                    _ => {}
                }
                if ends.len() == PUBLISHERS as usize {
                    return Ok(true);
                }
                // A resuming client leaves right after a mark: all it saw is behind it.
                if self.mode == Mode::Resume && mark && tokio::time::Instant::now() >= self.leave_at
                {
                    return Ok(false);
                }
            }
            if !pongs.is_empty() {
                conn.send(&pongs).await.map_err(|e| e.to_string())?;
                pongs.clear();
            }
            let until = match self.mode {
                Mode::Plain => self.leave_at,
                Mode::Resume => give_up,
            };
            if tokio::time::Instant::now() >= until {
                if self.mode == Mode::Resume {
                    out.left_without_mark += 1;
                }
                return Ok(false);
            }
            tokio::select! {
                filled = conn.fill() => match filled {
                    Ok(0) | Err(_) => {
                        out.closes.push(crate::reader::ABNORMAL);
                        return Ok(false);
                    }
                    Ok(_) => {}
                },
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

/// Runs the scenario `repeat` times per mode (alternating which goes first), each run on a
/// fresh mles, and prints a Markdown table. True if every run passed.
pub async fn measure_and_print(specs: &[Spec], launch: &Launch, repeat: usize) -> bool {
    let limit = crate::cluster::history_limit(&launch.mles_args);
    let mut ok = true;
    let mut rows: Vec<(Spec, Vec<(Mode, Outcome)>)> = Vec::new();
    for spec in specs {
        eprintln!("== {}: {}", spec.label, spec.describe());
        let mut runs = Vec::new();
        for rep in 0..repeat.max(1) {
            let mut order = [Mode::Plain, Mode::Resume];
            if rep % 2 == 1 {
                order.reverse();
            }
            for mode in order {
                let outcome = run(spec, mode, launch, limit).await;
                eprintln!("   {:<9} {}", mode.name(), brief(&outcome));
                ok &= outcome.pass(mode);
                runs.push((mode, outcome));
            }
        }
        runs.sort_by_key(|(mode, _)| *mode == Mode::Resume);
        rows.push((spec.clone(), runs));
    }
    println!();
    println!(
        "Reconnect and resume (issue 15; reported, not asserted; every run on a freshly \
         started mles with `--limit {limit}`). {PUBLISHERS} publishers send {RATE_EACH} frames/s \
         of {SIZE} B each into one channel; one client leaves (dropping the connection) and \
         rejoins on a fixed schedule. \"plain v2\": a plain join each time, so every rejoin \
         replays the history; \"resume\": `\"positions\":true` and `\"since\"` the last mark, \
         leaving right after a mark. Catch-up: what a rejoin brought of frames published \
         before it, plus the text frames (join frames, answer, mark) before its first live \
         frame. Payload: WebSocket payload bytes the client read; wire: every byte read from \
         the socket (upgrade responses and frame headers included). Missed: published after \
         the first join and never seen, leaving out frames more than --limit behind the next \
         rejoin (\"beyond history\")."
    );
    for (spec, runs) in &rows {
        println!();
        println!("{}: {}", spec.label, spec.describe());
        println!();
        println!(
            "| mode | reconnects | catch-up per reconnect (frames / payload) | data frames \
             received (published after the first join) | duplicates | missed (beyond history) \
             | recovered true / false | marks (payload) | payload bytes | wire bytes | server CPU \
             | verdict | time |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|");
        for (mode, o) in runs {
            let per = |v: u64| o.per_reconnect(v);
            println!(
                "| {} | {} | {} | {} ({}) | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {:.0} s |",
                mode.name(),
                o.reconnects,
                match (per(o.catchup_frames), per(o.catchup_bytes)) {
                    (Some(f), Some(b)) => format!("{f:.1} / {}", bytes(b)),
                    _ => "–".into(),
                },
                o.data_frames,
                o.published_since_join,
                o.duplicates,
                o.missed,
                o.beyond_history,
                match mode {
                    Mode::Plain => "–".to_string(),
                    Mode::Resume => format!("{} / {}", o.recovered_true, o.recovered_false),
                },
                match mode {
                    Mode::Plain => "–".to_string(),
                    Mode::Resume => format!("{} ({})", o.marks, bytes(o.mark_bytes as f64)),
                },
                bytes(o.payload_bytes as f64),
                bytes(o.wire_bytes as f64),
                o.server_cpu.map_or("–".into(), crate::overload::seconds),
                if o.pass(*mode) {
                    "PASS".to_string()
                } else {
                    format!(
                        "FAIL{}",
                        o.error
                            .as_ref()
                            .map_or(String::new(), |e| format!(" ({e})"))
                    )
                },
                o.elapsed.as_secs_f64(),
            );
        }
        let sum = |mode: Mode, f: fn(&Outcome) -> u64| -> u64 {
            runs.iter()
                .filter(|(m, o)| *m == mode && o.error.is_none())
                .map(|(_, o)| f(o))
                .sum()
        };
        let ratio = |f: fn(&Outcome) -> u64| -> String {
            let (plain, resume) = (sum(Mode::Plain, f), sum(Mode::Resume, f));
            if resume == 0 || plain == 0 {
                "–".into()
            } else {
                format!("**{:.2}×**", plain as f64 / resume as f64)
            }
        };
        let marks = sum(Mode::Resume, |o| o.mark_bytes);
        let resume_payload = sum(Mode::Resume, |o| o.payload_bytes);
        println!();
        println!(
            "Saving (plain v2 bytes / resume bytes{}): catch-up payload per reconnect {}, \
             total payload {}, total wire {}. Position marks were {} of the resume client's \
             payload bytes.",
            if runs.len() > 2 {
                ", summed over the runs"
            } else {
                ""
            },
            per_reconnect_ratio(runs),
            ratio(|o| o.payload_bytes),
            ratio(|o| o.wire_bytes),
            if resume_payload > 0 {
                format!("{:.0} %", marks as f64 / resume_payload as f64 * 100.0)
            } else {
                "–".into()
            },
        );
        let notes: Vec<String> = runs
            .iter()
            .filter_map(|(mode, o)| {
                let mut n = Vec::new();
                if o.failed_joins > 0 {
                    n.push(format!("{} joins failed", o.failed_joins));
                }
                if !o.closes.is_empty() {
                    n.push(format!("closed by the server: {:?}", o.closes));
                }
                if o.left_without_mark > 0 {
                    n.push(format!(
                        "left {} times without a mark in {} ms",
                        o.left_without_mark,
                        MARK_WAIT.as_millis()
                    ));
                }
                if let Some(e) = &o.error {
                    n.push(e.clone());
                }
                (!n.is_empty()).then(|| format!("- {}: {}", mode.name(), n.join("; ")))
            })
            .collect();
        if !notes.is_empty() {
            println!();
            println!("Notes:");
            for n in notes {
                println!("{n}");
            }
        }
    }
    ok
}

/// Catch-up bytes per reconnect, plain over resume, from the sums over runs.
fn per_reconnect_ratio(runs: &[(Mode, Outcome)]) -> String {
    let per = |mode: Mode| {
        let (b, r) = runs
            .iter()
            .filter(|(m, o)| *m == mode && o.error.is_none())
            .fold((0, 0), |(b, r), (_, o)| {
                (b + o.catchup_bytes, r + o.reconnects)
            });
        (r > 0).then(|| b as f64 / r as f64)
    };
    match (per(Mode::Plain), per(Mode::Resume)) {
        (Some(p), Some(r)) if r > 0.0 => {
            format!("{} vs {}: **{:.2}×**", bytes(p), bytes(r), p / r)
        }
        _ => "–".into(),
    }
}

/// 1234 -> "1.2 kB", 2_500_000 -> "2.50 MB".
fn bytes(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} MB", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} kB", v / 1e3)
    } else {
        format!("{v:.0} B")
    }
}

fn brief(o: &Outcome) -> String {
    let mut s = format!(
        "reconnects {}, frames {}, duplicates {}, missed {} (beyond history {}), recovered {}/{}, \
         marks {} ({} B), payload {} B, wire {} B, catch-up {} B",
        o.reconnects,
        o.data_frames,
        o.duplicates,
        o.missed,
        o.beyond_history,
        o.recovered_true,
        o.recovered_false,
        o.marks,
        o.mark_bytes,
        o.payload_bytes,
        o.wire_bytes,
        o.catchup_bytes
    );
    if let Some(e) = &o.error {
        s.push_str(&format!(" ({e})"));
    }
    s
}
