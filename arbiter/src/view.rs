//! The view service and test-and-set as a pure state machine: no I/O, and
//! time is passed in, so that the rules can be tested exhaustively and the
//! server can persist a decision before anyone sees it. The rules
//! themselves ([`ping`], [`claim`], [`retired_by`]) are functions of one
//! VM's [`Record`] and of who is alive ([`Liveness`]), shared by the
//! built-in server ([`ViewService`]) and the etcd backend, so that both
//! decide alike.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info};

/// A server taking part in a VM's replication.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The server's identity. It names one incarnation of a server: a
    /// process that restarts without its state must use a new id.
    pub id: String,
    /// Where clients send their KV datagrams while this server is primary.
    pub service_addr: SocketAddr,
    /// Where this server's log channel listens while it is primary.
    #[serde(default)]
    pub log_addr: Option<SocketAddr>,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (service {}", self.id, self.service_addr)?;
        if let Some(log) = self.log_addr {
            write!(f, ", log {log}")?;
        }
        write!(f, ")")
    }
}

/// Who serves a VM. View 0, with neither member, means "no view yet".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct View {
    pub number: u64,
    pub primary: Option<Member>,
    pub backup: Option<Member>,
}

impl View {
    fn is_primary(&self, id: &str) -> bool {
        self.primary.as_ref().is_some_and(|p| p.id == id)
    }

    fn is_backup(&self, id: &str) -> bool {
        self.backup.as_ref().is_some_and(|b| b.id == id)
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = |m: &Option<Member>| m.as_ref().map_or("-".to_owned(), |m| m.id.clone());
        write!(
            f,
            "view {} (primary {}, backup {})",
            self.number,
            id(&self.primary),
            id(&self.backup)
        )
    }
}

/// The answer to a test-and-set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TasOutcome {
    /// The claimant won view N. `view` is the view the win created: number
    /// N + 1, the claim as its primary, no backup. It is the same on every
    /// retry of the winning claim, even after later views; the current
    /// view is what `ping` answers.
    Won { view: View },
    /// The claimant did not win; `view` is the current view.
    Lost {
        #[serde(flatten)]
        reason: LossReason,
        view: View,
    },
}

impl TasOutcome {
    pub fn won(&self) -> bool {
        matches!(self, TasOutcome::Won { .. })
    }

    pub fn view(&self) -> &View {
        match self {
            TasOutcome::Won { view } | TasOutcome::Lost { view, .. } => view,
        }
    }
}

/// Why a claim lost. Only [`LossReason::Decided`] is final for the claimed
/// view; the others are refusals that decide nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum LossReason {
    /// Somebody won this view already; `winner` is their claim.
    Decided { winner: Member },
    /// The claimed view is older than the current one and was left without
    /// a test-and-set (a backup was added). The claimant's picture of the
    /// VM is out of date.
    Stale,
    /// The claimant is neither the primary nor the backup of the view.
    NotMember,
    /// The claimant is the backup of a view its primary has not
    /// acknowledged, so the backup cannot be known to hold the VM's state.
    Unacknowledged,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ViewError {
    /// A request from beyond the arbiter's own history can only mean that
    /// its state was lost or belongs to another deployment; answering would
    /// risk a second primary for a view that already has one.
    #[error(
        "VM {vm:?}: the request names view {requested}, but the arbiter's current view is \
         {current}; it never answers for a view it has not created (was its state directory \
         lost or replaced?)"
    )]
    FutureView {
        vm: String,
        requested: u64,
        current: u64,
    },
}

/// What the built-in arbiter must never forget about one VM: what it
/// keeps on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct VmState {
    pub view: View,
    /// The primary of `view` has pinged with `view.number`.
    pub acknowledged: bool,
    /// Test-and-set winners, by the view they were claimed for.
    pub decided: BTreeMap<u64, Member>,
}

impl VmState {
    /// The invariants the state machine keeps, checked on what is read
    /// back from disk.
    pub fn check(&self) -> Result<(), String> {
        check_view(&self.view, self.acknowledged)?;
        if let Some((&last, _)) = self.decided.last_key_value() {
            if last >= self.view.number {
                return Err(format!(
                    "a test-and-set is recorded for view {last}, which is not older than the \
                     current view {}",
                    self.view.number
                ));
            }
        }
        Ok(())
    }
}

fn check_view(view: &View, acknowledged: bool) -> Result<(), String> {
    if view.number == 0 {
        if view.primary.is_some() || view.backup.is_some() || acknowledged {
            return Err("view 0 must have no members and no acknowledgement".into());
        }
    } else {
        let Some(primary) = &view.primary else {
            return Err(format!("view {} has no primary", view.number));
        };
        if view.is_backup(&primary.id) {
            return Err(format!(
                "view {} has {:?} as both primary and backup",
                view.number, primary.id
            ));
        }
    }
    for member in view.primary.iter().chain(&view.backup) {
        if member.id.is_empty() {
            return Err(format!(
                "view {} has a member with an empty id",
                view.number
            ));
        }
    }
    Ok(())
}

/// What the rules read and change of one VM on each request, whichever
/// backend keeps it: the built-in server assembles it from its state file
/// and its memory, the etcd backend keeps it in one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Record {
    pub view: View,
    /// The primary of `view` has pinged with its number and vouched for its
    /// backup, or the view has none.
    pub acknowledged: bool,
    /// The primary of `view` has pinged with its number, vouching or not.
    pub seen: bool,
    /// The latest view won by a claim; 0 if none was.
    pub last_won: u64,
}

