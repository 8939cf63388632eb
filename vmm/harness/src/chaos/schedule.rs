//! A trial's faults, drawn from its seed alone: what, to whom, when and for
//! how long. Targets are roles (the primary, the backup), resolved when
//! the fault is injected, since who holds a role after the first fault
//! depends on races the seed does not decide; the schedule itself is a
//! pure function of the seed and the campaign's settings, so a failed
//! trial is rerun with the same faults.
//!
//! Faults go on two lanes. The server lane holds what silences a server or
//! its log channel, one fault at a time with at least a failure timeout
//! between them, so that two harmless faults never add up to a failover
//! nobody drew. At most one fault per trial, plus one per spare, costs the
//! pair a server (a kill, a pause or a cut longer than the failure
//! timeout): with no spare to take its place, a second would leave the VM
//! with no server at all, which is the end of the service, not a bug. The
//! side lane (the arbiter, spares, the clients' datagrams) overlaps freely
//! with the server lane, which is how an arbiter restart lands in a
//! failover.

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::launcher::DatagramFaults;

/// What the seed does not decide but the schedule depends on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScheduleParams {
    /// Faults begin after `warmup_ms` and have all healed by `duration_ms`.
    pub duration_ms: u64,
    pub warmup_ms: u64,
    pub failure_timeout_ms: u64,
    pub spares: u32,
    /// The arbiter is a 3-member etcd cluster: its faults hit the leader.
    pub etcd: bool,
}

/// A server by its role when the fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Primary,
    Backup,
    /// A spare no view names (`--spares`).
    Spare,
    /// `ftvm arbiter`, or the etcd leader.
    Arbiter,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Primary => "primary",
            Target::Backup => "backup",
            Target::Spare => "spare",
            Target::Arbiter => "arbiter",
        })
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::ToPrimary => "toward the primary (acks)",
            Direction::ToBackup => "toward the backup (log)",
        })
    }
}

/// Which way a one-way cut or stall stops bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the backup to the primary: its acknowledgements.
    ToPrimary,
    /// From the primary to the backup: the log.
    ToBackup,
}

/// What strikes while a backup joins by state transfer (between the
/// primary's `transfer_started` and `protected`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum TransferFault {
    /// SIGKILL to the primary: the only server with the VM's state. The
    /// VM is down by design (docs/fault-tolerance.md, "When either side
    /// dies mid-transfer"); the joining backup must never go live. Always
    /// the last fault of the server lane that costs a server.
    KillPrimary,
    PausePrimary {
        for_ms: u64,
    },
    /// SIGKILL to the joining backup: the primary goes on alone and brings
    /// up the next spare.
    KillBackup,
    PauseBackup {
        for_ms: u64,
    },
    Stall {
        direction: Option<Direction>,
        for_ms: u64,
    },
    /// A cut leaves a hole in the stream: the backup must refuse what it
    /// got, or fail, never restore it.
    Cut {
        for_ms: u64,
    },
}

impl TransferFault {
    fn for_ms(&self) -> u64 {
        match self {
            TransferFault::KillPrimary | TransferFault::KillBackup => 0,
            TransferFault::PausePrimary { for_ms }
            | TransferFault::PauseBackup { for_ms }
            | TransferFault::Stall { for_ms, .. }
            | TransferFault::Cut { for_ms } => *for_ms,
        }
    }
}

