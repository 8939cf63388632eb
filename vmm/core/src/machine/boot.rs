//! The machine state the guest starts in: boot GDT, identity page tables,
//! the boot-info block, and a vCPU already in 64-bit long mode, as
//! Firecracker sets it up for a kernel (see `docs/guest-abi.md`).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use crate::host::frame::{GUEST_IP, GUEST_MAC, GUEST_SERVICE_PORT};
use crate::machine::layout::*;
use crate::machine::memory::GuestMemory;
use crate::machine::workload::Workload;

pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBOOT");
pub const BOOT_INFO_VERSION: u32 = 1;
pub const BOOT_INFO_SIZE: u32 = 72;
pub const SERIAL_IRQ: u32 = 4;
pub const DEFAULT_TICK_HZ: u32 = 100;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x83;

/// CPUID.1:ECX.RDRAND and CPUID.7.0:EBX.RDSEED. The guest must not rely on
/// CPUID for these (this platform runs them regardless), but a guest that
/// asks is told the truth the VMM can stand behind.
const CPUID1_ECX_RDRAND: u32 = 1 << 30;
const CPUID7_EBX_RDSEED: u32 = 1 << 18;
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("writing the boot structures into guest memory failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the vCPU's {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Kvm { what, source }
}

/// GDT descriptors: flags/limit/base packed the way the CPU reads them.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

const GDT: [u64; 4] = [
    0,
    // 64-bit code: present, DPL 0, executable/readable, L=1, G=1.
    gdt_entry(0xa09b, 0, 0xfffff),
    // Flat data: present, writable, D/B=1, G=1.
    gdt_entry(0xc093, 0, 0xfffff),
    // A 64-bit TSS placeholder so that TR is valid at entry; the guest loads its own.
    gdt_entry(0x008b, 0, 0x67),
];

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, page tables and boot-info block.
pub fn write_boot_structures(
    mem: &GuestMemory,
    tick_hz: u32,
    workload: Workload,
) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(PDPT_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR))?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | PTE_PRESENT_RW, GuestAddress(PDPT_ADDR + pd * 8))?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            mem.write_obj(phys | PDE_2M_PAGE, GuestAddress(pd_addr + i * 8))?;
        }
    }
    let mut info = [0u8; BOOT_INFO_SIZE as usize];
    info[0..8].copy_from_slice(&BOOT_INFO_MAGIC.to_le_bytes());
    info[8..12].copy_from_slice(&BOOT_INFO_VERSION.to_le_bytes());
    info[12..16].copy_from_slice(&BOOT_INFO_SIZE.to_le_bytes());
    info[16..24].copy_from_slice(&mem.last_addr().0.wrapping_add(1).to_le_bytes());
    info[24..32].copy_from_slice(&NET_MMIO_BASE.to_le_bytes());
    info[32..40].copy_from_slice(&NET_MMIO_SIZE.to_le_bytes());
    info[40..44].copy_from_slice(&u32::from(NET_IRQ).to_le_bytes());
    info[44..48].copy_from_slice(&SERIAL_IRQ.to_le_bytes());
    info[48..54].copy_from_slice(&GUEST_MAC);
    info[56..60].copy_from_slice(&GUEST_IP.octets());
    info[60..62].copy_from_slice(&GUEST_SERVICE_PORT.to_le_bytes());
    info[64..68].copy_from_slice(&tick_hz.to_le_bytes());
    info[68..72].copy_from_slice(&workload.boot_field().to_le_bytes());
    mem.write_slice(&info, GuestAddress(BOOT_INFO_ADDR))?;
    Ok(())
}

/// The CPUID table the guest sees: what KVM supports, with the
/// hypervisor bit set and the random-number instructions hidden.
pub fn guest_cpuid(kvm: &Kvm) -> Result<CpuId, BootError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("supported CPUID"))?;
    for entry in cpuid.as_mut_slice() {
        match (entry.function, entry.index) {
            (1, _) => {
                entry.ecx &= !CPUID1_ECX_RDRAND;
                entry.ecx |= CPUID1_ECX_HYPERVISOR;
            }
            (7, 0) => entry.ebx &= !CPUID7_EBX_RDSEED,
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Puts the vCPU at the guest's entry point in 64-bit mode.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, entry: u64) -> Result<(), BootError> {
    vcpu.set_cpuid2(&guest_cpuid(kvm)?)
        .map_err(kvm_err("CPUID table"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("segment registers"))?;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err("segment registers"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("FPU state"))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rdi: BOOT_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("general registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.type_),
            (8, 1, 0, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (0x10, 0, 1, 3));
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_ram_and_the_mmio_window() {
        let mem = crate::machine::memory::create(16 << 20).expect("memory");
        write_boot_structures(&mem, 100, Workload::Spin).expect("boot structures");
        let walk = |va: u64| -> u64 {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(PML4_ADDR + ((va >> 39) & 511) * 8))
                .expect("pml4");
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8))
                .expect("pdpt");
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .expect("pd");
            assert_eq!(pde & 0x81, 0x81, "2 MiB page present at {va:#x}");
            (pde & !0x1f_ffff & !0x8000_0000_0000_0fff) | (va & 0x1f_ffff)
        };
        for va in [
            0u64,
            0x10_0000,
            0x7fff8,
            0xff_ffff,
            NET_MMIO_BASE,
            NET_MMIO_BASE + 0x100,
        ] {
            assert_eq!(walk(va), va);
        }
        let magic: u64 = mem.read_obj(GuestAddress(BOOT_INFO_ADDR)).expect("magic");
        assert_eq!(magic.to_le_bytes(), *b"FTVMBOOT");
        let size: u64 = mem
            .read_obj(GuestAddress(BOOT_INFO_ADDR + 16))
            .expect("size");
        assert_eq!(size, 16 << 20);
        let workload: u32 = mem
            .read_obj(GuestAddress(BOOT_INFO_ADDR + 68))
            .expect("workload");
        assert_eq!(workload, Workload::Spin.boot_field());
    }
}
