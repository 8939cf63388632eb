//! The bincode payload of an entry frame, delta-coded against the entries
//! before it in the same stream.
//!
//! Layout (bincode 2 standard configuration, so every integer wider than a
//! byte is a varint and signed ones are zigzagged first):
//!
//! ```text
//! exits_delta: u64   pos.exits - previous pos.exits (never negative)
//! rip_delta:   i64   pos.rip - previous pos.rip (wrapping)
//! tag:         u8    the event variant, see `Tag`
//! body               the variant's fields, see `encode`
//! ```
//!
//! The sequence number is not in the payload: it is implied by the frame's
//! place in the stream and checked by the frame CRC (see `frame`).

use crate::entry::{Digest, DigestReason, Entry, Event, OutputKind, PageHash, Position, Registers};
use bincode::de::Decoder;
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{Decode, Encode};

/// What the previous entry left behind for the next one's deltas. All zero at
/// the start of a stream, so the first entry carries absolute values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Base {
    pub exits: u64,
    pub rip: u64,
    /// The last value of a `rdtsc` or `rdtscp`: consecutive readings are
    /// close, so their difference is 3–5 bytes where the value takes 9.
    pub tsc: u64,
}

impl Base {
    /// The base for the entry after `entry`.
    pub(crate) fn after(self, entry: &Entry) -> Base {
        let tsc = match entry.event {
            Event::Rdtsc { value } | Event::Rdtscp { value, .. } => value,
            _ => self.tsc,
        };
        Base {
            exits: entry.pos.exits,
            rip: entry.pos.rip,
            tsc,
        }
    }
}

mod tag {
    pub const RDTSC: u8 = 0;
    pub const RDTSCP: u8 = 1;
    pub const RDRAND: u8 = 2;
    pub const RDSEED: u8 = 3;
    pub const RDMSR: u8 = 4;
    pub const PIT_READ: u8 = 5;
    pub const INTERRUPT: u8 = 6;
    pub const PACKET: u8 = 7;
    pub const DIGEST: u8 = 8;
    pub const PROGRESS: u8 = 9;
    pub const END: u8 = 10;
    pub const OUTPUT: u8 = 11;
    pub const ASYNC_POINT: u8 = 12;
}

fn reason_code(r: DigestReason) -> u8 {
    match r {
        DigestReason::Periodic => 0,
        DigestReason::Console => 1,
        DigestReason::Transmit => 2,
        DigestReason::End => 3,
    }
}

/// An entry paired with the base it is encoded against. The caller has
/// checked that `entry.pos.exits >= base.exits`.
pub(crate) struct WireEntry<'a> {
    pub base: Base,
    pub entry: &'a Entry,
}

fn delta(value: u64, base: u64) -> i64 {
    value.wrapping_sub(base) as i64
}

fn undelta(d: i64, base: u64) -> u64 {
    base.wrapping_add(d as u64)
}

impl Encode for WireEntry<'_> {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        let Entry { pos, event, .. } = self.entry;
        (pos.exits - self.base.exits).encode(e)?;
        delta(pos.rip, self.base.rip).encode(e)?;
        match event {
            Event::Rdtsc { value } => {
                tag::RDTSC.encode(e)?;
                delta(*value, self.base.tsc).encode(e)
            }
            Event::Rdtscp { value, aux } => {
                tag::RDTSCP.encode(e)?;
                delta(*value, self.base.tsc).encode(e)?;
                aux.encode(e)
            }
            Event::Rdrand { value, ok } => {
                tag::RDRAND.encode(e)?;
                value.encode(e)?;
                ok.encode(e)
            }
            Event::Rdseed { value, ok } => {
                tag::RDSEED.encode(e)?;
                value.encode(e)?;
                ok.encode(e)
            }
            Event::Rdmsr { msr, value } => {
                tag::RDMSR.encode(e)?;
                msr.encode(e)?;
                value.encode(e)
            }
            Event::PitRead { port, value } => {
                tag::PIT_READ.encode(e)?;
                port.encode(e)?;
                value.encode(e)
            }
            Event::Interrupt { vector } => {
                tag::INTERRUPT.encode(e)?;
                vector.encode(e)
            }
            Event::Packet { desc_head, frame } => {
                tag::PACKET.encode(e)?;
                desc_head.encode(e)?;
                frame.encode(e)
            }
            Event::Digest(d) => {
                tag::DIGEST.encode(e)?;
                reason_code(d.reason).encode(e)?;
                for (_, v) in d.regs.named() {
                    v.encode(e)?;
                }
                d.mem_hash.encode(e)?;
                (d.dirty_pages.len() as u64).encode(e)?;
                for p in &d.dirty_pages {
                    p.page.encode(e)?;
                    p.hash.encode(e)?;
                }
                d.output_hash.encode(e)
            }
            Event::Output { kind, hash, state } => {
                tag::OUTPUT.encode(e)?;
                let kind: u8 = match kind {
                    OutputKind::Console => 0,
                    OutputKind::Transmit => 1,
                };
                kind.encode(e)?;
                hash.to_le_bytes().encode(e)?;
                state.to_le_bytes().encode(e)
            }
            Event::Progress { exits } => {
                tag::PROGRESS.encode(e)?;
                delta(*exits, pos.exits).encode(e)
            }
            Event::End { exits, reason } => {
                tag::END.encode(e)?;
                delta(*exits, pos.exits).encode(e)?;
                reason.encode(e)
            }
            Event::AsyncPoint { regs, mem } => {
                tag::ASYNC_POINT.encode(e)?;
                regs.to_le_bytes().encode(e)?;
                mem.to_le_bytes().encode(e)
            }
        }
    }
}

