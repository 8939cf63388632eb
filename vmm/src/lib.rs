//! ftvm: a KVM virtual machine monitor built for deterministic record,
//! replay and primary/backup fault tolerance.

pub mod backup;
pub mod bench;
pub mod bench_channel;
pub mod bench_ft;
pub mod boot;
pub mod capture;
pub mod demo;
pub mod devices;
pub mod digest;
pub mod events;
pub mod exit;
pub mod frame;
pub mod guest_image;
pub mod histogram;
pub mod history;
pub mod kv;
pub mod layout;
pub mod linearizability;
pub mod live;
pub mod loader;
pub mod membership;
pub mod memory;
pub mod net_backend;
pub mod output;
pub mod patch;
pub mod primary;
pub mod record;
pub mod replay;
pub mod runloop;
pub mod scan;
pub mod stop;
pub mod timeline;
pub mod vm;
