//! Distributions a server measures on its own, every sample counted rather
//! than a status line every quarter second, so that a p99 is the run's: the
//! backup's replay lag at each of the primary's exits, and how long each
//! output waited for the backup's acknowledgement.
//!
//! Buckets are log-linear (32 per power of two of microseconds, so a bucket
//! is at most 1/32 of its value wide) and atomic, so the vCPU thread
//! records without a lock while the status thread reads.

use std::sync::atomic::{AtomicU64, Ordering};

/// Values below this many microseconds get a bucket each.
const LINEAR: u64 = 32;
/// Buckets per power of two above `LINEAR`.
const SUB_BITS: u32 = 5;
const BUCKETS: usize = (LINEAR as usize) * (64 - SUB_BITS as usize + 1);

/// Microsecond samples.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }
}

fn index(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    let mantissa = us >> (exp - SUB_BITS);
    (LINEAR as usize) * (exp - SUB_BITS + 1) as usize + (mantissa - LINEAR) as usize
}

/// The largest value that falls in bucket `i`.
fn upper(i: usize) -> u64 {
    let linear = LINEAR as usize;
    if i < linear {
        return i as u64;
    }
    let exp = (i / linear) as u32 + SUB_BITS - 1;
    let mantissa = (i % linear) as u64 + LINEAR;
    let width = 1u64 << (exp - SUB_BITS);
    (mantissa << (exp - SUB_BITS)) + (width - 1)
}

impl Histogram {
    pub fn record(&self, us: u64) {
        self.buckets[index(us)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0 to 1) in milliseconds, rounded up to its bucket's
    /// top, and never above the largest value recorded; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        // The epsilon keeps 0.99 × 100 from rounding up to rank 100.
        let rank = ((q.clamp(0.0, 1.0) * total as f64 - 1e-9).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let max = self.max_us.load(Ordering::Relaxed);
                return upper(i).min(max) as f64 / 1000.0;
            }
        }
        self.max_ms()
    }

    pub fn max_ms(&self) -> f64 {
        self.max_us.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_value_lands_in_a_bucket_that_covers_it(us in any::<u64>()) {
            let i = index(us);
            prop_assert!(i < BUCKETS);
            prop_assert!(upper(i) >= us);
            prop_assert!(i == 0 || upper(i - 1) < us);
        }

        #[test]
        fn a_bucket_is_at_most_a_32nd_of_its_values_wide(us in LINEAR..u64::MAX / 2) {
            let i = index(us);
            let lower = upper(i - 1) + 1;
            prop_assert!(upper(i) - lower < lower / 32 + 1);
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let h = Histogram::default();
        assert_eq!(h.quantile_ms(0.99), 0.0);
        // 0.1 ms 98 times, 5 ms once, 40 ms once.
        for _ in 0..98 {
            h.record(100);
        }
        h.record(5_000);
        h.record(40_000);
        assert_eq!(h.count(), 100);
        let p50 = h.quantile_ms(0.5);
        assert!((0.1..0.104).contains(&p50), "p50 {p50}");
        let p99 = h.quantile_ms(0.99);
        assert!((5.0..5.16).contains(&p99), "p99 {p99}");
        assert_eq!(h.quantile_ms(1.0), 40.0);
        assert_eq!(h.max_ms(), 40.0);
    }
}
