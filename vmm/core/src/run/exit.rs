//! The pure exit handler: what a synchronous VM exit does to the devices,
//! apart from `VcpuFd::run()`, so that the live run loop, record, replay and
//! unit tests with made-up exits all share it.

use crate::devices::Devices;
use crate::machine::layout::{DEBUG_TRAP_PORT, EXIT_PORT, IDLE_PORT, TRAP_PORT};
use crate::machine::memory::GuestMemory;

/// virtio-net's receive queue.
const RX_QUEUE: usize = 0;

/// A synchronous exit, in the VMM's own terms (made-up exits are easy to
/// build in tests; `VcpuExit` borrows the vCPU).
#[derive(Debug)]
pub enum Exit<'a> {
    IoIn { port: u16, data: &'a mut [u8] },
    IoOut { port: u16, data: &'a [u8] },
    MmioRead { addr: u64, data: &'a mut [u8] },
    MmioWrite { addr: u64, data: &'a [u8] },
    Hlt,
}

/// What the run loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the guest.
    Resume,
    /// The guest is idle until an interrupt.
    Idle,
    /// The guest asked to end the run through the exit port.
    GuestExit { code: u32 },
}

/// The kind of a synchronous exit, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Pio,
    Mmio,
    Hlt,
    /// A read or write of an MSR the VMM filters (the TSC).
    Msr,
}

impl Exit<'_> {
    pub fn kind(&self) -> ExitKind {
        match self {
            Exit::IoIn { .. } | Exit::IoOut { .. } => ExitKind::Pio,
            Exit::MmioRead { .. } | Exit::MmioWrite { .. } => ExitKind::Mmio,
            Exit::Hlt => ExitKind::Hlt,
        }
    }
}