impl Record {
    /// The invariants the rules keep, checked on what is read back from a
    /// store the arbiter does not own.
    pub fn check(&self) -> Result<(), String> {
        check_view(&self.view, self.acknowledged || self.seen)?;
        if self.acknowledged && !self.seen {
            return Err(format!(
                "view {} is acknowledged but not seen",
                self.view.number
            ));
        }
        if self.last_won > 0 && self.last_won >= self.view.number {
            return Err(format!(
                "view {} is recorded as won, which is not older than the current view {}",
                self.last_won, self.view.number
            ));
        }
        Ok(())
    }
}

/// Who is alive, as the rules need to know it. The built-in server keeps
/// the time of every ping in memory; the etcd backend has a key per server
/// that a lease removes when the server stops pinging.
pub(crate) trait Liveness {
    /// The servers heard within the liveness bound that are not retired,
    /// the most recently heard first (ties: the smaller id first), each
    /// with the view number of its last ping.
    fn alive(&self) -> Vec<(&Member, u64)>;
    /// Whether `id` is retired or was not heard within the liveness bound.
    fn gone(&self, id: &str) -> bool;
}

/// A change a ping made, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// The first ping of a VM made its sender primary of view 1.
    First,
    /// The primary acknowledged view `number`.
    Acknowledged { number: u64 },
    /// A live spare became backup of the next view, in the place of a gone
    /// backup if `replacing` names one.
    Named {
        spare: Member,
        replacing: Option<Member>,
    },
}

/// Step 1 of `ping` (see the README): refused before anything is recorded.
pub(crate) fn check_known(vm: &str, current: u64, view_known: u64) -> Result<(), ViewError> {
    if view_known > current {
        return Err(ViewError::FutureView {
            vm: vm.to_owned(),
            requested: view_known,
            current,
        });
    }
    Ok(())
}

/// Steps 3 to 6 of `ping` (see the README), once `me` is recorded as heard
/// (so that `alive` names it). Returns what changed, in order; the answer
/// is `record.view`.
pub(crate) fn ping(
    record: &mut Record,
    me: &Member,
    view_known: u64,
    backup_ready: bool,
    alive: &impl Liveness,
) -> Vec<Change> {
    if record.view.number == 0 {
        *record = Record {
            view: View {
                number: 1,
                primary: Some(me.clone()),
                backup: None,
            },
            acknowledged: false,
            seen: false,
            last_won: record.last_won,
        };
        return vec![Change::First];
    }
    let mut changes = Vec::new();
    if view_known == record.view.number && record.view.is_primary(&me.id) {
        record.seen = true;
        // Without a backup there is nobody to vouch for.
        if !record.acknowledged && (backup_ready || record.view.backup.is_none()) {
            record.acknowledged = true;
            changes.push(Change::Acknowledged {
                number: record.view.number,
            });
        }
    }
    // The 6.824 rule: the arbiter moves on from a view only once its
    // primary has pinged with its number.
    let named = match &record.view.backup {
        None if record.acknowledged => live_spare(record, alive),
        // A backup its primary has not vouched for holds nothing the VM
        // needs, and cannot win a claim; if it is gone, the view would
        // wait for it forever.
        Some(backup) if record.seen && !record.acknowledged && alive.gone(&backup.id) => {
            live_spare(record, alive)
        }
        _ => None,
    };
    if let Some(spare) = named {
        let replacing = record.view.backup.take();
        record.view = View {
            number: record.view.number + 1,
            primary: record.view.primary.take(),
            backup: Some(spare.clone()),
        };
        record.acknowledged = false;
        record.seen = false;
        changes.push(Change::Named { spare, replacing });
    }
    changes
}

/// The live spare the rules name. A server whose last ping named a view no
/// newer than the last view won by a claim has not learned of that
/// failover: it is most likely the member the winner displaced, resumed
/// after a freeze, and in any case it becomes a spare again by pinging
/// with a current number.
fn live_spare(record: &Record, alive: &impl Liveness) -> Option<Member> {
    alive
        .alive()
        .into_iter()
        .find(|(member, known)| {
            !record.view.is_primary(&member.id)
                && !record.view.is_backup(&member.id)
                && (*known == 0 || *known > record.last_won)
        })
        .map(|(member, _)| member.clone())
}

/// Logs a ping that was answered, with what it changed.
pub(crate) fn log_ping(
    vm: &str,
    me: &Member,
    view_known: u64,
    backup_ready: bool,
    changes: &[Change],
    view: &View,
) {
    for change in changes {
        match change {
            Change::First => info!(vm, "{view}: first server to ping"),
            Change::Acknowledged { number } => {
                info!(vm, "view {number} acknowledged by its primary")
            }
            Change::Named {
                spare,
                replacing: Some(gone),
            } => info!(
                vm,
                "{view}: backup {} was gone before its primary vouched for it; {} named instead",
                gone.id,
                spare.id
            ),
            Change::Named {
                replacing: None, ..
            } => info!(vm, "{view}: spare named backup"),
        }
    }
    debug!(vm, server = %me.id, view_known, backup_ready, "ping: {view}");
}

