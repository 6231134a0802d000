//! The straightforward selector the indexed one is checked against: Nova's FilterScheduler
//! loop written plainly. Every pick recomputes everything from the host list, runs each filter
//! over every surviving host in turn, weighs all survivors and sorts them.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;

use crate::filters::{
    self, canonical_arch, canonical_hv, effective_ratios, merge_metadata, GroupView, HostCtx,
    RequestError,
};
use crate::model::{apply_claim, Aggregate, Claim, Host, Request};
use crate::scheduler::{claim_for, pick_index, FilterCount, NoValidHost, ScheduleError};
use crate::weighers::{self, Bounds};
use crate::SchedulerConfig;

pub(crate) fn reference_select(
    hosts: &[Host],
    aggregates: &[Aggregate],
    config: &SchedulerConfig,
    rng: &mut StdRng,
    req: &Request,
) -> Result<Vec<Claim>, ScheduleError> {
    let p = filters::prepare(req)?;
    let forced = match &p.forced_host {
        Some(name) => Some(
            hosts
                .iter()
                .position(|h| &h.name == name)
                .ok_or_else(|| RequestError::UnknownForcedHost(name.clone()))?,
        ),
        None => None,
    };
    let mut ids = HashSet::new();
    for id in &req.instance_ids {
        if !ids.insert(id) || hosts.iter().any(|h| h.instances.contains(id)) {
            return Err(ScheduleError::DuplicateInstance(id.clone()));
        }
    }
    let aggs: HashMap<&str, &Aggregate> = aggregates.iter().map(|a| (a.name.as_str(), a)).collect();
    let mut work = hosts.to_vec();
    let mut claims = Vec::new();
    for (n, id) in req.instance_ids.iter().enumerate() {
        let metadata: Vec<_> = work
            .iter()
            .map(|h| merge_metadata(h.aggregates.iter().map(|a| &aggs[a.as_str()].metadata)))
            .collect();
        let counts: Vec<u32> = work
            .iter()
            .map(|h| match &p.group {
                Some(g) => h
                    .instances
                    .iter()
                    .collect::<HashSet<_>>()
                    .iter()
                    .filter(|i| g.members.contains(**i))
                    .count() as u32,
                None => 0,
            })
            .collect();
        let has_hosts = counts.iter().any(|&c| c > 0);
        let canon: Vec<(String, String)> = work
            .iter()
            .map(|h| {
                (
                    canonical_arch(&h.architecture),
                    canonical_hv(&h.hypervisor_type),
                )
            })
            .collect();
        let ctx = |i: usize| HostCtx {
            host: &work[i],
            ratios: effective_ratios(work[i].allocation_ratios, &metadata[i]),
            metadata: &metadata[i],
            arch: &canon[i].0,
            hv: &canon[i].1,
        };
        let mut list: Vec<usize> = match forced {
            Some(f) => vec![f],
            None => (0..work.len()).collect(),
        };
        let considered = list.len();
        let mut report = Vec::new();
        for &f in &config.filters {
            let start = list.len();
            list.retain(|&i| {
                let gv = GroupView {
                    members_on_host: counts[i],
                    group_has_hosts: has_hosts,
                };
                filters::passes(f, &ctx(i), &p, gv)
            });
            report.push(FilterCount {
                filter: f,
                start,
                end: list.len(),
            });
        }
        if list.is_empty() {
            return Err(ScheduleError::NoValidHost(NoValidHost {
                instance_index: n,
                instances: req.instance_ids.len(),
                hosts: considered,
                filters: report,
            }));
        }
        let policy = p.group.as_ref().map(|g| g.policy);
        let raws: Vec<_> = list
            .iter()
            .map(|&i| weighers::raw(&ctx(i), policy, counts[i]))
            .collect();
        let mut b = Bounds::empty();
        for r in &raws {
            b.add(r);
        }
        let mult = config.multipliers.as_array();
        let mut weighed: Vec<(f64, usize)> = list
            .iter()
            .zip(&raws)
            .map(|(&i, r)| (weighers::score(r, &b, &mult), i))
            .collect();
        // Stable sort, best first: equal weights keep host-list order, as Python's sorted().
        weighed.sort_by(|a, b| b.0.partial_cmp(&a.0).expect("weights are numbers"));
        let subset = config.host_subset_size.max(1).min(weighed.len());
        let chosen = weighed[pick_index(rng, subset)].1;
        let claim = claim_for(&work[chosen], &p, id);
        apply_claim(&mut work[chosen], &claim).expect("claim from the view applies");
        claims.push(claim);
    }
    Ok(claims)
}
