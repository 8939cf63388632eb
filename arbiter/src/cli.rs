//! `ftvm arbiter`: the command-line face of the server.

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// How often servers are expected to ping, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub ping_interval_ms: u64,
    /// A spare that missed this many pings is not named backup.
    #[arg(long, default_value_t = 5)]
    pub dead_pings: u32,
    /// Connections beyond this many are refused with a `busy` error.
    #[arg(long, default_value_t = ServerConfig::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
}

impl ArbiterArgs {
    pub fn config(&self) -> ServerConfig {
        ServerConfig {
            spare_timeout: Duration::from_millis(self.ping_interval_ms)
                .saturating_mul(self.dead_pings),
            max_connections: self.max_connections,
            ..ServerConfig::new(&self.state)
        }
    }
}

/// Serves until `stop` is set.
pub fn run(args: &ArbiterArgs, stop: Arc<AtomicBool>) -> Result<(), ArbiterError> {
    Server::bind(args.listen, args.config())?.serve(&stop)
}
