//! Test harness: a real server on an ephemeral loopback port, and a WebSocket client that
//! talks to it as Mles clients do. Every receive is bounded by a timeout. Tests wait for
//! events with [`wait_until`] (never a fixed sleep), read many frames with [`collect`], and
//! speak HTTP through [`http_client`].
#![allow(dead_code)]

pub mod http_client;
pub mod nats_cluster;
pub mod resume;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use mles::config::Config;
use mles::server::{Server, Shared};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// The shipped default wwwroot.
pub fn static_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("static")
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    pub handle: Option<JoinHandle<Result<(), mles::Error>>>,
}

impl TestServer {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(WAIT, handle)
                .await
                .expect("server stops in time")
                .expect("server task")
                .expect("server run ok");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// A plain server with default settings, serving `static/` for localhost.
pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

/// A plain server with settings changed by `tweak`.
pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config::local(static_root());
    tweak(&mut config);
    start_config(config).await
}

pub async fn start_config(config: Config) -> TestServer {
    let server = Server::bind(config).await.expect("server binds");
    let addr = server.local_addr();
    let shared = server.shared();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestServer {
        addr,
        shared,
        stop: Some(stop),
        handle: Some(handle),
    }
}

/// A server `id` on loopback `port` that links to the servers on `peers` (with a one-second
/// grace period) and proves `peer_key`, with `more` settings.
pub async fn linked_server(
    id: &str,
    port: u16,
    peers: &[u16],
    peer_key: &str,
    more: impl FnOnce(&mut Config),
) -> TestServer {
    let id = id.to_string();
    let urls: Vec<_> = peers
        .iter()
        .map(|p| mles::config::parse_peer_url(&format!("ws://127.0.0.1:{p}/")).unwrap())
        .collect();
    let peer_key = mles::protocol::PeerKey::new(peer_key);
    start_with(move |c| {
        c.listen = SocketAddr::from(([127, 0, 0, 1], port));
        c.peer_key = Some(peer_key);
        c.server_id = id;
        c.peers.urls = urls;
        c.peers.grace = Duration::from_secs(1);
        more(c);
    })
    .await
}

/// Opens a WebSocket offering `protocols` (None: no Sec-WebSocket-Protocol header).
pub async fn connect_with(
    addr: SocketAddr,
    protocols: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{addr}/").into_client_request().unwrap();
    if let Some(p) = protocols {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    let (ws, _response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")?;
    Ok(ws)
}

/// Opens a WebSocket offering the Mles subprotocol.
pub async fn connect(addr: SocketAddr) -> Ws {
    connect_with(addr, Some("mles-websocket"))
        .await
        .expect("upgrade accepted")
}

/// The JSON join frame for `uid` on `channel`.
pub fn join_frame(uid: &str, channel: &str) -> String {
    serde_json::json!({"uid": uid, "channel": channel}).to_string()
}

/// Connects and joins `channel` as `uid`.
pub async fn join(addr: SocketAddr, uid: &str, channel: &str) -> Ws {
    let mut ws = connect(addr).await;
    send_text(&mut ws, &join_frame(uid, channel)).await;
    ws
}

/// Joins like [`join`] and waits until `server` has taken the join, so that whoever joins
/// next finds this member's join frame in the history (the server reads each connection's
/// join frame concurrently, so two joins sent one after the other may land either way).
pub async fn join_now(server: &TestServer, uid: &str, channel: &str) -> Ws {
    let ws = join(server.addr, uid, channel).await;
    let shared = server.shared.clone();
    wait_until("the join taken", WAIT, async || {
        shared
            .hub
            .channel(channel)
            .is_some_and(|c| c.has_member(uid))
    })
    .await;
    ws
}

pub async fn send_text<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    tokio::time::timeout(WAIT, ws.send(Message::text(text)))
        .await
        .expect("send in time")
        .expect("send ok");
}

pub async fn send_binary<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    data: &[u8],
) {
    tokio::time::timeout(WAIT, ws.send(Message::binary(data.to_vec())))
        .await
        .expect("send in time")
        .expect("send ok");
}

/// Next data or close frame, skipping pings and pongs; panics after [`WAIT`].
pub async fn recv<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Message {
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame arrives in time");
        match next {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(msg)) => return msg,
            Some(Err(e)) => panic!("receive error: {e}"),
            None => panic!("connection ended without a close frame"),
        }
    }
}

/// Next frame as text; panics on anything else.
pub async fn recv_text<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> String {
    match recv(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads `n` text frames.
pub async fn recv_texts<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    n: usize,
) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(recv_text(ws).await);
    }
    out
}

/// Waits for the server's close frame and returns its code and reason.
pub async fn expect_close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> (u16, String) {
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close arrives in time");
        match next {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("expected close, got {other:?}"),
            Some(Err(e)) => panic!("expected close frame, got error {e}"),
            None => panic!("connection ended without a close frame"),
        }
    }
}

