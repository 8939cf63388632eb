//! The key-value wire protocol, version 1 (docs/protocol.md): request
//! parsing and reply encoding, as pure functions over byte slices.

#![no_std]

pub const REQUEST_HEADER_LEN: usize = 24;
pub const REPLY_HEADER_LEN: usize = 48;
pub const MAX_KEY_LEN: usize = 64;
pub const MAX_VALUE_LEN: usize = 1024;
pub const MAX_REPLY_LEN: usize = REPLY_HEADER_LEN + MAX_VALUE_LEN;
/// The Entropy value (a u32 round count) and result (a u64 mix).
pub const ENTROPY_ARG_LEN: usize = 4;
pub const ENTROPY_RESULT_LEN: usize = 8;
pub const MAX_ENTROPY_ROUNDS: u32 = 10_000;

const MAGIC: [u8; 2] = *b"FT";
const VERSION: u8 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get = 1,
    Put = 2,
    Append = 3,
    Entropy = 4,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadRequest = 2,
    TooLarge = 3,
    Stale = 4,
    Busy = 5,
}

/// The identifying fields of a request, echoed in its reply.
#[derive(Clone, Copy)]
pub struct Ids {
    pub op: u8,
    pub client_id: u64,
    pub request_num: u64,
}

pub struct Request<'a> {
    pub ids: Ids,
    pub op: Op,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

pub enum Parsed<'a> {
    /// Shorter than a header or without the magic: not ours, no reply.
    NotOurs,
    /// Ours but malformed: a BadRequest reply, no execution.
    Bad(Ids),
    Request(Request<'a>),
}

pub fn parse(datagram: &[u8]) -> Parsed<'_> {
    if datagram.len() < REQUEST_HEADER_LEN || datagram[0..2] != MAGIC {
        return Parsed::NotOurs;
    }
    let ids = Ids {
        op: datagram[3],
        client_id: le64(datagram, 8),
        request_num: le64(datagram, 16),
    };
    let key_len = le16(datagram, 4) as usize;
    let value_len = le16(datagram, 6) as usize;
    let op = match ids.op {
        1 => Op::Get,
        2 => Op::Put,
        3 => Op::Append,
        4 => Op::Entropy,
        _ => return Parsed::Bad(ids),
    };
    let value_len_ok = match op {
        Op::Get => value_len == 0,
        Op::Put | Op::Append => value_len <= MAX_VALUE_LEN,
        Op::Entropy => value_len == ENTROPY_ARG_LEN,
    };
    // Client id 0 and request number 0 are outside the protocol's ranges
    // ("never 0"; "1, 2, 3, ..."); 0 also marks an unreadable request in
    // replies, and a request number 0 could never exceed a new client's
    // "last executed", so such requests are refused as malformed.
    if datagram[2] != VERSION
        || !(1..=MAX_KEY_LEN).contains(&key_len)
        || !value_len_ok
        || datagram.len() != REQUEST_HEADER_LEN + key_len + value_len
        || ids.client_id == 0
        || ids.request_num == 0
    {
        return Parsed::Bad(ids);
    }
    let key = &datagram[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + key_len];
    let value = &datagram[REQUEST_HEADER_LEN + key_len..];
    if op == Op::Entropy && !(1..=MAX_ENTROPY_ROUNDS).contains(&entropy_rounds(value)) {
        return Parsed::Bad(ids);
    }
    Parsed::Request(Request {
        ids,
        op,
        key,
        value,
    })
}

/// The round count of an Entropy request's value (4 bytes, checked by
/// `parse`).
pub fn entropy_rounds(value: &[u8]) -> u32 {
    match value {
        [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

/// Writes the reply header into `out[..REPLY_HEADER_LEN]` (which must be that
/// long); the `value_len` bytes of value follow it, written by the caller.
pub fn write_reply_header(
    out: &mut [u8],
    ids: &Ids,
    status: Status,
    tsc: u64,
    nonce: u64,
    value_len: usize,
) {
    let header = &mut out[..REPLY_HEADER_LEN];
    header[0..2].copy_from_slice(&MAGIC);
    header[2] = VERSION;
    header[3] = ids.op;
    header[4] = status as u8;
    header[5..8].copy_from_slice(&[0; 3]);
    header[8..16].copy_from_slice(&ids.client_id.to_le_bytes());
    header[16..24].copy_from_slice(&ids.request_num.to_le_bytes());
    header[24..32].copy_from_slice(&tsc.to_le_bytes());
    header[32..40].copy_from_slice(&nonce.to_le_bytes());
    header[40..42].copy_from_slice(&(value_len as u16).to_le_bytes());
    header[42..48].copy_from_slice(&[0; 6]);
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}
