//! What several commands take: the guest to boot and where its console and
//! frames go, and the checks their common flags need.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ftvm_core::host::capture::Capture;
use ftvm_core::machine::guest_image::GUEST_ELF;

/// The VM id a log header and the arbiter know a guest by, unless told.
pub const VM_ID: &str = "ftvm";
pub const DEFAULT_DIGEST_INTERVAL: u64 = 4096;

#[derive(clap::Args)]
pub struct GuestArgs {
    /// Guest ELF image; the embedded guest when omitted.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The KVM device to use.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Write the frames the guest transmits to this pcap file.
    #[arg(long)]
    capture: Option<PathBuf>,
}

impl GuestArgs {
    pub fn image(&self) -> Result<Vec<u8>> {
        match &self.kernel {
            Some(path) => std::fs::read(path)
                .with_context(|| format!("cannot read guest image {}", path.display())),
            None => Ok(GUEST_ELF.to_vec()),
        }
    }

    pub fn console(&self) -> Result<Box<dyn Write + Send>> {
        Ok(match &self.serial {
            Some(path) => Box::new(
                File::create(path)
                    .with_context(|| format!("cannot create the serial file {}", path.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        })
    }

    pub fn capture(&self) -> Result<Option<Capture>> {
        self.capture
            .as_ref()
            .map(|p| {
                Capture::create(p)
                    .with_context(|| format!("cannot create the capture {}", p.display()))
            })
            .transpose()
    }
}

/// A `--timeout`-like flag as a duration; clap has already parsed the
/// number, this refuses the ones that make no sense as a wait.
pub fn seconds(arg: &str, value: Option<f64>) -> Result<Option<Duration>> {
    match value {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            bail!("{arg} {t} must be a positive number of seconds")
        }
        Some(t) => Ok(Some(Duration::from_secs_f64(t))),
        None => Ok(None),
    }
}
