//! What the demo makes of its run, once it is over: each failure's
//! timeline and the state transfer that protected the VM again, from the
//! servers' events; the acknowledged writes checked against the values read
//! back; the counts, the throughput, and the verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use arbiter::View;

use super::args::FIRST;
use super::kills::{mib, Kill, Planned, Target};
use super::load::{FinalValues, Load};
use super::report::{
    EtcdLeaderKill, Failure, FtPhase, LostWrite, OpCounts, Protection, Takeover, Throughput,
    WriteCheck,
};
use crate::history::{self, HistoryOp, OpKind};
use crate::launcher::ClusterEvents;
use crate::linearizability::{self, KeyVerdict, Overall};
use crate::timeline::{Marker, Span};
use ftvm_core::host::events::{ServerEvent, ServerRole, Status as ServerStatus};

/// The first primary's last status line before the first kill.
pub(super) fn ft_phase(events: &ClusterEvents, kill_ns: Option<u64>) -> FtPhase {
    let last = events
        .of(FIRST)
        .iter()
        .filter(|e| kill_ns.is_none_or(|k| e.t_ns <= k))
        .rev()
        .find_map(|e| match &e.event {
            ServerEvent::Status(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| ServerStatus::zero(ServerRole::Primary));
    FtPhase {
        lag_p50_ms: last.lag_p50_ms,
        lag_p99_ms: last.lag_p99_ms,
        lag_max_ms: last.lag_max_ms,
        output_hold_p50_ms: last.output_hold_p50_ms,
        output_hold_p99_ms: last.output_hold_p99_ms,
    }
}

fn ms_after(t: u64, kill: u64) -> f64 {
    (t as f64 - kill as f64) / 1e6
}

/// Replies per second completed in `[from, to)`.
fn rate(ops: &[&HistoryOp], from: u64, to: u64) -> f64 {
    if to <= from {
        return 0.0;
    }
    let n = ops
        .iter()
        .filter_map(|o| o.completed_ns)
        .filter(|t| (from..to).contains(t))
        .count();
    n as f64 / ((to - from) as f64 / 1e9)
}

/// Every state transfer that completed, in the order the primaries
/// reported them: from a `transfer_started` to the `protected` naming the
/// same backup. `after_ms` is the transfer's own length here; a failure's
/// counts from its kill instead. The clients' throughput is given for
/// transfers within `load` (start and end, Unix ns) only.
pub(super) fn protections(
    events: &ClusterEvents,
    ops: &[&HistoryOp],
    load: (u64, u64),
) -> Vec<Protection> {
    let mut out = Vec::new();
    for (name, list) in &events.0 {
        let mut started: BTreeMap<&str, u64> = BTreeMap::new();
        for e in list {
            match &e.event {
                ServerEvent::TransferStarted { backup, .. } => {
                    started.insert(backup, e.t_ns);
                }
                ServerEvent::Protected {
                    backup,
                    rounds,
                    pages,
                    bytes,
                    pause_ms,
                    transfer_ms,
                    ..
                } => {
                    let started_unix_ns = started.remove(backup.as_str());
                    out.push(Protection {
                        primary: name.clone(),
                        backup: backup.clone(),
                        after_ms: *transfer_ms,
                        started_unix_ns,
                        protected_unix_ns: e.t_ns,
                        rounds: *rounds,
                        pages: *pages,
                        bytes: *bytes,
                        pause_ms: *pause_ms,
                        transfer_ms: *transfer_ms,
                        ops_per_sec_during_transfer: started_unix_ns
                            .filter(|s| *s < e.t_ns && *s >= load.0 && e.t_ns <= load.1)
                            .map(|s| rate(ops, s, e.t_ns)),
                    });
                }
                _ => {}
            }
        }
    }
    out.sort_by_key(|p| p.protected_unix_ns);
    out
}

/// How the first primary got its first backup, before the load.
pub(super) fn initial_protection(protections: &[Protection]) -> Option<Protection> {
    protections.iter().find(|p| p.primary == FIRST).cloned()
}

/// What followed `kill`, from its survivor's events and the clients'
/// replies; `services` names each server's service address.
pub(super) fn failure(
    kill: &Kill,
    events: &ClusterEvents,
    ops: &[&HistoryOp],
    services: &BTreeMap<String, SocketAddr>,
    protections: &[Protection],
) -> Failure {
    let at = kill.unix_ns;
    let survivor = events.of(&kill.survivor);
    let first = |pred: &dyn Fn(&ServerEvent) -> bool| {
        survivor
            .iter()
            .filter(|e| e.t_ns >= at && pred(&e.event))
            .map(|e| ms_after(e.t_ns, at))
            .next()
    };
    let took_over = kill.target == Target::Primary;
    let service = services.get(&kill.survivor);
    Failure {
        kill: kill.clone(),
        detected_ms: first(&|e| matches!(e, ServerEvent::FailureDetected { .. })),
        test_and_set_won_ms: first(&|e| matches!(e, ServerEvent::Tas { won: true, .. }))
            .filter(|_| took_over),
        live_ms: first(&|e| matches!(e, ServerEvent::Live { .. })).filter(|_| took_over),
        first_reply_ms: ops
            .iter()
            .filter(|o| o.server.is_some() && o.server.as_ref() == service)
            .filter_map(|o| o.completed_ns)
            .filter(|t| *t >= at)
            .min()
            .map(|t| ms_after(t, at)),
        protected_again: protections
            .iter()
            .find(|p| p.primary == kill.survivor && p.protected_unix_ns >= at)
            .map(|p| Protection {
                after_ms: ms_after(p.protected_unix_ns, at),
                ..p.clone()
            }),
    }
}
/// The written values' tokens; see [`Workload`].
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b';').filter(|t| !t.is_empty())
}

