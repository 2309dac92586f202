//! One WebSocket's life after the upgrade: its join frame, then one task that reads its
//! frames into the hub and writes its channel's frames out, and closes it with a code
//! that says why.
//!
//! Reading and writing are driven by one hand-written poll loop over the one socket
//! ([`Connection`]): a client that does not read never stops the server from reading it
//! (two peered servers writing to each other cannot deadlock), and a client that does not
//! write never delays its deliveries. The session owns no timer: its deadlines are numbers
//! in its [`Watch`], which the [`Sweeper`](crate::sweeper::Sweeper) checks for everyone.
//!
//! Overload: when every reader of the channel is far behind, the hub tells the publisher
//! to pause, and its session stops reading its socket until the readers catch up (or the
//! write timeout passes), so TCP slows the publisher down. When the memory budget is
//! spent, a member's ordinary frame waits for memory in the same way (for at most the
//! write timeout); only a large frame is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use log::debug;

use crate::budget::{Budget, Need, Reservation};
use crate::config::SessionConfig;
use crate::connection::BoxedIo;
use crate::connection::{Connection, Event, Flow, ReadError, ReadStop};
use crate::frame::{Frame, FrameKind};
use crate::hub::{Hub, JoinError, Member, MemberKind};
use crate::limits::{MessageRate, Permit};
use crate::link::peer::{open_envelope, seal_envelope};
use crate::logging::{notable, Notable};
use crate::metrics::Metrics;
use crate::protocol::{self, close, PeerKey, PeerRole};
use crate::sweeper::{self, Expiry, Registration, Sweeper};
use crate::websocket::{self, Opcode, ProtocolError, Role};

/// Frames taken from the channel per lock; bounds the time the lock is held.
pub const FETCH_FRAMES: usize = 256;

/// Bytes taken from the channel per batch: a member's write queue holds at most about this
/// much (plus one frame) beyond what the ring holds anyway.
pub const FETCH_BYTES: usize = 64 * 1024;

/// Frames larger than this are growth, not service, for the memory budget: refused rather
/// than waited for when memory is short.
const LARGE_FRAME: usize = 64 * 1024;

/// What a received frame of `n` bytes is to the memory budget.
fn need_for(n: usize) -> Need {
    if n > LARGE_FRAME {
        Need::Growth
    } else {
        Need::Service
    }
}

/// Memory charged per received frame beyond its payload (its shared buffer's header).
pub const FRAME_OVERHEAD: usize = 64;

/// How long the closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything sessions share; built once by the server.
pub struct Sessions {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<Budget>,
    pub sweeper: Arc<Sweeper>,
    pub config: SessionConfig,
    /// `MLES_KEY`: the clients' auth key.
    pub key: Option<String>,
    /// `MLES_PEER_KEY`: what peer links prove.
    pub peer_key: Option<PeerKey>,
}

/// What a connection that asked to be a peer link must prove in its join frame: the
/// nonces of its upgrade (see [`crate::protocol::PeerKey`]).
#[derive(Clone, Debug)]
pub struct PeerChallenge {
    pub link_nonce: String,
    pub server_nonce: String,
}

/// How a connection's frames map to the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An Mles client: bare frames.
    Client,
    /// A server of this kind that proved the peer key: every frame in an envelope.
    Peer,
}

/// How a session ended; decides the close frame sent.
#[derive(Debug)]
pub enum End {
    ClientClosed(Option<u16>),
    Disconnected,
    Expired(Expiry),
    SlowConsumer,
    BadEnvelope,
    RateLimited,
    ChannelLimit,
    OutOfMemory,
    Protocol(ProtocolError),
    Io(std::io::Error),
}

