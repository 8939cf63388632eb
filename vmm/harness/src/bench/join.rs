//! `ftvm bench join`: what it costs to bring a backup up beside a primary
//! that is serving a load: the pause at the cut, the whole transfer, the
//! pre-copy rounds, the bytes sent against the memory the guest has
//! touched, the clients' throughput during the transfer against before it,
//! and both sides' memory during it. One primary serves throughout; each
//! join is a fresh `ftvm backup` that waits as a spare, is named backup by
//! the arbiter, joins by state transfer, and is stopped again (SIGTERM: it
//! says goodbye) before the next one.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::launcher::{
    free_tcp_addr, free_udp_addr, Guest, Knobs, Launcher, Membership, Process, Role, ServerConfig,
};
use crate::procstat::{max_rss_kib, rss_kib};
use crate::report::write_json;
use crate::stats::median;
use ftvm_core::host::events::{unix_ns, EventRecord, ServerEvent};
use ftvm_core::machine::workload::Workload;
use ftvm_kvclient::{ClientConfig, KvClient};

const VM_ID: &str = "bench-join";
/// Guest pages are this big; a transfer round counts pages.
const PAGE: u64 = 4096;
/// The RSS allowance over the touched memory that the target grants.
const RSS_ALLOWANCE_MIB: f64 = 32.0;
const SECOND_NS: u64 = 1_000_000_000;
/// How often memory is sampled while a backup joins: often enough to see
/// a short transfer, cheap enough (one small /proc read per process) not
/// to take the cores from the guest.
const RSS_EVERY: Duration = Duration::from_millis(5);
/// How often the primary's events are read while waiting: the file grows
/// with the run, so not too often.
const EVENTS_EVERY: Duration = Duration::from_millis(50);
/// For one backup to boot, be named and join.
const JOIN_LIMIT: Duration = Duration::from_secs(90);
/// For the primary to hear a stopped backup's goodbye.
const GOODBYE_LIMIT: Duration = Duration::from_secs(15);

#[derive(clap::Args)]
pub struct JoinBenchArgs {
    /// Backups that join, one after another.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub joins: u32,
    /// Closed-loop KV clients against the primary, throughout.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub clients: u32,
    /// Guest memory size.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// Seconds of load (1 to 600) before the first join, and between a
    /// backup's goodbye and the next backup's start, so that each "before"
    /// window is undisturbed load.
    #[arg(long, default_value_t = 2.0, value_parser = settle_seconds)]
    pub settle: f64,
    /// Failure timeout of the log channel, in ms.
    #[arg(long, default_value_t = 300)]
    pub failure_timeout_ms: u64,
    /// The guest workload: `kv-user` (the KV service's hot path at CPL3)
    /// or `kv` (all of it at CPL0).
    #[arg(long, default_value = "kv-user")]
    pub workload: Workload,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `--settle`: at least the second the steadier baseline looks back over.
fn settle_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (1.0..=600.0).contains(&s) => Ok(s),
        _ => Err(format!("{text}: a number of seconds from 1 to 600")),
    }
}

/// One backup's join.
#[derive(Debug, Default, Serialize)]
pub struct Join {
    pub backup: String,
    /// From the primary's `protected` event.
    pub pause_ms: f64,
    pub transfer_ms: f64,
    pub rounds: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Round 1 sends every page the guest has touched (the non-zero ones).
    pub touched_bytes: u64,
    /// Bytes sent over touched memory.
    pub sent_over_touched: f64,
    /// The clients' replies per second while the state was sent, and in a
    /// window as long that ended when the backup was started.
    pub ops_per_sec_during: f64,
    pub ops_per_sec_before: f64,
    pub throughput_ratio: f64,
    /// The clients' replies per second in the whole second before the
    /// backup was started: a steadier baseline than a window as short as
    /// the transfer.
    pub ops_per_sec_second_before: f64,
    /// The most resident memory seen while the backup booted and joined
    /// (sampled every 5 ms; for the fresh backup also its peak, VmHWM).
    pub primary_rss_mib: f64,
    pub backup_rss_mib: f64,
    /// From the backup's start to the primary's `protected`: its boot, the
    /// wait to be named and the transfer.
    pub start_to_protected_ms: f64,
    #[serde(skip)]
    window: (u64, u64),
    #[serde(skip)]
    before: (u64, u64),
}

