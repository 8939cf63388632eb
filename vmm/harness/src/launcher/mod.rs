//! The one way to start `ftvm` processes: the demo, the benchmarks and the
//! end-to-end tests all build their servers' command lines, spawn them,
//! wait for them and kill them here.

mod cluster;
mod process;
mod proxy;
mod server;
mod udp_proxy;

use std::ffi::OsStr;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub use cluster::{
    ArbiterKind, Cluster, ClusterArbiter, ClusterConfig, ClusterEvents, ETCD_PREFIX,
};
use process::Files;
pub use process::{describe_exit, Process};
pub use proxy::Proxy;
pub use server::{Guest, Knobs, Membership, Role, ServerConfig};
pub use udp_proxy::{DatagramCounts, DatagramFaults, UdpProxy};

/// Starts `ftvm` from one binary.
#[derive(Clone, Debug)]
pub struct Launcher {
    ftvm: PathBuf,
}

/// The time limit [`Launcher::replay`] gives a replay.
pub const REPLAY_LIMIT: Duration = Duration::from_secs(600);

impl Launcher {
    pub fn new(ftvm: impl Into<PathBuf>) -> Launcher {
        Launcher { ftvm: ftvm.into() }
    }

    /// For code that runs inside the `ftvm` binary (the demo, the
    /// benchmarks): its servers are this executable again.
    pub fn this_executable() -> Result<Launcher> {
        let exe = std::env::current_exe().context("cannot find the ftvm binary")?;
        Ok(Launcher::new(exe))
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.ftvm);
        command.stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent. It makes the kernel kill the child if its starter is
        // killed, which no destructor would survive. The kernel sends it
        // when the starting *thread* ends, which is why a `Process` must
        // not outlive the thread that started it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        command
    }

    /// Starts a server as `config` says; it is killed when the returned
    /// process is dropped.
    pub fn start(&self, config: &ServerConfig) -> Result<Process> {
        let prefix = format!("ftvm-{}-", config.name);
        let (dir, temp) = dir_or_temp(config.dir.as_deref(), &prefix)?;
        let files = Files {
            log: config.log_file(&dir),
            serial: config.serial_file(&dir),
            events: config.events_file(&dir),
            stats: config.stats_file(&dir),
        };
        // The server appends its events: an earlier run's, left in the same
        // place, would read as this one's. Likewise for its other files.
        for path in [&files.serial, &files.events, &files.stats]
            .into_iter()
            .flatten()
        {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("cannot remove the old {}", path.display()))
                }
                _ => {}
            }
        }
        let mut command = self.command();
        command.args(config.args(&dir));
        match &files.log {
            Some(log) => {
                let out = std::fs::File::create(log)
                    .with_context(|| format!("cannot create {}", log.display()))?;
                let err = out
                    .try_clone()
                    .with_context(|| format!("cannot share {}", log.display()))?;
                command.stdout(out).stderr(err);
            }
            None => {
                command.stdout(Stdio::null());
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {} ({})", config.name, self.ftvm.display()))?;
        Ok(Process::new(
            &config.name,
            child,
            Some(config.address),
            files,
            temp,
        ))
    }

    /// `ftvm replay LOG` (console to /dev/null) with a time limit of its
    /// own, [`REPLAY_LIMIT`], the launcher allowing it a minute more; an
    /// exit other than 0 is an error. Returns its `--summary-json` verdict,
    /// written in `dir`.
    pub fn replay(&self, log: &Path, dir: &Path) -> Result<serde_json::Value> {
        let summary = dir.join("replay-summary.json");
        let limit = REPLAY_LIMIT.as_secs().to_string();
        let args = [
            "replay".as_ref(),
            log.as_os_str(),
            "--serial".as_ref(),
            "/dev/null".as_ref(),
            "--timeout".as_ref(),
            limit.as_ref(),
            "--summary-json".as_ref(),
            summary.as_os_str(),
        ];
        let out = self.run(&args, REPLAY_LIMIT + Duration::from_secs(60))?;
        if !out.status.success() {
            bail!(
                "replay of {} failed: {}",
                log.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = std::fs::read_to_string(&summary)
            .with_context(|| format!("cannot read {}", summary.display()))?;
        serde_json::from_str(&text).with_context(|| format!("bad JSON in {}", summary.display()))
    }

    /// Runs `ftvm args` to the end, killed after `limit`; its output is read
    /// while it runs, so that a full pipe cannot stall it.
    pub fn run(&self, args: &[impl AsRef<OsStr>], limit: Duration) -> Result<Output> {
        let mut command = self.command();
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start ftvm {shown}"))?;
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let mut process = Process::new(
            &format!("ftvm {shown}"),
            child,
            None,
            Files::default(),
            None,
        );
        let ended = process.wait_exit(limit);
        let output = Output {
            status: process.exited().unwrap_or_default(),
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        if let Err(e) = ended {
            bail!(
                "{e:#}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }
}

/// `dir`, or else a new temporary directory, held by the second.
fn dir_or_temp(dir: Option<&Path>, prefix: &str) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match dir {
        Some(dir) => (dir.to_owned(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .context("cannot create a temporary directory")?;
            (temp.path().to_owned(), Some(temp))
        }
    })
}

pub fn free_udp_addr() -> Result<SocketAddr> {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .context("no free UDP port on loopback")
}

pub fn free_tcp_addr() -> Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .context("no free TCP port on loopback")
}
