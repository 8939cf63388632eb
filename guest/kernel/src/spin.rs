//! The `spin` workload: waits for [`SPIN_TICKS`] timer ticks in a busy loop
//! that only reads the tick counter, reports how long that took by the TSC,
//! and powers off. The loop makes no VM exit at all, so it ends only if the
//! VMM delivers timer interrupts between two exits.

use crate::{entropy, pit, port, serial};
use core::arch::asm;

pub const SPIN_TICKS: u64 = 100;

/// Called with interrupts disabled and the timer programmed.
pub fn run() -> ! {
    serial::write_str("ftvm-guest: spin waiting for ");
    serial::write_dec(SPIN_TICKS);
    serial::write_str(" ticks in a busy loop\n");
    let start_tsc = entropy::rdtsc();
    let until = pit::ticks() + SPIN_TICKS;
    // SAFETY: every gate uses an IST stack; the loop below touches no stack.
    unsafe { asm!("sti", options(nomem, nostack)) }
    // Nothing but the counter changes from one pass to the next: the loop
    // keeps no count of its own.
    while pit::ticks() < until {}
    // SAFETY: masking interrupts on the only CPU.
    unsafe { asm!("cli", options(nomem, nostack)) }
    let cycles = entropy::rdtsc().wrapping_sub(start_tsc);
    serial::write_str("ftvm-guest: spin waited ");
    serial::write_dec(SPIN_TICKS);
    serial::write_str(" ticks: ");
    serial::write_dec(cycles);
    serial::write_str(" TSC cycles\n");
    port::exit(0)
}