impl End {
    /// The close frame this end sends, if any.
    fn close_frame(&self) -> Option<(u16, String)> {
        let (code, reason) = match self {
            End::Expired(Expiry::Shutdown) => (close::GOING_AWAY, "server shutting down"),
            End::Expired(Expiry::Idle) => (close::GOING_AWAY, "idle timeout"),
            End::Expired(Expiry::MaxAge) => (close::GOING_AWAY, "maximum connection age reached"),
            End::Expired(Expiry::Unresponsive) => (close::POLICY, "no answer to pings"),
            End::Expired(Expiry::ChannelLifespan) => (close::POLICY, "channel lifespan over"),
            End::Expired(Expiry::JoinTimeout) => (close::POLICY, "join frame timeout"),
            End::Expired(Expiry::WriteStalled) => {
                (close::TRY_AGAIN_LATER, "too slow: write stalled")
            }
            End::SlowConsumer => (close::TRY_AGAIN_LATER, "too slow: fell behind the channel"),
            End::BadEnvelope => (close::POLICY, "malformed peer envelope"),
            End::RateLimited => (close::POLICY, "message rate limit exceeded"),
            End::ChannelLimit => (close::POLICY, "channel message limit reached"),
            End::OutOfMemory => (close::TRY_AGAIN_LATER, "server memory budget reached"),
            End::Protocol(ProtocolError::TooBig) => (close::TOO_BIG, "message too big"),
            End::Protocol(e) => return Some((e.close_code(), e.to_string())),
            End::ClientClosed(_) | End::Disconnected | End::Io(_) => return None,
        };
        Some((code, reason.to_string()))
    }
}

/// A join refused: close code, reason for the client, label for the metric.
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

