//! Single-stepping the guest with `KVM_SET_GUEST_DEBUG`: with stepping on,
//! the next `KVM_RUN` executes one instruction and returns
//! `KVM_EXIT_DEBUG` (or the synchronous exit that instruction makes). On
//! this platform it works at CPL0 at about 100 000 steps a second, and it is
//! the only exact instrument there is: there is no PMU, software breakpoints
//! through guest debug do not work, and hardware breakpoints hang the
//! calling thread inside the kernel. This module never sets
//! `KVM_GUESTDBG_USE_HW_BP` or `KVM_GUESTDBG_USE_SW_BP`.
//!
//! KVM implements the step with the trap flag, which it hides from the
//! registers user space reads; the caller must turn stepping off before any
//! `KVM_RUN` that is not meant to stop after one instruction.

use kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_ioctls::VcpuFd;

#[derive(Debug, thiserror::Error)]
#[error("KVM refused to turn single-stepping {}: {source}", if *.on { "on" } else { "off" })]
pub struct SingleStepError {
    pub on: bool,
    pub source: kvm_ioctls::Error,
}

/// Turns single-stepping on or off for the next entries into the guest.
/// Set RIP (with `set_regs`) before turning it on: KVM arms the step for
/// the RIP the vCPU has when this is called.
pub fn set(vcpu: &VcpuFd, on: bool) -> Result<(), SingleStepError> {
    let debug = kvm_guest_debug {
        control: if on {
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        } else {
            0
        },
        ..Default::default()
    };
    vcpu.set_guest_debug(&debug)
        .map_err(|source| SingleStepError { on, source })
}
