//! Scale: the most connections this machine lets one server (or a five-server cluster)
//! hold, and what each costs.
//!
//! A process here may hold at most 20,000 open files (`ulimit -Hn`, not raisable), so the
//! load generator runs as several worker processes (`mles-bench worker`, this binary
//! spawning itself), each binding its clients to a source address of its own (127.0.0.10,
//! .11, ...) before connecting, which also spreads them over more ports than one address
//! has. Workers report their progress as JSON lines on stdout and exit when their stdin
//! closes (the bench ended or died) or after their time bound.
//!
//! - `scale-19k`, `scale-19k-tls`: one fresh mles holding 19,000 joined connections over
//!   100 channels (190 each, plus a publisher per channel). Reported: connect rate (all
//!   workers together, TCP + TLS + upgrade + join), RSS per connection (fresh process,
//!   before and after), whether every connection then gets one frame of its channel exactly
//!   once, and the CPU the server and the generators used while connecting (what bounds
//!   the rate). With TLS, also handshakes per second, full (no session cache) and resumed
//!   (a client session cache; the count that really resumed is shown), each a TCP connect,
//!   TLS handshake and WebSocket upgrade, 32 at a time, measured before the hold.
//! - `cluster-95k`: three `nats-server` nodes clustered on loopback with JetStream, five
//!   mles each given every node's URL (`--nats-replicas 3`), 19,000 connections on each,
//!   all in ONE channel; one frame published on s1 must reach all 95,000 exactly once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Semaphore};

use crate::client::{self, Conn, SocketOpts, Target};
use crate::cluster::{self, NatsCluster};
use crate::overload::seconds;
use crate::procs::{self, Kind, Launch};
use crate::reader::{self, Publisher, Tally};
use crate::stats::si;

pub const NAMES: [&str; 3] = ["scale-19k", "scale-19k-tls", "cluster-95k"];
pub const DEFAULT: [&str; 3] = NAMES;

/// First source address of the workers (127.0.0.10, .11, ...).
const FIRST_SOURCE: u8 = 10;
/// Connections a worker opens at once.
const WORKER_CONCURRENCY: usize = 64;
/// TLS handshakes measured per kind, and how many run at once.
const HANDSHAKES: usize = 2_000;
const HANDSHAKE_CONCURRENCY: usize = 32;
/// Longest any phase may go without progress.
const STALL: Duration = Duration::from_secs(15);
/// Longest a worker lives.
const WORKER_LIFETIME: Duration = Duration::from_secs(900);

#[derive(Clone, Debug)]
pub struct Spec {
    pub label: String,
    /// Joined client connections (publishers not counted).
    pub total: usize,
    pub channels: usize,
    pub tls: bool,
    /// mles servers in a NATS cluster (0: one server, no NATS).
    pub cluster: usize,
    pub workers: usize,
    pub handshakes: usize,
}

impl Spec {
    pub fn describe(&self) -> String {
        if self.cluster > 0 {
            format!(
                "{} connections in 1 channel over {} mles + a {}-node NATS JetStream cluster \
                 (replicas 3), {} worker processes; 1 frame to all",
                self.total,
                self.cluster,
                cluster::NATS_NODES,
                self.workers
            )
        } else {
            format!(
                "{} joined connections over {} channels on one mles{}, {} worker processes; 1 \
                 frame per channel to all",
                self.total,
                self.channels,
                if self.tls { ", TLS" } else { "" },
                self.workers
            )
        }
    }
}

pub fn specs(name: &str, quick: bool) -> Option<Vec<Spec>> {
    let q = |full: usize, small: usize| if quick { small } else { full };
    let spec = match name {
        "scale-19k" | "scale-19k-tls" => Spec {
            label: name.to_string(),
            total: q(19_000, 2_000),
            channels: 100,
            tls: name.ends_with("-tls"),
            cluster: 0,
            workers: 4,
            handshakes: q(HANDSHAKES, 200),
        },
        "cluster-95k" => Spec {
            label: name.to_string(),
            total: q(95_000, 5_000),
            channels: 1,
            tls: false,
            cluster: 5,
            workers: 10,
            handshakes: 0,
        },
        _ => return None,
    };
    Some(vec![spec])
}