/// Runs one upgraded connection until it ends. `leftover` are bytes read past the upgrade
/// request. `challenge` is set when the client asked to be a peer link of a server of this
/// kind: it is one only if its join frame proves the peer key, and is refused otherwise.
/// `permit` is the connection's place under the connection limits.
pub async fn run(
    io: BoxedIo,
    leftover: Bytes,
    sessions: Arc<Sessions>,
    challenge: Option<PeerChallenge>,
    permit: Arc<Permit>,
    addr: Option<SocketAddr>,
) {
    let registration = sessions.sweeper.register();
    let config = &sessions.config;
    let mut conn = Connection::new(io, Role::Server, config.max_message_size, leftover);
    let join = match read_join(&mut conn, &registration, &sessions).await {
        Ok(Some(join)) => join,
        Ok(None) => return,
        Err(refusal) => {
            notable(Notable::JoinRefused, refusal.metric, &refusal.reason, addr);
            sessions.metrics.bad_first_frame(refusal.metric);
            closing(&mut conn, refusal.code, &refusal.reason).await;
            return;
        }
    };
    let refused = match (&challenge, &sessions.peer_key) {
        (Some(challenge), Some(key)) => {
            let proof = join.peer_proof.as_deref().unwrap_or_default();
            let names = [join.uid.as_str(), join.channel.as_str()];
            let (link, server) = (&challenge.link_nonce, &challenge.server_nonce);
            (!key.verify(PeerRole::Link, link, server, &names, proof))
                .then(|| Refusal::new("peer_auth", "peer authentication failed"))
        }
        _ => protocol::verify_auth(&join, sessions.key.as_deref())
            .err()
            .map(|e| Refusal::new("auth", e.to_string())),
    };
    if let Some(refusal) = refused {
        sessions.metrics.auth_failures.inc();
        sessions.metrics.bad_first_frame(refusal.metric);
        notable(Notable::JoinRefused, refusal.metric, &refusal.reason, addr);
        closing(&mut conn, refusal.code, &refusal.reason).await;
        return;
    }
    let peer = challenge.is_some();
    // A peer server opens a link per channel from one address; having proved the peer
    // key, its links are not held to the per-address limit.
    if peer {
        permit.release_ip_place();
    }
    // History on disk comes back first, if the channel is not in memory.
    sessions.hub.prepare(&join.channel).await;
    // A backplane with shared history (NATS) brings it into the channel first, so a
    // client joining here gets the cluster's history too. The backplane bounds the wait.
    if !peer {
        let ready = sessions.hub.ready(&join.channel);
        if let Some(expiry) = until_expired(ready, &registration).await {
            let end = End::Expired(expiry);
            if let Some((code, reason)) = end.close_frame() {
                closing(&mut conn, code, &reason).await;
            }
            return;
        }
    }
    // A peer link's join is plumbing, not a person: it stays out of history, and it lives
    // in the links' namespace, where no client uid can collide with it.
    let (mode, joined) = if peer {
        let name = format!("from {}", join.uid);
        let joined = sessions
            .hub
            .join(&join.channel, &name, MemberKind::Peer, None);
        (Mode::Peer, joined.map(|member| (member, None)))
    } else {
        let frame = Frame::text(join.history_frame.clone());
        let hub = &sessions.hub;
        let joined = match &join.since {
            // A client resuming: only what it missed, if the channel can tell.
            Some(token) => {
                let since = protocol::Position::from_token(token, &join.channel);
                hub.join_resuming(&join.channel, &join.uid, frame, join.presence, since)
                    .map(|(member, recovered)| {
                        sessions.metrics.resumed(recovered);
                        (member, Some(recovered))
                    })
            }
            None => hub
                .join_client(&join.channel, &join.uid, frame, join.presence)
                .map(|member| (member, None)),
        };
        (Mode::Client, joined)
    };
    let (member, recovered) = match joined {
        Ok(joined) => joined,
        Err(e) => {
            let (metric, code) = match e {
                JoinError::DuplicateUid => ("duplicate_uid", close::POLICY),
                JoinError::ChannelFull => ("channel_full", close::POLICY),
                JoinError::TooManyChannels => ("too_many_channels", close::TRY_AGAIN_LATER),
                JoinError::OutOfMemory => ("out_of_memory", close::TRY_AGAIN_LATER),
                JoinError::MessageLimit => ("message_limit", close::POLICY),
            };
            sessions.metrics.bad_first_frame(metric);
            notable(Notable::JoinRefused, metric, &e.to_string(), addr);
            closing(&mut conn, code, &e.to_string()).await;
            return;
        }
    };
    sessions.metrics.joins.inc();
    registration
        .watch()
        .joined(mode == Mode::Client, member.channel().end_of_life());
    debug!("{} joined {}", join.uid, join.channel);
    if let Some(recovered) = recovered {
        // Before anything else, the client learns whether it resumed.
        conn.queue_frame(&Frame::text(protocol::recovered_frame(recovered)));
    }
    let marks = join.positions.then_some(join.channel.as_str());
    let end = serve(&mut conn, &member, &sessions, &registration, mode, marks).await;
    drop(member);
    let detail = end.close_frame().map(|(_, why)| why).unwrap_or_default();
    match &end {
        End::SlowConsumer | End::Expired(Expiry::WriteStalled) => {
            sessions.metrics.slow_consumers.inc();
            notable(Notable::SlowConsumer, "slow_consumer", &detail, addr);
        }
        End::RateLimited => {
            sessions.metrics.rate_limited.inc();
            notable(Notable::LimitHit, "message_rate", &detail, addr);
        }
        End::ChannelLimit => notable(Notable::LimitHit, "channel_messages", &detail, addr),
        End::Protocol(ProtocolError::TooBig) => {
            sessions.metrics.oversize_messages.inc();
            notable(Notable::LimitHit, "message_size", &detail, addr);
        }
        End::OutOfMemory => {
            sessions.metrics.budget_refused("frame");
            notable(Notable::LimitHit, "memory", &detail, addr);
        }
        _ => debug!("{} on {}: {:?}", join.uid, join.channel, end),
    }
    match end.close_frame() {
        Some((code, reason)) => closing(&mut conn, code, &reason).await,
        None if matches!(end, End::ClientClosed(_)) => {
            // Answer the client's close, then let it close the TCP connection.
            let code = match end {
                End::ClientClosed(Some(code)) => code,
                _ => 1000,
            };
            closing(&mut conn, code, "").await;
        }
        None => {}
    }
}

