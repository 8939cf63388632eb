//! Primary/backup fault tolerance with real processes on loopback: an
//! arbiter, a primary, a backup, clients that find the primary through the
//! arbiter; failures injected by SIGKILL, by partitioning or slowing the
//! log channel, and by freezing a server; stops on purpose that are not
//! failures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_core::host::events::{unix_ns, ServerEvent, ServerRole};
use ftvm_harness::history::{Clock, Recorder};
use ftvm_harness::launcher::{Cluster, ClusterConfig, Guest, Knobs};
use ftvm_harness::linearizability::{check, CheckConfig, Overall};
use ftvm_kvclient::{ClientConfig, KvClient};
use ftvm_tests::load::{
    assert_primary_alone_with, check_no_acknowledged_write_lost, client, pair_with_a_write,
    run_load, seed,
};
use ftvm_tests::{
    assert_one_primary_per_view, cluster_config, fault_tolerant_cluster, kvm_available,
    start_cluster, vm_lock, VM_ID,
};
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};

#[test]
fn killing_the_primary_mid_load_loses_no_acknowledged_write() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    for round in 0..3 {
        let seed = seed();
        eprintln!("round {round}: FTVM_TEST_SEED={seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let kill_after = Duration::from_millis(rng.random_range(200..1500));
        let mut cluster = fault_tolerant_cluster(&cluster_config());
        let stop = Arc::new(AtomicBool::new(false));
        let arbiter = cluster.arbiter_addr();
        let history = Arc::new(Recorder::new(Clock::start()));
        let load = {
            let (stop, history) = (stop.clone(), history.clone());
            std::thread::spawn(move || run_load(arbiter, 3, stop, history))
        };
        std::thread::sleep(kill_after);
        let killed_at = Instant::now();
        cluster.primary.kill();
        let live = cluster
            .backup
            .wait_event("live", Duration::from_secs(10), |e| {
                matches!(e, ServerEvent::Live { .. })
            })
            .expect("the backup goes live");
        assert_eq!(
            live.event,
            ServerEvent::Live { view: 3 },
            "the backup goes live as primary of view 3"
        );
        std::thread::sleep(Duration::from_millis(800));
        stop.store(true, Ordering::SeqCst);
        let logs = load.join().expect("load");
        let acked = check_no_acknowledged_write_lost(arbiter, &logs, &history);
        assert!(acked > 0, "the load acknowledged nothing");
        let report = check(&history.snapshot(), &CheckConfig::default());
        assert_eq!(
            report.overall,
            Overall::Linearizable,
            "{}",
            report.explain()
        );
        eprintln!(
            "round {round}: {acked} acknowledged appends checked, failover in {:?}",
            killed_at.elapsed()
        );
        assert_one_primary_per_view(&cluster);
    }
}

#[test]
fn killing_the_backup_leaves_the_primary_serving() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (mut cluster, mut kv) = pair_with_a_write();
    cluster.backup.kill();
    kv.put(b"after", b"2").expect("the primary keeps serving");
    assert_primary_alone_with(&mut cluster, &mut kv, b"after", b"2");
}

