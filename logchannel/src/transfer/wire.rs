//! The transfer's messages on the wire: `[tag][length][payload][crc]`, the
//! CRC also covering the message's number, which is not transmitted.
//! README.md ("State transfer") lays the bytes out.

use super::error::{timed_out, TransferError};
use crate::frame::read_full;
use bincode::config::{self, Configuration, Limit};
use bincode::{Decode, Encode};
use std::io::{self, Read, Write};
use std::time::Duration;

/// The most page data one `Pages` message carries, so that neither end
/// holds more than this of the guest's memory at a time.
pub const MAX_PAGES_PAYLOAD: usize = 256 << 10;
/// The most a cut's `machine` blob may hold.
pub const MAX_MACHINE: usize = 16 << 20;
/// What a cut adds to its blob: 25 varints of at most 9 bytes and the
/// blob's length.
const CUT_OVERHEAD: usize = 256;
/// Reasons (an abort's, a refusal's) are cut to this many bytes by the
/// writer, and a reader takes no longer one.
pub(crate) const MAX_REASON: usize = 4096;
/// A length varint longer than this is garbage.
const MAX_LEN_BYTES: usize = 10;

const ENCODE: Configuration = config::standard();
/// bincode charges decoded sizes against the limit; payloads are bounded
/// already, this only stops a length inside a payload from claiming more.
const DECODE: Configuration<config::LittleEndian, config::Varint, Limit<{ 2 * MAX_MACHINE }>> =
    config::standard().with_limit::<{ 2 * MAX_MACHINE }>();

/// A message's kind, its first byte. Tag 0 is no message, so that a run of
/// zero bytes is refused at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tag {
    Begin = 1,
    Pages = 2,
    RoundEnd = 3,
    Cut = 4,
    Abort = 5,
    Restored = 6,
    Refused = 7,
}

impl Tag {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Tag::Begin => "begin",
            Tag::Pages => "pages",
            Tag::RoundEnd => "round end",
            Tag::Cut => "cut",
            Tag::Abort => "abort",
            Tag::Restored => "restored",
            Tag::Refused => "refused",
        }
    }

    /// The largest payload a message of this kind may have.
    pub(crate) fn max(self) -> usize {
        match self {
            Tag::Begin | Tag::RoundEnd | Tag::Restored => 64,
            Tag::Pages => MAX_PAGES_PAYLOAD,
            Tag::Cut => MAX_MACHINE + CUT_OVERHEAD,
            Tag::Abort | Tag::Refused => MAX_REASON + 16,
        }
    }

    fn from_byte(b: u8) -> Option<Tag> {
        [
            Tag::Begin,
            Tag::Pages,
            Tag::RoundEnd,
            Tag::Cut,
            Tag::Abort,
            Tag::Restored,
            Tag::Refused,
        ]
        .into_iter()
        .find(|t| *t as u8 == b)
    }
}

/// Which direction a stream is, for what a reader accepts and how its
/// errors name the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The primary's transfer.
    Transfer,
    /// The backup's verdict.
    Verdict,
}

impl Direction {
    fn accepts(self, tag: Tag) -> bool {
        match self {
            Direction::Transfer => !matches!(tag, Tag::Restored | Tag::Refused),
            Direction::Verdict => matches!(tag, Tag::Restored | Tag::Refused),
        }
    }

    pub(crate) fn sender(self) -> &'static str {
        match self {
            Direction::Transfer => "the primary",
            Direction::Verdict => "the backup",
        }
    }

    fn receiver(self) -> &'static str {
        match self {
            Direction::Transfer => "the backup",
            Direction::Verdict => "the primary",
        }
    }

    fn stream(self) -> &'static str {
        match self {
            Direction::Transfer => "the primary's state transfer",
            Direction::Verdict => "the backup's verdict",
        }
    }

    fn last(self) -> &'static str {
        match self {
            Direction::Transfer => "its cut",
            Direction::Verdict => "a verdict",
        }
    }
}

#[derive(Debug, Encode, Decode)]
pub(crate) struct BeginBody {
    pub mem_size: u64,
    pub page_size: u32,
}

#[derive(Debug, Encode, Decode)]
pub(crate) struct RoundEndBody {
    pub round: u32,
    pub pages: u64,
}

/// The cut as it travels; `pages` counts the pages since the last round's
/// end, which the reader checks against what arrived.
#[derive(Debug, Encode)]
pub(crate) struct CutOut<'a> {
    pub pages: u64,
    pub exits: u64,
    pub rip: u64,
    pub next_seq: u64,
    pub regs: [u64; 18],
    pub mem_hash: u64,
    pub machine: &'a [u8],
}

