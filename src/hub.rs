//! Channels: who is in each one, and the frames they share.
//!
//! Each channel keeps one ring of frames that is both its history and every member's
//! outbound queue. A member is a cursor into that ring: publishing appends once and wakes
//! the waiting members, who each copy out what lies past their cursor. So a publisher never
//! waits on any member, a frame is stored once however many members read it, and a new
//! member's history and the live frames after it are one contiguous run of the ring — no
//! gap and no duplicate by construction. A member whose cursor falls off the back of the
//! ring (it is more than the ring's frames or bytes behind) is told it lagged and is
//! disconnected; nobody else notices.
//!
//! Every frame carries a [`MsgKey`] — the server it entered the system on and a number —
//! so frames relayed between servers (peer links, a backplane) are stored and delivered
//! once however many paths bring them, and a restarted server can take back its history.
//!
//! Locks: the channel map's mutex is taken only to join and to sweep expired channels;
//! each channel has its own mutex, held for a few pointer copies at a time, never across
//! an `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// Sizes of each channel's ring.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Frames replayed to a new member.
    pub history_limit: usize,
    /// Frames a member may fall behind before it is disconnected.
    pub queue_frames: usize,
    /// Bytes of frames a channel keeps, for history and for members catching up.
    pub channel_bytes: usize,
    /// How long a channel without members keeps its history after its last activity.
    pub history_expiry: Duration,
    /// Most clients in one channel.
    pub max_members: Option<usize>,
    /// Most frames clients may publish to one channel.
    pub max_messages: Option<u64>,
    /// How long a channel lives from its creation.
    pub lifespan: Option<Duration>,
    /// Most channels held at once; past it the least recently active channel without
    /// members is dropped to make room, and if every channel has members new ones are
    /// refused. Bounds the memory that clients creating channels can make the server hold.
    pub max_channels: usize,
}

impl HubConfig {
    /// The ring holds the history plus room for members to fall behind, so a new member
    /// whose whole history is still unsent has the same slack as everyone else.
    fn ring_frames(&self) -> usize {
        self.history_limit + self.queue_frames
    }

    /// Relayed keys remembered per channel for de-duplication.
    fn seen_capacity(&self) -> usize {
        (self.ring_frames() * 4).max(4096)
    }
}

/// Identifies one membership (one connection's stay in one channel).
pub type MemberId = u64;

/// Identifies a frame across servers: where it entered the system and its number there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MsgKey {
    /// The entry server's id and boot epoch, e.g. `"alpha#18c2f0"`.
    pub origin: Arc<str>,
    pub seq: u64,
}

/// What a member is: a client of this server, or another server linked to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberKind {
    Client,
    Peer,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("uid already joined to this channel")]
    DuplicateUid,
    #[error("channel is full")]
    ChannelFull,
    #[error("server channel limit reached")]
    TooManyChannels,
}

/// A client's frame was refused: the channel reached its message limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("channel message limit reached")]
pub struct MessageLimit;

/// Notices queued per presence watcher at most; older ones are dropped first.
const MAX_NOTICES: usize = 1024;

/// Join and leave notices for one member that asked for them.
#[derive(Default)]
struct Notices {
    queue: Mutex<VecDeque<Message>>,
    pending: std::sync::atomic::AtomicBool,
}

impl Notices {
    fn push(&self, notice: Message) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= MAX_NOTICES {
            queue.pop_front();
        }
        queue.push_back(notice);
        self.pending.store(true, Ordering::Release);
    }

    fn drain_into(&self, out: &mut Vec<Message>) {
        if self.pending.swap(false, Ordering::AcqRel) {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(queue.drain(..));
        }
    }
}

/// The presence notice for `uid` joining or leaving `channel` (documented in the README).
fn presence_notice(event: &str, uid: &str, channel: &str) -> Message {
    Message::text(
        serde_json::json!({"presence": event, "uid": uid, "channel": channel}).to_string(),
    )
}

/// A member fell further behind than its channel keeps frames for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too slow: fell behind the channel")]
pub struct Lagged;

/// A stored frame.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The member that put it here (a client, or the link it arrived on).
    pub from: MemberId,
    /// Join frames are history only: replayed to later members, never sent live.
    pub live: bool,
    pub key: MsgKey,
    pub msg: Message,
}

