//! `ftvm demo` from start to end: the cluster, the load and the kill, the
//! checks, the files.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter::etcd::cluster::ClusterConfig as EtcdConfig;
use arbiter::{ArbiterError, View};
use rand::Rng;

use super::analysis::{
    check_writes, failover_timeline, ft_phase, judge, markers, op_counts, server_label, throughput,
    without_passing_keys,
};
use super::args::{drain, DemoArgs, ARBITER_TIMEOUT, FIRST, SECOND, STARTUP};
use super::load::{read_back, run_load};
use super::report::{print_summary, Addresses, DemoReport};
use crate::history::{self, HistoryOp, Recorder};
use crate::launcher::{ArbiterKind, Cluster, ClusterConfig, Launcher};
use crate::linearizability::{self, CheckConfig};
use crate::timeline::{self, Reply, Timeline};

pub fn run(args: &DemoArgs) -> Result<DemoReport> {
    if !(args.duration > 0.0 && args.kill_at > 0.0 && args.kill_at < args.duration) {
        bail!(
            "--kill-at ({}) must be after the start and before --duration ({})",
            args.kill_at,
            args.duration
        );
    }
    if !args.workload.serves_kv() {
        bail!(
            "--workload {}: the demo's clients need a workload that serves KV (kv or kv-race)",
            args.workload
        );
    }
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    println!(
        "ftvm demo: seed {seed} (again: --seed {seed}); output in {}",
        args.out.display()
    );
    if let Some(at) = args.etcd_kill_at() {
        if !(at > 0.0 && at < args.duration) {
            bail!(
                "--etcd-kill-at ({at}) must be after the start and before --duration ({})",
                args.duration
            );
        }
    }
    let launcher = Launcher::this_executable()?;
    let (mut cluster, addresses) = start(&launcher, args)?;
    let started = Instant::now();
    let view_before = wait_ready(args, &mut cluster)?;
    let kills = match args.etcd_kill_at() {
        Some(at) if at == args.kill_at => {
            format!(
                "SIGKILL to the primary and the etcd leader at {} s",
                args.kill_at
            )
        }
        Some(at) => format!(
            "SIGKILL to the primary at {} s, to the etcd leader at {at} s",
            args.kill_at
        ),
        None => format!("SIGKILL to the primary at {} s", args.kill_at),
    };
    println!(
        "ready in {:.1} s: {view_before}; {} clients for {} s, {kills}",
        started.elapsed().as_secs_f64(),
        args.clients,
        args.duration,
    );

    let recorder = Recorder::default();
    let load = run_load(args, seed, &mut cluster, &recorder);
    let arbiter = cluster.arbiter_at();
    let final_view = arbiter::connect(&arbiter, ARBITER_TIMEOUT)
        .and_then(|a| a.query(&args.vm_id))
        .ok();
    let (final_values, reader_id) = read_back(args, &arbiter, &recorder);

    // The servers are done; stopping them leaves the CPUs to the checker.
    let exits = cluster.stop(Duration::from_secs(5));
    println!(
        "servers: {}",
        exits
            .iter()
            .map(|(name, how)| format!("{name} {how}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let ops = recorder.snapshot();
    let history_path = args.out.join("history.jsonl");
    fs::write(&history_path, history::to_jsonl(&ops))
        .with_context(|| format!("cannot write {}", history_path.display()))?;
    let load_ops: Vec<&HistoryOp> = ops.iter().filter(|o| Some(o.client) != reader_id).collect();

    let events = cluster.events();
    let failover = failover_timeline(
        load.kill_ns,
        &events,
        &load_ops,
        addresses.backup_service,
        view_before.number,
        final_view.as_ref(),
    );
    let primaries = events.primaries_per_view();
    let fault_tolerant_phase = ft_phase(&events, load.kill_ns);
    let writes = check_writes(&load_ops, &final_values, load.kill_ns);
    let counts = op_counts(&load_ops, &load, final_values.len());
    let throughput = throughput(
        &load_ops,
        load.start_ns,
        load.end_ns,
        load.kill_ns,
        &failover,
    );

    println!("checking linearizability of {} operations ...", ops.len());
    let lin = linearizability::check(&ops, &CheckConfig::default());

    let markers = markers(&failover, load.etcd.as_ref());
    let timeline = Timeline {
        title: format!("ftvm demo: {} clients, {kills} (seed {seed})", args.clients),
        start_ns: load.start_ns,
        end_ns: load.end_ns,
        replies: load_ops
            .iter()
            .filter_map(|o| {
                Some(Reply {
                    t_ns: o.completed_ns?,
                    server: o.server.map(|s| server_label(s, &addresses)),
                })
            })
            .collect(),
        markers: markers.clone(),
    };
    let svg_path = args.out.join("timeline.svg");
    fs::write(&svg_path, timeline::render_svg(&timeline))
        .with_context(|| format!("cannot write {}", svg_path.display()))?;

    let mut problems = load.problems;
    judge(&failover, &writes, &lin, &primaries, &mut problems);
    let report = DemoReport {
        seed,
        out: args.out.clone(),
        vm_id: args.vm_id.clone(),
        clients: args.clients,
        duration_s: args.duration,
        kill_at_s: args.kill_at,
        failure_timeout_ms: args.failure_timeout_ms,
        addresses,
        ops: counts,
        throughput,
        failover,
        fault_tolerant_phase,
        writes,
        linearizability: without_passing_keys(lin),
        primaries_per_view: primaries,
        exits,
        problems,
        timeline_markers: markers,
        etcd: load.etcd,
    };
    let metrics_path = args.out.join("metrics.json");
    let json = serde_json::to_string_pretty(&report).context("cannot encode the metrics")?;
    fs::write(&metrics_path, json + "\n")
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    print_summary(&report, &svg_path, &metrics_path, &history_path);
    if report.problems.is_empty() {
        Ok(report)
    } else {
        bail!("the demo failed:\n  {}", report.problems.join("\n  "))
    }
}

/// Long enough for the startup, the load, the clients' last retries and
/// the final reads; the demo stops the servers itself well before.
fn server_time_limit(args: &DemoArgs) -> Duration {
    Duration::from_secs(
        (STARTUP.as_secs_f64() + args.duration + drain(args).as_secs_f64() + 60.0).round() as u64,
    )
}

/// Starts the arbiter (with --etcd: a 3-member etcd cluster) and the pair,
/// the servers' files in `--out`.
fn start(launcher: &Launcher, args: &DemoArgs) -> Result<(Cluster, Addresses)> {
    let time_limit = server_time_limit(args);
    let mut config = ClusterConfig::new(&args.vm_id, time_limit);
    config.dir = Some(args.out.clone());
    config.names = [FIRST.into(), SECOND.into()];
    config.knobs.failure_timeout_ms = Some(args.failure_timeout_ms);
    config.guest.workload = Some(args.workload);
    config.consoles = true;
    if args.etcd {
        config.arbiter = ArbiterKind::Etcd(EtcdConfig::new(time_limit));
    }
    let cluster = Cluster::start(launcher, &config)?;
    let addresses = Addresses {
        arbiter: cluster.arbiter_at().to_string(),
        first_primary_service: cluster.primary.address()?,
        first_primary_log: cluster.log_listen(),
        backup_service: cluster.backup.address()?,
    };
    println!("{}", cluster.arbiter.describe());
    println!(
        "{FIRST}: primary, service {}, log channel {} (pid {})",
        addresses.first_primary_service,
        addresses.first_primary_log,
        cluster.primary.pid()
    );
    println!(
        "{SECOND}: backup, service {} (pid {})",
        addresses.backup_service,
        cluster.backup.pid()
    );
    Ok((cluster, addresses))
}

/// Waits until the pair is fault tolerant, the primary answers a request,
/// and the arbiter names both servers; returns the arbiter's view.
fn wait_ready(args: &DemoArgs, cluster: &mut Cluster) -> Result<View> {
    cluster.wait_fault_tolerant(STARTUP)?;
    cluster.wait_answering(STARTUP)?;
    let arbiter = arbiter::connect(&cluster.arbiter_at(), ARBITER_TIMEOUT)?;
    let mut last = Err(String::from("no answer yet"));
    cluster
        .wait_for("the arbiter to name both servers", STARTUP, |_| {
            last = match arbiter.query(&args.vm_id) {
                Ok(view) => Ok(view),
                // Asking again would get the same answer.
                Err(e @ ArbiterError::Rejected { .. }) => return Err(e.into()),
                Err(e) => Err(e.to_string()),
            };
            Ok(last.as_ref().is_ok_and(|v| {
                v.primary.as_ref().is_some_and(|p| p.id == FIRST)
                    && v.backup.as_ref().is_some_and(|b| b.id == SECOND)
            }))
        })
        .with_context(|| match &last {
            Ok(view) => format!("the arbiter said: {view}"),
            Err(e) => format!("the arbiter said: {e}"),
        })?;
    last.map_err(anyhow::Error::msg)
}
