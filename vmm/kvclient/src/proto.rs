//! The KV wire format (docs/protocol.md) as owned messages, for the client,
//! the unit tests' fake server and the integration tests.
//!
//! The format itself (constants, offsets, validation, byte layout) is
//! written once in `ftvm_kvproto`, which the guest uses too; this module adds
//! what a host program wants on top: messages that own their bytes, encoding
//! into a `Vec`, and errors that say what is wrong in words.

use ftvm_kvproto as wire;
use thiserror::Error;

pub use ftvm_kvproto::{
    reply_offset, request_offset, Op, Status, ENTROPY_MAX_ROUNDS, ENTROPY_MIN_ROUNDS,
    ENTROPY_REPLY_VALUE_LEN, ENTROPY_REQUEST_VALUE_LEN, MAGIC, MAX_KEY_LEN, MAX_REPLY_LEN,
    MAX_REQUEST_LEN, MAX_VALUE_LEN, MIN_KEY_LEN, REPLY_HEADER_LEN, REQUEST_HEADER_LEN, VERSION,
};

/// What is wrong with a datagram (when decoding) or a message (when
/// encoding); offsets are those of the offending field in the datagram.
/// One variant per [`wire::Error`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("datagram too short: need at least {need} bytes, have {have}")]
    TooShort { need: usize, have: usize },
    #[error(
        "bad magic {:#04x} {:#04x} at offset {} (expected {:#04x} {:#04x}, \"FT\")",
        .found[0],
        .found[1],
        request_offset::MAGIC,
        MAGIC[0],
        MAGIC[1]
    )]
    BadMagic { found: [u8; 2] },
    #[error(
        "version {found} at offset {} (expected {VERSION})",
        request_offset::VERSION
    )]
    BadVersion { found: u8 },
    #[error(
        "unknown op {found} at offset {} (expected {}..={})",
        request_offset::OP,
        Op::Get as u8,
        Op::Entropy as u8
    )]
    UnknownOp { found: u8 },
    #[error(
        "unknown status {found} at offset {} (expected {}..={})",
        reply_offset::STATUS,
        Status::Ok as u8,
        Status::Busy as u8
    )]
    UnknownStatus { found: u8 },
    #[error("reserved byte at offset {offset} is {found:#04x} (must be 0)")]
    NonZeroReserved { offset: usize, found: u8 },
    #[error(
        "key_len {len} at offset {} out of range {MIN_KEY_LEN}..={MAX_KEY_LEN}",
        request_offset::KEY_LEN
    )]
    KeyLenOutOfRange { len: usize },
    #[error("value_len {len} at offset {offset} out of range 0..={MAX_VALUE_LEN}")]
    ValueLenOutOfRange { len: usize, offset: usize },
    #[error(
        "value_len {len} at offset {} is invalid for {op} (must be {expected})",
        request_offset::VALUE_LEN
    )]
    ValueLenForOp { op: Op, len: usize, expected: usize },
    #[error("length mismatch: header says {header} bytes, datagram has {actual}")]
    LengthMismatch { header: usize, actual: usize },
    #[error(
        "client_id at offset {} is 0 (must be non-zero)",
        request_offset::CLIENT_ID
    )]
    ZeroClientId,
    #[error(
        "request_num at offset {} is 0 (request numbers start at 1)",
        request_offset::REQUEST_NUM
    )]
    ZeroRequestNum,
    #[error(
        "entropy round count {n} at offset {offset} out of range \
         {ENTROPY_MIN_ROUNDS}..={ENTROPY_MAX_ROUNDS}"
    )]
    EntropyRoundsOutOfRange { n: u32, offset: usize },
}

