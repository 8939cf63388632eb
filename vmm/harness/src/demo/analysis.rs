//! What the demo makes of its run, once it is over: the failover timeline
//! from the events, the acknowledged writes checked against the values read
//! back, the counts, the throughput, and the verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use arbiter::View;

use super::args::{FIRST, SECOND};
use super::load::{FinalValues, Load};
use super::report::{
    Addresses, EtcdLeaderKill, Failover, FtPhase, LostWrite, OpCounts, Throughput, WriteCheck,
};
use crate::history::{self, HistoryOp, OpKind};
use crate::launcher::ClusterEvents;
use crate::linearizability::{self, KeyVerdict, Overall};
use crate::timeline::Marker;
use ftvm_core::host::events::{ServerEvent, ServerRole, Status as ServerStatus};

/// The first primary's last status line before the kill.
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

pub(super) fn failover_timeline(
    kill_ns: Option<u64>,
    events: &ClusterEvents,
    ops: &[&HistoryOp],
    new_primary_service: SocketAddr,
    view_before: u64,
    final_view: Option<&View>,
) -> Failover {
    let mut f = Failover {
        kill_unix_ns: kill_ns,
        view_before: Some(view_before),
        view_after: final_view.map(|v| v.number),
        primary_after: final_view
            .and_then(|v| v.primary.as_ref())
            .map(|p| p.id.clone()),
        ..Failover::default()
    };
    let Some(kill) = kill_ns else { return f };
    let backup = events.of(SECOND);
    let first = |pred: &dyn Fn(&ServerEvent) -> bool| {
        backup
            .iter()
            .filter(|e| pred(&e.event))
            .map(|e| e.t_ns)
            .find(|t| *t >= kill)
            .map(|t| ms_after(t, kill))
    };
    f.detected_ms = first(&|e| matches!(e, ServerEvent::FailureDetected { .. }));
    f.test_and_set_won_ms = first(&|e| matches!(e, ServerEvent::Tas { won: true, .. }));
    f.live_ms = first(&|e| matches!(e, ServerEvent::Live { .. }));
    f.first_reply_ms = ops
        .iter()
        .filter(|o| o.server == Some(new_primary_service))
        .filter_map(|o| o.completed_ns)
        .filter(|t| *t >= kill)
        .min()
        .map(|t| ms_after(t, kill));
    f
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
    kill: Option<u64>,
    failover: &Failover,
) -> Throughput {
    let rate = |from: u64, to: u64| {
        if to <= from {
            return 0.0;
        }
        let n = ops
            .iter()
            .filter_map(|o| o.completed_ns)
            .filter(|t| (from..to).contains(t))
            .count();
        n as f64 / ((to - from) as f64 / 1e9)
    };
    let resumed = kill
        .zip(failover.first_reply_ms)
        .map(|(k, ms)| k + (ms * 1e6) as u64);
    Throughput {
        ops_per_sec_before_kill: kill.map_or(0.0, |k| rate(start, k)),
        ops_per_sec_after_failover: resumed.map_or(0.0, |r| rate(r, end)),
        ops_per_sec_overall: rate(start, end),
    }
}

pub(super) fn markers(f: &Failover, etcd: Option<&EtcdLeaderKill>) -> Vec<Marker> {
    let Some(kill) = f.kill_unix_ns else {
        return Vec::new();
    };
    let mut markers = vec![Marker {
        t_ns: kill,
        label: "primary killed (SIGKILL)".into(),
    }];
    if let Some(etcd) = etcd {
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
        (f.detected_ms, "failure detected"),
        (f.test_and_set_won_ms, "test-and-set won"),
        (f.live_ms, "backup live"),
        (f.first_reply_ms, "first reply from the new primary"),
    ];
    for (ms, what) in steps {
        if let Some(ms) = ms {
            markers.push(Marker {
                t_ns: kill.saturating_add_signed((ms * 1e6) as i64),
                label: format!("{what} +{ms:.0} ms"),
            });
        }
    }
    markers
}

