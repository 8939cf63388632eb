//! The transfer on a real loopback connection, between the handshake and
//! the start of the log channel.

use crate::channel_support::{addr, bounded, entries, hello, listener, relaxed, Proxy};
use crate::support::{read_all, write_sample, Got, MEM, PAGE};
use logchannel::{
    ChannelError, FrameError, Handshaken, Hello, LogReceiver, LogSender, Mismatch, PageData, Role,
    TransferError, TransferItem, TransferWriter, Verdict, CHANNEL_PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(10);

fn joining() -> Hello {
    let mut h = hello(Role::Backup);
    h.first_seq = 0;
    h
}

fn accept(l: &TcpListener) -> Result<Handshaken, ChannelError> {
    LogSender::accept_handshaken(l, hello(Role::Primary), relaxed(), WAIT, &|| false)
}

/// The primary's half on a thread of its own; the caller is the backup.
fn spawn_primary<T: Send + 'static>(
    f: impl FnOnce(Handshaken) -> T + Send + 'static,
) -> (thread::JoinHandle<T>, std::net::SocketAddr) {
    let l = listener();
    let target = addr(&l);
    let handle = thread::spawn(move || f(accept(&l).expect("primary handshakes")));
    (handle, target)
}

fn connect(target: std::net::SocketAddr, hello: Hello) -> Result<Handshaken, ChannelError> {
    LogReceiver::connect_handshaken(target, hello, relaxed(), &|| false)
}

/// Memory as the pages of a transfer leave it: page index to bytes, zero
/// pages absent.
fn apply(items: &[Got]) -> HashMap<u64, Vec<u8>> {
    let mut mem = HashMap::new();
    for item in items {
        if let Got::Page { index, data } = item {
            match data {
                Some(bytes) => mem.insert(*index, bytes.clone()),
                None => mem.remove(index),
            };
        }
    }
    mem
}

#[test]
fn a_backup_joins_by_state_transfer_and_the_log_follows_from_the_cut() {
    bounded(LIMIT, || {
        let log = entries(7, 300);
        let sent = log.clone();
        let (primary, target) = spawn_primary(move |mut h| {
            let mut w = h.transfer_writer(WAIT).expect("writer");
            let items = write_sample(&mut w);
            let written = w.bytes_written();
            drop(w);
            let verdict = h.read_verdict(WAIT).expect("verdict");
            let Some(Got::Cut(cut)) = items.last() else {
                panic!("no cut")
            };
            assert_eq!(
                verdict,
                Verdict::Restored {
                    mem_hash: cut.mem_hash
                }
            );
            let tx = LogSender::start(h, cut.next_seq).expect("start");
            let mut last = 0;
            for e in &sent {
                last = tx.send(e.pos, e.event.clone()).expect("send");
            }
            assert!(tx.wait_acked(last, WAIT).expect("acked"));
            (items, written)
        });

        let mut h = connect(target, joining()).expect("backup handshakes");
        assert_eq!(h.peer_hello().first_seq, 1);
        let before = h.received();
        let mut r = h.transfer_reader(WAIT).expect("reader");
        let (got, err) = read_all(&mut r);
        assert!(err.is_none(), "{err:?}");
        let read = r.bytes_read();
        assert_eq!(h.received(), before + read);
        let Some(Got::Cut(cut)) = got.last().cloned() else {
            panic!("no cut")
        };
        h.write_verdict(&Verdict::Restored {
            mem_hash: cut.mem_hash,
        })
        .expect("verdict");
        let rx = LogReceiver::start(h, cut.next_seq).expect("start");
        for (i, want) in log.iter().enumerate() {
            let e = rx.recv(WAIT).expect("recv").expect("an entry");
            assert_eq!(e.seq, cut.next_seq + i as u64);
            assert_eq!((e.pos, &e.event), (want.pos, &want.event));
        }
        let (items, written) = primary.join().expect("primary");
        assert_eq!(got, items);
        assert_eq!(read, written);
        let mem = apply(&got);
        assert_eq!(mem.len(), 200 + 1 - 29);
        assert!(mem.values().all(|p| p.len() == PAGE as usize));
    });
}

#[test]
fn a_refusal_reaches_the_primary_with_its_reason() {
    bounded(LIMIT, || {
        let (primary, target) = spawn_primary(|mut h| {
            let mut w = h.transfer_writer(WAIT).expect("writer");
            write_sample(&mut w);
            drop(w);
            h.read_verdict(WAIT)
        });
        let mut h = connect(target, joining()).expect("backup handshakes");
        let (got, err) = read_all(&mut h.transfer_reader(WAIT).expect("reader"));
        assert!(err.is_none() && !got.is_empty(), "{err:?}");
        let refusal = Verdict::Refused {
            reason: "memory hash mismatch: the cut says 0x1, restored 0x2".to_string(),
        };
        h.write_verdict(&refusal).expect("verdict");
        assert_eq!(
            primary.join().expect("primary").expect("a verdict"),
            refusal
        );
    });
}

