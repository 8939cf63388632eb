//! `ftvm bench channel`: the log channel alone on loopback, no guest: how
//! fast entries stream, and how long an entry takes to be acknowledged when
//! the sender writes it itself (`flush`, what the output gate does) against
//! when it leaves the write to the channel's writer thread.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use logchannel::{image_hash, ChannelConfig, Event, Hello, LogReceiver, LogSender, Position, Role};
use serde::Serialize;

use crate::report::write_json;
use crate::stats::percentile;

/// No wait in this benchmark may take longer; a channel that stalls fails
/// it instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct ChannelBenchArgs {
    /// Entries streamed for the throughput figure.
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: u64,
    /// Round trips (send an entry, wait for its ack) for each way of
    /// writing it.
    #[arg(long, default_value_t = 5_000)]
    pub round_trips: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
pub struct ChannelReport {
    pub entries: u64,
    pub entries_per_sec: f64,
    pub wire_bytes_per_entry: f64,
    pub round_trips: u64,
    /// `send` then `wait_acked`: the writer thread is woken to write.
    pub writer_p50_us: f64,
    pub writer_p99_us: f64,
    /// `send`, `flush` (written from this thread), then `wait_acked`.
    pub flush_p50_us: f64,
    pub flush_p99_us: f64,
    pub flush_over_writer_p50: f64,
}

fn at(exits: u64) -> Position {
    Position { exits, rip: 0x1000 }
}

fn connect() -> Result<(LogSender, Arc<LogReceiver>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("no loopback port")?;
    let addr = listener.local_addr()?;
    let hello = |role, first_seq| {
        Hello::new(
            role,
            "bench-channel",
            1,
            image_hash(b"no guest"),
            0,
            "none",
            first_seq,
        )
    };
    let backup = std::thread::spawn(move || {
        LogReceiver::connect(addr, hello(Role::Backup, 0), ChannelConfig::default())
    });
    let sender = LogSender::accept(&listener, hello(Role::Primary, 1), ChannelConfig::default())?;
    let receiver = backup
        .join()
        .map_err(|_| anyhow!("the backup thread panicked"))??;
    Ok((sender, Arc::new(receiver)))
}

/// Ends the log and waits for its ack, then closes: the backup then takes
/// the close for the end of the run, not a failure.
fn end(sender: LogSender, exits: u64) -> Result<()> {
    let end = Event::End {
        exits,
        reason: "benchmark done".into(),
    };
    let seq = sender.send(at(exits), end)?;
    sender.flush()?;
    if !sender.wait_acked(seq, WAIT)? {
        bail!("the End entry was not acknowledged within {WAIT:?}");
    }
    Ok(())
}

/// Streams `n` entries as a primary's exits would, the window respected;
/// returns entries per second and wire bytes per entry.
fn stream(n: u64) -> Result<(f64, f64)> {
    let (sender, receiver) = connect()?;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (receiver, done) = (receiver.clone(), done.clone());
        std::thread::spawn(move || -> Result<u64> {
            let mut got = 0;
            while got < n && !done.load(Ordering::Relaxed) {
                let Some(e) = receiver.recv(WAIT)? else {
                    bail!("no entry for {WAIT:?} after {got}");
                };
                got += 1;
                receiver.report_replayed(e.seq, e.pos.exits);
            }
            Ok(got)
        })
    };
    let start = Instant::now();
    for i in 1..=n {
        sender.send(at(i), Event::Rdtsc { value: i << 20 })?;
        while sender.window_full() {
            if !sender.wait_window(WAIT)? {
                done.store(true, Ordering::Relaxed);
                bail!("the window stayed full for {WAIT:?}");
            }
        }
    }
    sender.flush()?;
    let got = reader
        .join()
        .map_err(|_| anyhow!("the reader panicked"))??;
    let seconds = start.elapsed().as_secs_f64();
    let bytes = sender.metrics().bytes_sent as f64;
    end(sender, n + 1)?;
    Ok((got as f64 / seconds, bytes / got.max(1) as f64))
}

/// Latencies in ns, sorted, of `n` round trips, with or without `flush`.
fn round_trips(n: u64, flush: bool) -> Result<Vec<u64>> {
    let (sender, receiver) = connect()?;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (receiver, done) = (receiver.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if receiver.recv(Duration::from_millis(50)).is_err() {
                    return;
                }
            }
        })
    };
    let mut latencies = Vec::with_capacity(n as usize);
    let mut result = Ok(());
    for i in 1..=n {
        let t = Instant::now();
        let acked = sender
            .send(at(i), Event::Rdtsc { value: i })
            .and_then(|seq| {
                if flush {
                    sender.flush()?;
                }
                sender.wait_acked(seq, WAIT)
            });
        match acked {
            Ok(true) => latencies.push(t.elapsed().as_nanos() as u64),
            Ok(false) => {
                result = Err(anyhow!("entry {i} not acknowledged within {WAIT:?}"));
                break;
            }
            Err(e) => {
                result = Err(e.into());
                break;
            }
        }
    }
    result?;
    end(sender, n + 1)?;
    done.store(true, Ordering::Relaxed);
    let _ = reader.join();
    latencies.sort_unstable();
    Ok(latencies)
}

pub fn bench_channel(args: &ChannelBenchArgs) -> Result<()> {
    if args.entries == 0 || args.round_trips == 0 {
        bail!("--entries and --round-trips must be at least 1");
    }
    println!(
        "measuring: {} entries streamed, then {} round trips each with the writer thread and with flush, alternating in 4 slices",
        args.entries, args.round_trips
    );
    let (entries_per_sec, wire_bytes_per_entry) = stream(args.entries)?;
    // Slices alternate so that a drift in the machine's speed falls on both.
    let slice = args.round_trips.div_ceil(4);
    let (mut writer, mut flushed) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        writer.extend(round_trips(slice, false)?);
        flushed.extend(round_trips(slice, true)?);
    }
    writer.sort_unstable();
    flushed.sort_unstable();
    let report = ChannelReport {
        entries: args.entries,
        entries_per_sec,
        wire_bytes_per_entry,
        round_trips: slice * 4,
        writer_p50_us: percentile(&writer, 0.50),
        writer_p99_us: percentile(&writer, 0.99),
        flush_p50_us: percentile(&flushed, 0.50),
        flush_p99_us: percentile(&flushed, 0.99),
        flush_over_writer_p50: percentile(&flushed, 0.50)
            / percentile(&writer, 0.50).max(f64::MIN_POSITIVE),
    };
    println!(
        "stream: {:.2} M entries/s, {:.1} bytes per entry on the wire",
        report.entries_per_sec / 1e6,
        report.wire_bytes_per_entry
    );
    println!(
        "send to ack: writer thread p50 {:.0} µs p99 {:.0} µs; flush p50 {:.0} µs p99 {:.0} µs; flush / writer at p50 = {:.2}",
        report.writer_p50_us,
        report.writer_p99_us,
        report.flush_p50_us,
        report.flush_p99_us,
        report.flush_over_writer_p50
    );
    write_json(args.json.as_deref(), &report)
}