/// Decides a claim for view `view` (the README's table, in its order),
/// given the winner recorded for that view, if any. A first win makes
/// `record` the view it created.
pub(crate) fn claim(
    record: &mut Record,
    decided: Option<&Member>,
    vm: &str,
    view: u64,
    claimant: &Member,
) -> Result<TasOutcome, ViewError> {
    // A decision is forever, whatever happened to the views since.
    if let Some(winner) = decided {
        return Ok(if winner == claimant {
            TasOutcome::Won {
                view: won_view(view, winner),
            }
        } else {
            TasOutcome::Lost {
                reason: LossReason::Decided {
                    winner: winner.clone(),
                },
                view: record.view.clone(),
            }
        });
    }
    let current = record.view.number;
    if view > current {
        return Err(ViewError::FutureView {
            vm: vm.to_owned(),
            requested: view,
            current,
        });
    }
    let lost = |reason| {
        Ok(TasOutcome::Lost {
            reason,
            view: record.view.clone(),
        })
    };
    if view < current {
        return lost(LossReason::Stale);
    }
    // The primary holds the VM's state by definition, so its claim is
    // sound whether or not it has acknowledged the view; the backup's
    // claim is sound only once the primary has acknowledged the view that
    // named it (see the README).
    if record.view.is_backup(&claimant.id) && !record.acknowledged {
        return lost(LossReason::Unacknowledged);
    }
    if !record.view.is_primary(&claimant.id) && !record.view.is_backup(&claimant.id) {
        return lost(LossReason::NotMember);
    }
    *record = Record {
        view: won_view(view, claimant),
        acknowledged: false,
        seen: false,
        last_won: view,
    };
    Ok(TasOutcome::Won {
        view: record.view.clone(),
    })
}

/// The ids a claim retires once its outcome stands (a win only once it is
/// saved): a loser halts, and a winner claims because it took the other
/// member of `claimed` (the view current when the claim was decided) for
/// dead, so neither is named backup again, whatever it pings later.
pub(crate) fn retired_by(
    view: u64,
    claimant: &Member,
    claimed: &View,
    outcome: &TasOutcome,
) -> Vec<String> {
    // A VM nobody has pinged keeps no record, so that claims naming
    // arbitrary VMs cost the arbiter nothing.
    if claimed.number == 0 {
        return Vec::new();
    }
    match outcome {
        TasOutcome::Lost { .. } => vec![claimant.id.clone()],
        // The first answer of a win; a retry displaces nobody new.
        TasOutcome::Won { .. } if claimed.number == view => claimed
            .primary
            .iter()
            .chain(&claimed.backup)
            .filter(|member| member.id != claimant.id)
            .map(|member| member.id.clone())
            .collect(),
        TasOutcome::Won { .. } => Vec::new(),
    }
}

/// Logs a claim that was answered; `decided` if it decided the view now.
pub(crate) fn log_claim(
    vm: &str,
    view: u64,
    claimant: &Member,
    outcome: &TasOutcome,
    decided: bool,
) {
    match outcome {
        TasOutcome::Won { view: won } if decided => {
            info!(vm, claimant = %claimant, "test-and-set for view {view} won: {won}")
        }
        TasOutcome::Won { .. } => {
            debug!(vm, claimant = %claimant.id, "test-and-set for view {view}: the winner again")
        }
        TasOutcome::Lost { reason, .. } => {
            info!(vm, view, claimant = %claimant.id, ?reason, "test-and-set lost")
        }
    }
}

fn won_view(claimed: u64, winner: &Member) -> View {
    View {
        number: claimed + 1,
        primary: Some(winner.clone()),
        backup: None,
    }
}

/// How many retired ids a VM remembers; beyond this the oldest is
/// forgotten, so that claims under ever new ids cannot grow the arbiter's
/// memory without bound. A server that lost stops pinging (it halts), so
/// only the most recent losers matter.
pub(crate) const MAX_RETIRED: usize = 1024;

struct LastPing {
    member: Member,
    at: Instant,
    view_known: u64,
}

/// What the built-in arbiter knows of one VM only while it runs: lost on a
/// restart, and rebuilt from the next pings.
#[derive(Default)]
struct Heard {
    /// The servers heard within the liveness bound, by id.
    pings: HashMap<String, LastPing>,
    /// The number of the latest view whose primary has pinged with it,
    /// with or without vouching for its backup.
    seen: u64,
    /// Ids that lost a claim or were displaced by a won one: never named
    /// backup again (a loser halts; a server that comes back is a new
    /// incarnation with a new id).
    retired: HashSet<String>,
    retired_order: VecDeque<String>,
}

impl Heard {
    fn retire(&mut self, id: &str) {
        self.pings.remove(id);
        if self.retired.insert(id.to_owned()) {
            self.retired_order.push_back(id.to_owned());
            if self.retired_order.len() > MAX_RETIRED {
                if let Some(oldest) = self.retired_order.pop_front() {
                    self.retired.remove(&oldest);
                }
            }
        }
    }
}

/// [`Heard`] at one moment, as the rules read it.
struct HeardAt<'a> {
    heard: &'a Heard,
    now: Instant,
    bound: Duration,
    /// When the arbiter started: a member not heard since is given the
    /// bound from then, so that a restart alone declares nobody gone.
    started: Instant,
}

