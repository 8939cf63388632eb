//! The format in memory: what is written reads back, laid out as README.md
//! says.

use crate::support::{
    begin_payload, cut, message, page, read_all, read_bytes, sample, varint, Got, MEM, PAGE,
};
use logchannel::{
    read_verdict, write_verdict, Registers, TransferError, TransferReader, TransferWriter, Verdict,
    MAX_PAGES_PAYLOAD,
};
use std::io::Cursor;

#[test]
fn a_transfer_reads_back_as_written() {
    let (bytes, want) = sample();
    let mut r = TransferReader::new(&bytes[..], MEM);
    let (got, err) = read_all(&mut r);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, want);
    assert_eq!(r.bytes_read(), bytes.len() as u64);
    assert_eq!(r.pages_read(), 208);
    assert_eq!(r.geometry(), Some((PAGE, 16384)));
    assert!(matches!(r.next(), Err(TransferError::Over(_))));
}

#[test]
fn the_writer_counts_and_bounds_its_messages() {
    let mut w = TransferWriter::new(Vec::new());
    crate::support::write_sample(&mut w);
    assert_eq!(w.pages_written(), 208);
    assert_eq!(w.rounds(), 2);
    let bytes = w.bytes_written();
    let out = w.into_inner();
    assert_eq!(bytes, out.len() as u64);
    // 208 pages, 31 of them zero: the zero pages cost a few bytes each.
    let data_pages = 208 - 31;
    assert!(
        out.len() < data_pages * PAGE as usize + 4096,
        "{}",
        out.len()
    );
    assert!(out.len() > data_pages * PAGE as usize);

    // Walk the messages: no pages message is over the bound, and 200
    // pages took more than one.
    let (mut pos, mut pages_messages) = (0, 0);
    while pos < out.len() {
        let tag = out[pos];
        let (mut len, mut shift, mut n) = (0usize, 0, 1);
        loop {
            let b = out[pos + n];
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            n += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if tag == 2 {
            pages_messages += 1;
            assert!(len <= MAX_PAGES_PAYLOAD, "{len}");
        }
        pos += n + len + 4;
    }
    assert_eq!(pos, out.len());
    assert!(pages_messages >= 4, "{pages_messages}");
}

#[test]
fn the_reader_reads_nothing_past_the_cut() {
    let (mut bytes, _) = sample();
    let end = bytes.len() as u64;
    bytes.extend_from_slice(b"the log channel follows");
    let mut input = Cursor::new(bytes);
    let mut r = TransferReader::new(&mut input, MEM);
    let (_, err) = read_all(&mut r);
    assert!(err.is_none(), "{err:?}");
    drop(r);
    assert_eq!(input.position(), end);
}

#[test]
fn an_abort_reads_back_and_ends_the_transfer() {
    let mut w = TransferWriter::new(Vec::new());
    w.begin(MEM, PAGE).expect("begin");
    w.page(1, &page(1, 0)).expect("page");
    w.abort("the backup's view is stale").expect("abort");
    assert!(matches!(
        w.page(2, &page(2, 0)),
        Err(TransferError::Over(_))
    ));
    let (got, err) = read_bytes(&w.into_inner());
    assert!(err.is_none(), "{err:?}");
    // The queued page was dropped with the abort.
    assert_eq!(
        got,
        vec![
            Got::Begin {
                mem_size: MEM,
                page_size: PAGE
            },
            Got::Abort("the backup's view is stale".to_string())
        ]
    );

    // An abort may come before the begin, and a long reason is cut.
    let mut w = TransferWriter::new(Vec::new());
    w.abort(&"é".repeat(5000)).expect("abort");
    let (got, err) = read_bytes(&w.into_inner());
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, vec![Got::Abort("é".repeat(2048))]);
}

#[test]
fn verdicts_read_back() {
    for v in [
        Verdict::Restored { mem_hash: 7 },
        Verdict::Restored { mem_hash: u64::MAX },
        Verdict::Refused {
            reason: "memory hash mismatch: cut 0x1, restored 0x2".to_string(),
        },
    ] {
        let mut out = Vec::new();
        write_verdict(&mut out, &v).expect("write");
        assert_eq!(read_verdict(&out[..]).expect("read"), v);
    }
}

#[test]
fn the_transfer_is_laid_out_as_documented() {
    let mut w = TransferWriter::new(Vec::new());
    w.begin(MEM, PAGE).expect("begin");
    let mut p5 = vec![0u8; PAGE as usize];
    p5[0] = 0xab;
    w.page(5, &p5).expect("page 5");
    w.page(300, &[0u8; 4096]).expect("page 300");
    assert_eq!(w.end_round().expect("round"), 1);
    w.cut(&logchannel::Cut {
        exits: 1234,
        rip: 0x10203f,
        next_seq: 7,
        regs: Registers::default(),
        mem_hash: 0x99,
        machine: vec![0xee, 0xff],
    })
    .expect("cut");
    let out = w.into_inner();

    let mut want = Vec::new();
    // 01 08 | fc 00 00 00 04 fb 00 10 | crc (message 0)
    want.extend(message(0, 0x01, &begin_payload()));
    // 02 | 89 20 (4105) | 05 01 fb 00 10 ab 00 … | fb 2c 01 00 | crc (message 1)
    let mut pages = vec![0x05, 0x01, 0xfb, 0x00, 0x10];
    pages.extend_from_slice(&p5);
    pages.extend_from_slice(&[0xfb, 0x2c, 0x01, 0x00]);
    want.extend(message(1, 0x02, &pages));
    // 03 02 | 01 02 | crc (message 2)
    want.extend(message(2, 0x03, &[0x01, 0x02]));
    let mut c = vec![0x00, 0xfb, 0xd2, 0x04, 0xfc, 0x3f, 0x20, 0x10, 0x00, 0x07];
    c.extend_from_slice(&[0u8; 18]);
    c.extend_from_slice(&[0x99, 0x02, 0xee, 0xff]);
    want.extend(message(3, 0x04, &c));
    assert_eq!(out, want);
    assert_eq!(&out[..2], &[0x01, 0x08]);
    assert_eq!(&out[14..17], &[0x02, 0x89, 0x20]);
    assert_eq!(&out[4134..4136], &[0x04, 0x20]);

    let mut verdict = Vec::new();
    write_verdict(&mut verdict, &Verdict::Restored { mem_hash: 0x99 }).expect("verdict");
    assert_eq!(verdict, message(0, 0x06, &[0x99]));
    let mut refused = Vec::new();
    write_verdict(
        &mut refused,
        &Verdict::Refused {
            reason: "no".to_string(),
        },
    )
    .expect("verdict");
    assert_eq!(refused, message(0, 0x07, &[0x02, b'n', b'o']));
    assert_eq!(varint(300), vec![0xfb, 0x2c, 0x01]);
}

#[test]
fn the_cut_keeps_every_field() {
    let (bytes, _) = sample();
    let (got, _) = read_bytes(&bytes);
    assert_eq!(got.last(), Some(&Got::Cut(cut())));
}
