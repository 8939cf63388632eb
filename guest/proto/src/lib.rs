//! The key-value wire protocol, version 1 (docs/protocol.md), written once
//! for both ends: the guest parses requests and writes replies with it, the
//! host's client (`ftvm-kvclient`) encodes requests and decodes replies with
//! it. Nothing here allocates: encoders write into the caller's buffer and
//! decoders borrow from the datagram.
//!
//! The validation rules are the same when encoding and decoding: encoding
//! refuses exactly what the guest answers with BadRequest (or drops), so a
//! request that encodes is one the guest will execute, and decoding accepts
//! exactly what encoding can produce, byte for byte.
//!
//! The guest is built without SSE and must not format anything: `core::fmt`
//! comes precompiled with SSE. The only formatting code here, `Display for
//! Op`, is for the host's messages, and the guest's fat LTO drops it as long
//! as nothing in the guest calls it.

#![no_std]

use core::fmt;

/// The first two bytes of every datagram, requests and replies alike.
pub const MAGIC: [u8; 2] = *b"FT";
pub const VERSION: u8 = 1;

pub const REQUEST_HEADER_LEN: usize = 24;
pub const REPLY_HEADER_LEN: usize = 48;

pub const MIN_KEY_LEN: usize = 1;
pub const MAX_KEY_LEN: usize = 64;
pub const MAX_VALUE_LEN: usize = 1024;

pub const MAX_REQUEST_LEN: usize = REQUEST_HEADER_LEN + MAX_KEY_LEN + MAX_VALUE_LEN;
pub const MAX_REPLY_LEN: usize = REPLY_HEADER_LEN + MAX_VALUE_LEN;

/// An Entropy request's value is its round count `n` as a little-endian u32.
pub const ENTROPY_REQUEST_VALUE_LEN: usize = 4;
pub const ENTROPY_MIN_ROUNDS: u32 = 1;
pub const ENTROPY_MAX_ROUNDS: u32 = 10_000;
/// An Entropy reply's value is the mix as a little-endian u64.
pub const ENTROPY_REPLY_VALUE_LEN: usize = 8;

/// Byte offsets of the fields of a request.
pub mod request_offset {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 2;
    pub const OP: usize = 3;
    pub const KEY_LEN: usize = 4;
    pub const VALUE_LEN: usize = 6;
    pub const CLIENT_ID: usize = 8;
    pub const REQUEST_NUM: usize = 16;
    /// The value follows the key, at `KEY + key_len`.
    pub const KEY: usize = 24;
}

/// Byte offsets of the fields of a reply.
pub mod reply_offset {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 2;
    pub const OP: usize = 3;
    pub const STATUS: usize = 4;
    /// Zero bytes up to `CLIENT_ID`.
    pub const RESERVED_1: usize = 5;
    pub const CLIENT_ID: usize = 8;
    pub const REQUEST_NUM: usize = 16;
    pub const TSC: usize = 24;
    pub const NONCE: usize = 32;
    pub const VALUE_LEN: usize = 40;
    /// Zero bytes up to `VALUE`.
    pub const RESERVED_2: usize = 42;
    pub const VALUE: usize = 48;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Get = 1,
    Put = 2,
    Append = 3,
    Entropy = 4,
}

impl TryFrom<u8> for Op {
    type Error = Error;

    fn try_from(byte: u8) -> Result<Self, Error> {
        match byte {
            1 => Ok(Op::Get),
            2 => Ok(Op::Put),
            3 => Ok(Op::Append),
            4 => Ok(Op::Entropy),
            found => Err(Error::UnknownOp { found }),
        }
    }
}

/// For the host's messages; the guest must not call it (see the crate
/// documentation).
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Append => "append",
            Op::Entropy => "entropy",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadRequest = 2,
    TooLarge = 3,
    Stale = 4,
    Busy = 5,
}

impl TryFrom<u8> for Status {
    type Error = Error;

    fn try_from(byte: u8) -> Result<Self, Error> {
        match byte {
            0 => Ok(Status::Ok),
            1 => Ok(Status::NotFound),
            2 => Ok(Status::BadRequest),
            3 => Ok(Status::TooLarge),
            4 => Ok(Status::Stale),
            5 => Ok(Status::Busy),
            found => Err(Error::UnknownStatus { found }),
        }
    }
}

