//! Replays of logs that the guest cannot follow, edited through `ftvm log
//! dump --json` and `ftvm log load`: each ends, within a time limit, with
//! exit 1 (refused before running) or 3 (diverged), never 0 and never a
//! hang. A replay stopped before the end of its log exits 6 and says how
//! far it got; a log that is complete and consistent replays with exit 0.
//! (Issue 9, items 2, 3, 4, 6 and 7.)

use std::time::Duration;

use ftvm_harness::launcher::{Role, ServerConfig};
use ftvm_tests::tamper::*;
use ftvm_tests::{free_udp, ftvm, kvm_available, launcher, vm_lock};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

#[test]
fn the_unedited_recording_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rep = replay(&recording().log, &[]);
    assert_eq!(rep.code, Some(0), "{}", rep.stderr);
    assert!(
        rep.stderr.contains("every digest and output matched"),
        "{}",
        rep.stderr
    );
}

/// Item 2: the guest waits in `hlt` for a packet that is no longer in the
/// log; the replay spun until stopped, then exited 0.
#[test]
fn a_deleted_packet_is_a_divergence_not_a_spin() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut seq = 0;
    let rep = replay_edited("deleted-packet", |entries| {
        let i = nth_of(entries, "packet", 5);
        seq = i as u64 + 1;
        entries.remove(i);
    });
    assert_eq!(rep.code, Some(3), "not caught:\n{}", rep.stderr);
    let named = named_seq(&rep, "first divergent entry: ");
    assert!(named >= Some(seq), "{}", rep.stderr);
}

/// Item 2: an entry that delivery cannot take, at an exit where the guest
/// idles, is named; the replay spun on it.
#[test]
fn an_entry_inserted_where_the_guest_idles_is_named() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let at = idle_wakeups(&recording().entries)[10];
    let exit = exits(&recording().entries[at]);
    for event in [
        json!({"type": "rdrand", "value": "0x5", "ok": true}),
        json!({"type": "rdtsc", "value": "0x1234"}),
        json!({"type": "pit_read", "port": 64, "value": "0x12"}),
        // Says the log is complete at this exit, before the interrupt
        // that wakes the guest there.
        json!({"type": "progress", "exits": exit}),
    ] {
        let name = format!("idle-{}", event["type"].as_str().expect("type"));
        let rep = replay_edited(&name, |entries| {
            let inserted = entry(&entries[at]["pos"], event);
            entries.insert(at, inserted);
        });
        assert_diverged_at(&rep, at as u64 + 1);
    }
}

/// Item 2: an entry the guest leaves behind at an exit it has passed is
/// named as such.
#[test]
fn an_entry_the_guest_passes_is_named() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let at = idle_wakeups(&recording().entries)[10];
    let rep = replay_edited("passed", |entries| {
        let event = json!({"type": "rdrand", "value": "0x5", "ok": true});
        let inserted = entry(&entries[at]["pos"], event);
        entries.insert(at + 1, inserted);
    });
    assert_diverged_at(&rep, at as u64 + 2);
    assert!(
        rep.stderr
            .contains("the guest is past the entry's position"),
        "{}",
        rep.stderr
    );
}

/// Item 2: a replay stopped before the end of its log says how far it got
/// and exits 6; it said that every digest and output matched, and exited 0.
#[test]
fn a_replay_stopped_before_the_end_says_how_far_it_got() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    // mov dx, 0x3f8; then `in al, dx` in a loop: a long log, quick to make.
    let image = flat_guest(
        dir.path(),
        "loop",
        &[0x66, 0xba, 0xf8, 0x03, 0xec, 0xeb, 0xfd],
    );
    let log = dir.path().join("loop.log");
    let kernel = image.to_string_lossy();
    let rec = ftvm(
        &[
            "record",
            "--kernel",
            &kernel,
            "--log",
            &log.to_string_lossy(),
            "--service",
            &free_udp().to_string(),
            "--serial",
            "/dev/null",
            "--timeout",
            "3",
        ],
        Duration::from_secs(30),
    );
    assert!(
        rec.status.success(),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let total = dump(&log).1.len();
    let log = log.to_string_lossy();
    let args = [
        "replay",
        &*log,
        "--kernel",
        &*kernel,
        "--serial",
        "/dev/null",
        "--timeout",
        "0.2",
    ];
    let out = ftvm(&args, REPLAY_LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("STOPPED (Requested) before the end of the log: "),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(" of {total} entries applied, exit ")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("every digest and output matched"),
        "{stderr}"
    );
}

