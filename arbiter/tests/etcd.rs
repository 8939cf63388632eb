//! The etcd backend against real 3-member clusters whose members are
//! killed and restarted: exactly one winner per view through it all, no
//! decision without a quorum, and the unreachable kind for every failure
//! to reach one.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use arbiter::etcd::cluster::LocalCluster;
use arbiter::{Arbiter, ArbiterError, EtcdAddr, EtcdArbiter, EtcdConfig, Member, TasOutcome, View};
use common::{etcd_cluster, lost_to, member, view, within, ELECTION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a server's membership uses: short calls, retried by the caller.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

fn arbiter(cluster: &LocalCluster, prefix: &str) -> Arc<EtcdArbiter> {
    Arc::new(
        EtcdArbiter::connect(
            &cluster.addr(prefix),
            EtcdConfig {
                timeout: CALL_TIMEOUT,
                ..EtcdConfig::default()
            },
        )
        .expect("the etcd client starts"),
    )
}

/// Retries `call` while etcd is unreachable, as a server does, for at
/// most `patience`.
fn patiently<T>(
    patience: Duration,
    mut call: impl FnMut() -> Result<T, ArbiterError>,
) -> Result<T, ArbiterError> {
    let deadline = Instant::now() + patience;
    loop {
        match call() {
            Err(ArbiterError::Unreachable { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10))
            }
            other => return other,
        }
    }
}

/// Long enough for a new leader after a kill, however loaded the machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// Brings `vm` to view 2 = (a, b), acknowledged by a, through failures.
/// Each ping gives the same answer whether or not an earlier attempt of it
/// was applied.
fn pair_patiently(c: &dyn Arbiter, vm: &str, a: &Member, b: &Member) {
    for (me, known, expected) in [
        (a, 0, view(1, a, None)),
        (b, 0, view(1, a, None)),
        (a, 1, view(2, a, Some(b))),
        (a, 2, view(2, a, Some(b))),
    ] {
        let got = patiently(PATIENCE, || c.ping(vm, me, known)).unwrap();
        assert_eq!(got, expected, "{vm}: {} pinging with {known}", me.id);
    }
}

