//! Logs and entries for the tests.

use logchannel::{
    Digest, DigestReason, Entry, Event, LogHeader, LogWriter, OutputKind, PageHash, Position,
    Registers, ReplayConfig,
};
use proptest::collection::vec;
use proptest::prelude::*;

pub fn header() -> LogHeader {
    LogHeader::new(
        "vm-test",
        logchannel::image_hash(b"guest image"),
        64 << 20,
        ReplayConfig {
            digest_interval: 10_000,
            tick_hz: 100,
            patching: true,
            extra: [("mac".to_string(), "52:54:00:12:34:56".to_string())].into(),
        },
    )
}

pub fn digest(reason: DigestReason, rip: u64) -> Digest {
    Digest {
        reason,
        regs: Registers {
            rip,
            rsp: 0x7ff0,
            rflags: 0x202,
            ..Registers::default()
        },
        mem_hash: 0x0123_4567_89ab_cdef,
        dirty_pages: vec![
            PageHash {
                page: 0x100,
                hash: 0xdead_beef,
            },
            PageHash {
                page: 0x101,
                hash: 0xfeed_f00d_0000_0001,
            },
        ],
        output_hash: matches!(reason, DigestReason::Console | DigestReason::Transmit)
            .then_some(0x5555),
    }
}

/// A log with one entry of every kind, a packet long enough to need a
/// two-byte frame length, and an End entry.
pub fn every_kind() -> Vec<Entry> {
    let events = vec![
        Event::Rdtsc { value: 0x1a2b_3c4d },
        Event::Rdtscp {
            value: 0x1a2b_ffff,
            aux: 1,
        },
        Event::Rdrand {
            value: 0x9e37_79b9_7f4a_7c15,
            ok: true,
        },
        Event::Rdseed {
            value: 0,
            ok: false,
        },
        Event::Rdmsr {
            msr: 0x10,
            value: 0x1a2c_0000,
        },
        Event::PitRead {
            port: 0x40,
            value: 0x12,
        },
        Event::Interrupt { vector: 0x20 },
        Event::Packet {
            desc_head: 3,
            frame: (0..300u32).map(|i| i as u8).collect(),
        },
        Event::Digest(digest(DigestReason::Transmit, 0x10_2000)),
        Event::Progress { exits: 1300 },
        Event::End {
            exits: 1400,
            reason: "guest halted".into(),
        },
    ];
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| Entry {
            seq: i as u64 + 1,
            pos: Position {
                exits: 1000 + 40 * i as u64,
                rip: 0x10_2000 + 0x10 * i as u64,
            },
            event,
        })
        .collect()
}

/// Writes `entries` after the standard header and returns the bytes and the
/// offset where each entry's frame starts (plus the end offset).
pub fn write_log(entries: &[Entry]) -> (Vec<u8>, Vec<usize>) {
    let mut w = LogWriter::new(Vec::new(), &header()).expect("header");
    let mut starts = vec![w.get_ref().len()];
    for e in entries {
        w.append_entry(e).expect("append");
        starts.push(w.get_ref().len());
    }
    (w.into_inner().expect("flush"), starts)
}

/// A small deterministic generator, so that the size figures are the same on
/// every run.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub const HLT_RIP: u64 = 0x10_0a41;
const TIMER_RDTSC_RIP: u64 = 0x10_0c12;
const REPLY_RDTSC_RIP: u64 = 0x10_1f80;
const REPLY_RDRAND_RIP: u64 = 0x10_1fa3;

/// What the default guest produces while idle and serving occasional
/// requests: a 100 Hz timer interrupt taken at its `hlt`, an `rdtsc` in the
/// timer handler, an `rdtsc` (and, with `rdrand`, a nonce) per request,
/// and a progress mark every 100 ms. The TSC runs at 2.5 GHz. Only the
/// brief's kinds (rdtsc, interrupt, progress) unless `with_rdrand`.
pub fn realistic_mix(ticks: u64, with_rdrand: bool) -> Vec<Entry> {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut out = Vec::new();
    let mut exits = 0u64;
    let mut tsc = 0x0000_0123_4567_0000u64;
    let mut push = |exits: u64, rip: u64, event: Event| {
        let seq = out.len() as u64 + 1;
        out.push(Entry {
            seq,
            pos: Position { exits, rip },
            event,
        });
    };
    for tick in 0..ticks {
        // The tick's HLT exit, then the handler's PIC and PIT port I/O.
        exits += 1 + rng.below(3);
        tsc += 25_000_000 + rng.below(20_000);
        push(exits, HLT_RIP, Event::Interrupt { vector: 0x20 });
        exits += 2 + rng.below(3);
        tsc += 30_000 + rng.below(10_000);
        push(exits, TIMER_RDTSC_RIP, Event::Rdtsc { value: tsc });
        if rng.below(10) < 3 {
            exits += 5 + rng.below(20);
            tsc += 200_000 + rng.below(100_000);
            push(exits, REPLY_RDTSC_RIP, Event::Rdtsc { value: tsc });
            if with_rdrand {
                exits += 1;
                push(
                    exits,
                    REPLY_RDRAND_RIP,
                    Event::Rdrand {
                        value: rng.next(),
                        ok: true,
                    },
                );
            }
        }
        if tick % 10 == 9 {
            push(exits, HLT_RIP, Event::Progress { exits });
        }
    }
    out
}

