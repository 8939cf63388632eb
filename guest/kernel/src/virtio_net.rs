//! A virtio-net driver over virtio-mmio (version 2, split virtqueues), built
//! for the ftvm device: queue 0 receives, queue 1 transmits, both polled by
//! the main loop. Every register access is a VM exit, so the data path
//! touches none: the device sets VIRTQ_USED_F_NO_NOTIFY, which this driver
//! honours, and transmit completions are reclaimed by polling without
//! interrupts.

use crate::net::MAX_FRAME_LEN;
use crate::shared::Shared;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicU32, Ordering};

// virtio-mmio registers (virtio 1.x, section 4.2.2).
const MAGIC_VALUE: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const DEVICE_ID_NET: u32 = 1;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

/// The most entries a queue gets (the device offers at most 256).
pub const QUEUE_SIZE: usize = 256;
/// virtio_net_hdr_v1, in front of every frame.
pub const NET_HDR_LEN: usize = 12;
/// A receive buffer must hold a header and a full frame (no mergeable
/// buffers).
const BUFFER_LEN: usize = NET_HDR_LEN + MAX_FRAME_LEN;

#[derive(Clone, Copy)]
#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct UsedElem {
    id: u32,
    len: u32,
}

/// A split virtqueue; each part page aligned, which more than meets the
/// 16/2/4-byte alignments virtio requires.
#[repr(C, align(4096))]
struct Virtq {
    desc: [Desc; QUEUE_SIZE],
    avail: Avail,
    used: Used,
}

#[repr(C, align(4096))]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[repr(C, align(4096))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: u16,
}

impl Virtq {
    const fn new() -> Virtq {
        Virtq {
            desc: [Desc {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }; QUEUE_SIZE],
            avail: Avail {
                flags: 0,
                idx: 0,
                ring: [0; QUEUE_SIZE],
                used_event: 0,
            },
            used: Used {
                flags: 0,
                idx: 0,
                ring: [UsedElem { id: 0, len: 0 }; QUEUE_SIZE],
                avail_event: 0,
            },
        }
    }
}

#[repr(C, align(64))]
struct Buffers([[u8; BUFFER_LEN]; QUEUE_SIZE]);

// The device reads and writes these behind the compiler's back: they are
// only accessed through raw pointers, with volatile accesses for the rings.
static RX_VIRTQ: Shared<Virtq> = Shared::new(Virtq::new());
static TX_VIRTQ: Shared<Virtq> = Shared::new(Virtq::new());
static RX_BUFFERS: Shared<Buffers> = Shared::new(Buffers([[0; BUFFER_LEN]; QUEUE_SIZE]));
static TX_BUFFERS: Shared<Buffers> = Shared::new(Buffers([[0; BUFFER_LEN]; QUEUE_SIZE]));

/// The register window (identity mapped, so the address is the pointer).
#[derive(Clone, Copy)]
struct Mmio(usize);

impl Mmio {
    fn read(self, register: usize) -> u32 {
        // SAFETY: the boot info names this window (below 4 GiB, so mapped by
        // the boot page tables) as the device's registers; an aligned 32-bit
        // access has no effect beyond the register's.
        unsafe { read_volatile((self.0 + register) as *const u32) }
    }

    fn write(self, register: usize, value: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.0 + register) as *mut u32, value) }
    }

    fn write64(self, low: usize, high: usize, value: u64) {
        self.write(low, value as u32);
        self.write(high, (value >> 32) as u32);
    }
}

/// A virtqueue as the driver sees it.
struct Queue {
    mmio: Mmio,
    index: u32,
    virtq: *mut Virtq,
    buffers: *mut Buffers,
    /// A power of two, at most QUEUE_SIZE.
    size: u16,
    /// The driver's copy of avail.idx (free running).
    next_avail: u16,
    /// The used.idx up to which completions have been consumed.
    last_used: u16,
}

