//! mles-bench: the load benchmark of mles, and the minimal relays it is measured against.
//!
//! `mles-bench [run] [SCENARIO...]` starts `mles` (next to this binary by default) and two
//! minimal relays (`mles-bench relay --design queues|ring`, the machine's ceiling) as child
//! processes on loopback, each anew for every scenario and repeat, runs each scenario
//! against all of them and prints Markdown tables: connect rate, deliveries per second,
//! latency percentiles from a send timestamp in each payload, an exactly-once-in-order
//! check, server CPU per delivery, memory per connection, and mles's ratio to the better
//! relay. Overload scenarios (`overload.rs`) and scale scenarios (`scale.rs`, with worker
//! processes: `mles-bench worker`) print tables of their own; `reconnect-resume`
//! (`reconnect.rs`, run by name only) measures what the resume extension saves a client
//! that reconnects often; `mles-bench soak` runs a mixed load for minutes and watches the
//! server's memory (`soak.rs`).
//!
//! ```text
//! cargo build --release --workspace
//! target/release/mles-bench --repeat 3      # issue 13's scenarios
//! target/release/mles-bench --list
//! target/release/mles-bench fanout-100 --repeat 5
//! target/release/mles-bench reconnect-resume --reconnect-every 2
//! target/release/mles-bench soak --minutes 10
//! ```

mod client;
mod cluster;
mod overload;
mod procs;
mod reader;
mod reconnect;
mod relay;
mod scale;
mod scenario;
mod soak;
mod stats;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::client::Target;
use crate::cluster::Cluster;
use crate::procs::{Kind, Launch};
use crate::relay::Design;
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
    /// Churn, publish, read slowly, send bad and oversize frames for --minutes against a
    /// fresh mles; sample its RSS every second.
    Soak(soak::SoakArgs),
    /// A load-generator process of the scale scenarios (started by the bench itself).
    #[command(hide = true)]
    Worker(scale::WorkerArgs),
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
    /// Frames a flat-out publisher writes with one write call. 1 (the default): every frame
    /// on its own, as a browser or any WebSocket client sends them; more frames per write
    /// let a server read many per syscall and flatter the servers that batch.
    #[arg(long, default_value_t = 1)]
    batch: u64,
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
    /// reconnect-resume: seconds from one join of the reconnecting client to its next.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    reconnect_every: f64,
    /// reconnect-resume: seconds the reconnecting client stays away each time (less than
    /// --reconnect-every).
    #[arg(long, default_value_t = 0.5, value_name = "SECS")]
    offline: f64,
    /// reconnect-resume: seconds the channel is published to after the client first joins
    /// (default 30, 8 with --quick).
    #[arg(long, value_name = "SECS")]
    run_seconds: Option<f64>,
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
    /// Fan-out design: a bounded queue per member, or a shared ring with a cursor per member.
    #[arg(long, value_enum, default_value = "queues")]
    design: Design,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Relay(args)) => relay_main(args),
        Some(Command::Soak(args)) => soak::main(args),
        Some(Command::Worker(args)) => match runtime().block_on(scale::worker(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mles-bench worker: {e}");
                ExitCode::FAILURE
            }
        },
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
    match runtime().block_on(relay::serve(args.bind, args.port, args.tls, args.design)) {
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
    /// Wall time of every run of every server, starting and stopping them included.
    elapsed: Duration,
}

