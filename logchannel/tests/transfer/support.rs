//! A small transfer to read and write, messages built by hand from the
//! README's layout, and reading a whole stream into owned items.

use logchannel::{
    Cut, PageData, Registers, TransferError, TransferItem, TransferReader, TransferWriter,
};
use std::io::Read;

/// Guest memory of the transfers here: 64 MiB, as the channel tests' hello.
pub const MEM: u64 = 64 << 20;
pub const PAGE: u32 = 4096;
/// `MEM / PAGE`.
pub const PAGES: u64 = 16384;

/// An item with its page copied out of the reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Got {
    Begin { mem_size: u64, page_size: u32 },
    Page { index: u64, data: Option<Vec<u8>> },
    RoundEnd { round: u32, pages: u64 },
    Cut(Cut),
    Abort(String),
}

/// A page whose bytes say which page and which version it is.
pub fn page(index: u64, version: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| (index as u8) ^ version ^ (i as u8).wrapping_mul(31))
        .collect()
}

pub fn cut() -> Cut {
    Cut {
        exits: 123_456,
        rip: 0x10_2030,
        next_seq: 42,
        regs: Registers::from_array(std::array::from_fn(|i| 0x1000 + i as u64)),
        mem_hash: 0xdead_beef_cafe_f00d,
        machine: b"vcpu and devices".to_vec(),
    }
}

/// Two pre-copy rounds and a cut: pages 0 to 199 (every seventh a zero
/// page), then 5 of them again, then 3 at the cut. 200 pages are more than
/// one message holds.
pub fn write_sample<W: std::io::Write>(w: &mut TransferWriter<W>) -> Vec<Got> {
    let mut want = vec![Got::Begin {
        mem_size: MEM,
        page_size: PAGE,
    }];
    w.begin(MEM, PAGE).expect("begin");
    let mut send = |w: &mut TransferWriter<W>, index: u64, version: u8| {
        let bytes = if index.is_multiple_of(7) {
            vec![0u8; PAGE as usize]
        } else {
            page(index, version)
        };
        w.page(index, &bytes).expect("page");
        want.push(Got::Page {
            index,
            data: (!index.is_multiple_of(7)).then_some(bytes),
        });
    };
    for i in 0..200 {
        send(w, i, 0);
    }
    let round = w.end_round().expect("round 1");
    for i in [3, 14, 100, 101, 16383] {
        send(w, i, 1);
    }
    let round2 = w.end_round().expect("round 2");
    for i in [3, 5, 7] {
        send(w, i, 2);
    }
    w.cut(&cut()).expect("cut");
    // The rounds' ends go in their places.
    want.insert(201, Got::RoundEnd { round, pages: 200 });
    want.insert(
        207,
        Got::RoundEnd {
            round: round2,
            pages: 5,
        },
    );
    want.push(Got::Cut(cut()));
    want
}

/// A transfer small enough to cut at every byte: two rounds and a cut,
/// four data pages and two zero pages.
pub fn small() -> Vec<u8> {
    let mut w = TransferWriter::new(Vec::new());
    w.begin(MEM, PAGE).expect("begin");
    w.page(0, &[0; PAGE as usize]).expect("page");
    w.page(1, &page(1, 0)).expect("page");
    w.page(2, &page(2, 0)).expect("page");
    w.end_round().expect("round");
    w.page(1, &page(1, 1)).expect("page");
    w.page(9, &[0; PAGE as usize]).expect("page");
    w.end_round().expect("round");
    w.page(3, &page(3, 0)).expect("page");
    w.cut(&cut()).expect("cut");
    w.into_inner()
}

pub fn sample() -> (Vec<u8>, Vec<Got>) {
    let mut w = TransferWriter::new(Vec::new());
    let want = write_sample(&mut w);
    (w.into_inner(), want)
}

/// Reads items up to the cut, an abort or the first error.
pub fn read_all<R: Read>(r: &mut TransferReader<R>) -> (Vec<Got>, Option<TransferError>) {
    let mut got = Vec::new();
    loop {
        let item = match r.next() {
            Ok(item) => item,
            Err(e) => return (got, Some(e)),
        };
        let (owned, last) = match item {
            TransferItem::Begin {
                mem_size,
                page_size,
            } => (
                Got::Begin {
                    mem_size,
                    page_size,
                },
                false,
            ),
            TransferItem::Page { index, data } => (
                Got::Page {
                    index,
                    data: match data {
                        PageData::Zero => None,
                        PageData::Bytes(b) => Some(b.to_vec()),
                    },
                },
                false,
            ),
            TransferItem::RoundEnd { round, pages } => (Got::RoundEnd { round, pages }, false),
            TransferItem::Cut(cut) => (Got::Cut(cut), true),
            TransferItem::Abort { reason } => (Got::Abort(reason), true),
        };
        got.push(owned);
        if last {
            return (got, None);
        }
    }
}

pub fn read_bytes(bytes: &[u8]) -> (Vec<Got>, Option<TransferError>) {
    read_all(&mut TransferReader::new(bytes, MEM))
}

/// One message as README.md lays it out: tag, LEB128 length, payload,
/// CRC-32 over them and the message number as 8 bytes little endian.
pub fn message(number: u64, tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let mut len = payload.len();
    loop {
        let low = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(low);
            break;
        }
        out.push(low | 0x80);
    }
    out.extend_from_slice(payload);
    let mut h = crc32fast::Hasher::new();
    h.update(&out);
    h.update(&number.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out
}

/// The begin of a 64 MiB guest with 4 KiB pages: `fc 00 00 00 04`, `fb 00 10`.
pub fn begin_payload() -> Vec<u8> {
    vec![0xfc, 0x00, 0x00, 0x00, 0x04, 0xfb, 0x00, 0x10]
}

/// A bincode varint.
pub fn varint(v: u64) -> Vec<u8> {
    match v {
        0..=250 => vec![v as u8],
        251..=0xffff => [&[0xfb][..], &(v as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[0xfc][..], &(v as u32).to_le_bytes()].concat(),
        _ => [&[0xfd][..], &v.to_le_bytes()].concat(),
    }
}