/// The hub's link to the world outside this server (peer links, a cluster backplane).
/// The hub tells it when a channel gains its first client; it joins the channel as a
/// [`MemberKind::Peer`] member and relays with [`Member::relay`].
pub trait Backplane: Send + Sync {
    fn channel_active(&self, channel: &Arc<Channel>);

    /// Resolves once a client joining `channel` next would get the history the backplane
    /// shares (a cluster's stored frames), or once waiting longer is not worth it. The
    /// backplane bounds the wait; by default there is nothing to wait for.
    fn ready(&self, _channel: &Arc<Channel>) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Receives every stored frame, for persistence. Must not block.
pub trait Recorder: Send + Sync {
    fn record(&self, channel: &Arc<Channel>, entry: &Entry);
    /// The channel was dropped from the hub (evicted); its stored history can go.
    fn forget(&self, channel: Arc<str>);
}

struct Ring {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    bytes: usize,
    /// Clients by uid.
    members: HashMap<Arc<str>, MemberId>,
    /// Links to other servers, by link name: a namespace of their own, so no client uid
    /// can take a link's place or be mistaken for one.
    links: HashMap<Arc<str>, MemberId>,
    /// Keys of relayed frames already stored, oldest first, for de-duplication.
    seen: HashSet<MsgKey>,
    seen_order: VecDeque<MsgKey>,
    last_activity: Instant,
    created: Instant,
    /// Frames clients published, for the per-channel message limit.
    messages: u64,
    /// Members that asked for join and leave notices.
    watchers: Vec<(MemberId, Arc<Notices>)>,
    /// Replaced by a new channel of the same name: frames its last members still send are
    /// not recorded, so they never mix into the new channel's history on disk.
    retired: bool,
}

impl Ring {
    fn notify_presence(&self, except: MemberId, notice: &Message) {
        for (id, notices) in &self.watchers {
            if *id != except {
                notices.push(notice.clone());
            }
        }
    }

    fn head(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }

