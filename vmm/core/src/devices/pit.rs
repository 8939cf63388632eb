//! The 8254 programmable interval timer at ports `0x40..=0x43`. Channel 0
//! drives IRQ0; channels 1 and 2 are programmable and readable but drive
//! nothing (port `0x61`, the speaker gate, is not modelled).
//!
//! Time is an input: every call that depends on it takes `now_ns`, a reading
//! of one monotonic host clock chosen by the caller, and the counters are
//! derived from it exactly, with integer arithmetic, at [`PIT_FREQ_HZ`]. The
//! device never reads a clock itself, so the same calls with the same
//! `now_ns` give the same results on a primary and on a replaying backup.
//! `now_ns` is expected never to go backwards; if it does, elapsed time
//! saturates at zero and no edge is taken back.
//!
//! Simplifications: BCD counting is treated as binary; the read-back command
//! is ignored; modes 1 and 5 wait for a gate edge that never comes (channel
//! 0's gate is tied high on a PC), so they never count; a count written in
//! any other mode (re)starts the counter at once instead of at the next
//! period boundary; the count-to-output delay of one clock is ignored; mode 3
//! with an odd count is read back as if the count were rounded up to even.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The 8254's input clock.
pub const PIT_FREQ_HZ: u64 = 1_193_182;

/// Data port of channel 0; channels 1 and 2 follow.
pub const PIT_CHANNEL0: u16 = 0x40;
/// Control-word port.
pub const PIT_COMMAND: u16 = 0x43;

const NS_PER_SEC: u128 = 1_000_000_000;
/// A count of 0 means 2^16 in binary counting.
const MAX_RELOAD: u32 = 0x1_0000;
const SELECT_READ_BACK: u8 = 3;
const ACCESS_LATCH: u8 = 0;
const CONTROL_BCD: u8 = 0x01;

/// How the 16-bit count travels through the 8-bit data port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PitAccess {
    LoByte,
    HiByte,
    /// Low byte then high byte, with a flip-flop for each direction.
    LoHi,
}

/// Whether a channel's counting element is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PitCounter {
    /// Not counting (after a control word, before a count, or in a mode that
    /// waits for a gate edge); reads return `value`.
    Stopped { value: u16 },
    /// Counting down from the reload value since `since_ns`.
    Running { since_ns: u64 },
}

/// The saved state of one channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    /// Operating mode 0..=5 (6 and 7 are stored as their aliases 2 and 3).
    pub mode: u8,
    pub access: PitAccess,
    /// The programmed count, 1..=65536.
    pub reload: u32,
    pub counter: PitCounter,
    /// The low byte of a `LoHi` count whose high byte has not come yet.
    pub write_lo: Option<u8>,
    /// In `LoHi` access, the next read returns the high byte.
    pub read_hi_next: bool,
    /// A value frozen by a counter-latch command, until it has been read.
    pub latch: Option<u16>,
}

/// The saved state of the PIT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    pub channels: [PitChannelState; 3],
    /// Channel 0 output edges since its counter started that have been
    /// accounted for (reported, or recorded in `irq0_unreported_ns`).
    pub irq0_edges_seen: u64,
    /// The time of the earliest IRQ0 edge not yet returned by
    /// [`Pit::poll_irq0`].
    pub irq0_unreported_ns: Option<u64>,
}

/// A [`PitState`] that no sequence of guest accesses can produce.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PitError {
    #[error("PIT channel {channel}: mode {mode} does not exist (0..=5)")]
    InvalidMode { channel: usize, mode: u8 },
    #[error("PIT channel {channel}: reload {reload} is outside 1..=65536")]
    InvalidReload { channel: usize, reload: u32 },
    #[error("PIT channel {channel}: a half-written count or high-byte read in {access:?} access")]
    FlipFlopWithoutLoHi { channel: usize, access: PitAccess },
    #[error("PIT channel {channel}: counting in mode {mode}, which waits for a gate edge")]
    RunningWithoutGate { channel: usize, mode: u8 },
    #[error("PIT channel 0 is stopped but {edges} of its edges are recorded as seen")]
    EdgesWhileStopped { edges: u64 },
    #[error("PIT channel 0 in one-shot mode {mode} cannot have produced {edges} edges")]
    OneShotEdges { mode: u8, edges: u64 },
}

