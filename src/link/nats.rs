//! The NATS JetStream transport: the servers of a cluster share channels and their history
//! through NATS.
//!
//! # Design
//! Every channel maps to one subject, `mles.ch.<hex of the channel name>` (hex, so that any
//! channel name — dots, `*`, `>`, spaces — is one valid subject token and no two names
//! collide). One JetStream stream, [`STREAM`], holds `mles.ch.>` with at most `--limit` +
//! `--queue-frames` messages per subject, discarding the oldest: the cluster's history of
//! each channel (joiners are replayed the last `--limit`, as on one server), plus the same
//! room to fall behind that a member has on one server. It is created or updated when the
//! server first reaches NATS, so every server of a cluster must run with the same `--limit`
//! and `--queue-frames`.
//!
//! A channel's link consumes the channel's subject with an ordered consumer from the start
//! of the stream and relays each frame into the channel (a frame is stored once, by its
//! key, so history and live frames come as one ordered sequence, with no gap and no
//! duplicate), and publishes what the channel has for it (local clients' frames and join
//! frames, and frames from peers linked to this server) with the headers
//! [`HEADER_ORIGIN`], [`HEADER_SEQ`], [`HEADER_TYPE`] and [`HEADER_LIVE`], and with
//! `Nats-Msg-Id` = `origin:seq` so JetStream drops a frame published twice within its
//! duplicate window (two minutes). Before a client joins a channel, the link is started and
//! the join waits (at most [`READY_TIMEOUT`]) until its consumer has read the subject up to
//! where it ended at subscribe time, so even the first client of a channel on this server
//! gets the cluster's history. While NATS is unreachable it does not wait at all.
//!
//! # Failures
//! async-nats reconnects with backoff; each loss and return is logged and counted
//! (`mles_nats_connected`, `mles_nats_disconnects`, `mles_nats_reconnects`), and `/health`
//! answers `200 DEGRADED: nats` meanwhile. A link starts over whenever the connection
//! comes back (the server it reached may have lost the consumer), when a publish is not
//! acknowledged, and when its reader fell so far behind that the stream may have discarded
//! frames it never read (`mles_nats_lagged_total`). A consumer that stops delivering while
//! the subject has moved on (its node died) is found within [`STALL_CHECK`] plus a
//! request, logged and counted (`mles_nats_consumer_lost_total`); the link does not start
//! over for it: it reads on from where the consumer stopped with direct gets, which any
//! replica of the stream answers (`mles_nats_direct_reads`, `/health` degraded
//! meanwhile), while a new consumer is made from there; JetStream cannot place one until
//! its meta leader answers, which after losing that node takes seconds. Starting over
//! re-reads the subject from the start (frames already here are dropped by their key),
//! with direct gets too until its new consumer is made, and publishes, in order, every
//! frame of the channel's local history that JetStream has not acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{
    self, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind, StorageType,
};
use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use log::{debug, info, log, warn, Level};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::{LinkConnection, LinkError, Received, Transport};
use crate::budget::{charge_frame, Budget};
use crate::config::NatsConfig;
use crate::frame::{Frame, FrameKind};
use crate::hub::{Entry, MemberId, MsgKey};
use crate::metrics::Metrics;
use crate::Error;

/// The JetStream stream holding every channel's history.
pub const STREAM: &str = "MLES";
/// Subjects of channels start with this; the rest is the channel name in hex.
pub const SUBJECT_PREFIX: &str = "mles.ch.";
/// The server and boot the frame entered the system on ([`MsgKey::origin`], percent-encoded).
pub const HEADER_ORIGIN: &str = "Mles-Origin";
/// The frame's number at its origin ([`MsgKey::seq`]).
pub const HEADER_SEQ: &str = "Mles-Seq";
/// `text` or `binary`.
pub const HEADER_TYPE: &str = "Mles-Type";
/// `true`, or `false` for a join frame (history only, never delivered live).
pub const HEADER_LIVE: &str = "Mles-Live";
/// Longest a joining client waits for the cluster's history of its channel.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// A link that received nothing this long asks whether its subject moved on without it.
pub const STALL_CHECK: Duration = Duration::from_secs(2);
/// The longest a consumer's pull request waits; its idle heartbeat is half of it, so a
/// consumer whose node died is also noticed by the client within about twice this.
const PULL_EXPIRES: Duration = Duration::from_secs(4);
/// While a lost consumer is rebuilt: how long a link reading the stream directly waits
/// before asking again when the subject had nothing new, and after a failed request.
const DIRECT_POLL: Duration = Duration::from_millis(50);
const DIRECT_RETRY: Duration = Duration::from_millis(500);

