//! The rules of the README, one suite run against both implementations of
//! [`Arbiter`]: the built-in server on loopback, and a real 3-member etcd
//! cluster. Each rule uses VMs of its own, so one arbiter serves the whole
//! suite.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use arbiter::{
    Arbiter, ArbiterClient, ArbiterError, ErrorKind, EtcdArbiter, EtcdConfig, LossReason, Member,
    Server, ServerConfig, TasOutcome, View,
};
use common::{etcd_cluster, lost_to, member, pair, random_history, random_seed, view, within};

const IO_TIMEOUT: Duration = Duration::from_secs(2);

struct Backend {
    name: &'static str,
    arbiter: Arc<dyn Arbiter>,
    /// Longer than the liveness bound, however the backend measures it.
    past_liveness: Duration,
}

type Rule = fn(&Backend);

const RULES: &[(&str, Rule)] = &[
    (
        "views advance only after acknowledgement",
        views_advance_only_after_acknowledgement,
    ),
    (
        "a spare becomes backup after a failover",
        spare_becomes_backup_after_failover,
    ),
    (
        "racing claims have exactly one winner",
        racing_claims_have_exactly_one_winner,
    ),
    (
        "the backup of an unacknowledged view cannot win",
        backup_of_unacknowledged_view_cannot_win,
    ),
    (
        "losers and the displaced are never named backup",
        losers_and_the_displaced_are_never_named_backup,
    ),
    (
        "a resumed loser is not named backup",
        a_resumed_loser_is_not_named_backup,
    ),
    (
        "the most recently heard spare is named",
        the_most_recent_spare_is_named,
    ),
    ("dead spares are not named", dead_spares_are_not_named),
    (
        "a gone backup is replaced once its primary has seen the view",
        a_gone_backup_is_replaced_once_its_primary_has_seen_the_view,
    ),
    (
        "names the protocol refuses are refused",
        bad_names_are_refused,
    ),
    (
        "concurrent requests never give one number to two views",
        concurrent_requests_number_views_once,
    ),
    (
        "random histories keep the invariants",
        random_histories_keep_the_invariants,
    ),
];

fn check_rules(backend: &Backend) {
    for (name, rule) in RULES {
        let started = Instant::now();
        println!("{}: {name}", backend.name);
        rule(backend);
        println!("{}: {name}: ok in {:?}", backend.name, started.elapsed());
    }
}

#[test]
fn the_rules_hold_on_the_builtin_arbiter() {
    within(Duration::from_secs(120), || {
        let dir = tempfile::tempdir().unwrap();
        let bound = Duration::from_millis(300);
        let server = Server::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ServerConfig {
                spare_timeout: bound,
                ..ServerConfig::new(dir.path())
            },
        )
        .and_then(Server::spawn)
        .expect("the arbiter starts");
        check_rules(&Backend {
            name: "built-in",
            arbiter: Arc::new(ArbiterClient::with_timeout(server.local_addr(), IO_TIMEOUT)),
            past_liveness: bound * 2,
        });
        server.stop().unwrap();
    })
}

#[test]
fn the_rules_hold_on_etcd() {
    within(Duration::from_secs(180), || {
        let cluster = etcd_cluster(Duration::from_secs(180));
        let arbiter = EtcdArbiter::connect(
            &cluster.addr("rules"),
            EtcdConfig {
                timeout: IO_TIMEOUT,
                liveness: Duration::from_secs(1),
            },
        )
        .expect("the etcd client starts");
        check_rules(&Backend {
            name: "etcd",
            arbiter: Arc::new(arbiter),
            // A lease of 1 s, and etcd looks for expired leases every
            // 500 ms.
            past_liveness: Duration::from_millis(2500),
        });
    })
}

