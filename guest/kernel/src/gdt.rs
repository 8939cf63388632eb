//! The guest's own GDT with a 64-bit TSS whose IST stacks every IDT gate
//! uses: the host target's code keeps data in the 128-byte red zone below
//! RSP, which an interrupt pushing its frame on the same stack would destroy.
//! The GDT also has user code and data segments, and the TSS an I/O bitmap
//! that lets CPL3 reach the ports the KV service uses (`kv-user`): `iretq`
//! to CPL3 clears IOPL on this platform, so the bitmap is the only way.

use crate::port;
use crate::shared::Shared;
use core::arch::{asm, global_asm};

pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;
/// DPL 3 segments, with RPL 3 in the selectors.
pub const USER_DATA_SELECTOR: u16 = 0x28 | 3;
pub const USER_CODE_SELECTOR: u16 = 0x30 | 3;

/// IST slots (1-based, as in the gate descriptor).
pub const IST_IRQ: u8 = 1;
pub const IST_EXCEPTION: u8 = 2;
/// For NMI, #DF and #MC, which may strike while another exception is using
/// its stack.
pub const IST_FATAL: u8 = 3;
/// For #DB and #BP, which only the VMM's replay causes (idt.rs): a stack
/// of their own, so that the VMM knows where their frame lands and can
/// put back what was there.
pub const IST_DEBUG: u8 = 4;

const IRQ_STACK_SIZE: usize = 4096;
const EXCEPTION_STACK_SIZE: usize = 16384;
const FATAL_STACK_SIZE: usize = 8192;
const DEBUG_STACK_SIZE: usize = 8192;

#[repr(C, align(16))]
struct Stacks {
    irq: [u8; IRQ_STACK_SIZE],
    exception: [u8; EXCEPTION_STACK_SIZE],
    fatal: [u8; FATAL_STACK_SIZE],
    debug: [u8; DEBUG_STACK_SIZE],
}

static STACKS: Shared<Stacks> = Shared::new(Stacks {
    irq: [0; IRQ_STACK_SIZE],
    exception: [0; EXCEPTION_STACK_SIZE],
    fatal: [0; FATAL_STACK_SIZE],
    debug: [0; DEBUG_STACK_SIZE],
});

/// The 64-bit TSS is 104 bytes with 8-byte fields at 4-byte offsets, so it is
/// kept as raw bytes and filled at the architectural offsets. The I/O
/// bitmap follows it, one bit per port (0: allowed at CPL3), covering the
/// ports below IO_BITMAP_PORTS; the CPU reads two bytes of it at a time, so
/// one all-ones byte ends it.
const TSS_HEADER_SIZE: usize = 104;
const TSS_RSP0: usize = 0x04;
const TSS_IST1: usize = 0x24;
const TSS_IOMAP_BASE: usize = 0x66;
const IO_BITMAP_PORTS: usize = 0x600;
const TSS_SIZE: usize = TSS_HEADER_SIZE + IO_BITMAP_PORTS / 8 + 1;
/// What CPL3 code may reach: the console, the exit and idle ports, and the
/// port of the VMM's trap patches.
const USER_PORTS: [u16; 4] = [
    port::SERIAL_THR,
    port::EXIT_PORT,
    port::IDLE_PORT,
    port::TRAP_PORT,
];

#[repr(C, align(16))]
struct Tss([u8; TSS_SIZE]);

static TSS: Shared<Tss> = Shared::new(Tss([0; TSS_SIZE]));

/// null, 64-bit code (0x08), flat data (0x10), TSS (0x18, two slots), user
/// data (0x28), user 64-bit code (0x30). The accessed bits are preset so
/// that the CPU never writes the table.
#[repr(C, align(16))]
struct Gdt([u64; 7]);

static GDT: Shared<Gdt> = Shared::new(Gdt([0; 7]));

