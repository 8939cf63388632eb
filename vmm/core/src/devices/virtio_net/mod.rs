//! virtio-net over virtio-mmio (version 2), as a deterministic state machine.
//!
//! The guest ABI (docs/guest-abi.md, "virtio-net over virtio-mmio") fixes the
//! device: features `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC`, queue 0 for
//! receive and 1 for transmit, a 12-byte `virtio_net_hdr_v1` in front of every
//! frame, `VIRTQ_USED_F_NO_NOTIFY` in both used rings.
//!
//! Determinism (DESIGN.md §3) shapes the interface: the device never acts on
//! its own. Its state and guest memory change only inside
//! [`VirtioNet::mmio_read`]/[`VirtioNet::mmio_write`],
//! [`VirtioNet::pop_tx_frames`], [`VirtioNet::deliver_rx`] and
//! [`VirtioNet::take_irq`], which the run loop calls at synchronous exits, so
//! primary and backup make the same changes at the same positions. Everything the device does is a function of
//! its state and guest memory, never of time or host addresses.
//!
//! Everything the guest controls (register values, ring indices, descriptors)
//! is untrusted. A malformed descriptor chain is returned to the guest as used
//! (length 0), counted and reported; a broken ring (an available index that
//! runs ahead by more than the queue size, a head index outside the queue,
//! rings outside memory) puts the device in `DEVICE_NEEDS_RESET`, after which
//! it touches no queue until the driver resets it.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, Le16, Permissions};

use crate::machine::memory::GuestMemory;

use crate::host::frame::MAX_FRAME_LEN;

/// Guest-physical base of the register window.
pub const NET_MMIO_BASE: u64 = 0xd000_0000;
/// Size of the register window.
pub const NET_MMIO_SIZE: u64 = 0x1000;
/// The device's (edge-triggered) IRQ line on the PIC.
pub const NET_IRQ: u8 = 5;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The largest queue size the device accepts (QueueNumMax).
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, in front of every frame in both directions.
pub const NET_HDR_LEN: usize = 12;

/// `VIRTIO_F_VERSION_1`: a modern device; required of the driver.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Everything the device offers.
pub const DEVICE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;

/// Device status bits (virtio 1.x §2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 0x01;
pub const STATUS_DRIVER: u8 = 0x02;
pub const STATUS_DRIVER_OK: u8 = 0x04;
pub const STATUS_FEATURES_OK: u8 = 0x08;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
const KNOWN_STATUS: u8 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 0x1;
pub const INT_CONFIG_CHANGE: u32 = 0x2;

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

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const DESCRIPTOR_SIZE: u64 = 16;
/// Offset of `ring[0]` in the available ring (after `flags` and `idx`).
const AVAIL_RING_OFFSET: u64 = 4;
const MAX_TX_CHAIN_LEN: usize = NET_HDR_LEN + MAX_FRAME_LEN;

const NUM_QUEUES: usize = 2;

fn queue_name(queue: usize) -> &'static str {
    match queue {
        RX_QUEUE => "RX",
        TX_QUEUE => "TX",
        _ => "unknown",
    }
}

