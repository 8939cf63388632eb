//! A breakpoint the VMM makes itself, for a replay that must stop the guest
//! at one instruction between two synchronous exits. This platform has no
//! usable debug breakpoints (`int3` through guest debug does not work, and
//! hardware breakpoints hang the calling thread: never use them), but `hlt`
//! at CPL0 always exits with RIP one past it. So the instruction's first
//! byte is replaced by `hlt` (0xF4) while the guest runs, and put back at
//! every exit before the VMM looks at memory: digests, memory hashes and the
//! guest at any exit see the original byte. A guest with CPL3 code, where
//! `hlt` faults, gets `int3` instead, which its own #BP handler brings back
//! to the VMM (`run::debug_trap`).
//!
//! The byte is written through the host mapping, not through `vm-memory`'s
//! tracked writes: the page's content is the same at every point where the
//! VMM looks, so it must not count as dirtied (a replay's digest would
//! otherwise list a page its recording never wrote).

use kvm_ioctls::VcpuFd;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};

use crate::machine::memory::GuestMemory;

const HLT: u8 = 0xf4;

#[derive(Debug, thiserror::Error)]
pub enum BreakpointError {
    #[error("cannot translate the breakpoint's guest address {rip:#x}: {reason}")]
    Translate { rip: u64, reason: String },
    #[error("the breakpoint at {rip:#x} (guest-physical {gpa:#x}) is outside guest memory")]
    OutsideMemory { rip: u64, gpa: u64 },
}

/// What [`Breakpoint::disarm`] found at the breakpoint's byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disarmed {
    /// The original byte is back (or was never replaced).
    Restored,
    /// The guest wrote the byte while the breakpoint was armed; its value
    /// is kept, and the breakpoint no longer stands for the instruction the
    /// VMM meant.
    GuestWrote(u8),
}

/// A `hlt` breakpoint at one guest instruction. Whoever arms it disarms it
/// before the memory goes away (the run loop does at every exit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breakpoint {
    rip: u64,
    /// The guest-physical address of the instruction's first byte.
    gpa: u64,
    /// That byte as the guest wrote it.
    original: u8,
    /// What is written over it: `hlt`, or `int3`.
    byte: u8,
    armed: bool,
}

/// The host address of guest-physical `gpa`, which `new` checked.
fn host_byte(mem: &GuestMemory, gpa: u64) -> *mut u8 {
    mem.get_host_address(GuestAddress(gpa))
        .expect("the breakpoint's address was checked when it was made")
}

impl Breakpoint {
    /// A `hlt` breakpoint at the instruction at `rip`, translated through
    /// the guest's page tables as they are now. Not armed yet.
    pub fn new(vcpu: &VcpuFd, mem: &GuestMemory, rip: u64) -> Result<Self, BreakpointError> {
        Self::with_byte(vcpu, mem, rip, HLT)
    }

    /// As [`Breakpoint::new`], writing `byte` over the instruction.
    pub fn with_byte(
        vcpu: &VcpuFd,
        mem: &GuestMemory,
        rip: u64,
        byte: u8,
    ) -> Result<Self, BreakpointError> {
        let translation = vcpu
            .translate_gva(rip)
            .map_err(|e| BreakpointError::Translate {
                rip,
                reason: e.to_string(),
            })?;
        if translation.valid == 0 {
            return Err(BreakpointError::Translate {
                rip,
                reason: "the guest's page tables do not map it".into(),
            });
        }
        let gpa = translation.physical_address;
        let host = mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| BreakpointError::OutsideMemory { rip, gpa })?;
        // SAFETY: `host` is the address of a byte inside the guest memory
        // mapping (get_host_address checked it), which `mem` keeps alive.
        let original = unsafe { host.read_volatile() };
        Ok(Breakpoint {
            rip,
            gpa,
            original,
            byte,
            armed: false,
        })
    }

    pub fn rip(&self) -> u64 {
        self.rip
    }

    /// Whether the instruction is itself a `hlt` (a real one, or a patched
    /// `rdtsc`-like site): then arming changes nothing, and a hit that is not
    /// the wanted one is that instruction's own synchronous exit.
    pub fn is_hlt(&self) -> bool {
        self.original == HLT && self.byte == HLT
    }

    /// Whether a `hlt` exit with `rip` (one past the `hlt`), or an `int3`
    /// that pushed `rip`, is this breakpoint's.
    pub fn is_hit(&self, rip: u64) -> bool {
        rip == self.rip.wrapping_add(1)
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Puts the breakpoint's byte over the instruction's first byte, until
    /// [`disarm`]. `mem` is the memory the breakpoint was made in.
    ///
    /// [`disarm`]: Breakpoint::disarm
    pub fn arm(&mut self, mem: &GuestMemory) {
        if self.armed || self.original == self.byte {
            return;
        }
        // SAFETY: the byte is inside the mapping `mem` keeps alive (checked
        // in `new`); the guest does not run while the vCPU thread (the
        // caller) is outside KVM_RUN, so nothing races with the write.
        unsafe { host_byte(mem, self.gpa).write_volatile(self.byte) }
        self.armed = true;
    }

    /// Puts the original byte back, unless the guest replaced the
    /// breakpoint's meanwhile (self-modifying code), whose byte then stays.
    pub fn disarm(&mut self, mem: &GuestMemory) -> Disarmed {
        if !self.armed {
            return Disarmed::Restored;
        }
        self.armed = false;
        let host = host_byte(mem, self.gpa);
        // SAFETY: as in `arm`.
        let found = unsafe { host.read_volatile() };
        if found != self.byte {
            self.original = found;
            return Disarmed::GuestWrote(found);
        }
        // SAFETY: as in `arm`.
        unsafe { host.write_volatile(self.original) }
        Disarmed::Restored
    }
}
