//! Running the guest: the vm (KVM file descriptors, memory, devices), the
//! pure exit handler, the one run loop shared by live runs, recordings and
//! replays, divergence digests and reports, and the stop signal.

pub mod breakpoint;
pub mod debug_trap;
pub mod digest;
pub mod dirty;
pub mod divergence;
pub mod exit;
pub(crate) mod forward;
pub mod kick;
pub mod precise;
pub mod run_loop;
pub mod single_step;
pub mod snapshot;
pub mod stop;
pub mod summary;
pub mod vm;
