//! Recording a guest under a client load and replaying its log, with the
//! console and the reply frames captured both times, for the tests that
//! compare a replay with its recording.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ftvm_core::host::capture::read_frames;
use ftvm_core::machine::workload::Workload;
use ftvm_harness::launcher::{Role, ServerConfig};

use crate::{free_udp, ftvm, launcher, stop, VMM_TIME_LIMIT};

pub struct Recorded {
    pub log: PathBuf,
    pub console: String,
    pub frames: Vec<Vec<u8>>,
}

/// Records `workload`, a KV service, into `dir` while `load` runs against
/// it, then stops it with SIGTERM (which must close the log cleanly).
pub fn record_under_load(
    dir: &Path,
    workload: Workload,
    load: impl FnOnce(SocketAddr),
) -> Recorded {
    let log = dir.join(format!("{}.log", workload.name()));
    let pcap = dir.join(format!("{}.pcap", workload.name()));
    let mut config = ServerConfig::new(
        "record",
        Role::Record { log: log.clone() },
        free_udp(),
        VMM_TIME_LIMIT,
    );
    config.guest.workload = Some(workload);
    config.console = true;
    config.extra = [
        "--capture",
        &pcap.to_string_lossy(),
        "--digest-interval",
        "256",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let mut vmm = launcher()
        .start(&config)
        .unwrap_or_else(|e| panic!("{e:#}"));
    vmm.wait_console("ftvm-guest: kv service ready", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    load(config.address);
    let (status, stderr) = stop(&mut vmm);
    assert!(status.success(), "record failed: {stderr}");
    Recorded {
        log,
        console: vmm.console(),
        frames: read_frames(&std::fs::read(&pcap).expect("pcap")).expect("parse pcap"),
    }
}

/// How a replay ended, and what it printed and sent; a console or frames
/// it did not get to write are empty.
pub struct Replayed {
    pub code: Option<i32>,
    pub stderr: String,
    pub console: String,
    pub frames: Vec<Vec<u8>>,
}

impl Replayed {
    /// Checks that this replay reproduced a recording that printed
    /// `console` and sent `frames`: it ended well, every digest and output
    /// matched, and the console and the reply frames are the same byte for
    /// byte.
    pub fn assert_reproduces(&self, console: &str, frames: &[Vec<u8>]) {
        assert_eq!(self.code, Some(0), "replay failed:\n{}", self.stderr);
        assert!(
            self.stderr.contains("every digest and output matched"),
            "{}",
            self.stderr
        );
        assert_eq!(self.console, console, "console output must be identical");
        assert_eq!(
            self.frames.len(),
            frames.len(),
            "same number of reply frames"
        );
        assert!(
            self.frames == frames,
            "reply frames must be identical byte for byte"
        );
    }
}

/// `ftvm replay` of `log` with `extra` arguments, which stops itself after
/// a minute.
pub fn replay(log: &Path, extra: &[&str]) -> Replayed {
    replay_within(log, "60", Duration::from_secs(90), extra)
}

/// `ftvm replay` of `log` with `extra` arguments, which stops itself after
/// `timeout` seconds and is killed after `limit`.
pub fn replay_within(log: &Path, timeout: &str, limit: Duration, extra: &[&str]) -> Replayed {
    let dir = tempfile::tempdir().expect("dir");
    let serial = dir.path().join("console.txt");
    let pcap = dir.path().join("replay.pcap");
    let (log, serial_s, pcap_s) = (
        log.to_string_lossy(),
        serial.to_string_lossy(),
        pcap.to_string_lossy(),
    );
    let mut args = vec![
        "replay",
        &*log,
        "--serial",
        &*serial_s,
        "--capture",
        &*pcap_s,
        "--timeout",
        timeout,
    ];
    args.extend_from_slice(extra);
    let out = ftvm(&args, limit);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    Replayed {
        code: out.status.code(),
        stderr,
        console: std::fs::read_to_string(&serial).unwrap_or_default(),
        frames: std::fs::read(&pcap)
            .ok()
            .and_then(|b| read_frames(&b).ok())
            .unwrap_or_default(),
    }
}
