//! What the arbiter's test binaries share: a deadline for every test, the
//! members and views they talk about, and a local etcd cluster with short
//! timings. Each binary uses its own part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use arbiter::etcd::cluster::{ClusterConfig, ClusterDir, LocalCluster};
use arbiter::{Arbiter, ArbiterError, LossReason, Member, TasOutcome, View};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Runs `body` on a thread and fails the test if it takes longer than
/// `limit`, so that a hang is a failure rather than a stuck test run.
pub fn within<T: Send + 'static>(limit: Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let _ = tx.send(body());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => {
            worker.join().expect("test body finished");
            value
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test did not finish within {limit:?}"),
        // The body panicked: report its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("a finished body sends its value"),
        },
    }
}

pub fn member(id: &str, port: u16) -> Member {
    Member {
        id: id.to_owned(),
        service_addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log_addr: Some(SocketAddr::from(([127, 0, 0, 1], port + 1000))),
    }
}

pub fn view(number: u64, primary: &Member, backup: Option<&Member>) -> View {
    View {
        number,
        primary: Some(primary.clone()),
        backup: backup.cloned(),
    }
}

/// Brings `vm` to view 2 = (a, b), acknowledged by a.
pub fn pair(c: &dyn Arbiter, vm: &str, a: &Member, b: &Member) {
    assert_eq!(c.ping(vm, a, 0).unwrap(), view(1, a, None));
    assert_eq!(c.ping(vm, b, 0).unwrap(), view(1, a, None));
    assert_eq!(c.ping(vm, a, 1).unwrap(), view(2, a, Some(b)));
    assert_eq!(c.ping(vm, a, 2).unwrap(), view(2, a, Some(b)));
}

pub fn lost_to(outcome: &TasOutcome, winner: &Member) -> bool {
    matches!(outcome, TasOutcome::Lost { reason: LossReason::Decided { winner: w }, .. } if w == winner)
}

/// etcd's election timeout in these tests: short, so that a killed leader
/// is replaced quickly, and long enough for a loaded 2-core machine.
pub const ELECTION: Duration = Duration::from_millis(500);

/// A 3-member cluster with a leader, its data in memory (tmpfs) where
/// there is one: what is tested is the rules, not the disk. Its members
/// are killed after `lifetime` whatever happens.
pub fn etcd_cluster(lifetime: Duration) -> LocalCluster {
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    let cluster = LocalCluster::start(&ClusterConfig {
        // The leases' minimum TTL is 1.5 election timeouts, rounded up to
        // a second: 1 s here.
        heartbeat: Duration::from_millis(50),
        election: ELECTION,
        dir: ClusterDir::TempIn(parent),
        ..ClusterConfig::new(lifetime)
    })
    .expect("etcd starts");
    cluster
        .wait_for_leader(Duration::from_secs(20))
        .expect("etcd elects a leader");
    cluster
}

/// `ARBITER_TEST_SEED`, or a random seed; printed, so that a failure can
/// be replayed.
pub fn random_seed() -> u64 {
    let seed = std::env::var("ARBITER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("seed {seed} (rerun with ARBITER_TEST_SEED={seed})");
    seed
}

/// 250 random pings and claims from three servers on `vm`, checked against
/// an independent account of the rules: at most one winner per view, view
/// numbers never decrease, and a view changes only by a won claim from a
/// member of the current view (the backup only after acknowledgement) or
/// by naming a spare backup of an acknowledged view with the same primary.
/// Each step asks the arbiter `arbiter` gives it (which may restart one).
pub fn random_history(
    vm: &str,
    seed: u64,
    arbiter: &mut dyn FnMut(&mut StdRng) -> Arc<dyn Arbiter>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let servers = [member("a", 1), member("b", 2), member("c", 3)];
    let mut last_seen = [0u64; 3];
    let mut current = View::default();
    let mut acked = false;
    let mut winners: BTreeMap<u64, Member> = BTreeMap::new();
    let (mut won, mut promoted) = (0, 0);
    for step in 0..250 {
        let context = format!("{vm}, seed {seed}, step {step}");
        let c = arbiter(&mut rng);
        let k = rng.random_range(0..3);
        let me = &servers[k];
        let number = match rng.random_range(0..8) {
            0 => last_seen[k].saturating_sub(1),
            1 => current.number + 1,
            _ => last_seen[k],
        };
        let before = current.clone();
        if rng.random_ratio(2, 5) {
            let result = c.test_and_set(vm, number, me);
            if number > before.number {
                assert!(
                    matches!(result, Err(ArbiterError::Rejected { .. })),
                    "{context}: {result:?}"
                );
                continue;
            }
            let outcome = result.unwrap();
            match &outcome {
                TasOutcome::Won { view: v } => {
                    match winners.get(&number) {
                        Some(w) => assert_eq!(w, me, "{context}: second winner for view {number}"),
                        None => {
                            assert_eq!(number, before.number, "{context}");
                            let was_primary = before.primary.as_ref() == Some(me);
                            let was_backup = before.backup.as_ref() == Some(me);
                            assert!(
                                was_primary || (was_backup && acked),
                                "{context}: {me} won {before}"
                            );
                            winners.insert(number, me.clone());
                            current = v.clone();
                            acked = false;
                            won += 1;
                        }
                    }
                    assert_eq!(v, &view(number + 1, me, None), "{context}");
                }
                TasOutcome::Lost { reason, view: v } => {
                    assert_eq!(v, &before, "{context}");
                    if let Some(w) = winners.get(&number) {
                        assert_eq!(
                            reason,
                            &LossReason::Decided { winner: w.clone() },
                            "{context}"
                        );
                    }
                }
            }
            last_seen[k] = last_seen[k].max(outcome.view().number);
        } else {
            let result = c.ping(vm, me, number);
            if number > before.number {
                assert!(
                    matches!(result, Err(ArbiterError::Rejected { .. })),
                    "{context}: {result:?}"
                );
                continue;
            }
            let got = result.unwrap();
            if before.number == 0 {
                assert_eq!(got, view(1, me, None), "{context}");
            } else {
                if before.primary.as_ref() == Some(me) && number == before.number {
                    acked = true;
                }
                if got != before {
                    assert!(
                        acked,
                        "{context}: {before} replaced by {got} unacknowledged"
                    );
                    assert_eq!(got.number, before.number + 1, "{context}");
                    assert_eq!(got.primary, before.primary, "{context}");
                    assert!(before.backup.is_none() && got.backup.is_some(), "{context}");
                    promoted += 1;
                }
            }
            if got != before {
                acked = false;
            }
            current = got;
            last_seen[k] = current.number;
        }
        assert!(current.number >= before.number, "{context}");
        assert_eq!(c.query(vm).unwrap(), current, "{context}");
    }
    println!("{vm} (seed {seed}): {won} wins, {promoted} spares named, final {current}");
}
