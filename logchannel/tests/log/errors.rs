//! Every way a log can be wrong, and the error that names where.

use crate::support::{every_kind, header, write_log};
use logchannel::{
    encode_frame, EncodeError, Entry, Event, FrameError, LogError, LogReader, LogWriter, Position,
    FORMAT_VERSION, MAX_PAYLOAD, PREAMBLE_LEN,
};
use std::io::{self, Read, Write};

/// Reads a whole log: the entries before the first error, and the error.
fn read_all(bytes: &[u8]) -> (Vec<Entry>, Option<LogError>) {
    let reader = match LogReader::new(bytes) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut entries = Vec::new();
    for item in reader {
        match item {
            Ok(e) => entries.push(e),
            Err(e) => return (entries, Some(e)),
        }
    }
    (entries, None)
}

#[test]
fn a_whole_log_reads_back_cleanly() {
    let entries = every_kind();
    let (bytes, _) = write_log(&entries);
    let mut reader = LogReader::new(&bytes[..]).expect("header");
    assert_eq!(reader.header(), &header());
    let read: Vec<Entry> = reader.by_ref().collect::<Result<_, _>>().expect("entries");
    assert_eq!(read, entries);
    assert!(reader.ended());
    assert_eq!(reader.stats().entries(), entries.len() as u64);
    assert_eq!(reader.stats().total_bytes, bytes.len() as u64);
}

#[test]
fn a_log_file_on_disk_syncs_and_reads_back() {
    let path = std::env::temp_dir().join(format!("logchannel-test-{}.log", std::process::id()));
    let entries = every_kind();
    let file = std::fs::File::create(&path).expect("create");
    let mut w = LogWriter::new(io::BufWriter::new(file), &header()).expect("header");
    for e in &entries[..5] {
        w.append_entry(e).expect("append");
    }
    w.sync().expect("sync");
    // What was synced is readable, and is a log cut short.
    let (good, err) = read_all(&std::fs::read(&path).expect("read"));
    assert_eq!(good, entries[..5]);
    assert!(matches!(
        err,
        Some(LogError::MissingEnd { last_seq: 5, .. })
    ));
    for e in &entries[5..] {
        w.append_entry(e).expect("append");
    }
    w.into_inner().expect("flush");
    let reader = LogReader::new(io::BufReader::new(
        std::fs::File::open(&path).expect("open"),
    ))
    .expect("header");
    let read: Vec<Entry> = reader.collect::<Result<_, _>>().expect("entries");
    assert_eq!(read, entries);
    std::fs::remove_file(&path).expect("remove");
}

