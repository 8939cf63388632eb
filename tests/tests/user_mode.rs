//! The KV service as a user task at CPL3 (`--workload kv-user`): a
//! recording under load replays byte for byte, a changed trapped value in
//! user-mode code is caught, and a primary/backup pair fails over without
//! losing an acknowledged write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ftvm_core::host::events::ServerEvent;
use ftvm_core::machine::workload::Workload;
use ftvm_kvclient::{ClientConfig, KvClient};
use ftvm_tests::load::{client, mixed_clients};
use ftvm_tests::record_replay::{record_under_load, replay};
use ftvm_tests::tamper::{dump, kind, replay_entries};
use ftvm_tests::{
    assert_one_primary_per_view, cluster_config, fault_tolerant_cluster, kvm_available, vm_lock,
};

#[test]
fn kv_user_under_load_replays_byte_for_byte_and_a_changed_trap_is_caught() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let dir = tempfile::tempdir().expect("dir");
    let rec = record_under_load(dir.path(), Workload::KvUser, |service| {
        mixed_clients(service, 100);
        let mut kv = KvClient::connect(service, ClientConfig::default()).expect("client");
        kv.entropy(50).expect("entropy");
    });
    assert!(rec.console.contains("workload=kv-user"), "{}", rec.console);
    assert!(rec.frames.len() >= 301, "every request answered");

    let rep = replay(&rec.log, &[]);
    assert_eq!(rep.code, Some(0), "replay failed:\n{}", rep.stderr);
    assert!(
        rep.stderr.contains("every digest and output matched"),
        "{}",
        rep.stderr
    );
    assert_eq!(rep.console, rec.console, "console output must be identical");
    assert!(
        rep.frames == rec.frames,
        "reply frames must be identical byte for byte"
    );

    // The reply stamp's rdrand runs at CPL3, trapped by the `out` patch.
    let (header, mut entries) = dump(&rec.log);
    let at = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| kind(e) == "rdrand")
        .nth(100)
        .map(|(i, _)| i)
        .expect("more than 100 rdrand entries");
    entries[at]["event"]["value"] = serde_json::Value::from("0x5555");
    let edited = replay_entries(dir.path(), "edited", &header, &entries);
    assert_eq!(
        edited.code,
        Some(3),
        "the edit was not caught:\n{}",
        edited.stderr
    );
    assert!(
        edited.stderr.contains("first divergent entry"),
        "{}",
        edited.stderr
    );
}

#[test]
fn kv_user_pair_fails_over_under_load_and_loses_no_acknowledged_write() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let mut config = cluster_config();
    config.guest.workload = Some(Workload::KvUser);
    let mut cluster = fault_tolerant_cluster(&config);
    let arbiter = cluster.arbiter_addr();
    let stop = Arc::new(AtomicBool::new(false));
    // The service is fast enough here to fill a 1 KiB value in well under
    // a second, so each client moves to a new key every 150 appends.
    let load: Vec<_> = (0..3)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut kv = client(arbiter);
                let mut acked: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) && i < 20_000 {
                    let key = format!("client-{c}-{}", i / 150).into_bytes();
                    let piece = format!("<{}>", i % 150).into_bytes();
                    kv.append(&key, &piece)
                        .unwrap_or_else(|e| panic!("client {c}: append {i}: {e}"));
                    acked.entry(key).or_default().extend_from_slice(&piece);
                    i += 1;
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.primary.kill();
    cluster
        .backup
        .wait_event("live", Duration::from_secs(15), |e| {
            matches!(e, ServerEvent::Live { .. })
        })
        .unwrap_or_else(|e| panic!("the backup goes live: {e:#}"));
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let mut kv = client(arbiter);
    let mut checked = 0;
    for handle in load {
        for (key, expected) in handle.join().expect("client") {
            let value = kv.get(&key).expect("final read").unwrap_or_default();
            assert!(
                value.starts_with(&expected),
                "{}: acknowledged appends lost",
                String::from_utf8_lossy(&key)
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "the load acknowledged nothing");
    assert_one_primary_per_view(&cluster);
}