/// What went wrong, with enough detail to find the guest's mistake.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VirtioNetError {
    #[error("device not active (DRIVER_OK not set, a queue not ready, FAILED, or needs reset)")]
    NotActive,
    #[error("no receive buffer available")]
    NoRxBuffer,
    #[error("frame of {len} bytes is longer than the maximum of {max}")]
    FrameTooLong { len: usize, max: usize },
    #[error("RX chain {head} holds {capacity} bytes, but header plus frame need {needed}")]
    RxBufferTooSmall {
        head: u16,
        capacity: u64,
        needed: usize,
    },
    #[error("TX chain {head} is {len} bytes, more than header plus maximum frame ({max})")]
    TxChainTooLong { head: u16, len: u64, max: usize },
    #[error(
        "TX chain {head} is {len} bytes, shorter than the {NET_HDR_LEN}-byte virtio-net header"
    )]
    TxChainTooShort { head: u16, len: u64 },
    #[error("{} chain {head}: next descriptor index {index} is outside the queue of size {size}", queue_name(*queue))]
    DescriptorIndexOutOfRange {
        queue: usize,
        head: u16,
        index: u16,
        size: u16,
    },
    #[error("{} chain {head}: longer than the queue size {size} (a loop)", queue_name(*queue))]
    ChainLoop { queue: usize, head: u16, size: u16 },
    #[error("{} chain {head}: descriptor {index} is indirect, but VIRTIO_F_INDIRECT_DESC was not offered", queue_name(*queue))]
    IndirectDescriptor { queue: usize, head: u16, index: u16 },
    #[error("{} chain {head}: descriptor {index} is {}, the device needs it {}", queue_name(*queue),
        if *write_only { "write-only" } else { "read-only" },
        if *write_only { "readable" } else { "writable" })]
    WrongDirection {
        queue: usize,
        head: u16,
        index: u16,
        write_only: bool,
    },
    #[error("{} chain {head}: descriptor {index} buffer {addr:#x}+{len:#x} is outside guest memory", queue_name(*queue))]
    BufferOutsideMemory {
        queue: usize,
        head: u16,
        index: u16,
        addr: u64,
        len: u32,
    },
    #[error("{} queue: available ring names head {head}, outside the queue of size {size}", queue_name(*queue))]
    HeadIndexOutOfRange { queue: usize, head: u16, size: u16 },
    #[error("{} queue: available index {avail_idx} is more than the queue size {size} ahead of the device's {next_avail}", queue_name(*queue))]
    AvailIndexOutOfRange {
        queue: usize,
        avail_idx: u16,
        next_avail: u16,
        size: u16,
    },
    #[error("{} queue: {what} at {addr:#x} is not accessible in guest memory", queue_name(*queue))]
    RingOutsideMemory {
        queue: usize,
        what: &'static str,
        addr: u64,
    },
    #[error("{} queue: size {size} with descriptor table {desc_table:#x}, available ring {avail_ring:#x}, used ring {used_ring:#x} does not fit in guest memory", queue_name(*queue))]
    QueueOutsideMemory {
        queue: usize,
        size: u16,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    },
    #[error("invalid virtio-net state: {0}")]
    InvalidState(String),
}

/// What one drain of the transmit queue produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxBatch {
    /// The frames, without the virtio-net header, in available-ring order.
    pub frames: Vec<Vec<u8>>,
    /// One entry per chain that was skipped, and at most one ring error.
    pub errors: Vec<VirtioNetError>,
}

/// Where [`VirtioNet::deliver_rx`] put a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxPlacement {
    /// Head descriptor index of the receive chain.
    pub head: u16,
    /// Bytes written (header plus frame), as put in the used ring.
    pub len: u32,
}

/// Statistics. They are part of the state because they only change at
/// synchronous exits, so primary and backup keep identical copies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetCounters {
    pub tx_frames: u64,
    pub tx_bad_chains: u64,
    pub tx_notifies: u64,
    pub rx_frames: u64,
    pub rx_bad_chains: u64,
    pub rx_notifies: u64,
    pub interrupts: u64,
    pub bad_register_accesses: u64,
    pub needs_reset_events: u64,
}

