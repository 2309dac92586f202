//! What an operator reads: the real binary's stderr. `--version` names the backends; a
//! refused join or connection is one `info` line with the reason and the client's address;
//! a flood of refusals folds into about one line per second that still accounts for every
//! refusal; `--log-format json` (or `MLES_LOG_FORMAT=json`) writes one JSON object per
//! line; and with `RUST_LOG=trace` neither the shared key nor any auth token (a client's or
//! a peer link's) shows up in any form.

mod common;
use common::{expect_close, free_port, send_text, static_root, WAIT};

use std::hash::Hasher;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// The real binary with stderr captured line by line; killed when dropped.
struct Mles {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Mles {
    /// Starts `mles --tls off --bind 127.0.0.1 --port P ARGS` with `env` (RUST_LOG unset
    /// unless given) and waits until it logs that it listens.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Mles {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mles"))
            .args(["--tls", "off", "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--wwwroot")
            .arg(static_root())
            // The tests read /metrics from loopback.
            .arg("--metrics-on-main")
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("MLES_KEY")
            .env_remove("MLES_PEER_KEY")
            .env_remove("MLES_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mles starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let server = Mles {
            child,
            port,
            lines,
            reader: Some(reader),
        };
        server.wait_for("the listening line", |l| l.contains("listening on"));
        server
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) until some line satisfies `pred`; returns it.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_until(what, |lines| lines.iter().find(|l| pred(l)).cloned())
    }

    /// Waits (bounded) until `check` over all lines so far gives a value.
    fn wait_until<T>(&self, what: &str, check: impl Fn(&[String]) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(found) = check(&self.lines()) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {WAIT:?}; stderr:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server and returns everything it wrote to stderr.
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            reader.join().expect("stderr reader");
        }
        self.lines().join("\n")
    }
}

impl Drop for Mles {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a WebSocket (offering `mles-websocket` when `subprotocol`); returns it and the
/// client's own address, which the server's log line must name. `Err` when the upgrade
/// was refused.
async fn open(
    addr: SocketAddr,
    subprotocol: bool,
) -> (
    Result<Ws, tokio_tungstenite::tungstenite::Error>,
    SocketAddr,
) {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let local = tcp.local_addr().unwrap();
    let mut request = format!("ws://{addr}/").into_client_request().unwrap();
    if subprotocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("mles-websocket"),
        );
    }
    let ws = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("upgrade in time")
        .map(|(ws, _)| ws);
    (ws, local)
}

/// Joins `channel` as `uid` with `auth` (if any); returns the socket and its address.
async fn join_as(
    addr: SocketAddr,
    uid: &str,
    channel: &str,
    auth: Option<&str>,
) -> (Ws, SocketAddr) {
    let (ws, local) = open(addr, true).await;
    let mut ws = ws.expect("upgrade accepted");
    let mut frame = serde_json::json!({"uid": uid, "channel": channel});
    if let Some(auth) = auth {
        frame["auth"] = auth.into();
    }
    send_text(&mut ws, &frame.to_string()).await;
    (ws, local)
}

