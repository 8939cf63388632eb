//! Wire format of the KV protocol, version 1 (docs/protocol.md).
//!
//! Both directions are encoded and decoded here so that the client, the unit
//! tests' fake server and the integration tests share one definition. The
//! validation rules are the same when encoding and decoding: `encode` refuses
//! exactly what the guest would answer with BadRequest (or drop), so a request
//! that encodes is one the guest will execute, and `decode` accepts exactly
//! what `encode` can produce, byte for byte.

use std::fmt;

use thiserror::Error;

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
    /// Three zero bytes.
    pub const RESERVED_1: usize = 5;
    pub const CLIENT_ID: usize = 8;
    pub const REQUEST_NUM: usize = 16;
    pub const TSC: usize = 24;
    pub const NONCE: usize = 32;
    pub const VALUE_LEN: usize = 40;
    /// Six zero bytes.
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
    type Error = ProtoError;

    fn try_from(byte: u8) -> Result<Self, ProtoError> {
        match byte {
            1 => Ok(Op::Get),
            2 => Ok(Op::Put),
            3 => Ok(Op::Append),
            4 => Ok(Op::Entropy),
            found => Err(ProtoError::UnknownOp { found }),
        }
    }
}

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
    type Error = ProtoError;

    fn try_from(byte: u8) -> Result<Self, ProtoError> {
        match byte {
            0 => Ok(Status::Ok),
            1 => Ok(Status::NotFound),
            2 => Ok(Status::BadRequest),
            3 => Ok(Status::TooLarge),
            4 => Ok(Status::Stale),
            5 => Ok(Status::Busy),
            found => Err(ProtoError::UnknownStatus { found }),
        }
    }
}

/// What is wrong with a datagram (when decoding) or a message (when
/// encoding); offsets are those of the offending field in the datagram.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("datagram too short: need at least {need} bytes, have {have}")]
    TooShort { need: usize, have: usize },
    #[error(
        "bad magic {:#04x} {:#04x} at offset 0 (expected 0x46 0x54, \"FT\")",
        .found[0],
        .found[1]
    )]
    BadMagic { found: [u8; 2] },
    #[error("version {found} at offset 2 (expected {VERSION})")]
    BadVersion { found: u8 },
    #[error("unknown op {found} at offset 3 (expected 1..=4)")]
    UnknownOp { found: u8 },
    #[error("unknown status {found} at offset 4 (expected 0..=5)")]
    UnknownStatus { found: u8 },
    #[error("reserved byte at offset {offset} is {found:#04x} (must be 0)")]
    NonZeroReserved { offset: usize, found: u8 },
    #[error("key_len {len} at offset 4 out of range {MIN_KEY_LEN}..={MAX_KEY_LEN}")]
    KeyLenOutOfRange { len: usize },
    #[error("value_len {len} at offset {offset} out of range 0..={MAX_VALUE_LEN}")]
    ValueLenOutOfRange { len: usize, offset: usize },
    #[error("value_len {len} at offset 6 is invalid for {op} (must be {expected})")]
    ValueLenForOp { op: Op, len: usize, expected: usize },
    #[error("length mismatch: header says {header} bytes, datagram has {actual}")]
    LengthMismatch { header: usize, actual: usize },
    #[error("client_id at offset 8 is 0 (must be non-zero)")]
    ZeroClientId,
    #[error("request_num at offset 16 is 0 (request numbers start at 1)")]
    ZeroRequestNum,
    #[error(
        "entropy round count {n} at offset {offset} out of range \
         {ENTROPY_MIN_ROUNDS}..={ENTROPY_MAX_ROUNDS}"
    )]
    EntropyRoundsOutOfRange { n: u32, offset: usize },
}

/// One request datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Random and never 0: 0 in a reply means "could not be read".
    pub client_id: u64,
    /// 1, 2, 3, ... per client; a retry reuses the number.
    pub request_num: u64,
    pub key: Vec<u8>,
    /// Empty for Get; the round count `n` (little-endian u32) for Entropy.
    pub value: Vec<u8>,
}

impl Request {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        check_key_len(self.key.len())?;
        check_value_len(self.value.len(), request_offset::VALUE_LEN)?;
        check_ids(self.client_id, self.request_num)?;
        check_request_value(self.op, self.key.len(), &self.value)?;