#[derive(Debug, Decode)]
pub(crate) struct CutIn {
    pub pages: u64,
    pub exits: u64,
    pub rip: u64,
    pub next_seq: u64,
    pub regs: [u64; 18],
    pub mem_hash: u64,
    pub machine: Vec<u8>,
}

#[derive(Debug, Encode, Decode)]
pub(crate) struct ReasonBody {
    pub reason: String,
}

#[derive(Debug, Encode, Decode)]
pub(crate) struct RestoredBody {
    pub mem_hash: u64,
}

/// `reason`, cut at a character boundary to at most [`MAX_REASON`] bytes.
pub(crate) fn clip_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// Appends `value` as bincode to `out`.
pub(crate) fn put<T: Encode>(value: &T, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail, and these types always encode.
    let _ = bincode::encode_into_std_write(value, out, ENCODE);
}

pub(crate) fn crc(tag: u8, len_bytes: &[u8], payload: &[u8], number: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[tag]);
    h.update(len_bytes);
    h.update(payload);
    h.update(&number.to_le_bytes());
    h.finalize()
}

fn leb128(mut value: usize, out: &mut Vec<u8>) {
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Writes messages, numbering them and counting the bytes.
#[derive(Debug)]
pub(crate) struct MessageOut<W> {
    pub out: W,
    direction: Direction,
    /// The write timeout, to name in `Stalled`.
    pub stall: Option<Duration>,
    pub number: u64,
    pub written: u64,
    frame: Vec<u8>,
}

impl<W: Write> MessageOut<W> {
    pub(crate) fn new(out: W, direction: Direction) -> MessageOut<W> {
        MessageOut {
            out,
            direction,
            stall: None,
            number: 0,
            written: 0,
            frame: Vec::new(),
        }
    }

    /// Writes one message; one over its kind's maximum is refused before
    /// anything is written, as a reader would refuse it.
    pub(crate) fn send(&mut self, tag: Tag, payload: &[u8]) -> Result<(), TransferError> {
        if payload.len() > tag.max() {
            return Err(TransferError::TooLong {
                message: self.number,
                offset: self.written,
                kind: tag.name(),
                len: payload.len() as u64,
                max: tag.max(),
            });
        }
        self.frame.clear();
        self.frame.push(tag as u8);
        leb128(payload.len(), &mut self.frame);
        let crc = crc(tag as u8, &self.frame[1..], payload, self.number);
        // One write per message: a TCP segment of its own for a 4-byte CRC
        // (the connection has Nagle off) would cost more than the copy.
        self.frame.extend_from_slice(payload);
        self.frame.extend_from_slice(&crc.to_le_bytes());
        let result = self.out.write_all(&self.frame);
        result.map_err(|e| self.write_error(e))?;
        self.number += 1;
        self.written += self.frame.len() as u64;
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<(), TransferError> {
        self.out.flush().map_err(|e| self.write_error(e))
    }

    fn write_error(&self, e: io::Error) -> TransferError {
        if timed_out(&e) {
            TransferError::Stalled {
                to: self.direction.receiver(),
                waited: self.stall,
                written: self.written,
            }
        } else {
            TransferError::Write {
                written: self.written,
                source: e,
            }
        }
    }
}

/// Where a message was: for errors about its content.
#[derive(Clone, Copy, Debug)]
pub(crate) struct At {
    pub number: u64,
    pub offset: u64,
    pub tag: Tag,
}

impl At {
    pub(crate) fn decode_error(self, detail: String) -> TransferError {
        TransferError::Decode {
            message: self.number,
            offset: self.offset,
            kind: self.tag.name(),
            detail,
        }
    }

    pub(crate) fn invalid(self, detail: String) -> TransferError {
        TransferError::Invalid {
            message: self.number,
            offset: self.offset,
            detail,
        }
    }

    pub(crate) fn out_of_order(self, detail: String) -> TransferError {
        TransferError::OutOfOrder {
            message: self.number,
            offset: self.offset,
            detail,
        }
    }
}

/// Reads messages one at a time, exactly: never a byte past the message,
/// since the log channel follows on the same connection.
#[derive(Debug)]
pub(crate) struct MessageIn<R> {
    input: R,
    direction: Direction,
    /// The read timeout, to name in `Silent`.
    pub silence: Option<Duration>,
    pub number: u64,
    pub offset: u64,
    pub start: u64,
    /// The last message's payload.
    pub buf: Vec<u8>,
}

impl<R: Read> MessageIn<R> {
    pub(crate) fn new(input: R, direction: Direction) -> MessageIn<R> {
        MessageIn {
            input,
            direction,
            silence: None,
            number: 0,
            offset: 0,
            start: 0,
            buf: Vec::new(),
        }
    }

    pub(crate) fn get_ref(&self) -> &R {
        &self.input
    }

    pub(crate) fn into_inner(self) -> R {
        self.input
    }

    fn io_error(&self, e: io::Error) -> TransferError {
        if timed_out(&e) {
            TransferError::Silent {
                from: self.direction.sender(),
                waited: self.silence,
                message: self.number,
                offset: self.offset,
            }
        } else {
            TransferError::Read {
                message: self.number,
                offset: self.offset,
                source: e,
            }
        }
    }

    /// Reads the next message into `buf` and checks it; the error for a
    /// clean end names what was still missing.
    pub(crate) fn next(&mut self) -> Result<At, TransferError> {
        let (message, offset) = (self.number, self.offset);
        let mut tag = [0u8; 1];
        if read_full(&mut self.input, &mut tag).map_err(|e| self.io_error(e))? == 0 {
            return Err(TransferError::Closed {
                message,
                offset,
                from: self.direction.sender(),
                missing: self.direction.last(),
            });
        }
        let tag_byte = tag[0];
        let tag = match Tag::from_byte(tag_byte) {
            Some(t) if self.direction.accepts(t) => t,
            _ => {
                return Err(TransferError::UnknownTag {
                    message,
                    offset,
                    tag: tag_byte,
                    stream: self.direction.stream(),
                })
            }
        };
        let truncated = |have: usize, need: usize| TransferError::Truncated {
            message,
            offset,
            kind: tag.name(),
            have: have as u64,
            need: need as u64,
        };

        let mut len_bytes = [0u8; MAX_LEN_BYTES];
        let mut n = 0;
        // u128 so that ten 7-bit groups cannot overflow.
        let mut len: u128 = 0;
        loop {
            if n == MAX_LEN_BYTES {
                len = u128::MAX;
                break;
            }
            let got = read_full(&mut self.input, &mut len_bytes[n..=n]);
            if got.map_err(|e| self.io_error(e))? == 0 {
                return Err(truncated(1 + n, 1 + n + 1 + 4));
            }
            let byte = len_bytes[n];
            len |= u128::from(byte & 0x7f) << (7 * n);
            n += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let len = match usize::try_from(len) {
            Ok(l) if l <= tag.max() => l,
            _ => {
                return Err(TransferError::TooLong {
                    message,
                    offset,
                    kind: tag.name(),
                    len: u64::try_from(len).unwrap_or(u64::MAX),
                    max: tag.max(),
                })
            }
        };
        let size = 1 + n + len + 4;

        // Grows with what arrives, never ahead of it.
        self.buf.clear();
        let got = (&mut self.input)
            .take(len as u64)
            .read_to_end(&mut self.buf)
            .map_err(|e| self.io_error(e))?;
        if got < len {
            return Err(truncated(1 + n + got, size));
        }
        let mut stored = [0u8; 4];
        let got = read_full(&mut self.input, &mut stored).map_err(|e| self.io_error(e))?;
        if got < 4 {
            return Err(truncated(1 + n + len + got, size));
        }
        let stored = u32::from_le_bytes(stored);
        let computed = crc(tag_byte, &len_bytes[..n], &self.buf, message);
        if stored != computed {
            return Err(TransferError::Crc {
                message,
                offset,
                kind: tag.name(),
                stored,
                computed,
            });
        }
        self.number += 1;
        self.offset += size as u64;
        Ok(At {
            number: message,
            offset,
            tag,
        })
    }

    /// Decodes the whole payload of the message just read as a `T`.
    pub(crate) fn decode<T: Decode<()>>(&self, at: At) -> Result<T, TransferError> {
        let (value, used) = bincode::decode_from_slice(&self.buf, DECODE)
            .map_err(|e| at.decode_error(e.to_string()))?;
        if used != self.buf.len() {
            return Err(at.decode_error(format!(
                "{} bytes left over after the message",
                self.buf.len() - used
            )));
        }
        Ok(value)
    }

    /// Decodes one value from the payload at `*pos`, moving `pos` past it.
    pub(crate) fn decode_at<T: Decode<()>>(
        &self,
        at: At,
        pos: &mut usize,
    ) -> Result<T, TransferError> {
        let rest = self.buf.get(*pos..).unwrap_or_default();
        let (value, used) =
            bincode::decode_from_slice(rest, DECODE).map_err(|e| at.decode_error(e.to_string()))?;
        *pos += used;
        Ok(value)
    }
}
