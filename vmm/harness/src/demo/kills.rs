//! The demo's kills: when each is due, whom it hits (whoever the arbiter
//! names primary, or backup, at that moment), and the killed server's
//! return as a spare with a new id once its pair has recovered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use arbiter::{Arbiter, ArbiterAddr, View};
use nix::sys::signal::Signal;
use serde::Serialize;

use super::args::{DemoArgs, ARBITER_TIMEOUT};
use super::servers::Servers;
use crate::history::Clock;
use ftvm_core::host::events::{EventRecord, ServerEvent};

/// Which server of the view a kill hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Primary,
    Backup,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Primary => "primary",
            Target::Backup => "backup",
        }
    }
}

/// A kill as planned: due `at_s` seconds into the load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Planned {
    pub at_s: f64,
    pub target: Target,
}

/// `--kills` kills of the primary, then with `--kill-backup` one of the
/// backup, the first at `--kill-at` and the rest `--kill-every` apart
/// (default: the rest of the load shared evenly).
pub(super) fn plan(args: &DemoArgs) -> Result<Vec<Planned>> {
    let mut targets = vec![Target::Primary; args.kills as usize];
    if args.kill_backup {
        targets.push(Target::Backup);
    }
    let every = match args.kill_every {
        Some(e) if e.is_finite() && e > 0.0 => e,
        Some(e) => bail!("--kill-every ({e}) must be a positive number of seconds"),
        None => (args.duration - args.kill_at) / targets.len() as f64,
    };
    let planned: Vec<Planned> = targets
        .into_iter()
        .enumerate()
        .map(|(i, target)| Planned {
            at_s: args.kill_at + every * i as f64,
            target,
        })
        .collect();
    if let Some(last) = planned.last().filter(|p| p.at_s >= args.duration) {
        bail!(
            "the last kill would come {:.1} s into the load, after its end (--duration {}): fewer --kills, a shorter --kill-every or a longer --duration",
            last.at_s,
            args.duration
        );
    }
    Ok(planned)
}

/// A kill as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct Kill {
    pub target: Target,
    pub victim: String,
    pub pid: u32,
    /// Seconds into the load, and ns since the Unix epoch.
    pub at_s: f64,
    pub unix_ns: u64,
    /// How long the kill waited past its planned time for the VM to be
    /// protected again.
    pub delayed_ms: f64,
    /// The arbiter's view just before the kill.
    pub view: u64,
    /// The server expected to serve after it: the backup for a primary
    /// kill, the primary for a backup kill.
    pub survivor: String,
    /// The server started as a spare in the victim's place.
    pub restarted_as: Option<String>,
}

/// How often the killer looks again while it waits for something.
const POLL: Duration = Duration::from_millis(20);
/// How long before a kill the killer starts asking the arbiter for the
/// view, and how often meanwhile: the view changes only by a kill or by a
/// spare named backup, and a kill also needs the primary's `protected`
/// event naming that backup, so the last answer before the kill will do.
const LOOKAHEAD: Duration = Duration::from_secs(1);
const VIEW_FRESH: Duration = Duration::from_millis(250);
/// How long a backup's restart waits for its primary to notice the kill.
const NOTICE_LIMIT: Duration = Duration::from_secs(3);

/// Carries the plan out, one step per call from the demo's main loop (the
/// thread that started the servers, so that a restarted one lives as long
/// as the others).
pub(super) struct Killer {
    plan: Vec<Planned>,
    start: Instant,
    vm_id: String,
    arbiter: Option<Arc<dyn Arbiter>>,
    pub kills: Vec<Kill>,
    /// The last kill's victim is still to come back as a spare.
    restart_pending: bool,
    /// The last kill's survivor has not yet been announced protected again.
    protection_pending: bool,
    /// The arbiter's view, and when it said so.
    view: Option<(Instant, View)>,
}

impl Killer {
    pub(super) fn new(
        plan: Vec<Planned>,
        args: &DemoArgs,
        arbiter: &ArbiterAddr,
        start: Instant,
    ) -> Killer {
        Killer {
            plan,
            start,
            vm_id: args.vm_id.clone(),
            // None: every kill waits for the arbiter and, if it never
            // answers, does not happen; the judge reports it.
            arbiter: arbiter::connect(arbiter, ARBITER_TIMEOUT).ok(),
            kills: Vec::new(),
            restart_pending: false,
            protection_pending: false,
            view: None,
        }
    }

