//! The arbiter as servers and clients use it, whichever implementation
//! keeps the views: the built-in server (`ftvm arbiter`, reached with
//! [`ArbiterClient`]) or an etcd cluster ([`EtcdArbiter`]). Both follow the
//! rules of this crate's README; [`ArbiterAddr`] is what `--arbiter` names.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::client::ArbiterClient;
use crate::etcd::{EtcdArbiter, EtcdConfig};
use crate::view::{Member, TasOutcome, View};
use crate::ArbiterError;

/// The operations of the README (`ping`, `test_and_set`, `query`). Every
/// call is bounded in time; an [`ArbiterError::Unreachable`] means the
/// outcome is unknown (a claim may or may not have been decided), and
/// retrying the same call is always safe.
pub trait Arbiter: fmt::Debug + Send + Sync {
    /// Reports `me` alive and knowing view `view_known`; returns the
    /// current view. From the primary of view `view_known`, this
    /// acknowledges that view: its backup, if it has one, holds the
    /// primary's state.
    fn ping(&self, vm: &str, me: &Member, view_known: u64) -> Result<View, ArbiterError>;

    /// For the primary of view `view`, whose backup does not hold its
    /// state yet: reports that it has seen the view without vouching for
    /// the backup (the README's `backup_ready: false`).
    fn ping_seen(&self, vm: &str, me: &Member, view: u64) -> Result<View, ArbiterError>;

    /// Claims view `view` for `claimant`. A repeated winning claim is
    /// answered [`TasOutcome::Won`] again, with the same view.
    fn test_and_set(
        &self,
        vm: &str,
        view: u64,
        claimant: &Member,
    ) -> Result<TasOutcome, ArbiterError>;

    /// The current view, changing nothing.
    fn query(&self, vm: &str) -> Result<View, ArbiterError>;

    /// What this talks to, for messages.
    fn addr(&self) -> ArbiterAddr;

    /// The same arbiter with each call bounded by `timeout` instead,
    /// sharing whatever connections this one has.
    fn with_call_timeout(&self, timeout: Duration) -> Arc<dyn Arbiter>;
}

/// Where the arbiter is: the value of `--arbiter`.
///
/// - `HOST:PORT` (an IP address and a port, as `127.0.0.1:7100`): the
///   built-in arbiter, `ftvm arbiter`;
/// - `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`: an etcd cluster, through
///   any of the client endpoints listed (host names allowed), with every
///   key under `PREFIX` (default [`EtcdAddr::DEFAULT_PREFIX`]), so that one
///   etcd can serve several deployments. A prefix is one or more segments
///   of `A-Z a-z 0-9 . _ -` separated by `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArbiterAddr {
    Builtin(SocketAddr),
    Etcd(EtcdAddr),
}

/// An etcd cluster and the key prefix ftvm uses in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdAddr {
    /// Client endpoints, each `HOST:PORT`.
    pub endpoints: Vec<String>,
    pub prefix: String,
}

impl EtcdAddr {
    pub const SCHEME: &'static str = "etcd://";
    pub const DEFAULT_PREFIX: &'static str = "ftvm";

    pub fn new(endpoints: Vec<String>) -> EtcdAddr {
        EtcdAddr {
            endpoints,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddrError {
    #[error(
        "{0:?} is not an arbiter address: expected IP:PORT (the built-in arbiter) or \
         etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
    )]
    Unknown(String),
    #[error("{addr:?}: etcd endpoint {endpoint:?} is not HOST:PORT with a port from 1 to 65535")]
    Endpoint { addr: String, endpoint: String },
    #[error(
        "{addr:?}: the key prefix must be segments of A-Z a-z 0-9 . _ - separated by single \
         slashes"
    )]
    Prefix { addr: String },
}

impl FromStr for ArbiterAddr {
    type Err = AddrError;

