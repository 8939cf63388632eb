//! The handshake: what it accepts, what it refuses and how it says so, and
//! strangers on either end. A primary turns away whoever is not its backup
//! and goes on waiting; a backup gives up on a stranger.

use crate::support::{addr, bounded, hello, listener, relaxed, MEM};
use logchannel::{
    ChannelConfig, ChannelError, Hello, LogReceiver, LogSender, Mismatch, Role,
    CHANNEL_PROTOCOL_VERSION,
};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

fn quick() -> ChannelConfig {
    ChannelConfig {
        handshake_timeout: Duration::from_millis(500),
        ..relaxed()
    }
}

/// How long a primary waits in the tests where nobody acceptable comes.
const SHORT_WAIT: Duration = Duration::from_millis(700);

/// Shakes hands with the given hellos; both ends' results. The primary
/// waits [`SHORT_WAIT`], since a refused backup does not end its wait.
fn shake(
    primary: Hello,
    backup: Hello,
) -> (
    Result<LogSender, ChannelError>,
    Result<LogReceiver, ChannelError>,
) {
    let l = listener();
    let target = addr(&l);
    let accepting = thread::spawn(move || {
        LogSender::accept_within(&l, primary, relaxed(), SHORT_WAIT, &|| false)
    });
    let receiver = LogReceiver::connect(target, backup, relaxed());
    (accepting.join().expect("accept thread"), receiver)
}

#[test]
fn matching_hellos_shake_hands() {
    bounded(LIMIT, || {
        let mut backup = hello(Role::Backup);
        backup.first_seq = 0;
        let mut primary = hello(Role::Primary);
        primary.first_seq = 42;
        let (sender, receiver) = shake(primary.clone(), backup.clone());
        let (sender, receiver) = (sender.expect("primary"), receiver.expect("backup"));
        assert_eq!(sender.peer_hello(), &backup);
        assert_eq!(receiver.peer_hello(), &primary);
        assert_eq!(primary.protocol_version, CHANNEL_PROTOCOL_VERSION);
        assert!(!sender.peer_failed() && !receiver.primary_failed());
    });
}

/// Both ends refuse for the same mismatch, naming both values: the backup
/// gets the refusal, the primary turns it away and goes on waiting, and
/// its wait ends naming it.
fn refused(primary: Hello, backup: Hello, expected: Mismatch, text: &str) {
    let (sender, receiver) = shake(primary, backup);
    match receiver.map(drop) {
        Err(ChannelError::HelloRefused { mismatch, .. }) => {
            assert_eq!(mismatch, expected);
            assert!(
                mismatch.to_string().contains(text),
                "{mismatch:?} says {mismatch}, not {text:?}"
            );
        }
        other => panic!("backup: expected a refusal, got {other:?}"),
    }
    match sender.map(drop) {
        Err(ChannelError::AcceptTimeout {
            refused: 1,
            last_refusal: Some(why),
            ..
        }) => assert!(why.contains(text), "the primary says {why}, not {text:?}"),
        other => panic!("primary: expected a wait that turned one away, got {other:?}"),
    }
}

#[test]
fn a_protocol_version_mismatch_is_refused_on_both_ends() {
    bounded(LIMIT, || {
        let mut backup = hello(Role::Backup);
        backup.protocol_version = CHANNEL_PROTOCOL_VERSION + 1;
        refused(
            hello(Role::Primary),
            backup,
            Mismatch::ProtocolVersion {
                primary: CHANNEL_PROTOCOL_VERSION,
                backup: CHANNEL_PROTOCOL_VERSION + 1,
            },
            &format!(
                "protocol version mismatch: primary speaks {}, backup speaks {}",
                CHANNEL_PROTOCOL_VERSION,
                CHANNEL_PROTOCOL_VERSION + 1
            ),
        );
    });
}

#[test]
fn a_vm_id_mismatch_is_refused_on_both_ends() {
    bounded(LIMIT, || {
        let mut backup = hello(Role::Backup);
        backup.vm_id = "vm-other".to_string();
        refused(
            hello(Role::Primary),
            backup,
            Mismatch::VmId {
                primary: "vm-test".into(),
                backup: "vm-other".into(),
            },
            "VM id mismatch: primary runs \"vm-test\", backup expects \"vm-other\"",
        );
    });
}