/// Longest time a link may take to subscribe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a JetStream API request or publish acknowledgement may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a publish may wait for its acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames waiting to be published before the pump stops taking more.
const QUEUE_FRAMES: usize = 1024;
/// Origins remembered per channel for "already published".
const ORIGINS_KEPT: usize = 1024;
/// Past link members remembered per channel (their frames came from NATS).
const LINK_MEMBERS_KEPT: usize = 64;

/// Characters escaped in the origin header: controls, and those that frame it.
const ORIGIN_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b':');

/// The subject of `channel`: any channel name maps to one valid subject, and no two to the
/// same one.
pub fn subject(channel: &str) -> String {
    format!("{SUBJECT_PREFIX}{}", hex::encode(channel))
}

/// The channel a subject of [`subject`] belongs to.
pub fn channel_of(subject: &str) -> Option<String> {
    let hex = subject.strip_prefix(SUBJECT_PREFIX)?;
    String::from_utf8(hex::decode(hex).ok()?).ok()
}

/// What a channel's links have done, kept while the channel's link restarts: what
/// JetStream acknowledged, so a new link publishes only what is missing.
#[derive(Default)]
struct Sent {
    /// Per origin, the highest seq acknowledged by JetStream (acks come in order), and when
    /// it was last used.
    acked: HashMap<Arc<str>, (u64, u64)>,
    tick: u64,
    /// The members links used: frames from them came from NATS.
    link_members: VecDeque<MemberId>,
}

impl Sent {
    fn acked(&mut self, key: &MsgKey) {
        self.tick += 1;
        let tick = self.tick;
        let slot = self
            .acked
            .entry(key.origin.clone())
            .or_insert((key.seq, tick));
        *slot = (slot.0.max(key.seq), tick);
        if self.acked.len() > ORIGINS_KEPT {
            if let Some(oldest) = self
                .acked
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(o, _)| o.clone())
            {
                self.acked.remove(&oldest);
            }
        }
    }

    /// Whether `entry`, fetched by a link, still has to be published.
    fn needs_publishing(&self, entry: &Entry) -> bool {
        !entry.is_restored() // from an earlier life of this server
            && !self.link_members.contains(&entry.from)
            && self
                .acked
                .get(&entry.key.origin)
                .is_none_or(|(seq, _)| entry.key.seq > *seq)
    }
}

/// One channel's state, kept across its link's sessions.
struct ChannelState {
    /// True while the consumer has read the subject up to where it ended at subscribe time.
    caught_up: watch::Sender<bool>,
    sent: Mutex<Sent>,
}

