//! Every malformed input gives its named error, and the writer refuses
//! what a reader would.

use crate::support::{
    begin_payload, message, page, read_bytes, sample, small, varint, Got, MEM, PAGE, PAGES,
};
use logchannel::{read_verdict, TransferError, TransferReader, TransferWriter, MAX_PAGES_PAYLOAD};

/// A message's tag and payload.
type Message = (u8, Vec<u8>);

fn stream(messages: &[Message]) -> Vec<u8> {
    messages
        .iter()
        .enumerate()
        .flat_map(|(n, (tag, payload))| message(n as u64, *tag, payload))
        .collect()
}

fn err_of(bytes: &[u8]) -> TransferError {
    let (_, err) = read_bytes(bytes);
    err.expect("an error")
}

/// A pages message with one record of `kind`, `len` and `data`.
fn record(index: u64, kind: u8, len: Option<u64>, data: &[u8]) -> Vec<u8> {
    let mut p = varint(index);
    p.push(kind);
    if let Some(len) = len {
        p.extend(varint(len));
    }
    p.extend_from_slice(data);
    p
}

#[test]
fn a_stream_cut_anywhere_is_an_error_naming_the_place() {
    let bytes = small();
    // Message boundaries, to tell a clean end from a cut inside one.
    let mut boundaries = vec![0u64];
    let mut r = TransferReader::new(&bytes[..], MEM);
    loop {
        match r.next() {
            Ok(logchannel::TransferItem::Cut(_)) => break,
            Ok(_) => boundaries.push(r.bytes_read()),
            Err(e) => panic!("{e}"),
        }
    }
    for cut in 0..bytes.len() {
        let err = err_of(&bytes[..cut]);
        match err {
            TransferError::Closed { offset, .. } => {
                assert_eq!(offset, cut as u64);
                assert!(boundaries.contains(&offset), "{cut}");
            }
            TransferError::Truncated {
                offset, have, need, ..
            } => {
                assert_eq!(offset + have, cut as u64, "{cut}");
                assert!(need > have, "{cut}: {err}");
                assert!(err.to_string().contains(&format!("after {cut} bytes")));
            }
            other => panic!("cut at {cut}: {other}"),
        }
    }
}

