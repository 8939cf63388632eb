//! Live state transfer to a joining backup: after the handshake, before the
//! log, the primary streams the guest's memory in pre-copy rounds, then the
//! cut (the last pages, the machine's state as an opaque blob, the
//! position and a digest), and the backup answers with a verdict. Only
//! then do both ends start the log channel on the same connection, from
//! the cut's `next_seq`. README.md ("State transfer") lays the bytes out.
//!
//! ```text
//! primary                                   backup
//! LogSender::accept_handshaken              LogReceiver::connect_handshaken
//! begin, pages, end_round, … pages, cut  →  TransferReader::next until Cut
//!                                        ←  Verdict (restored or refused)
//! LogSender::start(h, cut.next_seq)         LogReceiver::start(h, cut.next_seq)
//! ```
//!
//! # Design decisions
//!
//! **Its own framing, not the log's frames.** A transfer message is
//! `[tag][length][payload][CRC]`: the tag comes first so that a reader can
//! bound the length by the kind of message before it allocates anything
//! (256 KiB of pages, 16 MiB for the cut, a few bytes for the rest), and
//! the CRC comes last so that a writer can send page data straight from
//! its buffer. Like the log's frames, the CRC also covers the message's
//! number, which is not sent: a lost or repeated message fails its CRC.
//!
//! **Pages are streamed, a message at a time.** Neither end holds more
//! than one message: the writer queues at most 256 KiB of pages, and the
//! reader hands out each page as a slice of the message it read, checked
//! whole against its CRC first, so no page of a corrupted message is ever
//! delivered. A zero page is a marker, not 4 KiB of zeros.
//!
//! **Counts are checked, not trusted.** Each round's end and the cut say
//! how many pages came since the previous one, which the reader compares
//! with what arrived; rounds are numbered 1, 2, …; the memory size must be
//! this end's. The state itself is the VMM's to check (its digest at the
//! cut): this crate knows no KVM types, and `machine` is opaque to it.
//!
//! **Exact reads.** The reader never reads past the message it needs, so
//! that the log channel can start on the same connection with nothing lost
//! in a buffer. A socket read timeout is `TransferError::Silent`; unlike
//! in the log channel, a timeout in the middle of a message is final
//! anyway, since a transfer that stops is abandoned whole.

mod error;
mod reader;
mod wire;
mod writer;

pub use error::TransferError;
pub use reader::TransferReader;
pub use wire::{MAX_MACHINE, MAX_PAGES_PAYLOAD};
pub use writer::TransferWriter;

use crate::channel::Handshaken;
use crate::entry::Registers;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use wire::{clip_reason, put, Direction, MessageIn, MessageOut, ReasonBody, RestoredBody, Tag};

/// The kinds of page record in a pages message.
const PAGE_ZERO: u8 = 0;
const PAGE_BYTES: u8 = 1;

/// The smallest and largest page sizes a transfer may use.
const MIN_PAGE: u32 = 512;
const MAX_PAGE: u32 = 64 << 10;

/// What `Begin` said, checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Geometry {
    page_size: u32,
    pages: u64,
}

fn check_geometry(mem_size: u64, page_size: u32) -> Result<Geometry, String> {
    if !page_size.is_power_of_two() || !(MIN_PAGE..=MAX_PAGE).contains(&page_size) {
        return Err(format!(
            "page size {page_size} is not a power of two from {MIN_PAGE} to {MAX_PAGE}"
        ));
    }
    if mem_size == 0 || !mem_size.is_multiple_of(u64::from(page_size)) {
        return Err(format!(
            "memory size {mem_size} is not a positive multiple of the page size {page_size}"
        ));
    }
    Ok(Geometry {
        page_size,
        pages: mem_size / u64::from(page_size),
    })
}

/// The last message of a transfer: where the primary stopped and what the
/// backup needs to go on from there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The synchronous exits before the cut.
    pub exits: u64,
    /// The guest's RIP at the cut (a check).
    pub rip: u64,
    /// The sequence number of the first log entry after the cut: both ends
    /// start the log channel from it.
    pub next_seq: u64,
    pub regs: Registers,
    /// The hash of all of memory at the cut, which the backup checks after
    /// restoring and returns in its verdict.
    pub mem_hash: u64,
    /// The VMM's state (vCPU, devices), opaque here; at most
    /// [`MAX_MACHINE`] bytes.
    pub machine: Vec<u8>,
}

/// A page's content as it arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageData<'a> {
    /// All zeros (sent as a marker).
    Zero,
    /// Exactly one page, borrowed from the reader's message.
    Bytes(&'a [u8]),
}

