//! Joining a pair: connections to the primary's log channel that are not
//! its backup, waits that end on a signal, `--timeout` or an unreachable
//! arbiter as documented, a backup that never comes up, and flags checked
//! before anything starts (docs/fault-tolerance.md, "Joining").

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ftvm_core::host::events::ServerEvent;
use ftvm_harness::launcher::{free_tcp_addr, Guest, Process};
use ftvm_tests::transfer::Servers;
use ftvm_tests::{free_udp, ftvm, kvm_available, vm_lock, VM_ID};
use nix::sys::signal::Signal;

/// Waits until the primary reports its backup `name` connected.
fn wait_fault_tolerant_with(primary: &mut Process, name: &str, within: Duration) {
    let name = name.to_string();
    primary
        .wait_event(
            "role with a backup",
            within,
            |e| matches!(e, ServerEvent::Role { backup: Some(b), .. } if *b == name),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn strangers_on_the_log_channel_do_not_stop_the_primary_and_its_backup_joins() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let servers = Servers::start();
    let log_listen = free_tcp_addr().expect("a free port");
    let mut primary = servers.primary_at("primary", &Guest::default(), log_listen, None);
    // Before any backup is named, as a port scanner, a stranger and a
    // sloth would: connect and close, send garbage, connect and say
    // nothing, speak HTTP.
    for _ in 0..3 {
        drop(TcpStream::connect(log_listen).expect("connect"));
    }
    let mut garbage = TcpStream::connect(log_listen).expect("connect");
    let _ = garbage.write_all(&[0x5a; 256]);
    let _silent = TcpStream::connect(log_listen).expect("connect");
    let mut http = TcpStream::connect(log_listen).expect("connect");
    let _ = http.write_all(b"GET / HTTP/1.1\r\nHost: ftvm\r\n\r\n");
    let mut backup = servers.backup("backup", &Guest::default());
    wait_fault_tolerant_with(&mut primary, "backup", Duration::from_secs(30));
    // The HTTP client was turned away, not left hanging.
    let _ = http.set_read_timeout(Some(Duration::from_secs(10)));
    let mut answer = Vec::new();
    let _ = http.read_to_end(&mut answer);
    // More strangers once the pair runs change nothing either.
    drop(TcpStream::connect(log_listen).expect("connect"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(primary.running(), "{}", primary.log());
    assert!(backup.running(), "{}", backup.log());
    let log = primary.log();
    assert!(
        log.contains("turned away a log channel connection"),
        "the primary says what it turned away:\n{log}"
    );
    assert!(!primary.has_event(|e| matches!(e, ServerEvent::FailureDetected { .. })));
}

/// A primary of an arbiter that is not there.
fn primary_args(arbiter: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "primary",
        "--arbiter",
        &arbiter.to_string(),
        "--service",
        &free_udp().to_string(),
        "--log-listen",
        &free_tcp_addr().expect("a free port").to_string(),
        "--serial",
        "/dev/null",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn nowhere() -> SocketAddr {
    free_tcp_addr().expect("a free port")
}

/// Runs `ftvm` to completion; its exit code, stderr and how long it took.
fn timed(args: &[String], limit: Duration) -> (Option<i32>, String, Duration) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = Instant::now();
    let out = ftvm(&args, limit);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn an_unreachable_arbiter_ends_joining_with_exit_5_after_five_seconds() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let (code, err, took) = timed(&primary_args(nowhere(), &[]), Duration::from_secs(30));
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("cannot be reached"), "{err}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(8),
        "took {took:?}"
    );
    // And a backup, whose first wait is for a primary.
    let args: Vec<String> = [
        "backup",
        "--arbiter",
        &nowhere().to_string(),
        "--service",
        &free_udp().to_string(),
        "--serial",
        "/dev/null",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (code, err, took) = timed(&args, Duration::from_secs(30));
    assert_eq!(code, Some(5), "{err}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
}

#[test]
fn the_time_limit_ends_joining_at_once() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    // The arbiter never answers: stopped before a role, exit 5.
    let args = primary_args(nowhere(), &["--timeout", "2"]);
    let (code, err, took) = timed(&args, Duration::from_secs(30));
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("stopped while"), "{err}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // The arbiter answers, and the guest is held for a backup that never
    // comes: the time limit still ends the run, exit 0, long before
    // --backup-wait.
    let servers = Servers::start();
    let args = primary_args(
        servers.arbiter_addr(),
        &["--timeout", "2", "--backup-wait", "60"],
    );
    let (code, err, took) = timed(&args, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("Timeout"), "{err}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn sigterm_ends_joining_at_once() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let servers = Servers::start();
    let mut primary = servers.primary_at(
        "primary",
        &Guest::default(),
        free_tcp_addr().expect("a free port"),
        None,
    );
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    primary.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = primary
        .wait_exit(Duration::from_secs(10))
        .expect("the primary stops");
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "stopped {:?} after SIGTERM",
        asked.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", primary.log());
}

#[test]
fn a_backup_that_never_comes_up_is_replaced_and_a_spare_started_later_joins() {
    if !kvm_available() {
        return;
    }
    let _g = vm_lock();
    let servers = Servers::start();
    let mut primary = servers.primary_at(
        "primary",
        &Guest::default(),
        free_tcp_addr().expect("a free port"),
        None,
    );
    // Named backup of view 2, this one cannot come up (its guest has
    // another memory size) and exits.
    let mut broken = servers.backup(
        "broken",
        &Guest {
            mem: Some("128M".into()),
            ..Guest::default()
        },
    );
    let status = broken
        .wait_exit(Duration::from_secs(30))
        .expect("the broken backup ends");
    assert_eq!(status.code(), Some(1), "{}", broken.log());
    assert!(primary.running(), "{}", primary.log());
    // A real spare, started afterwards, takes its place in the next view,
    // and the primary, serving alone meanwhile, brings it up.
    let mut spare = servers.backup("spare", &Guest::default());
    wait_fault_tolerant_with(&mut primary, "spare", Duration::from_secs(20));
    let view = arbiter::ArbiterClient::new(servers.arbiter_addr())
        .query(VM_ID)
        .expect("query");
    assert_eq!(view.number, 3, "{view:?}");
    assert_eq!(view.backup.map(|b| b.id).as_deref(), Some("spare"));
    assert!(spare.running(), "{}", spare.log());
}

#[test]
fn memory_sizes_and_tick_rates_out_of_range_are_refused_before_anything_starts() {
    for command in ["primary", "backup"] {
        for (flag, value, says) in [
            ("--mem", "0", "out of range"),
            ("--mem", "1K", "out of range"),
            ("--mem", "1M", "out of range"),
            ("--mem", "1T", "out of range"),
            ("--mem", "lots", "not a size"),
            ("--tick-hz", "0", "out of range"),
            ("--tick-hz", "1000000", "out of range"),
        ] {
            let mut args = vec![
                command.to_string(),
                "--arbiter".into(),
                nowhere().to_string(),
                "--service".into(),
                free_udp().to_string(),
                flag.into(),
                value.into(),
            ];
            if command == "primary" {
                args.extend(["--log-listen".into(), nowhere().to_string()]);
            }
            let (code, err, _) = timed(&args, Duration::from_secs(20));
            assert_eq!(code, Some(2), "{command} {flag} {value}: {err}");
            assert!(
                err.contains(says) && err.contains(flag),
                "{command} {flag} {value}: {err}"
            );
        }
    }
}
