//! Feeds arbitrary bytes to every decoder in the crate. Shared by the
//! `decode_log` fuzz target and a proptest, so that the normal test suite
//! exercises the same path the fuzzer does.

use logchannel::{
    encode_frame, from_json_lines, FrameDecoder, LogHeader, LogReader, LogWriter, ReplayConfig,
};

/// Decodes `data` in every way a reader might meet it and returns how many
/// items (entries or errors) came out, so that nothing is optimised away.
/// Must never panic.
pub fn decode_any(data: &[u8]) -> usize {
    let mut items = 0;

    // As a whole log file.
    items += read_log(data);

    // Random bytes almost never pass a CRC, so the payload decoder is reached
    // by wrapping them in CRC-valid entry frames after a valid header: first
    // all of `data` as one payload, then `data` cut into payloads that each
    // start with their length byte, so that deltas carry across frames.
    let mut log = valid_prefix();
    if encode_frame(1, data, &mut log).is_ok() {
        items += read_log(&log);
    }
    let mut log = valid_prefix();
    let mut rest = data;
    let mut seq = 1;
    while let Some((&len, tail)) = rest.split_first() {
        let (payload, after) = tail.split_at(usize::from(len).min(tail.len()));
        if encode_frame(seq, payload, &mut log).is_err() {
            break;
        }
        seq += 1;
        rest = after;
    }
    items += read_log(&log);

    // As a stream of header-like frames, read with the raw-frame API.
    let mut decoder = FrameDecoder::new(1, 0);
    let mut input = data;
    while let Ok(Some(_)) = decoder.read_value::<ReplayConfig, _>(&mut input, 0) {
        items += 1;
    }

    // As JSON lines.
    if let Ok((_, entries)) = from_json_lines(data) {
        items += entries.count();
    }
    items
}

fn read_log(bytes: &[u8]) -> usize {
    match LogReader::new(bytes) {
        Ok(reader) => reader.count(),
        Err(_) => 1,
    }
}

fn valid_prefix() -> Vec<u8> {
    let header = LogHeader::new(
        "fuzz",
        [0; 32],
        1 << 20,
        ReplayConfig {
            digest_interval: 1,
            tick_hz: 1,
            patching: false,
            extra: Default::default(),
        },
    );
    LogWriter::new(Vec::new(), &header)
        .and_then(|w| w.into_inner())
        .expect("writing to a Vec cannot fail")
}