#[test]
fn a_clean_end_before_the_cut_says_so() {
    let bytes = stream(&[(1, begin_payload())]);
    let err = err_of(&bytes);
    assert!(matches!(
        err,
        TransferError::Closed {
            message: 1,
            offset: 14,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "the transfer stream ends after 14 bytes, before message 1: the primary closed the connection without its cut"
    );
}

#[test]
fn a_corrupted_message_fails_its_crc_and_names_it() {
    let (mut bytes, _) = sample();
    // Inside the first pages message (message 1, at offset 14).
    bytes[100] ^= 0x40;
    let err = err_of(&bytes);
    assert!(
        matches!(
            err,
            TransferError::Crc {
                message: 1,
                offset: 14,
                kind: "pages",
                ..
            }
        ),
        "{err}"
    );
    let (got, _) = read_bytes(&bytes);
    // No page of the bad message was handed out.
    assert_eq!(got.len(), 1);
}

#[test]
fn a_dropped_or_repeated_message_fails_its_crc() {
    let begin = message(0, 1, &begin_payload());
    let round = message(1, 3, &[0x01, 0x00]);
    let err = err_of(&[begin.clone(), begin.clone()].concat());
    assert!(
        matches!(err, TransferError::Crc { message: 1, .. }),
        "{err}"
    );
    let err = err_of(&[begin, message(2, 3, &[0x01, 0x00])].concat());
    assert!(
        matches!(err, TransferError::Crc { message: 1, .. }),
        "{err}"
    );
    let err = err_of(&round);
    assert!(
        matches!(err, TransferError::Crc { message: 0, .. }),
        "{err}"
    );
}

#[test]
fn unknown_tags_are_refused() {
    for tag in [0u8, 6, 7, 8, 0xff] {
        let err = err_of(&message(0, tag, &[]));
        assert!(
            matches!(err, TransferError::UnknownTag { message: 0, offset: 0, tag: t, .. } if t == tag),
            "{err}"
        );
    }
    // A transfer tag where the verdict belongs.
    let err = read_verdict(&message(0, 1, &begin_payload())[..]).expect_err("not a verdict");
    assert!(
        matches!(err, TransferError::UnknownTag { tag: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_page_outside_the_guest_is_refused() {
    let bytes = stream(&[(1, begin_payload()), (2, record(70000, 0, None, &[]))]);
    let err = err_of(&bytes);
    assert!(
        matches!(
            err,
            TransferError::PageOutOfRange {
                message: 1,
                index: 70000,
                pages: PAGES,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "message 1 at offset 14: page 70000 is outside the guest's 16384 pages"
    );
    let mut w = TransferWriter::new(Vec::new());
    w.begin(MEM, PAGE).expect("begin");
    let err = w.page(PAGES, &page(0, 0)).expect_err("out of range");
    assert!(matches!(err, TransferError::PageOutOfRange { .. }), "{err}");
}

#[test]
fn a_page_of_the_wrong_length_is_refused() {
    let bytes = stream(&[
        (1, begin_payload()),
        (2, record(3, 1, Some(100), &[7u8; 100])),
    ]);
    let err = err_of(&bytes);
    assert!(
        matches!(
            err,
            TransferError::PageLength {
                index: 3,
                len: 100,
                page_size: PAGE,
                ..
            }
        ),
        "{err}"
    );
    // A length that says a page but bytes that are not there.
    let bytes = stream(&[
        (1, begin_payload()),
        (2, record(3, 1, Some(4096), &[7u8; 100])),
    ]);
    assert!(matches!(err_of(&bytes), TransferError::Decode { .. }));
    // A page kind that is neither zero nor bytes.
    let bytes = stream(&[(1, begin_payload()), (2, record(3, 9, None, &[]))]);
    assert!(matches!(err_of(&bytes), TransferError::Decode { .. }));

    let mut w = TransferWriter::new(Vec::new());
    w.begin(MEM, PAGE).expect("begin");
    let err = w.page(1, &[0u8; 100]).expect_err("short page");
    assert!(
        matches!(err, TransferError::PageLength { len: 100, .. }),
        "{err}"
    );
    // Refused calls leave the writer usable.
    w.page(1, &page(1, 0)).expect("page");
}

#[test]
fn messages_out_of_order_are_refused() {
    let pages = record(1, 0, None, &[]);
    let round1 = vec![0x01, 0x01];
    let cases: Vec<(&str, Vec<Message>)> = vec![
        ("a page before the begin", vec![(2, pages.clone())]),
        ("a round end before the begin", vec![(3, vec![0x01, 0x00])]),
        ("a cut before the begin", vec![(4, vec![0; 30])]),
        (
            "a second begin",
            vec![(1, begin_payload()), (1, begin_payload())],
        ),
        (
            "round 2 first",
            vec![(1, begin_payload()), (3, vec![0x02, 0x00])],
        ),
        (
            "round 1 twice",
            vec![
                (1, begin_payload()),
                (2, pages.clone()),
                (3, round1.clone()),
                (3, vec![0x01, 0x00]),
            ],
        ),
    ];
    for (what, messages) in cases {
        let err = err_of(&stream(&messages));
        assert!(
            matches!(err, TransferError::OutOfOrder { .. }),
            "{what}: {err}"
        );
    }

    let mut w = TransferWriter::new(Vec::new());
    assert!(matches!(
        w.page(0, &page(0, 0)),
        Err(TransferError::OutOfOrder { .. })
    ));
    assert!(matches!(
        w.end_round(),
        Err(TransferError::OutOfOrder { .. })
    ));
    w.begin(MEM, PAGE).expect("begin");
    assert!(matches!(
        w.begin(MEM, PAGE),
        Err(TransferError::OutOfOrder { .. })
    ));
    w.cut(&crate::support::cut()).expect("cut");
    for result in [w.page(0, &page(0, 0)), w.flush(), w.abort("late")] {
        assert!(matches!(result, Err(TransferError::Over(_))), "{result:?}");
    }
}

#[test]
fn a_round_that_miscounts_its_pages_is_refused() {
    let bytes = stream(&[
        (1, begin_payload()),
        (2, record(1, 0, None, &[])),
        (3, vec![0x01, 0x02]),
    ]);
    let err = err_of(&bytes);
    assert!(
        matches!(err, TransferError::Invalid { message: 2, .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("round 1 says it sent 2 pages, 1 arrived"));
}

#[test]
fn a_memory_size_other_than_this_ends_is_refused() {
    let (bytes, _) = sample();
    let (got, err) = crate::support::read_all(&mut TransferReader::new(&bytes[..], MEM / 2));
    assert!(got.is_empty());
    let err = err.expect("an error");
    assert!(
        matches!(err, TransferError::MemSize { primary: MEM, backup } if backup == MEM / 2),
        "{err}"
    );
}

#[test]
fn a_bad_page_size_or_memory_size_is_refused() {
    for (mem, page_size) in [
        (MEM, 4095),
        (MEM, 256),
        (MEM, 1 << 17),
        (4096 * 3 + 1, 4096),
        (0, 4096),
    ] {
        let mut p = varint(mem);
        p.extend(varint(u64::from(page_size)));
        let err = err_of(&stream(&[(1, p)]));
        // The memory size is compared first.
        assert!(
            matches!(
                err,
                TransferError::Invalid { .. } | TransferError::MemSize { .. }
            ),
            "{mem} {page_size}: {err}"
        );
        let mut w = TransferWriter::new(Vec::new());
        assert!(matches!(
            w.begin(mem, page_size),
            Err(TransferError::Invalid { .. })
        ));
    }
    let mut p = varint(MEM);
    p.extend(varint(4095));
    assert!(matches!(
        err_of(&stream(&[(1, p)])),
        TransferError::Invalid { .. }
    ));
}

#[test]
fn a_length_over_the_bound_is_refused_before_reading_it() {
    // A pages message claiming 256 KiB + 1, and no payload at all.
    let mut bytes = message(0, 1, &begin_payload());
    bytes.push(2);
    let mut len = MAX_PAGES_PAYLOAD + 1;
    while len >= 0x80 {
        bytes.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    bytes.push(len as u8);
    let err = err_of(&bytes);
    assert!(
        matches!(
            err,
            TransferError::TooLong {
                message: 1,
                kind: "pages",
                ..
            }
        ),
        "{err}"
    );
    // A begin claiming 2^63 bytes, and a length field that never ends.
    let mut bytes = vec![1u8];
    bytes.extend_from_slice(&[0xff; 8]);
    bytes.push(0x7f);
    assert!(matches!(err_of(&bytes), TransferError::TooLong { .. }));
    let bytes = [&[1u8][..], &[0x80; 20]].concat();
    assert!(matches!(
        err_of(&bytes),
        TransferError::TooLong { len: u64::MAX, .. }
    ));
    // A machine blob over the bound is refused by the writer.
    let mut w = TransferWriter::new(Vec::new());
    w.begin(MEM, PAGE).expect("begin");
    let mut cut = crate::support::cut();
    cut.machine = vec![0; logchannel::MAX_MACHINE + 1];
    assert!(matches!(w.cut(&cut), Err(TransferError::TooLong { .. })));
}

#[test]
fn payloads_that_do_not_decode_are_refused() {
    let cases = [
        (1u8, vec![0xfc, 0x00]),                     // a begin cut short
        (1, [begin_payload(), vec![0x00]].concat()), // a byte left over
        (3, vec![]),                                 // an empty round end
        (2, vec![]),                                 // pages without pages
    ];
    for (tag, payload) in cases {
        let messages = if tag == 1 {
            vec![(tag, payload)]
        } else {
            vec![(1, begin_payload()), (tag, payload)]
        };
        let err = err_of(&stream(&messages));
        assert!(
            matches!(
                err,
                TransferError::Decode { .. } | TransferError::Invalid { .. }
            ),
            "{err}"
        );
    }
    // A cut with next_seq 0.
    let mut c = vec![0x00, 0x01, 0x02, 0x00];
    c.extend_from_slice(&[0u8; 18]);
    c.extend_from_slice(&[0x00, 0x00]);
    let err = err_of(&stream(&[(1, begin_payload()), (4, c)]));
    assert!(matches!(err, TransferError::Invalid { .. }), "{err}");
}

#[test]
fn after_an_error_the_reader_reads_nothing_more() {
    let bytes = [message(0, 2, &[]), message(0, 1, &begin_payload())].concat();
    let mut r = TransferReader::new(&bytes[..], MEM);
    assert!(matches!(r.next(), Err(TransferError::OutOfOrder { .. })));
    assert!(matches!(r.next(), Err(TransferError::Over(_))));
    assert_eq!(r.bytes_read(), 6);
}

#[test]
fn the_reader_stops_at_an_abort() {
    let bytes = stream(&[(5, vec![0x02, b'n', b'o']), (1, begin_payload())]);
    let mut r = TransferReader::new(&bytes[..], MEM);
    let (got, err) = crate::support::read_all(&mut r);
    assert_eq!(got, vec![Got::Abort("no".to_string())]);
    assert!(err.is_none());
    assert!(matches!(r.next(), Err(TransferError::Over(_))));
}