/// A worker's progress line.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub connected: usize,
    pub failed: usize,
    pub synced: usize,
    pub complete: usize,
    pub ended: usize,
    pub cut: usize,
    pub closed: usize,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Status {
    fn add(&mut self, o: &Status) {
        self.connected += o.connected;
        self.failed += o.failed;
        self.synced += o.synced;
        self.complete += o.complete;
        self.ended += o.ended;
        self.cut += o.cut;
        self.closed += o.closed;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }

    fn gone(&self) -> usize {
        self.ended + self.cut + self.closed
    }
}

/// Flags of `mles-bench worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    #[arg(long)]
    pub server: SocketAddr,
    #[arg(long)]
    pub tls: bool,
    #[arg(long)]
    pub source: IpAddr,
    #[arg(long)]
    pub count: usize,
    /// Index of this worker's first connection among all workers'.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    #[arg(long)]
    pub channels: usize,
    #[arg(long)]
    pub channel_prefix: String,
    #[arg(long)]
    pub run: u64,
}

/// `mles-bench worker`: connects its clients, reads, prints progress until stdin closes.
pub async fn worker(args: WorkerArgs) -> std::io::Result<()> {
    procs::raise_nofile();
    let target = Target {
        addr: args.server,
        tls: args.tls.then(client::tls_connector),
    };
    let tally = Arc::new(Tally::default());
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let (_stop_tx, stop) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(WORKER_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.count {
        let g = args.offset + i;
        let uid = format!("c{g}");
        let channel = format!("{}-{}", args.channel_prefix, g % args.channels);
        let (target, tally, stop, permits, failed, first_error) = (
            target.clone(),
            tally.clone(),
            stop.clone(),
            permits.clone(),
            failed.clone(),
            first_error.clone(),
        );
        let opts = SocketOpts {
            source: Some(args.source),
            recv_buffer: None,
        };
        let run = args.run;
        tasks.spawn(async move {
            let conn = {
                let Ok(_permit) = permits.acquire().await else {
                    return;
                };
                tokio::time::timeout(
                    Duration::from_secs(30),
                    Conn::connect_with(&target, opts, &uid, &channel, 1024),
                )
                .await
            };
            let conn = match conn {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert_with(|| format!("connect {uid}: {e}"));
                    return;
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert_with(|| format!("connect {uid}: timed out"));
                    return;
                }
            };
            tally.connected.fetch_add(1, Ordering::SeqCst);
            reader::read(conn, run, 1, &tally, None, stop).await;
        });
    }
    let status = || Status {
        connected: tally.connected.load(Ordering::SeqCst),
        failed: failed.load(Ordering::SeqCst),
        synced: tally.synced.load(Ordering::SeqCst),
        complete: tally.complete.load(Ordering::SeqCst),
        ended: tally.ended.load(Ordering::SeqCst),
        cut: tally.cut.load(Ordering::SeqCst),
        closed: tally.closed.load(Ordering::SeqCst),
        errors: tally.errors.load(Ordering::SeqCst),
        first_error: first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    };
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last = String::new();
    let until = tokio::time::Instant::now() + WORKER_LIFETIME;
    loop {
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(_)) => {}
                // The bench closed our stdin (or died): done.
                _ => break,
            },
            _ = tick.tick() => {
                let line = serde_json::to_string(&status()).unwrap_or_default();
                if line != last {
                    println!("{line}");
                    last = line;
                }
            }
            _ = tokio::time::sleep_until(until) => break,
        }
    }
    Ok(())
}

