//! The 8259 PIC pair, remapped to vectors 0x20..0x30 in auto-EOI mode so that
//! interrupt handlers never write an EOI (each port write is a VM exit).

use crate::port::outb;

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xa0;
const SLAVE_DATA: u16 = 0xa1;

pub const MASTER_VECTOR: u8 = 0x20;
pub const SLAVE_VECTOR: u8 = 0x28;
pub const TIMER_IRQ: u8 = 0;
const CASCADE_IRQ: u8 = 2;

/// ICW1: edge triggered, cascaded, ICW4 follows.
const ICW1_INIT: u8 = 0x11;
/// ICW4: 8086 mode, auto-EOI.
const ICW4_8086_AUTO_EOI: u8 = 0x03;

/// Initialises both PICs and unmasks only the timer and `net_irq` (a master
/// line), as the ABI asks.
pub fn init(net_irq: u8) {
    outb(MASTER_CMD, ICW1_INIT);
    outb(SLAVE_CMD, ICW1_INIT);
    outb(MASTER_DATA, MASTER_VECTOR);
    outb(SLAVE_DATA, SLAVE_VECTOR);
    outb(MASTER_DATA, 1 << CASCADE_IRQ);
    outb(SLAVE_DATA, CASCADE_IRQ);
    outb(MASTER_DATA, ICW4_8086_AUTO_EOI);
    outb(SLAVE_DATA, ICW4_8086_AUTO_EOI);
    outb(MASTER_DATA, !(1 << TIMER_IRQ | 1 << net_irq));
    outb(SLAVE_DATA, 0xff);
}