impl ChannelState {
    fn sent(&self) -> MutexGuard<'_, Sent> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The NATS backplane: one connection, and the state of each channel's link.
pub struct NatsTransport {
    config: NatsConfig,
    client: Client,
    js: async_nats::jetstream::Context,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    /// Counts connections made: a link starts over after a reconnect.
    connections: Arc<watch::Sender<u64>>,
    /// The stream, once created or updated on this connection.
    stream: tokio::sync::Mutex<Option<stream::Stream>>,
    channels: Mutex<HashMap<Arc<str>, Arc<ChannelState>>>,
    /// Messages the stream keeps per channel.
    per_subject: i64,
    /// When a link of this server last found its consumer lost.
    consumer_lost_at: Arc<Mutex<Option<Instant>>>,
}

impl NatsTransport {
    /// Connects in the background (the server starts even while NATS is down) and creates
    /// or updates the stream as soon as NATS answers. Fails only on bad settings.
    /// `per_subject` is `--limit` + `--queue-frames`.
    pub async fn connect(
        config: NatsConfig,
        server_id: &str,
        per_subject: usize,
        metrics: Arc<Metrics>,
        budget: Arc<Budget>,
    ) -> Result<Arc<NatsTransport>, Error> {
        let bad =
            |what: &str, e: &dyn std::fmt::Display| Error::Config(format!("NATS {what}: {e}"));
        let mut options = ConnectOptions::new();
        if let Some(creds) = &config.creds {
            options = options
                .credentials_file(creds)
                .await
                .map_err(|e| bad("credentials", &e))?;
        }
        if let Some(ca) = &config.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &config.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let connections = Arc::new(watch::Sender::new(0u64));
        let counter = connections.clone();
        let was_connected = Arc::new(AtomicBool::new(false));
        let events = metrics.clone();
        options = options
            .name(format!("mles {server_id}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let metrics = events.clone();
                let was_connected = was_connected.clone();
                let counter = counter.clone();
                async move {
                    match event {
                        Event::Connected => {
                            counter.send_modify(|n| *n += 1);
                            metrics.nats_connected.set(1);
                            if was_connected.swap(true, Ordering::Relaxed) {
                                metrics.nats_reconnects.inc();
                            }
                            info!("NATS connected");
                        }
                        Event::Disconnected => {
                            metrics.nats_connected.set(0);
                            metrics.nats_disconnects.inc();
                            warn!("NATS connection lost; local delivery goes on, reconnecting");
                        }
                        Event::Closed => {
                            metrics.nats_connected.set(0);
                            info!("NATS connection closed");
                        }
                        Event::ClientError(e) => debug!("NATS: {e}"),
                        other => warn!("NATS: {other}"),
                    }
                }
            });
        let client = options
            .connect(config.urls.clone())
            .await
            .map_err(|e| bad("connect", &e))?;
        let mut js = async_nats::jetstream::new(client.clone());
        // A request to a node that just died must not hold a link for long: try again
        // soon instead (the default waits 10 s per request during a failover).
        js.set_timeout(REQUEST_TIMEOUT);
        let nats = Arc::new(NatsTransport {
            config,
            client,
            js,
            metrics,
            budget,
            connections,
            stream: tokio::sync::Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            consumer_lost_at: Arc::new(Mutex::new(None)),
            per_subject: per_subject as i64,
        });
        tokio::spawn(prepare_stream(Arc::downgrade(&nats)));
        Ok(nats)
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// The state of `channel`'s link, made on first use. States of channels whose link is
    /// not running are dropped once they are many.
    fn channel(&self, name: &str) -> Arc<ChannelState> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if channels.len() > 4096 {
            channels.retain(|_, state| Arc::strong_count(state) > 1);
        }
        channels
            .entry(Arc::from(name))
            .or_insert_with(|| {
                Arc::new(ChannelState {
                    caught_up: watch::Sender::new(false),
                    sent: Mutex::new(Sent::default()),
                })
            })
            .clone()
    }

    /// The stream, created or updated once per connection lifetime (again after an error).
    async fn stream(&self) -> Result<stream::Stream, LinkError> {
        let mut cached = self.stream.lock().await;
        if let Some(stream) = cached.as_ref() {
            return Ok(stream.clone());
        }
        let config = stream::Config {
            name: STREAM.to_string(),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            max_messages_per_subject: self.per_subject,
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            num_replicas: self.config.replicas,
            duplicate_window: Duration::from_secs(120),
            // Any replica answers direct gets: a link whose consumer was lost reads through
            // them while JetStream places a new one (which needs its meta leader).
            allow_direct: true,
            ..Default::default()
        };
        self.js
            .create_or_update_stream(config)
            .await
            .map_err(|e| LinkError::Nats(format!("creating stream {STREAM}: {e}")))?;
        let stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| LinkError::Nats(format!("getting stream {STREAM}: {e}")))?;
        *cached = Some(stream.clone());
        Ok(stream)
    }

    async fn forget_stream(&self) {
        *self.stream.lock().await = None;
    }

    /// The stream, and where `subject` ends in it now (0 when empty).
    async fn subscribe(&self, subject: &str) -> Result<(stream::Stream, u64), LinkError> {
        let stream = self.stream().await?;
        let last = last_sequence(&stream, subject).await?;
        Ok((stream, last))
    }
}

/// An ordered consumer of `subject` in `stream`, from `from` on.
async fn consume(
    stream: stream::Stream,
    subject: String,
    from: DeliverPolicy,
) -> Result<Ordered, LinkError> {
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject,
            deliver_policy: from,
            max_expires: PULL_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(|e| LinkError::Nats(format!("creating the consumer: {e}")))?;
    consumer
        .messages()
        .await
        .map_err(|e| LinkError::Nats(format!("consuming: {e}")))
}

/// The first message of `subject` in `stream` at or after `sequence`, read with a direct
/// get (answered by any replica) after waiting `after`; `None` when there is none yet.
fn direct_get(
    stream: stream::Stream,
    subject: String,
    sequence: u64,
    after: Duration,
) -> BoxFuture<'static, Result<Option<StreamMessage>, LinkError>> {
    Box::pin(async move {
        tokio::time::sleep(after).await;
        match stream
            .direct_get_next_for_subject(subject, Some(sequence))
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(LinkError::Nats(format!("reading the stream directly: {e}"))),
        }
    })
}

