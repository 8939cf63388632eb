//! What a trial is judged by, once it is over: no acknowledged write lost,
//! a linearizable history, at most one primary per view, no backup
//! diverged, no server ended in a way no fault explains, and the VM live
//! again (and, with spares, fault tolerant again) within its bounds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use super::schedule::{Fault, Schedule};
use super::trial::{
    liveness_bound, reprotect_bound, Injected, Settings, Skipped, Strike, TrialRun,
};
use crate::demo::analysis::check_writes;
use crate::demo::LostWrite;
use crate::history::HistoryOp;
use crate::launcher::DatagramCounts;
use crate::linearizability::{self, CheckConfig, KeyVerdict, Overall};
use ftvm_core::host::events::ServerEvent;

/// A failover step a server took, for the picture and the report.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Milliseconds after the clients started.
    pub t_ms: f64,
    pub server: String,
    /// `failure_detected`, `won`, `live`, `lost`, `deposed`, `diverged`.
    pub what: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrialReport {
    pub seed: u64,
    pub passed: bool,
    /// Why it failed; empty when it passed.
    pub problems: Vec<String>,
    pub faults: Vec<Fault>,
    pub injected: Vec<Injected>,
    pub steps: Vec<Step>,
    /// From the clients' start to the end of their load.
    pub load_s: f64,
    pub ops_completed: u64,
    pub ops_unknown: u64,
    pub writes_acknowledged: u64,
    pub writes_checked: u64,
    pub lost_writes: Vec<LostWrite>,
    pub linearizability: String,
    pub keys_not_linearizable: Vec<String>,
    /// Per view, every server that claimed it as primary.
    pub primaries_per_view: BTreeMap<u64, BTreeSet<String>>,
    /// Servers whose replay parted ways with their primary's log.
    pub diverged: Vec<String>,
    /// From the last fault's heal to the first reply after it.
    pub live_again_ms: Option<f64>,
    pub liveness_bound_ms: f64,
    /// With spares: from the last fault's heal to the final primary's
    /// `protected` (0: it already was), `None` inside if not within
    /// `reprotect_bound_ms`.
    pub reprotected_ms: Option<Option<f64>>,
    pub reprotect_bound_ms: f64,
    /// Faults not injected, and why (the campaign's own rule: never cost
    /// the last server holding the VM's state).
    pub skipped: Vec<Skipped>,
    /// Faults aimed at a state transfer, and whether they hit one.
    pub strikes: Vec<Strike>,
    /// The primary was killed mid-transfer: the VM is down by design, and
    /// the checks that need a server (the read-back, liveness,
    /// re-protection) give way to "the joining backup never went live".
    pub down_by_design: bool,
    /// The arbiter's view at the end.
    pub final_view: Option<String>,
    /// Clients that gave up on a request (no reply before their deadline).
    pub clients_gave_up: u64,
    /// How each server ended.
    pub exits: BTreeMap<String, String>,
    /// Which server each client reply came from, by name: how many.
    pub replies_by_server: BTreeMap<String, u64>,
    pub datagrams: DatagramCounts,
    pub dir: String,
}

impl TrialReport {
    /// A trial that could not run (its cluster did not start): failed.
    pub fn not_run(schedule: &Schedule, settings: &Settings, why: String) -> TrialReport {
        TrialReport {
            seed: schedule.seed,
            passed: false,
            problems: vec![format!("the trial could not run: {why}")],
            faults: schedule.faults.clone(),
            injected: Vec::new(),
            steps: Vec::new(),
            load_s: 0.0,
            ops_completed: 0,
            ops_unknown: 0,
            writes_acknowledged: 0,
            writes_checked: 0,
            lost_writes: Vec::new(),
            linearizability: String::new(),
            keys_not_linearizable: Vec::new(),
            primaries_per_view: BTreeMap::new(),
            diverged: Vec::new(),
            live_again_ms: None,
            liveness_bound_ms: liveness_bound(settings.params.failure_timeout_ms).as_secs_f64()
                * 1000.0,
            reprotected_ms: None,
            reprotect_bound_ms: reprotect_bound(settings.params.failure_timeout_ms).as_secs_f64()
                * 1000.0,
            skipped: Vec::new(),
            strikes: Vec::new(),
            down_by_design: false,
            final_view: None,
            clients_gave_up: 0,
            exits: BTreeMap::new(),
            replies_by_server: BTreeMap::new(),
            datagrams: DatagramCounts::default(),
            dir: settings
                .out
                .join(format!("trial-{}", schedule.seed))
                .display()
                .to_string(),
        }
    }

