//! The client load of the failover tests: appends whose acknowledgements
//! are recorded, and the checks that none of them was lost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_core::host::events::ServerEvent;
use ftvm_core::machine::workload::Workload;
use ftvm_harness::history::{Clock, OpKind, Recorder};
use ftvm_harness::launcher::Cluster;
use ftvm_kvclient::{ClientConfig, FailoverClient, FailoverConfig, KvClient, ServerSource};
use rand::Rng;

use crate::{assert_one_primary_per_view, cluster_config, fault_tolerant_cluster, VM_ID};

pub fn client(arbiter: SocketAddr) -> FailoverClient {
    FailoverClient::new(
        ServerSource::arbiter(arbiter, VM_ID),
        FailoverConfig::with_total_timeout(Duration::from_secs(20)),
    )
    .expect("client")
}

pub fn seed() -> u64 {
    std::env::var("FTVM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// One client's appends to one of its own keys, which record exactly which
/// writes were acknowledged: the final value must hold every one of them,
/// in order, and nothing but them, except possibly the one append whose
/// acknowledgement was lost when the load stopped.
pub struct AppendLog {
    pub key: Vec<u8>,
    pub acked: Vec<Vec<u8>>,
}

/// Appends per key, well under the guest's 1024-byte value limit.
pub const APPENDS_PER_KEY: u32 = 40;
/// The time between one client's appends: 250 a second, about the rate
/// these tests were written at (the service at CPL0 answered about 1,000
/// a second in all). At the CPL3 service's full speed the load would open
/// a key every few milliseconds and fill the guest's 1,024 keys within
/// seconds of a long test (then every append is refused as Busy).
pub const APPEND_PACE: Duration = Duration::from_millis(4);

pub fn run_load(
    arbiter: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
    history: Arc<Recorder>,
) -> Vec<AppendLog> {
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, history) = (stop.clone(), history.clone());
            std::thread::spawn(move || {
                let mut kv = client(arbiter);
                let mut logs: Vec<AppendLog> = Vec::new();
                let mut i = 0u32;
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    // Behind after a failover's pause: go on from now, no burst.
                    next = (next + APPEND_PACE).max(Instant::now());
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    if i.is_multiple_of(APPENDS_PER_KEY) {
                        logs.push(AppendLog {
                            key: format!("client-{c}-{}", i / APPENDS_PER_KEY).into_bytes(),
                            acked: Vec::new(),
                        });
                    }
                    let piece = format!("<{c}.{i}>").into_bytes();
                    let Some(log) = logs.last_mut() else { break };
                    let op = history.invoke(c as u64, &log.key, OpKind::Append, &piece);
                    match kv.append(&log.key, &piece) {
                        Ok(()) => {
                            let server = kv.last_answer().map(|a| a.from).unwrap_or(arbiter);
                            history.complete(op, None, server);
                            log.acked.push(piece);
                        }
                        Err(e) => panic!("client {c}: append {i} failed: {e}"),
                    }
                    i += 1;
                }
                logs
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect()
}

pub fn check_no_acknowledged_write_lost(
    arbiter: SocketAddr,
    logs: &[AppendLog],
    history: &Recorder,
) -> usize {
    let mut kv = client(arbiter);
    let mut checked = 0;
    for log in logs {
        let op = history.invoke(u64::MAX, &log.key, OpKind::Get, b"");
        let read = kv.get(&log.key).expect("final read");
        history.complete(
            op,
            read.clone(),
            kv.last_answer().map(|a| a.from).unwrap_or(arbiter),
        );
        let value = read.unwrap_or_default();
        let expected: Vec<u8> = log.acked.concat();
        assert!(
            value.starts_with(&expected),
            "key {:?}: acknowledged appends missing or reordered\n expected prefix {:?}\n found {:?}",
            String::from_utf8_lossy(&log.key),
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(&value)
        );
        assert!(
            value.len() - expected.len() <= 16,
            "more than one unacknowledged append applied"
        );
        checked += log.acked.len();
    }
    checked
}

/// A pair running `workload` under three clients' appends (`run_load`),
/// whose primary is killed after `before_kill`; the load goes on for
/// `after_live` once the backup is live. Asserts that no acknowledged
/// append was lost and that no view had two primaries; returns how many
/// acknowledged appends were checked.
pub fn kill_the_primary_under_load(
    workload: Workload,
    before_kill: Duration,
    after_live: Duration,
) -> usize {
    let mut config = cluster_config();
    config.guest.workload = Some(workload);
    let mut cluster = fault_tolerant_cluster(&config);
    let arbiter = cluster.arbiter_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Recorder::new(Clock::start()));
    let load = {
        let (stop, history) = (stop.clone(), history.clone());
        std::thread::spawn(move || run_load(arbiter, 3, stop, history))
    };
    std::thread::sleep(before_kill);
    cluster.primary.kill();
    cluster
        .backup
        .wait_event("live", Duration::from_secs(15), |e| {
            matches!(e, ServerEvent::Live { .. })
        })
        .unwrap_or_else(|e| panic!("the backup goes live: {e:#}"));
    std::thread::sleep(after_live);
    stop.store(true, Ordering::SeqCst);
    let logs = load.join().expect("load");
    let checked = check_no_acknowledged_write_lost(arbiter, &logs, &history);
    assert!(checked > 0, "the load acknowledged nothing");
    assert_one_primary_per_view(&cluster);
    checked
}

/// A fault-tolerant pair, and a client that has written `before` = 1.
pub fn pair_with_a_write() -> (Cluster, FailoverClient) {
    let cluster = fault_tolerant_cluster(&cluster_config());
    let mut kv = client(cluster.arbiter_addr());
    kv.put(b"before", b"1").expect("put");
    (cluster, kv)
}

/// The primary won test-and-set, serves alone, and has both the write
/// made before the backup failed and `key` = `value` made after.
pub fn assert_primary_alone_with(
    cluster: &mut Cluster,
    kv: &mut FailoverClient,
    key: &[u8],
    value: &[u8],
) {
    let tas = cluster
        .primary
        .wait_event("tas", Duration::from_secs(10), |e| {
            matches!(e, ServerEvent::Tas { .. })
        })
        .expect("the primary asks for test-and-set");
    assert!(
        matches!(tas.event, ServerEvent::Tas { won: true, .. }),
        "{tas:?}"
    );
    assert_eq!(kv.get(b"before").expect("get").as_deref(), Some(&b"1"[..]));
    assert_eq!(kv.get(key).expect("get").as_deref(), Some(value));
    assert!(cluster.primary.running());
    assert_one_primary_per_view(cluster);
}

/// Three clients' puts, appends and gets on a plain server, `requests`
/// each, over ten keys apiece.
pub fn mixed_clients(service: SocketAddr, requests: u32) {
    let handles: Vec<_> = (0..3)
        .map(|c| {
            std::thread::spawn(move || {
                let mut kv = KvClient::connect(service, ClientConfig::default()).expect("client");
                for i in 0..requests {
                    let key = format!("c{c}-{}", i % 10);
                    match i % 3 {
                        0 => kv
                            .put(key.as_bytes(), format!("v{i}").as_bytes())
                            .expect("put"),
                        1 => kv.append(key.as_bytes(), b"+").expect("append"),
                        _ => {
                            kv.get(key.as_bytes()).expect("get");
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client");
    }
}
