//! Console output on the 16550 UART at 0x3f8.
//!
//! The ABI guarantees that the transmitter is always ready, so bytes go
//! straight to THR without polling LSR: one port exit per byte instead of two.
//! The UART is left as the VMM resets it (interrupts disabled, IRQ4 masked
//! at the PIC), so it needs no initialisation. Numbers are printed by hand:
//! `core::fmt` is precompiled with SSE and must not end up in the image.

use crate::port::outb;

const THR: u16 = 0x3f8;

pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        outb(THR, b);
    }
}

pub fn write_str(s: &str) {
    write_bytes(s.as_bytes());
}

pub fn write_dec(mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    write_bytes(&digits[start..]);
}

/// `0x` followed by the value in hex, without leading zeros.
pub fn write_hex(value: u64) {
    write_str("0x");
    let mut shift = 60;
    while shift > 0 && (value >> shift) & 0xf == 0 {
        shift -= 4;
    }
    loop {
        write_bytes(&[hex_digit((value >> shift) as u8)]);
        if shift == 0 {
            break;
        }
        shift -= 4;
    }
}

/// Two hex digits, zero padded (MAC address bytes).
pub fn write_hex_byte(value: u8) {
    write_bytes(&[hex_digit(value >> 4), hex_digit(value)]);
}

fn hex_digit(nibble: u8) -> u8 {
    b"0123456789abcdef"[(nibble & 0xf) as usize]
}