    /// One line: the seed, its faults, the verdict.
    pub fn line(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if self.skipped.iter().any(|s| s.fault == i) {
                    format!("{} (skipped)", f.kind.name())
                } else {
                    f.kind.name().to_owned()
                }
            })
            .collect();
        let mut notes = String::new();
        if !self.strikes.is_empty() {
            let moments: Vec<&str> = self.strikes.iter().map(|s| s.moment.as_str()).collect();
            notes += &format!("; struck {}", moments.join(", "));
        }
        if self.down_by_design {
            notes += "; VM down by design";
        }
        if let Some(Some(ms)) = self.reprotected_ms {
            notes += &format!("; protected {:.1} s after the last heal", ms / 1000.0);
        }
        format!(
            "trial seed {}: {} faults ({}){notes}; {}",
            self.seed,
            self.faults.len(),
            faults.join(", "),
            if self.passed {
                "PASS".to_owned()
            } else {
                format!("FAIL: {}", self.problems.join("; "))
            }
        )
    }
}

/// Exit codes a fault explains: 0 (stopped at the end, or its peer
/// left), 4 (lost test-and-set or deposed, after a failover). Exit 1 is
/// explained only for a joining backup that never held a complete state.
const EXPLAINED_EXITS: [&str; 2] = ["exit code 0", "exit code 4"];

