//! What a demo run found, as `metrics.json` holds it and as the demo
//! prints it at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::args::FIRST;
use super::kills::{mib, Kill, Target};
use crate::history::OpKind;
use crate::linearizability;
use crate::timeline::{Marker, Span};

/// What a demo run found; `metrics.json` is this, serialised.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub seed: u64,
    pub out: PathBuf,
    pub vm_id: String,
    pub clients: u32,
    pub duration_s: f64,
    pub kill_at_s: f64,
    pub spares: u32,
    pub failure_timeout_ms: u64,
    pub addresses: Addresses,
    pub ops: OpCounts,
    pub throughput: Throughput,
    /// How the first pair became fault tolerant, before the load.
    pub initial_protection: Option<Protection>,
    /// One per kill, in order.
    pub failures: Vec<Failure>,
    /// Servers that went live without a kill (see the summary).
    pub unplanned_takeovers: Vec<Takeover>,
    pub fault_tolerant_phase: FtPhase,
    pub writes: WriteCheck,
    pub linearizability: linearizability::Report,
    /// Per view, every server that said it was the view's primary.
    pub primaries_per_view: BTreeMap<u64, BTreeSet<String>>,
    /// The arbiter's view at the end of the load.
    pub final_view: Option<String>,
    /// How each server process ended.
    pub exits: BTreeMap<String, String>,
    /// Why the demo failed; empty when it passed.
    pub problems: Vec<String>,
    pub timeline_markers: Vec<Marker>,
    pub timeline_spans: Vec<Span>,
    /// With --etcd: the leader killed, and the one elected after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdLeaderKill>,
}

