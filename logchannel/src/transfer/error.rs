//! How a state transfer fails.

use std::fmt;
use std::io;
use std::time::Duration;
use thiserror::Error;

/// A state transfer could not be read or written. Errors about a message
/// name it by its number (counted from 0 in its direction: the `Begin` is
/// message 0, the verdict is message 0 of the other direction) and the byte
/// offset where it starts (in the connection, when the reader was told
/// where the stream starts).
#[derive(Debug, Error)]
pub enum TransferError {
    /// The stream ended cleanly between two messages before its last one:
    /// the peer closed the connection.
    #[error("the transfer stream ends after {offset} bytes, before message {message}: {from} closed the connection without {missing}")]
    Closed {
        message: u64,
        offset: u64,
        from: &'static str,
        missing: &'static str,
    },
    /// The stream ended inside a message. `need` is a lower bound while the
    /// length itself is incomplete.
    #[error("the transfer stream ends after {} bytes, inside message {message} ({kind}) at offset {offset}: {have} of its {need} bytes arrived", offset + have)]
    Truncated {
        message: u64,
        offset: u64,
        kind: &'static str,
        have: u64,
        need: u64,
    },
    #[error("message {message} ({kind}) at offset {offset}: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc {
        message: u64,
        offset: u64,
        kind: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("message {message} at offset {offset}: unknown tag {tag} for {stream}")]
    UnknownTag {
        message: u64,
        offset: u64,
        tag: u8,
        stream: &'static str,
    },
    /// A length over the bound for its kind of message, refused before
    /// anything is allocated for it (`len` = u64::MAX for a length field
    /// over 10 bytes).
    #[error(
        "message {message} ({kind}) at offset {offset}: length {len} is over the maximum {max}"
    )]
    TooLong {
        message: u64,
        offset: u64,
        kind: &'static str,
        len: u64,
        max: usize,
    },
    /// The payload passed its CRC but is not a valid message of its kind.
    #[error("message {message} ({kind}) at offset {offset}: payload does not decode: {detail}")]
    Decode {
        message: u64,
        offset: u64,
        kind: &'static str,
        detail: String,
    },
    #[error(
        "message {message} at offset {offset}: page {index} is outside the guest's {pages} pages"
    )]
    PageOutOfRange {
        message: u64,
        offset: u64,
        index: u64,
        pages: u64,
    },
    #[error("message {message} at offset {offset}: page {index} has {len} bytes, not the page size {page_size}")]
    PageLength {
        message: u64,
        offset: u64,
        index: u64,
        len: u64,
        page_size: u32,
    },
    /// A message where the transfer's order does not allow it (a page
    /// before `Begin`, a second `Begin`, a round number that does not follow
    /// the last, anything after the cut or an abort).
    #[error("message {message} at offset {offset}: out of order: {detail}")]
    OutOfOrder {
        message: u64,
        offset: u64,
        detail: String,
    },
    #[error("memory size mismatch: the primary transfers {primary} bytes of guest memory, this backup has {backup}")]
    MemSize { primary: u64, backup: u64 },
    /// A well-formed message whose content cannot be (a page size that is
    /// not a power of two, a round whose page count is not what arrived).
    #[error("message {message} at offset {offset}: {detail}")]
    Invalid {
        message: u64,
        offset: u64,
        detail: String,
    },
    /// A read timed out: the peer sent nothing for the read timeout.
    #[error("{from} sent nothing for {} (waiting for message {message} at offset {offset})", Waited(*.waited))]
    Silent {
        from: &'static str,
        waited: Option<Duration>,
        message: u64,
        offset: u64,
    },
    #[error("reading message {message} at offset {offset} failed: {source}")]
    Read {
        message: u64,
        offset: u64,
        source: io::Error,
    },
    /// A write timed out: the peer read nothing for the write timeout.
    #[error("{to} read nothing for {} ({written} bytes of the transfer written)", Waited(*.waited))]
    Stalled {
        to: &'static str,
        waited: Option<Duration>,
        written: u64,
    },
    #[error("writing the transfer failed after {written} bytes: {source}")]
    Write { written: u64, source: io::Error },
    /// The reader or writer was used after the transfer's last message
    /// (the cut, an abort) or after an error.
    #[error("the transfer is over ({0}): nothing more can be read or written")]
    Over(&'static str),
}

/// A read or write timeout as the error names it: the socket's, when the
/// reader or writer was told it.
struct Waited(Option<Duration>);

impl fmt::Display for Waited {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{d:?}"),
            None => f.write_str("the socket's timeout"),
        }
    }
}

/// Whether an I/O error is a socket timeout.
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