/// Finds acknowledged writes that the final value of their key does not
/// reflect, which needs the run's unique values (see [`Workload`]).
///
/// A key's final value is the value of its last put (the base) followed by
/// the appends after it. An acknowledged write is missing from it legally
/// only if the base put could have come after it, i.e. did not complete
/// before the write was invoked. A missing write with no such put is lost.
/// The linearizability check decides the rest; this gives the number.
pub(crate) fn check_writes(
    ops: &[&HistoryOp],
    finals: &FinalValues,
    kill_ns: Option<u64>,
) -> WriteCheck {
    let mut check = WriteCheck::default();
    let mut by_key: BTreeMap<&[u8], Vec<&HistoryOp>> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.is_write()) {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, writes) in by_key {
        let acked: Vec<&HistoryOp> = writes
            .iter()
            .copied()
            .filter(|o| o.acknowledged())
            .collect();
        check.acknowledged += acked.len() as u64;
        check.acknowledged_before_kill += acked
            .iter()
            .filter(|o| kill_ns.is_some_and(|k| o.completed_ns.is_some_and(|c| c < k)))
            .count() as u64;
        let Some(Some(final_value)) = finals.get(key) else {
            check.unverified_keys.push(history::show(key));
            continue;
        };
        check.checked += acked.len() as u64;
        let value = final_value.as_deref().unwrap_or_default();
        let base = tokens(value).next().and_then(|first| {
            writes
                .iter()
                .find(|w| w.kind == OpKind::Put && w.value.strip_suffix(b";") == Some(first))
        });
        let present: BTreeSet<&[u8]> = tokens(value).collect();
        for w in acked {
            let visible = match w.kind {
                OpKind::Put => base.is_some_and(|b| std::ptr::eq(*b, w)),
                _ => tokens(&w.value).all(|t| present.contains(t)),
            };
            let overwritten_later = base.is_some_and(|b| {
                !std::ptr::eq(*b, w) && b.completed_ns.is_none_or(|done| done >= w.invoked_ns)
            });
            if !visible && !overwritten_later {
                check.lost.push(LostWrite {
                    key: history::show(key),
                    kind: w.kind,
                    value: history::show(&w.value),
                    client: w.client,
                    acknowledged_unix_ns: w.completed_ns.unwrap_or_default(),
                    final_value: final_value.as_deref().map(history::show),
                });
            }
        }
    }
    check
}

