//! The embedded guest image must run under this platform's CPL0 emulator,
//! which has no SSE or AVX: decode every executable byte and fail on any.

use ftvm_core::machine::guest_image::GUEST_ELF;
use ftvm_core::machine::loader::ElfImage;
use ftvm_core::machine::scan::{scan, NondetKind};

#[test]
fn the_guest_image_has_no_sse_or_avx_instruction() {
    let image = ElfImage::parse(GUEST_ELF, 64 << 20).expect("the embedded guest parses");
    let report = scan(image.code(GUEST_ELF));
    assert!(
        report.instructions > 1000,
        "decoded only {} instructions",
        report.instructions
    );
    let listing: Vec<String> = report
        .simd
        .iter()
        .map(|s| format!("{:#x}: {} ({:02x?})", s.addr, s.mnemonic, s.bytes))
        .collect();
    assert!(
        listing.is_empty(),
        "SSE/AVX instructions in the guest:\n{}",
        listing.join("\n")
    );
}

#[test]
fn the_guest_image_uses_every_nondeterministic_instruction_the_vmm_traps() {
    let image = ElfImage::parse(GUEST_ELF, 64 << 20).expect("the embedded guest parses");
    let report = scan(image.code(GUEST_ELF));
    for kind in [
        NondetKind::Rdtsc,
        NondetKind::Rdtscp,
        NondetKind::Rdrand,
        NondetKind::Rdseed,
    ] {
        assert!(
            report.nondet.iter().any(|s| s.kind == kind),
            "no {kind:?} in the guest: the replay tests would not exercise it"
        );
    }
}
