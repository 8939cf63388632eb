//! The wire format as README.md lays it out, byte by byte, checked by a
//! backup written from the README alone (frames built with the crate's
//! documented frame layout).

use crate::support::{addr, bounded, hello, listener, MEM};
use logchannel::{
    encode_frame, ChannelConfig, ChannelError, Entry, Event, FrameEncoder, LogSender, Mismatch,
    Position, Role,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

const CONTROL: u64 = 1 << 63;

fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(seq, payload, &mut out).expect("frame");
    out
}

/// The hello message for a short `vm_id` (its length fits in one byte),
/// with the workload `kv`.
fn hello_payload(vm_id: &str, role: u8, view: u8, first_seq: u8) -> Vec<u8> {
    let mut p = vec![0x00, vm_id.len() as u8];
    p.extend_from_slice(vm_id.as_bytes());
    p.push(view);
    p.extend_from_slice(&logchannel::image_hash(b"guest"));
    p.extend_from_slice(&[0xfc, 0x00, 0x00, 0x00, 0x04, role, first_seq]);
    p.extend_from_slice(&[0x02, b'k', b'v']);
    p
}

fn expect_bytes(s: &mut TcpStream, want: &[u8], what: &str) {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("reading the {what}: {e}"));
    assert_eq!(got, want, "{what}");
}

fn config() -> ChannelConfig {
    // No heartbeat falls between the messages this test expects.
    ChannelConfig {
        heartbeat_interval: Duration::from_secs(20),
        failure_timeout: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(10),
        ..ChannelConfig::default()
    }
}

const PREAMBLE: [u8; 12] = [
    0x46, 0x54, 0x56, 0x4d, 0x43, 0x48, 0x4e, 0x00, 0x04, 0x00, 0x00, 0x00,
];

#[test]
fn the_wire_is_laid_out_as_documented() {
    bounded(Duration::from_secs(60), || {
        assert_eq!(MEM, 0x0400_0000);
        let mut primary_hello = hello(Role::Primary);
        primary_hello.vm_id = "vm".to_string();
        let l = listener();
        let target = addr(&l);
        let accepting = thread::spawn(move || LogSender::accept(&l, primary_hello, config()));
        let mut s = TcpStream::connect(target).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");

        // The handshake, our side sent in one go.
        let mut ours = PREAMBLE.to_vec();
        ours.extend(frame(CONTROL, &hello_payload("vm", 1, 3, 0)));
        ours.extend(frame(CONTROL + 1, &[0x01]));
        s.write_all(&ours).expect("write");
        expect_bytes(&mut s, &PREAMBLE, "preamble");
        let hello_frame = frame(CONTROL, &hello_payload("vm", 0, 3, 1));
        assert_eq!((hello_frame.len(), hello_frame[0]), (52, 0x2f));
        expect_bytes(&mut s, &hello_frame, "primary's hello");
        expect_bytes(&mut s, &frame(CONTROL + 1, &[0x01]), "accept");
        let sender = accepting.join().expect("thread").expect("primary accepts");
        assert_eq!(sender.peer_hello().first_seq, 0);

        // One entry, then a progress mark.
        let entry = Entry {
            seq: 1,
            pos: Position {
                exits: 1234,
                rip: 0x10_203f,
            },
            event: Event::Rdtsc { value: 0x1a2b_3c4d },
        };
        assert_eq!(
            sender.send(entry.pos, entry.event.clone()).expect("send"),
            1
        );
        sender.set_progress(1300);
        expect_bytes(&mut s, &frame(CONTROL + 2, &[0x03, 0x01]), "entries header");
        let mut entry_frame = Vec::new();
        FrameEncoder::new(1)
            .encode_entry(&entry, &mut entry_frame)
            .expect("encode");
        assert_eq!(entry_frame.len(), 19);
        assert_eq!(entry_frame[0], 0x0e);
        assert_eq!(
            &entry_frame[5..],
            &[0xfb, 0xd2, 0x04, 0xfc, 0x7e, 0x40, 0x20, 0x00, 0x00, 0xfc, 0x9a, 0x78, 0x56, 0x34]
        );
        expect_bytes(&mut s, &entry_frame, "entry frame");
        expect_bytes(
            &mut s,
            &frame(CONTROL + 3, &[0x04, 0xfb, 0x14, 0x05]),
            "heartbeat with progress 1300",
        );

        // Our ack: received 1, replayed 1 up to exit 1300.
        s.write_all(&frame(CONTROL + 2, &[0x05, 0x01, 0x01, 0xfb, 0x14, 0x05]))
            .expect("ack");
        assert!(sender
            .wait_acked(1, Duration::from_secs(10))
            .expect("no failure"));
        let m = sender.metrics();
        assert_eq!((m.acked, m.lag_entries, m.lag_exits), (1, 0, 0));

        // An ack for an entry never sent is a protocol violation.
        s.write_all(&frame(CONTROL + 3, &[0x05, 0x07, 0x00, 0x00]))
            .expect("bad ack");
        let start = std::time::Instant::now();
        while !sender.peer_failed() {
            assert!(start.elapsed() < Duration::from_secs(10));
            thread::sleep(Duration::from_millis(2));
        }
        let err = sender.failure().expect("failure");
        assert!(
            matches!(err, ChannelError::Protocol { .. })
                && err.to_string().contains("acknowledged entry 7"),
            "{err}"
        );
    });
}

