//! x86 port I/O, and the VMM's exit port.

use core::arch::asm;

/// The ABI's exit port: writing `v` ends the run; 0 is a clean power-off.
pub const EXIT_PORT: u16 = 0x501;
/// The ABI's idle port, the wait for a frame of code that cannot `hlt`.
pub const IDLE_PORT: u16 = 0x502;
/// The port the VMM's patch of an `rdtsc`/`rdrand` in a CPL3 workload
/// writes; the guest never writes it itself, but its user mode must be
/// allowed to.
pub const TRAP_PORT: u16 = 0xe6;
/// The port the #DB and #BP handlers write first thing (idt.rs): the
/// VMM's replay stops the guest at one instruction with a breakpoint or a
/// single step that reach the guest as these exceptions on this platform
/// at CPL3, and takes them back at this exit (docs/guest-abi.md).
pub const DEBUG_TRAP_PORT: u16 = 0xe7;
/// The serial transmit register, the only serial port the service writes.
pub const SERIAL_THR: u16 = 0x3f8;

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

/// Waits, like `sti; hlt`, for an interrupt, unless the device has used
/// receive buffers beyond `seen` (the receive used index the caller has
/// consumed up to): then it returns at once. Exits from CPL3, where `hlt`
/// gives #GP, through the TSS I/O bitmap, which passes only byte-wide
/// accesses there: the VMM compares the index's low byte, which is exact
/// while fewer than 256 receive buffers are posted (docs/guest-abi.md).
pub fn idle(seen: u16) {
    outb(IDLE_PORT, seen as u8);
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
