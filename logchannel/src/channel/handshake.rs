//! The handshake: each end sends its preamble and hello at once, reads the
//! other's, checks the pair, and sends its verdict (accept, or a refusal
//! that says why); the channel is up when both ends accepted.
//!
//! Everything here reads under one deadline. Socket read timeouts are safe
//! in this phase (and only here) because any timeout ends the connection.
//! Reads wait in short slices, so that a caller who gives up (a stop
//! request) is not kept waiting for the deadline.

use super::error::{ChannelError, Peer};
use super::hello::{check, Hello, Mismatch, Role};
use super::wire::{preamble, ControlSeq, Message, MAGIC, PREAMBLE_LEN};
use crate::frame::{FrameDecoder, FrameError};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// How often a handshake waiting for its peer asks whether its caller has
/// given up.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Listening,
    Connecting,
}

impl Side {
    /// The role the peer must have, which is how errors name it.
    pub(crate) fn peer_role(self) -> Role {
        match self {
            Side::Listening => Role::Backup,
            Side::Connecting => Role::Primary,
        }
    }
}

/// A connection after a successful handshake.
pub(crate) struct Established {
    pub peer_hello: Hello,
    /// Bytes received during the handshake: the data phase's frame offsets
    /// continue from here, so that an error's offset is the byte's place in
    /// the connection.
    pub offset: u64,
}

/// The read error of a handshake whose caller gave up. Not `Interrupted`,
/// which readers retry.
#[derive(Debug)]
struct CancelledRead;

impl fmt::Display for CancelledRead {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the handshake was cancelled")
    }
}

impl std::error::Error for CancelledRead {}

fn cancelled_read(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<CancelledRead>())
}

/// Reads from the socket, failing once `deadline` has passed or the caller
/// has given up.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    cancelled: &'a dyn Fn() -> bool,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if (self.cancelled)() {
                return Err(io::Error::other(CancelledRead));
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left.min(CANCEL_POLL)))?;
            let mut stream = self.stream;
            match stream.read(buf) {
                Err(e) if timed_out(&e) => {}
                other => return other,
            }
        }
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

struct Handshake<'a> {
    stream: &'a TcpStream,
    reader: DeadlineReader<'a>,
    peer: Peer,
    side: Side,
    timeout: Duration,
    ours_out: ControlSeq,
    theirs_in: ControlSeq,
    decoder: FrameDecoder,
}

/// Shakes hands on `stream` within `timeout`, or until `cancelled` says
/// the caller has given up (`ChannelError::Cancelled`).
pub(crate) fn handshake(
    stream: &TcpStream,
    ours: &Hello,
    side: Side,
    peer: Peer,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<Established, ChannelError> {
    let mut hs = Handshake {
        stream,
        reader: DeadlineReader {
            stream,
            deadline: Instant::now() + timeout,
            cancelled,
        },
        peer,
        side,
        timeout,
        ours_out: ControlSeq::default(),
        theirs_in: ControlSeq::default(),
        decoder: FrameDecoder::new(0, PREAMBLE_LEN as u64),
    };
    let established = hs.run(ours)?;
    let clear = stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None));
    clear.map_err(|e| ChannelError::broken(peer, e))?;
    Ok(established)
}

