extern crate std;

use std::vec;
use std::vec::Vec;

use super::*;

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

fn put() -> Request<'static> {
    Request {
        op: Op::Put,
        client_id: 0x1122_3344_5566_7788,
        request_num: 3,
        key: b"ab",
        value: b"xyz",
    }
}

fn get_reply() -> Reply<'static> {
    Reply {
        op: Op::Get as u8,
        status: Status::Ok,
        client_id: 0x1122_3344_5566_7788,
        request_num: 3,
        tsc: 0x0102_0304_0506_0708,
        nonce: 0xdead_beef_cafe_f00d,
        value: b"hi",
    }
}

fn encode_request(request: &Request) -> Result<Vec<u8>, Error> {
    let mut out = [0; MAX_REQUEST_LEN];
    let len = request.encode(&mut out)?;
    Ok(out[..len].to_vec())
}

fn encode_reply(reply: &Reply) -> Result<Vec<u8>, Error> {
    let mut out = [0; MAX_REPLY_LEN];
    let len = reply.encode(&mut out)?;
    Ok(out[..len].to_vec())
}

fn with(bytes: &[u8], offset: usize, new: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[offset..offset + new.len()].copy_from_slice(new);
    out
}

#[test]
fn put_request_layout() {
    assert_eq!(encode_request(&put()).unwrap(), PUT);
    assert_eq!(Request::decode(&PUT).unwrap(), put());
}

#[test]
fn get_and_entropy_request_layout() {
    let get = Request {
        op: Op::Get,
        client_id: 1,
        request_num: 0x0102,
        key: b"k",
        value: &[],
    };
    let bytes = [
        0x46, 0x54, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, //
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        b'k',
    ];
    assert_eq!(encode_request(&get).unwrap(), bytes);
    assert_eq!(Request::decode(&bytes).unwrap(), get);

    let rounds = 1000u32.to_le_bytes();
    let entropy = Request {
        op: Op::Entropy,
        client_id: u64::MAX,
        request_num: 1,
        key: b"e",
        value: &rounds,
    };
    let bytes = [
        0x46, 0x54, 0x01, 0x04, 0x01, 0x00, 0x04, 0x00, //
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, //
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        b'e', 0xe8, 0x03, 0x00, 0x00,
    ];
    assert_eq!(encode_request(&entropy).unwrap(), bytes);
    assert_eq!(Request::decode(&bytes).unwrap(), entropy);
    assert_eq!(entropy_rounds(entropy.value), 1000);
}

#[test]
fn reply_layout() {
    assert_eq!(encode_reply(&get_reply()).unwrap(), GET_REPLY);
    assert_eq!(Reply::decode(&GET_REPLY).unwrap(), get_reply());
}

#[test]
fn bad_request_reply_keeps_an_unknown_op() {
    let reply = Reply {
        op: 0x77,
        status: Status::BadRequest,
        value: &[],
        ..get_reply()
    };
    let bytes = encode_reply(&reply).unwrap();
    assert_eq!(bytes[reply_offset::OP], 0x77);
    assert_eq!(bytes[reply_offset::STATUS], 2);
    assert_eq!(Reply::decode(&bytes).unwrap(), reply);
}

#[test]
fn reply_header_is_the_start_of_the_reply() {
    let reply = get_reply();
    let mut out = [0xaa; REPLY_HEADER_LEN];
    write_reply_header(
        &mut out,
        &Ids {
            op: reply.op,
            client_id: reply.client_id,
            request_num: reply.request_num,
        },
        reply.status,
        reply.tsc,
        reply.nonce,
        reply.value.len(),
    );
    assert_eq!(out, GET_REPLY[..REPLY_HEADER_LEN]);
}

#[test]
fn encoding_fills_exactly_the_datagram() {
    let mut out = [0xaa; PUT.len() + 1];
    assert_eq!(put().encode(&mut out[..PUT.len()]), Ok(PUT.len()));
    assert_eq!(out[..PUT.len()], PUT);
    assert_eq!(out[PUT.len()], 0xaa);

    let mut out = [0xaa; MAX_REQUEST_LEN];
    let refused = Request {
        client_id: 0,
        ..put()
    };
    assert_eq!(refused.encode(&mut out), Err(Error::ZeroClientId));
    assert_eq!(
        out, [0xaa; MAX_REQUEST_LEN],
        "a refused request writes nothing"
    );
}

