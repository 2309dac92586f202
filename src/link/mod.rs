//! Links to other servers, in one place: which channels have a link, when it starts (the
//! first local client of a channel), when it ends (`--peer-grace` after the channel's
//! last local client left — frames arriving over the link do not keep it up), restarts
//! with backoff, and the state `/health` reports. The two kinds of link, peer servers
//! ([`peer`]) and a NATS JetStream cluster ([`nats`]), differ only in their [`Transport`]:
//! connect, send a batch, receive the next frame.
//!
//! A link is a member of its channel in the links' namespace; [`pump`] moves frames
//! between that member and the transport: what the channel has for the other side is
//! queued on the connection, and what arrives is relayed into the channel, where each
//! frame's key makes it stored and delivered once however many paths bring it. When every
//! reader of the channel is far behind, the pump stops receiving until they catch up, so a
//! link catching up after a reconnect slows down instead of cutting local readers off.

pub mod nats;
pub mod peer;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use log::{debug, info, warn};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::frame::Frame;
use crate::hub::{
    Backplane, Channel, Entry, Hub, JoinError, Member, MemberId, MemberKind, MsgKey, Sequencer,
};
use crate::limits::Backoff;
use crate::shutdown::Shutdown;
use crate::websocket::ProtocolError;

/// Frames and bytes a link takes from its channel per batch.
const FETCH_FRAMES: usize = 256;
const FETCH_BYTES: usize = 256 * 1024;
/// How often a link looks whether its channel was renewed (after its lifespan).
const RENEWAL_CHECK: Duration = Duration::from_millis(250);
/// How long a stopping link may spend sending what is left.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a link failed; the link starts over (with backoff) after any of them.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the peer did not prove the peer key")]
    PeerAuth,
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("malformed frame from the other side")]
    Malformed,
    #[error("the other side closed the link")]
    Closed,
    #[error("no answer to pings")]
    Unresponsive,
    #[error("writes stalled")]
    Stalled,
    #[error("no memory for a frame from the other side")]
    OutOfMemory,
    #[error("fell behind the channel")]
    Lagged,
    #[error("the channel was renewed")]
    Renewed,
    #[error("NATS is not connected")]
    NotConnected,
    #[error("NATS connection re-established: starting over")]
    Reconnected,
    #[error("fell {0} frames behind the stream: frames may have been lost; starting over")]
    StreamLag(u64),
    #[error("the stream consumer stopped delivering: rebuilding it")]
    ConsumerLost,
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Join(#[from] JoinError),
}

/// A frame from the other side: its key (none from a plain mles v2 server, whose frames are
/// told apart by content), whether it is live (not a join frame), and the frame.
#[derive(Debug)]
pub struct Received {
    pub key: Option<MsgKey>,
    pub live: bool,
    pub frame: Frame,
    /// Its sequence in the cluster's stream (NATS).
    pub stream: Option<u64>,
}

/// How a kind of link reaches the other side.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// For logs: `peer ws://host/`, `NATS`.
    fn name(&self) -> &str;

    /// For `/health`: `peer`, `nats`.
    fn kind(&self) -> &'static str;

    /// Whether the link's member stays in the channel between connections, so that what
    /// local members sent while the link was down is sent when it is back (NATS, which
    /// publishes only what it has not acknowledged); otherwise each connection joins
    /// afresh and both sides replay their history to each other (peers).
    fn keeps_member(&self) -> bool {
        false
    }

    /// Opens a link for `channel`.
    async fn connect(&self, channel: &str) -> Result<Box<dyn LinkConnection>, LinkError>;

    /// Resolves once a client joining `channel` would get the history this transport
    /// shares (a cluster's stored frames), or waiting longer is not worth it.
    fn ready(&self, _channel: &str) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    /// What `/health` should call degraded, while this transport is.
    fn degraded(&self) -> Option<&'static str> {
        None
    }

    /// Delays between attempts to connect: first and longest.
    fn backoff(&self) -> (Duration, Duration) {
        (Duration::from_millis(250), Duration::from_secs(30))
    }
}

