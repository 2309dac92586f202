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
//! Locks: the channel map's mutex is taken only to join and to sweep expired channels;
//! each channel has its own mutex, held for a few pointer copies at a time, never across
//! an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
}

impl HubConfig {
    fn ring_frames(&self) -> usize {
        self.history_limit.max(self.queue_frames)
    }
}

/// Identifies one membership (one connection's stay in one channel).
pub type MemberId = u64;

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("uid already joined to this channel")]
    DuplicateUid,
}

/// A member fell further behind than its channel keeps frames for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too slow: fell behind the channel")]
pub struct Lagged;

#[derive(Clone)]
struct Entry {
    origin: MemberId,
    /// Join frames are history only: replayed to later members, never sent live.
    live: bool,
    msg: Message,
}

struct Ring {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    bytes: usize,
    members: HashMap<Arc<str>, MemberId>,
    last_activity: Instant,
}

impl Ring {
    fn head(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }
}

/// One channel: its ring and the signal that wakes members waiting for frames.
pub struct Channel {
    name: Arc<str>,
    ring: Mutex<Ring>,
    /// Sequence number the next frame will get; read without the lock to skip idle polls.
    head: AtomicU64,
    published: Notify,
    config: Arc<HubConfig>,
}

impl Channel {
    fn new(name: Arc<str>, config: Arc<HubConfig>) -> Channel {
        Channel {
            name,
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                first_seq: 0,
                bytes: 0,
                members: HashMap::new(),
                last_activity: Instant::now(),
            }),
            head: AtomicU64::new(0),
            published: Notify::new(),
            config,
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

    /// Appends a frame and wakes the members waiting for one. Never blocks on a member.
    fn push(&self, ring: &mut Ring, entry: Entry) {
        ring.bytes += entry.msg.len();
        ring.entries.push_back(entry);
        let max_frames = self.config.ring_frames();
        while ring.entries.len() > max_frames
            || (ring.bytes > self.config.channel_bytes && ring.entries.len() > 1)
        {
            let old = ring.entries.pop_front().expect("ring is not empty");
            ring.bytes -= old.msg.len();
            ring.first_seq += 1;
        }
        ring.last_activity = Instant::now();
        self.head.store(ring.head(), Ordering::Release);
    }

    /// Appends a live frame from `member`, never waiting on anyone. First the member's
    /// cursor skips whatever pending frames are not for it (its own, or join frames after
    /// its join), so a member flooding the channel never counts its own frames against its
    /// lag budget. Each entry is skipped at most once, so this is amortised O(1).
    fn publish(&self, member: &Member, msg: Message) {
        {
            let mut ring = self.lock();
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
            self.push(
                &mut ring,
                Entry {
                    origin: member.id,
                    live: true,
                    msg,
                },
            );
            if caught_up {
                cursor = ring.head();
            }
            member.cursor.store(cursor, Ordering::Relaxed);
        }
        self.published.notify_waiters();
    }

