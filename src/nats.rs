//! The NATS JetStream backplane: the servers of a cluster share channels and their history
//! through NATS, the second kind of [`Backplane`] next to peer links.
//!
//! # Design
//! Every channel maps to one subject, `mles.ch.<hex of the channel name>` (hex, so that any
//! channel name — dots, `*`, `>`, spaces — is one valid subject token and no two names
//! collide). One JetStream stream, [`STREAM`], holds `mles.ch.>` with at most `--limit` +
//! `--queue-frames` messages per subject, discarding the oldest: the cluster's history of
//! each channel (joiners are replayed the last `--limit`, as on one server), plus the same
//! room to fall behind that a member has on one server. It is created or updated when the
//! server first reaches NATS, so every server of a cluster must run with the same `--limit`
//! and `--queue-frames`. A link whose reader falls further behind than that could have lost
//! frames to the discard: it says so (warning, `mles_nats_lagged_total`) and starts over,
//! which recovers whatever the stream still holds — a lag is never silent.
//!
//! A channel that has local clients gets a *link*: a task that joins the local channel as a
//! [`MemberKind::Peer`] member and
//! - consumes the channel's subject with an ordered consumer from the start of the stream
//!   (`DeliverPolicy::All`), relaying each frame into the channel with [`Member::relay`],
//!   which stores a frame once and drops frames that originated here — history and live
//!   frames come as one ordered sequence, with no gap and no duplicate;
//! - publishes what the member fetches (local clients' frames and join frames, and frames
//!   from peers linked to this server) to the subject, with headers [`HEADER_ORIGIN`],
//!   [`HEADER_SEQ`] (the frame's [`MsgKey`]), [`HEADER_TYPE`] (`text` or `binary`) and
//!   [`HEADER_LIVE`] (`false` for join frames, which are history only), and with
//!   `Nats-Msg-Id` = `origin:seq` so JetStream drops a frame published twice within its
//!   duplicate window (two minutes).
//!
//! Before a client joins a channel, [`Backplane::ready`] starts the link and waits (at most
//! [`READY_TIMEOUT`]) until its consumer has read the subject up to the stream's last message
//! at subscribe time, so even the first client of a channel on this server gets the
//! cluster's history. While NATS is unreachable it does not wait at all.
//!
//! A link stays up while its channel has local clients and for `--peer-grace` after the last
//! one left.
//!
//! # When NATS is unreachable
//! Local delivery goes on: a link is a member like any other and never holds up a publisher.
//! async-nats reconnects with backoff (up to 4 s between attempts); each loss and return is
//! logged and counted (`mles_nats_connected`, `mles_nats_disconnects`, `mles_nats_reconnects`)
//! and `/health` answers `200 DEGRADED: nats` meanwhile (200, because this server still
//! serves its own members and a load balancer should keep it).
//!
//! A link starts a new session whenever the connection comes back, and whenever a publish
//! fails (no ack within 5 s): it re-joins the channel, publishes, in order, every frame of
//! the channel's local history that entered here and JetStream has not acknowledged, and
//! reads the channel's subject from the start again (frames already here are dropped by
//! their key). Publishes made while disconnected also wait in the NATS client's buffer and
//! go out on reconnect; JetStream drops the copies by `Nats-Msg-Id`. So across an outage:
//! - members on the same server as the publisher miss nothing and wait for nothing;
//! - members on other servers get the frames published during the outage after the
//!   reconnect: late, once, and in each publisher's order (but after frames other servers
//!   published meanwhile). Lost for them are frames that had left the publishing server's
//!   local history by then (more than `--limit`, or `--channel-bytes`, of newer frames in
//!   that channel) without having got through the client's buffer, and everything a server
//!   held back if it was stopped before NATS came back;
//! - a member that leaves before the reconnect never gets the other servers' outage frames
//!   live (they are in the history the next time it joins);
//! - a client that joins while NATS is down does not wait for the cluster's history: when
//!   the link comes back, the frames of the stream it lacks arrive as live frames, and
//!   join frames of other servers' clients (history only) not at all;
//! - frames held back by a server whose channel has had no local client for `--peer-grace`
//!   by the reconnect are published when a client joins that channel there again;
//! - an outage longer than the duplicate window (two minutes) can leave a frame twice in the
//!   stream (still delivered once: every server drops a key it has stored);
//! - if the JetStream store itself is lost, the history from before is gone from NATS
//!   (servers keep their local history, and serve it to their own joiners).
//!
//! A stopping server publishes what its channels still hold for up to 2 s; frames that
//! arrived in its last moments may not make it if the process exits first.
//!
//! A frame larger than the NATS server's `max_payload` (1 MiB by default; raise it to at
//! least `--max-message-size`) is delivered locally but cannot be published; it is logged and
//! counted in `mles_nats_publish_failures`.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, LastRawMessageErrorKind, StorageType};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, ServerAddr};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use log::{debug, info, warn};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use tokio::sync::watch;

