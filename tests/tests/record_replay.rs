//! Record a live run, replay it from the log alone, and check that the
//! replay reproduces it, or says where it stopped doing so.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use ftvm_core::host::capture::read_frames;
use ftvm_harness::launcher::{Role, ServerConfig};
use ftvm_kvclient::{ClientConfig, KvClient};
use ftvm_tests::load::mixed_clients;
use ftvm_tests::record_replay::{replay, Replayed};
use ftvm_tests::{free_udp, ftvm, kvm_available, launcher, load_log, serve, stop, vm_lock};
use serde_json::Value;

struct Recording {
    dir: tempfile::TempDir,
    log: PathBuf,
    console: String,
    frames: Vec<Vec<u8>>,
}

/// Records `ftvm record` while `workload` runs against it, then stops it
/// with SIGTERM (which must close the log cleanly).
fn record(name: &str, extra: &[&str], workload: impl FnOnce(std::net::SocketAddr)) -> Recording {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join(format!("{name}.log"));
    let pcap = dir.path().join(format!("{name}.pcap"));
    let pcap_s = pcap.to_string_lossy();
    let mut args = vec!["--capture", &pcap_s, "--digest-interval", "512"];
    args.extend_from_slice(extra);
    let (mut vmm, service) = serve(Role::Record { log: log.clone() }, &args);
    workload(service);
    let (status, stderr) = stop(&mut vmm);
    assert!(status.success(), "record failed: {stderr}");
    // Read once it has stopped: the console is whole then.
    let console = vmm.console();
    let frames = read_frames(&std::fs::read(&pcap).expect("pcap")).expect("parse pcap");
    Recording {
        dir,
        log,
        console,
        frames,
    }
}

fn client(service: std::net::SocketAddr) -> KvClient {
    KvClient::connect(service, ClientConfig::default()).expect("client")
}

/// The shared recording the divergence tests edit: KV load plus entropy
/// requests, so that it has rdtsc, rdrand, packets and interrupts.
fn loaded_recording() -> &'static Recording {
    static REC: OnceLock<Recording> = OnceLock::new();
    REC.get_or_init(|| {
        record("loaded", &[], |service| {
            mixed_clients(service, 100);
            let mut kv = client(service);
            for _ in 0..3 {
                kv.entropy(50).expect("entropy");
            }
        })
    })
}

#[test]
fn an_idle_guest_with_only_timer_ticks_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rec = record("idle", &[], |_| std::thread::sleep(Duration::from_secs(2)));
    let rep = replay(&rec.log, &[]);
    rep.assert_reproduces(&rec.console, &rec.frames);
    assert!(rec.console.contains("ftvm-guest: booted"));
}

#[test]
fn a_kv_load_from_several_clients_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rec = loaded_recording();
    assert!(rec.frames.len() >= 300, "{} frames", rec.frames.len());
    let rep = replay(&rec.log, &[]);
    rep.assert_reproduces(&rec.console, &rec.frames);
}

/// Recorded with the memory hash refreshed at every output, the slower
/// and stricter setting.
#[test]
fn a_guest_reading_rdtsc_and_rdrand_in_a_loop_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rec = record("entropy", &["--output-memory-hash"], |service| {
        let mut kv = client(service);
        for n in [1, 100, 2000, 5000] {
            kv.entropy(n).expect("entropy");
        }
    });
    let rep = replay(&rec.log, &[]);
    rep.assert_reproduces(&rec.console, &rec.frames);
    let dump = ftvm(
        &["log", "dump", &rec.log.to_string_lossy()],
        Duration::from_secs(30),
    );
    let listing = String::from_utf8_lossy(&dump.stdout);
    for kind in ["rdtsc ", "rdtscp ", "rdrand ", "rdseed "] {
        assert!(listing.contains(kind), "no {kind} entry in the log");
    }
}

/// Dumps the shared recording as JSON lines, lets `edit` change the entries
/// (header excluded), loads them back and replays the result. Returns the
/// replay and the sequence number `edit` reported as edited.
fn replay_edited(name: &str, edit: impl FnOnce(&mut Vec<Value>) -> u64) -> (Replayed, u64) {
    let rec = loaded_recording();
    let dump = ftvm(
        &["log", "dump", "--json", &rec.log.to_string_lossy()],
        Duration::from_secs(30),
    );
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let text = String::from_utf8(dump.stdout).expect("utf-8");
    let mut lines = text.lines();
    let header = lines.next().expect("header").to_string();
    let mut entries: Vec<Value> = lines
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let edited = edit(&mut entries);
    for (i, e) in entries.iter_mut().enumerate() {
        e["seq"] = Value::from(i as u64 + 1);
    }
    let mut out = header + "\n";
    for e in &entries {
        out += &serde_json::to_string(e).expect("json");
        out += "\n";
    }
    let edited_log = rec.dir.path().join(format!("{name}.log"));
    load_log(&out, &edited_log);
    (replay(&edited_log, &[]), edited)
}