#[test]
fn a_view_mismatch_is_refused_on_both_ends() {
    bounded(LIMIT, || {
        let mut backup = hello(Role::Backup);
        backup.view = 4;
        refused(
            hello(Role::Primary),
            backup,
            Mismatch::View {
                primary: 3,
                backup: 4,
            },
            "view mismatch: primary is in view 3, backup in view 4",
        );
    });
}

#[test]
fn an_image_hash_mismatch_is_refused_on_both_ends() {
    bounded(LIMIT, || {
        let mut backup = hello(Role::Backup);
        backup.image_hash = [0xab; 32];
        let primary = hello(Role::Primary);
        let primary_hex: String = primary
            .image_hash
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        refused(
            primary.clone(),
            backup,
            Mismatch::ImageHash {
                primary: primary.image_hash,
                backup: [0xab; 32],
            },
            &format!(
                "guest image mismatch: primary's image hash is {primary_hex}, backup's {}",
                "ab".repeat(32)
            ),
        );
    });
}

#[test]
fn a_memory_size_mismatch_is_refused_on_both_ends() {
    bounded(LIMIT, || {
        let mut backup = hello(Role::Backup);
        backup.mem_size = 2 * MEM;
        refused(
            hello(Role::Primary),
            backup,
            Mismatch::MemSize {
                primary: MEM,
                backup: 2 * MEM,
            },
            &format!(
                "primary has {MEM} bytes of guest memory, backup {}",
                2 * MEM
            ),
        );
    });
}

#[test]
fn a_workload_mismatch_is_refused_on_both_ends() {
    bounded(LIMIT, || {
        let mut backup = hello(Role::Backup);
        backup.workload = "race".to_string();
        refused(
            hello(Role::Primary),
            backup,
            Mismatch::Workload {
                primary: "kv".to_string(),
                backup: "race".to_string(),
            },
            "workload mismatch: primary runs \"kv\", backup \"race\"",
        );
    });
}

#[test]
fn a_role_mismatch_is_refused_on_both_ends() {
    bounded(LIMIT, || {
        refused(
            hello(Role::Primary),
            hello(Role::Primary),
            Mismatch::Role {
                listening: Role::Primary,
                connecting: Role::Primary,
            },
            "the listening end says it is the primary and the connecting end the primary",
        );
    });
}

#[test]
fn a_first_sequence_mismatch_is_refused_on_both_ends() {
    bounded(LIMIT, || {
        let mut backup = hello(Role::Backup);
        backup.first_seq = 7;
        refused(
            hello(Role::Primary),
            backup,
            Mismatch::FirstSeq {
                primary: 1,
                backup: 7,
            },
            "primary sends from entry 1, backup expects entry 7",
        );
    });
}

/// A raw peer on the other end: what the channel end under test says about
/// it, and how long that took.
fn against_stranger_server(
    serve: impl FnOnce(TcpStream) + Send + 'static,
) -> (ChannelError, Duration) {
    let l = listener();
    let target = addr(&l);
    let server = thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            serve(s);
        }
    });
    let start = Instant::now();
    let err = LogReceiver::connect(target, hello(Role::Backup), quick())
        .err()
        .expect("connecting to a stranger fails");
    let took = start.elapsed();
    let _ = server.join();
    (err, took)
}

/// A raw client connects to a waiting primary and does `client`; then
/// the real backup connects. The primary must turn the stranger away and
/// take the backup, within one wait. Returns how long the stranger's
/// connection lasted and the primary's wait.
fn stranger_then_backup(client: impl FnOnce(TcpStream) + Send + 'static) -> (Duration, Duration) {
    let l = listener();
    let target = addr(&l);
    let start = Instant::now();
    let accepting = thread::spawn(move || {
        LogSender::accept_within(&l, hello(Role::Primary), quick(), LIMIT, &|| false)
    });
    let stranger = thread::spawn(move || {
        let s = TcpStream::connect(target).expect("the stranger connects");
        let at = Instant::now();
        client(s);
        at.elapsed()
    });
    let stranger_lasted = stranger.join().expect("stranger");
    let receiver = LogReceiver::connect(target, hello(Role::Backup), quick());
    let sender = accepting.join().expect("accept thread");
    assert!(receiver.is_ok(), "{:?}", receiver.map(drop));
    assert!(sender.is_ok(), "{:?}", sender.map(drop));
    (stranger_lasted, start.elapsed())
}