pub(super) fn op_counts(ops: &[&HistoryOp], load: &Load, final_reads: usize) -> OpCounts {
    let count = |f: &dyn Fn(&HistoryOp) -> bool| ops.iter().filter(|o| f(o)).count() as u64;
    OpCounts {
        invoked: ops.len() as u64,
        completed: count(&|o| o.acknowledged()),
        unknown: count(&|o| !o.acknowledged()),
        gets: count(&|o| o.kind == OpKind::Get),
        puts: count(&|o| o.kind == OpKind::Put),
        appends: count(&|o| o.kind == OpKind::Append),
        refused: load.refused,
        resends: load.resends,
        final_reads: final_reads as u64,
    }
}

pub(super) fn throughput(
    ops: &[&HistoryOp],
    start: u64,
    end: u64,
    failures: &[Failure],
) -> Throughput {
    let first_kill = failures.first().map(|f| f.kill.unix_ns);
    let resumed = failures.last().and_then(|f| {
        f.first_reply_ms
            .map(|ms| f.kill.unix_ns.saturating_add((ms * 1e6) as u64))
    });
    Throughput {
        ops_per_sec_before_kill: first_kill.map_or(0.0, |k| rate(ops, start, k)),
        ops_per_sec_after_failover: resumed.map_or(0.0, |r| rate(ops, r, end)),
        ops_per_sec_overall: rate(ops, start, end),
    }
}

/// The picture's markers: each kill and its steps.
pub(super) fn markers(failures: &[Failure], etcd: Option<&EtcdLeaderKill>) -> Vec<Marker> {
    let mut markers = Vec::new();
    for (i, f) in failures.iter().enumerate() {
        let k = &f.kill;
        markers.push(Marker {
            t_ns: k.unix_ns,
            label: format!("kill {}: {} {} (SIGKILL)", i + 1, k.target.name(), k.victim),
        });
        if let (0, Some(etcd)) = (i, etcd) {
            markers.push(Marker {
                t_ns: etcd.killed_unix_ns,
                label: format!("etcd leader {} killed (SIGKILL)", etcd.killed),
            });
            if let (Some(leader), Some(ms)) = (&etcd.elected, etcd.elected_after_ms) {
                markers.push(Marker {
                    t_ns: etcd.killed_unix_ns.saturating_add((ms * 1e6) as u64),
                    label: format!("etcd leader {leader} elected +{ms:.0} ms"),
                });
            }
        }
        let steps = [
            (f.detected_ms, "failure detected".to_owned()),
            (f.test_and_set_won_ms, "test-and-set won".to_owned()),
            (f.live_ms, format!("{} live", k.survivor)),
            (f.first_reply_ms, format!("first reply from {}", k.survivor)),
            (
                f.protected_again.as_ref().map(|p| p.after_ms),
                "protected again".to_owned(),
            ),
        ];
        for (ms, what) in steps {
            if let Some(ms) = ms {
                markers.push(Marker {
                    t_ns: k.unix_ns.saturating_add_signed((ms * 1e6) as i64),
                    label: format!("{what} +{ms:.0} ms"),
                });
            }
        }
    }
    markers
}

/// The picture's shaded spans: each state transfer that ended during the
/// load.
pub(super) fn spans(protections: &[Protection], start: u64, end: u64) -> Vec<Span> {
    protections
        .iter()
        .filter(|p| (start..=end).contains(&p.protected_unix_ns))
        .map(|p| Span {
            start_ns: p.started_unix_ns.unwrap_or(p.protected_unix_ns),
            end_ns: p.protected_unix_ns,
            label: format!(
                "state transfer {} -> {}: pause {:.1} ms, {:.1} MiB",
                p.primary,
                p.backup,
                p.pause_ms,
                mib(p.bytes)
            ),
        })
        .collect()
}

