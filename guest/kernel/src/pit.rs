//! The 8254 PIT: channel 0 as the periodic uptime tick on IRQ0.

use crate::port::outb;
use core::sync::atomic::{AtomicU64, Ordering};

const PIT_HZ: u32 = 1_193_182;
const CHANNEL0: u16 = 0x40;
const COMMAND: u16 = 0x43;
/// Channel 0, lobyte/hibyte access, mode 2 (rate generator), binary.
const CHANNEL0_MODE2: u8 = 0x34;

/// Timer interrupts since boot. Only the IRQ0 stub (idt.rs) writes it, with a
/// single `add` on memory; the main loop only reads it.
#[no_mangle]
pub static TICKS: AtomicU64 = AtomicU64::new(0);

/// The channel-0 divisor for `tick_hz`, if the PIT can produce that rate
/// (mode 2 needs a divisor of 2 or more; 16 bits, 0 would mean 65536).
pub fn divisor(tick_hz: u32) -> Option<u16> {
    if tick_hz == 0 {
        return None;
    }
    match PIT_HZ / tick_hz {
        d @ 2..=0xffff => Some(d as u16),
        _ => None,
    }
}

/// Programs channel 0 with a divisor from [`divisor`].
pub fn init(divisor: u16) {
    let [lo, hi] = divisor.to_le_bytes();
    outb(COMMAND, CHANNEL0_MODE2);
    outb(CHANNEL0, lo);
    outb(CHANNEL0, hi);
}

pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}
