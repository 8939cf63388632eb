//! `ftvm log dump` and `ftvm log load`: a log as text, and back.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use logchannel::{LogReader, LogWriter};

#[derive(Subcommand)]
pub enum LogCommand {
    /// List a log, one entry a line (`--json`: JSON lines, header first).
    Dump {
        log: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Turn JSON lines (as `dump --json` writes them) back into a log.
    Load {
        jsonl: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub fn run(command: &LogCommand) -> Result<ExitCode> {
    match command {
        LogCommand::Dump { log, json } => dump(log, *json),
        LogCommand::Load { jsonl, output } => load(jsonl, output),
    }
}

pub fn open_log(path: &Path) -> Result<LogReader<BufReader<File>>> {
    let file =
        File::open(path).with_context(|| format!("cannot open the log {}", path.display()))?;
    LogReader::new(BufReader::with_capacity(1 << 16, file))
        .with_context(|| path.display().to_string())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const WRITING_FAILED: &str = "writing the listing failed";

fn dump(path: &Path, json: bool) -> Result<ExitCode> {
    let mut reader = open_log(path)?;
    let header = reader.header().clone();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if json {
        let mut entries = Vec::new();
        let mut failure = None;
        for entry in reader.by_ref() {
            match entry {
                Ok(e) => entries.push(e),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        logchannel::to_json_lines(&mut out, &header, &entries)?;
        out.flush().context(WRITING_FAILED)?;
        if let Some(e) = failure {
            return Err(e).with_context(|| path.display().to_string());
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "log {}: format {}, vm {}, image sha256 {}, memory {} bytes, digest every {} exits, tick {} Hz, patching {}",
        path.display(),
        header.format_version,
        header.vm_id,
        hex(&header.guest_image_hash),
        header.mem_size,
        header.config.digest_interval,
        header.config.tick_hz,
        header.config.patching
    )
    .context(WRITING_FAILED)?;
    for entry in reader.by_ref() {
        match entry {
            Ok(e) => writeln!(out, "{e}").context(WRITING_FAILED)?,
            Err(e) => {
                out.flush().context(WRITING_FAILED)?;
                return Err(e).with_context(|| path.display().to_string());
            }
        }
    }
    writeln!(out, "{}", reader.stats()).context(WRITING_FAILED)?;
    out.flush().context(WRITING_FAILED)?;
    Ok(ExitCode::SUCCESS)
}

fn load(jsonl: &Path, output: &Path) -> Result<ExitCode> {
    let file = File::open(jsonl).with_context(|| format!("cannot open {}", jsonl.display()))?;
    let (header, entries) = logchannel::from_json_lines(BufReader::new(file))
        .with_context(|| jsonl.display().to_string())?;
    let out =
        File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    let mut writer = LogWriter::new(BufWriter::new(out), &header)?;
    let mut count = 0u64;
    for entry in entries {
        let entry = entry.with_context(|| jsonl.display().to_string())?;
        writer
            .append_entry(&entry)
            .with_context(|| format!("{}: entry #{}", jsonl.display(), entry.seq))?;
        count += 1;
    }
    let mut out = writer.into_inner()?;
    out.flush()
        .with_context(|| format!("writing {} failed", output.display()))?;
    eprintln!(
        "ftvm log load: {count} entries written to {}",
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}
