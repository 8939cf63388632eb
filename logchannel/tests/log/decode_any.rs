//! Feeds arbitrary bytes to every decoder in the crate. Shared by the
//! `decode_log` fuzz target and a proptest, so that the normal test suite
//! exercises the same path the fuzzer does.

use logchannel::{
    encode_frame, from_json_lines, read_verdict, FrameDecoder, LogHeader, LogReader, LogWriter,
    ReplayConfig, TransferReader,
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

    // As a state transfer and as a verdict; then, to get past the CRCs, as
    // CRC-valid messages after a valid begin, each taking its tag and
    // length (below 128) from the next two bytes.
    items += read_transfer(data);
    items += usize::from(read_verdict(data).is_ok());
    // A 1 MiB guest with 4 KiB pages.
    let mut stream = transfer_message(0, 1, &[0xfc, 0x00, 0x00, 0x10, 0x00, 0xfb, 0x00, 0x10]);
    let mut rest = data;
    let mut number = 1;
    while let [tag, len, tail @ ..] = rest {
        let (payload, after) = tail.split_at(usize::from(*len & 0x7f).min(tail.len()));
        stream.extend(transfer_message(number, *tag, payload));
        number += 1;
        rest = after;
    }
    items += read_transfer(&stream);
    items
}

/// Items read before the first error, plus one for it.
fn read_transfer(bytes: &[u8]) -> usize {
    let mut reader = TransferReader::new(bytes, 1 << 20);
    let mut items = 1;
    while reader.next().is_ok() {
        items += 1;
    }
    items
}

/// A transfer message as README.md lays it out, for a payload under 128
/// bytes (its length is one byte).
fn transfer_message(number: u64, tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, payload.len() as u8];
    out.extend_from_slice(payload);
    let mut h = crc32fast::Hasher::new();
    h.update(&out);
    h.update(&number.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out
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