pub fn judge(run: &TrialRun, failure_timeout_ms: u64) -> TrialReport {
    let mut problems = Vec::new();
    let ms_of = |t_ns: u64| (t_ns as f64 - run.start_ns as f64) / 1e6;
    let load_ops: Vec<&HistoryOp> = run
        .ops
        .iter()
        .filter(|o| Some(o.client) != run.reader)
        .collect();

    let down = run.down_by_design.as_ref().filter(|d| d.hit());
    let writes = check_writes(&load_ops, &run.finals, None);
    if !writes.lost.is_empty() {
        problems.push(format!("{} acknowledged writes lost", writes.lost.len()));
    }
    if !writes.unverified_keys.is_empty() && down.is_none() {
        problems.push(format!(
            "{} keys could not be read back",
            writes.unverified_keys.len()
        ));
    }

    let lin = linearizability::check(
        &run.ops,
        &CheckConfig {
            time_budget: Duration::from_secs(60),
            ..CheckConfig::default()
        },
    );
    match lin.overall {
        Overall::Linearizable => {}
        Overall::NotLinearizable => problems.push(format!(
            "the history is not linearizable ({} keys)",
            lin.keys_not_linearizable
        )),
        Overall::Incomplete => problems.push(format!(
            "linearizability undecided for {} keys",
            lin.keys_not_checked
        )),
    }
    let keys_not_linearizable = lin
        .keys
        .iter()
        .filter(|k| k.verdict == KeyVerdict::NotLinearizable)
        .map(|k| k.key.clone())
        .collect();

    let primaries = run.events.primaries_per_view();
    for (view, names) in &primaries {
        if names.len() > 1 {
            problems.push(format!(
                "view {view} had {} primaries: {}",
                names.len(),
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }

    let mut steps = Vec::new();
    let mut diverged = Vec::new();
    for (server, list) in &run.events.0 {
        for e in list {
            let what = match &e.event {
                ServerEvent::FailureDetected { .. } => "failure_detected",
                ServerEvent::Tas { won: true, .. } => "won",
                ServerEvent::Live { .. } => "live",
                ServerEvent::Lost { .. } => "lost",
                ServerEvent::Deposed { .. } => "deposed",
                ServerEvent::Diverged { .. } => {
                    diverged.push(server.clone());
                    "diverged"
                }
                _ => continue,
            };
            steps.push(Step {
                t_ms: ms_of(e.t_ns),
                server: server.clone(),
                what: what.into(),
            });
        }
    }
    steps.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    for (name, how) in &run.exits {
        if how == "exit code 3" && !diverged.contains(name) {
            diverged.push(name.clone());
        }
    }
    if !diverged.is_empty() {
        problems.push(format!("diverged: {}", diverged.join(", ")));
    }
    // A named backup that never got a complete state exits 1 when its
    // primary dies or falls silent before or during the transfer
    // (`transfer_failed`; "holds no state to take over with" when the
    // primary's log channel never answered; a dead primary's proxy that
    // closes at once): by design, not a failure, since it never held
    // anything to lose; what it costs the VM, the liveness and
    // re-protection checks see.
    let stateless_exit = |name: &str| {
        let events = run.events.of(name);
        let restored = events
            .iter()
            .any(|e| matches!(e.event, ServerEvent::Restored { .. }));
        let failed = events
            .iter()
            .any(|e| matches!(e.event, ServerEvent::TransferFailed { .. }));
        failed || !restored
    };
    for (name, how) in &run.exits {
        let ours = run.killed.contains(name) && how == "killed by SIGKILL";
        let joiner = how == "exit code 1" && stateless_exit(name);
        if !ours && !joiner && !EXPLAINED_EXITS.contains(&how.as_str()) && how != "exit code 3" {
            problems.push(format!("{name} ended with {how}"));
        }
    }

    // A joining backup never goes live without a complete state: every
    // server that went live restored a state first, and a primary had
    // reported it protected by that server.
    for (server, list) in &run.events.0 {
        let Some(live) = list
            .iter()
            .find(|e| matches!(e.event, ServerEvent::Live { .. }))
        else {
            continue;
        };
        let restored = list
            .iter()
            .any(|e| e.t_ns <= live.t_ns && matches!(e.event, ServerEvent::Restored { .. }));
        let vouched = run.events.0.iter().any(|(_, other)| {
            other.iter().any(|e| {
                e.t_ns <= live.t_ns
                    && matches!(&e.event, ServerEvent::Protected { backup, .. } if backup == server)
            })
        });
        if !restored || !vouched {
            problems.push(format!(
                "{server} went live without a complete state ({})",
                if restored {
                    "no primary reported it protected"
                } else {
                    "it restored no state"
                }
            ));
        }
    }
    if let Some(d) = down {
        // Nobody serves after the only server with the state died: a
        // server going live after the kill would be serving a state it
        // never had complete.
        for (server, list) in &run.events.0 {
            if list
                .iter()
                .any(|e| e.t_ns > d.t_ns && matches!(e.event, ServerEvent::Live { .. }))
            {
                problems.push(format!(
                    "{server} went live after the primary {} died mid-transfer",
                    d.primary
                ));
            }
        }
    }

    let bound = liveness_bound(failure_timeout_ms).as_secs_f64() * 1000.0;
    let live_again_ms = load_ops
        .iter()
        .filter_map(|o| o.completed_ns)
        .filter(|t| *t >= run.healed_ns)
        .min()
        .map(|t| (t - run.healed_ns) as f64 / 1e6);
    match live_again_ms {
        _ if down.is_some() => {}
        Some(ms) if ms <= bound => {}
        Some(ms) => problems.push(format!(
            "live again {ms:.0} ms after the last fault healed, past the bound of {bound:.0} ms"
        )),
        None => problems.push("no client was answered after the last fault healed".into()),
    }
    let reprotect_bound_ms = run.reprotect_bound.as_secs_f64() * 1000.0;
    if run.reprotected_ms == Some(None) {
        problems.push(format!(
            "not protected again within {:.1} s of the last heal, with a spare at hand",
            reprotect_bound_ms / 1000.0
        ));
    }
    problems.extend(run.client_failures.iter().cloned());

    let mut replies_by_server: BTreeMap<String, u64> = BTreeMap::new();
    for op in load_ops.iter().filter(|o| o.acknowledged()) {
        let name = op
            .server
            .and_then(|s| run.names.get(&s).cloned())
            .unwrap_or_else(|| "unknown".into());
        *replies_by_server.entry(name).or_default() += 1;
    }
    TrialReport {
        seed: run.schedule.seed,
        passed: problems.is_empty(),
        problems,
        faults: run.schedule.faults.clone(),
        injected: run.injected.clone(),
        steps,
        load_s: (run.end_ns.saturating_sub(run.start_ns)) as f64 / 1e9,
        ops_completed: load_ops.iter().filter(|o| o.acknowledged()).count() as u64,
        ops_unknown: load_ops.iter().filter(|o| !o.acknowledged()).count() as u64,
        writes_acknowledged: writes.acknowledged,
        writes_checked: writes.checked,
        lost_writes: writes.lost,
        linearizability: lin.summary(),
        keys_not_linearizable,
        primaries_per_view: primaries,
        diverged,
        live_again_ms,
        liveness_bound_ms: bound,
        reprotected_ms: run.reprotected_ms,
        reprotect_bound_ms,
        skipped: run.skipped.clone(),
        strikes: run.strikes.clone(),
        down_by_design: down.is_some(),
        final_view: run.final_view.as_ref().map(ToString::to_string),
        clients_gave_up: run.gave_up,
        exits: run.exits.clone(),
        replies_by_server,
        datagrams: run.datagrams,
        dir: run.dir.display().to_string(),
    }
}
