//! One memory budget for everything clients can make the server hold.
//!
//! A public server must assume every client is an attacker, and an attacker who finds one
//! structure without a bound (history, a frame it trickles in, a queue to disk, a file it
//! never reads) makes the server hold whatever it likes. Bounding each structure on its own
//! multiplies out to nothing useful (per channel × channels × ...), so instead every byte a
//! client can make the server hold is charged to one [`Budget`], the `--max-memory` flag:
//!
//! - each frame's payload, from the moment its header announces it until the last holder
//!   (a channel's ring, a member's write batch, the queue to disk, a link) drops it: the
//!   payload's buffer owns its [`Reservation`] (see [`Budget::charged`]), so whoever keeps
//!   the bytes keeps them counted, with no bookkeeping at the holders;
//! - each connection's fixed cost (task, socket, protocol state, TLS buffers), for its
//!   whole life;
//! - each channel's fixed cost;
//! - static file responses in flight and the compressed-file cache.
//!
//! Two levels, so that those already being served keep being served: growth (a new
//! connection, a new channel, a large frame) must leave [`HEADROOM`] of the budget free;
//! service (a member's ordinary frame) may use all of it. Callers that are refused first ask
//! the hub to evict the history of channels without members, then refuse, or, for a member's
//! frame, wait for memory (TCP backpressure slows the sender) — see `session`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::frame::Frame;

/// Share of the budget that growth must leave free for those already served (1/8).
pub const HEADROOM: usize = 8;

/// What a reservation is for, which decides how much of the budget it may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Something new: a connection, a channel, a large frame. Refused past the headroom.
    Growth,
    /// Serving what exists: a member's frame. May use the whole budget.
    Service,
}

/// The budget: a limit and an atomic count of reserved bytes.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// Tasks waiting for memory; releases notify only while there are some.
    waiting: AtomicUsize,
    freed: Notify,
}

