//! A connection between the handshake and the start of the channel's
//! threads, when the two ends may exchange something else first (a joining
//! backup's state transfer, [`crate::transfer`]).

use super::config::ChannelConfig;
use super::error::{ChannelError, Peer};
use super::hello::Hello;
use std::io::{self, Read, Write};
use std::net::TcpStream;
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
    pub(crate) fn clear_timeouts(&self) -> Result<(), ChannelError> {
        self.stream
            .set_read_timeout(None)
            .and_then(|()| self.stream.set_write_timeout(None))
            .map_err(|e| ChannelError::broken(self.peer, e))
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
