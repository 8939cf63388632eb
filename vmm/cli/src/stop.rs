//! Where a stop request comes from besides the run itself: a signal, or a
//! deadline.

use std::time::Duration;

use anyhow::{Context, Result};
use ftvm_core::run::stop::StopSignal;

/// SIGINT and SIGTERM become a stop request. They are blocked in every
/// thread (threads inherit the mask, so this runs before any is spawned)
/// and taken by one waiting thread, so that no handler runs in the middle
/// of the run loop.
pub fn stop_on_signals(stop: StopSignal) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("cannot block SIGINT/SIGTERM")?;
    std::thread::Builder::new()
        .name("ftvm-signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!("{sig} received, stopping");
                stop.request();
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Requests a stop once `after` has passed, for the modes that take no
/// timeout of their own.
pub fn stop_after(stop: &StopSignal, after: Duration) {
    let stop = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        stop.request();
    });
}
