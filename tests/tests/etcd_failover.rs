//! Fault tolerance with the arbiter on a real 3-member etcd cluster
//! (`--arbiter etcd://...`), real `ftvm` processes on loopback: the etcd
//! leader killed with the primary, etcd's quorum lost with it, and the log
//! channel cut between a live primary and a live backup.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::etcd::cluster::{ClusterConfig as EtcdConfig, LocalCluster};
use arbiter::ArbiterAddr;
use ftvm_core::host::events::ServerEvent;
use ftvm_harness::launcher::{
    free_tcp_addr, ArbiterKind, Cluster, ClusterConfig, Guest, Knobs, Membership, Process, Role,
    ServerConfig,
};
use ftvm_kvclient::{ClientConfig, FailoverClient, FailoverConfig, KvClient, ServerSource};
use ftvm_tests::{
    assert_one_primary_per_view, cluster_config, fault_tolerant_cluster, free_udp, kvm_available,
    launcher, vm_lock, VMM_TIME_LIMIT, VM_ID,
};

/// The servers' failure timeout (their default).
const FAILURE_TIMEOUT: Duration = Duration::from_millis(300);
/// etcd's default election timeout, which these clusters keep.
const ELECTION: Duration = Duration::from_millis(1000);
/// How long a server keeps trying an unreachable arbiter before it gives
/// up (`ARBITER_PATIENCE` in ftvm-core, docs/fault-tolerance.md).
const ARBITER_PATIENCE: Duration = Duration::from_secs(5);

fn etcd_cluster_config() -> ClusterConfig {
    ClusterConfig {
        arbiter: ArbiterKind::Etcd(EtcdConfig::new(VMM_TIME_LIMIT)),
        ..cluster_config()
    }
}

fn etcd(cluster: &Cluster) -> &LocalCluster {
    cluster.arbiter.etcd().expect("the pair runs on etcd")
}

fn client(arbiter: &ArbiterAddr, vm_id: &str) -> FailoverClient {
    FailoverClient::new(
        ServerSource::arbiter_at(arbiter.clone(), vm_id),
        FailoverConfig::with_total_timeout(Duration::from_secs(20)),
    )
    .expect("client")
}

/// Appends per key, well under the guest's 1024-byte value limit.
const APPENDS_PER_KEY: u32 = 100;

/// Appends to keys `<prefix>-0`, `<prefix>-1`, ... until told to stop; for
/// each key, the appends acknowledged, in order.
fn appender(
    arbiter: ArbiterAddr,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut kv = client(&arbiter, VM_ID);
    let mut keys: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    let mut i = 0u32;
    while !stop.load(Ordering::SeqCst) {
        if i.is_multiple_of(APPENDS_PER_KEY) {
            keys.push((format!("{prefix}-{}", i / APPENDS_PER_KEY), Vec::new()));
        }
        let piece = format!("<{i}>").into_bytes();
        let Some((key, acked)) = keys.last_mut() else {
            break;
        };
        match kv.append(key.as_bytes(), &piece) {
            Ok(()) => acked.push(piece),
            Err(e) => panic!("append {i} to {key} failed: {e}"),
        }
        i += 1;
    }
    keys
}

