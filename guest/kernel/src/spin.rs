//! The `spin` and `spin-user` workloads: wait for [`SPIN_TICKS`] timer
//! ticks in a busy loop that only reads the tick counter and mixes a few
//! registers, report how long that took by the TSC, and power off. The loop
//! makes no VM exit at all, so it ends only if the VMM delivers timer
//! interrupts between two exits; `spin` runs it at CPL0, `spin-user` at
//! CPL3 (user.rs).

use crate::{entropy, pit, port, serial};
use core::arch::asm;

pub const SPIN_TICKS: u64 = 100;
/// Steps of the inner mix: a pass through one of its instructions is in
/// one of this many register states, so a replay's search for the one an
/// interrupt landed in steps over the others. The loop keeps no count of
/// its own: the outer passes repeat the same states, which a replay tells
/// apart by memory alone (the tick counter), so its search stays within
/// one outer pass however fast the loop runs.
const MIX_STEPS: u64 = 8;

/// Called at CPL0 with interrupts disabled and the timer programmed.
pub fn run() -> ! {
    announce();
    // SAFETY: every gate uses an IST stack, so the loop's red zone is safe.
    unsafe { asm!("sti", options(nomem, nostack)) }
    let cycles = wait();
    // SAFETY: masking interrupts on the only CPU.
    unsafe { asm!("cli", options(nomem, nostack)) }
    report(cycles)
}

/// Called at CPL3, interrupts enabled (user.rs), after [`announce`].
pub fn wait_and_report() -> ! {
    report(wait())
}

pub fn announce() {
    serial::write_str("ftvm-guest: spin waiting for ");
    serial::write_dec(SPIN_TICKS);
    serial::write_str(" ticks in a busy loop\n");
}

/// Waits for the ticks; returns the TSC cycles it took.
fn wait() -> u64 {
    let start_tsc = entropy::rdtsc();
    let until = pit::ticks() + SPIN_TICKS;
    while pit::ticks() < until {
        let mut acc: u64 = 0;
        // The bound through black_box: unrolled, each step would be an
        // instruction of its own, seen once per outer pass.
        for step in 0..core::hint::black_box(MIX_STEPS) {
            acc = core::hint::black_box(acc.rotate_left(5) ^ step);
        }
    }
    entropy::rdtsc().wrapping_sub(start_tsc)
}

fn report(cycles: u64) -> ! {
    serial::write_str("ftvm-guest: spin waited ");
    serial::write_dec(SPIN_TICKS);
    serial::write_str(" ticks: ");
    serial::write_dec(cycles);
    serial::write_str(" TSC cycles\n");
    port::exit(0)
}
