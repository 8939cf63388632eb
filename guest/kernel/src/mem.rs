//! The C memory functions that compiled Rust code calls. There is no libc, so
//! the guest provides them. They use string instructions in inline asm so
//! that the compiler cannot recognise the loop and turn it back into a call
//! to the function itself; quad-word moves cut the number of iterations the
//! CPL0 instruction emulator has to step through by eight.

use core::arch::asm;

/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint; DF is
    // clear (SysV ABI, and every interrupt path restores RFLAGS).
    unsafe {
        asm!(
            "mov {tail}, rcx",
            "shr rcx, 3",
            "rep movsq",
            "mov rcx, {tail}",
            "and rcx, 7",
            "rep movsb",
            tail = out(reg) _,
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack),
        );
    }
    dest
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // Forward copying is safe when dest is below src or past its end.
        // SAFETY: forwarded caller contract; the forward copy never reads a
        // byte it has already overwritten in this case.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: dest lies inside (src, src + n): copy backwards, from the last
    // byte down, with DF set only for the duration of the copy.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dest
}

/// # Safety
/// `dest` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    let pattern = (c as u8 as u64).wrapping_mul(0x0101_0101_0101_0101);
    // SAFETY: the caller guarantees dest is valid for n bytes; DF is clear.
    unsafe {
        asm!(
            "mov {tail}, rcx",
            "shr rcx, 3",
            "rep stosq",
            "mov rcx, {tail}",
            "and rcx, 7",
            "rep stosb",
            tail = out(reg) _,
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("rax") pattern,
            options(nostack),
        );
    }
    dest
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let result: i32;
    // SAFETY: the caller guarantees both ranges are valid; `repe cmpsb`
    // stops after the first differing byte, leaving RSI/RDI one past it.
    unsafe {
        asm!(
            "xor eax, eax",
            "test rcx, rcx",
            "jz 2f",
            "repe cmpsb",
            "je 2f",
            "movzx eax, byte ptr [rsi - 1]",
            "movzx edx, byte ptr [rdi - 1]",
            "sub eax, edx",
            "2:",
            inout("rcx") n => _,
            inout("rsi") a => _,
            inout("rdi") b => _,
            out("eax") result,
            out("edx") _,
            options(nostack, readonly),
        );
    }
    result
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