impl Queue {
    fn setup(
        mmio: Mmio,
        index: u32,
        virtq: &'static Shared<Virtq>,
        buffers: &'static Shared<Buffers>,
        limit: usize,
    ) -> Result<Queue, &'static str> {
        mmio.write(QUEUE_SEL, index);
        if mmio.read(QUEUE_READY) != 0 {
            return Err("queue already in use");
        }
        let max = mmio.read(QUEUE_NUM_MAX).min(limit.min(QUEUE_SIZE) as u32);
        if max == 0 {
            return Err("queue not available");
        }
        // Split virtqueues need a power-of-two size.
        let size = 1u16 << (31 - max.leading_zeros());
        mmio.write(QUEUE_NUM, size as u32);
        let virtq = virtq.get();
        // SAFETY: only addresses are taken; the queue is not live yet.
        let (desc, avail, used) = unsafe {
            (
                addr_of!((*virtq).desc) as u64,
                addr_of!((*virtq).avail) as u64,
                addr_of!((*virtq).used) as u64,
            )
        };
        mmio.write64(QUEUE_DESC_LOW, QUEUE_DESC_HIGH, desc);
        mmio.write64(QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail);
        mmio.write64(QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used);
        Ok(Queue {
            mmio,
            index,
            virtq,
            buffers: buffers.get(),
            size,
            next_avail: 0,
            last_used: 0,
        })
    }

    fn enable(&self) {
        self.mmio.write(QUEUE_SEL, self.index);
        self.mmio.write(QUEUE_READY, 1);
    }

    fn buffer_addr(&self, id: u16) -> u64 {
        // SAFETY: id < size <= QUEUE_SIZE; only the address is computed.
        unsafe { addr_of!((*self.buffers).0[id as usize]) as u64 }
    }

    fn set_desc(&mut self, id: u16, len: u32, flags: u16) {
        let desc = Desc {
            addr: self.buffer_addr(id),
            len,
            flags,
            next: 0,
        };
        // SAFETY: id < size; the device reads a descriptor only after it is
        // made available, which happens after this write.
        unsafe { write_volatile(addr_of_mut!((*self.virtq).desc[id as usize]), desc) }
    }

    /// Puts descriptor `id` in the avail ring without publishing it.
    fn push_avail(&mut self, id: u16) {
        let slot = (self.next_avail & (self.size - 1)) as usize;
        // SAFETY: slot < size; the device does not read ring entries beyond
        // avail.idx, which still excludes this one.
        unsafe { write_volatile(addr_of_mut!((*self.virtq).avail.ring[slot]), id) }
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes the pushed entries, then notifies the device unless it has
    /// said it needs no notification.
    fn publish(&mut self) {
        // The buffer contents and ring entries must be in memory before the
        // index that hands them over.
        compiler_fence(Ordering::Release);
        // SAFETY: avail.idx is written only by the driver.
        unsafe { write_volatile(addr_of_mut!((*self.virtq).avail.idx), self.next_avail) }
        full_barrier();
        // SAFETY: used.flags is written by the device and read here only.
        let used_flags = unsafe { read_volatile(addr_of!((*self.virtq).used.flags)) };
        if used_flags & VIRTQ_USED_F_NO_NOTIFY == 0 {
            self.notify();
        }
    }

    fn notify(&self) {
        self.mmio.write(QUEUE_NOTIFY, self.index);
    }

    /// The next completion from the used ring: (descriptor id, bytes written).
    fn pop_used(&mut self) -> Option<(u32, u32)> {
        // SAFETY: used.idx is written by the device; a volatile read sees
        // its latest value.
        let used_idx = unsafe { read_volatile(addr_of!((*self.virtq).used.idx)) };
        if used_idx == self.last_used {
            return None;
        }
        // The element (and the buffer it names) must be read after the index
        // that says it is there.
        compiler_fence(Ordering::Acquire);
        let slot = (self.last_used & (self.size - 1)) as usize;
        // SAFETY: slot < size; the device wrote this element before it
        // advanced used.idx past it.
        let elem = unsafe { read_volatile(addr_of!((*self.virtq).used.ring[slot])) };
        self.last_used = self.last_used.wrapping_add(1);
        Some((elem.id, elem.len))
    }
}

