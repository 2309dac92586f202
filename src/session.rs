//! One WebSocket client's life after the upgrade: its join frame under a timeout, then one
//! task that reads its frames into the hub and writes its channel's frames out, pings it
//! when quiet, and closes it with a code that says why.
//!
//! Reading and writing run concurrently inside the one task, so a client that does not
//! read never stops the server from reading it (two peered servers writing to each other
//! cannot deadlock), and a client that does not write never delays its deliveries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use log::{debug, warn};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::hub::{Entry, Member, MemberKind, MsgKey};
use crate::limits::MessageRate;
use crate::logging::{notable, Notable};
use crate::protocol::{self, close, Envelope, EnvelopeKind};
use crate::server::Shared;
use crate::shutdown::Shutdown;

/// Per-connection limits and timers.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub max_message_size: usize,
    pub first_frame_timeout: Duration,
    pub ping_interval: Duration,
    pub missed_pongs: u32,
    pub write_timeout: Duration,
    /// At most this many frames per window from a client.
    pub message_rate: Option<(u32, Duration)>,
    /// Close a client that sent nothing for this long.
    pub idle_timeout: Option<Duration>,
    /// Close a client connection this old.
    pub max_age: Option<Duration>,
}

/// Frames taken from the channel per lock; bounds the time the lock is held.
const FETCH_BATCH: usize = 256;

/// Bytes buffered before tungstenite writes to the socket on its own; the writer flushes
/// explicitly whenever the channel has nothing more for it, so this only caps a burst.
const WRITE_BUFFER: usize = 64 * 1024;

/// Read buffer per socket. Small, because idle connections are the common case and a
/// large frame grows the buffer only while it is being read.
const READ_BUFFER: usize = 2 * 1024;

impl SessionConfig {
    /// The tungstenite limits for a server-side socket.
    pub fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(WRITE_BUFFER)
            .max_write_buffer_size(WRITE_BUFFER + self.max_message_size + 16)
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_message_size))
    }
}

/// How a connection's frames map to the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An Mles client: bare frames.
    Client,
    /// A server of this kind: every frame in an envelope carrying its key.
    PeerEnvelope,
    /// A plain mles v2 server linked as a client: bare frames, de-duplicated by content.
    PeerPlain,
}

