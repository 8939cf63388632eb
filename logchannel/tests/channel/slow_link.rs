//! What counts as a failure and what does not: a slow link is not a dead
//! or stalled backup; a backup whose replay stands still while its
//! connection answers is stalled; a primary that stopped writing for half
//! the failure timeout knows it.

use crate::support::{addr, bounded, hello, listener, pair, relaxed, Proxy};
use logchannel::{ChannelConfig, Event, LogReceiver, LogSender, Position, Role};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// The servers' defaults: 300 ms failure timeout, a 5 ms lag bound.
fn server_config() -> ChannelConfig {
    ChannelConfig {
        failure_timeout: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(30),
        handshake_timeout: Duration::from_secs(2),
        window_entries: 256,
        max_lag: Some(Duration::from_millis(5)),
        batch_delay: Duration::from_millis(2),
        ..ChannelConfig::default()
    }
}

/// A pair whose link delays every byte by `delay` each way.
fn delayed_pair(delay: Duration) -> (LogSender, LogReceiver, Proxy) {
    let l = listener();
    let proxy = Proxy::new(addr(&l));
    proxy.delay(delay);
    let target = proxy.addr();
    let accepting =
        thread::spawn(move || LogSender::accept(&l, hello(Role::Primary), server_config()));
    let receiver = LogReceiver::connect(target, hello(Role::Backup), server_config())
        .expect("backup connects");
    let sender = accepting.join().expect("thread").expect("primary accepts");
    (sender, receiver, proxy)
}

/// A backup that replays each entry as it comes and reports it, as ftvm's
/// does, until `stop`.
fn replaying(receiver: LogReceiver, stop: Arc<AtomicBool>) -> thread::JoinHandle<LogReceiver> {
    thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match receiver.recv(Duration::from_millis(20)) {
                Ok(Some(entry)) => receiver.report_replayed(entry.seq, entry.pos.exits),
                Ok(None) => {
                    let _ = receiver.flush_report();
                }
                Err(e) => panic!("the backup saw a failure: {e}"),
            }
        }
        receiver
    })
}

/// Runs a primary for `run`: a few entries per exit, flow control at each
/// exit as ftvm's primary does. Returns the longest replay stall seen and
/// the number of exits made.
fn run_primary(sender: &LogSender, run: Duration) -> (Duration, u64) {
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    let mut exits = 0;
    while start.elapsed() < run {
        exits += 1;
        for _ in 0..3 {
            let pos = Position { exits, rip: 0x1000 };
            sender
                .send(pos, Event::Rdtsc { value: exits })
                .expect("no failure");
        }
        sender.set_progress(exits);
        while sender.window_full() {
            worst = worst.max(sender.replay_stall().unwrap_or_default());
            sender
                .wait_window(Duration::from_millis(20))
                .expect("no failure");
        }
        worst = worst.max(sender.replay_stall().unwrap_or_default());
        thread::sleep(Duration::from_micros(200));
    }
    (worst, exits)
}

#[test]
fn a_link_with_a_round_trip_as_long_as_the_failure_timeout_is_not_a_failure() {
    bounded(LIMIT, || {
        // 150 ms each way: a 300 ms round trip, the failure timeout.
        let (sender, receiver, _proxy) = delayed_pair(Duration::from_millis(150));
        let stop = Arc::new(AtomicBool::new(false));
        let backup = replaying(receiver, stop.clone());
        let (worst_stall, exits) = run_primary(&sender, Duration::from_secs(3));
        stop.store(true, Ordering::SeqCst);
        let receiver = backup.join().expect("the backup saw no failure");
        assert!(!sender.peer_failed(), "{:?}", sender.failure());
        assert!(!receiver.primary_failed(), "{:?}", receiver.failure());
        let timeout = server_config().failure_timeout;
        assert!(
            worst_stall < timeout / 2,
            "the backup looked stalled for {worst_stall:?}"
        );
        // The lag bound judges the replay, not the link: the primary is
        // held by its window (256 entries per round trip, some 2,500 in
        // 3 s), not for a round trip after every 5 ms of running (some
        // 600).
        let m = sender.metrics();
        assert!(m.rtt_ms >= 290.0, "{m:?}");
        assert!(
            m.entries_sent > 1500,
            "only {} entries in {exits} exits in 3 s: {m:?}",
            m.entries_sent
        );
    });
}

#[test]
fn a_backup_whose_replay_stands_still_is_stalled_though_its_connection_answers() {
    bounded(LIMIT, || {
        let (sender, receiver) = pair(server_config());
        // Received (and so acknowledged) but never replayed.
        for exits in 1..=20 {
            let pos = Position { exits, rip: 0x1000 };
            sender
                .send(pos, Event::Interrupt { vector: 0x20 })
                .expect("send");
        }
        sender.flush().expect("flush");
        assert!(sender
            .wait_acked(20, Duration::from_secs(10))
            .expect("acked"));
        let first = receiver
            .recv(Duration::from_secs(10))
            .expect("recv")
            .expect("entry");
        receiver.report_replayed(first.seq, first.pos.exits);
        receiver.flush_report().expect("report");
        thread::sleep(Duration::from_millis(50));
        let before = sender.replay_stall().expect("entries 2..20 not replayed");
        thread::sleep(server_config().failure_timeout);
        let after = sender.replay_stall().expect("still not replayed");
        assert!(after >= before + server_config().failure_timeout);
        assert!(!sender.peer_failed(), "the connection itself is fine");

        // Replay moving again clears it.
        let second = receiver
            .recv(Duration::from_secs(10))
            .expect("recv")
            .expect("entry");
        receiver.report_replayed(second.seq, second.pos.exits);
        receiver.flush_report().expect("report");
        let start = Instant::now();
        while sender
            .replay_stall()
            .is_some_and(|s| s > Duration::from_millis(100))
        {
            assert!(start.elapsed() < Duration::from_secs(10));
            thread::sleep(Duration::from_millis(2));
        }
        while let Ok(Some(e)) = receiver.recv(Duration::ZERO) {
            receiver.report_replayed(e.seq, e.pos.exits);
        }
        receiver.flush_report().expect("report");
        let start = Instant::now();
        while sender.replay_stall().is_some() {
            assert!(start.elapsed() < Duration::from_secs(10));
            thread::sleep(Duration::from_millis(2));
        }
    });
}

#[test]
fn a_primary_that_stops_writing_counts_the_gap() {
    bounded(LIMIT, || {
        let config = ChannelConfig {
            failure_timeout: Duration::from_millis(300),
            heartbeat_interval: Duration::from_millis(20),
            ..relaxed()
        };
        let (sender, _receiver) = pair(config);
        // Heartbeats keep the writing continuous.
        thread::sleep(Duration::from_millis(500));
        assert_eq!(sender.write_gaps(), 0);
        // Nothing is written after a close: a gap, once half the failure
        // timeout has passed, and still the same one later.
        sender.close();
        thread::sleep(config.failure_timeout / 2 + Duration::from_millis(50));
        assert_eq!(sender.write_gaps(), 1);
        thread::sleep(config.failure_timeout);
        assert_eq!(sender.write_gaps(), 1);
    });
}
