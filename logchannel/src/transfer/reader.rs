//! The joining backup's end of a state transfer.

use super::error::TransferError;
use super::wire::{At, BeginBody, CutIn, Direction, MessageIn, ReasonBody, RoundEndBody, Tag};
use super::{check_geometry, Cut, Geometry, PageData, TransferItem, PAGE_BYTES, PAGE_ZERO};
use crate::entry::Registers;
use std::io::Read;
use std::ops::Range;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Pages,
    Over(&'static str),
}

/// What one call of `next` found, before it borrows the page from the
/// buffer.
enum Step {
    Begin {
        mem_size: u64,
        page_size: u32,
    },
    Page {
        index: u64,
        bytes: Option<Range<usize>>,
    },
    RoundEnd {
        round: u32,
        pages: u64,
    },
    Cut(Cut),
    Abort {
        reason: String,
    },
}

/// Reads a state transfer, one item at a time, checking everything: each
/// message's CRC and bound, the order (`Begin` first, rounds numbered 1, 2,
/// …, nothing after the cut or an abort), every page's index and length,
/// each round's page count, the memory size.
///
/// It reads exactly the transfer's bytes and nothing past its last
/// message, so the log channel can follow on the same connection; give it
/// the unbuffered stream. It holds one message at a time (at most 256 KiB
/// of pages, or the cut).
#[derive(Debug)]
pub struct TransferReader<R: Read> {
    input: MessageIn<R>,
    mem_size: u64,
    phase: Phase,
    geometry: Geometry,
    /// The pages message being handed out, and where its next record is.
    batch: Option<At>,
    pos: usize,
    pages: u64,
    round: u32,
    round_pages: u64,
}

impl<R: Read> TransferReader<R> {
    /// A reader of a transfer of `mem_size` bytes of guest memory (this
    /// end's: a `Begin` that says otherwise is refused).
    pub fn new(input: R, mem_size: u64) -> TransferReader<R> {
        TransferReader {
            input: MessageIn::new(input, Direction::Transfer),
            mem_size,
            phase: Phase::Start,
            geometry: Geometry::default(),
            batch: None,
            pos: 0,
            pages: 0,
            round: 0,
            round_pages: 0,
        }
    }

    /// The stream's first byte is at `offset` in the connection, so that
    /// errors give offsets in the connection.
    pub fn at_offset(mut self, offset: u64) -> TransferReader<R> {
        self.input.offset = offset;
        self.input.start = offset;
        self
    }

    /// Names `timeout`, the read timeout the caller set on the socket, in
    /// [`TransferError::Silent`].
    pub fn silence_timeout(mut self, timeout: Duration) -> TransferReader<R> {
        self.input.silence = Some(timeout);
        self
    }