/// The test: 1,000 races of two claimants for the same view while
/// members are killed and restarted, the leader among them. Every race
/// has exactly one winner, and a retry of the winning claim, made after
/// the race, gets the same answer.
#[test]
fn a_thousand_races_with_members_killed_and_restarted() {
    within(Duration::from_secs(150), || {
        let cluster = Arc::new(etcd_cluster(Duration::from_secs(150)));
        let c = arbiter(&cluster, "races");
        let (a, b) = (member("a", 1), member("b", 2));
        let races = 1000;
        let workers = 4;
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));

        // One member down at a time, the leader every other time, so that
        // the cluster keeps its quorum and the races go on through
        // elections.
        let chaos = {
            let (cluster, done) = (Arc::clone(&cluster), Arc::clone(&done));
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(rand::random());
                let mut kills = Vec::new();
                while !done.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(rng.random_range(300..800)));
                    let target = match cluster.leader() {
                        Some(leader) if kills.len() % 2 == 0 => leader,
                        _ => rng.random_range(0..cluster.members()),
                    };
                    let was_leader = cluster.leader() == Some(target);
                    cluster.kill(target).unwrap();
                    kills.push((target, was_leader));
                    thread::sleep(Duration::from_millis(rng.random_range(300..1000)));
                    cluster.restart(target).unwrap();
                }
                kills
            })
        };

        let started = Instant::now();
        let results: Vec<Vec<(String, TasOutcome, TasOutcome)>> = (0..workers)
            .map(|_| {
                let (c, a, b, next) = (Arc::clone(&c), a.clone(), b.clone(), Arc::clone(&next));
                thread::spawn(move || {
                    let mut results = Vec::new();
                    loop {
                        let race = next.fetch_add(1, Ordering::SeqCst);
                        if race >= races {
                            return results;
                        }
                        let vm = format!("race{race}");
                        pair_patiently(&*c, &vm, &a, &b);
                        let start = Arc::new(Barrier::new(2));
                        let claims: Vec<_> = [a.clone(), b.clone()]
                            .into_iter()
                            .map(|me| {
                                let (c, vm, start) =
                                    (Arc::clone(&c), vm.clone(), Arc::clone(&start));
                                thread::spawn(move || {
                                    start.wait();
                                    patiently(PATIENCE, || c.test_and_set(&vm, 2, &me))
                                        .unwrap_or_else(|e| panic!("{vm}: {} claims: {e}", me.id))
                                })
                            })
                            .collect();
                        let mut outcomes = claims.into_iter().map(|t| t.join().unwrap());
                        let (first, second) = (outcomes.next().unwrap(), outcomes.next().unwrap());
                        results.push((vm, first, second));
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|worker| worker.join().unwrap())
            .collect();
        let racing = started.elapsed();
        done.store(true, Ordering::SeqCst);
        let kills = chaos.join().unwrap();

        let mut wins = BTreeMap::new();
        for (vm, by_a, by_b) in results.iter().flatten() {
            let (winner, outcome, loss) = match (by_a.won(), by_b.won()) {
                (true, false) => (&a, by_a, by_b),
                (false, true) => (&b, by_b, by_a),
                _ => panic!("{vm}: not exactly one winner: {by_a:?} / {by_b:?}"),
            };
            assert_eq!(
                outcome,
                &TasOutcome::Won {
                    view: view(3, winner, None)
                },
                "{vm}"
            );
            assert!(lost_to(loss, winner), "{vm}: {loss:?}");
            let again = patiently(PATIENCE, || c.test_and_set(vm, 2, winner)).unwrap();
            assert_eq!(&again, outcome, "{vm}: the winning claim retried");
            *wins.entry(winner.id.clone()).or_insert(0) += 1;
        }
        assert_eq!(results.iter().map(Vec::len).sum::<usize>(), races);
        let leaders = kills.iter().filter(|(_, leader)| *leader).count();
        println!(
            "{races} races in {racing:?}, wins {wins:?}; {} kills, {leaders} of the leader",
            kills.len()
        );
        assert!(leaders > 0, "the leader was never killed: {kills:?}");
    })
}

/// Two of three members down: nothing is decided, every call fails with
/// the unreachable kind within its timeout. With a member back, the claim
/// that could not be made is made, and a new pair forms.
#[test]
fn without_quorum_nobody_wins_and_with_it_back_a_pair_forms() {
    within(Duration::from_secs(90), || {
        let cluster = etcd_cluster(Duration::from_secs(90));
        let c = arbiter(&cluster, "quorum");
        let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
        let vm = "vm";
        pair_patiently(&*c, vm, &a, &b);
        let leader = cluster.wait_for_leader(PATIENCE).unwrap();
        // The leader and one other: the one left has no quorum.
        let other = (leader + 1) % 3;
        cluster.kill(leader).unwrap();
        cluster.kill(other).unwrap();
        for claimant in [&a, &b] {
            let started = Instant::now();
            let result = c.test_and_set(vm, 2, claimant);
            assert!(
                matches!(result, Err(ArbiterError::Unreachable { .. })),
                "{result:?}"
            );
            assert!(
                started.elapsed() < CALL_TIMEOUT + Duration::from_millis(500),
                "{:?}",
                started.elapsed()
            );
        }
        for result in [c.query(vm), c.ping(vm, &a, 2), c.ping(vm, &s, 0)] {
            assert!(
                matches!(result, Err(ArbiterError::Unreachable { .. })),
                "{result:?}"
            );
        }
        cluster.restart(other).unwrap();
        cluster.wait_for_leader(PATIENCE).unwrap();
        // Nothing was decided meanwhile: the view is the pair's.
        assert_eq!(
            patiently(PATIENCE, || c.query(vm)).unwrap(),
            view(2, &a, Some(&b))
        );
        let won = patiently(PATIENCE, || c.test_and_set(vm, 2, &b)).unwrap();
        assert_eq!(
            won,
            TasOutcome::Won {
                view: view(3, &b, None)
            }
        );
        assert!(lost_to(&c.test_and_set(vm, 2, &a).unwrap(), &b));
        // A new pair: b goes live and acknowledges its view, a new spare
        // is named backup.
        assert_eq!(c.ping(vm, &b, 3).unwrap(), view(3, &b, None));
        assert_eq!(c.ping(vm, &s, 0).unwrap(), view(4, &b, Some(&s)));
        assert_eq!(c.ping(vm, &b, 4).unwrap(), view(4, &b, Some(&s)));
        cluster.restart(leader).unwrap();
    })
}

/// The cluster helper itself: it finds the leader, and a killed leader is
/// replaced by another member while it is down.
#[test]
fn a_killed_leader_is_replaced_and_comes_back_as_a_follower() {
    within(Duration::from_secs(60), || {
        let cluster = etcd_cluster(Duration::from_secs(60));
        let leader = cluster.wait_for_leader(PATIENCE).unwrap();
        assert!(cluster.is_running(leader));
        cluster.kill(leader).unwrap();
        assert!(!cluster.is_running(leader));
        let started = Instant::now();
        let next = cluster.wait_for_leader(PATIENCE).unwrap();
        assert_ne!(next, leader);
        println!(
            "{} was leader; {} after {:?} (election timeout {ELECTION:?})",
            cluster.name(leader),
            cluster.name(next),
            started.elapsed()
        );
        cluster.restart(leader).unwrap();
        assert!(cluster.is_running(leader));
        // Any member answers for the cluster once it has caught up.
        let c = arbiter(&cluster, "helper");
        let a = member("a", 1);
        assert_eq!(
            patiently(PATIENCE, || c.ping("vm", &a, 0)).unwrap(),
            view(1, &a, None)
        );
        let only_the_restarted = EtcdArbiter::connect(
            &EtcdAddr {
                endpoints: vec![cluster.endpoints()[leader].clone()],
                prefix: "helper".into(),
            },
            EtcdConfig::default(),
        )
        .unwrap();
        assert_eq!(
            patiently(PATIENCE, || only_the_restarted.query("vm")).unwrap(),
            view(1, &a, None)
        );
    })
}

/// Nothing listens: every call is the unreachable kind, within its
/// timeout, as with the built-in arbiter.
#[test]
fn an_etcd_nobody_runs_is_unreachable() {
    within(Duration::from_secs(30), || {
        let ports: Vec<String> = (0..3)
            .map(|_| {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap().to_string()
            })
            .collect();
        let c = EtcdArbiter::connect(
            &EtcdAddr::new(ports),
            EtcdConfig {
                timeout: Duration::from_millis(300),
                ..EtcdConfig::default()
            },
        )
        .expect("connecting waits for nothing");
        let a = member("a", 1);
        let started = Instant::now();
        let results = [
            c.test_and_set("vm", 1, &a).map(|o| o.view().clone()),
            c.ping("vm", &a, 0),
            c.query("vm"),
        ];
        for result in results {
            assert!(
                matches!(result, Err(ArbiterError::Unreachable { .. })),
                "{result:?}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    })
}

/// A key under the prefix that this backend did not write is never decided
/// from: the call fails, and names the key.
#[test]
fn a_foreign_value_under_the_prefix_is_refused() {
    within(Duration::from_secs(60), || {
        let cluster = etcd_cluster(Duration::from_secs(60));
        let c = arbiter(&cluster, "foreign");
        let a = member("a", 1);
        assert_eq!(
            patiently(PATIENCE, || c.ping("vm", &a, 0)).unwrap(),
            view(1, &a, None)
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut raw = etcd_client::Client::connect(cluster.endpoints(), None)
                .await
                .unwrap();
            raw.put("foreign/vm/vm/view", "not json", None)
                .await
                .unwrap();
        });
        for result in [c.query("vm"), c.ping("vm", &a, 1)] {
            match result {
                Err(ArbiterError::BadResponse { detail, .. }) => {
                    assert!(detail.contains("foreign/vm/vm/view"), "{detail}")
                }
                other => panic!("decided from a foreign value: {other:?}"),
            }
        }
        let result: Result<View, ArbiterError> = c.query("other");
        assert_eq!(result.unwrap(), View::default());
    })
}
