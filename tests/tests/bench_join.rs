//! `ftvm bench join` with two joins: each backup joins the serving primary
//! by state transfer, and the figures BENCHMARKS.md quotes come out.

use std::time::Duration;

use ftvm_tests::{ftvm, kvm_available, vm_lock};

#[test]
fn two_backups_join_a_serving_primary_and_are_measured() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let json = dir.path().join("join.json");
    let out = ftvm(
        &[
            "bench",
            "join",
            "--joins",
            "2",
            "--settle",
            "1",
            "--json",
            &json.to_string_lossy(),
        ],
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench join failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("pause at the cut"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON")).expect("JSON");
    let joins = report["joins"].as_array().expect("joins");
    assert_eq!(joins.len(), 2, "{report}");
    for j in joins {
        assert!(j["touched_bytes"].as_u64().unwrap_or(0) > 0, "{j}");
        assert!(
            j["bytes_sent"].as_u64().unwrap_or(0) >= j["touched_bytes"].as_u64().unwrap_or(0),
            "round 1 alone sends every touched page: {j}"
        );
        assert!(j["rounds"].as_u64().unwrap_or(0) >= 1, "{j}");
        assert!(j["pause_ms"].as_f64().is_some_and(|p| p >= 0.0), "{j}");
        assert!(j["primary_rss_mib"].as_f64().unwrap_or(0.0) > 0.0, "{j}");
        // A window as short as the transfer (a few ms) may hold no reply at
        // all; the second before the backup started always holds some.
        assert!(
            j["ops_per_sec_second_before"].as_f64().unwrap_or(0.0) > 0.0,
            "{j}"
        );
    }
}
