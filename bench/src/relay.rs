//! The minimal relays: the machine's ceiling for the same wire protocol, in both fan-out
//! designs, so that mles is measured against the faster of them.
//!
//! What both do, and nothing more: accept any WebSocket (echoing the `mles-websocket`
//! subprotocol when offered), take the first text frame as `{"uid","channel"}` JSON, and
//! send each later text or binary frame to every other member of that channel. Each member
//! has a writer task that takes everything pending for it (up to [`FETCH_BATCH`] frames per
//! take), `feed`s it into tungstenite's write buffer and flushes once, so one write syscall
//! carries every frame that arrived while the previous write was in flight. The socket
//! settings are mles's: reads of up to [`READ_BUFFER`] bytes (src/connection.rs), writes
//! of up to [`WRITE_BUFFER`] bytes (src/session.rs), TCP_NODELAY, a multi-threaded runtime, optional TLS with a self-signed
//! certificate via tokio-rustls and the ring provider.
//!
//! The two designs ([`Design`]):
//! - **queues**: a bounded queue (tokio mpsc) per member; the publishing connection's
//!   reader clones the frame (a reference-count increment) into each other member's queue
//!   under a read lock.
//! - **ring**: like mles's hub without history, auth, limits or metrics: each channel keeps
//!   one ring of frames; publishing appends once and wakes the waiting members, and each
//!   member's writer copies out what lies past its cursor.
//!
//! Both give a member the same slack as mles's defaults give it ([`SLACK`] frames: history
//! limit 200 plus queue 1024); a member further behind is closed with 1013, as mles does.
//! Deliberately absent: history, auth, rate and size limits, ping/liveness, write
//! timeouts, metrics.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// mles's FETCH_FRAMES (src/session.rs): frames a writer takes per take.
pub const FETCH_BATCH: usize = 256;
/// mles's FETCH_BYTES (src/session.rs): bytes a writer takes per take, written at once.
pub const WRITE_BUFFER: usize = 64 * 1024;
/// mles's SCRATCH (src/connection.rs): bytes read from a socket per read. (mles shares
/// one such buffer per worker thread; tungstenite keeps one per connection, which costs
/// the relays memory, not speed.)
pub const READ_BUFFER: usize = 32 * 1024;
/// mles's default --max-message-size.
const MAX_MESSAGE: usize = 2 * 1024 * 1024;
/// Frames a member may fall behind before it is closed: mles's default ring
/// (--limit 200 + --queue-frames 1024), so a burst meets the same bound in every server.
pub const SLACK: usize = 1224;
/// The close code for a member that fell behind (mles: TRY_AGAIN_LATER).
const TRY_AGAIN_LATER: u16 = 1013;

/// How a relay fans a frame out to a channel's members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Design {
    /// A bounded queue and a writer per member.
    Queues,
    /// One ring per channel and a cursor per member.
    Ring,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + MAX_MESSAGE + 16)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every mutation under these locks is a single push/pop/retain: a panic leaves them
    // consistent, so poisoning carries no information.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves until killed.
pub async fn serve(bind: IpAddr, port: u16, tls: bool, design: Design) -> std::io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(bind, port)).await?;
    let acceptor = if tls { Some(tls_acceptor()?) } else { None };
    let hub = Arc::new(Hub::default());
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let hub = hub.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match acceptor {
                None => session(tcp, hub, design).await,
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        session(tls, hub, design).await;
                    }
                }
            }
        });
    }
}

fn tls_acceptor() -> std::io::Result<TlsAcceptor> {
    let err = |e: String| std::io::Error::other(e);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| err(e.to_string()))?;
    let key =
        PrivateKeyDer::try_from(cert.signing_key.serialize_der()).map_err(|e| err(e.into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| err(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The handshake callback: answers with the Mles subprotocol when the client offers it.
/// (The error type is tungstenite's `Callback` signature, large by design.)
#[allow(clippy::result_large_err)]
fn echo_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if let Some(p) = req.headers().get("sec-websocket-protocol") {
        if p.to_str().is_ok_and(|p| p.contains("mles-websocket")) {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static("mles-websocket"),
            );
        }
    }
    Ok(resp)
}

fn channel_of(join: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(join).ok()?;
    Some(value.get("channel")?.as_str()?.to_string())
}

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

fn too_slow() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(TRY_AGAIN_LATER),
        reason: "too slow".into(),
    }))
}