/// A link whose consumer was lost: it reads the subject with direct gets, in stream
/// order, while a new consumer starting where it stood is made.
struct DirectRead {
    /// The next stream sequence to ask for.
    next: u64,
    /// The get on its way (after a pause when the subject had nothing new).
    fetch: BoxFuture<'static, Result<Option<StreamMessage>, LinkError>>,
    /// The new consumer.
    rebuild: BoxFuture<'static, Result<Ordered, LinkError>>,
    /// Since when direct gets have been failing, if they are.
    failing_since: Option<Instant>,
    /// Counts this link in `mles_nats_direct_reads` while it reads directly for want of a
    /// consumer (not while a new link's first consumer is simply on its way).
    counted: Option<DirectReadCounted>,
}

impl DirectRead {
    /// Reads `subject` from stream sequence `next` while a consumer from `from` is made.
    fn new(
        stream: &stream::Stream,
        subject: &str,
        next: u64,
        from: DeliverPolicy,
        counted: Option<DirectReadCounted>,
    ) -> Self {
        DirectRead {
            next,
            fetch: direct_get(stream.clone(), subject.to_string(), next, Duration::ZERO),
            rebuild: Box::pin(consume(stream.clone(), subject.to_string(), from)),
            failing_since: None,
            counted,
        }
    }
}

/// Holds one count of `mles_nats_direct_reads` (so `/health` says degraded) and gives it
/// back when dropped, however the direct read ends.
struct DirectReadCounted(Gauge);

impl DirectReadCounted {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        DirectReadCounted(gauge.clone())
    }
}

impl Drop for DirectReadCounted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The sequence of the last message of `subject` in `stream` (0 when it has none).
async fn last_sequence(stream: &stream::Stream, subject: &str) -> Result<u64, LinkError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(message.sequence),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(LinkError::Nats(format!(
            "reading the end of the channel's history: {e}"
        ))),
    }
}

/// Creates or updates the stream as soon as NATS answers, so a misconfiguration shows in
/// the log at start rather than at the first join.
async fn prepare_stream(nats: std::sync::Weak<NatsTransport>) {
    loop {
        let Some(nats) = nats.upgrade() else { return };
        if nats.connected() {
            match nats.stream().await {
                Ok(_) => {
                    info!("NATS stream {STREAM} ready");
                    return;
                }
                Err(e) => warn!("NATS: {e}"),
            }
        }
        drop(nats);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &str {
        "NATS"
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    fn keeps_member(&self) -> bool {
        true
    }

    async fn connect(&self, channel: &str) -> Result<Box<dyn LinkConnection>, LinkError> {
        if !self.connected() {
            return Err(LinkError::NotConnected);
        }
        let state = self.channel(channel);
        state.caught_up.send_replace(false);
        let reconnected = self.connections.subscribe();
        let subject = subject(channel);
        // Each step has its own request timeout; this bounds them together, so a link never
        // hangs half-open while its channel waits for it.
        let subscribed = tokio::time::timeout(SETUP_TIMEOUT, self.subscribe(&subject)).await;
        let (stream, last) = match subscribed {
            Ok(Ok(subscribed)) => subscribed,
            Ok(Err(e)) => {
                self.forget_stream().await;
                return Err(e);
            }
            Err(_) => {
                self.forget_stream().await;
                return Err(LinkError::Timeout("subscribing in JetStream"));
            }
        };
        if last == 0 {
            state.caught_up.send_replace(true);
        }
        // The stream's creation time names its numbering: the same on every server, new if
        // the stream is ever made again.
        let epoch = (stream.cached_info().created.unix_timestamp_nanos() as u64).max(1);
        // The link reads the subject directly from its start while its consumer is made:
        // placing one needs JetStream's meta leader, which is elected anew for seconds
        // when the node whose loss brought this link here was that.
        let direct = DirectRead::new(&stream, &subject, 1, DeliverPolicy::All, None);
        Ok(Box::new(NatsConnection {
            epoch,
            js: self.js.clone(),
            stream,
            subject,
            state,
            messages: None,
            direct: Some(direct),
            last,
            delivered: 0,
            first: true,
            reconnected,
            queue: VecDeque::new(),
            publishing: None,
            check: None,
            quiet_since: Instant::now(),
            capacity: self.per_subject as u64,
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
            channel: channel.to_string(),
            consumer_lost_at: self.consumer_lost_at.clone(),
        }))
    }

    fn ready(&self, channel: &str) -> BoxFuture<'static, ()> {
        let mut caught_up = self.channel(channel).caught_up.subscribe();
        let connected = self.connected();
        let name = channel.to_string();
        Box::pin(async move {
            if connected {
                let waited = tokio::time::timeout(READY_TIMEOUT, caught_up.wait_for(|c| *c));
                if waited.await.is_err() {
                    debug!("channel {name}: joining before its NATS history caught up");
                }
            }
        })
    }

    fn degraded(&self) -> Option<&'static str> {
        // A lost consumer went unnoticed for up to STALL_CHECK, and a new one is often
        // placed within milliseconds: degraded for at least that long, so a health check
        // polled every second or two sees it.
        let lost_lately = self
            .consumer_lost_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < STALL_CHECK);
        let reading_directly = self.metrics.nats_direct_reads.get() > 0;
        let down = self.metrics.nats_connected.get() == 0;
        (down || reading_directly || lost_lately).then_some("nats")
    }

    fn backoff(&self) -> (Duration, Duration) {
        // async-nats reconnects on its own; a link only waits for that.
        (Duration::from_millis(250), Duration::from_secs(2))
    }
}