impl fmt::Display for TransferFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransferFault::KillPrimary => write!(f, "SIGKILL primary"),
            TransferFault::PausePrimary { for_ms } => write!(f, "SIGSTOP primary for {for_ms} ms"),
            TransferFault::KillBackup => write!(f, "SIGKILL the joining backup"),
            TransferFault::PauseBackup { for_ms } => {
                write!(f, "SIGSTOP the joining backup for {for_ms} ms")
            }
            TransferFault::Stall {
                direction: Some(direction),
                for_ms,
            } => write!(f, "stall the log channel {direction} for {for_ms} ms"),
            TransferFault::Stall { for_ms, .. } => {
                write!(f, "stall the log channel for {for_ms} ms")
            }
            TransferFault::Cut { for_ms } => write!(f, "cut the log channel for {for_ms} ms"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL; a killed arbiter is started again on its state after
    /// `restart_after_ms`, a killed VMM server is replaced by a fresh
    /// spare when the campaign has spares.
    Kill {
        target: Target,
        restart_after_ms: Option<u64>,
    },
    /// SIGSTOP, and SIGCONT `for_ms` later.
    Pause {
        target: Target,
        for_ms: u64,
    },
    /// The log channel drops every byte both ways, and passes them again
    /// after `for_ms`: what a TCP stream then carries has a hole, so a cut
    /// always costs the pair a server.
    Cut {
        for_ms: u64,
    },
    CutOneWay {
        direction: Direction,
        for_ms: u64,
    },
    /// The log channel holds every byte `ms` each way: a long link.
    Delay {
        ms: u64,
        for_ms: u64,
    },
    /// The log channel holds every byte (one way, or both) until the
    /// stall ends, then passes it all on: nothing is lost.
    Stall {
        direction: Option<Direction>,
        for_ms: u64,
    },
    /// The clients' datagrams, both ways, through the lossy proxies.
    Datagrams {
        faults: DatagramFaults,
        for_ms: u64,
    },
    /// SIGKILL to the primary right after it released a reply.
    KillPrimaryAfterOutput,
    /// The log channel cut, and the primary killed `kill_after_ms` later,
    /// before anyone took the cut for a failure: whatever the primary
    /// released meanwhile, its backup never had.
    KillPrimaryDuringCut {
        kill_after_ms: u64,
    },
    /// The backup paused, the primary killed `kill_after_ms` into the
    /// pause, the backup resumed after `for_ms`.
    KillPrimaryWhileBackupPaused {
        kill_after_ms: u64,
        for_ms: u64,
    },
    /// The primary killed, and the arbiter killed as soon as the backup
    /// takes it for failed, so that its test-and-set finds no arbiter;
    /// the arbiter is back `down_ms` later.
    ArbiterDownDuringClaim {
        down_ms: u64,
    },
    /// During a state transfer: if the VM is protected, the backup is
    /// killed first so that the primary brings up a spare; `fault`
    /// strikes `after_ms` after the spare connects to the primary's log
    /// channel (its handshake, then the transfer at once).
    DuringTransfer {
        #[serde(flatten)]
        fault: TransferFault,
        after_ms: u64,
    },
}

impl FaultKind {
    /// How long the fault lasts from its start, to the best the schedule
    /// can tell (a worst-moment fault waits for its moment).
    pub fn span_ms(&self, failure_timeout_ms: u64) -> u64 {
        match self {
            FaultKind::Kill {
                restart_after_ms, ..
            } => restart_after_ms.unwrap_or(0),
            FaultKind::Pause { for_ms, .. }
            | FaultKind::Cut { for_ms }
            | FaultKind::CutOneWay { for_ms, .. }
            | FaultKind::Delay { for_ms, .. }
            | FaultKind::Stall { for_ms, .. }
            | FaultKind::Datagrams { for_ms, .. }
            | FaultKind::KillPrimaryWhileBackupPaused { for_ms, .. } => *for_ms,
            FaultKind::KillPrimaryAfterOutput => 0,
            FaultKind::KillPrimaryDuringCut { .. } => failure_timeout_ms * 2,
            FaultKind::ArbiterDownDuringClaim { down_ms } => failure_timeout_ms + down_ms,
            FaultKind::DuringTransfer { fault, after_ms } => {
                TRANSFER_SETUP_MS + after_ms + fault.for_ms()
            }
        }
    }

