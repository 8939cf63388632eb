//! Failure detection: a peer that goes away, or goes silent behind a
//! partition, is declared failed after about the failure timeout, never
//! before its silence could have lasted that long.

use crate::support::{addr, bounded, hello, listener, pair, seed, Fault, Proxy, Rng};
use logchannel::{ChannelConfig, ChannelError, Event, LogReceiver, LogSender, Position, Role};
use std::thread;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);
const SLACK: Duration = Duration::from_secs(2);

fn config() -> ChannelConfig {
    ChannelConfig::default()
}

/// Polls `failed` until it is true; how long that took.
fn time_to_failure(failed: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !failed() {
        assert!(
            start.elapsed() < config().failure_timeout + SLACK,
            "no failure detected within {:?}",
            config().failure_timeout + SLACK
        );
        thread::sleep(Duration::from_millis(2));
    }
    start.elapsed()
}

/// Well before a silence that starts now can be declared. The last byte
/// may have arrived a heartbeat interval or two earlier, later still on a
/// loaded machine, so only half the timeout is asserted: enough to catch a
/// detector that ignores the timeout.
fn earliest() -> Duration {
    config().failure_timeout / 2
}

fn pair_through_proxy() -> (LogSender, LogReceiver, Proxy) {
    let l = listener();
    let proxy = Proxy::new(addr(&l));
    let target = proxy.addr();
    let accepting = thread::spawn(move || LogSender::accept(&l, hello(Role::Primary), config()));
    let receiver =
        LogReceiver::connect(target, hello(Role::Backup), config()).expect("backup connects");
    let sender = accepting.join().expect("thread").expect("primary accepts");
    (sender, receiver, proxy)
}

#[test]
fn dropping_the_backup_fails_the_primary_side() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair(config());
        drop(receiver);
        time_to_failure(|| sender.peer_failed());
        let err = sender.failure().expect("failure");
        assert!(
            matches!(
                err,
                ChannelError::Closed { .. } | ChannelError::Broken { .. }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("the backup at 127.0.0.1:"),
            "{err}"
        );
        // Sticky, and every call says so.
        assert!(sender
            .send(Position::default(), Event::Interrupt { vector: 1 })
            .is_err());
        assert!(sender.wait_acked(1, Duration::from_secs(1)).is_err());
        assert!(sender.wait_window(Duration::from_secs(1)).is_ok());
    });
}

#[test]
fn dropping_the_primary_fails_the_backup_side_after_delivering_what_it_sent() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair(config());
        for exits in 1..=10 {
            sender
                .send(
                    Position { exits, rip: 0 },
                    Event::Interrupt { vector: 0x20 },
                )
                .expect("send");
        }
        assert!(sender
            .wait_acked(10, Duration::from_secs(10))
            .expect("acked"));
        drop(sender);
        time_to_failure(|| receiver.primary_failed());
        for seq in 1..=10 {
            let e = receiver.recv(Duration::ZERO).expect("queued entries first");
            assert_eq!(e.map(|e| e.seq), Some(seq));
        }
        let err = receiver.recv(Duration::ZERO).expect_err("then the failure");
        assert!(
            err.to_string().contains("the primary at 127.0.0.1:"),
            "{err}"
        );
    });
}

#[test]
fn a_partition_is_detected_by_both_ends() {
    bounded(LIMIT, || {
        let (sender, receiver, proxy) = pair_through_proxy();
        thread::sleep(Duration::from_millis(100));
        proxy.set(Fault::Blackhole, Fault::Blackhole);
        let (s, r) = thread::scope(|scope| {
            let s = scope.spawn(|| time_to_failure(|| sender.peer_failed()));
            let r = time_to_failure(|| receiver.primary_failed());
            (s.join().expect("thread"), r)
        });
        eprintln!("primary side detected after {s:?}, backup side after {r:?}");
        assert!(s >= earliest() && r >= earliest(), "{s:?} {r:?}");
        for err in [sender.failure(), receiver.failure()] {
            assert!(matches!(err, Some(ChannelError::Silent { .. })), "{err:?}");
        }
    });
}

