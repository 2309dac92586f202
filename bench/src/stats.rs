//! Latency histogram and number formatting.

/// Sub-buckets per power of two: values are kept to within about 3 %.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) << SUB_BITS as usize) + SUB as usize;

/// A log-linear histogram of nanoseconds; fixed size, no allocation per record.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB {
        v as usize
    } else {
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        ((((shift + 1) as u64) << SUB_BITS) | ((v >> shift) & (SUB - 1))) as usize
    }
}

/// The middle of bucket `i`.
fn value(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        i
    } else {
        let shift = (i >> SUB_BITS) - 1;
        let low = ((i & (SUB - 1)) | SUB) << shift;
        low + (1u64 << shift) / 2
    }
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), or None when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(value(i));
            }
        }
        None
    }
}

/// 1234567.0 -> "1.23M", 45300.0 -> "45.3k".
pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Nanoseconds as µs or ms with three significant digits.
pub fn duration_ns(ns: u64) -> String {
    let us = ns as f64 / 1e3;
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.1} ms", us / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_close() {
        let mut last = 0;
        for v in [0u64, 1, 31, 32, 63, 64, 1000, 123_456, 1 << 40, u64::MAX] {
            let i = index(v);
            assert!(i >= last && i < BUCKETS);
            last = i;
            let mid = value(i) as f64;
            assert!(
                (mid - v as f64).abs() <= v as f64 * 0.04 + 1.0,
                "{v} -> {mid}"
            );
        }
    }

    #[test]
    fn quantiles_pick_the_right_rank() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        assert!((p50 - 500_000.0).abs() < 500_000.0 * 0.04);
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((p99 - 990_000.0).abs() < 990_000.0 * 0.04);
    }
}