    /// A short name, for tables and the picture.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Kill { .. } => "kill",
            FaultKind::Pause { .. } => "pause",
            FaultKind::Cut { .. } => "cut",
            FaultKind::CutOneWay { .. } => "one-way cut",
            FaultKind::Delay { .. } => "delay",
            FaultKind::Stall { .. } => "stall",
            FaultKind::Datagrams { .. } => "datagrams",
            FaultKind::KillPrimaryAfterOutput => "kill after output",
            FaultKind::KillPrimaryDuringCut { .. } => "kill during cut",
            FaultKind::KillPrimaryWhileBackupPaused { .. } => "kill while backup paused",
            FaultKind::ArbiterDownDuringClaim { .. } => "arbiter down in claim",
            FaultKind::DuringTransfer { fault, .. } => match fault {
                TransferFault::KillPrimary => "kill primary in transfer",
                TransferFault::PausePrimary { .. } => "pause primary in transfer",
                TransferFault::KillBackup => "kill joiner in transfer",
                TransferFault::PauseBackup { .. } => "pause joiner in transfer",
                TransferFault::Stall { .. } => "stall in transfer",
                TransferFault::Cut { .. } => "cut in transfer",
            },
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::Kill {
                target,
                restart_after_ms: Some(ms),
            } => write!(f, "SIGKILL {target}, restarted {ms} ms later"),
            FaultKind::Kill { target, .. } => write!(f, "SIGKILL {target}"),
            FaultKind::Pause { target, for_ms } => {
                write!(f, "SIGSTOP {target} for {for_ms} ms")
            }
            FaultKind::Cut { for_ms } => write!(f, "cut the log channel for {for_ms} ms"),
            FaultKind::CutOneWay { direction, for_ms } => {
                write!(f, "cut the log channel {direction} for {for_ms} ms")
            }
            FaultKind::Delay { ms, for_ms } => {
                write!(f, "delay the log channel {ms} ms each way for {for_ms} ms")
            }
            FaultKind::Stall {
                direction: Some(direction),
                for_ms,
            } => write!(f, "stall the log channel {direction} for {for_ms} ms"),
            FaultKind::Stall { for_ms, .. } => {
                write!(f, "stall the log channel for {for_ms} ms")
            }
            FaultKind::Datagrams { faults, for_ms } => write!(
                f,
                "client datagrams for {for_ms} ms: {:.0}% lost, {:.0}% duplicated, {:.0}% reordered (up to {} ms), +{} ms",
                faults.loss * 100.0,
                faults.duplicate * 100.0,
                faults.reorder * 100.0,
                faults.reorder_ms,
                faults.delay_ms
            ),
            FaultKind::KillPrimaryAfterOutput => {
                write!(f, "SIGKILL primary right after it releases a reply")
            }
            FaultKind::KillPrimaryDuringCut { kill_after_ms } => write!(
                f,
                "cut the log channel, SIGKILL primary {kill_after_ms} ms into the cut"
            ),
            FaultKind::KillPrimaryWhileBackupPaused {
                kill_after_ms,
                for_ms,
            } => write!(
                f,
                "SIGSTOP backup for {for_ms} ms, SIGKILL primary {kill_after_ms} ms into it"
            ),
            FaultKind::ArbiterDownDuringClaim { down_ms } => write!(
                f,
                "SIGKILL primary, SIGKILL arbiter when the backup claims, arbiter back {down_ms} ms later"
            ),
            FaultKind::DuringTransfer { fault, after_ms } => write!(
                f,
                "during a state transfer (SIGKILL backup first if the VM is protected): {fault}, {after_ms} ms after the joining backup connects"
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fault {
    /// Milliseconds after the clients start.
    pub at_ms: u64,
    #[serde(flatten)]
    pub kind: FaultKind,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>6.3} s  {}", self.at_ms as f64 / 1000.0, self.kind)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub seed: u64,
    /// In order of their start.
    pub faults: Vec<Fault>,
    /// When the last fault has healed, at the latest.
    pub healed_ms: u64,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "schedule of seed {}:", self.seed)?;
        for fault in &self.faults {
            writeln!(f, "  {fault}")?;
        }
        Ok(())
    }
}

/// The fewest faults a trial has.
pub const MIN_FAULTS: usize = 3;

impl Schedule {
    /// The faults of the trial with `seed`.
    pub fn draw(seed: u64, p: &ScheduleParams) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let ft = p.failure_timeout_ms.max(1);
        let end = p.duration_ms.max(p.warmup_ms + 1);
        let mut faults = Vec::new();

