//! Where things live in guest-physical memory; `docs/guest-abi.md` is the
//! guest's side of this contract.

/// The VMM's boot GDT: null, 64-bit code, flat data.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// The boot-info block the guest finds through RDI.
pub const BOOT_INFO_ADDR: u64 = 0x7000;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories of 2 MiB pages identity-map the low 4 GiB, so
/// that the MMIO window is reachable as well as RAM.
pub const PD_ADDR: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
pub const BOOT_STACK_BOTTOM: u64 = 0x1_0000;
/// RSP ≡ 8 (mod 16), as a `call` would leave it, which the guest's
/// compiler-generated prologue assumes.
pub const BOOT_STACK_POINTER: u64 = 0x7_fff8;
/// Nothing of the guest image may load below this, where the VMM's boot
/// structures are.
pub const IMAGE_MIN_ADDR: u64 = 0x10_0000;

pub const DEFAULT_MEM_SIZE: u64 = 64 << 20;
/// Enough for the boot structures and a small image.
pub const MIN_MEM_SIZE: u64 = 2 << 20;
/// RAM stops below the MMIO window.
pub const MAX_MEM_SIZE: u64 = 3 << 30;

/// Guest-physical base of virtio-net's register window (in the MMIO window
/// above RAM); the boot-info block tells the guest.
pub const NET_MMIO_BASE: u64 = 0xd000_0000;
/// Size of virtio-net's register window.
pub const NET_MMIO_SIZE: u64 = 0x1000;
/// virtio-net's (edge-triggered) IRQ line on the PIC.
pub const NET_IRQ: u8 = 5;

pub const BOOT_CS: u16 = 0x08;
pub const BOOT_DS: u16 = 0x10;

/// The port through which the guest ends the run (value 0: power-off).
pub const EXIT_PORT: u16 = 0x501;
/// A guest's idle wait where `hlt` is not allowed (CPL3): a byte write of
/// the low byte of the receive used index the guest has seen idles like
/// `hlt` unless the device's index has moved since (docs/guest-abi.md).
pub const IDLE_PORT: u16 = 0x502;
/// What a patch site of a workload with CPL3 code becomes: `out` to this
/// port (`E6 ib` takes an 8-bit port), which exits from CPL3 through the
/// TSS I/O bitmap where `hlt` gives #GP.
pub const TRAP_PORT: u8 = 0xe6;
/// The port a workload with CPL3 code writes first thing in its #DB and
/// #BP handlers, so that a replay's breakpoint or single step, which reach
/// the guest as those exceptions at CPL3, come back to the VMM
/// (`run::debug_trap`, docs/guest-abi.md).
pub const DEBUG_TRAP_PORT: u16 = 0xe7;