impl Liveness for HeardAt<'_> {
    fn alive(&self) -> Vec<(&Member, u64)> {
        let mut alive: Vec<(&String, &LastPing)> = self
            .heard
            .pings
            .iter()
            .filter(|(id, p)| {
                !self.heard.retired.contains(*id)
                    && self.now.saturating_duration_since(p.at) <= self.bound
            })
            .collect();
        alive.sort_by(|(a_id, a), (b_id, b)| b.at.cmp(&a.at).then_with(|| a_id.cmp(b_id)));
        alive
            .into_iter()
            .map(|(_, p)| (&p.member, p.view_known))
            .collect()
    }

    fn gone(&self, id: &str) -> bool {
        if self.heard.retired.contains(id) {
            return true;
        }
        let last = self.heard.pings.get(id).map_or(self.started, |p| p.at);
        self.now.saturating_duration_since(last) > self.bound
    }
}

/// The built-in arbiter's views: every VM's views, acknowledgements and
/// test-and-set winners, plus what is known only while it runs (who pinged
/// recently, who lost, which views their primary has seen).
pub(crate) struct ViewService {
    vms: BTreeMap<String, VmState>,
    heard: HashMap<String, Heard>,
    spare_timeout: Duration,
    /// When the first request was handled: the start of the liveness bound
    /// for members not heard since.
    started: Option<Instant>,
}

impl ViewService {
    /// `spare_timeout`: the liveness bound. A server not heard from for
    /// longer is not a live spare, and a backup its primary has not vouched
    /// for may be replaced.
    pub fn new(vms: BTreeMap<String, VmState>, spare_timeout: Duration) -> ViewService {
        ViewService {
            vms,
            heard: HashMap::new(),
            spare_timeout,
            started: None,
        }
    }

    pub fn vms(&self) -> &BTreeMap<String, VmState> {
        &self.vms
    }

    pub fn vm(&self, vm: &str) -> Option<&VmState> {
        self.vms.get(vm)
    }

    /// Puts back what [`ViewService::vm`] returned before a change that
    /// could not be persisted.
    pub fn restore(&mut self, vm: &str, state: Option<VmState>) {
        match state {
            Some(state) => self.vms.insert(vm.to_owned(), state),
            None => self.vms.remove(vm),
        };
    }

    pub fn query(&self, vm: &str) -> View {
        self.vms.get(vm).map(|s| s.view.clone()).unwrap_or_default()
    }

    /// A ping that vouches for the backup, as every ping did before
    /// `backup_ready` existed.
    #[cfg(test)]
    pub fn ping(
        &mut self,
        vm: &str,
        me: &Member,
        view_known: u64,
        now: Instant,
    ) -> Result<View, ViewError> {
        self.ping_as(vm, me, view_known, true, now)
    }

    pub fn ping_as(
        &mut self,
        vm: &str,
        me: &Member,
        view_known: u64,
        backup_ready: bool,
        now: Instant,
    ) -> Result<View, ViewError> {
        check_known(
            vm,
            self.vms.get(vm).map_or(0, |s| s.view.number),
            view_known,
        )?;
        let started = *self.started.get_or_insert(now);
        let bound = self.spare_timeout;
        let heard = self.heard.entry(vm.to_owned()).or_default();
        heard
            .pings
            .retain(|_, p| now.saturating_duration_since(p.at) <= bound);
        heard.pings.insert(
            me.id.clone(),
            LastPing {
                member: me.clone(),
                at: now,
                view_known,
            },
        );
        let state = self.vms.entry(vm.to_owned()).or_default();
        let mut record = record_of(state, heard);
        let changes = ping(
            &mut record,
            me,
            view_known,
            backup_ready,
            &HeardAt {
                heard,
                now,
                bound,
                started,
            },
        );
        if record.seen {
            heard.seen = record.view.number;
        }
        state.view = record.view;
        state.acknowledged = record.acknowledged;
        log_ping(vm, me, view_known, backup_ready, &changes, &state.view);
        Ok(state.view.clone())
    }

    /// A claim, decided and settled at once (see [`ViewService::claim`] and
    /// [`ViewService::settle_claim`]).
    #[cfg(test)]
    pub fn test_and_set(
        &mut self,
        vm: &str,
        view: u64,
        claimant: &Member,
    ) -> Result<TasOutcome, ViewError> {
        let claimed = self.query(vm);
        let outcome = self.claim(vm, view, claimant)?;
        self.settle_claim(vm, view, claimant, &claimed, &outcome);
        Ok(outcome)
    }

    /// Decides a claim: the part that is persisted before it is answered.
    pub fn claim(
        &mut self,
        vm: &str,
        view: u64,
        claimant: &Member,
    ) -> Result<TasOutcome, ViewError> {
        let Some(state) = self.vms.get_mut(vm) else {
            // Nobody has pinged this VM: it has no members, so the claim
            // is for a view it never had or by a non-member.
            return claim(&mut Record::default(), None, vm, view, claimant);
        };
        let mut record = record_of(state, self.heard.entry(vm.to_owned()).or_default());
        let decided = state.decided.get(&view).cloned();
        let outcome = claim(&mut record, decided.as_ref(), vm, view, claimant)?;
        let first_win = outcome.won() && decided.is_none();
        if first_win {
            state.decided.insert(view, claimant.clone());
            state.view = record.view;
            state.acknowledged = record.acknowledged;
        }
        log_claim(vm, view, claimant, &outcome, first_win);
        Ok(outcome)
    }

    /// What a claim that stands (it was persisted, or decided nothing)
    /// means for naming backups (see [`retired_by`]).
    pub fn settle_claim(
        &mut self,
        vm: &str,
        view: u64,
        claimant: &Member,
        claimed: &View,
        outcome: &TasOutcome,
    ) {
        let retired = retired_by(view, claimant, claimed, outcome);
        if retired.is_empty() {
            return;
        }
        let heard = self.heard.entry(vm.to_owned()).or_default();
        for id in retired {
            heard.retire(&id);
        }
    }
}

