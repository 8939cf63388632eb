//! Properties over random entries and random bytes.

use crate::decode_any::decode_any;
use crate::support::{arb_entries, header, write_log};
use logchannel::{
    from_json_lines, to_json_lines, Entry, Event, EventKind, FrameDecoder, FrameEncoder, LogReader,
    LogWriter,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn read_back(bytes: &[u8]) -> (Vec<Entry>, Option<String>, bool) {
    let mut reader = LogReader::new(bytes).expect("header");
    let mut entries = Vec::new();
    let mut error = None;
    for item in reader.by_ref() {
        match item {
            Ok(e) => entries.push(e),
            Err(e) => error = Some(e.to_string()),
        }
    }
    (entries, error, reader.ended())
}

/// `entries` with an End entry, so that an unchanged log reads cleanly.
fn finished(mut entries: Vec<Entry>) -> Vec<Entry> {
    if entries
        .last()
        .is_none_or(|e| e.event.kind() != EventKind::End)
    {
        let pos = entries.last().map(|e| e.pos).unwrap_or_default();
        entries.push(Entry {
            seq: entries.len() as u64 + 1,
            pos,
            event: Event::End {
                exits: pos.exits,
                reason: "end".into(),
            },
        });
    }
    entries
}

proptest! {
    #[test]
    fn entries_round_trip_through_a_log_file(entries in arb_entries()) {
        let (bytes, _) = write_log(&entries);
        let (read, error, ended) = read_back(&bytes);
        prop_assert_eq!(&read, &entries);
        let has_end = entries.last().is_some_and(|e| e.event.kind() == EventKind::End);
        prop_assert_eq!(ended, has_end);
        prop_assert_eq!(error.is_none(), has_end, "{:?}", error);
    }

    #[test]
    fn entries_round_trip_through_json_lines(entries in arb_entries()) {
        let mut text = Vec::new();
        to_json_lines(&mut text, &header(), &entries).expect("json");
        let (h, loaded) = from_json_lines(&text[..]).expect("header line");
        prop_assert_eq!(&h, &header());
        let loaded: Vec<Entry> = loaded.collect::<Result<_, _>>().expect("entries");
        prop_assert_eq!(&loaded, &entries);

        // Loading the JSON into a binary log gives the same bytes as
        // writing the entries directly.
        let mut w = LogWriter::new(Vec::new(), &h).expect("header");
        for e in &loaded {
            w.append_entry(e).expect("append");
        }
        prop_assert_eq!(w.into_inner().expect("flush"), write_log(&entries).0);
    }

    /// A channel connection starts at whatever sequence number the handshake
    /// agreed; deltas restart from zero with it.
    #[test]
    fn frames_round_trip_from_any_starting_sequence(entries in arb_entries(), first in 1u64..u64::MAX / 2) {
        let entries: Vec<Entry> = entries
            .into_iter()
            .map(|mut e| { e.seq += first - 1; e })
            .collect();
        let mut encoder = FrameEncoder::new(first);
        let mut stream = Vec::new();
        let mut sizes = Vec::new();
        for e in &entries {
            sizes.push(encoder.encode_entry(e, &mut stream).expect("encode"));
        }
        let mut decoder = FrameDecoder::new(first, 0);
        let mut input = &stream[..];
        for (e, size) in entries.iter().zip(sizes) {
            let decoded = decoder.read_entry(&mut input).expect("decode");
            prop_assert_eq!(decoded.as_ref(), Some(&(e.clone(), size)));
        }
        prop_assert!(decoder.read_entry(&mut input).expect("clean end").is_none());
        prop_assert_eq!(decoder.offset(), stream.len() as u64);
    }

    /// The fuzz target's body, on random bytes.
    #[test]
    fn random_bytes_never_panic(data in vec(any::<u8>(), 0..2048)) {
        decode_any(&data);
    }

    /// Random bytes behind a valid preamble and header reach the frame and
    /// payload decoders, which plain random bytes rarely do.
    #[test]
    fn random_frames_after_a_valid_header_never_panic(data in vec(any::<u8>(), 0..2048)) {
        let mut log = write_log(&[]).0;
        log.extend_from_slice(&data);
        decode_any(&log);
    }

    /// Any change to one byte of a finished log is an error (and never a
    /// panic).
    #[test]
    fn a_single_changed_byte_is_always_detected(
        entries in arb_entries(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let (mut bytes, _) = write_log(&finished(entries));
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        decode_any(&bytes);
        match LogReader::new(&bytes[..]) {
            Err(_) => {}
            Ok(reader) => {
                let error = reader.filter_map(Result::err).next();
                prop_assert!(error.is_some(), "change at {} not detected", i);
            }
        }
    }
}