/// One queue's state: the fields of virtio-queue's `QueueState`, made
/// serializable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqState {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for VirtqState {
    fn from(s: QueueState) -> Self {
        VirtqState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<VirtqState> for QueueState {
    fn from(s: VirtqState) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Everything that determines the device's future behaviour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    pub mac: [u8; 6],
    /// The Status register, including the device-owned NEEDS_RESET bit.
    pub status: u8,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub irq_pending: bool,
    pub queues: [VirtqState; NUM_QUEUES],
    pub counters: VirtioNetCounters,
}

/// The virtio-net device and its virtio-mmio transport.
#[derive(Debug)]
pub struct VirtioNet {
    mac: [u8; 6],
    status: u8,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    irq_pending: bool,
    queues: [Queue; NUM_QUEUES],
    counters: VirtioNetCounters,
}

impl PartialEq for VirtioNet {
    fn eq(&self, other: &Self) -> bool {
        self.state() == other.state()
    }
}

impl Eq for VirtioNet {}

/// One buffer of a descriptor chain, already checked against guest memory.
struct Segment {
    index: u16,
    addr: GuestAddress,
    len: u32,
}

fn new_queue() -> Queue {
    Queue::new(QUEUE_MAX_SIZE).expect("QUEUE_MAX_SIZE is a valid power of two")
}

impl VirtioNet {
    /// A device in its power-on state, offering `mac` in its config space.
    pub fn new(mac: [u8; 6]) -> Self {
        VirtioNet {
            mac,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            irq_pending: false,
            queues: [new_queue(), new_queue()],
            counters: VirtioNetCounters::default(),
        }
    }

    /// DRIVER_OK is set, FAILED and NEEDS_RESET are not, and both queues are
    /// ready. Only then does the device touch the queues.
    pub fn is_active(&self) -> bool {
        self.status & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET) == STATUS_DRIVER_OK
            && self.queues.iter().all(|q| q.ready())
    }

    /// A read of the register window; `offset` is relative to
    /// [`NET_MMIO_BASE`]. Registers below the config space must be read as
    /// aligned 4-byte accesses; anything else reads as zeros.
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
    /// [`NET_MMIO_BASE`]. `mem` is needed because making a queue ready
    /// checks its rings and sets `VIRTQ_USED_F_NO_NOTIFY` in the used ring.
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

    /// Drains the transmit queue: every available chain is read (the
    /// 12-byte header is skipped; header and frame may be split over any
    /// number of descriptors), its frame returned and the chain put in the
    /// used ring with length 0. Malformed chains are put in the used ring
    /// too, reported in `errors` and counted; the frames around them still
    /// come out. IRQ edge (see [`Self::take_irq`]) if anything was used and
    /// the driver did not set `VIRTQ_AVAIL_F_NO_INTERRUPT`.
    ///
    /// Does nothing unless [`Self::is_active`].
    pub fn pop_tx_frames(&mut self, mem: &GuestMemory) -> TxBatch {
        let mut batch = TxBatch::default();
        if !self.is_active() {
            return batch;
        }
        let pending = match self.pending(mem, TX_QUEUE) {
            Ok(n) => n,
            Err(e) => {
                batch.errors.push(self.fail(e));
                return batch;
            }
        };
        let mut used_any = false;
        for _ in 0..pending {
            let head = match self.pop_head(mem, TX_QUEUE) {
                Ok(head) => head,
                Err(e) => {
                    batch.errors.push(self.fail(e));
                    break;
                }
            };
            match self.read_tx_chain(mem, head) {
                Ok(frame) => {
                    self.counters.tx_frames += 1;
                    batch.frames.push(frame);
                }
                Err(e) => {
                    warn!("virtio-net: skipping TX chain: {e}");
                    self.counters.tx_bad_chains += 1;
                    batch.errors.push(e);
                }
            }
            if let Err(e) = self.add_used(mem, TX_QUEUE, head, 0) {
                batch.errors.push(self.fail(e));
                break;
            }
            used_any = true;
        }
        if used_any {
            if let Err(e) = self.signal_used(mem, TX_QUEUE) {
                batch.errors.push(self.fail(e));
            }
        }
        batch
    }

    /// Number of receive chains the driver has made available (0 if the
    /// device is not active or the ring is broken).
    ///
    /// A pure query: the primary may ask it at positions where the backup
    /// does not, so it must not change anything.
    pub fn rx_buffers_available(&self, mem: &GuestMemory) -> usize {
        if !self.is_active() {
            return 0;
        }
        self.pending(mem, RX_QUEUE).map_or(0, usize::from)
    }

    /// Writes a zero `virtio_net_hdr_v1` (with `num_buffers` = 1) followed by
    /// `frame` into the next available receive chain, puts the chain in the
    /// used ring with the length written, sets InterruptStatus bit 0 and
    /// marks an IRQ edge pending (unless the driver set
    /// `VIRTQ_AVAIL_F_NO_INTERRUPT` on the receive queue).
    ///
    /// Errors, and what they leave behind:
    /// - [`VirtioNetError::FrameTooLong`], [`VirtioNetError::NotActive`],
    ///   [`VirtioNetError::NoRxBuffer`]: nothing changed at all.
    /// - the chain cannot take the frame ([`VirtioNetError::RxBufferTooSmall`])
    ///   or is malformed: the frame is dropped and the chain is consumed and
    ///   put in the used ring with length 0 (with the usual IRQ), so that one
    ///   bad buffer cannot block reception forever. The driver sees a used
    ///   length below [`NET_HDR_LEN`] and must repost the buffer.
    /// - a broken ring: the device enters NEEDS_RESET.
    ///
    /// In the last two cases the device state changed, so such a delivery
    /// must be logged and replayed like a successful one.
    pub fn deliver_rx(
        &mut self,
        mem: &GuestMemory,
        frame: &[u8],
    ) -> Result<RxPlacement, VirtioNetError> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(VirtioNetError::FrameTooLong {
                len: frame.len(),
                max: MAX_FRAME_LEN,
            });
        }
        if !self.is_active() {
            return Err(VirtioNetError::NotActive);
        }
        match self.pending(mem, RX_QUEUE) {
            Ok(0) => return Err(VirtioNetError::NoRxBuffer),
            Ok(_) => {}
            Err(e) => return Err(self.fail(e)),
        }
        let head = self.pop_head(mem, RX_QUEUE).map_err(|e| self.fail(e))?;
        let written = self.write_rx_chain(mem, head, frame);
        let used_len = match &written {
            Ok(len) => *len,
            Err(e) => {
                warn!("virtio-net: dropping RX frame: {e}");
                0
            }
        };
        self.add_used(mem, RX_QUEUE, head, used_len)
            .map_err(|e| self.fail(e))?;
        self.signal_used(mem, RX_QUEUE).map_err(|e| self.fail(e))?;
        match written {
            Ok(len) => {
                self.counters.rx_frames += 1;
                Ok(RxPlacement { head, len })
            }
            Err(e) => {
                self.counters.rx_bad_chains += 1;
                Err(e)
            }
        }
    }

    /// Whether an IRQ edge is pending; clears it. Several raises between two
    /// calls make one edge, as on a real edge-triggered line.
    pub fn take_irq(&mut self) -> bool {
        std::mem::take(&mut self.irq_pending)
    }

    /// Everything needed to continue exactly where this device is, given the
    /// same guest memory.
    pub fn state(&self) -> VirtioNetState {
        VirtioNetState {
            mac: self.mac,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            irq_pending: self.irq_pending,
            queues: [self.queues[0].state().into(), self.queues[1].state().into()],
            counters: self.counters,
        }
    }

    /// Rebuilds a device from [`Self::state`]. The state comes from a
    /// snapshot file or the network, so it is validated as strictly as the
    /// device validates the guest.
    pub fn from_state(state: &VirtioNetState) -> Result<Self, VirtioNetError> {
        let invalid = |msg: String| VirtioNetError::InvalidState(msg);
        if state.status & !KNOWN_STATUS != 0 {
            return Err(invalid(format!("unknown status bits {:#x}", state.status)));
        }
        // Before FEATURES_OK the driver may have written anything; after it,
        // only what the device accepts.
        if state.status & STATUS_FEATURES_OK != 0 && !features_acceptable(state.driver_features) {
            return Err(invalid(format!(
                "FEATURES_OK with driver features {:#x} (offered {DEVICE_FEATURES:#x})",
                state.driver_features
            )));
        }
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE) != 0 {
            return Err(invalid(format!(
                "unknown interrupt status bits {:#x}",
                state.interrupt_status
            )));
        }
        let queue = |q: usize| -> Result<Queue, VirtioNetError> {
            let s = state.queues[q];
            if s.max_size != QUEUE_MAX_SIZE {
                return Err(invalid(format!(
                    "{} queue max size {} (the device's is {QUEUE_MAX_SIZE})",
                    queue_name(q),
                    s.max_size
                )));
            }
            if s.event_idx_enabled {
                return Err(invalid(format!(
                    "{} queue has EVENT_IDX, which the device never offers",
                    queue_name(q)
                )));
            }
            Queue::try_from(QueueState::from(s))
                .map_err(|e| invalid(format!("{} queue: {e}", queue_name(q))))
        };
        Ok(VirtioNet {
            mac: state.mac,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            interrupt_status: state.interrupt_status,
            irq_pending: state.irq_pending,
            queues: [queue(RX_QUEUE)?, queue(TX_QUEUE)?],
            counters: state.counters,
        })
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

    /// Enters DEVICE_NEEDS_RESET for an error the device cannot work
    /// around, and tells the driver with a configuration change interrupt
    /// if it is running (virtio 1.x §2.1.2).
    fn fail(&mut self, e: VirtioNetError) -> VirtioNetError {
        if self.status & STATUS_NEEDS_RESET == 0 {
            warn!("virtio-net: device needs reset: {e}");
            self.status |= STATUS_NEEDS_RESET;
            self.counters.needs_reset_events += 1;
            if self.status & STATUS_DRIVER_OK != 0 {
                self.raise(INT_CONFIG_CHANGE);
            }
        }
        e
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        self.irq_pending = true;
        self.counters.interrupts += 1;
    }

    /// Chains made available but not yet taken.
    fn pending(&self, mem: &GuestMemory, q: usize) -> Result<u16, VirtioNetError> {
        let queue = &self.queues[q];
        let avail_idx = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|_| VirtioNetError::RingOutsideMemory {
                queue: q,
                what: "available ring index",
                addr: queue.avail_ring().wrapping_add(2),
            })?
            .0;
        let pending = avail_idx.wrapping_sub(queue.next_avail());
        if pending > queue.size() {
            return Err(VirtioNetError::AvailIndexOutOfRange {
                queue: q,
                avail_idx,
                next_avail: queue.next_avail(),
                size: queue.size(),
            });
        }
        Ok(pending)
    }

    /// Takes the next head from the available ring. The caller has checked
    /// with [`Self::pending`] that there is one.
    fn pop_head(&mut self, mem: &GuestMemory, q: usize) -> Result<u16, VirtioNetError> {
        let queue = &mut self.queues[q];
        let size = queue.size();
        // The queue's size is never 0: virtio-queue refuses to set it.
        let slot = queue.next_avail() % size;
        let addr = queue
            .avail_ring()
            .wrapping_add(AVAIL_RING_OFFSET + 2 * u64::from(slot));
        let head = mem
            .read_obj::<Le16>(GuestAddress(addr))
            .map_err(|_| VirtioNetError::RingOutsideMemory {
                queue: q,
                what: "available ring entry",
                addr,
            })?
            .into();
        queue.set_next_avail(queue.next_avail().wrapping_add(1));
        if head >= size {
            return Err(VirtioNetError::HeadIndexOutOfRange {
                queue: q,
                head,
                size,
            });
        }
        Ok(head)
    }

    fn add_used(
        &mut self,
        mem: &GuestMemory,
        q: usize,
        head: u16,
        len: u32,
    ) -> Result<(), VirtioNetError> {
        let queue = &mut self.queues[q];
        queue
            .add_used(mem, head, len)
            .map_err(|_| VirtioNetError::RingOutsideMemory {
                queue: q,
                what: "used ring",
                addr: queue.used_ring(),
            })
    }

    /// Raises the used-buffer interrupt unless the driver asked not to.
    /// virtio-queue's `needs_notification` ignores `VIRTQ_AVAIL_F_NO_INTERRUPT`,
    /// hence the direct read of the flags.
    fn signal_used(&mut self, mem: &GuestMemory, q: usize) -> Result<(), VirtioNetError> {
        let addr = self.queues[q].avail_ring();
        let flags: u16 = mem
            .read_obj::<Le16>(GuestAddress(addr))
            .map_err(|_| VirtioNetError::RingOutsideMemory {
                queue: q,
                what: "available ring flags",
                addr,
            })?
            .into();
        if flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0 {
            self.raise(INT_USED_RING);
        }
        Ok(())
    }

    /// Follows the chain at `head` and checks every descriptor before any
    /// byte is moved, so that a bad chain is refused as a whole.
    fn walk_chain(
        &self,
        mem: &GuestMemory,
        q: usize,
        head: u16,
        device_writes: bool,
    ) -> Result<Vec<Segment>, VirtioNetError> {
        let queue = &self.queues[q];
        let size = queue.size();
        let table = queue.desc_table();
        let mut segments = Vec::new();
        let mut index = head;
        // A chain has at most `size` descriptors; one more means a loop.
        for _ in 0..size {
            if index >= size {
                return Err(VirtioNetError::DescriptorIndexOutOfRange {
                    queue: q,
                    head,
                    index,
                    size,
                });
            }
            let at = table.wrapping_add(u64::from(index) * DESCRIPTOR_SIZE);
            let desc: Descriptor =
                mem.read_obj(GuestAddress(at))
                    .map_err(|_| VirtioNetError::RingOutsideMemory {
                        queue: q,
                        what: "descriptor",
                        addr: at,
                    })?;
            if desc.flags() & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(VirtioNetError::IndirectDescriptor {
                    queue: q,
                    head,
                    index,
                });
            }
            let write_only = desc.flags() & VIRTQ_DESC_F_WRITE != 0;
            if write_only != device_writes {
                return Err(VirtioNetError::WrongDirection {
                    queue: q,
                    head,
                    index,
                    write_only,
                });
            }
            let permission = if device_writes {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if desc.len() > 0 && !mem.check_range(desc.addr(), desc.len() as usize, permission) {
                return Err(VirtioNetError::BufferOutsideMemory {
                    queue: q,
                    head,
                    index,
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            segments.push(Segment {
                index,
                addr: desc.addr(),
                len: desc.len(),
            });
            if desc.flags() & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(segments);
            }
            index = desc.next();
        }
        Err(VirtioNetError::ChainLoop {
            queue: q,
            head,
            size,
        })
    }

    fn read_tx_chain(&self, mem: &GuestMemory, head: u16) -> Result<Vec<u8>, VirtioNetError> {
        let segments = self.walk_chain(mem, TX_QUEUE, head, false)?;
        let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        if total > MAX_TX_CHAIN_LEN as u64 {
            return Err(VirtioNetError::TxChainTooLong {
                head,
                len: total,
                max: MAX_TX_CHAIN_LEN,
            });
        }
        if total < NET_HDR_LEN as u64 {
            return Err(VirtioNetError::TxChainTooShort { head, len: total });
        }
        // total <= MAX_TX_CHAIN_LEN, so every length below fits in usize.
        let mut bytes = vec![0u8; total as usize];
        let mut at = 0;
        for s in &segments {
            let end = at + s.len as usize;
            mem.read_slice(&mut bytes[at..end], s.addr).map_err(|_| {
                VirtioNetError::BufferOutsideMemory {
                    queue: TX_QUEUE,
                    head,
                    index: s.index,
                    addr: s.addr.0,
                    len: s.len,
                }
            })?;
            at = end;
        }
        bytes.drain(..NET_HDR_LEN);
        Ok(bytes)
    }

    /// Scatters header and frame over the chain; returns the bytes written.
    fn write_rx_chain(
        &self,
        mem: &GuestMemory,
        head: u16,
        frame: &[u8],
    ) -> Result<u32, VirtioNetError> {
        let segments = self.walk_chain(mem, RX_QUEUE, head, true)?;
        let capacity: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        let needed = NET_HDR_LEN + frame.len();
        if capacity < needed as u64 {
            return Err(VirtioNetError::RxBufferTooSmall {
                head,
                capacity,
                needed,
            });
        }
        let mut data = Vec::with_capacity(needed);
        data.extend_from_slice(&rx_header());
        data.extend_from_slice(frame);
        let mut rest = &data[..];
        for s in &segments {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(s.len as usize);
            mem.write_slice(&rest[..n], s.addr).map_err(|_| {
                VirtioNetError::BufferOutsideMemory {
                    queue: RX_QUEUE,
                    head,
                    index: s.index,
                    addr: s.addr.0,
                    len: s.len,
                }
            })?;
            rest = &rest[n..];
        }
        // needed <= NET_HDR_LEN + MAX_FRAME_LEN.
        Ok(needed as u32)
    }
}

/// `virtio_net_hdr_v1` for a received frame: no offloads, no GSO, one
/// buffer (`num_buffers` is the last field).
fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut header = [0u8; NET_HDR_LEN];
    header[10..12].copy_from_slice(&1u16.to_le_bytes());
    header
}

/// A modern driver (VERSION_1) asking only for what the device offers.
fn features_acceptable(driver_features: u64) -> bool {
    driver_features & !DEVICE_FEATURES == 0 && driver_features & VIRTIO_F_VERSION_1 != 0
}

fn feature_word(features: u64, sel: u32) -> u32 {
    match sel {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::frame::{wrap_udp, GATEWAY_MAC, GUEST_IP, GUEST_MAC, GUEST_SERVICE_PORT};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use vm_memory::GuestMemoryMmap;

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
}
