//! How big entries are, and the encoding decisions that make them so.

use crate::support::{every_kind, realistic_mix, write_log};
use logchannel::{
    Entry, Event, EventKind, FrameEncoder, LogError, LogHeader, LogReader, LogStats, LogWriter,
    Position, ReplayConfig,
};

fn stats_of(entries: &[Entry]) -> LogStats {
    let (bytes, _) = write_log(entries);
    let mut reader = LogReader::new(&bytes[..]).expect("header");
    // The mixes are cut-off recordings, without End entries.
    for item in reader.by_ref() {
        if let Err(e) = item {
            assert!(matches!(e, LogError::MissingEnd { .. }), "{e}");
        }
    }
    reader.stats().clone()
}

/// The figure the brief sets: entries other than packets and digests average
/// at most 16 bytes with their frame. Printed with `--nocapture`.
#[test]
fn realistic_mix_averages_at_most_16_bytes_per_entry() {
    let stats = stats_of(&realistic_mix(10_000, false));
    println!("realistic mix (rdtsc, interrupt, progress), bytes per entry with frame:\n{stats}");
    let small = stats.excluding(&[EventKind::Packet, EventKind::Digest]);
    println!(
        "average: {:.2} bytes over {} entries",
        small.average(),
        small.entries
    );
    assert!(small.average() <= 16.0, "{:.2} bytes", small.average());
    assert!(stats.by_kind[&EventKind::Interrupt].average() <= 12.0);
    assert!(stats.by_kind[&EventKind::Progress].average() <= 12.0);
    assert!(stats.by_kind[&EventKind::Rdtsc].average() <= 16.0);

    let stats = stats_of(&realistic_mix(10_000, true));
    println!("with an rdrand nonce per request:\n{stats}");
    let small = stats.excluding(&[EventKind::Packet, EventKind::Digest]);
    println!(
        "average: {:.2} bytes over {} entries",
        small.average(),
        small.entries
    );
    assert!(small.average() <= 16.0, "{:.2} bytes", small.average());
}

#[test]
fn print_one_entry_of_every_kind() {
    let stats = stats_of(&every_kind());
    println!("one entry of each kind:\n{stats}");
    assert_eq!(stats.entries(), 11);
}

fn frame_of(encoder: &mut FrameEncoder, entry: &Entry) -> Vec<u8> {
    let mut out = Vec::new();
    encoder.encode_entry(entry, &mut out).expect("encode");
    out
}

/// The sequence number is not transmitted: the same entry encodes to the
/// same length and payload at any sequence number, and only the CRC, which
/// covers it, differs.
#[test]
fn the_sequence_number_is_implicit() {
    let at = |seq| Entry {
        seq,
        pos: Position {
            exits: 1234,
            rip: 0x10_203f,
        },
        event: Event::Rdtsc { value: 0x1a2b_3c4d },
    };
    let a = frame_of(&mut FrameEncoder::new(1), &at(1));
    let b = frame_of(&mut FrameEncoder::new(1_000_000_007), &at(1_000_000_007));
    assert_eq!(a.len(), b.len());
    assert_eq!(a[0], b[0], "same length");
    assert_ne!(a[1..5], b[1..5], "the CRC covers the sequence number");
    assert_eq!(a[5..], b[5..], "same payload");
}