/// Stops thread `tid` with ptrace, at a moment it waits in the kernel
/// (in KVM_RUN, or on a futex) rather than runs its own code, where it
/// might hold a lock of the log channel's and so, stopped, silence the
/// channel's other threads too: that would be a silent backup, not a
/// stalled replay.
fn stop_waiting_thread(tid: Pid) {
    const IOCTL: u64 = 16;
    const FUTEX: u64 = 202;
    ptrace::seize(tid, ptrace::Options::empty()).expect("seize");
    loop {
        ptrace::interrupt(tid).expect("interrupt");
        waitpid(tid, Some(WaitPidFlag::__WALL)).expect("the thread stops");
        let syscall = std::fs::read_to_string(format!("/proc/{tid}/syscall")).unwrap_or_default();
        let nr = syscall
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok());
        if matches!(nr, Some(IOCTL | FUTEX)) {
            return;
        }
        ptrace::cont(tid, None).expect("resume");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_backup_whose_replay_stalls_while_its_connection_lives_is_given_up() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (mut cluster, mut kv) = pair_with_a_write();
    // Stop the backup's vCPU thread alone (its main thread): ptrace stops
    // one thread, where SIGSTOP would stop the process and so its acks and
    // heartbeats, which is the silence the partition test covers. Its
    // channel threads go on answering; only its replay stalls.
    let vcpu = Pid::from_raw(cluster.backup.pid() as i32);
    stop_waiting_thread(vcpu);
    let stopped = Instant::now();
    // The primary keeps running into its window and lag bound, and gives
    // the backup up once its replay has stood still for the failure
    // timeout with entries to replay.
    kv.put(b"during", b"2")
        .expect("the primary serves again on its own");
    let failure = cluster
        .primary
        .wait_event("failure_detected", Duration::from_secs(10), |e| {
            matches!(e, ServerEvent::FailureDetected { .. })
        })
        .expect("the primary gives its backup up");
    assert!(
        matches!(&failure.event, ServerEvent::FailureDetected { detail, .. } if detail.contains("replay has stood still")),
        "{failure:?}"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "given up after {:?}",
        stopped.elapsed()
    );
    assert_primary_alone_with(&mut cluster, &mut kv, b"during", b"2");

    // Resumed, the backup finds its primary gone on alone: deposed, or
    // after a claim it loses, it exits 4.
    let _ = ptrace::detach(vcpu, None);
    let status = cluster
        .backup
        .wait_exit(Duration::from_secs(20))
        .expect("the backup ends");
    assert_eq!(status.code(), Some(4), "{}", cluster.backup.log());
    assert!(cluster.primary.running());
    assert_one_primary_per_view(&cluster);
}