/// One VM's record as the rules read it: the state on disk, and which view
/// its primary has seen since the arbiter started.
fn record_of(state: &VmState, heard: &Heard) -> Record {
    Record {
        view: state.view.clone(),
        acknowledged: state.acknowledged,
        seen: state.acknowledged || (state.view.number > 0 && heard.seen == state.view.number),
        last_won: state.decided.last_key_value().map_or(0, |(&v, _)| v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TIMEOUT: Duration = Duration::from_millis(500);

    fn member(id: &str, port: u16) -> Member {
        Member {
            id: id.to_owned(),
            service_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log_addr: Some(SocketAddr::from(([127, 0, 0, 1], port + 1000))),
        }
    }

    fn service() -> ViewService {
        ViewService::new(BTreeMap::new(), TIMEOUT)
    }

    fn view(number: u64, primary: &Member, backup: Option<&Member>) -> View {
        View {
            number,
            primary: Some(primary.clone()),
            backup: backup.cloned(),
        }
    }

    #[test]
    fn ack_rule_holds_back_the_backup() {
        let (a, b) = (member("a", 1), member("b", 2));
        let mut s = service();
        let t = Instant::now();
        let v = s.ping("vm", &a, 0, t).unwrap();
        assert_eq!(
            (v.number, v.primary.as_ref(), v.backup.as_ref()),
            (1, Some(&a), None)
        );
        // b is heard, but view 1 is unacknowledged: it waits as a spare.
        assert_eq!(s.ping("vm", &b, 0, t).unwrap().number, 1);
        assert_eq!(s.ping("vm", &a, 0, t).unwrap().number, 1);
        let v = s.ping("vm", &a, 1, t).unwrap();
        assert_eq!((v.number, v.backup.as_ref()), (2, Some(&b)));
        // The backup's claim needs the primary's acknowledgement of view 2.
        let out = s.test_and_set("vm", 2, &b).unwrap();
        assert!(matches!(
            out,
            TasOutcome::Lost {
                reason: LossReason::Unacknowledged,
                ..
            }
        ));
        s.ping("vm", &a, 2, t).unwrap();
        assert!(s.test_and_set("vm", 2, &b).unwrap().won());
    }

    #[test]
    fn dead_spares_are_not_named() {
        let (a, b) = (member("a", 1), member("b", 2));
        let mut s = service();
        let t = Instant::now();
        s.ping("vm", &a, 0, t).unwrap();
        s.ping("vm", &b, 0, t).unwrap();
        let v = s.ping("vm", &a, 1, t + TIMEOUT * 2).unwrap();
        assert_eq!((v.number, v.backup), (1, None));
    }

    #[test]
    fn most_recent_spare_is_named() {
        let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
        let mut s = service();
        let t = Instant::now();
        s.ping("vm", &a, 0, t).unwrap();
        s.ping("vm", &b, 0, t).unwrap();
        s.ping("vm", &c, 0, t + Duration::from_millis(1)).unwrap();
        let v = s.ping("vm", &a, 1, t + Duration::from_millis(2)).unwrap();
        assert_eq!(v.backup, Some(c));
    }

    #[test]
    fn losers_and_the_displaced_are_never_named_backup() {
        let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
        let mut s = service();
        let t = Instant::now();
        s.ping("vm", &a, 0, t).unwrap();
        s.ping("vm", &b, 0, t).unwrap();
        s.ping("vm", &a, 1, t).unwrap();
        s.ping("vm", &a, 2, t).unwrap();
        s.ping("vm", &c, 0, t).unwrap();
        assert!(s.test_and_set("vm", 2, &b).unwrap().won());
        // a pinged as recently as c, and its id sorts first, but b won
        // because it took a for dead.
        assert_eq!(s.ping("vm", &b, 3, t).unwrap().backup, Some(c.clone()));

        s.ping("vm2", &a, 0, t).unwrap();
        s.ping("vm2", &c, 0, t).unwrap();
        assert!(!s.test_and_set("vm2", 1, &c).unwrap().won());
        assert_eq!(s.ping("vm2", &a, 1, t).unwrap().backup, None);
        // Pinging again, with any number, does not make a loser a spare:
        // it halts, and comes back as a new incarnation with a new id.
        assert_eq!(s.ping("vm2", &c, 0, t).unwrap().backup, None);
        assert_eq!(s.ping("vm2", &c, 1, t).unwrap().backup, None);
        let c2 = member("c2", 3);
        assert_eq!(s.ping("vm2", &c2, 0, t).unwrap().backup, Some(c2));
    }

    /// Issue 12: a member frozen past the failure timeout resumes after
    /// the other won, and pings with the view it knew before the freeze.
    #[test]
    fn a_resumed_loser_is_not_named_backup() {
        let (a, b, s2) = (member("a", 1), member("b", 2), member("s", 3));
        // Either side may be the one frozen.
        for (winner, frozen) in [(&b, &a), (&a, &b)] {
            let mut s = service();
            let t = Instant::now();
            s.ping("vm", &a, 0, t).unwrap();
            s.ping("vm", &b, 0, t).unwrap();
            s.ping("vm", &a, 1, t).unwrap();
            s.ping("vm", &a, 2, t).unwrap();
            assert!(s.test_and_set("vm", 2, winner).unwrap().won());
            assert_eq!(s.ping("vm", winner, 3, t).unwrap(), view(3, winner, None));
            let later = t + Duration::from_millis(10);
            // Before its own claim is refused, with the old number, and
            // then with the current one it was just told.
            assert_eq!(
                s.ping("vm", frozen, 2, later).unwrap(),
                view(3, winner, None)
            );
            assert_eq!(
                s.ping("vm", winner, 3, later).unwrap(),
                view(3, winner, None)
            );
            assert_eq!(
                s.ping("vm", frozen, 3, later).unwrap(),
                view(3, winner, None)
            );
            assert_eq!(
                s.ping("vm", winner, 3, later).unwrap(),
                view(3, winner, None)
            );
            let lost = s.test_and_set("vm", 2, frozen).unwrap();
            assert!(matches!(
                lost,
                TasOutcome::Lost {
                    reason: LossReason::Decided { .. },
                    ..
                }
            ));
            // A real spare started afterwards is named.
            s.ping("vm", &s2, 0, later).unwrap();
            assert_eq!(
                s.ping("vm", winner, 3, later).unwrap(),
                view(4, winner, Some(&s2))
            );
        }
    }

    /// The displaced member's old pings are told apart by their number
    /// alone, which the decisions on disk give: a restart, which forgets
    /// who lost, does not make a zombie a spare.
    #[test]
    fn stale_pings_make_no_spare_after_a_restart() {
        let (a, b, n) = (member("a", 1), member("b", 2), member("n", 3));
        let mut s = service();
        let t = Instant::now();
        s.ping("vm", &a, 0, t).unwrap();
        s.ping("vm", &b, 0, t).unwrap();
        s.ping("vm", &a, 1, t).unwrap();
        s.ping("vm", &a, 2, t).unwrap();
        assert!(s.test_and_set("vm", 2, &b).unwrap().won());
        let mut s = ViewService::new(s.vms().clone(), TIMEOUT);
        assert_eq!(s.ping("vm", &b, 3, t).unwrap(), view(3, &b, None));
        assert_eq!(s.ping("vm", &a, 2, t).unwrap(), view(3, &b, None));
        assert_eq!(s.ping("vm", &a, 1, t).unwrap(), view(3, &b, None));
        assert_eq!(s.ping("vm", &b, 3, t).unwrap(), view(3, &b, None));
        // A new server pings with 0.
        assert_eq!(s.ping("vm", &n, 0, t).unwrap(), view(4, &b, Some(&n)));
    }

    #[test]
    fn a_spare_that_missed_the_failover_waits_one_ping() {
        let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
        let mut s = service();
        let t = Instant::now();
        s.ping("vm", &a, 0, t).unwrap();
        s.ping("vm", &b, 0, t).unwrap();
        s.ping("vm", &a, 1, t).unwrap();
        s.ping("vm", &a, 2, t).unwrap();
        assert_eq!(s.ping("vm", &c, 2, t).unwrap(), view(2, &a, Some(&b)));
        assert!(s.test_and_set("vm", 2, &a).unwrap().won());
        assert_eq!(s.ping("vm", &a, 3, t).unwrap(), view(3, &a, None));
        assert_eq!(s.ping("vm", &c, 2, t).unwrap(), view(3, &a, None));
        assert_eq!(s.ping("vm", &c, 3, t).unwrap(), view(4, &a, Some(&c)));
    }

    /// A backup that stops pinging before its primary vouched for it is
    /// replaced, but only once the primary has pinged with the view's
    /// number: the arbiter never moves on from a view its primary has not
    /// seen.
    #[test]
    fn a_gone_backup_is_replaced_once_its_primary_has_seen_the_view() {
        let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
        let mut s = service();
        let t = Instant::now();
        s.ping("vm", &a, 0, t).unwrap();
        s.ping("vm", &b, 0, t).unwrap();
        assert_eq!(s.ping("vm", &a, 1, t).unwrap(), view(2, &a, Some(&b)));
        // b dies before catching up; c is started.
        let late = t + TIMEOUT * 2;
        s.ping("vm", &c, 0, late).unwrap();
        // a has not seen view 2 (it pings with 1): nothing moves.
        assert_eq!(s.ping("vm", &a, 1, late).unwrap(), view(2, &a, Some(&b)));
        // b is not vouched for: it cannot win view 2.
        let refused = s.test_and_set("vm", 2, &b);
        assert!(matches!(
            refused,
            Ok(TasOutcome::Lost {
                reason: LossReason::Unacknowledged,
                ..
            })
        ));
        // b lost, so it is gone at once: c takes its place.
        assert_eq!(
            s.ping_as("vm", &a, 2, false, late).unwrap(),
            view(3, &a, Some(&c))
        );
        assert!(!s.vm("vm").unwrap().acknowledged);
        // Now a vouches for c.
        assert_eq!(s.ping("vm", &a, 3, late).unwrap(), view(3, &a, Some(&c)));
        assert!(s.vm("vm").unwrap().acknowledged);

        // Without a claim: the backup just stops pinging.
        let mut s = service();
        s.ping("vm", &a, 0, t).unwrap();
        s.ping("vm", &b, 0, t).unwrap();
        assert_eq!(s.ping("vm", &a, 1, t).unwrap(), view(2, &a, Some(&b)));
        let soon = t + TIMEOUT / 2;
        s.ping("vm", &c, 0, soon).unwrap();
        // Still within the liveness bound: b may yet come up.
        assert_eq!(
            s.ping_as("vm", &a, 2, false, soon).unwrap(),
            view(2, &a, Some(&b))
        );
        assert!(!s.vm("vm").unwrap().acknowledged);
        // Any ping may move it on once a has seen view 2.
        let gone = t + TIMEOUT + Duration::from_millis(1);
        assert_eq!(s.ping("vm", &c, 0, gone).unwrap(), view(3, &a, Some(&c)));
        // b, resumed, is a spare like any other, and claims nothing.
        assert!(matches!(
            s.test_and_set("vm", 2, &b),
            Ok(TasOutcome::Lost {
                reason: LossReason::Stale,
                ..
            })
        ));
    }

    #[test]
    fn a_vouched_backup_is_never_replaced_and_no_spare_no_move() {
        let (a, b, c) = (member("a", 1), member("b", 2), member("c", 3));
        let mut s = service();
        let t = Instant::now();
        s.ping("vm", &a, 0, t).unwrap();
        s.ping("vm", &b, 0, t).unwrap();
        s.ping("vm", &a, 1, t).unwrap();
        // No live spare: the view waits for one.
        let gone = t + TIMEOUT * 2;
        assert_eq!(
            s.ping_as("vm", &a, 2, false, gone).unwrap(),
            view(2, &a, Some(&b))
        );
        // Vouched for, b holds a's state and may win the view: only a
        // claim removes it.
        assert_eq!(s.ping("vm", &a, 2, gone).unwrap(), view(2, &a, Some(&b)));
        s.ping("vm", &c, 0, gone).unwrap();
        assert_eq!(s.ping("vm", &a, 2, gone).unwrap(), view(2, &a, Some(&b)));
        // backup_ready=false from the primary of a view it already vouched
        // for takes nothing back.
        s.ping_as("vm", &a, 2, false, gone).unwrap();
        assert!(s.vm("vm").unwrap().acknowledged);
        assert!(s.test_and_set("vm", 2, &b).unwrap().won());
    }

    #[test]
    fn retired_ids_are_bounded() {
        let a = member("a", 1);
        let mut s = service();
        let t = Instant::now();
        s.ping("vm", &a, 0, t).unwrap();
        for i in 0..MAX_RETIRED + 10 {
            let x = member(&format!("x{i}"), 2);
            assert!(!s.test_and_set("vm", 1, &x).unwrap().won());
        }
        let heard = &s.heard["vm"];
        assert_eq!(heard.retired.len(), MAX_RETIRED);
        assert_eq!(heard.retired_order.len(), MAX_RETIRED);
        assert!(!heard.retired.contains("x0"));
        assert!(heard.retired.contains(&format!("x{}", MAX_RETIRED + 9)));
    }

    #[test]
    fn checked_state_rejects_broken_invariants() {
        let a = member("a", 1);
        let both = VmState {
            view: View {
                number: 2,
                primary: Some(a.clone()),
                backup: Some(a.clone()),
            },
            ..VmState::default()
        };
        assert!(both
            .check()
            .unwrap_err()
            .contains("both primary and backup"));
        let mut future = VmState {
            view: View {
                number: 2,
                primary: Some(a.clone()),
                backup: None,
            },
            ..VmState::default()
        };
        future.decided.insert(2, a);
        assert!(future.check().unwrap_err().contains("not older"));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Ping {
            server: usize,
            known: KnownView,
            ready: bool,
        },
        Claim {
            server: usize,
            known: KnownView,
        },
        Wait {
            ms: u64,
        },
    }

    /// Which view number a request names: usually the one the server last
    /// saw, sometimes a stale or impossible one.
    #[derive(Clone, Copy, Debug)]
    enum KnownView {
        Last,
        Older(u64),
        Newer(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let known = prop_oneof![
            6 => Just(KnownView::Last),
            1 => (1u64..3).prop_map(KnownView::Older),
            1 => (1u64..3).prop_map(KnownView::Newer),
        ];
        prop_oneof![
            5 => (0usize..SERVERS, known.clone(), prop::bool::weighted(0.6))
                .prop_map(|(server, known, ready)| Op::Ping { server, known, ready }),
            3 => (0usize..SERVERS, known).prop_map(|(server, known)| Op::Claim { server, known }),
            2 => (0u64..800).prop_map(|ms| Op::Wait { ms }),
        ]
    }

    /// Claims retire their losers, so there must be enough servers left to
    /// name.
    const SERVERS: usize = 6;

    /// An independent account of the VM, kept from the requests alone.
    struct Model {
        view: View,
        /// The primary pinged with the view's number.
        seen: bool,
        /// ... and vouched for its backup (or it has none).
        acked: bool,
        winners: BTreeMap<u64, Member>,
        /// Every server's last ping: when, and with which number.
        pinged: BTreeMap<String, (Instant, u64)>,
        retired: HashSet<String>,
        started: Option<Instant>,
    }

    impl Model {
        fn eligible(&self, id: &str, now: Instant) -> bool {
            let last_won = self.winners.keys().next_back().copied().unwrap_or(0);
            !self.view.is_primary(id)
                && !self.view.is_backup(id)
                && !self.retired.contains(id)
                && self.pinged.get(id).is_some_and(|&(at, known)| {
                    now.saturating_duration_since(at) <= TIMEOUT && (known == 0 || known > last_won)
                })
        }

        /// The spare the rules name: heard most recently, ties to the
        /// smaller id.
        fn spare(&self, servers: &[Member], now: Instant) -> Option<Member> {
            servers
                .iter()
                .filter(|m| self.eligible(&m.id, now))
                .max_by(|a, b| {
                    self.pinged[&a.id]
                        .0
                        .cmp(&self.pinged[&b.id].0)
                        .then_with(|| b.id.cmp(&a.id))
                })
                .cloned()
        }

        fn dead(&self, id: &str, now: Instant) -> bool {
            let last = self.pinged.get(id).map(|p| p.0).or(self.started);
            self.retired.contains(id)
                || last.is_some_and(|at| now.saturating_duration_since(at) > TIMEOUT)
        }
    }

    proptest! {
        /// The safety rules, checked against an independent account of
        /// every transition: at most one winner per view, view numbers
        /// never go back, and a view changes only by a won claim (new
        /// primary = the claimant, a member of the old view; a backup only
        /// after the old view was acknowledged), by naming a spare backup
        /// of an acknowledged view, or by replacing a gone backup of a view
        /// its primary has seen (same primary, both); the spare named is
        /// never a loser, nor a server that missed the last failover.
        #[test]
        fn views_change_only_by_the_rules(ops in prop::collection::vec(op(), 1..150)) {
            let servers: Vec<Member> = (0..SERVERS)
                .map(|k| member(&format!("s{k}"), 1 + k as u16))
                .collect();
            let mut s = service();
            let mut now = Instant::now();
            let mut last_seen = [0u64; SERVERS];
            let mut m = Model {
                view: View::default(),
                seen: false,
                acked: false,
                winners: BTreeMap::new(),
                pinged: BTreeMap::new(),
                retired: HashSet::new(),
                started: None,
            };
            for op in ops {
                let (server, known, ready, claim) = match op {
                    Op::Wait { ms } => {
                        now += Duration::from_millis(ms);
                        continue;
                    }
                    Op::Ping { server, known, ready } => (server, known, ready, false),
                    Op::Claim { server, known } => (server, known, true, true),
                };
                let me = &servers[server];
                let number = match known {
                    KnownView::Last => last_seen[server],
                    KnownView::Older(d) => last_seen[server].saturating_sub(d),
                    KnownView::Newer(d) => m.view.number + d,
                };
                let before = m.view.clone();
                if claim {
                    let result = s.test_and_set("vm", number, me);
                    if number > before.number {
                        prop_assert!(result.is_err(), "claim for future view {number}");
                        continue;
                    }
                    let out = result.unwrap();
                    match &out {
                        TasOutcome::Won { view: won } => {
                            if let Some(w) = m.winners.get(&number) {
                                prop_assert_eq!(w, me, "second winner for view {}", number);
                            } else {
                                prop_assert_eq!(number, before.number);
                                prop_assert!(before.is_primary(&me.id)
                                    || (before.is_backup(&me.id) && m.acked));
                                m.winners.insert(number, me.clone());
                                for other in before.primary.iter().chain(&before.backup) {
                                    if other.id != me.id {
                                        m.retired.insert(other.id.clone());
                                    }
                                }
                                m.view = won.clone();
                                m.seen = false;
                                m.acked = false;
                            }
                            prop_assert_eq!(won, &won_view(number, me));
                        }
                        TasOutcome::Lost { reason, view: current } => {
                            prop_assert_eq!(current, &before);
                            if let Some(w) = m.winners.get(&number) {
                                prop_assert_eq!(reason, &LossReason::Decided { winner: w.clone() });
                            }
                            if before.number > 0 {
                                m.retired.insert(me.id.clone());
                            }
                        }
                    }
                    last_seen[server] = last_seen[server].max(out.view().number);
                } else {
                    let result = s.ping_as("vm", me, number, ready, now);
                    if number > before.number {
                        prop_assert!(result.is_err(), "ping naming future view {number}");
                        continue;
                    }
                    let got = result.unwrap();
                    m.started.get_or_insert(now);
                    m.pinged.insert(me.id.clone(), (now, number));
                    if before.number == 0 {
                        prop_assert_eq!(&got, &View { number: 1, primary: Some(me.clone()), backup: None });
                        m.view = got;
                    } else {
                        if before.is_primary(&me.id) && number == before.number {
                            m.seen = true;
                            if ready || before.backup.is_none() {
                                m.acked = true;
                            }
                        }
                        let expected = match &before.backup {
                            None if m.acked => m.spare(&servers, now),
                            Some(b) if m.seen && !m.acked && m.dead(&b.id, now) => {
                                m.spare(&servers, now)
                            }
                            _ => None,
                        };
                        match expected {
                            None => prop_assert_eq!(&got, &before, "the view moved"),
                            Some(spare) => {
                                prop_assert!(m.seen, "view changed before its primary saw it");
                                prop_assert_eq!(&got, &View {
                                    number: before.number + 1,
                                    primary: before.primary.clone(),
                                    backup: Some(spare),
                                });
                                m.view = got;
                                m.seen = false;
                                m.acked = false;
                            }
                        }
                    }
                    last_seen[server] = m.view.number;
                }
                prop_assert!(m.view.number >= before.number);
                prop_assert_eq!(&s.query("vm"), &m.view);
                if let Some(state) = s.vm("vm") {
                    prop_assert_eq!(&state.decided, &m.winners);
                    prop_assert_eq!(state.acknowledged, m.acked);
                    prop_assert!(state.check().is_ok());
                }
            }
        }
    }
}
