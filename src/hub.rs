//! Channels: who is in each one, and the frames they share.
//!
//! Each channel keeps one ring of frames that is both its history and every member's
//! outbound queue. A member is a cursor into that ring: publishing appends once and wakes
//! the members that are parked waiting for frames (and only those), who each copy out what
//! lies past their cursor. So a publisher never waits on any member, a frame is stored once
//! however many members read it, and a new member's history and the live frames after it
//! are one contiguous run of the ring — no gap and no duplicate by construction.
//!
//! Every entry has a sequence number, increasing along the ring; numbers may have gaps,
//! because a join frame can leave the middle of the ring (see below). A cursor is the next
//! number a member wants, found by binary search.
//!
//! **Overload.** A member is too slow when it lags while others of its channel keep up: its
//! cursor falls off the back of the ring (live frames it never read were dropped) and it is
//! told [`Lagged`]. When instead *every* member is far behind — the server cannot write as
//! fast as a publisher sends — the publisher is told to pause ([`Published::pause`]) and its
//! session stops reading its socket until the readers have caught up: TCP
//! backpressure slows the publisher instead of the readers being cut off. The ring tells
//! the cases apart by comparing the head with the slowest cursor of the members whose writes
//! flow (a member whose socket stopped taking data is the one to cut, not to wait for),
//! member's.
//!
//! **Join frames** are history only: never sent live, replayed to later members. They may
//! take at most half of a channel's history, and only the latest join of each uid is kept,
//! so no number of joins can flush a channel's messages out of its history, and a channel
//! that many clients join at once never makes its earlier members lag.
//!
//! **Memory.** Frames' payloads are charged to the memory budget by whoever made them (see
//! [`crate::budget`]); each channel charges its own fixed cost and the bookkeeping of its
//! entries. A channel without members keeps only its history (`--limit` frames, not the
//! queue slack), and near the budget the history of channels without members goes first
//! ([`Hub::relieve`]).
//!
//! Every frame carries a [`MsgKey`] — the server it entered the system on and a number —
//! so frames relayed between servers (peer links, a backplane) are stored and delivered
//! once however many paths bring them, and a restarted server can take back its history.
//!
//! Locks: the channel map's mutex is taken only to join, to evict and to sweep; each
//! channel has its own mutex, held for a few pointer copies at a time, never across an
//! `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::task::AtomicWaker;

use crate::budget::{Budget, Need, Reservation};
use crate::config::HubConfig;
use crate::frame::Frame;
use crate::protocol::Position;

/// Memory a channel is charged for existing (its map slot, ring and lock).
pub const CHANNEL_COST: usize = 1024;
/// Memory charged per stored entry and per remembered key, beyond the payload.
const ENTRY_COST: usize = 96;
const SEEN_COST: usize = 64;
/// A channel's bookkeeping is charged in steps of this much, not per entry.
const CHARGE_STEP: usize = 16 * 1024;
/// Notices queued per presence watcher at most; older ones are dropped first.
const MAX_NOTICES: usize = 64;

/// Identifies one membership (one connection's stay in one channel).
pub type MemberId = u64;

/// The `from` of entries restored from disk: they came from no member of this run.
const RESTORED: MemberId = 0;

/// Identifies a frame across servers: where it entered the system and its number there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MsgKey {
    /// The entry server's id and boot epoch, e.g. `"alpha#18c2f0"`.
    pub origin: Arc<str>,
    pub seq: u64,
}

/// What a member is: a client of this server, or a link to another server.
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
    #[error("server memory budget reached")]
    OutOfMemory,
    #[error("channel message limit reached")]
    MessageLimit,
}

/// A client's frame was refused: the channel reached its message limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("channel message limit reached")]
pub struct MessageLimit;

/// A member fell further behind than its channel keeps frames for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too slow: fell behind the channel")]
pub struct Lagged;

/// What publishing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The frame was stored (false: a relayed frame already here).
    pub stored: bool,
    /// Every reader of the channel is far behind: stop reading the publisher until
    /// [`Member::poll_writable`] is ready.
    pub pause: bool,
}

/// A stored frame.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its place in the channel's ring.
    pub seq: u64,
    /// The member that put it here (a client, or the link it arrived on).
    pub from: MemberId,
    /// Join frames are history only: replayed to later members, never sent live.
    pub live: bool,
    pub key: MsgKey,
    pub frame: Frame,
    /// Its sequence in the cluster's stream, for frames that came through NATS.
    pub stream: Option<u64>,
}

impl Entry {
    /// True for frames loaded from disk, from an earlier life of this server.
    pub fn is_restored(&self) -> bool {
        self.from == RESTORED
    }
}

/// The hub's link to the world outside this server (peer links, a cluster backplane).
/// The hub tells it when a channel gains its first client; it joins the channel as a
/// [`MemberKind::Peer`] member and relays with [`Member::relay`].
pub trait Backplane: Send + Sync {
    fn channel_active(&self, channel: &Arc<Channel>);

    /// Resolves once a client joining `channel` next would get the history the backplane
    /// shares (a cluster's stored frames), or once waiting longer is not worth it. The
    /// backplane bounds the wait; by default there is nothing to wait for.
    fn ready(&self, _channel: &str) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Receives every stored frame, for persistence. Must not block.
pub trait Recorder: Send + Sync {
    fn record(&self, channel: &Arc<Channel>, entry: &Entry);
    /// The channel was dropped from the hub for good; its stored history can go.
    fn forget(&self, channel: Arc<str>);
    /// The stored history of `channel`, oldest first (blocking: call off the runtime).
    fn load(&self, _channel: &str) -> Restored {
        Restored::default()
    }
}

/// A channel's history as stored: the epoch of its numbering, and its frames with their
/// numbers (positions survive a restart with the numbering they had).
#[derive(Default)]
pub struct Restored {
    /// The numbering's epoch; `None` when the store has none (an older format).
    pub epoch: Option<u64>,
    pub entries: Vec<RestoredEntry>,
}

/// One stored frame.
pub struct RestoredEntry {
    /// Its number in the channel, if the store kept it.
    pub position: Option<u64>,
    pub key: MsgKey,
    pub live: bool,
    pub frame: Frame,
}

/// A fresh random epoch for a channel's numbering.
fn new_epoch() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return now.as_nanos() as u64;
    }
    u64::from_le_bytes(bytes)
}

/// Where a parked task waits: for frames, or (a paused publisher) for readers to catch up.
#[derive(Default)]
struct WakeSlot {
    waker: AtomicWaker,
    /// In the channel's list of members waiting for frames.
    parked: AtomicBool,
    /// In the channel's list of publishers waiting for readers.
    paused: AtomicBool,
}

/// Frames of this server's clients on their way through the cluster's stream: a channel
/// whose history the stream orders stores its clients' frames only when they come back
/// from it, so every server of the cluster holds the same history in the same order.
/// While the link that orders them is down, frames are stored at once, as on one server.
pub struct Sequencer {
    /// The stream's epoch: positions in it mean the same on every server.
    epoch: u64,
    state: Mutex<SequencerState>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct SequencerState {
    /// Submitted, not yet handed to the link.
    queue: VecDeque<(MemberId, MsgKey, Frame)>,
    /// Handed to the link, not yet back: their publisher and frame, by key number.
    in_flight: HashMap<u64, (MemberId, Frame)>,
    /// Frames stored at once instead, while too many were on their way.
    overflowed: bool,
}

/// Frames on their way through the stream at most, per channel: past it frames are
/// stored at once (in local order) rather than held.
const SEQUENCER_LIMIT: usize = 4096;

impl Sequencer {
    fn state(&self) -> MutexGuard<'_, SequencerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a client's frame to be ordered; false when too many are on their way.
    fn submit(&self, from: MemberId, key: MsgKey, frame: Frame) -> bool {
        let mut state = self.state();
        if state.queue.len() + state.in_flight.len() >= SEQUENCER_LIMIT {
            state.overflowed = true;
            return false;
        }
        state.queue.push_back((from, key, frame));
        drop(state);
        self.waker.wake();
        true
    }

