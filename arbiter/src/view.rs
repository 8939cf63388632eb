//! The view service and test-and-set as a pure state machine: no I/O, and
//! time is passed in, so that the rules can be tested exhaustively and the
//! server can persist a decision before anyone sees it.

use std::collections::{BTreeMap, HashMap};
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

/// What the arbiter must never forget about one VM.
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
        let view = &self.view;
        if view.number == 0 {
            if view.primary.is_some() || view.backup.is_some() || self.acknowledged {
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
        if let Some((&last, _)) = self.decided.last_key_value() {
            if last >= view.number {
                return Err(format!(
                    "a test-and-set is recorded for view {last}, which is not older than the \
                     current view {}",
                    view.number
                ));
            }
        }
        Ok(())
    }
}

struct LastPing {
    member: Member,
    at: Instant,
}

/// Every VM's views, acknowledgements and test-and-set winners, plus the
/// servers heard from recently (not durable: after a restart, spares are
/// known again at their next ping).
pub(crate) struct ViewService {
    vms: BTreeMap<String, VmState>,
    pings: HashMap<String, HashMap<String, LastPing>>,
    spare_timeout: Duration,
}

impl ViewService {
    /// `spare_timeout`: a server not heard from for longer is not a live
    /// spare.
    pub fn new(vms: BTreeMap<String, VmState>, spare_timeout: Duration) -> ViewService {
        ViewService {
            vms,
            pings: HashMap::new(),
            spare_timeout,
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

    pub fn ping(
        &mut self,
        vm: &str,
        me: &Member,
        view_known: u64,
        now: Instant,
    ) -> Result<View, ViewError> {
        let current = self.vms.get(vm).map_or(0, |s| s.view.number);
        if view_known > current {
            return Err(ViewError::FutureView {
                vm: vm.to_owned(),
                requested: view_known,
                current,
            });
        }
        let timeout = self.spare_timeout;
        let heard = self.pings.entry(vm.to_owned()).or_default();
        heard.retain(|_, p| now.saturating_duration_since(p.at) <= timeout);
        heard.insert(
            me.id.clone(),
            LastPing {
                member: me.clone(),
                at: now,
            },
        );

        let state = self.vms.entry(vm.to_owned()).or_default();
        if state.view.number == 0 {
            state.view = View {
                number: 1,
                primary: Some(me.clone()),
                backup: None,
            };
            state.acknowledged = false;
            info!(vm, "{}: first server to ping", state.view);
            return Ok(state.view.clone());
        }
        if !state.acknowledged && view_known == state.view.number && state.view.is_primary(&me.id) {
            state.acknowledged = true;
            info!(vm, "{} acknowledged by its primary", state.view);
        }
        if state.acknowledged && state.view.backup.is_none() {
            let spare = heard
                .iter()
                .filter(|(id, _)| !state.view.is_primary(id))
                .max_by(|(a_id, a), (b_id, b)| a.at.cmp(&b.at).then_with(|| b_id.cmp(a_id)))
                .map(|(_, p)| p.member.clone());
            if let Some(spare) = spare {
                state.view = View {
                    number: state.view.number + 1,
                    primary: state.view.primary.take(),
                    backup: Some(spare),
                };
                state.acknowledged = false;
                info!(vm, "{}: spare named backup", state.view);
            }
        }
        debug!(vm, server = %me.id, view_known, "ping: {}", state.view);
        Ok(state.view.clone())
    }

    pub fn test_and_set(
        &mut self,
        vm: &str,
        view: u64,
        claimant: &Member,
    ) -> Result<TasOutcome, ViewError> {
        let Some(state) = self.vms.get_mut(vm) else {
            if view > 0 {
                return Err(ViewError::FutureView {
                    vm: vm.to_owned(),
                    requested: view,
                    current: 0,
                });
            }
            return Ok(TasOutcome::Lost {
                reason: LossReason::NotMember,
                view: View::default(),
            });
        };
        let claimed = state.view.clone();
        let outcome = claim(state, vm, view, claimant)?;
        // A loser halts, and a winner claims because it suspects the other
        // member dead: pings either sent before the decision must not get
        // it named backup.
        if let Some(heard) = self.pings.get_mut(vm) {
            match &outcome {
                TasOutcome::Lost { .. } => {
                    heard.remove(&claimant.id);
                }
                TasOutcome::Won { .. } if claimed.number == view => {
                    for member in claimed.primary.iter().chain(&claimed.backup) {
                        if member.id != claimant.id {
                            heard.remove(&member.id);
                        }
                    }
                }
                TasOutcome::Won { .. } => {}
            }
        }
        Ok(outcome)
    }
}

fn claim(
    state: &mut VmState,
    vm: &str,
    view: u64,
    claimant: &Member,
) -> Result<TasOutcome, ViewError> {
    // A decision is forever, whatever happened to the views since.
    if let Some(winner) = state.decided.get(&view) {
        return Ok(if winner == claimant {
            TasOutcome::Won {
                view: won_view(view, winner),
            }
        } else {
            TasOutcome::Lost {
                reason: LossReason::Decided {
                    winner: winner.clone(),
                },
                view: state.view.clone(),
            }
        });
    }
    let current = state.view.number;
    if view > current {
        return Err(ViewError::FutureView {
            vm: vm.to_owned(),
            requested: view,
            current,
        });
    }
    let lost = |reason| {
        info!(vm, view, claimant = %claimant.id, ?reason, "test-and-set lost");
        Ok(TasOutcome::Lost {
            reason,
            view: state.view.clone(),
        })
    };
    if view < current {
        return lost(LossReason::Stale);
    }
    // The primary holds the VM's state by definition, so its claim is
    // sound whether or not it has acknowledged the view; the backup's
    // claim is sound only once the primary has acknowledged the view that
    // named it (see the README).
    if state.view.is_backup(&claimant.id) && !state.acknowledged {
        return lost(LossReason::Unacknowledged);
    }
    if !state.view.is_primary(&claimant.id) && !state.view.is_backup(&claimant.id) {
        return lost(LossReason::NotMember);
    }
    state.decided.insert(view, claimant.clone());
    state.view = won_view(view, claimant);
    state.acknowledged = false;
    info!(vm, claimant = %claimant, "test-and-set for view {view} won: {}", state.view);
    Ok(TasOutcome::Won {
        view: state.view.clone(),
    })
}

fn won_view(claimed: u64, winner: &Member) -> View {
    View {
        number: claimed + 1,
        primary: Some(winner.clone()),
        backup: None,
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
    fn losers_and_the_displaced_are_not_named_backup() {
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
        // Until it pings again.
        assert_eq!(s.ping("vm2", &c, 0, t).unwrap().backup, Some(c));
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
        Ping { server: usize, known: KnownView },
        Claim { server: usize, known: KnownView },
        Wait { ms: u64 },
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
            5 => (0usize..3, known.clone()).prop_map(|(server, known)| Op::Ping { server, known }),
            3 => (0usize..3, known).prop_map(|(server, known)| Op::Claim { server, known }),
            1 => (0u64..800).prop_map(|ms| Op::Wait { ms }),
        ]
    }

    proptest! {
        /// The safety rules, checked against an independent account of
        /// every transition: at most one winner per view, view numbers
        /// never go back, and a view changes only by a won claim (new
        /// primary = the claimant, a member of the old view; a backup only
        /// after the old view was acknowledged) or by naming a spare backup
        /// of an acknowledged view (same primary).
        #[test]
        fn views_change_only_by_the_rules(ops in prop::collection::vec(op(), 1..120)) {
            let servers = [member("a", 1), member("b", 2), member("c", 3)];
            let mut s = service();
            let mut now = Instant::now();
            let mut last_seen = [0u64; 3];
            let mut view = View::default();
            let mut acked = false;
            let mut winners: BTreeMap<u64, Member> = BTreeMap::new();
            for op in ops {
                let (server, known, claim) = match op {
                    Op::Wait { ms } => {
                        now += Duration::from_millis(ms);
                        continue;
                    }
                    Op::Ping { server, known } => (server, known, false),
                    Op::Claim { server, known } => (server, known, true),
                };
                let me = &servers[server];
                let number = match known {
                    KnownView::Last => last_seen[server],
                    KnownView::Older(d) => last_seen[server].saturating_sub(d),
                    KnownView::Newer(d) => view.number + d,
                };
                let before = view.clone();
                if claim {
                    let result = s.test_and_set("vm", number, me);
                    if number > view.number {
                        prop_assert!(result.is_err(), "claim for future view {number}");
                        continue;
                    }
                    let out = result.unwrap();
                    match &out {
                        TasOutcome::Won { view: won } => {
                            if let Some(w) = winners.get(&number) {
                                prop_assert_eq!(w, me, "second winner for view {}", number);
                            } else {
                                prop_assert_eq!(number, before.number);
                                prop_assert!(before.is_primary(&me.id)
                                    || (before.is_backup(&me.id) && acked));
                                winners.insert(number, me.clone());
                                view = won.clone();
                                acked = false;
                            }
                            prop_assert_eq!(won, &won_view(number, me));
                        }
                        TasOutcome::Lost { reason, view: current } => {
                            prop_assert_eq!(current, &before);
                            if let Some(w) = winners.get(&number) {
                                prop_assert_eq!(reason, &LossReason::Decided { winner: w.clone() });
                            }
                        }
                    }
                    last_seen[server] = last_seen[server].max(out.view().number);
                } else {
                    let result = s.ping("vm", me, number, now);
                    if number > view.number {
                        prop_assert!(result.is_err(), "ping naming future view {number}");
                        continue;
                    }
                    let got = result.unwrap();
                    if before.number == 0 {
                        prop_assert_eq!(&got, &View { number: 1, primary: Some(me.clone()), backup: None });
                    } else {
                        if before.is_primary(&me.id) && number == before.number {
                            acked = true;
                        }
                        if got != before {
                            prop_assert!(acked, "view changed before acknowledgement");
                            prop_assert_eq!(got.number, before.number + 1);
                            prop_assert_eq!(&got.primary, &before.primary);
                            prop_assert!(before.backup.is_none() && got.backup.is_some());
                        }
                    }
                    if got != before {
                        acked = false;
                    }
                    view = got;
                    last_seen[server] = view.number;
                }
                prop_assert!(view.number >= before.number);
                prop_assert_eq!(&s.query("vm"), &view);
                if let Some(state) = s.vm("vm") {
                    prop_assert_eq!(&state.decided, &winners);
                    prop_assert_eq!(state.acknowledged, acked);
                    prop_assert!(state.check().is_ok());
                }
            }
        }
    }
}