#[test]
fn a_goodbye_is_laid_out_as_documented() {
    bounded(Duration::from_secs(60), || {
        let mut primary_hello = hello(Role::Primary);
        primary_hello.vm_id = "vm".to_string();
        let l = listener();
        let target = addr(&l);
        let accepting = thread::spawn(move || LogSender::accept(&l, primary_hello, config()));
        let mut s = TcpStream::connect(target).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut ours = PREAMBLE.to_vec();
        ours.extend(frame(CONTROL, &hello_payload("vm", 1, 3, 0)));
        ours.extend(frame(CONTROL + 1, &[0x01]));
        s.write_all(&ours).expect("write");
        expect_bytes(&mut s, &PREAMBLE, "preamble");
        expect_bytes(
            &mut s,
            &frame(CONTROL, &hello_payload("vm", 0, 3, 1)),
            "primary's hello",
        );
        expect_bytes(&mut s, &frame(CONTROL + 1, &[0x01]), "accept");
        let sender = accepting.join().expect("thread").expect("primary accepts");

        // The backup's goodbye: tag 6, then the reason as a string.
        let reason = "stop requested";
        let mut goodbye = vec![0x06, reason.len() as u8];
        goodbye.extend_from_slice(reason.as_bytes());
        let goodbye = frame(CONTROL + 2, &goodbye);
        assert_eq!(&goodbye[..1], &[0x10]);
        s.write_all(&goodbye).expect("goodbye");
        let start = std::time::Instant::now();
        while !sender.peer_failed() {
            assert!(start.elapsed() < Duration::from_secs(10));
            thread::sleep(Duration::from_millis(2));
        }
        match sender.failure() {
            Some(ChannelError::PeerLeft { reason: r, .. }) => assert_eq!(r, reason),
            other => panic!("expected the backup's goodbye, got {other:?}"),
        }
        // The primary closes its side in answer, and sends nothing after.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the primary closes");
        assert!(rest.is_empty(), "{rest:?}");
    });
}