#[test]
fn killing_the_etcd_leader_with_the_primary_loses_no_acknowledged_write() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut cluster = fault_tolerant_cluster(&etcd_cluster_config());
    let arbiter = cluster.arbiter_at();
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|prefix| {
            let (arbiter, stop) = (arbiter.clone(), stop.clone());
            std::thread::spawn(move || appender(arbiter, prefix, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let leader = etcd(&cluster).leader().expect("etcd has a leader");
    let killed = Instant::now();
    cluster.primary.kill();
    etcd(&cluster).kill(leader).expect("the leader is killed");
    cluster
        .backup
        .wait_event("live", Duration::from_secs(20), |e| {
            matches!(e, ServerEvent::Live { .. })
        })
        .expect("the backup goes live");
    let live = killed.elapsed();
    // etcd picks each election timeout between one and two timeouts.
    let bound = FAILURE_TIMEOUT + ELECTION * 2 + Duration::from_secs(1);
    eprintln!(
        "live {live:?} after the kill of the primary and of {}",
        etcd(&cluster).name(leader)
    );
    assert!(
        live <= bound,
        "the backup went live {live:?} after the kill, more than {bound:?}\n{}",
        cluster.backup.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let mut kv = client(&arbiter, VM_ID);
    let mut checked = 0;
    for (key, acked) in loads
        .into_iter()
        .flat_map(|load| load.join().expect("the load"))
    {
        let value = kv
            .get(key.as_bytes())
            .expect("the new primary answers")
            .unwrap_or_default();
        let expected = acked.concat();
        assert!(
            value.starts_with(&expected),
            "{key}: acknowledged appends lost\n expected {:?}\n found {:?}",
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(&value)
        );
        checked += acked.len();
    }
    assert!(checked > 0, "nothing was acknowledged");
    eprintln!("{checked} acknowledged appends read back");
    assert_one_primary_per_view(&cluster);
}

/// Two of etcd's three members die with the primary: the backup cannot
/// win its claim, so it never goes live, never answers a client, and
/// exits 5 after trying for its patience. With the members back, a new
/// pair forms on the same etcd.
#[test]
fn without_etcd_quorum_the_backup_stays_down_and_a_new_pair_forms_later() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut cluster = fault_tolerant_cluster(&etcd_cluster_config());
    let arbiter = cluster.arbiter_at();
    client(&arbiter, VM_ID)
        .put(b"k", b"v")
        .expect("the pair answers");
    let backup_service = cluster.backup.address().expect("an address");
    let answered = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (answered, stop) = (answered.clone(), stop.clone());
        std::thread::spawn(move || probe(backup_service, &answered, &stop))
    };
    let leader = etcd(&cluster).leader().expect("etcd has a leader");
    let other = (leader + 1) % etcd(&cluster).members();
    // The quorum goes first: a backup that sees the primary's connection
    // close at once replays and claims within milliseconds, and must not
    // find etcd still answering.
    let killed = Instant::now();
    etcd(&cluster).kill(leader).expect("kill");
    etcd(&cluster).kill(other).expect("kill");
    cluster.primary.kill();
    let status = cluster
        .backup
        .wait_exit(Duration::from_secs(30))
        .expect("the backup ends");
    let waited = killed.elapsed();
    stop.store(true, Ordering::SeqCst);
    probe.join().expect("the probe");
    assert_eq!(status.code(), Some(5), "stderr:\n{}", cluster.backup.log());
    assert!(
        waited >= ARBITER_PATIENCE,
        "the backup gave up after {waited:?}, before its patience"
    );
    assert!(cluster
        .backup
        .has_event(|e| matches!(e, ServerEvent::ArbiterUnreachable { .. })));
    assert!(
        !cluster
            .backup
            .has_event(|e| matches!(e, ServerEvent::Live { .. })),
        "the backup went live without etcd's quorum"
    );
    assert_eq!(
        answered.load(Ordering::SeqCst),
        0,
        "a client got an answer from the backup"
    );

    etcd(&cluster).restart(leader).expect("restart");
    etcd(&cluster).restart(other).expect("restart");
    etcd(&cluster)
        .wait_for_leader(Duration::from_secs(30))
        .expect("etcd has a leader again");
    // The old VM's primary and backup are gone; a new pair is a new VM.
    let vm_id = "after-quorum";
    let dir = tempfile::tempdir().expect("dir");
    let (mut primary, mut backup) = start_pair(&arbiter, vm_id, dir.path());
    backup
        .wait_event("role", Duration::from_secs(60), |e| {
            matches!(e, ServerEvent::Role { .. })
        })
        .expect("the backup joins");
    primary
        .wait_event("backup connected", Duration::from_secs(60), |e| {
            matches!(
                e,
                ServerEvent::Role {
                    backup: Some(_),
                    ..
                }
            )
        })
        .expect("the new pair is fault tolerant");
    let mut kv = client(&arbiter, vm_id);
    kv.put(b"k", b"again").expect("the new pair answers");
    assert_eq!(kv.get(b"k").expect("get").as_deref(), Some(&b"again"[..]));
    primary.kill();
    backup.kill();
}

/// Counts the replies `addr` gives until `stop`.
fn probe(addr: SocketAddr, answered: &AtomicU32, stop: &AtomicBool) {
    let config = ClientConfig {
        attempt_timeout: Duration::from_millis(100),
        max_attempts: 1,
    };
    while !stop.load(Ordering::SeqCst) {
        if let Ok(mut c) = KvClient::connect(addr, config) {
            if c.get(b"k").is_ok() {
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// A primary and a backup of `vm_id` on the etcd at `arbiter`, their files
/// in `dir`; the backup is started once the primary has its role.
fn start_pair(arbiter: &ArbiterAddr, vm_id: &str, dir: &std::path::Path) -> (Process, Process) {
    let membership = Membership {
        arbiter: arbiter.clone(),
        vm_id: vm_id.into(),
        knobs: Knobs::default(),
    };
    let server = |name: &str, role: Role| {
        let mut config = ServerConfig::new(name, role, free_udp(), VMM_TIME_LIMIT);
        config.dir = Some(dir.to_owned());
        config.guest = Guest::default();
        launcher().start(&config).expect("the server starts")
    };
    let role = Role::Primary {
        membership: membership.clone(),
        log_listen: free_tcp_addr().expect("a free port"),
        log_advertise: None,
    };
    let mut primary = server("primary2", role);
    primary
        .wait_event("role", Duration::from_secs(60), |e| {
            matches!(e, ServerEvent::Role { .. })
        })
        .expect("the new primary takes its role");
    let backup = server("backup2", Role::Backup { membership });
    (primary, backup)
}

/// The log channel cut between a live primary and a live backup, with
/// etcd deciding: exactly one goes on, the other exits 4, and clients
/// never hear from both.
#[test]
fn a_partitioned_pair_on_etcd_has_exactly_one_survivor() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut cluster = fault_tolerant_cluster(&ClusterConfig {
        proxy: true,
        ..etcd_cluster_config()
    });
    let arbiter = cluster.arbiter_at();
    client(&arbiter, VM_ID).put(b"k", b"before").expect("put");
    let addrs = [
        cluster.primary.address().expect("address"),
        cluster.backup.address().expect("address"),
    ];
    cluster.proxy.as_ref().expect("proxy").partition();
    // What the primary released before the cut may still arrive; after
    // this neither side can release anything until one wins.
    std::thread::sleep(Duration::from_millis(100));
    let counts: Vec<Arc<AtomicU32>> = addrs.iter().map(|_| Arc::default()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = addrs
        .iter()
        .zip(&counts)
        .map(|(&addr, count)| {
            let (count, stop) = (count.clone(), stop.clone());
            std::thread::spawn(move || probe(addr, &count, &stop))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ended = None;
    while Instant::now() < deadline && ended.is_none() {
        for p in [&mut cluster.primary, &mut cluster.backup] {
            if let Some(status) = p.exited() {
                ended = Some((p.name().to_owned(), status));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for p in probes {
        p.join().expect("probe");
    }
    let (loser, status) = ended.expect("one side ends");
    assert_eq!(
        status.code(),
        Some(4),
        "{loser} must lose test-and-set and exit 4\nprimary:\n{}\nbackup:\n{}",
        cluster.primary.log(),
        cluster.backup.log()
    );
    let survivors = [cluster.primary.running(), cluster.backup.running()];
    assert_eq!(
        survivors.iter().filter(|r| **r).count(),
        1,
        "exactly one survivor"
    );
    let heard: Vec<u32> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert!(
        heard.iter().filter(|n| **n > 0).count() <= 1,
        "both sides answered clients after the cut: {heard:?}"
    );
    assert_eq!(
        client(&arbiter, VM_ID)
            .get(b"k")
            .expect("the survivor serves")
            .as_deref(),
        Some(&b"before"[..])
    );
    assert_one_primary_per_view(&cluster);
}