/// A recording stopped while the guest had written part of a line logs
/// that part as its last output; the replay, which never flushed it, took
/// the output for an entry the guest had passed.
#[test]
fn a_recording_stopped_in_the_middle_of_a_line_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    // Print "A" with no newline, then read a port in a loop.
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xec, 0xeb, 0xfd];
    let image = flat_guest(dir.path(), "half-line", &code);
    let log = dir.path().join("half-line.log");
    let kernel = image.to_string_lossy();
    let rec = ftvm(
        &[
            "record",
            "--kernel",
            &kernel,
            "--log",
            &log.to_string_lossy(),
            "--service",
            &free_udp().to_string(),
            "--serial",
            "/dev/null",
            "--timeout",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(
        rec.status.success(),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let (_, entries) = dump(&log);
    let last_output = entries.iter().rev().find(|e| kind(e) == "output");
    let end = entries.last().expect("an end entry");
    assert_eq!(last_output.map(exits), Some(exits(end)), "{entries:?}");
    let rep = replay(&log, &["--kernel", &kernel]);
    assert_eq!(rep.code, Some(0), "{}", rep.stderr);
    assert!(
        rep.stderr.contains("every digest and output matched"),
        "{}",
        rep.stderr
    );
}

/// Item 3: a log without its final digest and `end` entry, or without the
/// final digest alone, is truncated; the second replayed with exit 0.
#[test]
fn a_log_without_its_final_digest_is_refused_as_truncated() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rep = replay_edited("no-tail", |entries| {
        entries.truncate(entries.len() - 2);
    });
    assert_eq!(rep.code, Some(1), "{}", rep.stderr);
    assert!(
        rep.stderr.contains("the log is truncated"),
        "{}",
        rep.stderr
    );
    let rep = replay_edited("no-final-digest", |entries| {
        let digest = entries.len() - 2;
        assert_eq!(entries[digest]["event"]["reason"], "end");
        entries.remove(digest);
    });
    assert_eq!(rep.code, Some(1), "{}", rep.stderr);
    assert!(
        rep.stderr.contains("the log is truncated: its end entry #")
            && rep.stderr.contains("has no final digest before it"),
        "{}",
        rep.stderr
    );
}

/// Item 3: a recording whose stop had to take the vCPU between two exits
/// says so in its `end` entry, and its replay says so too.
#[test]
fn a_recording_cut_short_between_exits_says_so_on_replay() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    // Print "A\n", then spin without an exit.
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xb0, 0x0a, 0xee, 0xeb, 0xfe,
    ];
    let image = flat_guest(dir.path(), "spin", &code);
    let log = dir.path().join("spin.log");
    let mut config = ServerConfig::new(
        "spin",
        Role::Record { log: log.clone() },
        free_udp(),
        Duration::from_secs(60),
    );
    config.guest.kernel = Some(image.clone());
    let mut rec = launcher().start(&config).expect("start ftvm record");
    std::thread::sleep(Duration::from_millis(1000));
    let status = rec.stop(Duration::from_secs(15)).expect("record stops");
    assert!(status.success(), "{}", rec.log());
    let (_, entries) = dump(&log);
    let end = entries.last().expect("an end entry");
    assert_eq!(
        end["event"]["reason"], "RequestedBetweenExits",
        "{entries:?}"
    );
    assert!(entries.iter().all(|e| kind(e) != "digest"), "{entries:?}");
    let rep = replay(&log, &["--kernel", &image.to_string_lossy()]);
    assert_eq!(rep.code, Some(0), "{}", rep.stderr);
    assert!(
        rep.stderr
            .contains("the recording was cut short (its end entry says \"RequestedBetweenExits\")"),
        "{}",
        rep.stderr
    );
    assert!(
        !rep.stderr.contains("every digest and output matched"),
        "{}",
        rep.stderr
    );
}

/// Item 3: replay must reproduce every setting, so one it does not know
/// is refused by name; it was accepted.
#[test]
fn an_unknown_setting_in_the_header_is_refused_by_name() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rec = recording();
    let mut header = rec.header.clone();
    header["config"]["extra"]["mac"] = Value::from("52:54:00:12:34:57");
    let rep = replay_entries(rec.dir.path(), "unknown-setting", &header, &rec.entries);
    assert_eq!(rep.code, Some(1), "{}", rep.stderr);
    assert!(
        rep.stderr
            .contains("recorded with the setting mac = \"52:54:00:12:34:57\""),
        "{}",
        rep.stderr
    );
}