use crate::frame::{Frame, FrameKind};
use crate::hub::{Backplane, Channel, Entry, Member, MemberId, MemberKind, MsgKey};
use crate::limits::Backoff;
use crate::server::Shared;
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

/// The link's uid in the local channel; clients' uids are printable, so no clash.
const LINK_UID: &str = "\u{1}nats";
/// Frames and bytes taken from the channel per lock.
const FETCH_BATCH: usize = 256;
const FETCH_BYTES: usize = 1 << 20;
/// How long a stopping link may spend publishing what is left.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest time a link may take to subscribe before it starts over.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a link checks whether its channel still has local clients.
const ACTIVITY_STEP: Duration = Duration::from_millis(250);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Why a link starts a new session after NATS came back.
const RECONNECTED: &str = "NATS reconnected: starting over";
/// Origins remembered per channel for "already published".
const ORIGINS_KEPT: usize = 1024;
/// Past link members remembered per channel (their frames came from NATS).
const LINK_MEMBERS_KEPT: usize = 64;

/// Characters escaped in the origin header: controls, and those that frame it.
const ORIGIN_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b':');

/// NATS settings, validated. (Its `Debug` leaves out URL credentials.)
#[derive(Clone)]
pub struct NatsConfig {
    pub urls: Vec<ServerAddr>,
    /// Credentials file (JWT and NKey seed).
    pub creds: Option<PathBuf>,
    /// Extra CA certificate (PEM) for NATS servers with private certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for NATS servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Replicas of the stream.
    pub replicas: usize,
    /// How long a link stays up after its channel's last local client left.
    pub grace: Duration,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers: Vec<String> = self
            .urls
            .iter()
            .map(|u| format!("{}:{}", u.host(), u.port()))
            .collect();
        f.debug_struct("NatsConfig")
            .field("servers", &servers)
            .field("creds", &self.creds)
            .field("ca", &self.ca)
            .field("replicas", &self.replicas)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl NatsConfig {
    /// Settings for the NATS servers at `urls` (comma separated), all else default.
    pub fn new(urls: &str) -> Result<NatsConfig, Error> {
        Ok(NatsConfig {
            urls: parse_urls(urls.split(','))?,
            creds: None,
            ca: None,
            client_cert: None,
            replicas: 1,
            grace: Duration::from_secs(30),
        })
    }

    /// The settings of `--nats` and friends; `None` without `--nats`.
    pub fn from_args(args: &crate::config::Args) -> Result<Option<NatsConfig>, Error> {
        let urls = parse_urls(args.nats.iter().map(String::as_str))?;
        let extras = args.nats_creds.is_some()
            || args.nats_ca.is_some()
            || args.nats_client_cert.is_some()
            || args.nats_client_key.is_some();
        if urls.is_empty() {
            if extras {
                return Err(Error::Config(
                    "--nats-creds, --nats-ca and --nats-client-cert/key need --nats".into(),
                ));
            }
            return Ok(None);
        }
        for file in [
            &args.nats_creds,
            &args.nats_ca,
            &args.nats_client_cert,
            &args.nats_client_key,
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = std::fs::metadata(file) {
                return Err(Error::Config(format!(
                    "cannot read '{}': {e}",
                    file.display()
                )));
            }
        }
        let client_cert = match (&args.nats_client_cert, &args.nats_client_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "--nats-client-cert and --nats-client-key go together".into(),
                ))
            }
        };
        if !(1..=5).contains(&args.nats_replicas) {
            return Err(Error::Config("--nats-replicas must be 1 to 5".into()));
        }
        Ok(Some(NatsConfig {
            urls,
            creds: args.nats_creds.clone(),
            ca: args.nats_ca.clone(),
            client_cert,
            replicas: args.nats_replicas,
            grace: Duration::from_secs(args.peer_grace),
        }))
    }
}

