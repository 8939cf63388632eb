//! The handshake: what it accepts, what it refuses and how it says so, and
//! strangers on either end.

use crate::support::{accept_in_thread, addr, bounded, hello, listener, relaxed, MEM};
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

/// Shakes hands with the given hellos; both ends' results.
fn shake(
    primary: Hello,
    backup: Hello,
) -> (
    Result<LogSender, ChannelError>,
    Result<LogReceiver, ChannelError>,
) {
    let l = listener();
    let target = addr(&l);
    let accepting = accept_in_thread(l, primary, relaxed());
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

/// Both ends refuse, with the same mismatch, naming both values.
fn refused(primary: Hello, backup: Hello, expected: Mismatch, text: &str) {
    let (sender, receiver) = shake(primary, backup);
    for (end, result) in [
        ("primary", sender.map(drop)),
        ("backup", receiver.map(drop)),
    ] {
        match result {
            Err(ChannelError::HelloRefused { mismatch, .. }) => {
                assert_eq!(mismatch, expected, "{end}");
                assert!(
                    mismatch.to_string().contains(text),
                    "{end}: {mismatch:?} says {mismatch}, not {text:?}"
                );
            }
            other => panic!("{end}: expected a refusal, got {other:?}"),
        }
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
                primary: 1,
                backup: 2,
            },
            "protocol version mismatch: primary speaks 1, backup speaks 2",
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

fn against_stranger_client(
    client: impl FnOnce(TcpStream) + Send + 'static,
) -> (ChannelError, Duration) {
    let l = listener();
    let target = addr(&l);
    let stranger = thread::spawn(move || {
        if let Ok(s) = TcpStream::connect(target) {
            client(s);
        }
    });
    let start = Instant::now();
    let err = LogSender::accept(&l, hello(Role::Primary), quick())
        .err()
        .expect("a stranger is refused");
    let took = start.elapsed();
    let _ = stranger.join();
    (err, took)
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
fn an_http_client_is_not_a_peer() {
    bounded(LIMIT, || {
        let (err, took) = against_stranger_client(|mut s| {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: ftvm\r\n\r\n");
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        assert_not_a_peer(&err, "sent b\"GET");
        assert!(took < quick().handshake_timeout, "took {took:?}");
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
        let (err, took) = against_stranger_client(|mut s| {
            let mut bytes = b"FTVMCHN\0".to_vec();
            bytes.extend_from_slice(&CHANNEL_PROTOCOL_VERSION.to_le_bytes());
            bytes.extend_from_slice(&[0xff; 10]);
            let _ = s.write_all(&bytes);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        assert!(matches!(err, ChannelError::Frame { .. }), "{err:?}");
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
