//! Flow control: a backup that does not keep up holds the primary back,
//! within a bounded window, without either end declaring the other failed.

use crate::support::{bounded, entries, pair_via, relaxed, seed};
use logchannel::{ChannelConfig, Event, Position};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn a_backup_that_does_not_read_fills_the_window_and_draining_it_resumes() {
    let seed = seed("a_backup_that_does_not_read_fills_the_window_and_draining_it_resumes");
    bounded(LIMIT, move || {
        const WINDOW: u64 = 1000;
        const N: usize = 20_000;
        // Timeouts short enough that the pause below outlasts them: a full
        // window must not read as a failure on either end.
        let primary = ChannelConfig {
            window_entries: WINDOW,
            failure_timeout: Duration::from_millis(300),
            ..ChannelConfig::default()
        };
        let backup = ChannelConfig {
            window_entries: 300,
            ..primary
        };
        let (sender, receiver) = pair_via(primary, backup, None);
        let expected = entries(seed, N);

        // Send until the window is full, as the primary's exits would.
        let mut next = 0;
        let start = Instant::now();
        while !sender.window_full() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "window never filled"
            );
            let e = &expected[next];
            sender.send(e.pos, e.event.clone()).expect("send");
            next += 1;
            assert!(sender.in_flight() <= WINDOW);
            if next.is_multiple_of(100) {
                // Let the writer, the reader and the acks catch up.
                thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(sender.in_flight(), WINDOW);
        assert!(
            next as u64 >= WINDOW,
            "the backup buffered {} and acked them",
            next as u64 - WINDOW
        );

        // Stalled for several failure timeouts: the window stays full,
        // nobody declares anybody failed.
        assert!(!sender
            .wait_window(Duration::from_millis(1000))
            .expect("no failure while the backup lags"));
        assert!(sender.window_full());
        assert!(!sender.peer_failed(), "{:?}", sender.failure());
        assert!(!receiver.primary_failed(), "{:?}", receiver.failure());
        assert!(receiver.metrics().queued <= 300);

        // Drain, and the rest flows. The receive timeout is short because
        // the window may be full only until an ack in flight arrives.
        let mut got = 0;
        let start = Instant::now();
        while got < N {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "stalled after {got} entries"
            );
            while next < N && !sender.window_full() {
                let e = &expected[next];
                sender.send(e.pos, e.event.clone()).expect("send");
                next += 1;
                assert!(sender.in_flight() <= WINDOW);
            }
            if let Some(e) = receiver.recv(Duration::from_millis(10)).expect("recv") {
                assert_eq!(e, expected[got]);
                got += 1;
            }
        }
        assert!(sender
            .wait_acked(N as u64, Duration::from_secs(10))
            .expect("acked"));
    });
}

#[test]
fn the_byte_window_bounds_what_is_in_flight() {
    bounded(LIMIT, || {
        const BYTES: u64 = 64 << 10;
        let primary = ChannelConfig {
            window_bytes: BYTES,
            ..relaxed()
        };
        let backup = ChannelConfig {
            window_bytes: 16 << 10,
            ..relaxed()
        };
        let (sender, receiver) = pair_via(primary, backup, None);
        let packet = Event::Packet {
            desc_head: 0,
            frame: vec![0x5a; 1000],
        };
        let mut sent = 0u64;
        let start = Instant::now();
        while !sender.window_full() {
            assert!(start.elapsed() < Duration::from_secs(30));
            sent += 1;
            sender
                .send(
                    Position {
                        exits: sent,
                        rip: 0,
                    },
                    packet.clone(),
                )
                .expect("send");
            let m = sender.metrics();
            // At most one entry past the window: it is checked between
            // entries, not inside send.
            assert!(m.in_flight_bytes < BYTES + 1100, "{m:?}");
            if sent.is_multiple_of(16) {
                thread::sleep(Duration::from_millis(1));
            }
        }
        assert!(sender.metrics().in_flight_bytes >= BYTES);
        // The backup holds its own bound, give or take one entry.
        assert!(
            receiver.metrics().queued_bytes < (16 << 10) + 1100,
            "{:?}",
            receiver.metrics()
        );
        for seq in 1..=sent {
            let e = receiver
                .recv(Duration::from_secs(10))
                .expect("recv")
                .expect("entry");
            assert_eq!(e.seq, seq);
        }
        assert!(sender.wait_window(Duration::from_secs(10)).expect("opens"));
    });
}

/// An end whose writer thread would hold an entry or a report for a minute,
/// and sends heartbeats as rarely.
fn slow_writer() -> ChannelConfig {
    ChannelConfig {
        batch_delay: Duration::from_secs(60),
        heartbeat_interval: Duration::from_secs(30),
        failure_timeout: Duration::from_secs(90),
        ..relaxed()
    }
}

