//! A connection between the handshake and the start of the channel's
//! threads, when the two ends may exchange something else first (a joining
//! backup's state transfer, [`crate::transfer`]).

use super::config::ChannelConfig;
use super::error::{ChannelError, Peer};
use super::hello::{Hello, Role};
use super::link::{HasHealth, Link};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// A connected TCP stream whose handshake succeeded, not yet carrying the
/// log. [`LogSender::start`](super::LogSender::start) or
/// [`LogReceiver::start`](super::LogReceiver::start) turns it into a
/// channel.
///
/// Reading and writing through it (its `Read` and `Write`) counts the bytes
/// received, so that a bad frame of the log that follows is still reported
/// at its offset in the connection.
#[derive(Debug)]
pub struct Handshaken {
    pub(crate) stream: TcpStream,
    pub(crate) peer: Peer,
    pub(crate) ours: Hello,
    pub(crate) peer_hello: Hello,
    pub(crate) config: ChannelConfig,
    pub(crate) received: u64,
    /// How long the handshake took from this end: at least one round trip
    /// of the link.
    pub(crate) round_trip: Duration,
}

impl Handshaken {
    /// The connection, for its socket options (a read timeout while the
    /// transfer runs; `start` clears them).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// What the peer said in its hello: for a backup, the primary's
    /// `first_seq` as it was at the handshake.
    pub fn peer_hello(&self) -> &Hello {
        &self.peer_hello
    }

    /// This end's hello.
    pub fn hello(&self) -> &Hello {
        &self.ours
    }

    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// Bytes received on the connection so far, the preamble included: the
    /// offset of the next byte to arrive.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Clears the socket timeouts the caller may have set: the channel's
    /// threads block in their reads and writes on purpose (a timeout in the
    /// middle of a frame could not be recovered from).
    fn clear_timeouts(&self) -> Result<(), ChannelError> {
        self.stream
            .set_read_timeout(None)
            .and_then(|()| self.stream.set_write_timeout(None))
            .map_err(|e| ChannelError::broken(self.peer, e))
    }

    /// What [`LogSender::start`](super::LogSender::start) and
    /// [`LogReceiver::start`](super::LogReceiver::start) share: the checks
    /// that this connection, shaken hands on as `role`'s end, may carry the
    /// log from `first_seq`, then the link with the end's `state`, built
    /// only once `first_seq` is known to be at least 1. Returns the link,
    /// the peer's hello and the connection's byte offset, from which the
    /// end's reader decodes.
    pub(crate) fn into_link<S: HasHealth>(
        self,
        role: Role,
        first_seq: u64,
        state: impl FnOnce() -> S,
    ) -> Result<(Arc<Link<S>>, Hello, u64), ChannelError> {
        if first_seq == 0 {
            return Err(ChannelError::Config(
                "the log's first sequence number must be at least 1".to_string(),
            ));
        }
        let end = match role {
            Role::Primary => "LogSender",
            Role::Backup => "LogReceiver",
        };
        if self.ours.role != role {
            return Err(ChannelError::Config(format!(
                "a {end} cannot start on a connection to {}",
                self.peer
            )));
        }
        let (backup, asker) = match role {
            Role::Primary => (&self.peer_hello, self.peer.to_string()),
            Role::Backup => (&self.ours, "this backup".to_string()),
        };
        let expected = backup.first_seq;
        if expected != 0 && expected != first_seq {
            return Err(ChannelError::Config(format!(
                "{asker} asked for the log from entry {expected}, not {first_seq}"
            )));
        }
        self.clear_timeouts()?;
        let Handshaken {
            stream,
            peer,
            ours,
            peer_hello,
            config,
            received,
            round_trip,
        } = self;
        tracing::info!(%peer, view = ours.view, first_seq, "log channel up");
        let link = Arc::new(Link::new(state(), stream, peer, config));
        // After a state transfer the primary starts sending only once the
        // backup's verdict has reached it, so its first bytes come a round
        // trip after this start, which is no silence of the primary's.
        if role == Role::Backup && ours.first_seq == 0 {
            link.live.expect_after(round_trip);
        }
        Ok((link, peer_hello, received))
    }
}

impl Read for Handshaken {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&self.stream).read(buf)?;
        self.received += n as u64;
        Ok(n)
    }
}

impl Write for Handshaken {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&self.stream).flush()
    }
}
