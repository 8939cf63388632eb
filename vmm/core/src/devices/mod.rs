//! The guest's devices, each a deterministic state machine, and the bus that
//! routes port and MMIO accesses to them (`docs/guest-abi.md` has the map).

pub mod pic;
pub mod pit;
pub mod serial;
pub mod virtio_net;

use serde::{Deserialize, Serialize};

use crate::host::frame::GUEST_MAC;
use pic::{Pic, PicState};
use pit::{Pit, PitState};
use serial::{SerialConsole, SerialConsoleState, COM1_BASE};
use virtio_net::{VirtioNet, VirtioNetState, NET_MMIO_BASE, NET_MMIO_SIZE};

const PIC_PORTS: [u16; 4] = [0x20, 0x21, 0xa0, 0xa1];
const PIT_PORTS: std::ops::RangeInclusive<u16> = 0x40..=0x43;

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("PIC state: {0}")]
    Pic(#[from] pic::PicError),
    #[error("PIT state: {0}")]
    Pit(#[from] pit::PitError),
    #[error("serial state: {0}")]
    Serial(#[from] serial::SerialError),
    #[error("virtio-net state: {0}")]
    Net(#[from] virtio_net::VirtioNetError),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Devices {
    pub serial: SerialConsole,
    pub pic: Pic,
    pub pit: Pit,
    pub net: VirtioNet,
    /// Accesses to ports or MMIO addresses where nothing lives; a guest bug
    /// worth counting, never a reason to stop.
    pub unknown_pio: u64,
    pub unknown_mmio: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialConsoleState,
    pub pic: PicState,
    pub pit: PitState,
    pub net: VirtioNetState,
    pub unknown_pio: u64,
    pub unknown_mmio: u64,
}

/// Where a port access goes.
enum Port {
    Pic,
    Pit,
    Serial(u8),
    Unknown,
}

fn route(port: u16) -> Port {
    if PIC_PORTS.contains(&port) {
        Port::Pic
    } else if PIT_PORTS.contains(&port) {
        Port::Pit
    } else if (COM1_BASE..COM1_BASE + 8).contains(&port) {
        Port::Serial((port - COM1_BASE) as u8)
    } else {
        Port::Unknown
    }
}

impl Default for Devices {
    fn default() -> Self {
        Self::new()
    }
}

impl Devices {
    pub fn new() -> Self {
        Devices {
            serial: SerialConsole::new(),
            pic: Pic::new(),
            pit: Pit::new(),
            net: VirtioNet::new(GUEST_MAC),
            unknown_pio: 0,
            unknown_mmio: 0,
        }
    }

    /// One byte-wide port read. Wider and string accesses arrive here one
    /// byte at a time on the same port, which is all the guest's 8-bit
    /// devices need.
    pub fn pio_read(&mut self, port: u16, now_ns: u64) -> u8 {
        match route(port) {
            Port::Pic => self.pic.pio_read(port),
            Port::Pit => self.pit.pio_read(port, now_ns),
            Port::Serial(offset) => self.serial.pio_read(offset),
            Port::Unknown => {
                self.unknown_pio += 1;
                0xff
            }
        }
    }

    pub fn pio_write(&mut self, port: u16, value: u8, now_ns: u64) {
        match route(port) {
            Port::Pic => self.pic.pio_write(port, value),
            Port::Pit => self.pit.pio_write(port, value, now_ns),
            Port::Serial(offset) => self.serial.pio_write(offset, value),
            Port::Unknown => self.unknown_pio += 1,
        }
    }

    fn net_offset(addr: u64) -> Option<u64> {
        addr.checked_sub(NET_MMIO_BASE)
            .filter(|off| *off < NET_MMIO_SIZE)
    }

    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match Self::net_offset(addr) {
            Some(off) => self.net.mmio_read(off, data),
            None => {
                self.unknown_mmio += 1;
                data.fill(0);
            }
        }
    }

    pub fn mmio_write(
        &mut self,
        addr: u64,
        data: &[u8],
        mem: &crate::machine::memory::GuestMemory,
    ) {
        match Self::net_offset(addr) {
            Some(off) => self.net.mmio_write(off, data, mem),
            None => self.unknown_mmio += 1,
        }
    }

    pub fn state(&self) -> DevicesState {
        DevicesState {
            serial: self.serial.state(),
            pic: self.pic.state(),
            pit: self.pit.state(),
            net: self.net.state(),
            unknown_pio: self.unknown_pio,
            unknown_mmio: self.unknown_mmio,
        }
    }

    pub fn from_state(state: &DevicesState) -> Result<Self, DevicesError> {
        Ok(Devices {
            serial: SerialConsole::from_state(&state.serial)?,
            pic: Pic::from_state(&state.pic)?,
            pit: Pit::from_state(&state.pit)?,
            net: VirtioNet::from_state(&state.net)?,
            unknown_pio: state.unknown_pio,
            unknown_mmio: state.unknown_mmio,
        })
    }
}
