use super::queue::{
    rx_header, DESCRIPTOR_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use super::*;
use crate::host::frame::{
    wrap_udp, GATEWAY_MAC, GUEST_IP, GUEST_MAC, GUEST_SERVICE_PORT, MAX_FRAME_LEN,
};
use crate::machine::memory::GuestMemory;
use proptest::prelude::*;
use std::net::{Ipv4Addr, SocketAddrV4};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 1 << 20;
const QSIZE: u16 = 16;
const DESC: [u64; 2] = [0x1000, 0x4000];
const AVAIL: [u64; 2] = [0x2000, 0x5000];
const USED: [u64; 2] = [0x3000, 0x6000];
const BUF_BASE: u64 = 0x10000;
const RX_BUF_LEN: u32 = (NET_HDR_LEN + MAX_FRAME_LEN) as u32;

fn test_memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn dump(mem: &GuestMemory) -> Vec<u8> {
    let mut bytes = vec![0; MEM_SIZE as usize];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}

fn copy_memory(mem: &GuestMemory) -> GuestMemory {
    let copy = test_memory();
    copy.write_slice(&dump(mem), GuestAddress(0)).unwrap();
    copy
}

fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len)
        .map(|i| (i as u8).wrapping_add(seed))
        .collect();
    wrap_udp(
        GATEWAY_MAC,
        GUEST_MAC,
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 7), 40000),
        SocketAddrV4::new(GUEST_IP, GUEST_SERVICE_PORT),
        &payload,
    )
    .unwrap()
}

/// A minimal virtio driver that reaches the device only through its
/// registers and guest memory, as the guest's driver does.
struct Driver {
    dev: VirtioNet,
    mem: GuestMemory,
    avail_idx: [u16; 2],
    next_desc: [u16; 2],
    used_seen: [u16; 2],
    next_buf: u64,
}

