//! `ftvm bench`: measurements against real `ftvm` processes, reported so that
//! BENCHMARKS.md can quote them as ratios against a baseline from the same
//! run.

pub mod channel;
pub mod etcd;
pub mod ft;
pub mod join;
pub mod kv;
pub mod precise;
pub mod profile;
pub mod record;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(clap::Subcommand)]
pub enum BenchWhat {
    /// Closed-loop KV load against `ftvm run`: ops/s, latency, exit rates.
    Kv(kv::KvBenchArgs),
    /// Record overhead (`record` vs `run`), replay speed (replay vs
    /// recorded wall time, idle and loaded) and log size.
    Record(record::RecordBenchArgs),
    /// FT overhead (primary+backup vs `run`), the output rule's latency,
    /// backup lag, log bandwidth, memory under lag, failover time.
    Ft(ft::FtBenchArgs),
    /// The log channel alone on loopback: entries per second, and send to
    /// ack with the writer thread against `flush`.
    Channel(channel::ChannelBenchArgs),
    /// The arbiter on etcd against the built-in one: failover time (also
    /// with the etcd leader killed at the failure) and test-and-set
    /// latency.
    Etcd(etcd::EtcdBenchArgs),
    /// A backup joining a serving primary by state transfer, ten times:
    /// the pause at the cut, transfer time, rounds, bytes against touched
    /// memory, client throughput during the transfer, both sides' RSS.
    Join(join::JoinBenchArgs),
    /// Interrupts between exits (race, kv-race): record against run,
    /// replay against the recorded time, breakpoint hits and single steps
    /// per interrupt, log bytes per second.
    Precise(precise::PreciseBenchArgs),
    /// Single-steps a few requests in the guest and attributes each
    /// instruction to a function: instructions and exits per request.
    Profile(profile::ProfileArgs),
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.what {
        BenchWhat::Kv(kv) => kv::bench_kv(kv),
        BenchWhat::Record(r) => record::bench_record(r),
        BenchWhat::Ft(f) => ft::bench_ft(f),
        BenchWhat::Channel(c) => channel::bench_channel(c),
        BenchWhat::Etcd(e) => etcd::bench_etcd(e),
        BenchWhat::Precise(p) => precise::bench_precise(p),
        BenchWhat::Join(j) => join::bench_join(j),
        BenchWhat::Profile(p) => profile::bench_profile(p),
    }
}
