//! Client load against a KV service: closed-loop clients, paced ones, and
//! one served run (`ftvm run` or `ftvm record`) under such a load.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::launcher::{free_udp_addr, Launcher, Role, ServerConfig};
use crate::procstat::max_rss_mib;
use ftvm_kvclient::{ClientConfig, KvClient};

/// `--duration` in seconds, checked.
pub fn duration(seconds: f64) -> Result<Duration> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        bail!("--duration {seconds} must be in (0, 3600] seconds");
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// What a load measured.
#[derive(Default)]
pub struct Measured {
    pub ops: u64,
    /// Sorted, in ns.
    pub latencies: Vec<u64>,
    /// Requests the clients sent again.
    pub retries: u64,
}

/// Runs `clients` closed-loop clients (half puts, half gets over 64 keys)
/// for `duration`.
pub fn closed_loop(service: SocketAddr, clients: usize, duration: Duration) -> Result<Measured> {
    paced_loop(service, clients, duration, None)
}

/// Like [`closed_loop`], but with `pace` each client starts a request only
/// every `pace` (at once if the last one took longer), so that the server
/// is not saturated and latency is the path's, not the queue's.
pub fn paced_loop(
    service: SocketAddr,
    clients: usize,
    duration: Duration,
    pace: Option<Duration>,
) -> Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for c in 0..clients {
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || -> Result<(Vec<u64>, u64)> {
            let mut client = KvClient::connect(service, ClientConfig::default())?;
            let mut lat = Vec::new();
            let mut i = 0u64;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(pace) = pace {
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    next = next.max(Instant::now() - pace) + pace;
                }
                let key = format!("k{}", (i * 7 + c as u64) % 64);
                let t = Instant::now();
                if i.is_multiple_of(2) {
                    client.put(key.as_bytes(), b"0123456789abcdef")?;
                } else {
                    client.get(key.as_bytes())?;
                }
                lat.push(t.elapsed().as_nanos() as u64);
                i += 1;
            }
            Ok((lat, client.stats().retries))
        }));
    }
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut retries = 0;
    for h in handles {
        let joined = h.join();
        let (lat, r) = joined.map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        latencies.extend(lat);
        retries += r;
    }
    latencies.sort_unstable();
    Ok(Measured {
        ops: latencies.len() as u64,
        latencies,
        retries,
    })
}

/// What one served run measured.
pub struct Served {
    /// Under the load; nothing when idle.
    pub load: Measured,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub vmm_max_rss_mib: f64,
    /// The VMM's counters.
    pub stats: serde_json::Value,
}

/// One `ftvm run` or `ftvm record` (`role`, with `extra` arguments) under
/// `clients` closed-loop clients for `duration` (none: idle).
pub fn serve_under_load(
    launcher: &Launcher,
    role: Role,
    extra: &[&str],
    clients: usize,
    duration: Duration,
    mem: &str,
) -> Result<Served> {
    let name = match role {
        Role::Record { .. } => "record",
        _ => "run",
    };
    let mut config = ServerConfig::new(
        name,
        role,
        free_udp_addr()?,
        duration + Duration::from_secs(60),
    );
    config.guest.mem = Some(mem.to_owned());
    config.stats = true;
    config.inherit_stderr = true;
    config.extra = extra.iter().map(Into::into).collect();
    let mut vmm = launcher.start(&config)?;
    vmm.wait_answering(Duration::from_secs(30))?;
    let service = config.address;
    let t = Instant::now();
    let load = if clients == 0 {
        std::thread::sleep(duration);
        Measured::default()
    } else {
        closed_loop(service, clients, duration)?
    };
    let seconds = t.elapsed().as_secs_f64();
    let vmm_max_rss_mib = max_rss_mib(vmm.pid());
    vmm.stop(Duration::from_secs(10))?;
    let stats = vmm
        .stats()
        .with_context(|| format!("ftvm {name} on {service}"))?;
    Ok(Served {
        ops_per_sec: load.ops as f64 / seconds,
        load,
        seconds,
        vmm_max_rss_mib,
        stats,
    })
}
