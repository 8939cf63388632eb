//! Injecting a trial's faults into its running cluster, each at its time
//! and the ones that need a moment (a transfer, an output) at that moment.

use super::*;

#[derive(Clone, Debug)]
pub(super) enum Action {
    /// Starts fault `n` of the schedule.
    Start(FaultKind),
    Kill(String),
    Cont(String),
    RestartArbiter,
    ContArbiter,
    Heal,
    DatagramsOff,
}

pub(super) struct Injector<'a> {
    pub(super) cluster: &'a mut Cluster,
    pub(super) spares: Vec<Process>,
    /// The log channel proxies of the servers started after the first
    /// primary (whose own is the cluster's), by server: whoever is primary,
    /// its log channel goes through one.
    pub(super) log_proxies: Vec<(String, Proxy)>,
    /// Restart every server that ends as a spare with a fresh id.
    pub(super) pool: bool,
    /// Servers that ended and were replaced.
    pub(super) replaced: BTreeSet<String>,
    pub(super) last_replenish: Instant,
    pub(super) skipped: Vec<Skipped>,
    pub(super) strikes: Vec<Strike>,
    pub(super) down_by_design: Option<Strike>,
    pub(super) proxies: Vec<UdpProxy>,
    pub(super) routes: Routes,
    pub(super) launcher: Launcher,
    pub(super) membership: Membership,
    pub(super) dir: PathBuf,
    pub(super) time_limit: Duration,
    pub(super) seed: u64,
    pub(super) spares_started: u32,
    pub(super) arbiter: std::sync::Arc<dyn arbiter::Arbiter>,
    pub(super) vm_id: String,
    pub(super) view: Option<View>,
    pub(super) failure_timeout: Duration,
    pub(super) start: Instant,
    pub(super) queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    pub(super) actions: Vec<Action>,
    pub(super) injected: Vec<Injected>,
    pub(super) killed: Vec<String>,
    pub(super) last_heal: Instant,
}