        let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + self.key.len() + self.value.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.op as u8);
        out.extend_from_slice(&wire_len(self.key.len()));
        out.extend_from_slice(&wire_len(self.value.len()));
        out.extend_from_slice(&self.client_id.to_le_bytes());
        out.extend_from_slice(&self.request_num.to_le_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.value);
        Ok(out)
    }

    pub fn decode(datagram: &[u8]) -> Result<Request, ProtoError> {
        use request_offset as off;

        check_preamble(datagram, REQUEST_HEADER_LEN)?;
        let op = Op::try_from(datagram[off::OP])?;
        let key_len = usize::from(read_u16(datagram, off::KEY_LEN));
        check_key_len(key_len)?;
        let value_len = usize::from(read_u16(datagram, off::VALUE_LEN));
        check_value_len(value_len, off::VALUE_LEN)?;
        check_total_len(datagram, REQUEST_HEADER_LEN + key_len + value_len)?;
        let client_id = read_u64(datagram, off::CLIENT_ID);
        let request_num = read_u64(datagram, off::REQUEST_NUM);
        check_ids(client_id, request_num)?;
        let (key, value) = datagram[off::KEY..].split_at(key_len);
        check_request_value(op, key_len, value)?;

        Ok(Request {
            op,
            client_id,
            request_num,
            key: key.to_vec(),
            value: value.to_vec(),
        })
    }
}

/// One reply datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
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
    pub value: Vec<u8>,
}

impl Reply {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        check_value_len(self.value.len(), reply_offset::VALUE_LEN)?;

        let mut out = Vec::with_capacity(REPLY_HEADER_LEN + self.value.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.op);
        out.push(self.status as u8);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.client_id.to_le_bytes());
        out.extend_from_slice(&self.request_num.to_le_bytes());
        out.extend_from_slice(&self.tsc.to_le_bytes());
        out.extend_from_slice(&self.nonce.to_le_bytes());
        out.extend_from_slice(&wire_len(self.value.len()));
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&self.value);
        Ok(out)
    }

    pub fn decode(datagram: &[u8]) -> Result<Reply, ProtoError> {
        use reply_offset as off;

        check_preamble(datagram, REPLY_HEADER_LEN)?;
        let op = datagram[off::OP];
        let status = Status::try_from(datagram[off::STATUS])?;
        check_reserved(datagram, off::RESERVED_1..off::CLIENT_ID)?;
        let value_len = usize::from(read_u16(datagram, off::VALUE_LEN));
        check_value_len(value_len, off::VALUE_LEN)?;
        check_reserved(datagram, off::RESERVED_2..off::VALUE)?;
        check_total_len(datagram, REPLY_HEADER_LEN + value_len)?;

        Ok(Reply {
            op,
            status,
            client_id: read_u64(datagram, off::CLIENT_ID),
            request_num: read_u64(datagram, off::REQUEST_NUM),
            tsc: read_u64(datagram, off::TSC),
            nonce: read_u64(datagram, off::NONCE),
            value: datagram[off::VALUE..].to_vec(),
        })
    }
}

fn check_preamble(datagram: &[u8], header_len: usize) -> Result<(), ProtoError> {
    if datagram.len() < header_len {
        return Err(ProtoError::TooShort {
            need: header_len,
            have: datagram.len(),
        });
    }
    // Both headers start with magic, version and op at the same offsets.
    let found = [
        datagram[request_offset::MAGIC],
        datagram[request_offset::MAGIC + 1],
    ];
    if found != MAGIC {
        return Err(ProtoError::BadMagic { found });
    }
    match datagram[request_offset::VERSION] {
        VERSION => Ok(()),
        found => Err(ProtoError::BadVersion { found }),
    }
}

fn check_key_len(len: usize) -> Result<(), ProtoError> {
    if (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&len) {
        Ok(())
    } else {
        Err(ProtoError::KeyLenOutOfRange { len })
    }
}

fn check_value_len(len: usize, offset: usize) -> Result<(), ProtoError> {
    if len <= MAX_VALUE_LEN {
        Ok(())
    } else {
        Err(ProtoError::ValueLenOutOfRange { len, offset })
    }
}

