//! Support for the end-to-end tests: real `ftvm` processes on loopback,
//! each with a time limit, killed if a test fails half-way.

pub mod cluster;
pub mod proxy;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Every guest run by a test stops by itself after this long at most.
pub const VMM_TIME_LIMIT_SECS: u64 = 120;

/// The `ftvm` binary that `cargo test` built beside this test (the vmm
/// package has integration tests, so cargo builds its binary first), or
/// `FTVM_BIN`.
pub fn ftvm_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("FTVM_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let bin = profile_dir.join("ftvm");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds it) or set FTVM_BIN",
        bin.display()
    );
    bin
}

/// Whether KVM tests run here. Without /dev/kvm they fail loudly, unless
/// FTVM_SKIP_KVM_TESTS=1 says explicitly to skip them.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("FTVM_SKIP_KVM_TESTS").as_deref() == Ok("1") {
                eprintln!("skipped: /dev/kvm is not usable ({e}) and FTVM_SKIP_KVM_TESTS=1");
                false
            } else {
                panic!("/dev/kvm is not usable ({e}); set FTVM_SKIP_KVM_TESTS=1 to skip the KVM tests explicitly");
            }
        }
    }
}

/// Guests compete for this machine's two cores; tests that boot one take
/// turns so that their clients' timeouts measure the guest, not the queue.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn free_udp_addr() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral port");
    s.local_addr().expect("local addr")
}

/// A running `ftvm run`.
pub struct Vmm {
    pub child: Child,
    pub service: SocketAddr,
    pub serial: PathBuf,
    pub stats: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vmm {
    /// Starts `ftvm run` with the embedded guest and waits for the guest's
    /// "kv service ready" line on its console.
    pub fn start(extra: &[&str]) -> Vmm {
        Vmm::start_command("run", extra)
    }

    /// Like [`Vmm::start`] with another command that serves the guest
    /// (`record`).
    pub fn start_command(command: &str, extra: &[&str]) -> Vmm {
        let dir = tempfile::tempdir().expect("temp dir");
        let service = free_udp_addr();
        let serial = dir.path().join("console.txt");
        let stats = dir.path().join("stats.json");
        let child = Command::new(ftvm_bin())
            .arg(command)
            .arg("--service")
            .arg(service.to_string())
            .arg("--serial")
            .arg(&serial)
            .arg("--stats-json")
            .arg(&stats)
            .arg("--timeout")
            .arg(VMM_TIME_LIMIT_SECS.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvm run");
        let mut vmm = Vmm {
            child,
            service,
            serial,
            stats,
            _dir: dir,
        };
        vmm.wait_console("ftvm-guest: kv service ready", Duration::from_secs(30));
        vmm
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits for `needle` on the console; panics with the console and the
    /// VMM's stderr if it does not appear in time or the VMM dies.
    pub fn wait_console(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.console().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!(
                    "ftvm run exited ({status}) before `{needle}` appeared\nconsole:\n{}\nstderr:\n{err}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "`{needle}` did not appear within {within:?}; console:\n{}",
            self.console()
        );
    }

    /// SIGTERM and wait; returns the exit status and stderr.
    pub fn stop(self) -> (std::process::ExitStatus, String) {
        let (status, stderr, _) = self.stop_with_console();
        (status, stderr)
    }

    /// SIGTERM and wait; returns the exit status, stderr and the whole
    /// console, read after the VMM has written its last line.
    pub fn stop_with_console(mut self) -> (std::process::ExitStatus, String, String) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    panic!("ftvm run did not stop within 15 s of SIGTERM");
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (status, err, self.console())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `ftvm` with `args` to completion, killed after `limit`. Its output
/// is read while it runs, so that a full pipe cannot stall it.
pub fn ftvm(args: &[&str], limit: Duration) -> Output {
    use std::io::Read;
    let mut child = Command::new(ftvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            _ if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let out = stdout.join().unwrap_or_default();
                let err = stderr.join().unwrap_or_default();
                panic!(
                    "ftvm {args:?} ran longer than {limit:?}\nstdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                );
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}
