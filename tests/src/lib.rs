//! What the end-to-end tests need beyond the harness's launcher
//! ([`ftvm_harness::launcher`]): where the `ftvm` binary is, whether KVM is
//! usable, turns at the machine's cores, and panicking shorthands.

pub mod load;
pub mod record_replay;
pub mod tamper;
pub mod transfer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ftvm_harness::launcher::{
    free_udp_addr, Cluster, ClusterConfig, Launcher, Process, Role, ServerConfig,
};

/// Every guest run by a test stops by itself after this long at most.
pub const VMM_TIME_LIMIT: Duration = Duration::from_secs(120);

/// The VM a test's pair runs, at its arbiter.
pub const VM_ID: &str = "test-vm";

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

pub fn launcher() -> Launcher {
    Launcher::new(ftvm_bin())
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

pub fn free_udp() -> SocketAddr {
    free_udp_addr().expect("a free UDP port")
}

/// Runs `ftvm` with `args` to completion; panics if it runs past `limit`.
pub fn ftvm(args: &[&str], limit: Duration) -> Output {
    launcher()
        .run(args, limit)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Writes `jsonl` (`ftvm log dump --json` lines, edited) beside `log` and
/// turns it into the log `log` with `ftvm log load`, which must succeed.
pub fn load_log(jsonl: &str, log: &Path) {
    let path = log.with_extension("jsonl");
    std::fs::write(&path, jsonl).expect("write the JSON lines");
    let out = ftvm(
        &[
            "log",
            "load",
            &path.to_string_lossy(),
            "-o",
            &log.to_string_lossy(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `ftvm run` (or `record`, as `role` says) with the embedded guest,
/// its console, its counters and its output in a temporary directory, and
/// waits for the guest's "kv service ready" line on its console. Returns it
/// and its service address.
pub fn serve(role: Role, extra: &[&str]) -> (Process, SocketAddr) {
    let name = match role {
        Role::Record { .. } => "record",
        _ => "run",
    };
    let mut config = ServerConfig::new(name, role, free_udp(), VMM_TIME_LIMIT);
    config.console = true;
    config.stats = true;
    config.extra = extra.iter().map(Into::into).collect();
    let mut vmm = launcher()
        .start(&config)
        .unwrap_or_else(|e| panic!("{e:#}"));
    vmm.wait_console("ftvm-guest: kv service ready", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    (vmm, config.address)
}

/// SIGTERM and wait; returns the exit status and the output.
pub fn stop(vmm: &mut Process) -> (ExitStatus, String) {
    let status = vmm
        .stop(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}"));
    (status, vmm.log())
}

/// A test's pair: its VM, its time limit, and the rest as `config` says.
pub fn cluster_config() -> ClusterConfig {
    ClusterConfig::new(VM_ID, VMM_TIME_LIMIT)
}

/// Starts the arbiter, the primary and the backup (not yet fault
/// tolerant).
pub fn start_cluster(config: &ClusterConfig) -> Cluster {
    Cluster::start(&launcher(), config).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Starts a pair as `config` says and waits until it is fault tolerant.
pub fn fault_tolerant_cluster(config: &ClusterConfig) -> Cluster {
    let mut cluster = start_cluster(config);
    cluster
        .wait_fault_tolerant(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    cluster
}

/// Asserts that no view ever had two primaries.
pub fn assert_one_primary_per_view(cluster: &Cluster) {
    let primaries = cluster.events().primaries_per_view();
    assert!(
        primaries.values().all(|names| names.len() == 1),
        "a view had two primaries: {primaries:?}"
    );
}