fn views_advance_only_after_acknowledgement(backend: &Backend) {
    let c = &*backend.arbiter;
    let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
    let vm = "ack";
    assert_eq!(c.query(vm).unwrap(), View::default());
    assert_eq!(c.ping(vm, &a, 0).unwrap(), view(1, &a, None));
    // b is a spare until a acknowledges view 1; a's stale pings do not
    // acknowledge it.
    assert_eq!(c.ping(vm, &b, 0).unwrap(), view(1, &a, None));
    assert_eq!(c.ping(vm, &a, 0).unwrap(), view(1, &a, None));
    assert_eq!(c.ping(vm, &b, 0).unwrap(), view(1, &a, None));
    assert_eq!(c.ping(vm, &a, 1).unwrap(), view(2, &a, Some(&b)));
    // A third server waits: the view has its backup.
    assert_eq!(c.ping(vm, &s, 0).unwrap(), view(2, &a, Some(&b)));
    assert_eq!(c.ping(vm, &b, 2).unwrap(), view(2, &a, Some(&b)));
    assert_eq!(c.query(vm).unwrap(), view(2, &a, Some(&b)));
    // A ping naming a view the arbiter never made is refused.
    match c.ping(vm, &b, 3) {
        Err(ArbiterError::Rejected {
            kind: ErrorKind::Refused,
            message,
            ..
        }) => assert!(message.contains("view 3"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(c.query(vm).unwrap(), view(2, &a, Some(&b)));
    // VMs are independent.
    assert_eq!(c.query("ack-other").unwrap(), View::default());
}

fn spare_becomes_backup_after_failover(backend: &Backend) {
    let c = &*backend.arbiter;
    let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
    let vm = "failover";
    pair(c, vm, &a, &b);
    assert_eq!(c.ping(vm, &s, 0).unwrap(), view(2, &a, Some(&b)));
    // b goes live on new addresses: the view takes them from the claim.
    let b_live = Member {
        log_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9002))),
        ..b.clone()
    };
    let won = c.test_and_set(vm, 2, &b_live).unwrap();
    assert_eq!(
        won,
        TasOutcome::Won {
            view: view(3, &b_live, None)
        }
    );
    assert!(lost_to(&c.test_and_set(vm, 2, &a).unwrap(), &b_live));
    // Nobody is named backup until b acknowledges view 3.
    assert_eq!(c.ping(vm, &s, 2).unwrap(), view(3, &b_live, None));
    // Nor a server whose last ping named a view from before the failover
    // (it may be the member b displaced, resumed after a freeze), until it
    // pings with the number it was answered.
    assert_eq!(c.ping(vm, &b_live, 3).unwrap(), view(3, &b_live, None));
    assert_eq!(c.ping(vm, &s, 3).unwrap(), view(4, &b_live, Some(&s)));
    assert_eq!(c.query(vm).unwrap(), view(4, &b_live, Some(&s)));
}

fn racing_claims_have_exactly_one_winner(backend: &Backend) {
    let c = &backend.arbiter;
    let (a, b, outsider) = (member("a", 1), member("b", 2), member("x", 3));
    let mut wins = [0; 2];
    for i in 0..40 {
        let vm = format!("race{i}");
        pair(&**c, &vm, &a, &b);
        let start = Arc::new(Barrier::new(2));
        let racers: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .map(|me| {
                let (c, vm, start) = (Arc::clone(c), vm.clone(), Arc::clone(&start));
                thread::spawn(move || {
                    start.wait();
                    c.test_and_set(&vm, 2, &me).unwrap()
                })
            })
            .collect();
        let outcomes: Vec<TasOutcome> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let winners: Vec<usize> = (0..2).filter(|&k| outcomes[k].won()).collect();
        assert_eq!(winners.len(), 1, "iteration {i}: {outcomes:?}");
        let w = winners[0];
        wins[w] += 1;
        let (winner, loser) = if w == 0 { (&a, &b) } else { (&b, &a) };
        assert_eq!(
            outcomes[w],
            TasOutcome::Won {
                view: view(3, winner, None)
            }
        );
        assert!(lost_to(&outcomes[1 - w], winner), "{:?}", outcomes[1 - w]);
        // Retries: the winner's is answered as before, the loser's still
        // loses.
        assert_eq!(c.test_and_set(&vm, 2, winner).unwrap(), outcomes[w]);
        assert!(lost_to(&c.test_and_set(&vm, 2, loser).unwrap(), winner));
        // A claim for view 2 on the winner's old addresses is not the
        // winning claim.
        let moved = Member {
            service_addr: SocketAddr::from(([127, 0, 0, 1], 7)),
            ..winner.clone()
        };
        assert!(lost_to(&c.test_and_set(&vm, 2, &moved).unwrap(), winner));
        // View 1 passed without a test-and-set: stale.
        let stale = c.test_and_set(&vm, 1, loser).unwrap();
        assert!(
            matches!(&stale, TasOutcome::Lost { reason: LossReason::Stale, view: v } if *v == view(3, winner, None)),
            "{stale:?}"
        );
        let outside = c.test_and_set(&vm, 3, &outsider).unwrap();
        assert!(
            matches!(
                outside,
                TasOutcome::Lost {
                    reason: LossReason::NotMember,
                    ..
                }
            ),
            "{outside:?}"
        );
        match c.test_and_set(&vm, 4, winner) {
            Err(ArbiterError::Rejected {
                kind: ErrorKind::Refused,
                ..
            }) => {}
            other => panic!("claim for a future view: {other:?}"),
        }
    }
    println!("{}: wins by a, b: {wins:?}", backend.name);
}