/// Changes the UDP checksum of the `nth` packet, which the guest neither
/// checks nor echoes: only the receive buffer in guest memory differs.
/// Returns the edited entry's index.
fn change_udp_checksum(entries: &mut [Value], nth: usize) -> usize {
    let i = nth_of(entries, "packet", nth);
    let frame = entries[i]["event"]["frame"]
        .as_str()
        .expect("hex")
        .to_string();
    // Ethernet 14 + IPv4 20 + UDP ports and length 6: byte 40, digit 80.
    let byte = u8::from_str_radix(&frame[80..82], 16).expect("hex");
    let changed = format!("{}{:02x}{}", &frame[..80], byte ^ 0x5a, &frame[82..]);
    entries[i]["event"]["frame"] = Value::from(changed);
    i
}

/// Item 4: `--output-memory-hash` is stored in the header and replay
/// follows it, so a change in memory that only the memory hash shows is
/// caught at the next output; without the flag it is not. The header was
/// the same with and without it.
#[test]
fn output_memory_hash_catches_a_memory_change_at_the_next_output() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let checked = record(&["--digest-interval", "0", "--output-memory-hash"], kv_load);
    assert_eq!(
        checked.header["config"]["extra"]["output_memory"], "refresh",
        "{}",
        checked.header
    );
    let rep = replay(&checked.log, &[]);
    assert_eq!(rep.code, Some(0), "unedited:\n{}", rep.stderr);
    let mut entries = checked.entries.clone();
    let edited = change_udp_checksum(&mut entries, 5);
    let rep = replay_entries(checked.dir.path(), "checked", &checked.header, &entries);
    assert_eq!(rep.code, Some(3), "not caught:\n{}", rep.stderr);
    let seq = named_seq(&rep, "first divergent entry: ").expect("an entry named");
    assert_eq!(kind(&entries[seq as usize - 1]), "output", "{}", rep.stderr);
    assert!(seq > edited as u64 + 1, "{}", rep.stderr);
    assert!(
        rep.stderr.contains("the state that produced it differs"),
        "{}",
        rep.stderr
    );

    let unchecked = record(&["--digest-interval", "0"], kv_load);
    assert!(
        unchecked.header["config"]["extra"]
            .get("output_memory")
            .is_none(),
        "{}",
        unchecked.header
    );
    let mut entries = unchecked.entries.clone();
    change_udp_checksum(&mut entries, 5);
    let rep = replay_entries(
        unchecked.dir.path(),
        "unchecked",
        &unchecked.header,
        &entries,
    );
    match rep.code {
        // The receive buffer was overwritten before the end.
        Some(0) => {}
        Some(3) => {
            let seq = named_seq(&rep, "first divergent entry: ").expect("an entry named");
            assert_eq!(kind(&entries[seq as usize - 1]), "digest", "{}", rep.stderr);
        }
        other => panic!("exit {other:?}:\n{}", rep.stderr),
    }
}

/// Item 6: the report names the last entry that matched before an output
/// or a digest that does not; it said "none".
#[test]
fn a_mismatch_names_the_last_entry_that_matched() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    for (wanted, field) in [("output", "hash"), ("digest", "mem_hash")] {
        let mut at = 0;
        let rep = replay_edited(&format!("changed-{wanted}"), |entries| {
            at = nth_of(entries, wanted, 1);
            entries[at]["event"][field] = Value::from("0x1234");
        });
        assert_diverged_at(&rep, at as u64 + 1);
        assert_eq!(
            named_seq(&rep, "last matching entry: "),
            Some(at as u64),
            "{}",
            rep.stderr
        );
    }
}

/// Item 7: progress marks true of the log (the log is complete up to the
/// exit of the entry before the mark) are applied where they stand; the
/// replay diverged on one, blaming an idle guest.
#[test]
fn consistent_progress_marks_replay_exactly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let rep = replay_edited("progress", |entries| {
        let wakeups = idle_wakeups(entries);
        let every = (wakeups.len() / 20).max(1);
        for &i in wakeups.iter().step_by(every).rev() {
            let before = &entries[i - 1];
            let event = json!({"type": "progress", "exits": exits(before)});
            let mark = entry(&before["pos"], event);
            entries.insert(i, mark);
        }
    });
    assert_eq!(rep.code, Some(0), "{}", rep.stderr);
    assert!(
        rep.stderr.contains("every digest and output matched"),
        "{}",
        rep.stderr
    );
}

/// One random edit of a log.
#[derive(Debug, Clone)]
enum Edit {
    Delete(Index),
    /// A new entry of kind `INSERTED[which]` before entry `at` (before the
    /// `end` entry at the latest), at that entry's position or, with
    /// `after_previous`, at the one before it.
    Insert {
        at: Index,
        which: usize,
        value: u64,
        after_previous: bool,
    },
    /// Entry `from` (not the `end` entry) moved before entry `to` (before
    /// the `end` entry at the latest), taking its new neighbour's position.
    Move {
        from: Index,
        to: Index,
        after_previous: bool,
    },
}