/// Whole input-clock ticks between `since_ns` and `now_ns`.
fn ticks_between(since_ns: u64, now_ns: u64) -> u64 {
    let elapsed = u128::from(now_ns.saturating_sub(since_ns));
    // elapsed * F / 1e9 < elapsed because F < 1e9, so the result fits in u64.
    (elapsed * u128::from(PIT_FREQ_HZ) / NS_PER_SEC) as u64
}

/// The first instant at which at least `ticks` ticks have elapsed since
/// `since_ns`, saturated at the end of the u64 timeline.
fn instant_of_tick(since_ns: u64, ticks: u128) -> u64 {
    let offset = (ticks * NS_PER_SEC).div_ceil(u128::from(PIT_FREQ_HZ));
    u64::try_from(u128::from(since_ns) + offset).unwrap_or(u64::MAX)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Channel {
    mode: u8,
    access: PitAccess,
    reload: u32,
    counter: PitCounter,
    write_lo: Option<u8>,
    read_hi_next: bool,
    latch: Option<u16>,
}

impl Channel {
    /// The 8254's power-on state is undefined; a stopped counter is the one
    /// that cannot surprise a guest with an interrupt it did not program.
    const POWER_ON: Channel = Channel {
        mode: 0,
        access: PitAccess::LoHi,
        reload: MAX_RELOAD,
        counter: PitCounter::Stopped { value: 0 },
        write_lo: None,
        read_hi_next: false,
        latch: None,
    };

    fn is_periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    fn count_at(&self, now_ns: u64) -> u16 {
        let since_ns = match self.counter {
            PitCounter::Stopped { value } => return value,
            PitCounter::Running { since_ns } => since_ns,
        };
        let ticks = ticks_between(since_ns, now_ns);
        let reload = u64::from(self.reload);
        let count = match self.mode {
            2 => reload - ticks % reload,
            // Square wave: the count drops by two per tick, twice a period.
            3 => {
                let half = reload.div_ceil(2);
                reload - 2 * (ticks % half)
            }
            // One-shot modes keep counting down through zero.
            _ => reload.wrapping_sub(ticks),
        };
        // The counting element is 16 bits wide: a reload of 65536 reads as 0
        // and a one-shot counter wraps past zero to 0xffff.
        count as u16
    }

    /// Output rising edges (the ones that raise IRQ0) since the counter started.
    fn edges_at(&self, now_ns: u64) -> u64 {
        let PitCounter::Running { since_ns } = self.counter else {
            return 0;
        };
        let ticks = ticks_between(since_ns, now_ns);
        let reload = u64::from(self.reload);
        if self.is_periodic() {
            ticks / reload
        } else {
            u64::from(ticks >= reload)
        }
    }

    /// When the output edge after the first `seen` ones happens, if ever.
    fn next_edge_ns(&self, seen: u64) -> Option<u64> {
        let PitCounter::Running { since_ns } = self.counter else {
            return None;
        };
        if !self.is_periodic() && seen > 0 {
            return None;
        }
        let ticks = u128::from(seen + 1) * u128::from(self.reload);
        Some(instant_of_tick(since_ns, ticks))
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        let [lo, hi] = self
            .latch
            .unwrap_or_else(|| self.count_at(now_ns))
            .to_le_bytes();
        match self.access {
            PitAccess::LoByte => {
                self.latch = None;
                lo
            }
            PitAccess::HiByte => {
                self.latch = None;
                hi
            }
            PitAccess::LoHi if self.read_hi_next => {
                self.read_hi_next = false;
                self.latch = None;
                hi
            }
            PitAccess::LoHi => {
                self.read_hi_next = true;
                lo
            }
        }
    }

    /// A count byte. Returns whether the counter was (re)started.
    fn write(&mut self, channel: usize, value: u8, now_ns: u64) -> bool {
        let count = match self.access {
            PitAccess::LoByte => u16::from(value),
            PitAccess::HiByte => u16::from(value) << 8,
            PitAccess::LoHi => match self.write_lo.take() {
                None => {
                    self.write_lo = Some(value);
                    return false;
                }
                Some(lo) => u16::from_le_bytes([lo, value]),
            },
        };
        self.reload = if count == 0 {
            MAX_RELOAD
        } else {
            u32::from(count)
        };
        if matches!(self.mode, 1 | 5) {
            tracing::debug!(
                channel,
                mode = self.mode,
                "PIT count stored; this mode waits for a gate edge that never comes"
            );
            return false;
        }
        self.counter = PitCounter::Running { since_ns: now_ns };
        true
    }

    fn latch(&mut self, now_ns: u64) {
        // Further latch commands are ignored until the latched value is read.
        if self.latch.is_none() {
            self.latch = Some(self.count_at(now_ns));
        }
    }

    /// A control word selecting an access mode: the counter stops until its
    /// next count.
    fn program(&mut self, access: PitAccess, mode: u8, now_ns: u64) {
        *self = Channel {
            mode,
            access,
            reload: self.reload,
            counter: PitCounter::Stopped {
                value: self.count_at(now_ns),
            },
            write_lo: None,
            read_hi_next: false,
            latch: None,
        };
    }

    fn state(&self) -> PitChannelState {
        PitChannelState {
            mode: self.mode,
            access: self.access,
            reload: self.reload,
            counter: self.counter,
            write_lo: self.write_lo,
            read_hi_next: self.read_hi_next,
            latch: self.latch,
        }
    }

    fn from_state(channel: usize, state: &PitChannelState) -> Result<Self, PitError> {
        if state.mode > 5 {
            return Err(PitError::InvalidMode {
                channel,
                mode: state.mode,
            });
        }
        if !(1..=MAX_RELOAD).contains(&state.reload) {
            return Err(PitError::InvalidReload {
                channel,
                reload: state.reload,
            });
        }
        if state.access != PitAccess::LoHi && (state.write_lo.is_some() || state.read_hi_next) {
            return Err(PitError::FlipFlopWithoutLoHi {
                channel,
                access: state.access,
            });
        }
        if matches!(state.mode, 1 | 5) && matches!(state.counter, PitCounter::Running { .. }) {
            return Err(PitError::RunningWithoutGate {
                channel,
                mode: state.mode,
            });
        }
        Ok(Channel {
            mode: state.mode,
            access: state.access,
            reload: state.reload,
            counter: state.counter,
            write_lo: state.write_lo,
            read_hi_next: state.read_hi_next,
            latch: state.latch,
        })
    }
}

/// The three-channel 8254.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pit {
    channels: [Channel; 3],
    irq0_edges_seen: u64,
    irq0_unreported_ns: Option<u64>,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// All channels stopped, as if never programmed.
    pub fn new() -> Self {
        Pit {
            channels: [Channel::POWER_ON; 3],
            irq0_edges_seen: 0,
            irq0_unreported_ns: None,
        }
    }

    /// Accounts for channel 0 edges up to `now_ns`, so that reprogramming the
    /// channel cannot lose an edge that has not been polled yet.
    fn catch_up_irq0(&mut self, now_ns: u64) {
        let channel = &self.channels[0];
        let edges = channel.edges_at(now_ns);
        if edges > self.irq0_edges_seen {
            self.irq0_unreported_ns = self
                .irq0_unreported_ns
                .or_else(|| channel.next_edge_ns(self.irq0_edges_seen));
            self.irq0_edges_seen = edges;
        }
    }

    /// Counter reads depend on `now_ns`: the recorder must log the value.
    pub fn pio_read(&mut self, port: u16, now_ns: u64) -> u8 {
        match port {
            PIT_CHANNEL0..=0x42 => self.channels[usize::from(port - PIT_CHANNEL0)].read(now_ns),
            PIT_COMMAND => 0xff,
            _ => {
                tracing::warn!(port, "PIT read from a port it does not decode");
                0xff
            }
        }
    }

    pub fn pio_write(&mut self, port: u16, value: u8, now_ns: u64) {
        match port {
            PIT_CHANNEL0..=0x42 => {
                let channel = usize::from(port - PIT_CHANNEL0);
                if channel == 0 {
                    self.catch_up_irq0(now_ns);
                }
                if self.channels[channel].write(channel, value, now_ns) && channel == 0 {
                    self.irq0_edges_seen = 0;
                }
            }
            PIT_COMMAND => self.write_control(value, now_ns),
            _ => tracing::warn!(port, value, "PIT write to a port it does not decode"),
        }
    }

    fn write_control(&mut self, value: u8, now_ns: u64) {
        let select = value >> 6;
        if select == SELECT_READ_BACK {
            tracing::warn!(value, "PIT read-back command not modelled; ignored");
            return;
        }
        let channel = usize::from(select);
        let access = match (value >> 4) & 3 {
            ACCESS_LATCH => {
                self.channels[channel].latch(now_ns);
                return;
            }
            1 => PitAccess::LoByte,
            2 => PitAccess::HiByte,
            _ => PitAccess::LoHi,
        };
        if value & CONTROL_BCD != 0 {
            tracing::warn!(
                channel,
                value,
                "PIT BCD counting not modelled; counting in binary"
            );
        }
        // Modes 6 and 7 are the 8254's aliases of 2 and 3.
        let mode = match (value >> 1) & 7 {
            mode @ 6..=7 => mode - 4,
            mode => mode,
        };
        if channel == 0 {
            self.catch_up_irq0(now_ns);
            self.irq0_edges_seen = 0;
        }
        self.channels[channel].program(access, mode, now_ns);
    }

    /// Whether channel 0's output rose at least once since the last poll.
    /// Several edges coalesce into one, as they would in the PIC's IRR bit.
    pub fn poll_irq0(&mut self, now_ns: u64) -> bool {
        self.catch_up_irq0(now_ns);
        self.irq0_unreported_ns.take().is_some()
    }

    /// When the next IRQ0 edge that [`Pit::poll_irq0`] has not reported is
    /// due: possibly in the past (poll now), `None` when channel 0 will not
    /// produce one (stopped, or a one-shot that has fired).
    pub fn next_irq0_ns(&self) -> Option<u64> {
        self.irq0_unreported_ns
            .or_else(|| self.channels[0].next_edge_ns(self.irq0_edges_seen))
    }

    pub fn state(&self) -> PitState {
        PitState {
            channels: [
                self.channels[0].state(),
                self.channels[1].state(),
                self.channels[2].state(),
            ],
            irq0_edges_seen: self.irq0_edges_seen,
            irq0_unreported_ns: self.irq0_unreported_ns,
        }
    }

    pub fn from_state(state: &PitState) -> Result<Self, PitError> {
        let [c0, c1, c2] = &state.channels;
        let channels = [
            Channel::from_state(0, c0)?,
            Channel::from_state(1, c1)?,
            Channel::from_state(2, c2)?,
        ];
        let edges = state.irq0_edges_seen;
        match channels[0].counter {
            PitCounter::Stopped { .. } if edges != 0 => {
                return Err(PitError::EdgesWhileStopped { edges })
            }
            PitCounter::Running { .. } if !channels[0].is_periodic() && edges > 1 => {
                return Err(PitError::OneShotEdges {
                    mode: channels[0].mode,
                    edges,
                })
            }
            _ => {}
        }
        Ok(Pit {
            channels,
            irq0_edges_seen: edges,
            irq0_unreported_ns: state.irq0_unreported_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 1193182 / 100, the divisor docs/guest-abi.md asks for.
    const DIVISOR: u16 = 11931;
    const START: u64 = 1_000_000;

    /// start + ceil(k * 11931 * 1e9 / 1193182), computed independently.
    fn edge(k: u64) -> u64 {
        START
            + match k {
                1 => 9_999_313,
                2 => 19_998_626,
                3 => 29_997_939,
                5 => 49_996_564,
                6 => 59_995_877,
                _ => unreachable!("no precomputed edge {k}"),
            }
    }

    fn guest_programmed() -> Pit {
        let mut pit = Pit::new();
        let [lo, hi] = DIVISOR.to_le_bytes();
        pit.pio_write(PIT_COMMAND, 0x34, START - 10);
        pit.pio_write(PIT_CHANNEL0, lo, START - 5);
        pit.pio_write(PIT_CHANNEL0, hi, START);
        pit
    }

    fn read_lohi(pit: &mut Pit, port: u16, now_ns: u64) -> u16 {
        let lo = pit.pio_read(port, now_ns);
        let hi = pit.pio_read(port, now_ns);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn unprogrammed_pit_never_interrupts() {
        let mut pit = Pit::new();
        assert_eq!(pit.next_irq0_ns(), None);
        assert!(!pit.poll_irq0(u64::MAX));
    }

    #[test]
    fn guest_programming_runs_at_100_hz() {
        let mut pit = guest_programmed();
        let state = pit.state();
        assert_eq!(state.channels[0].mode, 2);
        assert_eq!(state.channels[0].access, PitAccess::LoHi);
        assert_eq!(state.channels[0].reload, u32::from(DIVISOR));
        assert_eq!(
            state.channels[0].counter,
            PitCounter::Running { since_ns: START }
        );

        assert_eq!(pit.next_irq0_ns(), Some(edge(1)));
        assert!(!pit.poll_irq0(START));
        assert!(!pit.poll_irq0(edge(1) - 1));
        assert_eq!(pit.next_irq0_ns(), Some(edge(1)));
        assert!(pit.poll_irq0(edge(1)));
        assert!(!pit.poll_irq0(edge(1)));
        assert_eq!(pit.next_irq0_ns(), Some(edge(2)));

        // Four more periods pass unpolled: one report, then quiet.
        assert!(pit.poll_irq0(edge(5) + 1));
        assert!(!pit.poll_irq0(edge(5) + 2));
        assert_eq!(pit.next_irq0_ns(), Some(edge(6)));
    }

    #[test]
    fn control_word_alone_does_not_start_counting() {
        let mut pit = Pit::new();
        pit.pio_write(PIT_COMMAND, 0x34, 0);
        pit.pio_write(PIT_CHANNEL0, 0x9b, 0);
        assert_eq!(pit.next_irq0_ns(), None);
        assert!(!pit.poll_irq0(1_000_000_000));
    }

    #[test]
    fn reprogramming_keeps_an_unpolled_edge() {
        let mut pit = guest_programmed();
        pit.pio_write(PIT_COMMAND, 0x34, edge(2) + 7);
        assert_eq!(pit.next_irq0_ns(), Some(edge(1)));
        assert!(pit.poll_irq0(edge(2) + 8));
        assert!(!pit.poll_irq0(edge(2) + 9));
        assert_eq!(
            pit.next_irq0_ns(),
            None,
            "stopped until the count is written"
        );

        let now = edge(2) + 10;
        pit.pio_write(PIT_CHANNEL0, 0x00, now);
        pit.pio_write(PIT_CHANNEL0, 0x00, now);
        // A count of 0 is 65536: 65536e9 / 1193182 ns, rounded up.
        assert_eq!(pit.next_irq0_ns(), Some(now + 54_925_402));
        assert_eq!(read_lohi(&mut pit, PIT_CHANNEL0, now), 0);
    }

    #[test]
    fn counter_counts_down_and_reloads_in_mode_2() {
        let mut pit = guest_programmed();
        assert_eq!(read_lohi(&mut pit, PIT_CHANNEL0, START), DIVISOR);
        // 100 ticks take 83_809.5 ns.
        assert_eq!(
            read_lohi(&mut pit, PIT_CHANNEL0, START + 83_809),
            DIVISOR - 99
        );
        assert_eq!(
            read_lohi(&mut pit, PIT_CHANNEL0, START + 83_810),
            DIVISOR - 100
        );
        assert_eq!(read_lohi(&mut pit, PIT_CHANNEL0, edge(1) - 1), 1);
        assert_eq!(read_lohi(&mut pit, PIT_CHANNEL0, edge(1)), DIVISOR);
    }

    #[test]
    fn latch_freezes_the_value_for_a_lohi_read() {
        let mut pit = guest_programmed();
        pit.pio_write(PIT_COMMAND, 0x00, START + 83_810);
        // A second latch before the read does not overwrite the first.
        pit.pio_write(PIT_COMMAND, 0x00, START + 200_000);
        assert_eq!(pit.pio_read(PIT_CHANNEL0, START + 300_000), 0x37);
        assert_eq!(pit.pio_read(PIT_CHANNEL0, START + 400_000), 0x2e);
        assert_eq!(
            read_lohi(&mut pit, PIT_CHANNEL0, START + 83_809),
            DIVISOR - 99,
            "the latch is released after its high byte"
        );
        assert_eq!(DIVISOR - 100, 0x2e37);
    }

    #[test]
    fn single_byte_access_modes() {
        let mut pit = Pit::new();
        pit.pio_write(PIT_COMMAND, 0x94, 0); // channel 2, lobyte, mode 2
        pit.pio_write(0x42, 200, 0);
        assert_eq!(pit.pio_read(0x42, 0), 200);
        assert_eq!(pit.pio_read(0x42, 0), 200, "no flip-flop in lobyte access");
        pit.pio_write(PIT_COMMAND, 0x64, 0); // channel 1, hibyte, mode 2
        pit.pio_write(0x41, 0x12, 0);
        assert_eq!(pit.state().channels[1].reload, 0x1200);
        assert_eq!(pit.pio_read(0x41, 0), 0x12);
        assert_eq!(pit.next_irq0_ns(), None, "only channel 0 drives IRQ0");
        assert!(!pit.poll_irq0(u64::MAX));
    }

    #[test]
    fn mode_0_fires_once_at_terminal_count() {
        let mut pit = Pit::new();
        pit.pio_write(PIT_COMMAND, 0x30, 0);
        pit.pio_write(PIT_CHANNEL0, 0xe8, 0);
        pit.pio_write(PIT_CHANNEL0, 0x03, START);
        // 1000 ticks: ceil(1000e9 / 1193182) ns.
        let terminal = START + 838_096;
        assert_eq!(pit.next_irq0_ns(), Some(terminal));
        assert!(!pit.poll_irq0(terminal - 1));
        assert!(pit.poll_irq0(terminal));
        assert_eq!(pit.next_irq0_ns(), None);
        assert!(!pit.poll_irq0(terminal + 10_000_000_000));
        // The counter wraps through zero and keeps counting.
        assert_eq!(read_lohi(&mut pit, PIT_CHANNEL0, START + 843_125), 0xfffa);

        // A new count re-arms the one-shot.
        pit.pio_write(PIT_CHANNEL0, 0x0a, terminal);
        pit.pio_write(PIT_CHANNEL0, 0x00, terminal);
        assert!(pit.next_irq0_ns().is_some_and(|t| t > terminal));
    }

    #[test]
    fn mode_3_counts_by_two() {
        let mut pit = Pit::new();
        pit.pio_write(PIT_COMMAND, 0x16, 0); // channel 0, lobyte, mode 3
        pit.pio_write(PIT_CHANNEL0, 10, 0);
        let tick = |n: u64| instant_of_tick(0, u128::from(n));
        let values: Vec<u8> = [0, 1, 4, 5, 9, 10]
            .into_iter()
            .map(|n| pit.pio_read(PIT_CHANNEL0, tick(n)))
            .collect();
        assert_eq!(values, [10, 8, 2, 10, 2, 10]);
        assert_eq!(pit.next_irq0_ns(), Some(tick(10)));
        assert!(pit.poll_irq0(tick(10)));
    }

    #[test]
    fn gated_modes_never_count() {
        let mut pit = Pit::new();
        pit.pio_write(PIT_COMMAND, 0x32, 0); // mode 1
        pit.pio_write(PIT_CHANNEL0, 0x10, 0);
        pit.pio_write(PIT_CHANNEL0, 0x00, 0);
        assert_eq!(pit.next_irq0_ns(), None);
        assert!(!pit.poll_irq0(u64::MAX));
        assert_eq!(pit.state().channels[0].reload, 0x10);
    }

    #[test]
    fn aliases_and_bcd_are_accepted() {
        let mut pit = Pit::new();
        pit.pio_write(PIT_COMMAND, 0x3d, 0); // mode 6 (= 2), BCD
        assert_eq!(pit.state().channels[0].mode, 2);
        pit.pio_write(PIT_COMMAND, 0x3e, 0); // mode 7 (= 3)
        assert_eq!(pit.state().channels[0].mode, 3);
    }

    #[test]
    fn time_going_backwards_saturates() {
        let mut pit = guest_programmed();
        assert!(pit.poll_irq0(edge(2)));
        assert!(!pit.poll_irq0(0));
        assert_eq!(read_lohi(&mut pit, PIT_CHANNEL0, 0), DIVISOR);
        assert_eq!(pit.next_irq0_ns(), Some(edge(3)));
        assert!(!pit.poll_irq0(edge(2)));
    }

    #[test]
    fn far_future_times_saturate() {
        let mut pit = Pit::new();
        pit.pio_write(PIT_COMMAND, 0x34, 0);
        pit.pio_write(PIT_CHANNEL0, 0x01, u64::MAX - 1);
        pit.pio_write(PIT_CHANNEL0, 0x00, u64::MAX - 1);
        assert_eq!(pit.next_irq0_ns(), Some(u64::MAX));
        assert!(!pit.poll_irq0(u64::MAX));
        pit.pio_read(PIT_CHANNEL0, u64::MAX);
    }

    #[test]
    fn command_port_reads_all_ones_and_garbage_is_ignored() {
        let mut pit = guest_programmed();
        assert_eq!(pit.pio_read(PIT_COMMAND, START), 0xff);
        assert_eq!(pit.pio_read(0x44, START), 0xff);
        let before = pit.state();
        pit.pio_write(0x44, 0x34, START);
        pit.pio_write(PIT_COMMAND, 0xc2, START); // read-back
        assert_eq!(pit.state(), before);
    }

    #[test]
    fn every_byte_on_every_port_is_survivable() {
        for port in 0x3f..=0x44 {
            let mut pit = guest_programmed();
            for value in 0..=u8::MAX {
                let now = u64::from(value) * 3_000_000;
                pit.pio_write(port, value, now);
                pit.pio_write(PIT_CHANNEL0, value, now);
                for read_port in 0x40..=0x43 {
                    pit.pio_read(read_port, now);
                }
                pit.poll_irq0(now);
                pit.next_irq0_ns();
                assert_eq!(Pit::from_state(&pit.state()).as_ref(), Ok(&pit));
            }
        }
    }

    #[test]
    fn state_round_trip_mid_access() {
        let mut pit = guest_programmed();
        pit.pio_write(PIT_COMMAND, 0x00, START + 83_810);
        pit.pio_read(PIT_CHANNEL0, START + 83_811);
        pit.pio_write(PIT_COMMAND, 0xb0, edge(1) + 1); // channel 2, lohi, mode 0
        pit.pio_write(0x42, 0x55, edge(1) + 2);
        let state = pit.state();
        assert_eq!(state.channels[0].latch, Some(DIVISOR - 100));
        assert!(state.channels[0].read_hi_next);
        assert_eq!(state.channels[2].write_lo, Some(0x55));

        let mut restored = Pit::from_state(&state).expect("valid state");
        assert_eq!(restored, pit);
        for now in [edge(1) + 3, edge(2), edge(5)] {
            assert_eq!(
                restored.pio_read(PIT_CHANNEL0, now),
                pit.pio_read(PIT_CHANNEL0, now)
            );
            assert_eq!(restored.poll_irq0(now), pit.poll_irq0(now));
            assert_eq!(restored.next_irq0_ns(), pit.next_irq0_ns());
        }
        assert_eq!(restored, pit);
    }

    /// A way to spoil a good state, and the error it must cause.
    type Corruption = (fn(&mut PitState), PitError);

    #[test]
    fn from_state_rejects_impossible_states() {
        let good = guest_programmed().state();
        let cases: Vec<Corruption> = vec![
            (
                |s| s.channels[1].mode = 6,
                PitError::InvalidMode {
                    channel: 1,
                    mode: 6,
                },
            ),
            (
                |s| s.channels[0].reload = 0,
                PitError::InvalidReload {
                    channel: 0,
                    reload: 0,
                },
            ),
            (
                |s| s.channels[2].reload = 0x1_0001,
                PitError::InvalidReload {
                    channel: 2,
                    reload: 0x1_0001,
                },
            ),
            (
                |s| {
                    s.channels[2].access = PitAccess::HiByte;
                    s.channels[2].read_hi_next = true;
                },
                PitError::FlipFlopWithoutLoHi {
                    channel: 2,
                    access: PitAccess::HiByte,
                },
            ),
            (
                |s| s.channels[0].mode = 5,
                PitError::RunningWithoutGate {
                    channel: 0,
                    mode: 5,
                },
            ),
            (
                |s| {
                    s.channels[0].counter = PitCounter::Stopped { value: 3 };
                    s.irq0_edges_seen = 4;
                },
                PitError::EdgesWhileStopped { edges: 4 },
            ),
            (
                |s| {
                    s.channels[0].mode = 4;
                    s.irq0_edges_seen = 2;
                },
                PitError::OneShotEdges { mode: 4, edges: 2 },
            ),
        ];
        for (corrupt, expected) in cases {
            let mut state = good.clone();
            corrupt(&mut state);
            assert_eq!(Pit::from_state(&state), Err(expected));
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u16, u8),
        Read(u16),
        Poll,
    }

    fn op() -> impl Strategy<Value = Op> {
        let port = prop_oneof![4 => 0x40u16..=0x43, 1 => any::<u16>()];
        prop_oneof![
            (port.clone(), any::<u8>()).prop_map(|(p, v)| Op::Write(p, v)),
            port.prop_map(Op::Read),
            Just(Op::Poll),
        ]
    }

    proptest! {
        #[test]
        fn random_guest_traffic_keeps_state_restorable(
            ops in proptest::collection::vec((op(), 0u64..20_000_000), 0..200),
        ) {
            let mut pit = guest_programmed();
            let mut now = START;
            let mut monotonic = true;
            for (op, step) in ops {
                // Mostly forwards, occasionally backwards.
                if step % 17 == 0 {
                    now = now.saturating_sub(step);
                    monotonic = false;
                } else {
                    now += step;
                }
                match op {
                    Op::Write(port, value) => pit.pio_write(port, value, now),
                    Op::Read(port) => {
                        pit.pio_read(port, now);
                    }
                    Op::Poll => {
                        let due = pit.next_irq0_ns().is_some_and(|t| t <= now);
                        let fired = pit.poll_irq0(now);
                        if monotonic {
                            prop_assert_eq!(fired, due);
                        }
                    }
                }
                let restored = Pit::from_state(&pit.state());
                prop_assert_eq!(restored.as_ref(), Ok(&pit));
            }
        }
    }
}