/// How a session ended; decides the close frame sent.
#[derive(Debug)]
pub enum End {
    ClientClosed,
    Disconnected,
    Shutdown,
    TooBig,
    SlowConsumer(&'static str),
    Unresponsive,
    BadEnvelope,
    RateLimited,
    ChannelLimit,
    ChannelLifespan,
    Idle,
    MaxAge,
    Error(WsError),
}

impl End {
    fn close_frame(&self) -> Option<(u16, &'static str)> {
        match self {
            End::Shutdown => Some((close::GOING_AWAY, "server shutting down")),
            End::TooBig => Some((close::TOO_BIG, "message too big")),
            End::SlowConsumer(why) => Some((close::TRY_AGAIN_LATER, why)),
            End::Unresponsive => Some((close::POLICY, "no answer to pings")),
            End::BadEnvelope => Some((close::POLICY, "malformed peer envelope")),
            End::RateLimited => Some((close::POLICY, "message rate limit exceeded")),
            End::ChannelLimit => Some((close::POLICY, "channel message limit reached")),
            End::ChannelLifespan => Some((close::POLICY, "channel lifespan over")),
            End::Idle => Some((close::GOING_AWAY, "idle timeout")),
            End::MaxAge => Some((close::GOING_AWAY, "maximum connection age reached")),
            End::ClientClosed | End::Disconnected | End::Error(_) => None,
        }
    }
}

/// Runs one upgraded connection until it ends. `peer` is set when the client is a server
/// of this kind that asked for enveloped frames; `permit` is the connection's place under
/// the connection limits; `client` is the remote address, for the log.
pub async fn run<S>(
    mut ws: WebSocketStream<S>,
    shared: Arc<Shared>,
    mut shutdown: Shutdown,
    peer: bool,
    permit: &crate::server::Permit,
    client: Option<std::net::SocketAddr>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let config = &shared.config.session;
    let join = tokio::select! {
        join = tokio::time::timeout(config.first_frame_timeout, first_frame(&mut ws)) => join,
        _ = shutdown.recv() => {
            send_close(&mut ws, close::GOING_AWAY, "server shutting down").await;
            return;
        }
    };
    let join = match join {
        Err(_elapsed) => Err(Refusal::new("timeout", "join frame timeout")),
        Ok(Ok(Some(join))) => Ok(join),
        Ok(Ok(None)) => return,
        Ok(Err(refusal)) => Err(refusal),
    };
    let join = join.and_then(|join| {
        protocol::verify_auth(&join, shared.config.key.as_deref()).map_err(|e| {
            shared.metrics.auth_failures.inc();
            Refusal::new("auth", e.to_string())
        })?;
        Ok(join)
    });
    let join = match join {
        Ok(join) => join,
        Err(refusal) => {
            notable(
                Notable::JoinRefused,
                refusal.metric,
                &refusal.reason,
                client,
            );
            shared.metrics.bad_first_frame(refusal.metric);
            send_close(&mut ws, refusal.code, &refusal.reason).await;
            return;
        }
    };
    // A peer server opens a link per channel from one address. Once it has proved the
    // shared key those links are not held to the per-address limit; without a key anyone
    // could claim to be a peer, so they are.
    if peer && shared.config.key.is_some() {
        permit.release_ip_place();
    }
    // A backplane with shared history (NATS) brings it into the channel first, so a
    // client joining here gets the cluster's history too. The backplane bounds the wait.
    if !peer {
        tokio::select! {
            _ = shared.hub.ready(&join.channel) => {}
            _ = shutdown.recv() => {
                send_close(&mut ws, close::GOING_AWAY, "server shutting down").await;
                return;
            }
        }
    }
    // A peer link's join is plumbing, not a person: it stays out of history.
    let (mode, joined) = if peer {
        let joined = shared
            .hub
            .join(&join.channel, &join.uid, MemberKind::Peer, None);
        (Mode::PeerEnvelope, joined)
    } else {
        let frame = Message::text(join.history_frame.clone());
        let joined = shared
            .hub
            .join_client(&join.channel, &join.uid, frame, join.presence);
        (Mode::Client, joined)
    };
    let member = match joined {
        Ok(member) => member,
        Err(e) => {
            use crate::hub::JoinError;
            let (metric, code) = match e {
                JoinError::DuplicateUid => ("duplicate_uid", close::POLICY),
                JoinError::ChannelFull => ("channel_full", close::POLICY),
                JoinError::TooManyChannels => ("too_many_channels", close::TRY_AGAIN_LATER),
            };
            shared.metrics.bad_first_frame(metric);
            notable(Notable::JoinRefused, metric, &e.to_string(), client);
            send_close(&mut ws, code, &e.to_string()).await;
            return;
        }
    };
    shared.metrics.joins.inc();
    debug!("{} joined {}", join.uid, join.channel);
    let end = serve_member(ws, &member, &shared, shutdown, mode).await;
    match &end {
        End::SlowConsumer(why) => {
            shared.metrics.slow_consumers.inc();
            notable(Notable::SlowConsumer, "slow_consumer", why, client);
        }
        End::RateLimited | End::ChannelLimit | End::TooBig => {
            let reason = match end {
                End::RateLimited => "message_rate",
                End::ChannelLimit => "channel_messages",
                _ => "message_size",
            };
            let detail = end.close_frame().map_or("", |(_, why)| why);
            notable(Notable::LimitHit, reason, detail, client);
        }
        End::Error(e) => debug!("{} on {}: {e}", join.uid, join.channel),
        _ => debug!("{} on {}: {:?}", join.uid, join.channel, end),
    }
}

/// A join frame refused: close code, reason for the client, label for the metric.
struct Refusal {
    code: u16,
    reason: String,
    metric: &'static str,
}

impl Refusal {
    fn new(metric: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            code: close::POLICY,
            reason: reason.into(),
            metric,
        }
    }
}

/// Reads the join frame. `Ok(None)` when the client went away first.
async fn first_frame<S>(ws: &mut WebSocketStream<S>) -> Result<Option<protocol::Join>, Refusal>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        return match ws.next().await {
            None | Some(Ok(Message::Close(_))) => Ok(None),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(text))) => protocol::parse_join(&text)
                .map(Some)
                .map_err(|e| Refusal::new("malformed", e.to_string())),
            Some(Ok(_)) => Err(Refusal::new(
                "not_text",
                protocol::JoinError::NotText.to_string(),
            )),
            Some(Err(WsError::Capacity(_))) => Err(Refusal {
                code: close::TOO_BIG,
                reason: "message too big".into(),
                metric: "too_big",
            }),
            Some(Err(e)) => {
                debug!("before join: {e}");
                Ok(None)
            }
        };
    }
}