fn parse_urls<'a>(urls: impl Iterator<Item = &'a str>) -> Result<Vec<ServerAddr>, Error> {
    urls.map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| Error::Config(format!("NATS URL '{u}': {e}")))
        })
        .collect()
}

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

/// What `/health` should call degraded: `Some("nats")` while `--nats` is set and NATS is
/// not connected.
pub fn degraded(shared: &Shared) -> Option<&'static str> {
    (shared.config.nats.is_some() && shared.metrics.nats_connected.get() == 0).then_some("nats")
}

/// The backplane: one NATS connection, and a link per channel with local clients.
pub struct Nats {
    shared: Weak<Shared>,
    config: NatsConfig,
    client: Client,
    /// Counts connections made: a link starts over after a reconnect, since the server
    /// may have lost its consumer (a restarted NATS server has).
    connections: Arc<watch::Sender<u64>>,
    js: async_nats::jetstream::Context,
    /// The stream, once created or updated on this connection.
    stream: tokio::sync::Mutex<Option<stream::Stream>>,
    links: Mutex<Links>,
}

#[derive(Default)]
struct Links {
    by_channel: HashMap<Arc<str>, Arc<Link>>,
    /// Size after the last pruning of links of vanished channels.
    pruned_at: usize,
}

/// One channel's link: its task's state, kept while the channel exists.
struct Link {
    name: Arc<str>,
    running: AtomicBool,
    /// True while the consumer has read the subject up to where it ended at subscribe time.
    caught_up: watch::Sender<bool>,
    sent: Mutex<Sent>,
}

/// What a channel's links have done, so a new link publishes only what is missing.
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

