//! Interrupts at any instruction: workloads whose result depends on where
//! every timer interrupt lands (`race`, `kv-race`) or that wait for ticks
//! without ever exiting (`spin`, and `spin-user` at CPL3), recorded,
//! replayed, tampered with, and run by a primary/backup pair, with and
//! without a failover.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use ftvm_core::host::events::ServerEvent;
use ftvm_core::machine::guest_image::GUEST_ELF;
use ftvm_core::machine::loader::ElfImage;
use ftvm_core::machine::workload::Workload;
use ftvm_harness::launcher::Cluster;
use ftvm_tests::load::{kill_the_primary_under_load, mixed_clients};
use ftvm_tests::record_replay::{record_under_load, replay_within, Recorded, Replayed};
use ftvm_tests::{
    assert_one_primary_per_view, cluster_config, fault_tolerant_cluster, ftvm, kvm_available,
    load_log, start_cluster, vm_lock,
};
use iced_x86::{Decoder, DecoderOptions};
use serde_json::Value;

/// Every guest run here stops by itself; the processes are killed after
/// this long whatever happens.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// How many `race` recordings show that the result depends on where the
/// interrupts landed.
const RACE_RECORDINGS: usize = 20;
/// Periodic digests every this many exits, so that a `race` run (about 900
/// exits) has several.
const DIGEST_INTERVAL: &str = "100";

/// `ftvm record --workload W` of a workload that powers off by itself.
fn record(dir: &Path, name: &str, workload: Workload) -> Recorded {
    let log = dir.join(format!("{name}.log"));
    let serial = dir.join(format!("{name}.txt"));
    let out = ftvm(
        &[
            "record",
            "--workload",
            workload.name(),
            "--log",
            &log.to_string_lossy(),
            "--serial",
            &serial.to_string_lossy(),
            "--digest-interval",
            DIGEST_INTERVAL,
            "--timeout",
            "60",
        ],
        RUN_LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "record {name} failed:\n{stderr}");
    assert!(stderr.contains("(PowerOff)"), "{stderr}");
    Recorded {
        log,
        console: std::fs::read_to_string(&serial).expect("console"),
        frames: Vec::new(),
    }
}

/// A replay and the summary it wrote (`--summary-json`).
struct Summarized {
    run: Replayed,
    summary: Value,
}

fn replay(log: &Path) -> Summarized {
    let dir = tempfile::tempdir().expect("dir");
    let summary = dir.path().join("summary.json");
    let run = replay_within(
        log,
        "200",
        Duration::from_secs(240),
        &["--summary-json", &summary.to_string_lossy()],
    );
    Summarized {
        run,
        summary: std::fs::read_to_string(&summary)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null),
    }
}

/// Deliveries between two exits that the replay found again.
fn between(rep: &Summarized) -> u64 {
    rep.summary["between"]["deliveries"].as_u64().unwrap_or(0)
}

/// The log as JSON lines (`ftvm log dump --json`), and back.
fn dump(log: &Path) -> Vec<Value> {
    let out = ftvm(
        &["log", "dump", &log.to_string_lossy(), "--json"],
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn load(lines: &[Value], to: &Path) {
    let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
    load_log(&text, to);
}

fn hex(v: &Value) -> u64 {
    let s = v.as_str().expect("a hex string");
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex")
}

/// Where every instruction of the embedded guest starts (a linear sweep of
/// its code, as the VMM's scanner decodes it).
fn instruction_starts() -> BTreeSet<u64> {
    let image = ElfImage::parse(GUEST_ELF, 64 << 20).expect("the guest parses");
    let mut starts = BTreeSet::new();
    for (addr, bytes) in image.code(GUEST_ELF) {
        let mut decoder = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
        for instr in &mut decoder {
            starts.insert(instr.ip());
        }
    }
    starts
}

fn final_line(console: &str, prefix: &str) -> String {
    console
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{console}"))
        .to_string()
}

#[test]
fn spin_completes_under_run_record_and_replay() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    // It never exits between its first and its last `rdtsc`: without
    // interrupts between exits it waits forever.
    let out = ftvm(&["run", "--workload", "spin", "--timeout", "60"], RUN_LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("spin waited 100 ticks"), "{stdout}");
    let dir = tempfile::tempdir().expect("dir");
    let rec = record(dir.path(), "spin", Workload::Spin);
    let rep = replay(&rec.log);
    rep.run.assert_reproduces(&rec.console, &rec.frames);
    assert_eq!(between(&rep), 100, "every tick between two exits");
}

/// At CPL3 the replay's breakpoint is `int3` and its step the trap flag,
/// both brought back by the guest's own handlers: every tick is found
/// again in user-mode code, stepping over the passes whose state differs.
#[test]
fn spin_user_gets_every_tick_at_cpl3_and_replays_them_exactly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let rec = record(dir.path(), "spin-user", Workload::SpinUser);
    assert!(
        rec.console.contains("spin waited 100 ticks"),
        "{}",
        rec.console
    );
    let rep = replay(&rec.log);
    rep.run.assert_reproduces(&rec.console, &rec.frames);
    let b = &rep.summary["between"];
    assert_eq!(between(&rep), 100, "every tick between two exits: {b}");
    let user_hits = b["user_mode_hits"].as_u64().unwrap_or(0);
    assert!(
        user_hits >= 100,
        "the ticks land in the user-mode loop: {b}"
    );
    assert!(
        b["single_steps"].as_u64() > Some(0),
        "passes in another state are stepped over at CPL3: {b}"
    );
}