/// The running workers and their latest progress.
struct Workers {
    children: Vec<Child>,
    status: Vec<Status>,
    rx: tokio::sync::mpsc::UnboundedReceiver<(usize, Status)>,
}

impl Workers {
    /// Spawns one worker per entry of `plan`: (server, count); worker w binds to
    /// 127.0.0.(10 + w).
    fn spawn(
        plan: &[(SocketAddr, usize)],
        tls: bool,
        channels: usize,
        channel_prefix: &str,
        run: u64,
    ) -> Result<Workers, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own binary: {e}"))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut offset = 0;
        for (w, (server, count)) in plan.iter().enumerate() {
            let source = Ipv4Addr::new(127, 0, 0, FIRST_SOURCE + w as u8);
            let mut cmd = Command::new(&exe);
            cmd.arg("worker")
                .args(["--server", &server.to_string()])
                .args(["--source", &source.to_string()])
                .args(["--count", &count.to_string()])
                .args(["--offset", &offset.to_string()])
                .args(["--channels", &channels.to_string()])
                .args(["--channel-prefix", channel_prefix])
                .args(["--run", &run.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if tls {
                cmd.arg("--tls");
            }
            offset += count;
            let mut child = cmd.spawn().map_err(|e| format!("worker {w}: {e}"))?;
            let stdout = child.stdout.take().ok_or("worker without stdout")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(status) = serde_json::from_str::<Status>(&line) {
                        if tx.send((w, status)).is_err() {
                            break;
                        }
                    }
                }
            });
            children.push(child);
        }
        Ok(Workers {
            status: vec![Status::default(); children.len()],
            children,
            rx,
        })
    }

    fn total(&self) -> Status {
        let mut sum = Status::default();
        for s in &self.status {
            sum.add(s);
        }
        sum
    }

    /// Waits until `done(total)`, no progress for [`STALL`], or `deadline`; true if done.
    async fn wait(
        &mut self,
        done: impl Fn(&Status) -> bool,
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut moved = tokio::time::Instant::now();
        loop {
            if done(&self.total()) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || now.duration_since(moved) >= STALL {
                return false;
            }
            match tokio::time::timeout(Duration::from_millis(500), self.rx.recv()).await {
                Ok(Some((w, status))) => {
                    self.status[w] = status;
                    moved = tokio::time::Instant::now();
                }
                Ok(None) => return done(&self.total()),
                Err(_) => {}
            }
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    async fn stop(mut self) {
        for child in &mut self.children {
            // Closing stdin ends a worker; kill makes sure.
            drop(child.stdin.take());
        }
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub error: Option<String>,
    pub total: usize,
    pub status: Status,
    pub connect_time: Option<Duration>,
    pub form_time: Option<Duration>,
    pub deliver_time: Option<Duration>,
    /// Bytes per connection on each server process.
    pub rss_per_conn: Vec<f64>,
    /// CPU seconds of the servers, of the generators and of the whole machine while
    /// connecting.
    pub connect_cpu: Option<(f64, f64, f64)>,
    /// Handshakes per second, full and resumed, the count that resumed, and server and
    /// generator CPU µs per handshake of each.
    pub handshakes: Option<Handshakes>,
}

#[derive(Clone, Debug, Default)]
pub struct Handshakes {
    pub full_rate: f64,
    pub full_cpu_us: (f64, f64),
    /// Cores busy on the whole machine meanwhile.
    pub full_machine: f64,
    pub resumed_rate: f64,
    pub resumed: usize,
    pub attempted: usize,
    pub resumed_cpu_us: (f64, f64),
    pub resumed_machine: f64,
}

impl Outcome {
    fn pass(&self) -> bool {
        self.error.is_none()
            && self.status.complete == self.total
            && self.status.errors == 0
            && self.status.cut == 0
            && self.status.closed == 0
    }
}

fn sum_cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| procs::cpu_ns(p)).sum::<u64>() as f64 / 1e9
}

