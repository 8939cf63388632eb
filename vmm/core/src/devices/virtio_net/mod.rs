//! virtio-net over virtio-mmio (version 2), as a deterministic state machine.
//!
//! The guest ABI (docs/guest-abi.md, "virtio-net over virtio-mmio") fixes the
//! device: features `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC`, queue 0 for
//! receive and 1 for transmit, a 12-byte `virtio_net_hdr_v1` in front of every
//! frame, `VIRTQ_USED_F_NO_NOTIFY` in both used rings.
//!
//! Determinism (docs/design.md, "The determinism contract") shapes the interface: the device never acts on
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

mod mmio;
mod queue;

pub use mmio::regs;
pub use queue::{RxPlacement, TxBatch, VirtqState};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;
use virtio_queue::{Queue, QueueState, QueueT};

pub use crate::machine::layout::{NET_IRQ, NET_MMIO_BASE, NET_MMIO_SIZE};
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
}

/// A modern driver (VERSION_1) asking only for what the device offers.
fn features_acceptable(driver_features: u64) -> bool {
    driver_features & !DEVICE_FEATURES == 0 && driver_features & VIRTIO_F_VERSION_1 != 0
}

#[cfg(test)]
mod tests;