#[test]
fn request_decode_errors() {
    let cases: Vec<(Vec<u8>, Error)> = vec![
        (vec![], Error::TooShort { need: 24, have: 0 }),
        (PUT[..23].to_vec(), Error::TooShort { need: 24, have: 23 }),
        (with(&PUT, 0, b"FU"), Error::BadMagic { found: *b"FU" }),
        (with(&PUT, 2, &[2]), Error::BadVersion { found: 2 }),
        (with(&PUT, 3, &[0]), Error::UnknownOp { found: 0 }),
        (with(&PUT, 3, &[5]), Error::UnknownOp { found: 5 }),
        (with(&PUT, 4, &[0, 0]), Error::KeyLenOutOfRange { len: 0 }),
        (with(&PUT, 4, &[65, 0]), Error::KeyLenOutOfRange { len: 65 }),
        (
            with(&PUT, 6, &[0x01, 0x04]),
            Error::ValueLenOutOfRange {
                len: 1025,
                offset: 6,
            },
        ),
        (
            PUT[..28].to_vec(),
            Error::LengthMismatch {
                header: 29,
                actual: 28,
            },
        ),
        (
            [&PUT[..], b"!"].concat(),
            Error::LengthMismatch {
                header: 29,
                actual: 30,
            },
        ),
        (with(&PUT, 8, &[0; 8]), Error::ZeroClientId),
        (with(&PUT, 16, &[0; 8]), Error::ZeroRequestNum),
        (
            with(&PUT, 3, &[1]),
            Error::ValueLenForOp {
                op: Op::Get,
                len: 3,
                expected: 0,
            },
        ),
        (
            with(&PUT, 3, &[4]),
            Error::ValueLenForOp {
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
    let rounds = 10_000u32.to_le_bytes();
    let request = Request {
        op: Op::Entropy,
        client_id: 7,
        request_num: 1,
        key: b"key",
        value: &rounds,
    };
    let mut bytes = encode_request(&request).unwrap();
    assert_eq!(Request::decode(&bytes).unwrap(), request);

    for n in [0, 10_001, u32::MAX] {
        let expected = Error::EntropyRoundsOutOfRange { n, offset: 27 };
        let rounds = n.to_le_bytes();
        let request = Request {
            value: &rounds,
            ..request
        };
        assert_eq!(encode_request(&request), Err(expected));
        bytes[27..].copy_from_slice(&rounds);
        assert_eq!(Request::decode(&bytes), Err(expected));
    }
}

#[test]
fn request_encode_errors() {
    let cases = [
        (
            Request { key: &[], ..put() },
            Error::KeyLenOutOfRange { len: 0 },
        ),
        (
            Request {
                key: &[0; 65],
                ..put()
            },
            Error::KeyLenOutOfRange { len: 65 },
        ),
        (
            Request {
                value: &[0; 1025],
                ..put()
            },
            Error::ValueLenOutOfRange {
                len: 1025,
                offset: 6,
            },
        ),
        (
            Request {
                op: Op::Get,
                ..put()
            },
            Error::ValueLenForOp {
                op: Op::Get,
                len: 3,
                expected: 0,
            },
        ),
        (
            Request {
                op: Op::Entropy,
                value: &[1; 5],
                ..put()
            },
            Error::ValueLenForOp {
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
            Error::ZeroClientId,
        ),
        (
            Request {
                request_num: 0,
                ..put()
            },
            Error::ZeroRequestNum,
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(encode_request(&request), Err(expected), "{request:?}");
    }
    let limits = Request {
        op: Op::Append,
        key: &[b'k'; 64],
        value: &[b'v'; 1024],
        ..put()
    };
    assert_eq!(encode_request(&limits).unwrap().len(), MAX_REQUEST_LEN);
}

#[test]
fn reply_decode_errors() {
    let cases: Vec<(Vec<u8>, Error)> = vec![
        (
            GET_REPLY[..47].to_vec(),
            Error::TooShort { need: 48, have: 47 },
        ),
        (
            with(&GET_REPLY, 0, b"XT"),
            Error::BadMagic { found: *b"XT" },
        ),
        (with(&GET_REPLY, 2, &[0]), Error::BadVersion { found: 0 }),
        (with(&GET_REPLY, 4, &[6]), Error::UnknownStatus { found: 6 }),
        (
            with(&GET_REPLY, 6, &[0x80]),
            Error::NonZeroReserved {
                offset: 6,
                found: 0x80,
            },
        ),
        (
            with(&GET_REPLY, 47, &[1]),
            Error::NonZeroReserved {
                offset: 47,
                found: 1,
            },
        ),
        (
            with(&GET_REPLY, 40, &[0xff, 0xff]),
            Error::ValueLenOutOfRange {
                len: 0xffff,
                offset: 40,
            },
        ),
        (
            GET_REPLY[..49].to_vec(),
            Error::LengthMismatch {
                header: 50,
                actual: 49,
            },
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(Reply::decode(&bytes), Err(expected), "{bytes:02x?}");
    }
    let too_long = Reply {
        value: &[0; 1025],
        ..get_reply()
    };
    assert_eq!(
        encode_reply(&too_long),
        Err(Error::ValueLenOutOfRange {
            len: 1025,
            offset: 40
        })
    );
}

#[test]
fn the_guest_drops_what_is_not_ours_and_refuses_the_rest() {
    assert_eq!(parse(&PUT), Parsed::Request(put()));
    assert_eq!(parse(&PUT[..23]), Parsed::NotOurs);
    assert_eq!(parse(&with(&PUT, 0, b"FU")), Parsed::NotOurs);

    // Each is ours but malformed; the reply echoes the ids as found.
    let ids = put().ids();
    let cases = [
        (with(&PUT, 2, &[2]), ids),
        (with(&PUT, 3, &[9]), Ids { op: 9, ..ids }),
        (with(&PUT, 4, &[0, 0]), ids),
        (PUT[..28].to_vec(), ids),
        (with(&PUT, 3, &[1]), Ids { op: 1, ..ids }),
        (
            with(&PUT, 8, &[0; 8]),
            Ids {
                client_id: 0,
                ..ids
            },
        ),
        (
            with(&PUT, 16, &[0; 8]),
            Ids {
                request_num: 0,
                ..ids
            },
        ),
    ];
    for (bytes, ids) in cases {
        assert_eq!(parse(&bytes), Parsed::Bad(ids), "{bytes:02x?}");
    }
}
