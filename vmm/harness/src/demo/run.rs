//! `ftvm demo` from start to end: the first pair and its spares, the load
//! and the kills, the checks, the files.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter::etcd::cluster::ClusterConfig as EtcdConfig;
use arbiter::{ArbiterError, View};
use rand::Rng;

use super::analysis::{
    check_writes, failure, ft_phase, initial_protection, judge, markers, op_counts, protections,
    server_label, spans, throughput, unplanned_takeovers, without_passing_keys, Verdict,
};
use super::args::{drain, DemoArgs, ARBITER_TIMEOUT, FIRST, SECOND, STARTUP};
use super::kills::{self, Planned, Target};
use super::load::{read_back, run_load};
use super::report::{print_summary, Addresses, DemoReport};
use super::servers::Servers;
use crate::history::{self, HistoryOp, Recorder};
use crate::launcher::{ArbiterKind, Cluster, ClusterConfig, Launcher, Membership};
use crate::linearizability::{self, CheckConfig};
use crate::timeline::{self, Marker, Reply, Timeline};
use ftvm_core::host::events::ServerEvent;

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
    let plan = kills::plan(args)?;
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
    let started = Instant::now();
    let (mut servers, mut addresses) = start(&launcher, args)?;
    let view_before = wait_ready(args, &mut servers.cluster)?;
    for _ in 0..args.spares {
        let spare = servers.start_spare()?;
        println!(
            "{}: spare, service {} (pid {})",
            spare.name(),
            spare.address()?,
            spare.pid()
        );
    }
    let kills = describe_plan(&plan, args);
    println!(
        "ready in {:.1} s: {view_before}, {} spare(s); {} clients for {} s; {kills}",
        started.elapsed().as_secs_f64(),
        args.spares,
        args.clients,
        args.duration,
    );

    let recorder = Recorder::default();
    let load = run_load(args, seed, plan, &mut servers, &recorder);
    let arbiter = servers.cluster.arbiter_at();
    let final_view = arbiter::connect(&arbiter, ARBITER_TIMEOUT)
        .and_then(|a| a.query(&args.vm_id))
        .ok();
    let (final_values, reader_id) = read_back(args, &arbiter, &recorder);

    // The servers are done; stopping them leaves the CPUs to the checker.
    // Their events are read first: a server stopped here may still write.
    let events = servers.events();
    addresses.services = servers.services();
    let exits = servers.stop(Duration::from_secs(5));
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

    let protections = protections(&events, &load_ops, (load.start_ns, load.end_ns));
    let failures: Vec<_> = load
        .kills
        .iter()
        .map(|k| failure(k, &events, &load_ops, &addresses.services, &protections))
        .collect();
    let unplanned = unplanned_takeovers(&events, &failures, load.start_ns);
    let first_kill = load.kills.first().map(|k| k.unix_ns);
    let primaries = events.primaries_per_view();
    let fault_tolerant_phase = ft_phase(&events, first_kill);
    let writes = check_writes(&load_ops, &final_values, first_kill);
    let counts = op_counts(&load_ops, &load, final_values.len());
    let throughput = throughput(&load_ops, load.start_ns, load.end_ns, &failures);

    println!("checking linearizability of {} operations ...", ops.len());
    let lin = linearizability::check(&ops, &CheckConfig::default());

    let mut markers = markers(&failures, load.etcd.as_ref());
    markers.extend(unplanned.iter().map(|t| Marker {
        t_ns: t.unix_ns,
        label: format!("{} live without a kill (view {})", t.server, t.view),
    }));
    let spans = spans(&protections, load.start_ns, load.end_ns);
    let timeline = Timeline {
        title: format!(
            "ftvm demo: {} clients, {} spare(s), {kills} (seed {seed})",
            args.clients, args.spares
        ),
        start_ns: load.start_ns,
        end_ns: load.end_ns,
        replies: load_ops
            .iter()
            .filter_map(|o| {
                Some(Reply {
                    t_ns: o.completed_ns?,
                    server: o
                        .server
                        .map(|s| server_label(s, &addresses.services, &failures)),
                })
            })
            .collect(),
        markers: markers.clone(),
        spans: spans.clone(),
    };
    let svg_path = args.out.join("timeline.svg");
    fs::write(&svg_path, timeline::render_svg(&timeline))
        .with_context(|| format!("cannot write {}", svg_path.display()))?;

    let mut problems = load.problems;
    judge(
        &Verdict {
            failures: &failures,
            unplanned: &unplanned,
            missed: &load.missed,
            final_view: final_view.as_ref(),
            writes: &writes,
            lin: &lin,
            primaries: &primaries,
        },
        &mut problems,
    );
    let report = DemoReport {
        seed,
        out: args.out.clone(),
        vm_id: args.vm_id.clone(),
        clients: args.clients,
        duration_s: args.duration,
        kill_at_s: args.kill_at,
        spares: args.spares,
        failure_timeout_ms: args.failure_timeout_ms,
        addresses,
        ops: counts,
        throughput,
        initial_protection: initial_protection(&protections),
        failures,
        unplanned_takeovers: unplanned,
        fault_tolerant_phase,
        writes,
        linearizability: without_passing_keys(lin),
        primaries_per_view: primaries,
        final_view: final_view.as_ref().map(ToString::to_string),
        exits,
        problems,
        timeline_markers: markers,
        timeline_spans: spans,
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

/// The kills as the user reads them: `SIGKILL to the primary at 5 s and
/// 10.5 s, to the backup at 16 s`.
fn describe_plan(plan: &[Planned], args: &DemoArgs) -> String {
    let at = |target: Target| {
        plan.iter()
            .filter(|p| p.target == target)
            .map(|p| format!("{:.1} s", p.at_s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!("SIGKILL to the primary at {}", at(Target::Primary));
    if args.kill_backup {
        out += &format!(", to the backup at {}", at(Target::Backup));
    }
    if let Some(etcd) = args.etcd_kill_at() {
        out += &format!(", to the etcd leader at {etcd:.1} s");
    }
    out + " (each once the VM is protected again)"
}

/// Long enough for the startup, the load, the clients' last retries and
/// the final reads; the demo stops the servers itself well before.
fn server_time_limit(args: &DemoArgs) -> Duration {
    Duration::from_secs(
        (STARTUP.as_secs_f64() + args.duration + drain(args).as_secs_f64() + 60.0).round() as u64,
    )
}

/// Starts the arbiter (with --etcd: a 3-member etcd cluster) and the first
/// pair, the servers' files in `--out`.
fn start(launcher: &Launcher, args: &DemoArgs) -> Result<(Servers, Addresses)> {
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
        services: BTreeMap::new(),
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
    let membership = Membership {
        arbiter: cluster.arbiter_at(),
        vm_id: args.vm_id.clone(),
        knobs: config.knobs.clone(),
    };
    let servers = Servers::new(
        cluster,
        launcher.clone(),
        membership,
        config.guest.clone(),
        args.out.clone(),
        config.consoles,
        time_limit,
    );
    Ok((servers, addresses))
}

/// Waits until the first pair is fault tolerant (the backup joined by
/// state transfer), the primary answers a request, and the arbiter names
/// both servers; returns the arbiter's view.
fn wait_ready(args: &DemoArgs, cluster: &mut Cluster) -> Result<View> {
    cluster.wait_fault_tolerant(STARTUP)?;
    cluster.wait_for("the backup to join by state transfer", STARTUP, |c| {
        Ok(c.primary
            .has_event(|e| matches!(e, ServerEvent::Protected { backup, .. } if backup == SECOND)))
    })?;
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
