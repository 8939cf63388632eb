//! Malformed chains, broken rings, and state that `from_state` must refuse.

use super::*;

#[test]
fn malformed_tx_chains_are_skipped_and_counted() {
    let mut d = Driver::new();
    d.init();
    let a = frame(10, 1);
    let b = frame(20, 2);
    let buf = d.alloc(4096);
    // One descriptor per chain where possible: the 15 chains below must
    // fit the 16 descriptors of the queue.
    let mut whole_a = vec![0u8; NET_HDR_LEN];
    whole_a.extend_from_slice(&a);
    let mut heads = vec![d.post_tx(&[&whole_a])];
    let mut expected = Vec::new();

    let h = d.push_chain(TX_QUEUE, &[(0xdead_0000_0000, 64, 0)]);
    expected.push(VirtioNetError::BufferOutsideMemory {
        queue: TX_QUEUE,
        head: h,
        index: h,
        addr: 0xdead_0000_0000,
        len: 64,
    });
    heads.push(h);

    let h = d.push_chain(TX_QUEUE, &[(MEM_SIZE - 8, 64, 0)]);
    expected.push(VirtioNetError::BufferOutsideMemory {
        queue: TX_QUEUE,
        head: h,
        index: h,
        addr: MEM_SIZE - 8,
        len: 64,
    });
    heads.push(h);

    let h = d.push_chain(TX_QUEUE, &[(buf, u32::MAX, 0)]);
    expected.push(VirtioNetError::BufferOutsideMemory {
        queue: TX_QUEUE,
        head: h,
        index: h,
        addr: buf,
        len: u32::MAX,
    });
    heads.push(h);

    let h = d.push_chain(TX_QUEUE, &[(buf, 1000, 0), (buf, 1000, 0)]);
    expected.push(VirtioNetError::TxChainTooLong {
        head: h,
        len: 2000,
        max: NET_HDR_LEN + MAX_FRAME_LEN,
    });
    heads.push(h);

    let h = d.push_chain(TX_QUEUE, &[(buf, 11, 0)]);
    expected.push(VirtioNetError::TxChainTooShort { head: h, len: 11 });
    heads.push(h);

    let h = d.push_chain(TX_QUEUE, &[(buf, 12, 0), (buf, 64, VIRTQ_DESC_F_WRITE)]);
    expected.push(VirtioNetError::WrongDirection {
        queue: TX_QUEUE,
        head: h,
        index: (h + 1) % QSIZE,
        write_only: true,
    });
    heads.push(h);

    let h = d.push_chain(TX_QUEUE, &[(buf, 64, VIRTQ_DESC_F_INDIRECT)]);
    expected.push(VirtioNetError::IndirectDescriptor {
        queue: TX_QUEUE,
        head: h,
        index: h,
    });
    heads.push(h);

    // Two descriptors pointing at each other.
    let (x, y) = (d.alloc_desc(TX_QUEUE), d.alloc_desc(TX_QUEUE));
    d.write_desc(TX_QUEUE, x, buf, 1, VIRTQ_DESC_F_NEXT, y);
    d.write_desc(TX_QUEUE, y, buf, 1, VIRTQ_DESC_F_NEXT, x);
    d.publish(TX_QUEUE, x);
    expected.push(VirtioNetError::ChainLoop {
        queue: TX_QUEUE,
        head: x,
        size: QSIZE,
    });
    heads.push(x);

    let h = d.alloc_desc(TX_QUEUE);
    d.write_desc(TX_QUEUE, h, buf, 12, VIRTQ_DESC_F_NEXT, 300);
    d.publish(TX_QUEUE, h);
    expected.push(VirtioNetError::DescriptorIndexOutOfRange {
        queue: TX_QUEUE,
        head: h,
        index: 300,
        size: QSIZE,
    });
    heads.push(h);

    heads.push(d.send(&b));

    let batch = d.pop_tx();
    assert_eq!(batch.frames, vec![a, b], "valid frames still come out");
    assert_eq!(batch.errors, expected);
    let used = d.take_used(TX_QUEUE);
    assert_eq!(
        used,
        heads.iter().map(|&h| (u32::from(h), 0)).collect::<Vec<_>>(),
        "every chain returned"
    );
    let c = d.dev.state().counters;
    assert_eq!((c.tx_frames, c.tx_bad_chains), (2, 9));
    assert!(d.dev.is_active(), "bad chains do not stop the device");
    for e in &batch.errors {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut d = Driver::new();
    d.init();
    let buf = d.alloc(RX_BUF_LEN);
    let f = frame(64, 0);

    let h = d.push_chain(RX_QUEUE, &[(buf, RX_BUF_LEN, 0)]);
    assert_eq!(
        d.deliver(&f),
        Err(VirtioNetError::WrongDirection {
            queue: RX_QUEUE,
            head: h,
            index: h,
            write_only: false
        })
    );
    let h2 = d.push_chain(
        RX_QUEUE,
        &[(MEM_SIZE - 100, RX_BUF_LEN, VIRTQ_DESC_F_WRITE)],
    );
    assert!(matches!(
        d.deliver(&f),
        Err(VirtioNetError::BufferOutsideMemory { head, .. }) if head == h2
    ));
    let x = d.alloc_desc(RX_QUEUE);
    d.write_desc(
        RX_QUEUE,
        x,
        buf,
        1,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        x,
    );
    d.publish(RX_QUEUE, x);
    assert!(matches!(
        d.deliver(&f),
        Err(VirtioNetError::ChainLoop { .. })
    ));

    assert_eq!(
        d.take_used(RX_QUEUE),
        vec![(u32::from(h), 0), (u32::from(h2), 0), (u32::from(x), 0)]
    );
    let (good, _) = d.post_rx(&[RX_BUF_LEN]);
    assert_eq!(d.deliver(&f).unwrap().head, good);
    assert_eq!(d.dev.state().counters.rx_bad_chains, 3);
    assert!(d.dev.is_active());
}

#[test]
fn broken_avail_index_needs_reset() {
    let mut d = Driver::new();
    d.init();
    d.post_rx(&[RX_BUF_LEN]);
    d.write16(AVAIL[TX_QUEUE] + 2, QSIZE + 1);
    let batch = d.pop_tx();
    assert_eq!(
        batch.errors,
        vec![VirtioNetError::AvailIndexOutOfRange {
            queue: TX_QUEUE,
            avail_idx: QSIZE + 1,
            next_avail: 0,
            size: QSIZE
        }]
    );
    assert_eq!(d.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert!(d.dev.take_irq());
    assert!(!d.dev.is_active());
    assert_eq!(d.pop_tx(), TxBatch::default());
    assert_eq!(d.dev.rx_buffers_available(&d.mem), 0);
    assert_eq!(d.deliver(&frame(1, 0)), Err(VirtioNetError::NotActive));
    // The driver echoing the status back does not clear NEEDS_RESET.
    d.write32(regs::STATUS, 0x0f);
    assert_eq!(d.status(), 0x4f);
    assert_eq!(d.dev.state().counters.needs_reset_events, 1);

    d.reinit();
    assert_eq!(d.status(), 0x0f);
    let f = frame(5, 5);
    d.send(&f);
    assert_eq!(d.pop_tx().frames, vec![f]);
}

#[test]
fn broken_rx_avail_index_needs_reset() {
    let mut d = Driver::new();
    d.init();
    d.write16(AVAIL[RX_QUEUE] + 2, 0x8000);
    assert_eq!(d.dev.rx_buffers_available(&d.mem), 0);
    assert!(d.dev.is_active(), "a query changes nothing");
    assert!(matches!(
        d.deliver(&frame(1, 0)),
        Err(VirtioNetError::AvailIndexOutOfRange {
            queue: RX_QUEUE,
            ..
        })
    ));
    assert!(!d.dev.is_active());
}

#[test]
fn head_index_out_of_range_needs_reset() {
    let mut d = Driver::new();
    d.init();
    let f = frame(1, 1);
    d.send(&f);
    d.publish(TX_QUEUE, 200);
    let batch = d.pop_tx();
    assert_eq!(batch.frames, vec![f]);
    assert_eq!(
        batch.errors,
        vec![VirtioNetError::HeadIndexOutOfRange {
            queue: TX_QUEUE,
            head: 200,
            size: QSIZE
        }]
    );
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    assert_eq!(d.take_used(TX_QUEUE).len(), 1);
}

#[test]
fn queue_outside_memory_is_refused() {
    let mut d = Driver::new();
    assert!(d.negotiate(DEVICE_FEATURES));
    d.setup_queue(RX_QUEUE, MEM_SIZE - 0x40, AVAIL[0], USED[0]);
    assert_eq!(d.read32(regs::QUEUE_READY), 0);
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    assert!(!d.dev.take_irq(), "no config interrupt before DRIVER_OK");
    d.write32(regs::STATUS, 0);
    d.setup_queue(TX_QUEUE, 0x1_0000_0000, AVAIL[1], USED[1]);
    assert_eq!(d.read32(regs::QUEUE_READY), 0);
    d.write32(regs::STATUS, 0);
    d.setup_queue(TX_QUEUE, DESC[1], AVAIL[1], MEM_SIZE - 4);
    assert_eq!(d.read32(regs::QUEUE_READY), 0);
}

#[test]
fn queue_configuration_is_validated() {
    let mut d = Driver::new();
    d.write32(regs::QUEUE_SEL, 0);
    for bad in [0, 3, 512, 0x1_0010] {
        d.write32(regs::QUEUE_NUM, bad);
        assert_eq!(d.read32(regs::QUEUE_NUM), 256, "size {bad} refused");
    }
    d.write32(regs::QUEUE_NUM, 8);
    assert_eq!(d.read32(regs::QUEUE_NUM), 8);
    d.write32(regs::QUEUE_DESC_LOW, 0x1008);
    d.write32(regs::QUEUE_DRIVER_LOW, 0x2001);
    d.write32(regs::QUEUE_DEVICE_LOW, 0x3002);
    assert_eq!(d.dev.state().queues[0].desc_table, 0);
    assert_eq!(d.dev.state().queues[0].avail_ring, 0);
    assert_eq!(d.dev.state().queues[0].used_ring, 0);
    d.write32(regs::QUEUE_DESC_HIGH, 0x12);
    assert_eq!(d.dev.state().queues[0].desc_table, 0x12_0000_0000);
    d.write32(regs::QUEUE_SEL, 2);
    d.write32(regs::QUEUE_NUM, 8);
    d.write32(regs::QUEUE_READY, 1);
    d.write32(regs::QUEUE_READY, 2);
    d.write32(regs::MAGIC_VALUE, 0);
    d.dev.mmio_write(regs::STATUS, &[1], &d.mem);
    d.dev.mmio_write(regs::STATUS + 1, &[1, 0, 0, 0], &d.mem);
    d.dev.mmio_write(0x100, &[0; 6], &d.mem);
    assert_eq!(d.read(0x100, 6), GUEST_MAC, "MAC is read-only");
    assert_eq!(d.dev.state().counters.bad_register_accesses, 14);
    assert_eq!(d.status(), 0);

    // A ready queue cannot be reconfigured.
    let mut d = Driver::new();
    d.init();
    d.write32(regs::QUEUE_SEL, 1);
    d.write32(regs::QUEUE_NUM, 4);
    d.write32(regs::QUEUE_DESC_LOW, 0x8000);
    assert_eq!(d.read32(regs::QUEUE_NUM), u32::from(QSIZE));
    assert_eq!(u64::from(d.read32(regs::QUEUE_DESC_LOW)), DESC[1]);
    // Writing QueueReady 0 stops the queue, and the device with it.
    d.write32(regs::QUEUE_READY, 0);
    assert!(!d.dev.is_active());
}

#[test]
fn interrupt_ack_clears_only_acknowledged_bits() {
    let mut d = Driver::new();
    d.init();
    d.post_rx(&[RX_BUF_LEN]);
    d.deliver(&frame(1, 0)).unwrap();
    d.write16(AVAIL[TX_QUEUE] + 2, 0x100);
    d.pop_tx();
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 3);
    d.write32(regs::INTERRUPT_ACK, INT_CONFIG_CHANGE);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), INT_USED_RING);
    d.write32(regs::INTERRUPT_ACK, u32::MAX);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 0);
}

