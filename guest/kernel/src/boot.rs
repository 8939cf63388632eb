//! The boot-info block the VMM leaves at 0x7000 (docs/guest-abi.md).

const MAGIC: u64 = 0x544f_4f42_4d56_5446; // "FTVMBOOT"
const VERSION: u32 = 1;
pub const BLOCK_SIZE: usize = 72;

/// What the guest runs, from the boot-info block's `workload` field
/// (docs/guest-abi.md).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// The UDP key-value service.
    Kv,
    /// Tasks preempted by the timer racing on shared counters.
    Race,
    /// A busy wait for timer ticks.
    Spin,
    /// The key-value service and a preempted background task.
    KvRace,
    /// The key-value service as a user task at CPL3.
    KvUser,
    /// The busy wait for timer ticks as a user task at CPL3.
    SpinUser,
}

impl Workload {
    fn from_field(value: u32) -> Option<Workload> {
        Some(match value {
            0 => Workload::Kv,
            1 => Workload::Race,
            2 => Workload::Spin,
            3 => Workload::KvRace,
            4 => Workload::KvUser,
            5 => Workload::SpinUser,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Kv => "kv",
            Workload::Race => "race",
            Workload::Spin => "spin",
            Workload::KvRace => "kv-race",
            Workload::KvUser => "kv-user",
            Workload::SpinUser => "spin-user",
        }
    }
}

pub struct BootInfo {
    pub mem_size: u64,
    pub net_mmio_base: u64,
    pub net_irq: u8,
    pub guest_mac: [u8; 6],
    pub guest_ip: [u8; 4],
    pub service_port: u16,
    pub tick_hz: u32,
    /// The PIT channel-0 divisor for tick_hz.
    pub pit_divisor: u16,
    pub workload: Workload,
}

/// The smallest register window that holds every virtio-mmio register and
/// the 6-byte MAC in the config space at 0x100.
const MIN_MMIO_SIZE: u64 = 0x108;
/// The MMIO window must lie below 4 GiB, which is all the boot page tables map.
const MAPPED_LIMIT: u64 = 1 << 32;

impl BootInfo {
    /// Validates the block; `image_end` is the first address past the
    /// guest's own image (.bss included), which RAM must cover.
    pub fn parse(block: &[u8; BLOCK_SIZE], image_end: u64) -> Result<BootInfo, &'static str> {
        if u64_at(block, 0) != MAGIC {
            return Err("bad magic");
        }
        if u32_at(block, 8) != VERSION {
            return Err("unsupported version");
        }
        if (u32_at(block, 12) as usize) < BLOCK_SIZE {
            return Err("block too small");
        }
        let mem_size = u64_at(block, 16);
        if mem_size < image_end {
            return Err("mem_size smaller than the image");
        }
        let net_mmio_base = u64_at(block, 24);
        let net_mmio_size = u64_at(block, 32);
        if net_mmio_size < MIN_MMIO_SIZE
            || !net_mmio_base.is_multiple_of(0x1000)
            || net_mmio_base.saturating_add(net_mmio_size) > MAPPED_LIMIT
        {
            return Err("bad virtio-mmio window");
        }
        // The net IRQ must be a master-PIC line other than the timer and the
        // cascade, since only those are routed to the guest's IRQ gates.
        let net_irq = u32_at(block, 40);
        if net_irq == 0 || net_irq == 2 || net_irq > 7 {
            return Err("unsupported net irq");
        }
        let tick_hz = u32_at(block, 64);
        let Some(pit_divisor) = crate::pit::divisor(tick_hz) else {
            return Err("unsupported tick_hz");
        };
        let Some(workload) = Workload::from_field(u32_at(block, 68)) else {
            return Err("unknown workload");
        };
        let mut guest_mac = [0; 6];
        guest_mac.copy_from_slice(&block[48..54]);
        let mut guest_ip = [0; 4];
        guest_ip.copy_from_slice(&block[56..60]);
        Ok(BootInfo {
            mem_size,
            net_mmio_base,
            net_irq: net_irq as u8,
            guest_mac,
            guest_ip,
            service_port: u16::from_le_bytes([block[60], block[61]]),
            tick_hz,
            pit_divisor,
            workload,
        })
    }
}

fn u32_at(block: &[u8; BLOCK_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
}

fn u64_at(block: &[u8; BLOCK_SIZE], at: usize) -> u64 {
    u32_at(block, at) as u64 | (u32_at(block, at + 4) as u64) << 32
}

/// The end of the loaded image, .bss included.
pub fn image_end() -> u64 {
    extern "C" {
        /// Defined by the linker's default script after .bss.
        static _end: u8;
    }
    core::ptr::addr_of!(_end) as u64
}