#[test]
fn an_abort_reaches_the_backup() {
    bounded(LIMIT, || {
        let (primary, target) = spawn_primary(|mut h| {
            let mut w = h.transfer_writer(WAIT).expect("writer");
            w.begin(MEM, PAGE).expect("begin");
            w.abort("a new view").expect("abort");
        });
        let mut h = connect(target, joining()).expect("backup handshakes");
        let (got, err) = read_all(&mut h.transfer_reader(WAIT).expect("reader"));
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got.last(), Some(&Got::Abort("a new view".to_string())));
        primary.join().expect("primary");
    });
}

#[test]
fn a_primary_that_dies_mid_transfer_leaves_no_cut() {
    bounded(LIMIT, || {
        let (primary, target) = spawn_primary(|mut h| {
            let mut w = TransferWriter::new(&mut h);
            w.begin(MEM, PAGE).expect("begin");
            for i in 0..100 {
                w.page(i, &crate::support::page(i, 0)).expect("page");
            }
            w.flush().expect("flush");
            // Dropping the connection is the primary dying.
        });
        let mut h = connect(target, joining()).expect("backup handshakes");
        let (got, err) = read_all(&mut h.transfer_reader(WAIT).expect("reader"));
        primary.join().expect("primary");
        assert_eq!(got.len(), 101);
        let err = err.expect("an error");
        assert!(
            // Begin, and 100 pages in two messages.
            matches!(err, TransferError::Closed { message: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("without its cut"), "{err}");
    });
}

#[test]
fn silence_is_named_on_both_sides() {
    bounded(LIMIT, || {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (primary, target) = spawn_primary(move |mut h| {
            // Says nothing until the backup has timed out, then waits for
            // a verdict that never comes.
            let _ = rx.recv();
            h.read_verdict(Duration::from_millis(200))
        });
        let mut h = connect(target, joining()).expect("backup handshakes");
        let offset = h.received();
        let mut r = h
            .transfer_reader(Duration::from_millis(200))
            .expect("reader");
        let err = r.next().expect_err("silence");
        assert!(
            matches!(err, TransferError::Silent { message: 0, offset: o, .. } if o == offset),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("the primary sent nothing for 200ms"),
            "{err}"
        );
        drop(r);
        tx.send(()).expect("wake the primary");
        let err = primary.join().expect("primary").expect_err("no verdict");
        assert!(
            err.to_string()
                .starts_with("the backup sent nothing for 200ms"),
            "{err}"
        );
        drop(h);
    });
}

#[test]
fn start_refuses_what_cannot_work() {
    bounded(LIMIT, || {
        // A backup that asked for entry 5 is not sent entry 42 on.
        let l = listener();
        let target = addr(&l);
        let primary = thread::spawn(move || {
            let mut at_5 = hello(Role::Primary);
            at_5.first_seq = 5;
            let h = LogSender::accept_handshaken(&l, at_5, relaxed(), WAIT, &|| false)
                .expect("primary handshakes");
            LogSender::start(h, 42).err()
        });
        let mut asks_5 = hello(Role::Backup);
        asks_5.first_seq = 5;
        let h = connect(target, asks_5).expect("backup handshakes");
        let err = primary.join().expect("primary").expect("refused");
        assert!(matches!(err, ChannelError::Config(_)), "{err}");
        let err = LogReceiver::start(h, 42).err().expect("refused");
        assert!(matches!(err, ChannelError::Config(_)), "{err}");

        // A sequence number of 0, or the other end's start.
        let (primary, target) = spawn_primary(|h| LogReceiver::start(h, 1).err());
        let h = connect(target, joining()).expect("backup handshakes");
        assert!(matches!(
            LogReceiver::start(h, 0).err(),
            Some(ChannelError::Config(_))
        ));
        assert!(matches!(
            primary.join().expect("primary"),
            Some(ChannelError::Config(_))
        ));
    });
}

#[test]
fn a_version_3_peer_is_refused() {
    bounded(LIMIT, || {
        assert_eq!(CHANNEL_PROTOCOL_VERSION, 4);
        let l = listener();
        let target = addr(&l);
        let primary = thread::spawn(move || {
            LogSender::accept_handshaken(
                &l,
                hello(Role::Primary),
                relaxed(),
                Duration::from_secs(2),
                &|| false,
            )
            .err()
        });
        let mut old = joining();
        old.protocol_version = 3;
        let err = connect(target, old).expect_err("refused");
        assert!(
            matches!(
                &err,
                ChannelError::HelloRefused {
                    mismatch: Mismatch::ProtocolVersion {
                        primary: 4,
                        backup: 3
                    },
                    ..
                }
            ),
            "{err}"
        );
        // The primary turned it away and went on waiting, in vain.
        let err = primary.join().expect("primary").expect("no backup");
        assert!(
            matches!(err, ChannelError::AcceptTimeout { refused: 1, .. }),
            "{err}"
        );
    });
}

#[test]
fn frame_offsets_after_a_transfer_are_offsets_in_the_connection() {
    bounded(LIMIT, || {
        let l = listener();
        let proxy = Proxy::new(addr(&l));
        let primary = thread::spawn(move || {
            let mut h = accept(&l).expect("primary handshakes");
            let mut w = h.transfer_writer(WAIT).expect("writer");
            write_sample(&mut w);
            drop(w);
            if h.read_verdict(WAIT).is_err() {
                return;
            }
            let tx = LogSender::start(h, 42).expect("start");
            for e in entries(3, 20) {
                let _ = tx.send(e.pos, e.event);
            }
            let _ = tx.flush();
            // Until the backup has seen the damage.
            thread::sleep(Duration::from_secs(1));
        });
        let mut h = connect(proxy.addr(), joining()).expect("backup handshakes");
        let (_, err) = read_all(&mut h.transfer_reader(WAIT).expect("reader"));
        assert!(err.is_none(), "{err:?}");
        let end = h.received();
        // Inside the first frame of the log channel, past its length and
        // CRC: before the primary can send it, since it waits for the
        // verdict.
        proxy.flip(end + 5, 0x10);
        h.write_verdict(&Verdict::Restored { mem_hash: 0 })
            .expect("verdict");
        let rx = LogReceiver::start(h, 42).expect("start");
        let err = loop {
            match rx.recv(WAIT) {
                Ok(Some(_)) => {}
                Ok(None) => panic!("neither entries nor an error"),
                Err(e) => break e,
            }
        };
        let ChannelError::Frame { source, .. } = &err else {
            panic!("{err}")
        };
        assert!(
            matches!(**source, FrameError::Crc { frame: 0, offset, .. } if offset == end),
            "{err} (the transfer ended at {end})"
        );
        primary.join().expect("primary");
    });
}

#[test]
fn a_64_mib_guest_crosses_in_one_round_and_a_cut() {
    bounded(LIMIT, || {
        let (primary, target) = spawn_primary(|mut h| {
            let mut w = h.transfer_writer(WAIT).expect("writer");
            w.begin(MEM, PAGE).expect("begin");
            let mut bytes = vec![0u8; PAGE as usize];
            // Every other page touched, as a guest's memory is partly.
            for i in 0..MEM / u64::from(PAGE) {
                bytes.fill(0);
                if i % 2 == 1 {
                    bytes[..8].copy_from_slice(&i.to_le_bytes());
                }
                w.page(i, &bytes).expect("page");
            }
            w.end_round().expect("round");
            w.cut(&crate::support::cut()).expect("cut");
            let written = w.bytes_written();
            drop(w);
            (h.read_verdict(WAIT).expect("verdict"), written)
        });
        let mut h = connect(target, joining()).expect("backup handshakes");
        let started = std::time::Instant::now();
        let mut r = h.transfer_reader(WAIT).expect("reader");
        let mut checked = 0u64;
        loop {
            match r.next().expect("item") {
                TransferItem::Page { index, data } => {
                    match data {
                        PageData::Zero => assert_eq!(index % 2, 0),
                        PageData::Bytes(b) => assert_eq!(b[..8], index.to_le_bytes()),
                    }
                    checked += 1;
                }
                TransferItem::Cut(_) => break,
                _ => {}
            }
        }
        let took = started.elapsed();
        let read = r.bytes_read();
        drop(r);
        h.write_verdict(&Verdict::Restored { mem_hash: 1 })
            .expect("verdict");
        let (verdict, written) = primary.join().expect("primary");
        assert_eq!(verdict, Verdict::Restored { mem_hash: 1 });
        assert_eq!(checked, MEM / u64::from(PAGE));
        assert_eq!(read, written);
        // Half the pages are zero: a little over half the memory crosses.
        assert!(read < MEM / 2 + MEM / 64, "{read}");
        eprintln!(
            "64 MiB guest, half touched: {read} bytes in {took:?} ({:.0} MiB/s)",
            read as f64 / took.as_secs_f64() / f64::from(1 << 20)
        );
    });
}
