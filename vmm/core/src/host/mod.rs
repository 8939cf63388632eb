//! What the VMM touches outside the guest: the UDP network backend and the
//! Ethernet/UDP frames it exchanges with the guest, the pcap capture, where
//! released outputs go, the events file and the distributions a server
//! measures on itself.

pub mod capture;
pub mod emitter;
pub mod events;
pub mod frame;
pub mod histogram;
pub mod net_backend;
