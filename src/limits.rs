//! Per-client limits: new connections per IP address (a token bucket per address) and open
//! connections per IP address (a count per address), both checked before any TLS or HTTP
//! work, and frames per connection (a fixed window); and the backoff this server's own
//! reconnects (peer links, NATS) keep to.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Addresses tracked at most; past this, idle full buckets are dropped first.
const MAX_TRACKED: usize = 100_000;

/// Connections per minute per IP address, with a burst of the same size.
pub struct IpRateLimiter {
    per_minute: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl IpRateLimiter {
    pub fn new(per_minute: u32) -> IpRateLimiter {
        IpRateLimiter {
            per_minute: f64::from(per_minute),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip`; false when it is over its rate.
    pub fn admit(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED {
            let full = self.per_minute;
            let per_sec = full / 60.0;
            buckets.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * per_sec < full);
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.per_minute, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_minute / 60.0)
            .min(self.per_minute);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets addresses whose buckets have refilled; call now and then.
    pub fn sweep(&self) {
        let full = self.per_minute;
        let per_sec = full / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * per_sec < full);
    }
}

/// The client an address stands for: an IPv4 address (IPv4-mapped IPv6 included) as
/// itself, an IPv6 address as its /64, since one site or host is routinely given a whole
/// /64 and could otherwise spread over countless addresses.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_canonical() {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !0u128 << 64).into()),
            v4 => v4,
        },
        v4 => v4,
    }
}

/// Open connections per IP address, at most `max` each. Only addresses with connections
/// open are tracked, so the table is bounded by the connection limit.
pub struct IpConnections {
    max: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One open connection of an address; dropping it frees the place.
pub struct IpConnection {
    owner: Arc<IpConnections>,
    ip: IpAddr,
}

impl IpConnections {
    pub fn new(max: u32) -> Arc<IpConnections> {
        Arc::new(IpConnections {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more connection from `ip`; None when it has `max` open.
    pub fn hold(self: &Arc<Self>, ip: IpAddr) -> Option<IpConnection> {
        let ip = canonical(ip);
        let mut open = self.open();
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpConnection {
            owner: self.clone(),
            ip,
        })
    }

    /// Connections open from `ip`.
    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> u32 {
        self.open().get(&canonical(ip)).copied().unwrap_or(0)
    }
}

impl Drop for IpConnection {
    fn drop(&mut self) {
        let mut open = self.owner.open();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// At most `max` frames in each `window`, on the caller's clock (milliseconds), so that
/// counting a frame reads no clock.
pub struct MessageRate {
    max: u32,
    window_ms: u64,
    started_ms: u64,
    count: u32,
}

impl MessageRate {
    pub fn new(max: u32, window: Duration, now_ms: u64) -> MessageRate {
        MessageRate {
            max,
            window_ms: window.as_millis() as u64,
            started_ms: now_ms,
            count: 0,
        }
    }

    /// Counts a frame at `now_ms`; false when the window's budget is spent.
    pub fn allow(&mut self, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.started_ms) >= self.window_ms {
            self.started_ms = now_ms;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.max
    }
}

/// A connection's place under `--max-connections`, `--per-ip-limit` and the memory budget,
/// counted in `connections_open` while held.
pub struct Permit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    ip_place: Mutex<Option<IpConnection>>,
    _memory: crate::budget::Reservation,
    open: prometheus_client::metrics::gauge::Gauge,
}

impl Permit {
    pub fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        ip_place: Option<IpConnection>,
        memory: crate::budget::Reservation,
        open: prometheus_client::metrics::gauge::Gauge,
    ) -> Permit {
        open.inc();
        Permit {
            _permit: permit,
            ip_place: Mutex::new(ip_place),
            _memory: memory,
            open,
        }
    }

    /// Frees the connection's place under `--per-ip-limit` (it still counts against
    /// `--max-connections`): for an authenticated peer server, which opens one link per
    /// channel from one address.
    pub fn release_ip_place(&self) {
        // Dropping the place frees it.
        self.ip_place
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Capped exponential backoff with jitter: delays start near `start`, double per attempt
/// up to `cap`, each half fixed and half random so reconnects spread out.
pub struct Backoff {
    start: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(start: Duration, cap: Duration) -> Backoff {
        Backoff {
            start,
            cap,
            attempt: 0,
        }
    }

    /// Starts over from the shortest delay (after a connection that lasted).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let ceiling = self
            .start
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt += 1;
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        ceiling / 2 + ceiling.mul_f64((random % 1000) as f64 / 2000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_burst_then_is_refused() {
        let limiter = IpRateLimiter::new(3);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| limiter.admit(a)));
        assert!(!limiter.admit(a));
        assert!(limiter.admit(b), "another address has its own bucket");
        assert!(limiter.admit("127.0.0.2".parse().unwrap()));
        assert!(limiter.admit("127.0.0.2".parse().unwrap()));
        assert!(
            !limiter.admit("127.0.0.2".parse().unwrap()),
            "v4-mapped v6 is the same address"
        );
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        let limit = IpConnections::new(1);
        let _one = limit.hold("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(limit
            .hold("2001:db8:1:2:ffff::9".parse().unwrap())
            .is_none());
        assert!(limit.hold("2001:db8:1:3::1".parse().unwrap()).is_some());
        let rate = IpRateLimiter::new(1);
        assert!(rate.admit("2001:db8::1".parse().unwrap()));
        assert!(!rate.admit("2001:db8::2".parse().unwrap()));
    }

    #[test]
    fn each_address_holds_at_most_its_connections_until_one_closes() {
        let limit = IpConnections::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let first = limit.hold(a).unwrap();
        let _second = limit.hold("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert!(limit.hold(a).is_none(), "v4-mapped v6 is the same address");
        assert!(limit.hold("10.0.0.2".parse().unwrap()).is_some());
        drop(first);
        assert_eq!(limit.count(a), 1);
        let _third = limit.hold(a).unwrap();
        assert!(limit.hold(a).is_none());
        drop(_third);
        drop(_second);
        assert!(limit.open().is_empty(), "closed addresses are forgotten");
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let (start, cap) = (Duration::from_millis(250), Duration::from_secs(30));
        let mut b = Backoff::new(start, cap);
        let first = b.next_delay();
        assert!(first >= start / 2 && first <= start);
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= cap);
        }
        assert!(last >= cap / 2);
        b.reset();
        assert!(b.next_delay() <= start);
    }

    #[test]
    fn the_message_window_resets() {
        let mut rate = MessageRate::new(2, Duration::from_millis(50), 1000);
        assert!(rate.allow(1000) && rate.allow(1010));
        assert!(!rate.allow(1049));
        assert!(rate.allow(1050), "a new window");
    }
}
