//! A byte flipped on the way to the backup: the backup refuses the frame,
//! names it, and never delivers a damaged entry.

use crate::support::{addr, bounded, entries, hello, listener, relaxed, seed, Proxy, Rng};
use logchannel::{ChannelError, FrameError, LogReceiver, LogSender, Role};
use std::thread;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn a_flipped_byte_is_refused_with_its_frame_and_offset() {
    let seed = seed("a_flipped_byte_is_refused_with_its_frame_and_offset");
    bounded(LIMIT, move || {
        let mut rng = Rng::new(seed);
        // Past the handshake, well inside the stream of entries.
        let flip_at = 1_000 + rng.below(200_000);
        let mask = 1u8 << rng.below(8);
        eprintln!("flipping mask {mask:#04x} at byte {flip_at}");
        let expected = entries(seed, 100_000);

        let l = listener();
        let proxy = Proxy::new(addr(&l));
        proxy.flip(flip_at, mask);
        let target = proxy.addr();
        let accepting =
            thread::spawn(move || LogSender::accept(&l, hello(Role::Primary), relaxed()));
        let receiver =
            LogReceiver::connect(target, hello(Role::Backup), relaxed()).expect("backup");
        let sender = accepting.join().expect("thread").expect("primary");

        let (err, delivered) = thread::scope(|scope| {
            // Keep entries coming, so that a length made longer by the flip
            // is followed by enough bytes to end the frame.
            scope.spawn(|| {
                for e in &expected {
                    if !sender
                        .wait_window(Duration::from_secs(10))
                        .is_ok_and(|ok| ok)
                        || sender.send(e.pos, e.event.clone()).is_err()
                    {
                        return;
                    }
                }
            });
            let mut delivered = 0;
            loop {
                match receiver.recv(Duration::from_secs(20)) {
                    Ok(Some(e)) => {
                        assert_eq!(e, expected[delivered], "a damaged entry was delivered");
                        delivered += 1;
                    }
                    Ok(None) => panic!("the stream stalled after {delivered} entries"),
                    Err(err) => break (err, delivered),
                }
            }
        });
        eprintln!("{delivered} entries delivered, then: {err}");

        let ChannelError::Frame { source, .. } = &err else {
            panic!("expected a frame error, got {err:?}");
        };
        let (frame, offset) = match **source {
            FrameError::Crc { frame, offset, .. }
            | FrameError::SequenceGap { frame, offset, .. }
            | FrameError::TooLong { frame, offset, .. }
            | FrameError::Decode { frame, offset, .. } => (frame, offset),
            ref other => panic!("unexpected frame error {other:?}"),
        };
        let text = err.to_string();
        assert!(
            text.contains(&format!("frame {frame} at offset {offset}")),
            "{text}"
        );
        // The refused frame is the one holding the flipped byte (a frame is
        // at most a few kilobytes here).
        assert!(
            offset <= flip_at && flip_at - offset < 4096,
            "frame at {offset}, flip at {flip_at}"
        );
        // The failure is final.
        assert!(receiver.recv(Duration::ZERO).is_err());
        assert!(receiver.primary_failed());
    });
}