const CODE64_DESCRIPTOR: u64 = 0x00af_9b00_0000_ffff;
const DATA_DESCRIPTOR: u64 = 0x00cf_9300_0000_ffff;
const USER_CODE64_DESCRIPTOR: u64 = 0x00af_fb00_0000_ffff;
const USER_DATA_DESCRIPTOR: u64 = 0x00cf_f300_0000_ffff;
/// Present, DPL 0, type 9 (available 64-bit TSS).
const TSS_ACCESS: u64 = 0x89;

/// The operand of `lgdt`/`lidt`.
#[repr(C, packed)]
pub struct DescriptorTablePointer {
    pub limit: u16,
    pub base: u64,
}

global_asm!(
    ".section .text.ftvm_load_gdt, \"ax\"",
    ".global ftvm_load_gdt",
    // rdi: the GDT pointer. Reloads the data segments, then CS by a far
    // return to the caller.
    "ftvm_load_gdt:",
    "lgdt [rdi]",
    "mov ax, {data}",
    "mov ds, ax",
    "mov es, ax",
    "mov fs, ax",
    "mov gs, ax",
    "mov ss, ax",
    "pop rax",
    "push {code}",
    "push rax",
    "retfq",
    data = const DATA_SELECTOR,
    code = const CODE_SELECTOR,
);

extern "C" {
    fn ftvm_load_gdt(pointer: *const DescriptorTablePointer);
}

/// Builds and loads the GDT and TSS. Called once at boot, interrupts off.
pub fn init() {
    let stacks = STACKS.get();
    // SAFETY: the pointers come from statics; only the stack tops are
    // computed here, no reference to the stacks is created.
    let ist_tops = unsafe {
        [
            core::ptr::addr_of_mut!((*stacks).irq) as u64 + IRQ_STACK_SIZE as u64,
            core::ptr::addr_of_mut!((*stacks).exception) as u64 + EXCEPTION_STACK_SIZE as u64,
            core::ptr::addr_of_mut!((*stacks).fatal) as u64 + FATAL_STACK_SIZE as u64,
            core::ptr::addr_of_mut!((*stacks).debug) as u64 + DEBUG_STACK_SIZE as u64,
        ]
    };
    // SAFETY: boot runs once on the only CPU before the TSS is loaded, so
    // nothing else reads the TSS while it is written.
    let tss = unsafe { &mut (*TSS.get()).0 };
    for (slot, top) in ist_tops.iter().enumerate() {
        let at = TSS_IST1 + 8 * slot;
        tss[at..at + 8].copy_from_slice(&top.to_le_bytes());
    }
    // Every gate has an IST stack, so the CPU never switches to RSP0; it is
    // set so that an interrupt from CPL3 through a gate without one would
    // still find a CPL0 stack.
    tss[TSS_RSP0..TSS_RSP0 + 8].copy_from_slice(&ist_tops[0].to_le_bytes());
    tss[TSS_IOMAP_BASE..TSS_IOMAP_BASE + 2]
        .copy_from_slice(&(TSS_HEADER_SIZE as u16).to_le_bytes());
    let bitmap = &mut tss[TSS_HEADER_SIZE..];
    bitmap.fill(0xff);
    for port in USER_PORTS {
        bitmap[port as usize / 8] &= !(1 << (port % 8));
    }

    let base = TSS.get() as u64;
    let limit = TSS_SIZE as u64 - 1;
    let tss_low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | TSS_ACCESS << 40
        | (limit >> 16 & 0xf) << 48
        | (base >> 24 & 0xff) << 56;
    let tss_high = base >> 32;
    // SAFETY: as above, the GDT is not loaded yet.
    unsafe {
        (*GDT.get()).0 = [
            0,
            CODE64_DESCRIPTOR,
            DATA_DESCRIPTOR,
            tss_low,
            tss_high,
            USER_DATA_DESCRIPTOR,
            USER_CODE64_DESCRIPTOR,
        ];
    }

    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of::<Gdt>() - 1) as u16,
        base: GDT.get() as u64,
    };
    // SAFETY: the new GDT has the same code and data selectors as the boot
    // GDT, so the running code and stack stay valid across the reload; the
    // TSS descriptor is valid and not busy, as `ltr` requires.
    unsafe {
        ftvm_load_gdt(&pointer);
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));
    }
}