fn backup_of_unacknowledged_view_cannot_win(backend: &Backend) {
    let c = &*backend.arbiter;
    let (a, b) = (member("a", 1), member("b", 2));
    let vm = "unacked";
    c.ping(vm, &a, 0).unwrap();
    c.ping(vm, &b, 0).unwrap();
    assert_eq!(c.ping(vm, &a, 1).unwrap(), view(2, &a, Some(&b)));
    let refused = c.test_and_set(vm, 2, &b).unwrap();
    assert!(
        matches!(
            refused,
            TasOutcome::Lost {
                reason: LossReason::Unacknowledged,
                ..
            }
        ),
        "{refused:?}"
    );
    // The primary holds the state, so its claim stands unacknowledged.
    assert_eq!(
        c.test_and_set(vm, 2, &a).unwrap(),
        TasOutcome::Won {
            view: view(3, &a, None)
        }
    );
    assert!(lost_to(&c.test_and_set(vm, 2, &b).unwrap(), &a));
}

fn losers_and_the_displaced_are_never_named_backup(backend: &Backend) {
    let c = &*backend.arbiter;
    let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
    let vm = "displaced";
    pair(c, vm, &a, &b);
    assert_eq!(c.ping(vm, &s, 0).unwrap(), view(2, &a, Some(&b)));
    assert!(c.test_and_set(vm, 2, &b).unwrap().won());
    // a, displaced, learns the current number and pings with it, after
    // s: it is the most recent, knows a view newer than the last won, and
    // still is not named, because b won by taking it for dead.
    assert_eq!(c.ping(vm, &a, 3).unwrap(), view(3, &b, None));
    assert_eq!(c.ping(vm, &b, 3).unwrap(), view(4, &b, Some(&s)));

    let vm = "loser";
    let (c2, c3) = (member("c", 4), member("c-new", 4));
    assert_eq!(c.ping(vm, &a, 0).unwrap(), view(1, &a, None));
    c.ping(vm, &c2, 0).unwrap();
    assert!(!c.test_and_set(vm, 1, &c2).unwrap().won());
    assert_eq!(c.ping(vm, &a, 1).unwrap(), view(1, &a, None));
    // Pinging again, with any number, does not make a loser a spare: it
    // halts, and comes back as a new incarnation with a new id.
    assert_eq!(c.ping(vm, &c2, 0).unwrap(), view(1, &a, None));
    assert_eq!(c.ping(vm, &c2, 1).unwrap(), view(1, &a, None));
    assert_eq!(c.ping(vm, &c3, 0).unwrap(), view(2, &a, Some(&c3)));
}

