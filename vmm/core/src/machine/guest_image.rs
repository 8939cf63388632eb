//! The default guest, built from `guest/` by `vmm/build.rs` and embedded so
//! that `ftvm run` and `ftvm demo` need no path.

/// The guest kernel ELF.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("FTVM_GUEST_ELF"));
