//! Errors a user can act on: one clear line and a non-zero exit, no panic.

use std::time::Duration;

use ftvm_harness::launcher::Role;
use ftvm_tests::{free_udp, ftvm, kvm_available, serve, vm_lock};

fn stderr_of(args: &[&str]) -> (Option<i32>, String) {
    let out = ftvm(args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "ftvm panicked: {err}");
    (out.status.code(), err)
}

#[test]
fn a_missing_guest_image_is_named() {
    let (code, err) = stderr_of(&[
        "run",
        "--kernel",
        "/nonexistent/guest.elf",
        "--timeout",
        "5",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot read guest image /nonexistent/guest.elf"),
        "{err}"
    );
}

#[test]
fn a_truncated_guest_image_is_refused_with_the_offset() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("cut.elf");
    std::fs::write(&path, &ftvm_core::machine::guest_image::GUEST_ELF[..4000]).expect("write");
    let p = path.to_string_lossy();
    let (code, err) = stderr_of(&["run", "--kernel", &p, "--timeout", "5"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
}

#[test]
fn an_image_that_does_not_fit_in_memory_is_refused() {
    let (code, err) = stderr_of(&["run", "--mem", "2M", "--timeout", "5"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn a_missing_kvm_device_is_explained() {
    let (code, err) = stderr_of(&["run", "--kvm-device", "/nonexistent/kvm", "--timeout", "5"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot open /nonexistent/kvm"), "{err}");
    let (code, err) = stderr_of(&["run", "--kvm-device", "/dev/null", "--timeout", "5"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/dev/null"), "{err}");
}

#[test]
fn a_service_port_in_use_is_refused() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (_vmm, service) = serve(Role::Run, &[]);
    let addr = service.to_string();
    let (code, err) = stderr_of(&["run", "--service", &addr, "--timeout", "5"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot bind the service address"), "{err}");
    let _ = free_udp();
}

#[test]
fn the_kv_client_times_out_with_a_clear_message() {
    let addr = free_udp().to_string();
    let out = ftvm(
        &["kv", "--server", &addr, "--timeout", "1s", "get", "k"],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("ftvm kv: "), "{err}");
}

#[test]
fn fault_tolerance_knobs_that_cannot_work_together_are_refused() {
    for (knobs, says) in [
        (
            ["--max-lag-ms", "5", "--batch-delay-ms", "5"],
            "--batch-delay-ms 5 must be below --max-lag-ms 5",
        ),
        (
            ["--max-lag-ms", "NaN", "--batch-delay-ms", "2"],
            "--max-lag-ms NaN must be",
        ),
        (
            ["--max-lag-ms", "0", "--batch-delay-ms", "0"],
            "--batch-delay-ms 0 must be a positive number",
        ),
    ] {
        let mut args = vec![
            "primary",
            "--arbiter",
            "127.0.0.1:9",
            "--service",
            "127.0.0.1:0",
            "--log-listen",
            "127.0.0.1:0",
            "--timeout",
            "5",
        ];
        args.extend(knobs);
        let (code, err) = stderr_of(&args);
        assert_eq!(code, Some(1), "{knobs:?}: {err}");
        assert!(err.contains(says), "{knobs:?}: {err}");
    }
}
