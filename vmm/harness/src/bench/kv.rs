//! `ftvm bench kv`: closed-loop KV load against `ftvm run`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use ftvm_core::machine::workload::Workload;
use serde::Serialize;

use crate::launcher::{Launcher, Role};
use crate::load::{self, serve_under_load};
use crate::report::write_json;
use crate::stats::percentile;

#[derive(clap::Args)]
pub struct KvBenchArgs {
    /// Client counts to measure, one run of the VMM each.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub clients: Vec<usize>,
    /// Seconds of load per client count.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Guest memory size passed to `ftvm run`.
    #[arg(long, default_value = "64M")]
    pub mem: String,
    /// The guest workload `ftvm run` boots: `kv-user` (the KV service's
    /// hot path at CPL3, which runs natively on a nested KVM), or `kv`
    /// (all of it at CPL0).
    #[arg(long, default_value = "kv-user")]
    pub workload: Workload,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct KvPoint {
    pub workload: String,
    pub clients: usize,
    pub seconds: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub retries: u64,
    /// All synchronous exits of the VMM's run (boot and idle ticks included)
    /// per request it served.
    pub exits_per_request: f64,
    pub exits_per_sec: f64,
    pub vmm_max_rss_mib: f64,
    pub guest_mem_mib: f64,
}

fn kv_point(
    launcher: &Launcher,
    args: &KvBenchArgs,
    clients: usize,
    duration: Duration,
) -> Result<KvPoint> {
    let extra = ["--workload", args.workload.name()];
    let served = serve_under_load(launcher, Role::Run, &extra, clients, duration, &args.mem)?;
    let stats = &served.stats;
    let exits = stats["exits"]["synchronous"].as_u64().unwrap_or(0) as f64;
    let frames = stats["frames_transmitted"].as_u64().unwrap_or(0).max(1) as f64;
    let elapsed = stats["elapsed_secs"].as_f64().unwrap_or(served.seconds);
    let mem = ftvm_core::machine::memory::parse_size(&args.mem).map_err(anyhow::Error::msg)?;
    let lat = &served.load.latencies;
    Ok(KvPoint {
        workload: args.workload.to_string(),
        clients,
        seconds: served.seconds,
        ops: served.load.ops,
        ops_per_sec: served.ops_per_sec,
        p50_us: percentile(lat, 0.50),
        p99_us: percentile(lat, 0.99),
        retries: served.load.retries,
        exits_per_request: exits / frames,
        exits_per_sec: exits / elapsed,
        vmm_max_rss_mib: served.vmm_max_rss_mib,
        guest_mem_mib: (mem >> 20) as f64,
    })
}

pub fn bench_kv(args: &KvBenchArgs) -> Result<()> {
    if !args.workload.serves_kv() {
        anyhow::bail!("workload {} serves no KV requests", args.workload);
    }
    let duration = load::duration(args.duration)?;
    let launcher = Launcher::this_executable()?;
    println!("clients  ops/s     p50 µs   p99 µs   exits/req  exits/s   VMM max RSS (guest mem)");
    let mut points = Vec::new();
    for &clients in &args.clients {
        let p = kv_point(&launcher, args, clients.max(1), duration)?;
        println!(
            "{:<8} {:<9.0} {:<8.0} {:<8.0} {:<10.2} {:<9.0} {:.1} MiB ({:.0} MiB)",
            p.clients,
            p.ops_per_sec,
            p.p50_us,
            p.p99_us,
            p.exits_per_request,
            p.exits_per_sec,
            p.vmm_max_rss_mib,
            p.guest_mem_mib
        );
        points.push(p);
    }
    write_json(args.json.as_deref(), &points)
}