/// A server's name in the picture's legend, with what it became.
pub(super) fn server_label(
    addr: SocketAddr,
    services: &BTreeMap<String, SocketAddr>,
    failures: &[Failure],
) -> String {
    let Some(name) = services.iter().find(|(_, a)| **a == addr).map(|(n, _)| n) else {
        return addr.to_string();
    };
    let became = failures
        .iter()
        .position(|f| f.kill.target == Target::Primary && f.kill.survivor == *name);
    match became {
        _ if name == FIRST => format!("{name} (first primary) {addr}"),
        Some(i) => format!("{name} (primary after kill {}) {addr}", i + 1),
        None => format!("{name} {addr}"),
    }
}

/// Servers that went live with no kill to take over from: a primary and
/// its backup each took the other for failed (on this machine: a server
/// starved of CPU for longer than the failure timeout), and the backup won
/// test-and-set. Legal, and shown; the demo's checks hold across it.
pub(super) fn unplanned_takeovers(
    events: &ClusterEvents,
    failures: &[Failure],
    start_ns: u64,
) -> Vec<Takeover> {
    // Each primary kill's survivor going live is planned: its first `live`
    // after the kill.
    let planned: BTreeSet<(&str, u64)> = failures
        .iter()
        .filter(|f| f.kill.target == Target::Primary)
        .filter_map(|f| {
            let first_live = events.of(&f.kill.survivor).iter().find(|e| {
                e.t_ns >= f.kill.unix_ns && matches!(e.event, ServerEvent::Live { .. })
            })?;
            Some((f.kill.survivor.as_str(), first_live.t_ns))
        })
        .collect();
    let mut out: Vec<Takeover> = events
        .0
        .iter()
        .flat_map(|(name, list)| list.iter().map(move |e| (name, e)))
        .filter_map(|(name, e)| match e.event {
            ServerEvent::Live { view } if !planned.contains(&(name.as_str(), e.t_ns)) => {
                Some(Takeover {
                    server: name.clone(),
                    view,
                    unix_ns: e.t_ns,
                    at_s: ms_after(e.t_ns, start_ns) / 1e3,
                })
            }
            _ => None,
        })
        .collect();
    out.sort_by_key(|t| t.unix_ns);
    out
}

pub(super) struct Verdict<'a> {
    pub failures: &'a [Failure],
    pub unplanned: &'a [Takeover],
    /// Planned kills that never came (the VM was not protected again in
    /// time for them).
    pub missed: &'a [Planned],
    pub final_view: Option<&'a View>,
    pub writes: &'a WriteCheck,
    pub lin: &'a linearizability::Report,
    pub primaries: &'a BTreeMap<u64, BTreeSet<String>>,
}