/// Waits (bounded) until the server's `/metrics` (served to loopback clients) counts
/// `joins` joins.
async fn wait_for_joins(addr: SocketAddr, joins: u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + WAIT;
    loop {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        tokio::time::timeout(WAIT, tcp.read_to_string(&mut raw))
            .await
            .expect("metrics in time")
            .unwrap();
        let count = raw
            .lines()
            .find_map(|l| l.strip_prefix("mles_joins_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if count >= joins as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{joins} joins not counted:\n{raw}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Mles v2 auth token, computed here without the server's code.
fn token(uid: &str, channel: &str, key: &str) -> String {
    let mut h = siphasher::sip::SipHasher::new();
    h.write(uid.as_bytes());
    h.write(channel.as_bytes());
    h.write(key.as_bytes());
    format!("{:x}", h.finish())
}

/// Notable-event lines of a JSON log with `reason`, parsed.
fn json_notables(lines: &[String], reason: &str) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "mles::notable" && v["fields"]["reason"] == reason)
        .collect()
}

#[test]
fn version_names_the_tls_and_acme_backends() {
    let want = format!(
        "mles {} (rustls/ring, ACME: rustls-acme TLS-ALPN-01)\n",
        env!("CARGO_PKG_VERSION")
    );
    for flag in ["--version", "-V"] {
        let out = Command::new(env!("CARGO_BIN_EXE_mles"))
            .arg(flag)
            .output()
            .expect("mles runs");
        assert!(out.status.success(), "{flag}: {}", out.status);
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{flag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_joins_and_connections_are_one_info_line_each_with_reason_and_address() {
    let key = "operator-key-7f3a";
    let server = Mles::start(
        &["--message-rate", "3", "--message-window", "60"],
        &[("MLES_KEY", key)],
    );
    // The start line names the version and backends.
    server.wait_for("the version line", |l| {
        l.contains("INFO") && l.contains(&format!("mles {}", mles::version::LONG))
    });

    // Wrong auth.
    let (mut ws, auth_client) = join_as(server.addr(), "mallory", "room", Some("0123abcd")).await;
    assert_eq!(
        expect_close(&mut ws).await,
        (1008, "authentication failed".to_string())
    );
    let want = format!("refused join from {auth_client}: authentication failed");
    let line = server.wait_for("the auth refusal", |l| l.contains(&want));
    assert!(
        line.contains("INFO") && line.contains("mles::notable"),
        "{line}"
    );

    // A duplicate uid: the first member stays, the second is refused and logged.
    let good = token("alice", "room", key);
    let (_alice, _) = join_as(server.addr(), "alice", "room", Some(&good)).await;
    // The server reads each connection's join on its own: wait until alice's is taken.
    wait_for_joins(server.addr(), 1).await;
    let (mut dup, dup_client) = join_as(server.addr(), "alice", "room", Some(&good)).await;
    assert_eq!(
        expect_close(&mut dup).await,
        (1008, "uid already joined to this channel".to_string())
    );
    let dup_line = format!("refused join from {dup_client}: uid already joined to this channel");
    server.wait_for("the duplicate-uid refusal", |l| l.contains(&dup_line));

    // A join frame that is not JSON.
    let (ws, bad_client) = open(server.addr(), true).await;
    let mut ws = ws.expect("upgrade accepted");
    send_text(&mut ws, "hello?").await;
    assert_eq!(expect_close(&mut ws).await.0, 1008);
    server.wait_for("the bad-frame refusal", |l| {
        l.contains(&format!(
            "refused join from {bad_client}: join frame is not a JSON object"
        ))
    });

    // An upgrade without the subprotocol never becomes a session, and says so.
    let (refused, plain_client) = open(server.addr(), false).await;
    assert!(
        refused.is_err(),
        "an upgrade without the subprotocol is refused"
    );
    server.wait_for("the subprotocol refusal", |l| {
        l.contains(&format!(
            "refused connection from {plain_client}: subprotocol mles-websocket required"
        ))
    });

    // A limit hit: a fourth message in the window closes the client.
    let (mut chatty, chatty_client) = join_as(
        server.addr(),
        "chatty",
        "chat",
        Some(&token("chatty", "chat", key)),
    )
    .await;
    for _ in 0..4 {
        send_text(&mut chatty, "blah").await;
    }
    assert_eq!(
        expect_close(&mut chatty).await,
        (1008, "message rate limit exceeded".to_string())
    );
    server.wait_for("the rate-limit line", |l| {
        l.contains(&format!(
            "closed {chatty_client} (limit): message rate limit exceeded"
        ))
    });

    let log = server.finish();
    // One line per refusal, not more.
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count(&want), 1, "{log}");
    assert_eq!(count(&bad_client.to_string()), 1, "{log}");
    assert_eq!(count(&plain_client.to_string()), 1, "{log}");
    assert!(!log.contains(key), "the key must not be logged:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_folds_into_about_one_json_line_per_second() {
    const FLOOD: usize = 200;
    let server = Mles::start(
        &["--ip-rate", "0", "--per-ip-limit", "0"],
        &[("MLES_KEY", "flood-key"), ("MLES_LOG_FORMAT", "json")],
    );
    let started = Instant::now();
    let mut clients = Vec::new();
    for batch in 0..FLOOD / 20 {
        let joins = (0..20).map(|i| {
            let uid = format!("u{batch}-{i}");
            let addr = server.addr();
            async move {
                let (mut ws, local) = join_as(addr, &uid, "flooded", Some("bad")).await;
                assert_eq!(expect_close(&mut ws).await.0, 1008);
                local
            }
        });
        clients.extend(futures::future::join_all(joins).await);
    }
    let elapsed = started.elapsed();

    // Every refusal is accounted for: each line stands for itself and `folded` more.
    let lines = server.wait_until("all refusals accounted for", |lines| {
        let notables = json_notables(lines, "auth");
        let total: u64 = notables
            .iter()
            .map(|v| 1 + v["fields"]["folded"].as_u64().expect("folded is a number"))
            .sum();
        assert!(total <= FLOOD as u64, "more refusals logged than made");
        (total == FLOOD as u64).then_some(notables)
    });
    let seconds = elapsed.as_secs_f64().ceil() as usize;
    assert!(
        lines.len() <= seconds + 2,
        "{} lines for {FLOOD} refusals in {elapsed:?}: {lines:#?}",
        lines.len()
    );
    assert!(lines.len() < FLOOD / 10, "the flood was not folded");
    assert!(lines
        .iter()
        .any(|v| v["fields"]["folded"].as_u64() > Some(0)));
    for v in &lines {
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["event"], "join_refused");
        assert!(v["time"].is_string());
        let client: SocketAddr = v["fields"]["client"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .expect("client is an address");
        assert!(
            clients.contains(&client),
            "{client} is one of the flood's clients"
        );
        let message = v["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!(
                "refused join from {client}: authentication failed"
            )),
            "{message}"
        );
        let folded = v["fields"]["folded"].as_u64().unwrap();
        if folded > 0 {
            assert!(
                message.ends_with(&format!("(and {folded} more like it in the last second)")),
                "{message}"
            );
        }
    }
    // Every line of the JSON log is one object with level, target and message.
    let log = server.finish();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["time", "level", "target", "message"] {
            assert!(v[field].is_string(), "{field} missing: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_show_the_key_or_an_auth_token() {
    let key = "s3cret-shared-key-91c2";
    let peer_key = "peer-s3cret-only-servers-know";
    let env = [
        ("MLES_KEY", key),
        ("MLES_PEER_KEY", peer_key),
        ("RUST_LOG", "trace"),
    ];
    // b, and a linked to b: a's link joins b with a token of its own.
    let b = Mles::start(&["--server-id", "b", "--log-format", "json"], &env);
    let peer = format!("ws://{}/", b.addr());
    let a = Mles::start(&["--server-id", "a", "--peer", &peer], &env);

    let carol_token = token("carol", "vault", key);
    let dave_token = token("dave", "vault", key);
    let link_token = token("a", "vault", key);
    let (mut carol, _) = join_as(a.addr(), "carol", "vault", Some(&carol_token)).await;
    let (mut dave, _) = join_as(b.addr(), "dave", "vault", Some(&dave_token)).await;
    // carol's words reach dave over the link, so the link joined b with its token. The
    // link may come up after the first message: send until one arrives.
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(tries < 100, "carol never reached dave over the peer link");
        send_text(&mut carol, "psst").await;
        let got = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                match futures::StreamExt::next(&mut dave).await {
                    Some(Ok(m)) if m.is_text() && m.to_text().unwrap() == "psst" => return,
                    Some(Ok(_)) => continue,
                    other => panic!("dave: {other:?}"),
                }
            }
        })
        .await;
        if got.is_ok() {
            break;
        }
    }
    let (a_log, b_log) = (a.finish(), b.finish());
    for (name, log) in [("a", &a_log), ("b", &b_log)] {
        // Trace logging really was on: mles' own debug lines are there.
        assert!(
            log.contains("joined vault"),
            "{name}: no debug lines at RUST_LOG=trace:\n{log}"
        );
        for secret in [key, peer_key, &carol_token, &dave_token, &link_token] {
            let hex = hex::encode(secret.as_bytes());
            assert!(
                !log.contains(secret) && !log.contains(&hex),
                "{name}'s log shows the secret {secret:?}:\n{log}"
            );
        }
    }
    drop(carol);
}