impl Link {
    fn sent(&self) -> MutexGuard<'_, Sent> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Nats {
    /// Connects in the background (the server starts even while NATS is down) and creates
    /// or updates the stream as soon as NATS answers. Fails only on bad settings.
    pub async fn connect(shared: Weak<Shared>, config: NatsConfig) -> Result<Arc<Nats>, Error> {
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
        let name = shared
            .upgrade()
            .map(|s| format!("mles {}", s.config.server_id))
            .unwrap_or_else(|| "mles".into());
        let events = shared.clone();
        let connections = Arc::new(watch::Sender::new(0u64));
        let counter = connections.clone();
        let was_connected = Arc::new(AtomicBool::new(false));
        options = options
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let shared = events.upgrade();
                let was_connected = was_connected.clone();
                let counter = counter.clone();
                async move {
                    let Some(shared) = shared else { return };
                    let metrics = &shared.metrics;
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
        let js = async_nats::jetstream::new(client.clone());
        let nats = Arc::new(Nats {
            shared,
            config,
            client,
            connections,
            js,
            stream: tokio::sync::Mutex::new(None),
            links: Mutex::new(Links::default()),
        });
        tokio::spawn(prepare_stream(Arc::downgrade(&nats)));
        Ok(nats)
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn links(&self) -> MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream, created or updated once per connection lifetime (again after an error).
    async fn stream(&self, shared: &Shared) -> Result<stream::Stream, String> {
        let mut cached = self.stream.lock().await;
        if let Some(stream) = cached.as_ref() {
            return Ok(stream.clone());
        }
        let config = stream::Config {
            name: STREAM.to_string(),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            max_messages_per_subject: per_subject_limit(shared),
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            num_replicas: self.config.replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        self.js
            .create_or_update_stream(config)
            .await
            .map_err(|e| format!("creating stream {STREAM}: {e}"))?;
        let stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| format!("getting stream {STREAM}: {e}"))?;
        *cached = Some(stream.clone());
        Ok(stream)
    }

    async fn forget_stream(&self) {
        *self.stream.lock().await = None;
    }

    /// The link of channel `name`, its task started if it is not running.
    fn start(self: &Arc<Self>, name: &str) -> Arc<Link> {
        let link = {
            let mut links = self.links();
            if links.by_channel.len() >= 2 * links.pruned_at.max(64) {
                if let Some(shared) = self.shared.upgrade() {
                    links.by_channel.retain(|name, link| {
                        link.running.load(Ordering::Acquire) || shared.hub.channel(name).is_some()
                    });
                }
                links.pruned_at = links.by_channel.len();
            }
            links
                .by_channel
                .entry(Arc::from(name))
                .or_insert_with_key(|name| {
                    Arc::new(Link {
                        name: name.clone(),
                        running: AtomicBool::new(false),
                        caught_up: watch::Sender::new(false),
                        sent: Mutex::new(Sent::default()),
                    })
                })
                .clone()
        };
        if !link.running.swap(true, Ordering::AcqRel) {
            let nats = self.clone();
            let link = link.clone();
            tokio::spawn(async move {
                if let Some(shared) = nats.shared.upgrade() {
                    run_link(&nats, &shared, &link).await;
                }
                link.caught_up.send_replace(false);
                link.running.store(false, Ordering::Release);
                // A client may have joined just as the link gave up.
                if let Some(shared) = nats.shared.upgrade() {
                    let clients = shared.hub.channel(&link.name).map(|c| c.client_count());
                    if !shared.shutdown.is_shutdown() && clients.unwrap_or(0) > 0 {
                        nats.start(&link.name);
                    }
                }
            });
        }
        link
    }
}

impl Backplane for Arc<Nats> {
    fn channel_active(&self, channel: &Arc<Channel>) {
        self.start(channel.name());
    }

    fn ready(&self, channel: &str) -> BoxFuture<'static, ()> {
        let link = self.start(channel);
        let mut caught_up = link.caught_up.subscribe();
        let connected = self.connected();
        Box::pin(async move {
            if connected {
                let waited = tokio::time::timeout(READY_TIMEOUT, caught_up.wait_for(|c| *c));
                if waited.await.is_err() {
                    debug!(
                        "channel {}: joining before its NATS history caught up",
                        link.name
                    );
                }
            }
        })
    }
}

/// Creates or updates the stream as soon as NATS answers, so a misconfiguration shows in
/// the log at start rather than at the first join.
async fn prepare_stream(nats: Weak<Nats>) {
    loop {
        let Some(nats) = nats.upgrade() else { return };
        let Some(shared) = nats.shared.upgrade() else {
            return;
        };
        if shared.shutdown.is_shutdown() {
            return;
        }
        if nats.connected() {
            match nats.stream(&shared).await {
                Ok(_) => {
                    info!("NATS stream {STREAM} ready");
                    return;
                }
                Err(e) => warn!("NATS: {e}"),
            }
        }
        drop((nats, shared));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps a channel's link going while the channel has local clients (and for the grace
/// period after), starting a new session after each failure once NATS is reachable.
async fn run_link(nats: &Nats, shared: &Arc<Shared>, link: &Link) {
    let mut shutdown = shared.shutdown.clone();
    let mut activity = Activity::new();
    let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_CAP);
    loop {
        if shutdown.is_shutdown() || activity.inactive(shared, &link.name, nats.config.grace) {
            return;
        }
        let delay = if nats.connected() {
            let began = Instant::now();
            match session(nats, shared, link, &mut activity).await {
                Ok(()) => return,
                Err(e) if e == RECONNECTED => info!("NATS link for channel {}: {e}", link.name),
                Err(e) => warn!("NATS link for channel {}: {e}", link.name),
            }
            link.caught_up.send_replace(false);
            nats.forget_stream().await;
            if began.elapsed() > BACKOFF_CAP {
                backoff.reset();
            }
            backoff.next_delay()
        } else {
            // async-nats is reconnecting; look again soon.
            ACTIVITY_STEP
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.recv() => return,
        }
    }
}

/// Tracks when a channel last had local clients.
struct Activity {
    last_client: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            last_client: Instant::now(),
        }
    }