/// What a publish batch gives back: the keys acknowledged, in order, or why it failed.
type Publishing = BoxFuture<'static, Result<Vec<MsgKey>, LinkError>>;

/// One channel's connected link to NATS.
struct NatsConnection {
    /// The stream's epoch (see [`Transport::connect`]).
    epoch: u64,
    js: async_nats::jetstream::Context,
    stream: stream::Stream,
    subject: String,
    state: Arc<ChannelState>,
    /// The consumer, once made (reading directly meanwhile).
    messages: Option<Ordered>,
    /// Reading without a consumer, while a lost one is rebuilt.
    direct: Option<DirectRead>,
    /// Where the subject ended at subscribe time: caught up once read this far.
    last: u64,
    /// The stream sequence of the last message received.
    delivered: u64,
    first: bool,
    reconnected: watch::Receiver<u64>,
    /// Local frames waiting to be published.
    queue: VecDeque<Entry>,
    publishing: Option<Publishing>,
    /// Asking where the subject ends, after a quiet spell.
    check: Option<BoxFuture<'static, Result<u64, LinkError>>>,
    quiet_since: Instant,
    capacity: u64,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    channel: String,
    /// Shared with the transport, for `/health`.
    consumer_lost_at: Arc<Mutex<Option<Instant>>>,
}

