//! The COM1 16550 UART, emulated by `vm_superio::Serial`.
//!
//! What the guest transmits is an output in the fault-tolerance sense: the
//! primary may release it only once the backup has acknowledged the log up
//! to that point. So the device writes nowhere itself; it keeps the bytes in
//! memory until the run loop takes them with [`SerialConsole::take_output`].
//! The buffer is part of the saved state, so bytes not yet released survive
//! a snapshot.
//!
//! The UART has no input path here: nothing in the guest ABI feeds it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// Base port of COM1; the UART decodes `COM1_BASE..COM1_BASE + 8`.
pub const COM1_BASE: u16 = 0x3f8;

/// Registers span offsets 0..=7.
const REGISTER_COUNT: u8 = 8;
/// vm-superio's receive FIFO depth.
const FIFO_SIZE: usize = 64;
/// vm-superio keeps THR-empty and transmitter-idle set at all times, since
/// a virtual transmitter is never busy; only data-ready varies.
const LSR_ALWAYS: u8 = 0x60;
const LSR_DATA_READY: u8 = 0x01;
/// The interrupt-enable bits a 16550 has.
const IER_VALID: u8 = 0x0f;
/// The values vm-superio's IIR can hold: "no interrupt", or any mix of the
/// THR-empty and received-data causes.
const IIR_VALID: [u8; 4] = [0x01, 0x02, 0x04, 0x06];

/// The UART's interrupt line, latched so that a raise is seen once.
#[derive(Debug, Default)]
struct IrqLatch(AtomicBool);

impl Trigger for IrqLatch {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// The saved state of the console: vm-superio's `SerialState` (which is not
/// serde) field by field, plus what this wrapper adds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read (only loopback fills it).
    pub in_buffer: Vec<u8>,
    /// The interrupt line was raised since the last `irq_pending`.
    pub irq_pending: bool,
    /// Transmitted bytes not yet taken by the run loop.
    pub output: Vec<u8>,
}

/// A [`SerialConsoleState`] that no sequence of guest accesses can produce.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SerialError {
    #[error("serial receive FIFO holds {len} bytes, more than its {FIFO_SIZE}")]
    FifoOverflow { len: usize },
    #[error("serial IER {0:#04x} has bits a 16550 does not implement")]
    InvalidInterruptEnable(u8),
    #[error("serial IIR {0:#04x} is not a value the UART produces")]
    InvalidInterruptIdentification(u8),
    #[error("serial LSR {lsr:#04x} does not match a receive FIFO of {fifo_len} bytes")]
    InvalidLineStatus { lsr: u8, fifo_len: usize },
    #[error("vm-superio refused the serial state: {0}")]
    Uart(String),
}

/// COM1, holding what the guest transmits until the run loop takes it.
#[derive(Debug)]
pub struct SerialConsole {
    uart: Serial<IrqLatch, NoEvents, Vec<u8>>,
}

impl Default for SerialConsole {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialEq for SerialConsole {
    fn eq(&self, other: &Self) -> bool {
        self.state() == other.state()
    }
}

impl Eq for SerialConsole {}

impl SerialConsole {
    pub fn new() -> Self {
        SerialConsole {
            uart: Serial::new(IrqLatch::default(), Vec::new()),
        }
    }

    /// `offset` is the port minus [`COM1_BASE`].
    pub fn pio_read(&mut self, offset: u8) -> u8 {
        if offset >= REGISTER_COUNT {
            tracing::warn!(offset, "serial read beyond its 8 registers");
            return 0xff;
        }
        self.uart.read(offset)
    }

    /// `offset` is the port minus [`COM1_BASE`].
    pub fn pio_write(&mut self, offset: u8, value: u8) {
        if offset >= REGISTER_COUNT {
            tracing::warn!(offset, value, "serial write beyond its 8 registers");
            return;
        }
        // Writing to a Vec and raising the latch cannot fail; should a later
        // vm-superio find a way, losing one byte beats stopping the guest.
        if let Err(error) = self.uart.write(offset, value) {
            tracing::warn!(offset, value, %error, "serial write failed");
        }
    }

    /// The bytes the guest transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.uart.writer_mut())
    }

    /// Whether the UART raised its interrupt line since the last call.
    pub fn irq_pending(&mut self) -> bool {
        self.uart.interrupt_evt().0.swap(false, Ordering::Relaxed)
    }

