//! A fault-tolerant pair as a user runs it: an arbiter, a primary and a
//! backup, each a real `ftvm` process on loopback with its own events file,
//! all killed when the test ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::proxy::Proxy;
use crate::{free_udp_addr, ftvm_bin, VMM_TIME_LIMIT_SECS};

pub const VM_ID: &str = "test-vm";

pub struct Server {
    pub name: String,
    pub child: Child,
    pub events: PathBuf,
    pub service: SocketAddr,
    stderr: PathBuf,
}

impl Server {
    /// The events this server has written so far.
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn has_event(&self, event: &str) -> bool {
        self.events().iter().any(|e| e["event"] == event)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for `event` in the events file; panics with the server's
    /// stderr if it does not come.
    pub fn wait_event(&mut self, event: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| e["event"] == event) {
                return e;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not report `{event}` within {within:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {within:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> (Child, PathBuf) {
    let stderr = dir.join(format!("{name}.stderr"));
    let child = Command::new(ftvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("spawn ftvm");
    (child, stderr)
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub arbiter_addr: SocketAddr,
    pub arbiter: Option<Server>,
    pub primary: Server,
    pub backup: Server,
    pub proxy: Option<Proxy>,
}

#[derive(Default)]
pub struct ClusterOptions {
    /// Route the log channel through a proxy the test can partition.
    pub proxy: bool,
    pub failure_timeout_ms: Option<u64>,
    /// Extra arguments for the backup (a different image, memory size).
    pub backup_args: Vec<String>,
}

fn free_tcp_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl Cluster {
    pub fn start_arbiter(dir: &Path, addr: SocketAddr) -> Server {
        let state = dir.join("arbiter-state");
        let args = vec![
            "arbiter".to_string(),
            "--listen".into(),
            addr.to_string(),
            "--state".into(),
            state.to_string_lossy().into_owned(),
        ];
        let (child, stderr) = spawn(dir, "arbiter", &args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the arbiter did not start listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Server {
            name: "arbiter".into(),
            child,
            events: dir.join("arbiter.events"),
            service: addr,
            stderr,
        }
    }

    fn server_args(
        dir: &Path,
        arbiter_addr: SocketAddr,
        role: &str,
        service: SocketAddr,
        events: &Path,
        failure_ms: u64,
    ) -> Vec<String> {
        vec![
            role.to_string(),
            "--vm-id".into(),
            VM_ID.into(),
            "--id".into(),
            role.into(),
            "--arbiter".into(),
            arbiter_addr.to_string(),
            "--service".into(),
            service.to_string(),
            "--events".into(),
            events.to_string_lossy().into_owned(),
            "--serial".into(),
            dir.join(format!("{role}.console"))
                .to_string_lossy()
                .into_owned(),
            "--failure-timeout-ms".into(),
            failure_ms.to_string(),
            "--timeout".into(),
            VMM_TIME_LIMIT_SECS.to_string(),
        ]
    }

    /// Starts the arbiter, the primary and the backup, and returns once
    /// the primary reports the backup connected (fault tolerance on).
    pub fn start(options: ClusterOptions) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let arbiter_addr = free_tcp_addr();
        let arbiter = Cluster::start_arbiter(dir.path(), arbiter_addr);
        let failure_ms = options.failure_timeout_ms.unwrap_or(300);
        let log_listen = free_tcp_addr();
        let proxy = options.proxy.then(|| Proxy::start(log_listen));
        let p_service = free_udp_addr();
        let p_events = dir.path().join("primary.events");
        let mut p_args = Cluster::server_args(
            dir.path(),
            arbiter_addr,
            "primary",
            p_service,
            &p_events,
            failure_ms,
        );
        p_args.extend(["--log-listen".into(), log_listen.to_string()]);
        if let Some(proxy) = &proxy {
            p_args.extend(["--log-advertise".into(), proxy.addr().to_string()]);
        }
        let (child, stderr) = spawn(dir.path(), "primary", &p_args);
        let mut primary = Server {
            name: "primary".into(),
            child,
            events: p_events,
            service: p_service,
            stderr,
        };
        primary.wait_event("role", Duration::from_secs(30));
        let b_service = free_udp_addr();
        let b_events = dir.path().join("backup.events");
        let mut b_args = Cluster::server_args(
            dir.path(),
            arbiter_addr,
            "backup",
            b_service,
            &b_events,
            failure_ms,
        );
        b_args.extend(options.backup_args.iter().cloned());
        let (child, stderr) = spawn(dir.path(), "backup", &b_args);
        let backup = Server {
            name: "backup".into(),
            child,
            events: b_events,
            service: b_service,
            stderr,
        };
        Cluster {
            dir,
            arbiter_addr,
            arbiter: Some(arbiter),
            primary,
            backup,
            proxy,
        }
    }

    /// Waits until the primary runs with its backup connected.
    pub fn wait_fault_tolerant(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .primary
                .events()
                .iter()
                .any(|e| e["event"] == "role" && e["backup"].is_string())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the pair never became fault tolerant\nprimary:\n{}\nbackup:\n{}",
                self.primary.stderr(),
                self.backup.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every (view, server) that claimed to be primary, from all events.
    pub fn primaries_by_view(&self) -> Vec<(u64, String)> {
        let mut claims = Vec::new();
        for s in [&self.primary, &self.backup] {
            for e in s.events() {
                let primary_role = e["event"] == "role" && e["role"] == "primary";
                if primary_role || e["event"] == "live" {
                    if let Some(v) = e["view"].as_u64() {
                        claims.push((v, s.name.clone()));
                    }
                }
            }
        }
        claims.sort();
        claims.dedup();
        claims
    }

    /// Asserts that no view ever had two primaries.
    pub fn assert_one_primary_per_view(&self) {
        let claims = self.primaries_by_view();
        for w in claims.windows(2) {
            assert!(
                w[0].0 != w[1].0,
                "view {} had two primaries: {claims:?}",
                w[0].0
            );
        }
    }
}