#[derive(Debug, Default, Serialize)]
pub struct JoinReport {
    pub mem: String,
    pub clients: u32,
    pub joins: Vec<Join>,
    pub pause_p50_ms: f64,
    pub pause_max_ms: f64,
    pub transfer_p50_ms: f64,
    pub transfer_max_ms: f64,
    pub rounds_median: f64,
    pub rounds_max: u32,
    pub touched_mib_median: f64,
    pub sent_mib_median: f64,
    pub sent_over_touched_median: f64,
    /// Replies during all transfers over their total time, against the
    /// same over all the "before" windows.
    pub ops_per_sec_during: f64,
    pub ops_per_sec_before: f64,
    pub throughput_ratio: f64,
    pub throughput_ratio_min: f64,
    /// Replies during all transfers against the seconds before the
    /// backups were started, pooled likewise.
    pub ops_per_sec_seconds_before: f64,
    pub throughput_ratio_vs_seconds_before: f64,
    pub primary_rss_max_mib: f64,
    pub backup_rss_max_mib: f64,
    /// The target's bound for each side: the most touched memory of any
    /// join plus 32 MiB.
    pub rss_bound_mib: f64,
}

/// The clients, running until told to stop; each keeps the Unix time of
/// every reply it got.
struct Clients {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Vec<u64>>>,
}

impl Clients {
    fn start(service: SocketAddr, clients: u32) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..clients)
            .map(|c| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // Retries cover the pause at the cut and a primary that
                    // holds a reply for its backup; a request that still
                    // fails is left out, and the client goes on.
                    let config = ClientConfig {
                        attempt_timeout: Duration::from_millis(200),
                        max_attempts: 25,
                    };
                    let mut replies = Vec::new();
                    let Ok(mut kv) = KvClient::connect(service, config) else {
                        return replies;
                    };
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("j{c}-{}", i % 64);
                        let done = if i.is_multiple_of(2) {
                            kv.put(key.as_bytes(), b"0123456789abcdef").is_ok()
                        } else {
                            kv.get(key.as_bytes()).is_ok()
                        };
                        if done {
                            replies.push(unix_ns());
                        }
                        i += 1;
                    }
                    replies
                })
            })
            .collect();
        Clients { stop, handles }
    }

    /// Stops them; every reply's time, sorted.
    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<u64> = self
            .handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        all.sort_unstable();
        all
    }
}

/// Replies per second in `[from, to)` of the sorted `replies`.
fn rate(replies: &[u64], (from, to): (u64, u64)) -> f64 {
    if to <= from {
        return 0.0;
    }
    let n = replies.partition_point(|t| *t < to) - replies.partition_point(|t| *t < from);
    n as f64 / ((to - from) as f64 / 1e9)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The arbiter and the primary, alone; the primary answers.
fn start_primary(
    launcher: &Launcher,
    args: &JoinBenchArgs,
    dir: &std::path::Path,
    limit: Duration,
) -> Result<(Process, Process, Membership)> {
    let listen = free_tcp_addr()?;
    let mut config = ServerConfig::arbiter(listen, &dir.join("arbiter-state"));
    config.dir = Some(dir.to_owned());
    std::fs::create_dir_all(dir.join("arbiter-state"))
        .context("cannot create the arbiter's state directory")?;
    let mut arbiter = launcher.start(&config)?;
    arbiter.wait_for(
        "the arbiter to listen",
        Duration::from_secs(30),
        Duration::from_millis(10),
        |_| Ok(TcpStream::connect(listen).is_ok()),
    )?;
    let membership = Membership {
        arbiter: arbiter::ArbiterAddr::Builtin(listen),
        vm_id: VM_ID.into(),
        knobs: Knobs {
            failure_timeout_ms: Some(args.failure_timeout_ms),
            ..Knobs::default()
        },
    };
    let role = Role::Primary {
        membership: membership.clone(),
        log_listen: free_tcp_addr()?,
        log_advertise: None,
    };
    let mut config = ServerConfig::new("primary", role, free_udp_addr()?, limit);
    config.dir = Some(dir.to_owned());
    config.guest = Guest {
        mem: Some(args.mem.clone()),
        workload: Some(args.workload),
        ..Guest::default()
    };
    let mut primary = launcher.start(&config)?;
    primary.wait_event("role", Duration::from_secs(30), |e| {
        matches!(e, ServerEvent::Role { .. })
    })?;
    primary.wait_answering(Duration::from_secs(30))?;
    Ok((arbiter, primary, membership))
}

/// The primary's events about its transfer to `backup`: when it started,
/// its first round's page count, and the `protected` event.
fn transfer_of<'a>(
    events: &'a [EventRecord],
    backup: &str,
) -> Option<(u64, Option<u64>, &'a EventRecord)> {
    let protected = events.iter().position(
        |e| matches!(&e.event, ServerEvent::Protected { backup: b, .. } if b == backup),
    )?;
    let started = events[..protected].iter().rposition(
        |e| matches!(&e.event, ServerEvent::TransferStarted { backup: b, .. } if b == backup),
    )?;
    let first_round = events[started..protected]
        .iter()
        .find_map(|e| match e.event {
            ServerEvent::TransferRound { pages, .. } => Some(pages),
            _ => None,
        });
    Some((events[started].t_ns, first_round, &events[protected]))
}