/// Pins the byte layout the README describes, so that a reader written
/// from the README agrees with this one.
#[test]
fn frames_are_laid_out_as_documented() {
    let mut encoder = FrameEncoder::new(1);
    let first = Entry {
        seq: 1,
        pos: Position {
            exits: 1234,
            rip: 0x10_203f,
        },
        event: Event::Rdtsc { value: 0x1a2b_3c4d },
    };
    let frame = frame_of(&mut encoder, &first);
    // exits 1234 (0xfb + u16), RIP 0x10203f zigzagged (0xfc + u32), tag 0,
    // TSC 0x1a2b3c4d zigzagged (0xfc + u32).
    let payload = [
        0xfb, 0xd2, 0x04, //
        0xfc, 0x7e, 0x40, 0x20, 0x00, //
        0x00, //
        0xfc, 0x9a, 0x78, 0x56, 0x34,
    ];
    assert_eq!(frame[0] as usize, payload.len());
    assert_eq!(frame[5..], payload);
    assert_eq!(frame[1..5], crc(&frame[..1], &payload, 1).to_le_bytes());

    // The next entry is a delta: 3 exits later, same RIP, interrupt 0x20.
    let second = Entry {
        seq: 2,
        pos: Position {
            exits: 1237,
            rip: 0x10_203f,
        },
        event: Event::Interrupt { vector: 0x20 },
    };
    let frame = frame_of(&mut encoder, &second);
    let payload = [3, 0, 6, 0x20];
    let mut expected = vec![4];
    expected.extend_from_slice(&crc(&[4], &payload, 2).to_le_bytes());
    expected.extend_from_slice(&payload);
    assert_eq!(frame, expected, "9 bytes in all");

    // An rdtsc 40 000 cycles after the previous one, 2 exits on, 0x40 bytes
    // further in the code: 13 bytes.
    let third = Entry {
        seq: 3,
        pos: Position {
            exits: 1239,
            rip: 0x10_207f,
        },
        event: Event::Rdtsc {
            value: 0x1a2b_3c4d + 40_000,
        },
    };
    let frame = frame_of(&mut encoder, &third);
    assert_eq!(frame[5..], [2, 0x80, 0, 0xfc, 0x80, 0x38, 0x01, 0x00]);

    // An async point at the same exit, 0x20 bytes back: tag 12 and its two
    // hashes as 8 bytes each, little endian.
    let fourth = Entry {
        seq: 4,
        pos: Position {
            exits: 1239,
            rip: 0x10_205f,
        },
        event: Event::AsyncPoint {
            regs: 0x0102_0304_0506_0708,
            mem: 0x1112_1314_1516_1718,
        },
    };
    let frame = frame_of(&mut encoder, &fourth);
    let payload = [
        0, 0x3f, 12, //
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, //
        0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11,
    ];
    assert_eq!(frame[0] as usize, payload.len());
    assert_eq!(frame[5..], payload, "24 bytes in all");
}

/// CRC-32 as the README specifies it, written independently of the crate.
fn crc(len: &[u8], payload: &[u8], seq: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.update(&seq.to_le_bytes());
    h.finalize()
}

#[test]
fn display_is_one_readable_line() {
    let lines: Vec<String> = every_kind().iter().map(ToString::to_string).collect();
    for l in &lines {
        println!("{l}");
        assert!(!l.contains('\n'));
    }
    assert_eq!(lines[0], "#1 @exit 1000 rip 0x102000  rdtsc 0x1a2b3c4d");
    assert_eq!(
        lines[3],
        "#4 @exit 1120 rip 0x102030  rdseed 0x0 (failed, CF=0)"
    );
    assert_eq!(
        lines[6],
        "#7 @exit 1240 rip 0x102060  interrupt vector 0x20"
    );
    assert_eq!(
        lines[7],
        "#8 @exit 1280 rip 0x102070  packet desc 3 len 300"
    );
    assert_eq!(
        lines[10],
        "#11 @exit 1400 rip 0x1020a0  end at exit 1400: guest halted"
    );
}

/// Pins the file preamble and header frame the README describes.
#[test]
fn the_file_header_is_laid_out_as_documented() {
    let header = LogHeader::new(
        "vm",
        [0xaa; 32],
        64 << 20,
        ReplayConfig {
            digest_interval: 10_000,
            tick_hz: 100,
            patching: true,
            extra: [("k".to_string(), "v".to_string())].into(),
        },
    );
    let bytes = LogWriter::new(Vec::new(), &header)
        .and_then(|w| w.into_inner())
        .expect("header");
    assert_eq!(bytes[..8], *b"FTVMLOG\0");
    assert_eq!(bytes[8..12], [1, 0, 0, 0]);
    let mut payload = vec![2, b'v', b'm'];
    payload.extend_from_slice(&[0xaa; 32]);
    payload.extend_from_slice(&[0xfc, 0, 0, 0, 4]); // 64 MiB
    payload.extend_from_slice(&[0xfb, 0x10, 0x27]); // 10 000
    payload.extend_from_slice(&[100, 1]); // 100 Hz, patching
    payload.extend_from_slice(&[1, 1, b'k', 1, b'v']); // one extra setting
    assert_eq!(bytes[12] as usize, payload.len());
    assert_eq!(
        bytes[13..17],
        crc(&bytes[12..13], &payload, 0).to_le_bytes()
    );
    assert_eq!(bytes[17..], payload);
}
