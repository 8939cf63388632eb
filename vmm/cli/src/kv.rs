//! `ftvm kv`: one request to the guest's KV service from the command line.
//!
//! Exit codes: 0 on success, 1 when `get` finds no such key, 2 on any error
//! (with one line on stderr starting with `ftvm kv: `); see `exit_codes`.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use arbiter::ArbiterAddr;
use ftvm_kvclient::{FailoverClient, FailoverConfig, FailoverError, ServerSource, DEFAULT_VM_ID};

use crate::exit_codes::{KV_ERROR, KV_NOT_FOUND, KV_OK};

/// Talk to the guest's key-value service.
#[derive(Debug, Clone, clap::Args)]
#[command(group(
    clap::ArgGroup::new("target")
        .required(true)
        .args(["server", "arbiter"])
))]
pub struct KvArgs {
    /// Address of the guest's KV service, as given to `ftvm run --service`.
    #[arg(long, value_name = "HOST:PORT")]
    pub server: Option<SocketAddr>,
    /// The arbiter (`HOST:PORT`, or `etcd://HOST:PORT[,...][/PREFIX]` for
    /// etcd): ask it for the primary's service address, and ask again when
    /// the primary does not answer (after a failover, the request is
    /// retried at the new primary under the same number, so it is executed
    /// once).
    #[arg(long, value_name = "ADDR")]
    pub arbiter: Option<ArbiterAddr>,
    /// The VM to ask the arbiter about (with `--arbiter` only).
    // `requires = "arbiter"` is not enforced once the group is satisfied,
    // so the other member is excluded instead.
    #[arg(long, value_name = "ID", default_value = DEFAULT_VM_ID, conflicts_with = "server")]
    pub vm_id: String,
    /// Give up after this long without a reply, over all resends (and with
    /// `--arbiter`, all queries and failovers): seconds ("2.5") or with a
    /// unit ("500ms", "5s").
    #[arg(long, default_value = "5s", value_parser = parse_timeout)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub cmd: KvCommand,
}

