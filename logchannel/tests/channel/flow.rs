//! Flow control: a backup that does not keep up holds the primary back,
//! within a bounded window, without either end declaring the other failed.

use crate::support::{bounded, entries, pair_via, relaxed, seed};
use logchannel::{ChannelConfig, Event, Position};
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
