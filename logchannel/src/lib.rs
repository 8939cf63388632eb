//! ftvm's replay log: the entry types, their framed binary encoding, the log
//! file format, a JSON-lines form, and size statistics; the TCP log channel;
//! and the state transfer to a joining backup ([`TransferWriter`],
//! [`TransferReader`]). It knows nothing of KVM: the VMM turns exits into
//! [`Entry`]s and back, and its machine state into an opaque blob.
//!
//! The byte-level formats are specified in this crate's README.md.
//!
//! # Design decisions
//!
//! **Sequence numbers are implicit on the wire.** Every [`Entry`] carries its
//! `seq`, but frames do not transmit it: the next frame in a stream must be
//! the previous one plus 1, so both ends know it. Each frame's CRC-32 covers
//! the sequence number the writer gave it, so a dropped, duplicated or
//! reordered frame fails its CRC just as a corrupted one does; the decoder
//! then tries the sequence numbers nearby and, if one matches, reports a
//! [`FrameError::SequenceGap`] naming the expected and found numbers. Sending
//! `seq` explicitly would cost 3–5 bytes per entry for a check the CRC
//! already makes.
//!
//! **Positions and TSC readings are deltas.** A payload carries the exit
//! count as the difference from the previous entry's (never negative: the
//! encoder refuses entries that go backwards), the RIP as a signed
//! difference from the previous RIP, and `rdtsc`/`rdtscp` values as a signed
//! difference from the previous such value. Deltas start from zero, so the
//! first frame of a stream holds absolute values, and a stream can be
//! decoded from any point where a [`FrameEncoder`] and a [`FrameDecoder`]
//! were created together with the same first sequence number (a log file's
//! start, or a channel connection's). The delta state lives in the stream,
//! which is acceptable because a stream is already useless past a bad frame.
//!
//! **Frame lengths are LEB128 varints** (1 byte for entries under 128
//! bytes), and payloads use bincode 2's standard configuration (varint
//! integers). Together with the two decisions above, an `rdtsc` entry is
//! typically 13–15 bytes with its frame, an interrupt or progress mark 9–11
//! (see the `sizes` test, which prints the figures for a realistic mix).
//!
//! **A bad frame is an error, never a guess.** Every decoding error names
//! the frame number and byte offset; after an error a reader stops. No input
//! makes a reader panic or allocate more than a bounded amount
//! ([`MAX_PAYLOAD`] per frame, checked before allocating).

mod channel;
mod entry;
mod file;
mod frame;
mod hex;
mod json;
mod payload;
mod stats;
mod transfer;

pub use channel::{
    ChannelConfig, ChannelError, ChannelMetrics, Handshaken, Hello, LogReceiver, LogSender,
    Mismatch, Peer, ReceiverMetrics, Role, CHANNEL_PROTOCOL_VERSION,
};
pub use entry::{
    Digest, DigestReason, Entry, Event, EventKind, OutputKind, PageHash, Position, Registers,
};
pub use file::{
    image_hash, LogError, LogHeader, LogReader, LogWriter, ReplayConfig, SyncWrite, FORMAT_VERSION,
    MAGIC, PREAMBLE_LEN,
};
pub use frame::{
    encode_frame, encode_value, EncodeError, FrameDecoder, FrameEncoder, FrameError, MAX_PAYLOAD,
};
pub use json::{from_json_lines, to_json_lines, JsonEntries, JsonError};
pub use stats::{KindStats, LogStats};
pub use transfer::{
    read_verdict, write_verdict, Cut, PageData, TransferError, TransferItem, TransferReader,
    TransferWriter, Verdict, MAX_MACHINE, MAX_PAGES_PAYLOAD,
};