    pub fn state(&self) -> SerialConsoleState {
        let uart = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: uart.baud_divisor_low,
            baud_divisor_high: uart.baud_divisor_high,
            interrupt_enable: uart.interrupt_enable,
            interrupt_identification: uart.interrupt_identification,
            line_control: uart.line_control,
            line_status: uart.line_status,
            modem_control: uart.modem_control,
            modem_status: uart.modem_status,
            scratch: uart.scratch,
            in_buffer: uart.in_buffer,
            irq_pending: self.uart.interrupt_evt().0.load(Ordering::Relaxed),
            output: self.uart.writer().clone(),
        }
    }

    pub fn from_state(state: &SerialConsoleState) -> Result<Self, SerialError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(SerialError::FifoOverflow {
                len: state.in_buffer.len(),
            });
        }
        if state.interrupt_enable & !IER_VALID != 0 {
            return Err(SerialError::InvalidInterruptEnable(state.interrupt_enable));
        }
        if !IIR_VALID.contains(&state.interrupt_identification) {
            return Err(SerialError::InvalidInterruptIdentification(
                state.interrupt_identification,
            ));
        }
        let data_ready = if state.in_buffer.is_empty() {
            0
        } else {
            LSR_DATA_READY
        };
        if state.line_status != LSR_ALWAYS | data_ready {
            return Err(SerialError::InvalidLineStatus {
                lsr: state.line_status,
                fifo_len: state.in_buffer.len(),
            });
        }
        let uart_state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &uart_state,
            IrqLatch::default(),
            NoEvents,
            state.output.clone(),
        )
        .map_err(|error| SerialError::Uart(error.to_string()))?;
        // vm-superio re-raises pending interrupts while restoring; the saved
        // latch already says whether a raise was outstanding.
        uart.interrupt_evt()
            .0
            .store(state.irq_pending, Ordering::Relaxed);
        Ok(SerialConsole { uart })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u8 = 0;
    const DLL: u8 = 0;
    const DLM: u8 = 1;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LCR: u8 = 3;
    const MCR: u8 = 4;
    const LSR: u8 = 5;
    const SCR: u8 = 7;

    fn write_str(serial: &mut SerialConsole, text: &[u8]) {
        for &byte in text {
            serial.pio_write(THR, byte);
        }
    }

    #[test]
    fn thr_writes_reach_the_output_buffer() {
        let mut serial = SerialConsole::new();
        write_str(&mut serial, b"hi\n");
        assert_eq!(serial.take_output(), b"hi\n");
        assert_eq!(serial.take_output(), b"");
        write_str(&mut serial, b"ok");
        assert_eq!(serial.take_output(), b"ok");
    }

    #[test]
    fn divisor_programming_emits_nothing() {
        let mut serial = SerialConsole::new();
        serial.pio_write(LCR, 0x80);
        serial.pio_write(DLL, 0x01);
        serial.pio_write(DLM, 0x00);
        assert_eq!(serial.pio_read(DLL), 0x01);
        assert_eq!(serial.pio_read(DLM), 0x00);
        serial.pio_write(LCR, 0x03);
        assert_eq!(serial.take_output(), b"");
        let state = serial.state();
        assert_eq!((state.baud_divisor_low, state.baud_divisor_high), (1, 0));
        assert_eq!(state.line_control, 0x03);
    }

    #[test]
    fn transmitter_is_always_ready() {
        let mut serial = SerialConsole::new();
        for _ in 0..100 {
            serial.pio_write(THR, b'x');
            let lsr = serial.pio_read(LSR);
            assert_eq!(lsr & 0x60, 0x60, "THR empty and transmitter idle");
        }
        assert_eq!(serial.take_output().len(), 100);
    }

    #[test]
    fn interrupt_line_is_latched_once() {
        let mut serial = SerialConsole::new();
        write_str(&mut serial, b"a");
        assert!(!serial.irq_pending(), "IER is 0 after reset");
        // Enabling THR-empty raises at once: the holding register is empty.
        serial.pio_write(IER, 0x02);
        assert!(serial.irq_pending());
        assert!(!serial.irq_pending());
        assert_eq!(serial.pio_read(IIR) & 0x0f, 0x02);
        serial.pio_write(THR, b'b');
        assert!(
            serial.irq_pending(),
            "reading IIR acknowledged the last one"
        );
    }

    #[test]
    fn loopback_keeps_bytes_off_the_console() {
        let mut serial = SerialConsole::new();
        serial.pio_write(MCR, 0x10);
        serial.pio_write(THR, 0x5a);
        assert_eq!(serial.take_output(), b"");
        assert_eq!(serial.pio_read(LSR) & 0x01, 0x01);
        assert_eq!(serial.pio_read(THR), 0x5a);
        assert_eq!(serial.pio_read(LSR) & 0x01, 0x00);
    }

    #[test]
    fn state_round_trip_preserves_registers_and_pending_output() {
        let mut serial = SerialConsole::new();
        serial.pio_write(LCR, 0x80);
        serial.pio_write(DLL, 0x0c);
        serial.pio_write(DLM, 0x01);
        serial.pio_write(LCR, 0x1b);
        serial.pio_write(MCR, 0x0b);
        serial.pio_write(SCR, 0xa5);
        serial.pio_write(IER, 0x05);
        write_str(&mut serial, b"unsent");
        serial.pio_write(MCR, 0x1b); // loopback, to leave a byte in the FIFO
        serial.pio_write(THR, 0x42);

        let state = serial.state();
        assert_eq!(state.output, b"unsent");
        assert_eq!(state.in_buffer, [0x42]);
        let mut restored = SerialConsole::from_state(&state).expect("valid state");
        assert_eq!(restored, serial);
        assert_eq!(restored.state(), state);
        assert_eq!(restored.irq_pending(), serial.irq_pending());
        assert_eq!(restored.pio_read(LCR), 0x1b);
        assert_eq!(restored.pio_read(MCR), 0x1b);
        assert_eq!(restored.pio_read(SCR), 0xa5);
        assert_eq!(restored.pio_read(IER), 0x05);
        assert_eq!(restored.pio_read(THR), 0x42);
        restored.pio_write(LCR, 0x9b);
        assert_eq!(restored.pio_read(DLL), 0x0c);
        assert_eq!(restored.pio_read(DLM), 0x01);
        assert_eq!(restored.take_output(), b"unsent");
    }

    #[test]
    fn restore_keeps_the_saved_interrupt_latch() {
        let mut serial = SerialConsole::new();
        serial.pio_write(IER, 0x02);
        assert!(serial.irq_pending());
        // IIR still says THR-empty, which makes vm-superio raise on restore;
        // the latch was consumed, so the restored device must not report it.
        let restored_clear = SerialConsole::from_state(&serial.state());
        assert!(!restored_clear.expect("valid state").irq_pending());
    }

    /// A way to spoil a good state, and the error it must cause.
    type Corruption = (fn(&mut SerialConsoleState), SerialError);

    #[test]
    fn from_state_rejects_impossible_states() {
        let good = SerialConsole::new().state();
        let cases: Vec<Corruption> = vec![
            (
                |s| {
                    s.in_buffer = vec![0; 65];
                    s.line_status = 0x61;
                },
                SerialError::FifoOverflow { len: 65 },
            ),
            (
                |s| s.interrupt_enable = 0x10,
                SerialError::InvalidInterruptEnable(0x10),
            ),
            (
                |s| s.interrupt_identification = 0x03,
                SerialError::InvalidInterruptIdentification(0x03),
            ),
            (
                |s| s.line_status = 0x61,
                SerialError::InvalidLineStatus {
                    lsr: 0x61,
                    fifo_len: 0,
                },
            ),
            (
                |s| s.in_buffer = vec![1],
                SerialError::InvalidLineStatus {
                    lsr: 0x60,
                    fifo_len: 1,
                },
            ),
        ];
        for (corrupt, expected) in cases {
            let mut state = good.clone();
            corrupt(&mut state);
            assert_eq!(SerialConsole::from_state(&state), Err(expected));
        }
    }

    #[test]
    fn every_byte_at_every_offset_is_survivable() {
        let mut serial = SerialConsole::new();
        for offset in 0..=u8::MAX {
            for value in 0..=u8::MAX {
                serial.pio_write(offset, value);
                serial.pio_read(offset);
            }
            serial.irq_pending();
            serial.take_output();
            assert_eq!(
                SerialConsole::from_state(&serial.state()).as_ref(),
                Ok(&serial)
            );
        }
        assert_eq!(serial.pio_read(8), 0xff);
    }
}
