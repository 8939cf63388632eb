//! Every server the demo runs: the first pair and its arbiter (a
//! [`Cluster`]), and the spares beside it, among them the killed servers
//! that came back with a new id.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::args::server_name;
use crate::launcher::{
    describe_exit, free_udp_addr, Cluster, ClusterEvents, Guest, Launcher, Membership, Process,
    Role, ServerConfig,
};

pub(super) struct Servers {
    /// The arbiter, the first primary and its first backup.
    pub cluster: Cluster,
    /// Spares and restarted servers, in the order they were started.
    pub spares: Vec<Process>,
    launcher: Launcher,
    membership: Membership,
    guest: Guest,
    dir: PathBuf,
    consoles: bool,
    time_limit: Duration,
}

impl Servers {
    pub(super) fn new(
        cluster: Cluster,
        launcher: Launcher,
        membership: Membership,
        guest: Guest,
        dir: PathBuf,
        consoles: bool,
        time_limit: Duration,
    ) -> Servers {
        Servers {
            cluster,
            spares: Vec::new(),
            launcher,
            membership,
            guest,
            dir,
            consoles,
            time_limit,
        }
    }

    /// Starts one more `ftvm backup` with the next id: it waits as a spare
    /// until the arbiter names it backup. It must be called on the thread
    /// that stops the servers (a process dies with the thread that
    /// started it).
    pub(super) fn start_spare(&mut self) -> Result<&Process> {
        // vmm1 and vmm2 are the cluster's; the rest count on from there.
        let name = server_name(self.spares.len() + 3);
        let role = Role::Backup {
            membership: self.membership.clone(),
        };
        let mut config = ServerConfig::new(&name, role, free_udp_addr()?, self.time_limit);
        config.dir = Some(self.dir.clone());
        config.guest = self.guest.clone();
        config.console = self.consoles;
        let process = self.launcher.start(&config)?;
        self.spares.push(process);
        Ok(&self.spares[self.spares.len() - 1])
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Process> {
        [&self.cluster.primary, &self.cluster.backup]
            .into_iter()
            .chain(self.spares.iter())
    }

    pub(super) fn all_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        [&mut self.cluster.primary, &mut self.cluster.backup]
            .into_iter()
            .chain(self.spares.iter_mut())
    }

    pub(super) fn get(&self, name: &str) -> Option<&Process> {
        self.all().find(|p| p.name() == name)
    }

    pub(super) fn get_mut(&mut self, name: &str) -> Option<&mut Process> {
        self.all_mut().find(|p| p.name() == name)
    }

    /// Every server's events so far, by name.
    pub(super) fn events(&self) -> ClusterEvents {
        ClusterEvents(
            self.all()
                .map(|p| (p.name().to_owned(), p.events()))
                .collect(),
        )
    }

    /// The address each server serves clients on, by name.
    pub(super) fn services(&self) -> BTreeMap<String, SocketAddr> {
        self.all()
            .filter_map(|p| Some((p.name().to_owned(), p.address().ok()?)))
            .collect()
    }

    /// SIGTERM to each server (spares first, then the pair and the
    /// arbiter), SIGKILL to those still running after `grace`; how each
    /// ended, by name.
    pub(super) fn stop(&mut self, grace: Duration) -> BTreeMap<String, String> {
        let mut exits = BTreeMap::new();
        for p in &mut self.spares {
            let _ = p.stop(grace);
            let how = p
                .exited()
                .map_or("status unknown".to_owned(), describe_exit);
            exits.insert(p.name().to_owned(), how);
        }
        exits.extend(self.cluster.stop(grace));
        exits
    }
}
