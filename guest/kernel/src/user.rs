//! User mode for the `kv-user` and `spin-user` workloads: the KV service's
//! main loop (or the busy wait) runs as a task at CPL3, where this platform's KVM runs guest code natively instead
//! of in its CPL0 instruction emulator. The kernel keeps only what cannot
//! run at CPL3: boot, the device's setup, and the interrupt handlers, which
//! return to the task with `iretq`.
//!
//! The task needs no system call: it waits for frames with a write to the
//! idle port, prints and powers off through ports the TSS I/O bitmap
//! allows (gdt.rs), and reads the tick counter from memory. User mappings
//! are 2 MiB pages, so the task can reach the whole image, the boot
//! structures below it included: this is about where the code runs, not a
//! protection boundary.

use crate::boot::{self, BootInfo};
use crate::gdt::{USER_CODE_SELECTOR, USER_DATA_SELECTOR};
use crate::service::Service;
use crate::shared::Shared;
use crate::virtio_net::VirtioNet;
use core::arch::asm;

/// Page-table entry bits: present, user, and a directory entry's 2 MiB page.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_USER: u64 = 1 << 2;
const PDE_LARGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const LARGE_PAGE: u64 = 2 << 20;
const ENTRIES: u64 = 512;

/// RFLAGS of the task: interrupts enabled (IOPL 0; the bitmap grants the
/// ports), and the always-one bit 1.
const USER_RFLAGS: u64 = 0x202;
const USER_STACK_SIZE: usize = 64 * 1024;
/// Receive buffers the task posts: fewer than 256, so that the one byte of
/// the used index it can write to the idle port (byte-wide port I/O only,
/// at CPL3) names the index exactly; the device can be at most this many
/// entries ahead of what the task has seen.
pub const RX_ENTRIES: usize = 128;

#[repr(C, align(16))]
struct Stack([u8; USER_STACK_SIZE]);

static USER_STACK: Shared<Stack> = Shared::new(Stack([0; USER_STACK_SIZE]));

/// What the KV task is handed in RDI.
struct Task {
    info: BootInfo,
    net: VirtioNet,
    service: &'static mut Service,
}

/// Makes the image and the device's register window reachable from CPL3,
/// then drops to CPL3 in the service's main loop; never returns.
pub fn enter_kv(info: BootInfo, net: VirtioNet, service: &'static mut Service) -> ! {
    let window = info.net_mmio_base;
    allow_user(0, boot::image_end());
    allow_user(window, window + 1);
    let mut task = Task { info, net, service };
    // `task` lives on this stack, which the kernel never unwinds (`enter`
    // does not return), and the task is its only user from here on.
    enter(kv_main, &mut task as *mut Task as *mut u8)
}

/// Makes the image reachable from CPL3 and runs the `spin-user` busy
/// wait there; never returns.
pub fn enter_spin() -> ! {
    allow_user(0, boot::image_end());
    enter(spin_main, core::ptr::null_mut())
}

/// Drops to CPL3 at `entry` on the user stack, interrupts enabled, with
/// `arg` in RDI.
fn enter(entry: extern "C" fn(*mut u8) -> !, arg: *mut u8) -> ! {
    let stack = USER_STACK.get();
    // As a call would leave it: RSP ≡ 8 (mod 16) at the entry.
    // SAFETY: only the address of the static is computed.
    let top = unsafe { core::ptr::addr_of_mut!((*stack).0) } as u64 + USER_STACK_SIZE as u64 - 8;
    // SAFETY: the frame makes `iretq` enter `entry` at CPL3 on the user
    // stack with interrupts enabled; the callers mapped the image, and so
    // both stacks, for user access.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = const USER_DATA_SELECTOR as u64,
            rsp = in(reg) top,
            rflags = const USER_RFLAGS,
            cs = const USER_CODE_SELECTOR as u64,
            rip = in(reg) entry as *const () as u64,
            in("rdi") arg,
            options(noreturn),
        )
    }
}

extern "C" fn kv_main(task: *mut u8) -> ! {
    // SAFETY: `enter_kv` passed a pointer to a Task it never touches again.
    let task = unsafe { &mut *(task as *mut Task) };
    crate::run(&task.info, &mut task.net, task.service)
}

extern "C" fn spin_main(_: *mut u8) -> ! {
    crate::spin::wait_and_report()
}

/// Sets the user bit on every level that maps `[start, end)` (identity
/// mapped with 2 MiB pages by the VMM's page tables), then flushes the TLB.
fn allow_user(start: u64, end: u64) {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {0}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) }
    let pml4 = (cr3 & ADDRESS_MASK) as *mut u64;
    let mut page = start & !(LARGE_PAGE - 1);
    while page < end {
        let pml4_index = page >> 39 & (ENTRIES - 1);
        let pdpt_index = page >> 30 & (ENTRIES - 1);
        let pd_index = page >> 21 & (ENTRIES - 1);
        // SAFETY: the tables are the VMM's identity-mapped ones (ABI), in
        // guest RAM below the image; each entry followed is present, and
        // only flag bits are changed, with interrupts off, on the only CPU.
        unsafe {
            let pml4e = pml4.add(pml4_index as usize);
            *pml4e |= PTE_USER;
            let pdpt = (*pml4e & ADDRESS_MASK) as *mut u64;
            let pdpte = pdpt.add(pdpt_index as usize);
            *pdpte |= PTE_USER;
            let pd = (*pdpte & ADDRESS_MASK) as *mut u64;
            let pde = pd.add(pd_index as usize);
            if *pde & (PTE_PRESENT | PDE_LARGE) == PTE_PRESENT | PDE_LARGE {
                *pde |= PTE_USER;
            }
        }
        page += LARGE_PAGE;
    }
    // SAFETY: reloading CR3 with its own value only flushes the TLB.
    unsafe { asm!("mov cr3, {0}", in(reg) cr3, options(nostack, preserves_flags)) }
}
