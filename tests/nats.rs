//! The NATS JetStream backplane against a real three-node `nats-server -js` cluster on
//! loopback (`common::nats_cluster`), each mles server given every node's URL and
//! `--nats-replicas 3`: frames cross servers exactly once and in each publisher's order, a
//! joiner on any server gets the cluster's history, a restarted server loses none, and a
//! restart of the whole cluster during traffic loses nothing local and resumes cross-server
//! delivery. Two failover tests SIGKILL one node (the one holding a server's consumer, or
//! the stream leader) while members on three mles binaries publish, and check delivery,
//! what an operator sees (`/metrics`, `/health`, the log) and that joiners afterwards get
//! the same history on every server.

mod common;
use common::nats_cluster::NatsCluster;
use common::resume::*;
use common::*;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use mles::config::NatsConfig;

/// Longest wait for anything that crosses NATS, reconnects included.
const SLOW: Duration = Duration::from_secs(40);

/// Nodes of the NATS cluster the tests run on: three, as the README's cluster section
/// runs them, each mles server given every node's URL and `--nats-replicas 3`.
const NODES: usize = 3;

/// An mles server in the cluster of `nats`, with history `limit`, not waiting for NATS.
async fn mles_server_unconnected(id: &str, nats: &NatsCluster, limit: usize) -> TestServer {
    // Shown only for a failing test: what the links did.
    let _ =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("mles=debug"))
            .is_test(true)
            .try_init();
    let id = id.to_string();
    let mut config = NatsConfig::new(&nats.urls_joined()).unwrap();
    config.replicas = nats.replicas();
    config.grace = Duration::from_secs(2);
    start_with(move |c| {
        c.server_id = id;
        c.hub.history_limit = limit;
        c.nats = Some(config);
    })
    .await
}

/// An mles server in the cluster of `nats`, with history `limit`, connected to NATS.
async fn mles_server(id: &str, nats: &NatsCluster, limit: usize) -> TestServer {
    let server = mles_server_unconnected(id, nats, limit).await;
    let shared = server.shared.clone();
    wait_until("connected to NATS", SLOW, async || {
        shared.metrics.nats_connected.get() == 1
    })
    .await;
    server
}

/// Waits until `n` clients and the NATS link are members of `channel` on `server`: the
/// clients' joins are done, and the link consumes the channel.
async fn members(server: &TestServer, channel: &str, n: usize) {
    let shared = server.shared.clone();
    wait_until("clients and link joined", SLOW, async || {
        shared
            .hub
            .channel(channel)
            .is_some_and(|c| c.client_count() == n && c.member_count() == n + 1)
    })
    .await;
}

/// Checks that `got` holds each of `publishers`' frames `0..per` exactly once, and each
/// publisher's in the order sent.
fn exactly_once_in_order(got: &[String], publishers: &[&str], per: usize, who: &str) {
    let mut next: HashMap<&str, usize> = publishers.iter().map(|p| (*p, 0)).collect();
    for frame in got {
        let (name, i) = frame.rsplit_once(':').expect("frame is name:number");
        let i: usize = i.parse().unwrap();
        let expected = next
            .get_mut(name)
            .unwrap_or_else(|| panic!("{who} got unexpected {frame}"));
        assert_eq!(
            i, *expected,
            "{who}: {name}'s frames out of order or duplicated: {got:?}"
        );
        *expected += 1;
    }
    for (name, n) in next {
        assert_eq!(n, per, "{who} got {n} of {per} frames from {name}");
    }
}

/// What is wrong with `got` against each of `publishers`' frames `0..per` exactly once and
/// in order, per publisher: frames missing (as ranges), duplicated, out of order,
/// unexpected. Empty when nothing is.
fn delivery_problems(got: &[String], publishers: &[&str], per: usize) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen: HashMap<&str, Vec<usize>> = publishers.iter().map(|p| (*p, Vec::new())).collect();
    for frame in got {
        match frame
            .rsplit_once(':')
            .and_then(|(name, i)| Some((seen.get_mut(name)?, i.parse::<usize>().ok()?)))
        {
            Some((numbers, i)) => numbers.push(i),
            None => problems.push(format!("unexpected {frame}")),
        }
    }
    for publisher in publishers {
        let numbers = &seen[publisher];
        let distinct: HashSet<usize> = numbers.iter().copied().collect();
        let missing: Vec<usize> = (0..per).filter(|i| !distinct.contains(i)).collect();
        if !missing.is_empty() {
            problems.push(format!(
                "{} of {publisher}'s frames missing: {}",
                missing.len(),
                ranges(&missing)
            ));
        }
        let duplicates = numbers.len() - distinct.len();
        if duplicates > 0 {
            problems.push(format!("{duplicates} of {publisher}'s frames duplicated"));
        }
        let backwards = numbers.windows(2).filter(|w| w[1] <= w[0]).count();
        if backwards > 0 {
            problems.push(format!(
                "{publisher}'s frames went backwards {backwards} times"
            ));
        }
    }
    problems
}