/// A decoded payload: the entry without its sequence number, which the
/// frame layer supplies.
pub(crate) struct Decoded {
    pub pos: Position,
    pub event: Event,
}

/// Decodes against the `Base` passed as bincode's decoding context.
impl Decode<Base> for Decoded {
    fn decode<D: Decoder<Context = Base>>(d: &mut D) -> Result<Self, DecodeError> {
        let base = *d.context();
        let exits_delta = u64::decode(d)?;
        let exits = base
            .exits
            .checked_add(exits_delta)
            .ok_or(DecodeError::Other("exit count overflows u64"))?;
        let pos = Position {
            exits,
            rip: undelta(i64::decode(d)?, base.rip),
        };
        let event = match u8::decode(d)? {
            tag::RDTSC => Event::Rdtsc {
                value: undelta(i64::decode(d)?, base.tsc),
            },
            tag::RDTSCP => Event::Rdtscp {
                value: undelta(i64::decode(d)?, base.tsc),
                aux: u32::decode(d)?,
            },
            tag::RDRAND => Event::Rdrand {
                value: u64::decode(d)?,
                ok: bool::decode(d)?,
            },
            tag::RDSEED => Event::Rdseed {
                value: u64::decode(d)?,
                ok: bool::decode(d)?,
            },
            tag::RDMSR => Event::Rdmsr {
                msr: u32::decode(d)?,
                value: u64::decode(d)?,
            },
            tag::PIT_READ => Event::PitRead {
                port: u16::decode(d)?,
                value: u8::decode(d)?,
            },
            tag::INTERRUPT => Event::Interrupt {
                vector: u8::decode(d)?,
            },
            tag::PACKET => Event::Packet {
                desc_head: u16::decode(d)?,
                frame: Vec::<u8>::decode(d)?,
            },
            tag::DIGEST => Event::Digest(decode_digest(d)?),
            tag::OUTPUT => Event::Output {
                kind: match u8::decode(d)? {
                    0 => OutputKind::Console,
                    1 => OutputKind::Transmit,
                    other => {
                        return Err(DecodeError::OtherString(format!(
                            "unknown output kind {other}"
                        )))
                    }
                },
                hash: u32::from_le_bytes(<[u8; 4]>::decode(d)?),
                state: u32::from_le_bytes(<[u8; 4]>::decode(d)?),
            },
            tag::PROGRESS => Event::Progress {
                exits: undelta(i64::decode(d)?, exits),
            },
            tag::END => Event::End {
                exits: undelta(i64::decode(d)?, exits),
                reason: String::decode(d)?,
            },
            tag::ASYNC_POINT => Event::AsyncPoint {
                regs: u64::from_le_bytes(<[u8; 8]>::decode(d)?),
                mem: u64::from_le_bytes(<[u8; 8]>::decode(d)?),
            },
            other => {
                return Err(DecodeError::OtherString(format!(
                    "unknown event tag {other}"
                )))
            }
        };
        Ok(Decoded { pos, event })
    }
}

fn decode_digest<D: Decoder<Context = Base>>(d: &mut D) -> Result<Digest, DecodeError> {
    let reason = match u8::decode(d)? {
        0 => DigestReason::Periodic,
        1 => DigestReason::Console,
        2 => DigestReason::Transmit,
        3 => DigestReason::End,
        other => {
            return Err(DecodeError::OtherString(format!(
                "unknown digest reason {other}"
            )))
        }
    };
    let mut regs = [0u64; 18];
    for r in &mut regs {
        *r = u64::decode(d)?;
    }
    let mem_hash = u64::decode(d)?;
    let count = u64::decode(d)?;
    // Grow as pages arrive rather than trusting `count` for the capacity: a
    // payload that lies about it then fails at its end instead of allocating.
    let mut dirty_pages = Vec::new();
    for _ in 0..count {
        dirty_pages.push(PageHash {
            page: u64::decode(d)?,
            hash: u64::decode(d)?,
        });
    }
    Ok(Digest {
        reason,
        regs: Registers::from_array(regs),
        mem_hash,
        dirty_pages,
        output_hash: Option::<u64>::decode(d)?,
    })
}