/// Issue 12: a member frozen (SIGSTOP) past the failure timeout, resumed
/// after the other won, pings with the view it knew; it must not be named
/// backup of the next view, which would then wait for a backup that exits.
fn a_resumed_loser_is_not_named_backup(backend: &Backend) {
    let c = &*backend.arbiter;
    let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
    let vm = "resumed";
    pair(c, vm, &a, &b);
    assert!(c.test_and_set(vm, 2, &b).unwrap().won());
    assert_eq!(c.ping(vm, &b, 3).unwrap(), view(3, &b, None));
    // a resumes: pings before its own claim is refused, then with the
    // number it was answered, then claims and loses.
    assert_eq!(c.ping(vm, &a, 2).unwrap(), view(3, &b, None));
    assert_eq!(c.ping(vm, &b, 3).unwrap(), view(3, &b, None));
    assert_eq!(c.ping(vm, &a, 3).unwrap(), view(3, &b, None));
    assert_eq!(c.ping(vm, &b, 3).unwrap(), view(3, &b, None));
    assert!(lost_to(&c.test_and_set(vm, 2, &a).unwrap(), &b));
    assert_eq!(c.ping(vm, &b, 3).unwrap(), view(3, &b, None));
    // A real spare started afterwards is named.
    assert_eq!(c.ping(vm, &s, 0).unwrap(), view(4, &b, Some(&s)));
}

fn the_most_recent_spare_is_named(backend: &Backend) {
    let c = &*backend.arbiter;
    let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
    let vm = "recent";
    c.ping(vm, &a, 0).unwrap();
    c.ping(vm, &b, 0).unwrap();
    c.ping(vm, &s, 0).unwrap();
    assert_eq!(c.ping(vm, &a, 1).unwrap(), view(2, &a, Some(&s)));
}

fn dead_spares_are_not_named(backend: &Backend) {
    let c = &*backend.arbiter;
    let (a, b) = (member("a", 1), member("b", 2));
    let vm = "dead-spare";
    c.ping(vm, &a, 0).unwrap();
    c.ping(vm, &b, 0).unwrap();
    thread::sleep(backend.past_liveness);
    assert_eq!(c.ping(vm, &a, 1).unwrap(), view(1, &a, None));
    // Alive again, it is named.
    assert_eq!(c.ping(vm, &b, 0).unwrap(), view(2, &a, Some(&b)));
}

/// The other half of issue 12: a view whose named backup is gone before
/// its primary vouched for it must not wait for it forever. The primary
/// still has to have seen the view (6.824's acknowledgement) before the
/// arbiter moves on.
fn a_gone_backup_is_replaced_once_its_primary_has_seen_the_view(backend: &Backend) {
    let c = &*backend.arbiter;
    let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
    let vm = "gone-backup";
    assert_eq!(c.ping(vm, &a, 0).unwrap(), view(1, &a, None));
    assert_eq!(c.ping(vm, &b, 0).unwrap(), view(1, &a, None));
    assert_eq!(c.ping(vm, &a, 1).unwrap(), view(2, &a, Some(&b)));
    // b never comes up; s is started and keeps pinging.
    let deadline = Instant::now() + backend.past_liveness;
    while Instant::now() < deadline {
        assert_eq!(c.ping(vm, &s, 0).unwrap(), view(2, &a, Some(&b)));
        // a has not seen view 2: nothing moves, however long b is gone.
        assert_eq!(c.ping(vm, &a, 1).unwrap(), view(2, &a, Some(&b)));
        thread::sleep(Duration::from_millis(50));
    }
    // a has seen view 2 but does not vouch for b.
    assert_eq!(c.ping_seen(vm, &a, 2).unwrap(), view(3, &a, Some(&s)));
    // b, resumed, claims a view that is gone.
    assert!(matches!(
        c.test_and_set(vm, 2, &b).unwrap(),
        TasOutcome::Lost {
            reason: LossReason::Stale,
            ..
        }
    ));
    // s is alive: the view waits for a to vouch for it.
    assert_eq!(c.ping(vm, &s, 0).unwrap(), view(3, &a, Some(&s)));
    assert_eq!(c.ping_seen(vm, &a, 3).unwrap(), view(3, &a, Some(&s)));
    let refused = c.test_and_set(vm, 3, &s).unwrap();
    assert!(
        matches!(
            refused,
            TasOutcome::Lost {
                reason: LossReason::Unacknowledged,
                ..
            }
        ),
        "seen is not vouched for: {refused:?}"
    );
}