        // The server lane: faults one after another, each followed by a
        // failure timeout and more of quiet; the ones that cost a server
        // come last, since after one the pair has no channel left to
        // fault, each followed by time for a spare to join. What does not
        // fit in the window is left out, the harmless first.
        let costly = if rng.random_bool(0.85) {
            1 + p.spares
        } else {
            p.spares
        };
        let harmless = rng.random_range(1..=3);
        let mut lane: Vec<(FaultKind, u64)> = Vec::new();
        for i in 0..harmless + costly {
            let kind = if i < harmless {
                harmless_fault(&mut rng, ft)
            } else {
                costly_fault(&mut rng, ft, p, i + 1 == harmless + costly)
            };
            let mut gap = ft + rng.random_range(0..=4 * ft);
            if i >= harmless && i + 1 < harmless + costly {
                gap += REPROTECT_MS;
            }
            lane.push((kind, gap));
        }
        let needed = |lane: &[(FaultKind, u64)]| {
            lane.iter().map(|(k, gap)| k.span_ms(ft) + gap).sum::<u64>()
        };
        let window = end - p.warmup_ms;
        while needed(&lane) > window && !lane.is_empty() {
            lane.remove(0);
        }
        let mut t = p.warmup_ms + rng.random_range(0..=window - needed(&lane));
        for (kind, gap) in lane {
            let span = kind.span_ms(ft);
            faults.push(Fault { at_ms: t, kind });
            t += span + gap;
        }

        // The side lane.
        let side = rng.random_range(1..=3);
        for _ in 0..side {
            let kind = side_fault(&mut rng, p);
            let span = kind.span_ms(ft);
            if p.warmup_ms + span >= end {
                continue;
            }
            let at_ms = rng.random_range(p.warmup_ms..end - span);
            faults.push(Fault { at_ms, kind });
        }

        // Too few: datagram faults fit anywhere and cost nothing.
        while faults.len() < MIN_FAULTS {
            let for_ms = (end - p.warmup_ms).min(1000);
            let kind = FaultKind::Datagrams {
                faults: datagram_faults(&mut rng),
                for_ms,
            };
            let at_ms = rng.random_range(p.warmup_ms..=end - for_ms);
            faults.push(Fault { at_ms, kind });
        }
        faults.sort_by_key(|f| f.at_ms);
        let healed_ms = faults
            .iter()
            .map(|f| f.at_ms + f.kind.span_ms(ft))
            .max()
            .unwrap_or(0);
        Schedule {
            seed,
            faults,
            healed_ms,
        }
    }
}

/// How long after a fault that cost a server the schedule leaves for a
/// spare to join before the next one that may.
const REPROTECT_MS: u64 = 4000;
/// What a fault during a transfer allows for the transfer to begin: the
/// backup killed, the arbiter taking it for gone (its spare timeout, 1 s
/// by default) and naming the spare, the spare connecting.
const TRANSFER_SETUP_MS: u64 = 2500;

/// How long either end of a state transfer waits on a silent peer before
/// it gives up (docs/fault-tolerance.md, "When either side dies
/// mid-transfer"): 10 failure timeouts, at least 2 s.
pub fn transfer_silence_ms(failure_timeout_ms: u64) -> u64 {
    (failure_timeout_ms * 10).max(2000)
}
/// The arbiter is never gone longer than this: a server that needs a
/// decision gives up after 5 s without one (exit 5), by design.
const MAX_ARBITER_DOWN_MS: u64 = 2000;

/// A fault the pair survives with both servers: shorter than a third of
/// the failure timeout where it silences a server or its channel.
fn harmless_fault(rng: &mut StdRng, ft: u64) -> FaultKind {
    let short = (ft / 3).max(1);
    let target = if rng.random_bool(0.5) {
        Target::Primary
    } else {
        Target::Backup
    };
    match rng.random_range(0..4) {
        0 => FaultKind::Pause {
            target,
            for_ms: rng.random_range(1..=short),
        },
        1 => FaultKind::Delay {
            ms: rng.random_range(1..=(ft / 6).max(1)),
            for_ms: rng.random_range(300..=2000),
        },
        2 => FaultKind::Stall {
            direction: Some(direction(rng)),
            for_ms: rng.random_range(1..=short),
        },
        _ => FaultKind::Stall {
            direction: None,
            for_ms: rng.random_range(1..=short),
        },
    }
}