    /// The publisher of our frame numbered `seq`, if it is on its way (and no longer).
    fn returned(&self, seq: u64) -> Option<MemberId> {
        self.state().in_flight.remove(&seq).map(|(from, _)| from)
    }

    /// Moves what is waiting into `out` (as entries, for the link to publish).
    pub fn take(&self, out: &mut Vec<Entry>) {
        let mut state = self.state();
        while let Some((from, key, frame)) = state.queue.pop_front() {
            state.in_flight.insert(key.seq, (from, frame.clone()));
            out.push(Entry {
                seq: 0,
                from,
                live: true,
                key,
                frame,
                stream: None,
            });
        }
    }

    /// Ready when frames wait to be taken.
    pub fn poll_waiting(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.state().queue.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// The stream's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Join and leave notices for one member that asked for them.
#[derive(Default)]
struct Notices {
    queue: Mutex<VecDeque<Frame>>,
    pending: AtomicBool,
}

impl Notices {
    fn push(&self, notice: Frame) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= MAX_NOTICES {
            queue.pop_front();
        }
        queue.push_back(notice);
        self.pending.store(true, Ordering::Release);
    }

    fn drain(&self, mut take: impl FnMut(&Frame)) {
        if self.pending.swap(false, Ordering::AcqRel) {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            for notice in queue.drain(..) {
                take(&notice);
            }
        }
    }
}

/// The presence notice for `uid` joining or leaving `channel` (documented in the README).
fn presence_notice(event: &str, uid: &str, channel: &str) -> Frame {
    Frame::text(serde_json::json!({"presence": event, "uid": uid, "channel": channel}).to_string())
}

/// The uid a join frame names, to keep only each uid's latest join. Frames that name none
/// (a relayed frame of another kind of server) are their own.
fn join_uid(frame: &Frame, key: &MsgKey) -> Arc<str> {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        uid: std::borrow::Cow<'a, str>,
    }
    match frame
        .as_text()
        .and_then(|t| serde_json::from_str::<Named>(t).ok())
    {
        Some(named) => Arc::from(named.uid.as_ref()),
        None => Arc::from(format!("\u{0}{}:{}", key.origin, key.seq)),
    }
}

struct Ring {
    entries: VecDeque<Entry>,
    /// Sequence number the next entry gets.
    next_seq: u64,
    /// Entries numbered below this that were live were dropped for room: a member whose
    /// cursor is below it missed frames it wanted.
    lost_live_to: u64,
    /// Payload bytes of the entries.
    bytes: usize,
    /// Clients by uid.
    members: HashMap<Arc<str>, MemberId>,
    /// Links to other servers, by link name: a namespace of their own, so no client uid
    /// can take a link's place or be mistaken for one.
    links: HashMap<Arc<str>, MemberId>,
    /// The join entries in the ring, oldest first, with their uid.
    joins: VecDeque<(u64, Arc<str>)>,
    /// Keys of relayed frames already stored, oldest first, for de-duplication.
    seen: HashSet<MsgKey>,
    seen_order: VecDeque<MsgKey>,
    last_activity: Instant,
    /// When the last client left (None while clients are joined): links measure their
    /// grace period from here, not from the last frame.
    clients_left_at: Option<Instant>,
    created: Instant,
    /// Frames clients published, for the per-channel message limit.
    messages: u64,
    /// Members that asked for join and leave notices.
    watchers: Vec<(MemberId, Arc<Notices>)>,
    /// Members waiting for frames.
    parked: Vec<Arc<WakeSlot>>,
    /// Publishers waiting for readers to catch up.
    paused: Vec<Arc<WakeSlot>>,
    /// The furthest cursor a member has fetched to, and that member (0: unknown).
    /// Every member's cursor and write state, to find the slowest reader that reads.
    cursors: Vec<(MemberId, Arc<Progress>)>,
    /// That reader's cursor and id when last looked for, and whether to look again (the
    /// slowest member moved, left or stalled, or a member joined).
    slowest: u64,
    slowest_member: MemberId,
    slowest_stale: bool,
    /// Replaced by a new channel of the same name: frames its last members still send are
    /// not recorded, so they never mix into the new channel's history on disk.
    retired: bool,
    /// The channel's own memory: its fixed cost and its entries' bookkeeping.
    charge: Reservation,
    /// Orders its clients' frames through the cluster's stream, while a link does.
    sequencer: Option<Arc<Sequencer>>,
}

impl Ring {
    fn notify_presence(&self, except: MemberId, notice: &Frame) {
        for (id, notices) in &self.watchers {
            if *id != except {
                notices.push(notice.clone());
            }
        }
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

    /// Index of the first entry numbered `seq` or later.
    fn position(&self, seq: u64) -> usize {
        self.entries.partition_point(|e| e.seq < seq)
    }

    /// Removes the entry numbered `seq`, if it is still here.
    fn remove_seq(&mut self, seq: u64) {
        let at = self.position(seq);
        if self.entries.get(at).is_some_and(|e| e.seq == seq) {
            if let Some(old) = self.entries.remove(at) {
                self.bytes -= old.frame.len();
            }
        }
    }

    fn has_members(&self) -> bool {
        !self.members.is_empty() || !self.links.is_empty()
    }

    /// Drops the oldest entries past `frames` or `bytes` (keeping at least one).
    fn trim(&mut self, frames: usize, bytes: usize) {
        while self.entries.len() > frames || (self.bytes > bytes && self.entries.len() > 1) {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.frame.len();
            if old.live {
                self.lost_live_to = old.seq + 1;
            } else if self.joins.front().is_some_and(|(seq, _)| *seq == old.seq) {
                self.joins.pop_front();
            }
        }
    }

    /// Drops entries past `frames` or `bytes` from a ring without members. In a channel
    /// the cluster's stream orders (`stream_ordered`), the entries kept are the last
    /// `frames` in the stream's order, the order joiners are replayed: a server's own
    /// frames from an outage were stored when they were sent but take their place in the
    /// stream later, when they are published, so trimming in arrival order could drop them
    /// while they still belong to the history every other server replays. With no member
    /// there is no cursor to keep whole, so entries may go from the middle.
    fn trim_history(&mut self, frames: usize, bytes: usize, stream_ordered: bool) {
        if stream_ordered && self.entries.len() > frames {
            let sorted = by_stream_place(self.entries.iter());
            let dropped: HashSet<u64> = sorted[..sorted.len() - frames]
                .iter()
                .map(|e| e.seq)
                .collect();
            let mut freed = 0;
            let mut lost_live_to = self.lost_live_to;
            self.entries.retain(|e| {
                let keep = !dropped.contains(&e.seq);
                if !keep {
                    freed += e.frame.len();
                    if e.live {
                        lost_live_to = lost_live_to.max(e.seq + 1);
                    }
                }
                keep
            });
            self.bytes -= freed;
            self.lost_live_to = lost_live_to;
            self.joins.retain(|(seq, _)| !dropped.contains(seq));
        }
        self.trim(frames, bytes);
    }

    /// Charges (or gives back) the bookkeeping memory of the entries, in steps.
    fn settle_charge(&mut self) {
        let want = CHANNEL_COST + self.entries.len() * ENTRY_COST + self.seen.len() * SEEN_COST;
        let held = self.charge.bytes();
        if want > held {
            let more = (want - held).div_ceil(CHARGE_STEP) * CHARGE_STEP;
            self.charge.force_grow(more);
        } else if held - want > 2 * CHARGE_STEP {
            self.charge.shrink(held - want - CHARGE_STEP);
        }
    }

    /// The cursor of the slowest member whose writes flow. Looked for again (O(members))
    /// only when it may have changed — that member moved on, left or stalled, or someone
    /// joined — so about once per publish burst, not once per frame.
    fn slowest(&mut self) -> u64 {
        if self.slowest_stale {
            self.slowest_stale = false;
            let slowest = self
                .cursors
                .iter()
                .filter(|(_, p)| !p.blocked.load(Ordering::Relaxed))
                .map(|(id, p)| (p.cursor.load(Ordering::Relaxed), *id))
                .min();
            (self.slowest, self.slowest_member) = slowest.unwrap_or((self.next_seq, 0));
        }
        self.slowest
    }

    /// Whether the readers are so far behind that publishers should pause: the slowest
    /// member whose writes flow. A member whose socket takes no more data is left out: it
    /// is the one that lags and is cut, and it must not hold the others back.
    fn readers_behind(&mut self, queue_frames: usize) -> bool {
        self.next_seq.saturating_sub(self.slowest()) > (queue_frames / 2) as u64
    }

    /// Whether paused publishers may go on.
    fn readers_caught_up(&mut self, queue_frames: usize) -> bool {
        self.next_seq.saturating_sub(self.slowest()) <= (queue_frames / 4) as u64
    }
}

std::thread_local! {
    /// The tasks one unlock wakes, gathered here so that neither the ring's lists nor this
    /// one are reallocated per publish.
    static TO_WAKE: std::cell::RefCell<Vec<(Arc<WakeSlot>, bool)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// Set while a reader handles what one read brought (see [`deferring_wakes`]).
    static DEFER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Members to wake once that is done.
    static DEFERRED: std::cell::RefCell<Vec<Arc<WakeSlot>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `handle` with the wake-ups of members waiting for frames held back until it
/// returns, then wakes each of them once. A reader publishing everything one read of its
/// socket brought wakes each member once for the lot, not once per frame: each member
/// then writes the lot with one system call.
pub fn deferring_wakes<R>(handle: impl FnOnce() -> R) -> R {
    let outer = DEFER.with(|d| d.replace(true));
    let result = handle();
    if !outer {
        DEFER.with(|d| d.set(false));
        DEFERRED.with(|list| {
            let mut list = list.borrow_mut();
            for slot in list.drain(..) {
                slot.parked.store(false, Ordering::Release);
                slot.waker.wake();
            }
        });
    }
    result
}

/// Unlocks `ring`, then wakes the members it had parked waiting for frames (with
/// `parked`) and the publishers it had paused (with `paused`). Waking happens outside the
/// lock, so woken tasks do not queue up on it.
fn unlock_and_wake(mut ring: MutexGuard<'_, Ring>, parked: bool, paused: bool) {
    let parked = parked && !ring.parked.is_empty();
    let paused = paused && !ring.paused.is_empty();
    if !parked && !paused {
        return;
    }
    if parked && DEFER.with(|d| d.get()) {
        DEFERRED.with(|list| list.borrow_mut().extend(ring.parked.drain(..)));
        if !paused {
            return;
        }
    }
    TO_WAKE.with(|list| {
        let mut list = list.borrow_mut();
        if parked {
            list.extend(ring.parked.drain(..).map(|slot| (slot, false)));
        }
        if paused {
            list.extend(ring.paused.drain(..).map(|slot| (slot, true)));
        }
        drop(ring);
        for (slot, paused) in list.drain(..) {
            let flag = if paused { &slot.paused } else { &slot.parked };
            flag.store(false, Ordering::Release);
            slot.waker.wake();
        }
    });
}

/// Settings and identity every channel shares.
struct HubShared {
    config: HubConfig,
    /// This server's id and boot epoch: the origin of frames its clients publish.
    origin: Arc<str>,
    next_seq: AtomicU64,
    next_member: AtomicU64,
    budget: Arc<Budget>,
    backplane: OnceLock<Arc<dyn Backplane>>,
    recorder: OnceLock<Arc<dyn Recorder>>,
}

/// One channel: its ring, and its head for lock-free checks.
pub struct Channel {
    name: Arc<str>,
    /// The epoch of this channel's numbering: positions from another epoch are not ours.
    epoch: AtomicU64,
    /// The epoch of the cluster stream that orders it (0: none).
    stream_epoch: AtomicU64,
    ring: Mutex<Ring>,
    /// Sequence number the next entry will get; read without the lock to skip idle polls.
    head: AtomicU64,
    hub: Arc<HubShared>,
}

impl Channel {
    fn new(name: Arc<str>, hub: Arc<HubShared>, charge: Reservation) -> Channel {
        Channel {
            name,
            epoch: AtomicU64::new(new_epoch()),
            stream_epoch: AtomicU64::new(0),
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                next_seq: 1,
                lost_live_to: 0,
                bytes: 0,
                members: HashMap::new(),
                links: HashMap::new(),
                joins: VecDeque::new(),
                seen: HashSet::new(),
                seen_order: VecDeque::new(),
                last_activity: Instant::now(),
                clients_left_at: Some(Instant::now()),
                created: Instant::now(),
                messages: 0,
                watchers: Vec::new(),
                parked: Vec::new(),
                paused: Vec::new(),
                cursors: Vec::new(),
                slowest: 0,
                slowest_member: 0,
                slowest_stale: true,
                retired: false,
                charge,
                sequencer: None,
            }),
            head: AtomicU64::new(1),
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

    /// Appends an entry and trims the ring to its bounds. Join frames beyond the quota,
    /// and an earlier join of the same uid, leave the ring. The caller wakes members.
    fn push(
        self: &Arc<Self>,
        ring: &mut Ring,
        from: MemberId,
        live: bool,
        key: MsgKey,
        frame: Frame,
        stream: Option<u64>,
    ) -> u64 {
        let config = &self.hub.config;
        let seq = ring.next_seq;
        ring.next_seq += 1;
        let entry = Entry {
            seq,
            from,
            live,
            key,
            frame,
            stream,
        };
        // Restored entries came from the recorder; everything else goes to it.
        if let Some(recorder) = self
            .hub
            .recorder
            .get()
            .filter(|_| !ring.retired && from != RESTORED)
        {
            recorder.record(self, &entry);
        }
        if !live {
            let uid = join_uid(&entry.frame, &entry.key);
            if let Some(at) = ring.joins.iter().position(|(_, u)| *u == uid) {
                if let Some((old, _)) = ring.joins.remove(at) {
                    ring.remove_seq(old);
                }
            }
            ring.joins.push_back((seq, uid));
            while ring.joins.len() > config.join_quota() {
                if let Some((old, _)) = ring.joins.pop_front() {
                    ring.remove_seq(old);
                }
            }
        }
        ring.bytes += entry.frame.len();
        ring.entries.push_back(entry);
        if ring.has_members() {
            ring.trim(config.ring_frames(), config.channel_bytes);
        } else {
            let stream_ordered = self.stream_epoch() != 0;
            ring.trim_history(config.history_limit, config.channel_bytes, stream_ordered);
        }
        ring.settle_charge();
        ring.last_activity = Instant::now();
        self.head.store(ring.next_seq, Ordering::Release);
        seq
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
        frame: Frame,
        stream: Option<u64>,
    ) -> Result<Published, MessageLimit> {
        let parked = {
            let mut ring = self.lock();
            let mut from = member.id;
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
                    let key = self.new_key();
                    // Ordered by the cluster's stream first: stored when it comes back.
                    if let Some(sequencer) = ring.sequencer.as_ref().filter(|_| live) {
                        if sequencer.submit(member.id, key.clone(), frame.clone()) {
                            return Ok(Published {
                                stored: true,
                                pause: false,
                            });
                        }
                    }
                    key
                }
                Some(key) if key.origin == self.hub.origin => {
                    // One of ours, back from the stream: stored now, as its publisher's.
                    let submitted = ring.sequencer.as_ref().and_then(|s| s.returned(key.seq));
                    match submitted {
                        Some(publisher) => {
                            from = publisher;
                            key
                        }
                        None => {
                            // Stored here already (while the stream was out of reach): it
                            // learns its place in the cluster's order.
                            if let Some(stream) = stream {
                                let own = ring.entries.iter_mut().rev().find(|e| e.key == key);
                                if let Some(entry) = own.filter(|e| e.stream.is_none()) {
                                    entry.stream = Some(stream);
                                }
                            }
                            return Ok(Published {
                                stored: false,
                                pause: false,
                            });
                        }
                    }
                }
                Some(key) => {
                    let capacity = self.hub.config.seen_capacity();
                    if !ring.remember(&key, capacity) {
                        return Ok(Published {
                            stored: false,
                            pause: false,
                        });
                    }
                    key
                }
            };
            let mut cursor = member.progress.cursor.load(Ordering::Relaxed);
            let start = ring.position(cursor);
            let mut caught_up = true;
            for entry in ring.entries.range(start..) {
                if member.wants(entry) {
                    caught_up = false;
                    break;
                }
                cursor = entry.seq + 1;
            }
            self.push(&mut ring, from, live, key, frame, stream);
            if caught_up {
                cursor = ring.next_seq;
            }
            member.progress.cursor.store(cursor, Ordering::Relaxed);
            if ring.slowest_member == member.id {
                ring.slowest_stale = true;
            }
            let pause = live && ring.readers_behind(self.hub.config.queue_frames);
            if pause && !member.wake.paused.swap(true, Ordering::AcqRel) {
                ring.paused.push(member.wake.clone());
            }
            unlock_and_wake(ring, true, false);
            pause
        };
        Ok(Published {
            stored: true,
            pause: parked,
        })
    }