/// What is wrong with a datagram (when decoding) or a message (when
/// encoding); offsets are those of the offending field in the datagram. The
/// host's client words these for people; the guest only tells "not ours"
/// from BadRequest ([`parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    TooShort { need: usize, have: usize },
    BadMagic { found: [u8; 2] },
    BadVersion { found: u8 },
    UnknownOp { found: u8 },
    UnknownStatus { found: u8 },
    NonZeroReserved { offset: usize, found: u8 },
    KeyLenOutOfRange { len: usize },
    ValueLenOutOfRange { len: usize, offset: usize },
    ValueLenForOp { op: Op, len: usize, expected: usize },
    LengthMismatch { header: usize, actual: usize },
    ZeroClientId,
    ZeroRequestNum,
    EntropyRoundsOutOfRange { n: u32, offset: usize },
}

/// The identifying fields of a request, echoed in its reply. The op is the
/// raw byte: a BadRequest reply echoes whatever op the request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub op: u8,
    pub client_id: u64,
    pub request_num: u64,
}

impl Ids {
    /// Reads the fields from a request header, whether or not the rest of it
    /// is valid.
    pub fn read(header: &[u8; REQUEST_HEADER_LEN]) -> Ids {
        use request_offset as off;

        Ids {
            op: header[off::OP],
            client_id: read_u64(header, off::CLIENT_ID),
            request_num: read_u64(header, off::REQUEST_NUM),
        }
    }
}

/// One request datagram, borrowing its key and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub op: Op,
    /// Random and never 0: 0 in a reply means "could not be read".
    pub client_id: u64,
    /// 1, 2, 3, ... per client; a retry reuses the number.
    pub request_num: u64,
    pub key: &'a [u8],
    /// Empty for Get; the round count `n` (little-endian u32) for Entropy.
    pub value: &'a [u8],
}

impl<'a> Request<'a> {
    pub fn ids(&self) -> Ids {
        Ids {
            op: self.op as u8,
            client_id: self.client_id,
            request_num: self.request_num,
        }
    }

    /// Writes the datagram into the start of `out` and returns its length,
    /// or refuses a request the guest would not execute, writing nothing.
    ///
    /// Panics if `out` is shorter than the datagram, as `char::encode_utf8`
    /// does: [`MAX_REQUEST_LEN`] bytes always suffice.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, Error> {
        use request_offset as off;

        check_key_len(self.key.len())?;
        check_value_len(self.value.len(), off::VALUE_LEN)?;
        self.check_fields()?;

        let len = REQUEST_HEADER_LEN + self.key.len() + self.value.len();
        let out = &mut out[..len];
        write(out, off::MAGIC, &MAGIC);
        out[off::VERSION] = VERSION;
        out[off::OP] = self.op as u8;
        write(out, off::KEY_LEN, &wire_len(self.key.len()));
        write(out, off::VALUE_LEN, &wire_len(self.value.len()));
        write(out, off::CLIENT_ID, &self.client_id.to_le_bytes());
        write(out, off::REQUEST_NUM, &self.request_num.to_le_bytes());
        let (key, value) = out[off::KEY..].split_at_mut(self.key.len());
        key.copy_from_slice(self.key);
        value.copy_from_slice(self.value);
        Ok(len)
    }

    pub fn decode(datagram: &'a [u8]) -> Result<Request<'a>, Error> {
        use request_offset as off;

        let header = check_preamble::<REQUEST_HEADER_LEN>(datagram)?;
        let op = Op::try_from(header[off::OP])?;
        let key_len = usize::from(read_u16(header, off::KEY_LEN));
        check_key_len(key_len)?;
        let value_len = usize::from(read_u16(header, off::VALUE_LEN));
        check_value_len(value_len, off::VALUE_LEN)?;
        check_total_len(datagram, REQUEST_HEADER_LEN + key_len + value_len)?;
        let (key, value) = datagram[off::KEY..].split_at(key_len);
        let request = Request {
            op,
            client_id: read_u64(header, off::CLIENT_ID),
            request_num: read_u64(header, off::REQUEST_NUM),
            key,
            value,
        };
        request.check_fields()?;
        Ok(request)
    }

    /// The rules beyond the lengths: the ids and the per-op value.
    fn check_fields(&self) -> Result<(), Error> {
        // Client id 0 and request number 0 are outside the protocol's ranges
        // ("never 0"; "1, 2, 3, ..."); 0 also marks an unreadable request in
        // replies, and a request number 0 could never exceed a new client's
        // "last executed", so such requests are refused as malformed.
        if self.client_id == 0 {
            return Err(Error::ZeroClientId);
        }
        if self.request_num == 0 {
            return Err(Error::ZeroRequestNum);
        }
        let wrong_len = |expected| Error::ValueLenForOp {
            op: self.op,
            len: self.value.len(),
            expected,
        };
        match self.op {
            Op::Put | Op::Append => Ok(()),
            Op::Get if self.value.is_empty() => Ok(()),
            Op::Get => Err(wrong_len(0)),
            Op::Entropy if self.value.len() != ENTROPY_REQUEST_VALUE_LEN => {
                Err(wrong_len(ENTROPY_REQUEST_VALUE_LEN))
            }
            Op::Entropy => {
                let n = entropy_rounds(self.value);
                if (ENTROPY_MIN_ROUNDS..=ENTROPY_MAX_ROUNDS).contains(&n) {
                    Ok(())
                } else {
                    Err(Error::EntropyRoundsOutOfRange {
                        n,
                        offset: request_offset::KEY + self.key.len(),
                    })
                }
            }
        }
    }
}

