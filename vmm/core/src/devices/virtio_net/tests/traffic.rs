//! Registers, initialisation, and frames in both directions.

use super::*;

#[test]
fn registers_of_a_fresh_device() {
    let mut d = Driver::new();
    assert_eq!(d.read32(regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.read32(regs::VERSION), 2);
    assert_eq!(d.read32(regs::DEVICE_ID), 1);
    assert_eq!(d.read32(regs::VENDOR_ID).to_le_bytes(), *b"FTVM");
    for (sel, word) in [(0, 1 << 5), (1, 1), (2, 0), (u32::MAX, 0)] {
        d.write32(regs::DEVICE_FEATURES_SEL, sel);
        assert_eq!(d.read32(regs::DEVICE_FEATURES), word, "features word {sel}");
    }
    for (sel, max) in [(0, 256), (1, 256), (2, 0), (7, 0)] {
        d.write32(regs::QUEUE_SEL, sel);
        assert_eq!(d.read32(regs::QUEUE_NUM_MAX), max, "queue {sel}");
        assert_eq!(d.read32(regs::QUEUE_READY), 0);
    }
    assert_eq!(d.read32(regs::STATUS), 0);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 0);
    assert_eq!(d.read32(regs::CONFIG_GENERATION), 0);

    // Config space: MAC then status (LINK_UP), at any width.
    assert_eq!(d.read(0x100, 6), GUEST_MAC);
    assert_eq!(d.read(0x100, 8), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0]);
    assert_eq!(d.read(0x103, 1), [0x12]);
    assert_eq!(d.read(0x104, 4), [0x34, 0x56, 1, 0]);
    assert_eq!(d.read(0x106, 2), [1, 0]);
    assert_eq!(d.read(0x107, 4), [0, 0, 0, 0]);
    assert_eq!(d.read(0x200, 4), [0, 0, 0, 0]);
    assert_eq!(d.dev.state().counters.bad_register_accesses, 0);

    // Misused registers read as zeros and are counted.
    assert_eq!(d.read(regs::MAGIC_VALUE, 2), [0, 0]);
    assert_eq!(d.read(regs::MAGIC_VALUE, 8), [0; 8]);
    assert_eq!(d.read(0x2, 4), [0; 4]);
    assert_eq!(d.read(regs::QUEUE_NOTIFY, 4), [0; 4]);
    assert_eq!(d.read(0x0c0, 4), [0; 4]);
    assert_eq!(d.read(NET_MMIO_SIZE, 4), [0; 4]);
    assert_eq!(d.read(u64::MAX, 4), [0; 4]);
    assert_eq!(d.read(regs::STATUS, 0), Vec::<u8>::new());
    assert_eq!(d.dev.state().counters.bad_register_accesses, 8);
}

#[test]
fn init_sequence_activates_and_sets_no_notify() {
    let mut d = Driver::new();
    assert!(!d.dev.is_active());
    d.init();
    assert_eq!(
        d.status(),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    );
    for q in [RX_QUEUE, TX_QUEUE] {
        assert_eq!(d.read16(USED[q]), 1, "VIRTQ_USED_F_NO_NOTIFY in queue {q}");
        d.write32(regs::QUEUE_SEL, q as u32);
        assert_eq!(d.read32(regs::QUEUE_NUM), u32::from(QSIZE));
        assert_eq!(u64::from(d.read32(regs::QUEUE_DESC_LOW)), DESC[q]);
        assert_eq!(u64::from(d.read32(regs::QUEUE_DRIVER_LOW)), AVAIL[q]);
        assert_eq!(u64::from(d.read32(regs::QUEUE_DEVICE_LOW)), USED[q]);
        assert_eq!(d.read32(regs::QUEUE_DEVICE_HIGH), 0);
    }
    d.write32(regs::DRIVER_FEATURES_SEL, 1);
    assert_eq!(d.read32(regs::DRIVER_FEATURES), 1);
    assert_eq!(d.dev.state().driver_features, DEVICE_FEATURES);
    assert_eq!(d.dev.state().counters.bad_register_accesses, 0);
}

#[test]
fn features_ok_requires_version_1_and_offered_features() {
    let mut d = Driver::new();
    assert!(!d.negotiate(VIRTIO_NET_F_MAC), "legacy driver refused");
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // DRIVER_OK without FEATURES_OK is refused too.
    d.add_status(STATUS_DRIVER_OK);
    assert_eq!(d.status() & STATUS_DRIVER_OK, 0);

    assert!(
        !d.negotiate(DEVICE_FEATURES | 1 << 28),
        "INDIRECT_DESC not offered"
    );
    assert!(
        !d.negotiate(DEVICE_FEATURES | 1 << 29),
        "EVENT_IDX not offered"
    );
    assert!(d.negotiate(VIRTIO_F_VERSION_1), "MAC is optional");
    assert!(d.negotiate(DEVICE_FEATURES));

    // Features are frozen once FEATURES_OK is set.
    d.write32(regs::DRIVER_FEATURES_SEL, 0);
    d.write32(regs::DRIVER_FEATURES, 0);
    assert_eq!(d.dev.state().driver_features, DEVICE_FEATURES);
    // Features above bit 63 do not exist.
    d.write32(regs::STATUS, 0);
    d.write32(regs::DRIVER_FEATURES_SEL, 2);
    let before = d.dev.state().counters.bad_register_accesses;
    d.write32(regs::DRIVER_FEATURES, 0);
    d.write32(regs::DRIVER_FEATURES, 1);
    assert_eq!(d.dev.state().counters.bad_register_accesses, before + 1);
}

