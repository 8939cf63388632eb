//! `ftvm demo`'s options, and the constants its parts share.

use std::path::PathBuf;
use std::time::Duration;

use ftvm_core::machine::workload::Workload;

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Where timeline.svg, metrics.json, the clients' history and the
    /// servers' logs and events go.
    #[arg(long, default_value = "ftvm-demo-out")]
    pub out: PathBuf,
    /// Closed-loop KV clients.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub clients: u32,
    /// Seconds of client load, the failovers included.
    #[arg(long, default_value_t = 16.0)]
    pub duration: f64,
    /// Seconds into the load at which the primary gets its first SIGKILL.
    #[arg(long, default_value_t = 5.0)]
    pub kill_at: f64,
    /// How many times the current primary gets SIGKILL. After each kill,
    /// once the new primary is live, the killed server comes back as a
    /// spare with a new id, so that there is a spare for the next round.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub kills: u32,
    /// Extra `ftvm backup` processes that wait as spares, started once the
    /// first pair is fault tolerant.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=8))]
    pub spares: u32,
    /// Also kill the backup once, after the primary's kills.
    #[arg(long)]
    pub kill_backup: bool,
    /// Seconds between kills (default: the rest of the load after
    /// --kill-at, shared evenly). A kill waits, past its time, until the
    /// VM is protected again by a backup.
    #[arg(long)]
    pub kill_every: Option<f64>,
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
    /// What the guest runs: kv-user (the KV service, its hot path at
    /// CPL3), kv (all of it at CPL0) or kv-race (the KV service and a
    /// background task the timer and every request preempt); the demo's
    /// clients need a workload that serves KV.
    #[arg(long, default_value = "kv-user")]
    pub workload: Workload,
    /// The arbiter on a local 3-member etcd cluster, started by the demo
    /// (`etcd` must be installed), instead of `ftvm arbiter`; its leader is
    /// killed during the run as well (see --etcd-kill-at).
    #[arg(long)]
    pub etcd: bool,
    /// With --etcd: seconds into the load at which the etcd leader gets
    /// SIGKILL (default: with the primary, at --kill-at).
    #[arg(long, requires = "etcd")]
    pub etcd_kill_at: Option<f64>,
}

impl DemoArgs {
    /// When the etcd leader is killed, with --etcd.
    pub(super) fn etcd_kill_at(&self) -> Option<f64> {
        self.etcd.then(|| self.etcd_kill_at.unwrap_or(self.kill_at))
    }
}

/// The first primary's and the backup's ids at the arbiter; spares and
/// restarted servers go on with vmm3, vmm4, ...
pub(super) const FIRST: &str = "vmm1";
pub(super) const SECOND: &str = "vmm2";

/// The id of the `n`th server the demo starts (1: the first primary).
pub(super) fn server_name(n: usize) -> String {
    format!("vmm{n}")
}
/// For the arbiter, the guests' boot and the backup's catching up.
pub(super) const STARTUP: Duration = Duration::from_secs(60);
pub(super) const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How long a client waits for a reply before it asks the arbiter where
/// the primary is and sends the same request there (perhaps to the same
/// server again). Short, so that clients find a new primary soon after it
/// goes live; longer than a reply held by the output rule usually takes.
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);
pub(super) const ARBITER_TIMEOUT: Duration = Duration::from_millis(500);

/// How long after the load a client keeps retrying its last request.
pub(super) fn drain(args: &DemoArgs) -> Duration {
    Duration::from_millis(args.failure_timeout_ms.saturating_mul(10)).max(Duration::from_secs(5))
}