/// Asserts that no data frame arrives within `quiet`.
pub async fn expect_nothing<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    quiet: Duration,
) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// How long [`collect`] keeps reading after it has what it wanted: duplicates (or frames
/// that should not come at all) would arrive within it. A quiet time is the behaviour under
/// test here, not a wait for something.
pub const DUPLICATE_QUIET: Duration = Duration::from_millis(700);

/// Reads data frames until `want` have arrived (join frames, which start with '{', are
/// skipped), failing if `limit` passes or the connection closes first, then reads on for
/// [`DUPLICATE_QUIET`] (or until the server closes the connection) so that duplicates
/// would show. Returns the data frames in arrival order.
pub async fn collect<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    want: usize,
    limit: Duration,
) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < want {
        match next_text_before(ws, deadline).await {
            Next::Text(text) if text.starts_with('{') => {}
            Next::Text(text) => got.push(text),
            Next::Quiet => panic!("only {} of {want} frames arrived: {got:?}", got.len()),
            Next::Ended(how) => panic!("{how} after {} of {want} frames: {got:?}", got.len()),
        }
    }
    let quiet = tokio::time::Instant::now() + DUPLICATE_QUIET;
    while let Next::Text(text) = next_text_before(ws, quiet).await {
        if !text.starts_with('{') {
            got.push(text);
        }
    }
    got
}

enum Next {
    Text(String),
    /// The deadline passed.
    Quiet,
    /// A close frame, the end of the stream, or an error.
    Ended(String),
}

/// The next text frame before `deadline` (pings skipped); any other data frame panics.
async fn next_text_before<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    deadline: tokio::time::Instant,
) -> Next {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Next::Quiet,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(text)))) => return Next::Text(text.to_string()),
            Ok(Some(Ok(Message::Close(frame)))) => return Next::Ended(format!("closed {frame:?}")),
            Ok(None) => return Next::Ended("connection ended".into()),
            Ok(Some(Err(e))) => return Next::Ended(format!("receive error {e}")),
            Ok(Some(Ok(other))) => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// How often [`wait_until`] checks its condition.
pub const STEP: Duration = Duration::from_millis(20);

/// Checks `cond` every [`STEP`] until it holds, failing the test with `what` once `limit`
/// has passed. The one way tests wait for something to happen: the condition is the event
/// itself (a counter, a member, a file's content, a port answering), never a fixed sleep.
/// An async condition is bounded by the same deadline.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, cond()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(STEP).await;
    }
}

/// The real `mles` binary as a child process, killed when dropped.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that is free now, for a server the test starts. Ports come from below
/// the kernel's ephemeral range (32768 and up), so that ports the kernel hands out meanwhile
/// (to listeners on port 0, to outgoing connections) cannot take one before its server
/// binds it or while it restarts. Within a test binary they are handed out in turn from a
/// random start, so parallel tests never get the same one.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    const FIRST: u64 = 20_000;
    const COUNT: u64 = 12_000;
    static START: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        // RandomState is seeded randomly per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish() % COUNT
    });
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range");
}

/// Starts the binary plain on 127.0.0.1:`port` with the shipped wwwroot and `args`, and
/// waits until it accepts connections.
pub async fn spawn_binary(port: u16, args: &[&std::ffi::OsStr]) -> Process {
    spawn_binary_in(port, &static_root(), args).await
}

/// [`spawn_binary`] serving `wwwroot`.
pub async fn spawn_binary_in(
    port: u16,
    wwwroot: &std::path::Path,
    args: &[&std::ffi::OsStr],
) -> Process {
    let process = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_mles"))
            .args([
                "--tls",
                "off",
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .arg("--wwwroot")
            .arg(wwwroot)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mles binary starts"),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until("the server to listen", WAIT, async || {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
    process
}

impl Process {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Resident memory now and at its peak, from /proc.
    pub fn memory(&self) -> Memory {
        Memory::of(self.pid())
    }

    /// Sends SIGTERM (a graceful shutdown) and waits, bounded, for a clean exit.
    pub async fn terminate(&mut self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
        let child = &mut self.0;
        let mut exit = None;
        wait_until("the server to exit after SIGTERM", WAIT, async || {
            exit = child.try_wait().expect("wait for the server");
            exit.is_some()
        })
        .await;
        let exit = exit.expect("exited");
        assert!(exit.success(), "exit status after SIGTERM: {exit:?}");
    }
}

/// A process's resident memory in bytes, from `/proc/<pid>/status`: `VmRSS` now and
/// `VmHWM`, the peak since it started (which catches a spike between two samples).
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
                * 1024
        };
        Memory {
            rss: field("VmRSS:"),
            peak: field("VmHWM:"),
        }
    }
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