/// Operations that continue the traffic after a snapshot; returns what
/// the run loop would observe.
fn continue_traffic(dev: &mut VirtioNet, mem: &GuestMemory) -> Vec<String> {
    let mut seen = Vec::new();
    seen.push(format!("{:?}", dev.pop_tx_frames(mem)));
    seen.push(format!("{}", dev.take_irq()));
    for i in 0..5 {
        seen.push(format!("{}", dev.rx_buffers_available(mem)));
        seen.push(format!(
            "{:?}",
            dev.deliver_rx(mem, &frame(50 + i, i as u8))
        ));
        seen.push(format!("{}", dev.take_irq()));
    }
    seen.push(format!("{:?}", dev.pop_tx_frames(mem)));
    seen
}

#[test]
fn state_round_trip_mid_traffic() {
    let mut d = Driver::new();
    d.init();
    for _ in 0..5 {
        d.post_rx(&[RX_BUF_LEN]);
    }
    d.post_rx(&[40]);
    d.deliver(&frame(10, 1)).unwrap();
    d.deliver(&frame(20, 2)).unwrap();
    d.send(&frame(30, 3));
    d.pop_tx();
    d.send(&frame(40, 4));
    d.send(&frame(50, 5));
    // Snapshot with an IRQ pending and TX chains not yet drained.
    let snapshot = d.dev.state();
    assert!(snapshot.irq_pending);
    let json = serde_json::to_string(&snapshot).unwrap();
    let decoded: VirtioNetState = serde_json::from_str(&json).unwrap();
    assert_eq!(decoded, snapshot);
    let mem2 = copy_memory(&d.mem);

    let mut restored = VirtioNet::from_state(&decoded).unwrap();
    assert_eq!(restored, d.dev);

    let original_run = continue_traffic(&mut d.dev, &d.mem);
    let restored_run = continue_traffic(&mut restored, &mem2);
    assert_eq!(original_run, restored_run);
    assert_eq!(restored.state(), d.dev.state());
    assert!(dump(&d.mem) == dump(&mem2), "identical guest memory");
    // The run exercised delivery, a too-small buffer and no buffer.
    let all = original_run.join("\n");
    assert!(all.contains("RxBufferTooSmall"), "{all}");
    assert!(all.contains("NoRxBuffer"), "{all}");
    assert!(all.contains("head: 3"), "{all}");
}