fn run_main(args: RunArgs) -> ExitCode {
    let timing = reconnect::Timing {
        every: args.reconnect_every,
        offline: args.offline,
        run: args.run_seconds,
    };
    if args.list {
        for name in scenario::NAMES {
            for spec in scenario::specs(name, args.quick).unwrap_or_default() {
                println!("{:<22} {}", spec.label, spec.describe());
            }
        }
        for name in overload::NAMES {
            for spec in overload::specs(name, args.quick).unwrap_or_default() {
                println!("{:<22} {}", spec.label, spec.describe());
            }
        }
        for name in scale::NAMES {
            for spec in scale::specs(name, args.quick).unwrap_or_default() {
                println!("{:<22} {}", spec.label, spec.describe());
            }
        }
        for name in reconnect::NAMES {
            if let Some(Ok(specs)) = reconnect::specs(name, args.quick, timing) {
                for spec in specs {
                    println!("{:<22} {}", spec.label, spec.describe());
                }
            }
        }
        println!("(default: {})", default_names().join(" "));
        return ExitCode::SUCCESS;
    }
    let names: Vec<String> = if args.scenarios.is_empty() {
        default_names()
    } else {
        args.scenarios.clone()
    };
    let mut specs = Vec::new();
    let mut overload_specs = Vec::new();
    let mut scale_specs = Vec::new();
    let mut reconnect_specs = Vec::new();
    for name in &names {
        match reconnect::specs(name, args.quick, timing) {
            Some(Ok(s)) => {
                reconnect_specs.extend(s);
                continue;
            }
            Some(Err(e)) => {
                eprintln!("mles-bench: {e}");
                return ExitCode::from(2);
            }
            None => {}
        }
        if let Some(s) = overload::specs(name, args.quick) {
            overload_specs.extend(s);
            continue;
        }
        if let Some(s) = scale::specs(name, args.quick) {
            scale_specs.extend(s);
            continue;
        }
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
                    "mles-bench: no scenario '{name}'; there are: {}, {}, {}, {}",
                    scenario::NAMES.join(", "),
                    overload::NAMES.join(", "),
                    scale::NAMES.join(", "),
                    reconnect::NAMES.join(", ")
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
            "relay" => kinds.extend([Kind::Relay(Design::Queues), Kind::Relay(Design::Ring)]),
            "relay-queues" => kinds.push(Kind::Relay(Design::Queues)),
            "relay-ring" => kinds.push(Kind::Relay(Design::Ring)),
            other => {
                eprintln!(
                    "mles-bench: unknown server '{other}' (mles, relay, relay-queues, relay-ring)"
                );
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
    let most = specs
        .iter()
        .map(Spec::connections)
        .chain(overload_specs.iter().map(overload::Spec::connections))
        .chain(reconnect_specs.iter().map(reconnect::Spec::connections))
        .max()
        .unwrap_or(0) as u64;
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
        batch: args.batch.max(1),
        timeout: Duration::from_secs(args.timeout),
        connect_concurrency: args.connect_concurrency,
    };
    let external = args.server.map(|addr| (addr, args.server_pid));
    let rt = runtime();
    let command: Vec<String> = std::env::args().collect();
    let mut all_pass = true;
    if !specs.is_empty() {
        let measured = rt.block_on(measure_all(
            &specs,
            &kinds,
            &launch,
            &opts,
            args.repeat,
            external,
        ));
        print_table(&measured, &command.join(" "), &args, &launch.mles_args);
        all_pass &= measured
            .iter()
            .flat_map(|m| m.runs.iter().flat_map(|(_, o)| o.iter()))
            .all(|o| matches!(o.verdict, Verdict::Pass | Verdict::Skipped(_)));
    } else {
        println!();
        println!("`{}`", command.join(" "));
    }
    let own: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| *k != Kind::External)
        .collect();
    if !overload_specs.is_empty() && !own.is_empty() {
        all_pass &= rt.block_on(overload::measure_and_print(
            &overload_specs,
            &own,
            &launch,
            args.repeat,
            opts.timeout,
        ));
    }
    if !scale_specs.is_empty() && own.contains(&Kind::Mles) {
        all_pass &= rt.block_on(scale::measure_and_print(&scale_specs, &launch, args.repeat));
    }
    if !reconnect_specs.is_empty() {
        if own.contains(&Kind::Mles) {
            all_pass &= rt.block_on(reconnect::measure_and_print(
                &reconnect_specs,
                &launch,
                args.repeat,
            ));
        } else {
            eprintln!("mles-bench: reconnect-resume runs only against an mles it starts");
            all_pass = false;
        }
    }
    let _ = std::fs::remove_dir_all(&launch.workdir);
    if all_pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What a bare `mles-bench` runs: issue 13's scenarios.
fn default_names() -> Vec<String> {
    scenario::DEFAULT
        .iter()
        .chain(overload::NAMES.iter())
        .chain(scale::DEFAULT.iter())
        .map(|s| s.to_string())
        .collect()
}

/// Per-client abuse limits of mles that would throttle a load generator whose every client
/// comes from 127.0.0.1: switched off when this mles has them and `--mles-arg` does not
/// set them; and /metrics on the main listener, which the cluster scenarios read.
fn unlimited_flags(mles: &std::path::Path, given: &[String]) -> Vec<String> {
    let help = std::process::Command::new(mles)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut flags: Vec<String> = ["--ip-rate", "--per-ip-limit", "--message-rate"]
        .iter()
        .filter(|flag| help.contains(&format!("{flag} ")))
        .filter(|flag| !given.iter().any(|g| g.starts_with(*flag)))
        .map(|flag| format!("{flag}=0"))
        .collect();
    // The cluster scenarios read /metrics from loopback on the main listener.
    if help.contains("--metrics-on-main") && !given.iter().any(|g| g == "--metrics-on-main") {
        flags.push("--metrics-on-main".to_string());
    }
    flags
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
        let started = std::time::Instant::now();
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
                        Kind::Relay(_) if kinds.contains(&Kind::Mles) => continue,
                        Kind::Relay(_) => Outcome::new(Verdict::Skipped(
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
            elapsed: started.elapsed(),
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
    if let Some(c) = o.machine_cores {
        parts.push(format!("machine {c:.2} cores busy"));
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

/// The ceiling a figure of mles is compared with: the best passing relay for that figure
/// (most deliveries/s; least CPU per delivery, p99 or memory), never a relay that failed.
struct Ceiling<'a> {
    value: f64,
    kind: Kind,
    _outcome: &'a Outcome,
}

fn best<'a>(
    relays: &[(Kind, Option<&'a Outcome>)],
    f: impl Fn(&Outcome) -> Option<f64>,
    higher_is_better: bool,
) -> Option<Ceiling<'a>> {
    relays
        .iter()
        .filter_map(|(k, o)| {
            let o = passed(*o)?;
            Some(Ceiling {
                value: f(o)?,
                kind: *k,
                _outcome: o,
            })
        })
        .reduce(|a, b| {
            let b_better = if higher_is_better {
                b.value > a.value
            } else {
                b.value < a.value
            };
            if b_better {
                b
            } else {
                a
            }
        })
}

fn print_table(measured: &[Measured], command: &str, args: &RunArgs, mles_args: &[String]) {
    println!();
    println!("`{command}`");
    println!();
    println!(
        "{} cores; window {} frames; flat-out publishers write {} frame(s) per write call; {} \
         run(s) per server, median shown; every run on freshly started server processes (mles and each relay started anew per scenario and per \
         repeat, alternating which goes first); latency from the send timestamp in each \
         payload; server CPU from /proc/<pid>/task/*/schedstat.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.window,
        args.batch.max(1),
        args.repeat.max(1),
    );
    println!();
    println!(
        "The relays have mles's socket buffers (read {} B, write {} B, {} frames per take) and \
         the same slack ({} frames behind before 1013); relay-queues has a bounded queue per \
         member, relay-ring a shared ring with a cursor per member. The ceiling for each figure \
         is the better of the two passing relays (most deliveries/s, least CPU per delivery), \
         marked in the server column.",
        relay::READ_BUFFER,
        relay::WRITE_BUFFER,
        relay::FETCH_BATCH,
        relay::SLACK
    );
    if !mles_args.is_empty() {
        println!();
        println!(
            "mles ran with `{}` (per-client abuse limits off: every bench client is 127.0.0.1, \
             and the relays have no limits).",
            mles_args.join(" ")
        );
    }
    if measured.iter().any(|m| m.spec.cluster) {
        println!();
        println!(
            "cluster-fanout: one nats-server -js and {CLUSTER_SIZE} mles (`--server-id sN --nats \
             nats://127.0.0.1:<port> --limit {}`) on loopback; the publisher joins s1, 50 \
             subscribers each join s2 and s3, so every delivery crosses NATS JetStream; server CPU \
             is that of all four processes. The relays have no cluster mode (n/a); compare with \
             the single-server fanout-100 mles row next to it.",
            cluster::history_limit(mles_args)
        );
    }
    println!();
    println!(
        "| scenario | server | connect/s | deliveries/s | p50 | p99 | p99.9 | exactly-once in order \
         | server CPU/delivery | cores busy (server / machine) | RSS/conn | mles/ceiling | \
         mles/ceiling CPU/delivery | time |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|");
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
        let mles = pick(Kind::Mles);
        let relays: Vec<(Kind, Option<&Outcome>)> = m
            .runs
            .iter()
            .filter(|(k, _)| k.is_relay())
            .map(|(k, _)| (*k, pick(*k)))
            .collect();
        let ceiling = best(&relays, |o| key(fig, o), fig == Figure::Throughput);
        let cpu_ceiling = best(&relays, |o| o.server_cpu_per_delivery, false);
        let ratio = passed(mles)
            .and_then(|o| key(fig, o))
            .zip(ceiling.as_ref().filter(|c| c.value > 0.0))
            .map(|(a, c)| a / c.value);
        let cpu_ratio = passed(mles)
            .and_then(|o| o.server_cpu_per_delivery)
            .zip(cpu_ceiling.as_ref().filter(|c| c.value > 0.0))
            .map(|(a, c)| a / c.value)
            .filter(|_| fig != Figure::Memory);
        summary.note(&m.spec, fig, mles, ratio, cpu_ratio);
        let ratio_cell = match (mles, ratio) {
            (Some(a), _) if a.verdict != Verdict::Pass => {
                format!("{} (no score)", a.verdict.short())
            }
            _ if m.spec.cluster => "n/a (relays: no cluster mode)".into(),
            (_, Some(r)) => match fig {
                Figure::Throughput => format!("**{r:.2}×** deliveries/s"),
                Figure::Latency => format!("**{r:.2}×** p99"),
                Figure::Memory => format!("**{r:.2}×** RSS"),
            },
            _ => "–".into(),
        };
        let cpu_cell = opt(cpu_ratio, |r| format!("**{r:.2}×**"));
        let mut rows: Vec<(Kind, Option<&Outcome>)> = vec![(Kind::Mles, mles)];
        rows.extend(relays.iter().copied());
        rows.push((Kind::External, pick(Kind::External)));
        for (kind, outcome) in rows {
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
            let mut marks = Vec::new();
            if ceiling.as_ref().is_some_and(|c| c.kind == kind) {
                marks.push(match fig {
                    Figure::Throughput => "deliveries/s",
                    Figure::Latency => "p99",
                    Figure::Memory => "RSS",
                });
            }
            if fig != Figure::Memory && cpu_ceiling.as_ref().is_some_and(|c| c.kind == kind) {
                marks.push("CPU");
            }
            let name = if marks.is_empty() {
                kind.name().to_string()
            } else {
                format!("{} (ceiling: {})", kind.name(), marks.join(", "))
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                m.spec.label,
                name,
                opt(connect, si),
                opt(o.per_sec, si),
                lat(0),
                lat(1),
                lat(2),
                verdict,
                opt(o.server_cpu_per_delivery, |c| format!("{c:.0} ns")),
                match (o.server_cores, o.machine_cores) {
                    (Some(s), Some(m)) => format!("{s:.2} / {m:.2}"),
                    _ => "–".into(),
                },
                opt(o.rss_per_conn, |r| match o.rss_before_after {
                    Some((b, a)) => format!(
                        "{:.1} KB ({:.1} → {:.1} MB)",
                        r / 1000.0,
                        b as f64 / 1e6,
                        a as f64 / 1e6
                    ),
                    None => format!("{:.1} KB", r / 1000.0),
                }),
                if mine { ratio_cell.as_str() } else { "" },
                if mine { cpu_cell.as_str() } else { "" },
                if mine {
                    format!("{:.0} s", m.elapsed.as_secs_f64())
                } else {
                    String::new()
                },
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

/// Issue 13's targets (and the earlier ones still measured), checked against this run.
#[derive(Default)]
struct Summary {
    /// Scenario, mles/ceiling deliveries/s, mles/ceiling CPU per delivery.
    fanout: Vec<(String, Option<f64>, Option<f64>)>,
    /// Scenario, TLS, mles's bytes per idle connection.
    idle: Vec<(String, bool, Option<f64>)>,
    plain: Option<f64>,
    /// p99 of mles in fanout-100, in nanoseconds.
    plain_p99: Option<u64>,
    /// cluster-fanout: mles's representative run (a failing or skipped one shows).
    cluster: Option<Outcome>,
    tls: Option<f64>,
    p99: Option<f64>,
    /// Channels, and server CPU per delivery of mles.
    scaling: Vec<(usize, Option<f64>)>,
}

impl Summary {
    fn note(
        &mut self,
        spec: &Spec,
        fig: Figure,
        mles: Option<&Outcome>,
        ratio: Option<f64>,
        cpu_ratio: Option<f64>,
    ) {
        let mine = passed(mles);
        match fig {
            Figure::Memory => self.idle.push((
                spec.label.clone(),
                spec.tls,
                mine.and_then(|o| o.rss_per_conn),
            )),
            Figure::Latency => self.p99 = ratio,
            Figure::Throughput if spec.cluster => self.cluster = mles.cloned(),
            Figure::Throughput if spec.label.starts_with("channels-scaling/") => self
                .scaling
                .push((spec.channels, mine.and_then(|o| o.server_cpu_per_delivery))),
            Figure::Throughput => {
                if spec.label == "fanout-100" {
                    self.plain = mine.and_then(|o| o.per_sec);
                    self.plain_p99 = mine.and_then(|o| o.latency).map(|l| l[1]);
                }
                if spec.label == "fanout-100-tls" {
                    self.tls = mine.and_then(|o| o.per_sec);
                } else {
                    self.fanout.push((spec.label.clone(), ratio, cpu_ratio));
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
        for (label, ratio, cpu) in &self.fanout {
            lines.push(match (ratio, cpu) {
                (Some(r), Some(c)) => format!(
                    "- {label}: mles at {:.0} % of the ceiling's deliveries/s (target ≥ 100 %): {}; \
                     CPU per delivery {:.0} % of the ceiling's (target ≤ 100 %): {}",
                    r * 100.0,
                    verdict(*r >= 1.0),
                    c * 100.0,
                    verdict(*c <= 1.0)
                ),
                _ => format!("- {label}: no score (mles or both relays did not pass)"),
            });
        }
        if let Some(c) = &self.cluster {
            lines.push(self.cluster_line(c));
        }
        for (label, tls, rss) in &self.idle {
            let target = if *tls { 8_000.0 } else { 4_000.0 };
            lines.push(match rss {
                Some(rss) => format!(
                    "- {label}: mles {:.1} KB per idle joined connection on a fresh process \
                     (target ≤ {:.0} KB): {}",
                    rss / 1000.0,
                    target / 1000.0,
                    verdict(*rss <= target)
                ),
                None => format!("- {label}: no figure (mles did not pass)"),
            });
        }
        if let (Some(tls), Some(plain)) = (self.tls, self.plain) {
            let r = tls / plain;
            lines.push(format!(
                "- TLS: mles fanout-100-tls at {:.0} % of plain fanout-100 (issue 7 target ≥ 50 %): {}",
                r * 100.0,
                verdict(r >= 0.5)
            ));
        }
        if let Some(r) = self.p99 {
            lines.push(format!(
                "- latency-1k: mles p99 {r:.2}× the best relay's (issue 7 target ≤ 2×): {}",
                verdict(r <= 2.0)
            ));
        }
        let points: Vec<(usize, f64)> = self
            .scaling
            .iter()
            .filter_map(|&(c, m)| m.map(|cpu| (c, cpu)))
            .collect();
        if let (Some(first), Some(last), true) = (points.first(), points.last(), points.len() > 1) {
            let steps: Vec<String> = points
                .iter()
                .map(|(c, cpu)| format!("{c} ch {cpu:.0} ns"))
                .collect();
            lines.push(format!(
                "- channels-scaling: mles's server CPU per delivery {} ({:.2}× from {} to {} \
                 channels)",
                steps.join(", "),
                last.1 / first.1,
                first.0,
                last.0
            ));
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