fn kind(e: &Value) -> &str {
    e["event"]["type"].as_str().unwrap_or("")
}

fn exits(e: &Value) -> u64 {
    e["pos"]["exits"].as_u64().expect("exits")
}

/// The replay stopped with exit 3 at the edited entry or after it.
fn assert_caught(rep: &Replayed, edited_seq: u64) {
    assert_eq!(
        rep.code,
        Some(3),
        "the edit was not caught:\n{}",
        rep.stderr
    );
    let seq: u64 = rep
        .stderr
        .split("first divergent entry: #")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no divergent entry named:\n{}", rep.stderr));
    assert!(
        seq >= edited_seq,
        "divergence reported at #{seq}, before the edit at #{edited_seq}:\n{}",
        rep.stderr
    );
    assert!(rep.stderr.contains("last matching entry"), "{}", rep.stderr);
}

/// The index of the `nth` entry of `kind`, well into the log.
fn nth_of(entries: &[Value], wanted: &str, nth: usize) -> usize {
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| kind(e) == wanted)
        .nth(nth)
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("fewer than {} {wanted} entries", nth + 1))
}

#[test]
fn a_changed_rdtsc_value_is_caught() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (rep, seq) = replay_edited("rdtsc", |entries| {
        let i = nth_of(entries, "rdtsc", 20);
        entries[i]["event"]["value"] = Value::from("0x1234");
        i as u64 + 1
    });
    assert_caught(&rep, seq);
}

#[test]
fn a_changed_rdrand_value_is_caught() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (rep, seq) = replay_edited("rdrand", |entries| {
        let i = nth_of(entries, "rdrand", 20);
        entries[i]["event"]["value"] = Value::from("0x5555");
        i as u64 + 1
    });
    assert_caught(&rep, seq);
}

#[test]
fn an_interrupt_moved_by_one_exit_is_caught() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (rep, seq) = replay_edited("moved", |entries| {
        // An interrupt whose next entry is at a later exit, so that moving
        // it one exit later keeps the log in order.
        let movable: Vec<usize> = (0..entries.len() - 1)
            .filter(|&i| {
                kind(&entries[i]) == "interrupt" && exits(&entries[i + 1]) > exits(&entries[i])
            })
            .collect();
        assert!(!movable.is_empty(), "no interrupt to move");
        let i = movable[movable.len() / 2];
        entries[i]["pos"]["exits"] = Value::from(exits(&entries[i]) + 1);
        i as u64 + 1
    });
    assert_caught(&rep, seq);
}

#[test]
fn a_dropped_interrupt_is_caught() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (rep, seq) = replay_edited("dropped", |entries| {
        let i = nth_of(entries, "interrupt", 40);
        entries.remove(i);
        i as u64 + 1
    });
    assert_caught(&rep, seq);
}

#[test]
fn a_changed_packet_byte_is_caught() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (rep, seq) = replay_edited("packet", |entries| {
        let i = nth_of(entries, "packet", 10);
        let frame = entries[i]["event"]["frame"]
            .as_str()
            .expect("frame hex")
            .to_string();
        // Change one byte of the UDP payload (the value of a request),
        // keeping the hex string valid.
        let at = frame.len() - 2;
        let byte = u8::from_str_radix(&frame[at..], 16).expect("hex");
        let changed = format!("{}{:02x}", &frame[..at], byte ^ 0x01);
        entries[i]["event"]["frame"] = Value::from(changed);
        i as u64 + 1
    });
    assert_caught(&rep, seq);
}

#[test]
fn replay_without_patching_diverges() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rep = replay(&loaded_recording().log, &["--no-patch"]);
    assert_eq!(
        rep.code,
        Some(3),
        "an unpatched replay must diverge:\n{}",
        rep.stderr
    );
}

#[test]
fn corrupt_and_truncated_logs_are_refused_with_the_offset() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rec = loaded_recording();
    let bytes = std::fs::read(&rec.log).expect("log");
    let mut corrupt = bytes.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x40;
    let path = rec.dir.path().join("corrupt.log");
    std::fs::write(&path, &corrupt).expect("write");
    let rep = replay(&path, &[]);
    assert_eq!(rep.code, Some(1), "{}", rep.stderr);
    assert!(rep.stderr.contains("offset"), "{}", rep.stderr);

    let path = rec.dir.path().join("truncated.log");
    std::fs::write(&path, &bytes[..bytes.len() - 7]).expect("write");
    let rep = replay(&path, &[]);
    assert_eq!(rep.code, Some(1), "{}", rep.stderr);
    assert!(rep.stderr.contains("offset"), "{}", rep.stderr);

    let path = rec.dir.path().join("foreign.log");
    std::fs::write(&path, b"GIF89a this is not a log at all").expect("write");
    let rep = replay(&path, &[]);
    assert_eq!(rep.code, Some(1), "{}", rep.stderr);
}