    /// The planned kills that did not happen.
    pub(super) fn missed(&self) -> &[Planned] {
        &self.plan[self.kills.len().min(self.plan.len())..]
    }

    fn next(&self) -> Option<Planned> {
        self.plan.get(self.kills.len()).copied()
    }

    fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Does what is due (a kill, a restart, telling that the VM is
    /// protected again) and says when it wants to be called again.
    pub(super) fn step(
        &mut self,
        servers: &mut Servers,
        clock: &Clock,
        problems: &mut Vec<String>,
    ) -> Instant {
        let now = Instant::now();
        if self.protection_pending {
            self.announce_protection(servers);
        }
        if self.restart_pending {
            self.restart(servers, problems);
            return now + POLL;
        }
        let Some(next) = self.next() else {
            return now
                + if self.protection_pending {
                    POLL
                } else {
                    Duration::from_secs(3600)
                };
        };
        let due = self.start + Duration::from_secs_f64(next.at_s);
        if now < due {
            // The view is asked for ahead, so that the kill need not wait
            // for the arbiter: with --etcd its leader dies at the same
            // moment, and the primary must die with it, not after an
            // election.
            let mut wake = due;
            if due - now <= LOOKAHEAD {
                self.refresh_view(now);
                wake = wake.min(now + VIEW_FRESH / 2);
            }
            if self.protection_pending {
                wake = wake.min(now + POLL);
            }
            return wake;
        }
        // The view asked for ahead is used as it is: asking now could wait
        // for an etcd election. One that does not show the VM protected is
        // asked for again.
        if self.view.is_none() {
            self.refresh_view(now);
        }
        let Some(view) = self.view.as_ref().map(|(_, v)| v.clone()) else {
            return now + POLL;
        };
        let since = self.kills.last().map_or(0, |k| k.unix_ns);
        if !protected(servers, &view, since) {
            self.view = None;
            return now + POLL;
        }
        if let Err(e) = self.kill(next, due, &view, servers, clock) {
            problems.push(format!("{e:#}"));
            // Not again: the plan stops here, and the judge names the
            // kills that did not happen.
            self.plan.truncate(self.kills.len());
        }
        now + POLL
    }

    /// Asks the arbiter for the view unless its last answer is fresh; an
    /// arbiter that does not answer leaves the last answer in place.
    fn refresh_view(&mut self, now: Instant) {
        if self
            .view
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at) < VIEW_FRESH)
        {
            return;
        }
        if let Some(view) = self
            .arbiter
            .as_ref()
            .and_then(|a| a.query(&self.vm_id).ok())
        {
            self.view = Some((Instant::now(), view));
        }
    }

    fn kill(
        &mut self,
        planned: Planned,
        due: Instant,
        view: &View,
        servers: &mut Servers,
        clock: &Clock,
    ) -> Result<()> {
        let (victim, survivor) = match planned.target {
            Target::Primary => (&view.primary, &view.backup),
            Target::Backup => (&view.backup, &view.primary),
        };
        let (Some(victim), Some(survivor)) = (victim, survivor) else {
            bail!("{view} has no {} to kill", planned.target.name());
        };
        let Some(process) = servers.get_mut(&victim.id) else {
            bail!("{view} names {}, which the demo did not start", victim.id);
        };
        let unix_ns = clock.now_ns();
        let at_s = self.seconds();
        process.signal(Signal::SIGKILL)?;
        let kill = Kill {
            target: planned.target,
            victim: victim.id.clone(),
            pid: process.pid(),
            at_s,
            unix_ns,
            delayed_ms: due.elapsed().as_secs_f64() * 1e3,
            view: view.number,
            survivor: survivor.id.clone(),
            restarted_as: None,
        };
        let waited = if kill.delayed_ms >= 100.0 {
            format!(
                " (waited {:.1} s for the VM to be protected again)",
                kill.delayed_ms / 1e3
            )
        } else {
            String::new()
        };
        println!(
            "{at_s:>6.1} s  SIGKILL -> {} ({} of view {}, pid {}){waited}",
            kill.victim,
            planned.target.name(),
            kill.view,
            kill.pid
        );
        self.kills.push(kill);
        // The view changes with the kill.
        self.view = None;
        self.restart_pending = true;
        self.protection_pending = true;
        Ok(())
    }

    /// Once the survivor has taken over (a primary kill: it is live) or
    /// noticed (a backup kill), starts a spare with a new id in the killed
    /// server's place.
    fn restart(&mut self, servers: &mut Servers, problems: &mut Vec<String>) {
        let Some(kill) = self.kills.last() else {
            self.restart_pending = false;
            return;
        };
        let Some(survivor) = servers.get(&kill.survivor) else {
            self.restart_pending = false;
            return;
        };
        let after = |e: &EventRecord| e.t_ns >= kill.unix_ns;
        let ready = match kill.target {
            Target::Primary => survivor
                .events()
                .iter()
                .any(|e| after(e) && matches!(e.event, ServerEvent::Live { .. })),
            Target::Backup => {
                survivor.events().iter().any(|e| {
                    after(e)
                        && matches!(
                            e.event,
                            ServerEvent::FailureDetected { .. } | ServerEvent::PeerLeft { .. }
                        )
                }) || self.seconds() - kill.at_s > NOTICE_LIMIT.as_secs_f64()
            }
        };
        if !ready {
            return;
        }
        self.restart_pending = false;
        let victim = kill.victim.clone();
        match servers.start_spare() {
            Ok(spare) => {
                println!(
                    "{:>6.1} s  {victim} restarted as a spare with a new id: {} (service {}, pid {})",
                    self.seconds(),
                    spare.name(),
                    spare
                        .address()
                        .map_or("?".to_owned(), |a| a.to_string()),
                    spare.pid()
                );
                let name = spare.name().to_owned();
                if let Some(k) = self.kills.last_mut() {
                    k.restarted_as = Some(name);
                }
            }
            Err(e) => problems.push(format!("cannot restart {victim} as a spare: {e:#}")),
        }
    }

    /// Says so once the last kill's survivor is protected again.
    fn announce_protection(&mut self, servers: &Servers) {
        let Some(kill) = self.kills.last() else {
            self.protection_pending = false;
            return;
        };
        let Some(survivor) = servers.get(&kill.survivor) else {
            self.protection_pending = false;
            return;
        };
        let protected = survivor.events().into_iter().find_map(|e| match e.event {
            ServerEvent::Protected {
                backup,
                pause_ms,
                bytes,
                ..
            } if e.t_ns >= kill.unix_ns => Some((e.t_ns, backup, pause_ms, bytes)),
            _ => None,
        });
        if let Some((t_ns, backup, pause_ms, bytes)) = protected {
            self.protection_pending = false;
            println!(
                "{:>6.1} s  {} protected again by {backup} after {:.0} ms (pause {pause_ms:.1} ms, {:.1} MiB sent)",
                self.seconds(),
                kill.survivor,
                t_ns.saturating_sub(kill.unix_ns) as f64 / 1e6,
                mib(bytes)
            );
        }
    }
}

pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// Whether `view`'s primary has a backup that it has brought up to date
/// (a `protected` event naming it, after `since_ns`) and that still runs.
fn protected(servers: &mut Servers, view: &View, since_ns: u64) -> bool {
    let (Some(primary), Some(backup)) = (&view.primary, &view.backup) else {
        return false;
    };
    let Some(p) = servers.get(&primary.id) else {
        return false;
    };
    let confirmed = p.events().iter().any(|e| {
        e.t_ns >= since_ns
            && matches!(&e.event, ServerEvent::Protected { backup: b, .. } if *b == backup.id)
    });
    confirmed && servers.get_mut(&backup.id).is_some_and(|b| b.running())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn args(words: &[&str]) -> DemoArgs {
        Cli::try_parse_from(std::iter::once("demo").chain(words.iter().copied()))
            .expect("valid flags")
            .demo
    }

    #[test]
    fn kills_share_the_rest_of_the_load_evenly() {
        let plan = plan(&args(&[
            "--duration",
            "16",
            "--kill-at",
            "4",
            "--kills",
            "2",
            "--kill-backup",
        ]))
        .expect("a plan");
        let at: Vec<(f64, Target)> = plan.iter().map(|p| (p.at_s, p.target)).collect();
        assert_eq!(
            at,
            [
                (4.0, Target::Primary),
                (8.0, Target::Primary),
                (12.0, Target::Backup)
            ]
        );
    }

    #[test]
    fn kills_past_the_end_of_the_load_are_refused() {
        let e = plan(&args(&[
            "--duration",
            "10",
            "--kill-at",
            "5",
            "--kills",
            "3",
            "--kill-every",
            "3",
        ]))
        .expect_err("too late");
        assert!(e.to_string().contains("after its end"), "{e}");
        assert!(plan(&args(&["--kill-every", "0"])).is_err());
        let default = plan(&args(&[])).expect("the defaults work");
        assert_eq!(default.len(), 2);
    }
}