/// A full memory barrier without `mfence` (an SSE2 instruction, which the
/// image must not contain): a locked exchange orders every earlier store
/// before every later load.
fn full_barrier() {
    static BARRIER: AtomicU32 = AtomicU32::new(0);
    BARRIER.swap(0, Ordering::SeqCst);
}

/// A received frame the driver owns until it is given back with
/// [`Receiver::repost`].
pub struct RxBuffer {
    id: u16,
    len: usize,
}

pub struct Receiver(Queue);

impl Receiver {
    /// The next received buffer, if any. Completions naming a descriptor the
    /// queue does not have are skipped.
    #[inline(never)]
    pub fn next(&mut self) -> Option<RxBuffer> {
        loop {
            let (id, len) = self.0.pop_used()?;
            if id < self.0.size as u32 {
                return Some(RxBuffer {
                    id: id as u16,
                    len: (len as usize).min(BUFFER_LEN),
                });
            }
        }
    }

    /// The Ethernet frame in `buffer` (empty if the device wrote less than
    /// a virtio-net header).
    pub fn frame(&self, buffer: &RxBuffer) -> &[u8] {
        let start = self.0.buffer_addr(buffer.id) as *const u8;
        let len = buffer.len.saturating_sub(NET_HDR_LEN);
        // SAFETY: the device has handed this buffer back and gets it again
        // only through `repost`, which needs `&mut self`, so it does not
        // write the bytes while this borrow lives; len <= MAX_FRAME_LEN.
        unsafe { core::slice::from_raw_parts(start.add(NET_HDR_LEN), len) }
    }

    /// How far the receive used ring has been consumed (free running), for
    /// [`crate::port::idle`].
    pub fn seen(&self) -> u16 {
        self.0.last_used
    }

    /// Gives a buffer back to the device for the next frame.
    #[inline(never)]
    pub fn repost(&mut self, buffer: RxBuffer) {
        self.0.push_avail(buffer.id);
        self.0.publish();
    }
}

/// A transmit buffer the driver owns until it is sent.
pub struct TxBuffer {
    id: u16,
}

pub struct Transmitter {
    queue: Queue,
    /// Descriptors not in flight.
    free: [u16; QUEUE_SIZE],
    free_len: usize,
}

impl Transmitter {
    /// A free transmit buffer. If all are in flight, reclaims completions,
    /// and if there are none, notifies the device once (the exit makes it
    /// drain the queue) and tries again.
    #[inline(never)]
    pub fn alloc(&mut self) -> Option<TxBuffer> {
        if self.free_len == 0 {
            self.reclaim();
        }
        if self.free_len == 0 {
            self.queue.notify();
            self.reclaim();
        }
        self.free_len = self.free_len.checked_sub(1)?;
        Some(TxBuffer {
            id: self.free[self.free_len],
        })
    }

    /// Space for the Ethernet frame (MAX_FRAME_LEN bytes) in `buffer`.
    pub fn frame_mut(&mut self, buffer: &TxBuffer) -> &mut [u8] {
        let start = self.queue.buffer_addr(buffer.id) as *mut u8;
        // SAFETY: the buffer is not in flight (it came from `alloc` and was
        // not sent yet), so nothing else reads or writes it; the header
        // stays zero, as allocated in .bss, and the device ignores it.
        unsafe { core::slice::from_raw_parts_mut(start.add(NET_HDR_LEN), MAX_FRAME_LEN) }
    }

    /// Hands `frame_len` bytes of `buffer` to the device.
    #[inline(never)]
    pub fn send(&mut self, buffer: TxBuffer, frame_len: usize) {
        let len = (NET_HDR_LEN + frame_len.min(MAX_FRAME_LEN)) as u32;
        self.queue.set_desc(buffer.id, len, 0);
        self.queue.push_avail(buffer.id);
        self.queue.publish();
    }

    /// Notifies the device, whatever the used ring's flags say: the exit
    /// makes the VMM drain the queue now. A guest that gives the CPU to
    /// another task instead of halting needs it, or its replies would wait
    /// for its next exit.
    pub fn flush(&self) {
        self.queue.notify();
    }