/// Waits for `future`, unless the sweeper ends the session first (shutdown, timeouts).
async fn until_expired<T>(
    future: BoxFuture<'static, T>,
    registration: &Registration,
) -> Option<Expiry> {
    let mut future = future;
    std::future::poll_fn(|cx| {
        let watch = registration.watch();
        watch.register(cx.waker());
        if let Some(expiry) = watch.take_signals().expired {
            return Poll::Ready(Some(expiry));
        }
        future.as_mut().poll(cx).map(|_| None)
    })
    .await
}

/// Reads the join frame (answering pings meanwhile). `Ok(None)` when the client went
/// away first.
async fn read_join(
    conn: &mut Connection<BoxedIo>,
    registration: &Registration,
    sessions: &Sessions,
) -> Result<Option<protocol::Join>, Refusal> {
    let mut first: Option<Frame> = None;
    let mut closed = false;
    let result = std::future::poll_fn(|cx| loop {
        let watch = registration.watch();
        watch.register(cx.waker());
        if let Some(expiry) = watch.take_signals().expired {
            let refusal = match expiry {
                Expiry::Shutdown => Refusal {
                    code: close::GOING_AWAY,
                    reason: "server shutting down".into(),
                    metric: "shutdown",
                },
                _ => Refusal::new("timeout", "join frame timeout"),
            };
            return Poll::Ready(Err(refusal));
        }
        let _ = conn.poll_write(cx);
        let budget = &sessions.budget;
        let grant = |n: usize| {
            let small = n <= protocol::MAX_JOIN_FRAME;
            small
                .then(|| budget.try_reserve(n + FRAME_OVERHEAD, Need::Growth))
                .flatten()
        };
        let step = conn.poll_read(cx, grant, |event| match event {
            Event::Message(frame) => {
                first = Some(frame);
                Flow::Stop
            }
            // Pings before the join frame go unanswered: there is nothing to keep alive yet.
            Event::Ping(_) | Event::Pong => Flow::Continue,
            Event::Close(_) => {
                closed = true;
                Flow::Stop
            }
        });
        match step {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(ReadStop::Stopped)) => {
                if closed {
                    return Poll::Ready(Ok(None));
                }
                let Some(frame) = first.take() else { continue };
                let join = match frame.kind() {
                    FrameKind::Text => protocol::parse_join(frame.as_text().unwrap_or_default())
                        .map(Some)
                        .map_err(|e| Refusal::new("malformed", e.to_string())),
                    FrameKind::Binary => Err(Refusal::new(
                        "not_text",
                        protocol::JoinError::NotText.to_string(),
                    )),
                };
                return Poll::Ready(join);
            }
            Poll::Ready(Ok(ReadStop::NeedMemory(n))) => {
                if n > protocol::MAX_JOIN_FRAME {
                    // Never allocated: a join frame is short.
                    return Poll::Ready(Err(if n > sessions.config.max_message_size {
                        Refusal {
                            code: close::TOO_BIG,
                            reason: "message too big".into(),
                            metric: "too_big",
                        }
                    } else {
                        Refusal::new("malformed", protocol::JoinError::TooLong.to_string())
                    }));
                }
                let (budget, cost) = (&sessions.budget, n + FRAME_OVERHEAD);
                let mut reserved = budget.try_reserve(cost, Need::Growth);
                if reserved.is_none() {
                    sessions.hub.relieve(budget.relief_for(cost, Need::Growth));
                    reserved = budget.try_reserve(cost, Need::Growth);
                }
                match reserved {
                    Some(reservation) => conn.grant(reservation),
                    None => {
                        sessions.metrics.budget_refused("join");
                        return Poll::Ready(Err(Refusal {
                            code: close::TRY_AGAIN_LATER,
                            reason: "server memory budget reached".into(),
                            metric: "out_of_memory",
                        }));
                    }
                }
            }
            Poll::Ready(Ok(ReadStop::Eof)) => return Poll::Ready(Ok(None)),
            Poll::Ready(Err(ReadError::Protocol(ProtocolError::TooBig))) => {
                return Poll::Ready(Err(Refusal {
                    code: close::TOO_BIG,
                    reason: "message too big".into(),
                    metric: "too_big",
                }))
            }
            Poll::Ready(Err(ReadError::Protocol(e))) => {
                return Poll::Ready(Err(Refusal {
                    code: e.close_code(),
                    reason: e.to_string(),
                    metric: "protocol",
                }))
            }
            Poll::Ready(Err(ReadError::Io(e))) => {
                debug!("before join: {e}");
                return Poll::Ready(Ok(None));
            }
        }
    })
    .await;
    result
}

