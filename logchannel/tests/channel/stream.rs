//! Entries flow in order and intact; acks, the output rule's wait, and the
//! metrics.

use crate::support::{bounded, entries, pair, relaxed, seed};
use logchannel::{ChannelConfig, Entry};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn a_hundred_thousand_entries_arrive_in_order_and_intact() {
    let seed = seed("a_hundred_thousand_entries_arrive_in_order_and_intact");
    bounded(LIMIT, move || {
        const N: usize = 100_000;
        let expected = Arc::new(entries(seed, N));
        let (sender, receiver) = pair(relaxed());
        let sender = Arc::new(sender);

        let producer = {
            let (sender, expected) = (Arc::clone(&sender), Arc::clone(&expected));
            thread::spawn(move || {
                let mut acked_seen = Vec::new();
                for e in expected.iter() {
                    while sender.window_full() {
                        assert!(sender
                            .wait_window(Duration::from_secs(10))
                            .expect("window opens"));
                    }
                    assert_eq!(sender.send(e.pos, e.event.clone()).expect("send"), e.seq);
                    if e.seq.is_multiple_of(10_000) {
                        acked_seen.push(sender.acked());
                    }
                }
                acked_seen
            })
        };

        for (i, want) in expected.iter().enumerate() {
            let got: Entry = receiver
                .recv(Duration::from_secs(10))
                .expect("recv")
                .unwrap_or_else(|| panic!("entry {} did not arrive", i + 1));
            assert_eq!(&got, want);
            if got.seq.is_multiple_of(1000) {
                receiver.report_replayed(got.seq, got.pos.exits);
            }
        }
        let last = expected[N - 1].clone();
        receiver.report_replayed(last.seq, last.pos.exits);

        let acked_seen = producer.join().expect("producer");
        assert!(
            acked_seen.windows(2).all(|w| w[0] <= w[1]),
            "acks go backwards: {acked_seen:?}"
        );
        assert!(sender
            .wait_acked(N as u64, Duration::from_secs(10))
            .expect("acked"));
        assert_eq!(sender.acked(), N as u64);
        assert_eq!(sender.in_flight(), 0);
        assert!(receiver
            .recv(Duration::from_millis(50))
            .expect("no error")
            .is_none());

        // The replay report rides on an ack within batch_delay or a
        // heartbeat.
        let start = Instant::now();
        while sender.metrics().lag_entries != 0 && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        let m = sender.metrics();
        eprintln!("{m:?}");
        assert_eq!(m.entries_sent, N as u64);
        assert_eq!(m.acked, N as u64);
        assert_eq!((m.in_flight, m.in_flight_bytes), (0, 0));
        assert_eq!((m.lag_entries, m.lag_exits, m.lag_ms), (0, 0, 0.0));
        let payload: usize = expected
            .iter()
            .map(|e| match &e.event {
                logchannel::Event::Packet { frame, .. } => frame.len(),
                _ => 0,
            })
            .sum();
        assert!(
            m.bytes_sent > payload as u64,
            "{} bytes sent for {payload} bytes of packets",
            m.bytes_sent
        );
        assert!(m.entries_per_sec > 0.0 && m.bytes_per_sec > 0.0);

        let r = receiver.metrics();
        assert_eq!(r.entries_received, N as u64);
        assert_eq!(r.queued, 0);
        assert_eq!(
            (r.replayed_seq, r.replayed_exits),
            (last.seq, last.pos.exits)
        );
        assert!(r.bytes_received < m.bytes_sent);
    });
}

#[test]
fn wait_acked_does_not_wait_for_the_batch_delay() {
    bounded(LIMIT, || {
        // A batch delay far beyond the test's limit: only the urgent write
        // that wait_acked asks for can get the entry acknowledged.
        let config = ChannelConfig {
            batch_delay: Duration::from_secs(3600),
            ..relaxed()
        };
        let (sender, receiver) = pair(config);
        let e = &entries(1, 1)[0];
        let seq = sender.send(e.pos, e.event.clone()).expect("send");
        assert_eq!(sender.acked(), 0);
        assert!(sender
            .wait_acked(seq, Duration::from_secs(20))
            .expect("no failure"));
        assert_eq!(sender.acked(), seq);
        assert_eq!(
            receiver
                .recv(Duration::from_secs(5))
                .expect("recv")
                .as_ref(),
            Some(e)
        );
    });
}

#[test]
fn wait_acked_times_out_for_an_entry_never_sent() {
    bounded(LIMIT, || {
        let (sender, _receiver) = pair(relaxed());
        let start = Instant::now();
        assert!(!sender
            .wait_acked(5, Duration::from_millis(100))
            .expect("no failure"));
        assert!(start.elapsed() >= Duration::from_millis(100));
    });
}

#[test]
fn an_entry_that_goes_backwards_is_refused_and_nothing_is_queued() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair(relaxed());
        let es = entries(2, 2);
        let mut later = es[0].pos;
        later.exits += 10;
        sender.send(later, es[0].event.clone()).expect("send");
        let err = sender
            .send(es[1].pos, es[1].event.clone())
            .expect_err("backwards");
        assert!(
            err.to_string().contains("before the previous entry"),
            "{err}"
        );
        let mut fine = es[1].pos;
        fine.exits = later.exits;
        assert_eq!(sender.send(fine, es[1].event.clone()).expect("send"), 2);
        for seq in 1..=2 {
            let got = receiver
                .recv(Duration::from_secs(5))
                .expect("recv")
                .expect("entry");
            assert_eq!(got.seq, seq);
        }
    });
}