#[test]
fn a_partitioned_pair_has_exactly_one_survivor_and_clients_never_see_two_primaries() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut cluster = fault_tolerant_cluster(&ClusterConfig {
        proxy: true,
        ..cluster_config()
    });
    let mut kv = client(cluster.arbiter_addr());
    kv.put(b"k", b"before").expect("put");
    // Probe both service addresses throughout: after the cut, at most one
    // of them may ever answer.
    let answered: Arc<Mutex<HashMap<SocketAddr, u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = [&cluster.primary, &cluster.backup]
        .into_iter()
        .map(|server| server.address().expect("a service address"))
        .map(|addr| {
            let (answered, stop) = (answered.clone(), stop.clone());
            std::thread::spawn(move || {
                let config = ClientConfig {
                    attempt_timeout: Duration::from_millis(100),
                    max_attempts: 1,
                };
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(mut c) = KvClient::connect(addr, config) {
                        if c.get(b"k").is_ok() {
                            *answered.lock().expect("lock").entry(addr).or_default() += 1;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    cluster.proxy.as_ref().expect("proxy").partition();
    // Replies the primary released before the cut (acknowledged by then)
    // may still be on their way; after this, neither side can release an
    // output until one of them wins test-and-set (300 ms of silence away).
    std::thread::sleep(Duration::from_millis(100));
    answered.lock().expect("lock").clear();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut p_done, mut b_done) = (None, None);
    while Instant::now() < deadline && (p_done.is_none() && b_done.is_none()) {
        if let Some(s) = cluster.primary.exited() {
            p_done = Some(s);
        }
        if let Some(s) = cluster.backup.exited() {
            b_done = Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for p in probes {
        p.join().expect("probe");
    }
    let loser_exited_4 = [p_done, b_done]
        .iter()
        .flatten()
        .any(|s| s.code() == Some(4));
    assert!(
        loser_exited_4,
        "exactly one side must lose test-and-set and exit 4\nprimary:\n{}\nbackup:\n{}",
        cluster.primary.log(),
        cluster.backup.log()
    );
    let survivors = [cluster.primary.running(), cluster.backup.running()];
    assert_eq!(
        survivors.iter().filter(|r| **r).count(),
        1,
        "exactly one survivor"
    );
    let answered = answered.lock().expect("lock").clone();
    assert!(
        answered.len() <= 1,
        "two primaries answered clients after the partition: {answered:?}"
    );
    let mut kv = client(cluster.arbiter_addr());
    assert_eq!(
        kv.get(b"k").expect("the survivor serves").as_deref(),
        Some(&b"before"[..])
    );
    assert_one_primary_per_view(&cluster);
}

#[test]
fn with_the_arbiter_unreachable_the_backup_does_not_go_live() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut cluster = fault_tolerant_cluster(&cluster_config());
    cluster.arbiter.kill();
    cluster.primary.kill();
    let status = cluster
        .backup
        .wait_exit(Duration::from_secs(20))
        .expect("the backup ends");
    assert_eq!(status.code(), Some(5), "stderr:\n{}", cluster.backup.log());
    assert!(cluster
        .backup
        .has_event(|e| matches!(e, ServerEvent::ArbiterUnreachable { .. })));
    assert!(
        !cluster
            .backup
            .has_event(|e| matches!(e, ServerEvent::Live { .. })),
        "the backup went live without the arbiter"
    );
}

#[test]
fn a_restarted_arbiter_keeps_its_decisions() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut cluster = fault_tolerant_cluster(&cluster_config());
    let old_primary = arbiter::ArbiterClient::new(cluster.arbiter_addr())
        .query(VM_ID)
        .expect("query")
        .primary
        .expect("a primary");
    cluster.primary.kill();
    cluster
        .backup
        .wait_event("live", Duration::from_secs(10), |e| {
            matches!(e, ServerEvent::Live { .. })
        })
        .expect("the backup goes live");
    cluster.restart_arbiter().expect("the arbiter starts again");
    let arbiter = arbiter::ArbiterClient::new(cluster.arbiter_addr());
    let view = arbiter.query(VM_ID).expect("query after restart");
    assert_eq!(view.number, 3);
    assert_eq!(view.primary.as_ref().map(|p| p.id.as_str()), Some("backup"));
    // The old primary, had it survived a partition, would claim view 2 now:
    // the restarted arbiter must give it the decision it made before.
    let outcome = arbiter.test_and_set(VM_ID, 2, &old_primary).expect("claim");
    assert!(
        !outcome.won(),
        "the second decision must respect the first: {outcome:?}"
    );
    let mut kv = client(cluster.arbiter_addr());
    kv.put(b"still", b"serving")
        .expect("the new primary serves");
}

#[test]
fn a_backup_with_another_image_or_memory_size_is_refused_clearly() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let other = dir.path().join("other.elf");
    std::fs::write(&other, ftvm_core::machine::loader::flat_elf(&[0xf4])).expect("image");
    for (guest, needle) in [
        (
            Guest {
                kernel: Some(other.clone()),
                ..Guest::default()
            },
            "image",
        ),
        (
            Guest {
                mem: Some("128M".into()),
                ..Guest::default()
            },
            "mem",
        ),
    ] {
        let mut cluster = start_cluster(&ClusterConfig {
            backup_guest: Some(guest),
            ..cluster_config()
        });
        let status = cluster
            .backup
            .wait_exit(Duration::from_secs(30))
            .expect("the backup ends");
        assert_eq!(status.code(), Some(1));
        let err = cluster.backup.log();
        assert!(err.contains("mismatch") && err.contains(needle), "{err}");
        assert!(
            !cluster
                .primary
                .has_event(|e| matches!(e, ServerEvent::Status(_))),
            "the primary must not run without its backup"
        );
    }
}

/// A pair stopped on purpose is not a failure (docs/fault-tolerance.md,
/// "Stopping on purpose"): the backup says goodbye, and its primary goes on
/// alone through the arbiter without reporting a failure.
#[test]
fn a_backup_stopped_on_purpose_is_not_taken_for_a_failed_one() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (mut cluster, mut kv) = pair_with_a_write();
    cluster.backup.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = cluster
        .backup
        .wait_exit(Duration::from_secs(10))
        .expect("the backup stops");
    assert_eq!(status.code(), Some(0), "{}", cluster.backup.log());
    cluster
        .primary
        .wait_event("peer_left", Duration::from_secs(10), |e| {
            matches!(
                e,
                ServerEvent::PeerLeft {
                    peer: ServerRole::Backup,
                    ..
                }
            )
        })
        .expect("the primary hears the goodbye");
    kv.put(b"after", b"2").expect("the primary keeps serving");
    assert_primary_alone_with(&mut cluster, &mut kv, b"after", b"2");
    assert!(
        !cluster
            .primary
            .has_event(|e| matches!(e, ServerEvent::FailureDetected { .. })),
        "a backup that stopped on purpose was reported failed"
    );
}

#[test]
fn a_primary_stopped_on_purpose_stops_its_backup_without_a_claim() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (mut cluster, _kv) = pair_with_a_write();
    let status = cluster
        .primary
        .stop(Duration::from_secs(10))
        .expect("the primary stops");
    assert_eq!(status.code(), Some(0), "{}", cluster.primary.log());
    let status = cluster
        .backup
        .wait_exit(Duration::from_secs(10))
        .expect("the backup stops with it");
    assert_eq!(status.code(), Some(0), "{}", cluster.backup.log());
    assert_no_takeover(&cluster);
}

#[test]
fn a_pair_given_the_same_time_limit_stops_without_a_takeover() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut cluster = fault_tolerant_cluster(&ClusterConfig {
        time_limit: Duration::from_secs(5),
        ..cluster_config()
    });
    let mut kv = client(cluster.arbiter_addr());
    kv.put(b"k", b"v").expect("put");
    for server in [&mut cluster.primary, &mut cluster.backup] {
        let status = server
            .wait_exit(Duration::from_secs(20))
            .expect("the time limit stops it");
        assert_eq!(status.code(), Some(0), "{}", server.log());
    }
    assert_no_takeover(&cluster);
}