fn check_total_len(datagram: &[u8], header_says: usize) -> Result<(), ProtoError> {
    if datagram.len() == header_says {
        Ok(())
    } else {
        Err(ProtoError::LengthMismatch {
            header: header_says,
            actual: datagram.len(),
        })
    }
}

fn check_ids(client_id: u64, request_num: u64) -> Result<(), ProtoError> {
    if client_id == 0 {
        Err(ProtoError::ZeroClientId)
    } else if request_num == 0 {
        Err(ProtoError::ZeroRequestNum)
    } else {
        Ok(())
    }
}

/// The per-op rules on a request's value.
fn check_request_value(op: Op, key_len: usize, value: &[u8]) -> Result<(), ProtoError> {
    let wrong_len = |expected| ProtoError::ValueLenForOp {
        op,
        len: value.len(),
        expected,
    };
    match op {
        Op::Put | Op::Append => Ok(()),
        Op::Get if value.is_empty() => Ok(()),
        Op::Get => Err(wrong_len(0)),
        Op::Entropy => {
            let n = value
                .try_into()
                .map(u32::from_le_bytes)
                .map_err(|_| wrong_len(ENTROPY_REQUEST_VALUE_LEN))?;
            if (ENTROPY_MIN_ROUNDS..=ENTROPY_MAX_ROUNDS).contains(&n) {
                Ok(())
            } else {
                Err(ProtoError::EntropyRoundsOutOfRange {
                    n,
                    offset: request_offset::KEY + key_len,
                })
            }
        }
    }
}

fn check_reserved(datagram: &[u8], range: std::ops::Range<usize>) -> Result<(), ProtoError> {
    match datagram[range.clone()].iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(i) => Err(ProtoError::NonZeroReserved {
            offset: range.start + i,
            found: datagram[range.start + i],
        }),
    }
}

/// Callers have checked `len` against the key or value limit, both far below
/// `u16::MAX`.
fn wire_len(len: usize) -> [u8; 2] {
    debug_assert!(len <= MAX_VALUE_LEN);
    (len as u16).to_le_bytes()
}

/// Callers have checked that the datagram holds the whole header.
fn read_u16(datagram: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([datagram[offset], datagram[offset + 1]])
}

