//! Frames: the unit in which entries travel over any byte stream (a log
//! file, a TCP connection).
//!
//! ```text
//! length   unsigned LEB128, 1–3 bytes in practice (at most 10 are read);
//!          the payload's length in bytes, at most MAX_PAYLOAD
//! crc      u32 little endian: CRC-32 (IEEE, as zlib) over
//!          length bytes ‖ payload ‖ seq as u64 little endian
//! payload  `length` bytes of bincode 2, standard configuration
//! ```
//!
//! `seq` is not transmitted. Both ends know which sequence number the next
//! frame must have, and the CRC only matches for that one, so a dropped,
//! duplicated or reordered frame fails its check just as a corrupted one
//! does. On a mismatch the decoder tries the sequence numbers nearby; if one
//! of them matches, the error is reported as a sequence gap instead.

use crate::entry::Entry;
use crate::payload::{Base, Decoded, WireEntry};
use bincode::config::{self, Configuration, Limit};
use std::io::{self, Read};
use thiserror::Error;

/// The largest payload a frame may carry. A reader refuses a larger length
/// before allocating anything for it.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// How far on each side of the expected sequence number a failed CRC is
/// retried to tell a gap from corruption. A false match needs a CRC
/// collision (about 2^-21 for the whole window), and only changes which
/// error is reported: the frame is refused either way.
const GAP_SEARCH: u64 = 1024;

/// A length varint longer than this is garbage.
const MAX_LEN_BYTES: usize = 10;

const ENCODE: Configuration = config::standard();

/// bincode charges the in-memory size of each decoded value against the
/// limit (8 bytes for a u64 that took 1 byte on the wire), so the bound is
/// a multiple of the payload size. It matters only for payloads that passed
/// their CRC yet lie about a length inside them: without a limit, bincode
/// allocates whatever a byte-string length claims.
const DECODE: Configuration<config::LittleEndian, config::Varint, Limit<{ 16 * MAX_PAYLOAD }>> =
    config::standard().with_limit::<{ 16 * MAX_PAYLOAD }>();

/// A frame could not be read. Every variant names the frame (counted from 0
/// in this stream; in a log file the header is frame 0 and entry `n` is
/// frame `n`) and the byte offset where it starts.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame {frame} at offset {offset}: CRC mismatch for sequence number {seq} (stored {stored:#010x}, computed {computed:#010x})")]
    Crc {
        frame: u64,
        offset: u64,
        seq: u64,
        stored: u32,
        computed: u32,
    },
    #[error("frame {frame} at offset {offset}: sequence gap (expected {expected}, found {found})")]
    SequenceGap {
        frame: u64,
        offset: u64,
        expected: u64,
        found: u64,
    },
    #[error("frame {frame} at offset {offset}: length {len} is over the maximum {max}")]
    TooLong {
        frame: u64,
        offset: u64,
        len: u64,
        max: usize,
    },
    /// The stream ended inside a frame. While the length is still being
    /// read, `need` is a lower bound.
    #[error("frame {frame} at offset {offset} is truncated (need {need} bytes, have {have})")]
    Truncated {
        frame: u64,
        offset: u64,
        need: u64,
        have: u64,
    },
    #[error("frame {frame} at offset {offset}: payload does not decode: {message}")]
    Decode {
        frame: u64,
        offset: u64,
        message: String,
    },
    #[error("frame {frame} at offset {offset}: read failed: {source}")]
    Io {
        frame: u64,
        offset: u64,
        source: io::Error,
    },
}

/// An entry or value could not be encoded. Nothing was written to the
/// output, and the encoder's state is unchanged.
#[derive(Debug, Error)]
pub enum EncodeError {
    #[error("entry has sequence number {found}, expected {expected}")]
    Sequence { expected: u64, found: u64 },
    #[error("entry {seq} is at exit {exits}, before the previous entry's exit {previous}")]
    Backwards { seq: u64, exits: u64, previous: u64 },
    #[error("frame for sequence number {seq} would carry {len} bytes, over the maximum {max}")]
    TooLong { seq: u64, len: usize, max: usize },
    #[error("bincode could not encode sequence number {seq}: {message}")]
    Bincode { seq: u64, message: String },
}

