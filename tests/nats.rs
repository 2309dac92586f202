//! The NATS JetStream backplane against a real `nats-server -js` on a loopback port: frames
//! cross servers exactly once and in each publisher's order, a joiner on any server gets
//! the cluster's history, a restarted server loses none, and a NATS restart during traffic
//! loses nothing local and resumes cross-server delivery.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mles::config::NatsConfig;

/// Longest wait for anything that crosses NATS, reconnects included.
const SLOW: Duration = Duration::from_secs(40);

/// A `nats-server -js` on a loopback port, killed on drop.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    async fn start() -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut server = NatsServer {
            child: None,
            port,
            store: dir.path().to_path_buf(),
            _dir: Some(dir),
        };
        server.run().await;
        server
    }

    /// Starts the process (again) on the same port and store, and waits until it says it
    /// is ready: a listener on the port might be another process, this one exited.
    async fn run(&mut self) {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let log_path = self.store.join("nats.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs (Debian package nats-server)");
        let port = self.port;
        wait_until("nats-server to say it is ready", WAIT, async || {
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            let exited = child.try_wait().unwrap();
            assert!(
                exited.is_none(),
                "nats-server on port {port} exited ({exited:?}):\n{said}"
            );
            said.contains("Server is ready")
        })
        .await;
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process as an operator's restart does (SIGTERM). NATS then writes out its
    /// store; a SIGKILL may lose what it acknowledged in the last moments, because a single
    /// nats-server (2.9) does not sync each write.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An mles server in the cluster of `nats`, with history `limit`, not waiting for NATS.
async fn mles_server_unconnected(id: &str, nats: &NatsServer, limit: usize) -> TestServer {
    // Shown only for a failing test: what the links did.
    let _ =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("mles=debug"))
            .is_test(true)
            .try_init();
    let id = id.to_string();
    let mut config = NatsConfig::new(&nats.url()).unwrap();
    config.grace = Duration::from_secs(2);
    start_with(move |c| {
        c.server_id = id;
        c.hub.history_limit = limit;
        c.nats = Some(config);
    })
    .await
}

/// An mles server in the cluster of `nats`, with history `limit`, connected to NATS.
async fn mles_server(id: &str, nats: &NatsServer, limit: usize) -> TestServer {
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

/// GET /health over plain HTTP: status code and body.
async fn health(server: &TestServer) -> (u16, String) {
    let reply = http_client::get(server.addr, "/health").await;
    (reply.status.as_u16(), reply.text())
}

/// The last frame stored in JetStream for `channel`, read with a separate NATS client.
async fn last_in_stream(nats: &NatsServer, channel: &str) -> Option<String> {
    let client = async_nats::connect(nats.url()).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(mles::link::nats::STREAM).await.ok()?;
    let message = stream
        .get_last_raw_message_by_subject(&mles::link::nats::subject(channel))
        .await
        .ok()?;
    String::from_utf8(message.payload.to_vec()).ok()
}

async fn wait_in_stream(nats: &NatsServer, channel: &str, frame: &str) {
    wait_until(&format!("{frame} to reach the stream"), SLOW, async || {
        last_in_stream(nats, channel).await.as_deref() == Some(frame)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_cross_three_servers_exactly_once_in_publish_order() {
    let nats = NatsServer::start().await;
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
    let nats = NatsServer::start().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_in_nats_is_bounded_by_the_limit_per_channel() {
    let nats = NatsServer::start().await;
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
    let nats = NatsServer::start().await;
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
    let mut nats = NatsServer::start().await;
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
    nats.stop();
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
    // Long enough for the publishes to fail (no ack in 5 s): the frames wait in the local
    // history for NATS to come back.
    for server in [&a, &b] {
        let shared = server.shared.clone();
        wait_until("publish failure", SLOW, async || {
            shared.metrics.nats_publish_failures.get() >= 1
        })
        .await;
    }

    // NATS comes back with its store: each server publishes what it held back.
    nats.run().await;
    for server in [&a, &b] {
        let shared = server.shared.clone();
        wait_until("NATS back", SLOW, async || {
            shared.metrics.nats_connected.get() == 1
        })
        .await;
        assert!(shared.metrics.nats_reconnects.get() >= 1);
    }
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
    let client = async_nats::connect(nats.url()).await.unwrap();
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
    let mut nats = NatsServer::start().await;
    nats.kill();
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

    nats.run().await;
    wait_until("connected", SLOW, async || {
        shared.metrics.nats_connected.get() == 1
    })
    .await;
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
