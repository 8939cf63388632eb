//! x86 port I/O, and the VMM's exit port.

use core::arch::asm;

/// The ABI's exit port: writing `v` ends the run; 0 is a clean power-off.
const EXIT_PORT: u16 = 0x501;

/// Exit codes written to the exit port; the console says more.
pub const EXIT_BOOT_FAILED: u8 = 1;
pub const EXIT_EXCEPTION: u8 = 2;
pub const EXIT_PANIC: u8 = 3;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes only reach the VMM's device models; every port
    // this guest writes is one the ABI assigns to it.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Stops the VM with `code` (non-zero: an error the console explained).
pub fn exit(code: u8) -> ! {
    outb(EXIT_PORT, code);
    // The VMM never resumes the guest after an exit-port write; should it do
    // so anyway, stay stopped with interrupts off.
    loop {
        // SAFETY: cli; hlt only stops this (single) CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