impl Driver {
    fn new() -> Self {
        Driver {
            dev: VirtioNet::new(GUEST_MAC),
            mem: test_memory(),
            avail_idx: [0; 2],
            next_desc: [0; 2],
            used_seen: [0; 2],
            next_buf: BUF_BASE,
        }
    }

    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        self.dev.mmio_read(offset, &mut data);
        data
    }

    fn read32(&mut self, offset: u64) -> u32 {
        let mut data = [0xaa; 4];
        self.dev.mmio_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.dev.mmio_write(offset, &value.to_le_bytes(), &self.mem);
    }

    fn status(&mut self) -> u8 {
        self.read32(regs::STATUS) as u8
    }

    fn add_status(&mut self, bits: u8) {
        let status = self.status();
        self.write32(regs::STATUS, u32::from(status | bits));
    }

    fn device_features(&mut self) -> u64 {
        self.write32(regs::DEVICE_FEATURES_SEL, 0);
        let low = self.read32(regs::DEVICE_FEATURES);
        self.write32(regs::DEVICE_FEATURES_SEL, 1);
        let high = self.read32(regs::DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Virtio 1.x §3.1.1 up to FEATURES_OK; whether the device accepted.
    fn negotiate(&mut self, features: u64) -> bool {
        assert_eq!(self.read32(regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read32(regs::VERSION), 2);
        assert_eq!(self.read32(regs::DEVICE_ID), 1);
        self.write32(regs::STATUS, 0);
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        self.write32(regs::DRIVER_FEATURES_SEL, 0);
        self.write32(regs::DRIVER_FEATURES, features as u32);
        self.write32(regs::DRIVER_FEATURES_SEL, 1);
        self.write32(regs::DRIVER_FEATURES, (features >> 32) as u32);
        self.add_status(STATUS_FEATURES_OK);
        self.status() & STATUS_FEATURES_OK != 0
    }

    fn setup_queue(&mut self, q: usize, desc: u64, avail: u64, used: u64) {
        self.write32(regs::QUEUE_SEL, q as u32);
        assert_eq!(self.read32(regs::QUEUE_READY), 0);
        assert_eq!(self.read32(regs::QUEUE_NUM_MAX), 256);
        self.write32(regs::QUEUE_NUM, u32::from(QSIZE));
        self.write32(regs::QUEUE_DESC_LOW, desc as u32);
        self.write32(regs::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write32(regs::QUEUE_DRIVER_LOW, avail as u32);
        self.write32(regs::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write32(regs::QUEUE_DEVICE_LOW, used as u32);
        self.write32(regs::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.write32(regs::QUEUE_READY, 1);
    }

    fn init(&mut self) {
        let offered = self.device_features();
        assert_eq!(offered, DEVICE_FEATURES);
        assert!(self.negotiate(offered));
        for q in [RX_QUEUE, TX_QUEUE] {
            self.setup_queue(q, DESC[q], AVAIL[q], USED[q]);
            assert_eq!(self.read32(regs::QUEUE_READY), 1);
        }
        self.add_status(STATUS_DRIVER_OK);
        assert!(self.dev.is_active());
    }

    /// Resets the device, clears the rings and starts over, as a
    /// driver recovering from NEEDS_RESET would.
    fn reinit(&mut self) {
        self.write32(regs::STATUS, 0);
        let zeros = vec![0u8; 0x6000];
        self.mem.write_slice(&zeros, GuestAddress(0x1000)).unwrap();
        self.avail_idx = [0; 2];
        self.next_desc = [0; 2];
        self.used_seen = [0; 2];
        self.init();
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).div_ceil(16) * 16;
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = BUF_BASE;
        }
        let addr = self.next_buf;
        self.next_buf += len;
        addr
    }

    fn alloc_desc(&mut self, q: usize) -> u16 {
        let index = self.next_desc[q];
        self.next_desc[q] = (index + 1) % QSIZE;
        index
    }

    fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = DESC[q] + DESCRIPTOR_SIZE * u64::from(index);
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    fn write16(&self, addr: u64, value: u16) {
        self.mem
            .write_slice(&value.to_le_bytes(), GuestAddress(addr))
            .unwrap();
    }

    fn read16(&self, addr: u64) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        u16::from_le_bytes(b)
    }

    fn read32_mem(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        u32::from_le_bytes(b)
    }

    fn publish(&mut self, q: usize, head: u16) {
        let slot = self.avail_idx[q] % QSIZE;
        self.write16(AVAIL[q] + 4 + 2 * u64::from(slot), head);
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.write16(AVAIL[q] + 2, self.avail_idx[q]);
    }

    /// Links `bufs` (address, length, flags) into a chain and makes it
    /// available; returns its head.
    fn push_chain(&mut self, q: usize, bufs: &[(u64, u32, u16)]) -> u16 {
        let indices: Vec<u16> = bufs.iter().map(|_| self.alloc_desc(q)).collect();
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            match indices.get(i + 1) {
                Some(&next) => {
                    self.write_desc(q, indices[i], addr, len, flags | VIRTQ_DESC_F_NEXT, next)
                }
                None => self.write_desc(q, indices[i], addr, len, flags, 0),
            }
        }
        self.publish(q, indices[0]);
        indices[0]
    }

    fn post_rx(&mut self, lens: &[u32]) -> (u16, Vec<u64>) {
        let addrs: Vec<u64> = lens.iter().map(|&len| self.alloc(len)).collect();
        let bufs: Vec<_> = addrs
            .iter()
            .zip(lens)
            .map(|(&addr, &len)| (addr, len, VIRTQ_DESC_F_WRITE))
            .collect();
        (self.push_chain(RX_QUEUE, &bufs), addrs)
    }

    fn post_tx(&mut self, pieces: &[&[u8]]) -> u16 {
        let mut bufs = Vec::new();
        for piece in pieces {
            let addr = self.alloc(piece.len() as u32);
            self.mem.write_slice(piece, GuestAddress(addr)).unwrap();
            bufs.push((addr, piece.len() as u32, 0));
        }
        self.push_chain(TX_QUEUE, &bufs)
    }

    fn send(&mut self, frame: &[u8]) -> u16 {
        self.post_tx(&[&[0u8; NET_HDR_LEN], frame])
    }

    fn set_avail_flags(&self, q: usize, flags: u16) {
        self.write16(AVAIL[q], flags);
    }

    /// Used entries (id, len) the device added since the last call.
    fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx = self.read16(USED[q] + 2);
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let at = USED[q] + 4 + 8 * u64::from(self.used_seen[q] % QSIZE);
            out.push((self.read32_mem(at), self.read32_mem(at + 4)));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    fn pop_tx(&mut self) -> TxBatch {
        self.dev.pop_tx_frames(&self.mem)
    }

    fn deliver(&mut self, frame: &[u8]) -> Result<RxPlacement, VirtioNetError> {
        self.dev.deliver_rx(&self.mem, frame)
    }
}

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
