//! A random guest driving the device never panics it.

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Read(u64, usize),
    Desc {
        q: usize,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    },
    Avail {
        q: usize,
        slot: u16,
        head: u16,
    },
    AvailIdx(usize, u16),
    AvailFlags(usize, u16),
    PopTx,
    DeliverRx(usize),
    TakeIrq,
    /// A well-formed receive buffer or transmit frame, so that the
    /// random traffic also takes the paths that succeed.
    PostRx(u32),
    Send(usize),
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..0x40).prop_map(|w| w * 4),
        1 => 0u64..0x1100,
        1 => any::<u64>(),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        0u32..=2,
        Just(4),
        Just(8),
        Just(16),
        Just(0x0f),
        Just(0x4f),
        Just(0x1000),
        Just(0x2000),
        Just(0x3000),
        Just(0x4000),
        Just(0x5000),
        Just(0x6000),
        Just(0xffff_f000),
        any::<u32>(),
    ];
    prop_oneof![
        6 => word.prop_map(|w| w.to_le_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..9),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let addr = prop_oneof![
        BUF_BASE..BUF_BASE + 0x1000,
        MEM_SIZE - 0x800..MEM_SIZE + 0x800,
        any::<u64>(),
    ];
    let len = prop_oneof![12u32..64, 0u32..2000, any::<u32>()];
    let flags = prop_oneof![
        Just(0),
        Just(VIRTQ_DESC_F_WRITE),
        Just(VIRTQ_DESC_F_NEXT),
        Just(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE),
        0u16..8,
    ];
    let frame_len = prop_oneof![0usize..64, 0usize..=MAX_FRAME_LEN + 2];
    prop_oneof![
        8 => (offset(), value()).prop_map(|(o, v)| Op::Write(o, v)),
        2 => (offset(), 0usize..9).prop_map(|(o, n)| Op::Read(o, n)),
        4 => (0usize..2, 0u16..20, addr, len, flags, 0u16..20).prop_map(
            |(q, index, addr, len, flags, next)| Op::Desc { q, index, addr, len, flags, next }
        ),
        2 => (0usize..2, 0u16..QSIZE, 0u16..20)
            .prop_map(|(q, slot, head)| Op::Avail { q, slot, head }),
        2 => (0usize..2, prop_oneof![0u16..4, 0u16..20, any::<u16>()])
            .prop_map(|(q, i)| Op::AvailIdx(q, i)),
        1 => (0usize..2, 0u16..4).prop_map(|(q, f)| Op::AvailFlags(q, f)),
        3 => Just(Op::PopTx),
        3 => frame_len.clone().prop_map(Op::DeliverRx),
        1 => Just(Op::TakeIrq),
        2 => prop_oneof![0u32..100, Just(RX_BUF_LEN)].prop_map(Op::PostRx),
        2 => frame_len.prop_map(Op::Send),
    ]
}

proptest! {
    // Failures are reported, not written to a regressions file.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(300)
    })]

    #[test]
    fn random_guest_behaviour_never_panics(
        init in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let mut d = Driver::new();
        if init {
            d.init();
        }
        for op in ops {
            match op {
                Op::Write(offset, value) => d.dev.mmio_write(offset, &value, &d.mem),
                Op::Read(offset, len) => {
                    d.read(offset, len);
                }
                Op::Desc { q, index, addr, len, flags, next } => {
                    d.write_desc(q, index, addr, len, flags, next)
                }
                Op::Avail { q, slot, head } => d.write16(AVAIL[q] + 4 + 2 * u64::from(slot), head),
                Op::AvailIdx(q, idx) => d.write16(AVAIL[q] + 2, idx),
                Op::AvailFlags(q, flags) => d.set_avail_flags(q, flags),
                Op::PopTx => {
                    let batch = d.pop_tx();
                    prop_assert!(batch.frames.iter().all(|f| f.len() <= MAX_FRAME_LEN));
                }
                Op::DeliverRx(len) => {
                    let available = d.dev.rx_buffers_available(&d.mem);
                    let before = d.dev.state();
                    let result = d.deliver(&vec![0x5a; len]);
                    if matches!(
                        result,
                        Err(VirtioNetError::NoRxBuffer
                            | VirtioNetError::NotActive
                            | VirtioNetError::FrameTooLong { .. })
                    ) {
                        prop_assert_eq!(d.dev.state(), before);
                    }
                    if available == 0 {
                        prop_assert!(result.is_err());
                    }
                }
                Op::TakeIrq => {
                    d.dev.take_irq();
                }
                Op::PostRx(len) => {
                    d.post_rx(&[len]);
                }
                Op::Send(len) => {
                    d.send(&vec![0xa5; len]);
                }
            }
        }
        // Every reachable state can be snapshotted and restored.
        let state = d.dev.state();
        let restored = VirtioNet::from_state(&state);
        prop_assert!(restored.is_ok(), "{:?}", restored);
        prop_assert_eq!(restored.unwrap().state(), state);
    }
}