/// Callers have checked that the datagram holds the whole header.
fn read_u64(datagram: &[u8], offset: usize) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&datagram[offset..offset + 8]);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Put, client 0x1122334455667788, request 3, key "ab", value "xyz".
    const PUT: [u8; 29] = [
        0x46, 0x54, // magic "FT"
        0x01, // version
        0x02, // op Put
        0x02, 0x00, // key_len 2
        0x03, 0x00, // value_len 3
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // client_id
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // request_num
        b'a', b'b', // key
        b'x', b'y', b'z', // value
    ];

    /// Ok reply to a Get of client 0x1122334455667788, request 3, value "hi".
    const GET_REPLY: [u8; 50] = [
        0x46, 0x54, // magic "FT"
        0x01, // version
        0x01, // op Get
        0x00, // status Ok
        0x00, 0x00, 0x00, // reserved
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // client_id
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // request_num
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // tsc
        0x0d, 0xf0, 0xfe, 0xca, 0xef, 0xbe, 0xad, 0xde, // nonce
        0x02, 0x00, // value_len 2
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // reserved
        b'h', b'i', // value
    ];

    fn put() -> Request {
        Request {
            op: Op::Put,
            client_id: 0x1122_3344_5566_7788,
            request_num: 3,
            key: b"ab".to_vec(),
            value: b"xyz".to_vec(),
        }
    }

    fn get_reply() -> Reply {
        Reply {
            op: Op::Get as u8,
            status: Status::Ok,
            client_id: 0x1122_3344_5566_7788,
            request_num: 3,
            tsc: 0x0102_0304_0506_0708,
            nonce: 0xdead_beef_cafe_f00d,
            value: b"hi".to_vec(),
        }
    }

    fn with(bytes: &[u8], offset: usize, new: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out[offset..offset + new.len()].copy_from_slice(new);
        out
    }

    #[test]
    fn put_request_layout() {
        assert_eq!(put().encode().unwrap(), PUT);
        assert_eq!(Request::decode(&PUT).unwrap(), put());
    }

    #[test]
    fn get_and_entropy_request_layout() {
        let get = Request {
            op: Op::Get,
            client_id: 1,
            request_num: 0x0102,
            key: b"k".to_vec(),
            value: vec![],
        };
        let bytes = [
            0x46, 0x54, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, //
            0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            b'k',
        ];
        assert_eq!(get.encode().unwrap(), bytes);
        assert_eq!(Request::decode(&bytes).unwrap(), get);

        let entropy = Request {
            op: Op::Entropy,
            client_id: u64::MAX,
            request_num: 1,
            key: b"e".to_vec(),
            value: 1000u32.to_le_bytes().to_vec(),
        };
        let bytes = [
            0x46, 0x54, 0x01, 0x04, 0x01, 0x00, 0x04, 0x00, //
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, //
            0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            b'e', 0xe8, 0x03, 0x00, 0x00,
        ];
        assert_eq!(entropy.encode().unwrap(), bytes);
        assert_eq!(Request::decode(&bytes).unwrap(), entropy);
    }

    #[test]
    fn reply_layout() {
        assert_eq!(get_reply().encode().unwrap(), GET_REPLY);
        assert_eq!(Reply::decode(&GET_REPLY).unwrap(), get_reply());
    }

    #[test]
    fn bad_request_reply_keeps_an_unknown_op() {
        let reply = Reply {
            op: 0x77,
            status: Status::BadRequest,
            value: vec![],
            ..get_reply()
        };
        let bytes = reply.encode().unwrap();
        assert_eq!(bytes[reply_offset::OP], 0x77);
        assert_eq!(bytes[reply_offset::STATUS], 2);
        assert_eq!(Reply::decode(&bytes).unwrap(), reply);
    }

    #[test]
    fn request_decode_errors() {
        let cases: Vec<(Vec<u8>, ProtoError)> = vec![
            (vec![], ProtoError::TooShort { need: 24, have: 0 }),
            (
                PUT[..23].to_vec(),
                ProtoError::TooShort { need: 24, have: 23 },
            ),
            (with(&PUT, 0, b"FU"), ProtoError::BadMagic { found: *b"FU" }),
            (with(&PUT, 2, &[2]), ProtoError::BadVersion { found: 2 }),
            (with(&PUT, 3, &[0]), ProtoError::UnknownOp { found: 0 }),
            (with(&PUT, 3, &[5]), ProtoError::UnknownOp { found: 5 }),
            (
                with(&PUT, 4, &[0, 0]),
                ProtoError::KeyLenOutOfRange { len: 0 },
            ),
            (
                with(&PUT, 4, &[65, 0]),
                ProtoError::KeyLenOutOfRange { len: 65 },
            ),
            (
                with(&PUT, 6, &[0x01, 0x04]),
                ProtoError::ValueLenOutOfRange {
                    len: 1025,
                    offset: 6,
                },
            ),
            (
                PUT[..28].to_vec(),
                ProtoError::LengthMismatch {
                    header: 29,
                    actual: 28,
                },
            ),
            (
                [&PUT[..], b"!"].concat(),
                ProtoError::LengthMismatch {
                    header: 29,
                    actual: 30,
                },
            ),
            (with(&PUT, 8, &[0; 8]), ProtoError::ZeroClientId),
            (with(&PUT, 16, &[0; 8]), ProtoError::ZeroRequestNum),
            (
                with(&PUT, 3, &[1]),
                ProtoError::ValueLenForOp {
                    op: Op::Get,
                    len: 3,
                    expected: 0,
                },
            ),
            (
                with(&PUT, 3, &[4]),
                ProtoError::ValueLenForOp {
                    op: Op::Entropy,
                    len: 3,
                    expected: 4,
                },
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(Request::decode(&bytes), Err(expected), "{bytes:02x?}");
        }
    }

    #[test]
    fn entropy_round_count_is_checked_both_ways() {
        let mut request = Request {
            op: Op::Entropy,
            client_id: 7,
            request_num: 1,
            key: b"key".to_vec(),
            value: 10_000u32.to_le_bytes().to_vec(),
        };
        let mut bytes = request.encode().unwrap();
        assert_eq!(Request::decode(&bytes).unwrap(), request);

        for n in [0, 10_001, u32::MAX] {
            let expected = ProtoError::EntropyRoundsOutOfRange { n, offset: 27 };
            request.value = n.to_le_bytes().to_vec();
            assert_eq!(request.encode(), Err(expected.clone()));
            bytes[27..].copy_from_slice(&n.to_le_bytes());
            assert_eq!(Request::decode(&bytes), Err(expected));
        }
    }

    #[test]
    fn request_encode_errors() {
        let cases = [
            (
                Request {
                    key: vec![],
                    ..put()
                },
                ProtoError::KeyLenOutOfRange { len: 0 },
            ),
            (
                Request {
                    key: vec![0; 65],
                    ..put()
                },
                ProtoError::KeyLenOutOfRange { len: 65 },
            ),
            (
                Request {
                    value: vec![0; 1025],
                    ..put()
                },
                ProtoError::ValueLenOutOfRange {
                    len: 1025,
                    offset: 6,
                },
            ),
            (
                Request {
                    op: Op::Get,
                    ..put()
                },
                ProtoError::ValueLenForOp {
                    op: Op::Get,
                    len: 3,
                    expected: 0,
                },
            ),
            (
                Request {
                    op: Op::Entropy,
                    value: vec![1; 5],
                    ..put()
                },
                ProtoError::ValueLenForOp {
                    op: Op::Entropy,
                    len: 5,
                    expected: 4,
                },
            ),
            (
                Request {
                    client_id: 0,
                    ..put()
                },
                ProtoError::ZeroClientId,
            ),
            (
                Request {
                    request_num: 0,
                    ..put()
                },
                ProtoError::ZeroRequestNum,
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(request.encode(), Err(expected), "{request:?}");
        }
        let limits = Request {
            op: Op::Append,
            key: vec![b'k'; 64],
            value: vec![b'v'; 1024],
            ..put()
        };
        assert_eq!(limits.encode().unwrap().len(), MAX_REQUEST_LEN);
    }

    #[test]
    fn reply_decode_errors() {
        let cases: Vec<(Vec<u8>, ProtoError)> = vec![
            (
                GET_REPLY[..47].to_vec(),
                ProtoError::TooShort { need: 48, have: 47 },
            ),
            (
                with(&GET_REPLY, 0, b"XT"),
                ProtoError::BadMagic { found: *b"XT" },
            ),
            (
                with(&GET_REPLY, 2, &[0]),
                ProtoError::BadVersion { found: 0 },
            ),
            (
                with(&GET_REPLY, 4, &[6]),
                ProtoError::UnknownStatus { found: 6 },
            ),
            (
                with(&GET_REPLY, 6, &[0x80]),
                ProtoError::NonZeroReserved {
                    offset: 6,
                    found: 0x80,
                },
            ),
            (
                with(&GET_REPLY, 47, &[1]),
                ProtoError::NonZeroReserved {
                    offset: 47,
                    found: 1,
                },
            ),
            (
                with(&GET_REPLY, 40, &[0xff, 0xff]),
                ProtoError::ValueLenOutOfRange {
                    len: 0xffff,
                    offset: 40,
                },
            ),
            (
                GET_REPLY[..49].to_vec(),
                ProtoError::LengthMismatch {
                    header: 50,
                    actual: 49,
                },
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(Reply::decode(&bytes), Err(expected), "{bytes:02x?}");
        }
        let too_long = Reply {
            value: vec![0; 1025],
            ..get_reply()
        };
        assert_eq!(
            too_long.encode(),
            Err(ProtoError::ValueLenOutOfRange {
                len: 1025,
                offset: 40
            })
        );
    }

    #[test]
    fn error_messages_name_the_problem() {
        let cases = [
            (
                ProtoError::TooShort { need: 24, have: 3 },
                "datagram too short: need at least 24 bytes, have 3",
            ),
            (
                ProtoError::BadMagic { found: *b"GT" },
                "bad magic 0x47 0x54 at offset 0 (expected 0x46 0x54, \"FT\")",
            ),
            (
                ProtoError::BadVersion { found: 9 },
                "version 9 at offset 2 (expected 1)",
            ),
            (
                ProtoError::LengthMismatch {
                    header: 29,
                    actual: 28,
                },
                "length mismatch: header says 29 bytes, datagram has 28",
            ),
            (
                ProtoError::KeyLenOutOfRange { len: 65 },
                "key_len 65 at offset 4 out of range 1..=64",
            ),
            (
                ProtoError::ValueLenForOp {
                    op: Op::Get,
                    len: 3,
                    expected: 0,
                },
                "value_len 3 at offset 6 is invalid for get (must be 0)",
            ),
            (
                ProtoError::NonZeroReserved {
                    offset: 6,
                    found: 0x80,
                },
                "reserved byte at offset 6 is 0x80 (must be 0)",
            ),
            (
                ProtoError::EntropyRoundsOutOfRange { n: 0, offset: 25 },
                "entropy round count 0 at offset 25 out of range 1..=10000",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let op = prop_oneof![
            Just(Op::Get),
            Just(Op::Put),
            Just(Op::Append),
            Just(Op::Entropy)
        ];
        (
            op,
            1..=u64::MAX,
            1..=u64::MAX,
            vec(any::<u8>(), 1..=MAX_KEY_LEN),
        )
            .prop_flat_map(|(op, client_id, request_num, key)| {
                let value = match op {
                    Op::Get => Just(vec![]).boxed(),
                    Op::Entropy => (ENTROPY_MIN_ROUNDS..=ENTROPY_MAX_ROUNDS)
                        .prop_map(|n| n.to_le_bytes().to_vec())
                        .boxed(),
                    Op::Put | Op::Append => vec(any::<u8>(), 0..=MAX_VALUE_LEN).boxed(),
                };
                value.prop_map(move |value| Request {
                    op,
                    client_id,
                    request_num,
                    key: key.clone(),
                    value,
                })
            })
    }

    fn arb_reply() -> impl Strategy<Value = Reply> {
        let status = prop_oneof![
            Just(Status::Ok),
            Just(Status::NotFound),
            Just(Status::BadRequest),
            Just(Status::TooLarge),
            Just(Status::Stale),
            Just(Status::Busy),
        ];
        (
            any::<u8>(),
            status,
            any::<[u64; 4]>(),
            vec(any::<u8>(), 0..=MAX_VALUE_LEN),
        )
            .prop_map(
                |(op, status, [client_id, request_num, tsc, nonce], value)| Reply {
                    op,
                    status,
                    client_id,
                    request_num,
                    tsc,
                    nonce,
                    value,
                },
            )
    }

    /// A valid datagram with one byte changed or the tail cut off: most
    /// mutations reach the deeper checks that random bytes rarely get to.
    fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let len = valid.len();
        prop_oneof![
            (0..len, any::<u8>()).prop_map({
                let valid = valid.clone();
                move |(i, byte)| with(&valid, i, &[byte])
            }),
            (0..=len + 1).prop_map(move |cut| {
                let mut bytes = valid.clone();
                bytes.resize(cut, 0);
                bytes
            }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trips(request in arb_request()) {
            let bytes = request.encode().unwrap();
            prop_assert_eq!(bytes.len(), REQUEST_HEADER_LEN + request.key.len() + request.value.len());
            prop_assert_eq!(Request::decode(&bytes).unwrap(), request);
        }

        #[test]
        fn reply_round_trips(reply in arb_reply()) {
            let bytes = reply.encode().unwrap();
            prop_assert_eq!(bytes.len(), REPLY_HEADER_LEN + reply.value.len());
            prop_assert_eq!(Reply::decode(&bytes).unwrap(), reply);
        }

        #[test]
        fn decoding_random_bytes_never_panics(
            bytes in prop_oneof![
                vec(any::<u8>(), 0..=MAX_REQUEST_LEN + 8),
                vec(any::<u8>(), 0..=MAX_REQUEST_LEN).prop_map(|tail| [&b"FT\x01"[..], &tail].concat()),
            ]
        ) {
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }

        #[test]
        fn decoded_requests_are_canonical(
            bytes in arb_request().prop_flat_map(|r| mutated(r.encode().unwrap()))
        ) {
            if let Ok(request) = Request::decode(&bytes) {
                prop_assert_eq!(request.encode().unwrap(), bytes);
            }
        }

        #[test]
        fn decoded_replies_are_canonical(
            bytes in arb_reply().prop_flat_map(|r| mutated(r.encode().unwrap()))
        ) {
            if let Ok(reply) = Reply::decode(&bytes) {
                prop_assert_eq!(reply.encode().unwrap(), bytes);
            }
        }
    }
}
