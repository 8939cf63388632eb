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
//!   A guest with CPL3 code, where `hlt` faults and KVM's step reaches the
//!   guest, gets an `int3` breakpoint and trap-flag steps, which its #BP
//!   and #DB handlers bring back to the VMM (`run::debug_trap`).
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
use crate::run::debug_trap::{DebugStack, DebugTrapError, INT3, RFLAGS_TF};
use crate::run::single_step::{self, SingleStepError};
use crate::run::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum PreciseError {
    #[error(transparent)]
    Breakpoint(#[from] BreakpointError),
    #[error(transparent)]
    Step(#[from] SingleStepError),
    #[error(transparent)]
    DebugTrap(#[from] DebugTrapError),
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
/// instruction (whose progress RIP does not show), and at CPL3 only in a
/// guest whose #DB and #BP handlers bring a replay's `int3` and trap flag
/// back to the VMM (`Workload::runs_user_code`): a replay could not find
/// the instruction again otherwise (docs/guest-abi.md, "User mode").
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
    if sregs.cs.selector & 3 == 3 && !vm.config.workload.runs_user_code() {
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

/// How an aim steps over its instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stepping {
    /// KVM's single step (`run::single_step`).
    Kvm,
    /// The guest's trap flag, whose #DB the guest's handler brings back
    /// (`run::debug_trap`): at CPL3, where KVM's step reaches the guest.
    TrapFlag,
}

/// What an exit on the debug trap port was, for an aim that uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trapped {
    /// The aim's `int3`: the guest is back on the instruction.
    Hit,
    /// The aim's trap-flag step: the guest is past the instruction.
    Stepped,
    /// Neither: the guest's own exception, which its handler reports.
    Guest,
}

/// A replay's aim at one instruction between two synchronous exits: the
/// breakpoint, and whether the next entry into the guest steps over it.
#[derive(Debug)]
pub struct Aim {
    breakpoint: Breakpoint,
    /// For a guest with CPL3 code: its debug stack, whose handlers bring
    /// the breakpoint (`int3`) and trap-flag steps back.
    debug_stack: Option<DebugStack>,
    /// Whether the breakpoint was armed during the last entry.
    was_armed: bool,
    /// The privilege level of the last hit: CPL3 steps with the trap flag.
    hit_cpl: u8,
    step_next: bool,
    stepping: Option<Stepping>,
    passes: Passes,
}

impl Aim {
    /// Aims at the instruction at `rip`, as the guest's page tables map it
    /// now.
    pub fn new(vm: &Vm, rip: u64) -> Result<Aim, PreciseError> {
        let (breakpoint, debug_stack) = if vm.config.workload.runs_user_code() {
            (
                Breakpoint::with_byte(&vm.vcpu, &vm.mem, rip, INT3)?,
                Some(DebugStack::locate(&vm.vcpu, &vm.mem)?),
            )
        } else {
            (Breakpoint::new(&vm.vcpu, &vm.mem, rip)?, None)
        };
        Ok(Aim {
            breakpoint,
            debug_stack,
            was_armed: false,
            hit_cpl: 0,
            step_next: false,
            stepping: None,
            passes: Passes::default(),
        })
    }

    pub fn rip(&self) -> u64 {
        self.breakpoint.rip()
    }

    /// Whether the last hit was in CPL3 code.
    pub fn hit_in_user_mode(&self) -> bool {
        self.hit_cpl == 3
    }

    /// Whether the aim's hits and CPL3 steps arrive as exits on the debug
    /// trap port.
    pub fn traps_through_guest(&self) -> bool {
        self.debug_stack.is_some()
    }

    /// Before entering the guest: the breakpoint armed, or one step.
    /// Returns whether this entry steps.
    pub fn before_entry(&mut self, vm: &mut Vm) -> Result<bool, PreciseError> {
        if self.step_next {
            self.step_next = false;
            if self.debug_stack.is_some() && self.hit_cpl == 3 {
                let mut regs = vm.vcpu.sync_regs().regs;
                regs.rflags |= RFLAGS_TF;
                set_regs(vm, &regs, "set the trap flag")?;
                self.stepping = Some(Stepping::TrapFlag);
            } else {
                single_step::set(&vm.vcpu, true)?;
                self.stepping = Some(Stepping::Kvm);
            }
        } else {
            self.breakpoint.arm(&vm.mem);
        }
        Ok(self.stepping.is_some())
    }

    /// First thing after any exit, before anything reads guest memory (the
    /// exit's data may still borrow the vCPU): the original byte back.
    pub fn restore(&mut self, mem: &GuestMemory) {
        self.was_armed = self.breakpoint.is_armed();
        if let Disarmed::GuestWrote(byte) = self.breakpoint.disarm(mem) {
            tracing::warn!(
                "the guest wrote {byte:#04x} over the breakpoint at {:#x}; its write is kept",
                self.breakpoint.rip()
            );
        }
    }

    /// At an exit on the debug trap port (`traps_through_guest`): takes
    /// back the exception when it is this aim's hit or step.
    pub fn trap(&mut self, vm: &mut Vm) -> Result<Trapped, PreciseError> {
        let Some(stack) = &self.debug_stack else {
            return Ok(Trapped::Guest);
        };
        let stepped = self.stepping == Some(Stepping::TrapFlag);
        if !stepped && !self.was_armed {
            return Ok(Trapped::Guest);
        }
        let frame = stack.frame(&vm.vcpu.sync_regs().regs, &vm.mem)?;
        if stepped {
            self.stepping = None;
            stack.take_back(&mut vm.vcpu, &vm.mem, &frame, frame.rip)?;
            Ok(Trapped::Stepped)
        } else if frame.rip == self.breakpoint.rip().wrapping_add(1) {
            stack.take_back(&mut vm.vcpu, &vm.mem, &frame, self.breakpoint.rip())?;
            self.hit_cpl = frame.cpl();
            Ok(Trapped::Hit)
        } else {
            Ok(Trapped::Guest)
        }
    }

    /// After any other exit of an entry that stepped with the trap flag (a
    /// signal, or the instruction's own exit): the flag off before anything
    /// reads the registers. Inside the guest's handler it is off already.
    pub fn leave_trap_flag(&mut self, vm: &mut Vm) {
        if self.stepping != Some(Stepping::TrapFlag) {
            return;
        }
        vm.vcpu.sync_regs_mut().regs.rflags &= !RFLAGS_TF;
        vm.vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
    }

    /// Once the exit's data is handled: stepping off again. A step that a
    /// signal interrupted before the instruction ran (RIP `rip` still on
    /// it, no debug exit) is taken again at the next entry. A trap-flag
    /// step that a signal interrupted after the instruction, on the way
    /// through the guest's handler, is still under way: its exit comes
    /// at the next entry.
    pub fn end_step(
        &mut self,
        vcpu: &VcpuFd,
        interrupted_at: Option<u64>,
    ) -> Result<(), PreciseError> {
        let Some(stepping) = self.stepping else {
            return Ok(());
        };
        let on_instruction = interrupted_at == Some(self.breakpoint.rip());
        if stepping == Stepping::TrapFlag && interrupted_at.is_some() && !on_instruction {
            return Ok(());
        }
        self.stepping = None;
        if stepping == Stepping::Kvm {
            single_step::set(vcpu, false)?;
        }
        if on_instruction {
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
    /// `hlt`), for the comparison and for delivery there. A hit through the
    /// guest's handler is back there already (`trap`).
    pub fn rewind(&mut self, vm: &mut Vm) -> Result<(), PreciseError> {
        if self.debug_stack.is_some() {
            return Ok(());
        }
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
        set_regs(vm, &regs, "move RIP onto the breakpoint")
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

/// Through SET_REGS, not only the sync copy: a step turned on next must
/// see these registers (KVM arms it for the RIP it has then).
fn set_regs(
    vm: &mut Vm,
    regs: &kvm_bindings::kvm_regs,
    what: &'static str,
) -> Result<(), PreciseError> {
    vm.vcpu
        .set_regs(regs)
        .map_err(|source| PreciseError::Kvm { what, source })?;
    vm.vcpu.sync_regs_mut().regs = *regs;
    Ok(())
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
