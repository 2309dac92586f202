//! Real clients, run as users run them: `websocat` (crates.io, 1.x) over ws:// and over
//! wss:// against a self-signed certificate, and Debian's chromium opening the shipped chat
//! page over https and talking to a websocat client, and reconnecting and resuming by
//! itself when the test cuts its network (a TCP relay) or restarts the server.
//!
//! These tests need tools outside cargo; when one is missing they fail and say how to
//! install it (see `.ci/run`): `websocat` on PATH or in ~/.cargo/bin, `node` with
//! `npm ci --prefix tests/browser` done, and `/usr/bin/chromium` (or `$CHROMIUM`).

mod common;
use common::*;

use std::hash::Hasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mles::config::TlsConfig;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// How long a test waits for a line from a client process.
const CLIENT_WAIT: Duration = Duration::from_secs(20);
/// How long the whole browser run may take (chromium start included).
const BROWSER_WAIT: Duration = Duration::from_secs(120);
/// How long a test waits for the page to join: a cold Chromium start on a loaded 2-core
/// machine (the suite runs eight browser tests at once, right after a build) took over
/// 10 s in two full-suite runs.
const PAGE_JOIN_WAIT: Duration = Duration::from_secs(60);

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn artifacts_dir() -> PathBuf {
    let dir = manifest_dir().join("target").join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The websocat binary: on PATH, or where `cargo install` puts it.
fn websocat_bin() -> PathBuf {
    find_on_path("websocat")
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let p = PathBuf::from(home).join(".cargo/bin/websocat");
            p.is_file().then_some(p)
        })
        .unwrap_or_else(|| {
            panic!(
                "websocat not found on PATH or in ~/.cargo/bin; install it with \
                 `cargo install websocat --version 1.14.1 --locked` (needs libssl-dev, pkg-config)"
            )
        })
}

/// The SipHash-2-4 (key 0) auth token over uid, channel and key, computed here without the
/// server's code.
fn independent_auth(uid: &str, channel: &str, key: &str) -> String {
    let mut h = siphasher::sip::SipHasher::new();
    h.write(uid.as_bytes());
    h.write(channel.as_bytes());
    h.write(key.as_bytes());
    format!("{:x}", h.finish())
}

/// A running websocat: lines go to its stdin, its stdout is read line by line. Killed when
/// dropped.
struct Websocat {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    /// The task copying stderr into `stderr`; it ends when websocat closes stderr.
    stderr_reader: Option<tokio::task::JoinHandle<()>>,
    seen: Vec<String>,
}

impl Websocat {
    /// Starts `websocat ARGS...` as a user types it.
    fn spawn(name: &str, args: &[&str]) -> Websocat {
        let mut child = Command::new(websocat_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("websocat starts");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr piped");
        let err_buf = stderr.clone();
        let stderr_reader = tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                err_buf
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Websocat {
            name: name.to_string(),
            child,
            stdin,
            lines,
            stderr,
            stderr_reader: Some(stderr_reader),
            seen: Vec::new(),
        }
    }

    /// Types `line` and Enter.
    async fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        let write = async {
            stdin.write_all(format!("{line}\n").as_bytes()).await?;
            stdin.flush().await
        };
        tokio::time::timeout(CLIENT_WAIT, write)
            .await
            .unwrap_or_else(|_| panic!("{}: stdin write timed out", self.name))
            .unwrap_or_else(|e| panic!("{}: stdin write failed: {e}", self.name));
    }

    /// The next line websocat prints, without its line ending.
    async fn next_line(&mut self) -> String {
        match tokio::time::timeout(CLIENT_WAIT, self.lines.recv()).await {
            Ok(Some(line)) => {
                self.seen.push(line.clone());
                line.trim_end_matches(['\r', '\n']).to_string()
            }
            Ok(None) => panic!(
                "{}: output ended; printed {:?}; stderr: {}",
                self.name,
                self.seen,
                self.stderr()
            ),
            Err(_) => panic!(
                "{}: no line within {CLIENT_WAIT:?}; printed {:?}; stderr: {}",
                self.name,
                self.seen,
                self.stderr()
            ),
        }
    }

    /// Asserts that the next line printed is `want`.
    async fn expect_line(&mut self, want: &str) {
        let got = self.next_line().await;
        assert_eq!(got, want, "{}: unexpected line", self.name);
    }