pub fn arb_digest() -> impl Strategy<Value = Digest> {
    (
        prop_oneof![
            Just(DigestReason::Periodic),
            Just(DigestReason::Console),
            Just(DigestReason::Transmit),
            Just(DigestReason::End),
        ],
        any::<[u64; 18]>(),
        any::<u64>(),
        vec((any::<u64>(), any::<u64>()), 0..8),
        any::<Option<u64>>(),
    )
        .prop_map(|(reason, regs, mem_hash, pages, output_hash)| Digest {
            reason,
            regs: Registers::from_array(regs),
            mem_hash,
            dirty_pages: pages
                .into_iter()
                .map(|(page, hash)| PageHash { page, hash })
                .collect(),
            output_hash,
        })
}

/// Any event but End, which only ends a log.
pub fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        any::<u64>().prop_map(|value| Event::Rdtsc { value }),
        (any::<u64>(), any::<u32>()).prop_map(|(value, aux)| Event::Rdtscp { value, aux }),
        (any::<u64>(), any::<bool>()).prop_map(|(value, ok)| Event::Rdrand { value, ok }),
        (any::<u64>(), any::<bool>()).prop_map(|(value, ok)| Event::Rdseed { value, ok }),
        (any::<u32>(), any::<u64>()).prop_map(|(msr, value)| Event::Rdmsr { msr, value }),
        (any::<u16>(), any::<u8>()).prop_map(|(port, value)| Event::PitRead { port, value }),
        any::<u8>().prop_map(|vector| Event::Interrupt { vector }),
        (any::<u16>(), vec(any::<u8>(), 0..300))
            .prop_map(|(desc_head, frame)| Event::Packet { desc_head, frame }),
        arb_digest().prop_map(Event::Digest),
        (any::<bool>(), any::<u32>(), any::<u32>()).prop_map(|(console, hash, state)| {
            Event::Output {
                kind: if console {
                    OutputKind::Console
                } else {
                    OutputKind::Transmit
                },
                hash,
                state,
            }
        }),
        any::<u64>().prop_map(|exits| Event::Progress { exits }),
        (any::<u64>(), any::<u64>()).prop_map(|(regs, mem)| Event::AsyncPoint { regs, mem }),
    ]
}

/// Exit deltas are mostly small, as in a real log, but sometimes huge, to
/// reach every varint width.
fn arb_exit_delta() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..300u64, 1 => any::<u32>().prop_map(u64::from), 1 => 0..u64::MAX >> 8]
}

/// A valid entry sequence: contiguous from 1, exits never decreasing, and
/// maybe an End entry last.
pub fn arb_entries() -> impl Strategy<Value = Vec<Entry>> {
    (
        vec((arb_exit_delta(), any::<u64>(), arb_event()), 0..40),
        proptest::option::of((any::<u64>(), ".{0,20}")),
    )
        .prop_map(|(steps, end)| {
            let mut exits = 0u64;
            let mut entries: Vec<Entry> = steps
                .into_iter()
                .enumerate()
                .map(|(i, (delta, rip, event))| {
                    exits = exits.saturating_add(delta);
                    Entry {
                        seq: i as u64 + 1,
                        pos: Position { exits, rip },
                        event,
                    }
                })
                .collect();
            if let Some((end_exits, reason)) = end {
                entries.push(Entry {
                    seq: entries.len() as u64 + 1,
                    pos: Position { exits, rip: 0 },
                    event: Event::End {
                        exits: end_exits,
                        reason,
                    },
                });
            }
            entries
        })
}
