//! `ftvm arbiter`: the command-line face of the server.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::server::{Server, ServerConfig};
use crate::ArbiterError;

/// Run the arbiter: test-and-set and view service for primary/backup VMs.
#[derive(clap::Args, Clone, Debug)]
pub struct ArbiterArgs {
    /// Address to listen on (port 0 picks a free one; the log names it).
    #[arg(long, default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Directory holding the arbiter's decisions; created if missing.
    /// Restarting with the same directory keeps every decision.
    #[arg(long)]
    pub state: PathBuf,
    /// How often servers are expected to ping, in milliseconds (at least 1).
    #[arg(long, default_value_t = 100, value_parser = at_least_one::<u64>)]
    pub ping_interval_ms: u64,
    /// A server that missed this many pings is dead to the arbiter: not
    /// named backup, and replaced as a backup its primary has not vouched
    /// for (at least 1).
    #[arg(long, default_value_t = 5, value_parser = at_least_one::<u32>)]
    pub dead_pings: u32,
    /// At most this many connections at once (at least 1); beyond it, the
    /// idlest is closed to make room, or the new one is refused `busy`.
    #[arg(long, default_value_t = ServerConfig::DEFAULT_MAX_CONNECTIONS, value_parser = at_least_one::<usize>)]
    pub max_connections: usize,
    /// A connection that sends no complete request for this long is
    /// closed, in milliseconds (at least 1).
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT_MS, value_parser = at_least_one::<u64>)]
    pub idle_timeout_ms: u64,
}

/// [`ServerConfig::DEFAULT_IDLE_TIMEOUT`] in the unit of the flag.
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 5_000;

/// Zero would make an arbiter that serves nobody (no connection, no time
/// to send a request) or never sees a server alive, and says nothing about
/// it: it is an error on the command line like any malformed value.
fn at_least_one<T>(text: &str) -> Result<T, String>
where
    T: FromStr + PartialOrd + From<u8>,
    T::Err: Display,
{
    let value: T = text.parse().map_err(|e| format!("{e}"))?;
    if value < T::from(1) {
        return Err("must be at least 1".into());
    }
    Ok(value)
}

impl ArbiterArgs {
    pub fn config(&self) -> ServerConfig {
        ServerConfig {
            spare_timeout: Duration::from_millis(self.ping_interval_ms)
                .saturating_mul(self.dead_pings),
            max_connections: self.max_connections,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            ..ServerConfig::new(&self.state)
        }
    }
}

/// Checks the arguments, locks and loads the state directory and binds the
/// address, without serving yet. A command announces "listening" only
/// after this succeeded, naming [`Server::local_addr`] (the real port when
/// `--listen` asked for port 0); then it calls [`Server::serve`].
pub fn bind(args: &ArbiterArgs) -> Result<Server, ArbiterError> {
    Server::bind(args.listen, args.config())
}

/// Serves until `stop` is set.
pub fn run(args: &ArbiterArgs, stop: Arc<AtomicBool>) -> Result<(), ArbiterError> {
    bind(args)?.serve(&stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_idle_timeout_is_the_servers() {
        assert_eq!(
            Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS),
            ServerConfig::DEFAULT_IDLE_TIMEOUT
        );
    }

    #[test]
    fn zero_and_garbage_are_refused() {
        assert_eq!(at_least_one::<usize>("0"), Err("must be at least 1".into()));
        assert_eq!(at_least_one::<u64>("1"), Ok(1));
        assert!(at_least_one::<u32>("-1").is_err());
        assert!(at_least_one::<u32>("five").is_err());
    }
}