    /// Stores frames loaded from disk, as history, before anyone joins.
    pub fn restore(self: &Arc<Self>, restored: Restored) {
        let mut ring = self.lock();
        // Positions survive only with the numbering they belong to, and only when they go
        // up; otherwise the frames are numbered afresh in a new epoch.
        let numbered = restored.epoch.is_some()
            && ring.entries.is_empty()
            && restored
                .entries
                .windows(2)
                .all(|w| matches!((w[0].position, w[1].position), (Some(a), Some(b)) if a < b))
            && restored
                .entries
                .first()
                .is_none_or(|e| e.position.is_some());
        if let (true, Some(epoch)) = (numbered, restored.epoch) {
            self.epoch.store(epoch, Ordering::Relaxed);
        }
        let capacity = self.hub.config.seen_capacity();
        for entry in restored.entries {
            if ring.remember(&entry.key, capacity) {
                if let (true, Some(position)) = (numbered, entry.position) {
                    ring.next_seq = position;
                }
                self.push(
                    &mut ring,
                    RESTORED,
                    entry.live,
                    entry.key,
                    entry.frame,
                    None,
                );
            }
        }
    }

    /// The epoch of this channel's numbering.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Makes the cluster's stream (of `epoch`) order this channel's frames from now on:
    /// clients' frames wait in the returned sequencer for the link to publish them, and
    /// are stored when they come back.
    pub fn attach_sequencer(&self, epoch: u64) -> Arc<Sequencer> {
        let mut ring = self.lock();
        if let Some(sequencer) = ring.sequencer.as_ref().filter(|s| s.epoch == epoch) {
            return sequencer.clone();
        }
        let sequencer = Arc::new(Sequencer {
            epoch,
            state: Mutex::new(SequencerState::default()),
            waker: AtomicWaker::new(),
        });
        ring.sequencer = Some(sequencer.clone());
        self.stream_epoch.store(epoch, Ordering::Relaxed);
        sequencer
    }