impl NatsConnection {
    /// Starts publishing what is queued, if nothing is being published.
    fn publish_next(&mut self) {
        if self.publishing.is_some() || self.queue.is_empty() {
            return;
        }
        let batch: Vec<Entry> = self.queue.drain(..).collect();
        let js = self.js.clone();
        let subject = self.subject.clone();
        let metrics = self.metrics.clone();
        let channel = self.channel.clone();
        self.publishing = Some(Box::pin(async move {
            let mut acks = Vec::new();
            for entry in batch {
                let (headers, payload) = encode(&entry);
                let message = PublishMessage::build().payload(payload).headers(headers);
                match js.send_publish(subject.clone(), message).await {
                    Ok(ack) => acks.push((entry.key, ack)),
                    Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                        metrics.nats_publish_failures.inc();
                        warn!(
                            "channel {channel}: a frame of {} bytes is over the NATS server's max_payload; delivered here only",
                            entry.frame.len()
                        );
                    }
                    Err(e) => {
                        metrics.nats_publish_failures.inc();
                        return Err(LinkError::Nats(format!("publishing: {e}")));
                    }
                }
            }
            let mut done = Vec::with_capacity(acks.len());
            for (key, ack) in acks {
                match tokio::time::timeout(ACK_TIMEOUT, ack).await {
                    Ok(Ok(_)) => done.push(key),
                    Ok(Err(e)) => {
                        metrics.nats_publish_failures.inc();
                        return Err(LinkError::Nats(format!("publish not acknowledged: {e}")));
                    }
                    Err(_) => {
                        metrics.nats_publish_failures.inc();
                        return Err(LinkError::Timeout("waiting for a publish acknowledgement"));
                    }
                }
            }
            Ok(done)
        }));
    }

    /// Stops waiting for the lost consumer: reads on with direct gets from where it
    /// stopped, and has a new consumer made from there.
    fn read_directly(&mut self) {
        let next = self.delivered + 1;
        let from = DeliverPolicy::ByStartSequence {
            start_sequence: next,
        };
        let counted = Some(DirectReadCounted::new(&self.metrics.nats_direct_reads));
        self.direct = Some(DirectRead::new(
            &self.stream,
            &self.subject,
            next,
            from,
            counted,
        ));
    }

    /// Handles the answer to a direct get: a frame, or the next get.
    fn received_directly(
        &mut self,
        got: Result<Option<StreamMessage>, LinkError>,
    ) -> Result<Option<Received>, LinkError> {
        let Some(direct) = self.direct.as_mut() else {
            return Ok(None);
        };
        let (stream, subject) = (self.stream.clone(), self.subject.clone());
        let message = match got {
            Ok(message) => {
                direct.failing_since = None;
                message
            }
            Err(e) => {
                // Bounded like the consumer's rebuild: the link starts over after a while.
                let since = *direct.failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > SETUP_TIMEOUT {
                    return Err(e);
                }
                direct.fetch = direct_get(stream, subject, direct.next, DIRECT_RETRY);
                return Ok(None);
            }
        };
        let Some(message) = message else {
            // Nothing new: read to the end.
            self.state
                .caught_up
                .send_if_modified(|c| !std::mem::replace(c, true));
            direct.fetch = direct_get(stream, subject, direct.next, DIRECT_POLL);
            return Ok(None);
        };
        direct.next = message.sequence + 1;
        direct.fetch = direct_get(stream, subject, direct.next, Duration::ZERO);
        if message.sequence <= self.delivered {
            return Ok(None);
        }
        self.delivered = message.sequence;
        self.quiet_since = Instant::now();
        Ok(self.relayed(message.sequence, &Some(message.headers), &message.payload))
    }

    /// The frame of the NATS message at stream `sequence`, to relay into the channel.
    fn relayed(
        &self,
        sequence: u64,
        headers: &Option<HeaderMap>,
        payload: &Bytes,
    ) -> Option<Received> {
        match decode(headers, payload) {
            Some((key, live, frame)) => Some(Received {
                key: Some(key),
                live,
                frame: charge_frame(&self.budget, frame),
                stream: Some(sequence),
            }),
            None => {
                debug!(
                    "skipping a message on {} without Mles headers",
                    self.subject
                );
                None
            }
        }
    }

    /// Handles one message of the consumer.
    fn receive(
        &mut self,
        message: async_nats::jetstream::Message,
    ) -> Result<Option<Received>, LinkError> {
        let info = message
            .info()
            .map_err(|e| LinkError::Nats(format!("message without JetStream info: {e}")))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        // A consumer made after direct reads starts where they did: skip what they relayed.
        if sequence <= self.delivered {
            return Ok(None);
        }
        // With the subject's whole capacity undelivered, the stream may have discarded
        // frames this link never read since the previous one.
        if !std::mem::take(&mut self.first) && pending + 1 >= self.capacity {
            self.metrics.nats_lagged.inc();
            return Err(LinkError::StreamLag(pending + 1));
        }
        self.delivered = sequence;
        self.quiet_since = Instant::now();
        if sequence >= self.last || pending == 0 {
            self.state
                .caught_up
                .send_if_modified(|c| !std::mem::replace(c, true));
        }
        Ok(self.relayed(sequence, &message.headers, &message.payload))
    }
}

#[async_trait]
impl LinkConnection for NatsConnection {
    fn member_name(&self) -> String {
        "nats".to_string()
    }

    fn takes_join_frames(&self) -> bool {
        true
    }

    fn orders(&self) -> Option<u64> {
        // Once caught up: frames go through the stream only when it answers.
        self.state.caught_up.borrow().then_some(self.epoch)
    }

    fn joined(&mut self, member: MemberId) {
        let mut sent = self.state.sent();
        if sent.link_members.contains(&member) {
            return;
        }
        sent.link_members.push_back(member);
        if sent.link_members.len() > LINK_MEMBERS_KEPT {
            sent.link_members.pop_front();
        }
    }

    fn send(&mut self, batch: &mut Vec<Entry>) -> Result<(), LinkError> {
        {
            let sent = self.state.sent();
            self.queue
                .extend(batch.drain(..).filter(|e| sent.needs_publishing(e)));
        }
        self.publish_next();
        Ok(())
    }

    fn ready_to_send(&self) -> bool {
        self.queue.len() < QUEUE_FRAMES
    }

