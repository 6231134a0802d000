//! The voter manager's decisions, as a pure function.
//!
//! The desired set of nodes is the `nodes` table (a join writes a row, `shoal node remove`
//! deletes it). The leader's manager loop compares it with Raft's membership and the health it
//! sees from replication, and [`plan`] returns at most one change to make next:
//!
//! 1. a member whose row is gone is removed;
//! 2. a node with a row but not in the membership is added as a learner;
//! 3. a voter unreachable for longer than `replace_after` is replaced by the best caught-up
//!    learner (it stays on as a learner, so it can come back);
//! 4. while there are fewer voters than wanted, the best caught-up learner is promoted;
//! 5. while there are more voters than wanted, the least useful voter is demoted.
//!
//! Changes 3 and 5 swap or drop voters; at most one happens per stabilisation period, so a
//! flapping node does not churn membership. Promotion toward the wanted count (4) is not churn
//! and happens as soon as a learner has caught up. "Best" spreads voters across availability zones first, then
//! prefers the most caught-up learner, then the lowest id (deterministic). The leader is never
//! demoted or replaced by its own decision.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use shoal_types::{NodeId, NodeInfo};

/// What the leader knows about one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Time since the member last acknowledged the leader; `None` if it never did.
    pub since_ack: Option<Duration>,
    /// Highest log index known replicated to it.
    pub matched: u64,
}

#[derive(Debug, Clone)]
pub struct View<'a> {
    pub leader: NodeId,
    /// Desired nodes: the `nodes` table.
    pub desired: &'a BTreeMap<NodeId, NodeInfo>,
    pub voters: &'a BTreeSet<NodeId>,
    /// Learners and their node info (from the membership).
    pub learners: &'a BTreeSet<NodeId>,
    /// Zone of every member, from the membership's node map.
    pub zones: &'a BTreeMap<NodeId, String>,
    pub health: &'a BTreeMap<NodeId, Health>,
    /// The leader's last log index.
    pub last_index: u64,
    pub voters_wanted: usize,
    pub replace_after: Duration,
    /// Whether the stabilisation period since the last quorum change has passed.
    pub quorum_change_allowed: bool,
}

/// A learner counts as caught up when it is at most this many entries behind.
pub const CAUGHT_UP_LAG: u64 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    AddLearner(NodeId, NodeInfo),
    /// Remove from the membership entirely (voter or learner).
    Remove(NodeId),
    /// Set the voter set; members dropped from it stay as learners.
    SetVoters(BTreeSet<NodeId>),
}

fn reachable(v: &View<'_>, id: NodeId) -> bool {
    if id == v.leader {
        return true;
    }
    matches!(v.health.get(&id), Some(Health { since_ack: Some(d), .. }) if *d < v.replace_after)
}

fn caught_up(v: &View<'_>, id: NodeId) -> bool {
    match v.health.get(&id) {
        Some(h) => {
            h.since_ack.is_some_and(|d| d < v.replace_after)
                && h.matched + CAUGHT_UP_LAG >= v.last_index
        }
        None => false,
    }
}

/// The learner to promote given the voters that stay: a new zone first, then the most caught
/// up, then the lowest id.
fn best_learner(v: &View<'_>, staying: &BTreeSet<NodeId>) -> Option<NodeId> {
    let zones: BTreeSet<&str> = staying
        .iter()
        .filter_map(|id| v.zones.get(id).map(String::as_str))
        .collect();
    v.learners
        .iter()
        .copied()
        .filter(|id| v.desired.contains_key(id) && caught_up(v, *id))
        .max_by_key(|id| {
            let new_zone = v.zones.get(id).is_some_and(|z| !zones.contains(z.as_str()));
            let matched = v.health.get(id).map(|h| h.matched).unwrap_or(0);
            (new_zone, matched, std::cmp::Reverse(*id))
        })
}

