//! The log file: what `ftvm record` writes and `ftvm replay` reads.
//!
//! ```text
//! offset 0   8 bytes   magic "FTVMLOG\0"
//! offset 8   4 bytes   format version, u32 little endian
//! offset 12  frame     header (sequence number 0): a bincode `LogHeader`
//!                      without its format_version
//!            frames    entries 1, 2, 3, … up to and including an End entry
//! ```
//!
//! The version sits outside any frame so that a reader refuses a future
//! format before it tries to parse that format's frames.

use crate::entry::{Entry, Event, Position};
use crate::frame::{self, EncodeError, FrameDecoder, FrameEncoder, FrameError};
use crate::hex;
use crate::stats::LogStats;
use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"FTVMLOG\0";

/// The format this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes before the header frame: magic and version.
pub const PREAMBLE_LEN: usize = 12;

/// The SHA-256 of a guest image, as the header and the channel handshake
/// carry it.
pub fn image_hash(image: &[u8]) -> [u8; 32] {
    Sha256::digest(image).into()
}

/// What replay must reproduce exactly before the first entry: which guest,
/// with how much memory, under which VMM settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogHeader {
    pub format_version: u32,
    pub vm_id: String,
    #[serde(with = "hex::bytes")]
    pub guest_image_hash: [u8; 32],
    pub mem_size: u64,
    pub config: ReplayConfig,
}

impl LogHeader {
    /// A header in this build's format version.
    pub fn new(
        vm_id: impl Into<String>,
        guest_image_hash: [u8; 32],
        mem_size: u64,
        config: ReplayConfig,
    ) -> LogHeader {
        LogHeader {
            format_version: FORMAT_VERSION,
            vm_id: vm_id.into(),
            guest_image_hash,
            mem_size,
            config,
        }
    }
}

/// The VMM settings that change what the guest does, and so must be the same
/// in replay as in the recording.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Encode, Decode)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// Exits between periodic digests.
    pub digest_interval: u64,
    /// Frequency of the guest's timer interrupt.
    pub tick_hz: u32,
    /// Whether rdtsc/rdtscp/rdrand/rdseed were patched into traps.
    pub patching: bool,
    /// Settings that have no field yet (a MAC address, a device list, a
    /// command line): named values that replay compares as they are. New
    /// settings go here first, so the format version need not change for
    /// each one.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// The header frame's payload: the header without the version, which is in
/// the preamble.
#[derive(Encode, Decode)]
struct HeaderBody {
    vm_id: String,
    guest_image_hash: [u8; 32],
    mem_size: u64,
    config: ReplayConfig,
}

/// Shows bytes as a Rust byte string, so a wrong magic reads as what it is
/// (`b"\x7fELF\x02\x01\x01\0"`, `b"{\"format"`).
struct ByteStr<'a>(&'a [u8]);

impl fmt::Display for ByteStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("b\"")?;
        for &b in self.0 {
            write!(f, "{}", std::ascii::escape_default(b))?;
        }
        f.write_str("\"")
    }
}

#[derive(Debug, Error)]
pub enum LogError {
    #[error(
        "not an ftvm log: the first bytes are {} where \"FTVMLOG\\0\" was expected",
        ByteStr(found)
    )]
    BadMagic { found: Vec<u8> },
    #[error("unsupported log format version {found} (this build reads {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    /// The file ends inside the preamble or before the header frame.
    #[error("log truncated in its {part} at offset {offset} (need {need} bytes, have {have})")]
    Truncated {
        part: &'static str,
        offset: u64,
        need: u64,
        have: u64,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("trailing garbage after the End entry: frame {frame} at offset {offset}")]
    TrailingGarbage { frame: u64, offset: u64 },
    /// The file ends cleanly between two frames but has no End entry: the
    /// recorder stopped (or crashed) without finishing the log. A file cut
    /// inside a frame is a `FrameError::Truncated` instead.
    #[error("log ends at offset {offset} after entry {last_seq} without an End entry (recording was not finished)")]
    MissingEnd { offset: u64, last_seq: u64 },
    #[error("reading the log at offset {offset} failed: {source}")]
    Read { offset: u64, source: io::Error },
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("writing the log failed: {0}")]
    Write(#[source] io::Error),
    #[error("entry {seq} comes after the End entry")]
    AfterEnd { seq: u64 },
    #[error(
        "the log writer failed earlier; the log is incomplete and nothing more can be appended"
    )]
    Failed,
}

