//! `ftvm arbiter`: the arbiter crate's server, stopped by SIGINT/SIGTERM.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use ftvm_core::run::stop::StopSignal;

use crate::stop::stop_on_signals;

// `::arbiter` is the crate; this module shares its name.
pub fn run(args: &::arbiter::cli::ArbiterArgs) -> Result<ExitCode> {
    let stop = StopSignal::new();
    stop_on_signals(stop.clone())?;
    // The arbiter crate knows nothing of the VMM's StopSignal: it stops on
    // a flag.
    let flag = Arc::new(AtomicBool::new(false));
    {
        let flag = flag.clone();
        std::thread::spawn(move || {
            let _ = stop.wake().recv();
            flag.store(true, Ordering::SeqCst);
        });
    }
    // Announced only once the state directory is locked and loaded and the
    // address bound, so that "listening" is never followed by a failure to.
    let server = ::arbiter::cli::bind(args)?;
    eprintln!(
        "ftvm arbiter: listening on {}, state in {}",
        server.local_addr(),
        args.state.display()
    );
    server.serve(&flag)?;
    Ok(ExitCode::SUCCESS)
}