/// Reads until the primary closes; the bytes it sent.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let _ = s.set_read_timeout(Some(LIMIT));
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn assert_not_a_peer(err: &ChannelError, shows: &str) {
    let text = err.to_string();
    assert!(
        matches!(err, ChannelError::NotAPeer { .. }),
        "expected NotAPeer, got {err:?}"
    );
    assert!(
        text.starts_with("not an ftvm log channel peer: ") && text.contains(shows),
        "{text}"
    );
}

#[test]
fn an_http_client_is_turned_away_and_the_backup_after_it_accepted() {
    bounded(LIMIT, || {
        let (lasted, _) = stranger_then_backup(|mut s| {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: ftvm\r\n\r\n");
            read_until_closed(&mut s);
        });
        assert!(lasted < quick().handshake_timeout, "lasted {lasted:?}");
    });
}

#[test]
fn a_port_scan_does_not_end_the_wait_for_the_backup() {
    bounded(LIMIT, || {
        // Connect, then close at once: what a port scanner does.
        let (_, waited) = stranger_then_backup(drop);
        assert!(waited < LIMIT);
    });
}

#[test]
fn a_peer_that_connects_and_says_nothing_does_not_hold_up_the_backup() {
    bounded(LIMIT, || {
        let l = listener();
        let target = addr(&l);
        let accepting = thread::spawn(move || {
            LogSender::accept_within(&l, hello(Role::Primary), relaxed(), LIMIT, &|| false)
        });
        let mut silent: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(target).expect("connect"))
            .collect();
        thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        let receiver = LogReceiver::connect(target, hello(Role::Backup), relaxed());
        let sender = accepting.join().expect("accept thread");
        assert!(receiver.is_ok() && sender.is_ok());
        // The silent ones have a handshake timeout of 10 s; the backup
        // did not wait for them.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
        // And they are closed, not left open.
        for s in &mut silent {
            let got = read_until_closed(s);
            assert!(got.starts_with(b"FTVMCHN\0"), "{got:?}");
        }
    });
}

#[test]
fn garbage_and_wrong_hellos_are_turned_away_and_the_wait_says_so() {
    bounded(LIMIT, || {
        let l = listener();
        let target = addr(&l);
        let wait = Duration::from_millis(1500);
        let start = Instant::now();
        let accepting = thread::spawn(move || {
            LogSender::accept_within(&l, hello(Role::Primary), quick(), wait, &|| false)
        });
        let mut garbage = TcpStream::connect(target).expect("connect");
        let _ = garbage.write_all(&[0x5a; 64]);
        read_until_closed(&mut garbage);
        let mut other_view = hello(Role::Backup);
        other_view.view = 9;
        let refused = LogReceiver::connect(target, other_view, quick()).map(drop);
        assert!(
            matches!(refused, Err(ChannelError::HelloRefused { .. })),
            "{refused:?}"
        );
        match accepting.join().expect("accept thread").map(drop) {
            Err(err @ ChannelError::AcceptTimeout { refused: 2, .. }) => {
                let text = err.to_string();
                assert!(
                    text.contains("turned away 2 other connection(s), the last because")
                        && text.contains("view mismatch: primary is in view 3, backup in view 9"),
                    "{text}"
                );
            }
            other => panic!("expected an accept timeout naming two refusals, got {other:?}"),
        }
        assert!(start.elapsed() >= wait, "ended after {:?}", start.elapsed());
    });
}

#[test]
fn a_cancelled_wait_ends_at_once() {
    bounded(LIMIT, || {
        let l = listener();
        let target = addr(&l);
        let cancel_at = Instant::now() + Duration::from_millis(300);
        let accepting = thread::spawn(move || {
            let cancelled = || Instant::now() >= cancel_at;
            LogSender::accept_within(&l, hello(Role::Primary), relaxed(), LIMIT, &cancelled)
        });
        // A peer mid-handshake does not keep the cancelled wait either.
        let _silent = TcpStream::connect(target).expect("connect");
        let err = accepting
            .join()
            .expect("accept thread")
            .err()
            .expect("cancelled");
        assert!(matches!(err, ChannelError::Cancelled { .. }), "{err:?}");
        let late = Instant::now().saturating_duration_since(cancel_at);
        assert!(late < Duration::from_millis(200), "ended {late:?} late");
    });
}