/// Applies one synchronous exit to the devices. `now_ns` is the only notion
/// of time a device gets, so that replay can supply the recorded one.
pub fn handle_exit(
    devices: &mut Devices,
    mem: &GuestMemory,
    now_ns: u64,
    exit: Exit<'_>,
) -> Action {
    match exit {
        Exit::IoOut {
            port: EXIT_PORT,
            data,
        } => {
            let mut code = [0u8; 4];
            let n = data.len().min(4);
            code[..n].copy_from_slice(&data[..n]);
            Action::GuestExit {
                code: u32::from_le_bytes(code),
            }
        }
        // The run loop emulates the patched instruction; no device is here.
        Exit::IoOut { port, .. } if port == u16::from(TRAP_PORT) => Action::Resume,
        // The guest's #DB or #BP handler: a replay's own breakpoint or step
        // is taken back before this; any other goes on to the guest's
        // report of the exception.
        Exit::IoOut {
            port: DEBUG_TRAP_PORT,
            ..
        } => Action::Resume,
        Exit::IoOut {
            port: IDLE_PORT,
            data,
        } => {
            // A frame delivered after the guest last looked at its receive
            // ring, but before this write, must not be slept through. CPL3
            // can only write a byte here, so the low bytes are compared: a
            // guest that posts fewer than 256 receive buffers is exact.
            let used = devices.net.state().queues[RX_QUEUE].next_used;
            if data.first() == Some(&(used as u8)) {
                Action::Idle
            } else {
                Action::Resume
            }
        }
        Exit::IoIn { port, data } => {
            for byte in data.iter_mut() {
                *byte = devices.pio_read(port, now_ns);
            }
            Action::Resume
        }
        Exit::IoOut { port, data } => {
            for byte in data {
                devices.pio_write(port, *byte, now_ns);
            }
            Action::Resume
        }
        Exit::MmioRead { addr, data } => {
            devices.mmio_read(addr, data);
            Action::Resume
        }
        Exit::MmioWrite { addr, data } => {
            devices.mmio_write(addr, data, mem);
            Action::Resume
        }
        Exit::Hlt => Action::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_net::NET_MMIO_BASE;

    fn setup() -> (Devices, GuestMemory) {
        (
            Devices::new(),
            crate::machine::memory::create(4 << 20).expect("memory"),
        )
    }

    #[test]
    fn console_bytes_reach_the_serial_output() {
        let (mut d, mem) = setup();
        for b in b"ok\n" {
            let a = handle_exit(
                &mut d,
                &mem,
                0,
                Exit::IoOut {
                    port: 0x3f8,
                    data: &[*b],
                },
            );
            assert_eq!(a, Action::Resume);
        }
        assert_eq!(d.serial.take_output(), b"ok\n");
    }

    #[test]
    fn the_exit_port_ends_the_run_with_the_guest_code() {
        let (mut d, mem) = setup();
        let a = handle_exit(
            &mut d,
            &mem,
            0,
            Exit::IoOut {
                port: EXIT_PORT,
                data: &[7, 0, 0, 0],
            },
        );
        assert_eq!(a, Action::GuestExit { code: 7 });
        let a = handle_exit(
            &mut d,
            &mem,
            0,
            Exit::IoOut {
                port: EXIT_PORT,
                data: &[0],
            },
        );
        assert_eq!(a, Action::GuestExit { code: 0 });
    }

    #[test]
    fn unknown_ports_read_all_ones_and_are_counted() {
        let (mut d, mem) = setup();
        let mut data = [0u8; 2];
        handle_exit(
            &mut d,
            &mem,
            0,
            Exit::IoIn {
                port: 0x1234,
                data: &mut data,
            },
        );
        assert_eq!(data, [0xff, 0xff]);
        handle_exit(
            &mut d,
            &mem,
            0,
            Exit::IoOut {
                port: 0x80,
                data: &[1],
            },
        );
        assert_eq!(d.unknown_pio, 3);
    }

    #[test]
    fn pic_programming_through_exits_makes_the_timer_deliverable() {
        let (mut d, mem) = setup();
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x03),
            (0x21, 0xfe),
        ] {
            handle_exit(&mut d, &mem, 0, Exit::IoOut { port, data: &[v] });
        }
        d.pic.raise_irq(0);
        assert_eq!(d.pic.acknowledge(), Some(0x20));
        d.pic.raise_irq(3);
        assert_eq!(
            d.pic.pending_vector(),
            None,
            "masked IRQ must not be delivered"
        );
    }

    #[test]
    fn virtio_mmio_reads_reach_the_device() {
        let (mut d, mem) = setup();
        let mut magic = [0u8; 4];
        handle_exit(
            &mut d,
            &mem,
            0,
            Exit::MmioRead {
                addr: NET_MMIO_BASE,
                data: &mut magic,
            },
        );
        assert_eq!(&magic, b"virt");
        let mut other = [0xaau8; 4];
        handle_exit(
            &mut d,
            &mem,
            0,
            Exit::MmioRead {
                addr: 0xfee0_0000,
                data: &mut other,
            },
        );
        assert_eq!(other, [0; 4]);
        assert_eq!(d.unknown_mmio, 1);
    }

    #[test]
    fn hlt_means_idle() {
        let (mut d, mem) = setup();
        assert_eq!(handle_exit(&mut d, &mem, 0, Exit::Hlt), Action::Idle);
    }

    #[test]
    fn the_idle_port_idles_only_when_the_guest_has_seen_every_frame() {
        let (mut d, mem) = setup();
        let idle = |d: &mut Devices, seen: &[u8]| {
            handle_exit(
                d,
                &mem,
                0,
                Exit::IoOut {
                    port: IDLE_PORT,
                    data: seen,
                },
            )
        };
        // No frame was ever used: the guest that saw 0 sleeps.
        assert_eq!(idle(&mut d, &[0]), Action::Idle);
        assert_eq!(idle(&mut d, &[1]), Action::Resume);
        let trap = Exit::IoOut {
            port: u16::from(TRAP_PORT),
            data: &[0],
        };
        assert_eq!(handle_exit(&mut d, &mem, 0, trap), Action::Resume);
        let debug_trap = Exit::IoOut {
            port: DEBUG_TRAP_PORT,
            data: &[0],
        };
        assert_eq!(handle_exit(&mut d, &mem, 0, debug_trap), Action::Resume);
        assert_eq!(d.unknown_pio, 0, "the VMM's own ports are not unknown");
    }
}