fn sum_rss(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|&p| procs::rss_bytes(p).unwrap_or(0))
        .collect()
}

/// Waits until the summed RSS of `pids` is stable within 1 % over 500 ms (at most 10 s).
async fn settled_rss(pids: &[u32]) -> Vec<u64> {
    let mut last = sum_rss(pids);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sum_rss(pids);
        let (a, b) = (
            now.iter().sum::<u64>() as f64,
            last.iter().sum::<u64>() as f64,
        );
        last = now;
        if (a - b).abs() <= b * 0.01 {
            break;
        }
    }
    last
}

/// Times `count` TLS connections (connect, handshake, upgrade, close), `HANDSHAKE_CONCURRENCY`
/// at a time: full handshakes without a session cache, or resumed ones from a cache primed
/// by one connection per slot. Returns (per second, resumed count, server CPU s, own CPU s,
/// machine cores busy).
async fn time_handshakes(
    addr: SocketAddr,
    server_pid: u32,
    count: usize,
    resume: bool,
) -> Result<(f64, usize, f64, f64, f64), String> {
    let config = client::tls_config(resume);
    let slots = HANDSHAKE_CONCURRENCY;
    // A name per slot: each slot resumes its own sessions (the server ignores the name).
    let name = |slot: usize| {
        rustls::pki_types::ServerName::try_from(format!("slot{slot}.localhost"))
            .map_err(|e| e.to_string())
    };
    if resume {
        for slot in 0..slots {
            client::tls_upgrade(addr, SocketOpts::default(), config.clone(), name(slot)?)
                .await
                .map_err(|e| format!("priming handshake: {e}"))?;
        }
    }
    let server_before = sum_cpu(&[server_pid]);
    let own_before = sum_cpu(&[std::process::id()]);
    let machine_before = procs::machine_busy_secs().unwrap_or(0.0);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..slots {
        let config = config.clone();
        let name = name(slot)?;
        let n = count / slots + usize::from(slot < count % slots);
        tasks.spawn(async move {
            let mut resumed = 0;
            for _ in 0..n {
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    client::tls_upgrade(addr, SocketOpts::default(), config.clone(), name.clone()),
                )
                .await
                .map_err(|_| "handshake timed out".to_string())?
                .map_err(|e| format!("handshake: {e}"))?;
                resumed += usize::from(r);
            }
            Ok::<usize, String>(resumed)
        });
    }
    let mut resumed = 0;
    while let Some(done) = tasks.join_next().await {
        resumed += done.map_err(|e| e.to_string())??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((
        count as f64 / secs,
        resumed,
        sum_cpu(&[server_pid]) - server_before,
        sum_cpu(&[std::process::id()]) - own_before,
        (procs::machine_busy_secs().unwrap_or(0.0) - machine_before) / secs,
    ))
}

fn run_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ ((std::process::id() as u64) << 40) ^ crate::scenario::now_ns()) >> 1
}

