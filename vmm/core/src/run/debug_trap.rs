//! Stopping the guest at one instruction where `hlt` cannot: at CPL3 on
//! this platform `hlt` gives #GP, and KVM's single step reaches the guest as
//! #DB instead of the VMM. A workload with user code
//! (`Workload::runs_user_code`) has #DB and #BP handlers whose first
//! instruction writes [`DEBUG_TRAP_PORT`], on a stack of their own (IST
//! slot 4 of its TSS; docs/guest-abi.md). So a replay writes `int3` for a
//! breakpoint and sets the trap flag for a step; the guest takes the
//! exception, its handler's write exits, and the VMM takes the exception
//! back ([`DebugStack::take_back`]): registers and segments as the frame
//! says they were, the frame's bytes on the stack as they were before. The
//! guest is then exactly where the exception struck, as if the VMM had
//! stopped it there itself, and nothing of the handler remains.
//!
//! All of it is plain x86 (`int3`, RFLAGS.TF, an IST stack), so it works the
//! same on a KVM whose own guest debugging works; it relies on nothing of
//! this platform's but that port I/O at CPL0 exits.

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

pub use crate::machine::layout::DEBUG_TRAP_PORT;
use crate::machine::memory::GuestMemory;

/// `int3`: the breakpoint byte where `hlt` would fault.
pub const INT3: u8 = 0xcc;
/// The trap flag: a #DB after the next instruction.
pub const RFLAGS_TF: u64 = 1 << 8;
/// What the CPU pushes for an exception without an error code in 64-bit
/// mode: RIP, CS, RFLAGS, RSP, SS.
const FRAME_SIZE: u64 = 40;
/// Where the 64-bit TSS keeps IST slot 1, and the slot the handlers use.
const TSS_IST1: u64 = 0x24;
const IST_DEBUG: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum DebugTrapError {
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot reach {what} at guest address {gva:#x}: {reason}")]
    Memory {
        what: &'static str,
        gva: u64,
        reason: String,
    },
    #[error("the guest's debug trap came with RSP {found:#x}, not on the frame of its debug stack at {expected:#x}: its #DB/#BP handler is not the one docs/guest-abi.md describes")]
    Stack { expected: u64, found: u64 },
}

/// What the exception pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Frame {
    fn parse(bytes: &[u8; FRAME_SIZE as usize]) -> Frame {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        };
        Frame {
            rip: word(0),
            cs: word(1),
            rflags: word(2),
            rsp: word(3),
            ss: word(4),
        }
    }

    /// The privilege level the exception struck at.
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }
}

/// The frame's place on the guest's debug stack, and what was there before
/// any exception wrote it.
#[derive(Debug, Clone)]
pub struct DebugStack {
    frame_gva: u64,
    frame_gpa: u64,
    saved: [u8; FRAME_SIZE as usize],
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DebugTrapError {
    move |source| DebugTrapError::Kvm { what, source }
}

/// The guest-physical address of `len` bytes at `gva`, which must not cross
/// into a page mapped elsewhere.
fn translate(vcpu: &VcpuFd, gva: u64, len: u64, what: &'static str) -> Result<u64, DebugTrapError> {
    let physical = |at: u64| -> Result<u64, DebugTrapError> {
        let t = vcpu.translate_gva(at).map_err(|e| DebugTrapError::Memory {
            what,
            gva: at,
            reason: e.to_string(),
        })?;
        if t.valid == 0 {
            return Err(DebugTrapError::Memory {
                what,
                gva: at,
                reason: "the guest's page tables do not map it".into(),
            });
        }
        Ok(t.physical_address)
    };
    let first = physical(gva)?;
    if physical(gva + len - 1)? != first + len - 1 {
        return Err(DebugTrapError::Memory {
            what,
            gva,
            reason: "it crosses into a page mapped elsewhere".into(),
        });
    }
    Ok(first)
}

fn read<const N: usize>(
    vcpu: &VcpuFd,
    mem: &GuestMemory,
    gva: u64,
    what: &'static str,
) -> Result<[u8; N], DebugTrapError> {
    let gpa = translate(vcpu, gva, N as u64, what)?;
    let mut bytes = [0u8; N];
    mem.read_slice(&mut bytes, GuestAddress(gpa))
        .map_err(|e| DebugTrapError::Memory {
            what,
            gva,
            reason: e.to_string(),
        })?;
    Ok(bytes)
}

impl DebugStack {
    /// Finds the debug stack through the TSS the guest has loaded, and
    /// keeps what its frame's bytes are now.
    pub fn locate(vcpu: &VcpuFd, mem: &GuestMemory) -> Result<DebugStack, DebugTrapError> {
        let sregs = vcpu
            .get_sregs()
            .map_err(kvm_err("read the vCPU's segments"))?;
        let slot = sregs.tr.base + TSS_IST1 + 8 * (IST_DEBUG - 1);
        let top = u64::from_le_bytes(read::<8>(vcpu, mem, slot, "the TSS's debug stack slot")?);
        // The CPU aligns an IST stack's top down to 16 bytes.
        let frame_gva = (top & !15).wrapping_sub(FRAME_SIZE);
        let frame_gpa = translate(vcpu, frame_gva, FRAME_SIZE, "the debug stack's frame")?;
        let saved = read(vcpu, mem, frame_gva, "the debug stack's frame")?;
        Ok(DebugStack {
            frame_gva,
            frame_gpa,
            saved,
        })
    }