/// Neither server reported a failure or claimed, and the arbiter still has
/// the pair's view.
fn assert_no_takeover(cluster: &Cluster) {
    for server in [&cluster.primary, &cluster.backup] {
        assert!(
            !server.has_event(|e| matches!(
                e,
                ServerEvent::FailureDetected { .. }
                    | ServerEvent::Tas { .. }
                    | ServerEvent::Live { .. }
            )),
            "{} took over: {:?}",
            server.name(),
            server.events()
        );
    }
    let view = arbiter::ArbiterClient::new(cluster.arbiter_addr())
        .query(VM_ID)
        .expect("query");
    assert_eq!(view.number, 2, "{view:?}");
}

/// Replies from one server's service address, by when they came (Unix
/// nanoseconds, as the events file has them), probed until `stop`.
fn probe(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let config = ClientConfig {
            attempt_timeout: Duration::from_millis(100),
            max_attempts: 1,
        };
        let mut replies = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if let Ok(mut c) = KvClient::connect(addr, config) {
                if c.get(b"before").is_ok() {
                    replies.push(unix_ns());
                }
            }
        }
        replies
    })
}

/// Every view the arbiter answers while `until` has not passed; the
/// backups they name.
fn backups_named(arbiter: SocketAddr, until: Instant) -> Vec<String> {
    let client = arbiter::ArbiterClient::new(arbiter);
    let mut named = Vec::new();
    while Instant::now() < until {
        if let Ok(view) = client.query(VM_ID) {
            named.extend(view.backup.map(|b| b.id));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    named
}

#[test]
fn a_frozen_primary_releases_nothing_once_its_backup_has_gone_live() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    // The backup's acks take 250 ms to reach the primary, so that the ack
    // of a reply reaches it while it is frozen, as an ack read late does.
    // No lag bound, which would hold the primary for those acks.
    let mut cluster = fault_tolerant_cluster(&ClusterConfig {
        proxy: true,
        knobs: Knobs {
            max_lag_ms: Some(0.0),
            ..Knobs::default()
        },
        ..cluster_config()
    });
    let arbiter = cluster.arbiter_addr();
    let mut kv = client(arbiter);
    kv.put(b"before", b"1").expect("put");
    cluster
        .proxy
        .as_ref()
        .expect("proxy")
        .delay(Duration::from_millis(250), Duration::ZERO);
    let primary_addr = cluster.primary.address().expect("service address");
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Recorder::new(Clock::start()));
    let load = {
        let (stop, history) = (stop.clone(), history.clone());
        std::thread::spawn(move || run_load(arbiter, 2, stop, history))
    };
    let probing = probe(primary_addr, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    // A request whose reply the backup acknowledges at once...
    let held = std::thread::spawn(move || {
        let config = ClientConfig {
            attempt_timeout: Duration::from_secs(5),
            max_attempts: 1,
        };
        let mut c = KvClient::connect(primary_addr, config).expect("client");
        c.put(b"frozen", b"1").is_ok()
    });
    std::thread::sleep(Duration::from_millis(50));
    // ... and a primary frozen before that ack arrives, for longer than
    // the failure timeout: the backup takes over.
    cluster.primary.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let live = cluster
        .backup
        .wait_event("live", Duration::from_secs(10), |e| {
            matches!(e, ServerEvent::Live { .. })
        })
        .expect("the backup goes live");
    std::thread::sleep(Duration::from_millis(200));
    // Resumed, the primary finds the reply's ack in its socket; it must ask
    // the arbiter before releasing it, and learn that it was deposed.
    cluster.primary.signal(Signal::SIGCONT).expect("SIGCONT");
    let named = backups_named(arbiter, Instant::now() + Duration::from_secs(2));
    let status = cluster
        .primary
        .wait_exit(Duration::from_secs(10))
        .expect("the deposed primary stops");
    assert!(
        !held.join().expect("the held request"),
        "the deposed primary released a reply after its backup went live"
    );
    stop.store(true, Ordering::SeqCst);
    let late = probing
        .join()
        .expect("probe")
        .into_iter()
        .filter(|t| *t >= live.t_ns)
        .count();
    assert_eq!(
        late, 0,
        "the old primary answered after the backup went live"
    );
    assert_eq!(status.code(), Some(4), "{}", cluster.primary.log());
    assert!(
        cluster
            .primary
            .has_event(|e| matches!(e, ServerEvent::Deposed { .. })),
        "{:?}",
        cluster.primary.events()
    );
    // A server that lost its place is nobody's backup.
    assert!(
        !named.iter().any(|b| b == "primary"),
        "the deposed primary was named backup: {named:?}"
    );
    let logs = load.join().expect("load");
    let acked = check_no_acknowledged_write_lost(arbiter, &logs, &history);
    assert!(acked > 0, "the load acknowledged nothing");
    let report = check(&history.snapshot(), &CheckConfig::default());
    assert_eq!(
        report.overall,
        Overall::Linearizable,
        "{}",
        report.explain()
    );
    assert_one_primary_per_view(&cluster);
}

#[test]
fn a_primary_frozen_under_load_never_answers_after_its_backup_went_live() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    for round in 0..2 {
        let (mut cluster, _kv) = pair_with_a_write();
        let arbiter = cluster.arbiter_addr();
        let primary_addr = cluster.primary.address().expect("service address");
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Recorder::new(Clock::start()));
        let load = {
            let (stop, history) = (stop.clone(), history.clone());
            std::thread::spawn(move || run_load(arbiter, 3, stop, history))
        };
        let probing = probe(primary_addr, stop.clone());
        std::thread::sleep(Duration::from_millis(500));
        cluster.primary.signal(Signal::SIGSTOP).expect("SIGSTOP");
        let live = cluster
            .backup
            .wait_event("live", Duration::from_secs(10), |e| {
                matches!(e, ServerEvent::Live { .. })
            })
            .expect("the backup goes live");
        std::thread::sleep(Duration::from_millis(200));
        cluster.primary.signal(Signal::SIGCONT).expect("SIGCONT");
        let status = cluster
            .primary
            .wait_exit(Duration::from_secs(10))
            .expect("the replaced primary stops");
        assert_eq!(status.code(), Some(4), "{}", cluster.primary.log());
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let late = probing
            .join()
            .expect("probe")
            .into_iter()
            .filter(|t| *t >= live.t_ns)
            .count();
        assert_eq!(
            late, 0,
            "round {round}: the old primary answered after the backup went live"
        );
        let logs = load.join().expect("load");
        let acked = check_no_acknowledged_write_lost(arbiter, &logs, &history);
        assert!(acked > 0, "the load acknowledged nothing");
        assert_one_primary_per_view(&cluster);
    }
}