    async fn recv(&mut self) -> Result<Received, LinkError> {
        /// What woke the link.
        enum Woke {
            Reconnected,
            Published(Result<Vec<MsgKey>, LinkError>),
            Message(Option<Result<Box<async_nats::jetstream::Message>, String>>),
            Direct(Result<Option<StreamMessage>, LinkError>),
            Rebuilt(Result<Box<Ordered>, LinkError>),
            Checked(Result<u64, LinkError>),
            Quiet,
        }
        loop {
            let quiet_for = self.quiet_since.elapsed();
            let check_at = tokio::time::Instant::now() + STALL_CHECK.saturating_sub(quiet_for);
            let NatsConnection {
                reconnected,
                publishing,
                messages,
                direct,
                check,
                ..
            } = self;
            let consuming = direct.is_none();
            let (rebuild, fetch) = match direct.as_mut() {
                Some(d) => (Some(&mut d.rebuild), Some(&mut d.fetch)),
                None => (None, None),
            };
            let woke = tokio::select! {
                biased;
                _ = reconnected.changed() => Woke::Reconnected,
                published = async { publishing.as_mut().expect("guarded").await }, if publishing.is_some() => {
                    Woke::Published(published)
                }
                message = async { messages.as_mut().expect("guarded").next().await }, if consuming => {
                    Woke::Message(message.map(|m| m.map(Box::new).map_err(|e| e.to_string())))
                }
                rebuilt = async { rebuild.expect("guarded").await }, if !consuming => {
                    Woke::Rebuilt(rebuilt.map(Box::new))
                }
                got = async { fetch.expect("guarded").await }, if !consuming => {
                    Woke::Direct(got)
                }
                ended = async { check.as_mut().expect("guarded").await }, if check.is_some() => {
                    Woke::Checked(ended)
                }
                _ = tokio::time::sleep_until(check_at), if check.is_none() && consuming => Woke::Quiet,
            };
            match woke {
                Woke::Reconnected => return Err(LinkError::Reconnected),
                Woke::Published(published) => {
                    self.publishing = None;
                    let keys = published?;
                    let mut sent = self.state.sent();
                    for key in &keys {
                        sent.acked(key);
                    }
                    drop(sent);
                    self.publish_next();
                }
                Woke::Message(Some(Ok(message))) => {
                    if let Some(received) = self.receive(*message)? {
                        return Ok(received);
                    }
                }
                Woke::Message(Some(Err(e))) => {
                    return Err(LinkError::Nats(format!("consuming: {e}")))
                }
                Woke::Message(None) => return Err(LinkError::Nats("the consumer ended".into())),
                Woke::Checked(ended) => {
                    self.check = None;
                    self.quiet_since = Instant::now();
                    if ended? > self.delivered && self.direct.is_none() {
                        // The subject moved on and this consumer delivered none of it.
                        self.metrics.nats_consumer_lost.inc();
                        *self
                            .consumer_lost_at
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                        warn!(
                            "NATS link for channel {}: {}; reading the stream directly meanwhile",
                            self.channel,
                            LinkError::ConsumerLost
                        );
                        self.read_directly();
                    }
                }
                Woke::Direct(got) => {
                    if let Some(received) = self.received_directly(got)? {
                        return Ok(received);
                    }
                }
                Woke::Rebuilt(Ok(messages)) => {
                    // Worth an operator's line only when the link was without one.
                    let recovered = self.direct.as_ref().is_some_and(|d| d.counted.is_some());
                    let level = if recovered { Level::Info } else { Level::Debug };
                    log!(
                        level,
                        "NATS link for channel {}: a new consumer delivers from stream sequence {}",
                        self.channel,
                        self.delivered + 1
                    );
                    self.messages = Some(*messages);
                    self.direct = None;
                    self.first = true;
                    self.quiet_since = Instant::now();
                }
                Woke::Rebuilt(Err(e)) => {
                    debug!("NATS link for channel {}: {e}", self.channel);
                    if let Some(direct) = self.direct.as_mut() {
                        // No consumer for now: degraded until one is made.
                        if direct.counted.is_none() {
                            direct.counted =
                                Some(DirectReadCounted::new(&self.metrics.nats_direct_reads));
                        }
                        let (stream, subject) = (self.stream.clone(), self.subject.clone());
                        let from = DeliverPolicy::ByStartSequence {
                            start_sequence: self.delivered + 1,
                        };
                        direct.rebuild = Box::pin(async move {
                            tokio::time::sleep(DIRECT_RETRY).await;
                            consume(stream, subject, from).await
                        });
                    }
                }
                Woke::Quiet => {
                    let stream = self.stream.clone();
                    let subject = self.subject.clone();
                    self.check = Some(Box::pin(
                        async move { last_sequence(&stream, &subject).await },
                    ));
                }
            }
        }
    }