/// One connected link.
#[async_trait]
pub trait LinkConnection: Send {
    /// The link's member name in the channel (the links' namespace).
    fn member_name(&self) -> String;

    /// Whether the link takes every join frame, also those stored after it joined: a
    /// backplane that keeps the channel's history elsewhere must store them there.
    fn takes_join_frames(&self) -> bool {
        false
    }

    /// The link's member joined the channel as `member`.
    fn joined(&mut self, _member: MemberId) {}

    /// The epoch of the stream this link orders its channel's frames by, once it can
    /// (connected and caught up with the stream); `None` for links that do not order.
    fn orders(&self) -> Option<u64> {
        None
    }

    /// Queues local frames for the other side (the batch is consumed); never waits.
    fn send(&mut self, batch: &mut Vec<Entry>) -> Result<(), LinkError>;

    /// Whether more may be queued now.
    fn ready_to_send(&self) -> bool;

    /// Drives the link — writes what is queued — and returns the next frame received.
    /// Cancel-safe: whatever was read stays in the connection.
    async fn recv(&mut self) -> Result<Received, LinkError>;

    /// Sends what is still queued and closes. The caller bounds the time.
    async fn close(&mut self) {}
}

/// A transport's gauge of links up and counter of failed attempts.
#[derive(Clone, Default)]
pub struct LinkCounters {
    pub up: Gauge,
    pub failures: Counter,
    /// Links that should be up and are not (failed, waiting to try again).
    pub down: Gauge,
}

/// What links need of the server.
pub struct LinkContext {
    pub hub: Arc<Hub>,
    pub shutdown: Shutdown,
    /// How long a link stays up after its channel's last local client left.
    pub grace: Duration,
    /// Longest a link waits for its channel's readers before going on.
    pub pause_limit: Duration,
}

/// Every link of this server: one task per (channel, transport) while the channel is used.
pub struct Links {
    context: LinkContext,
    transports: Vec<(Arc<dyn Transport>, LinkCounters)>,
    running: Mutex<HashSet<(Arc<str>, usize)>>,
}

impl Links {
    pub fn new(
        context: LinkContext,
        transports: Vec<(Arc<dyn Transport>, LinkCounters)>,
    ) -> Arc<Links> {
        Arc::new(Links {
            context,
            transports,
            running: Mutex::new(HashSet::new()),
        })
    }