    /// True once the channel has had no local client for `grace`. (Frames arriving from
    /// NATS do not count: they would keep a busy channel's link up forever.)
    fn inactive(&mut self, shared: &Shared, name: &str, grace: Duration) -> bool {
        let clients = shared.hub.channel(name).map_or(0, |c| c.client_count());
        if clients > 0 {
            self.last_client = Instant::now();
        }
        clients == 0 && self.last_client.elapsed() >= grace
    }

    async fn wait_inactive(&mut self, shared: &Shared, name: &str, grace: Duration) {
        while !self.inactive(shared, name, grace) {
            tokio::time::sleep(ACTIVITY_STEP).await;
        }
    }
}

/// One connected stretch of a link: joins the channel, consumes its subject and publishes
/// local frames until the channel goes quiet or the server stops (`Ok`), or something fails
/// (`Err`: the caller starts a new session).
async fn session(
    nats: &Nats,
    shared: &Shared,
    link: &Link,
    activity: &mut Activity,
) -> Result<(), String> {
    link.caught_up.send_replace(false);
    let mut reconnected = nats.connections.subscribe();
    let subject = subject(&link.name);
    // Each step has its own request timeout; this bounds them together, so a link never
    // hangs half-open while its channel waits for it.
    let (last, mut messages) =
        tokio::time::timeout(SETUP_TIMEOUT, subscribe(nats, shared, &subject))
            .await
            .map_err(|_| format!("no answer from JetStream in {SETUP_TIMEOUT:?}"))??;
    shared.hub.prepare(&link.name).await;
    let mut member = shared
        .hub
        .join(&link.name, LINK_UID, MemberKind::Peer, None)
        .map_err(|e| e.to_string())?;
    member.take_join_frames();
    {
        let mut sent = link.sent();
        sent.link_members.push_back(member.id());
        if sent.link_members.len() > LINK_MEMBERS_KEPT {
            sent.link_members.pop_front();
        }
    }
    if last == 0 {
        link.caught_up.send_replace(true);
    }
    debug!("NATS link for channel {} up", link.name);

    let capacity = per_subject_limit(shared) as u64;
    let consume = async {
        let mut first = true;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| format!("consuming: {e}"))?;
            let (sequence, pending) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(e) => return Err(format!("message without JetStream info: {e}")),
            };
            // With the subject's whole capacity undelivered, the stream may have discarded
            // frames this link never read since the previous one.
            if !std::mem::take(&mut first) && pending + 1 >= capacity {
                shared.metrics.nats_lagged.inc();
                warn!(
                    "NATS link for channel {} fell {} frames behind the stream: frames may have been lost; starting over",
                    link.name,
                    pending + 1
                );
                return Err("fell behind the stream".to_string());
            }
            match decode(&message.headers, &message.payload) {
                Some((key, live, frame)) => {
                    let frame = crate::budget::charge_frame(&shared.budget, frame);
                    member.relay(key, live, frame);
                }
                None => debug!("skipping a message on {subject} without Mles headers"),
            }
            if sequence >= last || pending == 0 {
                link.caught_up
                    .send_if_modified(|c| !std::mem::replace(c, true));
            }
        }
        Err::<(), String>("the consumer ended".to_string())
    };
    let publish = publish_loop(nats, shared, link, &subject, &member);
    let stop = async {
        let mut shutdown = shared.shutdown.clone();
        tokio::select! {
            _ = shutdown.recv() => {}
            _ = activity.wait_inactive(shared, &link.name, nats.config.grace) => {}
        }
    };
    // A channel past its lifespan is replaced by a new one of the same name.
    let renewed = async {
        loop {
            tokio::time::sleep(ACTIVITY_STEP).await;
            let current = shared.hub.channel(&link.name);
            if !current.is_some_and(|c| Arc::ptr_eq(&c, member.channel())) {
                return;
            }
        }
    };
    let failed = tokio::select! {
        result = consume => result.err(),
        result = publish => result.err(),
        _ = reconnected.changed() => Some(RECONNECTED.to_string()),
        _ = renewed => Some("the channel was renewed: joining the new one".to_string()),
        _ = stop => None,
    };
    if let Some(e) = failed {
        return Err(e);
    }
    // Publish what local members sent last, so a server stopping loses nothing it had.
    let flush = async {
        let mut entries = Vec::new();
        while member.has_pending() {
            if member
                .fetch_entries(&mut entries, FETCH_BATCH, FETCH_BYTES)
                .is_err()
            {
                break;
            }
            publish_batch(nats, shared, link, &subject, &mut entries, false).await?;
        }
        Ok::<(), String>(())
    };
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, flush).await;
    drop(member);
    debug!("NATS link for channel {} closed", link.name);
    Ok(())
}