/// Pumps frames between a joined connection and its channel until either side ends,
/// then sends the close frame that says why. Used for clients, for peers that connect to
/// this server, and for this server's own links to peers.
pub async fn serve_member<S>(
    ws: WebSocketStream<S>,
    member: &Member,
    shared: &Shared,
    mut shutdown: Shutdown,
    mode: Mode,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut sink, mut stream) = ws.split();
    let clock = Clock::new();
    let config = &shared.config.session;
    let end = tokio::select! {
        end = read_frames(&mut stream, member, shared, &clock, mode) => end,
        end = write_frames(&mut sink, member, shared, &clock, mode) => end,
        end = watch_liveness(config, &clock) => end,
        end = client_limits(config, member, &clock, mode) => end,
        _ = shutdown.recv() => End::Shutdown,
    };
    if let Some((code, reason)) = end.close_frame() {
        let frame = close_message(code, reason);
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(frame)).await;
    } else if matches!(end, End::ClientClosed) {
        // tungstenite queued the close reply; push it out.
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.flush()).await;
    }
    end
}

/// Ends a client's session at its idle timeout, its maximum age or its channel's end of
/// life, whichever comes first. Peer links have none of these.
async fn client_limits(config: &SessionConfig, member: &Member, clock: &Clock, mode: Mode) -> End {
    if mode != Mode::Client {
        return std::future::pending().await;
    }
    let far = Duration::from_secs(100 * 365 * 24 * 3600);
    let started = tokio::time::Instant::now();
    let age = tokio::time::sleep_until(started + config.max_age.unwrap_or(far));
    let lifespan = tokio::time::sleep_until(
        member
            .channel()
            .end_of_life()
            .map_or(started + far, tokio::time::Instant::from_std),
    );
    let idle = async {
        let Some(limit) = config.idle_timeout else {
            return std::future::pending().await;
        };
        loop {
            let quiet = clock.since_data();
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    };
    tokio::select! {
        _ = age => End::MaxAge,
        _ = lifespan => End::ChannelLifespan,
        _ = idle => End::Idle,
    }
}

/// When the client was last heard from (any frame) and last sent data, in milliseconds
/// since the session began.
struct Clock {
    start: Instant,
    last_heard: AtomicU64,
    last_data: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: Instant::now(),
            last_heard: AtomicU64::new(0),
            last_data: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn since(&self, mark: &AtomicU64) -> Duration {
        let last = Duration::from_millis(mark.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// A data frame arrived `at` (from [`Clock::heard`]).
    fn data(&self, at: u64) {
        self.last_data.store(at, Ordering::Relaxed);
    }

    fn since_data(&self) -> Duration {
        self.since(&self.last_data)
    }

    /// Any frame arrived; returns when, for [`Clock::data`] (one clock read per frame).
    fn heard(&self) -> u64 {
        let now = self.now();
        self.last_heard.store(now, Ordering::Relaxed);
        now
    }

    fn silence(&self) -> Duration {
        self.since(&self.last_heard)
    }
}

async fn read_frames<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    member: &Member,
    shared: &Shared,
    clock: &Clock,
    mode: Mode,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut rate = match (mode, shared.config.session.message_rate) {
        (Mode::Client, Some((max, window))) => Some(MessageRate::new(max, window)),
        _ => None,
    };
    while let Some(frame) = stream.next().await {
        let now = clock.heard();
        match frame {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                clock.data(now);
                shared.metrics.messages_in.inc();
                shared.metrics.bytes_in.inc_by(msg.len() as u64);
                if rate.as_mut().is_some_and(|r| !r.allow()) {
                    shared.metrics.rate_limited.inc();
                    return End::RateLimited;
                }
                match mode {
                    Mode::Client => {
                        if member.publish(msg).is_err() {
                            return End::ChannelLimit;
                        }
                    }
                    Mode::PeerPlain => {
                        member.relay_by_content(msg);
                    }
                    Mode::PeerEnvelope => {
                        let Some((key, live, msg)) = open_envelope(&msg) else {
                            return End::BadEnvelope;
                        };
                        member.relay(key, live, msg);
                    }
                }
                if member.has_pending() {
                    // Frames for this member are waiting: let the writer run before
                    // reading more, so a busy publisher still drains its own queue.
                    tokio::task::yield_now().await;
                }
            }
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Ok(Message::Close(_)) => return End::ClientClosed,
            Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                shared.metrics.oversize_messages.inc();
                debug!("message of {size} bytes over the {max_size} limit");
                return End::TooBig;
            }
            Err(e) => return End::Error(e),
        }
    }
    End::Disconnected
}

/// The key, liveness and frame inside a peer's envelope.
fn open_envelope(msg: &Message) -> Option<(MsgKey, bool, Message)> {
    let Message::Binary(data) = msg else {
        return None;
    };
    let envelope = Envelope::decode(data).ok()?;
    let key = MsgKey {
        origin: Arc::from(envelope.origin),
        seq: envelope.seq,
    };
    let payload = data.slice_ref(envelope.payload);
    let msg = match envelope.kind {
        EnvelopeKind::Binary => Message::Binary(payload),
        // decode checked the text is UTF-8
        EnvelopeKind::Text | EnvelopeKind::Join => Message::Text(payload.try_into().ok()?),
    };
    Some((key, envelope.kind != EnvelopeKind::Join, msg))
}