    /// The next item. After the cut or an abort, and after an error, every
    /// call is refused (`TransferError::Over`) without reading.
    // Not an `Iterator`: a page borrows the reader's buffer until the next
    // call, which `Iterator::next` cannot express.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<TransferItem<'_>, TransferError> {
        if let Phase::Over(why) = self.phase {
            return Err(TransferError::Over(why));
        }
        let step = match self.step() {
            Ok(step) => step,
            Err(e) => {
                self.phase = Phase::Over("an earlier message was bad");
                return Err(e);
            }
        };
        Ok(match step {
            Step::Begin {
                mem_size,
                page_size,
            } => TransferItem::Begin {
                mem_size,
                page_size,
            },
            Step::Page { index, bytes } => TransferItem::Page {
                index,
                data: match bytes {
                    None => PageData::Zero,
                    Some(range) => PageData::Bytes(&self.input.buf[range]),
                },
            },
            Step::RoundEnd { round, pages } => TransferItem::RoundEnd { round, pages },
            Step::Cut(cut) => TransferItem::Cut(cut),
            Step::Abort { reason } => TransferItem::Abort { reason },
        })
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.input.offset - self.input.start
    }

    /// Pages handed out so far, zero pages included.
    pub fn pages_read(&self) -> u64 {
        self.pages
    }

    /// The page size and the guest's page count, once `Begin` was read.
    pub fn geometry(&self) -> Option<(u32, u64)> {
        (self.phase != Phase::Start).then_some((self.geometry.page_size, self.geometry.pages))
    }

    pub fn get_ref(&self) -> &R {
        self.input.get_ref()
    }

    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }

    fn step(&mut self) -> Result<Step, TransferError> {
        loop {
            if let Some(at) = self.batch {
                if self.pos < self.input.buf.len() {
                    return self.page(at);
                }
                self.batch = None;
            }
            let at = self.input.next()?;
            if self.phase == Phase::Start && !matches!(at.tag, Tag::Begin | Tag::Abort) {
                return Err(
                    at.out_of_order(format!("a {} message before the begin", at.tag.name()))
                );
            }
            match at.tag {
                Tag::Begin => return self.begin(at),
                Tag::Pages => {
                    if self.input.buf.is_empty() {
                        return Err(at.invalid("a pages message without pages".to_string()));
                    }
                    self.batch = Some(at);
                    self.pos = 0;
                }
                Tag::RoundEnd => return self.round_end(at),
                Tag::Cut => return self.cut(at),
                Tag::Abort => {
                    let body: ReasonBody = self.input.decode(at)?;
                    self.phase = Phase::Over("the primary aborted the transfer");
                    return Ok(Step::Abort {
                        reason: body.reason,
                    });
                }
                // The input accepts no verdict tags.
                Tag::Restored | Tag::Refused => {
                    return Err(at.invalid("a verdict in the transfer".to_string()))
                }
            }
        }
    }

    fn begin(&mut self, at: At) -> Result<Step, TransferError> {
        if self.phase != Phase::Start {
            return Err(at.out_of_order("a second begin".to_string()));
        }
        let body: BeginBody = self.input.decode(at)?;
        if body.mem_size != self.mem_size {
            return Err(TransferError::MemSize {
                primary: body.mem_size,
                backup: self.mem_size,
            });
        }
        self.geometry = check_geometry(body.mem_size, body.page_size).map_err(|d| at.invalid(d))?;
        self.phase = Phase::Pages;
        Ok(Step::Begin {
            mem_size: body.mem_size,
            page_size: body.page_size,
        })
    }

    fn page(&mut self, at: At) -> Result<Step, TransferError> {
        let g = self.geometry;
        let index: u64 = self.input.decode_at(at, &mut self.pos)?;
        let kind: u8 = self.input.decode_at(at, &mut self.pos)?;
        let bytes = match kind {
            PAGE_ZERO => None,
            PAGE_BYTES => {
                let len: u64 = self.input.decode_at(at, &mut self.pos)?;
                if len != u64::from(g.page_size) {
                    return Err(TransferError::PageLength {
                        message: at.number,
                        offset: at.offset,
                        index,
                        len,
                        page_size: g.page_size,
                    });
                }
                let start = self.pos;
                let end = start + g.page_size as usize;
                if end > self.input.buf.len() {
                    return Err(at.decode_error(format!(
                        "page {index} needs {len} bytes, {} are left in the message",
                        self.input.buf.len() - start
                    )));
                }
                self.pos = end;
                Some(start..end)
            }
            other => {
                return Err(at.decode_error(format!(
                    "page {index} has kind {other}, neither {PAGE_ZERO} (zero) nor {PAGE_BYTES} (bytes)"
                )))
            }
        };
        if index >= g.pages {
            return Err(TransferError::PageOutOfRange {
                message: at.number,
                offset: at.offset,
                index,
                pages: g.pages,
            });
        }
        self.pages += 1;
        self.round_pages += 1;
        Ok(Step::Page { index, bytes })
    }

    fn round_end(&mut self, at: At) -> Result<Step, TransferError> {
        let body: RoundEndBody = self.input.decode(at)?;
        if Some(body.round) != self.round.checked_add(1) {
            return Err(at.out_of_order(format!(
                "round {} ends after round {}",
                body.round, self.round
            )));
        }
        self.check_count(at, body.pages, &format!("round {}", body.round))?;
        self.round = body.round;
        self.round_pages = 0;
        Ok(Step::RoundEnd {
            round: body.round,
            pages: body.pages,
        })
    }

    fn cut(&mut self, at: At) -> Result<Step, TransferError> {
        let body: CutIn = self.input.decode(at)?;
        self.check_count(at, body.pages, "the cut")?;
        if body.next_seq == 0 {
            return Err(at.invalid("the cut's next_seq is 0 (the log starts at 1)".to_string()));
        }
        self.phase = Phase::Over("the cut was read");
        Ok(Step::Cut(Cut {
            exits: body.exits,
            rip: body.rip,
            next_seq: body.next_seq,
            regs: Registers::from_array(body.regs),
            mem_hash: body.mem_hash,
            machine: body.machine,
        }))
    }

    /// A page count that differs from what arrived means pages were lost or
    /// made up on the way.
    fn check_count(&self, at: At, said: u64, what: &str) -> Result<(), TransferError> {
        if said != self.round_pages {
            return Err(at.invalid(format!(
                "{what} says it sent {said} pages, {} arrived",
                self.round_pages
            )));
        }
        Ok(())
    }
}