/// What [`TransferReader::next`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferItem<'a> {
    /// Always first (or an abort).
    Begin { mem_size: u64, page_size: u32 },
    /// A page, valid until the next call.
    Page { index: u64, data: PageData<'a> },
    /// The end of pre-copy round `round` (1, 2, …), which sent `pages`
    /// pages.
    RoundEnd { round: u32, pages: u64 },
    /// The last message: the pages since the last round's end were the
    /// cut's.
    Cut(Cut),
    /// The primary gave the transfer up on purpose; nothing follows.
    Abort { reason: String },
}

/// The backup's answer to a cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The backup restored the state and found this memory hash, which the
    /// primary compares with its cut's.
    Restored { mem_hash: u64 },
    /// The backup could not use the state (a digest mismatch, a device
    /// state it rejects), as a reason in words, cut to 4 KiB.
    Refused { reason: String },
}

/// Writes `verdict` as the one message of the backup's direction and
/// flushes.
pub fn write_verdict<W: Write>(out: W, verdict: &Verdict) -> Result<(), TransferError> {
    let mut out = MessageOut::new(out, Direction::Verdict);
    let mut payload = Vec::new();
    let tag = match verdict {
        Verdict::Restored { mem_hash } => {
            put(
                &RestoredBody {
                    mem_hash: *mem_hash,
                },
                &mut payload,
            );
            Tag::Restored
        }
        Verdict::Refused { reason } => {
            put(
                &ReasonBody {
                    reason: clip_reason(reason),
                },
                &mut payload,
            );
            Tag::Refused
        }
    };
    out.send(tag, &payload)?;
    out.flush()
}

/// Reads the backup's verdict, exactly its bytes.
pub fn read_verdict<R: Read>(input: R) -> Result<Verdict, TransferError> {
    read_verdict_from(MessageIn::new(input, Direction::Verdict))
}

fn read_verdict_from<R: Read>(mut input: MessageIn<R>) -> Result<Verdict, TransferError> {
    let at = input.next()?;
    match at.tag {
        Tag::Restored => {
            let body: RestoredBody = input.decode(at)?;
            Ok(Verdict::Restored {
                mem_hash: body.mem_hash,
            })
        }
        Tag::Refused => {
            let body: ReasonBody = input.decode(at)?;
            Ok(Verdict::Refused {
                reason: body.reason,
            })
        }
        // The input accepts verdict tags only.
        _ => Err(at.invalid(format!("a {} message for a verdict", at.tag.name()))),
    }
}

/// Reads from the connection until a deadline, however often a signal
/// interrupts a read: the primary waits for the verdict on its vCPU
/// thread, which its run loop kicks with signals, and a socket's read
/// timeout starts again with every interrupted call.
struct Deadline<'a> {
    h: &'a mut Handshaken,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let left = self.until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.h.stream().set_read_timeout(Some(left))?;
            match self.h.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// Reading and writing a transfer on the connection itself, with socket
/// timeouts, so that errors give offsets in the connection and name the
/// timeout. [`crate::LogSender::start`] and [`crate::LogReceiver::start`]
/// clear the timeouts.
impl Handshaken {
    /// The primary's writer, each write waiting at most `stall` for the
    /// backup to read.
    pub fn transfer_writer(
        &mut self,
        stall: Duration,
    ) -> Result<TransferWriter<&mut Handshaken>, TransferError> {
        self.stream()
            .set_write_timeout(Some(stall))
            .map_err(|source| TransferError::Write { written: 0, source })?;
        Ok(TransferWriter::new(self).stall_timeout(stall))
    }

    /// The joining backup's reader, for this end's memory size, each read
    /// waiting at most `silence` for the primary.
    pub fn transfer_reader(
        &mut self,
        silence: Duration,
    ) -> Result<TransferReader<&mut Handshaken>, TransferError> {
        let (offset, mem_size) = (self.received(), self.hello().mem_size);
        self.set_silence(silence, offset)?;
        Ok(TransferReader::new(self, mem_size)
            .at_offset(offset)
            .silence_timeout(silence))
    }

    /// The backup's side: sends its verdict.
    pub fn write_verdict(&mut self, verdict: &Verdict) -> Result<(), TransferError> {
        write_verdict(self, verdict)
    }

    /// The primary's side: waits up to `timeout` for the backup's verdict
    /// (the backup restores and checks the state first).
    pub fn read_verdict(&mut self, timeout: Duration) -> Result<Verdict, TransferError> {
        let offset = self.received();
        self.set_silence(timeout, offset)?;
        let until = Instant::now() + timeout;
        let mut input = MessageIn::new(Deadline { h: self, until }, Direction::Verdict);
        input.offset = offset;
        input.start = offset;
        input.silence = Some(timeout);
        read_verdict_from(input)
    }

    fn set_silence(&self, timeout: Duration, offset: u64) -> Result<(), TransferError> {
        self.stream()
            .set_read_timeout(Some(timeout))
            .map_err(|source| TransferError::Read {
                message: 0,
                offset,
                source,
            })
    }
}
