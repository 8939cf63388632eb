//! Random corruption: never a panic, never a stream that reads as
//! something else.

use crate::support::{read_bytes, small, MEM};
use logchannel::{read_verdict, TransferReader};
use proptest::prelude::*;
use std::sync::OnceLock;

fn small_sample() -> &'static (Vec<u8>, usize) {
    static SAMPLE: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let bytes = small();
        let (items, err) = read_bytes(&bytes);
        assert!(err.is_none(), "{err:?}");
        (bytes, items.len())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn flipped_bytes_are_always_caught(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let (bytes, _) = small_sample();
        let mut bad = bytes.clone();
        for (at, mask) in &flips {
            let i = at.index(bad.len());
            bad[i] ^= mask;
        }
        // Two flips of one byte may cancel out.
        prop_assume!(&bad != bytes);
        let (_, err) = read_bytes(&bad);
        prop_assert!(err.is_some());
    }

    #[test]
    fn arbitrary_input_is_refused_without_a_panic(
        input in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        let mut r = TransferReader::new(&input[..], MEM);
        for _ in 0..input.len() + 1 {
            if r.next().is_err() {
                break;
            }
        }
        let _ = read_verdict(&input[..]);
    }

    #[test]
    fn a_prefix_of_a_valid_stream_is_an_error(cut in 0usize..100_000) {
        let (bytes, items) = small_sample();
        let cut = cut % bytes.len();
        let (got, err) = read_bytes(&bytes[..cut]);
        prop_assert!(err.is_some());
        prop_assert!(got.len() < *items);
    }
}