pub fn plan(v: &View<'_>) -> Option<Change> {
    // 1. Members whose row is gone. The leader removes itself last: it would lose leadership
    //    before it could finish anything else.
    let members: BTreeSet<NodeId> = v.voters.union(v.learners).copied().collect();
    if let Some(gone) = members
        .iter()
        .copied()
        .filter(|id| !v.desired.contains_key(id))
        .min_by_key(|id| *id == v.leader)
    {
        if v.voters.contains(&gone) {
            let mut rest: BTreeSet<NodeId> =
                v.voters.iter().copied().filter(|id| *id != gone).collect();
            if rest.is_empty() {
                return None; // never remove the last voter
            }
            if let Some(l) = best_learner(v, &rest) {
                if rest.len() < v.voters_wanted {
                    rest.insert(l);
                }
            }
            if rest != *v.voters {
                return Some(Change::SetVoters(rest));
            }
        }
        return Some(Change::Remove(gone));
    }
    // 2. New nodes become learners.
    if let Some((id, info)) = v.desired.iter().find(|(id, _)| !members.contains(id)) {
        return Some(Change::AddLearner(*id, info.clone()));
    }
    // 4. Too few voters: promote. Growing toward the wanted count is not churn, so it does not
    //    wait for the stabilisation period.
    if v.voters.len() < v.voters_wanted {
        if let Some(l) = best_learner(v, v.voters) {
            let mut next = v.voters.clone();
            next.insert(l);
            return Some(Change::SetVoters(next));
        }
    }
    if !v.quorum_change_allowed {
        return None;
    }
    // 3. Replace a voter that has been unreachable too long.
    if let Some(dead) = v
        .voters
        .iter()
        .copied()
        .find(|id| *id != v.leader && !reachable(v, *id))
    {
        let mut staying: BTreeSet<NodeId> =
            v.voters.iter().copied().filter(|id| *id != dead).collect();
        if let Some(l) = best_learner(v, &staying) {
            staying.insert(l);
            return Some(Change::SetVoters(staying));
        }
    }
    // 5. Too many voters: demote one that is unreachable, else one sharing a zone, never the
    //    leader.
    if v.voters.len() > v.voters_wanted {
        let mut zone_count: BTreeMap<&str, usize> = BTreeMap::new();
        for id in v.voters {
            *zone_count
                .entry(v.zones.get(id).map(String::as_str).unwrap_or(""))
                .or_default() += 1;
        }
        let victim = v
            .voters
            .iter()
            .copied()
            .filter(|id| *id != v.leader)
            .max_by_key(|id| {
                let shared = zone_count
                    .get(v.zones.get(id).map(String::as_str).unwrap_or(""))
                    .copied()
                    .unwrap_or(0);
                (!reachable(v, *id), shared, *id)
            })?;
        let next = v
            .voters
            .iter()
            .copied()
            .filter(|id| *id != victim)
            .collect();
        return Some(Change::SetVoters(next));
    }
    None
}

