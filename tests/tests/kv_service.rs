//! The KV guest served by a real `ftvm run` over UDP on loopback.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use ftvm_harness::launcher::Role;
use ftvm_kvclient::proto::{Op, Reply, Request, Status};
use ftvm_kvclient::{ClientConfig, KvClient};
use ftvm_tests::{ftvm, kvm_available, serve, stop, vm_lock};
use rand::{Rng, SeedableRng};

fn client(service: SocketAddr) -> KvClient {
    KvClient::connect(service, ClientConfig::default()).expect("client")
}

#[test]
fn boots_prints_a_banner_and_stops_cleanly_on_sigterm() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (mut vmm, _) = serve(Role::Run, &[]);
    let console = vmm.console();
    assert!(
        console.contains("ftvm-guest: booted"),
        "console:\n{console}"
    );
    let (status, stderr) = stop(&mut vmm);
    assert!(status.success(), "exit {status}, stderr:\n{stderr}");
    assert!(stderr.contains("stopped (Requested)"), "stderr:\n{stderr}");
}

#[test]
fn put_get_append_round_trip() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (mut vmm, service) = serve(Role::Run, &[]);
    let mut c = client(service);
    assert_eq!(c.get(b"missing").expect("get"), None);
    c.put(b"greeting", b"hello").expect("put");
    assert_eq!(
        c.get(b"greeting").expect("get").as_deref(),
        Some(&b"hello"[..])
    );
    c.append(b"greeting", b", world").expect("append");
    assert_eq!(
        c.get(b"greeting").expect("get").as_deref(),
        Some(&b"hello, world"[..])
    );
    c.append(b"fresh", b"abc").expect("append to a missing key");
    assert_eq!(c.get(b"fresh").expect("get").as_deref(), Some(&b"abc"[..]));
    let max = vec![b'v'; 1024];
    c.put(b"big", &max).expect("put 1024 bytes");
    assert!(
        c.append(b"big", b"x").is_err(),
        "append past 1024 bytes must be refused"
    );
    assert_eq!(c.get(b"big").expect("get").as_deref(), Some(&max[..]));
    let (status, stderr) = stop(&mut vmm);
    assert!(status.success(), "{stderr}");
}

#[test]
fn the_kv_command_prints_values_and_reports_missing_keys() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (_vmm, service) = serve(Role::Run, &[]);
    let server = service.to_string();
    let limit = Duration::from_secs(30);
    let put = ftvm(&["kv", "--server", &server, "put", "colour", "blue"], limit);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let append = ftvm(
        &["kv", "--server", &server, "append", "colour", "-green"],
        limit,
    );
    assert!(
        append.status.success(),
        "{}",
        String::from_utf8_lossy(&append.stderr)
    );
    let get = ftvm(&["kv", "--server", &server, "get", "colour"], limit);
    assert_eq!(get.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&get.stdout), "blue-green\n");
    let missing = ftvm(&["kv", "--server", &server, "get", "nothing"], limit);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

/// A request sent twice with the same number is executed once, and the
/// retry gets the stored reply byte for byte.
#[test]
fn a_retried_request_is_executed_once() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (_vmm, service) = serve(Role::Run, &[]);
    let sock = UdpSocket::bind("127.0.0.1:0").expect("socket");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let req = Request {
        op: Op::Append,
        client_id: 0x5eed_0001,
        request_num: 2,
        key: b"counter".to_vec(),
        value: b"+1".to_vec(),
    }
    .encode()
    .expect("encode");
    let mut replies = Vec::new();
    for _ in 0..3 {
        sock.send_to(&req, service).expect("send");
        let mut buf = [0u8; 2048];
        let (n, _) = sock.recv_from(&mut buf).expect("reply");
        replies.push(buf[..n].to_vec());
    }
    assert_eq!(replies[0], replies[1], "a retry must get the stored reply");
    assert_eq!(replies[0], replies[2]);
    let first = Reply::decode(&replies[0]).expect("decode");
    assert_eq!(first.status, Status::Ok);
    let mut c = client(service);
    assert_eq!(c.get(b"counter").expect("get").as_deref(), Some(&b"+1"[..]));

    let stale = Request {
        op: Op::Append,
        client_id: 0x5eed_0001,
        request_num: 1,
        key: b"counter".to_vec(),
        value: b"+1".to_vec(),
    };
    sock.send_to(&stale.encode().expect("encode"), service)
        .expect("send");
    let mut buf = [0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf).expect("reply");
    assert_eq!(
        Reply::decode(&buf[..n]).expect("decode").status,
        Status::Stale
    );
    assert_eq!(c.get(b"counter").expect("get").as_deref(), Some(&b"+1"[..]));
}

