//! The `race` workload: [`TASKS`] tasks, preempted round-robin by the timer,
//! increment shared counters with a deliberately non-atomic read-modify-
//! write. Between the read and the write a task computes for about two
//! hundred instructions, so a timer interrupt that lands there lets other
//! tasks update the counter, and this task's write then loses their
//! updates. The final values therefore depend on exactly where every
//! interrupt landed; the `rdtsc`/`rdrand` stamps the tasks mix in make
//! them depend on the logged values too. The last task to finish prints
//! the result and powers off.

use crate::shared::Shared;
use crate::{entropy, port, sched, serial};
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

pub const TASKS: usize = 4;
const COUNTERS: usize = 4;
const ITERATIONS: u64 = 3000;
/// Iterations between two `rdtsc; rdrand` stamps (each a trapped exit).
const STAMP_EVERY: u64 = 256;
/// Iterations between two progress lines of a task.
const PROGRESS_EVERY: u64 = 1000;
/// A value [`mix`] practically never returns, compared against so that the
/// value a task writes back depends on the whole computation between its
/// read and its write (the compiler cannot move the write before it).
const SENTINEL: u64 = 0x5eed_5eed_5eed_5eed;

static COUNTER_VALUES: Shared<[u64; COUNTERS]> = Shared::new([0; COUNTERS]);
/// Each task's final mixing state, written once by that task.
static CHECKS: Shared<[u64; TASKS]> = Shared::new([0; TASKS]);

/// Starts the tasks; the calling (boot) context becomes task 0. Called with
/// interrupts disabled, after the IDT routes the timer to the scheduler.
pub fn run() -> ! {
    serial::write_str("ftvm-guest: race tasks=");
    serial::write_dec(TASKS as u64);
    serial::write_str(" counters=");
    serial::write_dec(COUNTERS as u64);
    serial::write_str(" iterations=");
    serial::write_dec(ITERATIONS);
    serial::write_str("\n");
    sched::init(TASKS, task);
    // SAFETY: the scheduler and every gate are set up; from here on the
    // boot context is task 0 and may be preempted.
    unsafe { core::arch::asm!("sti", options(nostack)) }
    task(0)
}

extern "C" fn task(index: u64) -> ! {
    let check = work(index);
    sched::without_interrupts(|| {
        // SAFETY: each task writes only its own slot, with interrupts off.
        unsafe { (*CHECKS.get())[index as usize % TASKS] = check }
    });
    sched::finish();
    report();
    port::exit(0)
}

/// The counters' slot `slot`.
fn counter(slot: usize) -> *mut u64 {
    // SAFETY: only a pointer into the static is formed; every access is a
    // volatile read or write through it.
    unsafe { addr_of_mut!((*COUNTER_VALUES.get())[slot % COUNTERS]) }
}

fn work(index: u64) -> u64 {
    let mut state = 0x243f_6a88_85a3_08d3 ^ index;
    let mut slot = index as usize;
    for i in 0..ITERATIONS {
        if i % STAMP_EVERY == 0 {
            let (tsc, nonce) = entropy::stamp();
            slot = (nonce % COUNTERS as u64) as usize;
            state ^= tsc;
        }
        if i % PROGRESS_EVERY == 0 && i > 0 {
            progress(index, i);
        }
        let p = counter(slot);
        // SAFETY: `p` points into the counters; the race on them is the
        // workload's purpose, and volatile accesses keep both the read and
        // the write where they are.
        let seen = unsafe { read_volatile(p) };
        state = mix(state ^ seen, i);
        // SAFETY: as above.
        unsafe { write_volatile(p, seen + 1 + (state == SENTINEL) as u64) }
        slot = (slot + 1) % COUNTERS;
    }
    state
}

/// 32 rounds of multiply and xorshift, straight-line code of about 200
/// instructions: the window in which another task can slip in. No loop, so
/// that each instruction of it runs once per iteration of the caller (the
/// VMM's breakpoint on one of them is then hit once per iteration).
#[inline(never)]
pub fn mix(mut x: u64, salt: u64) -> u64 {
    macro_rules! round {
        ($k:expr) => {
            x ^= x >> 29;
            x = x.wrapping_mul($k);
            x ^= salt;
            x = x.rotate_left(17);
        };
    }
    macro_rules! four {
        () => {
            round!(0x9e37_79b9_7f4a_7c15);
            round!(0xbf58_476d_1ce4_e5b9);
            round!(0x94d0_49bb_1331_11eb);
            round!(0xd6e8_feb8_6659_fd93);
        };
    }
    four!();
    four!();
    four!();
    four!();
    four!();
    four!();
    four!();
    four!();
    x
}

fn progress(index: u64, iteration: u64) {
    sched::without_interrupts(|| {
        serial::write_str("ftvm-guest: race task ");
        serial::write_dec(index);
        serial::write_str(" at ");
        serial::write_dec(iteration);
        serial::write_str(" counters");
        for slot in 0..COUNTERS {
            serial::write_str(" ");
            // SAFETY: a snapshot of the counters with interrupts off.
            serial::write_dec(unsafe { read_volatile(counter(slot)) });
        }
        serial::write_str("\n");
    });
}

/// Prints the counters, how many increments the race lost, and every
/// task's check value. The caller is the last task, alone on the CPU.
fn report() {
    sched::without_interrupts(|| {
        let mut total: u64 = 0;
        serial::write_str("ftvm-guest: race counters");
        for slot in 0..COUNTERS {
            // SAFETY: every other task has finished.
            let value = unsafe { read_volatile(counter(slot)) };
            total += value;
            serial::write_str(" ");
            serial::write_dec(value);
        }
        let expected = TASKS as u64 * ITERATIONS;
        serial::write_str(" total=");
        serial::write_dec(total);
        serial::write_str(" lost=");
        serial::write_dec(expected.saturating_sub(total));
        serial::write_str("\nftvm-guest: race checks");
        for index in 0..TASKS {
            serial::write_str(" ");
            // SAFETY: every task wrote its slot before finishing.
            serial::write_hex(unsafe { (*CHECKS.get())[index] });
        }
        serial::write_str(" switches=");
        serial::write_dec(sched::switches());
        serial::write_str(" ticks=");
        serial::write_dec(crate::pit::ticks());
        serial::write_str("\nftvm-guest: race done\n");
    });
}
