//! `ftvm demo`: a primary, a backup and an arbiter on loopback, a client
//! load, a SIGKILL to the primary in mid-load, and the evidence that
//! nothing was lost: the failover timeline, every acknowledged write read
//! back, and a linearizability check of the clients' history.
//!
//! The servers are child processes of this executable, each with a time
//! limit and killed when the demo ends however it ends; they report what
//! they do in events files (JSON lines) that the demo reads for its live
//! status and its timeline.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arbiter::{ArbiterClient, ArbiterError, View};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::bench::{free_tcp_port, free_udp_port};
use crate::history::{self, HistoryOp, OpKind, Recorder};
use crate::linearizability::{self, CheckConfig, KeyVerdict, Overall};
use crate::timeline::{self, Marker, Reply, Timeline};
use ftvm_core::host::events::{
    read_events, EventRecord, ServerEvent, ServerRole, Status as ServerStatus,
};
use ftvm_kvclient::{
    ClientConfig, ClientError, FailoverConfig, FailoverError, KvClient, ServerSource,
};

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Where timeline.svg, metrics.json, the clients' history and the
    /// servers' logs and events go.
    #[arg(long, default_value = "ftvm-demo-out")]
    pub out: PathBuf,
    /// Closed-loop KV clients.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub clients: u32,
    /// Seconds of client load, the failover included.
    #[arg(long, default_value_t = 12.0)]
    pub duration: f64,
    /// Seconds into the load at which the primary gets SIGKILL.
    #[arg(long, default_value_t = 5.0)]
    pub kill_at: f64,
    /// Seeds the clients' choice of keys and operations (random if not
    /// given; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Log-channel silence after which a server declares its peer failed.
    #[arg(long, default_value_t = 300)]
    pub failure_timeout_ms: u64,
    /// The VM's name at the arbiter.
    #[arg(long, default_value = "demo")]
    pub vm_id: String,
}

/// The first primary's and the backup's ids at the arbiter.
const FIRST: &str = "vmm1";
const SECOND: &str = "vmm2";
/// For the arbiter, the guests' boot and the backup's catching up.
const STARTUP: Duration = Duration::from_secs(60);
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How long a client waits for a reply before it asks the arbiter where
/// the primary is and sends the same request there (perhaps to the same
/// server again). Short, so that clients find a new primary soon after it
/// goes live; longer than a reply held by the output rule usually takes.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);
const ARBITER_TIMEOUT: Duration = Duration::from_millis(500);
/// A few keys that every client uses, so that operations on one key
/// overlap (what a linearizability check is about), and many private
/// ones, so that most keys' histories stay short. The guest holds at most
/// 1024 keys; the demo stays well below with the readiness probe's.
const SHARED_KEYS: u32 = 16;
const PRIVATE_KEYS_TOTAL: u32 = 512;
const SHARED_FRACTION: f64 = 0.3;
const READY_KEY: &[u8] = b"demo-ready";

/// What a demo run found; `metrics.json` is this, serialised.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub seed: u64,
    pub out: PathBuf,
    pub vm_id: String,
    pub clients: u32,
    pub duration_s: f64,
    pub kill_at_s: f64,
    pub failure_timeout_ms: u64,
    pub addresses: Addresses,
    pub ops: OpCounts,
    pub throughput: Throughput,
    pub failover: Failover,
    pub fault_tolerant_phase: FtPhase,
    pub writes: WriteCheck,
    pub linearizability: linearizability::Report,
    /// Per view, every server that said it was the view's primary.
    pub primaries_per_view: BTreeMap<u64, BTreeSet<String>>,
    /// How each server process ended.
    pub exits: BTreeMap<String, String>,
    /// Why the demo failed; empty when it passed.
    pub problems: Vec<String>,
    pub timeline_markers: Vec<Marker>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Addresses {
    pub arbiter: SocketAddr,
    pub first_primary_service: SocketAddr,
    pub first_primary_log: SocketAddr,
    pub backup_service: SocketAddr,
}