impl Handshake<'_> {
    fn run(&mut self, ours: &Hello) -> Result<Established, ChannelError> {
        self.stream
            .set_nodelay(true)
            .and_then(|()| self.stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| ChannelError::broken(self.peer, e))?;
        let mut out = preamble(ours.protocol_version).to_vec();
        self.ours_out.encode(
            &Message::Hello {
                vm_id: ours.vm_id.clone(),
                view: ours.view,
                image_hash: ours.image_hash,
                mem_size: ours.mem_size,
                role: ours.role.code(),
                first_seq: ours.first_seq,
                workload: ours.workload.clone(),
            },
            &mut out,
        )?;
        self.write(&out)?;

        let version = self.read_preamble()?;
        if version != ours.protocol_version {
            let (primary, backup) = self.primary_first(ours.protocol_version, version);
            return Err(self.refuse(Mismatch::ProtocolVersion { primary, backup }));
        }
        let theirs = self.read_hello(version)?;
        let (primary, backup) = self.primary_first(ours, &theirs);
        if let Some(mismatch) = check(primary, backup) {
            return Err(self.refuse(mismatch));
        }

        let mut out = Vec::new();
        self.ours_out.encode(&Message::Accept, &mut out)?;
        self.write(&out)?;
        match self.read_message("verdict")? {
            Message::Accept => Ok(Established {
                peer_hello: theirs,
                offset: self.decoder.offset(),
            }),
            Message::Refused { reason } => Err(ChannelError::RefusedByPeer {
                peer: self.peer,
                reason,
            }),
            other => Err(self.unexpected(&other, "its verdict")),
        }
    }

    /// Orders a pair of (ours, theirs) as (primary's, backup's).
    fn primary_first<T>(&self, ours: T, theirs: T) -> (T, T) {
        match self.side {
            Side::Listening => (ours, theirs),
            Side::Connecting => (theirs, ours),
        }
    }

    fn write(&self, bytes: &[u8]) -> Result<(), ChannelError> {
        let mut stream = self.stream;
        stream.write_all(bytes).map_err(|e| {
            if timed_out(&e) {
                self.timeout_error("the peer does not read".to_string())
            } else {
                ChannelError::broken(self.peer, e)
            }
        })
    }

    fn cancelled_error(&self) -> ChannelError {
        ChannelError::Cancelled {
            what: format!("shaking hands with {}", self.peer),
        }
    }

    fn timeout_error(&self, detail: String) -> ChannelError {
        ChannelError::HandshakeTimeout {
            peer: self.peer,
            timeout: self.timeout,
            detail,
        }
    }

    /// Reads the magic and the version, refusing a stranger as soon as its
    /// bytes stop matching the magic.
    fn read_preamble(&mut self) -> Result<u32, ChannelError> {
        let mut pre = [0u8; PREAMBLE_LEN];
        let mut got = 0;
        while got < PREAMBLE_LEN {
            match self.reader.read(&mut pre[got..]) {
                Ok(0) => {
                    return Err(ChannelError::NotAPeer {
                        peer: self.peer,
                        detail: format!(
                            "closed the connection after sending {} byte(s) b\"{}\" instead of a log channel preamble",
                            got,
                            pre[..got].escape_ascii()
                        ),
                    })
                }
                Ok(n) => {
                    got += n;
                    let magic = got.min(MAGIC.len());
                    if pre[..magic] != MAGIC[..magic] {
                        return Err(ChannelError::NotAPeer {
                            peer: self.peer,
                            detail: format!(
                                "sent b\"{}\" where a log channel preamble (b\"{}\" and a version) was expected",
                                pre[..got].escape_ascii(),
                                MAGIC.escape_ascii()
                            ),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if cancelled_read(&e) => return Err(self.cancelled_error()),
                Err(e) if timed_out(&e) => {
                    return Err(self.timeout_error(format!(
                        "{got} of the {PREAMBLE_LEN} preamble bytes arrived"
                    )))
                }
                Err(e) => return Err(ChannelError::broken(self.peer, e)),
            }
        }
        let mut version = [0u8; 4];
        version.copy_from_slice(&pre[MAGIC.len()..]);
        Ok(u32::from_le_bytes(version))
    }

    fn read_message(&mut self, what: &str) -> Result<Message, ChannelError> {
        let seq = self.theirs_in.take();
        match self.decoder.read_value::<Message, _>(&mut self.reader, seq) {
            Ok(Some((msg, _))) => Ok(msg),
            Ok(None) => Err(ChannelError::Closed { peer: self.peer }),
            Err(FrameError::Io { source, .. }) if cancelled_read(&source) => {
                Err(self.cancelled_error())
            }
            Err(FrameError::Io { source, .. }) if timed_out(&source) => {
                Err(self.timeout_error(format!("its {what} did not arrive")))
            }
            Err(e) => Err(ChannelError::from_frame(self.peer, e)),
        }
    }

    fn read_hello(&mut self, version: u32) -> Result<Hello, ChannelError> {
        match self.read_message("hello")? {
            Message::Hello {
                vm_id,
                view,
                image_hash,
                mem_size,
                role,
                first_seq,
                workload,
            } => {
                let role = Role::from_code(role).ok_or_else(|| {
                    ChannelError::protocol(self.peer, format!("hello with unknown role {role}"))
                })?;
                Ok(Hello {
                    protocol_version: version,
                    vm_id,
                    view,
                    image_hash,
                    mem_size,
                    role,
                    first_seq,
                    workload,
                })
            }
            other => Err(self.unexpected(&other, "a hello")),
        }
    }

    fn unexpected(&self, msg: &Message, expected: &str) -> ChannelError {
        ChannelError::protocol(
            self.peer,
            format!(
                "sent a {} message where {expected} was expected",
                msg.name()
            ),
        )
    }

    /// Tells the peer why, then waits (within the deadline) for it to close,
    /// so that closing does not reset the connection under the refusal
    /// before the peer has read it.
    fn refuse(&mut self, mismatch: Mismatch) -> ChannelError {
        let mut out = Vec::new();
        let reason = mismatch.to_string();
        // The caller reports the refusal (a listener turns such peers away
        // by the dozen).
        tracing::debug!(peer = %self.peer, "refusing log channel handshake: {reason}");
        if self
            .ours_out
            .encode(&Message::Refused { reason }, &mut out)
            .is_ok()
        {
            // The peer may be gone already; the refusal is returned here
            // either way.
            let _ = self.write(&out);
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        let mut sink = [0u8; 4096];
        while matches!(self.reader.read(&mut sink), Ok(n) if n > 0) {}
        ChannelError::HelloRefused {
            peer: self.peer,
            mismatch,
        }
    }
}
