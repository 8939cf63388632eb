//! The dual 8259A programmable interrupt controller of a PC: a master at
//! ports `0x20`/`0x21` and a slave at `0xa0`/`0xa1` cascaded on the master's
//! IRQ2.
//!
//! The model covers what a protected-mode guest uses: the ICW1..ICW4
//! initialisation sequence, the vector base, auto-EOI, masking (OCW1),
//! non-specific and specific EOI (OCW2), reading IRR or ISR (OCW3), and fixed
//! priority with IRQ0 highest. Priority rotation, special mask mode, poll mode
//! and level triggering are accepted and ignored with a log line, because no
//! guest of ftvm uses them and ignoring them keeps the state small.
//!
//! Interrupt lines are edge triggered: [`Pic::raise_irq`] is a rising edge and
//! latches the line's IRR bit until the CPU acknowledges it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Master command port (ICW1, OCW2, OCW3; reads IRR or ISR).
pub const MASTER_COMMAND: u16 = 0x20;
/// Master data port (ICW2..ICW4 during initialisation, then IMR).
pub const MASTER_DATA: u16 = 0x21;
/// Slave command port.
pub const SLAVE_COMMAND: u16 = 0xa0;
/// Slave data port.
pub const SLAVE_DATA: u16 = 0xa1;

/// The master input that carries the slave's interrupt output.
const CASCADE_IRQ: u8 = 2;

const ICW1: u8 = 0x10;
const ICW1_IC4: u8 = 0x01;
const ICW1_SNGL: u8 = 0x02;
const ICW1_LTIM: u8 = 0x08;
const ICW2_VECTOR_MASK: u8 = 0xf8;
const ICW4_UPM: u8 = 0x01;
const ICW4_AEOI: u8 = 0x02;
const OCW3: u8 = 0x08;
const OCW2_EOI: u8 = 0x20;
const OCW2_SPECIFIC: u8 = 0x40;
const OCW2_ROTATE: u8 = 0x80;
const OCW3_READ_REGISTER: u8 = 0x02;
const OCW3_READ_ISR: u8 = 0x01;
const OCW3_POLL: u8 = 0x04;
const OCW3_SPECIAL_MASK: u8 = 0x40;

/// Where a chip is in its initialisation sequence. The flags record what
/// ICW1 announced, because they decide which words follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PicInitStep {
    /// Initialised (or never initialised): data-port writes are OCW1.
    Ready,
    /// ICW1 was written; the next data-port write is ICW2.
    Icw2 { icw3: bool, icw4: bool },
    /// The next data-port write is ICW3.
    Icw3 { icw4: bool },
    /// The next data-port write is ICW4.
    Icw4,
}

/// The saved state of one 8259A.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChipState {
    /// Interrupt request register. On the master, bit 2 is never stored: it
    /// mirrors the slave's output and is computed.
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// Vector of IRQ 0 of this chip (ICW2 with the low 3 bits cleared).
    pub vector_base: u8,
    pub init: PicInitStep,
    /// ICW4 AEOI: an acknowledge does not set ISR.
    pub auto_eoi: bool,
    /// OCW3 selection: command-port reads return ISR (true) or IRR (false).
    pub read_isr: bool,
}

/// The saved state of the PIC pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    pub master: PicChipState,
    pub slave: PicChipState,
}

