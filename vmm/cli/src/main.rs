//! `ftvm`: the one command a user needs.

mod arbiter;
mod args;
mod backup;
mod chaos;
mod exit_codes;
mod ft;
mod kv;
mod log;
mod primary;
mod replay;
mod run;
mod stop;

use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ftvm",
    version,
    about = "A fault-tolerant virtual machine on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and serve its clients (the embedded KV guest by default).
    Run(run::RunArgs),
    /// Like `run`, and write every nondeterministic input to a log.
    Record(run::RecordArgs),
    /// Run a guest from a log alone and check it reproduces the recording.
    Replay(replay::ReplayArgs),
    /// Inspect and edit logs.
    #[command(subcommand)]
    Log(log::LogCommand),
    /// Run the guest as the primary of a fault-tolerant pair.
    Primary(primary::PrimaryArgs),
    /// Follow a primary as its backup, and take over when it fails.
    Backup(backup::BackupArgs),
    /// The test-and-set and view service that primaries and backups use.
    Arbiter(::arbiter::cli::ArbiterArgs),
    /// Start an arbiter, a primary and a backup, SIGKILL the primary
    /// mid-load, and check that no acknowledged write was lost.
    Demo(ftvm_harness::demo::DemoArgs),
    /// Run a seeded fault campaign against whole clusters and check every
    /// trial: no acknowledged write lost, a linearizable history, one
    /// primary per view, no divergence, service again after the faults.
    Chaos(ftvm_harness::chaos::ChaosArgs),
    /// Talk to the guest's key-value service.
    Kv(kv::KvArgs),
    /// Measure throughput, latency and exit rates.
    Bench(ftvm_harness::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Record(args) => run::record(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Log(command) => log::run(&command),
        Command::Primary(args) => primary::run(&args),
        Command::Backup(args) => backup::run(&args),
        Command::Arbiter(args) => arbiter::run(&args),
        // `anyhow!(e)` takes the harness's error whether it is a message or
        // already an `anyhow::Error`.
        Command::Demo(args) => ftvm_harness::demo::run(&args)
            .map(|_| ExitCode::SUCCESS)
            .map_err(|e| anyhow!(e)),
        Command::Chaos(args) => chaos::run(&args),
        Command::Kv(args) => Ok(kv::run(&args)),
        Command::Bench(args) => ftvm_harness::bench::run(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| anyhow!(e)),
    };
    result.unwrap_or_else(|error| {
        eprintln!("ftvm: {}", message(&error));
        ExitCode::from(exit_codes::FAILURE)
    })
}

/// The error and its causes as `outer: inner`, like anyhow's `{:#}`, except
/// that a cause already quoted by the message above it is not repeated: the
/// library errors quote their source in their own message ("cannot open
/// /dev/kvm: {source}") and return it from `source()` as well.
fn message(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[derive(Debug)]
    struct Quoting(std::io::Error);

    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot open /dev/kvm: {}", self.0)
        }
    }

    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_is_printed_once() {
        let denied = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let quoted = anyhow::Error::new(Quoting(denied())).context("run");
        assert_eq!(
            message(&quoted),
            format!("run: cannot open /dev/kvm: {}", denied())
        );
        let plain = anyhow::Error::new(denied()).context("cannot read guest image x");
        assert_eq!(
            message(&plain),
            format!("cannot read guest image x: {}", denied())
        );
    }
}