/// A stored entry as a peer link carries it.
fn seal_envelope(entry: &Entry) -> Message {
    let (kind, payload): (EnvelopeKind, &[u8]) = match &entry.msg {
        Message::Text(t) if entry.live => (EnvelopeKind::Text, t.as_bytes()),
        Message::Text(t) => (EnvelopeKind::Join, t.as_bytes()),
        other => (EnvelopeKind::Binary, other_bytes(other)),
    };
    Message::binary(
        Envelope {
            kind,
            origin: &entry.key.origin,
            seq: entry.key.seq,
            payload,
        }
        .encode(),
    )
}

fn other_bytes(msg: &Message) -> &[u8] {
    match msg {
        Message::Binary(b) => b,
        _ => &[],
    }
}

/// Takes the frames pending for `member` as they go out on a connection of `mode`.
fn fetch_for(
    member: &Member,
    mode: Mode,
    out: &mut Vec<Message>,
    entries: &mut Vec<Entry>,
) -> Result<(), crate::hub::Lagged> {
    match mode {
        Mode::Client => member.fetch(out, FETCH_BATCH),
        Mode::PeerEnvelope => {
            member.fetch_entries(entries, FETCH_BATCH)?;
            out.extend(entries.drain(..).map(|e| seal_envelope(&e)));
            Ok(())
        }
        Mode::PeerPlain => {
            member.fetch_entries(entries, FETCH_BATCH)?;
            // A plain server has no place for other members' join frames.
            out.extend(entries.drain(..).filter(|e| e.live).map(|e| e.msg));
            Ok(())
        }
    }
}

async fn write_frames<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    member: &Member,
    shared: &Shared,
    clock: &Clock,
    mode: Mode,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &shared.config.session;
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut batch = Vec::new();
    let mut entries = Vec::new();
    loop {
        // Feed everything the channel has for us, then flush once: one write syscall
        // carries as many frames as arrived while the last one was in flight.
        let mut fed = false;
        loop {
            if fetch_for(member, mode, &mut batch, &mut entries).is_err() {
                return End::SlowConsumer("too slow: fell behind the channel");
            }
            if batch.is_empty() {
                break;
            }
            let (count, bytes) = (batch.len(), batch.iter().map(Message::len).sum::<usize>());
            // One timer for the whole batch: a timer per frame cost more than the frame.
            let feed_all = async {
                for msg in batch.drain(..) {
                    sink.feed(msg).await?;
                }
                Ok(())
            };
            if let Err(end) = within(config.write_timeout, feed_all).await {
                return end;
            }
            shared.metrics.messages_out.inc_by(count as u64);
            shared.metrics.bytes_out.inc_by(bytes as u64);
            fed = true;
        }
        if fed {
            if let Err(end) = within(config.write_timeout, sink.flush()).await {
                return end;
            }
            continue;
        }
        tokio::select! {
            _ = member.pending() => {}
            _ = ping.tick() => {
                if clock.silence() >= config.ping_interval {
                    let ping = sink.send(Message::Ping(Default::default()));
                    if let Err(end) = within(config.write_timeout, ping).await {
                        return end;
                    }
                }
            }
        }
    }
}

/// Runs a write to the socket; one that stalls for `limit` means the member is too slow.
/// Most writes complete at once, and those start no timer (nor read the clock).
async fn within(
    limit: Duration,
    write: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), End> {
    let mut write = std::pin::pin!(write);
    let result = match futures::poll!(write.as_mut()) {
        std::task::Poll::Ready(result) => Ok(result),
        std::task::Poll::Pending => tokio::time::timeout(limit, write).await,
    };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Error(e)),
        Err(_) => Err(End::SlowConsumer("too slow: write stalled")),
    }
}

/// Ends the session once the client has been silent for `missed_pongs` ping intervals.
async fn watch_liveness(config: &SessionConfig, clock: &Clock) -> End {
    let limit = config.ping_interval * (config.missed_pongs + 1);
    loop {
        let silence = clock.silence();
        if silence >= limit {
            return End::Unresponsive;
        }
        tokio::time::sleep(limit - silence).await;
    }
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
}

async fn send_close<S>(ws: &mut WebSocketStream<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = close_message(code, reason);
    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), ws.send(frame)).await {
        warn!("close frame not sent: {e}");
    }
}