fn one_entry(exits: u64) -> (Position, Event) {
    (
        Position { exits, rip: 0x1000 },
        Event::Interrupt { vector: 0x20 },
    )
}

#[test]
fn a_backup_that_replays_too_slowly_holds_the_primary_until_it_reports() {
    bounded(LIMIT, || {
        const MAX_LAG: Duration = Duration::from_millis(50);
        let (sender, receiver) = pair_via(
            ChannelConfig {
                max_lag: Some(MAX_LAG),
                ..relaxed()
            },
            relaxed(),
            None,
        );
        let (pos, event) = one_entry(10);
        let seq = sender.send(pos, event).expect("send");
        assert!(sender
            .wait_acked(seq, Duration::from_secs(10))
            .expect("acked"));
        let entry = receiver
            .recv(Duration::from_secs(10))
            .expect("recv")
            .expect("the entry");
        // Received and acknowledged but not replayed: nothing is in flight,
        // yet once the entry is older than the bound the window is full.
        assert_eq!(sender.in_flight(), 0);
        thread::sleep(MAX_LAG + Duration::from_millis(20));
        assert!(sender.window_full(), "{:?}", sender.metrics());
        assert!(!sender
            .wait_window(Duration::from_millis(100))
            .expect("no failure"));

        receiver.report_replayed(entry.seq, entry.pos.exits);
        assert!(sender
            .wait_window(Duration::from_secs(10))
            .expect("no failure"));
        assert_eq!(sender.metrics().lag_ms, 0.0);
    });
}

#[test]
fn without_a_lag_bound_an_unreplayed_entry_does_not_fill_the_window() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair_via(relaxed(), relaxed(), None);
        let (pos, event) = one_entry(10);
        let seq = sender.send(pos, event).expect("send");
        assert!(sender
            .wait_acked(seq, Duration::from_secs(10))
            .expect("acked"));
        assert!(receiver
            .recv(Duration::from_secs(10))
            .expect("recv")
            .is_some());
        thread::sleep(Duration::from_millis(100));
        assert!(sender.metrics().lag_ms >= 100.0);
        assert!(!sender.window_full());
    });
}

#[test]
fn flush_writes_at_once_what_batching_would_hold() {
    bounded(LIMIT, || {
        // Only `flush` can get the entry out in time.
        let (sender, receiver) = pair_via(slow_writer(), relaxed(), None);
        let acks = Arc::new(Mutex::new(Vec::new()));
        let seen = acks.clone();
        sender.on_ack(move |acked, _| seen.lock().expect("lock").push(acked));

        let (pos, event) = one_entry(10);
        sender.send(pos, event.clone()).expect("send");
        assert!(
            receiver
                .recv(Duration::from_millis(300))
                .expect("recv")
                .is_none(),
            "the entry should still be waiting to be batched"
        );
        sender.flush().expect("flush");
        let got = receiver
            .recv(Duration::from_secs(10))
            .expect("recv")
            .expect("the flushed entry");
        assert_eq!(got.seq, 1);

        // The hook sees each cumulative ack as it moves.
        for exits in [11, 12] {
            let (pos, event) = one_entry(exits);
            sender.send(pos, event).expect("send");
        }
        sender.flush().expect("flush");
        assert!(sender
            .wait_acked(3, Duration::from_secs(10))
            .expect("acked"));
        // The hook runs just after waiters are woken, on the ack reader.
        let start = Instant::now();
        while acks.lock().expect("lock").last() != Some(&3) {
            assert!(start.elapsed() < Duration::from_secs(10), "{acks:?}");
            thread::sleep(Duration::from_millis(1));
        }
        let acks = acks.lock().expect("lock").clone();
        assert!(acks.windows(2).all(|w| w[0] < w[1]), "{acks:?}");
        assert_eq!(acks.first(), Some(&1));
        assert_eq!(acks.last(), Some(&3));
    });
}

#[test]
fn flush_report_tells_the_primary_at_once_how_far_replay_got() {
    bounded(LIMIT, || {
        // Only `flush_report` gets the report to the primary in time.
        let (sender, receiver) = pair_via(relaxed(), slow_writer(), None);
        let (pos, event) = one_entry(10);
        let seq = sender.send(pos, event).expect("send");
        sender.flush().expect("flush");
        let entry = receiver
            .recv(Duration::from_secs(10))
            .expect("recv")
            .expect("the entry");
        assert!(sender
            .wait_acked(seq, Duration::from_secs(10))
            .expect("acked"));
        receiver.report_replayed(entry.seq, entry.pos.exits);
        thread::sleep(Duration::from_millis(200));
        assert_eq!(sender.metrics().lag_entries, 1, "not reported yet");

        receiver.flush_report().expect("flush_report");
        let start = Instant::now();
        while sender.metrics().lag_entries != 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "no report");
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sender.metrics().lag_exits, 0);
    });
}