#[test]
fn race_results_depend_on_where_interrupts_land_and_each_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let mut results = BTreeSet::new();
    for i in 0..RACE_RECORDINGS {
        let rec = record(dir.path(), &format!("race{i}"), Workload::Race);
        let rep = replay(&rec.log);
        rep.run.assert_reproduces(&rec.console, &rec.frames);
        assert!(
            rep.summary["counts"]["digests_checked"].as_u64() > Some(1),
            "periodic digests as well as the final one: {}",
            rep.summary
        );
        assert!(between(&rep) > 0, "no interrupt between exits");
        let result = final_line(&rec.console, "ftvm-guest: race counters");
        eprintln!("recording {i}: {result}; {}", rep.summary["between"]);
        results.insert(result);
    }
    assert!(
        results.len() >= 2,
        "{RACE_RECORDINGS} recordings of race all ended with {results:?}"
    );
}

/// One async point of `lines` in the middle of the run, and the entries at
/// its position after it (what it delivered).
fn async_point(lines: &[Value]) -> (usize, Vec<usize>) {
    let points: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l["event"]["type"] == "async_point")
        .map(|(i, _)| i)
        .collect();
    assert!(points.len() > 10, "too few async points: {}", points.len());
    let at = points[points.len() / 2];
    let pos = lines[at]["pos"].clone();
    let same: Vec<usize> = (at + 1..lines.len())
        .take_while(|i| lines[*i]["pos"] == pos && lines[*i]["event"]["type"] != "async_point")
        .collect();
    (at, same)
}

/// Replays `lines` edited by `edit` and expects a divergence at entry `seq`.
fn assert_diverges_at(dir: &Path, name: &str, lines: &[Value], seq: u64) {
    let log = dir.join(format!("{name}.log"));
    load(lines, &log);
    let rep = replay(&log).run;
    assert_eq!(
        rep.code,
        Some(3),
        "{name}: expected a divergence:\n{}",
        rep.stderr
    );
    assert!(
        rep.stderr
            .contains(&format!("first divergent entry: #{seq} ")),
        "{name}: the report must name entry #{seq}:\n{}",
        rep.stderr
    );
}

#[test]
fn a_tampered_interrupt_between_exits_diverges_at_its_entry() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let starts = instruction_starts();
    let rec = record(dir.path(), "race", Workload::Race);
    let lines = dump(&rec.log);
    let (at, delivered) = async_point(&lines);
    let seq = lines[at]["seq"].as_u64().expect("seq");
    let rip = hex(&lines[at]["pos"]["rip"]);
    let next = starts
        .range(rip + 1..)
        .next()
        .copied()
        .expect("a next instruction");
    let previous = starts
        .range(..rip)
        .next_back()
        .copied()
        .expect("an earlier one");
    for (name, moved_to) in [("later", next), ("earlier", previous)] {
        let mut edited = lines.clone();
        for i in std::iter::once(at).chain(delivered.iter().copied()) {
            edited[i]["pos"]["rip"] = format!("{moved_to:#x}").into();
        }
        assert_diverges_at(dir.path(), &format!("moved-{name}"), &edited, seq);
    }
    for field in ["regs", "mem"] {
        let mut edited = lines.clone();
        let flipped = hex(&edited[at]["event"][field]) ^ 1;
        edited[at]["event"][field] = format!("{flipped:#x}").into();
        assert_diverges_at(dir.path(), &format!("{field}-changed"), &edited, seq);
    }
    // In `spin` the guest passes the instruction in the same state again
    // and again: a state that is never reached is found out at once.
    let rec = record(dir.path(), "spin", Workload::Spin);
    let lines = dump(&rec.log);
    let (at, _) = async_point(&lines);
    let seq = lines[at]["seq"].as_u64().expect("seq");
    let mut edited = lines.clone();
    let flipped = hex(&edited[at]["event"]["mem"]) ^ 1;
    edited[at]["event"]["mem"] = format!("{flipped:#x}").into();
    assert_diverges_at(dir.path(), "spin-mem-changed", &edited, seq);
    // The same at CPL3, where the search runs through the guest's handlers.
    let rec = record(dir.path(), "spin-user", Workload::SpinUser);
    let lines = dump(&rec.log);
    let (at, _) = async_point(&lines);
    let seq = lines[at]["seq"].as_u64().expect("seq");
    for field in ["regs", "mem"] {
        let mut edited = lines.clone();
        let flipped = hex(&edited[at]["event"][field]) ^ 1;
        edited[at]["event"][field] = format!("{flipped:#x}").into();
        assert_diverges_at(
            dir.path(),
            &format!("spin-user-{field}-changed"),
            &edited,
            seq,
        );
    }
}

