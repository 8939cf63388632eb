//! `ftvm bench etcd`: the arbiter on etcd against the built-in one, side by
//! side in one run: failover time (SIGKILL to the primary until the first
//! reply from the new one) with the built-in arbiter, with a 3-member etcd
//! cluster, and with that cluster losing its leader at the moment of the
//! failure; and the test-and-set's latency on each, alone and as the
//! backup sees it during those failovers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter::etcd::cluster::{leader_among, ClusterConfig as EtcdClusterConfig, LocalCluster};
use arbiter::{Arbiter, ArbiterClient, EtcdArbiter, EtcdConfig, Member};
use serde::Serialize;

use super::ft::{measure_failover, FailoverTrial};
use crate::launcher::{
    free_tcp_addr, ArbiterKind, Cluster, ClusterConfig, Guest, Knobs, Launcher, ServerConfig,
};
use crate::report::write_json;
use crate::stats::{median, percentile};

const VM_ID: &str = "bench";

#[derive(clap::Args)]
pub struct EtcdBenchArgs {
    /// Failover trials of each kind.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Test-and-set calls timed on each arbiter, each on a pair of its own.
    #[arg(long, default_value_t = 200)]
    pub claims: usize,
    /// Failure timeout of the log channel, in ms.
    #[arg(long, default_value_t = 300)]
    pub failure_timeout_ms: u64,
    /// etcd's election timeout, in ms (its heartbeat is a tenth of it).
    #[arg(long, default_value_t = 1000)]
    pub election_ms: u64,
    /// Guest memory size.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One failover; with the etcd leader killed, also when a new one led.
#[derive(Debug, Serialize)]
pub struct EtcdTrial {
    #[serde(flatten)]
    pub failover: FailoverTrial,
    /// After the SIGKILL of the leader (right before the primary's), when
    /// a surviving member first reported itself leader (polled every 5 ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_elected_ms: Option<f64>,
}

/// Failovers with one kind of arbiter.
#[derive(Debug, Default, Serialize)]
pub struct FailoverSeries {
    pub trials: Vec<EtcdTrial>,
    pub first_reply_median_ms: f64,
    pub first_reply_max_ms: f64,
    /// With the etcd leader killed: the first reply after the new leader
    /// was there, the most of any trial (what ftvm adds to etcd's
    /// election).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_election_max_ms: Option<f64>,
    /// From the failure detected to the test-and-set won, as the backup
    /// logged them: the claim's latency when it mattered (with the etcd
    /// leader killed, the wait for a new one is in it).
    pub claim_p50_ms: f64,
    pub claim_p99_ms: f64,
}

/// Test-and-set calls alone, each a backup's winning claim of an
/// acknowledged view.
#[derive(Debug, Default, Serialize)]
pub struct ClaimLatency {
    pub claims: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct EtcdReport {
    pub failure_timeout_ms: u64,
    pub election_ms: u64,
    pub builtin: FailoverSeries,
    pub etcd: FailoverSeries,
    pub etcd_leader_killed: FailoverSeries,
    pub builtin_claims: ClaimLatency,
    pub etcd_claims: ClaimLatency,
}

fn etcd_cluster_config(args: &EtcdBenchArgs, lifetime: Duration) -> EtcdClusterConfig {
    let election = Duration::from_millis(args.election_ms);
    EtcdClusterConfig {
        heartbeat: election / 10,
        election,
        ..EtcdClusterConfig::new(lifetime)
    }
}

fn start_pair(launcher: &Launcher, args: &EtcdBenchArgs, etcd: bool) -> Result<Cluster> {
    let limit = Duration::from_secs(90);
    let mut config = ClusterConfig::new(VM_ID, limit);
    config.guest = Guest {
        mem: Some(args.mem.clone()),
        ..Guest::default()
    };
    config.knobs = Knobs {
        failure_timeout_ms: Some(args.failure_timeout_ms),
        ..Knobs::default()
    };
    if etcd {
        config.arbiter = ArbiterKind::Etcd(etcd_cluster_config(args, limit));
    }
    let mut pair = Cluster::start(launcher, &config)?;
    pair.wait_fault_tolerant(Duration::from_secs(30))?;
    pair.wait_answering(Duration::from_secs(30))?;
    Ok(pair)
}

fn series(
    launcher: &Launcher,
    args: &EtcdBenchArgs,
    name: &str,
    etcd: bool,
    leader: bool,
) -> Result<FailoverSeries> {
    let mut out = FailoverSeries::default();
    for n in 0..args.trials {
        let mut pair = start_pair(launcher, args, etcd)?;
        // Found before the kills, so that it dies with the primary.
        let leader = match (leader, pair.arbiter.etcd()) {
            (true, Some(etcd)) => Some(etcd.leader().context("no etcd leader to kill")?),
            (true, None) => bail!("the pair does not run on etcd"),
            (false, _) => None,
        };
        let mut watcher = None;
        let failover = measure_failover(&mut pair, n, |pair| {
            if let (Some(leader), Some(etcd)) = (leader, pair.arbiter.etcd()) {
                etcd.kill(leader)?;
                let endpoints = etcd.endpoints();
                watcher = Some(std::thread::spawn(move || {
                    watch_election(&endpoints, leader)
                }));
            }
            Ok(())
        })?;
        let leader_elected_ms = watcher
            .and_then(|w| w.join().ok().flatten())
            .map(|d| d.as_secs_f64() * 1000.0);
        println!(
            "  {name} trial {n}: detection {:.0} ms, test-and-set {:.0} ms, live {:.0} ms, first reply {:.0} ms{}",
            failover.detection_ms,
            failover.test_and_set_ms,
            failover.go_live_ms,
            failover.first_reply_ms,
            leader_elected_ms.map_or(String::new(), |ms| format!(" (new etcd leader at {ms:.0} ms)"))
        );
        out.trials.push(EtcdTrial {
            failover,
            leader_elected_ms,
        });
    }
    out.after_election_max_ms = out
        .trials
        .iter()
        .filter_map(|t| Some(t.failover.first_reply_ms - t.leader_elected_ms?))
        .reduce(f64::max);
    let mut replies: Vec<f64> = out
        .trials
        .iter()
        .map(|t| t.failover.first_reply_ms)
        .collect();
    out.first_reply_max_ms = replies.iter().copied().fold(0.0, f64::max);
    out.first_reply_median_ms = median(&mut replies);
    let mut claims: Vec<u64> = out
        .trials
        .iter()
        .map(|t| ((t.failover.test_and_set_ms - t.failover.detection_ms).max(0.0) * 1e6) as u64)
        .collect();
    claims.sort_unstable();
    out.claim_p50_ms = percentile(&claims, 0.50) / 1000.0;
    out.claim_p99_ms = percentile(&claims, 0.99) / 1000.0;
    Ok(out)
}

/// How long after now a member other than `killed` reports itself leader;
/// none within 20 s.
fn watch_election(endpoints: &[String], killed: usize) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if leader_among(endpoints).is_some_and(|leader| leader != killed) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// `claims` winning claims, each by the backup of a freshly paired VM.
fn claim_latency(arbiter: &dyn Arbiter, claims: usize) -> Result<ClaimLatency> {
    let member = |id: &str, port: u16| Member {
        id: id.to_owned(),
        service_addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        log_addr: None,
    };
    let (a, b) = (member("a", 1), member("b", 2));
    let mut took = Vec::with_capacity(claims);
    for n in 0..claims {
        let vm = format!("claims{n}");
        arbiter.ping(&vm, &a, 0)?;
        arbiter.ping(&vm, &b, 0)?;
        arbiter.ping(&vm, &a, 1)?;
        arbiter.ping(&vm, &a, 2)?;
        let started = Instant::now();
        let outcome = arbiter.test_and_set(&vm, 2, &b)?;
        took.push(started.elapsed().as_nanos() as u64);
        if !outcome.won() {
            bail!("{vm}: the backup's claim of an acknowledged view lost: {outcome:?}");
        }
    }
    took.sort_unstable();
    Ok(ClaimLatency {
        claims,
        p50_ms: percentile(&took, 0.50) / 1000.0,
        p99_ms: percentile(&took, 0.99) / 1000.0,
        max_ms: took.last().copied().unwrap_or(0) as f64 / 1e6,
    })
}

pub fn bench_etcd(args: &EtcdBenchArgs) -> Result<()> {
    if args.trials == 0 || args.claims == 0 {
        bail!("--trials and --claims must be at least 1");
    }
    let launcher = Launcher::this_executable()?;
    let mut report = EtcdReport {
        failure_timeout_ms: args.failure_timeout_ms,
        election_ms: args.election_ms,
        ..EtcdReport::default()
    };
    println!(
        "measuring: {} claims on each arbiter, then {} failovers each with the built-in arbiter, with etcd, and with etcd losing its leader at the failure",
        args.claims, args.trials
    );
    let state = tempfile::tempdir().context("cannot create the arbiter's state directory")?;
    let mut builtin = launcher.start(&ServerConfig::arbiter(free_tcp_addr()?, state.path()))?;
    let addr = builtin.address()?;
    builtin.wait_for(
        "the arbiter to listen",
        Duration::from_secs(30),
        Duration::from_millis(10),
        |_| Ok(std::net::TcpStream::connect(addr).is_ok()),
    )?;
    report.builtin_claims = claim_latency(&ArbiterClient::new(addr), args.claims)?;
    drop(builtin);
    let etcd = LocalCluster::start(&etcd_cluster_config(args, Duration::from_secs(600)))?;
    etcd.wait_for_leader(Duration::from_secs(30))?;
    let client: Arc<dyn Arbiter> = Arc::new(EtcdArbiter::connect(
        &etcd.addr("bench"),
        EtcdConfig::default(),
    )?);
    report.etcd_claims = claim_latency(&*client, args.claims)?;
    drop(client);
    drop(etcd);
    for (what, claims) in [
        ("built-in", &report.builtin_claims),
        ("etcd", &report.etcd_claims),
    ] {
        println!(
            "test-and-set on {what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} claims)",
            claims.p50_ms, claims.p99_ms, claims.max_ms, claims.claims
        );
    }
    report.builtin = series(&launcher, args, "built-in", false, false)?;
    report.etcd = series(&launcher, args, "etcd", true, false)?;
    report.etcd_leader_killed = series(&launcher, args, "etcd, leader killed", true, true)?;
    for (what, s) in [
        ("built-in arbiter", &report.builtin),
        ("etcd", &report.etcd),
        (
            "etcd, its leader killed with the primary",
            &report.etcd_leader_killed,
        ),
    ] {
        println!(
            "failover with {what}: first reply median {:.0} ms, max {:.0} ms; claim at failover p50 {:.1} ms, p99 {:.1} ms{}",
            s.first_reply_median_ms,
            s.first_reply_max_ms,
            s.claim_p50_ms,
            s.claim_p99_ms,
            s.after_election_max_ms.map_or(String::new(), |ms| format!(
                "; first reply at most {ms:.0} ms after the new etcd leader"
            ))
        );
    }
    println!(
        "failure timeout {} ms, etcd election timeout {} ms",
        args.failure_timeout_ms, args.election_ms
    );
    write_json(args.json.as_deref(), &report)
}