/// Local counts, added to the shared metrics once per poll rather than once per frame.
#[derive(Default)]
struct Counts {
    messages_in: u64,
    bytes_in: u64,
    messages_out: u64,
    bytes_out: u64,
}

impl Counts {
    fn flush(&mut self, metrics: &Metrics) {
        if self.messages_in > 0 {
            metrics.messages_in.inc_by(self.messages_in);
            metrics.bytes_in.inc_by(self.bytes_in);
        }
        if self.messages_out > 0 {
            metrics.messages_out.inc_by(self.messages_out);
            metrics.bytes_out.inc_by(self.bytes_out);
        }
        *self = Counts::default();
    }
}

/// The state of a joined session's loop.
struct Serving<'a> {
    conn: &'a mut Connection<BoxedIo>,
    member: &'a Member,
    sessions: &'a Sessions,
    registration: &'a Registration,
    mode: Mode,
    rate: Option<MessageRate>,
    /// The publisher is paused until the channel's readers catch up.
    paused: bool,
    /// Waiting for memory for a frame of this size.
    memory: Option<BoxFuture<'static, Option<Reservation>>>,
    /// The client closed, or a reason to end found while reading.
    end: Option<End>,
    counts: Counts,
    /// The channel, for a client that asked for position marks.
    marks: Option<&'a str>,
    /// The position in the last mark sent.
    marked: Option<protocol::Position>,
}

/// Pumps frames between a joined connection and its channel until either side ends: for
/// clients, and for peers that link to this server.
async fn serve(
    conn: &mut Connection<BoxedIo>,
    member: &Member,
    sessions: &Sessions,
    registration: &Registration,
    mode: Mode,
    marks: Option<&str>,
) -> End {
    let rate = match (mode, sessions.config.message_rate) {
        (Mode::Client, Some((max, window))) => {
            Some(MessageRate::new(max, window, sweeper::now_ms()))
        }
        _ => None,
    };
    let mut state = Serving {
        conn,
        member,
        sessions,
        registration,
        mode,
        rate,
        paused: false,
        memory: None,
        end: None,
        counts: Counts::default(),
        marks,
        marked: None,
    };
    if !member.has_pending() {
        // Nothing to replay: the client still learns where it starts.
        state.mark();
    }

    std::future::poll_fn(|cx| {
        let step = state.poll(cx);
        state.counts.flush(&state.sessions.metrics);
        step
    })
    .await
}

