//! The demo's live status line: the arbiter's view, what each server last
//! reported (a state transfer under way, too), and the replies so far.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::{Arbiter, ArbiterAddr, View};

use super::args::DemoArgs;
use super::kills::mib;
use super::servers::Servers;
use crate::launcher::{describe_exit, Process};
use ftvm_core::host::events::{EventRecord, ServerEvent, ServerRole};

pub(super) struct Status<'a> {
    args: &'a DemoArgs,
    /// None if its client could not be started: the line says so.
    arbiter: Option<Arc<dyn Arbiter>>,
    start: Instant,
    last: std::cell::Cell<(Instant, u64)>,
}

impl<'a> Status<'a> {
    pub(super) fn new(args: &'a DemoArgs, arbiter: &ArbiterAddr, start: Instant) -> Status<'a> {
        Status {
            args,
            arbiter: arbiter::connect(arbiter, Duration::from_millis(200)).ok(),
            start,
            last: std::cell::Cell::new((start, 0)),
        }
    }

    /// One line: the arbiter's view, each server's last status (a state
    /// transfer under way: its round and the MiB sent), and the clients'
    /// replies so far and per second since the last line.
    pub(super) fn print(&self, servers: &mut Servers, completed: u64) {
        let now = Instant::now();
        let view = self
            .arbiter
            .as_ref()
            .and_then(|a| a.query(&self.args.vm_id).ok());
        let mut parts = vec![view
            .as_ref()
            .map_or("arbiter unreachable".to_owned(), View::to_string)];
        let backup = view
            .as_ref()
            .and_then(|v| v.backup.as_ref())
            .map(|b| b.id.clone());
        for p in servers.all_mut() {
            let name = p.name().to_owned();
            if let Some(status) = p.exited() {
                parts.push(format!("{name} {}", describe_exit(status)));
                continue;
            }
            parts.push(describe(&name, p, backup.as_deref()));
        }
        let (then, before) = self.last.get();
        let secs = now.duration_since(then).as_secs_f64().max(1e-3);
        parts.push(format!(
            "{completed} replies ({:.0}/s)",
            completed.saturating_sub(before) as f64 / secs
        ));
        self.last.set((now, completed));
        println!(
            "{:>6.1} s  {}",
            now.duration_since(self.start).as_secs_f64(),
            parts.join(" | ")
        );
    }
}

/// A state transfer that `events` say is under way: its backup, round and
/// bytes so far. The events name every round as it goes out; the status
/// line, written every 250 ms, would miss most of a transfer this short.
fn transfer_under_way(events: &[EventRecord]) -> Option<(String, u32, u64)> {
    let started = events
        .iter()
        .rposition(|e| matches!(e.event, ServerEvent::TransferStarted { .. }))?;
    let mut under_way = match &events[started].event {
        ServerEvent::TransferStarted { backup, .. } => (backup.clone(), 0, 0),
        _ => return None,
    };
    for e in &events[started + 1..] {
        match e.event {
            ServerEvent::TransferRound { round, bytes, .. } => {
                (under_way.1, under_way.2) = (round, bytes);
            }
            ServerEvent::Protected { .. } | ServerEvent::TransferFailed { .. } => return None,
            _ => {}
        }
    }
    Some(under_way)
}

/// What a running server is doing, from its events and last status line.
fn describe(name: &str, p: &Process, backup: Option<&str>) -> String {
    let events = p.events();
    let Some(s) = events.iter().rev().find_map(|e| match &e.event {
        ServerEvent::Status(s) => Some(s),
        _ => None,
    }) else {
        return format!("{name} starting");
    };
    let round = |round: u32, bytes: u64| format!("round {round}, {:.1} MiB", mib(bytes));
    let sending = transfer_under_way(&events).or_else(|| {
        (s.role == ServerRole::Primary && s.transfer_round > 0).then(|| {
            (
                backup.unwrap_or("a backup").to_owned(),
                s.transfer_round,
                s.transfer_bytes,
            )
        })
    });
    let is_backup = || {
        events.iter().any(|e| {
            matches!(
                e.event,
                ServerEvent::Role {
                    role: ServerRole::Backup,
                    ..
                }
            )
        })
    };
    match s.role {
        ServerRole::Primary => match sending {
            Some((to, r, bytes)) => format!(
                "{name} primary: served {}, sending its state to {to}: {}",
                s.served,
                round(r, bytes)
            ),
            // Lag is the backup's distance behind this primary, so it
            // means nothing while the primary is alone.
            None if backup.is_some() => format!(
                "{name} primary: served {}, backup lag {:.1} ms ({} exits)",
                s.served, s.lag_ms, s.lag_exits
            ),
            None => format!("{name} primary alone: served {}", s.served),
        },
        ServerRole::Backup if s.transfer_round > 0 => format!(
            "{name} joining: {} received",
            round(s.transfer_round, s.transfer_bytes)
        ),
        ServerRole::Backup if is_backup() => format!(
            "{name} backup: replayed {} exits, {} log entries",
            s.exits, s.log_entries
        ),
        ServerRole::Backup => format!("{name} spare"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event: ServerEvent) -> EventRecord {
        EventRecord {
            t_ns: 1,
            server: "vmm2".into(),
            event,
        }
    }

    #[test]
    fn a_transfer_is_under_way_from_its_start_to_its_end() {
        let mut events = vec![record(ServerEvent::TransferStarted {
            view: 4,
            backup: "vmm3".into(),
        })];
        assert_eq!(transfer_under_way(&events), Some(("vmm3".into(), 0, 0)));
        events.push(record(ServerEvent::TransferRound {
            view: 4,
            round: 2,
            pages: 10,
            bytes: 3 << 20,
        }));
        assert_eq!(
            transfer_under_way(&events),
            Some(("vmm3".into(), 2, 3 << 20))
        );
        events.push(record(ServerEvent::TransferFailed {
            view: 4,
            detail: "gone".into(),
        }));
        assert_eq!(transfer_under_way(&events), None);
        assert_eq!(transfer_under_way(&[]), None);
    }
}