/// Bytes reserved from a [`Budget`]; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn ceiling(&self, need: Need) -> usize {
        match need {
            Need::Growth => self.limit - self.limit / HEADROOM,
            Need::Service => self.limit,
        }
    }

    /// How many bytes would have to be released for `bytes` more to fit what `need` may
    /// use (0: they fit now).
    pub fn shortfall(&self, bytes: usize, need: Need) -> usize {
        (self.used() + bytes).saturating_sub(self.ceiling(need))
    }

    /// What to ask the hub to release when `bytes` do not fit: the shortfall and a margin
    /// (1/64 of the budget), so the next few do not each start an eviction.
    pub fn relief_for(&self, bytes: usize, need: Need) -> usize {
        self.shortfall(bytes, need) + self.limit / 64
    }

    /// Reserves `bytes` if that keeps the total within what `need` may use.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize, need: Need) -> Option<Reservation> {
        let ceiling = self.ceiling(need);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|total| *total <= ceiling)
            })
            .ok()?;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Reserves `bytes`, waiting for memory to be released while the budget is full.
    /// Returns `None` if `bytes` could never fit.
    pub async fn reserve(self: &Arc<Self>, bytes: usize, need: Need) -> Option<Reservation> {
        if bytes > self.ceiling(need) {
            return None;
        }
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            self.waiting.fetch_add(1, Ordering::AcqRel);
            let reserved = self.try_reserve(bytes, need);
            if reserved.is_none() {
                freed.await;
            }
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if reserved.is_some() {
                return reserved;
            }
        }
    }

    /// Counts `bytes` whatever the total: for memory that is already held and must be
    /// accounted for (the budget then refuses more until it is released).
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Reservation {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Reservation {
            budget: self.clone(),
            bytes,
        }
    }

    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// `data` as shared bytes that keep `reservation` until the last clone is dropped.
    pub fn charged(data: Vec<u8>, reservation: Reservation) -> Bytes {
        Bytes::from_owner(Charged {
            data,
            _reservation: reservation,
        })
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Grows this reservation by `more` bytes if `need` allows it.
    pub fn try_grow(&mut self, more: usize, need: Need) -> bool {
        match self.budget.try_reserve(more, need) {
            Some(extra) => {
                self.absorb(extra);
                true
            }
            None => false,
        }
    }

    /// Grows this reservation by `more` bytes whatever the total (see [`Budget::charge`]).
    pub fn force_grow(&mut self, more: usize) {
        self.absorb(self.budget.charge(more));
    }

    /// Takes `other`'s bytes into this reservation.
    pub fn absorb(&mut self, mut other: Reservation) {
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Releases `less` bytes (at most what is held) now.
    pub fn shrink(&mut self, less: usize) {
        let less = less.min(self.bytes);
        self.bytes -= less;
        self.budget.release(less);
    }

    /// Splits off `bytes` (at most what is held) into a reservation of their own.
    pub fn split(&mut self, bytes: usize) -> Reservation {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Reservation {
            budget: self.budget.clone(),
            bytes,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// A frame's buffer and the memory it is charged to.
struct Charged {
    data: Vec<u8>,
    _reservation: Reservation,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// `frame`, charged to `budget` (whatever the total) for as long as any of its bytes are
/// held: for frames whose buffers were made elsewhere (loaded from disk, received from
/// NATS) and must count like the rest.
pub fn charge_frame(budget: &Arc<Budget>, frame: Frame) -> Frame {
    struct Held {
        data: Bytes,
        _charge: Reservation,
    }
    impl AsRef<[u8]> for Held {
        fn as_ref(&self) -> &[u8] {
            &self.data
        }
    }
    let kind = frame.kind();
    let data = Bytes::from_owner(Held {
        data: frame.data().clone(),
        _charge: budget.charge(frame.len()),
    });
    Frame::new(kind, data).unwrap_or(frame)
}

/// Parses a size like `512M`, `2G`, `1500000`, `64K` (powers of 1024; an optional `B` or
/// `iB` suffix is accepted too).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let upper = text.to_ascii_uppercase();
    let upper = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, shift) = match upper.chars().last() {
        Some('K') => (&upper[..upper.len() - 1], 10),
        Some('M') => (&upper[..upper.len() - 1], 20),
        Some('G') => (&upper[..upper.len() - 1], 30),
        Some('T') => (&upper[..upper.len() - 1], 40),
        _ => (upper, 0),
    };
    let value: usize = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 512M, 2G, 1048576)"))?;
    value
        .checked_mul(1usize << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// The default budget: half of physical memory, at most 4 GiB (a server that needs more
/// says so with `--max-memory`), at least 64 MiB.
pub fn default_limit() -> usize {
    const GIB: usize = 1 << 30;
    let physical = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(2 * GIB);
    (physical / 2).clamp(64 << 20, 4 * GIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_count_until_dropped_and_growth_leaves_headroom() {
        let budget = Budget::new(800);
        let a = budget.try_reserve(600, Need::Growth).unwrap();
        assert_eq!(budget.used(), 600);
        // Growth may use 700 of 800; service all 800.
        assert!(budget.try_reserve(101, Need::Growth).is_none());
        let b = budget.try_reserve(100, Need::Growth).unwrap();
        assert!(budget.try_reserve(101, Need::Service).is_none());
        let mut c = budget.try_reserve(100, Need::Service).unwrap();
        assert_eq!(budget.used(), 800);
        c.shrink(40);
        assert_eq!(budget.used(), 760);
        let d = c.split(10);
        assert_eq!((c.bytes(), d.bytes()), (50, 10));
        drop((a, b, c, d));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn charged_bytes_hold_their_reservation_until_the_last_clone_goes() {
        let budget = Budget::new(1000);
        let reservation = budget.try_reserve(100, Need::Service).unwrap();
        let bytes = Budget::charged(vec![7u8; 100], reservation);
        let clone = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(budget.used(), 100);
        assert_eq!(&clone[..], &[7u8; 10]);
        drop(clone);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_waiting_reservation_gets_memory_once_it_is_released() {
        let budget = Budget::new(100);
        let held = budget.try_reserve(100, Need::Service).unwrap();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(50, Need::Service).await.map(|r| r.bytes()) })
        };
        // The waiter cannot finish while the memory is held.
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.unwrap(), Some(50));
        assert!(
            budget.reserve(101, Need::Service).await.is_none(),
            "can never fit"
        );
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("1500").unwrap(), 1500);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("3MB").unwrap(), 3 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
        assert!(default_limit() >= 64 << 20);
    }
}
