//! Timers for every session in one place: a coarse clock and one task that looks at every
//! session a few times a second, instead of a timer per connection.
//!
//! A session's deadlines (join frame, pings, silence, idleness, age, a stalled write, a
//! pause, its channel's end of life, shutdown) are plain numbers in its [`Watch`]; the
//! sessions write them with single atomic stores of the coarse clock (no system call per
//! frame), and the sweeper compares them with the time and signals the sessions that
//! must act. An idle connection thus owns no timer, and one that is never due is never
//! woken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

use crate::shutdown::Shutdown;

/// How often the sweeper looks.
pub const TICK: Duration = Duration::from_millis(100);

/// A write stalled this long means the peer stopped reading, not that it is busy for a
/// moment: its channel stops waiting for it (see [`Signals::stalled`]).
pub const STALL_MARK: Duration = Duration::from_millis(300);

static START: OnceLock<Instant> = OnceLock::new();
static NOW_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the process started, as of the last tick (within [`TICK`]).
pub fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}

/// Reads the real clock and publishes it as the coarse one.
fn tick_clock() -> u64 {
    let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64;
    NOW_MS.fetch_max(now, Ordering::Relaxed);
    now_ms()
}

/// Per-session deadlines the sweeper enforces.
#[derive(Clone, Debug)]
pub struct Deadlines {
    pub first_frame: Duration,
    pub ping_interval: Duration,
    pub missed_pongs: u32,
    pub write_timeout: Duration,
    /// Clients only.
    pub idle: Option<Duration>,
    /// Clients only.
    pub max_age: Option<Duration>,
}

impl From<&crate::config::SessionConfig> for Deadlines {
    fn from(config: &crate::config::SessionConfig) -> Deadlines {
        Deadlines {
            first_frame: config.first_frame_timeout,
            ping_interval: config.ping_interval,
            missed_pongs: config.missed_pongs,
            write_timeout: config.write_timeout,
            idle: config.idle_timeout,
            max_age: config.max_age,
        }
    }
}

/// Why the sweeper ends a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Expiry {
    JoinTimeout = 1,
    Unresponsive,
    WriteStalled,
    Idle,
    MaxAge,
    ChannelLifespan,
    Shutdown,
}

impl Expiry {
    fn from_u8(v: u8) -> Option<Expiry> {
        Some(match v {
            1 => Expiry::JoinTimeout,
            2 => Expiry::Unresponsive,
            3 => Expiry::WriteStalled,
            4 => Expiry::Idle,
            5 => Expiry::MaxAge,
            6 => Expiry::ChannelLifespan,
            7 => Expiry::Shutdown,
            _ => return None,
        })
    }
}

/// What the sweeper asks of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Signals {
    /// Send a ping.
    pub ping: bool,
    /// Stop waiting for readers: a pause lasted the write timeout.
    pub resume: bool,
    /// Writes have been stalled for [`STALL_MARK`]: this member stopped reading.
    pub stalled: bool,
    /// End the session.
    pub expired: Option<Expiry>,
}

const PING: u8 = 1;
const RESUME: u8 = 2;
const STALLED: u8 = 4;

/// One session's clock readings and the sweeper's signals to it.
#[derive(Default)]
pub struct Watch {
    started: u64,
    heard: AtomicU64,
    data: AtomicU64,
    pinged: AtomicU64,
    stalled_since: AtomicU64,
    stall_told: AtomicBool,
    paused_since: AtomicU64,
    /// 0 until joined; then the channel's end of life in clock ms, or `u64::MAX`.
    end_of_life: AtomicU64,
    joined: AtomicBool,
    /// A client (held to idle and age limits), not a link.
    client: AtomicBool,
    flags: AtomicU8,
    expired: AtomicU8,
    waker: AtomicWaker,
}

impl Watch {
    /// Something arrived from the peer (any frame).
    pub fn heard(&self) {
        self.heard.store(now_ms(), Ordering::Relaxed);
    }

    /// A data frame arrived.
    pub fn heard_data(&self) {
        let now = now_ms();
        self.heard.store(now, Ordering::Relaxed);
        self.data.store(now, Ordering::Relaxed);
    }