pub(super) fn server_label(addr: SocketAddr, a: &Addresses) -> String {
    if addr == a.first_primary_service {
        format!("{FIRST} (first primary) {addr}")
    } else if addr == a.backup_service {
        format!("{SECOND} (backup, then primary) {addr}")
    } else {
        addr.to_string()
    }
}

pub(super) fn judge(
    f: &Failover,
    writes: &WriteCheck,
    lin: &linearizability::Report,
    primaries: &BTreeMap<u64, BTreeSet<String>>,
    problems: &mut Vec<String>,
) {
    if f.kill_unix_ns.is_none() {
        problems.push("the primary was never killed".into());
    }
    if f.live_ms.is_none() {
        problems.push(format!("{SECOND} never went live after the kill"));
    }
    if f.primary_after.as_deref() != Some(SECOND) {
        problems.push(format!(
            "the arbiter's final view names {} as primary, not {SECOND}",
            f.primary_after.as_deref().unwrap_or("nobody")
        ));
    }
    if f.first_reply_ms.is_none() {
        problems.push("no client got a reply from the new primary".into());
    }
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
    match lin.overall {
        Overall::Linearizable => {}
        Overall::NotLinearizable => problems.push(format!(
            "the history is not linearizable ({} keys)",
            lin.keys_not_linearizable
        )),
        Overall::Incomplete => problems.push(format!(
            "linearizability could not be decided for {} keys",
            lin.keys_not_checked
        )),
    }
    for (view, names) in primaries {
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

    #[test]
    fn failover_steps_are_read_from_the_backup_events() {
        let kill = 1_000_000_000u64;
        let ev = events(vec![
            json!({"t_ns": 100, "event": "role", "role": "primary", "view": 2, "server": FIRST}),
            json!({"t_ns": 200, "event": "role", "role": "backup", "view": 2, "server": SECOND}),
            json!({"t_ns": kill + 301_000_000, "event": "failure_detected", "peer": "primary", "detail": "silent", "server": SECOND}),
            json!({"t_ns": kill + 303_000_000, "event": "tas", "view": 2, "won": true, "server": SECOND}),
            json!({"t_ns": kill + 305_000_000, "event": "live", "view": 3, "server": SECOND}),
        ]);
        let service: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut reply = write(
            1,
            OpKind::Put,
            "p",
            kill + 400_000_000,
            Some(kill + 410_000_000),
        );
        reply.server = Some(service);
        let ops = [&reply];
        let f = failover_timeline(Some(kill), &ev, &ops, service, 2, None);
        assert_eq!(f.detected_ms, Some(301.0));
        assert_eq!(f.test_and_set_won_ms, Some(303.0));
        assert_eq!(f.live_ms, Some(305.0));
        assert_eq!(f.first_reply_ms, Some(410.0));
        let labels: Vec<String> = markers(&f, None).into_iter().map(|m| m.label).collect();
        assert_eq!(
            labels,
            [
                "primary killed (SIGKILL)",
                "failure detected +301 ms",
                "test-and-set won +303 ms",
                "backup live +305 ms",
                "first reply from the new primary +410 ms"
            ]
        );
        let etcd = EtcdLeaderKill {
            killed: "etcd1".into(),
            killed_unix_ns: kill + 2_000_000,
            elected: Some("etcd2".into()),
            elected_after_ms: Some(1250.0),
        };
        let labels: Vec<String> = markers(&f, Some(&etcd))
            .into_iter()
            .map(|m| m.label)
            .take(3)
            .collect();
        assert_eq!(
            labels,
            [
                "primary killed (SIGKILL)",
                "etcd leader etcd1 killed (SIGKILL)",
                "etcd leader etcd2 elected +1250 ms"
            ]
        );
        let primaries = ev.primaries_per_view();
        assert_eq!(primaries.len(), 2);
        assert!(primaries.values().all(|n| n.len() == 1));
        assert_eq!(primaries[&3], BTreeSet::from([SECOND.to_owned()]));
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