    /// The link that ordered this channel's frames is gone: frames on their way are stored
    /// now (in the order they were sent), and new ones at once.
    pub fn detach_sequencer(self: &Arc<Self>) {
        let mut ring = self.lock();
        let Some(sequencer) = ring.sequencer.take() else {
            return;
        };
        let mut state = sequencer.state();
        let mut waiting: Vec<(MemberId, MsgKey, Frame)> = state
            .in_flight
            .drain()
            .map(|(seq, (from, frame))| {
                let key = MsgKey {
                    origin: self.hub.origin.clone(),
                    seq,
                };
                (from, key, frame)
            })
            .collect();
        waiting.sort_by_key(|(_, key, _)| key.seq);
        waiting.extend(state.queue.drain(..));
        drop(state);
        for (from, key, frame) in waiting {
            self.push(&mut ring, from, true, key, frame, None);
        }
        unlock_and_wake(ring, true, false);
    }

    /// The epoch of the cluster stream that orders this channel, if one does (0: none).
    pub fn stream_epoch(&self) -> u64 {
        self.stream_epoch.load(Ordering::Relaxed)
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

    /// How long the channel has had no clients; `None` while it has some.
    pub fn without_clients_for(&self) -> Option<Duration> {
        self.lock().clients_left_at.map(|at| at.elapsed())
    }

    /// When the channel's lifespan (if any) ends.
    pub fn end_of_life(&self) -> Option<Instant> {
        let lifespan = self.hub.config.lifespan?;
        Some(self.lock().created + lifespan)
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
    /// from before a restart are told apart from new ones), charging `budget`.
    pub fn new(config: HubConfig, server_id: &str, budget: Arc<Budget>) -> Hub {
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
                budget,
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

    /// The channel named `name`, created empty if needed and there is room (restoring
    /// history from disk at start).
    pub fn channel_or_create(&self, name: &str) -> Result<Arc<Channel>, JoinError> {
        let mut channels = self.channels();
        self.admit(&mut channels, name)
    }

    /// The channel `name`, created if it does not exist yet: the one place channels are
    /// admitted, for clients and links alike. A new channel needs room under
    /// `--max-channels` (the least recently active channel without members makes room)
    /// and its cost in the memory budget (history of channels without members goes first).
    fn admit(
        &self,
        channels: &mut HashMap<Arc<str>, Arc<Channel>>,
        name: &str,
    ) -> Result<Arc<Channel>, JoinError> {
        if let Some(chan) = channels.get(name) {
            return Ok(chan.clone());
        }
        if channels.len() >= self.shared.config.max_channels {
            self.evict_idle(channels)?;
        }
        let budget = &self.shared.budget;
        let charge = match budget.try_reserve(CHANNEL_COST, Need::Growth) {
            Some(charge) => charge,
            None => {
                relieve_locked(channels, budget.relief_for(CHANNEL_COST, Need::Growth));
                budget
                    .try_reserve(CHANNEL_COST, Need::Growth)
                    .ok_or(JoinError::OutOfMemory)?
            }
        };
        let name: Arc<str> = Arc::from(name);
        let chan = Arc::new(Channel::new(name.clone(), self.shared.clone(), charge));
        channels.insert(name, chan.clone());
        Ok(chan)
    }

    /// Brings `channel`'s history back from disk if it is not in memory (after a restart,
    /// or after its history was dropped for memory): the file is read off the runtime,
    /// keeping only what history needs. Call before joining.
    pub async fn prepare(&self, channel: &str) {
        let Some(recorder) = self.shared.recorder.get().cloned() else {
            return;
        };
        if self.channel(channel).is_some() {
            return;
        }
        let name = channel.to_string();
        let loaded = tokio::task::spawn_blocking(move || recorder.load(&name)).await;
        let restored = loaded.unwrap_or_default();
        if restored.entries.is_empty() {
            return;
        }
        let mut channels = self.channels();
        // Someone made the channel meanwhile: what is on disk stays there.
        if channels.contains_key(channel) {
            return;
        }
        if let Ok(chan) = self.admit(&mut channels, channel) {
            // Restored before anyone can find the channel half filled.
            chan.restore(restored);
        }
    }

    /// Waits until the backplane, if any, has brought `channel`'s shared history in, so
    /// that a client joining right after gets it. Bounded by the backplane.
    pub fn ready(&self, channel: &str) -> BoxFuture<'static, ()> {
        match self.shared.backplane.get() {
            Some(backplane) => backplane.ready(channel),
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
        join_frame: Option<Frame>,
    ) -> Result<Member, JoinError> {
        self.join_with(channel, uid, kind, join_frame, false, None)
            .map(|(member, _)| member)
    }

    /// Joins a client; with `presence` it is also told when other clients join and leave.
    pub fn join_client(
        &self,
        channel: &str,
        uid: &str,
        join_frame: Frame,
        presence: bool,
    ) -> Result<Member, JoinError> {
        let kind = MemberKind::Client;
        self.join_with(channel, uid, kind, Some(join_frame), presence, None)
            .map(|(member, _)| member)
    }

    /// Joins a client that asks to resume from `since` (its last position; `None` for a
    /// token that named none). Returns the member and whether the channel could honour the
    /// position: then the member's first frames are exactly those published after it;
    /// otherwise the history as for any new member.
    pub fn join_resuming(
        &self,
        channel: &str,
        uid: &str,
        join_frame: Frame,
        presence: bool,
        since: Option<Position>,
    ) -> Result<(Member, bool), JoinError> {
        let kind = MemberKind::Client;
        self.join_with(channel, uid, kind, Some(join_frame), presence, Some(since))
    }

    fn join_with(
        &self,
        channel: &str,
        uid: &str,
        kind: MemberKind,
        join_frame: Option<Frame>,
        presence: bool,
        resume: Option<Option<Position>>,
    ) -> Result<(Member, bool), JoinError> {
        let id = self.shared.next_member.fetch_add(1, Ordering::Relaxed);
        // Holding the map lock while joining keeps the expiry sweep from removing a channel
        // between finding it and joining it.
        let mut channels = self.channels();
        let mut chan = self.admit(&mut channels, channel)?;
        if let Some(lifespan) = self.shared.config.lifespan {
            let mut old = chan.lock();
            if old.created.elapsed() >= lifespan {
                // Its members are closed by their sessions; the name starts afresh, on
                // disk too. Retired under its lock, the old channel records nothing after
                // the forget, and the new one records only after it (one queue, in order).
                old.retired = true;
                drop(old);
                let name = chan.name.clone();
                if let Some(recorder) = self.shared.recorder.get() {
                    recorder.forget(name.clone());
                }
                channels.remove(&name);
                chan = self.admit(&mut channels, &name)?;
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
            if let Some(max) = self.shared.config.max_messages {
                // A join frame is a frame in the channel's history like any other.
                if join_frame.is_some() && ring.messages >= max {
                    return Err(JoinError::MessageLimit);
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
                ring.clients_left_at = None;
                ring.members.len() == 1
            }
            MemberKind::Peer => {
                ring.links.insert(uid.clone(), id);
                false
            }
        };
        // The member's own join frame goes in first, so that whatever it makes leave the
        // ring (an older join of the same uid, the oldest join past the quota) is not part
        // of the history this member is about to be replayed.
        let join_seq = ring.next_seq;
        let mut before = ring.entries.len();
        if let Some(frame) = join_frame {
            if kind == MemberKind::Client {
                ring.messages += 1;
            }
            let key = chan.new_key();
            chan.push(&mut ring, id, false, key, frame, None);
            before = ring.position(join_seq);
        }
        let history = before.min(self.shared.config.history_limit);
        // With no history to replay the member starts caught up.
        let mut cursor = match history {
            0 => ring.next_seq,
            n => ring.entries[before - n].seq,
        };
        let mut member_stream = 0;
        let mut replay = VecDeque::new();
        // A member resuming starts right after the last frame it saw, if the channel still
        // holds everything since, within what a new member would be replayed.
        let limit = self.shared.config.history_limit;
        let recovered = match resume.flatten() {
            Some(since) if !since.stream && since.epoch == chan.epoch() => {
                let missed = before - ring.position(since.next).min(before);
                let holds = since.next >= ring.lost_live_to && since.next <= join_seq;
                let ok = holds && missed <= limit;
                if ok {
                    cursor = since.next;
                }
                ok
            }
            // A position in the cluster's stream: everything the stream put after it.
            Some(since) if since.stream && since.epoch == chan.stream_epoch() && since.next > 0 => {
                let seen = since.next - 1;
                let known = ring.entries.range(..before).any(|e| e.stream == Some(seen));
                let after: Vec<&Entry> = ring
                    .entries
                    .range(..before)
                    .filter(|e| e.stream.is_some_and(|s| s > seen))
                    .collect();
                let ok = known && after.len() <= limit;
                if ok {
                    replay = in_stream_order(after.into_iter(), usize::MAX);
                    cursor = ring.next_seq;
                    member_stream = seen;
                }
                ok
            }
            _ => false,
        };
        if !recovered && kind == MemberKind::Client && chan.stream_epoch() != 0 {
            // History in the stream's order, the same on every server of the cluster.
            replay = in_stream_order(ring.entries.range(..before), history);
            cursor = ring.next_seq;
        }
        let member = Member {
            channel: chan.clone(),
            id,
            uid: uid.clone(),
            kind,
            join_seq,
            progress: Arc::new(Progress {
                cursor: AtomicU64::new(cursor),
                blocked: AtomicBool::new(false),
            }),
            notices,
            all_join_frames: false,
            last_stream: AtomicU64::new(member_stream),
            replaying: AtomicBool::new(!replay.is_empty()),
            replay: Mutex::new(replay),
            wake: Arc::new(WakeSlot::default()),
        };
        ring.cursors.push((id, member.progress.clone()));
        ring.slowest_stale = true;
        let watched = kind == MemberKind::Client && !ring.watchers.is_empty();
        unlock_and_wake(ring, watched, false);
        if first_client {
            if let Some(backplane) = self.shared.backplane.get() {
                backplane.channel_active(&chan);
            }
        }
        Ok((member, recovered))
    }

    /// Drops the least recently active channel that has no members, to make room.
    fn evict_idle(&self, channels: &mut HashMap<Arc<str>, Arc<Channel>>) -> Result<(), JoinError> {
        let oldest = channels
            .iter()
            .filter_map(|(name, chan)| {
                let ring = chan.lock();
                (!ring.has_members()).then(|| (ring.last_activity, name.clone()))
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

    /// Frees memory for the budget: drops the in-memory history of channels without
    /// members, least recently active first, until about `wanted` bytes are free. (What
    /// is on disk stays.) Returns the bytes released.
    pub fn relieve(&self, wanted: usize) -> usize {
        relieve_locked(&mut self.channels(), wanted)
    }

    /// Removes channels that have had no members and no traffic for the expiry time.
    /// Returns the names of those removed.
    pub fn sweep_expired(&self) -> Vec<Arc<str>> {
        let now = Instant::now();
        let expiry = self.shared.config.history_expiry;
        let mut removed = Vec::new();
        self.channels().retain(|name, chan| {
            let ring = chan.lock();
            let keep = ring.has_members() || now.duration_since(ring.last_activity) < expiry;
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

/// [`Hub::relieve`] with the channel map already locked.
fn relieve_locked(channels: &mut HashMap<Arc<str>, Arc<Channel>>, wanted: usize) -> usize {
    let mut idle: Vec<(Instant, Arc<str>, usize)> = channels
        .iter()
        .filter_map(|(name, chan)| {
            let ring = chan.lock();
            let held = ring.bytes + ring.charge.bytes();
            (!ring.has_members()).then(|| (ring.last_activity, name.clone(), held))
        })
        .collect();
    idle.sort_unstable_by_key(|(at, _, _)| *at);
    let mut freed = 0;
    for (_, name, held) in idle {
        if freed >= wanted {
            break;
        }
        channels.remove(&name);
        freed += held;
    }
    if freed > 0 {
        log::info!("memory budget: dropped {freed} bytes of history of channels without members");
    }
    freed
}

/// How far a member has read, and whether its writes flow.
struct Progress {
    /// Next sequence to deliver. Written only under the channel lock.
    cursor: AtomicU64,
    /// Its connection's writes are stalled: it does not count as a reader to wait for.
    blocked: AtomicBool,
}

/// `entries` (oldest first) in the order of the cluster's stream: by stream sequence, an
/// entry without one (a local join frame, or a frame stored while the stream was out of
/// reach and not yet back from it) staying right after the entry it followed here. After
/// a failover the order frames arrived here in can differ from the stream's; sorting by it
/// gives joiners the same history on every server.
fn by_stream_place<'a>(entries: impl Iterator<Item = &'a Entry>) -> Vec<&'a Entry> {
    let mut last = 0;
    let mut keyed: Vec<(u64, &Entry)> = entries
        .map(|e| {
            last = e.stream.unwrap_or(last);
            (last, e)
        })
        .collect();
    // Stable, and linear when the entries are in order already (the usual case).
    keyed.sort_by_key(|(stream, _)| *stream);
    keyed.into_iter().map(|(_, e)| e).collect()
}

/// The last `keep` of `entries` (oldest first) in the order of the cluster's stream (see
/// [`by_stream_place`]), to replay.
fn in_stream_order<'a>(
    entries: impl Iterator<Item = &'a Entry>,
    keep: usize,
) -> VecDeque<(Frame, Option<u64>)> {
    let sorted = by_stream_place(entries);
    let skip = sorted.len().saturating_sub(keep);
    sorted
        .into_iter()
        .skip(skip)
        .map(|e| (e.frame.clone(), e.stream))
        .collect()
}

/// One connection's membership of one channel. Dropping it leaves the channel.
pub struct Member {
    channel: Arc<Channel>,
    id: MemberId,
    uid: Arc<str>,
    kind: MemberKind,
    /// Sequence of this member's join: entries before it are history.
    join_seq: u64,
    /// Next sequence to deliver, and whether writes flow; shared with the channel, which
    /// looks for its slowest reader.
    progress: Arc<Progress>,
    /// Join and leave notices, when this member asked for them.
    notices: Option<Arc<Notices>>,
    /// Also takes join frames stored after it joined (see [`Member::take_join_frames`]).
    all_join_frames: bool,
    /// The stream sequence of the last frame from the cluster's stream it went past.
    last_stream: AtomicU64,
    /// In a channel the cluster's stream orders: the history to replay first, in the
    /// stream's order (which can differ from the order frames arrived here after a
    /// failover), so joiners get the same history on every server.
    replay: Mutex<VecDeque<(Frame, Option<u64>)>>,
    replaying: AtomicBool,
    wake: Arc<WakeSlot>,
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
    pub fn publish(&self, frame: Frame) -> Result<Published, MessageLimit> {
        self.channel.publish(self, true, None, frame, None)
    }

    /// Stores a frame relayed from another server, unless a frame with the same key is
    /// already here (it came by another path) or it originated on this server.
    pub fn relay(&self, key: MsgKey, live: bool, frame: Frame) -> Published {
        self.relay_from_stream(key, live, frame, None)
    }

    /// [`Member::relay`] for a frame that came through the cluster's stream at `stream`.
    pub fn relay_from_stream(
        &self,
        key: MsgKey,
        live: bool,
        frame: Frame,
        stream: Option<u64>,
    ) -> Published {
        self.channel
            .publish(self, live, Some(key), frame, stream)
            .unwrap_or(Published {
                stored: false,
                pause: false,
            })
    }

    /// Stores a frame relayed from a server that carries no keys (plain mles v2), unless
    /// the same content is already in the channel: the Mles rule for proxies.
    pub fn relay_by_content(&self, frame: Frame) -> Published {
        {
            let ring = self.channel.lock();
            if ring.entries.iter().any(|e| e.frame == frame) {
                return Published {
                    stored: false,
                    pause: false,
                };
            }
        }
        self.channel
            .publish(self, true, None, frame, None)
            .unwrap_or(Published {
                stored: false,
                pause: false,
            })
    }

    /// Makes this member take every join frame, also those stored after it joined: a
    /// backplane that keeps the channel's history elsewhere (NATS) must store them there.
    /// Call before fetching.
    pub fn take_join_frames(&mut self) {
        self.all_join_frames = true;
    }

    /// Whether `entry` is delivered to this member: not its own, and live or part of the
    /// history it joined to.
    fn wants(&self, entry: &Entry) -> bool {
        entry.from != self.id && (entry.live || entry.seq < self.join_seq || self.all_join_frames)
    }

    /// True when frames past this member's cursor are waiting.
    pub fn has_pending(&self) -> bool {
        self.channel.head.load(Ordering::Acquire) > self.progress.cursor.load(Ordering::Relaxed)
            || self.replaying.load(Ordering::Acquire)
            || self
                .notices
                .as_ref()
                .is_some_and(|n| n.pending.load(Ordering::Acquire))
    }

    /// Ready when frames for this member are waiting; otherwise parks the task until the
    /// next publish (or notice) in its channel.
    pub fn poll_pending(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.has_pending() {
            return Poll::Ready(());
        }
        self.wake.waker.register(cx.waker());
        if !self.wake.parked.load(Ordering::Acquire) {
            let mut ring = self.channel.lock();
            // Checked again under the lock, so a publish in between is not missed.
            if self.has_pending() {
                return Poll::Ready(());
            }
            if !self.wake.parked.swap(true, Ordering::AcqRel) {
                ring.parked.push(self.wake.clone());
            }
        } else if self.has_pending() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Ready when this member fell behind what the channel keeps; otherwise parks the task
    /// until the next publish. For a member whose writes are stalled: it learns it lagged
    /// when it did, not when its socket next takes data.
    pub fn poll_lagged(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.wake.waker.register(cx.waker());
        let mut ring = self.channel.lock();
        if self.progress.cursor.load(Ordering::Relaxed) < ring.lost_live_to {
            return Poll::Ready(());
        }
        if !self.wake.parked.swap(true, Ordering::AcqRel) {
            ring.parked.push(self.wake.clone());
        }
        Poll::Pending
    }

    /// Tells the channel whether this member's writes are stalled (`true`) or flow again.
    pub fn set_blocked(&self, blocked: bool) {
        if self.progress.blocked.load(Ordering::Relaxed) != blocked {
            let mut ring = self.channel.lock();
            self.progress.blocked.store(blocked, Ordering::Relaxed);
            ring.slowest_stale = true;
            // A stalled member no longer holds paused publishers back.
            let caught_up = blocked
                && !ring.paused.is_empty()
                && ring.readers_caught_up(self.channel.hub.config.queue_frames);
            unlock_and_wake(ring, false, caught_up);
        }
    }

    /// Waits until a frame past this member's cursor is published.
    pub async fn pending(&self) {
        std::future::poll_fn(|cx| self.poll_pending(cx)).await
    }

    /// Ready once a paused publisher may go on: the readers caught up.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.wake.waker.register(cx.waker());
        let mut ring = self.channel.lock();
        if ring.readers_caught_up(self.channel.hub.config.queue_frames) {
            return Poll::Ready(());
        }
        if !self.wake.paused.swap(true, Ordering::AcqRel) {
            ring.paused.push(self.wake.clone());
        }
        Poll::Pending
    }

    /// Moves up to `max_frames` pending frames for this member (and at most about
    /// `max_bytes`, but always at least one) into `out`, in channel order. Fails when the
    /// member fell behind what the channel keeps.
    pub fn fetch(
        &self,
        out: &mut Vec<Frame>,
        max_frames: usize,
        max_bytes: usize,
    ) -> Result<(), Lagged> {
        self.fetch_frames(max_frames, max_bytes, |frame| out.push(frame.clone()))
            .map(drop)
    }

    /// Like [`Member::fetch`], handing each frame to `take` (under the channel's lock, so
    /// `take` only queues it) instead of collecting them. Returns how many of the
    /// channel's frames were taken.
    pub fn fetch_frames(
        &self,
        max_frames: usize,
        max_bytes: usize,
        mut take: impl FnMut(&Frame),
    ) -> Result<usize, Lagged> {
        if let Some(notices) = &self.notices {
            notices.drain(&mut take);
        }
        if self.replaying.load(Ordering::Acquire) {
            let mut replay = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            let mut taken = 0;
            while taken < max_frames {
                let Some((frame, stream)) = replay.pop_front() else {
                    break;
                };
                take(&frame);
                if let Some(stream) = stream {
                    self.last_stream.store(stream, Ordering::Relaxed);
                }
                taken += 1;
            }
            if !replay.is_empty() {
                return Ok(taken);
            }
            self.replaying.store(false, Ordering::Release);
            *replay = VecDeque::new();
            drop(replay);
            return Ok(taken + self.fetch_with(max_frames, max_bytes, |entry| take(&entry.frame))?);
        }
        self.fetch_with(max_frames, max_bytes, |entry| take(&entry.frame))
    }

    /// Where this member is: the position just after the last frame it was given — in the
    /// cluster's stream when that orders the channel (the same on every server), else in
    /// this server's numbering.
    pub fn position(&self) -> Position {
        let stream_epoch = self.channel.stream_epoch();
        let last_stream = self.last_stream.load(Ordering::Relaxed);
        if stream_epoch != 0 && last_stream != 0 {
            return Position {
                stream: true,
                epoch: stream_epoch,
                next: last_stream + 1,
            };
        }
        Position {
            stream: false,
            epoch: self.channel.epoch(),
            next: self.progress.cursor.load(Ordering::Relaxed),
        }
    }

    /// Like [`Member::fetch`], with each frame's key and liveness (for relaying).
    pub fn fetch_entries(
        &self,
        out: &mut Vec<Entry>,
        max_frames: usize,
        max_bytes: usize,
    ) -> Result<(), Lagged> {
        self.fetch_with(max_frames, max_bytes, |entry| out.push(entry.clone()))
            .map(drop)
    }

    /// Like [`Member::fetch_entries`], handing each entry to `take` under the lock.
    pub fn fetch_entries_with(
        &self,
        max_frames: usize,
        max_bytes: usize,
        take: impl FnMut(&Entry),
    ) -> Result<(), Lagged> {
        self.fetch_with(max_frames, max_bytes, take).map(drop)
    }

    fn fetch_with(
        &self,
        max_frames: usize,
        max_bytes: usize,
        mut take: impl FnMut(&Entry),
    ) -> Result<usize, Lagged> {
        if self.channel.head.load(Ordering::Acquire) <= self.progress.cursor.load(Ordering::Relaxed)
        {
            return Ok(0);
        }
        let taken = {
            let mut ring = self.channel.lock();
            let mut cursor = self.progress.cursor.load(Ordering::Relaxed);
            if cursor < ring.lost_live_to {
                return Err(Lagged);
            }
            let start = ring.position(cursor);
            let (mut frames, mut bytes) = (0, 0);
            let mut all = true;
            for entry in ring.entries.range(start..) {
                if frames >= max_frames || bytes >= max_bytes {
                    all = false;
                    break;
                }
                if self.wants(entry) {
                    take(entry);
                    frames += 1;
                    bytes += entry.frame.len();
                }
                if let Some(stream) = entry.stream {
                    self.last_stream.store(stream, Ordering::Relaxed);
                }
                cursor = entry.seq + 1;
            }
            if all {
                cursor = ring.next_seq;
            }
            self.progress.cursor.store(cursor, Ordering::Relaxed);
            if ring.slowest_member == self.id {
                ring.slowest_stale = true;
            }
            let caught_up = !ring.paused.is_empty()
                && ring.readers_caught_up(self.channel.hub.config.queue_frames);
            unlock_and_wake(ring, false, caught_up);
            frames
        };
        Ok(taken)
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
        if self.kind == MemberKind::Client && ring.members.is_empty() {
            ring.clients_left_at = Some(Instant::now());
        }
        if self.notices.is_some() {
            ring.watchers.retain(|(id, _)| *id != self.id);
        }
        if self.wake.parked.load(Ordering::Acquire) {
            ring.parked.retain(|slot| !Arc::ptr_eq(slot, &self.wake));
        }
        if self.wake.paused.load(Ordering::Acquire) {
            ring.paused.retain(|slot| !Arc::ptr_eq(slot, &self.wake));
        }
        ring.cursors.retain(|(id, _)| *id != self.id);
        ring.slowest_stale = true;
        let watched = self.kind == MemberKind::Client && !ring.watchers.is_empty();
        if watched {
            ring.notify_presence(
                self.id,
                &presence_notice("left", &self.uid, self.channel.name()),
            );
        }
        if !ring.has_members() {
            // Without members the queue slack serves nobody: keep the history only.
            let config = &self.channel.hub.config;
            let stream_ordered = self.channel.stream_epoch() != 0;
            ring.trim_history(config.history_limit, config.channel_bytes, stream_ordered);
            ring.settle_charge();
        }
        ring.last_activity = Instant::now();
        // Paused publishers look again: the reader that held them back may be this one.
        unlock_and_wake(ring, watched, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(limit: usize, queue: usize, bytes: usize) -> HubConfig {
        HubConfig {
            history_limit: limit,
            queue_frames: queue,
            channel_bytes: bytes,
            history_expiry: Duration::from_secs(60),
            max_members: None,
            max_messages: None,
            lifespan: None,
            max_channels: 1000,
        }
    }

    fn hub(limit: usize, queue: usize, bytes: usize) -> Hub {
        Hub::new(config(limit, queue, bytes), "test", Budget::new(1 << 30))
    }

    fn text(s: &str) -> Frame {
        Frame::text(s)
    }

    fn client(hub: &Hub, channel: &str, uid: &str) -> Member {
        let join = serde_json::json!({"uid": uid, "channel": channel}).to_string();
        hub.join(channel, uid, MemberKind::Client, Some(text(&join)))
            .unwrap()
    }

    fn drain(m: &Member) -> Result<Vec<String>, Lagged> {
        let mut out = Vec::new();
        m.fetch(&mut out, usize::MAX, usize::MAX)?;
        Ok(out
            .into_iter()
            .map(|m| m.as_text().unwrap().to_string())
            .map(|t| match serde_json::from_str::<serde_json::Value>(&t) {
                Ok(v) if v.get("uid").is_some() => format!("join {}", v["uid"].as_str().unwrap()),
                _ => t,
            })
            .collect())
    }

    /// Issue 12 (found in the stream-leader failover test): a server's own frames from an
    /// outage are stored when sent and learn their place in the cluster's stream later;
    /// when the last member leaves, the history kept must be the last `--limit` in the
    /// stream's order (what every server replays), not in arrival order.
    #[test]
    fn a_stream_ordered_channel_without_members_keeps_the_streams_last_frames() {
        let hub = hub(3, 10, 1 << 20);
        let a = client(&hub, "c", "a");
        let channel = hub.channel("c").unwrap();
        channel.attach_sequencer(7);
        // The link is lost: a's frames are stored at once, with no place in the stream.
        channel.detach_sequencer();
        a.publish(text("own1")).unwrap();
        a.publish(text("own2")).unwrap();
        let own: Vec<MsgKey> = {
            let ring = channel.lock();
            let keys = ring.entries.iter().rev().take(2).map(|e| e.key.clone());
            keys.rev().collect()
        };
        // The link comes back: other servers' frames first, then ours, published last.
        let link = hub.join("c", "nats", MemberKind::Peer, None).unwrap();
        for (i, name) in ["f10", "f11", "f12"].iter().enumerate() {
            let key = MsgKey {
                origin: Arc::from("other"),
                seq: i as u64 + 1,
            };
            link.relay_from_stream(key, true, text(name), Some(10 + i as u64));
        }
        for (i, key) in own.into_iter().enumerate() {
            link.relay_from_stream(key, true, text("echo"), Some(20 + i as u64));
        }
        drop(link);
        drop(a);
        let late = client(&hub, "c", "late");
        assert_eq!(drain(&late).unwrap(), vec!["f12", "own1", "own2"]);
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
    fn a_link_and_a_client_of_the_same_name_do_not_collide() {
        let hub = hub(3, 10, 1 << 20);
        let _client = client(&hub, "c", "a");
        let link = hub.join("c", "a", MemberKind::Peer, None).unwrap();
        assert!(hub.channel("c").unwrap().has_link("a"));
        drop(link);
        assert!(hub.channel("c").unwrap().has_member("a"));
    }

    #[test]
    fn a_member_that_falls_behind_while_others_keep_up_lags() {
        let hub = hub(2, 4, 1 << 20);
        let slow = client(&hub, "c", "slow");
        let fast = client(&hub, "c", "fast");
        let publisher = client(&hub, "c", "p");
        drain(&fast).unwrap();
        // The slow member's connection stopped taking data.
        slow.set_blocked(true);
        for i in 0..10 {
            let published = publisher.publish(text(&i.to_string())).unwrap();
            assert!(!published.pause, "a reader keeps up: no pause");
            assert_eq!(drain(&fast).unwrap(), vec![i.to_string()]);
        }
        assert_eq!(drain(&slow), Err(Lagged));
    }

    #[test]
    fn when_every_reader_is_behind_the_publisher_is_paused_instead() {
        let hub = hub(2, 8, 1 << 20);
        let a = client(&hub, "c", "a");
        let b = client(&hub, "c", "b");
        let publisher = client(&hub, "c", "p");
        drain(&a).unwrap();
        drain(&b).unwrap();
        let mut paused_at = None;
        for i in 0..8 {
            if publisher.publish(text(&i.to_string())).unwrap().pause {
                paused_at = Some(i);
                break;
            }
        }
        let paused_at = paused_at.expect("the publisher was paused");
        assert!(paused_at < 8, "paused before any reader could lag");
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(publisher.poll_writable(&mut cx).is_pending());
        // Nobody lagged; once a reader catches up the publisher may go on.
        assert!(drain(&a).is_ok() && drain(&b).is_ok());
        assert!(publisher.poll_writable(&mut cx).is_ready());
    }

    #[test]
    fn a_member_flooding_the_channel_does_not_lag_on_its_own_frames() {
        let hub = hub(4, 4, 1 << 20);
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
    fn joins_take_at_most_half_the_history_and_one_per_uid() {
        let hub = hub(10, 100, 1 << 20);
        let speaker = client(&hub, "c", "speaker");
        for i in 0..10 {
            speaker.publish(text(&format!("m{i}"))).unwrap();
        }
        for round in 0..2 {
            for i in 0..50 {
                drop(client(&hub, "c", &format!("u{i}")));
            }
            let _ = round;
        }
        let late = client(&hub, "c", "late");
        let got = drain(&late).unwrap();
        assert_eq!(got.len(), 10);
        let joins: Vec<_> = got.iter().filter(|t| t.starts_with("join ")).collect();
        // Half of the history, the late member's own join among them.
        assert_eq!(joins.len(), 4, "{got:?}");
        let mut unique = joins.clone();
        unique.dedup();
        assert_eq!(unique.len(), joins.len(), "one join per uid: {got:?}");
        let messages: Vec<_> = got.iter().filter(|t| !t.starts_with("join ")).collect();
        assert_eq!(
            messages,
            ["m4", "m5", "m6", "m7", "m8", "m9"],
            "messages survive: {got:?}"
        );
        // A member that joined first never lagged for all those joins.
        assert!(drain(&speaker).is_ok());
    }

    #[test]
    fn a_burst_of_joins_never_makes_early_members_lag() {
        let hub = hub(4, 8, 1 << 20);
        let early = client(&hub, "c", "early");
        let mut members = Vec::new();
        for i in 0..500 {
            members.push(client(&hub, "c", &format!("m{i}")));
        }
        assert!(drain(&early).is_ok());
        let publisher = client(&hub, "c", "p");
        publisher.publish(text("hello")).unwrap();
        assert_eq!(drain(&early).unwrap(), vec!["hello"]);
        for m in &members {
            assert_eq!(drain(m).unwrap().last().map(String::as_str), Some("hello"));
        }
    }

    #[test]
    fn channel_bytes_bound_the_ring() {
        let hub = hub(100, 100, 10);
        let a = hub
            .join(
                "c",
                "a",
                MemberKind::Client,
                Some(Frame::binary(vec![0u8; 4])),
            )
            .unwrap();
        for _ in 0..10 {
            a.publish(Frame::binary(vec![1u8; 4])).unwrap();
        }
        let (_, bytes) = hub.channel("c").unwrap().stored();
        assert!(bytes <= 10, "ring holds {bytes} bytes");
    }

    #[test]
    fn a_channel_without_members_keeps_only_its_history() {
        let hub = hub(5, 100, 1 << 20);
        let a = client(&hub, "c", "a");
        let b = client(&hub, "c", "b");
        for i in 0..50 {
            a.publish(text(&i.to_string())).unwrap();
        }
        assert!(hub.channel("c").unwrap().stored().0 > 5);
        drop((a, b));
        assert_eq!(hub.channel("c").unwrap().stored().0, 5);
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
        assert!(link_a.relay(key.clone(), true, text("x")).stored);
        assert!(
            !link_b.relay(key, true, text("x")).stored,
            "second path stored it again"
        );
        let own = MsgKey {
            origin: hub.origin().clone(),
            seq: 0,
        };
        assert!(!link_a.relay(own, true, text("echo")).stored);
        assert_eq!(drain(&reader).unwrap(), vec!["x"]);
        let mut relayed = Vec::new();
        link_b.fetch_entries(&mut relayed, 100, usize::MAX).unwrap();
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
        assert!(hub.channel("c").unwrap().without_clients_for().is_none());
        drop(a);
        assert_eq!(hub.channel("c").unwrap().client_count(), 1);
    }

    #[test]
    fn past_the_channel_cap_the_oldest_idle_channel_makes_room() {
        let mut c = config(5, 5, 1000);
        c.max_channels = 2;
        let hub = Hub::new(c, "t", Budget::new(1 << 30));
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
        // Links are held to the cap too.
        assert_eq!(
            hub.join("third", "link", MemberKind::Peer, None).err(),
            Some(JoinError::TooManyChannels)
        );
        drop(busy);
    }

    #[test]
    fn near_the_budget_idle_history_goes_first_then_new_channels_are_refused() {
        let budget = Budget::new(64 * 1024);
        let hub = Hub::new(config(5, 5, 1 << 20), "t", budget.clone());
        let _held = client(&hub, "held", "a");
        drop(client(&hub, "idle", "a"));
        // Fill the budget with something else.
        let filler = budget.try_reserve(budget.limit() - budget.used() - 100, Need::Service);
        assert!(filler.is_some());
        let new = hub.join("new", "x", MemberKind::Client, None);
        assert!(
            hub.channel("idle").is_none(),
            "idle history was not dropped"
        );
        assert!(
            hub.channel("held").is_some(),
            "a channel with members was dropped"
        );
        assert!(new.is_ok(), "the memory freed made room");
        // With nothing left to drop, a new channel is refused; members go on.
        let _more = budget.try_reserve(budget.limit() - budget.used(), Need::Service);
        let refused = hub.join("newer", "x", MemberKind::Client, None);
        assert_eq!(refused.err(), Some(JoinError::OutOfMemory));
        assert!(hub.join("held", "b", MemberKind::Client, None).is_ok());
    }

    #[test]
    fn idle_channels_expire_but_joined_ones_stay() {
        let mut c = config(5, 5, 1000);
        c.history_expiry = Duration::ZERO;
        let hub = Hub::new(c, "t", Budget::new(1 << 30));
        let kept = client(&hub, "kept", "a");
        drop(client(&hub, "gone", "a"));
        assert_eq!(hub.sweep_expired(), vec![Arc::from("gone")]);
        assert!(hub.channel("gone").is_none());
        assert_eq!(kept.channel().name(), "kept");
        assert!(hub.channel("kept").is_some());
    }

    #[test]
    fn a_parked_member_is_woken_by_a_publish() {
        use std::sync::atomic::AtomicUsize;
        use std::task::Waker;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let hub = hub(10, 10, 1 << 20);
        let reader = client(&hub, "c", "r");
        let writer = client(&hub, "c", "w");
        drain(&reader).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(reader.poll_pending(&mut cx).is_pending());
        assert!(reader.poll_pending(&mut cx).is_pending(), "parks once");
        writer.publish(text("x")).unwrap();
        writer.publish(text("y")).unwrap();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "one wake per parking");
        assert!(reader.poll_pending(&mut cx).is_ready());
        assert_eq!(drain(&reader).unwrap(), vec!["x", "y"]);
    }
}