/// The etcd leader killed during the run (`ftvm demo --etcd`).
#[derive(Debug, Clone, Serialize)]
pub struct EtcdLeaderKill {
    /// The member killed, and when (ns since the Unix epoch).
    pub killed: String,
    pub killed_unix_ns: u64,
    /// The member found leader next, and how long after the kill; none if
    /// no leader was found before the load ended.
    pub elected: Option<String>,
    pub elected_after_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Addresses {
    /// As `--arbiter` names it: the built-in arbiter's address, or
    /// `etcd://` and the members' endpoints.
    pub arbiter: String,
    pub first_primary_service: SocketAddr,
    pub first_primary_log: SocketAddr,
    pub backup_service: SocketAddr,
    /// Every server's service address, spares and restarted ones too.
    pub services: BTreeMap<String, SocketAddr>,
}

#[derive(Debug, Default, Serialize)]
pub struct OpCounts {
    pub invoked: u64,
    pub completed: u64,
    /// Given up without a reply: the outcome is unknown.
    pub unknown: u64,
    pub gets: u64,
    pub puts: u64,
    pub appends: u64,
    /// Appends the guest refused as TooLarge (not executed, not in the
    /// history).
    pub refused: u64,
    /// Requests sent again (same request number), failover included.
    pub resends: u64,
    /// The final read of every key.
    pub final_reads: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Throughput {
    pub ops_per_sec_before_kill: f64,
    /// From the last failure's first reply to the end of the load.
    pub ops_per_sec_after_failover: f64,
    pub ops_per_sec_overall: f64,
}

/// What the first primary measured of its backup up to the first kill,
/// from its last status line before it: the lag at every exit, and how long
/// each output waited for the backup's acknowledgement.
#[derive(Debug, Default, Serialize)]
pub struct FtPhase {
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub output_hold_p50_ms: f64,
    pub output_hold_p99_ms: f64,
}

/// One kill and what followed it; times in ms after the SIGKILL.
#[derive(Debug, Serialize)]
pub struct Failure {
    pub kill: Kill,
    /// When the survivor declared the victim failed.
    pub detected_ms: Option<f64>,
    /// A primary's kill: when its backup won test-and-set and went live.
    pub test_and_set_won_ms: Option<f64>,
    pub live_ms: Option<f64>,
    /// The first reply a client got from the survivor after the kill.
    pub first_reply_ms: Option<f64>,
    /// When a backup had joined the survivor by state transfer.
    pub protected_again: Option<Protection>,
}

/// A server that went live as primary with no kill to take over from.
#[derive(Debug, Clone, Serialize)]
pub struct Takeover {
    pub server: String,
    pub view: u64,
    pub unix_ns: u64,
    /// Seconds into the load.
    pub at_s: f64,
}

/// A backup's join by state transfer, as its primary reported it.
#[derive(Debug, Clone, Serialize)]
pub struct Protection {
    pub primary: String,
    pub backup: String,
    /// After the kill (the first pair: after the transfer started).
    pub after_ms: f64,
    pub started_unix_ns: Option<u64>,
    pub protected_unix_ns: u64,
    pub rounds: u32,
    pub pages: u64,
    pub bytes: u64,
    /// How long the guest stood still at the cut, and the whole transfer.
    pub pause_ms: f64,
    pub transfer_ms: f64,
    /// The clients' replies per second while the state was sent.
    pub ops_per_sec_during_transfer: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct WriteCheck {
    /// Puts and appends that got a reply.
    pub acknowledged: u64,
    /// Before the first kill.
    pub acknowledged_before_kill: u64,
    /// Acknowledged writes whose key was read back at the end.
    pub checked: u64,
    pub lost: Vec<LostWrite>,
    /// Keys whose final read got no reply, so their writes went unchecked.
    pub unverified_keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LostWrite {
    pub key: String,
    pub kind: OpKind,
    pub value: String,
    pub client: u64,
    pub acknowledged_unix_ns: u64,
    pub final_value: Option<String>,
}

fn ms(v: Option<f64>) -> String {
    v.map_or("never".to_owned(), |v| format!("+{v:.0} ms"))
}

/// The line the README and the acceptance check look for.
pub(super) fn protection_line(p: &Protection) -> String {
    format!(
        "protected again after {:.0} ms (pause {:.1} ms, {:.1} MiB sent)",
        p.after_ms,
        p.pause_ms,
        mib(p.bytes)
    )
}

fn print_protection(p: &Protection) {
    println!(
        "    {} to {}: {} pre-copy rounds, {} pages, transfer {:.0} ms{}",
        p.primary,
        p.backup,
        p.rounds,
        p.pages,
        p.transfer_ms,
        p.ops_per_sec_during_transfer
            .map_or(String::new(), |r| format!(
                ", clients served {r:.0} ops/s meanwhile"
            ))
    );
}

fn print_failure(n: usize, f: &Failure, etcd: Option<&EtcdLeaderKill>) {
    let k = &f.kill;
    println!();
    println!(
        "failure {n} (times after the SIGKILL): {} {} killed at {:.3} s, view {}; {} goes on",
        k.target.name(),
        k.victim,
        k.at_s,
        k.view,
        k.survivor
    );
    let step = |what: String, v: Option<f64>| println!("  {what:<22}{}", ms(v));
    step("failure detected".into(), f.detected_ms);
    if k.target == Target::Primary {
        step("test-and-set won".into(), f.test_and_set_won_ms);
        step(format!("{} live", k.survivor), f.live_ms);
    }
    step(format!("first reply from {}", k.survivor), f.first_reply_ms);
    if let (1, Some(etcd)) = (n, etcd) {
        let after_kill = (etcd.killed_unix_ns as f64 - k.unix_ns as f64) / 1e6;
        println!(
            "  etcd leader {} killed {after_kill:+.0} ms; {} elected {}",
            etcd.killed,
            etcd.elected.as_deref().unwrap_or("no leader"),
            etcd.elected_after_ms
                .map_or("before the load ended".to_owned(), |ms| format!(
                    "{ms:.0} ms after it"
                ))
        );
    }
    match &f.protected_again {
        Some(p) => {
            println!("  {} by {}", protection_line(p), p.backup);
            print_protection(p);
        }
        None => println!("  never protected again"),
    }
    if let Some(spare) = &k.restarted_as {
        println!("  {} came back as the spare {spare}", k.victim);
    }
}

pub(super) fn print_summary(r: &DemoReport, svg: &Path, metrics: &Path, history: &Path) {
    if let Some(p) = &r.initial_protection {
        println!();
        println!(
            "the first pair: {} joined {} by state transfer: pause {:.1} ms, {:.1} MiB sent",
            p.backup,
            p.primary,
            p.pause_ms,
            mib(p.bytes)
        );
        print_protection(p);
    }
    for (i, f) in r.failures.iter().enumerate() {
        print_failure(i + 1, f, r.etcd.as_ref());
    }
    for t in &r.unplanned_takeovers {
        println!();
        println!(
            "unplanned: {} went live as the primary of view {} at {:.3} s with no kill before it (a failure detected without one; see {}.events.jsonl)",
            t.server, t.view, t.at_s, t.server
        );
    }
    println!();
    println!(
        "views: {}",
        r.final_view
            .as_deref()
            .unwrap_or("the arbiter's last view is unknown")
    );
    println!(
        "requests: {} completed, {} without reply, {} resent; {:.0} ops/s before the first kill, {:.0} after the last",
        r.ops.completed,
        r.ops.unknown,
        r.ops.resends,
        r.throughput.ops_per_sec_before_kill,
        r.throughput.ops_per_sec_after_failover
    );
    let ft = &r.fault_tolerant_phase;
    println!(
        "before the first kill, at every exit of {FIRST}: backup lag p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; outputs held for the backup's ack p50 {:.3} ms, p99 {:.3} ms",
        ft.lag_p50_ms, ft.lag_p99_ms, ft.lag_max_ms, ft.output_hold_p50_ms, ft.output_hold_p99_ms
    );
    println!(
        "acknowledged writes: {} ({} before the first kill), {} checked by reading back {} keys, {} lost",
        r.writes.acknowledged,
        r.writes.acknowledged_before_kill,
        r.writes.checked,
        r.ops.final_reads,
        r.writes.lost.len()
    );
    for w in r.writes.lost.iter().take(20) {
        println!(
            "  lost: {:?} {:?} on key {:?} (final value {:?})",
            w.kind, w.value, w.key, w.final_value
        );
    }
    println!("linearizability: {}", r.linearizability.summary());
    let explanation = r.linearizability.explain();
    for line in explanation.lines().take(60) {
        println!("  {line}");
    }
    let one_each = r.primaries_per_view.values().all(|n| n.len() <= 1);
    println!(
        "primaries per view: {} ({})",
        r.primaries_per_view
            .iter()
            .map(|(v, n)| format!("{v}: {}", n.iter().cloned().collect::<Vec<_>>().join("+")))
            .collect::<Vec<_>>()
            .join(", "),
        if one_each {
            "one each"
        } else {
            "MORE THAN ONE"
        }
    );
    println!(
        "wrote {}, {} and {}",
        svg.display(),
        metrics.display(),
        history.display()
    );
    if r.problems.is_empty() {
        println!("PASS");
    } else {
        println!("FAIL");
    }
}