#[test]
fn a_backup_that_cancels_its_handshake_stops_at_once() {
    bounded(LIMIT, || {
        // A listener that accepts and never answers.
        let l = listener();
        let target = addr(&l);
        let cancel_at = Instant::now() + Duration::from_millis(300);
        let cancelled = || Instant::now() >= cancel_at;
        let err =
            LogReceiver::connect_cancellable(target, hello(Role::Backup), relaxed(), &cancelled)
                .err()
                .expect("cancelled");
        assert!(matches!(err, ChannelError::Cancelled { .. }), "{err:?}");
        let late = Instant::now().saturating_duration_since(cancel_at);
        assert!(late < Duration::from_millis(200), "ended {late:?} late");
        drop(l);
    });
}

#[test]
fn an_ssh_server_is_not_a_peer() {
    bounded(LIMIT, || {
        let (err, took) = against_stranger_server(|mut s| {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
            thread::sleep(Duration::from_millis(200));
        });
        assert_not_a_peer(&err, "sent b\"SSH");
        assert!(took < quick().handshake_timeout, "took {took:?}");
    });
}

#[test]
fn an_http_server_is_not_a_peer() {
    bounded(LIMIT, || {
        let (err, _) = against_stranger_server(|mut s| {
            // It reads our preamble as a malformed request and answers.
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            let _ = s.shutdown(Shutdown::Write);
            thread::sleep(Duration::from_millis(200));
        });
        assert_not_a_peer(&err, "sent b\"HTTP");
    });
}

#[test]
fn a_peer_that_closes_at_once_is_not_a_peer() {
    bounded(LIMIT, || {
        let (err, _) = against_stranger_server(|mut s| {
            // Reads what arrives, so that closing sends a FIN, not a reset.
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        assert_not_a_peer(&err, "closed the connection after sending 0 byte(s)");
    });
}

#[test]
fn a_silent_peer_times_out() {
    bounded(LIMIT, || {
        let (err, took) = against_stranger_server(|s| {
            thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        assert!(
            matches!(err, ChannelError::HandshakeTimeout { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("0 of the 12 preamble bytes arrived"),
            "{err}"
        );
        let timeout = quick().handshake_timeout;
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(2),
            "took {took:?}"
        );
    });
}

#[test]
fn a_huge_frame_length_after_a_good_preamble_is_refused_without_allocating() {
    bounded(LIMIT, || {
        let l = listener();
        let target = addr(&l);
        let accepting = thread::spawn(move || {
            let wait = Duration::from_millis(300);
            LogSender::accept_within(&l, hello(Role::Primary), quick(), wait, &|| false)
        });
        let mut s = TcpStream::connect(target).expect("connect");
        let start = Instant::now();
        let mut bytes = b"FTVMCHN\0".to_vec();
        bytes.extend_from_slice(&CHANNEL_PROTOCOL_VERSION.to_le_bytes());
        bytes.extend_from_slice(&[0xff; 10]);
        let _ = s.write_all(&bytes);
        read_until_closed(&mut s);
        let took = start.elapsed();
        let err = accepting
            .join()
            .expect("thread")
            .err()
            .expect("turned away");
        let text = err.to_string();
        assert!(
            text.contains("frame 0 at offset 12") && text.contains("over the maximum"),
            "{text}"
        );
        assert!(took < quick().handshake_timeout, "took {took:?}");
    });
}

#[test]
fn nobody_connecting_is_an_accept_timeout() {
    bounded(LIMIT, || {
        let l = listener();
        let start = Instant::now();
        let err = LogSender::accept(&l, hello(Role::Primary), quick())
            .err()
            .expect("nobody connects");
        assert!(matches!(err, ChannelError::AcceptTimeout { .. }), "{err:?}");
        assert!(start.elapsed() >= quick().handshake_timeout);
        // The listener is usable afterwards, in blocking mode.
        let target = addr(&l);
        let accepting = thread::spawn(move || LogSender::accept(&l, hello(Role::Primary), quick()));
        let receiver = LogReceiver::connect(target, hello(Role::Backup), quick());
        assert!(receiver.is_ok());
        assert!(accepting.join().expect("thread").is_ok());
    });
}

#[test]
fn bad_configurations_are_refused_before_connecting() {
    let l = listener();
    let config = ChannelConfig {
        heartbeat_interval: Duration::from_secs(1),
        failure_timeout: Duration::from_millis(300),
        ..ChannelConfig::default()
    };
    let err = LogSender::accept(&l, hello(Role::Primary), config)
        .err()
        .expect("refused");
    assert!(matches!(err, ChannelError::Config(_)), "{err:?}");
    let mut zero = hello(Role::Primary);
    zero.first_seq = 0;
    let err = LogSender::accept(&l, zero, ChannelConfig::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("first_seq"), "{err}");
}
