//! Interrupts at any instruction: what the run loop needs to deliver an
//! interrupt between two synchronous exits and to find that instruction
//! again on replay, with no instruction counter (this platform has no PMU).
//!
//! - A live run kicks the vCPU (`run::kick`) and, where the guest can take
//!   an interrupt at that asynchronous exit ([`can_take_interrupt`]),
//!   delivers there and logs an `async-point` entry: the synchronous exit
//!   count, the RIP, a hash of the registers ([`regs_hash`]) and the memory
//!   hash.
//! - A replay runs to that exit count, then aims a `hlt` breakpoint
//!   (`run::breakpoint`) at the RIP ([`Aim`]): at each hit it compares the
//!   state, steps one instruction over a hit that does not match
//!   (`run::single_step`) and arms again, and delivers at the one that does.
//!
//! `docs/record-replay.md` ("Interrupts between exits") gives the ambiguity
//! argument and the costs.

use std::collections::HashSet;

use kvm_ioctls::VcpuFd;
use logchannel::Registers;
use xxhash_rust::xxh3::xxh3_64;

use crate::machine::memory::GuestMemory;
use crate::machine::scan;
use crate::run::breakpoint::{Breakpoint, BreakpointError, Disarmed};
use crate::run::single_step::{self, SingleStepError};
use crate::run::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum PreciseError {
    #[error(transparent)]
    Breakpoint(#[from] BreakpointError),
    #[error(transparent)]
    Step(#[from] SingleStepError),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// The hash of the 16 general registers, RIP and RFLAGS that an
/// `async-point` entry records: what tells one pass through an instruction
/// from the others when memory is the same.
pub fn regs_hash(regs: &Registers) -> u64 {
    let mut bytes = [0u8; 18 * 8];
    for (chunk, (_, value)) in bytes.chunks_exact_mut(8).zip(regs.named()) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// Whether the guest, stopped by a kick, can take an interrupt right
/// where it is: interrupts enabled, no interrupt shadow (`sti`, `mov ss`),
/// no interrupt already queued, not in the middle of a repeated string
/// instruction (whose progress RIP does not show), and not at CPL3: a
/// replay finds the instruction again with a `hlt` it writes there, which
/// gives #GP at CPL3, so user-mode code gets what is due at its next
/// synchronous exit instead (docs/guest-abi.md, "User mode").
pub fn can_take_interrupt(vm: &mut Vm) -> Result<bool, PreciseError> {
    let (ready, if_flag) = {
        let run = vm.vcpu.get_kvm_run();
        (run.ready_for_interrupt_injection, run.if_flag)
    };
    if ready == 0 || if_flag == 0 {
        return Ok(false);
    }
    let events = vm
        .vcpu
        .get_vcpu_events()
        .map_err(|source| PreciseError::Kvm {
            what: "read the vCPU's events",
            source,
        })?;
    if events.interrupt.shadow != 0 {
        return Ok(false);
    }
    let sregs = vm.vcpu.get_sregs().map_err(|source| PreciseError::Kvm {
        what: "read the vCPU's segments",
        source,
    })?;
    if sregs.cs.selector & 3 == 3 {
        return Ok(false);
    }
    let (_, code) = vm.code_at_rip();
    Ok(!scan::is_repeated_string(&code))
}

/// What a breakpoint hit is, against the state the log recorded there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The recorded state: deliver here.
    Match,
    /// Another pass through the instruction: step over it and go on.
    Other,
    /// A state this aim has already seen at this instruction, memory
    /// included: the guest is in a loop it cannot leave by itself, so it
    /// will never reach the recorded state.
    Repeated,
}

/// The passes through one instruction that did not match: their register
/// hashes, and (once registers repeat) their memory hashes.
#[derive(Debug, Default)]
struct Passes {
    seen_regs: HashSet<u64>,
    seen_states: HashSet<(u64, u64)>,
}

impl Passes {
    /// Judges a pass whose registers hash to `regs` against the recorded
    /// `want_regs` and `want_mem`; `mem` computes the memory hash, which is
    /// only needed when the registers match or repeat (it reads KVM's dirty
    /// log, which write-protects again every page the guest wrote).
    fn judge<E>(
        &mut self,
        regs: u64,
        want_regs: u64,
        want_mem: u64,
        mem: impl FnOnce() -> Result<u64, E>,
    ) -> Result<Pass, E> {
        let mem = if regs == want_regs || self.seen_regs.contains(&regs) {
            Some(mem()?)
        } else {
            None
        };
        if regs == want_regs && mem == Some(want_mem) {
            return Ok(Pass::Match);
        }
        self.seen_regs.insert(regs);
        match mem {
            Some(mem) if !self.seen_states.insert((regs, mem)) => Ok(Pass::Repeated),
            _ => Ok(Pass::Other),
        }
    }
}

/// A replay's aim at one instruction between two synchronous exits: the
/// breakpoint, and whether the next entry into the guest steps over it.
#[derive(Debug)]
pub struct Aim {
    breakpoint: Breakpoint,
    step_next: bool,
    stepping: bool,
    passes: Passes,
}

impl Aim {
    /// Aims at the instruction at `rip`, as the guest's page tables map it
    /// now.
    pub fn new(vm: &Vm, rip: u64) -> Result<Aim, PreciseError> {
        Ok(Aim {
            breakpoint: Breakpoint::new(&vm.vcpu, &vm.mem, rip)?,
            step_next: false,
            stepping: false,
            passes: Passes::default(),
        })
    }

    pub fn rip(&self) -> u64 {
        self.breakpoint.rip()
    }

    /// Before entering the guest: the breakpoint armed, or one step.
    /// Returns whether this entry steps.
    pub fn before_entry(&mut self, vm: &mut Vm) -> Result<bool, PreciseError> {
        if self.step_next {
            self.step_next = false;
            single_step::set(&vm.vcpu, true)?;
            self.stepping = true;
        } else {
            self.breakpoint.arm(&vm.mem);
        }
        Ok(self.stepping)
    }

    /// First thing after any exit, before anything reads guest memory (the
    /// exit's data may still borrow the vCPU): the original byte back.
    pub fn restore(&mut self, mem: &GuestMemory) {
        if let Disarmed::GuestWrote(byte) = self.breakpoint.disarm(mem) {
            tracing::warn!(
                "the guest wrote {byte:#04x} over the breakpoint at {:#x}; its write is kept",
                self.breakpoint.rip()
            );
        }
    }

    /// Once the exit's data is handled: stepping off again. A step that a
    /// signal interrupted before the instruction ran (RIP `rip` still on
    /// it, no debug exit) is taken again at the next entry.
    pub fn end_step(
        &mut self,
        vcpu: &VcpuFd,
        interrupted_at: Option<u64>,
    ) -> Result<(), PreciseError> {
        if !self.stepping {
            return Ok(());
        }
        self.stepping = false;
        single_step::set(vcpu, false)?;
        if interrupted_at == Some(self.breakpoint.rip()) {
            self.step_next = true;
        }
        Ok(())
    }

    /// Whether a `hlt` exit with `rip` is this aim's breakpoint. The
    /// instruction may be a `hlt` itself (a real one or a patched site),
    /// whose own exit looks the same: it is a hit too, and a hit that does
    /// not match is then that instruction's synchronous exit
    /// ([`Aim::advance`]).
    pub fn is_hit(&self, rip: u64) -> bool {
        self.breakpoint.is_hit(rip)
    }

    /// Whether the breakpoint's instruction is a `hlt`.
    pub fn on_hlt(&self) -> bool {
        self.breakpoint.is_hlt()
    }

    /// At a hit: puts RIP back on the instruction (KVM left it one past the
    /// `hlt`), for the comparison and for delivery there.
    pub fn rewind(&mut self, vm: &mut Vm) -> Result<(), PreciseError> {
        self.set_rip(vm, self.breakpoint.rip())
    }

    /// At a hit on a `hlt` instruction that is not the wanted pass: RIP
    /// back past it, as its own exit left it.
    pub fn advance(&mut self, vm: &mut Vm) -> Result<(), PreciseError> {
        self.set_rip(vm, self.breakpoint.rip() + 1)
    }

    fn set_rip(&mut self, vm: &mut Vm, rip: u64) -> Result<(), PreciseError> {
        let mut regs = vm.vcpu.sync_regs().regs;
        regs.rip = rip;
        // Through SET_REGS, not the sync copy: a step turned on next must
        // see this RIP (KVM arms it for the RIP it has then).
        vm.vcpu
            .set_regs(&regs)
            .map_err(|source| PreciseError::Kvm {
                what: "move RIP onto the breakpoint",
                source,
            })?;
        vm.vcpu.sync_regs_mut().regs = regs;
        Ok(())
    }

    /// Judges a hit whose registers hash to `regs` against the recorded
    /// `want_regs` and `want_mem` (see [`Pass`]); `mem` computes the memory
    /// hash when it is needed. After [`Pass::Other`] the next entry into
    /// the guest steps over the instruction.
    pub fn judge<E>(
        &mut self,
        regs: u64,
        want_regs: u64,
        want_mem: u64,
        mem: impl FnOnce() -> Result<u64, E>,
    ) -> Result<Pass, E> {
        let pass = self.passes.judge(regs, want_regs, want_mem, mem)?;
        self.step_next = pass == Pass::Other;
        Ok(pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(p: &mut Passes, regs: u64, mem: u64) -> (Pass, bool) {
        let mut asked = false;
        let pass = p
            .judge::<()>(regs, 7, 70, || {
                asked = true;
                Ok(mem)
            })
            .expect("no error");
        (pass, asked)
    }

    #[test]
    fn memory_is_hashed_only_when_registers_match_or_repeat() {
        let mut p = Passes::default();
        assert_eq!(judge(&mut p, 1, 0), (Pass::Other, false));
        assert_eq!(judge(&mut p, 2, 0), (Pass::Other, false));
        assert_eq!(
            judge(&mut p, 1, 10),
            (Pass::Other, true),
            "registers repeat"
        );
        assert_eq!(judge(&mut p, 7, 71), (Pass::Other, true), "memory differs");
        assert_eq!(judge(&mut p, 7, 70), (Pass::Match, true));
    }

    #[test]
    fn a_state_seen_twice_is_a_loop_that_never_reaches_the_recorded_one() {
        let mut p = Passes::default();
        assert_eq!(judge(&mut p, 3, 30).0, Pass::Other);
        assert_eq!(judge(&mut p, 3, 30).0, Pass::Other, "first full look");
        assert_eq!(judge(&mut p, 3, 31).0, Pass::Other, "memory moved on");
        assert_eq!(judge(&mut p, 3, 30).0, Pass::Repeated);
        assert_eq!(judge(&mut p, 7, 71).0, Pass::Other);
        assert_eq!(judge(&mut p, 7, 71).0, Pass::Repeated);
    }

    #[test]
    fn the_register_hash_covers_every_register() {
        let base = Registers::default();
        let h = regs_hash(&base);
        for i in 0..18 {
            let mut values = [0u64; 18];
            values[i] = 1;
            assert_ne!(regs_hash(&Registers::from_array(values)), h, "register {i}");
        }
    }
}