impl Serving<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let watch = self.registration.watch();
        watch.register(cx.waker());
        loop {
            let signals = watch.take_signals();
            if let Some(expiry) = signals.expired {
                return Poll::Ready(End::Expired(expiry));
            }
            if signals.ping {
                self.conn.queue_control(Opcode::Ping, b"");
            }
            if signals.stalled {
                // Stalled past a moment: its channel no longer waits for this member.
                self.member.set_blocked(true);
            }
            if signals.resume && self.paused {
                // The readers did not catch up within the write timeout: go on; those
                // that stay behind will lag and be cut.
                self.paused = false;
                watch.paused(false);
            }
            if let Some(end) = self.end.take() {
                return Poll::Ready(end);
            }
            let mut progress = false;

            // Write what is queued; when the queue is empty, take the next batch.
            match self.conn.poll_write(cx) {
                Poll::Ready(Ok(())) => {
                    watch.write_stalled(false);
                    self.member.set_blocked(false);
                    if self.member.poll_pending(cx).is_ready() {
                        if let Err(end) = self.fetch() {
                            return Poll::Ready(end);
                        }
                        // Round again: to write what was fetched, or to park for more.
                        progress = true;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(End::Io(e)),
                Poll::Pending => {
                    watch.write_stalled(true);
                    // A member that stopped reading is cut as soon as it lags, not only
                    // when its write times out.
                    if self.member.poll_lagged(cx).is_ready() {
                        return Poll::Ready(End::SlowConsumer);
                    }
                }
            }

            // Memory for a frame being received.
            if let Some(waiting) = self.memory.as_mut() {
                match waiting.as_mut().poll(cx) {
                    Poll::Ready(Some(reservation)) => {
                        self.memory = None;
                        self.conn.grant(reservation);
                        progress = true;
                    }
                    Poll::Ready(None) => return Poll::Ready(End::OutOfMemory),
                    Poll::Pending => {}
                }
            }

            // A paused publisher reads again once the readers caught up.
            if self.paused && self.member.poll_writable(cx).is_ready() {
                self.paused = false;
                watch.paused(false);
            }

            if !self.paused && self.memory.is_none() {
                match self.read(cx) {
                    Poll::Ready(Ok(true)) => progress = true,
                    Poll::Ready(Ok(false)) => {}
                    Poll::Ready(Err(end)) => return Poll::Ready(end),
                    Poll::Pending => {}
                }
                if self.marks.is_some() && self.marked.is_some() && self.mark() {
                    // Its own frames moved it on: the loop goes round to write the mark.
                    progress = true;
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Reads and handles what the socket has. `Ok(true)` when it stopped with more to do.
    fn read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, End>> {
        let Serving {
            conn,
            member,
            sessions,
            registration,
            mode,
            rate,
            paused,
            end,
            counts,
            ..
        } = self;
        let watch = registration.watch();
        // Only the latest ping needs an answer (RFC 6455 §5.5.3).
        let mut pong: Option<Bytes> = None;
        let budget = &sessions.budget;
        let grant = |n: usize| budget.try_reserve(n + FRAME_OVERHEAD, need_for(n));
        let step = crate::hub::deferring_wakes(|| {
            conn.poll_read(cx, grant, |event| {
                match event {
                    Event::Message(frame) => {
                        watch.heard_data();
                        counts.messages_in += 1;
                        counts.bytes_in += frame.len() as u64;
                        if let Some(rate) = rate.as_mut() {
                            if !rate.allow(sweeper::now_ms()) {
                                *end = Some(End::RateLimited);
                                return Flow::Stop;
                            }
                        }
                        let published = match mode {
                            Mode::Client => match member.publish(frame) {
                                Ok(published) => published,
                                Err(_) => {
                                    *end = Some(End::ChannelLimit);
                                    return Flow::Stop;
                                }
                            },
                            Mode::Peer => {
                                let Some((key, live, frame)) = open_envelope(&frame) else {
                                    *end = Some(End::BadEnvelope);
                                    return Flow::Stop;
                                };
                                member.relay(key, live, frame)
                            }
                        };
                        if published.pause {
                            *paused = true;
                            watch.paused(true);
                            return Flow::Stop;
                        }
                    }
                    Event::Ping(payload) => {
                        watch.heard();
                        pong = Some(payload);
                    }
                    Event::Pong => watch.heard(),
                    Event::Close(close) => {
                        watch.heard();
                        *end = Some(End::ClientClosed(close.map(|c| c.code)));
                        return Flow::Stop;
                    }
                }
                Flow::Continue
            })
        });
        let answered = pong.is_some();
        if let Some(payload) = pong {
            conn.queue_control(Opcode::Pong, &payload);
        }
        match step {
            // A pong was queued: the loop goes round to write it.
            Poll::Pending if answered => Poll::Ready(Ok(true)),
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(ReadStop::Stopped)) => Poll::Ready(Ok(true)),
            Poll::Ready(Ok(ReadStop::NeedMemory(n))) => {
                let need = need_for(n);
                let mut reserved = budget.try_reserve(n + FRAME_OVERHEAD, need);
                if reserved.is_none() {
                    sessions
                        .hub
                        .relieve(budget.relief_for(n + FRAME_OVERHEAD, need));
                    reserved = budget.try_reserve(n + FRAME_OVERHEAD, need);
                }
                match (reserved, need) {
                    (Some(reservation), _) => {
                        conn.grant(reservation);
                        Poll::Ready(Ok(true))
                    }
                    // Large frames are refused outright when memory is short.
                    (None, Need::Growth) => Poll::Ready(Err(End::OutOfMemory)),
                    // An ordinary frame waits for memory: TCP slows the sender meanwhile.
                    (None, Need::Service) => {
                        let budget = budget.clone();
                        let limit = sessions.config.write_timeout;
                        self.memory = Some(Box::pin(async move {
                            let wait = budget.reserve(n + FRAME_OVERHEAD, Need::Service);
                            tokio::time::timeout(limit, wait).await.ok().flatten()
                        }));
                        Poll::Ready(Ok(true))
                    }
                }
            }
            Poll::Ready(Ok(ReadStop::Eof)) => {
                Poll::Ready(Err(end.take().unwrap_or(End::Disconnected)))
            }
            Poll::Ready(Err(ReadError::Protocol(e))) => Poll::Ready(Err(End::Protocol(e))),
            Poll::Ready(Err(ReadError::Io(e))) => {
                Poll::Ready(Err(end.take().unwrap_or(End::Io(e))))
            }
        }
    }

    /// Queues a position mark if the client asked for them and its position moved since
    /// the last one: after a batch (never between its frames), after an empty replay (so
    /// it knows where it starts), and past its own frames (so a resume does not hand them
    /// back to it).
    /// True when a mark was queued.
    fn mark(&mut self) -> bool {
        let Some(channel) = self.marks else {
            return false;
        };
        let position = self.member.position();
        if self.marked == Some(position) {
            return false;
        }
        let mark = protocol::position_mark(&position, channel);
        self.conn.queue_frame(&Frame::text(mark));
        self.marked = Some(position);
        true
    }

    /// Takes the next batch of frames for this member and queues it on the connection,
    /// followed by a position mark if the client asked for them and got frames.
    fn fetch(&mut self) -> Result<(), End> {
        let Serving {
            conn,
            member,
            counts,
            mode,
            ..
        } = self;
        match mode {
            Mode::Client => {
                let taken = member
                    .fetch_frames(FETCH_FRAMES, FETCH_BYTES, |frame| {
                        counts.messages_out += 1;
                        counts.bytes_out += frame.len() as u64;
                        conn.queue_frame(frame);
                    })
                    .map_err(|_| End::SlowConsumer)?;
                let _ = taken;
                self.mark();
                Ok(())
            }
            Mode::Peer => member
                .fetch_entries_with(FETCH_FRAMES, FETCH_BYTES, |entry| {
                    counts.messages_out += 1;
                    counts.bytes_out += entry.frame.len() as u64;
                    let (prefix, payload) = seal_envelope(entry);
                    conn.queue_prefixed(&prefix, payload);
                })
                .map_err(|_| End::SlowConsumer),
        }
    }
}

/// Sends a close frame with `code` and `reason` and waits (briefly) for it to be written.
async fn closing(conn: &mut Connection<BoxedIo>, code: u16, reason: &str) {
    conn.queue_control(Opcode::Close, &websocket::close_payload(code, reason));
    let write = std::future::poll_fn(|cx| conn.poll_write(cx));
    if tokio::time::timeout(CLOSE_TIMEOUT, write).await.is_ok() {
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            std::future::poll_fn(|cx| conn.poll_shutdown(cx)),
        )
        .await;
    }
}
