//! The demo's live status line: the arbiter's view, what each server last
//! reported, and the replies so far.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::{Arbiter, ArbiterAddr, View};

use super::args::DemoArgs;
use crate::launcher::{describe_exit, Cluster};
use ftvm_core::host::events::ServerRole;

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

    /// One line: the arbiter's view, each server's last status, and the
    /// clients' replies so far and per second since the last line.
    pub(super) fn print(&self, cluster: &mut Cluster, completed: u64) {
        let now = Instant::now();
        let view = self
            .arbiter
            .as_ref()
            .and_then(|a| a.query(&self.args.vm_id).ok());
        let mut parts = vec![view
            .as_ref()
            .map_or("arbiter unreachable".to_owned(), View::to_string)];
        let has_backup = view.is_some_and(|v| v.backup.is_some());
        for p in [&mut cluster.primary, &mut cluster.backup] {
            let name = p.name().to_owned();
            if let Some(status) = p.exited() {
                parts.push(format!("{name} {}", describe_exit(status)));
                continue;
            }
            let Some(s) = p.last_status() else {
                parts.push(format!("{name} starting"));
                continue;
            };
            parts.push(match s.role {
                // Lag is the backup's distance behind this primary, so it
                // means nothing once the primary is alone.
                ServerRole::Primary if has_backup => format!(
                    "{name} primary: served {}, backup lag {:.1} ms ({} exits)",
                    s.served, s.lag_ms, s.lag_exits
                ),
                ServerRole::Primary => format!("{name} primary alone: served {}", s.served),
                ServerRole::Backup => format!(
                    "{name} backup: replayed {} exits, {} log entries",
                    s.exits, s.log_entries
                ),
            });
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
