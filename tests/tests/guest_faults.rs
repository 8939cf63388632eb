//! A guest that crashes ends the run with a message naming the exit, the
//! RIP and the code there; small hand-made guests also prove the VMM's boot
//! path (long mode, console, exit port) on its own.

use std::time::Duration;

use ftvm_core::machine::loader::flat_elf;
use ftvm_tests::{free_udp, ftvm, kvm_available, vm_lock};

/// Runs a guest made of `code`; returns (exit code, stdout, stderr).
fn run_code(code: &[u8]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("guest.elf");
    std::fs::write(&path, flat_elf(code)).expect("write image");
    let service = free_udp().to_string();
    let out = ftvm(
        &[
            "run",
            "--kernel",
            &path.to_string_lossy(),
            "--service",
            &service,
            "--timeout",
            "20",
        ],
        Duration::from_secs(40),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

/// mov dx, 0x3f8; mov al, c; out dx, al ... ; mov dx, 0x501; xor eax, eax; out dx, al
fn print_and_power_off(text: &[u8], code: u8) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03];
    for b in text {
        c.extend([0xb0, *b, 0xee]);
    }
    c.extend([0x66, 0xba, 0x01, 0x05, 0xb0, code, 0xee, 0xf4]);
    c
}

#[test]
fn a_minimal_guest_prints_and_powers_off() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (code, stdout, stderr) = run_code(&print_and_power_off(b"hi\n", 0));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "hi\n");
    assert!(stderr.contains("stopped (PowerOff)"), "{stderr}");
}

#[test]
fn a_guest_error_code_is_reported() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (code, _, stderr) = run_code(&print_and_power_off(b"", 9));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("error code 9"), "{stderr}");
}

#[test]
fn a_triple_fault_names_the_exit_rip_and_code() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    // ud2 with no IDT: #UD, then #DF, then a triple fault.
    let (code, _, stderr) = run_code(&[0x0f, 0x0b]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("KVM_EXIT_SHUTDOWN") || stderr.contains("KVM_EXIT_INTERNAL_ERROR"),
        "{stderr}"
    );
    assert!(stderr.contains("RIP 0x100000"), "{stderr}");
    assert!(stderr.contains("0f 0b"), "{stderr}");
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.starts_with("ftvm: the guest"))
            .count(),
        1,
        "{stderr}"
    );
}

#[test]
fn hlt_with_interrupts_disabled_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (code, _, stderr) = run_code(&[0xfa, 0xf4]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("hlt with interrupts disabled"), "{stderr}");
}
