//! mles-bench: the load benchmark of mles, and the minimal relay it is measured against.
//!
//! `mles-bench [run] [SCENARIO...]` starts `mles` (next to this binary by default) and the
//! minimal relay (`mles-bench relay`, the machine's ceiling) as child processes on free
//! loopback ports, runs each scenario against both, and prints a Markdown table: connect
//! rate, deliveries per second, latency percentiles from a send timestamp in each payload,
//! an exactly-once-in-order check, server CPU per delivery, and the ratio mles/relay.
//!
//! ```text
//! cargo build --release
//! target/release/mles-bench                 # every scenario
//! target/release/mles-bench --quick         # smoke run
//! target/release/mles-bench fanout-100 --repeat 3
//! target/release/mles-bench cluster-fanout fanout-100 --repeat 3
//! ```
//!
//! `cluster-fanout` starts a `nats-server -js` and three mles servers linked through it
//! (the relay has no cluster mode), and is reported next to the single-server fanout-100.

mod client;
mod cluster;
mod procs;
mod relay;
mod scenario;
mod stats;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::client::Target;
use crate::cluster::Cluster;
use crate::procs::{Kind, Launch};
use crate::scenario::{Opts, Outcome, Spec, Targets, Verdict};
use crate::stats::{duration_ns, si};

#[derive(Parser)]
#[command(
    name = "mles-bench",
    version,
    about = "Load benchmark for mles, measured against a minimal relay in the same run",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios against mles and the minimal relay and print a Markdown table (default).
    Run(RunArgs),
    /// Serve the minimal relay: no history, no auth, no limits; the ceiling mles is compared to.
    Relay(RelayArgs),
}

#[derive(Args, Clone, Debug)]
struct RunArgs {
    /// Scenarios to run (default: all; see --list); a point such as channels-scaling/10
    /// runs alone.
    #[arg(value_name = "SCENARIO")]
    scenarios: Vec<String>,
    /// Scale counts down for a quick smoke run.
    #[arg(long)]
    quick: bool,
    /// Multiply every scenario's frame count (longer, steadier runs on a noisy machine).
    #[arg(long, default_value_t = 1)]
    scale: u64,
    /// Runs per server and scenario, alternating which server goes first; the median is shown.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Frames a flat-out publisher may be ahead of the slowest subscriber of its channel
    /// (0: unlimited). Keep it below mles's --queue-frames (1024).
    #[arg(long, default_value_t = 256)]
    window: u64,
    /// Seconds one run of a scenario may take before it is reported as TIMEOUT.
    #[arg(long, default_value_t = 90)]
    timeout: u64,
    /// Servers to measure.
    #[arg(long, value_delimiter = ',', default_value = "mles,relay")]
    servers: Vec<String>,
    /// The mles binary (default: `mles` next to this binary).
    #[arg(long)]
    mles: Option<PathBuf>,
    /// The nats-server binary for cluster-fanout (default: /usr/sbin/nats-server,
    /// /usr/bin/nats-server or the first on PATH); without one the scenario is SKIPPED.
    #[arg(long, value_name = "PATH")]
    nats_server: Option<PathBuf>,
    /// Extra flag for mles (repeatable), e.g. --mles-arg=--queue-frames=4096.
    #[arg(long = "mles-arg", allow_hyphen_values = true)]
    mles_args: Vec<String>,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Measure an already running server at this loopback address instead of starting mles
    /// and the relay (no comparison then). Scenarios ending in -tls need it to speak TLS.
    #[arg(long, value_name = "ADDR")]
    server: Option<SocketAddr>,
    /// The process id of --server, for its CPU time and memory.
    #[arg(long, value_name = "PID", requires = "server")]
    server_pid: Option<u32>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
}

