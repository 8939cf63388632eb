//! What travels on a log channel connection, below the entries themselves:
//! the preamble and the control messages. README.md ("The TCP channel")
//! lays the bytes out.

use crate::frame::{encode_value, EncodeError};
use bincode::{Decode, Encode};

/// The version of the channel protocol this build speaks. Both ends must
/// speak the same one; the handshake refuses any other. Version 2 added the
/// goodbye: a peer of version 1 would take it for a protocol violation, and
/// so for a failure, which is what the goodbye exists to avoid. Version 3
/// appended the workload to the hello, and entries may be `async-point`s
/// (tag 12), which a version 2 backup could not decode. Version 4 may
/// carry a state transfer between the handshake and the first control
/// message (`crate::transfer`), which a version 3 peer would take for
/// garbage.
pub const CHANNEL_PROTOCOL_VERSION: u32 = 4;

/// The first bytes each end sends. A peer whose first bytes differ is not a
/// log channel peer at all, which deserves another message than a version
/// or hello mismatch.
pub(crate) const MAGIC: [u8; 8] = *b"FTVMCHN\0";

/// Magic and protocol version, sent outside any frame so that a peer of
/// another version is recognised before its frames are parsed.
pub(crate) const PREAMBLE_LEN: usize = 12;

/// Control frames are checked under sequence numbers from here on, so that
/// they can never be mistaken for entry frames (whose numbers stay far
/// below) and a dropped or repeated control frame fails its CRC like a
/// dropped entry.
const CONTROL_SEQ_BASE: u64 = 1 << 63;

/// One control message. The variant's index (bincode writes it as a u32
/// varint, one byte) is its tag on the wire, so variants are only ever
/// appended. `Accept` and `Refused` keep their layout in every protocol
/// version, and `Hello` only grows at its end: a peer of another version
/// is refused on its preamble, before its hello is parsed, and must be able
/// to read why.
#[derive(Debug, Encode, Decode)]
pub(crate) enum Message {
    Hello {
        vm_id: String,
        view: u64,
        image_hash: [u8; 32],
        mem_size: u64,
        /// 0 primary, 1 backup.
        role: u8,
        first_seq: u64,
        /// Since version 3.
        workload: String,
    },
    Accept,
    Refused {
        reason: String,
    },
    /// Followed on the wire by `count` entry frames.
    Entries {
        count: u32,
    },
    Heartbeat {
        progress: u64,
    },
    Ack {
        received: u64,
        replayed_seq: u64,
        replayed_exits: u64,
    },
    /// The sender stops on purpose and sends nothing after this: its peer
    /// must not take the close that follows for a failure.
    Goodbye {
        reason: String,
    },
}

impl Message {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Accept => "accept",
            Message::Refused { .. } => "refused",
            Message::Entries { .. } => "entries",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Ack { .. } => "ack",
            Message::Goodbye { .. } => "goodbye",
        }
    }
}

/// Numbers one direction's control frames: 0 is the hello, 1 the verdict,
/// then one per message.
#[derive(Debug, Default)]
pub(crate) struct ControlSeq(u64);

impl ControlSeq {
    /// The counter as it stands after the handshake's two messages.
    pub(crate) fn after_handshake() -> ControlSeq {
        ControlSeq(2)
    }

    /// The sequence number the next control frame is checked under.
    pub(crate) fn take(&mut self) -> u64 {
        let seq = CONTROL_SEQ_BASE + self.0;
        self.0 += 1;
        seq
    }

    /// Appends `msg` as the next control frame.
    pub(crate) fn encode(&mut self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let seq = self.take();
        encode_value(seq, msg, out).map(drop)
    }
}

/// The preamble announcing `version`.
pub(crate) fn preamble(version: u32) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&version.to_le_bytes());
    p
}