/// The round count of an Entropy request's value; 0 (out of range) if the
/// value is not [`ENTROPY_REQUEST_VALUE_LEN`] bytes long.
pub fn entropy_rounds(value: &[u8]) -> u32 {
    match value {
        [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

/// What the guest does with a datagram (docs/protocol.md, "Malformed
/// datagrams").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Shorter than a header or without the magic: not ours, no reply.
    NotOurs,
    /// Ours but malformed: a BadRequest reply, no execution.
    Bad(Ids),
    Request(Request<'a>),
}

pub fn parse(datagram: &[u8]) -> Parsed<'_> {
    match Request::decode(datagram) {
        Ok(request) => Parsed::Request(request),
        Err(Error::TooShort { .. } | Error::BadMagic { .. }) => Parsed::NotOurs,
        // Every other error comes from a whole header.
        Err(_) => datagram
            .first_chunk()
            .map_or(Parsed::NotOurs, |header| Parsed::Bad(Ids::read(header))),
    }
}

/// One reply datagram, borrowing its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    /// The raw op byte rather than an [`Op`]: the guest echoes whatever op a
    /// malformed request carried in its BadRequest reply (0 if it could not
    /// be read), and that must survive decoding. Compare with `Op::X as u8`.
    pub op: u8,
    pub status: Status,
    pub client_id: u64,
    pub request_num: u64,
    /// The guest's `rdtsc` when the request executed.
    pub tsc: u64,
    /// A guest `rdrand` value from when the request executed.
    pub nonce: u64,
    pub value: &'a [u8],
}

impl<'a> Reply<'a> {
    /// Writes the datagram into the start of `out` and returns its length,
    /// or refuses a value over [`MAX_VALUE_LEN`], writing nothing.
    ///
    /// Panics if `out` is shorter than the datagram, as `char::encode_utf8`
    /// does: [`MAX_REPLY_LEN`] bytes always suffice.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, Error> {
        check_value_len(self.value.len(), reply_offset::VALUE_LEN)?;

        let ids = Ids {
            op: self.op,
            client_id: self.client_id,
            request_num: self.request_num,
        };
        let len = REPLY_HEADER_LEN + self.value.len();
        let out = &mut out[..len];
        write_reply_header(
            out,
            &ids,
            self.status,
            self.tsc,
            self.nonce,
            self.value.len(),
        );
        out[reply_offset::VALUE..].copy_from_slice(self.value);
        Ok(len)
    }

    pub fn decode(datagram: &'a [u8]) -> Result<Reply<'a>, Error> {
        use reply_offset as off;

        let header = check_preamble::<REPLY_HEADER_LEN>(datagram)?;
        let status = Status::try_from(header[off::STATUS])?;
        check_reserved(header, off::RESERVED_1, off::CLIENT_ID)?;
        let value_len = usize::from(read_u16(header, off::VALUE_LEN));
        check_value_len(value_len, off::VALUE_LEN)?;
        check_reserved(header, off::RESERVED_2, off::VALUE)?;
        check_total_len(datagram, REPLY_HEADER_LEN + value_len)?;

        Ok(Reply {
            op: header[off::OP],
            status,
            client_id: read_u64(header, off::CLIENT_ID),
            request_num: read_u64(header, off::REQUEST_NUM),
            tsc: read_u64(header, off::TSC),
            nonce: read_u64(header, off::NONCE),
            value: &datagram[off::VALUE..],
        })
    }
}

/// Writes the reply header into `out[..REPLY_HEADER_LEN]` (which must be that
/// long); the `value_len` bytes of value (at most [`MAX_VALUE_LEN`]) follow
/// it, written by the caller. This lets the guest execute a request straight
/// into the reply's value.
pub fn write_reply_header(
    out: &mut [u8],
    ids: &Ids,
    status: Status,
    tsc: u64,
    nonce: u64,
    value_len: usize,
) {
    use reply_offset as off;

    let header = &mut out[..REPLY_HEADER_LEN];
    write(header, off::MAGIC, &MAGIC);
    header[off::VERSION] = VERSION;
    header[off::OP] = ids.op;
    header[off::STATUS] = status as u8;
    header[off::RESERVED_1..off::CLIENT_ID].fill(0);
    write(header, off::CLIENT_ID, &ids.client_id.to_le_bytes());
    write(header, off::REQUEST_NUM, &ids.request_num.to_le_bytes());
    write(header, off::TSC, &tsc.to_le_bytes());
    write(header, off::NONCE, &nonce.to_le_bytes());
    write(header, off::VALUE_LEN, &wire_len(value_len));
    header[off::RESERVED_2..off::VALUE].fill(0);
}

/// The length, magic and version checks that both headers start with; the
/// header, once the datagram is known to hold one.
fn check_preamble<const HEADER_LEN: usize>(datagram: &[u8]) -> Result<&[u8; HEADER_LEN], Error> {
    // Magic and version are at the same offsets in both headers.
    use request_offset as off;

    let header = datagram.first_chunk().ok_or(Error::TooShort {
        need: HEADER_LEN,
        have: datagram.len(),
    })?;
    let found = [header[off::MAGIC], header[off::MAGIC + 1]];
    if found != MAGIC {
        return Err(Error::BadMagic { found });
    }
    match header[off::VERSION] {
        VERSION => Ok(header),
        found => Err(Error::BadVersion { found }),
    }
}

fn check_key_len(len: usize) -> Result<(), Error> {
    if (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&len) {
        Ok(())
    } else {
        Err(Error::KeyLenOutOfRange { len })
    }
}

fn check_value_len(len: usize, offset: usize) -> Result<(), Error> {
    if len <= MAX_VALUE_LEN {
        Ok(())
    } else {
        Err(Error::ValueLenOutOfRange { len, offset })
    }
}

fn check_total_len(datagram: &[u8], header_says: usize) -> Result<(), Error> {
    if datagram.len() == header_says {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            header: header_says,
            actual: datagram.len(),
        })
    }
}

fn check_reserved(header: &[u8], start: usize, end: usize) -> Result<(), Error> {
    match header[start..end].iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(i) => Err(Error::NonZeroReserved {
            offset: start + i,
            found: header[start + i],
        }),
    }
}

/// Callers have checked `len` against the key or value limit, both far below
/// `u16::MAX`.
fn wire_len(len: usize) -> [u8; 2] {
    debug_assert!(len <= MAX_VALUE_LEN);
    (len as u16).to_le_bytes()
}

fn write(out: &mut [u8], offset: usize, bytes: &[u8]) {
    out[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// `offset` is that of a field inside a header the caller holds whole.
fn read_u16(header: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([header[offset], header[offset + 1]])
}

/// `offset` is that of a field inside a header the caller holds whole.
fn read_u64(header: &[u8], offset: usize) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&header[offset..offset + 8]);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests;
