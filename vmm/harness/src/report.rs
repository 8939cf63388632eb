//! Where the benchmarks write their results for BENCHMARKS.md.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Writes `report` as pretty JSON to `path`, if there is one.
pub fn write_json(path: Option<&Path>, report: &impl Serialize) -> Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let json = serde_json::to_string_pretty(report).context("cannot encode the results")?;
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}
