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

mod faults;
mod props;
mod traffic;
