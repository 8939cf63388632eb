//! One `ftvm` child process, killed when dropped, with the files it writes.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;

use ftvm_core::host::events::{read_events, EventRecord, ServerEvent, Status};
use ftvm_kvclient::{ClientConfig, KvClient};

/// How often the waits look again, unless told otherwise.
pub(crate) const POLL: Duration = Duration::from_millis(10);

/// The files a process writes; each is absent when it does not write it.
#[derive(Default)]
pub(crate) struct Files {
    /// Its stdout and stderr.
    pub log: Option<PathBuf>,
    /// The guest's console (`--serial`).
    pub serial: Option<PathBuf>,
    /// A primary's or backup's events (`--events`).
    pub events: Option<PathBuf>,
    /// The run's counters (`--stats-json`).
    pub stats: Option<PathBuf>,
}

/// A running `ftvm`, killed if it is still running when this is dropped,
/// so that a failed test or an early return leaves nothing behind.
pub struct Process {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    address: Option<SocketAddr>,
    files: Files,
    /// The directory of its files, when it is the process's own: it goes
    /// with the process.
    _dir: Option<tempfile::TempDir>,
}

impl Process {
    pub(crate) fn new(
        name: &str,
        child: Child,
        address: Option<SocketAddr>,
        files: Files,
        dir: Option<tempfile::TempDir>,
    ) -> Process {
        Process {
            name: name.to_owned(),
            child,
            status: None,
            address,
            files,
            _dir: dir,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it serves (`--service`) or, an arbiter, listens.
    pub fn address(&self) -> Result<SocketAddr> {
        self.address
            .with_context(|| format!("{} serves nothing", self.name))
    }

    /// How it ended, once it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn running(&mut self) -> bool {
        self.exited().is_none()
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, signal)
            .with_context(|| format!("cannot send {signal} to {}", self.name))
    }

    /// SIGKILL, and wait for it to end.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, and wait up to `grace` for it to end; past that, SIGKILL
    /// and an error.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.exited().is_none() {
            self.signal(Signal::SIGTERM)?;
        }
        self.wait_exit(grace)
            .with_context(|| format!("{} did not stop on SIGTERM", self.name))
    }

    /// Waits up to `within` for it to end by itself; past that, SIGKILL and
    /// an error.
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "{} did not end within {within:?}, killed\n  {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Why it is no longer running, with the end of its log, if it ended.
    pub fn died(&mut self) -> Option<String> {
        let status = self.exited()?;
        Some(format!(
            "{} ended early ({})\n  {}",
            self.name,
            describe_exit(status),
            self.log_tail()
        ))
    }

    /// Calls `ready` every `every` until it holds, and fails if `within`
    /// passes first or the process ends without it.
    pub fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        every: Duration,
        ready: impl FnMut(&Process) -> Result<bool>,
    ) -> Result<()> {
        wait_for(self, what, within, every, ready)
    }

    /// Waits until its guest's KV service answers.
    pub fn wait_answering(&mut self, within: Duration) -> Result<()> {
        let mut answered = answers(self.address()?)?;
        self.wait_for("an answer from its guest", within, POLL, |_| Ok(answered()))
    }

    /// Waits for `needle` on the guest's console.
    pub fn wait_console(&mut self, needle: &str, within: Duration) -> Result<()> {
        self.wait_for(&format!("`{needle}` on its console"), within, POLL, |p| {
            Ok(p.console().contains(needle))
        })
    }

    /// Waits for an event that `wanted` accepts and returns it.
    pub fn wait_event(
        &mut self,
        what: &str,
        within: Duration,
        wanted: impl Fn(&ServerEvent) -> bool,
    ) -> Result<EventRecord> {
        self.wait_for(&format!("a `{what}` event"), within, POLL, |p| {
            Ok(p.has_event(&wanted))
        })?;
        self.events()
            .into_iter()
            .find(|e| wanted(&e.event))
            .ok_or_else(|| anyhow!("{}'s `{what}` event went away", self.name))
    }

    /// The events it has written so far.
    pub fn events(&self) -> Vec<EventRecord> {
        self.files
            .events
            .as_deref()
            .map(read_events)
            .unwrap_or_default()
    }

    pub fn has_event(&self, wanted: impl Fn(&ServerEvent) -> bool) -> bool {
        self.events().iter().any(|e| wanted(&e.event))
    }

    /// Its latest status line.
    pub fn last_status(&self) -> Option<Status> {
        self.events().into_iter().rev().find_map(|e| match e.event {
            ServerEvent::Status(s) => Some(s),
            _ => None,
        })
    }

    /// The guest's console so far.
    pub fn console(&self) -> String {
        read_or_empty(self.files.serial.as_deref())
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        read_or_empty(self.files.log.as_deref())
    }

    /// The counters it wrote on its way out.
    pub fn stats(&self) -> Result<serde_json::Value> {
        let path = self
            .files
            .stats
            .as_deref()
            .with_context(|| format!("{} was started without --stats-json", self.name))?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("no counters from {} in {}", self.name, path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("bad counters from {} in {}", self.name, path.display()))
    }

    /// The end of its log, for an error message.
    pub fn log_tail(&self) -> String {
        let Some(path) = &self.files.log else {
            return format!("{}'s output went to the terminal", self.name);
        };
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("last lines of {}:\n    {tail}", path.display())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_or_empty(path: Option<&Path>) -> String {
    path.and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

/// Processes that a wait watches: it fails as soon as one of them ends.
pub(crate) trait Watched {
    /// Why one of them ended, if one did.
    fn died(&mut self) -> Option<String>;
    /// The end of their logs, for a wait that timed out.
    fn log_tails(&self) -> String;
}

impl Watched for Process {
    fn died(&mut self) -> Option<String> {
        Process::died(self)
    }

    fn log_tails(&self) -> String {
        format!("{}: {}", self.name, self.log_tail())
    }
}

/// Calls `ready` every `every` until it holds, and fails if `within`
/// passes first or one of `watched` ends without it.
pub(crate) fn wait_for<W: Watched>(
    watched: &mut W,
    what: &str,
    within: Duration,
    every: Duration,
    mut ready: impl FnMut(&W) -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if ready(watched)? {
            return Ok(());
        }
        if let Some(why) = watched.died() {
            // What it wrote before it ended is all there is.
            if ready(watched)? {
                return Ok(());
            }
            bail!("waiting for {what}: {why}");
        }
        if Instant::now() >= deadline {
            bail!(
                "gave up waiting {within:?} for {what}\n  {}",
                watched.log_tails()
            );
        }
        std::thread::sleep(every);
    }
}

/// A check that the KV service at `service` answers: a read of a key that
/// nobody writes, each try waiting a second at most.
pub(crate) fn answers(service: SocketAddr) -> Result<impl FnMut() -> bool> {
    let config = ClientConfig {
        attempt_timeout: Duration::from_millis(200),
        max_attempts: 5,
    };
    let mut client = KvClient::connect(service, config).context("cannot create a KV client")?;
    Ok(move || client.get(b"ftvm-ready").is_ok())
}

pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "ended".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described() {
        assert_eq!(describe_exit(ExitStatus::from_raw(4 << 8)), "exit code 4");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