pub async fn run(spec: &Spec, launch: &Launch, timeout: Duration) -> Outcome {
    let deadline = tokio::time::Instant::now() + timeout;
    if spec.cluster > 0 {
        let Some(binary) = &launch.nats_server else {
            return Outcome {
                error: Some("no nats-server (Debian package nats-server)".into()),
                ..Outcome::default()
            };
        };
        let cluster = match tokio::time::timeout_at(
            deadline,
            NatsCluster::start(launch, binary, spec.cluster, Duration::from_secs(60)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Outcome {
                    error: Some(e),
                    ..Outcome::default()
                }
            }
            Err(_) => {
                return Outcome {
                    error: Some("cluster did not start in time".into()),
                    ..Outcome::default()
                }
            }
        };
        let mut cluster = cluster;
        let addrs: Vec<SocketAddr> = cluster.servers.iter().map(|s| s.addr).collect();
        let pids: Vec<u32> = cluster.servers.iter().map(|s| s.pid).collect();
        let mut outcome = tokio::time::timeout_at(deadline, hold(spec, &addrs, &pids, false))
            .await
            .unwrap_or_else(|_| Outcome {
                error: Some(format!("timed out after {} s", timeout.as_secs())),
                ..Outcome::default()
            });
        if let Some(dead) = cluster.dead() {
            outcome.error.get_or_insert(dead);
        }
        cluster.stop().await;
        return outcome;
    }
    let mut server = match launch.start(Kind::Mles, spec.tls).await {
        Ok(s) => s,
        Err(e) => {
            return Outcome {
                error: Some(e),
                ..Outcome::default()
            }
        }
    };
    let work = async {
        let mut handshakes = None;
        if spec.tls && spec.handshakes > 0 {
            let full = time_handshakes(server.addr, server.pid, spec.handshakes, false).await;
            let resumed = time_handshakes(server.addr, server.pid, spec.handshakes, true).await;
            match (full, resumed) {
                (Ok(f), Ok(r)) => {
                    let n = spec.handshakes as f64;
                    handshakes = Some(Handshakes {
                        full_rate: f.0,
                        full_cpu_us: (f.2 / n * 1e6, f.3 / n * 1e6),
                        full_machine: f.4,
                        resumed_machine: r.4,
                        resumed_rate: r.0,
                        resumed: r.1,
                        attempted: spec.handshakes,
                        resumed_cpu_us: (r.2 / n * 1e6, r.3 / n * 1e6),
                    })
                }
                (Err(e), _) | (_, Err(e)) => {
                    return Outcome {
                        error: Some(e),
                        ..Outcome::default()
                    }
                }
            }
        }
        let mut outcome = hold(spec, &[server.addr], &[server.pid], spec.tls).await;
        outcome.handshakes = handshakes;
        outcome
    };
    let mut outcome = tokio::time::timeout_at(deadline, work)
        .await
        .unwrap_or_else(|_| Outcome {
            error: Some(format!("timed out after {} s", timeout.as_secs())),
            ..Outcome::default()
        });
    if !server.alive() {
        outcome
            .error
            .get_or_insert(format!("server died: {}", server.log_tail()));
    }
    server.stop().await;
    outcome
}

