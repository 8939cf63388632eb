//! The two virtqueues: draining the transmit queue, placing received frames,
//! and the ring and descriptor-chain accesses under them, each checked
//! against guest memory before anything is read or written.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tracing::warn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, Le16, Permissions};

use super::{VirtioNet, VirtioNetError, INT_USED_RING, NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use crate::host::frame::MAX_FRAME_LEN;
use crate::machine::memory::GuestMemory;

pub(super) const VIRTQ_DESC_F_NEXT: u16 = 1;
pub(super) const VIRTQ_DESC_F_WRITE: u16 = 2;
pub(super) const VIRTQ_DESC_F_INDIRECT: u16 = 4;
pub(super) const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
pub(super) const DESCRIPTOR_SIZE: u64 = 16;
/// Offset of `ring[0]` in the available ring (after `flags` and `idx`).
const AVAIL_RING_OFFSET: u64 = 4;
const MAX_TX_CHAIN_LEN: usize = NET_HDR_LEN + MAX_FRAME_LEN;

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

/// One buffer of a descriptor chain, already checked against guest memory.
struct Segment {
    index: u16,
    addr: GuestAddress,
    len: u32,
}

impl VirtioNet {
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
pub(super) fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut header = [0u8; NET_HDR_LEN];
    header[10..12].copy_from_slice(&1u16.to_le_bytes());
    header
}