    async fn close(&mut self) {
        // Publish what local members sent last.
        self.publish_next();
        while let Some(publishing) = self.publishing.take() {
            if let Ok(keys) = publishing.await {
                let mut sent = self.state.sent();
                for key in &keys {
                    sent.acked(key);
                }
            }
            self.publish_next();
        }
    }
}

/// A stored entry as a NATS message: its headers (`Nats-Msg-Id` included) and payload.
fn encode(entry: &Entry) -> (HeaderMap, Bytes) {
    let kind = match entry.frame.kind() {
        FrameKind::Text => "text",
        FrameKind::Binary => "binary",
    };
    let payload = entry.frame.data().clone();
    let origin = utf8_percent_encode(&entry.key.origin, ORIGIN_ESCAPES).to_string();
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_TYPE, kind);
    headers.insert(HEADER_LIVE, if entry.live { "true" } else { "false" });
    headers.insert(HEADER_SEQ, entry.key.seq.to_string());
    let id = format!("{origin}:{}", entry.key.seq);
    headers.insert(HEADER_ORIGIN, origin);
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    (headers, payload)
}

/// The key, liveness and frame of a NATS message published by [`encode`].
fn decode(headers: &Option<HeaderMap>, payload: &Bytes) -> Option<(MsgKey, bool, Frame)> {
    let headers = headers.as_ref()?;
    let origin = percent_decode_str(headers.get(HEADER_ORIGIN)?.as_str())
        .decode_utf8()
        .ok()?;
    let seq = headers.get(HEADER_SEQ)?.as_str().parse().ok()?;
    let live = match headers.get(HEADER_LIVE)?.as_str() {
        "true" => true,
        "false" => false,
        _ => return None,
    };
    let kind = match headers.get(HEADER_TYPE)?.as_str() {
        "text" => FrameKind::Text,
        "binary" => FrameKind::Binary,
        _ => return None,
    };
    let frame = Frame::new(kind, payload.clone())?;
    let key = MsgKey {
        origin: Arc::from(origin.as_ref()),
        seq,
    };
    Some((key, live, frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_name_is_one_subject_token_and_names_do_not_collide() {
        let names = ["a", "a.b", "a*", ">", "with space", "x.>", "A", "ä", ""];
        let mut subjects = std::collections::HashSet::new();
        for name in names {
            let s = subject(name);
            let token = s.strip_prefix(SUBJECT_PREFIX).unwrap();
            assert!(token
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert_eq!(channel_of(&s).as_deref(), Some(name));
            assert!(subjects.insert(s), "{name} collides");
        }
    }

    fn entry(from: MemberId, origin: &str, seq: u64, live: bool, frame: Frame) -> Entry {
        Entry {
            seq: 1,
            from,
            live,
            key: MsgKey {
                origin: Arc::from(origin),
                seq,
            },
            frame,
            stream: None,
        }
    }

    #[test]
    fn frames_survive_encoding_with_key_type_and_liveness() {
        let entries = [
            entry(3, "alpha: beta#1f", 42, true, Frame::text("hello")),
            entry(3, "a%b", 0, false, Frame::text("{\"uid\":\"x\"}")),
            entry(3, "a", u64::MAX, true, Frame::binary(vec![0u8, 255, 7])),
        ];
        for entry in entries {
            let (headers, payload) = encode(&entry);
            let id = headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string());
            assert_eq!(
                id,
                Some(format!(
                    "{}:{}",
                    utf8_percent_encode(&entry.key.origin, ORIGIN_ESCAPES),
                    entry.key.seq
                ))
            );
            let (key, live, frame) = decode(&Some(headers), &payload).unwrap();
            assert_eq!(key, entry.key);
            assert_eq!(live, entry.live);
            assert_eq!(frame, entry.frame);
        }
        assert!(decode(&None, &Bytes::from_static(b"x")).is_none());
    }

    #[test]
    fn only_unacknowledged_local_frames_need_publishing() {
        let mut sent = Sent::default();
        let e = |from, origin: &str, seq| entry(from, origin, seq, true, Frame::text("x"));
        assert!(sent.needs_publishing(&e(5, "here", 1)));
        assert!(!sent.needs_publishing(&e(0, "here", 1)), "restored");
        sent.link_members.push_back(9);
        assert!(!sent.needs_publishing(&e(9, "there", 1)), "from NATS");
        sent.acked(&MsgKey {
            origin: Arc::from("here"),
            seq: 3,
        });
        assert!(!sent.needs_publishing(&e(5, "here", 3)));
        assert!(sent.needs_publishing(&e(5, "here", 4)));
    }
}