#[test]
fn a_backup_that_goes_mute_is_declared_failed_by_the_primary() {
    bounded(LIMIT, || {
        let (sender, receiver, proxy) = pair_through_proxy();
        thread::sleep(Duration::from_millis(100));
        proxy.set(Fault::Forward, Fault::Blackhole);
        let s = time_to_failure(|| sender.peer_failed());
        assert!(s >= earliest(), "{s:?}");
        assert!(
            matches!(sender.failure(), Some(ChannelError::Silent { .. })),
            "{:?}",
            sender.failure()
        );
        // The primary closes on failure, which the backup then sees.
        time_to_failure(|| receiver.primary_failed());
    });
}

#[test]
fn a_primary_that_goes_mute_is_declared_failed_by_the_backup() {
    bounded(LIMIT, || {
        let (sender, receiver, proxy) = pair_through_proxy();
        sender.set_progress(10);
        assert!(receiver
            .wait_complete(10, Duration::from_secs(5))
            .expect("up"));
        proxy.set(Fault::Blackhole, Fault::Forward);
        // Entries sent into the partition are never acknowledged.
        let seq = sender
            .send(
                Position { exits: 20, rip: 0 },
                Event::Interrupt { vector: 0x20 },
            )
            .expect("send");
        let r = time_to_failure(|| receiver.primary_failed());
        assert!(r >= earliest(), "{r:?}");
        assert!(
            matches!(receiver.failure(), Some(ChannelError::Silent { .. })),
            "{:?}",
            receiver.failure()
        );
        assert!(
            !matches!(sender.wait_acked(seq, Duration::from_secs(5)), Ok(true)),
            "an entry lost in the partition was acknowledged"
        );
    });
}

#[test]
fn a_cut_connection_is_detected_promptly_at_a_random_moment() {
    let seed = seed("a_cut_connection_is_detected_promptly_at_a_random_moment");
    bounded(LIMIT, move || {
        let mut rng = Rng::new(seed);
        let (sender, receiver, proxy) = pair_through_proxy();
        let (sender, receiver) = (&sender, &receiver);
        let cut_after = Duration::from_millis(rng.below(200));
        thread::scope(|scope| {
            scope.spawn(move || {
                let mut exits = 0;
                while sender
                    .wait_window(Duration::from_secs(5))
                    .is_ok_and(|ok| ok)
                {
                    exits += 1;
                    let pos = Position { exits, rip: 0 };
                    if sender.send(pos, Event::Interrupt { vector: 0x20 }).is_err() {
                        break;
                    }
                }
            });
            scope.spawn(move || {
                while receiver
                    .recv(Duration::from_secs(5))
                    .is_ok_and(|e| e.is_some())
                {}
            });
            thread::sleep(cut_after);
            proxy.cut();
            time_to_failure(|| sender.peer_failed());
            time_to_failure(|| receiver.primary_failed());
        });
    });
}

#[test]
fn dropping_either_end_is_prompt_even_when_its_threads_are_blocked() {
    bounded(LIMIT, || {
        // The backup buffers little and reads nothing, so the primary's
        // writer ends up blocked in a write and the backup's reader paused.
        let backup = ChannelConfig {
            window_bytes: 4 << 10,
            ..config()
        };
        let (sender, receiver) = crate::support::pair_via(config(), backup, None);
        let packet = Event::Packet {
            desc_head: 0,
            frame: vec![0; 60_000],
        };
        for exits in 1..=200 {
            sender
                .send(Position { exits, rip: 0 }, packet.clone())
                .expect("send");
        }
        thread::sleep(Duration::from_millis(200));
        assert!(sender.metrics().in_flight > 100, "{:?}", sender.metrics());
        let start = Instant::now();
        drop(sender);
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "dropping the primary took {took:?}"
        );
        let start = Instant::now();
        drop(receiver);
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "dropping the backup took {took:?}"
        );
    });
}
