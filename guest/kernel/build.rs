//! Links the guest freestanding at the ABI's image base, and refuses to build
//! it without the flags of `.cargo/config.toml`: an image built with the host
//! defaults would contain SSE instructions, which the CPL0 emulator of this
//! platform's KVM cannot run.

use std::env;

/// Link arguments for the guest binary alone (not for this build script):
/// no C runtime or libc, a static non-PIE executable whose first segment
/// starts at 0x100000, and no sections the loader does not need.
const LINK_ARGS: [&str; 7] = [
    "-nostartfiles",
    "-nodefaultlibs",
    "-static",
    "-no-pie",
    "-Wl,--image-base=0x100000",
    "-Wl,--build-id=none",
    "-Wl,--gc-sections",
];

/// Flags that must reach rustc (from .cargo/config.toml).
const REQUIRED_FLAGS: [&str; 2] = ["relocation-model=static", "target-feature=-sse,-sse2"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=.cargo/config.toml");
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    for required in REQUIRED_FLAGS {
        if !flags.split('\x1f').any(|flag| flag.contains(required)) {
            panic!(
                "ftvm-guest needs the rustflags of guest/.cargo/config.toml (missing `{required}`): \
                 run cargo with guest/ as the working directory (or pass `--config` with that file), \
                 and without RUSTFLAGS or CARGO_ENCODED_RUSTFLAGS in the environment, which override it"
            );
        }
    }
    for arg in LINK_ARGS {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