/// Sorted numbers as ranges: `3..=9, 12`.
fn ranges(numbers: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let mut j = i;
        while j + 1 < numbers.len() && numbers[j + 1] == numbers[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            numbers[i].to_string()
        } else {
            format!("{}..={}", numbers[i], numbers[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

/// GET /health over plain HTTP: status code and body.
async fn health(server: &TestServer) -> (u16, String) {
    let reply = http_client::get(server.addr, "/health").await;
    (reply.status.as_u16(), reply.text())
}

/// The last frame stored in JetStream for `channel`, read with a separate NATS client.
async fn last_in_stream(nats: &NatsCluster, channel: &str) -> Option<String> {
    let client = async_nats::connect(nats.urls()).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(mles::link::nats::STREAM).await.ok()?;
    let message = stream
        .get_last_raw_message_by_subject(&mles::link::nats::subject(channel))
        .await
        .ok()?;
    String::from_utf8(message.payload.to_vec()).ok()
}

async fn wait_in_stream(nats: &NatsCluster, channel: &str, frame: &str) {
    wait_until(&format!("{frame} to reach the stream"), SLOW, async || {
        last_in_stream(nats, channel).await.as_deref() == Some(frame)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_cross_three_servers_exactly_once_in_publish_order() {
    let nats = NatsCluster::start(NODES).await;
    let a = mles_server("a", &nats, 500).await;
    let b = mles_server("b", &nats, 500).await;
    let c = mles_server("c", &nats, 500).await;
    let channel = "dots.and *wild> cards";
    let mut clients = [
        ("a1", join(a.addr, "a1", channel).await),
        ("a2", join(a.addr, "a2", channel).await),
        ("b1", join(b.addr, "b1", channel).await),
        ("c1", join(c.addr, "c1", channel).await),
    ];
    members(&a, channel, 2).await;
    members(&b, channel, 1).await;
    members(&c, channel, 1).await;
    let per = 60;
    for i in 0..per {
        for (name, ws) in clients.iter_mut() {
            send_text(ws, &format!("{name}:{i}")).await;
        }
    }
    let names: Vec<&str> = clients.iter().map(|(n, _)| *n).collect();
    for (name, ws) in clients.iter_mut() {
        let others: Vec<&str> = names.iter().copied().filter(|n| n != name).collect();
        let got = collect(ws, others.len() * per, SLOW).await;
        exactly_once_in_order(&got, &others, per, name);
    }
    // Another channel stays apart.
    let mut elsewhere = join(b.addr, "e", "other").await;
    members(&b, "other", 1).await;
    send_text(&mut clients[0].1, "a1:late").await;
    expect_nothing(&mut elsewhere, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_joiner_on_another_server_gets_the_cluster_history_in_order() {
    let nats = NatsCluster::start(NODES).await;
    let a = mles_server("a", &nats, 50).await;
    let b = mles_server("b", &nats, 50).await;
    let mut author = join(a.addr, "author", "story").await;
    members(&a, "story", 1).await;
    for i in 0..10 {
        send_text(&mut author, &format!("chapter {i}")).await;
    }
    wait_in_stream(&nats, "story", "chapter 9").await;
    assert!(b.shared.hub.channel("story").is_none(), "b never saw it");

    // The first client of the channel on b gets the history from NATS, join frame first.
    let mut reader = join(b.addr, "reader", "story").await;
    let history = recv_texts(&mut reader, 11).await;
    assert_eq!(history[0], join_frame("author", "story"));
    let expected: Vec<String> = (0..10).map(|i| format!("chapter {i}")).collect();
    assert_eq!(history[1..], expected[..]);
    expect_nothing(&mut reader, Duration::from_millis(500)).await;

    // Live after history, both ways, with no gap and no duplicate.
    send_text(&mut author, "chapter 10").await;
    assert_eq!(recv_text(&mut reader).await, "chapter 10");
    send_text(&mut reader, "a review").await;
    let got = collect(&mut author, 1, SLOW).await;
    assert_eq!(got, vec!["a review"]);
    // The reader's join frame went into the cluster's history too.
    let mut third = join(a.addr, "third", "story").await;
    let history = recv_texts(&mut third, 14).await;
    assert!(
        history.contains(&join_frame("reader", "story")),
        "{history:?}"
    );
    assert_eq!(history.last().map(String::as_str), Some("a review"));
}

/// Joins `channel` on `addr` as `uid`, sends `texts` and leaves once the last is in the
/// cluster's stream.
async fn publish_all(nats: &NatsCluster, addr: SocketAddr, channel: &str, texts: &[String]) {
    let mut publisher = join(addr, "publisher", channel).await;
    for text in texts {
        send_text(&mut publisher, text).await;
    }
    if let Some(last) = texts.last() {
        wait_in_stream(nats, channel, last).await;
    }
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_server_of_the_cluster_with_exactly_what_it_missed() {
    let nats = NatsCluster::start(NODES).await;
    let a = mles_server("a", &nats, 50).await;
    let b = mles_server("b", &nats, 50).await;
    publish_all(&nats, a.addr, "relay", &numbered(0..10)).await;

    let mut reader = connect(a.addr).await;
    send_text(&mut reader, &resuming_join("reader", "relay", None)).await;
    let first = receive(&mut reader, 10).await;
    assert_eq!(first.data, numbered(0..10));
    let token = first.last_mark.expect("a position mark after the history");
    drop(reader);

    // Away while 7 frames go by, published on a; back on b, which has not seen the
    // channel before: the position is the stream's, so b knows where it is.
    publish_all(&nats, a.addr, "relay", &numbered(10..17)).await;
    let mut reader = connect(b.addr).await;
    send_text(&mut reader, &resuming_join("reader", "relay", Some(&token))).await;
    let back = receive(&mut reader, 7).await;
    assert_eq!(back.recovered, Some(true), "{back:?}");
    assert_eq!(back.data, numbered(10..17), "exactly the missed frames");
    let token = back.last_mark.expect("a mark after the recovered frames");
    drop(reader);

    // And back to a, after frames published on b: still exactly the missed ones.
    publish_all(&nats, b.addr, "relay", &numbered(17..20)).await;
    let mut reader = connect(a.addr).await;
    send_text(&mut reader, &resuming_join("reader", "relay", Some(&token))).await;
    let again = receive(&mut reader, 3).await;
    assert_eq!(again.recovered, Some(true), "{again:?}");
    assert_eq!(again.data, numbered(17..20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_in_nats_is_bounded_by_the_limit_per_channel() {
    let nats = NatsCluster::start(NODES).await;
    let a = mles_server("a", &nats, 5).await;
    let b = mles_server("b", &nats, 5).await;
    let mut author = join(a.addr, "author", "short").await;
    members(&a, "short", 1).await;
    for i in 0..8 {
        send_text(&mut author, &format!("{i}")).await;
    }
    wait_in_stream(&nats, "short", "7").await;
    let mut reader = join(b.addr, "reader", "short").await;
    assert_eq!(recv_texts(&mut reader, 5).await, ["3", "4", "5", "6", "7"]);
    expect_nothing(&mut reader, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cluster_loses_no_history() {
    let nats = NatsCluster::start(NODES).await;
    let a = mles_server("a", &nats, 100).await;
    let b = mles_server("b", &nats, 100).await;
    let mut on_a = join(a.addr, "on-a", "keep").await;
    let mut on_b = join(b.addr, "on-b", "keep").await;
    members(&a, "keep", 1).await;
    members(&b, "keep", 1).await;
    for i in 0..10 {
        send_text(&mut on_a, &format!("a:{i}")).await;
        send_text(&mut on_b, &format!("b:{i}")).await;
    }
    let shared = a.shared.clone();
    wait_until("a stored its and b's frames", SLOW, async || {
        shared
            .hub
            .channel("keep")
            .is_some_and(|c| c.stored().0 >= 22)
    })
    .await;
    drop((on_a, on_b));
    a.stop().await;
    b.stop().await;

    // A fresh a, empty memory, same identity: everything comes back from NATS.
    let a = mles_server("a", &nats, 100).await;
    let mut late = join(a.addr, "late", "keep").await;
    let got = collect(&mut late, 20, SLOW).await;
    let mine: Vec<&String> = got.iter().filter(|f| f.starts_with("a:")).collect();
    let theirs: Vec<&String> = got.iter().filter(|f| f.starts_with("b:")).collect();
    assert_eq!(got.len(), 20, "{got:?}");
    exactly_once_in_order(&got, &["a", "b"], 10, "late");
    assert_eq!((mine.len(), theirs.len()), (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_during_traffic_loses_nothing_and_delivery_resumes() {
    let mut nats = NatsCluster::start(NODES).await;
    let a = mles_server("a", &nats, 200).await;
    let b = mles_server("b", &nats, 200).await;
    let mut a1 = join(a.addr, "a1", "live").await;
    let mut a2 = join(a.addr, "a2", "live").await;
    let mut b1 = join(b.addr, "b1", "live").await;
    members(&a, "live", 2).await;
    members(&b, "live", 1).await;
    assert_eq!(health(&a).await, (200, "OK".to_string()));

    for i in 0..5 {
        send_text(&mut a1, &format!("a1:{i}")).await;
    }
    exactly_once_in_order(&collect(&mut b1, 5, SLOW).await, &["a1"], 5, "b1 before");
    exactly_once_in_order(&collect(&mut a2, 5, SLOW).await, &["a1"], 5, "a2 before");

    // NATS goes away.
    nats.stop_all();
    for server in [&a, &b] {
        let shared = server.shared.clone();
        wait_until("NATS loss noticed", SLOW, async || {
            shared.metrics.nats_connected.get() == 0
        })
        .await;
    }
    assert_eq!(health(&a).await, (200, "DEGRADED: nats".to_string()));
    assert!(a.shared.metrics.nats_disconnects.get() >= 1);

    // Local delivery goes on meanwhile, at once.
    for i in 5..10 {
        send_text(&mut a1, &format!("a1:{i}")).await;
    }
    for i in 0..5 {
        send_text(&mut b1, &format!("b1:{i}")).await;
    }
    let during = collect(&mut a2, 5, WAIT).await;
    assert_eq!(
        during,
        (5..10).map(|i| format!("a1:{i}")).collect::<Vec<_>>()
    );
    // The frames wait in the local history for NATS to come back: the link is down (its
    // member stays in the channel, not read from, so nothing it has not published is lost
    // while the channel keeps it) and /health says so.
    for server in [&a, &b] {
        let shared = server.shared.clone();
        wait_until("the link down", SLOW, async || {
            shared.ops.health().1.starts_with("DEGRADED")
        })
        .await;
    }

    // NATS comes back with its store: each server publishes what it held back.
    nats.run_all().await;
    for server in [&a, &b] {
        let shared = server.shared.clone();
        wait_until("NATS back", SLOW, async || {
            shared.metrics.nats_connected.get() == 1
        })
        .await;
        assert!(shared.metrics.nats_reconnects.get() >= 1);
    }
    // Healthy once its links are back up, too.
    let ops = a.shared.ops.clone();
    wait_until("healthy", SLOW, async || ops.health().1 == "OK").await;
    assert_eq!(health(&a).await, (200, "OK".to_string()));
    for i in 10..15 {
        send_text(&mut a1, &format!("a1:{i}")).await;
    }
    for i in 5..10 {
        send_text(&mut b1, &format!("b1:{i}")).await;
    }
    // Cross-server: the outage's frames arrive late, then the new ones; each exactly once
    // and in its publisher's order. Nothing was lost.
    let got = collect(&mut b1, 10, SLOW).await;
    assert_eq!(
        got,
        (5..15).map(|i| format!("a1:{i}")).collect::<Vec<_>>(),
        "b1 after"
    );
    let got = collect(&mut a2, 15, SLOW).await;
    let from_a1: Vec<&String> = got.iter().filter(|f| f.starts_with("a1:")).collect();
    assert_eq!(
        from_a1,
        (10..15)
            .map(|i| format!("a1:{i}"))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
        "a2 gets a1's new frames once, none again from NATS"
    );
    let from_b1: Vec<String> = got.into_iter().filter(|f| f.starts_with("b1:")).collect();
    exactly_once_in_order(&from_b1, &["b1"], 10, "a2 from b1");
    let got = collect(&mut a1, 10, SLOW).await;
    exactly_once_in_order(&got, &["b1"], 10, "a1 from b1");

    // The cluster's history holds each frame once: 3 join frames, a1's 15, b1's 10.
    let client = async_nats::connect(nats.urls()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(mles::link::nats::STREAM).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    if stored != 28 {
        let mut dump = Vec::new();
        for seq in 1..=stream.info().await.unwrap().state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await {
                let id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string());
                dump.push(format!(
                    "{seq} {id:?} {}",
                    String::from_utf8_lossy(&m.payload)
                ));
            }
        }
        panic!("stream holds {stored}, not 28:\n{}", dump.join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_starts_and_serves_locally_while_nats_is_down_and_shares_once_it_is_up() {
    let mut nats = NatsCluster::start(NODES).await;
    nats.kill_all();
    let a = mles_server_unconnected("a", &nats, 100).await;
    assert_eq!(health(&a).await, (200, "DEGRADED: nats".to_string()));
    let mut a1 = join(a.addr, "a1", "early").await;
    let mut a2 = join(a.addr, "a2", "early").await;
    let shared = a.shared.clone();
    wait_until("clients joined, no link yet", SLOW, async || {
        shared
            .hub
            .channel("early")
            .is_some_and(|c| c.client_count() == 2 && c.member_count() == 2)
    })
    .await;
    for i in 0..5 {
        send_text(&mut a1, &format!("a1:{i}")).await;
    }
    exactly_once_in_order(&collect(&mut a2, 5, WAIT).await, &["a1"], 5, "a2");

    nats.run_all().await;
    wait_until("connected", SLOW, async || {
        shared.metrics.nats_connected.get() == 1
    })
    .await;
    // Healthy again once its link is back up, too.
    let ops = a.shared.ops.clone();
    wait_until("healthy", SLOW, async || ops.health().1 == "OK").await;
    assert_eq!(health(&a).await, (200, "OK".to_string()));
    assert_eq!(a.shared.metrics.nats_reconnects.get(), 0, "a first connect");
    wait_in_stream(&nats, "early", "a1:4").await;
    let b = mles_server("b", &nats, 100).await;
    let mut b1 = join(b.addr, "b1", "early").await;
    let history = recv_texts(&mut b1, 7).await;
    assert_eq!(
        history[..2],
        [join_frame("a1", "early"), join_frame("a2", "early")]
    );
    exactly_once_in_order(&history[2..], &["a1"], 5, "b1");
    // a's members got nothing twice when the link came up.
    expect_nothing(&mut a2, Duration::from_millis(500)).await;
}

// ---------------------------------------------------------------------------------------
// Failover: a NATS node dies under traffic.

/// Frames each publisher sends in the failover test, one every [`PERIOD`].
const FRAMES: usize = 400;
const PERIOD: Duration = Duration::from_millis(25);
/// The node is killed once the first publisher has sent this many frames.
const KILL_AT: usize = 100;
/// The longest any frame may take from its publisher to any member, the kill included: a
/// liveness bound, not a speed target (the test prints the figures). Before a lost consumer
/// was found, a server received nothing for about 60 s (two missed 15 s heartbeats); now
/// the failover takes what NATS needs to elect new leaders and place a new consumer,
/// measured at 5–18 s.
const FAILOVER_BOUND: Duration = Duration::from_secs(30);
/// How long members keep reading after the last frame was sent, so that a failover slower
/// than [`FAILOVER_BOUND`] is measured rather than cut short.
const OBSERVE: Duration = Duration::from_secs(40);
/// History per channel in the failover test (the joiners' replay).
const FAILOVER_LIMIT: usize = 200;

/// An mles binary of the cluster, with its own log (stderr: what an operator sees at
/// `info`, and the links' `debug` lines), killed on drop.
struct MlesProcess {
    id: String,
    addr: SocketAddr,
    log: PathBuf,
    _process: Process,
}

impl MlesProcess {
    async fn start(id: &str, nats: &NatsCluster, dir: &Path) -> MlesProcess {
        let port = free_port();
        let log = dir.join(format!("mles-{id}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mles"))
            .args(["--tls", "off", "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--wwwroot")
            .arg(static_root())
            .args(["--server-id", id, "--nats", &nats.urls_joined()])
            .args(["--nats-replicas", &nats.replicas().to_string()])
            .args(["--limit", &FAILOVER_LIMIT.to_string()])
            .args(["--peer-grace", "2", "--metrics-on-main"])
            // The test watches /health and /metrics many times a second from 127.0.0.1.
            .args(["--ip-rate", "0"])
            // What an operator sees (info), and why a link could not start (debug).
            .env("RUST_LOG", "info,mles::link=debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("mles binary starts");
        let server = MlesProcess {
            id: id.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            _process: Process(child),
        };
        wait_until(&format!("mles {id} connected to NATS"), SLOW, async || {
            server
                .metrics()
                .await
                .is_some_and(|m| m.get("mles_nats_connected") == Some(&1.0))
        })
        .await;
        server
    }

    async fn metrics(&self) -> Option<HashMap<String, f64>> {
        metrics_of(self.addr).await
    }

    async fn health(&self) -> Option<String> {
        health_of(self.addr).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `/metrics` of the server at `addr` as name (with labels) → value; None when it does not
/// answer.
async fn metrics_of(addr: SocketAddr) -> Option<HashMap<String, f64>> {
    let reply = http_client::Http::plain()
        .try_send(
            http::Method::GET,
            addr,
            "/metrics",
            &[("host", "localhost")],
            b"",
        )
        .await
        .ok()?;
    (reply.status == 200).then(|| {
        reply
            .text()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    })
}

/// `/health` of the server at `addr`: status and body; None when it does not answer.
async fn health_of(addr: SocketAddr) -> Option<String> {
    let reply = http_client::Http::plain()
        .try_send(
            http::Method::GET,
            addr,
            "/health",
            &[("host", "localhost")],
            b"",
        )
        .await
        .ok()?;
    Some(format!("{} {}", reply.status.as_u16(), reply.text()))
}

/// The NATS metrics an operator watches during a failover.
const FAILOVER_METRICS: [&str; 6] = [
    "mles_nats_connected",
    "mles_nats_disconnects_total",
    "mles_nats_reconnects_total",
    "mles_nats_consumer_lost_total",
    "mles_nats_publish_failures_total",
    "mles_nats_lagged_total",
];

/// What the server at `addr` shows from `since` until `done`: each change of its `/health`
/// (asked every 20 ms, so a degraded spell of a few tens of milliseconds shows) and of the
/// [`FAILOVER_METRICS`] (every 100 ms), with the time since `since`.
async fn watch(addr: SocketAddr, since: Instant, done: Arc<AtomicBool>) -> Vec<(Duration, String)> {
    let mut seen = Vec::new();
    let mut health = None;
    let mut values: Vec<f64> = Vec::new();
    let limit = PERIOD * FRAMES as u32 + OBSERVE;
    let mut round = 0u64;
    while !done.load(Ordering::Relaxed) && since.elapsed() < limit {
        let now = health_of(addr).await;
        if now != health {
            seen.push((since.elapsed(), format!("/health {now:?}")));
            health = now;
        }
        if round.is_multiple_of(5) {
            let metrics = metrics_of(addr).await.unwrap_or_default();
            let now: Vec<f64> = FAILOVER_METRICS
                .iter()
                .map(|m| metrics.get(*m).copied().unwrap_or(f64::NAN))
                .collect();
            for (k, v) in now.iter().enumerate() {
                if values.get(k).is_some_and(|old| old != v) {
                    seen.push((since.elapsed(), format!("{} {v}", FAILOVER_METRICS[k])));
                }
            }
            values = now;
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// What one member of the failover test did: the data frames it received, when, and (for a
/// publisher) when it sent each of its frames.
struct MemberLog {
    name: String,
    server: usize,
    got: Vec<(String, Instant)>,
    sent: Vec<Instant>,
    ended: Option<String>,
}

/// One member: publishes `FRAMES` numbered frames every `PERIOD` (when `publishes`) while
/// reading, until it has `expected` distinct data frames and [`DUPLICATE_QUIET`] has passed
/// with nothing more, or [`OBSERVE`] after its last frame.
async fn run_member(
    name: String,
    server: usize,
    ws: Ws,
    publishes: bool,
    expected: usize,
    progress: Arc<AtomicUsize>,
) -> MemberLog {
    let (mut sink, mut stream) = ws.split();
    let mut log = MemberLog {
        name: name.clone(),
        server,
        got: Vec::new(),
        sent: Vec::new(),
        ended: None,
    };
    let mut distinct = HashSet::new();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let to_send = if publishes { FRAMES } else { 0 };
    let publishing_time = PERIOD * FRAMES as u32;
    let mut deadline = tokio::time::Instant::now() + publishing_time + OBSERVE;
    let mut complete = false;
    loop {
        tokio::select! {
            _ = tick.tick(), if log.sent.len() < to_send => {
                let i = log.sent.len();
                log.sent.push(Instant::now());
                let send = sink.send(Message::text(format!("{name}:{i}")));
                tokio::time::timeout(WAIT, send)
                    .await
                    .expect("send in time")
                    .expect("send ok");
                progress.store(i + 1, Ordering::Relaxed);
            }
            next = tokio::time::timeout_at(deadline, stream.next()) => match next {
                Err(_) => break,
                Ok(Some(Ok(Message::Text(text)))) => {
                    if !text.starts_with('{') {
                        distinct.insert(text.to_string());
                        log.got.push((text.to_string(), Instant::now()));
                    }
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => {
                    log.ended = Some(format!("{other:?}"));
                    break;
                }
            },
        }
        if !complete && distinct.len() >= expected && log.sent.len() == to_send {
            // Everything is here: duplicates would come within the quiet time.
            complete = true;
            deadline = tokio::time::Instant::now() + DUPLICATE_QUIET;
        }
    }
    log
}

/// The data frames a fresh joiner of `channel` on `server` is replayed: read until nothing
/// comes for a second (the replay is immediate; nobody publishes now).
async fn replayed(server: &MlesProcess, uid: &str, channel: &str) -> Vec<String> {
    let mut ws = join(server.addr, uid, channel).await;
    let mut frames = Vec::new();
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let quiet = (tokio::time::Instant::now() + Duration::from_secs(1)).min(end);
        match tokio::time::timeout_at(quiet, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Text(text)))) => {
                if !text.starts_with('{') {
                    frames.push(text.to_string());
                }
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("{uid}: replay ended with {other:?}"),
        }
    }
    frames
}

/// The data frames of `channel` in the JetStream stream, in the stream's order (the
/// cluster's order), read with an ordered consumer of the test's own through the nodes
/// that are up.
async fn stream_order(nats: &NatsCluster, channel: &str) -> Result<Vec<String>, String> {
    // NATS 2.9 may place the new consumer on a node that just died (its request then times
    // out): try again, a bounded number of times.
    let mut errors = Vec::new();
    for _ in 0..3 {
        match stream_order_once(nats, channel).await {
            Ok(frames) => return Ok(frames),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

async fn stream_order_once(nats: &NatsCluster, channel: &str) -> Result<Vec<String>, String> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use async_nats::jetstream::consumer::DeliverPolicy;
    let urls: Vec<String> = nats
        .nodes
        .iter()
        .filter(|n| n.is_running())
        .map(|n| n.url())
        .collect();
    let mut step = "connecting";
    let mut frames = Vec::new();
    let mut pending = 0;
    let read = async {
        let client = async_nats::connect(urls).await.map_err(|e| e.to_string())?;
        let js = async_nats::jetstream::new(client);
        step = "getting the stream";
        let stream = js
            .get_stream(mles::link::nats::STREAM)
            .await
            .map_err(|e| e.to_string())?;
        step = "creating a consumer";
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: mles::link::nats::subject(channel),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        pending = consumer.cached_info().num_pending as usize;
        step = "reading";
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        for _ in 0..pending {
            let message = messages
                .next()
                .await
                .ok_or("the consumer ended")?
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&message.payload).into_owned();
            if !text.starts_with('{') {
                frames.push(text);
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(WAIT, read).await {
        Ok(Ok(())) => Ok(frames),
        Ok(Err(e)) => Err(format!("{step}: {e}")),
        Err(_) => Err(format!(
            "timed out {step} ({} data frames of {pending} messages read)",
            frames.len()
        )),
    }
}

/// Where two servers' replays differ, aligned at their ends (a later joiner's window has
/// moved on by the join frames of the joiners before it): a description of the first
/// differences, or None when the shorter is the longer's tail.
fn history_difference(a: &[String], b: &[String]) -> Option<String> {
    let n = a.len().min(b.len());
    let (ta, tb) = (&a[a.len() - n..], &b[b.len() - n..]);
    let differing: Vec<usize> = (0..n).filter(|i| ta[*i] != tb[*i]).collect();
    if differing.is_empty() {
        return None;
    }
    let only_a = ta.iter().filter(|f| !tb.contains(f)).count();
    let only_b = tb.iter().filter(|f| !ta.contains(f)).count();
    let first = differing[0];
    let around = |t: &[String]| t[first..(first + 6).min(n)].join(" ");
    Some(format!(
        "{} of the last {n} positions differ, {only_a} frames only in the first, {only_b} only in the second; from position {first}: [{}] vs [{}]",
        differing.len(),
        around(ta),
        around(tb)
    ))
}

/// Which NATS node the failover tests kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    /// A node that holds a server's consumer of the channel, not the stream's leader.
    ConsumerNode,
    /// The stream's leader (with whatever consumers it holds).
    StreamLeader,
}

/// The failover tests share the two cores with nothing as heavy as each other.
static FAILOVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The node that holds one server's JetStream consumer (and not the stream leader) is
/// SIGKILLed while members on three servers publish: see [`failover`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_nats_node_of_a_servers_consumer_loses_nothing_and_histories_agree() {
    failover(Victim::ConsumerNode).await;
}

/// The stream leader's node is SIGKILLed while members on three servers publish: see
/// [`failover`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leaders_nats_node_loses_nothing_and_histories_agree() {
    failover(Victim::StreamLeader).await;
}

/// Three mles servers (binaries, each with its own log) on a three-node NATS cluster with
/// `--nats-replicas 3`, a publisher and a listener on each; the `victim_kind` node is
/// SIGKILLed while everyone publishes (40 frames a second each). Every member must get
/// every frame exactly once, in each publisher's order, none later than [`FAILOVER_BOUND`]
/// after it was sent (a link down for more than about 5 s at this rate would also lose
/// frames that left its server's history of 200, as the README's loss bound says); each
/// server the kill hits must show it in `/metrics`, `/health` and its log; and fresh
/// joiners afterwards must be replayed the same history on every server. Every check is
/// made and reported (with the timings measured) before the test fails.
async fn failover(victim_kind: Victim) {
    let _alone = FAILOVER.lock().await;
    let mut nats = NatsCluster::start(NODES).await;
    let dir = tempfile::tempdir().unwrap();
    let ids = ["a", "b", "c"];
    let mut servers = Vec::new();
    for id in ids {
        servers.push(MlesProcess::start(id, &nats, dir.path()).await);
    }
    let channel = "failover";
    let subject = mles::link::nats::subject(channel);
    let stream = mles::link::nats::STREAM;

    // Members join server by server; each server's consumer is the one that appears.
    let mut owners: Vec<String> = Vec::new();
    let mut members = Vec::new();
    for (s, server) in servers.iter().enumerate() {
        let id = &server.id;
        members.push((
            format!("p{id}"),
            s,
            true,
            join(server.addr, &format!("p{id}"), channel).await,
        ));
        members.push((
            format!("l{id}"),
            s,
            false,
            join(server.addr, &format!("l{id}"), channel).await,
        ));
        let mut mine = None;
        wait_until(&format!("{id}'s consumer"), SLOW, async || {
            let consumers = nats.consumers(stream, &subject).await;
            mine = consumers
                .iter()
                .find(|(name, _)| !owners.contains(name))
                .map(|(name, _)| name.clone());
            consumers.len() == s + 1 && mine.is_some()
        })
        .await;
        owners.push(mine.expect("found"));
    }

    // The victim, chosen before anyone publishes.
    let names: Vec<String> = nats.nodes.iter().map(|n| n.name.clone()).collect();
    let node_name = |i: usize| names[i].clone();
    let placement = |consumers: &[(String, usize)]| -> Vec<usize> {
        owners
            .iter()
            .map(|owner| {
                consumers
                    .iter()
                    .find(|(name, _)| name == owner)
                    .map(|(_, node)| *node)
                    .unwrap_or_else(|| panic!("consumer {owner} is gone: {consumers:?}"))
            })
            .collect()
    };
    let mut held_by = placement(&nats.consumers(stream, &subject).await);
    let mut stream_leader = nats.stream_leader_node(stream).await;
    if victim_kind == Victim::ConsumerNode && held_by.iter().all(|n| *n == stream_leader) {
        // Every consumer is on the stream leader: move the leadership away (as an operator
        // does with `nats stream cluster step-down`), so that killing a consumer's node
        // does not also kill the stream leader. Nobody publishes yet: no link notices.
        nats.stream_leader_step_down(stream).await;
        stream_leader = nats.stream_leader_node(stream).await;
        held_by = placement(&nats.consumers(stream, &subject).await);
    }
    let mut connected_to = Vec::new();
    for id in ids {
        connected_to.push(nats.node_of_client(&format!("mles {id}")).await);
    }
    let victim = match victim_kind {
        Victim::StreamLeader => stream_leader,
        // A consumer's node other than the stream leader's, preferably one its server is
        // not connected to (that server's connection stays up; only its consumer is gone).
        Victim::ConsumerNode => {
            let candidates: Vec<usize> = (0..ids.len())
                .filter(|s| held_by[*s] != stream_leader)
                .collect();
            let s = candidates
                .iter()
                .copied()
                .find(|s| connected_to[*s] != Some(held_by[*s]))
                .or(candidates.first().copied())
                .expect("a consumer away from the stream leader");
            held_by[s]
        }
    };
    // The servers the kill hits: whose consumer dies with the node, and with the stream
    // leader every server (each publishes to the stream).
    let affected: Vec<usize> = (0..ids.len())
        .filter(|s| victim_kind == Victim::StreamLeader || held_by[*s] == victim)
        .collect();
    println!(
        "NATS: meta leader {:?}, stream leader {}",
        nats.meta_leader().await,
        node_name(stream_leader)
    );
    for s in 0..ids.len() {
        println!(
            "mles {}: consumer {} on {}, connected to {:?}",
            ids[s],
            owners[s],
            node_name(held_by[s]),
            connected_to[s].map(node_name)
        );
    }

    // Everyone publishes and reads.
    let progress = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (name, s, publishes, ws) in members {
        let expected = if publishes { 2 * FRAMES } else { 3 * FRAMES };
        let progress = if name == "pa" {
            progress.clone()
        } else {
            Arc::new(AtomicUsize::new(0))
        };
        tasks.push(tokio::spawn(run_member(
            name, s, ws, publishes, expected, progress,
        )));
    }
    let progress_now = progress.clone();
    wait_until("publishing under way", SLOW, async || {
        progress_now.load(Ordering::Relaxed) >= KILL_AT
    })
    .await;
    // The consumers are where they were: the kill hits what was chosen.
    assert_eq!(
        placement(&nats.consumers(stream, &subject).await),
        held_by,
        "the consumers moved before the kill"
    );
    let before: Vec<HashMap<String, f64>> = {
        let mut all = Vec::new();
        for server in &servers {
            all.push(server.metrics().await.expect("metrics before"));
        }
        all
    };
    let log_offsets: Vec<usize> = servers.iter().map(|s| s.log().len()).collect();

    // Watch /health and the NATS metrics of every server from the kill on.
    let done = Arc::new(AtomicBool::new(false));
    let killed_at = Instant::now();
    nats.kill(victim);
    let watches: Vec<_> = servers
        .iter()
        .map(|server| tokio::spawn(watch(server.addr, killed_at, done.clone())))
        .collect();
    println!(
        "killed {} ({}, holding the consumers of {:?}) at {:.2?} into publishing",
        node_name(victim),
        if victim == stream_leader {
            "the stream leader"
        } else {
            "not the stream leader"
        },
        (0..ids.len())
            .filter(|s| held_by[*s] == victim)
            .map(|s| ids[s])
            .collect::<Vec<_>>(),
        killed_at - started
    );

    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await.expect("member task"));
    }
    let finished = Instant::now();
    done.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for watch in watches {
        seen.push(watch.await.expect("watch task"));
    }
    let mut failures: Vec<String> = Vec::new();

    // Every frame exactly once, in each publisher's order, within the bound.
    let publishers: Vec<String> = ids.iter().map(|id| format!("p{id}")).collect();
    let all_publishers: Vec<&str> = publishers.iter().map(String::as_str).collect();
    let sent: HashMap<String, Vec<Instant>> = logs
        .iter()
        .filter(|l| !l.sent.is_empty())
        .map(|l| (l.name.clone(), l.sent.clone()))
        .collect();
    let mut worst = Duration::ZERO;
    for log in &logs {
        let others: Vec<&str> = publishers
            .iter()
            .map(String::as_str)
            .filter(|p| *p != log.name)
            .collect();
        let frames: Vec<String> = log.got.iter().map(|(f, _)| f.clone()).collect();
        let problems = delivery_problems(&frames, &others, FRAMES);
        if !problems.is_empty() {
            failures.push(format!(
                "{} (on {}): {}",
                log.name,
                ids[log.server],
                problems.join("; ")
            ));
        }
        if let Some(ended) = &log.ended {
            failures.push(format!("{}: connection ended: {ended}", log.name));
        }
        // Latency of each frame, and the longest spell without a frame from another
        // server after the kill.
        let mut latest = Duration::ZERO;
        let mut last_remote = killed_at;
        let mut silence = Duration::ZERO;
        for (frame, at) in &log.got {
            let Some((publisher, i)) = frame.rsplit_once(':') else {
                continue;
            };
            let Some(sent_at) = sent
                .get(publisher)
                .and_then(|s| s.get(i.parse::<usize>().ok()?))
            else {
                continue;
            };
            latest = latest.max(at.saturating_duration_since(*sent_at));
            let remote = publisher[1..] != *ids[log.server];
            if remote && *at > killed_at {
                silence = silence.max(*at - last_remote);
                last_remote = *at;
            }
        }
        let complete_at = log
            .got
            .last()
            .map(|(_, at)| at.saturating_duration_since(killed_at));
        println!(
            "{} on {}: {} frames, slowest {:.2?} from publish to delivery, longest silence from other servers after the kill {:.2?}, last frame {:.2?} after the kill",
            log.name,
            ids[log.server],
            log.got.len(),
            latest,
            silence,
            complete_at.unwrap_or_default()
        );
        worst = worst.max(latest);
    }
    println!(
        "publishing took {:.2?}; members done {:.2?} after the kill",
        PERIOD * FRAMES as u32,
        finished - killed_at
    );
    if worst > FAILOVER_BOUND {
        failures.push(format!(
            "a frame took {worst:.2?} to reach a member (bound {FAILOVER_BOUND:?})"
        ));
    }

    // What an operator sees: metrics, /health and the log of every server.
    for (s, server) in servers.iter().enumerate() {
        let after = server.metrics().await.unwrap_or_default();
        let moved: Vec<String> = FAILOVER_METRICS
            .iter()
            .filter_map(|m| {
                let (b, a) = (before[s].get(*m)?, after.get(*m)?);
                (a != b).then(|| format!("{m} {b} -> {a}"))
            })
            .collect();
        println!("mles {} metrics moved: {moved:?}", server.id);
        for (at, what) in &seen[s] {
            println!("mles {} at kill+{at:.2?}: {what}", server.id);
        }
        let log = server.log();
        let since: Vec<&str> = log[log_offsets[s]..].lines().collect();
        println!("mles {} log after the kill:", server.id);
        for line in &since {
            println!("    {line}");
        }
        // A link reading the stream directly stays degraded until JetStream places its new
        // consumer, which waits for a new meta leader when the kill took the old one.
        wait_until(
            &format!(
                "mles {}: /health OK within {FAILOVER_BOUND:?} of the kill",
                server.id
            ),
            FAILOVER_BOUND.saturating_sub(killed_at.elapsed()),
            async || server.health().await.as_deref() == Some("200 OK"),
        )
        .await;
        println!(
            "mles {}: /health OK {:.2?} after the kill",
            server.id,
            killed_at.elapsed()
        );
        if affected.contains(&s) {
            let counted = [
                "mles_nats_consumer_lost_total",
                "mles_nats_disconnects_total",
                // A server whose connection and consumer live elsewhere meets the dead
                // stream leader only when it publishes.
                "mles_nats_publish_failures_total",
                "mles_nats_reconnects_total",
            ];
            if !moved
                .iter()
                .any(|m| counted.iter().any(|c| m.starts_with(c)))
            {
                failures.push(format!(
                    "mles {}: the kill hit it and /metrics shows nothing of it: {moved:?}",
                    server.id
                ));
            }
            if !since
                .iter()
                .any(|l| l.contains("WARN") && l.contains("NATS"))
            {
                failures.push(format!(
                    "mles {}: the kill hit it and its log has no NATS warning",
                    server.id
                ));
            }
            if !seen[s]
                .iter()
                .any(|(_, w)| w.starts_with("/health") && !w.contains("\"200 OK\""))
            {
                failures.push(format!(
                    "mles {}: the kill hit it and /health said OK throughout",
                    server.id
                ));
            }
        }
    }

    // A fresh joiner is replayed the same history on every server.
    let mut replays = Vec::new();
    for server in &servers {
        let frames = replayed(server, &format!("j{}", server.id), channel).await;
        let replay_order: Vec<String> = delivery_problems(&frames, &all_publishers, FRAMES)
            .into_iter()
            .filter(|p| !p.contains("missing"))
            .collect();
        if !replay_order.is_empty() {
            failures.push(format!(
                "the joiner on {} is replayed: {}",
                server.id,
                replay_order.join("; ")
            ));
        }
        println!(
            "joiner on {}: {} data frames replayed, the last {:?}",
            server.id,
            frames.len(),
            &frames[frames.len().saturating_sub(3)..]
        );
        replays.push(frames);
    }
    // The cluster's order: the stream's. What it holds, and whose history follows it.
    match stream_order(&nats, channel).await {
        Ok(order) => {
            let missing = delivery_problems(&order, &all_publishers, FRAMES);
            println!(
                "the stream holds {} data frames of the channel; {}",
                order.len(),
                if missing.is_empty() {
                    "every frame once, in order".to_string()
                } else {
                    missing.join("; ")
                }
            );
            for (s, replay) in replays.iter().enumerate() {
                match history_difference(&order, replay) {
                    None => println!("the joiner on {} is replayed the stream's order", ids[s]),
                    Some(d) => println!(
                        "the joiner on {} is not replayed the stream's order: {d}",
                        ids[s]
                    ),
                }
            }
        }
        Err(e) => println!("the stream could not be read: {e}"),
    }
    for (x, y) in [(0, 1), (0, 2), (1, 2)] {
        if let Some(difference) = history_difference(&replays[x], &replays[y]) {
            failures.push(format!(
                "joiners on {} and {} get different histories: {difference}",
                ids[x], ids[y]
            ));
        }
    }
    if !failures.is_empty() {
        panic!(
            "{} failed checks:\n- {}",
            failures.len(),
            failures.join("\n- ")
        );
    }
}