/// 2,000 random operations from 4 concurrent clients, each on its own keys
/// and a few shared ones it only reads back after the others finish, agree
/// with a model kept by the test.
#[test]
fn random_operations_from_concurrent_clients_agree_with_a_model() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (_vmm, service) = serve(Role::Run, &[]);
    let seed: u64 = std::env::var("FTVM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("FTVM_TEST_SEED={seed}");
    let handles: Vec<_> = (0..4u64)
        .map(|c| {
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (c * 0x9e37_79b9));
                let mut kv = KvClient::connect(service, ClientConfig::default()).expect("client");
                let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
                for i in 0..500 {
                    let key = format!("c{c}-k{}", rng.random_range(0..20)).into_bytes();
                    match rng.random_range(0..3) {
                        0 => {
                            let got = kv.get(&key).expect("get");
                            assert_eq!(
                                got.as_ref(),
                                model.get(&key),
                                "client {c} op {i} get {key:?}"
                            );
                        }
                        1 => {
                            let len = rng.random_range(0..40);
                            let v: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                            kv.put(&key, &v).expect("put");
                            model.insert(key, v);
                        }
                        _ => {
                            let v: Vec<u8> =
                                (0..rng.random_range(1..8)).map(|_| rng.random()).collect();
                            kv.append(&key, &v).expect("append");
                            model.entry(key).or_default().extend_from_slice(&v);
                        }
                    }
                }
                model
            })
        })
        .collect();
    let models: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    let mut kv = client(service);
    for model in models {
        for (k, v) in model {
            assert_eq!(kv.get(&k).expect("get").as_ref(), Some(&v), "final {k:?}");
        }
    }
}

/// Garbage, truncated, foreign and oversized datagrams neither crash the
/// guest nor change the store.
#[test]
fn malformed_datagrams_do_not_disturb_the_service() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (mut vmm, service) = serve(Role::Run, &[]);
    let mut c = client(service);
    c.put(b"safe", b"value").expect("put");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("socket");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let good = Request {
        op: Op::Put,
        client_id: 77,
        request_num: 1,
        key: b"safe".to_vec(),
        value: b"clobbered".to_vec(),
    }
    .encode()
    .expect("encode");
    let mut bad_version = good.clone();
    bad_version[2] = 9;
    let mut bad_op = good.clone();
    bad_op[3] = 200;
    let mut long_key = good.clone();
    long_key[4] = 200;
    let mut short = good.clone();
    short.truncate(good.len() - 3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut garbage: Vec<Vec<u8>> = (0..50)
        .map(|_| {
            (0..rng.random_range(0..1400))
                .map(|_| rng.random())
                .collect()
        })
        .collect();
    garbage.extend([vec![], b"FT".to_vec(), vec![0xff; 1472]]);
    for g in &garbage {
        sock.send_to(g, service).expect("send garbage");
    }
    for bad in [&bad_version, &bad_op, &long_key, &short] {
        sock.send_to(bad, service).expect("send");
        let mut buf = [0u8; 2048];
        let (n, _) = sock.recv_from(&mut buf).expect("a BadRequest reply");
        assert_eq!(
            Reply::decode(&buf[..n]).expect("decode").status,
            Status::BadRequest
        );
    }
    assert_eq!(c.get(b"safe").expect("get").as_deref(), Some(&b"value"[..]));
    c.put(b"after", b"ok").expect("service still works");
    assert_eq!(c.get(b"after").expect("get").as_deref(), Some(&b"ok"[..]));
    let (status, stderr) = stop(&mut vmm);
    assert!(status.success(), "{stderr}");
}