    /// At an exit on [`DEBUG_TRAP_PORT`] with registers `regs`: the frame
    /// the exception pushed.
    pub fn frame(&self, regs: &kvm_regs, mem: &GuestMemory) -> Result<Frame, DebugTrapError> {
        if regs.rsp != self.frame_gva {
            return Err(DebugTrapError::Stack {
                expected: self.frame_gva,
                found: regs.rsp,
            });
        }
        let mut bytes = [0u8; FRAME_SIZE as usize];
        mem.read_slice(&mut bytes, GuestAddress(self.frame_gpa))
            .map_err(|e| DebugTrapError::Memory {
                what: "the debug stack's frame",
                gva: self.frame_gva,
                reason: e.to_string(),
            })?;
        Ok(Frame::parse(&bytes))
    }

    /// Takes the exception of `frame` back, with the guest at `rip` (the
    /// frame's, or the breakpoint's own address for `int3`, which pushes
    /// the address past it) and the trap flag clear: the frame's bytes as
    /// they were, the general registers the handler left untouched, RSP and
    /// RFLAGS from the frame and, when the exception changed privilege,
    /// the code and stack segments the frame names, from the guest's GDT.
    pub fn take_back(
        &self,
        vcpu: &mut VcpuFd,
        mem: &GuestMemory,
        frame: &Frame,
        rip: u64,
    ) -> Result<(), DebugTrapError> {
        mem.write_slice(&self.saved, GuestAddress(self.frame_gpa))
            .map_err(|e| DebugTrapError::Memory {
                what: "the debug stack's frame",
                gva: self.frame_gva,
                reason: e.to_string(),
            })?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(kvm_err("read the vCPU's segments"))?;
        if u64::from(sregs.cs.selector) != frame.cs {
            sregs.cs = gdt_segment(vcpu, mem, sregs.gdt.base, frame.cs as u16)?;
            sregs.ss = gdt_segment(vcpu, mem, sregs.gdt.base, frame.ss as u16)?;
            vcpu.set_sregs(&sregs)
                .map_err(kvm_err("restore the interrupted code's segments"))?;
        }
        let mut regs = vcpu.sync_regs().regs;
        regs.rip = rip;
        regs.rsp = frame.rsp;
        regs.rflags = frame.rflags & !RFLAGS_TF;
        // Through SET_REGS, not only the sync copy: a KVM single step
        // turned on next is armed for the RIP KVM has then.
        vcpu.set_regs(&regs)
            .map_err(kvm_err("restore the interrupted code's registers"))?;
        vcpu.sync_regs_mut().regs = regs;
        Ok(())
    }
}

/// The segment `selector` as loading it from the GDT at `gdt_base` leaves
/// it in the CPU (the limit scaled by its granularity, the accessed bit
/// set, as the CPU sets it on a load).
fn gdt_segment(
    vcpu: &VcpuFd,
    mem: &GuestMemory,
    gdt_base: u64,
    selector: u16,
) -> Result<kvm_segment, DebugTrapError> {
    let at = gdt_base + u64::from(selector & !7);
    let d = u64::from_le_bytes(read::<8>(vcpu, mem, at, "a GDT descriptor")?);
    Ok(decode_descriptor(d, selector))
}

/// The CPU's view of a code or data segment descriptor `d` loaded as
/// `selector`.
pub fn decode_descriptor(d: u64, selector: u16) -> kvm_segment {
    let access = (d >> 40) & 0xff;
    let flags = (d >> 52) & 0xf;
    let granular = flags >> 3 & 1 == 1;
    let raw_limit = ((d & 0xffff) | ((d >> 48) & 0xf) << 16) as u32;
    kvm_segment {
        base: (d >> 16 & 0xff_ffff) | (d >> 56 & 0xff) << 24,
        limit: if granular {
            raw_limit << 12 | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: (access & 0xf) as u8 | 1,
        s: (access >> 4 & 1) as u8,
        dpl: (access >> 5 & 3) as u8,
        present: (access >> 7 & 1) as u8,
        avl: (flags & 1) as u8,
        l: (flags >> 1 & 1) as u8,
        db: (flags >> 2 & 1) as u8,
        g: granular as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_reads_in_the_order_the_cpu_pushes() {
        let mut bytes = [0u8; 40];
        for (i, v) in [0x1000u64, 0x33, 0x202, 0x7ff0, 0x2b].iter().enumerate() {
            bytes[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
        }
        let f = Frame::parse(&bytes);
        assert_eq!(
            f,
            Frame {
                rip: 0x1000,
                cs: 0x33,
                rflags: 0x202,
                rsp: 0x7ff0,
                ss: 0x2b
            }
        );
        assert_eq!(f.cpl(), 3);
    }

    #[test]
    fn user_descriptors_decode_as_the_cpu_loads_them() {
        // 64-bit DPL 3 code and DPL 3 data, flat, 4 KiB granular.
        let code = decode_descriptor(0x00af_fa00_0000_ffff, 0x33);
        assert_eq!((code.type_, code.s, code.dpl, code.present), (0xb, 1, 3, 1));
        assert_eq!(
            (code.l, code.db, code.g, code.limit),
            (1, 0, 1, 0xffff_ffff)
        );
        let data = decode_descriptor(0x00cf_f200_0000_ffff, 0x2b);
        assert_eq!((data.type_, data.dpl, data.l, data.db), (0x3, 3, 0, 1));
        assert_eq!(data.base, 0);
        assert_eq!(data.selector, 0x2b);
    }
}