fn direction(rng: &mut StdRng) -> Direction {
    if rng.random_bool(0.5) {
        Direction::ToPrimary
    } else {
        Direction::ToBackup
    }
}

/// A fault during a state transfer; `last`: the last costly fault of the
/// trial, the only one that may leave the VM down by design.
fn transfer_fault(rng: &mut StdRng, ft: u64, last: bool) -> FaultKind {
    // Short, past a failure timeout, or past the transfer's own patience.
    let pause = |rng: &mut StdRng| match rng.random_range(0..3) {
        0 => rng.random_range(1..=(ft / 3).max(1)),
        1 => rng.random_range(ft * 2..=ft * 5),
        _ => {
            let silence = transfer_silence_ms(ft);
            rng.random_range(silence + 100..=silence + 1000)
        }
    };
    let fault = match rng.random_range(0..6) {
        0 if last => TransferFault::KillPrimary,
        0 | 1 => TransferFault::KillBackup,
        2 => TransferFault::PausePrimary { for_ms: pause(rng) },
        3 => TransferFault::PauseBackup { for_ms: pause(rng) },
        4 => TransferFault::Stall {
            direction: match rng.random_range(0..3) {
                0 => None,
                _ => Some(direction(rng)),
            },
            for_ms: pause(rng),
        },
        _ => TransferFault::Cut {
            for_ms: rng.random_range(ft..=ft * 5),
        },
    };
    FaultKind::DuringTransfer {
        fault,
        after_ms: rng.random_range(0..=20),
    }
}

/// A fault after which one server of the pair is gone, or at the worst
/// moment for it.
fn costly_fault(rng: &mut StdRng, ft: u64, p: &ScheduleParams, last: bool) -> FaultKind {
    let long = |rng: &mut StdRng| rng.random_range(ft * 2..=ft * 5);
    let restart = (p.spares > 0).then_some(0);
    let target = if rng.random_bool(0.5) {
        Target::Primary
    } else {
        Target::Backup
    };
    let kinds = if p.spares > 0 { 12 } else { 9 };
    match rng.random_range(0..kinds) {
        9..=11 => transfer_fault(rng, ft, last),
        0 => FaultKind::Kill {
            target,
            restart_after_ms: restart,
        },
        1 => FaultKind::Pause {
            target,
            for_ms: long(rng),
        },
        2 => FaultKind::Cut { for_ms: long(rng) },
        3 => FaultKind::CutOneWay {
            direction: direction(rng),
            for_ms: long(rng),
        },
        4 => FaultKind::Stall {
            direction: None,
            for_ms: long(rng),
        },
        5 => FaultKind::KillPrimaryAfterOutput,
        6 => FaultKind::KillPrimaryDuringCut {
            kill_after_ms: rng.random_range(1..=(ft / 2).max(1)),
        },
        7 => {
            let for_ms = if rng.random_bool(0.5) {
                rng.random_range(1..=(ft / 3).max(1))
            } else {
                long(rng)
            };
            // Before the primary could take its paused backup for failed
            // and go on alone: killing a primary that is alone would leave
            // no server, which is a second cost, not a worse moment.
            FaultKind::KillPrimaryWhileBackupPaused {
                kill_after_ms: rng.random_range(0..=(for_ms / 2).min(ft / 2)),
                for_ms,
            }
        }
        _ => FaultKind::ArbiterDownDuringClaim {
            down_ms: rng.random_range(100..=MAX_ARBITER_DOWN_MS),
        },
    }
}

fn side_fault(rng: &mut StdRng, p: &ScheduleParams) -> FaultKind {
    let choices = if p.spares > 0 { 4 } else { 3 };
    match rng.random_range(0..choices) {
        0 => FaultKind::Kill {
            target: Target::Arbiter,
            restart_after_ms: Some(rng.random_range(100..=MAX_ARBITER_DOWN_MS)),
        },
        // etcd members are killed, not paused: the cluster has no handle
        // on their processes beyond that.
        1 if !p.etcd => FaultKind::Pause {
            target: Target::Arbiter,
            for_ms: rng.random_range(100..=MAX_ARBITER_DOWN_MS),
        },
        3 => FaultKind::Kill {
            target: Target::Spare,
            restart_after_ms: Some(0),
        },
        _ => FaultKind::Datagrams {
            faults: datagram_faults(rng),
            for_ms: rng.random_range(500..=3000),
        },
    }
}