    fn running(&self) -> MutexGuard<'_, HashSet<(Arc<str>, usize)>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `/health` should call degraded now, if anything: a transport that is down, or
    /// a link of it that failed and is trying again.
    pub fn degraded(&self) -> Option<&'static str> {
        self.transports.iter().find_map(|(t, counters)| {
            t.degraded()
                .or_else(|| (counters.down.get() > 0).then(|| t.kind()))
        })
    }

    /// Starts the links of `channel` that are not running.
    fn start(self: &Arc<Self>, channel: &str) {
        for index in 0..self.transports.len() {
            let key = (Arc::from(channel), index);
            if !self.running().insert(key.clone()) {
                continue;
            }
            let links = self.clone();
            tokio::spawn(async move {
                links.run_link(&key.0, index).await;
                links.running().remove(&key);
                // A client may have joined just as the link gave up.
                let clients = links.context.hub.channel(&key.0).map(|c| c.client_count());
                if !links.context.shutdown.is_shutdown() && clients.unwrap_or(0) > 0 {
                    links.start(&key.0);
                }
            });
        }
    }

    /// True once `channel` has had no local client for the grace period: measured from
    /// its last client leaving (or from `since`, while the channel does not exist yet).
    fn inactive(&self, channel: &str, since: Instant) -> bool {
        let grace = self.context.grace;
        match self.context.hub.channel(channel) {
            Some(chan) => chan.without_clients_for().is_some_and(|idle| idle >= grace),
            None => since.elapsed() >= grace,
        }
    }

    async fn wait_inactive(&self, channel: &str, since: Instant) {
        let step =
            (self.context.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        while !self.inactive(channel, since) {
            tokio::time::sleep(step).await;
        }
    }

    /// Keeps one link of `channel` up while the channel is used, starting over after each
    /// failure with backoff.
    async fn run_link(&self, channel: &str, index: usize) {
        let (transport, counters) = &self.transports[index];
        let mut shutdown = self.context.shutdown.clone();
        let (first, cap) = transport.backoff();
        let mut backoff = Backoff::new(first, cap);
        let since = Instant::now();
        let mut member: Option<Member> = None;
        let mut down = Down::new(&counters.down);
        loop {
            if shutdown.is_shutdown() || self.inactive(channel, since) {
                return;
            }
            match transport.connect(channel).await {
                Ok(mut conn) => {
                    let started = Instant::now();
                    down.set(false);
                    counters.up.inc();
                    let result = self.serve(channel, &mut *conn, since, &mut member).await;
                    counters.up.dec();
                    match &result {
                        Ok(()) => debug!("{} link for channel {channel} closed", transport.name()),
                        Err(e @ LinkError::Reconnected) => {
                            info!("{} link for channel {channel}: {e}", transport.name())
                        }
                        Err(e) => {
                            warn!("{} link for channel {channel} down: {e}", transport.name())
                        }
                    }
                    if result.is_err() {
                        down.set(true);
                    }
                    if !transport.keeps_member()
                        || matches!(result, Err(LinkError::Lagged | LinkError::Renewed))
                    {
                        member = None;
                    }
                    if let Some(member) = &member {
                        // Not reading while down: publishers must not wait for it.
                        member.set_blocked(true);
                    }
                    if started.elapsed() > cap {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    counters.failures.inc();
                    down.set(true);
                    debug!("{} link for channel {channel}: {e}", transport.name());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.recv() => return,
            }
        }
    }

    /// Joins the channel as the link's member (or goes on with the one kept from the last
    /// connection) and pumps until the link fails (`Err`) or the channel is no longer used
    /// or the server stops (`Ok`).
    async fn serve(
        &self,
        channel: &str,
        conn: &mut dyn LinkConnection,
        since: Instant,
        kept: &mut Option<Member>,
    ) -> Result<(), LinkError> {
        let hub = &self.context.hub;
        if kept.is_none() {
            hub.prepare(channel).await;
            let mut member = hub.join(channel, &conn.member_name(), MemberKind::Peer, None)?;
            if conn.takes_join_frames() {
                member.take_join_frames();
            }
            *kept = Some(member);
        }
        let member = kept.as_ref().expect("joined above");
        member.set_blocked(false);
        conn.joined(member.id());
        info!("link {} for channel {channel} up", conn.member_name());
        let mut shutdown = self.context.shutdown.clone();
        let result = tokio::select! {
            result = pump(conn, member, hub, self.context.pause_limit) => result,
            _ = shutdown.recv() => Ok(()),
            _ = self.wait_inactive(channel, since) => Ok(()),
        };
        if result.is_ok() {
            // Send what local members sent last, so a server stopping loses nothing it had.
            let flush = async {
                let mut batch = Vec::new();
                while member.has_pending() {
                    if member
                        .fetch_entries(&mut batch, FETCH_FRAMES, FETCH_BYTES)
                        .is_err()
                        || batch.is_empty()
                    {
                        break;
                    }
                    conn.send(&mut batch)?;
                }
                conn.close().await;
                Ok::<(), LinkError>(())
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, flush).await;
            *kept = None;
        }
        result
    }
}

/// One link's share of its transport's `down` gauge, given back when the link ends.
struct Down<'a> {
    gauge: &'a Gauge,
    down: bool,
}

impl<'a> Down<'a> {
    fn new(gauge: &'a Gauge) -> Down<'a> {
        Down { gauge, down: false }
    }

    fn set(&mut self, down: bool) {
        if down != self.down {
            self.down = down;
            if down {
                self.gauge.inc();
            } else {
                self.gauge.dec();
            }
        }
    }
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// The hub's view of the links: started for a channel by its first client (or by a client
/// about to join, when a transport shares history it must bring in first).
pub struct LinkBackplane(pub Arc<Links>);

impl Backplane for LinkBackplane {
    fn channel_active(&self, channel: &Arc<Channel>) {
        self.0.start(channel.name());
    }

    fn ready(&self, channel: &str) -> BoxFuture<'static, ()> {
        let links = &self.0;
        links.start(channel);
        let waits: Vec<_> = links
            .transports
            .iter()
            .map(|(t, _)| t.ready(channel))
            .collect();
        Box::pin(async move {
            futures::future::join_all(waits).await;
        })
    }
}

/// A channel's frames ordered by this link; dropping it (the link ends, however) hands
/// what is on its way back to the channel, stored at once.
struct Ordering {
    sequencer: Arc<Sequencer>,
    channel: Arc<Channel>,
}

impl Drop for Ordering {
    fn drop(&mut self) {
        self.channel.detach_sequencer();
    }
}

/// Moves frames between `member` and the connection until the link fails.
pub async fn pump(
    conn: &mut dyn LinkConnection,
    member: &Member,
    hub: &Hub,
    pause_limit: Duration,
) -> Result<(), LinkError> {
    let mut batch = Vec::new();
    let mut renewal = tokio::time::interval(RENEWAL_CHECK);
    renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ordering: Option<Ordering> = None;
    loop {
        if ordering.is_none() {
            if let Some(epoch) = conn.orders() {
                // From now on the channel's clients' frames go through the stream first.
                let sequencer = member.channel().attach_sequencer(epoch);
                ordering = Some(Ordering {
                    sequencer,
                    channel: member.channel().clone(),
                });
            }
        }
        // The channel's frames first: what it stored before a client's frames reached the
        // sequencer (that client's join frame, say) goes before them into the stream.
        while conn.ready_to_send() && member.has_pending() {
            member
                .fetch_entries(&mut batch, FETCH_FRAMES, FETCH_BYTES)
                .map_err(|_| LinkError::Lagged)?;
            if batch.is_empty() {
                break;
            }
            conn.send(&mut batch)?;
        }
        if let Some(ordering) = &ordering {
            if conn.ready_to_send() && !member.has_pending() {
                ordering.sequencer.take(&mut batch);
                if !batch.is_empty() {
                    conn.send(&mut batch)?;
                }
            }
        }
        let waiting = async {
            match &ordering {
                Some(o) => std::future::poll_fn(|cx| o.sequencer.poll_waiting(cx)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = conn.recv() => {
                let received = received?;
                let published = match received.key {
                    Some(key) => member.relay_from_stream(key, received.live, received.frame, received.stream),
                    None => member.relay_by_content(received.frame),
                };
                if published.pause {
                    // Every local reader is far behind: stop taking frames until they
                    // catch up (TCP or the stream holds the rest back).
                    let writable = std::future::poll_fn(|cx| member.poll_writable(cx));
                    let _ = tokio::time::timeout(pause_limit, writable).await;
                }
            }
            _ = member.pending(), if conn.ready_to_send() => {}
            _ = waiting, if conn.ready_to_send() => {}
            _ = renewal.tick() => {
                // A channel past its lifespan is replaced by a new one of the same name.
                let current = hub.channel(member.channel().name());
                if !current.is_some_and(|c| Arc::ptr_eq(&c, member.channel())) {
                    return Err(LinkError::Renewed);
                }
            }
        }
    }
}