#[test]
fn from_state_rejects_invalid_states() {
    let mut d = Driver::new();
    d.init();
    let good = d.dev.state();
    assert!(VirtioNet::from_state(&good).is_ok());
    type Corruption = fn(&mut VirtioNetState);
    let cases: [(&str, Corruption); 11] = [
        ("status", |s| s.status |= 0x10),
        ("features", |s| s.driver_features |= 1 << 28),
        ("no version 1", |s| s.driver_features = VIRTIO_NET_F_MAC),
        ("isr", |s| s.interrupt_status = 4),
        ("max size", |s| s.queues[0].max_size = 128),
        ("size", |s| s.queues[1].size = 3),
        ("size 0", |s| s.queues[1].size = 0),
        ("event idx", |s| s.queues[0].event_idx_enabled = true),
        ("desc align", |s| s.queues[0].desc_table = 0x1004),
        ("avail align", |s| s.queues[1].avail_ring = 0x2001),
        ("used align", |s| s.queues[1].used_ring = 0x3002),
    ];
    for (name, corrupt) in cases {
        let mut s = good.clone();
        corrupt(&mut s);
        assert!(
            matches!(
                VirtioNet::from_state(&s),
                Err(VirtioNetError::InvalidState(_))
            ),
            "{name}"
        );
    }
}