#[derive(Debug, Default, Serialize)]
pub struct OpCounts {
    pub invoked: u64,
    pub completed: u64,
    /// Given up without a reply: the outcome is unknown.
    pub unknown: u64,
    pub gets: u64,
    pub puts: u64,
    pub appends: u64,
    /// Appends the guest refused as TooLarge (not executed, not in the
    /// history).
    pub refused: u64,
    /// Requests sent again (same request number), failover included.
    pub resends: u64,
    /// The final read of every key.
    pub final_reads: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Throughput {
    pub ops_per_sec_before_kill: f64,
    /// From the new primary's first reply to the end of the load.
    pub ops_per_sec_after_failover: f64,
    pub ops_per_sec_overall: f64,
}

/// What the first primary measured of its backup up to the kill, from its
/// last status line before it: the lag at every exit, and how long each
/// output waited for the backup's acknowledgement.
#[derive(Debug, Default, Serialize)]
pub struct FtPhase {
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub output_hold_p50_ms: f64,
    pub output_hold_p99_ms: f64,
}

fn ft_phase(events: &ServerEvents, kill_ns: Option<u64>) -> FtPhase {
    let last = events
        .of(FIRST)
        .iter()
        .filter(|e| kill_ns.is_none_or(|k| e.t_ns <= k))
        .rev()
        .find_map(|e| match &e.event {
            ServerEvent::Status(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| ServerStatus::zero(ServerRole::Primary));
    FtPhase {
        lag_p50_ms: last.lag_p50_ms,
        lag_p99_ms: last.lag_p99_ms,
        lag_max_ms: last.lag_max_ms,
        output_hold_p50_ms: last.output_hold_p50_ms,
        output_hold_p99_ms: last.output_hold_p99_ms,
    }
}

/// Milliseconds after the SIGKILL.
#[derive(Debug, Default, Serialize)]
pub struct Failover {
    pub kill_unix_ns: Option<u64>,
    pub detected_ms: Option<f64>,
    pub test_and_set_won_ms: Option<f64>,
    pub live_ms: Option<f64>,
    pub first_reply_ms: Option<f64>,
    pub view_before: Option<u64>,
    pub view_after: Option<u64>,
    pub primary_after: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct WriteCheck {
    /// Puts and appends that got a reply.
    pub acknowledged: u64,
    pub acknowledged_before_kill: u64,
    /// Acknowledged writes whose key was read back at the end.
    pub checked: u64,
    pub lost: Vec<LostWrite>,
    /// Keys whose final read got no reply, so their writes went unchecked.
    pub unverified_keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LostWrite {
    pub key: String,
    pub kind: OpKind,
    pub value: String,
    pub client: u64,
    pub acknowledged_unix_ns: u64,
    pub final_value: Option<String>,
}

pub fn run(args: &DemoArgs) -> Result<DemoReport, String> {
    if !(args.duration > 0.0 && args.kill_at > 0.0 && args.kill_at < args.duration) {
        return Err(format!(
            "--kill-at ({}) must be after the start and before --duration ({})",
            args.kill_at, args.duration
        ));
    }
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    println!(
        "ftvm demo: seed {seed} (again: --seed {seed}); output in {}",
        args.out.display()
    );
    let state = TempDir::new("ftvm-demo-arbiter")?;
    let addresses = Addresses {
        arbiter: free_tcp_port()?,
        first_primary_service: free_udp_port()?,
        first_primary_log: free_tcp_port()?,
        backup_service: free_udp_port()?,
    };
    let files = OutFiles::new(&args.out)?;
    let mut servers = start_servers(args, &addresses, &files, &state)?;
    let started = Instant::now();
    let view_before = wait_ready(args, &addresses, &files, &mut servers)?;
    println!(
        "ready in {:.1} s: {view_before}; {} clients for {} s, SIGKILL to the primary at {} s",
        started.elapsed().as_secs_f64(),
        args.clients,
        args.duration,
        args.kill_at
    );

    let recorder = Recorder::default();
    let load = run_load(args, seed, &addresses, &files, &mut servers, &recorder);
    let final_view = ArbiterClient::with_timeout(addresses.arbiter, ARBITER_TIMEOUT)
        .query(&args.vm_id)
        .ok();
    let (final_values, reader_id) = read_back(args, &addresses, &recorder);

    // The servers are done; stopping them leaves the CPUs to the checker.
    let exits = servers.stop_all();
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
        .map_err(|e| format!("cannot write {}: {e}", history_path.display()))?;
    let load_ops: Vec<&HistoryOp> = ops.iter().filter(|o| Some(o.client) != reader_id).collect();

    let events = ServerEvents::read(&files);
    let failover = failover_timeline(
        load.kill_ns,
        &events,
        &load_ops,
        addresses.backup_service,
        view_before.number,
        final_view.as_ref(),
    );
    let primaries = primaries_per_view(&events);
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

    let markers = markers(&failover);
    let timeline = Timeline {
        title: format!(
            "ftvm demo: {} clients, SIGKILL to the primary at {} s (seed {seed})",
            args.clients, args.kill_at
        ),
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
        .map_err(|e| format!("cannot write {}: {e}", svg_path.display()))?;

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
    };
    let metrics_path = args.out.join("metrics.json");
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| format!("cannot encode the metrics: {e}"))?;
    fs::write(&metrics_path, json + "\n")
        .map_err(|e| format!("cannot write {}: {e}", metrics_path.display()))?;
    print_summary(&report, &svg_path, &metrics_path, &history_path);
    if report.problems.is_empty() {
        Ok(report)
    } else {
        Err(format!(
            "the demo failed:\n  {}",
            report.problems.join("\n  ")
        ))
    }
}

// ---------------------------------------------------------------------------
// Server processes

/// A server process that is killed if it is still running when this is
/// dropped, so that an early return leaves nothing behind.
struct ServerProcess {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl ServerProcess {
    fn spawn(name: &str, args: &[String], log: &Path) -> Result<ServerProcess, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the ftvm binary: {e}"))?;
        let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent. It makes the kernel kill the server if the demo itself is
        // killed, which no destructor would survive.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(ServerProcess {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            status: None,
        })
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn signal(&self, signal: Signal) -> Result<(), String> {
        nix::sys::signal::kill(self.pid(), signal)
            .map_err(|e| format!("cannot send {signal} to {}: {e}", self.name))
    }

    /// SIGTERM, then SIGKILL if it does not end within `grace`.
    fn stop(&mut self, grace: Duration) -> String {
        if self.exited().is_none() {
            let _ = self.signal(Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.exited().is_none() {
                let _ = self.child.kill();
                self.status = self.child.wait().ok();
            }
        }
        self.status
            .map_or("status unknown".to_owned(), describe_exit)
    }

    /// The end of its log, for an error message.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("last lines of {}:\n    {tail}", self.log.display())
    }

    fn died(&mut self) -> Option<String> {
        let status = self.exited()?;
        Some(format!(
            "{} ended early ({})\n  {}",
            self.name,
            describe_exit(status),
            self.log_tail()
        ))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "ended".to_owned(),
    }
}

struct Servers {
    arbiter: ServerProcess,
    first: ServerProcess,
    second: Option<ServerProcess>,
}

impl Servers {
    fn each(&mut self) -> impl Iterator<Item = &mut ServerProcess> {
        [
            Some(&mut self.arbiter),
            Some(&mut self.first),
            self.second.as_mut(),
        ]
        .into_iter()
        .flatten()
    }

    fn died(&mut self) -> Option<String> {
        self.each().find_map(ServerProcess::died)
    }

    /// The VMMs first, so that they do not see the arbiter go.
    fn stop_all(mut self) -> BTreeMap<String, String> {
        let grace = Duration::from_secs(5);
        let mut exits = BTreeMap::new();
        if let Some(second) = self.second.as_mut() {
            exits.insert(second.name.clone(), second.stop(grace));
        }
        exits.insert(self.first.name.clone(), self.first.stop(grace));
        exits.insert(self.arbiter.name.clone(), self.arbiter.stop(grace));
        exits
    }
}

/// Where the demo writes, with the files that servers append to removed
/// so that a run never reads an earlier run's events.
struct OutFiles {
    arbiter_log: PathBuf,
    logs: [PathBuf; 2],
    events: [PathBuf; 2],
    serials: [PathBuf; 2],
}

impl OutFiles {
    fn new(out: &Path) -> Result<OutFiles, String> {
        let files = OutFiles {
            arbiter_log: out.join("arbiter.log"),
            logs: [FIRST, SECOND].map(|n| out.join(format!("{n}.log"))),
            events: [FIRST, SECOND].map(|n| out.join(format!("{n}.events.jsonl"))),
            serials: [FIRST, SECOND].map(|n| out.join(format!("{n}.serial.txt"))),
        };
        for path in files.events.iter().chain(&files.serials) {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove the old {}: {e}", path.display())),
            }
        }
        Ok(files)
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<TempDir, String> {
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{:x}",
            std::process::id(),
            rand::rng().random::<u64>()
        ));
        fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Long enough for the startup, the load, the clients' last retries and
/// the final reads; the demo stops the servers itself well before.
fn server_time_limit(args: &DemoArgs) -> String {
    format!(
        "{:.0}",
        STARTUP.as_secs_f64() + args.duration + drain(args).as_secs_f64() + 60.0
    )
}

/// How long after the load a client keeps retrying its last request.
fn drain(args: &DemoArgs) -> Duration {
    Duration::from_millis(args.failure_timeout_ms.saturating_mul(10)).max(Duration::from_secs(5))
}

fn vmm_args(args: &DemoArgs, a: &Addresses, files: &OutFiles, i: usize) -> Vec<String> {
    let (role, id, service) = if i == 0 {
        ("primary", FIRST, a.first_primary_service)
    } else {
        ("backup", SECOND, a.backup_service)
    };
    let mut v = vec![
        role.to_owned(),
        "--vm-id".into(),
        args.vm_id.clone(),
        "--arbiter".into(),
        a.arbiter.to_string(),
        "--service".into(),
        service.to_string(),
        "--id".into(),
        id.into(),
        "--failure-timeout-ms".into(),
        args.failure_timeout_ms.to_string(),
        "--serial".into(),
        files.serials[i].display().to_string(),
        "--events".into(),
        files.events[i].display().to_string(),
        "--timeout".into(),
        server_time_limit(args),
    ];
    if i == 0 {
        v.extend(["--log-listen".into(), a.first_primary_log.to_string()]);
    }
    v
}

/// Starts the arbiter, then the primary, and the backup only once the
/// arbiter names the primary: whoever pings first becomes primary.
fn start_servers(
    args: &DemoArgs,
    a: &Addresses,
    files: &OutFiles,
    state: &TempDir,
) -> Result<Servers, String> {
    let arbiter = ServerProcess::spawn(
        "arbiter",
        &[
            "arbiter".into(),
            "--listen".into(),
            a.arbiter.to_string(),
            "--state".into(),
            state.0.display().to_string(),
        ],
        &files.arbiter_log,
    )?;
    println!("arbiter on {} (pid {})", a.arbiter, arbiter.child.id());
    let first = ServerProcess::spawn(FIRST, &vmm_args(args, a, files, 0), &files.logs[0])?;
    let mut servers = Servers {
        arbiter,
        first,
        second: None,
    };
    println!(
        "{FIRST}: primary, service {}, log channel {} (pid {})",
        a.first_primary_service,
        a.first_primary_log,
        servers.first.child.id()
    );
    wait_for_view(
        args,
        a,
        &mut servers,
        "the arbiter to name the primary",
        |v| v.primary.as_ref().is_some_and(|p| p.id == FIRST),
    )?;
    let second = ServerProcess::spawn(SECOND, &vmm_args(args, a, files, 1), &files.logs[1])?;
    println!(
        "{SECOND}: backup, service {} (pid {})",
        a.backup_service,
        second.child.id()
    );
    servers.second = Some(second);
    Ok(servers)
}

fn wait_for_view(
    args: &DemoArgs,
    a: &Addresses,
    servers: &mut Servers,
    what: &str,
    wanted: impl Fn(&View) -> bool,
) -> Result<View, String> {
    let arbiter = ArbiterClient::with_timeout(a.arbiter, ARBITER_TIMEOUT);
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some(why) = servers.died() {
            return Err(why);
        }
        let last = match arbiter.query(&args.vm_id) {
            Ok(view) if wanted(&view) => return Ok(view),
            Ok(view) => view.to_string(),
            // Asking again would get the same answer.
            Err(e @ ArbiterError::Rejected { .. }) => return Err(e.to_string()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "gave up waiting {} s for {what}; the arbiter said: {last}",
                STARTUP.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the arbiter names both servers, the backup reports that it
/// follows, and the primary answers a request.
fn wait_ready(
    args: &DemoArgs,
    a: &Addresses,
    files: &OutFiles,
    servers: &mut Servers,
) -> Result<View, String> {
    let view = wait_for_view(args, a, servers, "the arbiter to name both servers", |v| {
        v.primary.as_ref().is_some_and(|p| p.id == FIRST)
            && v.backup.as_ref().is_some_and(|b| b.id == SECOND)
    })?;
    let deadline = Instant::now() + STARTUP;
    let config = ClientConfig {
        attempt_timeout: Duration::from_millis(200),
        max_attempts: 5,
    };
    let mut client = KvClient::connect(a.first_primary_service, config)
        .map_err(|e| format!("cannot create a KV client: {e}"))?;
    let mut following = false;
    let mut answered = false;
    while !(following && answered) {
        if let Some(why) = servers.died() {
            return Err(why);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "gave up after {} s: {}",
                STARTUP.as_secs(),
                if answered {
                    format!(
                        "{SECOND} never reported role \"backup\" in {}",
                        files.events[1].display()
                    )
                } else {
                    format!("the primary never answered on {}", a.first_primary_service)
                }
            ));
        }
        following = following
            || read_events(&files.events[1])
                .iter()
                .any(|e| match &e.event {
                    ServerEvent::Role { role, .. } => *role == ServerRole::Backup,
                    ServerEvent::Status(s) => s.role == ServerRole::Backup,
                    _ => false,
                });
        answered = answered || client.get(READY_KEY).is_ok();
        if !(following && answered) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(view)
}

// ---------------------------------------------------------------------------
// The load

struct Load {
    start_ns: u64,
    end_ns: u64,
    kill_ns: Option<u64>,
    resends: u64,
    refused: u64,
    problems: Vec<String>,
}

/// How a request that the client keeps retrying across failover ended.
enum Outcome {
    Reply(Option<Vec<u8>>),
    /// TooLarge: the guest did not execute it.
    Refused,
    /// No reply before the deadline: unknown outcome.
    GaveUp,
    /// An answer that a correct server never gives to this client.
    Failed(String),
}

/// A KV client that follows the primary through the arbiter
/// ([`kv::FailoverClient`](ftvm_kvclient::FailoverClient)), retrying a request
/// with the same number until `give_up`.
struct FailoverClient {
    kv: ftvm_kvclient::FailoverClient,
    resends: u64,
}

impl FailoverClient {
    fn new(a: &Addresses, vm_id: &str) -> Result<FailoverClient, String> {
        let config = FailoverConfig {
            round: ClientConfig {
                attempt_timeout: ATTEMPT_TIMEOUT,
                max_attempts: 1,
            },
            arbiter_timeout: ARBITER_TIMEOUT,
            ..FailoverConfig::default()
        };
        let kv =
            ftvm_kvclient::FailoverClient::new(ServerSource::arbiter(a.arbiter, vm_id), config)
                .map_err(|e| format!("cannot create a KV client: {e}"))?;
        Ok(FailoverClient { kv, resends: 0 })
    }

    /// The server that sent the last reply.
    fn answered_by(&self) -> SocketAddr {
        self.kv
            .last_answer()
            .map(|a| a.from)
            .or_else(|| self.kv.server())
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Sends the request until a reply comes or `give_up` passes.
    fn call(&mut self, kind: OpKind, key: &[u8], value: &[u8], give_up: Instant) -> Outcome {
        let mut config = self.kv.config();
        config.total_timeout = give_up
            .saturating_duration_since(Instant::now())
            .max(ATTEMPT_TIMEOUT);
        self.kv.set_config(config);
        let before = self.kv.stats().failed_rounds;
        let result = match kind {
            OpKind::Get => self.kv.get(key),
            OpKind::Put => self.kv.put(key, value).map(|()| None),
            OpKind::Append => self.kv.append(key, value).map(|()| None),
        };
        self.resends += self.kv.stats().failed_rounds - before;
        match result {
            Ok(v) => Outcome::Reply(v),
            Err(FailoverError::Client(ClientError::TooLarge { .. })) => Outcome::Refused,
            Err(
                FailoverError::Timeout { .. }
                | FailoverError::NoPrimary { .. }
                | FailoverError::Arbiter { .. },
            ) => Outcome::GaveUp,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// One client's choice of operations: mostly its own keys, some shared
/// ones; every written value is a token unique in the whole run
/// (`p<client>.<n>;` for a put, `a<client>.<n>;` for an append), so that
/// the final value of a key shows which writes it reflects.
struct Workload {
    client: u32,
    private_keys: u32,
    rng: StdRng,
    n: u64,
}

impl Workload {
    fn new(seed: u64, client: u32, clients: u32) -> Workload {
        Workload {
            client,
            private_keys: (PRIVATE_KEYS_TOTAL / clients).max(1),
            rng: StdRng::seed_from_u64(
                seed ^ u64::from(client).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            n: 0,
        }
    }

    fn next(&mut self) -> (OpKind, Vec<u8>, Vec<u8>) {
        self.n += 1;
        let key = if self.rng.random_bool(SHARED_FRACTION) {
            format!("s{}", self.rng.random_range(0..SHARED_KEYS))
        } else {
            format!(
                "c{}k{}",
                self.client,
                self.rng.random_range(0..self.private_keys)
            )
        };
        let (kind, value) = match self.rng.random_range(0..100) {
            0..40 => (OpKind::Get, String::new()),
            40..65 => (OpKind::Put, format!("p{}.{};", self.client, self.n)),
            _ => (OpKind::Append, format!("a{}.{};", self.client, self.n)),
        };
        (kind, key.into_bytes(), value.into_bytes())
    }
}

fn run_load(
    args: &DemoArgs,
    seed: u64,
    a: &Addresses,
    files: &OutFiles,
    servers: &mut Servers,
    recorder: &Recorder,
) -> Load {
    let clock = recorder.clock();
    let start = Instant::now();
    let start_ns = clock.now_ns();
    let load_end = start + Duration::from_secs_f64(args.duration);
    let give_up = load_end + drain(args);
    let kill_at = start + Duration::from_secs_f64(args.kill_at);
    let resends = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let failures: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut kill_ns = None;
    let mut problems = Vec::new();

    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for c in 0..args.clients {
            let (resends, refused, failures) = (&resends, &refused, &failures);
            let fail = move |e: String| failures.lock().unwrap_or_else(|p| p.into_inner()).push(e);
            handles.push(scope.spawn(move || {
                let mut client = match FailoverClient::new(a, &args.vm_id) {
                    Ok(c) => c,
                    Err(e) => return fail(e),
                };
                let mut work = Workload::new(seed, c, args.clients);
                while Instant::now() < load_end {
                    let (kind, key, value) = work.next();
                    let id = recorder.invoke(client.kv.client_id(), &key, kind, &value);
                    match client.call(kind, &key, &value, give_up) {
                        Outcome::Reply(v) => recorder.complete(id, v, client.answered_by()),
                        Outcome::Refused => {
                            recorder.withdraw(id);
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::GaveUp => break,
                        Outcome::Failed(e) => {
                            fail(format!("client {c}: {e}"));
                            break;
                        }
                    }
                }
                resends.fetch_add(client.resends, Ordering::Relaxed);
            }));
        }
        let status = Status::new(args, a, files, start);
        let mut next_status = start + STATUS_EVERY;
        loop {
            let now = Instant::now();
            if kill_ns.is_none() && now >= kill_at {
                kill_ns = Some(clock.now_ns());
                match servers.first.signal(Signal::SIGKILL) {
                    Ok(()) => println!(
                        "{:>6.1} s  SIGKILL -> {FIRST} (pid {})",
                        args.kill_at,
                        servers.first.child.id()
                    ),
                    Err(e) => problems.push(e),
                }
            }
            if now >= next_status {
                status.print(servers, recorder.completed());
                next_status += STATUS_EVERY;
            }
            if now >= load_end {
                break;
            }
            let wake = if kill_ns.is_none() {
                next_status.min(kill_at)
            } else {
                next_status
            };
            std::thread::sleep(wake.min(load_end).saturating_duration_since(Instant::now()));
        }
        for h in handles {
            if h.join().is_err() {
                problems.push("a client thread panicked".into());
            }
        }
    });
    problems.extend(failures.into_inner().unwrap_or_else(|p| p.into_inner()));
    let end_ns = start_ns + u64::try_from((load_end - start).as_nanos()).unwrap_or(u64::MAX);
    Load {
        start_ns,
        end_ns,
        kill_ns,
        resends: resends.into_inner(),
        refused: refused.into_inner(),
        problems,
    }
}

/// Each key's value read back at the end: `None` if the read got no reply,
/// `Some(None)` if the key does not exist.
type FinalValues = BTreeMap<Vec<u8>, Option<Option<Vec<u8>>>>;

/// Reads every key the clients touched, after they are done, through a
/// client of its own (its reads are part of the history, so the
/// linearizability check covers them too). A key maps to `None` when its
/// read got no reply. Also returns the reading client's id.
fn read_back(args: &DemoArgs, a: &Addresses, recorder: &Recorder) -> (FinalValues, Option<u64>) {
    let keys: BTreeSet<Vec<u8>> = recorder.snapshot().into_iter().map(|o| o.key).collect();
    let mut finals = BTreeMap::new();
    let mut client = match FailoverClient::new(a, &args.vm_id) {
        Ok(c) => c,
        Err(e) => {
            println!("final reads: {e}");
            return (keys.into_iter().map(|k| (k, None)).collect(), None);
        }
    };
    let give_up = Instant::now() + drain(args) + Duration::from_secs(30);
    for key in keys {
        let id = recorder.invoke(client.kv.client_id(), &key, OpKind::Get, b"");
        let value = match client.call(OpKind::Get, &key, b"", give_up) {
            Outcome::Reply(v) => {
                recorder.complete(id, v.clone(), client.answered_by());
                Some(v)
            }
            Outcome::Failed(e) => {
                println!("final read of {:?}: {e}", history::show(&key));
                None
            }
            Outcome::Refused | Outcome::GaveUp => None,
        };
        finals.insert(key, value);
    }
    (finals, Some(client.kv.client_id()))
}

// ---------------------------------------------------------------------------
// Events files and the live status

/// The events of both VMMs, by server id.
struct ServerEvents(Vec<(String, Vec<EventRecord>)>);

impl ServerEvents {
    fn read(files: &OutFiles) -> ServerEvents {
        ServerEvents(
            [FIRST, SECOND]
                .iter()
                .zip(&files.events)
                .map(|(name, path)| ((*name).to_owned(), read_events(path)))
                .collect(),
        )
    }

    fn of(&self, name: &str) -> &[EventRecord] {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&[], |(_, e)| e.as_slice())
    }
}

struct Status<'a> {
    args: &'a DemoArgs,
    files: &'a OutFiles,
    arbiter: ArbiterClient,
    start: Instant,
    last: std::cell::Cell<(Instant, u64)>,
}

impl<'a> Status<'a> {
    fn new(args: &'a DemoArgs, a: &Addresses, files: &'a OutFiles, start: Instant) -> Status<'a> {
        Status {
            args,
            files,
            arbiter: ArbiterClient::with_timeout(a.arbiter, Duration::from_millis(200)),
            start,
            last: std::cell::Cell::new((start, 0)),
        }
    }

    /// One line: the arbiter's view, each server's last status, and the
    /// clients' replies so far and per second since the last line.
    fn print(&self, servers: &mut Servers, completed: u64) {
        let now = Instant::now();
        let view = self.arbiter.query(&self.args.vm_id).ok();
        let mut parts = vec![view
            .as_ref()
            .map_or("arbiter unreachable".to_owned(), View::to_string)];
        let has_backup = view.is_some_and(|v| v.backup.is_some());
        let processes = [Some(&mut servers.first), servers.second.as_mut()];
        for (i, p) in processes.into_iter().enumerate() {
            let Some(p) = p else { continue };
            let name = [FIRST, SECOND][i];
            if let Some(status) = p.exited() {
                parts.push(format!("{name} {}", describe_exit(status)));
                continue;
            }
            let events = read_events(&self.files.events[i]);
            let Some(s) = events.iter().rev().find_map(|e| match &e.event {
                ServerEvent::Status(s) => Some(s),
                _ => None,
            }) else {
                parts.push(format!("{name} starting"));
                continue;
            };
            parts.push(match s.role {
                // Lag is the backup's distance behind this primary, so it
                // means nothing once the primary is alone.
                ServerRole::Primary if has_backup => format!(
                    "{name} primary: served {}, backup lag {:.1} ms ({} exits)",
                    s.served, s.lag_ms, s.lag_exits
                ),
                ServerRole::Primary => format!("{name} primary alone: served {}", s.served),
                ServerRole::Backup => format!(
                    "{name} backup: replayed {} exits, {} log entries",
                    s.exits, s.log_entries
                ),
            });
        }
        let (then, before) = self.last.get();
        let secs = now.duration_since(then).as_secs_f64().max(1e-3);
        parts.push(format!(
            "{completed} replies ({:.0}/s)",
            completed.saturating_sub(before) as f64 / secs
        ));
        self.last.set((now, completed));
        println!(
            "{:>6.1} s  {}",
            now.duration_since(self.start).as_secs_f64(),
            parts.join(" | ")
        );
    }
}

// ---------------------------------------------------------------------------
// Analysis

fn ms_after(t: u64, kill: u64) -> f64 {
    (t as f64 - kill as f64) / 1e6
}

fn failover_timeline(
    kill_ns: Option<u64>,
    events: &ServerEvents,
    ops: &[&HistoryOp],
    new_primary_service: SocketAddr,
    view_before: u64,
    final_view: Option<&View>,
) -> Failover {
    let mut f = Failover {
        kill_unix_ns: kill_ns,
        view_before: Some(view_before),
        view_after: final_view.map(|v| v.number),
        primary_after: final_view
            .and_then(|v| v.primary.as_ref())
            .map(|p| p.id.clone()),
        ..Failover::default()
    };
    let Some(kill) = kill_ns else { return f };
    let backup = events.of(SECOND);
    let first = |pred: &dyn Fn(&ServerEvent) -> bool| {
        backup
            .iter()
            .filter(|e| pred(&e.event))
            .map(|e| e.t_ns)
            .find(|t| *t >= kill)
            .map(|t| ms_after(t, kill))
    };
    f.detected_ms = first(&|e| matches!(e, ServerEvent::FailureDetected { .. }));
    f.test_and_set_won_ms = first(&|e| matches!(e, ServerEvent::Tas { won: true, .. }));
    f.live_ms = first(&|e| matches!(e, ServerEvent::Live { .. }));
    f.first_reply_ms = ops
        .iter()
        .filter(|o| o.server == Some(new_primary_service))
        .filter_map(|o| o.completed_ns)
        .filter(|t| *t >= kill)
        .min()
        .map(|t| ms_after(t, kill));
    f
}

/// Every server that claimed to be primary of a view: by a `role` event,
/// by going `live`, or by winning test-and-set for view N (which makes it
/// primary of N + 1). Periodic `status` events are left out: they sample
/// role and view separately, so one taken mid-change may pair them wrongly.
fn primaries_per_view(events: &ServerEvents) -> BTreeMap<u64, BTreeSet<String>> {
    let mut out: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (name, list) in &events.0 {
        for e in list {
            let view = match &e.event {
                ServerEvent::Role {
                    role: ServerRole::Primary,
                    view,
                    ..
                } => Some(*view),
                ServerEvent::Live { view } => Some(*view),
                ServerEvent::Tas { view, won: true } => Some(view + 1),
                _ => None,
            };
            if let Some(v) = view {
                out.entry(v).or_default().insert(name.clone());
            }
        }
    }
    out
}

/// The written values' tokens; see [`Workload`].
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b';').filter(|t| !t.is_empty())
}

/// Finds acknowledged writes that the final value of their key does not
/// reflect, which needs the run's unique values (see [`Workload`]).
///
/// A key's final value is the value of its last put (the base) followed by
/// the appends after it. An acknowledged write is missing from it legally
/// only if the base put could have come after it, i.e. did not complete
/// before the write was invoked. A missing write with no such put is lost.
/// The linearizability check decides the rest; this gives the number.
fn check_writes(ops: &[&HistoryOp], finals: &FinalValues, kill_ns: Option<u64>) -> WriteCheck {
    let mut check = WriteCheck::default();
    let mut by_key: BTreeMap<&[u8], Vec<&HistoryOp>> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.is_write()) {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, writes) in by_key {
        let acked: Vec<&HistoryOp> = writes
            .iter()
            .copied()
            .filter(|o| o.acknowledged())
            .collect();
        check.acknowledged += acked.len() as u64;
        check.acknowledged_before_kill += acked
            .iter()
            .filter(|o| kill_ns.is_some_and(|k| o.completed_ns.is_some_and(|c| c < k)))
            .count() as u64;
        let Some(Some(final_value)) = finals.get(key) else {
            check.unverified_keys.push(history::show(key));
            continue;
        };
        check.checked += acked.len() as u64;
        let value = final_value.as_deref().unwrap_or_default();
        let base = tokens(value).next().and_then(|first| {
            writes
                .iter()
                .find(|w| w.kind == OpKind::Put && w.value.strip_suffix(b";") == Some(first))
        });
        let present: BTreeSet<&[u8]> = tokens(value).collect();
        for w in acked {
            let visible = match w.kind {
                OpKind::Put => base.is_some_and(|b| std::ptr::eq(*b, w)),
                _ => tokens(&w.value).all(|t| present.contains(t)),
            };
            let overwritten_later = base.is_some_and(|b| {
                !std::ptr::eq(*b, w) && b.completed_ns.is_none_or(|done| done >= w.invoked_ns)
            });
            if !visible && !overwritten_later {
                check.lost.push(LostWrite {
                    key: history::show(key),
                    kind: w.kind,
                    value: history::show(&w.value),
                    client: w.client,
                    acknowledged_unix_ns: w.completed_ns.unwrap_or_default(),
                    final_value: final_value.as_deref().map(history::show),
                });
            }
        }
    }
    check
}

fn op_counts(ops: &[&HistoryOp], load: &Load, final_reads: usize) -> OpCounts {
    let count = |f: &dyn Fn(&HistoryOp) -> bool| ops.iter().filter(|o| f(o)).count() as u64;
    OpCounts {
        invoked: ops.len() as u64,
        completed: count(&|o| o.acknowledged()),
        unknown: count(&|o| !o.acknowledged()),
        gets: count(&|o| o.kind == OpKind::Get),
        puts: count(&|o| o.kind == OpKind::Put),
        appends: count(&|o| o.kind == OpKind::Append),
        refused: load.refused,
        resends: load.resends,
        final_reads: final_reads as u64,
    }
}

fn throughput(
    ops: &[&HistoryOp],
    start: u64,
    end: u64,
    kill: Option<u64>,
    failover: &Failover,
) -> Throughput {
    let rate = |from: u64, to: u64| {
        if to <= from {
            return 0.0;
        }
        let n = ops
            .iter()
            .filter_map(|o| o.completed_ns)
            .filter(|t| (from..to).contains(t))
            .count();
        n as f64 / ((to - from) as f64 / 1e9)
    };
    let resumed = kill
        .zip(failover.first_reply_ms)
        .map(|(k, ms)| k + (ms * 1e6) as u64);
    Throughput {
        ops_per_sec_before_kill: kill.map_or(0.0, |k| rate(start, k)),
        ops_per_sec_after_failover: resumed.map_or(0.0, |r| rate(r, end)),
        ops_per_sec_overall: rate(start, end),
    }
}

fn markers(f: &Failover) -> Vec<Marker> {
    let Some(kill) = f.kill_unix_ns else {
        return Vec::new();
    };
    let mut markers = vec![Marker {
        t_ns: kill,
        label: "primary killed (SIGKILL)".into(),
    }];
    let steps = [
        (f.detected_ms, "failure detected"),
        (f.test_and_set_won_ms, "test-and-set won"),
        (f.live_ms, "backup live"),
        (f.first_reply_ms, "first reply from the new primary"),
    ];
    for (ms, what) in steps {
        if let Some(ms) = ms {
            markers.push(Marker {
                t_ns: kill.saturating_add_signed((ms * 1e6) as i64),
                label: format!("{what} +{ms:.0} ms"),
            });
        }
    }
    markers
}

fn server_label(addr: SocketAddr, a: &Addresses) -> String {
    if addr == a.first_primary_service {
        format!("{FIRST} (first primary) {addr}")
    } else if addr == a.backup_service {
        format!("{SECOND} (backup, then primary) {addr}")
    } else {
        addr.to_string()
    }
}

fn judge(
    f: &Failover,
    writes: &WriteCheck,
    lin: &linearizability::Report,
    primaries: &BTreeMap<u64, BTreeSet<String>>,
    problems: &mut Vec<String>,
) {
    if f.kill_unix_ns.is_none() {
        problems.push("the primary was never killed".into());
    }
    if f.live_ms.is_none() {
        problems.push(format!("{SECOND} never went live after the kill"));
    }
    if f.primary_after.as_deref() != Some(SECOND) {
        problems.push(format!(
            "the arbiter's final view names {} as primary, not {SECOND}",
            f.primary_after.as_deref().unwrap_or("nobody")
        ));
    }
    if f.first_reply_ms.is_none() {
        problems.push("no client got a reply from the new primary".into());
    }
    if !writes.lost.is_empty() {
        problems.push(format!("{} acknowledged writes lost", writes.lost.len()));
    }
    if !writes.unverified_keys.is_empty() {
        problems.push(format!(
            "{} keys could not be read back: {}",
            writes.unverified_keys.len(),
            writes.unverified_keys.join(", ")
        ));
    }
    match lin.overall {
        Overall::Linearizable => {}
        Overall::NotLinearizable => problems.push(format!(
            "the history is not linearizable ({} keys)",
            lin.keys_not_linearizable
        )),
        Overall::Incomplete => problems.push(format!(
            "linearizability could not be decided for {} keys",
            lin.keys_not_checked
        )),
    }
    for (view, names) in primaries {
        if names.len() > 1 {
            problems.push(format!(
                "view {view} had more than one primary: {}",
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
}

/// The per-key list of a passing check is long and says nothing.
fn without_passing_keys(mut lin: linearizability::Report) -> linearizability::Report {
    lin.keys.retain(|k| k.verdict != KeyVerdict::Linearizable);
    lin
}

fn print_summary(r: &DemoReport, svg: &Path, metrics: &Path, history: &Path) {
    let f = &r.failover;
    let ms = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("+{v:.0} ms"));
    println!();
    println!("failover (times after the SIGKILL):");
    println!("  primary {FIRST} killed     at {:.3} s", r.kill_at_s);
    println!("  failure detected      {}", ms(f.detected_ms));
    println!("  test-and-set won      {}", ms(f.test_and_set_won_ms));
    println!("  {SECOND} live            {}", ms(f.live_ms));
    println!("  first reply from it   {}", ms(f.first_reply_ms));
    println!(
        "  view {} -> {}, primary now {}",
        f.view_before.map_or("?".into(), |v| v.to_string()),
        f.view_after.map_or("?".into(), |v| v.to_string()),
        f.primary_after.as_deref().unwrap_or("nobody")
    );
    println!(
        "requests: {} completed, {} without reply, {} resent; {:.0} ops/s before the kill, {:.0} after the failover",
        r.ops.completed,
        r.ops.unknown,
        r.ops.resends,
        r.throughput.ops_per_sec_before_kill,
        r.throughput.ops_per_sec_after_failover
    );
    let ft = &r.fault_tolerant_phase;
    println!(
        "before the kill, at every exit of {FIRST}: backup lag p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; outputs held for the backup's ack p50 {:.3} ms, p99 {:.3} ms",
        ft.lag_p50_ms, ft.lag_p99_ms, ft.lag_max_ms, ft.output_hold_p50_ms, ft.output_hold_p99_ms
    );
    println!(
        "acknowledged writes: {} ({} before the kill), {} checked by reading back {} keys, {} lost",
        r.writes.acknowledged,
        r.writes.acknowledged_before_kill,
        r.writes.checked,
        r.ops.final_reads,
        r.writes.lost.len()
    );
    for w in r.writes.lost.iter().take(20) {
        println!(
            "  lost: {:?} {:?} on key {:?} (final value {:?})",
            w.kind, w.value, w.key, w.final_value
        );
    }
    println!("linearizability: {}", r.linearizability.summary());
    let explanation = r.linearizability.explain();
    for line in explanation.lines().take(60) {
        println!("  {line}");
    }
    let one_each = r.primaries_per_view.values().all(|n| n.len() <= 1);
    println!(
        "primaries per view: {} ({})",
        r.primaries_per_view
            .iter()
            .map(|(v, n)| format!("{v}: {}", n.iter().cloned().collect::<Vec<_>>().join("+")))
            .collect::<Vec<_>>()
            .join(", "),
        if one_each {
            "one each"
        } else {
            "MORE THAN ONE"
        }
    );
    println!(
        "wrote {}, {} and {}",
        svg.display(),
        metrics.display(),
        history.display()
    );
    if r.problems.is_empty() {
        println!("PASS");
    } else {
        println!("FAIL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn write(client: u64, kind: OpKind, v: &str, at: u64, done: Option<u64>) -> HistoryOp {
        HistoryOp {
            client,
            key: b"k".to_vec(),
            kind,
            value: v.as_bytes().to_vec(),
            invoked_ns: at,
            completed_ns: done,
            result: None,
            server: None,
        }
    }

    fn finals(v: Option<&str>) -> FinalValues {
        BTreeMap::from([(b"k".to_vec(), Some(v.map(|v| v.as_bytes().to_vec())))])
    }

    fn lost(ops: &[HistoryOp], f: Option<&str>) -> Vec<String> {
        let refs: Vec<&HistoryOp> = ops.iter().collect();
        check_writes(&refs, &finals(f), Some(15))
            .lost
            .into_iter()
            .map(|l| l.value)
            .collect()
    }

    #[test]
    fn final_value_reflecting_every_write_loses_nothing() {
        let ops = [
            write(1, OpKind::Append, "a1.1;", 0, Some(1)),
            write(1, OpKind::Put, "p1.2;", 2, Some(3)),
            write(2, OpKind::Append, "a2.1;", 4, Some(5)),
            write(1, OpKind::Append, "a1.3;", 6, Some(7)),
        ];
        assert!(lost(&ops, Some("p1.2;a2.1;a1.3;")).is_empty());
        let refs: Vec<&HistoryOp> = ops.iter().collect();
        let check = check_writes(&refs, &finals(Some("p1.2;a2.1;a1.3;")), Some(5));
        assert_eq!((check.acknowledged, check.checked), (4, 4));
        assert_eq!(check.acknowledged_before_kill, 2);
    }

    #[test]
    fn missing_append_after_the_last_put_is_lost() {
        let ops = [
            write(1, OpKind::Put, "p1.1;", 0, Some(1)),
            write(2, OpKind::Append, "a2.1;", 2, Some(3)),
            write(1, OpKind::Append, "a1.2;", 4, Some(5)),
        ];
        assert_eq!(lost(&ops, Some("p1.1;a1.2;")), ["a2.1;"]);
    }

    #[test]
    fn write_overwritten_by_a_concurrent_or_later_put_is_not_lost() {
        let ops = [
            write(1, OpKind::Append, "a1.1;", 0, Some(10)),
            write(2, OpKind::Put, "p2.1;", 5, Some(6)),
            write(3, OpKind::Put, "p3.1;", 1, Some(2)),
        ];
        assert!(lost(&ops, Some("p2.1;")).is_empty());
    }

    #[test]
    fn put_superseded_by_an_earlier_put_is_lost() {
        let ops = [
            write(1, OpKind::Put, "p1.1;", 0, Some(1)),
            write(2, OpKind::Put, "p2.1;", 2, Some(3)),
        ];
        assert_eq!(lost(&ops, Some("p1.1;")), ["p2.1;"]);
        assert_eq!(lost(&ops, None), ["p1.1;", "p2.1;"]);
    }

    #[test]
    fn unknown_outcome_put_may_be_the_base() {
        let ops = [
            write(1, OpKind::Put, "p1.1;", 0, Some(1)),
            write(2, OpKind::Put, "p2.1;", 2, None),
        ];
        assert!(lost(&ops, Some("p2.1;")).is_empty());
        assert!(lost(&ops, Some("p1.1;")).is_empty());
    }

    #[test]
    fn unread_key_is_unverified_not_lost() {
        let ops = [write(1, OpKind::Put, "p1.1;", 0, Some(1))];
        let refs: Vec<&HistoryOp> = ops.iter().collect();
        let check = check_writes(&refs, &BTreeMap::from([(b"k".to_vec(), None)]), None);
        assert!(check.lost.is_empty());
        assert_eq!(check.unverified_keys, ["k"]);
        assert_eq!(check.checked, 0);
    }

    #[test]
    fn workload_is_seeded_and_values_are_unique() {
        let mut a = Workload::new(7, 0, 4);
        let mut b = Workload::new(7, 0, 4);
        let mut c = Workload::new(7, 1, 4);
        let mut values = BTreeSet::new();
        for _ in 0..1000 {
            let x = a.next();
            assert_eq!(x, b.next());
            let y = c.next();
            for (kind, key, value) in [x, y] {
                assert!(!key.is_empty() && key.len() <= 64);
                if kind != OpKind::Get {
                    assert!(values.insert(value), "duplicate value");
                }
            }
        }
    }

    /// Events as the servers write them: JSON lines read back through
    /// the one event type.
    fn events(list: Vec<Value>) -> ServerEvents {
        let records = list
            .into_iter()
            .map(|line| serde_json::from_value::<EventRecord>(line).expect("an event line"));
        let (a, b): (Vec<_>, Vec<_>) = records.partition(|e| e.server == FIRST);
        ServerEvents(vec![(FIRST.into(), a), (SECOND.into(), b)])
    }

    #[test]
    fn failover_steps_are_read_from_the_backup_events() {
        let kill = 1_000_000_000u64;
        let ev = events(vec![
            json!({"t_ns": 100, "event": "role", "role": "primary", "view": 2, "server": FIRST}),
            json!({"t_ns": 200, "event": "role", "role": "backup", "view": 2, "server": SECOND}),
            json!({"t_ns": kill + 301_000_000, "event": "failure_detected", "peer": "primary", "server": SECOND}),
            json!({"t_ns": kill + 303_000_000, "event": "tas", "view": 2, "won": true, "server": SECOND}),
            json!({"t_ns": kill + 305_000_000, "event": "live", "view": 3, "server": SECOND}),
        ]);
        let service: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut reply = write(
            1,
            OpKind::Put,
            "p",
            kill + 400_000_000,
            Some(kill + 410_000_000),
        );
        reply.server = Some(service);
        let ops = [&reply];
        let f = failover_timeline(Some(kill), &ev, &ops, service, 2, None);
        assert_eq!(f.detected_ms, Some(301.0));
        assert_eq!(f.test_and_set_won_ms, Some(303.0));
        assert_eq!(f.live_ms, Some(305.0));
        assert_eq!(f.first_reply_ms, Some(410.0));
        let labels: Vec<String> = markers(&f).into_iter().map(|m| m.label).collect();
        assert_eq!(
            labels,
            [
                "primary killed (SIGKILL)",
                "failure detected +301 ms",
                "test-and-set won +303 ms",
                "backup live +305 ms",
                "first reply from the new primary +410 ms"
            ]
        );
        let primaries = primaries_per_view(&ev);
        assert_eq!(primaries.len(), 2);
        assert!(primaries.values().all(|n| n.len() == 1));
        assert_eq!(primaries[&3], BTreeSet::from([SECOND.to_owned()]));
    }

    #[test]
    fn two_primaries_in_one_view_are_found() {
        let ev = events(vec![
            json!({"t_ns": 1, "event": "role", "role": "primary", "view": 3, "server": FIRST}),
            json!({"t_ns": 2, "event": "tas", "view": 2, "won": true, "server": SECOND}),
            serde_json::to_value(EventRecord {
                t_ns: 3,
                server: SECOND.into(),
                event: ServerEvent::Status(ServerStatus {
                    view: 2,
                    ..ServerStatus::zero(ServerRole::Primary)
                }),
            })
            .expect("a status line"),
        ]);
        let primaries = primaries_per_view(&ev);
        assert_eq!(primaries.len(), 1);
        assert_eq!(primaries[&3].len(), 2);
    }

    #[test]
    fn exits_are_described() {
        assert_eq!(describe_exit(ExitStatus::from_raw(4 << 8)), "exit code 4");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