const INSERTED: [&str; 8] = [
    "rdtsc",
    "rdrand",
    "pit_read",
    "rdmsr",
    "interrupt",
    "progress",
    "packet",
    "output",
];

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<Index>().prop_map(Edit::Delete),
        (
            any::<Index>(),
            0..INSERTED.len(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(at, which, value, after_previous)| Edit::Insert {
                at,
                which,
                value,
                after_previous
            }),
        (any::<Index>(), any::<Index>(), any::<bool>()).prop_map(|(from, to, after_previous)| {
            Edit::Move {
                from,
                to,
                after_previous,
            }
        }),
    ]
}

/// The position of an entry placed before `entries[at]`: that entry's, or
/// the previous one's, either of which keeps the log in exit order.
fn position_before(entries: &[Value], at: usize, after_previous: bool) -> Value {
    if after_previous && at > 0 {
        entries[at - 1]["pos"].clone()
    } else {
        entries[at]["pos"].clone()
    }
}

/// An event of kind `INSERTED[which]`; packets and outputs are copies of
/// the recording's.
fn new_event(entries: &[Value], which: usize, value: u64, next_exits: u64) -> Value {
    let hex = format!("{value:#x}");
    let copy_of = |wanted: &str| {
        let all: Vec<&Value> = entries.iter().filter(|e| kind(e) == wanted).collect();
        all[value as usize % all.len()]["event"].clone()
    };
    match INSERTED[which] {
        "rdtsc" => json!({"type": "rdtsc", "value": hex}),
        "rdrand" => json!({"type": "rdrand", "value": hex, "ok": true}),
        "pit_read" => {
            json!({"type": "pit_read", "port": 64, "value": format!("{:#x}", value as u8)})
        }
        "rdmsr" => json!({"type": "rdmsr", "msr": "0x10", "value": hex}),
        // The timer's and the network's: the vectors the guest handles.
        "interrupt" => {
            let vector = [0x20, 0x25][value as usize % 2];
            json!({"type": "interrupt", "vector": vector})
        }
        // A mark that claims more than the log holds: the entry after it
        // is at an exit it says is complete.
        "progress" => json!({"type": "progress", "exits": next_exits}),
        wanted => copy_of(wanted),
    }
}

/// `entries` with `edit` applied; `None` when that changes nothing.
fn apply(entries: &[Value], edit: &Edit) -> Option<Vec<Value>> {
    let mut edited = entries.to_vec();
    let end = edited.len() - 1;
    match edit {
        Edit::Delete(at) => {
            edited.remove(at.index(edited.len()));
        }
        Edit::Insert {
            at,
            which,
            value,
            after_previous,
        } => {
            let at = at.index(end + 1);
            let pos = position_before(&edited, at, *after_previous);
            let event = new_event(entries, *which, *value, exits(&edited[at]));
            edited.insert(at, entry(&pos, event));
        }
        Edit::Move {
            from,
            to,
            after_previous,
        } => {
            let mut moved = edited.remove(from.index(end));
            let to = to.index(end);
            moved["pos"] = position_before(&edited, to, *after_previous);
            edited.insert(to, moved);
        }
    }
    let same = |a: &Value, b: &Value| a["pos"] == b["pos"] && a["event"] == b["event"];
    let unchanged =
        edited.len() == entries.len() && edited.iter().zip(entries).all(|(a, b)| same(a, b));
    (!unchanged).then_some(edited)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 20,
        max_shrink_iters: 8,
        // Every run edits a new recording, where a saved case means
        // something else.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Issue 9: the replay of a log with one entry deleted, inserted or
    /// moved ends with exit 1 or 3, never 0, and never hangs (a replay
    /// that hangs is stopped by its `--timeout` and exits 6).
    #[test]
    fn a_deleted_inserted_or_moved_entry_ends_in_exit_1_or_3(edit in edit_strategy()) {
        if !kvm_available() {
            return Ok(());
        }
        let _g = vm_lock();
        let rec = recording();
        let Some(entries) = apply(&rec.entries, &edit) else {
            return Err(TestCaseError::reject("the edit changed nothing"));
        };
        let rep = replay_entries(rec.dir.path(), "random", &rec.header, &entries);
        prop_assert!(
            matches!(rep.code, Some(1) | Some(3)),
            "{:?} ended with {:?}:\n{}",
            edit,
            rep.code,
            rep.stderr
        );
    }
}
