//! What a demo run found, as `metrics.json` holds it and as the demo
//! prints it at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::args::{FIRST, SECOND};
use crate::history::OpKind;
use crate::linearizability;
use crate::timeline::Marker;

/// What a demo run found; `metrics.json` is this, serialised.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub seed: u64,
    pub out: PathBuf,
    pub vm_id: String,
    pub clients: u32,
    pub duration_s: f64,
    pub kill_at_s: f64,
    pub failure_timeout_ms: u64,
    pub addresses: Addresses,
    pub ops: OpCounts,
    pub throughput: Throughput,
    pub failover: Failover,
    pub fault_tolerant_phase: FtPhase,
    pub writes: WriteCheck,
    pub linearizability: linearizability::Report,
    /// Per view, every server that said it was the view's primary.
    pub primaries_per_view: BTreeMap<u64, BTreeSet<String>>,
    /// How each server process ended.
    pub exits: BTreeMap<String, String>,
    /// Why the demo failed; empty when it passed.
    pub problems: Vec<String>,
    pub timeline_markers: Vec<Marker>,
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
    /// From the new primary's first reply to the end of the load.
    pub ops_per_sec_after_failover: f64,
    pub ops_per_sec_overall: f64,
}

/// What the first primary measured of its backup up to the kill, from its
/// last status line before it: the lag at every exit, and how long each
/// output waited for the backup's acknowledgement.
#[derive(Debug, Default, Serialize)]
pub struct FtPhase {
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub output_hold_p50_ms: f64,
    pub output_hold_p99_ms: f64,
}

/// Milliseconds after the SIGKILL.
#[derive(Debug, Default, Serialize)]
pub struct Failover {
    pub kill_unix_ns: Option<u64>,
    pub detected_ms: Option<f64>,
    pub test_and_set_won_ms: Option<f64>,
    pub live_ms: Option<f64>,
    pub first_reply_ms: Option<f64>,
    pub view_before: Option<u64>,
    pub view_after: Option<u64>,
    pub primary_after: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct WriteCheck {
    /// Puts and appends that got a reply.
    pub acknowledged: u64,
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

pub(super) fn print_summary(r: &DemoReport, svg: &Path, metrics: &Path, history: &Path) {
    let f = &r.failover;
    let ms = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("+{v:.0} ms"));
    println!();
    println!("failover (times after the SIGKILL):");
    println!("  primary {FIRST} killed     at {:.3} s", r.kill_at_s);
    println!("  failure detected      {}", ms(f.detected_ms));
    println!("  test-and-set won      {}", ms(f.test_and_set_won_ms));
    println!("  {SECOND} live            {}", ms(f.live_ms));
    println!("  first reply from it   {}", ms(f.first_reply_ms));
    if let Some(etcd) = &r.etcd {
        let after_kill = f
            .kill_unix_ns
            .map(|k| (etcd.killed_unix_ns as f64 - k as f64) / 1e6);
        println!(
            "  etcd leader {} killed {}; {} elected {}",
            etcd.killed,
            after_kill.map_or(String::new(), |ms| format!("{ms:+.0} ms")),
            etcd.elected.as_deref().unwrap_or("no leader"),
            etcd.elected_after_ms
                .map_or("before the load ended".to_owned(), |ms| format!(
                    "{ms:.0} ms after it"
                ))
        );
    }
    println!(
        "  view {} -> {}, primary now {}",
        f.view_before.map_or("?".into(), |v| v.to_string()),
        f.view_after.map_or("?".into(), |v| v.to_string()),
        f.primary_after.as_deref().unwrap_or("nobody")
    );
    println!(
        "requests: {} completed, {} without reply, {} resent; {:.0} ops/s before the kill, {:.0} after the failover",
        r.ops.completed,
        r.ops.unknown,
        r.ops.resends,
        r.throughput.ops_per_sec_before_kill,
        r.throughput.ops_per_sec_after_failover
    );
    let ft = &r.fault_tolerant_phase;
    println!(
        "before the kill, at every exit of {FIRST}: backup lag p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; outputs held for the backup's ack p50 {:.3} ms, p99 {:.3} ms",
        ft.lag_p50_ms, ft.lag_p99_ms, ft.lag_max_ms, ft.output_hold_p50_ms, ft.output_hold_p99_ms
    );
    println!(
        "acknowledged writes: {} ({} before the kill), {} checked by reading back {} keys, {} lost",
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