/// Whom a leader that is stopping hands leadership to: the voter (not the leader itself) that
/// has the most of the log among those that acknowledged the leader within `fresh`, lowest id
/// on a tie; `None` if no other voter is reachable. openraft's transfer makes the target wait
/// until it holds the leader's whole log before it campaigns, so the most caught-up voter is
/// the one that can start soonest.
pub fn transfer_target(
    leader: NodeId,
    voters: &BTreeSet<NodeId>,
    health: &BTreeMap<NodeId, Health>,
    fresh: Duration,
) -> Option<NodeId> {
    voters
        .iter()
        .filter(|id| **id != leader)
        .filter_map(|id| {
            let h = health.get(id)?;
            h.since_ack.filter(|d| *d <= fresh)?;
            Some((h.matched, std::cmp::Reverse(*id)))
        })
        .max()
        .map(|(_, std::cmp::Reverse(id))| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        desired: BTreeMap<NodeId, NodeInfo>,
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
        zones: BTreeMap<NodeId, String>,
        health: BTreeMap<NodeId, Health>,
    }

    fn fixture(voters: &[NodeId], learners: &[NodeId], zones: &[(NodeId, &str)]) -> Fixture {
        let mut f = Fixture {
            desired: BTreeMap::new(),
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            zones: BTreeMap::new(),
            health: BTreeMap::new(),
        };
        for (id, z) in zones {
            f.desired.insert(
                *id,
                NodeInfo {
                    name: format!("n{id}"),
                    zone: z.to_string(),
                    ..Default::default()
                },
            );
            f.zones.insert(*id, z.to_string());
            f.health.insert(
                *id,
                Health {
                    since_ack: Some(Duration::from_millis(50)),
                    matched: 1000,
                },
            );
        }
        f
    }

    fn view(f: &Fixture, allowed: bool) -> View<'_> {
        View {
            leader: 1,
            desired: &f.desired,
            voters: &f.voters,
            learners: &f.learners,
            zones: &f.zones,
            health: &f.health,
            last_index: 1000,
            voters_wanted: 3,
            replace_after: Duration::from_secs(30),
            quorum_change_allowed: allowed,
        }
    }

    #[test]
    fn new_node_becomes_learner_even_during_stabilisation() {
        let f = fixture(&[1], &[], &[(1, "a"), (2, "a")]);
        assert!(matches!(
            plan(&view(&f, false)),
            Some(Change::AddLearner(2, _))
        ));
    }

    #[test]
    fn learners_are_promoted_until_three_voters_preferring_new_zones() {
        let f = fixture(&[1], &[2, 3, 4], &[(1, "a"), (2, "a"), (3, "b"), (4, "a")]);
        assert_eq!(
            plan(&view(&f, true)),
            Some(Change::SetVoters([1, 3].into()))
        );
        let f = fixture(&[1, 2, 3], &[4], &[(1, "a"), (2, "a"), (3, "b"), (4, "a")]);
        assert_eq!(plan(&view(&f, true)), None);
    }

    /// Growing to the wanted voter count does not wait for the stabilisation period.
    #[test]
    fn promotion_ignores_stabilisation() {
        let f = fixture(&[1, 2], &[3], &[(1, "a"), (2, "a"), (3, "a")]);
        assert_eq!(
            plan(&view(&f, false)),
            Some(Change::SetVoters([1, 2, 3].into()))
        );
    }

    #[test]
    fn lagging_learner_is_not_promoted() {
        let mut f = fixture(&[1], &[2], &[(1, "a"), (2, "a")]);
        f.health.get_mut(&2).unwrap().matched = 10;
        assert_eq!(plan(&view(&f, true)), None);
    }

    #[test]
    fn unreachable_voter_is_replaced_by_a_learner() {
        let mut f = fixture(&[1, 2, 3], &[4], &[(1, "a"), (2, "a"), (3, "a"), (4, "a")]);
        f.health.get_mut(&3).unwrap().since_ack = Some(Duration::from_secs(31));
        assert_eq!(
            plan(&view(&f, true)),
            Some(Change::SetVoters([1, 2, 4].into()))
        );
        // Not during the stabilisation period.
        assert_eq!(plan(&view(&f, false)), None);
        // Not while it is only briefly unreachable.
        f.health.get_mut(&3).unwrap().since_ack = Some(Duration::from_secs(5));
        assert_eq!(plan(&view(&f, true)), None);
    }

    #[test]
    fn removed_rows_leave_the_membership_voter_replaced_first() {
        let mut f = fixture(&[1, 2, 3], &[4], &[(1, "a"), (2, "a"), (3, "a"), (4, "a")]);
        f.desired.remove(&3);
        assert_eq!(
            plan(&view(&f, false)),
            Some(Change::SetVoters([1, 2, 4].into()))
        );
        f.voters = [1, 2, 4].into();
        f.learners = [3].into();
        assert_eq!(plan(&view(&f, false)), Some(Change::Remove(3)));
    }

    #[test]
    fn the_leader_is_never_demoted_and_extra_voters_shrink() {
        let f = fixture(
            &[1, 2, 3, 4, 5],
            &[],
            &[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c")],
        );
        let Some(Change::SetVoters(next)) = plan(&view(&f, true)) else {
            panic!("expected a demotion")
        };
        assert_eq!(next.len(), 4);
        assert!(next.contains(&1));
        assert!(next.contains(&5), "the only voter of zone c stays");
    }

    fn h(ack_ms: Option<u64>, matched: u64) -> Health {
        Health {
            since_ack: ack_ms.map(Duration::from_millis),
            matched,
        }
    }

    #[test]
    fn leadership_goes_to_the_most_caught_up_reachable_voter() {
        let voters: BTreeSet<NodeId> = [1, 2, 3, 4, 5].into();
        let fresh = Duration::from_millis(500);
        let health: BTreeMap<NodeId, Health> = [
            (1, h(Some(0), 100)),
            (2, h(Some(50), 90)),
            // The most caught up, but silent for too long: perhaps dead.
            (3, h(Some(900), 100)),
            (4, h(Some(20), 99)),
            (5, h(None, 0)),
            // A learner is never a target.
            (6, h(Some(1), 100)),
        ]
        .into();
        assert_eq!(transfer_target(1, &voters, &health, fresh), Some(4));
        let tie: BTreeMap<NodeId, Health> = [
            (2, h(Some(10), 7)),
            (3, h(Some(10), 7)),
            (4, h(Some(10), 6)),
        ]
        .into();
        assert_eq!(transfer_target(1, &voters, &tie, fresh), Some(2));
        let none: BTreeMap<NodeId, Health> = [(3, h(Some(900), 7)), (5, h(None, 0))].into();
        assert_eq!(transfer_target(1, &voters, &none, fresh), None);
        assert_eq!(transfer_target(1, &[1].into(), &health, fresh), None);
    }
}
