//! `ftvm chaos`: the seeded fault campaign of `ftvm_harness::chaos`; exit
//! 0 only if every trial passed.

use std::process::ExitCode;

use anyhow::{anyhow, Result};
use ftvm_harness::chaos::{self, ChaosArgs};

use crate::exit_codes;

pub fn run(args: &ChaosArgs) -> Result<ExitCode> {
    match chaos::run(args).map_err(|e| anyhow!(e))? {
        Some(report) if report.failed > 0 => Ok(ExitCode::from(exit_codes::FAILURE)),
        _ => Ok(ExitCode::SUCCESS),
    }
}