fn crc_before_seq(len_bytes: &[u8], payload: &[u8]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(len_bytes);
    h.update(payload);
    h
}

fn crc_with_seq(partial: &crc32fast::Hasher, seq: u64) -> u32 {
    let mut h = partial.clone();
    h.update(&seq.to_le_bytes());
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

/// Appends one frame carrying `payload` under sequence number `seq` and
/// returns the frame's size. For frames that are not entries (a log file's
/// header is sequence 0).
pub fn encode_frame(seq: u64, payload: &[u8], out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(EncodeError::TooLong {
            seq,
            len: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    let start = out.len();
    leb128(payload.len(), out);
    let crc = crc_with_seq(&crc_before_seq(&out[start..], payload), seq);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out.len() - start)
}

/// Appends one frame carrying `value` encoded with bincode.
pub fn encode_value<T: bincode::Encode>(
    seq: u64,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<usize, EncodeError> {
    let payload = bincode::encode_to_vec(value, ENCODE).map_err(|e| EncodeError::Bincode {
        seq,
        message: e.to_string(),
    })?;
    encode_frame(seq, &payload, out)
}

/// Turns entries into frames. Its state (the next sequence number and the
/// delta base) must start where the matching [`FrameDecoder`]'s does.
#[derive(Debug)]
pub struct FrameEncoder {
    next_seq: u64,
    base: Base,
    scratch: Vec<u8>,
}

impl FrameEncoder {
    /// An encoder whose first entry must carry `first_seq` (1 at the start of
    /// a log). Deltas start from zero, so the first frame is self-contained.
    pub fn new(first_seq: u64) -> FrameEncoder {
        FrameEncoder {
            next_seq: first_seq,
            base: Base::default(),
            scratch: Vec::new(),
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends the frame of `entry` to `out` and returns its size. The entry
    /// must carry the next sequence number and must not be at an earlier exit
    /// than the entry before it.
    pub fn encode_entry(&mut self, entry: &Entry, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
        if entry.seq != self.next_seq {
            return Err(EncodeError::Sequence {
                expected: self.next_seq,
                found: entry.seq,
            });
        }
        if entry.pos.exits < self.base.exits {
            return Err(EncodeError::Backwards {
                seq: entry.seq,
                exits: entry.pos.exits,
                previous: self.base.exits,
            });
        }
        let wire = WireEntry {
            base: self.base,
            entry,
        };
        self.scratch.clear();
        bincode::encode_into_std_write(&wire, &mut self.scratch, ENCODE).map_err(|e| {
            EncodeError::Bincode {
                seq: entry.seq,
                message: e.to_string(),
            }
        })?;
        let size = encode_frame(entry.seq, &self.scratch, out)?;
        self.base = self.base.after(entry);
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(size)
    }
}

/// Reads frames from a byte stream and turns them back into entries.
///
/// An error is final: the stream cannot be resynchronised after it, because
/// a bad frame is refused, never guessed around.
#[derive(Debug)]
pub struct FrameDecoder {
    next_seq: u64,
    base: Base,
    frames: u64,
    offset: u64,
    buf: Vec<u8>,
}

/// Reads until `buf` is full or the stream ends; returns how much was read,
/// so that a truncation can say how much was there.
pub(crate) fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl FrameDecoder {
    /// A decoder whose first entry frame must carry `first_seq`, reading a
    /// stream whose first byte is at `offset` (for error messages: a log
    /// file's frames start after its 12-byte preamble).
    pub fn new(first_seq: u64, offset: u64) -> FrameDecoder {
        FrameDecoder {
            next_seq: first_seq,
            base: Base::default(),
            frames: 0,
            offset,
            buf: Vec::new(),
        }
    }

    /// The sequence number the next entry frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// How many frames have been read.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Reads the next entry and returns it with its frame size, or `None` if
    /// the stream ended cleanly at a frame boundary.
    pub fn read_entry<R: Read>(&mut self, r: &mut R) -> Result<Option<(Entry, usize)>, FrameError> {
        let (frame, offset) = (self.frames, self.offset);
        let seq = self.next_seq;
        let Some(size) = self.read_raw(r, seq)? else {
            return Ok(None);
        };
        let (decoded, used) =
            bincode::decode_from_slice_with_context::<_, Decoded, _>(&self.buf, DECODE, self.base)
                .map_err(|e| decode_error(frame, offset, e.to_string()))?;
        check_used(frame, offset, used, self.buf.len())?;
        let entry = Entry {
            seq,
            pos: decoded.pos,
            event: decoded.event,
        };
        self.base = self.base.after(&entry);
        self.next_seq = seq.wrapping_add(1);
        Ok(Some((entry, size)))
    }

    /// Reads a frame that is not an entry (sent under sequence number `seq`)
    /// and decodes it whole as a `T`. Returns the value and its frame size,
    /// or `None` if the stream ended cleanly at a frame boundary.
    pub fn read_value<T: bincode::Decode<()>, R: Read>(
        &mut self,
        r: &mut R,
        seq: u64,
    ) -> Result<Option<(T, usize)>, FrameError> {
        let (frame, offset) = (self.frames, self.offset);
        let Some(size) = self.read_raw(r, seq)? else {
            return Ok(None);
        };
        let (value, used) = bincode::decode_from_slice(&self.buf, DECODE)
            .map_err(|e| decode_error(frame, offset, e.to_string()))?;
        check_used(frame, offset, used, self.buf.len())?;
        Ok(Some((value, size)))
    }

    /// Reads one frame's payload into `self.buf` and checks its CRC against
    /// `seq`. Returns the whole frame's size.
    fn read_raw<R: Read>(&mut self, r: &mut R, seq: u64) -> Result<Option<usize>, FrameError> {
        let (frame, offset) = (self.frames, self.offset);
        let io = |source| FrameError::Io {
            frame,
            offset,
            source,
        };
        let truncated = |need: usize, have: usize| FrameError::Truncated {
            frame,
            offset,
            need: need as u64,
            have: have as u64,
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
            if read_full(r, &mut len_bytes[n..=n]).map_err(io)? == 0 {
                return if n == 0 {
                    Ok(None)
                } else {
                    Err(truncated(n + 1, n))
                };
            }
            let byte = len_bytes[n];
            len |= u128::from(byte & 0x7f) << (7 * n);
            n += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let len = match usize::try_from(len) {
            Ok(l) if l <= MAX_PAYLOAD => l,
            _ => {
                return Err(FrameError::TooLong {
                    frame,
                    offset,
                    len: u64::try_from(len).unwrap_or(u64::MAX),
                    max: MAX_PAYLOAD,
                })
            }
        };
        let size = n + 4 + len;

        let mut stored = [0u8; 4];
        let got = read_full(r, &mut stored).map_err(io)?;
        if got < 4 {
            return Err(truncated(size, n + got));
        }
        let stored = u32::from_le_bytes(stored);

        self.buf.clear();
        self.buf.resize(len, 0);
        let got = read_full(r, &mut self.buf).map_err(io)?;
        if got < len {
            return Err(truncated(size, n + 4 + got));
        }

        let partial = crc_before_seq(&len_bytes[..n], &self.buf);
        let computed = crc_with_seq(&partial, seq);
        if computed != stored {
            let nearby = seq.saturating_sub(GAP_SEARCH)..=seq.saturating_add(GAP_SEARCH);
            return Err(
                match nearby
                    .into_iter()
                    .find(|&s| s != seq && crc_with_seq(&partial, s) == stored)
                {
                    Some(found) => FrameError::SequenceGap {
                        frame,
                        offset,
                        expected: seq,
                        found,
                    },
                    None => FrameError::Crc {
                        frame,
                        offset,
                        seq,
                        stored,
                        computed,
                    },
                },
            );
        }
        self.frames += 1;
        self.offset += size as u64;
        Ok(Some(size))
    }
}

fn decode_error(frame: u64, offset: u64, message: String) -> FrameError {
    FrameError::Decode {
        frame,
        offset,
        message,
    }
}

fn check_used(frame: u64, offset: u64, used: usize, len: usize) -> Result<(), FrameError> {
    if used == len {
        Ok(())
    } else {
        Err(decode_error(
            frame,
            offset,
            format!("{} bytes left over after the value", len - used),
        ))
    }
}
