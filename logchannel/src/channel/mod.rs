//! The log channel: a TCP connection from the primary VMM to the backup
//! that carries the log's entries one way and acknowledgements the other.
//! The primary listens ([`LogSender::accept`]), the backup connects
//! ([`LogReceiver::connect`]). Blocking I/O on two threads per end; no
//! async runtime. The wire format is in this crate's README.md ("The TCP
//! channel").
//!
//! Connecting is two steps, which `accept_within` and
//! `connect_cancellable` take together: the handshake
//! ([`LogSender::accept_handshaken`], [`LogReceiver::connect_handshaken`])
//! gives a [`Handshaken`] connection, and `start` turns it into a channel
//! from a given first sequence number ([`LogSender::start`],
//! [`LogReceiver::start`]). Between the two, a joining backup takes the
//! primary's state over the same connection ([`crate::TransferReader`]),
//! and the log starts from the cut's `next_seq`, which the primary only
//! knows once the guest has stopped at the cut.
//!
//! # Design decisions
//!
//! **The handshake and the start are separate.** The hello is checked
//! before anything else travels, so a backup of the wrong view or image is
//! refused before the primary spends a transfer on it; the channel's
//! threads start only when the first sequence number is known. A
//! [`Handshaken`] connection counts the bytes read through it, so frame
//! offsets in the channel's errors stay offsets in the connection.
//!
//! **Progress marks are out of band.** The primary's heartbeat carries its
//! progress mark, a control message without a sequence number, rather
//! than an `Event::Progress` entry. An idle primary then consumes no
//! sequence numbers and no window, and its marks need no ack; the backup
//! sees them through [`LogReceiver::complete_up_to`], which also counts
//! what received entries imply. Ordering still holds: a mark is written
//! after every entry queued before it was set, so when the backup learns
//! "complete up to N", every entry at or before exit N is already in its
//! buffer. `Event::Progress` entries remain possible (a log file has no
//! other way to say it) and count too.
//!
//! **Acks mean receipt.** The backup acknowledges entries when its reader
//! thread has put them in its buffer, as VMware FT acknowledges receipt,
//! not replay; the output rule needs the entry to exist on the backup, not
//! to have been executed there. Replay progress rides on the same acks, for
//! the lag metrics.
//!
//! **The window is enforced by the receiver's buffer, checked by the
//! primary at exits.** The backup stops reading when its buffer is full, so
//! it stops acknowledging, so the primary's unacknowledged count reaches
//! its window and the primary pauses at its next exit. `send` itself never
//! blocks or refuses: an exit's entries must all be logged once the exit is
//! handled. Memory is bounded on both sides by the window (plus one exit's
//! entries, plus kernel socket buffers).
//!
//! **Silence is measured beside the decoder, not with socket timeouts.**
//! Every byte that arrives stamps a clock; the writer thread and any caller
//! waiting compare it with the failure timeout. A backup that has stopped
//! reading because its buffer is full does not hold the primary's
//! resulting silence against it. Failure is sticky and closes the socket.
//!
//! **Strangers are turned away, not obeyed.** The primary's listener may
//! get any connection (a port scan, a stale backup of another view); each
//! shakes hands on a thread of its own and only a successful handshake
//! ends the wait, so no connection the primary did not ask for can make it
//! fail or keep the real backup waiting.
//!
//! **A stop on purpose is said, not guessed.** An end that stops on
//! purpose sends a goodbye before it closes, and its peer gets
//! [`ChannelError::PeerLeft`] instead of a failure, so that an orderly stop
//! does not look like a crash and cause a takeover.
//!
//! **A stall is judged by the backup's replay, not by the link.** The
//! primary knows the backup has stalled when its acks show entries
//! received that its replay reports do not cover and the reports stop
//! moving ([`LogSender::replay_stall`]); both come in the same messages, so
//! a slow link delays them alike. The lag bound discounts the measured
//! round trip for the same reason.
//!
//! **Batching with an escape hatch.** An entry waits at most `batch_delay`
//! to be written with later ones (fewer, larger writes; Nagle is off), but
//! [`LogSender::wait_acked`] writes at once, so the output rule does not
//! pay the batching delay.

mod accept;
mod config;
mod error;
mod handshake;
mod handshaken;
mod hello;
mod link;
mod liveness;
mod metrics;
mod receiver;
mod rtt;
mod sender;
mod wire;
mod workers;

pub use config::ChannelConfig;
pub use error::{ChannelError, Peer};
pub use handshaken::Handshaken;
pub use hello::{Hello, Mismatch, Role};
pub use metrics::{ChannelMetrics, ReceiverMetrics};
pub use receiver::LogReceiver;
pub use sender::LogSender;
pub use wire::CHANNEL_PROTOCOL_VERSION;
