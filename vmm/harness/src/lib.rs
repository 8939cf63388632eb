//! Everything around the VMM that runs whole clusters of real `ftvm`
//! processes: the one cluster launcher, `ftvm demo`, `ftvm chaos`, the benchmarks, the
//! clients' history, its linearizability check and the timeline picture.

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod history;
pub mod launcher;
pub mod linearizability;
pub mod load;
pub mod procstat;
pub mod report;
pub mod stats;
pub mod timeline;