#[derive(Args, Debug)]
struct RelayArgs {
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    #[arg(long)]
    port: u16,
    /// Serve TLS with a self-signed certificate for localhost.
    #[arg(long)]
    tls: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Relay(args)) => relay_main(args),
        Some(Command::Run(args)) => run_main(args),
        None => run_main(cli.run),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn relay_main(args: RelayArgs) -> ExitCode {
    match runtime().block_on(relay::serve(args.bind, args.port, args.tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mles-bench relay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One scenario configuration's results: per server, every repetition.
struct Measured {
    spec: Spec,
    runs: Vec<(Kind, Vec<Outcome>)>,
}

fn run_main(args: RunArgs) -> ExitCode {
    if args.list {
        for name in scenario::NAMES {
            for spec in scenario::specs(name, args.quick).unwrap_or_default() {
                println!("{:<22} {}", spec.label, spec.describe());
            }
        }
        return ExitCode::SUCCESS;
    }
    let names: Vec<String> = if args.scenarios.is_empty() {
        scenario::NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    let mut specs = Vec::new();
    for name in &names {
        // A point of a scenario ("channels-scaling/10") selects just that point.
        let (base, point) = match name.split_once('/') {
            Some((base, _)) => (base, Some(name.as_str())),
            None => (name.as_str(), None),
        };
        let found = scenario::specs(base, args.quick).map(|s| {
            s.into_iter()
                .filter(|spec| point.is_none_or(|p| spec.label == p))
                .collect::<Vec<_>>()
        });
        match found.filter(|s| !s.is_empty()) {
            Some(s) => specs.extend(s.into_iter().map(|mut spec| {
                spec.frames *= args.scale.max(1);
                spec
            })),
            None => {
                eprintln!(
                    "mles-bench: no scenario '{name}'; there are: {}",
                    scenario::NAMES.join(", ")
                );
                return ExitCode::from(2);
            }
        }
    }
    let mut kinds = Vec::new();
    if let Some(addr) = args.server {
        if !addr.ip().is_loopback() {
            eprintln!("mles-bench: --server must be a loopback address (this bench loads only this machine)");
            return ExitCode::from(2);
        }
        kinds.push(Kind::External);
    }
    for s in args.servers.iter().filter(|_| args.server.is_none()) {
        match s.as_str() {
            "mles" => kinds.push(Kind::Mles),
            "relay" => kinds.push(Kind::Relay),
            other => {
                eprintln!("mles-bench: unknown server '{other}' (mles, relay)");
                return ExitCode::from(2);
            }
        }
    }
    let mles = args.mles.clone().unwrap_or_else(|| procs::sibling("mles"));
    if kinds.contains(&Kind::Mles) && !mles.is_file() {
        eprintln!(
            "mles-bench: no mles binary at {} (build it with `cargo build --release`, or pass --mles)",
            mles.display()
        );
        return ExitCode::from(2);
    }
    let nofile = procs::raise_nofile();
    let most = specs.iter().map(Spec::connections).max().unwrap_or(0) as u64;
    if nofile > 0 && nofile < most + 256 {
        eprintln!(
            "mles-bench: warning: open-files limit {nofile} is below the {most} connections needed"
        );
    }
    let mut mles_args = unlimited_flags(&mles, &args.mles_args);
    mles_args.extend(args.mles_args.iter().cloned());
    let launch = Launch {
        mles,
        mles_args,
        relay: std::env::current_exe().unwrap_or_else(|_| procs::sibling("mles-bench")),
        nats_server: match &args.nats_server {
            Some(path) => Some(path.clone()).filter(|p| p.is_file()),
            None => cluster::nats_server(),
        },
        workdir: std::env::temp_dir().join(format!("mles-bench-{}", std::process::id())),
    };
    let opts = Opts {
        window: args.window,
        timeout: Duration::from_secs(args.timeout),
        connect_concurrency: args.connect_concurrency,
    };
    let external = args.server.map(|addr| (addr, args.server_pid));
    let measured = runtime().block_on(measure_all(
        &specs,
        &kinds,
        &launch,
        &opts,
        args.repeat,
        external,
    ));
    let _ = std::fs::remove_dir_all(&launch.workdir);
    let command: Vec<String> = std::env::args().collect();
    print_table(&measured, &command.join(" "), &args, &launch.mles_args);
    let all_pass = measured
        .iter()
        .flat_map(|m| m.runs.iter().flat_map(|(_, o)| o.iter()))
        .all(|o| matches!(o.verdict, Verdict::Pass | Verdict::Skipped(_)));
    if all_pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Per-client abuse limits of mles that would throttle a load generator whose every client
/// comes from 127.0.0.1: switched off when this mles has them and `--mles-arg` does not
/// set them.
fn unlimited_flags(mles: &std::path::Path, given: &[String]) -> Vec<String> {
    let help = std::process::Command::new(mles)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    ["--ip-rate", "--per-ip-limit", "--message-rate"]
        .iter()
        .filter(|flag| help.contains(&format!("{flag} ")))
        .filter(|flag| !given.iter().any(|g| g.starts_with(*flag)))
        .map(|flag| format!("{flag}=0"))
        .collect()
}

async fn measure_all(
    specs: &[Spec],
    kinds: &[Kind],
    launch: &Launch,
    opts: &Opts,
    repeat: usize,
    external: Option<(SocketAddr, Option<u32>)>,
) -> Vec<Measured> {
    let tls = client::tls_connector();
    let mut all = Vec::new();
    for spec in specs {
        eprintln!("== {}: {}", spec.label, spec.describe());
        let mut runs: Vec<(Kind, Vec<Outcome>)> = kinds.iter().map(|&k| (k, Vec::new())).collect();
        for rep in 0..repeat.max(1) {
            let mut order: Vec<usize> = (0..kinds.len()).collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let kind = kinds[i];
                if spec.cluster {
                    let outcome = match kind {
                        // No cluster mode: no row, and n/a in the mles row's ratio.
                        Kind::Relay if kinds.contains(&Kind::Mles) => continue,
                        Kind::Relay => Outcome::new(Verdict::Skipped(
                            "the minimal relay has no cluster mode".into(),
                        )),
                        Kind::External => Outcome::new(Verdict::Skipped(
                            "the bench starts the cluster itself (nats-server and three mles), \
                             not with --server"
                                .into(),
                        )),
                        Kind::Mles => run_cluster(spec, launch, opts).await,
                    };
                    eprintln!("   {:<5} {}", kind.name(), describe(&outcome));
                    runs[i].1.push(outcome);
                    continue;
                }
                if let Some((addr, pid)) = external {
                    let target = Target {
                        addr,
                        tls: spec.tls.then(|| tls.clone()),
                    };
                    let pids: Vec<u32> = pid.into_iter().collect();
                    let outcome = scenario::run(spec, &Targets::single(target), &pids, opts).await;
                    eprintln!("   {:<5} {}", kind.name(), describe(&outcome));
                    runs[i].1.push(outcome);
                    continue;
                }
                let outcome = match launch.start(kind, spec.tls).await {
                    Ok(mut server) => {
                        let target = Target {
                            addr: server.addr,
                            tls: spec.tls.then(|| tls.clone()),
                        };
                        let mut outcome =
                            scenario::run(spec, &Targets::single(target), &[server.pid], opts)
                                .await;
                        if !server.alive() {
                            outcome.verdict = Verdict::Error("server process died".into());
                        }
                        server.stop().await;
                        outcome
                    }
                    Err(e) => Outcome::new(Verdict::Error(e)),
                };
                eprintln!("   {:<5} {}", kind.name(), describe(&outcome));
                runs[i].1.push(outcome);
            }
        }
        all.push(Measured {
            spec: spec.clone(),
            runs,
        });
    }
    all
}

/// Servers in cluster-fanout: the publisher's and two for the subscribers.
const CLUSTER_SIZE: usize = 3;

/// One run of a cluster scenario: starts nats-server and the mles servers, publishes on s1
/// to subscribers on the others, stops them all. Start and run share the scenario timeout.
async fn run_cluster(spec: &Spec, launch: &Launch, opts: &Opts) -> Outcome {
    let Some(binary) = &launch.nats_server else {
        return Outcome::new(Verdict::Skipped(
            "no nats-server (--nats-server, /usr/sbin/nats-server, /usr/bin/nats-server or on \
             PATH; Debian package nats-server)"
                .into(),
        ));
    };
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let started =
        tokio::time::timeout_at(deadline, Cluster::start(launch, binary, CLUSTER_SIZE)).await;
    let mut cluster = match started {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(e)) => return Outcome::new(Verdict::Error(e)),
        // Dropping the half-started cluster killed its processes.
        Err(_) => return Outcome::new(Verdict::Timeout),
    };
    let target = |server: &procs::Server| Target {
        addr: server.addr,
        tls: None,
    };
    let targets = Targets {
        publisher: target(&cluster.servers[0]),
        subscribers: cluster.servers[1..].iter().map(target).collect(),
    };
    let opts = Opts {
        timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
        ..opts.clone()
    };
    let mut outcome = scenario::run(spec, &targets, &cluster.pids(), &opts).await;
    for ((name, _), label) in outcome.server_cores_each.iter_mut().zip(cluster.names()) {
        *name = label;
    }
    if let Some(dead) = cluster.dead() {
        outcome.verdict = Verdict::Error(dead);
    }
    cluster.stop().await;
    let limit = cluster::history_limit(&launch.mles_args);
    if let Verdict::Fail(why) = &mut outcome.verdict {
        if opts.window == 0 || opts.window > limit {
            why.push_str(&format!(
                "; note: the window ({}) exceeds the per-channel stream limit (--limit {limit}): \
                 a server whose NATS link lags more frames than that behind the stream loses the \
                 frames JetStream discarded (a window below the limit passes)",
                if opts.window == 0 {
                    "unlimited".to_string()
                } else {
                    opts.window.to_string()
                }
            ));
        }
    }
    outcome
}

/// A one-line account of a run, for the progress log.
fn describe(o: &Outcome) -> String {
    let mut parts = vec![o.verdict.short().to_string()];
    if let Some(c) = o.connect_rate {
        parts.push(format!("connect {}/s", si(c)));
    }
    if let Some(r) = o.per_sec {
        parts.push(format!("{} deliveries/s ({})", si(r), o.deliveries));
    }
    if let Some([p50, p99, p999]) = o.latency {
        parts.push(format!(
            "p50 {} p99 {} p99.9 {}",
            duration_ns(p50),
            duration_ns(p99),
            duration_ns(p999)
        ));
    }
    if let Some(c) = o.server_cpu_per_delivery {
        parts.push(format!("server {c:.0} ns CPU/delivery"));
    }
    if let Some(c) = o.server_cores {
        parts.push(format!("server {c:.2} cores"));
    }
    if !o.server_cores_each.is_empty() {
        let each: Vec<String> = o
            .server_cores_each
            .iter()
            .map(|(name, c)| format!("{name} {c:.2}"))
            .collect();
        parts.push(format!("cores by process: {}", each.join(" ")));
    }
    if let Some(c) = o.bench_cpu_per_delivery {
        parts.push(format!("bench {c:.0} ns CPU/delivery"));
    }
    if let Some(r) = o.rss_per_conn {
        parts.push(format!("RSS {:.1} KB/conn", r / 1000.0));
    }
    match &o.verdict {
        Verdict::Fail(why) | Verdict::Error(why) | Verdict::Skipped(why) => {
            parts.push(format!("({why})"))
        }
        _ => {}
    }
    parts.join(", ")
}

/// What a scenario is judged by, and so which repetition is its median.
#[derive(Clone, Copy, PartialEq)]
enum Figure {
    Throughput,
    Latency,
    Memory,
}

fn figure(spec: &Spec) -> Figure {
    if spec.idle {
        Figure::Memory
    } else if spec.rate.is_some() {
        Figure::Latency
    } else {
        Figure::Throughput
    }
}

fn key(figure: Figure, o: &Outcome) -> Option<f64> {
    match figure {
        Figure::Throughput => o.per_sec,
        Figure::Latency => o.latency.map(|l| l[1] as f64),
        Figure::Memory => o.rss_per_conn,
    }
}

/// The median passing repetition; failing ones win, so a failure is never hidden.
fn representative(figure: Figure, outcomes: &[Outcome]) -> Option<&Outcome> {
    if let Some(bad) = outcomes.iter().find(|o| o.verdict != Verdict::Pass) {
        return Some(bad);
    }
    let mut sorted: Vec<&Outcome> = outcomes.iter().collect();
    sorted.sort_by(|a, b| {
        let (a, b) = (key(figure, a), key(figure, b));
        a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal)
    });
    sorted.get(sorted.len() / 2).copied()
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

fn passed(o: Option<&Outcome>) -> Option<&Outcome> {
    o.filter(|o| o.verdict == Verdict::Pass)
}

/// Connect rates over fewer connections than this are not shown: they time one handshake.
const MIN_CONNECTIONS_FOR_RATE: usize = 100;

fn print_table(measured: &[Measured], command: &str, args: &RunArgs, mles_args: &[String]) {
    println!();
    println!("`{command}`");
    println!();
    println!(
        "{} cores; window {} frames; {} run(s) per server, median shown; latency from the send \
         timestamp in each payload; server CPU from /proc/<pid>/task/*/schedstat.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.window,
        args.repeat.max(1),
    );
    if !mles_args.is_empty() {
        println!();
        println!(
            "mles ran with `{}` (per-client abuse limits off: every bench client is 127.0.0.1, \
             and the relay has no limits).",
            mles_args.join(" ")
        );
    }
    if measured.iter().any(|m| m.spec.cluster) {
        println!();
        println!(
            "cluster-fanout: one nats-server -js and {CLUSTER_SIZE} mles (`--server-id sN --nats \
             nats://127.0.0.1:<port> --limit {}`) on loopback; the publisher joins s1, 50 \
             subscribers each join s2 and s3, so every delivery crosses NATS JetStream; server CPU \
             is that of all four processes. The relay has no cluster mode (n/a); compare with the \
             single-server fanout-100 mles row next to it.",
            cluster::history_limit(mles_args)
        );
    }
    println!();
    println!(
        "| scenario | server | connect/s | deliveries/s | p50 | p99 | p99.9 | exactly-once in order \
         | server CPU/delivery | RSS/conn | mles/relay | mles/relay CPU/delivery |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|");
    let mut summary = Summary::default();
    // cluster-fanout right after the single-server fanout-100 it is compared with.
    let mut order: Vec<&Measured> = measured.iter().collect();
    let single = order.iter().position(|m| m.spec.label == "fanout-100");
    let clustered = order.iter().position(|m| m.spec.cluster);
    if let (Some(single), Some(clustered)) = (single, clustered) {
        let m = order.remove(clustered);
        let at = if clustered < single {
            single
        } else {
            single + 1
        };
        order.insert(at, m);
    }
    for m in order {
        let fig = figure(&m.spec);
        let pick = |kind: Kind| {
            m.runs
                .iter()
                .find(|(k, _)| *k == kind)
                .and_then(|(_, o)| representative(fig, o))
        };
        let (mles, relay) = (pick(Kind::Mles), pick(Kind::Relay));
        let ratio_of = |f: &dyn Fn(&Outcome) -> Option<f64>| {
            let (a, b) = (passed(mles)?, passed(relay)?);
            Some(f(a)? / f(b).filter(|&y| y > 0.0)?)
        };
        let ratio = ratio_of(&|o| key(fig, o));
        let cpu_ratio = ratio_of(&|o| o.server_cpu_per_delivery);
        summary.note(&m.spec, fig, mles, relay, ratio);
        let ratio_cell = match (mles, ratio) {
            (Some(a), _) if a.verdict != Verdict::Pass => {
                format!("{} (no score)", a.verdict.short())
            }
            _ if m.spec.cluster => "n/a (relay: no cluster mode)".into(),
            (_, Some(r)) => match fig {
                Figure::Throughput => format!("**{r:.2}×** deliveries/s"),
                Figure::Latency => format!("**{r:.2}×** p99"),
                Figure::Memory => format!("**{r:.2}×** RSS"),
            },
            _ => "–".into(),
        };
        let cpu_cell = opt(cpu_ratio.filter(|_| fig != Figure::Memory), |r| {
            format!("{r:.2}×")
        });
        let external = pick(Kind::External);
        for (kind, outcome) in [
            (Kind::Mles, mles),
            (Kind::Relay, relay),
            (Kind::External, external),
        ] {
            let Some(o) = outcome else { continue };
            let lat = |i: usize| opt(o.latency, |l| duration_ns(l[i]));
            let verdict = if m.spec.idle && o.verdict == Verdict::Pass {
                "all joined".to_string()
            } else {
                o.verdict.short().to_string()
            };
            let connect = o
                .connect_rate
                .filter(|_| m.spec.connections() >= MIN_CONNECTIONS_FOR_RATE);
            let mine = kind == Kind::Mles;
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                m.spec.label,
                kind.name(),
                opt(connect, si),
                opt(o.per_sec, si),
                lat(0),
                lat(1),
                lat(2),
                verdict,
                opt(o.server_cpu_per_delivery, |c| format!("{c:.0} ns")),
                opt(o.rss_per_conn, |r| format!("{:.1} KB", r / 1000.0)),
                if mine { ratio_cell.as_str() } else { "" },
                if mine { cpu_cell.as_str() } else { "" },
            );
        }
    }
    summary.print();
    let notes = |skipped: bool| -> Vec<String> {
        let mut notes: Vec<String> = measured
            .iter()
            .flat_map(|m| {
                m.runs.iter().flat_map(move |(kind, outcomes)| {
                    outcomes.iter().filter_map(move |o| match &o.verdict {
                        Verdict::Fail(why) | Verdict::Error(why) if !skipped => {
                            Some(format!("- {} / {}: {why}", m.spec.label, kind.name()))
                        }
                        Verdict::Skipped(why) if skipped => {
                            Some(format!("- {} / {}: {why}", m.spec.label, kind.name()))
                        }
                        _ => None,
                    })
                })
            })
            .collect();
        notes.dedup();
        notes
    };
    for (title, list) in [("Failures:", notes(false)), ("Skipped:", notes(true))] {
        if !list.is_empty() {
            println!();
            println!("{title}");
            for n in list {
                println!("{n}");
            }
        }
    }
}

/// The issue's targets, checked against what this run measured.
#[derive(Default)]
struct Summary {
    fanout: Vec<(String, Option<f64>)>,
    rss: Option<f64>,
    plain: Option<f64>,
    /// p99 of mles in fanout-100, in nanoseconds.
    plain_p99: Option<u64>,
    /// cluster-fanout: mles's representative run (a failing or skipped one shows).
    cluster: Option<Outcome>,
    tls: Option<f64>,
    p99: Option<f64>,
    /// Channels, and server CPU per delivery of mles and of the relay.
    scaling: Vec<(usize, Option<f64>, Option<f64>)>,
}

impl Summary {
    fn note(
        &mut self,
        spec: &Spec,
        fig: Figure,
        mles: Option<&Outcome>,
        relay: Option<&Outcome>,
        ratio: Option<f64>,
    ) {
        let mine = passed(mles);
        match fig {
            Figure::Memory => self.rss = mine.and_then(|o| o.rss_per_conn),
            Figure::Latency => self.p99 = ratio,
            Figure::Throughput if spec.cluster => self.cluster = mles.cloned(),
            Figure::Throughput if spec.label.starts_with("channels-scaling/") => {
                self.scaling.push((
                    spec.channels,
                    mine.and_then(|o| o.server_cpu_per_delivery),
                    passed(relay).and_then(|o| o.server_cpu_per_delivery),
                ))
            }
            Figure::Throughput => {
                self.fanout.push((spec.label.clone(), ratio));
                if spec.label == "fanout-100" {
                    self.plain = mine.and_then(|o| o.per_sec);
                    self.plain_p99 = mine.and_then(|o| o.latency).map(|l| l[1]);
                }
                if spec.label == "fanout-100-tls" {
                    self.tls = mine.and_then(|o| o.per_sec);
                }
            }
        }
    }

    /// cluster-fanout against the single-server fanout-100 (no target: the figure itself).
    fn cluster_line(&self, c: &Outcome) -> String {
        let (Some(rate), Some([_, p99, _])) = (passed(Some(c)).and_then(|o| o.per_sec), c.latency)
        else {
            return match &c.verdict {
                Verdict::Skipped(why) => format!("- cluster-fanout: skipped ({why})"),
                v => format!("- cluster-fanout: no figure (mles {})", v.short()),
            };
        };
        let mut line = format!(
            "- cluster-fanout: mles across {CLUSTER_SIZE} servers through NATS {} deliveries/s, \
             p99 {}",
            si(rate),
            duration_ns(p99)
        );
        if let (Some(plain), Some(plain_p99)) = (self.plain, self.plain_p99) {
            line.push_str(&format!(
                "; {:.0} % of single-server fanout-100's {} deliveries/s, p99 {:.1}× its {}",
                rate / plain * 100.0,
                si(plain),
                p99 as f64 / plain_p99.max(1) as f64,
                duration_ns(plain_p99)
            ));
        }
        line
    }

    fn print(&self) {
        let mut lines = Vec::new();
        let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
        for (label, ratio) in &self.fanout {
            lines.push(match ratio {
                Some(r) => format!(
                    "- {label}: mles at {:.0} % of the relay's deliveries/s (target ≥ 90 %): {}",
                    r * 100.0,
                    verdict(*r >= 0.9)
                ),
                None => format!("- {label}: no score (mles did not pass)"),
            });
        }
        if let Some(c) = &self.cluster {
            lines.push(self.cluster_line(c));
        }
        if let Some(rss) = self.rss {
            lines.push(format!(
                "- idle: mles {:.1} KB per joined connection (target ≤ 10 KB): {}",
                rss / 1000.0,
                verdict(rss <= 10_000.0)
            ));
        }
        if let (Some(tls), Some(plain)) = (self.tls, self.plain) {
            let r = tls / plain;
            lines.push(format!(
                "- TLS: mles fanout-100-tls at {:.0} % of plain fanout-100 (target ≥ 50 %): {}",
                r * 100.0,
                verdict(r >= 0.5)
            ));
        }
        if let Some(r) = self.p99 {
            lines.push(format!(
                "- latency-1k: mles p99 {r:.2}× the relay's (target ≤ 2×): {}",
                verdict(r <= 2.0)
            ));
        }
        for (name, pick) in [("mles", 0), ("the relay", 1)] {
            let points: Vec<(usize, f64)> = self
                .scaling
                .iter()
                .filter_map(|&(c, m, r)| [m, r][pick].map(|cpu| (c, cpu)))
                .collect();
            if let (Some(first), Some(last), true) =
                (points.first(), points.last(), points.len() > 1)
            {
                let steps: Vec<String> = points
                    .iter()
                    .map(|(c, cpu)| format!("{c} ch {cpu:.0} ns"))
                    .collect();
                lines.push(format!(
                    "- channels-scaling: {name}'s server CPU per delivery {} ({:.2}× from {} \
                     to {} channels)",
                    steps.join(", "),
                    last.1 / first.1,
                    first.0,
                    last.0
                ));
            }
        }
        if !lines.is_empty() {
            println!();
            println!("Targets:");
            for line in lines {
                println!("{line}");
            }
        }
    }
}
