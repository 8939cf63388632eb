//! Stopping on purpose: an end that says goodbye is not taken for a failed
//! one, and what the primary sent before its goodbye is still delivered.

use crate::support::{bounded, pair, relaxed};
use logchannel::{ChannelConfig, ChannelError, Event, Position};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn config() -> ChannelConfig {
    ChannelConfig {
        failure_timeout: Duration::from_millis(300),
        ..relaxed()
    }
}

fn left_because(err: Option<ChannelError>, reason: &str) {
    match err {
        Some(ChannelError::PeerLeft { reason: r, .. }) => assert_eq!(r, reason),
        other => panic!("expected the peer's goodbye, got {other:?}"),
    }
}

#[test]
fn a_backup_that_says_goodbye_has_left_rather_than_failed() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair(config());
        let start = Instant::now();
        receiver.goodbye("stop requested").expect("goodbye");
        // The primary reads the goodbye and closes, which ends the wait.
        assert!(
            start.elapsed() < config().failure_timeout,
            "the goodbye waited {:?}",
            start.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while sender.failure().is_none() {
            assert!(Instant::now() < deadline, "the primary never heard it");
            std::thread::sleep(Duration::from_millis(2));
        }
        left_because(sender.failure(), "stop requested");
        let text = sender.failure().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.contains("stopped on purpose (stop requested)"),
            "{text}"
        );
        // A goodbye is final: a later one cannot be said.
        assert!(receiver.goodbye("again").is_err());
    });
}

#[test]
fn a_primary_that_says_goodbye_has_its_entries_delivered_first() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair(config());
        for exits in 1..=50 {
            let pos = Position { exits, rip: 0x1000 };
            sender
                .send(pos, Event::Interrupt { vector: 0x20 })
                .expect("send");
        }
        sender.goodbye("the guest powered off").expect("goodbye");
        for seq in 1..=50 {
            let entry = receiver
                .recv(Duration::from_secs(10))
                .expect("entries before the goodbye")
                .expect("an entry");
            assert_eq!(entry.seq, seq);
        }
        left_because(
            receiver.recv(Duration::from_secs(10)).err(),
            "the guest powered off",
        );
        // And it stays said.
        left_because(receiver.failure(), "the guest powered off");
    });
}

#[test]
fn a_backup_whose_buffer_is_full_still_says_goodbye_promptly() {
    bounded(LIMIT, || {
        let backup = ChannelConfig {
            window_entries: 10,
            ..config()
        };
        let (sender, receiver) = crate::support::pair_via(config(), backup, None);
        for exits in 1..=1000 {
            let pos = Position { exits, rip: 0x1000 };
            sender
                .send(pos, Event::Interrupt { vector: 0x20 })
                .expect("send");
        }
        sender.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        receiver.goodbye("stop requested").expect("goodbye");
        assert!(start.elapsed() < config().failure_timeout);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sender.failure().is_none() {
            assert!(Instant::now() < deadline, "the primary never heard it");
            std::thread::sleep(Duration::from_millis(2));
        }
        left_because(sender.failure(), "stop requested");
    });
}
