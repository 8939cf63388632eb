//! When a byte last arrived from the peer.
//!
//! A reader thread blocks inside `FrameDecoder`, which cannot survive a read
//! timeout in the middle of a frame, so silence is measured beside it: every
//! successful socket read stamps the clock, and whoever wants to know
//! (the writer thread, a caller waiting for an ack) compares.

use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Liveness {
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last byte.
    last: AtomicU64,
}

impl Liveness {
    pub(crate) fn new() -> Liveness {
        Liveness {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Counts as having heard from the peer now.
    pub(crate) fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// Counts as having heard from the peer `ahead` from now: a peer that
    /// cannot answer sooner is not silent meanwhile.
    pub(crate) fn expect_after(&self, ahead: Duration) {
        let at = self.epoch.elapsed() + ahead;
        let at = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(at, Ordering::Relaxed);
    }

    pub(crate) fn silent_for(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_nanos(self.last.load(Ordering::Relaxed)))
    }
}

/// A socket reader that stamps a [`Liveness`] whenever bytes arrive.
pub(crate) struct StampingReader<'a> {
    pub stream: &'a TcpStream,
    pub live: &'a Liveness,
}

impl Read for StampingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut stream = self.stream;
        let n = stream.read(buf)?;
        if n > 0 {
            self.live.touch();
        }
        Ok(n)
    }
}