    fn from_str(text: &str) -> Result<ArbiterAddr, AddrError> {
        let Some(rest) = text.strip_prefix(EtcdAddr::SCHEME) else {
            return text
                .parse()
                .map(ArbiterAddr::Builtin)
                .map_err(|_| AddrError::Unknown(text.to_owned()));
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, prefix)) => (hosts, prefix),
            None => (rest, EtcdAddr::DEFAULT_PREFIX),
        };
        let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        for endpoint in &endpoints {
            if !is_host_port(endpoint) {
                return Err(AddrError::Endpoint {
                    addr: text.to_owned(),
                    endpoint: endpoint.clone(),
                });
            }
        }
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if !prefix.split('/').all(segment_ok) {
            return Err(AddrError::Prefix {
                addr: text.to_owned(),
            });
        }
        Ok(ArbiterAddr::Etcd(EtcdAddr {
            endpoints,
            prefix: prefix.to_owned(),
        }))
    }
}

/// `HOST:PORT`, the host a name, an IPv4 address or a bracketed IPv6 one.
fn is_host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
    };
    port_ok && host_ok
}

impl From<SocketAddr> for ArbiterAddr {
    fn from(addr: SocketAddr) -> ArbiterAddr {
        ArbiterAddr::Builtin(addr)
    }
}

impl fmt::Display for ArbiterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArbiterAddr::Builtin(addr) => write!(f, "{addr}"),
            ArbiterAddr::Etcd(etcd) => write!(f, "{etcd}"),
        }
    }
}

impl fmt::Display for EtcdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}/{}",
            Self::SCHEME,
            self.endpoints.join(","),
            self.prefix
        )
    }
}

/// The arbiter at `addr`, each call bounded by `timeout`. For etcd this
/// starts the client's runtime but does not wait for a connection: an etcd
/// that cannot be reached makes each call fail with
/// [`ArbiterError::Unreachable`], as an unreachable built-in arbiter does.
pub fn connect(addr: &ArbiterAddr, timeout: Duration) -> Result<Arc<dyn Arbiter>, ArbiterError> {
    Ok(match addr {
        ArbiterAddr::Builtin(addr) => Arc::new(ArbiterClient::with_timeout(*addr, timeout)),
        ArbiterAddr::Etcd(etcd) => Arc::new(EtcdArbiter::connect(
            etcd,
            EtcdConfig {
                timeout,
                ..EtcdConfig::default()
            },
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        assert_eq!(
            "127.0.0.1:7100".parse::<ArbiterAddr>().unwrap(),
            ArbiterAddr::Builtin(SocketAddr::from(([127, 0, 0, 1], 7100)))
        );
        let etcd: ArbiterAddr = "etcd://127.0.0.1:2379,etcd-b:2379,[::1]:2379"
            .parse()
            .unwrap();
        assert_eq!(
            etcd,
            ArbiterAddr::Etcd(EtcdAddr {
                endpoints: vec![
                    "127.0.0.1:2379".into(),
                    "etcd-b:2379".into(),
                    "[::1]:2379".into()
                ],
                prefix: "ftvm".into(),
            })
        );
        assert_eq!(
            etcd.to_string(),
            "etcd://127.0.0.1:2379,etcd-b:2379,[::1]:2379/ftvm"
        );
        let prefixed: ArbiterAddr = "etcd://h:1/prod/ftvm-2".parse().unwrap();
        assert_eq!(prefixed.to_string(), "etcd://h:1/prod/ftvm-2");
        assert_eq!(prefixed.to_string().parse::<ArbiterAddr>(), Ok(prefixed));
    }

    #[test]
    fn bad_addresses_are_refused_by_what_is_wrong() {
        assert!(matches!(
            "localhost".parse::<ArbiterAddr>(),
            Err(AddrError::Unknown(_))
        ));
        for bad in [
            "etcd://",
            "etcd://h",
            "etcd://h:0",
            "etcd://h:99999",
            "etcd://h:1,,h:2",
            "etcd://a b:1",
        ] {
            assert!(
                matches!(bad.parse::<ArbiterAddr>(), Err(AddrError::Endpoint { .. })),
                "{bad}"
            );
        }
        for bad in [
            "etcd://h:1/",
            "etcd://h:1/a//b",
            "etcd://h:1/a/",
            "etcd://h:1/a b",
        ] {
            assert!(
                matches!(bad.parse::<ArbiterAddr>(), Err(AddrError::Prefix { .. })),
                "{bad}"
            );
        }
    }
}