    /// Number of members currently joined.
    pub fn member_count(&self) -> usize {
        self.lock().members.len()
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
    next_member: AtomicU64,
    config: Arc<HubConfig>,
}

impl Hub {
    pub fn new(config: HubConfig) -> Hub {
        Hub {
            channels: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(1),
            config: Arc::new(config),
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Channel>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins `uid` to `channel`. The member's first frames are the channel's history (up
    /// to the history limit), then everything published after this call, minus its own.
    /// `join_frame` goes into history for later members, but is not sent to current ones.
    pub fn join(&self, channel: &str, uid: &str, join_frame: Message) -> Result<Member, JoinError> {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        // Holding the map lock while joining keeps the expiry sweep from removing a channel
        // between finding it and joining it.
        let mut channels = self.channels();
        let chan = channels
            .entry(Arc::from(channel))
            .or_insert_with_key(|name| Arc::new(Channel::new(name.clone(), self.config.clone())))
            .clone();
        let mut ring = chan.lock();
        drop(channels);
        let uid: Arc<str> = Arc::from(uid);
        if ring.members.contains_key(&uid) {
            return Err(JoinError::DuplicateUid);
        }
        ring.members.insert(uid.clone(), id);
        let history = ring.entries.len().min(self.config.history_limit) as u64;
        let cursor = ring.head() - history;
        let join_seq = ring.head();
        // With no history to replay the member starts past its own join frame, caught up.
        let cursor = if cursor == join_seq {
            join_seq + 1
        } else {
            cursor
        };
        chan.push(
            &mut ring,
            Entry {
                origin: id,
                live: false,
                msg: join_frame,
            },
        );
        drop(ring);
        Ok(Member {
            channel: chan,
            id,
            uid,
            join_seq,
            cursor: AtomicU64::new(cursor),
        })
    }

    /// Removes channels that have had no members and no traffic for the expiry time.
    /// Returns how many were removed.
    pub fn sweep_expired(&self) -> usize {
        let now = Instant::now();
        let expiry = self.config.history_expiry;
        let mut channels = self.channels();
        let before = channels.len();
        channels.retain(|_, chan| {
            let ring = chan.lock();
            !ring.members.is_empty() || now.duration_since(ring.last_activity) < expiry
        });
        before - channels.len()
    }

    /// Channels, and frames and bytes held across all of them.
    pub fn stats(&self) -> (usize, usize, usize) {
        let channels: Vec<Arc<Channel>> = self.channels().values().cloned().collect();
        let (frames, bytes) = channels.iter().fold((0, 0), |(f, b), c| {
            let (cf, cb) = c.stored();
            (f + cf, b + cb)
        });
        (channels.len(), frames, bytes)
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
    /// Sequence of this member's own join frame: entries before it are history.
    join_seq: u64,
    /// Next sequence to deliver. Atomic so `&Member` can both publish and fetch; written
    /// only under the channel lock.
    cursor: AtomicU64,
}

impl Member {
    pub fn id(&self) -> MemberId {
        self.id
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// Sends a frame to every other member of the channel and into its history.
    pub fn publish(&self, msg: Message) {
        self.channel.publish(self, msg);
    }

    /// Whether the entry at `seq` is delivered to this member: not its own, and live or
    /// part of the history it joined to.
    fn wants(&self, entry: &Entry, seq: u64) -> bool {
        entry.origin != self.id && (entry.live || seq < self.join_seq)
    }

    /// True when frames past this member's cursor are waiting.
    pub fn has_pending(&self) -> bool {
        self.channel.head.load(Ordering::Acquire) > self.cursor.load(Ordering::Relaxed)
    }

    /// Moves up to `max` pending frames for this member into `out`, in channel order.
    /// Fails when the member fell behind what the channel keeps.
    pub fn fetch(&self, out: &mut Vec<Message>, max: usize) -> Result<(), Lagged> {
        if !self.has_pending() {
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
                out.push(entry.msg.clone());
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
        if ring.members.get(&self.uid) == Some(&self.id) {
            ring.members.remove(&self.uid);
        }
        ring.last_activity = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(limit: usize, queue: usize, bytes: usize) -> Hub {
        Hub::new(HubConfig {
            history_limit: limit,
            queue_frames: queue,
            channel_bytes: bytes,
            history_expiry: Duration::from_secs(60),
        })
    }

    fn text(s: &str) -> Message {
        Message::text(s)
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
        let a = hub.join("c", "a", text("join a")).unwrap();
        let b = hub.join("c", "b", text("join b")).unwrap();
        assert_eq!(drain(&a).unwrap(), Vec::<String>::new());
        assert_eq!(drain(&b).unwrap(), vec!["join a"]);
        a.publish(text("1"));
        b.publish(text("2"));
        assert_eq!(drain(&a).unwrap(), vec!["2"]);
        assert_eq!(drain(&b).unwrap(), vec!["1"]);
    }

    #[test]
    fn history_is_bounded_by_limit_and_replayed_in_order() {
        let hub = hub(3, 10, 1 << 20);
        let a = hub.join("c", "a", text("join a")).unwrap();
        for i in 0..5 {
            a.publish(text(&i.to_string()));
        }
        let late = hub.join("c", "late", text("join late")).unwrap();
        assert_eq!(drain(&late).unwrap(), vec!["2", "3", "4"]);
    }

    #[test]
    fn duplicate_uid_is_refused_until_the_first_leaves() {
        let hub = hub(3, 10, 1 << 20);
        let a = hub.join("c", "a", text("j")).unwrap();
        assert_eq!(
            hub.join("c", "a", text("j")).err(),
            Some(JoinError::DuplicateUid)
        );
        assert!(hub.join("other", "a", text("j")).is_ok());
        drop(a);
        assert!(hub.join("c", "a", text("j")).is_ok());
    }

    #[test]
    fn a_member_that_falls_behind_lags_and_others_go_on() {
        let hub = hub(2, 4, 1 << 20);
        let slow = hub.join("c", "slow", text("j")).unwrap();
        let fast = hub.join("c", "fast", text("j")).unwrap();
        let publisher = hub.join("c", "p", text("j")).unwrap();
        drain(&fast).unwrap();
        for i in 0..10 {
            publisher.publish(text(&i.to_string()));
            assert_eq!(drain(&fast).unwrap(), vec![i.to_string()]);
        }
        assert_eq!(drain(&slow), Err(Lagged));
    }

    #[test]
    fn a_member_flooding_the_channel_does_not_lag_on_its_own_frames() {
        let hub = hub(2, 4, 1 << 20);
        let flooder = hub.join("c", "f", text("j")).unwrap();
        for i in 0..100 {
            flooder.publish(text(&i.to_string()));
        }
        assert_eq!(drain(&flooder), Ok(vec![]));
    }

    #[test]
    fn channel_bytes_bound_the_ring() {
        let hub = hub(100, 100, 10);
        let a = hub.join("c", "a", Message::binary(vec![0u8; 4])).unwrap();
        for _ in 0..10 {
            a.publish(Message::binary(vec![1u8; 4]));
        }
        let (_, bytes) = hub.channel("c").unwrap().stored();
        assert!(bytes <= 10, "ring holds {bytes} bytes");
    }

    #[test]
    fn idle_channels_expire_but_joined_ones_stay() {
        let hub = Hub::new(HubConfig {
            history_limit: 5,
            queue_frames: 5,
            channel_bytes: 1000,
            history_expiry: Duration::ZERO,
        });
        let kept = hub.join("kept", "a", text("j")).unwrap();
        drop(hub.join("gone", "a", text("j")).unwrap());
        assert_eq!(hub.sweep_expired(), 1);
        assert!(hub.channel("gone").is_none());
        assert_eq!(kept.channel().name(), "kept");
        assert!(hub.channel("kept").is_some());
    }
}