    /// The session joined; `client` sessions are held to idle and age limits;
    /// `end_of_life` is its channel's, if it has one.
    pub fn joined(&self, client: bool, end_of_life: Option<Instant>) {
        let eol = match end_of_life {
            Some(at) => {
                let start = *START.get_or_init(Instant::now);
                at.saturating_duration_since(start).as_millis() as u64
            }
            None => u64::MAX,
        };
        self.end_of_life.store(eol, Ordering::Relaxed);
        self.client.store(client, Ordering::Relaxed);
        self.joined.store(true, Ordering::Release);
    }

    /// A write could not complete now (`true`) or the queue drained (`false`).
    pub fn write_stalled(&self, stalled: bool) {
        let since = &self.stalled_since;
        if !stalled {
            if since.load(Ordering::Relaxed) != 0 {
                since.store(0, Ordering::Relaxed);
                self.stall_told.store(false, Ordering::Relaxed);
            }
        } else if since.load(Ordering::Relaxed) == 0 {
            since.store(now_ms().max(1), Ordering::Relaxed);
        }
    }

    /// The session paused reading its publisher (`true`) or went on (`false`).
    pub fn paused(&self, paused: bool) {
        let value = if paused { now_ms().max(1) } else { 0 };
        self.paused_since.store(value, Ordering::Relaxed);
    }

    /// Registers the task to wake for signals.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Takes the pending signals.
    pub fn take_signals(&self) -> Signals {
        let flags = self.flags.swap(0, Ordering::AcqRel);
        Signals {
            ping: flags & PING != 0,
            resume: flags & RESUME != 0,
            stalled: flags & STALLED != 0,
            expired: Expiry::from_u8(self.expired.load(Ordering::Acquire)),
        }
    }

    fn signal(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
        self.waker.wake();
    }

    fn expire(&self, why: Expiry) {
        if self
            .expired
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// Looks at one session at `now`.
    fn check(&self, now: u64, limits: &Deadlines, down: bool) {
        if down {
            return self.expire(Expiry::Shutdown);
        }
        let ms = |d: Duration| d.as_millis() as u64;
        let since = |t: u64| now.saturating_sub(t);
        let heard = self.heard.load(Ordering::Relaxed).max(self.started);
        if !self.joined.load(Ordering::Acquire) {
            if since(self.started) >= ms(limits.first_frame) {
                self.expire(Expiry::JoinTimeout);
            }
            return;
        }
        let silence = since(heard);
        let ping = ms(limits.ping_interval);
        if silence >= ping * (limits.missed_pongs as u64 + 1) {
            return self.expire(Expiry::Unresponsive);
        }
        let stalled = self.stalled_since.load(Ordering::Relaxed);
        if stalled != 0 && since(stalled) >= ms(limits.write_timeout) {
            return self.expire(Expiry::WriteStalled);
        }
        if stalled != 0
            && since(stalled) >= ms(STALL_MARK)
            && !self.stall_told.swap(true, Ordering::Relaxed)
        {
            self.signal(STALLED);
        }
        if now >= self.end_of_life.load(Ordering::Relaxed) {
            return self.expire(Expiry::ChannelLifespan);
        }
        if self.client.load(Ordering::Relaxed) {
            if let Some(age) = limits.max_age {
                if since(self.started) >= ms(age) {
                    return self.expire(Expiry::MaxAge);
                }
            }
            if let Some(idle) = limits.idle {
                let data = self.data.load(Ordering::Relaxed).max(self.started);
                if since(data) >= ms(idle) {
                    return self.expire(Expiry::Idle);
                }
            }
        }
        if silence >= ping && since(self.pinged.load(Ordering::Relaxed)) >= ping {
            self.pinged.store(now, Ordering::Relaxed);
            self.signal(PING);
        }
        let paused = self.paused_since.load(Ordering::Relaxed);
        if paused != 0 && since(paused) >= ms(limits.write_timeout) {
            self.signal(RESUME);
        }
    }
}

/// Shards of the registry, so registering does not contend on one lock.
const SHARDS: usize = 16;

/// Every live session's [`Watch`], and the task that sweeps them.
pub struct Sweeper {
    limits: Deadlines,
    shards: Vec<Mutex<HashMap<u64, Arc<Watch>>>>,
    next: AtomicU64,
    down: AtomicBool,
}

/// A session's place in the sweeper; dropping it unregisters the session.
pub struct Registration {
    sweeper: Arc<Sweeper>,
    id: u64,
    watch: Arc<Watch>,
}

impl Registration {
    pub fn watch(&self) -> &Watch {
        &self.watch
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sweeper.shard(self.id).remove(&self.id);
    }
}

impl Sweeper {
    /// A sweeper enforcing `limits`; run it with [`Sweeper::run`].
    pub fn new(limits: Deadlines) -> Arc<Sweeper> {
        tick_clock();
        Arc::new(Sweeper {
            limits,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next: AtomicU64::new(0),
            down: AtomicBool::new(false),
        })
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Watch>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new session, starting its clock now.
    pub fn register(self: &Arc<Self>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let watch = Arc::new(Watch {
            started: now,
            ..Watch::default()
        });
        watch.heard.store(now, Ordering::Relaxed);
        watch.data.store(now, Ordering::Relaxed);
        watch.pinged.store(now, Ordering::Relaxed);
        if self.down.load(Ordering::Acquire) {
            watch.expire(Expiry::Shutdown);
        }
        self.shard(id).insert(id, watch.clone());
        Registration {
            sweeper: self.clone(),
            id,
            watch,
        }
    }

    /// Sessions registered now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn sweep(&self) {
        let now = tick_clock();
        let down = self.down.load(Ordering::Acquire);
        for shard in &self.shards {
            let watches: Vec<Arc<Watch>> = shard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for watch in watches {
                watch.check(now, &self.limits, down);
            }
        }
    }