impl From<wire::Error> for ProtoError {
    fn from(error: wire::Error) -> Self {
        use wire::Error as E;

        match error {
            E::TooShort { need, have } => ProtoError::TooShort { need, have },
            E::BadMagic { found } => ProtoError::BadMagic { found },
            E::BadVersion { found } => ProtoError::BadVersion { found },
            E::UnknownOp { found } => ProtoError::UnknownOp { found },
            E::UnknownStatus { found } => ProtoError::UnknownStatus { found },
            E::NonZeroReserved { offset, found } => ProtoError::NonZeroReserved { offset, found },
            E::KeyLenOutOfRange { len } => ProtoError::KeyLenOutOfRange { len },
            E::ValueLenOutOfRange { len, offset } => ProtoError::ValueLenOutOfRange { len, offset },
            E::ValueLenForOp { op, len, expected } => {
                ProtoError::ValueLenForOp { op, len, expected }
            }
            E::LengthMismatch { header, actual } => ProtoError::LengthMismatch { header, actual },
            E::ZeroClientId => ProtoError::ZeroClientId,
            E::ZeroRequestNum => ProtoError::ZeroRequestNum,
            E::EntropyRoundsOutOfRange { n, offset } => {
                ProtoError::EntropyRoundsOutOfRange { n, offset }
            }
        }
    }
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
    /// Refuses exactly what the guest would answer with BadRequest.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut out = vec![0; MAX_REQUEST_LEN];
        let len = self.borrow().encode(&mut out)?;
        out.truncate(len);
        Ok(out)
    }

    pub fn decode(datagram: &[u8]) -> Result<Request, ProtoError> {
        let request = wire::Request::decode(datagram)?;
        Ok(Request {
            op: request.op,
            client_id: request.client_id,
            request_num: request.request_num,
            key: request.key.to_vec(),
            value: request.value.to_vec(),
        })
    }

    fn borrow(&self) -> wire::Request<'_> {
        wire::Request {
            op: self.op,
            client_id: self.client_id,
            request_num: self.request_num,
            key: &self.key,
            value: &self.value,
        }
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
        let mut out = vec![0; MAX_REPLY_LEN];
        let len = self.borrow().encode(&mut out)?;
        out.truncate(len);
        Ok(out)
    }

    pub fn decode(datagram: &[u8]) -> Result<Reply, ProtoError> {
        let reply = wire::Reply::decode(datagram)?;
        Ok(Reply {
            op: reply.op,
            status: reply.status,
            client_id: reply.client_id,
            request_num: reply.request_num,
            tsc: reply.tsc,
            nonce: reply.nonce,
            value: reply.value.to_vec(),
        })
    }

    fn borrow(&self) -> wire::Reply<'_> {
        wire::Reply {
            op: self.op,
            status: self.status,
            client_id: self.client_id,
            request_num: self.request_num,
            tsc: self.tsc,
            nonce: self.nonce,
            value: &self.value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn with(bytes: &[u8], offset: usize, new: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out[offset..offset + new.len()].copy_from_slice(new);
        out
    }

    #[test]
    fn errors_come_through_both_ways() {
        let put = Request {
            op: Op::Put,
            client_id: 7,
            request_num: 1,
            key: b"k".to_vec(),
            value: vec![0; MAX_VALUE_LEN + 1],
        };
        assert_eq!(
            put.encode(),
            Err(ProtoError::ValueLenOutOfRange {
                len: MAX_VALUE_LEN + 1,
                offset: request_offset::VALUE_LEN,
            })
        );
        assert_eq!(
            Request::decode(b"FT"),
            Err(ProtoError::TooShort {
                need: REQUEST_HEADER_LEN,
                have: 2
            })
        );
        assert_eq!(
            Reply::decode(&[0; REPLY_HEADER_LEN]),
            Err(ProtoError::BadMagic { found: [0, 0] })
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
                ProtoError::UnknownOp { found: 5 },
                "unknown op 5 at offset 3 (expected 1..=4)",
            ),
            (
                ProtoError::UnknownStatus { found: 6 },
                "unknown status 6 at offset 4 (expected 0..=5)",
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
                ProtoError::ZeroClientId,
                "client_id at offset 8 is 0 (must be non-zero)",
            ),
            (
                ProtoError::ZeroRequestNum,
                "request_num at offset 16 is 0 (request numbers start at 1)",
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
