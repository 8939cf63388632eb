//! What several commands take: the guest to boot and where its console and
//! frames go, and the checks their common flags need.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ftvm_core::devices::pit::PIT_FREQ_HZ;
use ftvm_core::host::capture::Capture;
use ftvm_core::machine::guest_image::GUEST_ELF;
use ftvm_core::machine::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE};
use ftvm_core::machine::memory::parse_size;
use ftvm_core::machine::workload::Workload;

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
    /// The workload `--workload` names, or the default: `kv-user` for the
    /// embedded guest, and for an image of one's own (`--kernel`) `kv`,
    /// whose conventions (patch sites become `hlt`, a replay stops the
    /// guest with `hlt`) need no handler of the embedded guest's.
    pub fn workload(&self, chosen: Option<Workload>) -> Workload {
        match (chosen, &self.kernel) {
            (Some(w), _) => w,
            (None, Some(_)) => Workload::Kv,
            (None, None) => Workload::KvUser,
        }
    }

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

/// `--mem`: a size (K, M, G or T suffix) within what a guest can have, so
/// that a size out of range is named as such before anything is loaded.
pub fn parse_mem(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bytes = match t.strip_suffix(['T', 't']) {
        Some(tib) => tib
            .parse::<u64>()
            .map_err(|_| format!("`{text}` is not a size (examples: 64M, 1G, 1048576)"))?
            .saturating_mul(1 << 40),
        None => parse_size(t)?,
    };
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&bytes) || !bytes.is_multiple_of(4096) {
        return Err(format!(
            "`{text}` ({bytes} bytes) is out of range: guest memory is {} MiB to {} GiB, a multiple of 4 KiB",
            MIN_MEM_SIZE >> 20,
            MAX_MEM_SIZE >> 30
        ));
    }
    Ok(bytes)
}

/// The guest programs PIT channel 0 with the divisor `1193182 / tick_hz`
/// (docs/guest-abi.md), which must be 2 to 65535: mode 2 needs at least 2,
/// and the counter has 16 bits.
const MIN_TICK_HZ: u64 = PIT_FREQ_HZ / 0x1_0000 + 1;
const MAX_TICK_HZ: u64 = PIT_FREQ_HZ / 2;

/// `--tick-hz`: a rate the guest can program (19 to 596591 Hz), so that
/// one it cannot is refused here rather than by the guest at boot.
pub fn parse_tick_hz(text: &str) -> Result<u32, String> {
    let hz: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of ticks per second"))?;
    if !(MIN_TICK_HZ..=MAX_TICK_HZ).contains(&u64::from(hz)) {
        return Err(format!(
            "{hz} Hz is out of range: the guest programs the PIT with the divisor {PIT_FREQ_HZ} / tick_hz, \
             which must be 2 to 65535, so tick_hz is {MIN_TICK_HZ} to {MAX_TICK_HZ} (docs/guest-abi.md)"
        ));
    }
    Ok(hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_out_of_range_are_named_as_such() {
        for bad in ["0", "1K", "1M", "1T", "4G", "3145729K"] {
            let err = parse_mem(bad).expect_err(bad);
            assert!(err.contains("out of range"), "{bad}: {err}");
        }
        assert!(parse_mem("lots").expect_err("lots").contains("not a size"));
        assert!(parse_mem("xT").expect_err("xT").contains("not a size"));
        assert_eq!(parse_mem("2M"), Ok(2 << 20));
        assert_eq!(parse_mem("64M"), Ok(64 << 20));
        assert_eq!(parse_mem("3G"), Ok(3 << 30));
    }

    #[test]
    fn tick_rates_the_guest_cannot_program_are_refused() {
        for bad in ["0", "18", "596592", "1000000"] {
            let err = parse_tick_hz(bad).expect_err(bad);
            assert!(err.contains("out of range"), "{bad}: {err}");
        }
        assert!(parse_tick_hz("-1").is_err());
        for good in ["19", "100", "1000", "596591"] {
            assert!(parse_tick_hz(good).is_ok(), "{good}");
        }
    }
}