#[test]
fn a_log_for_another_image_or_memory_size_is_refused_before_running() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rec = loaded_recording();
    let other = rec.dir.path().join("other.elf");
    std::fs::write(&other, ftvm_core::machine::loader::flat_elf(&[0xf4])).expect("image");
    let rep = replay(&rec.log, &["--kernel", &other.to_string_lossy()]);
    assert_eq!(rep.code, Some(1), "{}", rep.stderr);
    assert!(rep.stderr.contains("another guest image"), "{}", rep.stderr);
    let rep = replay(&rec.log, &["--mem", "128M"]);
    assert_eq!(rep.code, Some(1), "{}", rep.stderr);
    assert!(
        rep.stderr.contains("bytes of guest memory"),
        "{}",
        rep.stderr
    );
}

#[test]
fn sigint_closes_the_log_cleanly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("int.log");
    let config = ServerConfig::new(
        "record",
        Role::Record { log: log.clone() },
        free_udp(),
        Duration::from_secs(60),
    );
    let mut record = launcher().start(&config).expect("start ftvm record");
    std::thread::sleep(Duration::from_millis(1500));
    record
        .signal(nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let status = record
        .wait_exit(Duration::from_secs(15))
        .expect("record stops on SIGINT");
    assert!(status.success(), "{}", record.log());
    let dump = ftvm(
        &["log", "dump", &log.to_string_lossy()],
        Duration::from_secs(30),
    );
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(String::from_utf8_lossy(&dump.stdout).contains("end at exit"));
}

/// Records `code` as a flat guest that prints one line and powers off,
/// replays it, and returns (the log's listing, the recorded console).
fn record_and_replay_flat(name: &str, code: &[u8]) -> (String, String) {
    let dir = tempfile::tempdir().expect("dir");
    let image = dir.path().join(format!("{name}.elf"));
    std::fs::write(&image, ftvm_core::machine::loader::flat_elf(code)).expect("image");
    let log = dir.path().join(format!("{name}.log"));
    let serial = dir.path().join("rec.txt");
    let service = free_udp().to_string();
    let rec = ftvm(
        &[
            "record",
            "--kernel",
            &image.to_string_lossy(),
            "--log",
            &log.to_string_lossy(),
            "--service",
            &service,
            "--serial",
            &serial.to_string_lossy(),
            "--timeout",
            "20",
        ],
        Duration::from_secs(40),
    );
    assert!(
        rec.status.success(),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let dump = ftvm(
        &["log", "dump", &log.to_string_lossy()],
        Duration::from_secs(30),
    );
    let listing = String::from_utf8_lossy(&dump.stdout).into_owned();
    let rep = replay(&log, &["--kernel", &image.to_string_lossy()]);
    assert_eq!(rep.code, Some(0), "{}", rep.stderr);
    let console = std::fs::read_to_string(&serial).expect("console");
    assert_eq!(rep.console, console);
    assert_eq!(console.len(), 2, "one letter and a newline: {console:?}");
    (listing, console)
}

/// Prints `'A' + (al & 15)`, a newline, and powers off.
const PRINT_AL_AND_OFF: [u8; 20] = [
    0x66, 0xba, 0xf8, 0x03, 0x24, 0x0f, 0x04, 0x41, 0xee, 0xb0, 0x0a, 0xee, 0x66, 0xba, 0x01, 0x05,
    0xb0, 0x00, 0xee, 0xf4,
];

/// A guest that reads the PIT's counter (a time-dependent device read)
/// prints a letter derived from it: the value is logged and replayed.
#[test]
fn a_pit_counter_read_is_recorded_and_replayed() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    // Program channel 0 (mode 2, lobyte/hibyte, count 0xffff), latch it and
    // read its low byte.
    let mut code = vec![
        0xb0, 0x34, 0xe6, 0x43, 0xb0, 0xff, 0xe6, 0x40, 0xe6, 0x40, 0xb0, 0x00, 0xe6, 0x43, 0xe4,
        0x40,
    ];
    code.extend_from_slice(&PRINT_AL_AND_OFF);
    let (listing, _) = record_and_replay_flat("pit", &code);
    assert!(listing.contains("pit-read port 0x40"), "{listing}");
}

/// A guest that reads the TSC with `rdmsr` (which the VMM filters) prints a
/// letter derived from it: the recording logs the value and the replay
/// prints the same letter.
#[test]
fn an_rdmsr_of_the_tsc_is_recorded_and_replayed() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut code = vec![0xb9, 0x10, 0, 0, 0, 0x0f, 0x32];
    code.extend_from_slice(&PRINT_AL_AND_OFF);
    let (listing, _) = record_and_replay_flat("rdmsr", &code);
    assert!(listing.contains("rdmsr msr 0x10"), "{listing}");
}
