//! `ftvm demo`, the README's main job, end to end: two failovers, each
//! followed by a spare's state transfer that protects the VM again; it must
//! pass, and say so in the files it writes.

use std::time::Duration;

use ftvm_tests::{ftvm, kvm_available, vm_lock};

#[test]
fn the_demo_fails_over_twice_is_protected_again_and_loses_no_acknowledged_write() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let out_dir = dir.path().join("out");
    let out = ftvm(
        &[
            "demo",
            "--duration",
            "8",
            "--kill-at",
            "2",
            "--kills",
            "2",
            "--spares",
            "1",
            "--out",
            &out_dir.to_string_lossy(),
        ],
        Duration::from_secs(180),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("PASS"), "{stdout}");
    assert!(stdout.contains("protected again after"), "{stdout}");
    assert!(stdout.contains(", 0 lost"), "{stdout}");
    let svg = std::fs::read_to_string(out_dir.join("timeline.svg")).expect("timeline.svg");
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "not an SVG"
    );
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("metrics.json")).expect("metrics.json"),
    )
    .expect("metrics.json is JSON");
    let failures = metrics["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 2, "{failures:?}");
    for f in failures {
        assert!(f["live_ms"].is_number(), "{f}");
        let again = &f["protected_again"];
        assert!(again["bytes"].as_u64().unwrap_or(0) > 0, "{f}");
        assert_ne!(again["backup"], f["kill"]["victim"], "{f}");
    }
    // The second kill hit the first failover's new primary.
    assert_eq!(
        failures[1]["kill"]["victim"],
        failures[0]["kill"]["survivor"]
    );
    assert!(
        svg.contains("state transfer"),
        "the picture marks no transfer"
    );
    let writes = &metrics["writes"];
    assert!(writes["acknowledged"].as_u64().unwrap_or(0) > 0, "{writes}");
    assert_eq!(writes["checked"], writes["acknowledged"], "{writes}");
    assert_eq!(writes["lost"].as_array().map(Vec::len), Some(0), "{writes}");
    assert_eq!(
        metrics["linearizability"]["overall"], "linearizable",
        "{}",
        metrics["linearizability"]
    );
    assert_eq!(
        metrics["problems"].as_array().map(Vec::len),
        Some(0),
        "{}",
        metrics["problems"]
    );
}