/// One backup: started, waited for until its primary says it is
/// protected (memory sampled meanwhile), measured, stopped.
fn join(
    launcher: &Launcher,
    primary: &mut Process,
    membership: &Membership,
    args: &JoinBenchArgs,
    dir: &std::path::Path,
    n: u32,
) -> Result<Join> {
    let name = format!("join{n}");
    let role = Role::Backup {
        membership: membership.clone(),
    };
    let mut config = ServerConfig::new(&name, role, free_udp_addr()?, JOIN_LIMIT * 2);
    config.dir = Some(dir.to_owned());
    config.guest = Guest {
        mem: Some(args.mem.clone()),
        workload: Some(args.workload),
        ..Guest::default()
    };
    let launched_ns = unix_ns();
    let launched = Instant::now();
    let mut backup = launcher.start(&config)?;
    let (mut primary_kib, mut backup_kib) = (0u64, 0u64);
    let mut next_look = Instant::now();
    let found = loop {
        primary_kib = primary_kib.max(rss_kib(primary.pid()).unwrap_or(0));
        backup_kib = backup_kib.max(rss_kib(backup.pid()).unwrap_or(0));
        if Instant::now() >= next_look {
            next_look += EVENTS_EVERY;
            let events = primary.events();
            if let Some(failed) = events.iter().find_map(|e| match &e.event {
                ServerEvent::TransferFailed { detail, .. } if e.t_ns >= launched_ns => {
                    Some(detail.clone())
                }
                _ => None,
            }) {
                bail!("the transfer to {name} failed: {failed}");
            }
            if let Some((started, first_round, protected)) = transfer_of(&events, &name) {
                break (started, first_round, protected.clone());
            }
            if let Some(why) = backup.died().or_else(|| primary.died()) {
                bail!("{name} did not join: {why}");
            }
            if launched.elapsed() > JOIN_LIMIT {
                bail!(
                    "{name} did not join within {JOIN_LIMIT:?}\n  {}\n  {}",
                    backup.log_tail(),
                    primary.log_tail()
                );
            }
        }
        std::thread::sleep(RSS_EVERY);
    };
    // The fresh backup's peak covers its whole life so far, the transfer
    // in it.
    backup_kib = backup_kib.max(max_rss_kib(backup.pid()).unwrap_or(0));
    let (started_ns, first_round, protected) = found;
    let ServerEvent::Protected {
        rounds,
        pages,
        bytes,
        pause_ms,
        transfer_ms,
        ..
    } = protected.event
    else {
        return Err(anyhow!("{name}: not a protected event"));
    };
    let window = (started_ns, protected.t_ns.max(started_ns));
    let length = window.1 - window.0;
    let before = (launched_ns.saturating_sub(length), launched_ns);
    let touched_bytes = first_round.unwrap_or(pages) * PAGE;
    let result = Join {
        backup: name.clone(),
        pause_ms,
        transfer_ms,
        rounds,
        pages_sent: pages,
        bytes_sent: bytes,
        touched_bytes,
        sent_over_touched: bytes as f64 / touched_bytes.max(1) as f64,
        primary_rss_mib: kib_to_mib(primary_kib),
        backup_rss_mib: kib_to_mib(backup_kib),
        start_to_protected_ms: protected.t_ns.saturating_sub(launched_ns) as f64 / 1e6,
        window,
        before,
        ..Join::default()
    };
    // It says goodbye; the primary goes on alone, and the arbiter drops it
    // from the view before the next one comes.
    let stopped_ns = unix_ns();
    backup
        .stop(Duration::from_secs(10))
        .with_context(|| format!("{name} did not stop"))?;
    primary.wait_for(
        &format!("the primary to hear {name} leave"),
        GOODBYE_LIMIT,
        EVENTS_EVERY,
        |p| {
            Ok(p.events().iter().any(|e| {
                e.t_ns >= stopped_ns
                    && matches!(
                        e.event,
                        ServerEvent::PeerLeft { .. } | ServerEvent::FailureDetected { .. }
                    )
            }))
        },
    )?;
    Ok(result)
}