#[test]
fn wrong_magic_shows_the_bytes_found() {
    let (e, err) = read_all(b"\x7fELF\x02\x01\x01\0rest of an ELF file");
    assert!(e.is_empty());
    let err = err.expect("error");
    assert!(matches!(&err, LogError::BadMagic { found } if found == b"\x7fELF\x02\x01\x01\0"));
    assert_eq!(
        err.to_string(),
        r#"not an ftvm log: the first bytes are b"\x7fELF\x02\x01\x01\x00" where "FTVMLOG\0" was expected"#
    );

    // A JSON dump handed to the binary reader.
    let (_, err) = read_all(br#"{"format_version":1}"#);
    assert!(matches!(err, Some(LogError::BadMagic { found }) if found == br#"{"format"#));

    // Short and wrong is still wrong, not truncated.
    let (_, err) = read_all(b"FTX");
    assert!(matches!(err, Some(LogError::BadMagic { found }) if found == b"FTX"));
}

#[test]
fn future_version_is_refused_before_its_frames_are_parsed() {
    let (mut bytes, _) = write_log(&every_kind());
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    // Whatever a version 2 would have after the version, this build must
    // not try to read it.
    bytes.truncate(PREAMBLE_LEN + 1);
    let (_, err) = read_all(&bytes);
    let err = err.expect("error");
    assert!(matches!(
        err,
        LogError::UnsupportedVersion {
            found: 2,
            supported: FORMAT_VERSION
        }
    ));
    assert_eq!(
        err.to_string(),
        "unsupported log format version 2 (this build reads 1)"
    );
}

#[test]
fn a_flipped_byte_is_a_crc_error_at_its_frame() {
    let entries = every_kind();
    let (bytes, starts) = write_log(&entries);
    for pos in PREAMBLE_LEN..bytes.len() {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x04;
        let (good, err) = read_all(&bad);
        let err = err.unwrap_or_else(|| panic!("flip at {pos} went unnoticed"));
        // Frame 0 is the header, frame n is entry n.
        let frame = starts.iter().rposition(|&s| s <= pos).map_or(0, |i| i + 1);
        let start = if frame == 0 {
            PREAMBLE_LEN
        } else {
            starts[frame - 1]
        };
        assert_eq!(good, entries[..frame.saturating_sub(1)], "flip at {pos}");
        let LogError::Frame(fe) = &err else {
            panic!("flip at {pos}: {err}");
        };
        let (f, o) = frame_and_offset(fe);
        assert_eq!((f, o), (frame as u64, start as u64), "flip at {pos}: {err}");
        // Past the length byte(s) the frame still has its size, so nothing
        // but the CRC can notice.
        let len_bytes = if frame == 8 { 2 } else { 1 };
        if pos >= start + len_bytes {
            assert!(matches!(fe, FrameError::Crc { .. }), "flip at {pos}: {err}");
        }
        assert!(
            err.to_string().contains(&format!("offset {start}")),
            "{err}"
        );
    }
}

#[test]
fn a_crc_error_reports_both_checksums() {
    let (mut bytes, starts) = write_log(&every_kind());
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let (_, err) = read_all(&bytes);
    let Some(LogError::Frame(FrameError::Crc {
        frame,
        offset,
        seq,
        stored,
        computed,
    })) = err
    else {
        panic!("{err:?}");
    };
    assert_eq!((frame, offset, seq), (11, starts[10] as u64, 11));
    assert_ne!(stored, computed);
}

fn frame_and_offset(e: &FrameError) -> (u64, u64) {
    match *e {
        FrameError::Crc { frame, offset, .. }
        | FrameError::SequenceGap { frame, offset, .. }
        | FrameError::TooLong { frame, offset, .. }
        | FrameError::Truncated { frame, offset, .. }
        | FrameError::Decode { frame, offset, .. }
        | FrameError::Io { frame, offset, .. } => (frame, offset),
    }
}

#[test]
fn a_log_cut_anywhere_is_truncated_or_missing_its_end() {
    let entries = every_kind();
    let (bytes, starts) = write_log(&entries);
    let header_end = starts[0];
    for cut in 0..bytes.len() {
        let (good, err) = read_all(&bytes[..cut]);
        let err = err.unwrap_or_else(|| panic!("cut at {cut} read as a whole log"));
        match err {
            LogError::Truncated {
                part: "magic",
                offset: 0,
                need: 8,
                have,
            } => assert_eq!(have as usize, cut),
            LogError::Truncated {
                part: "format version",
                offset: 8,
                need: 4,
                have,
            } => assert_eq!(have as usize + 8, cut),
            LogError::Truncated {
                part: "header frame",
                offset: 12,
                ..
            } => assert_eq!(cut, PREAMBLE_LEN),
            LogError::Frame(FrameError::Truncated {
                frame,
                offset,
                need,
                have,
            }) => {
                let frame = frame as usize;
                let start = if frame == 0 {
                    PREAMBLE_LEN
                } else {
                    starts[frame - 1]
                };
                let end = if frame == 0 {
                    header_end
                } else {
                    starts[frame]
                };
                assert_eq!(offset as usize, start, "cut at {cut}");
                assert_eq!(have as usize, cut - start, "cut at {cut}");
                assert!(cut < end, "cut at {cut}");
                // Once the length is read, `need` is the whole frame.
                if have >= 2 {
                    assert_eq!(need as usize, end - start, "cut at {cut}");
                } else {
                    assert!(need > have, "cut at {cut}");
                }
                assert_eq!(good.len(), frame.saturating_sub(1), "cut at {cut}");
            }
            LogError::MissingEnd { offset, last_seq } => {
                assert_eq!(offset as usize, cut);
                assert_eq!(starts[last_seq as usize], cut, "not at a frame boundary");
                assert_eq!(good, entries[..last_seq as usize]);
            }
            other => panic!("cut at {cut}: unexpected {other}"),
        }
    }
    assert!(read_all(&bytes).1.is_none());
}

#[test]
fn a_cut_inside_a_two_byte_length_needs_at_least_one_more() {
    let entries = every_kind();
    let (bytes, starts) = write_log(&entries);
    // Entry 8 is the 300-byte packet.
    let start = starts[7];
    assert!(
        bytes[start] & 0x80 != 0,
        "the packet's length takes two bytes"
    );
    let (_, err) = read_all(&bytes[..start + 1]);
    assert!(matches!(
        err,
        Some(LogError::Frame(FrameError::Truncated { frame: 8, offset, need: 2, have: 1 }))
            if offset == start as u64
    ));
    assert_eq!(
        read_all(&bytes[..start + 1]).1.expect("error").to_string(),
        format!("frame 8 at offset {start} is truncated (need 2 bytes, have 1)")
    );
}

#[test]
fn a_dropped_frame_is_a_sequence_gap() {
    let entries = every_kind();
    let (bytes, starts) = write_log(&entries);
    // Drop entry 4 (bytes starts[3]..starts[4]).
    let mut bad = bytes[..starts[3]].to_vec();
    bad.extend_from_slice(&bytes[starts[4]..]);
    let (good, err) = read_all(&bad);
    assert_eq!(good, entries[..3]);
    let err = err.expect("error");
    assert!(
        matches!(err, LogError::Frame(FrameError::SequenceGap { frame: 4, offset, expected: 4, found: 5 }) if offset == starts[3] as u64),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "frame 4 at offset {}: sequence gap (expected 4, found 5)",
            starts[3]
        )
    );
}

#[test]
fn a_duplicated_frame_is_a_sequence_gap() {
    let entries = every_kind();
    let (bytes, starts) = write_log(&entries);
    let mut bad = bytes[..starts[4]].to_vec();
    bad.extend_from_slice(&bytes[starts[3]..]);
    let (good, err) = read_all(&bad);
    assert_eq!(good, entries[..4]);
    assert!(matches!(
        err,
        Some(LogError::Frame(FrameError::SequenceGap { frame: 5, expected: 5, found: 4, offset }))
            if offset == starts[4] as u64
    ));
}

#[test]
fn swapped_frames_are_a_sequence_gap() {
    let entries = every_kind();
    let (bytes, starts) = write_log(&entries);
    let mut bad = bytes[..starts[1]].to_vec();
    bad.extend_from_slice(&bytes[starts[2]..starts[3]]);
    bad.extend_from_slice(&bytes[starts[1]..starts[2]]);
    bad.extend_from_slice(&bytes[starts[3]..]);
    let (_, err) = read_all(&bad);
    assert!(matches!(
        err,
        Some(LogError::Frame(FrameError::SequenceGap {
            frame: 2,
            expected: 2,
            found: 3,
            ..
        }))
    ));
}

#[test]
fn an_oversized_length_is_refused_before_allocating() {
    let (bytes, starts) = write_log(&every_kind()[..2]);
    // 2^21 in LEB128, then nothing: the reader must not wait for 2 MiB.
    let mut bad = bytes[..starts[1]].to_vec();
    bad.extend_from_slice(&[0x80, 0x80, 0x80, 0x01]);
    let (_, err) = read_all(&bad);
    let err = err.expect("error");
    assert!(
        matches!(err, LogError::Frame(FrameError::TooLong { frame: 2, offset, len, max })
            if offset == starts[1] as u64 && len == 1 << 21 && max == MAX_PAYLOAD),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "frame 2 at offset {}: length 2097152 is over the maximum 1048576",
            starts[1]
        )
    );

    // A length varint that never ends.
    let mut bad = bytes[..starts[1]].to_vec();
    bad.extend_from_slice(&[0xff; 16]);
    let (_, err) = read_all(&bad);
    assert!(matches!(
        err,
        Some(LogError::Frame(FrameError::TooLong { len: u64::MAX, .. }))
    ));
}

#[test]
fn a_payload_that_passes_its_crc_but_does_not_decode() {
    let entries = every_kind();
    let (bytes, starts) = write_log(&entries[..1]);
    // Exit delta 0, RIP delta 0, then an event tag no build knows.
    let mut bad = bytes.clone();
    encode_frame(2, &[0, 0, 99], &mut bad).expect("frame");
    let (good, err) = read_all(&bad);
    assert_eq!(good, entries[..1]);
    let err = err.expect("error");
    match &err {
        LogError::Frame(FrameError::Decode {
            frame: 2,
            offset,
            message,
        }) => {
            assert_eq!(*offset, starts[1] as u64);
            assert!(message.contains("unknown event tag 99"), "{message}");
        }
        other => panic!("{other}"),
    }

    // A valid interrupt with a byte too many.
    let mut bad = bytes.clone();
    encode_frame(2, &[0, 0, 6, 0x20, 0], &mut bad).expect("frame");
    let (_, err) = read_all(&bad);
    assert!(
        matches!(&err, Some(LogError::Frame(FrameError::Decode { frame: 2, message, .. })) if message.contains("1 bytes left over")),
        "{err:?}"
    );

    // A packet claiming more bytes than the frame has.
    let mut bad = bytes;
    encode_frame(2, &[0, 0, 7, 3, 253, 0, 0, 0, 0, 0, 0, 0, 1], &mut bad).expect("frame");
    let (_, err) = read_all(&bad);
    assert!(
        matches!(
            err,
            Some(LogError::Frame(FrameError::Decode { frame: 2, .. }))
        ),
        "{err:?}"
    );
}

#[test]
fn a_corrupt_header_is_an_error_at_frame_zero() {
    let (mut bytes, _) = write_log(&every_kind());
    bytes[PREAMBLE_LEN + 6] ^= 1;
    let (_, err) = read_all(&bytes);
    assert!(matches!(
        err,
        Some(LogError::Frame(FrameError::Crc {
            frame: 0,
            offset: 12,
            seq: 0,
            ..
        }))
    ));

    // A header frame whose CRC is right but whose contents are not a header.
    let mut bad = bytes[..PREAMBLE_LEN].to_vec();
    encode_frame(0, b"\x03abc", &mut bad).expect("frame");
    let (_, err) = read_all(&bad);
    assert!(
        matches!(
            err,
            Some(LogError::Frame(FrameError::Decode {
                frame: 0,
                offset: 12,
                ..
            }))
        ),
        "{err:?}"
    );
}

#[test]
fn garbage_after_the_end_is_an_error() {
    let (mut bytes, starts) = write_log(&every_kind());
    let end = bytes.len();
    assert_eq!(end, starts[11]);
    bytes.push(0);
    let (good, err) = read_all(&bytes);
    assert_eq!(good.len(), 10, "the End entry is not delivered as valid");
    let err = err.expect("error");
    assert!(
        matches!(err, LogError::TrailingGarbage { frame: 12, offset } if offset == end as u64),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("trailing garbage after the End entry: frame 12 at offset {end}")
    );
}

#[test]
fn a_log_without_end_says_so() {
    let entries = every_kind();
    let mut w = LogWriter::new(Vec::new(), &header()).expect("header");
    for e in &entries[..5] {
        w.append_entry(e).expect("append");
    }
    assert!(!w.ended());
    let bytes = w.into_inner().expect("flush");
    let (good, err) = read_all(&bytes);
    assert_eq!(good, entries[..5]);
    let err = err.expect("error");
    assert!(
        matches!(err, LogError::MissingEnd { offset, last_seq: 5 } if offset == bytes.len() as u64),
        "{err}"
    );
    assert!(err.to_string().contains("without an End entry"), "{err}");

    // A log with a header and nothing else.
    let bytes = LogWriter::new(Vec::new(), &header())
        .and_then(|w| w.into_inner())
        .expect("header");
    let (_, err) = read_all(&bytes);
    assert!(matches!(
        err,
        Some(LogError::MissingEnd { last_seq: 0, .. })
    ));
}

#[test]
fn the_writer_assigns_and_checks_sequence_numbers() {
    let mut w = LogWriter::new(Vec::new(), &header()).expect("header");
    let pos = Position {
        exits: 10,
        rip: 0x1000,
    };
    assert_eq!(
        w.append(pos, Event::Interrupt { vector: 0x20 })
            .expect("append"),
        1
    );
    assert_eq!(w.next_seq(), 2);
    let wrong = Entry {
        seq: 5,
        pos,
        event: Event::Interrupt { vector: 0x20 },
    };
    let len = w.get_ref().len();
    let err = w.append_entry(&wrong).expect_err("wrong seq");
    assert!(matches!(
        err,
        LogError::Encode(EncodeError::Sequence {
            expected: 2,
            found: 5
        })
    ));
    assert_eq!(w.get_ref().len(), len, "nothing written");

    let back = Position {
        exits: 9,
        rip: 0x1000,
    };
    let err = w
        .append(back, Event::Rdtsc { value: 1 })
        .expect_err("backwards");
    assert!(matches!(
        err,
        LogError::Encode(EncodeError::Backwards {
            seq: 2,
            exits: 9,
            previous: 10
        })
    ));

    let huge = Event::Packet {
        desc_head: 0,
        frame: vec![0; MAX_PAYLOAD],
    };
    let err = w.append(pos, huge).expect_err("too long");
    assert!(matches!(
        err,
        LogError::Encode(EncodeError::TooLong { seq: 2, .. })
    ));
    assert_eq!(w.get_ref().len(), len, "nothing written");

    // After all those refusals the log goes on at 2.
    assert_eq!(w.append(pos, Event::Rdtsc { value: 1 }).expect("append"), 2);
    let bytes = w.finish(pos, "done").expect("finish");
    let (good, err) = read_all(&bytes);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(good.len(), 3);
    assert_eq!(
        good[2].event,
        Event::End {
            exits: 10,
            reason: "done".into()
        }
    );
}

#[test]
fn nothing_can_follow_the_end() {
    let mut w = LogWriter::new(Vec::new(), &header()).expect("header");
    let pos = Position::default();
    w.append(
        pos,
        Event::End {
            exits: 0,
            reason: "x".into(),
        },
    )
    .expect("end");
    assert!(w.ended());
    let err = w
        .append(pos, Event::Interrupt { vector: 1 })
        .expect_err("after end");
    assert!(matches!(err, LogError::AfterEnd { seq: 2 }));
}

/// Accepts `budget` bytes, then fails every write.
struct FailingWriter {
    budget: usize,
}

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::other("disk full"));
        }
        let n = buf.len().min(self.budget);
        self.budget -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_write_poisons_the_writer() {
    let mut w = LogWriter::new(FailingWriter { budget: 200 }, &header()).expect("header");
    let pos = Position::default();
    let mut result = Ok(0);
    while result.is_ok() {
        result = w.append(pos, Event::Rdrand { value: 7, ok: true });
    }
    assert!(matches!(result, Err(LogError::Write(_))));
    let err = w
        .append(pos, Event::Interrupt { vector: 1 })
        .expect_err("poisoned");
    assert!(matches!(err, LogError::Failed));
}

