//! Builds the guest kernel in `guest/kernel` with its own flags (no SSE,
//! freestanding link: see guest/kernel/.cargo/config.toml and
//! guest/kernel/build.rs) and hands its path to `machine/guest_image.rs`,
//! which embeds it in `ftvm`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let guest = manifest.join("../../guest/kernel");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out.join("guest-target");
    for path in [
        "src",
        "Cargo.toml",
        "build.rs",
        ".cargo/config.toml",
        "../proto",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(path).display());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The outer build's flags and target settings are for the host crates;
    // the guest has its own in guest/kernel/.cargo/config.toml, found from its
    // directory.
    let status = Command::new(cargo)
        .current_dir(&guest)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_MAKEFLAGS")
        .status()
        .expect("cannot run cargo to build the guest");
    assert!(
        status.success(),
        "building the guest in {} failed",
        guest.display()
    );
    let elf = target_dir.join("release/ftvm-guest");
    assert!(
        elf.is_file(),
        "the guest build produced no {}",
        elf.display()
    );
    println!("cargo:rustc-env=FTVM_GUEST_ELF={}", elf.display());
}
