//! The virtio-mmio transport (virtio 1.x §4.2): the register window through
//! which the driver negotiates features, drives the status and configures
//! the queues.

use tracing::warn;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::{
    features_acceptable, VirtioNet, VirtioNetError, DEVICE_FEATURES, KNOWN_STATUS, NET_MMIO_SIZE,
    NUM_QUEUES, RX_QUEUE, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, TX_QUEUE,
};
use crate::machine::memory::GuestMemory;

/// virtio-mmio register offsets (virtio 1.x §4.2.2).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const DEVICE_ID_NET: u32 = 1;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"FTVM");

/// `status` field of the config space. F_STATUS is not offered, so drivers
/// do not read it; it still says "link up" for one that does.
const VIRTIO_NET_S_LINK_UP: u16 = 1;
const CONFIG_LEN: usize = 8;

impl VirtioNet {
    /// A read of the register window; `offset` is relative to
    /// [`NET_MMIO_BASE`](super::NET_MMIO_BASE). Registers below the config
    /// space must be read as aligned 4-byte accesses; anything else reads as
    /// zeros.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= NET_MMIO_SIZE {
            self.bad_access(offset, data.len(), "read beyond the register window");
            return;
        }
        if offset >= regs::CONFIG {
            self.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.bad_access(
                offset,
                data.len(),
                "register read that is not 4 aligned bytes",
            );
            return;
        }
        let selected = self.selected_queue().map(|q| &self.queues[q]);
        let value = match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => DEVICE_ID_NET,
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => feature_word(DEVICE_FEATURES, self.device_features_sel),
            regs::DEVICE_FEATURES_SEL => self.device_features_sel,
            regs::DRIVER_FEATURES => feature_word(self.driver_features, self.driver_features_sel),
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel,
            regs::QUEUE_SEL => self.queue_sel,
            // 0 tells the driver that the selected queue does not exist.
            regs::QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size())),
            regs::QUEUE_NUM => selected.map_or(0, |q| u32::from(q.size())),
            regs::QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready())),
            regs::INTERRUPT_STATUS => self.interrupt_status,
            regs::STATUS => u32::from(self.status),
            regs::QUEUE_DESC_LOW => selected.map_or(0, |q| q.desc_table() as u32),
            regs::QUEUE_DESC_HIGH => selected.map_or(0, |q| (q.desc_table() >> 32) as u32),
            regs::QUEUE_DRIVER_LOW => selected.map_or(0, |q| q.avail_ring() as u32),
            regs::QUEUE_DRIVER_HIGH => selected.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            regs::QUEUE_DEVICE_LOW => selected.map_or(0, |q| q.used_ring() as u32),
            regs::QUEUE_DEVICE_HIGH => selected.map_or(0, |q| (q.used_ring() >> 32) as u32),
            // The config space never changes, so its generation never does.
            regs::CONFIG_GENERATION => 0,
            _ => {
                self.bad_access(
                    offset,
                    data.len(),
                    "read of a write-only or unknown register",
                );
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write to the register window; `offset` is relative to
    /// [`NET_MMIO_BASE`](super::NET_MMIO_BASE). `mem` is needed because
    /// making a queue ready checks its rings and sets
    /// `VIRTQ_USED_F_NO_NOTIFY` in the used ring.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], mem: &GuestMemory) {
        if offset >= regs::CONFIG {
            // MAC and status are read-only for a modern driver without
            // VIRTIO_NET_F_CTRL_MAC_ADDR.
            self.bad_access(offset, data.len(), "write to the read-only config space");
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access(offset, data.len(), "register write that is not 4 bytes");
            return;
        };
        if !offset.is_multiple_of(4) {
            self.bad_access(offset, data.len(), "unaligned register write");
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM => self.write_queue_num(value),
            regs::QUEUE_READY => self.write_queue_ready(value, mem),
            regs::QUEUE_NOTIFY => self.notify(value),
            regs::INTERRUPT_ACK => self.interrupt_status &= !value,
            regs::STATUS => self.write_status(value),
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => self.write_queue_address(offset, value),
            _ => self.bad_access(
                offset,
                data.len(),
                "write to a read-only or unknown register",
            ),
        }
    }

    fn bad_access(&mut self, offset: u64, len: usize, what: &str) {
        warn!("virtio-net: {what}: offset {offset:#x}, {len} bytes; ignored");
        self.counters.bad_register_accesses += 1;
    }

    fn selected_queue(&self) -> Option<usize> {
        usize::try_from(self.queue_sel)
            .ok()
            .filter(|&q| q < NUM_QUEUES)
    }

    /// The selected queue, if it may be configured now. A driver must not
    /// change a queue while it is ready (virtio 1.x §4.2.2.2).
    fn configurable_queue(&mut self, offset: u64) -> Option<usize> {
        match self.selected_queue() {
            Some(q) if !self.queues[q].ready() => Some(q),
            Some(_) => {
                self.bad_access(offset, 4, "configuration of a ready queue");
                None
            }
            None => {
                self.bad_access(offset, 4, "configuration of a nonexistent queue");
                None
            }
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        // offset < NET_MMIO_SIZE here, so it fits any usize.
        let start = offset as usize;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            self.bad_access(regs::DRIVER_FEATURES, 4, "feature change after FEATURES_OK");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // No feature above bit 63 exists; asking for none of them is fine.
            _ if value == 0 => {}
            _ => self.bad_access(regs::DRIVER_FEATURES, 4, "features above bit 63"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let value = match u8::try_from(value) {
            Ok(v) if v & !KNOWN_STATUS == 0 => v,
            _ => {
                self.bad_access(regs::STATUS, 4, "status write with reserved bits");
                return;
            }
        };
        let needs_reset = self.status & STATUS_NEEDS_RESET;
        let current = self.status & !STATUS_NEEDS_RESET;
        // NEEDS_RESET belongs to the device; the driver only echoes it.
        let requested = value & !STATUS_NEEDS_RESET;
        if requested & current != current {
            self.bad_access(
                regs::STATUS,
                4,
                "status write that clears bits without a reset",
            );
            return;
        }
        let newly_set = requested & !current;
        let mut status = requested;
        if newly_set & STATUS_FEATURES_OK != 0 && !features_acceptable(self.driver_features) {
            warn!(
                "virtio-net: refusing FEATURES_OK for driver features {:#x} (offered {:#x}, VERSION_1 required)",
                self.driver_features, DEVICE_FEATURES
            );
            status &= !STATUS_FEATURES_OK;
        }
        if newly_set & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0 {
            warn!("virtio-net: refusing DRIVER_OK before FEATURES_OK");
            status &= !STATUS_DRIVER_OK;
        }
        self.status = status | needs_reset;
    }

    /// Device reset (status 0): back to the power-on state except for the
    /// MAC and the statistics.
    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.irq_pending = false;
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn write_queue_num(&mut self, value: u32) {
        let Some(q) = self.configurable_queue(regs::QUEUE_NUM) else {
            return;
        };
        let ok = u16::try_from(value)
            .ok()
            .is_some_and(|size| self.queues[q].try_set_size(size).is_ok());
        if !ok {
            self.bad_access(
                regs::QUEUE_NUM,
                4,
                "queue size not a power of two up to 256",
            );
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.configurable_queue(offset) else {
            return;
        };
        let queue = &mut self.queues[q];
        let (old, high) = match offset {
            regs::QUEUE_DESC_LOW => (queue.desc_table(), false),
            regs::QUEUE_DESC_HIGH => (queue.desc_table(), true),
            regs::QUEUE_DRIVER_LOW => (queue.avail_ring(), false),
            regs::QUEUE_DRIVER_HIGH => (queue.avail_ring(), true),
            regs::QUEUE_DEVICE_LOW => (queue.used_ring(), false),
            _ => (queue.used_ring(), true),
        };
        let new = GuestAddress(if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        });
        let result = match offset {
            regs::QUEUE_DESC_LOW | regs::QUEUE_DESC_HIGH => queue.try_set_desc_table_address(new),
            regs::QUEUE_DRIVER_LOW | regs::QUEUE_DRIVER_HIGH => {
                queue.try_set_avail_ring_address(new)
            }
            _ => queue.try_set_used_ring_address(new),
        };
        if result.is_err() {
            self.bad_access(offset, 4, "misaligned ring address");
        }
    }

    fn write_queue_ready(&mut self, value: u32, mem: &GuestMemory) {
        let Some(q) = self.selected_queue() else {
            self.bad_access(regs::QUEUE_READY, 4, "QueueReady of a nonexistent queue");
            return;
        };
        match value {
            0 => self.queues[q].set_ready(false),
            1 if self.queues[q].ready() => {}
            1 => {
                let queue = &mut self.queues[q];
                queue.set_ready(true);
                // With EVENT_IDX never negotiated, disabling notifications
                // writes VIRTQ_USED_F_NO_NOTIFY into the used ring's flags.
                if !queue.is_valid(mem) || queue.disable_notification(mem).is_err() {
                    queue.set_ready(false);
                    let e = VirtioNetError::QueueOutsideMemory {
                        queue: q,
                        size: queue.size(),
                        desc_table: queue.desc_table(),
                        avail_ring: queue.avail_ring(),
                        used_ring: queue.used_ring(),
                    };
                    self.fail(e);
                }
            }
            _ => self.bad_access(regs::QUEUE_READY, 4, "QueueReady value other than 0 or 1"),
        }
    }

    /// Notifies are only counted: the transmit queue is drained at every
    /// synchronous exit anyway, and receive buffers are only looked at when
    /// a frame arrives.
    fn notify(&mut self, value: u32) {
        match usize::try_from(value) {
            Ok(RX_QUEUE) => self.counters.rx_notifies += 1,
            Ok(TX_QUEUE) => self.counters.tx_notifies += 1,
            _ => self.bad_access(regs::QUEUE_NOTIFY, 4, "notify of a nonexistent queue"),
        }
    }
}

fn feature_word(features: u64, sel: u32) -> u32 {
    match sel {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}
