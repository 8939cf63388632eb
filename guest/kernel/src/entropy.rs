//! The guest's sources of nondeterminism. The VMM finds every `rdtsc`,
//! `rdtscp`, `rdrand` and `rdseed` in the image at load time, patches it to
//! trap, and logs the value it emulates: so each one here is a real
//! instruction in inline asm, never a library call or a cached value.

use core::arch::asm;

/// How often `rdrand`/`rdseed` are retried while they report no value (CF=0).
const RETRIES: u32 = 10;

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

/// The TSC and IA32_TSC_AUX.
pub fn rdtscp() -> (u64, u32) {
    let (lo, hi, aux): (u32, u32, u32);
    // SAFETY: rdtscp only reads the time-stamp counter and TSC_AUX.
    unsafe {
        asm!("rdtscp", out("eax") lo, out("edx") hi, out("ecx") aux, options(nomem, nostack, preserves_flags))
    }
    ((hi as u64) << 32 | lo as u64, aux)
}

/// A value from `rdrand`, retried while the CPU has none ready; 0 if it never
/// had one (the instruction itself zeroes the destination on failure).
pub fn rdrand() -> u64 {
    let mut value = 0;
    for _ in 0..RETRIES {
        let ok: u8;
        // SAFETY: rdrand only writes its destination and the flags.
        unsafe {
            asm!("rdrand {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack))
        }
        if ok != 0 {
            break;
        }
    }
    value
}

/// A reply's stamp: the TSC and a nonce. The `rdtsc` and the first `rdrand`
/// are adjacent in one asm block, so that the VMM, which emulates a run of
/// consecutive patched instructions at one exit, serves both with one trap.
#[inline(never)]
pub fn stamp() -> (u64, u64) {
    let (lo, hi): (u32, u32);
    let mut nonce: u64;
    let ok: u8;
    // SAFETY: rdtsc reads the time-stamp counter; rdrand writes only its
    // destination and the flags.
    unsafe {
        asm!(
            "rdtsc",
            "rdrand {v}",
            "setc {ok}",
            out("eax") lo,
            out("edx") hi,
            v = out(reg) nonce,
            ok = out(reg_byte) ok,
            options(nomem, nostack)
        )
    }
    if ok == 0 {
        nonce = rdrand();
    }
    ((hi as u64) << 32 | lo as u64, nonce)
}

/// Like [`rdrand`], from `rdseed`.
pub fn rdseed() -> u64 {
    let mut value = 0;
    for _ in 0..RETRIES {
        let ok: u8;
        // SAFETY: rdseed only writes its destination and the flags.
        unsafe {
            asm!("rdseed {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack))
        }
        if ok != 0 {
            break;
        }
    }
    value
}

/// The Entropy operation: `n` rounds of all four instructions, folded into
/// one value so that a replay that got any result wrong shows a different
/// reply.
pub fn mix(n: u32) -> u64 {
    let mut acc: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..n {
        let (tscp, aux) = rdtscp();
        for v in [rdtsc(), tscp, aux as u64, rdrand(), rdseed()] {
            acc = (acc.rotate_left(23) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    acc
}