/// A writer whose data can be forced to stable storage.
pub trait SyncWrite: Write {
    fn sync(&mut self) -> io::Result<()>;
}

impl SyncWrite for File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

impl SyncWrite for BufWriter<File> {
    fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.get_ref().sync_data()
    }
}

/// Writes a log: the preamble and header at creation, then entries.
///
/// Each entry is one `write_all` on `W`: wrap a file in a `BufWriter`.
/// A log whose writer is dropped without [`LogWriter::finish`] has no End
/// entry, and reading it reports [`LogError::MissingEnd`] after the last
/// complete entry, which is what a crashed recorder leaves.
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    out: W,
    encoder: FrameEncoder,
    buf: Vec<u8>,
    stats: LogStats,
    ended: bool,
    failed: bool,
}

impl<W: Write> LogWriter<W> {
    /// Writes the preamble and `header` (whose `format_version` is ignored:
    /// the log is written in [`FORMAT_VERSION`]).
    pub fn new(mut out: W, header: &LogHeader) -> Result<LogWriter<W>, LogError> {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let body = HeaderBody {
            vm_id: header.vm_id.clone(),
            guest_image_hash: header.guest_image_hash,
            mem_size: header.mem_size,
            config: header.config.clone(),
        };
        frame::encode_value(0, &body, &mut buf)?;
        out.write_all(&buf).map_err(LogError::Write)?;
        let mut stats = LogStats::default();
        stats.record_overhead(buf.len());
        Ok(LogWriter {
            out,
            encoder: FrameEncoder::new(1),
            buf,
            stats,
            ended: false,
            failed: false,
        })
    }

    /// The sequence number the next entry gets.
    pub fn next_seq(&self) -> u64 {
        self.encoder.next_seq()
    }

    /// Appends an event at `pos` under the next sequence number, which it
    /// returns.
    pub fn append(&mut self, pos: Position, event: Event) -> Result<u64, LogError> {
        let entry = Entry {
            seq: self.next_seq(),
            pos,
            event,
        };
        self.append_entry(&entry)?;
        Ok(entry.seq)
    }

    /// Appends an entry that already has its sequence number (when copying
    /// or loading a log); it must be the next one.
    pub fn append_entry(&mut self, entry: &Entry) -> Result<(), LogError> {
        if self.failed {
            return Err(LogError::Failed);
        }
        if self.ended {
            return Err(LogError::AfterEnd { seq: entry.seq });
        }
        self.buf.clear();
        let size = self.encoder.encode_entry(entry, &mut self.buf)?;
        // The encoder has moved on to the next entry, so a partial write
        // would leave a hole that later appends must not paper over.
        if let Err(e) = self.out.write_all(&self.buf) {
            self.failed = true;
            return Err(LogError::Write(e));
        }
        self.stats.record(entry.event.kind(), size);
        self.ended = matches!(entry.event, Event::End { .. });
        Ok(())
    }

    /// Appends the End entry at `pos`, flushes, and returns the output (to
    /// sync it, for instance).
    pub fn finish(mut self, pos: Position, reason: impl Into<String>) -> Result<W, LogError> {
        let event = Event::End {
            exits: pos.exits,
            reason: reason.into(),
        };
        self.append(pos, event)?;
        self.into_inner()
    }

    /// Flushes and returns the output, whether or not an End entry was
    /// written (a loaded log that had none stays without one).
    pub fn into_inner(mut self) -> Result<W, LogError> {
        self.flush()?;
        Ok(self.out)
    }

    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush().map_err(LogError::Write)
    }

    /// Whether the End entry has been written.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Sizes of what has been written so far.
    pub fn stats(&self) -> &LogStats {
        &self.stats
    }

    pub fn get_ref(&self) -> &W {
        &self.out
    }
}

