//! Link the guest freestanding at 0x100000 (the ABI's image base).
fn main() {
    for arg in [
        "-nostartfiles",
        "-nodefaultlibs",
        "-static",
        "-no-pie",
        "-Wl,--image-base=0x100000",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
        "-Wl,--gc-sections",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
