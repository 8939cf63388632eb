//! Entry counts and sizes by kind, for the replay summary and benchmarks.

use crate::entry::EventKind;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindStats {
    pub entries: u64,
    /// Encoded bytes, frame headers included.
    pub bytes: u64,
}

impl KindStats {
    /// Average encoded size of one entry, frame header included.
    pub fn average(&self) -> f64 {
        if self.entries == 0 {
            0.0
        } else {
            self.bytes as f64 / self.entries as f64
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub by_kind: BTreeMap<EventKind, KindStats>,
    /// Every byte of the log so far, including the preamble and header frame
    /// of a file.
    pub total_bytes: u64,
}

impl LogStats {
    /// Counts one entry frame of `bytes` bytes.
    pub fn record(&mut self, kind: EventKind, bytes: usize) {
        let k = self.by_kind.entry(kind).or_default();
        k.entries += 1;
        k.bytes += bytes as u64;
        self.total_bytes += bytes as u64;
    }

    /// Counts bytes that are not entries (file preamble, header frame).
    pub fn record_overhead(&mut self, bytes: usize) {
        self.total_bytes += bytes as u64;
    }

    pub fn entries(&self) -> u64 {
        self.by_kind.values().map(|k| k.entries).sum()
    }

    /// Statistics over all kinds but the given ones (e.g. without packets
    /// and digests, whose size is their contents').
    pub fn excluding(&self, kinds: &[EventKind]) -> KindStats {
        self.by_kind
            .iter()
            .filter(|(k, _)| !kinds.contains(k))
            .fold(KindStats::default(), |acc, (_, s)| KindStats {
                entries: acc.entries + s.entries,
                bytes: acc.bytes + s.bytes,
            })
    }
}

impl fmt::Display for LogStats {
    /// A table: one line per kind present, then the totals.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:>12} {:>14} {:>9}",
            "kind", "entries", "bytes", "avg"
        )?;
        for (kind, s) in &self.by_kind {
            writeln!(
                f,
                "{:<10} {:>12} {:>14} {:>9.2}",
                kind,
                s.entries,
                s.bytes,
                s.average()
            )?;
        }
        write!(
            f,
            "{:<10} {:>12} {:>14}",
            "total",
            self.entries(),
            self.total_bytes
        )
    }
}
