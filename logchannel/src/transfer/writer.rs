//! The primary's end of a state transfer.

use super::error::TransferError;
use super::wire::{
    clip_reason, put, BeginBody, CutOut, Direction, MessageOut, ReasonBody, RoundEndBody, Tag,
    MAX_MACHINE, MAX_PAGES_PAYLOAD,
};
use super::{check_geometry, Cut, Geometry, PAGE_BYTES, PAGE_ZERO};
use std::io::Write;
use std::time::Duration;

/// Where the writer is in the transfer's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Pages,
    Over(&'static str),
}

/// Writes a state transfer: [`TransferWriter::begin`], pages in rounds
/// ([`TransferWriter::page`], [`TransferWriter::end_round`]), then
/// [`TransferWriter::cut`] (or [`TransferWriter::abort`] at any time).
///
/// Pages are gathered into messages of at most 256 KiB of page data, each
/// written when full, so the writer holds at most one such message; an
/// all-zero page travels as a marker of two or three bytes. A message out
/// of order is refused with the error a reader would give, and nothing is
/// written for it. After an error, and after the cut or an abort, every
/// call is refused (`TransferError::Over`).
#[derive(Debug)]
pub struct TransferWriter<W: Write> {
    out: MessageOut<W>,
    phase: Phase,
    geometry: Geometry,
    /// Page records not yet written.
    batch: Vec<u8>,
    pages: u64,
    round: u32,
    round_pages: u64,
}

impl<W: Write> TransferWriter<W> {
    pub fn new(out: W) -> TransferWriter<W> {
        TransferWriter {
            out: MessageOut::new(out, Direction::Transfer),
            phase: Phase::Start,
            geometry: Geometry::default(),
            batch: Vec::new(),
            pages: 0,
            round: 0,
            round_pages: 0,
        }
    }

    /// Names `timeout`, the write timeout the caller set on the socket, in
    /// [`TransferError::Stalled`].
    pub fn stall_timeout(mut self, timeout: Duration) -> TransferWriter<W> {
        self.out.stall = Some(timeout);
        self
    }

    /// The first message: the guest's memory size in bytes (which must be
    /// the hello's) and its page size (a power of two from 512 to 64 KiB
    /// that divides it).
    pub fn begin(&mut self, mem_size: u64, page_size: u32) -> Result<(), TransferError> {
        self.usable()?;
        if self.phase != Phase::Start {
            return Err(self.out_of_order("a second begin".to_string()));
        }
        self.geometry = check_geometry(mem_size, page_size)
            .map_err(|detail| self.invalid(format!("cannot begin: {detail}")))?;
        let mut payload = Vec::new();
        put(
            &BeginBody {
                mem_size,
                page_size,
            },
            &mut payload,
        );
        self.send(Tag::Begin, &payload)?;
        self.phase = Phase::Pages;
        Ok(())
    }

    /// Queues page `index` (`bytes` exactly one page), writing the queue as
    /// one message once it holds 256 KiB.
    pub fn page(&mut self, index: u64, bytes: &[u8]) -> Result<(), TransferError> {
        self.in_pages("a page")?;
        let g = self.geometry;
        if index >= g.pages {
            return Err(TransferError::PageOutOfRange {
                message: self.out.number,
                offset: self.out.written,
                index,
                pages: g.pages,
            });
        }
        if bytes.len() as u64 != u64::from(g.page_size) {
            return Err(TransferError::PageLength {
                message: self.out.number,
                offset: self.out.written,
                index,
                len: bytes.len() as u64,
                page_size: g.page_size,
            });
        }
        // An index, a kind and a length: at most 19 bytes of varints.
        if self.batch.len() + 19 + bytes.len() > MAX_PAGES_PAYLOAD {
            self.send_batch()?;
        }
        put(&index, &mut self.batch);
        if is_zero(bytes) {
            self.batch.push(PAGE_ZERO);
        } else {
            self.batch.push(PAGE_BYTES);
            put(&(bytes.len() as u64), &mut self.batch);
            self.batch.extend_from_slice(bytes);
        }
        self.pages += 1;
        self.round_pages += 1;
        Ok(())
    }