/// A [`PicState`] that no sequence of guest accesses can produce.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PicError {
    #[error("{chip} PIC vector base {base:#04x} has bits 2..0 set; ICW2 only keeps bits 7..3")]
    UnalignedVectorBase { chip: &'static str, base: u8 },
    #[error("master PIC IRR {irr:#04x} latches IRQ2, which only mirrors the slave's output")]
    CascadeLatched { irr: u8 },
    #[error("{chip} PIC has ISR {isr:#04x} in auto-EOI mode, where an acknowledge never sets ISR")]
    InServiceWithAutoEoi { chip: &'static str, isr: u8 },
    #[error("{chip} PIC is mid-initialisation with ISR {isr:#04x}; ICW1 clears ISR")]
    InServiceDuringInit { chip: &'static str, isr: u8 },
    #[error("{chip} PIC is mid-initialisation in auto-EOI mode; ICW1 clears the ICW4 settings")]
    AutoEoiDuringInit { chip: &'static str },
}

/// Index of the highest-priority (lowest-numbered) set bit.
fn highest_priority(bits: u8) -> Option<u8> {
    // trailing_zeros of a non-zero u8 is at most 7, so the cast is lossless.
    (bits != 0).then(|| bits.trailing_zeros() as u8)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    vector_base: u8,
    init: PicInitStep,
    auto_eoi: bool,
    read_isr: bool,
}

impl Chip {
    /// A real 8259A powers up in an undefined state; all lines masked is the
    /// safe choice, so that nothing is delivered before the guest programs it.
    const POWER_ON: Chip = Chip {
        irr: 0,
        isr: 0,
        imr: 0xff,
        vector_base: 0,
        init: PicInitStep::Ready,
        auto_eoi: false,
        read_isr: false,
    };

    /// The line this chip would present to the CPU (or to the master) given
    /// the request inputs `irr`: the highest-priority unmasked request, unless
    /// an equal or higher priority is already in service.
    fn resolve(&self, irr: u8) -> Option<u8> {
        if self.init != PicInitStep::Ready {
            return None;
        }
        let request = highest_priority(irr & !self.imr)?;
        match highest_priority(self.isr) {
            Some(in_service) if in_service <= request => None,
            _ => Some(request),
        }
    }

    fn output(&self) -> Option<u8> {
        self.resolve(self.irr)
    }

    fn acknowledge(&mut self, irq: u8) {
        let bit = 1 << irq;
        self.irr &= !bit;
        if !self.auto_eoi {
            self.isr |= bit;
        }
    }

    fn write_command(&mut self, chip: &'static str, value: u8) {
        if value & ICW1 != 0 {
            self.write_icw1(chip, value);
        } else if value & OCW3 != 0 {
            self.write_ocw3(chip, value);
        } else {
            self.write_ocw2(chip, value);
        }
    }

    fn write_icw1(&mut self, chip: &'static str, value: u8) {
        if value & ICW1_LTIM != 0 {
            tracing::warn!(
                chip,
                value,
                "PIC level-triggered mode not modelled; lines stay edge triggered"
            );
        }
        // The datasheet clears IMR and resets the edge detectors; clearing
        // IRR and ISR too (as QEMU does) keeps a guest that re-initialises
        // from being blocked by a stale in-service bit it will never EOI.
        *self = Chip {
            irr: 0,
            isr: 0,
            imr: 0,
            vector_base: self.vector_base,
            init: PicInitStep::Icw2 {
                icw3: value & ICW1_SNGL == 0,
                icw4: value & ICW1_IC4 != 0,
            },
            auto_eoi: false,
            read_isr: false,
        };
    }

    fn write_ocw2(&mut self, chip: &'static str, value: u8) {
        if value & OCW2_ROTATE != 0 {
            tracing::debug!(
                chip,
                value,
                "PIC priority rotation not modelled; priority stays fixed"
            );
        }
        if value & OCW2_EOI == 0 {
            // Set-priority and rotate-in-AEOI commands: nothing to do with
            // fixed priority.
            return;
        }
        let level = if value & OCW2_SPECIFIC != 0 {
            Some(value & 0x07)
        } else {
            highest_priority(self.isr)
        };
        match level {
            Some(level) if self.isr & (1 << level) != 0 => self.isr &= !(1 << level),
            _ => tracing::debug!(
                chip,
                value,
                isr = self.isr,
                "PIC EOI with nothing matching in service"
            ),
        }
    }

    fn write_ocw3(&mut self, chip: &'static str, value: u8) {
        if value & OCW3_POLL != 0 {
            tracing::warn!(
                chip,
                value,
                "PIC poll command not modelled; the next read returns IRR or ISR"
            );
        }
        if value & OCW3_SPECIAL_MASK != 0 {
            tracing::warn!(chip, value, "PIC special mask mode not modelled");
        }
        if value & OCW3_READ_REGISTER != 0 {
            self.read_isr = value & OCW3_READ_ISR != 0;
        }
    }

    fn write_data(&mut self, chip: &'static str, value: u8) {
        self.init = match self.init {
            PicInitStep::Ready => {
                self.imr = value;
                PicInitStep::Ready
            }
            PicInitStep::Icw2 { icw3, icw4 } => {
                self.vector_base = value & ICW2_VECTOR_MASK;
                if icw3 {
                    PicInitStep::Icw3 { icw4 }
                } else if icw4 {
                    PicInitStep::Icw4
                } else {
                    PicInitStep::Ready
                }
            }
            PicInitStep::Icw3 { icw4 } => {
                // The cascade is wired, whatever the guest says it is.
                tracing::debug!(
                    chip,
                    icw3 = value,
                    "PIC ICW3 ignored: the slave is wired on IRQ2"
                );
                if icw4 {
                    PicInitStep::Icw4
                } else {
                    PicInitStep::Ready
                }
            }
            PicInitStep::Icw4 => {
                if value & ICW4_UPM == 0 {
                    tracing::warn!(
                        chip,
                        icw4 = value,
                        "PIC 8080 mode requested; vectors are delivered as in 8086 mode"
                    );
                }
                self.auto_eoi = value & ICW4_AEOI != 0;
                PicInitStep::Ready
            }
        };
    }

    fn state(&self) -> PicChipState {
        PicChipState {
            irr: self.irr,
            isr: self.isr,
            imr: self.imr,
            vector_base: self.vector_base,
            init: self.init,
            auto_eoi: self.auto_eoi,
            read_isr: self.read_isr,
        }
    }

    fn from_state(chip: &'static str, state: &PicChipState) -> Result<Self, PicError> {
        if state.vector_base & !ICW2_VECTOR_MASK != 0 {
            return Err(PicError::UnalignedVectorBase {
                chip,
                base: state.vector_base,
            });
        }
        if state.init != PicInitStep::Ready {
            if state.isr != 0 {
                return Err(PicError::InServiceDuringInit {
                    chip,
                    isr: state.isr,
                });
            }
            if state.auto_eoi {
                return Err(PicError::AutoEoiDuringInit { chip });
            }
        }
        if state.auto_eoi && state.isr != 0 {
            return Err(PicError::InServiceWithAutoEoi {
                chip,
                isr: state.isr,
            });
        }
        Ok(Chip {
            irr: state.irr,
            isr: state.isr,
            imr: state.imr,
            vector_base: state.vector_base,
            init: state.init,
            auto_eoi: state.auto_eoi,
            read_isr: state.read_isr,
        })
    }
}

/// The master/slave 8259A pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Both chips at power-on: not initialised, every line masked.
    pub fn new() -> Self {
        Pic {
            master: Chip::POWER_ON,
            slave: Chip::POWER_ON,
        }
    }

    /// The master's request inputs, with IRQ2 driven by the slave's output.
    /// Deriving IRQ2 instead of latching it means the master never
    /// acknowledges a cascade that the slave has meanwhile withdrawn, so the
    /// model has no spurious interrupts.
    fn master_irr(&self) -> u8 {
        self.master.irr | (u8::from(self.slave.output().is_some()) << CASCADE_IRQ)
    }

    /// The master line and, when that line is the cascade, the slave line
    /// that an INTA cycle would acknowledge now.
    fn selected(&self) -> Option<(u8, Option<u8>)> {
        let irq = self.master.resolve(self.master_irr())?;
        if irq == CASCADE_IRQ {
            Some((irq, Some(self.slave.output()?)))
        } else {
            Some((irq, None))
        }
    }

    fn vector(&self, master_irq: u8, slave_irq: Option<u8>) -> u8 {
        // Bases are multiples of 8 (ICW2 drops bits 2..0), so OR adds the line.
        match slave_irq {
            Some(irq) => self.slave.vector_base | irq,
            None => self.master.vector_base | master_irq,
        }
    }

    pub fn pio_read(&mut self, port: u16) -> u8 {
        match port {
            MASTER_COMMAND if self.master.read_isr => self.master.isr,
            MASTER_COMMAND => self.master_irr(),
            MASTER_DATA => self.master.imr,
            SLAVE_COMMAND if self.slave.read_isr => self.slave.isr,
            SLAVE_COMMAND => self.slave.irr,
            SLAVE_DATA => self.slave.imr,
            _ => {
                tracing::warn!(port, "PIC read from a port it does not decode");
                0xff
            }
        }
    }

    pub fn pio_write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_COMMAND => self.master.write_command("master", value),
            MASTER_DATA => self.master.write_data("master", value),
            SLAVE_COMMAND => self.slave.write_command("slave", value),
            SLAVE_DATA => self.slave.write_data("slave", value),
            _ => tracing::warn!(port, value, "PIC write to a port it does not decode"),
        }
    }

    /// A rising edge on line `irq` (0..=7 master, 8..=15 slave).
    pub fn raise_irq(&mut self, irq: u8) {
        match irq {
            CASCADE_IRQ => {
                tracing::warn!(irq, "IRQ2 is the cascade input; no device can raise it")
            }
            0..=7 => self.master.irr |= 1 << irq,
            8..=15 => self.slave.irr |= 1 << (irq - 8),
            _ => tracing::warn!(irq, "raise of an IRQ line the PIC pair does not have"),
        }
    }

    /// The vector an INTA cycle would return now, without changing state.
    pub fn pending_vector(&self) -> Option<u8> {
        self.selected()
            .map(|(master_irq, slave_irq)| self.vector(master_irq, slave_irq))
    }

    /// The INTA cycle: returns the vector of [`Pic::pending_vector`] and moves
    /// the line from IRR to ISR (only clears IRR in auto-EOI mode), on both
    /// chips when the interrupt comes through the cascade.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let (master_irq, slave_irq) = self.selected()?;
        let vector = self.vector(master_irq, slave_irq);
        if let Some(irq) = slave_irq {
            self.slave.acknowledge(irq);
        }
        self.master.acknowledge(master_irq);
        Some(vector)
    }

    pub fn state(&self) -> PicState {
        PicState {
            master: self.master.state(),
            slave: self.slave.state(),
        }
    }

    pub fn from_state(state: &PicState) -> Result<Self, PicError> {
        if state.master.irr & (1 << CASCADE_IRQ) != 0 {
            return Err(PicError::CascadeLatched {
                irr: state.master.irr,
            });
        }
        Ok(Pic {
            master: Chip::from_state("master", &state.master)?,
            slave: Chip::from_state("slave", &state.slave)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The sequence docs/guest-abi.md asks of the guest: bases 0x20/0x28,
    /// cascade on IRQ2, 8086 mode with auto-EOI, then IRQ0 and IRQ5 unmasked.
    fn guest_init(pic: &mut Pic, icw4: u8) {
        for (port, value) in [
            (MASTER_COMMAND, 0x11),
            (SLAVE_COMMAND, 0x11),
            (MASTER_DATA, 0x20),
            (SLAVE_DATA, 0x28),
            (MASTER_DATA, 0x04),
            (SLAVE_DATA, 0x02),
            (MASTER_DATA, icw4),
            (SLAVE_DATA, icw4),
            (MASTER_DATA, !0x21),
            (SLAVE_DATA, 0xff),
        ] {
            pic.pio_write(port, value);
        }
    }

    fn initialised(icw4: u8) -> Pic {
        let mut pic = Pic::new();
        guest_init(&mut pic, icw4);
        pic
    }

    #[test]
    fn power_on_delivers_nothing() {
        let mut pic = Pic::new();
        for irq in 0..16 {
            pic.raise_irq(irq);
        }
        assert_eq!(pic.pending_vector(), None);
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(pic.pio_read(MASTER_DATA), 0xff);
        assert_eq!(pic.pio_read(SLAVE_DATA), 0xff);
    }

    #[test]
    fn guest_init_sequence_programs_both_chips() {
        let pic = initialised(0x03);
        let state = pic.state();
        for chip in [&state.master, &state.slave] {
            assert_eq!(chip.init, PicInitStep::Ready);
            assert!(chip.auto_eoi);
        }
        assert_eq!(state.master.vector_base, 0x20);
        assert_eq!(state.slave.vector_base, 0x28);
        assert_eq!(state.master.imr, 0xde);
        assert_eq!(state.slave.imr, 0xff);
    }

    #[test]
    fn icw2_low_bits_are_ignored() {
        let mut pic = Pic::new();
        for (port, value) in [
            (MASTER_COMMAND, 0x13),
            (MASTER_DATA, 0x27),
            (MASTER_DATA, 0x03),
        ] {
            pic.pio_write(port, value);
        }
        // ICW1 0x13: single mode, so no ICW3 is expected and ICW4 follows ICW2.
        pic.raise_irq(1);
        assert_eq!(pic.pending_vector(), Some(0x21));
    }

    #[test]
    fn nothing_is_delivered_mid_initialisation() {
        let mut pic = Pic::new();
        pic.pio_write(MASTER_COMMAND, 0x11);
        pic.pio_write(MASTER_DATA, 0x20);
        pic.raise_irq(0);
        assert_eq!(pic.pending_vector(), None);
        pic.pio_write(MASTER_DATA, 0x04);
        pic.pio_write(MASTER_DATA, 0x03);
        // The edge latched during initialisation is delivered once it ends.
        assert_eq!(pic.pending_vector(), Some(0x20));
    }

    #[test]
    fn masked_lines_latch_and_deliver_when_unmasked() {
        let mut pic = initialised(0x03);
        pic.raise_irq(4);
        assert_eq!(pic.pending_vector(), None);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x10);
        pic.pio_write(MASTER_DATA, 0xce);
        assert_eq!(pic.pio_read(MASTER_DATA), 0xce);
        assert_eq!(pic.acknowledge(), Some(0x24));
        assert_eq!(pic.pending_vector(), None);
    }

    #[test]
    fn fixed_priority_irq0_first() {
        let mut pic = initialised(0x03);
        pic.pio_write(MASTER_DATA, 0x00);
        pic.raise_irq(5);
        pic.raise_irq(7);
        pic.raise_irq(0);
        assert_eq!(pic.pending_vector(), Some(0x20));
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert_eq!(pic.acknowledge(), Some(0x25));
        assert_eq!(pic.acknowledge(), Some(0x27));
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn auto_eoi_never_sets_isr() {
        let mut pic = initialised(0x03);
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.pio_write(MASTER_COMMAND, 0x0b);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0);
        // Another edge right away is deliverable: nothing is in service.
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
    }

    #[test]
    fn normal_eoi_blocks_equal_and_lower_priority() {
        let mut pic = initialised(0x01);
        pic.pio_write(MASTER_DATA, 0x00);
        pic.raise_irq(5);
        assert_eq!(pic.acknowledge(), Some(0x25));
        pic.pio_write(MASTER_COMMAND, 0x0b);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x20);

        pic.raise_irq(5);
        pic.raise_irq(7);
        assert_eq!(pic.pending_vector(), None, "IRQ5 in service blocks 5 and 7");
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20), "IRQ0 nests above IRQ5");
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x21);

        // A non-specific EOI retires the highest priority in service: IRQ0.
        pic.pio_write(MASTER_COMMAND, 0x20);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x20);
        assert_eq!(pic.pending_vector(), None);
        // A specific EOI for a line not in service changes nothing.
        pic.pio_write(MASTER_COMMAND, 0x63);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x20);
        pic.pio_write(MASTER_COMMAND, 0x65);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x00);
        assert_eq!(pic.acknowledge(), Some(0x25));
    }

    #[test]
    fn rotate_commands_act_as_plain_eoi_or_nothing() {
        let mut pic = initialised(0x01);
        pic.pio_write(MASTER_DATA, 0x00);
        pic.raise_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.pio_write(MASTER_COMMAND, 0xc0); // set priority
        pic.pio_write(MASTER_COMMAND, 0x80); // rotate in AEOI
        pic.pio_write(MASTER_COMMAND, 0x0b);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x08);
        pic.pio_write(MASTER_COMMAND, 0xa0); // rotate on non-specific EOI
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x00);
        pic.raise_irq(1);
        pic.raise_irq(6);
        assert_eq!(pic.acknowledge(), Some(0x21), "priority stays fixed");
    }

    #[test]
    fn slave_lines_deliver_through_the_cascade() {
        let mut pic = initialised(0x03);
        pic.pio_write(MASTER_DATA, 0xfa); // IRQ0 and IRQ2
        pic.pio_write(SLAVE_DATA, 0xef); // IRQ12
        pic.raise_irq(12);
        pic.raise_irq(9); // masked on the slave
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x04, "IRQ2 mirrors the slave");
        assert_eq!(pic.pio_read(SLAVE_COMMAND), 0x12);
        assert_eq!(pic.pending_vector(), Some(0x2c));
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20), "IRQ0 outranks the cascade");
        assert_eq!(pic.acknowledge(), Some(0x2c));
        assert_eq!(pic.pio_read(SLAVE_COMMAND), 0x02);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x00);
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(pic.state().master.isr | pic.state().slave.isr, 0);
    }

    #[test]
    fn cascade_with_normal_eoi_needs_eoi_on_both_chips() {
        let mut pic = initialised(0x01);
        pic.pio_write(MASTER_DATA, 0xfb);
        pic.pio_write(SLAVE_DATA, 0x00);
        pic.raise_irq(15);
        assert_eq!(pic.acknowledge(), Some(0x2f));
        pic.pio_write(MASTER_COMMAND, 0x0b);
        pic.pio_write(SLAVE_COMMAND, 0x0b);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x04);
        assert_eq!(pic.pio_read(SLAVE_COMMAND), 0x80);

        pic.raise_irq(8);
        assert_eq!(pic.pending_vector(), None, "master IRQ2 in service");
        pic.pio_write(MASTER_COMMAND, 0x20);
        assert_eq!(
            pic.acknowledge(),
            Some(0x28),
            "IRQ8 nests above IRQ15 on the slave"
        );
        pic.pio_write(SLAVE_COMMAND, 0x20);
        pic.pio_write(MASTER_COMMAND, 0x20);
        assert_eq!(pic.pio_read(SLAVE_COMMAND), 0x80);
        assert_eq!(pic.pending_vector(), None);
    }

    #[test]
    fn ocw3_selects_irr_or_isr_and_other_bits_keep_it() {
        let mut pic = initialised(0x01);
        pic.pio_write(MASTER_DATA, 0x00);
        pic.raise_irq(1);
        pic.raise_irq(6);
        pic.acknowledge();
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x40, "IRR is read by default");
        pic.pio_write(MASTER_COMMAND, 0x0b);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x02);
        pic.pio_write(MASTER_COMMAND, 0x08);
        assert_eq!(
            pic.pio_read(MASTER_COMMAND),
            0x02,
            "RR=0 keeps the selection"
        );
        pic.pio_write(MASTER_COMMAND, 0x0a);
        assert_eq!(pic.pio_read(MASTER_COMMAND), 0x40);
        // ICW1 resets the selection to IRR.
        pic.pio_write(MASTER_COMMAND, 0x0b);
        guest_init(&mut pic, 0x03);
        assert!(!pic.state().master.read_isr);
    }

    #[test]
    fn reinitialisation_clears_requests_and_service() {
        let mut pic = initialised(0x01);
        pic.pio_write(MASTER_DATA, 0x00);
        pic.raise_irq(3);
        pic.raise_irq(4);
        pic.acknowledge();
        guest_init(&mut pic, 0x03);
        let state = pic.state();
        assert_eq!((state.master.irr, state.master.isr), (0, 0));
        assert_eq!(pic.pending_vector(), None);
    }

    #[test]
    fn unwired_irqs_and_ports_are_ignored() {
        let mut pic = initialised(0x03);
        pic.pio_write(MASTER_DATA, 0x00);
        let before = pic.state();
        pic.raise_irq(2);
        pic.raise_irq(16);
        pic.raise_irq(255);
        pic.pio_write(0x22, 0x11);
        assert_eq!(pic.pio_read(0x1234), 0xff);
        assert_eq!(pic.state(), before);
    }

    #[test]
    fn every_byte_on_every_port_is_survivable() {
        for port in [MASTER_COMMAND, MASTER_DATA, SLAVE_COMMAND, SLAVE_DATA] {
            let mut pic = initialised(0x01);
            for value in 0..=u8::MAX {
                pic.pio_write(port, value);
                pic.raise_irq(value);
                pic.raise_irq(value & 15);
                pic.pending_vector();
                pic.acknowledge();
                for read_port in [MASTER_COMMAND, MASTER_DATA, SLAVE_COMMAND, SLAVE_DATA] {
                    pic.pio_read(read_port);
                }
                assert_eq!(Pic::from_state(&pic.state()).as_ref(), Ok(&pic));
            }
        }
    }

    #[test]
    fn state_round_trip() {
        let mut pic = initialised(0x01);
        pic.pio_write(MASTER_DATA, 0x00);
        pic.pio_write(SLAVE_DATA, 0x00);
        pic.raise_irq(11);
        pic.raise_irq(6);
        pic.acknowledge();
        pic.raise_irq(13);
        pic.pio_write(SLAVE_COMMAND, 0x0b);
        pic.pio_write(MASTER_COMMAND, 0x11); // master mid-initialisation
        pic.pio_write(MASTER_DATA, 0x20);
        let state = pic.state();
        let mut restored = Pic::from_state(&state).expect("valid state");
        assert_eq!(restored, pic);
        assert_eq!(restored.state(), state);
        for p in [&mut pic, &mut restored] {
            p.pio_write(MASTER_DATA, 0x04);
            p.pio_write(MASTER_DATA, 0x01);
            p.pio_write(MASTER_DATA, 0x00);
        }
        assert_eq!(restored.acknowledge(), pic.acknowledge());
        assert_eq!(restored, pic);
    }

    /// A way to spoil a good state, and the error it must cause.
    type Corruption = (fn(&mut PicState), PicError);

    #[test]
    fn from_state_rejects_impossible_states() {
        let good = initialised(0x03).state();
        let cases: Vec<Corruption> = vec![
            (
                |s| s.slave.vector_base = 0x2c,
                PicError::UnalignedVectorBase {
                    chip: "slave",
                    base: 0x2c,
                },
            ),
            (
                |s| s.master.irr = 0x05,
                PicError::CascadeLatched { irr: 0x05 },
            ),
            (
                |s| s.master.isr = 0x01,
                PicError::InServiceWithAutoEoi {
                    chip: "master",
                    isr: 0x01,
                },
            ),
            (
                |s| {
                    s.slave.auto_eoi = false;
                    s.slave.isr = 0x10;
                    s.slave.init = PicInitStep::Icw4;
                },
                PicError::InServiceDuringInit {
                    chip: "slave",
                    isr: 0x10,
                },
            ),
            (
                |s| s.master.init = PicInitStep::Icw3 { icw4: true },
                PicError::AutoEoiDuringInit { chip: "master" },
            ),
        ];
        for (corrupt, expected) in cases {
            let mut state = good.clone();
            corrupt(&mut state);
            assert_eq!(Pic::from_state(&state), Err(expected));
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u16, u8),
        Read(u16),
        Raise(u8),
        Acknowledge,
    }

    fn op() -> impl Strategy<Value = Op> {
        let port = prop_oneof![
            Just(MASTER_COMMAND),
            Just(MASTER_DATA),
            Just(SLAVE_COMMAND),
            Just(SLAVE_DATA),
            any::<u16>(),
        ];
        prop_oneof![
            (port.clone(), any::<u8>()).prop_map(|(p, v)| Op::Write(p, v)),
            port.prop_map(Op::Read),
            (0u8..18).prop_map(Op::Raise),
            Just(Op::Acknowledge),
        ]
    }

    proptest! {
        #[test]
        fn random_guest_traffic_keeps_state_restorable(
            icw4 in prop_oneof![Just(0x01u8), Just(0x03u8)],
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let mut pic = initialised(icw4);
            for op in ops {
                match op {
                    Op::Write(port, value) => pic.pio_write(port, value),
                    Op::Read(port) => {
                        pic.pio_read(port);
                    }
                    Op::Raise(irq) => pic.raise_irq(irq),
                    Op::Acknowledge => {
                        let expected = pic.pending_vector();
                        prop_assert_eq!(pic.acknowledge(), expected);
                    }
                }
                let restored = Pic::from_state(&pic.state());
                prop_assert_eq!(restored.as_ref(), Ok(&pic));
            }
        }
    }
}