pub fn bench_join(args: &JoinBenchArgs) -> Result<()> {
    let launcher = Launcher::this_executable()?;
    let dir = tempfile::Builder::new()
        .prefix("ftvm-bench-join-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let settle = Duration::from_secs_f64(args.settle);
    let limit = (JOIN_LIMIT + GOODBYE_LIMIT + settle) * args.joins + Duration::from_secs(120);
    println!(
        "measuring: {} joins of a fresh backup to a primary with a {} guest under {} closed-loop KV clients, {:.1} s of load before each",
        args.joins, args.mem, args.clients, args.settle
    );
    let (_arbiter, mut primary, membership) = start_primary(&launcher, args, dir.path(), limit)?;
    let clients = Clients::start(primary.address()?, args.clients);
    let mut joins = Vec::new();
    let mut failure = None;
    for n in 0..args.joins {
        std::thread::sleep(settle);
        match join(&launcher, &mut primary, &membership, args, dir.path(), n) {
            Ok(j) => {
                println!(
                    "  join {n}: pause {:.2} ms, transfer {:.0} ms in {} rounds, {:.2} MiB sent for {:.2} MiB touched, RSS primary {:.1} MiB backup {:.1} MiB",
                    j.pause_ms, j.transfer_ms, j.rounds, mib(j.bytes_sent), mib(j.touched_bytes),
                    j.primary_rss_mib, j.backup_rss_mib
                );
                joins.push(j);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    std::thread::sleep(settle.min(Duration::from_secs(1)));
    let replies = clients.finish();
    let _ = primary.stop(Duration::from_secs(10));
    if let Some(e) = failure {
        return Err(e.context(format!("after {} joins", joins.len())));
    }
    let report = summarise(args, joins, &replies);
    print_report(&report);
    write_json(args.json.as_deref(), &report)
}

fn summarise(args: &JoinBenchArgs, mut joins: Vec<Join>, replies: &[u64]) -> JoinReport {
    let (mut during_ops, mut during_ns, mut before_ops, mut before_ns) = (0.0, 0u64, 0.0, 0u64);
    let mut seconds_before = 0.0;
    for j in &mut joins {
        j.ops_per_sec_during = rate(replies, j.window);
        j.ops_per_sec_before = rate(replies, j.before);
        let launched = j.before.1;
        j.ops_per_sec_second_before = rate(replies, (launched.saturating_sub(SECOND_NS), launched));
        seconds_before += j.ops_per_sec_second_before;
        j.throughput_ratio = j.ops_per_sec_during / j.ops_per_sec_before.max(f64::MIN_POSITIVE);
        let (d, b) = (j.window.1 - j.window.0, j.before.1 - j.before.0);
        during_ops += j.ops_per_sec_during * d as f64 / 1e9;
        before_ops += j.ops_per_sec_before * b as f64 / 1e9;
        during_ns += d;
        before_ns += b;
    }
    let med = |f: &dyn Fn(&Join) -> f64| median(&mut joins.iter().map(f).collect::<Vec<_>>());
    let max = |f: &dyn Fn(&Join) -> f64| joins.iter().map(f).fold(0.0, f64::max);
    let ops_per_sec_during = during_ops / (during_ns.max(1) as f64 / 1e9);
    let ops_per_sec_before = before_ops / (before_ns.max(1) as f64 / 1e9);
    let ops_per_sec_seconds_before = seconds_before / joins.len().max(1) as f64;
    JoinReport {
        mem: args.mem.clone(),
        clients: args.clients,
        pause_p50_ms: med(&|j| j.pause_ms),
        pause_max_ms: max(&|j| j.pause_ms),
        transfer_p50_ms: med(&|j| j.transfer_ms),
        transfer_max_ms: max(&|j| j.transfer_ms),
        rounds_median: med(&|j| f64::from(j.rounds)),
        rounds_max: joins.iter().map(|j| j.rounds).max().unwrap_or(0),
        touched_mib_median: med(&|j| mib(j.touched_bytes)),
        sent_mib_median: med(&|j| mib(j.bytes_sent)),
        sent_over_touched_median: med(&|j| j.sent_over_touched),
        ops_per_sec_during,
        ops_per_sec_before,
        throughput_ratio: ops_per_sec_during / ops_per_sec_before.max(f64::MIN_POSITIVE),
        throughput_ratio_min: joins
            .iter()
            .map(|j| j.throughput_ratio)
            .reduce(f64::min)
            .unwrap_or(0.0),
        ops_per_sec_seconds_before,
        throughput_ratio_vs_seconds_before: ops_per_sec_during
            / ops_per_sec_seconds_before.max(f64::MIN_POSITIVE),
        primary_rss_max_mib: max(&|j| j.primary_rss_mib),
        backup_rss_max_mib: max(&|j| j.backup_rss_mib),
        rss_bound_mib: max(&|j| mib(j.touched_bytes)) + RSS_ALLOWANCE_MIB,
        joins,
    }
}

fn print_report(r: &JoinReport) {
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!();
    println!(
        "| {} guest, {} clients, {} joins | measured | target |",
        r.mem,
        r.clients,
        r.joins.len()
    );
    println!("| --- | --- | --- |");
    println!(
        "| pause at the cut, p50 / max | {:.2} ms / {:.2} ms | p50 ≤ 20 ms: {} |",
        r.pause_p50_ms,
        r.pause_max_ms,
        verdict(r.pause_p50_ms <= 20.0)
    );
    println!(
        "| whole transfer, p50 / max | {:.0} ms / {:.0} ms | |",
        r.transfer_p50_ms, r.transfer_max_ms
    );
    println!(
        "| pre-copy rounds, median / max | {:.0} / {} | |",
        r.rounds_median, r.rounds_max
    );
    println!(
        "| sent / touched memory, median | {:.2} MiB / {:.2} MiB = {:.2} | |",
        r.sent_mib_median, r.touched_mib_median, r.sent_over_touched_median
    );
    println!(
        "| client throughput during / before the transfer | {:.0} / {:.0} ops/s = {:.2} (worst join {:.2}) | ≥ 0.8: {} |",
        r.ops_per_sec_during,
        r.ops_per_sec_before,
        r.throughput_ratio,
        r.throughput_ratio_min,
        verdict(r.throughput_ratio >= 0.8)
    );
    println!(
        "| client throughput during the transfers / in the second before each backup started | {:.0} / {:.0} ops/s = {:.2} | |",
        r.ops_per_sec_during, r.ops_per_sec_seconds_before, r.throughput_ratio_vs_seconds_before
    );
    println!(
        "| RSS during the transfer, max: primary / backup | {:.1} MiB / {:.1} MiB | ≤ touched + 32 MiB = {:.1} MiB: {} |",
        r.primary_rss_max_mib,
        r.backup_rss_max_mib,
        r.rss_bound_mib,
        verdict(r.primary_rss_max_mib.max(r.backup_rss_max_mib) <= r.rss_bound_mib)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(t_ns: u64, event: ServerEvent) -> EventRecord {
        EventRecord {
            t_ns,
            server: "primary".into(),
            event,
        }
    }

    #[test]
    fn a_transfer_is_read_from_the_primary_events() {
        let events = [
            record(
                1,
                ServerEvent::TransferStarted {
                    view: 2,
                    backup: "join0".into(),
                },
            ),
            record(
                2,
                ServerEvent::TransferRound {
                    view: 2,
                    round: 1,
                    pages: 500,
                    bytes: 2_000_000,
                },
            ),
            record(
                3,
                ServerEvent::TransferFailed {
                    view: 2,
                    detail: "gone".into(),
                },
            ),
            record(
                4,
                ServerEvent::TransferStarted {
                    view: 3,
                    backup: "join1".into(),
                },
            ),
            record(
                5,
                ServerEvent::TransferRound {
                    view: 3,
                    round: 1,
                    pages: 700,
                    bytes: 2_900_000,
                },
            ),
            record(
                6,
                ServerEvent::TransferRound {
                    view: 3,
                    round: 2,
                    pages: 12,
                    bytes: 2_950_000,
                },
            ),
            record(
                7,
                ServerEvent::Protected {
                    view: 3,
                    backup: "join1".into(),
                    rounds: 2,
                    pages: 715,
                    bytes: 2_960_000,
                    pause_ms: 1.5,
                    transfer_ms: 30.0,
                },
            ),
        ];
        let (started, first, protected) = transfer_of(&events, "join1").expect("found");
        assert_eq!((started, first, protected.t_ns), (4, Some(700), 7));
        assert!(transfer_of(&events, "join0").is_none());
    }

    #[test]
    fn rates_count_replies_in_a_window() {
        let replies = [10, 20, 1_000_000_000, 1_500_000_000, 2_000_000_000];
        assert_eq!(rate(&replies, (0, 1_000_000_000)), 2.0);
        assert_eq!(rate(&replies, (1_000_000_000, 2_000_000_000)), 2.0);
        assert_eq!(rate(&replies, (5, 5)), 0.0);
    }
}