impl Injector<'_> {
    pub(super) fn push(&mut self, at: Instant, fault: usize, action: Action) {
        let n = self.actions.len();
        self.actions.push(action);
        self.queue.push(Reverse((at, fault as u64, n)));
    }

    pub(super) fn note(&mut self, fault: usize, what: String) {
        let t_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        println!("    {:>7.3} s  {what}", t_ms / 1000.0);
        self.injected.push(Injected { t_ms, fault, what });
    }

    /// The arbiter's view now, or the last one it gave.
    pub(super) fn view(&mut self) -> Option<View> {
        if let Ok(v) = self.arbiter.query(&self.vm_id) {
            self.view = Some(v);
        }
        self.view.clone()
    }

    pub(super) fn resolve(&mut self, target: Target) -> Option<String> {
        match target {
            Target::Primary => self.view()?.primary.map(|m| m.id),
            Target::Backup => self.view()?.backup.map(|m| m.id),
            Target::Spare => {
                let view = self.view();
                let named = |id: &str| {
                    view.as_ref().is_some_and(|v| {
                        v.primary.as_ref().is_some_and(|m| m.id == id)
                            || v.backup.as_ref().is_some_and(|m| m.id == id)
                    })
                };
                self.spares
                    .iter_mut()
                    .filter_map(|p| p.running().then(|| p.name().to_owned()))
                    .find(|n| !named(n))
            }
            Target::Arbiter => Some("arbiter".into()),
        }
    }

    /// The backup that holds the VM's state, if the VM is protected: the
    /// view's primary runs and reported `protected` for this view and its
    /// backup, with no failure or departure of its backup since, and that
    /// backup runs.
    pub(super) fn protected(&mut self) -> Option<String> {
        let view = self.view()?;
        let primary = view.primary.as_ref()?.id.clone();
        let backup = view.backup.as_ref()?.id.clone();
        let p = self.process(&primary)?;
        if !p.running() || !protected_in(&p.events(), view.number, &backup) {
            return None;
        }
        self.process(&backup)?.running().then_some(backup)
    }

    /// The log channel proxy in front of `name`'s log listener.
    pub(super) fn log_proxy_of(&self, name: &str) -> Option<&Proxy> {
        if self.cluster.primary.name() == name {
            return self.cluster.proxy.as_ref();
        }
        self.log_proxies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }

    /// The current primary's log channel proxy.
    pub(super) fn primary_log_proxy(&mut self) -> Option<&Proxy> {
        let name = self.resolve(Target::Primary)?;
        self.log_proxy_of(&name)
    }

    /// Starts a spare in the place of every server that has ended.
    pub(super) fn replenish(&mut self) {
        if !self.pool || self.last_replenish.elapsed() < Duration::from_millis(50) {
            return;
        }
        self.last_replenish = Instant::now();
        let mut ended = Vec::new();
        let replaced = &self.replaced;
        for p in [&mut self.cluster.primary, &mut self.cluster.backup]
            .into_iter()
            .chain(self.spares.iter_mut())
        {
            if !replaced.contains(p.name()) && !p.running() {
                let how = p.exited().map_or("ended".into(), describe_exit);
                ended.push((p.name().to_owned(), how));
            }
        }
        for (name, how) in ended {
            self.replaced.insert(name.clone());
            self.note(usize::MAX, format!("{name} ended ({how})"));
            if let Err(e) = self.start_spare(usize::MAX) {
                self.note(usize::MAX, format!("cannot start a spare: {e:#}"));
            }
        }
    }

    pub(super) fn skip(&mut self, fault: usize, why: String) {
        let t_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.note(fault, format!("skipped: {why}"));
        self.skipped.push(Skipped { t_ms, fault, why });
    }

    pub(super) fn process(&mut self, name: &str) -> Option<&mut Process> {
        if self.cluster.primary.name() == name {
            return Some(&mut self.cluster.primary);
        }
        if self.cluster.backup.name() == name {
            return Some(&mut self.cluster.backup);
        }
        self.spares.iter_mut().find(|p| p.name() == name)
    }

    pub(super) fn signal(&mut self, fault: usize, name: &str, signal: Signal) -> bool {
        let result = match self.process(name) {
            Some(p) => {
                if p.running() {
                    p.signal(signal).map(|()| p.pid())
                } else {
                    Err(anyhow::anyhow!("{name} has ended"))
                }
            }
            None => Err(anyhow::anyhow!("no server {name}")),
        };
        match result {
            Ok(pid) => {
                if signal == Signal::SIGKILL {
                    self.killed.push(name.to_owned());
                }
                self.note(fault, format!("{signal} -> {name} (pid {pid})"));
                true
            }
            Err(e) => {
                self.note(fault, format!("{signal} -> {name}: not sent, {e:#}"));
                false
            }
        }
    }

    pub(super) fn signal_target(
        &mut self,
        fault: usize,
        target: Target,
        signal: Signal,
    ) -> Option<String> {
        if target == Target::Arbiter {
            return self.signal_arbiter(fault, signal).then(|| "arbiter".into());
        }
        match self.resolve(target) {
            Some(name) => self.signal(fault, &name, signal).then_some(name),
            None => {
                self.note(fault, format!("{signal} -> {target}: the view names none"));
                None
            }
        }
    }

    pub(super) fn signal_arbiter(&mut self, fault: usize, signal: Signal) -> bool {
        let what = match (&mut self.cluster.arbiter, signal) {
            (ClusterArbiter::Etcd(etcd), Signal::SIGKILL) => match etcd.leader() {
                Some(m) => match etcd.kill(m) {
                    Ok(()) => format!("SIGKILL -> etcd leader {}", etcd.name(m)),
                    Err(e) => format!("SIGKILL -> etcd leader: {e}"),
                },
                None => "SIGKILL -> etcd leader: none elected".into(),
            },
            (ClusterArbiter::Etcd(_), s) => format!("{s} -> etcd: not supported"),
            (ClusterArbiter::Builtin { process, .. }, Signal::SIGKILL) => {
                process.kill();
                format!("SIGKILL -> arbiter (pid {})", process.pid())
            }
            (ClusterArbiter::Builtin { process, .. }, s) => match process.signal(s) {
                Ok(()) => format!("{s} -> arbiter (pid {})", process.pid()),
                Err(e) => format!("{s} -> arbiter: {e:#}"),
            },
        };
        self.note(fault, what);
        true
    }

    pub(super) fn restart_arbiter(&mut self, fault: usize) {
        let result = match &mut self.cluster.arbiter {
            ClusterArbiter::Etcd(etcd) => (0..etcd.members())
                .filter(|m| !etcd.is_running(*m))
                .try_for_each(|m| etcd.restart(m))
                .map_err(anyhow::Error::from),
            ClusterArbiter::Builtin { .. } => self.cluster.restart_arbiter(),
        };
        match result {
            Ok(()) => self.note(fault, "arbiter restarted".into()),
            Err(e) => self.note(fault, format!("arbiter restart failed: {e:#}")),
        }
    }

    pub(super) fn start_spare(&mut self, fault: usize) -> Result<()> {
        self.spares_started += 1;
        let name = format!("spare{}", self.spares_started);
        let role = Role::Backup {
            membership: self.membership.clone(),
        };
        let mut config = ServerConfig::new(&name, role, free_udp_addr()?, self.time_limit);
        config.dir = Some(self.dir.clone());
        let (log_proxy, extra) = log_listener()?;
        config.extra = extra;
        let process = self.launcher.start(&config)?;
        self.log_proxies.push((name.clone(), log_proxy));
        let proxy = UdpProxy::start(
            config.address,
            self.seed ^ u64::from(self.spares_started) << 32,
        )?;
        self.routes.add(config.address, proxy.addr(), &name);
        self.proxies.push(proxy);
        self.note(
            fault,
            format!("spare {name} started (pid {})", process.pid()),
        );
        self.spares.push(process);
        Ok(())
    }

    pub(super) fn set_datagrams(&self, faults: DatagramFaults) {
        for p in &self.proxies {
            p.set_faults(faults);
        }
    }

    /// Does `action`; what it sets off later goes on the queue.
    pub(super) fn act(&mut self, fault: usize, action: Action) {
        let now = Instant::now();
        let ms = Duration::from_millis;
        match action {
            Action::Kill(name) => {
                self.signal(fault, &name, Signal::SIGKILL);
            }
            Action::Cont(name) => {
                self.signal(fault, &name, Signal::SIGCONT);
                self.last_heal = Instant::now();
            }
            Action::RestartArbiter => {
                self.restart_arbiter(fault);
                self.last_heal = Instant::now();
            }
            Action::ContArbiter => {
                self.signal_arbiter(fault, Signal::SIGCONT);
                self.last_heal = Instant::now();
            }
            Action::Heal => {
                for p in self
                    .cluster
                    .proxy
                    .iter()
                    .chain(self.log_proxies.iter().map(|(_, p)| p))
                {
                    p.heal();
                }
                self.note(fault, "log channel healed".into());
                self.last_heal = Instant::now();
            }
            Action::DatagramsOff => {
                self.set_datagrams(DatagramFaults::default());
                self.note(fault, "client datagrams clean again".into());
                self.last_heal = Instant::now();
            }
            Action::Start(kind) => self.start_fault(fault, kind, now, ms),
        }
    }

    pub(super) fn start_fault(
        &mut self,
        fault: usize,
        kind: FaultKind,
        now: Instant,
        ms: fn(u64) -> Duration,
    ) {
        let kills_a_server = matches!(
            kind,
            FaultKind::Kill {
                target: Target::Primary | Target::Backup | Target::Spare,
                ..
            }
        );
        if kills_a_server && self.arbiter.query(&self.vm_id).is_err() {
            // The last view the arbiter gave may be stale (a failover since),
            // so a kill aimed by it may hit whoever holds the VM's state
            // now: with the backup killed as "a spare" soon after, nobody
            // would (seed 544 of the first kv-user campaign).
            return self.skip(
                fault,
                format!(
                    "{}: the arbiter is down, so who holds the VM's state cannot be told",
                    kind.name()
                ),
            );
        }
        if costs_the_primary(&kind) && self.protected().is_none() {
            let view = self
                .view
                .as_ref()
                .map_or("no view".into(), ToString::to_string);
            return self.skip(
                fault,
                format!(
                    "{} would cost the last server holding the VM's state: no backup holds it ({view})",
                    kind.name()
                ),
            );
        }
        match kind {
            FaultKind::Kill {
                target,
                restart_after_ms,
            } => {
                // A killed server comes back as a spare with a fresh id
                // ([`Injector::replenish`]).
                self.signal_target(fault, target, Signal::SIGKILL);
                self.last_heal = Instant::now();
                if let (Target::Arbiter, Some(after)) = (target, restart_after_ms) {
                    self.push(now + ms(after), fault, Action::RestartArbiter)
                }
            }
            FaultKind::Pause { target, for_ms } => {
                if let Some(name) = self.signal_target(fault, target, Signal::SIGSTOP) {
                    let cont = if target == Target::Arbiter {
                        Action::ContArbiter
                    } else {
                        Action::Cont(name)
                    };
                    self.push(now + ms(for_ms), fault, cont);
                }
            }
            FaultKind::Cut { for_ms } => {
                if let Some(p) = self.primary_log_proxy() {
                    p.partition();
                }
                self.note(fault, "log channel cut".into());
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::CutOneWay { direction, for_ms } => {
                if let Some(p) = self.primary_log_proxy() {
                    p.partition_one_way(direction == Direction::ToPrimary);
                }
                self.note(fault, format!("log channel cut {direction}"));
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::Delay { ms: d, for_ms } => {
                if let Some(p) = self.primary_log_proxy() {
                    p.delay(ms(d), ms(d));
                }
                self.note(fault, format!("log channel delayed {d} ms each way"));
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::Stall { direction, for_ms } => {
                let ways = match direction {
                    None => [true, true],
                    Some(Direction::ToPrimary) => [true, false],
                    Some(Direction::ToBackup) => [false, true],
                };
                if let Some(p) = self.primary_log_proxy() {
                    p.stall(now + ms(for_ms), ways);
                }
                self.note(fault, "log channel stalled".into());
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            FaultKind::Datagrams { faults, for_ms } => {
                self.set_datagrams(faults);
                self.note(fault, "client datagrams faulty".into());
                self.push(now + ms(for_ms), fault, Action::DatagramsOff);
            }
            FaultKind::KillPrimaryAfterOutput => {
                let Some(name) = self.resolve(Target::Primary) else {
                    return self.note(fault, "no primary to kill".into());
                };
                let service = self.process(&name).and_then(|p| p.address().ok());
                let proxy = self.proxies.iter().find(|p| Some(p.target()) == service);
                if let Some(proxy) = proxy {
                    let before = proxy.counts().replies;
                    let deadline = Instant::now() + MOMENT_WAIT;
                    while proxy.counts().replies == before && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                self.signal(fault, &name, Signal::SIGKILL);
                self.last_heal = Instant::now();
            }
            FaultKind::KillPrimaryDuringCut { kill_after_ms } => {
                let Some(name) = self.resolve(Target::Primary) else {
                    return self.note(fault, "no primary to kill".into());
                };
                if let Some(p) = self.log_proxy_of(&name) {
                    p.partition();
                }
                self.note(fault, "log channel cut".into());
                self.push(now + ms(kill_after_ms), fault, Action::Kill(name));
                let heal = now + self.failure_timeout * 2;
                self.push(heal, fault, Action::Heal);
            }
            FaultKind::KillPrimaryWhileBackupPaused {
                kill_after_ms,
                for_ms,
            } => {
                let (Some(primary), Some(backup)) =
                    (self.resolve(Target::Primary), self.resolve(Target::Backup))
                else {
                    return self.note(fault, "no pair to fault".into());
                };
                if self.signal(fault, &backup, Signal::SIGSTOP) {
                    self.push(now + ms(for_ms), fault, Action::Cont(backup));
                }
                self.push(now + ms(kill_after_ms), fault, Action::Kill(primary));
            }
            FaultKind::ArbiterDownDuringClaim { down_ms } => {
                let (Some(primary), backup) =
                    (self.resolve(Target::Primary), self.resolve(Target::Backup))
                else {
                    return self.note(fault, "no primary to kill".into());
                };
                self.signal(fault, &primary, Signal::SIGKILL);
                let deadline = Instant::now() + MOMENT_WAIT;
                if let Some(backup) = backup {
                    while Instant::now() < deadline {
                        let claiming = self.process(&backup).is_some_and(|p| {
                            p.has_event(|e| {
                                matches!(
                                    e,
                                    ServerEvent::FailureDetected { .. }
                                        | ServerEvent::CaughtUp { .. }
                                )
                            })
                        });
                        if claiming {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                self.signal_arbiter(fault, Signal::SIGKILL);
                self.push(Instant::now() + ms(down_ms), fault, Action::RestartArbiter);
            }
            FaultKind::DuringTransfer {
                fault: what,
                after_ms,
            } => self.during_transfer(fault, what, after_ms),
        }
    }

    /// Waits for a backup to connect to the primary's log channel (killing
    /// the backup first if the VM is protected, so that the primary brings
    /// up a spare), and strikes `after_ms` later.
    pub(super) fn during_transfer(&mut self, fault: usize, what: TransferFault, after_ms: u64) {
        let ms = Duration::from_millis;
        let Some(primary) = self.resolve(Target::Primary) else {
            return self.skip(fault, "no primary".into());
        };
        let Some(before) = self.log_proxy_of(&primary).map(Proxy::connections) else {
            return self.skip(fault, format!("{primary} has no log channel proxy"));
        };
        if let Some(backup) = self.protected() {
            self.signal(fault, &backup, Signal::SIGKILL);
        }
        let deadline = Instant::now() + TRANSFER_WAIT;
        loop {
            if self
                .log_proxy_of(&primary)
                .is_some_and(|p| p.connections() > before)
            {
                break;
            }
            if Instant::now() > deadline {
                return self.skip(
                    fault,
                    format!("no backup began joining {primary} within {TRANSFER_WAIT:?}"),
                );
            }
            self.run_due();
            std::thread::sleep(Duration::from_micros(200));
        }
        let connected = Instant::now();
        let connected_ns = unix_ns();
        // The view naming the joiner is older than its connection; the
        // last one the arbiter gave may be older still.
        let joiner = self
            .view()
            .and_then(|v| v.backup)
            .map(|m| m.id)
            .filter(|b| *b != primary)
            .filter(|b| self.process(b).is_some_and(Process::running));
        std::thread::sleep((connected + ms(after_ms)).saturating_duration_since(Instant::now()));
        let now = Instant::now();
        let strike = Strike {
            fault,
            t_ns: unix_ns(),
            primary: primary.clone(),
            joiner: joiner.clone(),
            what: what.to_string(),
            connected_ns,
            moment: String::new(),
        };
        self.note(
            fault,
            format!(
                "{} connected to {primary}'s log channel; {} ms later: {what}",
                joiner.as_deref().unwrap_or("a backup"),
                after_ms
            ),
        );
        let joiner_or_skip = |this: &mut Self| {
            if joiner.is_none() {
                this.note(fault, "the view names no joining backup".into());
            }
            joiner.clone()
        };
        match what {
            TransferFault::KillPrimary => {
                if self.signal(fault, &primary, Signal::SIGKILL) {
                    self.down_by_design = Some(strike.clone());
                }
                self.last_heal = Instant::now();
            }
            TransferFault::PausePrimary { for_ms } => {
                if self.signal(fault, &primary, Signal::SIGSTOP) {
                    self.push(now + ms(for_ms), fault, Action::Cont(primary));
                }
            }
            TransferFault::KillBackup => {
                if let Some(j) = joiner_or_skip(self) {
                    self.signal(fault, &j, Signal::SIGKILL);
                    self.last_heal = Instant::now();
                }
            }
            TransferFault::PauseBackup { for_ms } => {
                if let Some(j) = joiner_or_skip(self) {
                    if self.signal(fault, &j, Signal::SIGSTOP) {
                        self.push(now + ms(for_ms), fault, Action::Cont(j));
                    }
                }
            }
            TransferFault::Stall { direction, for_ms } => {
                let ways = match direction {
                    None => [true, true],
                    Some(Direction::ToPrimary) => [true, false],
                    Some(Direction::ToBackup) => [false, true],
                };
                if let Some(p) = self.log_proxy_of(&primary) {
                    p.stall(now + ms(for_ms), ways);
                }
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
            TransferFault::Cut { for_ms } => {
                if let Some(p) = self.log_proxy_of(&primary) {
                    p.partition();
                }
                self.push(now + ms(for_ms), fault, Action::Heal);
            }
        }
        self.strikes.push(strike);
    }

    /// While a fault waits for its moment: what else falls due meanwhile
    /// (an arbiter's restart, a SIGCONT, a heal, a side-lane fault), but
    /// no other fault that waits for a transfer.
    pub(super) fn run_due(&mut self) {
        self.replenish();
        while let Some(Reverse((at, fault, n))) = self.queue.peek().copied() {
            let waits = matches!(
                self.actions[n],
                Action::Start(FaultKind::DuringTransfer { .. })
            );
            if at > Instant::now() || waits {
                return;
            }
            self.queue.pop();
            let action = self.actions[n].clone();
            self.act(fault as usize, action);
        }
    }

    /// Runs what is left on the queue, each when it is due.
    pub(super) fn run_all(&mut self) {
        while let Some(Reverse((at, _, _))) = self.queue.peek().copied() {
            self.run_until(at);
        }
    }

    /// Runs every action due by `until`, replacing servers that end
    /// meanwhile.
    pub(super) fn run_until(&mut self, until: Instant) {
        loop {
            self.replenish();
            let next = self.queue.peek().map(|Reverse((at, _, _))| *at);
            let now = Instant::now();
            match next {
                Some(at) if at <= now => {
                    if let Some(Reverse((_, fault, n))) = self.queue.pop() {
                        let action = self.actions[n].clone();
                        self.act(fault as usize, action);
                    }
                }
                _ if now >= until => return,
                _ => {
                    let wake = next.unwrap_or(until).min(until);
                    let nap = wake.saturating_duration_since(now);
                    std::thread::sleep(nap.min(Duration::from_millis(20)));
                }
            }
        }
    }
}

/// What kills the primary, the one server with the VM's state when the VM
/// is unprotected (a fault during a transfer is chosen for its moment).
fn costs_the_primary(kind: &FaultKind) -> bool {
    matches!(
        kind,
        FaultKind::Kill {
            target: Target::Primary,
            ..
        } | FaultKind::KillPrimaryAfterOutput
            | FaultKind::KillPrimaryDuringCut { .. }
            | FaultKind::KillPrimaryWhileBackupPaused { .. }
            | FaultKind::ArbiterDownDuringClaim { .. }
    )
}