pub(super) fn judge(v: &Verdict, problems: &mut Vec<String>) {
    if v.failures.is_empty() {
        problems.push("the primary was never killed".into());
    }
    for p in v.missed {
        problems.push(format!(
            "the kill of the {} planned {:.1} s into the load never came: the VM was not protected again before the load ended",
            p.target.name(),
            p.at_s
        ));
    }
    for (i, f) in v.failures.iter().enumerate() {
        let (n, k) = (i + 1, &f.kill);
        if k.target == Target::Primary && f.live_ms.is_none() {
            problems.push(format!("{} never went live after kill {n}", k.survivor));
        }
        if f.first_reply_ms.is_none() {
            problems.push(format!(
                "no client got a reply from {} after kill {n}",
                k.survivor
            ));
        }
        if f.protected_again.is_none() {
            problems.push(format!(
                "after kill {n} ({} {}) no backup joined {}: the VM was never protected again",
                k.target.name(),
                k.victim,
                k.survivor
            ));
        }
    }
    // Who should be primary at the end: the last kill's survivor, or a
    // server that took over after it without a kill.
    let expected = v
        .failures
        .last()
        .map(|f| (f.kill.unix_ns, f.kill.survivor.as_str()))
        .into_iter()
        .chain(v.unplanned.iter().map(|t| (t.unix_ns, t.server.as_str())))
        .max_by_key(|(t, _)| *t)
        .map(|(_, name)| name);
    if let Some(expected) = expected {
        let now = v
            .final_view
            .and_then(|view| view.primary.as_ref())
            .map(|p| p.id.as_str());
        if now != Some(expected) {
            problems.push(format!(
                "the arbiter's final view names {} as primary, not {expected}",
                now.unwrap_or("nobody")
            ));
        }
    }
    let writes = v.writes;
    if !writes.lost.is_empty() {
        problems.push(format!("{} acknowledged writes lost", writes.lost.len()));
    }
    if !writes.unverified_keys.is_empty() {
        problems.push(format!(
            "{} keys could not be read back: {}",
            writes.unverified_keys.len(),
            writes.unverified_keys.join(", ")
        ));
    }
    match v.lin.overall {
        Overall::Linearizable => {}
        Overall::NotLinearizable => problems.push(format!(
            "the history is not linearizable ({} keys)",
            v.lin.keys_not_linearizable
        )),
        Overall::Incomplete => problems.push(format!(
            "linearizability could not be decided for {} keys",
            v.lin.keys_not_checked
        )),
    }
    for (view, names) in v.primaries {
        if names.len() > 1 {
            problems.push(format!(
                "view {view} had more than one primary: {}",
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
}

/// The per-key list of a passing check is long and says nothing.
pub(super) fn without_passing_keys(mut lin: linearizability::Report) -> linearizability::Report {
    lin.keys.retain(|k| k.verdict != KeyVerdict::Linearizable);
    lin
}

#[cfg(test)]
mod tests {
    use super::super::args::SECOND;
    use super::*;
    use ftvm_core::host::events::EventRecord;
    use serde_json::{json, Value};

    fn write(client: u64, kind: OpKind, v: &str, at: u64, done: Option<u64>) -> HistoryOp {
        HistoryOp {
            client,
            key: b"k".to_vec(),
            kind,
            value: v.as_bytes().to_vec(),
            invoked_ns: at,
            completed_ns: done,
            result: None,
            server: None,
        }
    }

    fn finals(v: Option<&str>) -> FinalValues {
        BTreeMap::from([(b"k".to_vec(), Some(v.map(|v| v.as_bytes().to_vec())))])
    }

    fn lost(ops: &[HistoryOp], f: Option<&str>) -> Vec<String> {
        let refs: Vec<&HistoryOp> = ops.iter().collect();
        check_writes(&refs, &finals(f), Some(15))
            .lost
            .into_iter()
            .map(|l| l.value)
            .collect()
    }

    #[test]
    fn final_value_reflecting_every_write_loses_nothing() {
        let ops = [
            write(1, OpKind::Append, "a1.1;", 0, Some(1)),
            write(1, OpKind::Put, "p1.2;", 2, Some(3)),
            write(2, OpKind::Append, "a2.1;", 4, Some(5)),
            write(1, OpKind::Append, "a1.3;", 6, Some(7)),
        ];
        assert!(lost(&ops, Some("p1.2;a2.1;a1.3;")).is_empty());
        let refs: Vec<&HistoryOp> = ops.iter().collect();
        let check = check_writes(&refs, &finals(Some("p1.2;a2.1;a1.3;")), Some(5));
        assert_eq!((check.acknowledged, check.checked), (4, 4));
        assert_eq!(check.acknowledged_before_kill, 2);
    }

    #[test]
    fn missing_append_after_the_last_put_is_lost() {
        let ops = [
            write(1, OpKind::Put, "p1.1;", 0, Some(1)),
            write(2, OpKind::Append, "a2.1;", 2, Some(3)),
            write(1, OpKind::Append, "a1.2;", 4, Some(5)),
        ];
        assert_eq!(lost(&ops, Some("p1.1;a1.2;")), ["a2.1;"]);
    }

    #[test]
    fn write_overwritten_by_a_concurrent_or_later_put_is_not_lost() {
        let ops = [
            write(1, OpKind::Append, "a1.1;", 0, Some(10)),
            write(2, OpKind::Put, "p2.1;", 5, Some(6)),
            write(3, OpKind::Put, "p3.1;", 1, Some(2)),
        ];
        assert!(lost(&ops, Some("p2.1;")).is_empty());
    }

    #[test]
    fn put_superseded_by_an_earlier_put_is_lost() {
        let ops = [
            write(1, OpKind::Put, "p1.1;", 0, Some(1)),
            write(2, OpKind::Put, "p2.1;", 2, Some(3)),
        ];
        assert_eq!(lost(&ops, Some("p1.1;")), ["p2.1;"]);
        assert_eq!(lost(&ops, None), ["p1.1;", "p2.1;"]);
    }

    #[test]
    fn unknown_outcome_put_may_be_the_base() {
        let ops = [
            write(1, OpKind::Put, "p1.1;", 0, Some(1)),
            write(2, OpKind::Put, "p2.1;", 2, None),
        ];
        assert!(lost(&ops, Some("p2.1;")).is_empty());
        assert!(lost(&ops, Some("p1.1;")).is_empty());
    }

    #[test]
    fn unread_key_is_unverified_not_lost() {
        let ops = [write(1, OpKind::Put, "p1.1;", 0, Some(1))];
        let refs: Vec<&HistoryOp> = ops.iter().collect();
        let check = check_writes(&refs, &BTreeMap::from([(b"k".to_vec(), None)]), None);
        assert!(check.lost.is_empty());
        assert_eq!(check.unverified_keys, ["k"]);
        assert_eq!(check.checked, 0);
    }

    /// Events as the servers write them: JSON lines read back through
    /// the one event type.
    fn events(list: Vec<Value>) -> ClusterEvents {
        let records = list
            .into_iter()
            .map(|line| serde_json::from_value::<EventRecord>(line).expect("an event line"));
        let (a, b): (Vec<_>, Vec<_>) = records.partition(|e| e.server == FIRST);
        ClusterEvents(vec![(FIRST.into(), a), (SECOND.into(), b)])
    }

    fn kill(target: Target, victim: &str, survivor: &str, unix_ns: u64) -> Kill {
        Kill {
            target,
            victim: victim.into(),
            pid: 1,
            at_s: 5.0,
            unix_ns,
            delayed_ms: 0.0,
            view: 2,
            survivor: survivor.into(),
            restarted_as: Some("vmm4".into()),
        }
    }

    #[test]
    fn failover_steps_and_protection_are_read_from_the_survivor_events() {
        let kill_ns = 1_000_000_000u64;
        let ms = |m: u64| kill_ns + m * 1_000_000;
        let ev = events(vec![
            json!({"t_ns": 100, "event": "role", "role": "primary", "view": 2, "server": FIRST}),
            json!({"t_ns": 150, "event": "transfer_started", "view": 2, "backup": SECOND, "server": FIRST}),
            json!({"t_ns": 190, "event": "protected", "view": 2, "backup": SECOND, "rounds": 2, "pages": 300, "bytes": 1_300_000, "pause_ms": 2.5, "transfer_ms": 40.0, "server": FIRST}),
            json!({"t_ns": 200, "event": "role", "role": "backup", "view": 2, "server": SECOND}),
            json!({"t_ns": ms(301), "event": "failure_detected", "peer": "primary", "detail": "silent", "server": SECOND}),
            json!({"t_ns": ms(303), "event": "tas", "view": 2, "won": true, "server": SECOND}),
            json!({"t_ns": ms(305), "event": "live", "view": 3, "server": SECOND}),
            json!({"t_ns": ms(600), "event": "transfer_started", "view": 4, "backup": "vmm3", "server": SECOND}),
            json!({"t_ns": ms(650), "event": "transfer_round", "view": 4, "round": 1, "pages": 500, "bytes": 2_100_000, "server": SECOND}),
            json!({"t_ns": ms(700), "event": "protected", "view": 4, "backup": "vmm3", "rounds": 3, "pages": 520, "bytes": 2_200_000, "pause_ms": 3.0, "transfer_ms": 100.0, "server": SECOND}),
        ]);
        let service: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let services = BTreeMap::from([(SECOND.to_owned(), service)]);
        let mut reply = write(1, OpKind::Put, "p", ms(400), Some(ms(410)));
        reply.server = Some(service);
        let during = write(1, OpKind::Get, "", ms(640), Some(ms(650)));
        let ops = [&reply, &during];
        let all = protections(&ev, &ops, (0, ms(1000)));
        assert_eq!(all.len(), 2);
        let initial = initial_protection(&all).expect("the first pair's transfer");
        assert_eq!(
            (initial.backup.as_str(), initial.started_unix_ns),
            (SECOND, Some(150))
        );
        let k = kill(Target::Primary, FIRST, SECOND, kill_ns);
        let f = failure(&k, &ev, &ops, &services, &all);
        assert_eq!(f.detected_ms, Some(301.0));
        assert_eq!(f.test_and_set_won_ms, Some(303.0));
        assert_eq!(f.live_ms, Some(305.0));
        assert_eq!(f.first_reply_ms, Some(410.0));
        let p = f.protected_again.as_ref().expect("protected again");
        assert_eq!((p.primary.as_str(), p.backup.as_str()), (SECOND, "vmm3"));
        assert_eq!((p.after_ms, p.pause_ms, p.bytes), (700.0, 3.0, 2_200_000));
        // One reply in the 100 ms the transfer took.
        assert_eq!(p.ops_per_sec_during_transfer, Some(10.0));
        assert_eq!(
            super::super::report::protection_line(p),
            "protected again after 700 ms (pause 3.0 ms, 2.1 MiB sent)"
        );
        let failures = [f];
        let labels: Vec<String> = markers(&failures, None)
            .into_iter()
            .map(|m| m.label)
            .collect();
        assert_eq!(
            labels,
            [
                "kill 1: primary vmm1 (SIGKILL)",
                "failure detected +301 ms",
                "test-and-set won +303 ms",
                "vmm2 live +305 ms",
                "first reply from vmm2 +410 ms",
                "protected again +700 ms"
            ]
        );
        let spans = spans(&all, ms(0), ms(1000));
        assert_eq!(
            spans.len(),
            1,
            "the first pair's transfer was before the load"
        );
        assert_eq!((spans[0].start_ns, spans[0].end_ns), (ms(600), ms(700)));
        assert_eq!(
            server_label(service, &services, &failures),
            "vmm2 (primary after kill 1) 127.0.0.1:9"
        );
        let etcd = EtcdLeaderKill {
            killed: "etcd1".into(),
            killed_unix_ns: kill_ns + 2_000_000,
            elected: Some("etcd2".into()),
            elected_after_ms: Some(1250.0),
        };
        let labels: Vec<String> = markers(&failures, Some(&etcd))
            .into_iter()
            .map(|m| m.label)
            .take(3)
            .collect();
        assert_eq!(
            labels,
            [
                "kill 1: primary vmm1 (SIGKILL)",
                "etcd leader etcd1 killed (SIGKILL)",
                "etcd leader etcd2 elected +1250 ms"
            ]
        );
        assert!(unplanned_takeovers(&ev, &failures, 0).is_empty());
        let primaries = ev.primaries_per_view();
        assert_eq!(primaries.len(), 2);
        assert!(primaries.values().all(|n| n.len() == 1));
        assert_eq!(primaries[&3], BTreeSet::from([SECOND.to_owned()]));
    }

    #[test]
    fn a_failure_without_takeover_or_protection_is_judged() {
        let kill_ns = 1_000_000_000u64;
        let ev = events(vec![
            json!({"t_ns": kill_ns + 5, "event": "failure_detected", "peer": "backup", "detail": "closed", "server": FIRST}),
        ]);
        let services = BTreeMap::new();
        let backup_kill = failure(
            &kill(Target::Backup, SECOND, FIRST, kill_ns),
            &ev,
            &[],
            &services,
            &[],
        );
        assert!(backup_kill.detected_ms.is_some());
        assert_eq!(backup_kill.test_and_set_won_ms, None);
        let primary_kill = failure(
            &kill(Target::Primary, FIRST, SECOND, kill_ns),
            &ev,
            &[],
            &services,
            &[],
        );
        let lin = linearizability::check(&[], &linearizability::CheckConfig::default());
        let mut problems = Vec::new();
        let missed = [Planned {
            at_s: 9.0,
            target: Target::Primary,
        }];
        judge(
            &Verdict {
                failures: &[primary_kill, backup_kill],
                unplanned: &[],
                missed: &missed,
                final_view: None,
                writes: &WriteCheck::default(),
                lin: &lin,
                primaries: &BTreeMap::new(),
            },
            &mut problems,
        );
        let all = problems.join("\n");
        for needle in [
            "planned 9.0 s into the load never came",
            "vmm2 never went live after kill 1",
            "no client got a reply from vmm2 after kill 1",
            "the VM was never protected again",
            "final view names nobody as primary, not vmm1",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
    }

    #[test]
    fn a_takeover_without_a_kill_is_shown_and_expected_primary_at_the_end() {
        let kill_ns = 1_000_000_000u64;
        let ev = events(vec![
            json!({"t_ns": kill_ns + 5, "event": "live", "view": 3, "server": SECOND}),
            json!({"t_ns": kill_ns + 9_000_000, "event": "live", "view": 5, "server": FIRST}),
        ]);
        let services = BTreeMap::new();
        let failures = [failure(
            &kill(Target::Primary, "vmm0", SECOND, kill_ns),
            &ev,
            &[],
            &services,
            &[],
        )];
        let unplanned = unplanned_takeovers(&ev, &failures, kill_ns);
        assert_eq!(unplanned.len(), 1, "{unplanned:?}");
        assert_eq!(
            (unplanned[0].server.as_str(), unplanned[0].view),
            (FIRST, 5)
        );
        assert_eq!(unplanned[0].at_s, 0.009);
        let lin = linearizability::check(&[], &linearizability::CheckConfig::default());
        let member = |id: &str| arbiter::Member {
            id: id.into(),
            service_addr: "127.0.0.1:9".parse().unwrap(),
            log_addr: None,
        };
        let judged = |primary: &str| {
            let view = View {
                number: 6,
                primary: Some(member(primary)),
                backup: None,
            };
            let mut problems = Vec::new();
            judge(
                &Verdict {
                    failures: &failures,
                    unplanned: &unplanned,
                    missed: &[],
                    final_view: Some(&view),
                    writes: &WriteCheck::default(),
                    lin: &lin,
                    primaries: &BTreeMap::new(),
                },
                &mut problems,
            );
            problems.join("\n")
        };
        assert!(!judged(FIRST).contains("final view"), "{}", judged(FIRST));
        assert!(judged(SECOND).contains("names vmm2 as primary, not vmm1"));
    }

    #[test]
    fn two_primaries_in_one_view_are_found() {
        let ev = events(vec![
            json!({"t_ns": 1, "event": "role", "role": "primary", "view": 3, "server": FIRST}),
            json!({"t_ns": 2, "event": "tas", "view": 2, "won": true, "server": SECOND}),
            serde_json::to_value(EventRecord {
                t_ns: 3,
                server: SECOND.into(),
                event: ServerEvent::Status(ServerStatus {
                    view: 2,
                    ..ServerStatus::zero(ServerRole::Primary)
                }),
            })
            .expect("a status line"),
        ]);
        let primaries = ev.primaries_per_view();
        assert_eq!(primaries.len(), 1);
        assert_eq!(primaries[&3].len(), 2);
    }
}
