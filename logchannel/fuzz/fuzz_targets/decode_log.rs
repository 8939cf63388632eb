//! Arbitrary bytes as a log file, as an entry payload behind a valid CRC, as
//! raw frames, as JSON lines and as a state transfer. The body is shared with the proptest
//! `random_bytes_never_panic`, so the normal test suite runs it too.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/log/decode_any.rs"]
mod decode_any;

fuzz_target!(|data: &[u8]| {
    decode_any::decode_any(data);
});