/// Returns its bytes, then an I/O error.
#[derive(Debug)]
struct FailingReader<'a> {
    data: &'a [u8],
}

impl Read for FailingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::Error::other("cable unplugged"));
        }
        self.data.read(buf)
    }
}

#[test]
fn a_read_error_names_the_frame() {
    let (bytes, starts) = write_log(&every_kind());
    let reader = LogReader::new(FailingReader {
        data: &bytes[..starts[2] + 3],
    })
    .expect("header");
    let err = reader.filter_map(Result::err).next().expect("error");
    assert!(
        matches!(&err, LogError::Frame(FrameError::Io { frame: 3, offset, .. }) if *offset == starts[2] as u64),
        "{err}"
    );
    assert!(err.to_string().contains("cable unplugged"), "{err}");

    let err = LogReader::new(FailingReader { data: &bytes[..3] }).expect_err("error");
    assert!(matches!(err, LogError::Read { offset: 0, .. }), "{err}");
}

/// Hands out one byte per `read`, as a slow socket might.
struct Trickle<'a>(&'a [u8]);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match (self.0.split_first(), buf.first_mut()) {
            (Some((&b, rest)), Some(slot)) => {
                *slot = b;
                self.0 = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

#[test]
fn short_reads_are_not_truncation() {
    let entries = every_kind();
    let (bytes, _) = write_log(&entries);
    let read: Vec<Entry> = LogReader::new(Trickle(&bytes))
        .expect("header")
        .collect::<Result<_, _>>()
        .expect("entries");
    assert_eq!(read, entries);
}