/// One member of a queues channel: its queue, and whether it was cut off for lagging.
struct QueueMember {
    id: u64,
    queue: mpsc::Sender<Message>,
    cut: Arc<AtomicBool>,
}

#[derive(Default)]
struct QueueChannel {
    members: RwLock<Vec<QueueMember>>,
}

/// A ring channel: frames past every member's cursor, and the signal that wakes writers.
#[derive(Default)]
struct RingChannel {
    ring: Mutex<Ring>,
    /// Sequence number the next frame gets; read without the lock to skip idle polls.
    head: AtomicU64,
    published: Notify,
    members: AtomicU64,
}

#[derive(Default)]
struct Ring {
    /// (publishing member, frame)
    entries: VecDeque<(u64, Message)>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
}

#[derive(Default)]
struct Hub {
    queues: Mutex<HashMap<String, Arc<QueueChannel>>>,
    rings: Mutex<HashMap<String, Arc<RingChannel>>>,
    next_id: AtomicU64,
}

async fn session<S>(stream: S, hub: Arc<Hub>, design: Design)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        echo_subprotocol,
        Some(ws_config()),
    )
    .await
    else {
        return;
    };
    let (sink, mut stream) = ws.split();
    let name = loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => match channel_of(&text) {
                Some(name) => break name,
                None => return,
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return,
        }
    };
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    match design {
        Design::Queues => queues_member(&hub, name, id, sink, stream).await,
        Design::Ring => ring_member(&hub, name, id, sink, stream).await,
    }
}