#[test]
fn a_refusal_is_laid_out_as_documented() {
    bounded(Duration::from_secs(60), || {
        let mut primary_hello = hello(Role::Primary);
        primary_hello.vm_id = "vm".to_string();
        let l = listener();
        let target = addr(&l);
        let accepting = thread::spawn(move || {
            let wait = Duration::from_secs(2);
            LogSender::accept_within(&l, primary_hello, config(), wait, &|| false)
        });
        let mut s = TcpStream::connect(target).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut ours = PREAMBLE.to_vec();
        ours.extend(frame(CONTROL, &hello_payload("vm", 1, 4, 0)));
        s.write_all(&ours).expect("write");

        let reason = "view mismatch: primary is in view 3, backup in view 4";
        let mut refused = vec![0x02, reason.len() as u8];
        refused.extend_from_slice(reason.as_bytes());
        expect_bytes(&mut s, &PREAMBLE, "preamble");
        expect_bytes(
            &mut s,
            &frame(CONTROL, &hello_payload("vm", 0, 3, 1)),
            "primary's hello",
        );
        let refused = frame(CONTROL + 1, &refused);
        assert_eq!(&refused[..1], &[0x37]);
        assert_eq!(&refused[5..7], &[0x02, 0x35]);
        expect_bytes(&mut s, &refused, "refusal");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the primary closes");
        assert!(rest.is_empty());
        drop(s);
        // The primary turned this peer away and went on waiting.
        match accepting.join().expect("thread") {
            Err(ChannelError::AcceptTimeout {
                refused: 1,
                last_refusal: Some(why),
                ..
            }) => assert!(
                why.ends_with(
                    &Mismatch::View {
                        primary: 3,
                        backup: 4
                    }
                    .to_string()
                ),
                "{why}"
            ),
            other => panic!(
                "expected a wait that turned one away, got {:?}",
                other.map(drop)
            ),
        }
    });
}

/// A primary written from the README that sends `bad` after entry 1 in a
/// batch of two; what the backup makes of it.
fn backup_error_after(bad: Vec<u8>) -> (ChannelError, u64) {
    let l = listener();
    let target = addr(&l);
    let connecting = thread::spawn(move || {
        logchannel::LogReceiver::connect(target, hello(Role::Backup), config())
    });
    let (mut s, _) = l.accept().expect("accept");
    let mut ours = PREAMBLE.to_vec();
    ours.extend(frame(CONTROL, &hello_payload("vm-test", 0, 3, 1)));
    ours.extend(frame(CONTROL + 1, &[0x01]));
    let handshake_len = ours.len() as u64;
    s.write_all(&ours).expect("handshake");
    let receiver = connecting.join().expect("thread").expect("backup accepts");

    let first = Entry {
        seq: 1,
        pos: Position {
            exits: 10,
            rip: 0x1000,
        },
        event: Event::Interrupt { vector: 0x20 },
    };
    let mut data = frame(CONTROL + 2, &[0x03, 0x02]);
    FrameEncoder::new(1)
        .encode_entry(&first, &mut data)
        .expect("encode");
    let bad_offset = handshake_len + data.len() as u64;
    data.extend(bad);
    s.write_all(&data).expect("entries");

    let got = receiver
        .recv(Duration::from_secs(10))
        .expect("entry 1 is intact")
        .expect("entry 1");
    assert_eq!(got, first);
    let err = receiver
        .recv(Duration::from_secs(10))
        .expect_err("the bad frame is refused");
    assert!(
        receiver.recv(Duration::ZERO).is_err(),
        "the failure is final"
    );
    (err, bad_offset)
}

#[test]
fn a_sequence_gap_is_refused_with_its_frame_and_offset() {
    bounded(Duration::from_secs(60), || {
        let third = Entry {
            seq: 3,
            pos: Position {
                exits: 12,
                rip: 0x1000,
            },
            event: Event::Interrupt { vector: 0x20 },
        };
        let mut bad = Vec::new();
        FrameEncoder::new(3)
            .encode_entry(&third, &mut bad)
            .expect("encode");
        let (err, offset) = backup_error_after(bad);
        assert!(matches!(err, ChannelError::Frame { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "frame 2 at offset {offset}: sequence gap (expected 2, found 3)"
            )),
            "{text}"
        );
    });
}

#[test]
fn an_undecodable_frame_is_refused_with_its_frame_and_offset() {
    bounded(Duration::from_secs(60), || {
        // A valid frame for entry 2 whose payload has no such event tag.
        let (err, offset) = backup_error_after(frame(2, &[0x00, 0x00, 0xee]));
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "frame 2 at offset {offset}: payload does not decode"
            )) && text.contains("unknown event tag 238"),
            "{text}"
        );
    });
}
