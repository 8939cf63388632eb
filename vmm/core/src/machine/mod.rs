//! The machine before it runs: guest memory and its layout, the checked ELF
//! loader, the boot state of the vCPU (and the workload the guest is told to
//! run), and the patching of nondeterministic instructions found by the
//! scanner.

pub mod boot;
pub mod guest_image;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod patch;
pub mod scan;
pub mod workload;
