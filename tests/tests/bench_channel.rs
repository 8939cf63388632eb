//! `ftvm bench channel` runs end to end and reports what it measured; the
//! figures themselves belong in BENCHMARKS.md, not in assertions.

use std::time::Duration;

use ftvm_tests::ftvm;

#[test]
fn the_channel_benchmark_streams_and_round_trips() {
    let dir = tempfile::tempdir().expect("dir");
    let json = dir.path().join("channel.json");
    let out = ftvm(
        &[
            "bench",
            "channel",
            "--entries",
            "5000",
            "--round-trips",
            "40",
            "--json",
            &json.to_string_lossy(),
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("WARN"),
        "a benchmark that ends its logs closes without warnings: {stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    assert_eq!(report["entries"], 5000);
    assert_eq!(report["round_trips"], 40);
    for field in [
        "entries_per_sec",
        "wire_bytes_per_entry",
        "writer_p50_us",
        "flush_p50_us",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {report}"
        );
    }
}
