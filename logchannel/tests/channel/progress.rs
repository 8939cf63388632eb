//! Progress marks: the backup learns how far the log is complete while no
//! entries flow, and an idle channel stays up on heartbeats alone.

use crate::support::{bounded, pair};
use logchannel::{ChannelConfig, Event, Position};
use std::thread;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn progress_marks_reach_the_backup_without_entries() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair(ChannelConfig::default());
        assert_eq!(receiver.complete_up_to(), 0);
        sender.set_progress(1000);
        assert!(receiver
            .wait_complete(1000, Duration::from_secs(10))
            .expect("no failure"));
        assert_eq!(receiver.complete_up_to(), 1000);

        // An entry at exit 5000 implies everything before exit 5000.
        sender
            .send(
                Position {
                    exits: 5000,
                    rip: 0x1000,
                },
                Event::Interrupt { vector: 0x20 },
            )
            .expect("send");
        assert!(receiver
            .wait_complete(4999, Duration::from_secs(10))
            .expect("no failure"));
        assert_eq!(receiver.complete_up_to(), 4999);
        assert_eq!(
            receiver.recv(Duration::ZERO).expect("recv").map(|e| e.seq),
            Some(1),
            "the entry is there by the time completeness says so"
        );

        sender.set_progress(7000);
        // A lower mark than what was declared changes nothing.
        sender.set_progress(6000);
        assert!(receiver
            .wait_complete(7000, Duration::from_secs(10))
            .expect("no failure"));
        assert!(!receiver
            .wait_complete(7001, Duration::from_millis(100))
            .expect("no failure"));
        assert_eq!(receiver.metrics().complete_up_to, 7000);
        assert_eq!(sender.metrics().lag_exits, 7000);
        receiver.report_replayed(1, 6500);
        for _ in 0..1000 {
            if sender.metrics().lag_exits == 500 {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sender.metrics().lag_exits, 500);
    });
}

#[test]
fn an_idle_channel_stays_up_on_heartbeats() {
    bounded(LIMIT, || {
        let config = ChannelConfig::default();
        let (sender, receiver) = pair(config);
        // Ten failure timeouts without an entry.
        thread::sleep(config.failure_timeout * 10);
        assert!(!sender.peer_failed(), "{:?}", sender.failure());
        assert!(!receiver.primary_failed(), "{:?}", receiver.failure());
    });
}

#[test]
fn recv_or_complete_returns_on_an_entry_or_on_completeness() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair(ChannelConfig::default());
        // Nothing known yet: it waits out its timeout.
        assert!(receiver
            .recv_or_complete(100, Duration::from_millis(50))
            .expect("no failure")
            .is_none());
        assert_eq!(receiver.complete_up_to(), 0);

        // A progress mark alone is enough, well before the timeout.
        sender.set_progress(100);
        let start = std::time::Instant::now();
        assert!(receiver
            .recv_or_complete(100, Duration::from_secs(30))
            .expect("no failure")
            .is_none());
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(receiver.complete_up_to() >= 100);

        // Beyond what is known complete, an entry ends the wait.
        sender
            .send(
                Position {
                    exits: 150,
                    rip: 0x1000,
                },
                Event::Interrupt { vector: 0x20 },
            )
            .expect("send");
        let entry = receiver
            .recv_or_complete(200, Duration::from_secs(30))
            .expect("no failure");
        assert_eq!(entry.map(|e| e.seq), Some(1));
        assert_eq!(receiver.complete_up_to(), 149);
    });
}