#[test]
fn status_bits_cannot_be_cleared_without_reset() {
    let mut d = Driver::new();
    d.init();
    d.write32(regs::STATUS, u32::from(STATUS_ACKNOWLEDGE));
    assert_eq!(d.status(), 0x0f);
    d.write32(regs::STATUS, 0x1_000f);
    d.write32(regs::STATUS, 0x2f);
    assert_eq!(d.status(), 0x0f);
    assert!(d.dev.is_active());
    d.add_status(STATUS_FAILED);
    assert!(!d.dev.is_active(), "a driver that gave up stops the device");
}

#[test]
fn tx_frames_come_out_including_split_chains() {
    let mut d = Driver::new();
    d.init();
    let a = frame(10, 1);
    let b = frame(300, 2);
    let c = frame(1472, 3);
    let ha = d.send(&a);
    // Header split in two, the frame in three pieces, one empty.
    let hdr = [0u8; NET_HDR_LEN];
    let mut second = hdr[5..].to_vec();
    second.extend_from_slice(&b[..10]);
    let hb = d.post_tx(&[&hdr[..5], &second, &b[10..30], &[], &b[30..]]);
    // Header and frame in one descriptor.
    let mut whole = hdr.to_vec();
    whole.extend_from_slice(&c);
    let hc = d.post_tx(&[&whole]);

    let batch = d.pop_tx();
    assert_eq!(batch.errors, vec![]);
    assert_eq!(batch.frames, vec![a, b, c]);
    assert_eq!(
        d.take_used(TX_QUEUE),
        vec![(u32::from(ha), 0), (u32::from(hb), 0), (u32::from(hc), 0)]
    );
    assert!(d.dev.take_irq());
    assert!(!d.dev.take_irq(), "taking the edge clears it");
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), INT_USED_RING);
    assert_eq!(d.dev.state().counters.tx_frames, 3);

    assert_eq!(d.pop_tx(), TxBatch::default(), "nothing new");
    assert!(!d.dev.take_irq());
}

#[test]
fn tx_ring_wraps_around() {
    let mut d = Driver::new();
    d.init();
    for round in 0..3 * QSIZE {
        let f = frame(usize::from(round), round as u8);
        let head = d.send(&f);
        let batch = d.pop_tx();
        assert_eq!(batch.frames, vec![f]);
        assert_eq!(d.take_used(TX_QUEUE), vec![(u32::from(head), 0)]);
    }
}

#[test]
fn tx_no_interrupt_is_respected() {
    let mut d = Driver::new();
    d.init();
    d.set_avail_flags(TX_QUEUE, VIRTQ_AVAIL_F_NO_INTERRUPT);
    d.send(&frame(20, 0));
    assert_eq!(d.pop_tx().frames.len(), 1);
    assert_eq!(d.take_used(TX_QUEUE).len(), 1);
    assert!(!d.dev.take_irq());
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 0);

    d.set_avail_flags(TX_QUEUE, 0);
    d.send(&frame(20, 0));
    assert_eq!(d.pop_tx().frames.len(), 1);
    assert!(d.dev.take_irq());
}

#[test]
fn notifies_are_counted() {
    let mut d = Driver::new();
    d.init();
    d.write32(regs::QUEUE_NOTIFY, 1);
    d.write32(regs::QUEUE_NOTIFY, 1);
    d.write32(regs::QUEUE_NOTIFY, 0);
    d.write32(regs::QUEUE_NOTIFY, 9);
    let c = d.dev.state().counters;
    assert_eq!(
        (c.tx_notifies, c.rx_notifies, c.bad_register_accesses),
        (2, 1, 1)
    );
    assert_eq!(d.pop_tx(), TxBatch::default());
}

#[test]
fn rx_delivery_writes_header_and_frame() {
    let mut d = Driver::new();
    d.init();
    assert_eq!(d.dev.rx_buffers_available(&d.mem), 0);
    let (head, addrs) = d.post_rx(&[RX_BUF_LEN]);
    assert_eq!(d.dev.rx_buffers_available(&d.mem), 1);
    let f = frame(100, 7);
    let placed = d.deliver(&f).unwrap();
    let len = (NET_HDR_LEN + f.len()) as u32;
    assert_eq!(placed, RxPlacement { head, len });
    let written = d.read_mem(addrs[0], len as usize);
    assert_eq!(written[..NET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(written[NET_HDR_LEN..], f[..]);
    assert_eq!(d.take_used(RX_QUEUE), vec![(u32::from(head), len)]);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), INT_USED_RING);
    assert!(d.dev.take_irq());
    assert!(!d.dev.take_irq());
    assert_eq!(d.dev.rx_buffers_available(&d.mem), 0);
    assert_eq!(d.dev.state().counters.rx_frames, 1);
}