/// Connects `spec.total` clients through workers spread evenly over `addrs` (publishers,
/// one per channel, on the first server), then sends one frame per channel and checks that
/// every client got it exactly once.
async fn hold(spec: &Spec, addrs: &[SocketAddr], pids: &[u32], tls: bool) -> Outcome {
    let run = run_id();
    let prefix = format!("scale-{run:x}");
    let mut outcome = Outcome {
        total: spec.total,
        ..Outcome::default()
    };
    let rss_before = sum_rss(pids);
    let tls_connector = tls.then(client::tls_connector);
    let mut publishers = Vec::new();
    for c in 0..spec.channels {
        let target = Target {
            addr: addrs[0],
            tls: tls_connector.clone(),
        };
        match Publisher::connect(
            &target,
            SocketOpts::default(),
            &format!("p{c}"),
            &format!("{prefix}-{c}"),
            c as u32,
            run,
            128,
        )
        .await
        {
            Ok(p) => publishers.push(p),
            Err(e) => {
                outcome.error = Some(format!("publisher {c}: {e}"));
                return outcome;
            }
        }
    }
    // Workers spread evenly over the servers, each a share of the connections.
    let per_server = spec.workers / addrs.len().max(1);
    let plan: Vec<(SocketAddr, usize)> = (0..spec.workers)
        .map(|w| {
            let server = addrs[(w / per_server.max(1)).min(addrs.len() - 1)];
            let count = spec.total / spec.workers + usize::from(w < spec.total % spec.workers);
            (server, count)
        })
        .collect();
    let cpu0 = (sum_cpu(pids), procs::machine_busy_secs().unwrap_or(0.0));
    let started = Instant::now();
    let mut workers = match Workers::spawn(&plan, tls, spec.channels, &prefix, run) {
        Ok(w) => w,
        Err(e) => {
            outcome.error = Some(e);
            return outcome;
        }
    };
    let wpids = workers.pids();
    let far = tokio::time::Instant::now() + Duration::from_secs(600);
    let connected = workers
        .wait(|s| s.connected + s.failed >= spec.total, far)
        .await;
    outcome.connect_time = Some(started.elapsed());
    outcome.connect_cpu = Some((
        sum_cpu(pids) - cpu0.0,
        sum_cpu(&wpids),
        procs::machine_busy_secs().unwrap_or(0.0) - cpu0.1,
    ));
    let status = workers.total();
    if !connected || status.failed > 0 {
        outcome.error = Some(format!(
            "{} of {} connected, {} failed{}",
            status.connected,
            spec.total,
            status.failed,
            status
                .first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        ));
    }
    let rss_after = settled_rss(pids).await;
    let per_server_conns = spec.total as f64 / addrs.len() as f64;
    outcome.rss_per_conn = rss_before
        .iter()
        .zip(&rss_after)
        .enumerate()
        .map(|(i, (b, a))| {
            let conns = per_server_conns + if i == 0 { spec.channels as f64 } else { 0.0 };
            (*a as f64 - *b as f64) / conns
        })
        .collect();
    // Formed: every client still joined has seen a sync frame of its channel.
    let formed_at = Instant::now();
    let connected_n = workers.total().connected;
    let sync_bound = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut round = 0;
    loop {
        for p in publishers.iter_mut() {
            let _ = p.sync(round).await;
        }
        round += 1;
        let next = tokio::time::Instant::now() + Duration::from_millis(250);
        let done = workers
            .wait(|s| s.synced + s.cut + s.closed >= connected_n, next)
            .await;
        if done || tokio::time::Instant::now() >= sync_bound {
            break;
        }
        if publishers.iter().all(Publisher::closed) {
            outcome
                .error
                .get_or_insert("the server closed every publisher".into());
            break;
        }
    }
    let synced = workers.total();
    if synced.synced < connected_n {
        outcome.error.get_or_insert(format!(
            "did not form: {} of {connected_n} saw a sync frame ({} cut, {} closed)",
            synced.synced, synced.cut, synced.closed
        ));
    } else {
        outcome.form_time = Some(formed_at.elapsed());
    }
    let sent_at = Instant::now();
    for p in publishers.iter_mut() {
        let _ = p.data(0, 1).await;
        let _ = p.end().await;
    }
    workers
        .wait(
            |s| s.gone() >= connected_n,
            tokio::time::Instant::now() + Duration::from_secs(120),
        )
        .await;
    outcome.deliver_time = Some(sent_at.elapsed());
    outcome.status = workers.total();
    workers.stop().await;
    outcome
}

/// What bounds a phase that kept `cores` of the machine busy: its CPU when (nearly) every
/// core was busy, otherwise something else (connections in flight, the accept loop).
fn bound(cores: f64) -> &'static str {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if cores >= 0.9 * n {
        "bound by CPU"
    } else {
        "not CPU-bound"
    }
}