    /// Ticks until the process ends; at shutdown every session is told at once.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.recv(), if !self.down.load(Ordering::Acquire) => {
                    self.down.store(true, Ordering::Release);
                }
            }
            self.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Deadlines {
        Deadlines {
            first_frame: Duration::from_millis(1000),
            ping_interval: Duration::from_millis(100),
            missed_pongs: 2,
            write_timeout: Duration::from_millis(500),
            idle: Some(Duration::from_millis(2000)),
            max_age: None,
        }
    }

    fn watch_at(start: u64) -> Watch {
        let w = Watch {
            started: start,
            ..Watch::default()
        };
        w.heard.store(start, Ordering::Relaxed);
        w.data.store(start, Ordering::Relaxed);
        w.pinged.store(start, Ordering::Relaxed);
        w
    }

    #[test]
    fn deadlines_fire_in_order() {
        let l = limits();
        let w = watch_at(1000);
        w.check(1999, &l, false);
        assert_eq!(w.take_signals(), Signals::default());
        w.check(2000, &l, false);
        assert_eq!(w.take_signals().expired, Some(Expiry::JoinTimeout));

        let w = watch_at(1000);
        w.joined(true, None);
        w.check(1100, &l, false);
        assert!(w.take_signals().ping, "quiet for a ping interval");
        w.check(1150, &l, false);
        assert!(!w.take_signals().ping, "one ping per interval");
        w.check(1300, &l, false);
        assert_eq!(w.take_signals().expired, Some(Expiry::Unresponsive));

        let w = watch_at(1000);
        w.joined(true, None);
        w.stalled_since.store(1010, Ordering::Relaxed);
        w.heard.store(1500, Ordering::Relaxed);
        w.check(1510, &l, false);
        assert_eq!(w.take_signals().expired, Some(Expiry::WriteStalled));

        let w = watch_at(1000);
        w.joined(false, None);
        w.check(1050, &l, true);
        assert_eq!(w.take_signals().expired, Some(Expiry::Shutdown));
    }

    #[test]
    fn links_are_not_held_to_client_limits() {
        let mut l = limits();
        l.ping_interval = Duration::from_secs(100);
        l.idle = Some(Duration::from_millis(10));
        l.max_age = Some(Duration::from_millis(10));
        let w = watch_at(0);
        w.joined(false, None);
        w.check(5000, &l, false);
        assert_eq!(w.take_signals(), Signals::default());
        let w = watch_at(0);
        w.joined(true, None);
        w.check(5000, &l, false);
        assert_eq!(w.take_signals().expired, Some(Expiry::MaxAge));
    }
}