#[test]
fn rx_delivery_scatters_over_a_split_buffer() {
    let mut d = Driver::new();
    d.init();
    let lens = [5, 7, 100, 0, 2000];
    let (head, addrs) = d.post_rx(&lens);
    let f = frame(1000, 9);
    let placed = d.deliver(&f).unwrap();
    assert_eq!(placed.head, head);
    let mut got = Vec::new();
    let mut left = placed.len as usize;
    for (&addr, &len) in addrs.iter().zip(&lens) {
        let n = left.min(len as usize);
        got.extend(d.read_mem(addr, n));
        left -= n;
    }
    assert_eq!(got[..NET_HDR_LEN], rx_header());
    assert_eq!(got[NET_HDR_LEN..], f[..]);
}

#[test]
fn rx_irq_edges_collapse_until_taken_and_no_interrupt_is_respected() {
    let mut d = Driver::new();
    d.init();
    d.post_rx(&[RX_BUF_LEN]);
    d.post_rx(&[RX_BUF_LEN]);
    d.post_rx(&[RX_BUF_LEN]);
    d.deliver(&frame(1, 0)).unwrap();
    d.deliver(&frame(2, 0)).unwrap();
    assert!(d.dev.take_irq());
    assert!(!d.dev.take_irq());
    d.write32(regs::INTERRUPT_ACK, INT_USED_RING);
    d.set_avail_flags(RX_QUEUE, VIRTQ_AVAIL_F_NO_INTERRUPT);
    d.deliver(&frame(3, 0)).unwrap();
    assert!(!d.dev.take_irq());
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 0);
    assert_eq!(d.take_used(RX_QUEUE).len(), 3);
}

#[test]
fn rx_refusals_change_nothing() {
    let mut d = Driver::new();
    let f = frame(10, 0);
    assert_eq!(d.deliver(&f), Err(VirtioNetError::NotActive));
    d.init();
    let state = d.dev.state();
    let memory = dump(&d.mem);
    assert_eq!(d.deliver(&f), Err(VirtioNetError::NoRxBuffer));
    d.post_rx(&[RX_BUF_LEN]);
    let state_with_buffer = d.dev.state();
    assert_eq!(state_with_buffer, state);
    let memory_with_buffer = dump(&d.mem);
    let too_long = vec![0; MAX_FRAME_LEN + 1];
    assert_eq!(
        d.deliver(&too_long),
        Err(VirtioNetError::FrameTooLong {
            len: MAX_FRAME_LEN + 1,
            max: MAX_FRAME_LEN
        })
    );
    assert_eq!(d.dev.state(), state_with_buffer);
    assert_eq!(dump(&d.mem), memory_with_buffer);
    assert_ne!(memory, memory_with_buffer);
    assert!(!d.dev.take_irq());
    assert!(d.deliver(&vec![0; MAX_FRAME_LEN]).is_ok());
}

#[test]
fn rx_buffer_too_small_is_returned_empty() {
    let mut d = Driver::new();
    d.init();
    let (small, _) = d.post_rx(&[100]);
    let (big, _) = d.post_rx(&[RX_BUF_LEN]);
    let f = frame(200, 0);
    assert_eq!(
        d.deliver(&f),
        Err(VirtioNetError::RxBufferTooSmall {
            head: small,
            capacity: 100,
            needed: NET_HDR_LEN + f.len()
        })
    );
    assert_eq!(d.take_used(RX_QUEUE), vec![(u32::from(small), 0)]);
    assert!(d.dev.take_irq(), "the driver must get its buffer back");
    assert_eq!(d.dev.state().counters.rx_bad_chains, 1);
    assert_eq!(d.deliver(&f).unwrap().head, big);
    assert!(d.dev.is_active());
}

#[test]
fn reset_clears_queues() {
    let mut d = Driver::new();
    d.init();
    d.post_rx(&[RX_BUF_LEN]);
    d.deliver(&frame(10, 0)).unwrap();
    d.send(&frame(10, 0));
    d.write32(regs::STATUS, 0);

    assert!(!d.dev.is_active());
    assert_eq!(d.status(), 0);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 0);
    assert!(!d.dev.take_irq());
    let fresh = VirtioNet::new(GUEST_MAC).state();
    let state = d.dev.state();
    assert_eq!(state.queues, fresh.queues);
    assert_eq!(state.driver_features, 0);
    for q in [RX_QUEUE, TX_QUEUE] {
        d.write32(regs::QUEUE_SEL, q as u32);
        assert_eq!(d.read32(regs::QUEUE_READY), 0);
        assert_eq!(d.read32(regs::QUEUE_NUM), 256);
        assert_eq!(d.read32(regs::QUEUE_DESC_LOW), 0);
    }
    assert_eq!(d.pop_tx(), TxBatch::default(), "pending TX chain not read");
    assert_eq!(d.deliver(&frame(1, 0)), Err(VirtioNetError::NotActive));

    d.reinit();
    let f = frame(33, 3);
    d.send(&f);
    assert_eq!(d.pop_tx().frames, vec![f]);
}
