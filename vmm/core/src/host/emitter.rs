//! Where a guest's outputs go when they are released: the console, the
//! network and a capture file. A plain run releases at once; a primary's
//! outputs pass through the output gate (`ft::output_gate`) first.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use logchannel::OutputKind;

use crate::host::capture::Capture;
use crate::host::net_backend::NetBackend;

pub struct Emitter {
    pub net: Option<Arc<NetBackend>>,
    pub console: Box<dyn Write + Send>,
    pub capture: Option<Capture>,
    /// Frames released to the network, for status reports.
    pub served: Arc<AtomicU64>,
}

impl Emitter {
    pub fn emit(&mut self, kind: OutputKind, bytes: &[u8]) -> std::io::Result<()> {
        match kind {
            OutputKind::Console => {
                if let Err(e) = self
                    .console
                    .write_all(bytes)
                    .and_then(|_| self.console.flush())
                {
                    tracing::warn!("writing the guest console failed: {e}");
                }
            }
            OutputKind::Transmit => {
                if let Some(c) = &mut self.capture {
                    c.write(bytes)?;
                }
                if let Some(net) = &self.net {
                    net.transmit(bytes);
                }
                self.served.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.console.flush();
        match &mut self.capture {
            Some(c) => c.flush(),
            None => Ok(()),
        }
    }
}
