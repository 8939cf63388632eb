//! The channel's round trip, as the primary sees it: from `send` to the
//! backup's acknowledgement. The lag bound judges the backup's replay, not
//! the link, so it discounts this much.

use std::time::{Duration, Instant};

/// The shortest send-to-ack time over the last one to two intervals. The
/// minimum, because an ack can only come late (batching, a busy backup, a
/// full buffer), never early: the smallest sample is the link.
#[derive(Debug)]
pub(crate) struct MinRtt {
    since: Instant,
    current: Option<Duration>,
    previous: Option<Duration>,
}

impl MinRtt {
    const INTERVAL: Duration = Duration::from_secs(1);

    pub(crate) fn new(now: Instant) -> MinRtt {
        MinRtt {
            since: now,
            current: None,
            previous: None,
        }
    }

    pub(crate) fn sample(&mut self, now: Instant, rtt: Duration) {
        if now.duration_since(self.since) >= Self::INTERVAL {
            self.previous = self.current.take();
            self.since = now;
        }
        self.current = Some(self.current.map_or(rtt, |c| c.min(rtt)));
    }

    /// Zero before the first sample, which discounts nothing.
    pub(crate) fn get(&self) -> Duration {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimum_of_the_last_intervals_is_kept() {
        let t0 = Instant::now();
        let mut rtt = MinRtt::new(t0);
        assert_eq!(rtt.get(), Duration::ZERO);
        rtt.sample(t0, Duration::from_millis(30));
        rtt.sample(t0 + Duration::from_millis(500), Duration::from_millis(10));
        assert_eq!(rtt.get(), Duration::from_millis(10));
        // A new interval keeps the last one's minimum until it is over too.
        rtt.sample(t0 + Duration::from_millis(1100), Duration::from_millis(300));
        assert_eq!(rtt.get(), Duration::from_millis(10));
        rtt.sample(t0 + Duration::from_millis(2200), Duration::from_millis(300));
        assert_eq!(rtt.get(), Duration::from_millis(300));
    }
}