    /// Remembers a relayed key; false when it was already known.
    fn remember(&mut self, key: &MsgKey, capacity: usize) -> bool {
        if !self.seen.insert(key.clone()) {
            return false;
        }
        self.seen_order.push_back(key.clone());
        if self.seen_order.len() > capacity {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// Settings and identity every channel shares.
struct HubShared {
    config: HubConfig,
    /// This server's id and boot epoch: the origin of frames its clients publish.
    origin: Arc<str>,
    next_seq: AtomicU64,
    next_member: AtomicU64,
    backplane: OnceLock<Arc<dyn Backplane>>,
    recorder: OnceLock<Arc<dyn Recorder>>,
}

/// One channel: its ring and the signal that wakes members waiting for frames.
pub struct Channel {
    name: Arc<str>,
    ring: Mutex<Ring>,
    /// Sequence number the next frame will get; read without the lock to skip idle polls.
    head: AtomicU64,
    published: Notify,
    hub: Arc<HubShared>,
}

impl Channel {
    fn new(name: Arc<str>, hub: Arc<HubShared>) -> Channel {
        Channel {
            name,
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                first_seq: 0,
                bytes: 0,
                members: HashMap::new(),
                links: HashMap::new(),
                seen: HashSet::new(),
                seen_order: VecDeque::new(),
                last_activity: Instant::now(),
                created: Instant::now(),
                messages: 0,
                watchers: Vec::new(),
                retired: false,
            }),
            head: AtomicU64::new(0),
            published: Notify::new(),
            hub,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves a consistent ring (every mutation is a
        // single push/pop), so poisoning carries no information here.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends an entry and trims the ring to its bounds. The caller wakes members.
    fn push(self: &Arc<Self>, ring: &mut Ring, entry: Entry) {
        if let Some(recorder) = self.hub.recorder.get().filter(|_| !ring.retired) {
            recorder.record(self, &entry);
        }
        let config = &self.hub.config;
        ring.bytes += entry.msg.len();
        ring.entries.push_back(entry);
        let max_frames = config.ring_frames();
        while ring.entries.len() > max_frames
            || (ring.bytes > config.channel_bytes && ring.entries.len() > 1)
        {
            let old = ring.entries.pop_front().expect("ring is not empty");
            ring.bytes -= old.msg.len();
            ring.first_seq += 1;
        }
        ring.last_activity = Instant::now();
        self.head.store(ring.head(), Ordering::Release);
    }

    fn new_key(&self) -> MsgKey {
        MsgKey {
            origin: self.hub.origin.clone(),
            seq: self.hub.next_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Appends a frame from `member`, never waiting on anyone. First the member's cursor
    /// skips whatever pending frames are not for it (its own, or join frames after its
    /// join), so a member flooding the channel never counts its own frames against its
    /// lag budget. Each entry is skipped at most once, so this is amortised O(1).
    fn publish(
        self: &Arc<Self>,
        member: &Member,
        live: bool,
        key: Option<MsgKey>,
        msg: Message,
    ) -> Result<bool, MessageLimit> {
        {
            let mut ring = self.lock();
            let key = match key {
                None => {
                    if member.kind == MemberKind::Client {
                        if let Some(max) = self.hub.config.max_messages {
                            if ring.messages >= max {
                                return Err(MessageLimit);
                            }
                        }
                        ring.messages += 1;
                    }
                    self.new_key()
                }
                Some(key) => {
                    let capacity = self.hub.config.seen_capacity();
                    if key.origin == self.hub.origin || !ring.remember(&key, capacity) {
                        return Ok(false);
                    }
                    key
                }
            };
            let mut cursor = member.cursor.load(Ordering::Relaxed);
            if cursor >= ring.first_seq {
                let start = (cursor - ring.first_seq) as usize;
                for entry in ring.entries.range(start..) {
                    if member.wants(entry, cursor) {
                        break;
                    }
                    cursor += 1;
                }
            }
            let caught_up = cursor == ring.head();
            let entry = Entry {
                from: member.id,
                live,
                key,
                msg,
            };
            self.push(&mut ring, entry);
            if caught_up {
                cursor = ring.head();
            }
            member.cursor.store(cursor, Ordering::Relaxed);
        }
        self.published.notify_waiters();
        Ok(true)
    }

    /// Stores frames loaded from disk, as history, before anyone joins.
    pub fn restore(self: &Arc<Self>, entries: impl IntoIterator<Item = (MsgKey, bool, Message)>) {
        let mut ring = self.lock();
        let capacity = self.hub.config.seen_capacity();
        for (key, live, msg) in entries {
            if ring.remember(&key, capacity) {
                let config = &self.hub.config;
                ring.bytes += msg.len();
                ring.entries.push_back(Entry {
                    from: 0,
                    live,
                    key,
                    msg,
                });
                while ring.entries.len() > config.history_limit || ring.bytes > config.channel_bytes
                {
                    let old = ring.entries.pop_front().expect("ring is not empty");
                    ring.bytes -= old.msg.len();
                    ring.first_seq += 1;
                }
            }
        }
        self.head.store(ring.head(), Ordering::Release);
    }

    /// The last `history_limit` entries, oldest first (for persistence snapshots).
    pub fn history(&self) -> Vec<Entry> {
        let ring = self.lock();
        let skip = ring
            .entries
            .len()
            .saturating_sub(self.hub.config.history_limit);
        ring.entries.iter().skip(skip).cloned().collect()
    }

    /// Members currently joined, clients and links.
    pub fn member_count(&self) -> usize {
        let ring = self.lock();
        ring.members.len() + ring.links.len()
    }

    /// Whether a client with `uid` is joined now.
    pub fn has_member(&self, uid: &str) -> bool {
        self.lock().members.contains_key(uid)
    }

    /// Whether a link named `name` is joined now.
    pub fn has_link(&self, name: &str) -> bool {
        self.lock().links.contains_key(name)
    }

    /// Clients (not links) currently joined.
    pub fn client_count(&self) -> usize {
        self.lock().members.len()
    }

    /// When the channel's lifespan (if any) ends.
    pub fn end_of_life(&self) -> Option<Instant> {
        let lifespan = self.hub.config.lifespan?;
        Some(self.lock().created + lifespan)
    }

    /// How long ago the channel last saw a frame, join or leave.
    pub fn idle_for(&self) -> Duration {
        self.lock().last_activity.elapsed()
    }

    /// Frames and bytes currently held.
    pub fn stored(&self) -> (usize, usize) {
        let ring = self.lock();
        (ring.entries.len(), ring.bytes)
    }
}

/// All channels of this server.
pub struct Hub {
    channels: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
    shared: Arc<HubShared>,
}

impl Hub {
    /// A hub whose clients' frames originate at `server_id` (plus a boot epoch, so frames
    /// from before a restart are told apart from new ones).
    pub fn new(config: HubConfig, server_id: &str) -> Hub {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        Hub {
            channels: Mutex::new(HashMap::new()),
            shared: Arc::new(HubShared {
                config,
                origin: Arc::from(format!("{server_id}#{epoch:x}")),
                next_seq: AtomicU64::new(0),
                next_member: AtomicU64::new(1),
                backplane: OnceLock::new(),
                recorder: OnceLock::new(),
            }),
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// The origin this server's clients' frames carry.
    pub fn origin(&self) -> &Arc<str> {
        &self.shared.origin
    }

    /// Connects the hub to other servers; set once, before serving.
    pub fn set_backplane(&self, backplane: Arc<dyn Backplane>) {
        let _ = self.shared.backplane.set(backplane);
    }

    /// Sends every stored frame to `recorder`; set once, before serving.
    pub fn set_recorder(&self, recorder: Arc<dyn Recorder>) {
        let _ = self.shared.recorder.set(recorder);
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Channel>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel named `name`, created empty if needed.
    pub fn channel_or_create(&self, name: &str) -> Arc<Channel> {
        let mut channels = self.channels();
        channels
            .entry(Arc::from(name))
            .or_insert_with_key(|name| Arc::new(Channel::new(name.clone(), self.shared.clone())))
            .clone()
    }

    /// Waits until the backplane, if any, has brought `channel`'s shared history in, so
    /// that a client joining right after gets it. Bounded by the backplane.
    pub fn ready(&self, channel: &str) -> BoxFuture<'static, ()> {
        match self.shared.backplane.get() {
            Some(backplane) => backplane.ready(&self.channel_or_create(channel)),
            None => Box::pin(std::future::ready(())),
        }
    }

    /// Joins `uid` to `channel`. The member's first frames are the channel's history (up
    /// to the history limit), then everything published after this call, minus its own.
    /// `join_frame`, if any, goes into history for later members but is not sent live.
    pub fn join(
        &self,
        channel: &str,
        uid: &str,
        kind: MemberKind,
        join_frame: Option<Message>,
    ) -> Result<Member, JoinError> {
        self.join_with(channel, uid, kind, join_frame, false)
    }

    /// Joins a client; with `presence` it is also told when other clients join and leave.
    pub fn join_client(
        &self,
        channel: &str,
        uid: &str,
        join_frame: Message,
        presence: bool,
    ) -> Result<Member, JoinError> {
        self.join_with(channel, uid, MemberKind::Client, Some(join_frame), presence)
    }

    fn join_with(
        &self,
        channel: &str,
        uid: &str,
        kind: MemberKind,
        join_frame: Option<Message>,
        presence: bool,
    ) -> Result<Member, JoinError> {
        let id = self.shared.next_member.fetch_add(1, Ordering::Relaxed);
        // Holding the map lock while joining keeps the expiry sweep from removing a channel
        // between finding it and joining it.
        let mut channels = self.channels();
        let name: Arc<str> = Arc::from(channel);
        if !channels.contains_key(&name) && channels.len() >= self.shared.config.max_channels {
            self.evict_idle(&mut channels)?;
        }
        let mut chan = channels
            .entry(name.clone())
            .or_insert_with(|| Arc::new(Channel::new(name.clone(), self.shared.clone())))
            .clone();
        if let Some(lifespan) = self.shared.config.lifespan {
            let mut old = chan.lock();
            if old.created.elapsed() >= lifespan {
                // Its members are closed by their sessions; the name starts afresh, on
                // disk too. Retired under its lock, the old channel records nothing after
                // the forget, and the new one records only after it (one queue, in order).
                old.retired = true;
                drop(old);
                if let Some(recorder) = self.shared.recorder.get() {
                    recorder.forget(name.clone());
                }
                chan = Arc::new(Channel::new(name.clone(), self.shared.clone()));
                channels.insert(name, chan.clone());
            }
        }
        let mut ring = chan.lock();
        drop(channels);
        let uid: Arc<str> = Arc::from(uid);
        let taken = match kind {
            MemberKind::Client => ring.members.contains_key(&uid),
            MemberKind::Peer => ring.links.contains_key(&uid),
        };
        if taken {
            return Err(JoinError::DuplicateUid);
        }
        if kind == MemberKind::Client {
            if let Some(max) = self.shared.config.max_members {
                if ring.members.len() >= max {
                    return Err(JoinError::ChannelFull);
                }
            }
            ring.notify_presence(id, &presence_notice("joined", &uid, chan.name()));
        }
        let notices = presence.then(|| {
            let notices = Arc::new(Notices::default());
            ring.watchers.push((id, notices.clone()));
            notices
        });
        let first_client = match kind {
            MemberKind::Client => {
                ring.members.insert(uid.clone(), id);
                ring.members.len() == 1
            }
            MemberKind::Peer => {
                ring.links.insert(uid.clone(), id);
                false
            }
        };
        let history = ring.entries.len().min(self.shared.config.history_limit) as u64;
        let join_seq = ring.head();
        // With no history to replay the member starts caught up.
        let cursor = join_seq - history;
        let member = Member {
            channel: chan.clone(),
            id,
            uid,
            kind,
            join_seq,
            cursor: AtomicU64::new(cursor),
            notices,
            all_join_frames: false,
        };
        if let Some(frame) = join_frame {
            let key = chan.new_key();
            let caught_up = history == 0;
            chan.push(
                &mut ring,
                Entry {
                    from: id,
                    live: false,
                    key,
                    msg: frame,
                },
            );
            if caught_up {
                member.cursor.store(ring.head(), Ordering::Relaxed);
            }
        }
        let watched = kind == MemberKind::Client && !ring.watchers.is_empty();
        drop(ring);
        if watched {
            chan.published.notify_waiters();
        }
        if first_client {
            if let Some(backplane) = self.shared.backplane.get() {
                backplane.channel_active(&chan);
            }
        }
        Ok(member)
    }

    /// Drops the least recently active channel that has no members, to make room.
    fn evict_idle(&self, channels: &mut HashMap<Arc<str>, Arc<Channel>>) -> Result<(), JoinError> {
        let oldest = channels
            .iter()
            .filter_map(|(name, chan)| {
                let ring = chan.lock();
                (ring.members.is_empty() && ring.links.is_empty())
                    .then(|| (ring.last_activity, name.clone()))
            })
            .min()
            .map(|(_, name)| name)
            .ok_or(JoinError::TooManyChannels)?;
        channels.remove(&oldest);
        if let Some(recorder) = self.shared.recorder.get() {
            recorder.forget(oldest);
        }
        Ok(())
    }

    /// Removes channels that have had no members and no traffic for the expiry time.
    /// Returns the names of those removed.
    pub fn sweep_expired(&self) -> Vec<Arc<str>> {
        let now = Instant::now();
        let expiry = self.shared.config.history_expiry;
        let mut removed = Vec::new();
        self.channels().retain(|name, chan| {
            let ring = chan.lock();
            let keep = !ring.members.is_empty()
                || !ring.links.is_empty()
                || now.duration_since(ring.last_activity) < expiry;
            if !keep {
                removed.push(name.clone());
            }
            keep
        });
        removed
    }

    /// Channels, and frames and bytes held across all of them.
    pub fn stats(&self) -> (usize, usize, usize) {
        let channels = self.all_channels();
        let (frames, bytes) = channels.iter().fold((0, 0), |(f, b), c| {
            let (cf, cb) = c.stored();
            (f + cf, b + cb)
        });
        (channels.len(), frames, bytes)
    }

    /// Every channel, for snapshots and statistics.
    pub fn all_channels(&self) -> Vec<Arc<Channel>> {
        self.channels().values().cloned().collect()
    }

    /// A channel by name, if it exists.
    pub fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.channels().get(name).cloned()
    }
}

/// One connection's membership of one channel. Dropping it leaves the channel.
pub struct Member {
    channel: Arc<Channel>,
    id: MemberId,
    uid: Arc<str>,
    kind: MemberKind,
    /// Sequence of this member's join: entries before it are history.
    join_seq: u64,
    /// Next sequence to deliver. Atomic so `&Member` can both publish and fetch; written
    /// only under the channel lock.
    cursor: AtomicU64,
    /// Join and leave notices, when this member asked for them.
    notices: Option<Arc<Notices>>,
    /// Also takes join frames stored after it joined (see [`Member::take_join_frames`]).
    all_join_frames: bool,
}

impl Member {
    pub fn id(&self) -> MemberId {
        self.id
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn kind(&self) -> MemberKind {
        self.kind
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// Sends a client's frame to every other member of the channel and into its history.
    pub fn publish(&self, msg: Message) -> Result<(), MessageLimit> {
        self.channel.publish(self, true, None, msg).map(drop)
    }

    /// Stores a frame relayed from another server, unless a frame with the same key is
    /// already here (it came by another path) or it originated on this server. Returns
    /// whether it was stored.
    pub fn relay(&self, key: MsgKey, live: bool, msg: Message) -> bool {
        self.channel.publish(self, live, Some(key), msg) == Ok(true)
    }

    /// Stores a frame relayed from a server that carries no keys (plain mles v2), unless
    /// the same content is already in the channel: the Mles rule for proxies.
    pub fn relay_by_content(&self, msg: Message) -> bool {
        {
            let ring = self.channel.lock();
            if ring.entries.iter().any(|e| e.msg == msg) {
                return false;
            }
        }
        self.channel.publish(self, true, None, msg) == Ok(true)
    }

    /// Makes this member take every join frame, also those stored after it joined: a
    /// backplane that keeps the channel's history elsewhere (NATS) must store them there.
    /// Call before fetching.
    pub fn take_join_frames(&mut self) {
        self.all_join_frames = true;
    }

    /// Whether the entry at `seq` is delivered to this member: not its own, and live or
    /// part of the history it joined to.
    fn wants(&self, entry: &Entry, seq: u64) -> bool {
        entry.from != self.id && (entry.live || seq < self.join_seq || self.all_join_frames)
    }

    /// True when frames past this member's cursor are waiting.
    pub fn has_pending(&self) -> bool {
        self.channel.head.load(Ordering::Acquire) > self.cursor.load(Ordering::Relaxed)
            || self
                .notices
                .as_ref()
                .is_some_and(|n| n.pending.load(Ordering::Acquire))
    }

    /// Moves up to `max` pending frames for this member into `out`, in channel order.
    /// Fails when the member fell behind what the channel keeps.
    pub fn fetch(&self, out: &mut Vec<Message>, max: usize) -> Result<(), Lagged> {
        if let Some(notices) = &self.notices {
            notices.drain_into(out);
        }
        self.fetch_with(max, |entry| out.push(entry.msg.clone()))
    }

    /// Like [`Member::fetch`], with each frame's key and liveness (for relaying).
    pub fn fetch_entries(&self, out: &mut Vec<Entry>, max: usize) -> Result<(), Lagged> {
        self.fetch_with(max, |entry| out.push(entry.clone()))
    }

    fn fetch_with(&self, max: usize, mut take: impl FnMut(&Entry)) -> Result<(), Lagged> {
        if self.channel.head.load(Ordering::Acquire) <= self.cursor.load(Ordering::Relaxed) {
            return Ok(());
        }
        let ring = self.channel.lock();
        let mut cursor = self.cursor.load(Ordering::Relaxed);
        if cursor < ring.first_seq {
            return Err(Lagged);
        }
        let start = (cursor - ring.first_seq) as usize;
        for entry in ring.entries.range(start..).take(max) {
            if self.wants(entry, cursor) {
                take(entry);
            }
            cursor += 1;
        }
        self.cursor.store(cursor, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until a frame past this member's cursor is published.
    pub async fn pending(&self) {
        loop {
            let notified = self.channel.published.notified();
            tokio::pin!(notified);
            // Register before checking, so a publish between the check and the await
            // still wakes us.
            notified.as_mut().enable();
            if self.has_pending() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut ring = self.channel.lock();
        let names = match self.kind {
            MemberKind::Client => &mut ring.members,
            MemberKind::Peer => &mut ring.links,
        };
        if names.get(&self.uid) == Some(&self.id) {
            names.remove(&self.uid);
        }
        if self.notices.is_some() {
            ring.watchers.retain(|(id, _)| *id != self.id);
        }
        let watched = self.kind == MemberKind::Client && !ring.watchers.is_empty();
        if watched {
            ring.notify_presence(
                self.id,
                &presence_notice("left", &self.uid, self.channel.name()),
            );
        }
        ring.last_activity = Instant::now();
        drop(ring);
        if watched {
            self.channel.published.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(limit: usize, queue: usize, bytes: usize) -> Hub {
        Hub::new(
            HubConfig {
                history_limit: limit,
                queue_frames: queue,
                channel_bytes: bytes,
                history_expiry: Duration::from_secs(60),
                max_members: None,
                max_messages: None,
                lifespan: None,
                max_channels: 1000,
            },
            "test",
        )
    }

    fn text(s: &str) -> Message {
        Message::text(s)
    }

    fn client(hub: &Hub, channel: &str, uid: &str) -> Member {
        hub.join(
            channel,
            uid,
            MemberKind::Client,
            Some(text(&format!("join {uid}"))),
        )
        .unwrap()
    }

    fn drain(m: &Member) -> Result<Vec<String>, Lagged> {
        let mut out = Vec::new();
        m.fetch(&mut out, usize::MAX)?;
        Ok(out
            .into_iter()
            .map(|m| m.into_text().unwrap().to_string())
            .collect())
    }

    #[test]
    fn members_get_others_frames_but_not_their_own() {
        let hub = hub(10, 10, 1 << 20);
        let a = client(&hub, "c", "a");
        let b = client(&hub, "c", "b");
        assert_eq!(drain(&a).unwrap(), Vec::<String>::new());
        assert_eq!(drain(&b).unwrap(), vec!["join a"]);
        a.publish(text("1")).unwrap();
        b.publish(text("2")).unwrap();
        assert_eq!(drain(&a).unwrap(), vec!["2"]);
        assert_eq!(drain(&b).unwrap(), vec!["1"]);
    }

    #[test]
    fn history_is_bounded_by_limit_and_replayed_in_order() {
        let hub = hub(3, 10, 1 << 20);
        let a = client(&hub, "c", "a");
        for i in 0..5 {
            a.publish(text(&i.to_string())).unwrap();
        }
        let late = client(&hub, "c", "late");
        assert_eq!(drain(&late).unwrap(), vec!["2", "3", "4"]);
    }

    #[test]
    fn duplicate_uid_is_refused_until_the_first_leaves() {
        let hub = hub(3, 10, 1 << 20);
        let a = client(&hub, "c", "a");
        assert_eq!(
            hub.join("c", "a", MemberKind::Client, None).err(),
            Some(JoinError::DuplicateUid)
        );
        assert!(hub.join("other", "a", MemberKind::Client, None).is_ok());
        drop(a);
        assert!(hub.join("c", "a", MemberKind::Client, None).is_ok());
    }

    #[test]
    fn a_member_that_falls_behind_lags_and_others_go_on() {
        let hub = hub(2, 4, 1 << 20);
        let slow = client(&hub, "c", "slow");
        let fast = client(&hub, "c", "fast");
        let publisher = client(&hub, "c", "p");
        drain(&fast).unwrap();
        for i in 0..10 {
            publisher.publish(text(&i.to_string())).unwrap();
            assert_eq!(drain(&fast).unwrap(), vec![i.to_string()]);
        }
        assert_eq!(drain(&slow), Err(Lagged));
    }

    #[test]
    fn a_member_flooding_the_channel_does_not_lag_on_its_own_frames() {
        let hub = hub(2, 4, 1 << 20);
        let other = client(&hub, "c", "other");
        let flooder = client(&hub, "c", "f");
        assert_eq!(drain(&flooder), Ok(vec!["join other".to_string()]));
        for i in 0..100 {
            flooder.publish(text(&i.to_string())).unwrap();
        }
        assert_eq!(drain(&flooder), Ok(vec![]));
        drop(other);
    }

    #[test]
    fn channel_bytes_bound_the_ring() {
        let hub = hub(100, 100, 10);
        let a = hub
            .join(
                "c",
                "a",
                MemberKind::Client,
                Some(Message::binary(vec![0u8; 4])),
            )
            .unwrap();
        for _ in 0..10 {
            a.publish(Message::binary(vec![1u8; 4])).unwrap();
        }
        let (_, bytes) = hub.channel("c").unwrap().stored();
        assert!(bytes <= 10, "ring holds {bytes} bytes");
    }

    #[test]
    fn relayed_frames_are_stored_once_and_own_frames_never_come_back() {
        let hub = hub(10, 10, 1 << 20);
        let link_a = hub.join("c", "link-a", MemberKind::Peer, None).unwrap();
        let link_b = hub.join("c", "link-b", MemberKind::Peer, None).unwrap();
        let reader = client(&hub, "c", "reader");
        let key = MsgKey {
            origin: Arc::from("elsewhere#1"),
            seq: 7,
        };
        assert!(link_a.relay(key.clone(), true, text("x")));
        assert!(
            !link_b.relay(key, true, text("x")),
            "second path stored it again"
        );
        let own = MsgKey {
            origin: hub.origin().clone(),
            seq: 0,
        };
        assert!(!link_a.relay(own, true, text("echo")));
        assert_eq!(drain(&reader).unwrap(), vec!["x"]);
        let mut relayed = Vec::new();
        link_b.fetch_entries(&mut relayed, 100).unwrap();
        // link-b gets the relayed frame (not from itself) and the reader's join frame as
        // history-only is not live for it (it joined before).
        assert_eq!(relayed.len(), 1);
        assert_eq!(relayed[0].key.seq, 7);
    }

    #[test]
    fn only_clients_make_a_channel_active() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl Backplane for Count {
            fn channel_active(&self, _: &Arc<Channel>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let hub = hub(10, 10, 1 << 20);
        let count = Arc::new(Count(Default::default()));
        hub.set_backplane(count.clone());
        let _peer = hub.join("c", "peer", MemberKind::Peer, None).unwrap();
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        let a = client(&hub, "c", "a");
        let _b = client(&hub, "c", "b");
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(hub.channel("c").unwrap().client_count(), 1);
    }

    #[test]
    fn past_the_channel_cap_the_oldest_idle_channel_makes_room() {
        let hub = Hub::new(
            HubConfig {
                history_limit: 5,
                queue_frames: 5,
                channel_bytes: 1000,
                history_expiry: Duration::from_secs(60),
                max_members: None,
                max_messages: None,
                lifespan: None,
                max_channels: 2,
            },
            "t",
        );
        let busy = client(&hub, "busy", "a");
        drop(client(&hub, "idle", "a"));
        let _new = client(&hub, "new", "a");
        assert!(
            hub.channel("idle").is_none(),
            "the idle channel was not evicted"
        );
        assert!(hub.channel("busy").is_some() && hub.channel("new").is_some());
        assert_eq!(
            hub.join("third", "a", MemberKind::Client, None).err(),
            Some(JoinError::TooManyChannels)
        );
        drop(busy);
    }

    #[test]
    fn idle_channels_expire_but_joined_ones_stay() {
        let hub = Hub::new(
            HubConfig {
                history_limit: 5,
                queue_frames: 5,
                channel_bytes: 1000,
                history_expiry: Duration::ZERO,
                max_members: None,
                max_messages: None,
                lifespan: None,
                max_channels: 1000,
            },
            "t",
        );
        let kept = client(&hub, "kept", "a");
        drop(client(&hub, "gone", "a"));
        assert_eq!(hub.sweep_expired(), vec![Arc::from("gone")]);
        assert!(hub.channel("gone").is_none());
        assert_eq!(kept.channel().name(), "kept");
        assert!(hub.channel("kept").is_some());
    }
}