/// Where `subject` ends now (the consumer has caught up once it read this far; 0 when
/// empty) and an ordered consumer of it from its start.
async fn subscribe(nats: &Nats, shared: &Shared, subject: &str) -> Result<(u64, Ordered), String> {
    let stream = nats.stream(shared).await?;
    let last = match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => message.sequence,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
        Err(e) => return Err(format!("reading the end of the channel's history: {e}")),
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject.to_string(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating the consumer: {e}"))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| format!("consuming: {e}"))?;
    Ok((last, messages))
}

/// Messages the stream keeps per channel: the history plus a member's room to fall behind.
fn per_subject_limit(shared: &Shared) -> i64 {
    let hub = &shared.config.hub;
    (hub.history_limit + hub.queue_frames) as i64
}

/// Publishes what the link's member fetches until something fails.
async fn publish_loop(
    nats: &Nats,
    shared: &Shared,
    link: &Link,
    subject: &str,
    member: &Member,
) -> Result<(), String> {
    let mut entries = Vec::new();
    loop {
        member.pending().await;
        member
            .fetch_entries(&mut entries, FETCH_BATCH, FETCH_BYTES)
            .map_err(|e| e.to_string())?;
        publish_batch(nats, shared, link, subject, &mut entries, true).await?;
    }
}

/// Publishes the entries that need it and waits for their acknowledgements. Entries are
/// consumed. With `strict`, a frame too big for NATS is skipped; any other failure fails.
async fn publish_batch(
    nats: &Nats,
    shared: &Shared,
    link: &Link,
    subject: &str,
    entries: &mut Vec<Entry>,
    strict: bool,
) -> Result<(), String> {
    let mut acks: Vec<(MsgKey, PublishAckFuture)> = Vec::new();
    for entry in entries.drain(..) {
        if !link.sent().needs_publishing(&entry) {
            continue;
        }
        let (headers, payload) = encode(&entry);
        let message = PublishMessage::build().payload(payload).headers(headers);
        match nats.js.send_publish(subject.to_string(), message).await {
            Ok(ack) => acks.push((entry.key, ack)),
            Err(e) => {
                shared.metrics.nats_publish_failures.inc();
                if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                    warn!(
                        "channel {}: a frame of {} bytes is over the NATS server's max_payload; delivered here only",
                        link.name,
                        entry.frame.len()
                    );
                    continue;
                }
                if strict {
                    return Err(format!("publishing: {e}"));
                }
            }
        }
    }
    for (key, ack) in acks {
        match ack.await {
            Ok(_) => link.sent().acked(&key),
            Err(e) => {
                shared.metrics.nats_publish_failures.inc();
                return Err(format!("publish not acknowledged: {e}"));
            }
        }
    }
    Ok(())
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
    let msg = Frame::new(kind, payload.clone())?;
    let key = MsgKey {
        origin: Arc::from(origin.as_ref()),
        seq,
    };
    Some((key, live, msg))
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

    #[test]
    fn frames_survive_encoding_with_key_type_and_liveness() {
        let entries = [
            Entry {
                seq: 1,
                from: 3,
                live: true,
                key: MsgKey {
                    origin: Arc::from("alpha: beta#1f"),
                    seq: 42,
                },
                frame: Frame::text("hello"),
            },
            Entry {
                seq: 1,
                from: 3,
                live: false,
                key: MsgKey {
                    origin: Arc::from("a%b"),
                    seq: 0,
                },
                frame: Frame::text("{\"uid\":\"x\"}"),
            },
            Entry {
                seq: 1,
                from: 3,
                live: true,
                key: MsgKey {
                    origin: Arc::from("a"),
                    seq: u64::MAX,
                },
                frame: Frame::binary(vec![0u8, 255, 7]),
            },
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
            let (key, live, msg) = decode(&Some(headers), &payload).unwrap();
            assert_eq!(key, entry.key);
            assert_eq!(live, entry.live);
            assert_eq!(msg, entry.frame);
        }
        assert!(decode(&None, &Bytes::from_static(b"x")).is_none());
    }

    #[test]
    fn only_unacknowledged_local_frames_need_publishing() {
        let mut sent = Sent::default();
        let entry = |from, origin: &str, seq| Entry {
            seq: 1,
            from,
            live: true,
            key: MsgKey {
                origin: Arc::from(origin),
                seq,
            },
            frame: Frame::text("x"),
        };
        assert!(sent.needs_publishing(&entry(5, "here", 1)));
        assert!(!sent.needs_publishing(&entry(0, "here", 1)), "restored");
        sent.link_members.push_back(9);
        assert!(!sent.needs_publishing(&entry(9, "there", 1)), "from NATS");
        sent.acked(&MsgKey {
            origin: Arc::from("here"),
            seq: 3,
        });
        assert!(!sent.needs_publishing(&entry(5, "here", 3)));
        assert!(sent.needs_publishing(&entry(5, "here", 4)));
    }

    #[test]
    fn flags_are_validated() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["mles", "--wwwroot", "."];
            argv.extend_from_slice(extra);
            crate::config::Config::from_args(
                crate::config::Args::try_parse_from(argv).unwrap(),
                crate::config::Secrets::default(),
            )
        };
        let c = parse(&[
            "--nats",
            "nats://127.0.0.1:4222,127.0.0.1:4223",
            "--limit",
            "7",
        ])
        .unwrap();
        let nats = c.nats.expect("nats configured");
        assert_eq!(nats.urls.len(), 2);
        assert_eq!(nats.replicas, 1);
        assert!(parse(&[]).unwrap().nats.is_none());
        let err = |r: Result<crate::config::Config, Error>| r.unwrap_err().to_string();
        assert!(
            err(parse(&["--nats", "n:1", "--peer", "ws://127.0.0.1:1/"]))
                .contains("--peer and --nats")
        );
        assert!(err(parse(&["--nats-ca", "Cargo.toml"])).contains("need --nats"));
        assert!(
            err(parse(&["--nats", "n:1", "--nats-creds", "/nonexistent"])).contains("cannot read")
        );
        assert!(err(parse(&[
            "--nats",
            "n:1",
            "--nats-client-cert",
            "Cargo.toml"
        ]))
        .contains("go together"));
        assert!(err(parse(&["--nats", "http://x"])).contains("NATS URL"));
        let debug = format!(
            "{:?}",
            NatsConfig::new("nats://me:secret@127.0.0.1:4222").unwrap()
        );
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn urls_are_checked() {
        assert!(NatsConfig::new("nats://127.0.0.1:4222").is_ok());
        assert_eq!(
            NatsConfig::new("127.0.0.1:1,tls://h:2").unwrap().urls.len(),
            2
        );
        assert!(NatsConfig::new("http://x").is_err());
    }
}