/// What counts as a failure (docs/fault-tolerance.md): a link that delays
/// every byte 150 ms each way, a round trip as long as the failure timeout,
/// loses nothing and silences nobody, so nobody fails over.
#[test]
fn a_slow_link_is_not_taken_for_a_dead_backup() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut cluster = start_cluster(&ClusterConfig {
        proxy: true,
        ..cluster_config()
    });
    cluster
        .proxy
        .as_ref()
        .expect("proxy")
        .delay(Duration::from_millis(150), Duration::from_millis(150));
    cluster
        .wait_fault_tolerant(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let arbiter = cluster.arbiter_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Recorder::new(Clock::start()));
    let load = {
        let (stop, history) = (stop.clone(), history.clone());
        std::thread::spawn(move || run_load(arbiter, 2, stop, history))
    };
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::SeqCst);
    let logs = load.join().expect("load");
    for server in [&mut cluster.primary, &mut cluster.backup] {
        assert!(server.running(), "{}", server.log());
        assert!(
            !server.has_event(|e| matches!(
                e,
                ServerEvent::FailureDetected { .. } | ServerEvent::Tas { .. }
            )),
            "{} failed over on a slow link: {:?}",
            server.name(),
            server.events()
        );
    }
    let acked = check_no_acknowledged_write_lost(arbiter, &logs, &history);
    assert!(acked > 0, "the load acknowledged nothing");
}