fn bad_names_are_refused(backend: &Backend) {
    let c = &*backend.arbiter;
    let long = member(&"x".repeat(257), 1);
    let malformed = |result: Result<View, ArbiterError>| {
        matches!(
            result,
            Err(ArbiterError::Rejected {
                kind: ErrorKind::Malformed,
                ..
            })
        )
    };
    assert!(malformed(c.query("")));
    assert!(malformed(c.ping("", &member("a", 1), 0)));
    assert!(malformed(c.ping("names", &long, 0)));
    assert!(matches!(
        c.test_and_set("names", 0, &long),
        Err(ArbiterError::Rejected {
            kind: ErrorKind::Malformed,
            ..
        })
    ));
    // Any other byte is a name like any other, kept apart from the rest.
    let odd = "a/b%2F c\u{e9}";
    let a = member("a/1", 1);
    assert_eq!(c.ping(odd, &a, 0).unwrap(), view(1, &a, None));
    assert_eq!(c.query("a").unwrap(), View::default());
    assert_eq!(c.query("a%2Fb%2F c\u{e9}").unwrap(), View::default());
}

/// Spares and a primary hammer one VM at once: the primary acknowledges,
/// and claims its view as soon as it has a backup (dropping it), so that
/// spare after spare is named. Every answer any of them got is a view the
/// arbiter made: one view per number, the numbers without gaps, the
/// primary always the same, and no spare named twice (a displaced one is
/// retired, however it keeps pinging).
fn concurrent_requests_number_views_once(backend: &Backend) {
    let vm = "concurrent";
    let a = member("a", 1);
    assert_eq!(backend.arbiter.ping(vm, &a, 0).unwrap(), view(1, &a, None));
    let spares: Vec<Member> = (0..6).map(|k| member(&format!("s{k}"), 10 + k)).collect();
    let start = Arc::new(Barrier::new(spares.len() + 1));
    let mut threads = Vec::new();
    for spare in spares.clone() {
        let (c, start) = (Arc::clone(&backend.arbiter), Arc::clone(&start));
        threads.push(thread::spawn(move || {
            start.wait();
            let mut known = 0;
            let mut seen = Vec::new();
            for _ in 0..40 {
                let v = c.ping(vm, &spare, known).unwrap();
                known = v.number;
                seen.push(v);
            }
            seen
        }));
    }
    let primary = {
        let (c, start, a) = (Arc::clone(&backend.arbiter), Arc::clone(&start), a.clone());
        thread::spawn(move || {
            start.wait();
            let mut known = 1;
            let mut seen = Vec::new();
            for _ in 0..60 {
                let v = c.ping(vm, &a, known).unwrap();
                known = v.number;
                if v.backup.is_some() {
                    let won = c.test_and_set(vm, v.number, &a).unwrap();
                    assert!(won.won(), "{won:?}");
                    known = won.view().number;
                    seen.push(won.view().clone());
                }
                seen.push(v);
            }
            seen
        })
    };
    threads.push(primary);
    let mut by_number: BTreeMap<u64, View> = BTreeMap::new();
    for seen in threads.into_iter().map(|t| t.join().unwrap()) {
        for v in seen {
            assert_eq!(v.primary.as_ref(), Some(&a), "{v}");
            let first = by_number.entry(v.number).or_insert_with(|| v.clone());
            assert_eq!(*first, v, "two views numbered {}", v.number);
        }
    }
    let numbers: Vec<u64> = by_number.keys().copied().collect();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
    let named: Vec<&str> = by_number
        .values()
        .filter_map(|v| v.backup.as_ref().map(|b| b.id.as_str()))
        .collect();
    let distinct: std::collections::BTreeSet<&&str> = named.iter().collect();
    assert_eq!(
        distinct.len(),
        named.len(),
        "a spare named twice: {named:?}"
    );
    assert!(named.len() >= 2, "too few spares named: {named:?}");
    println!("{}: views {numbers:?}, named {named:?}", backend.name);
}

/// The random histories of [`random_history`], four of them.
fn random_histories_keep_the_invariants(backend: &Backend) {
    let seed = random_seed();
    for round in 0..4 {
        random_history(
            &format!("random{round}"),
            seed.wrapping_add(round),
            &mut |_| Arc::clone(&backend.arbiter),
        );
    }
}