/// Waits for both servers of a pair whose guest powers off to exit, and
/// returns their logs.
fn wait_pair_end(cluster: &mut Cluster) -> (String, String) {
    for (name, p) in [
        ("primary", &mut cluster.primary),
        ("backup", &mut cluster.backup),
    ] {
        let status = p
            .wait_exit(RUN_LIMIT)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(status.success(), "{name} failed:\n{}", p.log());
    }
    (cluster.primary.log(), cluster.backup.log())
}

/// The number in `text` right before `what` ("13 outputs reproduced").
fn count_before(text: &str, what: &str) -> u64 {
    let at = text
        .find(what)
        .unwrap_or_else(|| panic!("no {what:?} in:\n{text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no count before {what:?} in:\n{text}"))
}

#[test]
fn a_pair_runs_spin_race_and_spin_user_and_the_backup_ends_in_the_primary_state() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    for workload in [Workload::Spin, Workload::Race, Workload::SpinUser] {
        let mut config = cluster_config();
        config.guest.workload = Some(workload);
        config.consoles = true;
        // The backup is to check every output, the first included.
        config.backup_wait = Some(Duration::from_secs(30));
        let mut cluster = start_cluster(&config);
        let (primary_log, backup_log) = wait_pair_end(&mut cluster);
        assert!(primary_log.contains("(PowerOff)"), "{primary_log}");
        let console = cluster.primary.console();
        let lines = console.lines().count() as u64;
        // The backup checked each of the primary's outputs, the final
        // values among them, and its final state, against its own.
        assert_eq!(
            count_before(&backup_log, "outputs reproduced"),
            lines,
            "{workload}: the backup reproduces every line:\n{backup_log}"
        );
        assert_eq!(
            count_before(&backup_log, "digests checked"),
            1,
            "{workload}: the final digest:\n{backup_log}"
        );
        assert!(
            count_before(&backup_log, "between exits)") > 0,
            "{backup_log}"
        );
        assert!(backup_log.contains("(PowerOff)"), "{backup_log}");
        assert_one_primary_per_view(&cluster);
    }
}

#[test]
fn a_failover_in_the_middle_of_race_finishes_on_the_new_primary() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut config = cluster_config();
    config.guest.workload = Some(Workload::Race);
    config.consoles = true;
    let mut cluster = fault_tolerant_cluster(&config);
    // Once the primary has released its first progress line.
    cluster
        .primary
        .wait_console("race task 0 at 1000", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    cluster.primary.kill();
    let released = cluster.primary.console();
    let status = cluster
        .backup
        .wait_exit(RUN_LIMIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let backup_log = cluster.backup.log();
    assert!(status.success(), "{backup_log}");
    assert!(backup_log.contains("then went live"), "{backup_log}");
    assert!(
        cluster
            .backup
            .has_event(|e| matches!(e, ServerEvent::Live { .. })),
        "{backup_log}"
    );
    // What the first primary released and what the second printed are the
    // run's console, each line once, in an order a single run prints.
    let after = cluster.backup.console();
    let whole: Vec<&str> = released.lines().chain(after.lines()).collect();
    let progress: Vec<&str> = whole
        .iter()
        .copied()
        .filter(|l| l.contains("race task ") && l.contains(" at "))
        .collect();
    let unique: BTreeSet<&str> = progress.iter().copied().collect();
    assert_eq!(
        (progress.len(), unique.len()),
        (8, 8),
        "4 tasks print 2 progress lines each, none twice:\n{}",
        whole.join("\n")
    );
    assert!(after.contains("ftvm-guest: race done"), "{after}");
    assert!(
        whole.first().is_some_and(|l| l.contains("booted")),
        "{}",
        whole.join("\n")
    );
    assert_eq!(
        whole.iter().filter(|l| l.contains("race counters")).count(),
        1
    );
    assert_one_primary_per_view(&cluster);
}

#[test]
fn kv_race_under_load_records_and_replays() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let rec = record_under_load(dir.path(), Workload::KvRace, |service| {
        mixed_clients(service, 60)
    });
    assert!(rec.frames.len() >= 180, "every request answered");
    let rep = replay(&rec.log);
    rep.run.assert_reproduces(&rec.console, &rec.frames);
    assert!(between(&rep) > 0, "{}", rep.summary);
}

#[test]
fn kv_race_pair_fails_over_under_load_and_loses_no_acknowledged_write() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let checked = kill_the_primary_under_load(
        Workload::KvRace,
        Duration::from_millis(1500),
        Duration::from_millis(1500),
    );
    eprintln!("{checked} acknowledged appends found after the failover");
}
