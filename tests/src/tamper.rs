//! Recording a log once and replaying edited copies of it, for the tests
//! of tampered logs: each replay runs with a time limit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use ftvm_harness::launcher::Role;
use ftvm_kvclient::{ClientConfig, KvClient};
use serde_json::{json, Value};

use crate::{ftvm, load_log, serve, stop};

/// A replay stops by itself after this long (and then exits 6, which every
/// test here rejects); the test kills it after `REPLAY_LIMIT`.
pub const REPLAY_TIMEOUT: &str = "30";
pub const REPLAY_LIMIT: Duration = Duration::from_secs(60);

/// A log as `ftvm log dump --json` gives it: the header, the entries.
pub struct Recording {
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub header: Value,
    pub entries: Vec<Value>,
}

/// Records `ftvm record` while `workload` runs against it, stops it with
/// SIGTERM and dumps the log.
pub fn record(extra: &[&str], workload: impl FnOnce(SocketAddr)) -> Recording {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("recorded.log");
    let (mut vmm, service) = serve(Role::Record { log: log.clone() }, extra);
    workload(service);
    let (status, output) = stop(&mut vmm);
    assert!(status.success(), "record failed: {output}");
    let (header, entries) = dump(&log);
    Recording {
        dir,
        log,
        header,
        entries,
    }
}

pub fn dump(log: &Path) -> (Value, Vec<Value>) {
    let out = ftvm(
        &["log", "dump", "--json", &log.to_string_lossy()],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"));
    let header = lines.next().expect("header");
    (header, lines.collect())
}

/// Puts, gets and entropy requests around a pause: packets, interrupts
/// (timer ticks at the idle guest's `hlt` among them), outputs, rdtsc and
/// rdrand entries, and some thousand exits.
pub fn kv_load(service: SocketAddr) {
    let mut kv = KvClient::connect(service, ClientConfig::default()).expect("client");
    for round in 0..2 {
        for i in 0..30 {
            let key = format!("k{}", i % 7);
            if i % 2 == 0 {
                kv.put(key.as_bytes(), format!("v{round}-{i}").as_bytes())
                    .expect("put");
            } else {
                kv.get(key.as_bytes()).expect("get");
            }
        }
        kv.entropy(20).expect("entropy");
        std::thread::sleep(Duration::from_millis(1500));
    }
}

/// The recording the edits start from.
pub fn recording() -> &'static Recording {
    static REC: OnceLock<Recording> = OnceLock::new();
    REC.get_or_init(|| record(&["--digest-interval", "512"], kv_load))
}

pub struct Replayed {
    pub code: Option<i32>,
    pub stderr: String,
}

pub fn replay(log: &Path, extra: &[&str]) -> Replayed {
    let log = log.to_string_lossy();
    let mut args = vec![
        "replay",
        &*log,
        "--serial",
        "/dev/null",
        "--timeout",
        REPLAY_TIMEOUT,
    ];
    args.extend_from_slice(extra);
    let out = ftvm(&args, REPLAY_LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    Replayed {
        code: out.status.code(),
        stderr,
    }
}

/// Writes `header` and `entries` (renumbered from 1) as the log `name` in
/// `dir` with `ftvm log load`, and replays it.
pub fn replay_entries(dir: &Path, name: &str, header: &Value, entries: &[Value]) -> Replayed {
    let mut text = serde_json::to_string(header).expect("json") + "\n";
    for (i, e) in entries.iter().enumerate() {
        let mut e = e.clone();
        e["seq"] = Value::from(i as u64 + 1);
        text += &serde_json::to_string(&e).expect("json");
        text += "\n";
    }
    let log = dir.join(format!("{name}.log"));
    load_log(&text, &log);
    replay(&log, &[])
}

/// Lets `edit` change the shared recording's entries and replays them.
pub fn replay_edited(name: &str, edit: impl FnOnce(&mut Vec<Value>)) -> Replayed {
    let rec = recording();
    let mut entries = rec.entries.clone();
    edit(&mut entries);
    replay_entries(rec.dir.path(), name, &rec.header, &entries)
}

pub fn kind(e: &Value) -> &str {
    e["event"]["type"].as_str().unwrap_or("")
}

pub fn exits(e: &Value) -> u64 {
    e["pos"]["exits"].as_u64().expect("exits")
}

pub fn entry(pos: &Value, event: Value) -> Value {
    json!({"seq": 0, "pos": pos.clone(), "event": event})
}

/// The sequence number the report names after `label`, if any.
pub fn named_seq(rep: &Replayed, label: &str) -> Option<u64> {
    rep.stderr
        .split(label)
        .nth(1)?
        .strip_prefix('#')?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn assert_diverged_at(rep: &Replayed, seq: u64) {
    assert_eq!(rep.code, Some(3), "not caught:\n{}", rep.stderr);
    assert_eq!(
        named_seq(rep, "first divergent entry: "),
        Some(seq),
        "{}",
        rep.stderr
    );
}

/// The indexes of interrupts that are the first entry at their exit, at
/// the `hlt` where the guest idles: the guest waits there for them.
pub fn idle_wakeups(entries: &[Value]) -> Vec<usize> {
    let rip = |e: &Value| e["pos"]["rip"].as_str().unwrap_or("").to_string();
    let mut rips: Vec<String> = entries
        .iter()
        .filter(|e| kind(e) == "interrupt")
        .map(rip)
        .collect();
    rips.sort();
    let idle_rip = rips
        .chunk_by(|a, b| a == b)
        .max_by_key(|run| run.len())
        .and_then(|run| run.first())
        .cloned()
        .expect("an interrupt");
    (1..entries.len())
        .filter(|&i| {
            kind(&entries[i]) == "interrupt"
                && rip(&entries[i]) == idle_rip
                && exits(&entries[i - 1]) < exits(&entries[i])
        })
        .collect()
}

pub fn nth_of(entries: &[Value], wanted: &str, nth: usize) -> usize {
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| kind(e) == wanted)
        .nth(nth)
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("fewer than {} {wanted} entries", nth + 1))
}

/// Writes a flat guest of `code` into `dir`.
pub fn flat_guest(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let image = dir.join(format!("{name}.elf"));
    std::fs::write(&image, ftvm_core::machine::loader::flat_elf(code)).expect("image");
    image
}