async fn queues_member<S>(
    hub: &Hub,
    name: String,
    id: u64,
    sink: Sink<S>,
    mut stream: futures::stream::SplitStream<WebSocketStream<S>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (queue, rx) = mpsc::channel(SLACK);
    let cut = Arc::new(AtomicBool::new(false));
    let channel = {
        let mut channels = lock(&hub.queues);
        let channel = channels.entry(name.clone()).or_default().clone();
        channel
            .members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(QueueMember {
                id,
                queue,
                cut: cut.clone(),
            });
        channel
    };
    let writer = tokio::spawn(queue_writer(sink, rx, cut));
    let mut full = Vec::new();
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                {
                    let members = channel.members.read().unwrap_or_else(|e| e.into_inner());
                    for m in members.iter().filter(|m| m.id != id) {
                        if let Err(mpsc::error::TrySendError::Full(_)) =
                            m.queue.try_send(msg.clone())
                        {
                            full.push(m.id);
                        }
                    }
                }
                if !full.is_empty() {
                    // Dropping a lagging member's only sender ends its writer, which then
                    // closes it with 1013.
                    let mut members = channel.members.write().unwrap_or_else(|e| e.into_inner());
                    members.retain(|m| {
                        let lagging = full.contains(&m.id);
                        if lagging {
                            m.cut.store(true, Ordering::Release);
                        }
                        !lagging
                    });
                    full.clear();
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    {
        let mut channels = lock(&hub.queues);
        let mut members = channel.members.write().unwrap_or_else(|e| e.into_inner());
        members.retain(|m| m.id != id);
        if members.is_empty() {
            channels.remove(&name);
        }
    }
    writer.abort();
}

async fn queue_writer<S>(mut sink: Sink<S>, mut rx: mpsc::Receiver<Message>, cut: Arc<AtomicBool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Allocated on the first frame, so an idle member costs nothing here.
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, FETCH_BATCH).await > 0 {
        for msg in batch.drain(..) {
            if sink.feed(msg).await.is_err() {
                return;
            }
        }
        // Everything already queued goes into the same flush.
        while let Ok(msg) = rx.try_recv() {
            if sink.feed(msg).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    if cut.load(Ordering::Acquire) {
        let _ = sink.send(too_slow()).await;
    }
}

async fn ring_member<S>(
    hub: &Hub,
    name: String,
    id: u64,
    sink: Sink<S>,
    mut stream: futures::stream::SplitStream<WebSocketStream<S>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let channel = {
        let mut channels = lock(&hub.rings);
        let channel = channels.entry(name.clone()).or_default().clone();
        channel.members.fetch_add(1, Ordering::Relaxed);
        channel
    };
    // A new member starts at the head: no history.
    let start = {
        let ring = lock(&channel.ring);
        ring.first_seq + ring.entries.len() as u64
    };
    let writer = tokio::spawn(ring_writer(sink, channel.clone(), id, start));
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                {
                    let mut ring = lock(&channel.ring);
                    ring.entries.push_back((id, msg));
                    if ring.entries.len() > SLACK {
                        ring.entries.pop_front();
                        ring.first_seq += 1;
                    }
                    let head = ring.first_seq + ring.entries.len() as u64;
                    channel.head.store(head, Ordering::Release);
                }
                channel.published.notify_waiters();
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    {
        let mut channels = lock(&hub.rings);
        if channel.members.fetch_sub(1, Ordering::Relaxed) == 1 {
            channels.remove(&name);
        }
    }
    writer.abort();
}

async fn ring_writer<S>(mut sink: Sink<S>, channel: Arc<RingChannel>, id: u64, mut cursor: u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut batch = Vec::new();
    loop {
        let mut fed = false;
        loop {
            let lagged = channel.head.load(Ordering::Acquire) > cursor && {
                let ring = lock(&channel.ring);
                let lagged = cursor < ring.first_seq;
                if !lagged {
                    let start = (cursor - ring.first_seq) as usize;
                    for (from, msg) in ring.entries.range(start..).take(FETCH_BATCH) {
                        if *from != id {
                            batch.push(msg.clone());
                        }
                        cursor += 1;
                    }
                }
                lagged
            };
            if lagged {
                let _ = sink.send(too_slow()).await;
                return;
            }
            if batch.is_empty() {
                break;
            }
            for msg in batch.drain(..) {
                if sink.feed(msg).await.is_err() {
                    return;
                }
            }
            fed = true;
        }
        if fed {
            if sink.flush().await.is_err() {
                return;
            }
            continue;
        }
        let notified = channel.published.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if channel.head.load(Ordering::Acquire) > cursor {
            continue;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    /// The value of `const NAME: usize = EXPR;` in mles's source, for EXPR a product of
    /// integers (e.g. `64 * 1024`).
    fn mles_const(source: &str, name: &str) -> Option<usize> {
        let line = source.lines().find(|l| {
            l.trim_start()
                .trim_start_matches("pub ")
                .starts_with(&format!("const {name}: usize ="))
        })?;
        let expr = line.split('=').nth(1)?.trim().trim_end_matches(';');
        expr.split('*')
            .map(|f| f.trim().replace('_', "").parse::<usize>().ok())
            .product()
    }

    /// The relays are only a fair ceiling while they use mles's buffer sizes: when mles
    /// changes them (or renames them), this fails until relay.rs follows.
    #[test]
    fn relay_buffers_are_mles_buffers() {
        for (file, name, ours) in [
            ("connection.rs", "SCRATCH", super::READ_BUFFER),
            ("session.rs", "FETCH_BYTES", super::WRITE_BUFFER),
            ("session.rs", "FETCH_FRAMES", super::FETCH_BATCH),
        ] {
            let path = format!("{}/../src/{file}", env!("CARGO_MANIFEST_DIR"));
            let source = std::fs::read_to_string(&path).expect("mles's source");
            assert_eq!(
                mles_const(&source, name),
                Some(ours),
                "{name} in src/{file} differs from the relay's (bench/src/relay.rs)"
            );
        }
    }
}