/// Runs each scale spec `repeat` times and prints a table.
pub async fn measure_and_print(specs: &[Spec], launch: &Launch, repeat: usize) -> bool {
    let mut rows = Vec::new();
    let mut ok = true;
    for spec in specs {
        eprintln!("== {}: {}", spec.label, spec.describe());
        let started = Instant::now();
        let mut runs = Vec::new();
        for _ in 0..repeat.max(1) {
            let o = run(spec, launch, Duration::from_secs(900)).await;
            eprintln!(
                "   mles  connected {} of {}, complete {}, cut {}, closed {}, errors {}{}",
                o.status.connected,
                o.total,
                o.status.complete,
                o.status.cut,
                o.status.closed,
                o.status.errors,
                o.error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            ok &= o.pass();
            runs.push(o);
        }
        rows.push((spec.clone(), runs, started.elapsed()));
    }
    println!();
    println!(
        "Scale (mles only; one row per run, each on fresh processes; clients in worker processes \
         bound to 127.0.0.10, .11, …; connect/s is TCP + {{TLS}} + upgrade + join for all \
         connections together, {WORKER_CONCURRENCY} at a time per worker; RSS per connection is \
         the growth of each server from fresh over its connections; \"1 frame\" is one frame per \
         channel, published after every client saw a sync frame, which each client must get \
         exactly once)."
    );
    println!();
    println!(
        "| scenario | connected | connect/s | CPU while connecting (servers / generators / whole machine) | RSS/conn \
         | formed | 1 frame reached exactly once | cut off (1013) | closed otherwise | verdict | \
         scenario time |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|");
    let mut hs_rows = Vec::new();
    for (spec, runs, elapsed) in &rows {
        for (i, o) in runs.iter().enumerate() {
            let rate = o
                .connect_time
                .map(|t| si(o.status.connected as f64 / t.as_secs_f64()));
            let cpu = o.connect_cpu.zip(o.connect_time).map(|((s, g, m), t)| {
                let t = t.as_secs_f64();
                format!(
                    "{:.2} / {:.2} / {:.2} cores ({})",
                    s / t,
                    g / t,
                    m / t,
                    bound(m / t)
                )
            });
            let rss: Vec<String> = o
                .rss_per_conn
                .iter()
                .map(|r| format!("{:.1} KB", r / 1000.0))
                .collect();
            println!(
                "| {} | {} of {} | {} | {} | {} | {} | {} of {} | {} | {} | {} | {} |",
                spec.label,
                o.status.connected,
                o.total,
                rate.unwrap_or_else(|| "–".into()),
                cpu.unwrap_or_else(|| "–".into()),
                if rss.is_empty() {
                    "–".into()
                } else {
                    rss.join(", ")
                },
                o.form_time.map_or("–".into(), seconds),
                o.status.complete.saturating_sub(o.status.errors as usize),
                o.total,
                o.status.cut,
                o.status.closed,
                if o.pass() {
                    "PASS".to_string()
                } else {
                    format!(
                        "FAIL ({})",
                        o.error.clone().unwrap_or_else(|| format!(
                            "{} frames out of sequence",
                            o.status.errors
                        ))
                    )
                },
                if i == 0 {
                    format!("{:.0} s", elapsed.as_secs_f64())
                } else {
                    String::new()
                }
            );
            if let Some(h) = &o.handshakes {
                hs_rows.push((spec.label.clone(), h.clone()));
            }
        }
    }
    if !hs_rows.is_empty() {
        println!();
        println!(
            "TLS handshakes on the fresh server before the hold ({HANDSHAKE_CONCURRENCY} at a \
             time; each a TCP connect, TLS handshake, WebSocket upgrade and close; CPU per \
             handshake of the server and of the generator, which share the 2 cores):"
        );
        println!();
        println!(
            "| scenario | full handshakes/s | CPU/handshake (server / generator) | machine | \
             resumed handshakes/s | really resumed | CPU/handshake (server / generator) | machine |"
        );
        println!("|---|---:|---:|---|---:|---:|---:|---|");
        for (label, h) in hs_rows {
            println!(
                "| {label} | {} | {:.0} / {:.0} µs | {:.2} cores busy ({}) | {} | {} of {} | \
                 {:.0} / {:.0} µs | {:.2} cores busy ({}) |",
                si(h.full_rate),
                h.full_cpu_us.0,
                h.full_cpu_us.1,
                h.full_machine,
                bound(h.full_machine),
                si(h.resumed_rate),
                h.resumed,
                h.attempted,
                h.resumed_cpu_us.0,
                h.resumed_cpu_us.1,
                h.resumed_machine,
                bound(h.resumed_machine)
            );
        }
    }
    ok
}
