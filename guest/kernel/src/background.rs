//! The `kv-race` workload's background task: it computes forever, preempted
//! by the timer and by every received frame, and races with the service on
//! a shared counter. The service adds to it once per received frame,
//! atomically (it runs with interrupts off); the background task adds to it
//! with a non-atomic read-modify-write around a long computation, so a frame
//! that interrupts it there has its increment overwritten. The stats line
//! shows both counters, so the console depends on where every interrupt
//! landed.

use crate::shared::Shared;
use crate::{entropy, race, sched};
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

/// Iterations between two `rdtsc; rdrand` stamps: a trapped exit every few
/// ticks, so that the VMM regularly sees a synchronous exit (a stop request
/// or a periodic digest needs one).
const STAMP_EVERY: u64 = 64;
const SENTINEL: u64 = 0x0bad_5eed_0bad_5eed;

/// Background rounds and the shared counter.
struct Counters {
    rounds: u64,
    shared: u64,
}

static COUNTERS: Shared<Counters> = Shared::new(Counters {
    rounds: 0,
    shared: 0,
});

/// Starts the background task as task 1; the caller (the service) is task 0.
/// Called with interrupts disabled.
pub fn start() {
    sched::init(2, task);
}

/// The service's side of the race: one increment per received frame, with
/// interrupts off.
pub fn count_request() {
    // SAFETY: a volatile access to the static; the service runs with
    // interrupts off, so this read-modify-write is not interrupted.
    unsafe {
        let p = addr_of_mut!((*COUNTERS.get()).shared);
        write_volatile(p, read_volatile(p) + 1);
    }
}

/// (background rounds, shared counter), for the stats line.
pub fn counters() -> (u64, u64) {
    let c = COUNTERS.get();
    // SAFETY: volatile reads of two u64 in the static.
    unsafe {
        (
            read_volatile(addr_of_mut!((*c).rounds)),
            read_volatile(addr_of_mut!((*c).shared)),
        )
    }
}

extern "C" fn task(_: u64) -> ! {
    let c = COUNTERS.get();
    let mut state = 0x1319_8a2e_0370_7344;
    let mut i: u64 = 0;
    loop {
        if i % STAMP_EVERY == 0 {
            let (tsc, nonce) = entropy::stamp();
            state ^= tsc ^ nonce;
        }
        // SAFETY: pointers into the static; the race on `shared` is the
        // point, and volatile accesses keep the read and the write apart.
        unsafe {
            let shared = addr_of_mut!((*c).shared);
            let seen = read_volatile(shared);
            state = race::mix(state ^ seen, i);
            write_volatile(shared, seen + 1 + (state == SENTINEL) as u64);
            let rounds = addr_of_mut!((*c).rounds);
            write_volatile(rounds, read_volatile(rounds) + 1);
        }
        i += 1;
    }
}