fn datagram_faults(rng: &mut StdRng) -> DatagramFaults {
    DatagramFaults {
        loss: f64::from(rng.random_range(0..=30u32)) / 100.0,
        duplicate: f64::from(rng.random_range(0..=20u32)) / 100.0,
        reorder: f64::from(rng.random_range(0..=30u32)) / 100.0,
        reorder_ms: rng.random_range(1..=20),
        delay_ms: rng.random_range(0..=10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(spares: u32) -> ScheduleParams {
        ScheduleParams {
            duration_ms: 10_000,
            warmup_ms: 1000,
            failure_timeout_ms: 300,
            spares,
            etcd: false,
        }
    }

    #[test]
    fn same_seed_same_schedule_and_seeds_differ() {
        let p = params(0);
        assert_eq!(Schedule::draw(7, &p), Schedule::draw(7, &p));
        assert_eq!(
            Schedule::draw(7, &p).to_string(),
            Schedule::draw(7, &p).to_string()
        );
        let distinct: std::collections::BTreeSet<String> =
            (0..20).map(|s| Schedule::draw(s, &p).to_string()).collect();
        assert!(distinct.len() > 15);
    }

    #[test]
    fn every_schedule_fits_and_costs_at_most_its_budget() {
        for spares in [0, 2] {
            let p = params(spares);
            for seed in 0..500 {
                let s = Schedule::draw(seed, &p);
                assert!(s.faults.len() >= MIN_FAULTS, "{s}");
                assert!(s.healed_ms <= p.duration_ms, "{s}");
                assert!(s.faults.iter().all(|f| f.at_ms >= p.warmup_ms), "{s}");
                assert!(s.faults.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
                let spare_kills = s
                    .faults
                    .iter()
                    .filter(|f| {
                        matches!(
                            f.kind,
                            FaultKind::Kill {
                                target: Target::Spare,
                                ..
                            }
                        )
                    })
                    .count();
                assert!(spares > 0 || spare_kills == 0, "{s}");
            }
        }
    }

    #[test]
    fn a_campaign_mixes_every_kind() {
        let p = params(0);
        let names: std::collections::BTreeSet<&str> = (0..100)
            .flat_map(|seed| Schedule::draw(seed, &p).faults)
            .map(|f| f.kind.name())
            .collect();
        assert_eq!(names.len(), 11, "{names:?}");
        // With a spare: kills of spares and every fault during a transfer
        // too, within the 100 trials of the long campaign.
        let p = params(1);
        let names: std::collections::BTreeSet<&str> = (100..200)
            .flat_map(|seed| Schedule::draw(seed, &p).faults)
            .map(|f| f.kind.name())
            .collect();
        assert_eq!(names.len(), 17, "{names:?}");
    }

    #[test]
    fn only_the_last_costly_fault_kills_a_primary_in_transfer() {
        let p = params(1);
        for seed in 0..500 {
            let s = Schedule::draw(seed, &p);
            let server_lane: Vec<&Fault> = s
                .faults
                .iter()
                .filter(|f| !matches!(f.kind, FaultKind::Datagrams { .. }))
                .filter(|f| {
                    !matches!(
                        f.kind,
                        FaultKind::Kill {
                            target: Target::Arbiter | Target::Spare,
                            ..
                        } | FaultKind::Pause {
                            target: Target::Arbiter,
                            ..
                        }
                    )
                })
                .collect();
            if let Some(i) = server_lane.iter().position(|f| {
                matches!(
                    f.kind,
                    FaultKind::DuringTransfer {
                        fault: TransferFault::KillPrimary,
                        ..
                    }
                )
            }) {
                assert_eq!(i + 1, server_lane.len(), "{s}");
            }
        }
    }
}