impl<W: SyncWrite> LogWriter<W> {
    /// Flushes and forces everything written so far to stable storage.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.out.sync().map_err(LogError::Write)
    }
}

/// Reads a log: the preamble and header at creation, then entries as an
/// iterator.
///
/// The iterator yields every entry up to the first error, then the error,
/// then ends. A log read to its End entry with nothing after it ends
/// without an error; see [`LogError::MissingEnd`] and
/// [`FrameError::Truncated`] for the two ways an unfinished log ends.
///
/// Wrap a file in a `BufReader`: frames are read in small pieces.
#[derive(Debug)]
pub struct LogReader<R: Read> {
    input: R,
    decoder: FrameDecoder,
    header: LogHeader,
    stats: LogStats,
    ended: bool,
    done: bool,
}

impl<R: Read> LogReader<R> {
    pub fn new(mut input: R) -> Result<LogReader<R>, LogError> {
        let read_err = |offset: u64| move |source| LogError::Read { offset, source };

        let mut magic = [0u8; 8];
        let got = frame::read_full(&mut input, &mut magic).map_err(read_err(0))?;
        // A short file that starts like a log was cut, not mistaken.
        if magic[..got] != MAGIC[..got] {
            return Err(LogError::BadMagic {
                found: magic[..got].to_vec(),
            });
        }
        if got < magic.len() {
            return Err(LogError::Truncated {
                part: "magic",
                offset: 0,
                need: 8,
                have: got as u64,
            });
        }

        let mut version = [0u8; 4];
        let got = frame::read_full(&mut input, &mut version).map_err(read_err(8))?;
        if got < version.len() {
            return Err(LogError::Truncated {
                part: "format version",
                offset: 8,
                need: 4,
                have: got as u64,
            });
        }
        let version = u32::from_le_bytes(version);
        if version != FORMAT_VERSION {
            return Err(LogError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }

        let mut decoder = FrameDecoder::new(1, PREAMBLE_LEN as u64);
        let Some((body, size)) = decoder.read_value::<HeaderBody, _>(&mut input, 0)? else {
            return Err(LogError::Truncated {
                part: "header frame",
                offset: PREAMBLE_LEN as u64,
                need: 1,
                have: 0,
            });
        };
        let mut stats = LogStats::default();
        stats.record_overhead(PREAMBLE_LEN + size);
        Ok(LogReader {
            input,
            decoder,
            header: LogHeader {
                format_version: version,
                vm_id: body.vm_id,
                guest_image_hash: body.guest_image_hash,
                mem_size: body.mem_size,
                config: body.config,
            },
            stats,
            ended: false,
            done: false,
        })
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Sizes of what has been read so far.
    pub fn stats(&self) -> &LogStats {
        &self.stats
    }

    /// The offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.decoder.offset()
    }

    /// Whether the End entry has been read, with nothing after it.
    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn into_inner(self) -> R {
        self.input
    }

    fn next_entry(&mut self) -> Result<Entry, LogError> {
        let Some((entry, size)) = self.decoder.read_entry(&mut self.input)? else {
            return Err(LogError::MissingEnd {
                offset: self.decoder.offset(),
                last_seq: self.decoder.next_seq().wrapping_sub(1),
            });
        };
        self.stats.record(entry.event.kind(), size);
        if let Event::End { .. } = entry.event {
            let offset = self.decoder.offset();
            let mut probe = [0u8; 1];
            let got = frame::read_full(&mut self.input, &mut probe)
                .map_err(|source| LogError::Read { offset, source })?;
            if got > 0 {
                return Err(LogError::TrailingGarbage {
                    frame: self.decoder.frames(),
                    offset,
                });
            }
            self.ended = true;
        }
        Ok(entry)
    }
}

impl<R: Read> Iterator for LogReader<R> {
    type Item = Result<Entry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_entry();
        self.done = self.ended || item.is_err();
        Some(item)
    }
}