    /// Asserts that nothing is printed for `quiet`.
    async fn expect_quiet(&mut self, quiet: Duration) {
        if let Ok(Some(line)) = tokio::time::timeout(quiet, self.lines.recv()).await {
            panic!("{}: expected nothing, got {line:?}", self.name);
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Closes stdin and waits for websocat to exit.
    async fn finish(mut self) -> (ExitStatus, String) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(CLIENT_WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: did not exit after stdin closed", self.name))
            .expect("wait for websocat");
        // Everything websocat wrote is read once its stderr reaches end of file.
        if let Some(reader) = self.stderr_reader.take() {
            tokio::time::timeout(CLIENT_WAIT, reader)
                .await
                .unwrap_or_else(|_| panic!("{}: stderr not closed after exit", self.name))
                .expect("stderr reader");
        }
        (status, self.stderr())
    }
}

/// Runs websocat to completion with `stdin` as its input; returns its status and stderr.
async fn websocat_once(args: &[&str], stdin: &str) -> (ExitStatus, String) {
    let mut ws = Websocat::spawn("websocat", args);
    // A refused connection may close stdin before we write; that is fine here.
    if let Some(pipe) = ws.stdin.as_mut() {
        let _ = pipe.write_all(stdin.as_bytes()).await;
    }
    ws.finish().await
}

/// Waits until `channel` holds at least `frames` frames of history, i.e. a client process
/// has joined and sent what it was given.
async fn wait_for_history(server: &TestServer, channel: &str, frames: usize) {
    wait_until(
        &format!("{frames} frames of history in {channel}"),
        WAIT,
        async || {
            server
                .shared
                .hub
                .channel(channel)
                .is_some_and(|c| c.history().len() >= frames)
        },
    )
    .await;
}

/// A TLS server with a certificate made at start for `localhost`.
async fn start_tls(key: Option<&str>) -> TestServer {
    let key = key.map(str::to_string);
    start_with(move |c| {
        c.tls = TlsConfig::SelfSigned;
        c.key = key;
    })
    .await
}

#[tokio::test]
async fn websocat_over_ws_sends_and_receives() {
    let server = start().await;
    let url = server.ws_url();
    let mut rust = join(server.addr, "rust", "ws-room").await;
    wait_for_history(&server, "ws-room", 1).await;

    let mut cli = Websocat::spawn("cli", &["--protocol", "mles-websocket", &url]);
    cli.send_line(r#"{"uid":"cli","channel":"ws-room"}"#).await;
    // History first: the join frame of the member who was there before.
    cli.expect_line(&join_frame("rust", "ws-room")).await;
    cli.send_line("hello from websocat").await;

    // websocat 1.x keeps each typed line's newline in the frame it sends. (cli's join frame
    // is not relayed live: rust joined first.)
    assert_eq!(recv_text(&mut rust).await, "hello from websocat\n");

    send_text(&mut rust, r#"{"uid":"rust","message":"hello websocat"}"#).await;
    send_text(&mut rust, "second line").await;
    cli.expect_line(r#"{"uid":"rust","message":"hello websocat"}"#)
        .await;
    cli.expect_line("second line").await;
    cli.expect_quiet(Duration::from_millis(300)).await;

    // A late joiner gets it all from history, byte-exact.
    let mut late = join(server.addr, "late", "ws-room").await;
    assert_eq!(
        recv_texts(&mut late, 5).await,
        vec![
            join_frame("rust", "ws-room"),
            "{\"uid\":\"cli\",\"channel\":\"ws-room\"}\n".to_string(),
            "hello from websocat\n".to_string(),
            r#"{"uid":"rust","message":"hello websocat"}"#.to_string(),
            "second line".to_string(),
        ]
    );

    let (status, stderr) = cli.finish().await;
    assert!(status.success(), "websocat failed: {status}; {stderr}");
    drop(rust);
    server.stop().await;
}

#[tokio::test]
async fn websocat_over_wss_with_a_self_signed_certificate_relays_text_and_binary() {
    let server = start_tls(None).await;
    let url = format!("wss://localhost:{}/", server.addr.port());
    // As a user types it; --binary-prefix marks binary frames in and out. (Not
    // --linemode-strip-newlines: websocat 1.14 splits lines wrongly with it when several
    // arrive at once.)
    let args = [
        "-k",
        "--binary-prefix",
        "B:",
        "--protocol",
        "mles-websocket",
        &url,
    ];
    let mut alice = Websocat::spawn("alice", &args);
    alice
        .send_line(r#"{"uid":"alice","channel":"tls-room"}"#)
        .await;
    alice.send_line("hello over wss").await;
    alice.send_line("B:bytes").await;

    // alice's join frame and her two frames are in the channel's history before bob comes.
    wait_for_history(&server, "tls-room", 3).await;

    let mut bob = Websocat::spawn("bob", &args);
    bob.send_line(r#"{"uid":"bob","channel":"tls-room"}"#).await;
    // History, in order, the binary frame still binary (printed with the B: prefix).
    bob.expect_line(r#"{"uid":"alice","channel":"tls-room"}"#)
        .await;
    bob.expect_line("hello over wss").await;
    bob.expect_line("B:bytes").await;

    bob.send_line("hi alice").await;
    alice.expect_line("hi alice").await;
    alice.expect_quiet(Duration::from_millis(300)).await;
    bob.expect_quiet(Duration::from_millis(100)).await;

    for client in [alice, bob] {
        let (status, stderr) = client.finish().await;
        assert!(status.success(), "websocat failed: {status}; {stderr}");
    }
    server.stop().await;
}

#[tokio::test]
async fn websocat_needs_the_subprotocol_and_trust_in_the_certificate() {
    let server = start_tls(None).await;
    let url = format!("wss://localhost:{}/", server.addr.port());
    let join = "{\"uid\":\"x\",\"channel\":\"c\"}\n";

    let (status, stderr) = websocat_once(&["-k", &url], join).await;
    assert!(!status.success(), "no subprotocol must be refused");
    assert!(stderr.contains("400"), "stderr: {stderr}");

    let (status, stderr) = websocat_once(&["--protocol", "mles-websocket", &url], join).await;
    assert!(!status.success(), "an untrusted certificate must fail");
    assert!(
        stderr.contains("certificate"),
        "stderr should name the certificate: {stderr}"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// The browser

/// The process group of the browser driver, killed whole unless the run finished by
/// itself. (playwright starts chromium in a group of its own; chromium exits by itself
/// when node, and with it the pipe it is driven through, is gone.)
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.pgid)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn browser_prerequisites() -> (PathBuf, PathBuf) {
    let node = find_on_path("node").unwrap_or_else(|| {
        panic!("node not found on PATH; install Node.js 20 (Debian/nodesource package nodejs)")
    });
    let browser_dir = manifest_dir().join("tests").join("browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed; run `npm ci --prefix tests/browser`"
    );
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.is_file(),
        "{} not found; install Debian's chromium (`apt-get install -y chromium`) or set CHROMIUM",
        chromium.display()
    );
    (node, chromium)
}

/// Starts `node tests/browser/chat.mjs STEPS...` in its own process group.
fn spawn_browser(
    steps: &[&str],
    env: &[(&str, &str)],
) -> (tokio::task::JoinHandle<std::io::Result<Output>>, GroupGuard) {
    let (node, chromium) = browser_prerequisites();
    let script = manifest_dir().join("tests/browser/chat.mjs");
    let mut cmd = Command::new(node);
    cmd.arg(&script)
        .args(steps)
        .env("CHROMIUM", &chromium)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().expect("node starts");
    let guard = GroupGuard {
        pgid: child.id().expect("node has a pid"),
        armed: true,
    };
    let task = tokio::spawn(async move {
        match tokio::time::timeout(BROWSER_WAIT, child.wait_with_output()).await {
            Ok(output) => output,
            Err(_) => Err(std::io::Error::other(format!(
                "browser run took longer than {BROWSER_WAIT:?}"
            ))),
        }
    });
    (task, guard)
}

/// What the driver's `--print` step wrote: the status text and every log entry.
#[derive(Debug)]
struct PageReport {
    status: String,
    state: String,
    /// The member list as shown ("alice", "web (you)").
    members: Vec<String>,
    /// The websocat command the footer prints.
    command: String,
    log: Vec<(String, String)>,
}

/// Every `--print` of the run, in order. A report starts with a status line, which is the
/// only line with a "status" field.
fn parse_reports(stdout: &str) -> Vec<PageReport> {
    let mut reports: Vec<PageReport> = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect("driver prints JSON");
        if let Some(status) = v["status"].as_str() {
            reports.push(PageReport {
                status: status.to_string(),
                state: v["state"].as_str().expect("state").to_string(),
                members: v["members"]
                    .as_array()
                    .expect("members")
                    .iter()
                    .map(|m| m.as_str().expect("member").to_string())
                    .collect(),
                command: v["command"].as_str().expect("command").to_string(),
                log: Vec::new(),
            });
        } else {
            reports.last_mut().expect("a status line first").log.push((
                v["kind"].as_str().expect("kind").to_string(),
                v["text"].as_str().expect("text").to_string(),
            ));
        }
    }
    reports
}

/// Runs `talk` (the websocat side) while the browser runs; fails early with the browser's
/// output if the browser ends first. Returns the browser's reports.
async fn with_browser(
    browser: &mut tokio::task::JoinHandle<std::io::Result<Output>>,
    guard: &mut GroupGuard,
    talk: impl std::future::Future<Output = ()>,
) -> Vec<PageReport> {
    let describe = |output: &Output| {
        format!(
            "browser exit {}\n--- stdout\n{}--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    tokio::select! {
        () = talk => {}
        done = &mut *browser => {
            let output = done.expect("browser task").expect("browser run");
            panic!("the browser ended before the websocat side was done:\n{}", describe(&output));
        }
    }
    let output = (&mut *browser)
        .await
        .expect("browser task")
        .expect("browser run");
    guard.armed = false;
    assert!(output.status.success(), "{}", describe(&output));
    parse_reports(&String::from_utf8_lossy(&output.stdout))
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("screenshot {} missing: {e}", path.display()));
    assert!(
        bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG screenshot",
        path.display()
    );
}

fn entries(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, t)| (k.to_string(), t.to_string()))
        .collect()
}

#[tokio::test]
async fn browser_chat_page_over_https_talks_with_websocat() {
    let server = start_tls(None).await;
    let port = server.addr.port();
    let ws_url = format!("wss://localhost:{port}/");
    let page_url = format!("https://localhost:{port}/?uid=web&channel=web-room&autojoin=1");
    let shot = artifacts_dir().join("chat.png");
    let _ = std::fs::remove_file(&shot);

    let mut cli = Websocat::spawn(
        "cli",
        &[
            "-k",
            "--binary-prefix",
            "B:",
            "--protocol",
            "mles-websocket",
            &ws_url,
        ],
    );
    cli.send_line(r#"{"uid":"cli","channel":"web-room"}"#).await;
    cli.send_line("early line from websocat").await;
    wait_for_history(&server, "web-room", 2).await;

    let shot_arg = shot.to_string_lossy().into_owned();
    let (mut browser, mut guard) = spawn_browser(
        &[
            "--goto",
            &page_url,
            "--wait-status",
            "connected",
            "--wait-log",
            "early line from websocat",
            "--send",
            "hello from chromium",
            "--wait-log",
            "cli: reply from websocat",
            "--wait-log",
            "[binary 6 bytes]",
            "--screenshot",
            &shot_arg,
            "--print",
        ],
        &[],
    );
    let reports = with_browser(&mut browser, &mut guard, async {
        // The page's message reaches websocat as the page's JSON format...
        cli.expect_line(r#"{"uid":"web","message":"hello from chromium"}"#)
            .await;
        // ...and what websocat sends shows up on the page.
        cli.send_line(r#"{"uid":"cli","message":"reply from websocat"}"#)
            .await;
        cli.send_line("B:12345").await;
    })
    .await;

    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(report.state, "connected");
    assert_eq!(report.status, "connected to #web-room as web");
    assert_eq!(
        report.log,
        entries(&[
            ("system", "You joined #web-room as web"),
            ("join", "cli joined"),
            ("raw", "early line from websocat"),
            ("mine", "web: hello from chromium"),
            ("message", "cli: reply from websocat"),
            // "12345" and the newline websocat keeps in each frame it sends.
            ("binary", "[binary 6 bytes]"),
        ])
    );
    assert_eq!(report.members, ["cli", "web (you)"]);
    assert_png(&shot);
    cli.expect_quiet(Duration::from_millis(200)).await;
    let (status, stderr) = cli.finish().await;
    assert!(status.success(), "websocat failed: {status}; {stderr}");

    // The footer's command works as printed (against the self-signed certificate, so
    // with -k): run it, type the join line it suggests, get the channel's history.
    assert_eq!(
        report.command,
        format!("websocat -k --protocol mles-websocket {ws_url}")
    );
    let args: Vec<&str> = report.command.split_whitespace().skip(1).collect();
    let mut footer = Websocat::spawn("footer", &args);
    footer
        .send_line(r#"{"uid":"me","channel":"web-room"}"#)
        .await;
    footer
        .expect_line(r#"{"uid":"cli","channel":"web-room"}"#)
        .await;
    footer.expect_line("early line from websocat").await;
    let (status, stderr) = footer.finish().await;
    assert!(
        status.success(),
        "the footer's websocat failed: {status}; {stderr}"
    );
    server.stop().await;
}

#[tokio::test]
async fn browser_chat_page_shows_refusals_and_signs_in_with_a_shared_key() {
    let key = "correct horse ✓";
    let server = start_tls(Some(key)).await;
    let port = server.addr.port();
    let ws_url = format!("wss://localhost:{port}/");
    let shot = artifacts_dir().join("chat-auth.png");
    let _ = std::fs::remove_file(&shot);

    let mut cli = Websocat::spawn("cli", &["-k", "--protocol", "mles-websocket", &ws_url]);
    let auth = independent_auth("cli", "keyed", key);
    cli.send_line(&format!(
        r#"{{"uid":"cli","channel":"keyed","auth":"{auth}"}}"#
    ))
    .await;
    wait_for_history(&server, "keyed", 1).await;

    let shot_arg = shot.to_string_lossy().into_owned();
    let refused_shot = artifacts_dir().join("chat-refused.png");
    let _ = std::fs::remove_file(&refused_shot);
    let refused_arg = refused_shot.to_string_lossy().into_owned();
    let page_url = format!("https://localhost:{port}/");
    let (mut browser, mut guard) = spawn_browser(
        &[
            "--goto",
            &page_url,
            "--fill",
            "#uid",
            "web",
            "--fill",
            "#channel",
            "keyed",
            // Without the key the server refuses the join; the page says why.
            "--click",
            "#join",
            "--wait-status",
            "refused (1008: authentication failed)",
            "--screenshot",
            &refused_arg,
            "--print",
            "--fill-env",
            "#key",
            "MLES_TEST_KEY",
            "--click",
            "#join",
            "--wait-status",
            "connected to #keyed as web",
            "--wait-log",
            "cli joined",
            "--send",
            "signed in",
            "--wait-log",
            "cli: welcome",
            "--screenshot",
            &shot_arg,
            "--print",
        ],
        &[("MLES_TEST_KEY", key)],
    );
    let reports = with_browser(&mut browser, &mut guard, async {
        cli.expect_line(r#"{"uid":"web","message":"signed in"}"#)
            .await;
        cli.send_line(r#"{"uid":"cli","message":"welcome"}"#).await;
    })
    .await;

    assert_eq!(reports.len(), 2);
    // The refused join: the page says why and never claims to have joined.
    assert_eq!(reports[0].state, "closed");
    assert_eq!(
        reports[0].log,
        entries(&[("error", "Connection refused (1008: authentication failed)")])
    );
    assert!(reports[0].members.is_empty(), "{:?}", reports[0].members);
    let report = &reports[1];
    assert_eq!(report.state, "connected");
    assert_eq!(report.status, "connected to #keyed as web");
    assert_eq!(
        report.log,
        entries(&[
            ("system", "You joined #keyed as web"),
            ("join", "cli joined"),
            ("mine", "web: signed in"),
            ("message", "cli: welcome"),
        ])
    );
    assert_eq!(report.members, ["cli", "web (you)"]);
    assert_png(&refused_shot);
    assert_png(&shot);

    // A late joiner sees the page's join frame in history, without its auth token.
    let mut late = Websocat::spawn("late", &["-k", "--protocol", "mles-websocket", &ws_url]);
    let late_auth = independent_auth("late", "keyed", key);
    late.send_line(&format!(
        r#"{{"uid":"late","channel":"keyed","auth":"{late_auth}"}}"#
    ))
    .await;
    late.expect_line(&join_frame("cli", "keyed")).await;
    // The page asks for presence notices and position marks; the flags stay in its join
    // frame.
    late.expect_line(r#"{"uid":"web","channel":"keyed","presence":true,"positions":true}"#)
        .await;
    late.expect_line(r#"{"uid":"web","message":"signed in"}"#)
        .await;
    late.expect_line(r#"{"uid":"cli","message":"welcome"}"#)
        .await;
    late.expect_quiet(Duration::from_millis(200)).await;
    late.finish().await;
    let (status, stderr) = cli.finish().await;
    assert!(status.success(), "websocat failed: {status}; {stderr}");
    server.stop().await;
}

#[tokio::test]
async fn browser_chat_page_lists_members_once_and_follows_presence() {
    let server = start_tls(None).await;
    let port = server.addr.port();
    let ws_url = format!("wss://localhost:{port}/");
    let args = ["-k", "--protocol", "mles-websocket", ws_url.as_str()];
    let alice_join = r#"{"uid":"alice","channel":"crowd"}"#;
    let has = |uid: &'static str| {
        let shared = server.shared.clone();
        move || {
            shared
                .hub
                .channel("crowd")
                .is_some_and(|c| c.has_member(uid))
        }
    };

    // alice joins, leaves and comes back: the server keeps only her latest join frame.
    let mut alice = Websocat::spawn("alice", &args);
    alice.send_line(alice_join).await;
    let present = has("alice");
    wait_until("alice joined", WAIT, async || present()).await;
    alice.finish().await;
    wait_until("alice gone", WAIT, async || !present()).await;
    let mut alice = Websocat::spawn("alice again", &args);
    alice.send_line(alice_join).await;
    wait_until("alice back", WAIT, async || present()).await;
    wait_for_history(&server, "crowd", 1).await;

    let shot = artifacts_dir().join("chat-members.png");
    let _ = std::fs::remove_file(&shot);
    let shot_arg = shot.to_string_lossy().into_owned();
    let page_url = format!("https://localhost:{port}/?uid=web&channel=crowd&autojoin=1");
    let (mut browser, mut guard) = spawn_browser(
        &[
            "--goto",
            &page_url,
            "--wait-status",
            "connected",
            "--wait-member",
            "alice",
            // bob comes while the page watches: a presence notice puts him on the list...
            "--wait-member",
            "bob",
            "--send",
            "hi bob",
            // ...and one takes him off when he goes.
            "--wait-no-member",
            "bob",
            "--wait-log",
            "bob left",
            "--screenshot",
            &shot_arg,
            "--print",
        ],
        &[],
    );
    let reports = with_browser(&mut browser, &mut guard, async {
        let web = has("web");
        wait_until("the page joined", PAGE_JOIN_WAIT, async || web()).await;
        let mut bob = Websocat::spawn("bob", &args);
        bob.send_line(r#"{"uid":"bob","channel":"crowd"}"#).await;
        bob.expect_line(alice_join).await;
        bob.expect_line(r#"{"uid":"web","channel":"crowd","presence":true,"positions":true}"#)
            .await;
        bob.expect_line(r#"{"uid":"web","message":"hi bob"}"#).await;
        let (status, stderr) = bob.finish().await;
        assert!(status.success(), "websocat failed: {status}; {stderr}");
    })
    .await;

    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(report.status, "connected to #crowd as web");
    assert_eq!(
        report.log,
        entries(&[
            ("system", "You joined #crowd as web"),
            // Once in history (the server keeps a uid's latest join), once on the page.
            ("join", "alice joined"),
            ("join", "bob joined"),
            ("mine", "web: hi bob"),
            ("leave", "bob left"),
        ])
    );
    assert_eq!(report.members, ["alice", "web (you)"]);
    assert_png(&shot);
    let (status, stderr) = alice.finish().await;
    assert!(status.success(), "websocat failed: {status}; {stderr}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Reconnecting and resuming

/// A TCP relay between the browser and the server that the test can cut, as a phone loses
/// its network: the page reaches the server only through it, while the test's websocat
/// clients talk to the server directly. Closed, it accepts connections and drops them at
/// once (the browser sees its attempt fail), and counts them.
struct Relay {
    addr: SocketAddr,
    state: Arc<Mutex<RelayState>>,
    acceptor: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct RelayState {
    closed: bool,
    /// Connections dropped because the relay was closed.
    refused: usize,
    /// The tasks relaying open connections; aborting one closes both of its sockets.
    links: Vec<tokio::task::AbortHandle>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay binds");
        let addr = listener.local_addr().expect("relay address");
        let state = Arc::new(Mutex::new(RelayState::default()));
        let shared = state.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                // Decided under the lock, so a cut never misses a link being set up.
                let mut state = shared.lock().unwrap();
                if state.closed {
                    state.refused += 1;
                    continue; // `client` is dropped: closed at once
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                state.links.retain(|l| !l.is_finished());
                state.links.push(link.abort_handle());
            }
        });
        Relay {
            addr,
            state,
            acceptor,
        }
    }

    /// New connections are dropped; open ones carry on.
    fn close_to_new(&self) {
        self.state.lock().unwrap().closed = true;
    }

    /// Every open connection is cut (no close frame, just the TCP connection gone) and new
    /// ones are dropped.
    fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.closed = true;
        for link in state.links.drain(..) {
            link.abort();
        }
    }

    fn reopen(&self) {
        self.state.lock().unwrap().closed = false;
    }

    fn refused(&self) -> usize {
        self.state.lock().unwrap().refused
    }

    /// Waits until a connection attempt came in (and was dropped) after `before` did.
    async fn wait_for_attempt(&self, before: usize) {
        wait_until("the page tried to reconnect", WAIT, async || {
            self.refused() > before
        })
        .await;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

/// A TLS server for the page, optionally on a given port (a restart), with a cache and a key.
async fn start_page_server(
    port: Option<u16>,
    cache: Option<&Path>,
    key: Option<&str>,
) -> TestServer {
    let cache = cache.map(Path::to_path_buf);
    let key = key.map(str::to_string);
    start_with(move |c| {
        c.tls = TlsConfig::SelfSigned;
        c.cache = cache;
        c.key = key;
        if let Some(port) = port {
            c.listen = SocketAddr::from(([127, 0, 0, 1], port));
        }
    })
    .await
}

/// Waits until `channel`'s history holds the text frame `text`.
async fn wait_for_stored(server: &TestServer, channel: &str, text: &str) {
    wait_until(&format!("{text:?} stored in {channel}"), WAIT, async || {
        server
            .shared
            .hub
            .channel(channel)
            .is_some_and(|c| c.history().iter().any(|e| e.frame.as_text() == Some(text)))
    })
    .await;
}

/// Waits until `server` no longer (`false`) or again (`true`) has `uid` in `channel`.
async fn wait_for_member(server: &TestServer, channel: &str, uid: &str, present: bool) {
    let what = format!(
        "{uid} {} {channel}",
        if present { "in" } else { "gone from" }
    );
    wait_until(&what, WAIT, async || {
        server
            .shared
            .hub
            .channel(channel)
            .is_some_and(|c| c.has_member(uid))
            == present
    })
    .await;
}

impl Websocat {
    /// Reads lines (the history a fresh join replays) until `want`; returns what came before.
    async fn skip_until(&mut self, want: &str) -> Vec<String> {
        let mut before = Vec::new();
        for _ in 0..1000 {
            let line = self.next_line().await;
            if line == want {
                return before;
            }
            before.push(line);
        }
        panic!("{}: no {want:?} in 1000 lines: {before:?}", self.name);
    }
}

/// The chat message `text` from `uid` as the page sends it.
fn chat(uid: &str, text: &str) -> String {
    serde_json::json!({"uid": uid, "message": text}).to_string()
}

/// A metric's value in `text` (the Prometheus exposition), 0 when it is absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

const RECOVERED: &str = r#"mles_resumes_total{result="recovered"}"#;
const NOT_RECOVERED: &str = r#"mles_resumes_total{result="not_recovered"}"#;

#[tokio::test]
async fn browser_chat_page_reconnects_by_itself_and_resumes_without_duplicates() {
    let cache = tempfile::tempdir().expect("cache dir");
    let server = start_page_server(None, Some(cache.path()), None).await;
    let port = server.addr.port();
    let relay = Relay::start(server.addr).await;
    let ws_url = format!("wss://localhost:{port}/");
    let args = ["-k", "--protocol", "mles-websocket", ws_url.as_str()];
    let room = "resume-room";
    let cli_join = r#"{"uid":"cli","channel":"resume-room"}"#;
    let page_url = format!(
        "https://localhost:{}/?uid=web&channel={room}&autojoin=1",
        relay.addr.port()
    );
    let shot = artifacts_dir().join("chat-resumed.png");
    let _ = std::fs::remove_file(&shot);
    let shot_arg = shot.to_string_lossy().into_owned();
    let away = artifacts_dir().join("chat-reconnecting.png");
    let _ = std::fs::remove_file(&away);
    let away_arg = away.to_string_lossy().into_owned();

    let mut cli = Websocat::spawn("cli", &args);
    cli.send_line(cli_join).await;
    cli.send_line(&chat("cli", "one")).await;
    wait_for_history(&server, room, 2).await;

    let (mut browser, mut guard) = spawn_browser(
        &[
            "--goto",
            &page_url,
            "--wait-state",
            "connected",
            "--wait-log",
            "cli: one",
            "--send",
            "two",
            // The relay cuts the connection; the page notices and retries by itself...
            "--wait-state",
            "reconnecting",
            "--screenshot",
            &away_arg,
            // ...and once it gets through, shows what it missed, and carries on.
            "--wait-log",
            "cli: four",
            "--wait-state",
            "connected",
            "--send",
            "five",
            // The server shuts down gracefully and comes back (with its cache).
            "--wait-state",
            "reconnecting",
            "--wait-log",
            "cli: seven",
            "--wait-state",
            "connected",
            "--send",
            "eight",
            "--wait-log",
            "cli: nine",
            "--screenshot",
            &shot_arg,
            "--print",
            // Leaving on purpose is final.
            "--click",
            "#join",
            "--wait-state",
            "closed",
            "--print",
        ],
        &[],
    );
    let mut metrics_before_restart = String::new();
    let mut restarted = None;
    let reports = with_browser(&mut browser, &mut guard, async {
        cli.expect_line(&chat("web", "two")).await;

        // The network goes away: the page's connection is cut, and while it is away (its
        // attempts dropped by the relay) two messages are sent.
        let attempts = relay.refused();
        relay.cut();
        wait_for_member(&server, room, "web", false).await;
        cli.send_line(&chat("cli", "three")).await;
        cli.send_line(&chat("cli", "four")).await;
        wait_for_stored(&server, room, &(chat("cli", "four") + "\n")).await;
        relay.wait_for_attempt(attempts).await;
        relay.reopen();
        // The page is back; its next message is the first thing websocat gets since "two".
        cli.expect_line(&chat("web", "five")).await;
        wait_for_member(&server, room, "web", true).await;
        metrics_before_restart = server.shared.metrics.render();

        // A graceful restart on the same port with the same cache. The page's connection
        // stays up through the relay until the server closes it (1001); its attempts are
        // dropped until the new server has two messages the page has not seen.
        let attempts = relay.refused();
        relay.close_to_new();
        server.stop().await;
        cli.finish().await;
        let server = start_page_server(Some(port), Some(cache.path()), None).await;
        let mut cli = Websocat::spawn("cli again", &args);
        cli.send_line(cli_join).await;
        cli.send_line(&chat("cli", "six")).await;
        cli.send_line(&chat("cli", "seven")).await;
        wait_for_stored(&server, room, &(chat("cli", "seven") + "\n")).await;
        relay.wait_for_attempt(attempts).await;
        relay.reopen();
        // websocat first gets the channel's history (restored from the cache).
        let history = cli.skip_until(&chat("web", "eight")).await;
        assert!(history.contains(&chat("web", "five")), "{history:?}");
        cli.send_line(&chat("cli", "nine")).await;
        restarted = Some((server, cli));
    })
    .await;

    assert_eq!(reports.len(), 2);
    let report = &reports[0];
    assert_eq!(report.state, "connected");
    assert_eq!(report.status, "connected to #resume-room as web");
    // Every message once, in order; the marks and the resume answers never show; the
    // page's own "two" and "five", which each resume handed back, are not shown again.
    assert_eq!(
        report.log,
        entries(&[
            ("system", "You joined #resume-room as web"),
            ("join", "cli joined"),
            ("message", "cli: one"),
            ("mine", "web: two"),
            (
                "error",
                "Connection interrupted: connection lost (1006); reconnecting…"
            ),
            (
                "system",
                "Reconnected to #resume-room; resumed where you left off"
            ),
            ("message", "cli: three"),
            ("message", "cli: four"),
            ("mine", "web: five"),
            (
                "error",
                "Connection interrupted: server going away (1001: server shutting down); \
                 reconnecting…"
            ),
            (
                "system",
                "Reconnected to #resume-room; resumed where you left off"
            ),
            ("message", "cli: six"),
            ("message", "cli: seven"),
            ("mine", "web: eight"),
            ("message", "cli: nine"),
        ])
    );
    assert_eq!(report.members, ["cli", "web (you)"]);
    assert_png(&shot);
    assert_png(&away);
    let left = &reports[1];
    assert_eq!(left.status, "closed (you left)");
    assert_eq!(
        left.log.last(),
        Some(&(
            "system".to_string(),
            "Connection closed (you left)".to_string()
        ))
    );
    assert!(left.members.is_empty(), "{:?}", left.members);

    // Each server counted the page's resume as recovered.
    let (server, cli) = restarted.expect("the talk finished");
    wait_for_member(&server, room, "web", false).await;
    let after_restart = server.shared.metrics.render();
    for metrics in [&metrics_before_restart, &after_restart] {
        assert_eq!(metric(metrics, RECOVERED), 1.0, "{metrics}");
        assert_eq!(metric(metrics, NOT_RECOVERED), 0.0, "{metrics}");
    }
    cli.finish().await;
    server.stop().await;
}

#[tokio::test]
async fn browser_chat_page_reloads_the_history_when_it_cannot_resume_and_stops_at_a_refusal() {
    let server = start_page_server(None, None, None).await;
    let port = server.addr.port();
    let relay = Relay::start(server.addr).await;
    let ws_url = format!("wss://localhost:{port}/");
    let args = ["-k", "--protocol", "mles-websocket", ws_url.as_str()];
    let room = "lost-room";
    let cli_join = r#"{"uid":"cli","channel":"lost-room"}"#;
    let page_url = format!(
        "https://localhost:{}/?uid=web&channel={room}&autojoin=1",
        relay.addr.port()
    );

    let mut cli = Websocat::spawn("cli", &args);
    cli.send_line(cli_join).await;
    cli.send_line(&chat("cli", "one")).await;
    wait_for_history(&server, room, 2).await;

    let (mut browser, mut guard) = spawn_browser(
        &[
            "--goto",
            &page_url,
            "--wait-state",
            "connected",
            "--wait-log",
            "cli: one",
            "--send",
            "two",
            // The server restarts without a cache: the page cannot resume.
            "--wait-state",
            "reconnecting",
            "--wait-log",
            "cli: after the restart",
            "--wait-state",
            "connected",
            "--print",
            "--send",
            "noted",
            // The server restarts with a key the page does not have: a refusal, final.
            "--wait-state",
            "reconnecting",
            "--wait-state",
            "closed",
            "--print",
        ],
        &[],
    );
    let mut refusing = None;
    let reports = with_browser(&mut browser, &mut guard, async {
        cli.expect_line(&chat("web", "two")).await;

        let attempts = relay.refused();
        relay.close_to_new();
        server.stop().await;
        cli.finish().await;
        let server = start_page_server(Some(port), None, None).await;
        let mut cli = Websocat::spawn("cli again", &args);
        cli.send_line(cli_join).await;
        cli.send_line(&chat("cli", "after the restart")).await;
        wait_for_history(&server, room, 2).await;
        relay.wait_for_attempt(attempts).await;
        relay.reopen();
        cli.expect_line(&chat("web", "noted")).await;
        let metrics = server.shared.metrics.render();
        assert_eq!(metric(&metrics, NOT_RECOVERED), 1.0, "{metrics}");
        assert_eq!(metric(&metrics, RECOVERED), 0.0, "{metrics}");

        let attempts = relay.refused();
        relay.close_to_new();
        server.stop().await;
        cli.finish().await;
        let server = start_page_server(Some(port), None, Some("a key the page lacks")).await;
        relay.wait_for_attempt(attempts).await;
        relay.reopen();
        refusing = Some(server);
    })
    .await;

    assert_eq!(reports.len(), 2);
    // Not resumed: the log starts afresh with the history, so nothing shows twice (the
    // page's own earlier lines are gone with the server's memory of them).
    let report = &reports[0];
    assert_eq!(report.status, "connected to #lost-room as web");
    assert_eq!(
        report.log,
        entries(&[
            (
                "system",
                "Reconnected to #lost-room; could not resume, so the history was reloaded"
            ),
            ("join", "cli joined"),
            ("message", "cli: after the restart"),
        ])
    );
    assert_eq!(report.members, ["cli", "web (you)"]);

    // Refused while reconnecting: the page says why and stops (a closed page has no
    // reconnect pending: only a drop of a working session schedules one).
    let report = &reports[1];
    assert_eq!(report.state, "closed");
    assert_eq!(report.status, "refused (1008: authentication failed)");
    assert_eq!(
        report.log[3..],
        entries(&[
            ("mine", "web: noted"),
            (
                "error",
                "Connection interrupted: server going away (1001: server shutting down); \
                 reconnecting…"
            ),
            ("error", "Connection refused (1008: authentication failed)"),
        ])[..]
    );
    assert!(report.members.is_empty(), "{:?}", report.members);
    refusing.expect("the talk finished").stop().await;
}