impl KvArgs {
    /// Where requests go: `--server`, or the primary `--arbiter` names.
    pub fn source(&self) -> ServerSource {
        match (self.server, &self.arbiter) {
            (_, Some(addr)) => ServerSource::arbiter_at(addr.clone(), self.vm_id.clone()),
            (Some(addr), None) => ServerSource::Fixed(addr),
            // clap requires one of them; a hand-built KvArgs without either
            // has nowhere to send to but the unspecified address, which
            // fails with a socket error naming it.
            (None, None) => ServerSource::Fixed(SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KvCommand {
    /// Print the value of KEY (exit status 1 if there is none).
    Get {
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Set KEY to VALUE.
    Put {
        #[arg(allow_hyphen_values = true)]
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// Append VALUE to the value of KEY (a missing key counts as empty).
    Append {
        #[arg(allow_hyphen_values = true)]
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// Have the guest draw N times (1..=10000) from each of its sources of
    /// nondeterminism; prints their 64-bit mix in hex.
    Entropy { n: u32 },
}

/// Runs `ftvm kv` and returns the process exit code.
pub fn run(args: &KvArgs) -> ExitCode {
    ExitCode::from(run_with(
        args,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    ))
}

enum Outcome {
    Print(Vec<u8>),
    Silent,
    NotFound,
}

fn run_with(args: &KvArgs, out: &mut impl Write, err: &mut impl Write) -> u8 {
    // Nothing useful can be done when stderr itself fails, hence the `let _`.
    match execute(args) {
        Ok(Outcome::Print(mut bytes)) => {
            bytes.push(b'\n');
            match out.write_all(&bytes).and_then(|()| out.flush()) {
                Ok(()) => KV_OK,
                Err(e) => {
                    let _ = writeln!(err, "ftvm kv: cannot write to stdout: {e}");
                    KV_ERROR
                }
            }
        }
        Ok(Outcome::Silent) => KV_OK,
        Ok(Outcome::NotFound) => {
            let _ = writeln!(err, "not found");
            KV_NOT_FOUND
        }
        Err(e) => {
            let _ = writeln!(err, "ftvm kv: {e}");
            KV_ERROR
        }
    }
}

fn execute(args: &KvArgs) -> Result<Outcome, FailoverError> {
    // With `--arbiter`, the client asks the arbiter for the primary and, when
    // a round goes unanswered, asks again and repeats the same call, which
    // keeps the request number: a request the old primary executed is not
    // executed twice. `--timeout` bounds all the rounds together.
    let config = FailoverConfig::with_total_timeout(args.timeout);
    let mut client = FailoverClient::new(args.source(), config)?;
    Ok(match &args.cmd {
        KvCommand::Get { key } => match client.get(key.as_bytes())? {
            Some(value) => Outcome::Print(value),
            None => Outcome::NotFound,
        },
        KvCommand::Put { key, value } => {
            client.put(key.as_bytes(), value.as_bytes())?;
            Outcome::Silent
        }
        KvCommand::Append { key, value } => {
            client.append(key.as_bytes(), value.as_bytes())?;
            Outcome::Silent
        }
        KvCommand::Entropy { n } => {
            Outcome::Print(format!("{:016x}", client.entropy(*n)?).into_bytes())
        }
    })
}

/// Seconds as a float, or a number followed by `ms` or `s`: enough for a
/// timeout without pulling in a duration-parsing crate.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!("invalid duration {text:?}: expected seconds (\"2.5\") or a number with ms or s (\"500ms\", \"5s\")")
    };
    let (number, unit_secs) = match text.strip_suffix("ms") {
        Some(number) => (number, 1e-3),
        None => (text.strip_suffix('s').unwrap_or(text), 1.0),
    };
    let number: f64 = number.trim().parse().map_err(|_| invalid())?;
    let duration = Duration::try_from_secs_f64(number * unit_secs).map_err(|_| invalid())?;
    if duration.is_zero() {
        return Err(format!(
            "invalid duration {text:?}: must be greater than zero"
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use ftvm_kvclient::fake_server::{member, Behavior, FakeServer, TestArbiter};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        kv: KvArgs,
    }

    fn parse(argv: &[&str]) -> Result<KvArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("kv").chain(argv.iter().copied())).map(|cli| cli.kv)
    }

    /// Runs `ftvm kv ARGV` and returns (exit code, stdout, stderr).
    fn kv(server: SocketAddr, argv: &[&str]) -> (u8, Vec<u8>, String) {
        kv_to(&["--server", &server.to_string()], argv)
    }

    /// Runs `ftvm kv TARGET --timeout 0.3 ARGV`.
    fn kv_to(target: &[&str], argv: &[&str]) -> (u8, Vec<u8>, String) {
        let mut full = target.to_vec();
        full.extend_from_slice(&["--timeout", "0.3"]);
        full.extend_from_slice(argv);
        let args = parse(&full).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_with(&args, &mut out, &mut err);
        (code, out, String::from_utf8(err).unwrap())
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_arguments() {
        let args = parse(&["--server", "127.0.0.1:7000", "put", "k", "-1"]).unwrap();
        assert_eq!(
            args.source(),
            ServerSource::Fixed("127.0.0.1:7000".parse().unwrap())
        );
        assert_eq!(args.timeout, Duration::from_secs(5));
        assert!(matches!(&args.cmd, KvCommand::Put { key, value } if key == "k" && value == "-1"));

        let args = parse(&[
            "--server",
            "[::1]:7000",
            "--timeout",
            "500ms",
            "entropy",
            "3",
        ])
        .unwrap();
        assert_eq!(args.timeout, Duration::from_millis(500));
        assert!(matches!(args.cmd, KvCommand::Entropy { n: 3 }));

        assert!(parse(&["--server", "localhost", "get", "k"]).is_err());
        assert!(parse(&["--server", "127.0.0.1:7000", "--timeout", "0", "get", "k"]).is_err());
        assert!(parse(&["--server", "127.0.0.1:7000"]).is_err());
    }

    #[test]
    fn parses_the_arbiter_options() {
        let args = parse(&["--arbiter", "127.0.0.1:7100", "get", "k"]).unwrap();
        assert_eq!(
            args.source(),
            ServerSource::arbiter("127.0.0.1:7100".parse().unwrap(), "ftvm")
        );
        let args = parse(&["--arbiter", "[::1]:7100", "--vm-id", "vm1", "get", "k"]).unwrap();
        assert_eq!(
            args.source(),
            ServerSource::arbiter("[::1]:7100".parse().unwrap(), "vm1")
        );
        let etcd = "etcd://127.0.0.1:2379,etcd-b:2379/prod";
        let args = parse(&["--arbiter", etcd, "get", "k"]).unwrap();
        assert_eq!(
            args.source(),
            ServerSource::arbiter_at(etcd.parse().unwrap(), "ftvm")
        );
        // Exactly one of --server and --arbiter; --vm-id only with --arbiter.
        for argv in [
            &[
                "--server",
                "127.0.0.1:7000",
                "--arbiter",
                "127.0.0.1:7100",
                "get",
                "k",
            ][..],
            &["get", "k"],
            &["--vm-id", "vm1", "get", "k"],
            &["--server", "127.0.0.1:7000", "--vm-id", "vm1", "get", "k"],
            &["--arbiter", "localhost:7100", "get", "k"],
            &["--arbiter", "etcd://127.0.0.1", "get", "k"],
        ] {
            assert!(parse(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn timeout_syntax() {
        assert_eq!(parse_timeout("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("0.5 s"), Ok(Duration::from_millis(500)));
        for bad in ["", "s", "ms", "5m", "-1", "nan", "inf", "1e300", "0ms"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn get_put_append() {
        let server = FakeServer::start(Behavior::default());
        let addr = server.addr();
        assert_eq!(kv(addr, &["get", "k"]), (1, vec![], "not found\n".into()));
        assert_eq!(kv(addr, &["put", "k", "héllo"]), (0, vec![], String::new()));
        assert_eq!(
            kv(addr, &["append", "k", " world"]),
            (0, vec![], String::new())
        );
        assert_eq!(
            kv(addr, &["get", "k"]),
            (0, "héllo world\n".as_bytes().to_vec(), String::new())
        );
    }

    #[test]
    fn entropy_prints_hex() {
        let server = FakeServer::start(Behavior::default());
        let (code, out, err) = kv(server.addr(), &["entropy", "10"]);
        assert_eq!((code, err.as_str()), (0, ""));
        let out = String::from_utf8(out).unwrap();
        assert!(out.len() == 17 && out.ends_with('\n'), "{out:?}");
        assert!(u64::from_str_radix(out.trim_end(), 16).is_ok(), "{out:?}");
    }

    #[test]
    fn errors_are_one_line_on_stderr() {
        let server = FakeServer::start(Behavior {
            drop_requests: usize::MAX,
            ..Behavior::default()
        });
        let (code, out, err) = kv(server.addr(), &["get", "k"]);
        assert_eq!((code, out), (2, vec![]));
        // The elapsed time is measured, so only its form is certain.
        let prefix = format!("ftvm kv: no reply from {} after 1 attempt (", server.addr());
        assert!(
            err.starts_with(&prefix) && err.ends_with(" s)\n"),
            "{err:?}"
        );
        assert_eq!(err.lines().count(), 1);

        let (code, _, err) = kv(server.addr(), &["entropy", "0"]);
        assert_eq!(code, 2);
        assert_eq!(
            err,
            "ftvm kv: invalid request: entropy round count 0 at offset 31 out of range 1..=10000\n"
        );
    }

    #[test]
    fn get_put_append_through_the_arbiter() {
        let arbiter = TestArbiter::start();
        let (a, b) = (
            FakeServer::start(Behavior::default()),
            FakeServer::start(Behavior::default()),
        );
        let view = arbiter.register(DEFAULT_VM_ID, &member("a", &a), &member("b", &b));
        let target = arbiter.addr().to_string();
        let target = ["--arbiter", target.as_str()];
        assert_eq!(
            kv_to(&target, &["put", "k", "v"]),
            (0, vec![], String::new())
        );
        assert_eq!(
            kv_to(&target, &["get", "k"]),
            (0, b"v\n".to_vec(), String::new())
        );
        assert_eq!(a.stop().len(), 2);

        // After a failover, the next command goes to the new primary.
        arbiter.fail_over(DEFAULT_VM_ID, &view);
        assert_eq!(
            kv_to(&target, &["get", "k"]),
            (1, vec![], "not found\n".into())
        );
        assert_eq!(
            kv_to(&target, &["append", "k", "w"]),
            (0, vec![], String::new())
        );
        assert_eq!(
            kv_to(&target, &["get", "k"]),
            (0, b"w\n".to_vec(), String::new())
        );
        let (code, out, err) = kv_to(&target, &["entropy", "5"]);
        assert_eq!((code, out.len(), err.as_str()), (0, 17, ""));
        assert_eq!(b.stop().len(), 4);

        // Another VM has no primary.
        let (code, out, err) = kv_to(&[target[0], target[1], "--vm-id", "other"], &["get", "k"]);
        assert_eq!((code, out), (2, vec![]));
        let prefix = format!(
            "ftvm kv: the arbiter at {} names no primary for VM \"other\" (view 0) after ",
            arbiter.addr()
        );
        assert!(
            err.starts_with(&prefix) && err.lines().count() == 1,
            "{err:?}"
        );
    }

    #[test]
    fn an_unreachable_arbiter_is_one_line_on_stderr() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let started = std::time::Instant::now();
        let (code, out, err) = kv_to(&["--arbiter", &addr.to_string()], &["put", "k", "v"]);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!((code, out), (2, vec![]));
        let prefix = format!(
            "ftvm kv: cannot learn the primary of VM \"ftvm\" from the arbiter at {addr}: unreachable: "
        );
        assert!(
            err.starts_with(&prefix) && err.ends_with(" s)\n"),
            "{err:?}"
        );
        assert_eq!(err.lines().count(), 1);
    }
}
