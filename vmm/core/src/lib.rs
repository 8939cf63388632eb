//! The ftvm VMM library: a KVM virtual machine monitor built for
//! deterministic record, replay and primary/backup fault tolerance.
//!
//! The modules are the pipeline, each importing only those before it:
//! `machine` (guest memory, image, boot state, patching) → `devices` (the
//! guest's deterministic devices) → `run` (the vm, the pure exit handler,
//! the run loop, digests, divergence) → `live` (host time, network and
//! randomness; the recorder) and `replay` (the log as the only input) →
//! `ft` (primary, backup, output gate, arbiter membership). `host` holds
//! what the VMM touches outside the guest (the UDP backend, frames, pcap
//! capture, the events file, histograms) and imports none of the others
//! but `machine`'s constants. See docs/design.md.

pub mod devices;
pub mod ft;
pub mod host;
pub mod live;
pub mod machine;
pub mod replay;
pub mod run;