    /// Returns an unused buffer.
    pub fn release(&mut self, buffer: TxBuffer) {
        self.push_free(buffer.id);
    }

    /// Takes back every buffer the device has finished with.
    #[inline(never)]
    pub fn reclaim(&mut self) {
        while let Some((id, _)) = self.queue.pop_used() {
            if id < self.queue.size as u32 {
                self.push_free(id as u16);
            }
        }
    }

    fn push_free(&mut self, id: u16) {
        if let Some(slot) = self.free.get_mut(self.free_len) {
            *slot = id;
            self.free_len += 1;
        }
    }
}

pub struct VirtioNet {
    pub rx: Receiver,
    pub tx: Transmitter,
}

impl VirtioNet {
    /// Initialises the device at `base` (virtio 1.x, section 3.1.1) and fills
    /// the receive queue. On error the device is marked FAILED.
    /// At most `rx_limit` receive buffers are posted (the device's maximum
    /// and 256 bound it too).
    pub fn init(base: usize, rx_limit: usize) -> Result<VirtioNet, &'static str> {
        let mmio = Mmio(base);
        if mmio.read(MAGIC_VALUE) != MMIO_MAGIC {
            return Err("no device (bad magic)");
        }
        if mmio.read(VERSION) != MMIO_VERSION {
            return Err("not virtio-mmio version 2");
        }
        if mmio.read(DEVICE_ID) != DEVICE_ID_NET {
            return Err("not a network device");
        }
        let result = Self::negotiate(mmio, rx_limit);
        if result.is_err() {
            mmio.write(STATUS, STATUS_FAILED);
        }
        result
    }

    fn negotiate(mmio: Mmio, rx_limit: usize) -> Result<VirtioNet, &'static str> {
        mmio.write(STATUS, 0);
        let mut status = STATUS_ACKNOWLEDGE;
        mmio.write(STATUS, status);
        status |= STATUS_DRIVER;
        mmio.write(STATUS, status);

        mmio.write(DEVICE_FEATURES_SEL, 0);
        let low = mmio.read(DEVICE_FEATURES) as u64;
        mmio.write(DEVICE_FEATURES_SEL, 1);
        let high = mmio.read(DEVICE_FEATURES) as u64;
        let features = (high << 32 | low) & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err("VIRTIO_F_VERSION_1 not offered");
        }
        mmio.write(DRIVER_FEATURES_SEL, 0);
        mmio.write(DRIVER_FEATURES, features as u32);
        mmio.write(DRIVER_FEATURES_SEL, 1);
        mmio.write(DRIVER_FEATURES, (features >> 32) as u32);
        status |= STATUS_FEATURES_OK;
        mmio.write(STATUS, status);
        if mmio.read(STATUS) & STATUS_FEATURES_OK == 0 {
            return Err("features not accepted");
        }

        let mut rx = Queue::setup(mmio, RX_QUEUE, &RX_VIRTQ, &RX_BUFFERS, rx_limit)?;
        let mut tx = Queue::setup(mmio, TX_QUEUE, &TX_VIRTQ, &TX_BUFFERS, QUEUE_SIZE)?;
        for id in 0..rx.size {
            rx.set_desc(id, BUFFER_LEN as u32, VIRTQ_DESC_F_WRITE);
            rx.push_avail(id);
        }
        // SAFETY: the queue is not live yet; avail.flags is the driver's.
        unsafe {
            write_volatile(
                addr_of_mut!((*tx.virtq).avail.flags),
                VIRTQ_AVAIL_F_NO_INTERRUPT,
            )
        }
        let mut free = [0; QUEUE_SIZE];
        for id in 0..tx.size {
            tx.set_desc(id, 0, 0);
            free[id as usize] = id;
        }
        rx.enable();
        tx.enable();
        mmio.write(STATUS, status | STATUS_DRIVER_OK);
        // Hands over the receive buffers; this notifies only if the device
        // has not set NO_NOTIFY by now.
        rx.publish();
        let free_len = tx.size as usize;
        Ok(VirtioNet {
            rx: Receiver(rx),
            tx: Transmitter {
                queue: tx,
                free,
                free_len,
            },
        })
    }
}
