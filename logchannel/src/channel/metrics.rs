//! What a channel reports about itself, for a status line and
//! `metrics.json`.

use std::time::{Duration, Instant};

/// The primary's view of its channel.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChannelMetrics {
    /// Entries passed to `send`.
    pub entries_sent: u64,
    /// Bytes written to the socket: entry frames, batch headers and
    /// heartbeats.
    pub bytes_sent: u64,
    /// Rates over the last one to two seconds.
    pub entries_per_sec: f64,
    pub bytes_per_sec: f64,
    /// The highest sequence number the backup has acknowledged receiving.
    pub acked: u64,
    /// Entries sent and not yet acknowledged.
    pub in_flight: u64,
    /// Bytes of entry frames sent and not yet acknowledged.
    pub in_flight_bytes: u64,
    /// Entries sent and not yet replayed, as far as the backup has said.
    pub lag_entries: u64,
    /// The primary's exit count (its latest entry or progress mark) minus
    /// the exit count the backup has said it replayed to.
    pub lag_exits: u64,
    /// How long the oldest entry not yet replayed has been waiting since
    /// `send`; 0 when the backup has replayed everything. Send times are
    /// kept for at most `window_entries` acknowledged entries, so for a
    /// backup that stops reporting this is the age of the oldest kept.
    pub lag_ms: f64,
    /// The shortest time from `send` to the backup's acknowledgement over
    /// the last one to two seconds: the link's round trip, which the lag
    /// bound discounts. 0 before the first acknowledgement.
    pub rtt_ms: f64,
}

/// The backup's view of its channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiverMetrics {
    pub entries_received: u64,
    /// Bytes of entry frames received.
    pub bytes_received: u64,
    /// Entries received and not yet taken by `recv`, and their frames'
    /// bytes.
    pub queued: u64,
    pub queued_bytes: u64,
    /// What `complete_up_to` returns.
    pub complete_up_to: u64,
    /// The last replay report.
    pub replayed_seq: u64,
    pub replayed_exits: u64,
}

/// Running totals at one moment.
#[derive(Clone, Copy, Debug)]
struct Mark {
    at: Instant,
    entries: u64,
    bytes: u64,
}

/// Per-second rates over a sliding interval, computed when asked: the rate
/// is over the time since the older of two marks, which are at least
/// [`Rates::INTERVAL`] apart, so it reflects the last one to two intervals
/// rather than the whole connection.
#[derive(Debug)]
pub(crate) struct Rates {
    older: Mark,
    newer: Mark,
}

impl Rates {
    const INTERVAL: Duration = Duration::from_secs(1);

    pub(crate) fn new(now: Instant) -> Rates {
        let mark = Mark {
            at: now,
            entries: 0,
            bytes: 0,
        };
        Rates {
            older: mark,
            newer: mark,
        }
    }

    /// (entries per second, bytes per second) given the totals now.
    pub(crate) fn update(&mut self, now: Instant, entries: u64, bytes: u64) -> (f64, f64) {
        if now.duration_since(self.newer.at) >= Self::INTERVAL {
            self.older = self.newer;
            self.newer = Mark {
                at: now,
                entries,
                bytes,
            };
        }
        let secs = now.duration_since(self.older.at).as_secs_f64();
        if secs <= 0.0 {
            return (0.0, 0.0);
        }
        (
            (entries - self.older.entries) as f64 / secs,
            (bytes - self.older.bytes) as f64 / secs,
        )
    }
}