    /// Ends a pre-copy round: writes the queued pages, then the round's
    /// end, which carries its number (1, 2, …, returned) and how many pages
    /// it sent.
    pub fn end_round(&mut self) -> Result<u32, TransferError> {
        self.in_pages("a round end")?;
        self.send_batch()?;
        let round = self
            .round
            .checked_add(1)
            .ok_or_else(|| self.invalid("more than 2^32 - 1 rounds".to_string()))?;
        let mut payload = Vec::new();
        put(
            &RoundEndBody {
                round,
                pages: self.round_pages,
            },
            &mut payload,
        );
        self.send(Tag::RoundEnd, &payload)?;
        self.round = round;
        self.round_pages = 0;
        Ok(round)
    }

    /// The last message: writes the queued pages (the cut's), then the
    /// cut, then flushes. Its `next_seq` must be at least 1 and its
    /// `machine` blob at most 16 MiB.
    pub fn cut(&mut self, cut: &Cut) -> Result<(), TransferError> {
        self.in_pages("the cut")?;
        if cut.next_seq == 0 {
            return Err(self.invalid("a cut with next_seq 0 (the log starts at 1)".to_string()));
        }
        if cut.machine.len() > MAX_MACHINE {
            return Err(TransferError::TooLong {
                message: self.out.number,
                offset: self.out.written,
                kind: Tag::Cut.name(),
                len: cut.machine.len() as u64,
                max: MAX_MACHINE,
            });
        }
        self.send_batch()?;
        let mut payload = Vec::new();
        put(
            &CutOut {
                pages: self.round_pages,
                exits: cut.exits,
                rip: cut.rip,
                next_seq: cut.next_seq,
                regs: cut.regs.named().map(|(_, v)| v),
                mem_hash: cut.mem_hash,
                machine: &cut.machine,
            },
            &mut payload,
        );
        self.send(Tag::Cut, &payload)?;
        self.phase = Phase::Over("the cut was written");
        self.out.flush()
    }

    /// Gives the transfer up on purpose, at any point before the cut:
    /// queued pages are dropped, the reason (cut to 4 KiB) is written and
    /// flushed.
    pub fn abort(&mut self, reason: &str) -> Result<(), TransferError> {
        self.usable()?;
        self.batch.clear();
        let mut payload = Vec::new();
        put(
            &ReasonBody {
                reason: clip_reason(reason),
            },
            &mut payload,
        );
        self.send(Tag::Abort, &payload)?;
        self.phase = Phase::Over("the transfer was aborted");
        self.out.flush()
    }

    /// Writes the queued pages and flushes the output.
    pub fn flush(&mut self) -> Result<(), TransferError> {
        self.usable()?;
        self.send_batch()?;
        self.out
            .flush()
            .inspect_err(|_| self.phase = Phase::Over("a write failed"))
    }

    /// Bytes written so far (queued pages not included).
    pub fn bytes_written(&self) -> u64 {
        self.out.written
    }

    /// Pages given to [`TransferWriter::page`] so far, zero pages included.
    pub fn pages_written(&self) -> u64 {
        self.pages
    }

    /// The last round ended (0 before the first).
    pub fn rounds(&self) -> u32 {
        self.round
    }

    pub fn get_ref(&self) -> &W {
        &self.out.out
    }

    pub fn into_inner(self) -> W {
        self.out.out
    }

    fn usable(&self) -> Result<(), TransferError> {
        match self.phase {
            Phase::Over(why) => Err(TransferError::Over(why)),
            _ => Ok(()),
        }
    }

    fn in_pages(&self, what: &str) -> Result<(), TransferError> {
        self.usable()?;
        if self.phase == Phase::Start {
            return Err(self.out_of_order(format!("{what} before the begin")));
        }
        Ok(())
    }

    fn send_batch(&mut self) -> Result<(), TransferError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let sent = self.send(Tag::Pages, &batch);
        self.batch = batch;
        self.batch.clear();
        sent
    }

    /// A failed write leaves a message half written: nothing may follow it.
    fn send(&mut self, tag: Tag, payload: &[u8]) -> Result<(), TransferError> {
        self.out
            .send(tag, payload)
            .inspect_err(|_| self.phase = Phase::Over("a write failed"))
    }

    fn out_of_order(&self, detail: String) -> TransferError {
        TransferError::OutOfOrder {
            message: self.out.number,
            offset: self.out.written,
            detail,
        }
    }

    fn invalid(&self, detail: String) -> TransferError {
        TransferError::Invalid {
            message: self.out.number,
            offset: self.out.written,
            detail,
        }
    }
}

/// Whether a page is all zeros. ORing blocks without an early exit per
/// byte lets the compiler vectorise it: every page of a round passes here.
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|block| block.iter().fold(0, |acc, &b| acc | b) == 0)
}
