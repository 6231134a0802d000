//! The indexed view of the hosts and the selection algorithm over it.
//!
//! Two ways to find the best hosts, both exact (they pick what a full filter-and-weigh pass
//! over every host would pick):
//!
//! * **Scan** when an index narrows the candidates to at most `scan_limit` hosts (a forced
//!   host, the hosts of an affinity group, an availability zone, the hosts of the aggregates
//!   that carry a key the flavor's extra specs need): filter and weigh just those.
//! * **Threshold walk** otherwise. Each resource weigher (free RAM, disk, vCPUs) keeps its
//!   hosts in a sorted set, which gives the normalisation bounds: the first eligible host
//!   from each end of each set. A fourth set orders the hosts by a combined key, a linear
//!   combination of the three raw weights whose coefficients are `multiplier / range` for
//!   reference ranges close to those of typical requests. The walk reads that set from its
//!   best end, scoring eligible hosts as they appear, until the k-th best score found beats
//!   the best score any unseen eligible host could have given its key and the normalisation
//!   box ([`Combo`]). Server-group members are scored up front, because only they can have a
//!   non-zero soft-affinity weight.
//!
//! The combined key replaced a walk over the three per-weigher sets in lock-step (Fagin's
//! threshold algorithm), whose depth grew with the number of placements: spreading levels
//! the best hosts to nearly the same score while their free RAM, disk and vCPUs still
//! differ, and the lock-step bound only falls below that level once every set has been read
//! past the whole plateau.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::filters::{
    self, effective_ratios, merge_metadata, FilterKind, GroupView, HostCtx, Prepared, RequestError,
};
use crate::model::{apply_claim, revert_claim, Aggregate, AllocationRatios, Claim, ClaimError};
use crate::model::{GroupPolicy, Host, Request};
use crate::weighers::{self, Bounds, Multipliers};

/// Scheduler settings. Filters run in the order listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub filters: Vec<FilterKind>,
    pub multipliers: Multipliers,
    /// Pick at random among this many best hosts (Nova's `host_subset_size`).
    pub host_subset_size: usize,
    /// Seed of the random choice among the best hosts.
    pub seed: u64,
    /// Candidate sets at most this large are scanned instead of walked through the sorted
    /// indexes. It changes speed only, never the answer.
    pub scan_limit: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            filters: FilterKind::ALL.to_vec(),
            multipliers: Multipliers::default(),
            host_subset_size: 1,
            seed: 0,
            scan_limit: 256,
        }
    }
}

/// Why a host view could not be indexed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("host `{0}` appears twice")]
    DuplicateHost(String),
    #[error("aggregate `{0}` appears twice")]
    DuplicateAggregate(String),
    #[error("host `{host}` is in aggregate `{aggregate}`, which does not exist")]
    UnknownAggregate { host: String, aggregate: String },
    #[error("instance `{0}` is on more than one host, or twice on one")]
    DuplicateInstance(String),
}

/// How many hosts one filter had to judge and how many it let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterCount {
    pub filter: FilterKind,
    pub start: usize,
    pub end: usize,
}

impl FilterCount {
    /// Hosts this filter removed.
    pub fn removed(&self) -> usize {
        self.start - self.end
    }
}

/// The structured "no valid host" answer: which instance of the request could not be placed,
/// and how many hosts each filter removed, in order (what Nova logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoValidHost {
    /// Zero-based index of the instance that found no host.
    pub instance_index: usize,
    pub instances: usize,
    /// Hosts considered before the first filter (1 for a forced host).
    pub hosts: usize,
    pub filters: Vec<FilterCount>,
}

impl fmt::Display for NoValidHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no valid host was found for instance {} of {}; filter results:",
            self.instance_index + 1,
            self.instances
        )?;
        for (n, c) in self.filters.iter().enumerate() {
            let sep = if n == 0 { " " } else { ", " };
            write!(
                f,
                "{sep}{}: (start: {}, end: {})",
                c.filter.name(),
                c.start,
                c.end
            )?;
        }
        Ok(())
    }
}

/// Why `select` placed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("the request is invalid")]
    Request(#[from] RequestError),
    #[error("{0}")]
    NoValidHost(NoValidHost),
    #[error("instance `{0}` is already placed or listed twice in the request")]
    DuplicateInstance(String),
}

/// Picks one of the `n` best hosts. Both selectors call this, so a seed gives the same picks.
pub(crate) fn pick_index(rng: &mut StdRng, n: usize) -> usize {
    if n <= 1 {
        0
    } else {
        rng.random_range(0..n)
    }
}

/// Builds the claim for placing one instance of `p` on `host`.
pub(crate) fn claim_for(host: &Host, p: &Prepared, instance_id: &str) -> Claim {
    Claim {
        host: host.name.clone(),
        generation: host.generation,
        instance_id: instance_id.to_owned(),
        vcpus: p.vcpus,
        ram_mb: p.ram_mb,
        disk_mb: p.disk_mb,
    }
}

/// Keeps `top` as the best `k` candidates seen, best first (a total order: score, then index).
fn push_top(top: &mut Vec<(f64, u32)>, k: usize, cand: (f64, u32)) {
    if top.len() == k && !weighers::better(cand, top[k - 1]) {
        return;
    }
    let pos = top
        .iter()
        .position(|&t| weighers::better(cand, t))
        .unwrap_or(top.len());
    top.insert(pos, cand);
    top.truncate(k);
}

/// Order-preserving map of an f64 onto an i64 (and back: the map is its own inverse).
fn key_of(x: f64) -> i64 {
    let b = x.to_bits() as i64;
    if b < 0 {
        b ^ i64::MAX
    } else {
        b
    }
}

fn from_key(k: i64) -> f64 {
    f64::from_bits((if k < 0 { k ^ i64::MAX } else { k }) as u64)
}

/// Number of weighers with a sorted index (free RAM, free disk, free vCPUs).
const INDEXED: usize = 3;

/// Position of the combined index among the sorted indexes.
const COMBO: usize = INDEXED;
/// Sorted indexes per host set: one per indexed weigher, and the combined one.
const LISTS: usize = INDEXED + 1;
/// A combined walk that reads more hosts than this asks for new coefficients...
const REKEY_READ: usize = 64;
/// ...if the request's normalisation ranges are out of proportion with the coefficients by
/// more than this factor.
const REKEY_SPREAD: f64 = 1.01;
/// At most one re-keying per this many `select` calls.
const REKEY_EVERY: u32 = 128;

/// The combined key's coefficients for reference ranges: `multiplier / range`, so a host's
/// key orders hosts exactly as the score does for a request whose normalisation ranges are
/// those ranges. A zero range counts as 1 (any positive value is correct).
fn combo_coef(mult: &[f64; weighers::N], ranges: &[f64; INDEXED]) -> [f64; INDEXED] {
    let mut c = [0.0; INDEXED];
    for w in 0..INDEXED {
        let r = if ranges[w] > 0.0 && ranges[w].is_finite() {
            ranges[w]
        } else {
            1.0
        };
        c[w] = mult[w] / r;
    }
    c
}

/// A host's combined key from its raw weights: `Σ coef_w × raw_w`, summed in weigher order.
fn combo_key(coef: &[f64; INDEXED], raw: &[f64]) -> f64 {
    let mut g = 0.0;
    for w in 0..INDEXED {
        g += coef[w] * raw[w];
    }
    g
}

/// The stop rule of the combined walk: the best score an eligible host with a combined key
/// at most `G` can have.
///
/// An eligible host's raw weights lie in the normalisation box `[b.min, b.max]`. Writing each
/// walked weigher's term as `|m_w| × n_w` with `n_w ∈ [0, 1]` (plus a constant −|m_w| for a
/// negative multiplier), its key is `base + Σ β_w × n_w` with `β_w = |coef_w| × range_w ≥ 0`.
/// The largest score subject to `Σ β_w × n_w ≤ G − base` is a fractional knapsack: take the
/// weighers in decreasing `|m_w| / β_w`. When the request's ranges are proportional to the
/// coefficients' reference ranges the bound is the exact best score of the key; otherwise
/// it is looser, and the walk reads further (never stops early).
struct Combo {
    /// (value |m_w|, weight β_w) of the walked weighers, best ratio first.
    items: Vec<(f64, f64)>,
    base: f64,
    /// Added to the key budget: covers rounding in the keys and in `base`.
    slack: f64,
    /// Constant part of every eligible host's score, plus the margin for rounding in scores.
    offset: f64,
    /// The request's range per walked weigher and the coefficients' reference ranges.
    ranges: [f64; INDEXED],
    reference: [f64; INDEXED],
    walkers: Vec<usize>,
}

impl Combo {
    fn new(
        coef: &[f64; INDEXED],
        b: &Bounds,
        mult: &[f64; weighers::N],
        walkers: &[usize],
    ) -> Self {
        let mut items = Vec::with_capacity(walkers.len());
        let mut base = 0.0;
        let mut scale = 1.0;
        let mut offset = 0.0;
        let mut ranges = [0.0; INDEXED];
        let mut reference = [0.0; INDEXED];
        for w in 0..INDEXED {
            if mult[w] == 0.0 {
                continue;
            }
            scale += coef[w].abs() * b.min[w].abs().max(b.max[w].abs());
            reference[w] = mult[w].abs() / coef[w].abs();
            if walkers.contains(&w) {
                let range = b.max[w] - b.min[w];
                ranges[w] = range;
                items.push((mult[w].abs(), coef[w].abs() * range));
                if mult[w] > 0.0 {
                    base += coef[w] * b.min[w];
                } else {
                    base += coef[w] * b.max[w];
                    offset -= mult[w].abs();
                }
            } else {
                base += coef[w] * b.min[w];
            }
        }
        // Highest value per unit of key first; free items (weight 0) before all.
        items.sort_by(|a, b| (b.0 * a.1).total_cmp(&(a.0 * b.1)));
        let margin = 1e-9 * (1.0 + mult.iter().map(|m| m.abs()).sum::<f64>());
        Self {
            items,
            base,
            slack: 1e-9 * scale,
            offset: offset + margin,
            ranges,
            reference,
            walkers: walkers.to_vec(),
        }
    }

    /// The bound for unseen hosts whose key is at most `g`, or `None` if no eligible host
    /// can have such a key. `soft` is the soft group weigher and its multiplier: unseen hosts
    /// are not members, so its raw value for them is 0.
    fn bound(&self, g: f64, soft: Option<(usize, f64, &Bounds)>) -> Option<f64> {
        let mut budget = g - self.base + self.slack;
        if budget < 0.0 {
            return None;
        }
        let mut value = self.offset;
        for &(v, weight) in &self.items {
            let n = if weight <= budget {
                1.0
            } else {
                budget / weight
            };
            value += v * n;
            budget -= weight * n;
            if budget <= 0.0 {
                budget = 0.0;
            }
        }
        if let Some((w, m, b)) = soft {
            value += m * weighers::normalize(0.0, b.min[w], b.max[w]);
        }
        Some(value)
    }

    /// New reference ranges if the request's ranges are out of proportion with the current
    /// ones by more than `spread`.
    fn rekey_ranges(&self, spread: f64) -> Option<[f64; INDEXED]> {
        let ratios = self
            .walkers
            .iter()
            .map(|&w| self.reference[w] / self.ranges[w]);
        let lo = ratios.clone().fold(f64::INFINITY, f64::min);
        let hi = ratios.fold(f64::NEG_INFINITY, f64::max);
        if hi > lo * spread {
            let mut r = self.reference;
            for &w in &self.walkers {
                r[w] = self.ranges[w];
            }
            Some(r)
        } else {
            None
        }
    }
}

/// A walk over one sorted weigher index, from its best end.
type Walk<'a> = Box<dyn Iterator<Item = &'a (i64, u32)> + 'a>;

/// The hosts of several sorted indexes in one order (a k-way merge): descending raw value
/// if `desc`, ascending otherwise.
struct Merge<'a> {
    /// A single list is read directly, without the heap.
    single: Option<Walk<'a>>,
    iters: Vec<Walk<'a>>,
    heap: BinaryHeap<(i64, u32, usize)>,
    desc: bool,
}

impl<'a> Merge<'a> {
    /// `from`: an ascending merge starts at this key (a seek past every smaller key).
    fn new(lists: &[&'a BTreeSet<(i64, u32)>], desc: bool, from: Option<i64>) -> Self {
        let mut m = Merge {
            single: None,
            iters: Vec::with_capacity(lists.len()),
            heap: BinaryHeap::with_capacity(lists.len()),
            desc,
        };
        for l in lists {
            let it: Walk<'a> = match (desc, from) {
                (true, _) => Box::new(l.iter().rev()),
                (false, None) => Box::new(l.iter()),
                (false, Some(k)) => Box::new(l.range((k, 0)..)),
            };
            if lists.len() == 1 {
                m.single = Some(it);
                break;
            }
            m.iters.push(it);
            let n = m.iters.len() - 1;
            m.refill(n);
        }
        m
    }

    fn refill(&mut self, n: usize) {
        if let Some(&(key, host)) = self.iters[n].next() {
            // `!key` reverses the order without overflow, so the max-heap yields ascending.
            let order = if self.desc { key } else { !key };
            self.heap.push((order, host, n));
        }
    }
}

impl Iterator for Merge<'_> {
    type Item = (i64, u32);

    fn next(&mut self) -> Option<(i64, u32)> {
        if let Some(it) = &mut self.single {
            return it.next().copied();
        }
        let (order, host, n) = self.heap.pop()?;
        self.refill(n);
        Some((if self.desc { order } else { !order }, host))
    }
}

/// Per-request state shared by the picks of one request.
struct ReqState {
    p: Prepared,
    /// Group members per host index, counting earlier picks of this request.
    counts: HashMap<u32, u32>,
    /// AggregateInstanceExtraSpecsFilter result per aggregate set: 0 unknown, 1 pass, 2 fail.
    specs: Vec<u8>,
    /// Per host class: whether its hosts can pass the availability-zone and extra-specs
    /// filters. A class marked false holds only hosts that fail one of them.
    class_ok: Vec<bool>,
    /// Hosts in classes marked true.
    candidates: usize,
    /// Walk the per-class indexes of the candidate classes instead of the global ones.
    per_class: bool,
    /// Hosts seen by the current threshold walk: `seen[i] == epoch`.
    seen: Vec<u32>,
    epoch: u32,
    /// The verdict of the record-reading filters (`slow`) per host during the current pick:
    /// `memo[i] == memo_epoch << 1 | passed`. The walks for the normalisation bounds and the
    /// combined walk often ask about the same host; a JSON query is evaluated once.
    memo: Vec<u32>,
    memo_epoch: u32,
    /// The image's canonical architecture and hypervisor type as interned ids
    /// (`u32::MAX`: no host has it).
    image_ids: (Option<u32>, Option<u32>),
    /// The configured filters that can reject a host for this request, in order, without
    /// the zone and extra-specs filters (the class verdict stands for them).
    active: Vec<FilterKind>,
    /// Reference ranges the combined index should be re-keyed to, asked for by a walk.
    rekey: Option<[f64; INDEXED]>,
    /// The active filters `Hot` decides...
    fast: Fast,
    /// ...and those that read the host record, in order.
    slow: Vec<FilterKind>,
    /// Per resource weigher, the key of a value every eligible host's raw weight reaches:
    /// the walk for the normalisation minimum starts there.
    floors: [Option<i64>; INDEXED],
}

impl ReqState {
    /// Starts a pick: no memoised verdict of an earlier pick is used.
    fn next_pick(&mut self) {
        self.memo_epoch += 1;
        if self.memo_epoch >= 1 << 31 {
            self.memo.iter_mut().for_each(|m| *m = 0);
            self.memo_epoch = 1;
        }
    }

    fn group_view(&self, i: u32) -> GroupView {
        GroupView {
            members_on_host: if self.counts.is_empty() {
                0
            } else {
                self.counts.get(&i).copied().unwrap_or(0)
            },
            group_has_hosts: !self.counts.is_empty(),
        }
    }

    fn policy(&self) -> Option<GroupPolicy> {
        self.p.group.as_ref().map(|g| g.policy)
    }
}

/// Hosts sharing an availability zone and a set of aggregates.
#[derive(Debug)]
struct Class {
    az: String,
    set: u32,
    hosts: Vec<u32>,
}

/// What a host probe reads, in one cache line: a host's raw resource weights, what its
/// resource filters let through, its class, its compute state and its canonical
/// architecture and hypervisor type. Kept in a vector by host number, so the filters and
/// the score of a host read this instead of the `Host` record (strings, instance list) and
/// its side tables; the string-based filters (JSON query, groups, same/different host) still
/// read the record. Rebuilt from the record whenever the host changes, by the same
/// functions the filters and weighers use (`filters::fits`, `weighers::resources`), so
/// every check and weight is bit-for-bit the one a full pass computes.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Hot {
    /// Free RAM MB, free disk MB, free vCPUs (`weighers::resources`).
    raw: [f64; INDEXED],
    /// The largest RAM, disk and vCPU request the resource filters pass (`filters::fits`).
    fit: [f64; INDEXED],
    class: u32,
    /// Interned canonical architecture and hypervisor type.
    arch: u32,
    hv: u32,
    /// Enabled and up (ComputeFilter).
    up: bool,
}

/// Which fast checks a request needs, from its active filters.
#[derive(Debug, Clone, Copy, Default)]
struct Fast {
    compute: bool,
    /// Per resource (RAM, disk, vCPUs): whether its filter runs, and the request's demand.
    check: [bool; INDEXED],
    demand: [f64; INDEXED],
    image: bool,
}

/// The scheduler: an indexed host view, the configuration and the seeded RNG.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    rng: StdRng,
    hosts: Vec<Host>,
    aggregates: Vec<Aggregate>,
    by_name: HashMap<String, u32>,
    /// Merged metadata of each distinct set of aggregates a host can be in.
    agg_sets: Vec<BTreeMap<String, Vec<String>>>,
    host_set: Vec<u32>,
    ratios: Vec<AllocationRatios>,
    /// Canonical (architecture, hypervisor type) per host, as strings and as interned ids.
    canon: Vec<(String, String)>,
    canon_ids: Vec<(u32, u32)>,
    interned: HashMap<String, u32>,
    /// The hot fields of every host, by host number.
    hot: Vec<Hot>,
    /// Per host class and resource, how far a host's raw weight can lie below what its
    /// resource filter lets through (`Hot::fit`): `max(0, usable × ratio − usable)` for RAM
    /// and disk, 0 for vCPUs (the weigher is the filter's own headroom), +∞ if a host
    /// reports no vCPUs (it passes any demand). Fixed, because totals and ratios are.
    class_gap: Vec<[f64; INDEXED]>,
    /// Per resource, the largest usable amount or capacity of any host: the scale of the
    /// rounding margin on a floor.
    cap_scale: [f64; INDEXED],
    /// Hosts grouped by (availability zone, aggregate set): the zone and extra-specs
    /// filters give the same answer for every host of a class.
    classes: Vec<Class>,
    host_class: Vec<u32>,
    /// Scratch for the threshold walk, lent to each request (host → epoch last seen).
    seen: Vec<u32>,
    epoch: u32,
    /// Scratch for `ReqState::memo`, lent the same way.
    memo: Vec<u32>,
    memo_epoch: u32,
    instance_host: HashMap<String, u32>,
    /// Hosts sorted by the raw value of each indexed weigher, then by the combined key.
    sorted: [BTreeSet<(i64, u32)>; LISTS],
    /// The same, per host class.
    class_sorted: Vec<[BTreeSet<(i64, u32)>; LISTS]>,
    keys: Vec<[i64; LISTS]>,
    /// Coefficients of the combined key.
    coef: [f64; INDEXED],
    /// `select` calls since the combined index was last re-keyed.
    since_rekey: u32,
    /// When a walk asks to re-key: `REKEY_READ`, `REKEY_SPREAD` and `REKEY_EVERY` (tests
    /// lower them to re-key as often as possible).
    rekey_rule: (usize, f64, u32),
}

impl Scheduler {
    /// Indexes a view of the hosts and their aggregates.
    pub fn new(
        config: SchedulerConfig,
        hosts: Vec<Host>,
        aggregates: Vec<Aggregate>,
    ) -> Result<Self, ViewError> {
        let mut agg_by_name: HashMap<&str, &Aggregate> = HashMap::new();
        for a in &aggregates {
            if agg_by_name.insert(&a.name, a).is_some() {
                return Err(ViewError::DuplicateAggregate(a.name.clone()));
            }
        }
        let mut by_name = HashMap::with_capacity(hosts.len());
        let mut set_ids: HashMap<Vec<String>, u32> = HashMap::new();
        let mut agg_sets = Vec::new();
        let mut host_set = Vec::with_capacity(hosts.len());
        let mut ratios = Vec::with_capacity(hosts.len());
        let mut canon = Vec::with_capacity(hosts.len());
        let mut canon_ids = Vec::with_capacity(hosts.len());
        let mut interned: HashMap<String, u32> = HashMap::new();
        let mut class_ids: HashMap<(String, u32), u32> = HashMap::new();
        let mut classes: Vec<Class> = Vec::new();
        let mut host_class = Vec::with_capacity(hosts.len());
        let mut instance_host = HashMap::new();
        for (i, h) in hosts.iter().enumerate() {
            let i = i as u32;
            if by_name.insert(h.name.clone(), i).is_some() {
                return Err(ViewError::DuplicateHost(h.name.clone()));
            }
            let mut names = h.aggregates.clone();
            names.sort();
            names.dedup();
            for n in &names {
                if !agg_by_name.contains_key(n.as_str()) {
                    return Err(ViewError::UnknownAggregate {
                        host: h.name.clone(),
                        aggregate: n.clone(),
                    });
                }
            }
            let set = match set_ids.get(&names) {
                Some(&s) => s,
                None => {
                    let merged =
                        merge_metadata(names.iter().map(|n| &agg_by_name[n.as_str()].metadata));
                    agg_sets.push(merged);
                    let s = (agg_sets.len() - 1) as u32;
                    set_ids.insert(names, s);
                    s
                }
            };
            host_set.push(set);
            let meta = &agg_sets[set as usize];
            ratios.push(effective_ratios(h.allocation_ratios, meta));
            let arch = filters::canonical_arch(&h.architecture);
            let hv = filters::canonical_hv(&h.hypervisor_type);
            let mut intern = |s: &str| {
                let next = interned.len() as u32;
                *interned.entry(s.to_owned()).or_insert(next)
            };
            canon_ids.push((intern(&arch), intern(&hv)));
            canon.push((arch, hv));
            let key = (h.availability_zone.clone(), set);
            let class = *class_ids.entry(key).or_insert_with(|| {
                classes.push(Class {
                    az: h.availability_zone.clone(),
                    set,
                    hosts: Vec::new(),
                });
                (classes.len() - 1) as u32
            });
            classes[class as usize].hosts.push(i);
            host_class.push(class);
            for inst in &h.instances {
                if instance_host.insert(inst.clone(), i).is_some() {
                    return Err(ViewError::DuplicateInstance(inst.clone()));
                }
            }
        }
        let mut s = Self {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            keys: vec![[0; LISTS]; hosts.len()],
            coef: [0.0; INDEXED],
            since_rekey: 0,
            rekey_rule: (REKEY_READ, REKEY_SPREAD, REKEY_EVERY),
            seen: vec![0; hosts.len()],
            memo: vec![0; hosts.len()],
            memo_epoch: 0,
            hosts,
            aggregates,
            by_name,
            agg_sets,
            host_set,
            ratios,
            canon,
            canon_ids,
            interned,
            hot: Vec::new(),
            class_gap: Vec::new(),
            cap_scale: [0.0; INDEXED],
            classes,
            host_class,
            epoch: 0,
            instance_host,
            sorted: Default::default(),
            class_sorted: Vec::new(),
        };
        s.class_sorted = (0..s.classes.len()).map(|_| Default::default()).collect();
        s.hot = (0..s.hosts.len() as u32).map(|i| s.hot_of(i)).collect();
        s.class_gap = vec![[0.0; INDEXED]; s.classes.len()];
        for i in 0..s.hosts.len() {
            let (h, r) = (&s.hosts[i], s.ratios[i]);
            let gap = &mut s.class_gap[s.host_class[i] as usize];
            for (w, (usable, ratio)) in [
                (h.ram_mb_usable() as f64, r.ram),
                (h.disk_mb_usable() as f64, r.disk),
            ]
            .into_iter()
            .enumerate()
            {
                let cap = usable * ratio;
                // A NaN capacity fails every demand, so it widens nothing.
                if cap > usable {
                    gap[w] = gap[w].max(cap - usable);
                }
                for x in [usable, cap] {
                    if x.is_finite() {
                        s.cap_scale[w] = s.cap_scale[w].max(x);
                    }
                }
            }
            if h.vcpus_total == 0 {
                gap[2] = f64::INFINITY;
            }
            let cpu = f64::from(h.vcpus_usable());
            for x in [cpu, cpu * r.cpu] {
                if x.is_finite() {
                    s.cap_scale[2] = s.cap_scale[2].max(x);
                }
            }
        }
        // The combined key starts with the ranges over all hosts.
        let mut all = Bounds::empty();
        for i in 0..s.hosts.len() as u32 {
            all.add(&weighers::raw(&s.ctx(i), None, 0));
        }
        let mut ranges = [0.0; INDEXED];
        for (w, r) in ranges.iter_mut().enumerate() {
            *r = all.max[w] - all.min[w];
        }
        s.coef = combo_coef(&s.config.multipliers.as_array(), &ranges);
        for i in 0..s.hosts.len() as u32 {
            s.index_insert(i);
        }
        Ok(s)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn aggregates(&self) -> &[Aggregate] {
        &self.aggregates
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.by_name.get(name).map(|&i| &self.hosts[i as usize])
    }

    /// Applies a committed claim to the view (checking the generation it was made at).
    pub fn apply_claim(&mut self, claim: &Claim) -> Result<(), ClaimError> {
        let i = *self
            .by_name
            .get(&claim.host)
            .ok_or_else(|| ClaimError::UnknownHost(claim.host.clone()))?;
        let host = &self.hosts[i as usize];
        if host.generation == claim.generation
            && self.instance_host.contains_key(&claim.instance_id)
        {
            return Err(ClaimError::InstanceAlreadyPlaced(claim.instance_id.clone()));
        }
        self.index_remove(i);
        let res = apply_claim(&mut self.hosts[i as usize], claim);
        if res.is_ok() {
            self.instance_host.insert(claim.instance_id.clone(), i);
        }
        self.index_insert(i);
        res
    }

    fn revert(&mut self, claim: &Claim) {
        let i = self.by_name[&claim.host];
        self.index_remove(i);
        revert_claim(&mut self.hosts[i as usize], claim);
        self.instance_host.remove(&claim.instance_id);
        self.index_insert(i);
    }

    fn ctx(&self, i: u32) -> HostCtx<'_> {
        HostCtx {
            host: &self.hosts[i as usize],
            ratios: self.ratios[i as usize],
            metadata: &self.agg_sets[self.host_set[i as usize] as usize],
            arch: &self.canon[i as usize].0,
            hv: &self.canon[i as usize].1,
        }
    }

    /// Host `i`'s hot fields, from its record.
    fn hot_of(&self, i: u32) -> Hot {
        let ctx = self.ctx(i);
        let (arch, hv) = self.canon_ids[i as usize];
        Hot {
            raw: weighers::resources(&ctx),
            fit: filters::fits(&ctx),
            class: self.host_class[i as usize],
            arch,
            hv,
            up: ctx.host.enabled && ctx.host.up,
        }
    }

    fn raw(&self, i: u32, st: &ReqState) -> [f64; weighers::N] {
        let members = if st.counts.is_empty() {
            0
        } else {
            st.counts.get(&i).copied().unwrap_or(0)
        };
        weighers::with_group(self.hot[i as usize].raw, st.policy(), members)
    }

    /// Refreshes host `i`'s hot fields and puts it into the sorted indexes.
    fn index_insert(&mut self, i: u32) {
        self.hot[i as usize] = self.hot_of(i);
        let raw = self.hot[i as usize].raw;
        let mut k = [0; LISTS];
        for w in 0..LISTS {
            k[w] = key_of(if w == COMBO {
                combo_key(&self.coef, &raw)
            } else {
                raw[w]
            });
            self.sorted[w].insert((k[w], i));
            self.class_sorted[self.host_class[i as usize] as usize][w].insert((k[w], i));
        }
        self.keys[i as usize] = k;
    }

    fn index_remove(&mut self, i: u32) {
        let k = self.keys[i as usize];
        for (w, key) in k.iter().enumerate() {
            self.sorted[w].remove(&(*key, i));
            self.class_sorted[self.host_class[i as usize] as usize][w].remove(&(*key, i));
        }
    }

    /// Tests: re-key the combined index to these reference ranges now (any positive ranges
    /// give the same answers, only the walk's depth changes), and re-key after every walk
    /// whose ranges differ from the reference if `eager`.
    #[cfg(test)]
    pub(crate) fn tune_combo(&mut self, ranges: Option<[f64; INDEXED]>, eager: bool) {
        if let Some(r) = ranges {
            self.rekey(&r);
        }
        if eager {
            self.rekey_rule = (0, 1.0, 0);
        }
    }

    /// Recomputes the combined key of every host for new reference ranges.
    fn rekey(&mut self, ranges: &[f64; INDEXED]) {
        self.coef = combo_coef(&self.config.multipliers.as_array(), ranges);
        let mut all = Vec::with_capacity(self.hosts.len());
        let mut per_class: Vec<Vec<(i64, u32)>> = vec![Vec::new(); self.classes.len()];
        for i in 0..self.hosts.len() as u32 {
            let key = key_of(combo_key(&self.coef, &self.hot[i as usize].raw));
            self.keys[i as usize][COMBO] = key;
            all.push((key, i));
            per_class[self.host_class[i as usize] as usize].push((key, i));
        }
        all.sort_unstable();
        self.sorted[COMBO] = all.into_iter().collect();
        for (c, mut list) in per_class.into_iter().enumerate() {
            list.sort_unstable();
            self.class_sorted[c][COMBO] = list.into_iter().collect();
        }
        self.since_rekey = 0;
    }

    /// The extra-specs verdict for an aggregate set, computed once per request.
    fn specs_pass(&self, set: usize, st: &mut ReqState) -> bool {
        if st.specs[set] == 0 {
            let pass = filters::extra_specs_pass(&self.agg_sets[set], &st.p.extra_specs);
            st.specs[set] = if pass { 1 } else { 2 };
        }
        st.specs[set] == 1
    }

    /// Marks the host classes whose hosts can pass the zone and extra-specs filters (those
    /// filters read only the zone and the aggregate set, which a class shares).
    fn classify(&self, st: &mut ReqState) {
        let on = |f: FilterKind| self.config.filters.contains(&f) && st.p.forced_host.is_none();
        let check_az = on(FilterKind::AvailabilityZone);
        let check_specs = on(FilterKind::AggregateInstanceExtraSpecs);
        st.class_ok = Vec::with_capacity(self.classes.len());
        st.candidates = 0;
        for c in &self.classes {
            let ok = (!check_az || st.p.az.as_ref().is_none_or(|az| *az == c.az))
                && (!check_specs || self.specs_pass(c.set as usize, st));
            if ok {
                st.candidates += c.hosts.len();
            }
            st.class_ok.push(ok);
        }
        // When under half the hosts can pass, walking the candidate classes' own indexes
        // costs less than skipping the other classes in the global ones.
        st.per_class = st.candidates * 2 < self.hosts.len();
    }

    /// Position in `config.filters` of the first filter that rejects host `i`.
    fn first_failing(&self, i: u32, st: &mut ReqState) -> Option<usize> {
        let ctx = self.ctx(i);
        let gv = st.group_view(i);
        for (n, &f) in self.config.filters.iter().enumerate() {
            let ok = if f == FilterKind::AggregateInstanceExtraSpecs && st.p.forced_host.is_none() {
                self.specs_pass(self.host_set[i as usize] as usize, st)
            } else {
                filters::passes(f, &ctx, &st.p, gv)
            };
            if !ok {
                return Some(n);
            }
        }
        None
    }

    /// The filters `eligible` must run for this request: those that cannot reject any host
    /// (no image requirement, no query, no group of their policy, a forced host) are left out.
    fn active_filters(&self, p: &filters::Prepared) -> Vec<FilterKind> {
        let policy = p.group.as_ref().map(|g| g.policy);
        self.config
            .filters
            .iter()
            .copied()
            .filter(|&f| {
                if p.forced_host.is_some() && !f.runs_on_forced_host() {
                    return false;
                }
                match f {
                    FilterKind::AvailabilityZone | FilterKind::AggregateInstanceExtraSpecs => false,
                    FilterKind::ImageProperties => p.image_arch.is_some() || p.image_hv.is_some(),
                    FilterKind::Json => p.query.is_some(),
                    FilterKind::ServerGroupAntiAffinity => {
                        policy == Some(GroupPolicy::AntiAffinity)
                    }
                    FilterKind::ServerGroupAffinity => policy == Some(GroupPolicy::Affinity),
                    _ => true,
                }
            })
            .collect()
    }

    /// The floors of the normalisation-minimum walks (`ReqState::floors`).
    ///
    /// A resource filter passes a host only if `fit ≥ demand`; for vCPUs the raw weight is
    /// the filter's headroom, so `raw ≥ fit`; for RAM and disk `raw = usable − used` and the
    /// headroom is `usable × ratio − used`, so `raw ≥ fit − gap` with the class's gap. The
    /// margin covers rounding (relative 10⁻⁶ of the largest capacity, far above the f64
    /// error of these integers' differences). A JSON query that requires `$free_ram_mb` or
    /// `$free_disk_mb ≥ n` bounds the same raw weights exactly (the same expression).
    fn floors(&self, st: &ReqState) -> [Option<i64>; INDEXED] {
        let mut floor = [f64::NEG_INFINITY; INDEXED];
        for (w, f) in floor.iter_mut().enumerate() {
            if !st.fast.check[w] {
                continue;
            }
            let gap = self
                .class_gap
                .iter()
                .zip(&st.class_ok)
                .filter(|(_, ok)| **ok)
                .fold(0.0f64, |g, (c, _)| g.max(c[w]));
            if gap.is_finite() {
                let demand = st.fast.demand[w];
                *f = demand - gap - 1e-6 * (1.0 + demand.abs() + gap + self.cap_scale[w]);
            }
        }
        if st.slow.contains(&FilterKind::Json) {
            if let Some(q) = &st.p.query {
                for (f, j) in floor.iter_mut().zip(q.free_floors()) {
                    *f = f.max(j);
                }
            }
        }
        floor.map(|f| {
            // −0.0 sorts before +0.0 by key: seek to the smaller so both are read.
            (f > f64::NEG_INFINITY).then(|| key_of(if f == 0.0 { -0.0 } else { f }))
        })
    }

    /// Splits the request's active filters into the checks `Hot` decides and the rest.
    fn split_filters(&self, st: &mut ReqState) {
        let mut fast = Fast {
            demand: [
                st.p.ram_mb as f64,
                st.p.disk_mb as f64,
                f64::from(st.p.vcpus),
            ],
            ..Fast::default()
        };
        st.slow = Vec::new();
        for &f in &st.active {
            match f {
                FilterKind::Compute => fast.compute = true,
                FilterKind::Ram => fast.check[0] = true,
                FilterKind::Disk => fast.check[1] = true,
                FilterKind::Core => fast.check[2] = true,
                FilterKind::ImageProperties => fast.image = true,
                f => st.slow.push(f),
            }
        }
        st.fast = fast;
    }

    /// Whether host `i` passes every filter: `first_failing(i).is_none()`, computed faster.
    fn eligible(&self, i: u32, st: &mut ReqState) -> bool {
        let h = &self.hot[i as usize];
        // The class verdict is exactly the zone and extra-specs filters' verdict (all true for
        // a forced host, for which those filters do not run).
        if !st.class_ok[h.class as usize] {
            return false;
        }
        let fast = &st.fast;
        if fast.compute && !h.up {
            return false;
        }
        for r in 0..INDEXED {
            // A NaN fit fails, as in `filters::passes`.
            if fast.check[r] && (h.fit[r] < fast.demand[r] || h.fit[r].is_nan()) {
                return false;
            }
        }
        if fast.image && !self.image_ok(i, h, st) {
            return false;
        }
        if st.slow.is_empty() {
            return true;
        }
        let memo = st.memo[i as usize];
        if memo >> 1 == st.memo_epoch {
            return memo & 1 == 1;
        }
        // These read the host record only, not the side tables a `HostCtx` gathers.
        let host = &self.hosts[i as usize];
        let gv = st.group_view(i);
        let ok = st.slow.iter().all(|&f| {
            filters::record_passes(f, host, &st.p, gv)
                .unwrap_or_else(|| filters::passes(f, &self.ctx(i), &st.p, gv))
        });
        st.memo[i as usize] = st.memo_epoch << 1 | u32::from(ok);
        ok
    }

    /// ImagePropertiesFilter on interned ids instead of strings.
    fn image_ok(&self, i: u32, h: &Hot, st: &ReqState) -> bool {
        let (arch, hv) = st.image_ids;
        if st.p.forced_host.is_some() || (arch.is_none() && hv.is_none()) {
            return true;
        }
        if arch.is_some_and(|a| a != h.arch) || hv.is_some_and(|x| x != h.hv) {
            return false;
        }
        let version = self.hosts[i as usize].hypervisor_version;
        match &st.p.image_version {
            Some(req) if version != 0 => req.satisfied_by(filters::version_from_int(version)),
            _ => true,
        }
    }

    /// Places every instance of the request or none. Returns one claim per instance, in the
    /// order of `request.instance_ids`. The view is left as it was: apply the claims with
    /// [`Scheduler::apply_claim`] once they are committed.
    pub fn select(&mut self, request: &Request) -> Result<Vec<Claim>, ScheduleError> {
        let p = filters::prepare(request)?;
        let forced = match &p.forced_host {
            Some(name) => Some(
                *self
                    .by_name
                    .get(name)
                    .ok_or_else(|| RequestError::UnknownForcedHost(name.clone()))?,
            ),
            None => None,
        };
        let mut ids = HashSet::with_capacity(request.instance_ids.len());
        for id in &request.instance_ids {
            if !ids.insert(id.as_str()) || self.instance_host.contains_key(id) {
                return Err(ScheduleError::DuplicateInstance(id.clone()));
            }
        }
        let mut counts = HashMap::new();
        if let Some(g) = &p.group {
            for m in &g.members {
                if let Some(&h) = self.instance_host.get(m) {
                    *counts.entry(h).or_insert(0) += 1;
                }
            }
        }
        let mut st = ReqState {
            p,
            counts,
            specs: vec![0; self.agg_sets.len()],
            class_ok: Vec::new(),
            candidates: 0,
            per_class: false,
            seen: std::mem::take(&mut self.seen),
            memo: std::mem::take(&mut self.memo),
            memo_epoch: self.memo_epoch,
            epoch: self.epoch,
            image_ids: (None, None),
            rekey: None,
            active: Vec::new(),
            fast: Fast::default(),
            slow: Vec::new(),
            floors: [None; INDEXED],
        };
        st.active = self.active_filters(&st.p);
        self.split_filters(&mut st);
        let id = |s: &String| self.interned.get(s).copied().unwrap_or(u32::MAX);
        st.image_ids = (
            st.p.image_arch.as_ref().map(id),
            st.p.image_hv.as_ref().map(id),
        );
        self.classify(&mut st);
        st.floors = self.floors(&st);
        let mut claims: Vec<Claim> = Vec::with_capacity(request.instance_ids.len());
        let mut failure = None;
        let mut applied = 0;
        for (n, id) in request.instance_ids.iter().enumerate() {
            // A pick changes the chosen host and the group counts: forget the verdicts.
            st.next_pick();
            let top = match forced {
                Some(f) => self.scan([f].into_iter(), &mut st),
                None => self.best(&mut st),
            };
            if top.is_empty() {
                failure = Some(self.no_valid_host(n, request.instance_ids.len(), forced, &mut st));
                break;
            }
            let choice = pick_index(&mut self.rng, top.len());
            let i = top[choice].1;
            let claim = claim_for(&self.hosts[i as usize], &st.p, id);
            // Later picks see this one; the last pick has no later pick to see it, so it is
            // not applied (and not reverted): that saves two updates of every index.
            if n + 1 < request.instance_ids.len() {
                self.apply_claim(&claim)
                    .expect("a claim made from the view applies to it");
                *st.counts.entry(i).or_insert(0) += 1;
                applied += 1;
            }
            claims.push(claim);
        }
        for c in claims[..applied].iter().rev() {
            self.revert(c);
        }
        self.seen = st.seen;
        self.epoch = st.epoch;
        self.memo = st.memo;
        self.memo_epoch = st.memo_epoch;
        self.since_rekey = self.since_rekey.saturating_add(1);
        if let Some(ranges) = st.rekey {
            if self.since_rekey >= self.rekey_rule.2 {
                self.rekey(&ranges);
            }
        }
        match failure {
            Some(e) => Err(ScheduleError::NoValidHost(e)),
            None => Ok(claims),
        }
    }

    fn no_valid_host(
        &self,
        n: usize,
        instances: usize,
        forced: Option<u32>,
        st: &mut ReqState,
    ) -> NoValidHost {
        let universe: Vec<u32> = match forced {
            Some(f) => vec![f],
            None => (0..self.hosts.len() as u32).collect(),
        };
        let mut removed = vec![0usize; self.config.filters.len()];
        for &i in &universe {
            if let Some(f) = self.first_failing(i, st) {
                removed[f] += 1;
            }
        }
        let mut start = universe.len();
        let filters = self
            .config
            .filters
            .iter()
            .zip(removed)
            .map(|(&filter, r)| {
                let c = FilterCount {
                    filter,
                    start,
                    end: start - r,
                };
                start -= r;
                c
            })
            .collect();
        NoValidHost {
            instance_index: n,
            instances,
            hosts: universe.len(),
            filters,
        }
    }

    /// The `host_subset_size` best eligible hosts, best first, as (score, host index).
    fn best(&self, st: &mut ReqState) -> Vec<(f64, u32)> {
        let limit = self.config.scan_limit;
        // The hosts of an affinity group that already has members.
        if let Some(g) = &st.p.group {
            if g.policy == GroupPolicy::Affinity
                && !st.counts.is_empty()
                && self
                    .config
                    .filters
                    .contains(&FilterKind::ServerGroupAffinity)
                && st.counts.len() <= limit
            {
                let hosts: Vec<u32> = st.counts.keys().copied().collect();
                return self.scan(hosts.into_iter(), st);
            }
        }
        // The hosts of the classes that pass the zone and extra-specs filters: scan them if
        // they are few.
        if st.candidates <= limit {
            let hosts: Vec<u32> = self
                .classes
                .iter()
                .zip(&st.class_ok)
                .filter(|(_, ok)| **ok)
                .flat_map(|(c, _)| c.hosts.iter().copied())
                .collect();
            return self.scan(hosts.into_iter(), st);
        }
        self.threshold_walk(st)
    }

    /// Filters and weighs the given hosts (in increasing index order).
    fn scan(&self, hosts: impl Iterator<Item = u32>, st: &mut ReqState) -> Vec<(f64, u32)> {
        let mut cands: Vec<(u32, [f64; weighers::N])> = Vec::new();
        let mut b = Bounds::empty();
        for i in hosts {
            if self.eligible(i, st) {
                let raw = self.raw(i, st);
                b.add(&raw);
                cands.push((i, raw));
            }
        }
        let mult = self.config.multipliers.as_array();
        let k = self.config.host_subset_size.max(1);
        let mut top = Vec::with_capacity(k + 1);
        for (i, raw) in &cands {
            push_top(&mut top, k, (weighers::score(raw, &b, &mult), *i));
        }
        top
    }

    /// Hosts in the order of weigher `w` (descending if `desc`): all hosts, or only the
    /// candidate classes' when the request rules most classes out.
    fn walk<'a>(&'a self, w: usize, desc: bool, st: &ReqState) -> Merge<'a> {
        self.walk_from(w, desc, None, st)
    }

    /// `walk`, ascending from key `from` if given.
    fn walk_from<'a>(
        &'a self,
        w: usize,
        desc: bool,
        from: Option<i64>,
        st: &ReqState,
    ) -> Merge<'a> {
        if st.per_class {
            let lists: Vec<&BTreeSet<(i64, u32)>> = self
                .class_sorted
                .iter()
                .zip(&st.class_ok)
                .filter(|(_, ok)| **ok)
                .map(|(sets, _)| &sets[w])
                .collect();
            Merge::new(&lists, desc, from)
        } else {
            Merge::new(&[&self.sorted[w]], desc, from)
        }
    }

    /// The threshold walk over the sorted weigher indexes (see the module docs).
    fn threshold_walk(&self, st: &mut ReqState) -> Vec<(f64, u32)> {
        let k = self.config.host_subset_size.max(1);
        let mult = self.config.multipliers.as_array();
        let mut b = Bounds {
            min: [0.0; weighers::N],
            max: [0.0; weighers::N],
        };
        // Normalisation bounds of the resource weighers: the first eligible host from each
        // end of each sorted index.
        let mut found_any = false;
        for (w, &m) in mult.iter().enumerate().take(INDEXED) {
            if m == 0.0 {
                continue;
            }
            let Some((lo, _)) = self
                .walk_from(w, false, st.floors[w], st)
                .find(|(_, i)| self.eligible(*i, st))
            else {
                return Vec::new();
            };
            let (hi, _) = self
                .walk(w, true, st)
                .find(|(_, i)| self.eligible(*i, st))
                .expect("an eligible host exists");
            b.min[w] = from_key(lo);
            b.max[w] = from_key(hi);
            found_any = true;
        }
        // Soft group weigher: only members can have a non-zero raw value.
        let soft = match st.policy() {
            Some(GroupPolicy::SoftAffinity) if mult[weighers::SOFT_AFFINITY] != 0.0 => {
                Some(weighers::SOFT_AFFINITY)
            }
            Some(GroupPolicy::SoftAntiAffinity) if mult[weighers::SOFT_ANTI_AFFINITY] != 0.0 => {
                Some(weighers::SOFT_ANTI_AFFINITY)
            }
            _ => None,
        };
        let mut members: Vec<u32> = Vec::new();
        if let Some(w) = soft {
            members = st.counts.keys().copied().collect();
            members.sort_unstable();
            let mut lo = f64::INFINITY;
            let mut hi = f64::NEG_INFINITY;
            for &i in &members {
                if self.eligible(i, st) {
                    let v = self.raw(i, st)[w];
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
            }
            let non_member = self
                .walk(0, true, st)
                .any(|(_, i)| !st.counts.contains_key(&i) && self.eligible(i, st));
            if non_member {
                lo = lo.min(0.0);
                hi = hi.max(0.0);
            }
            if lo > hi {
                return Vec::new();
            }
            b.min[w] = lo;
            b.max[w] = hi;
            found_any = true;
        }
        let walkers: Vec<usize> = (0..INDEXED)
            .filter(|&w| mult[w] != 0.0 && b.min[w] != b.max[w])
            .collect();
        if !found_any || walkers.is_empty() {
            // Every unseen host would tie: fall back to a pass over the candidates.
            let hosts: Vec<u32> = self
                .classes
                .iter()
                .zip(&st.class_ok)
                .filter(|(_, ok)| **ok)
                .flat_map(|(c, _)| c.hosts.iter().copied())
                .collect();
            return self.scan(hosts.into_iter(), st);
        }
        let mut top: Vec<(f64, u32)> = Vec::with_capacity(k + 1);
        let push = |top: &mut Vec<(f64, u32)>, cand: (f64, u32)| push_top(top, k, cand);
        st.epoch = st.epoch.wrapping_add(1);
        if st.epoch == 0 {
            st.seen.iter_mut().for_each(|x| *x = 0);
            st.epoch = 1;
        }
        let epoch = st.epoch;
        for &i in &members {
            st.seen[i as usize] = epoch;
            if self.eligible(i, st) {
                push(&mut top, (weighers::score(&self.raw(i, st), &b, &mult), i));
            }
        }
        // Walk the combined index (hosts by g = Σ coef_w × x_w, best first). Every unseen
        // host has g ≤ the last key read; an eligible one also lies inside the normalisation
        // box. The best score such a host can have is a fractional knapsack (see `Combo`).
        let combo = Combo::new(&self.coef, &b, &mult, &walkers);
        let mut it = self.walk(COMBO, true, st);
        let mut read = 0usize;
        for (key, i) in it.by_ref() {
            read += 1;
            if st.seen[i as usize] != epoch {
                st.seen[i as usize] = epoch;
                if self.eligible(i, st) {
                    push(&mut top, (weighers::score(&self.raw(i, st), &b, &mult), i));
                }
            }
            match combo.bound(from_key(key), soft.map(|w| (w, mult[w], &b))) {
                None => break,
                Some(bound) if top.len() == k && top[k - 1].0 > bound => break,
                Some(_) => {}
            }
        }
        // A walk that read far because the coefficients no longer match the ranges of a
        // typical request asks for new ones. Requests whose candidates are a few classes or
        // whose JSON query shapes the ranges are not typical, and would make the index
        // thrash between two sets of coefficients.
        let (min_read, spread, _) = self.rekey_rule;
        if read > min_read && !st.per_class && st.p.query.is_none() {
            st.rekey = combo.rekey_ranges(spread);
        }
        top
    }
}

#[cfg(test)]
mod combo_tests {
    use proptest::prelude::*;

    use super::*;

    fn point() -> impl Strategy<Value = ([f64; INDEXED], [f64; INDEXED], [f64; INDEXED])> {
        // (min, range, position in [0, 1]) per indexed weigher.
        (
            [-1e6f64..1e6, -1e6f64..1e6, -1e3f64..1e4],
            [1e-3f64..1e6, 1e-3f64..1e6, 1e-3f64..1e4],
            [0.0f64..=1.0, 0.0f64..=1.0, 0.0f64..=1.0],
        )
    }

    proptest! {
        /// The stop rule's bound is never below the score of an eligible host (inside the
        /// normalisation box) whose combined key is at most the key read, whatever the
        /// reference ranges; and when the reference ranges are the request's it is that
        /// host's own score (up to the rounding margin).
        #[test]
        fn bound_covers_every_host_below_the_key(
            (min, range, pos) in point(),
            mult in [-2.0f64..2.0, -2.0f64..2.0, -2.0f64..2.0],
            zero in 0usize..4,
            reference in [1e-3f64..1e7, 1e-3f64..1e7, 1e-3f64..1e7],
            exact in any::<bool>(),
        ) {
            let mut m = [0.0; weighers::N];
            m[..INDEXED].copy_from_slice(&mult);
            if zero < INDEXED {
                m[zero] = 0.0;
            }
            let mut b = Bounds { min: [0.0; weighers::N], max: [0.0; weighers::N] };
            let mut raw = [0.0; weighers::N];
            for w in 0..INDEXED {
                b.min[w] = min[w];
                b.max[w] = min[w] + range[w];
                raw[w] = (min[w] + range[w] * pos[w]).clamp(b.min[w], b.max[w]);
            }
            let walkers: Vec<usize> =
                (0..INDEXED).filter(|&w| m[w] != 0.0 && b.min[w] != b.max[w]).collect();
            let reference = if exact { range } else { reference };
            let coef = combo_coef(&m, &reference);
            let combo = Combo::new(&coef, &b, &m, &walkers);
            let g = combo_key(&coef, &raw);
            let score = weighers::score(&raw, &b, &m);
            let bound = combo.bound(g, None).expect("a host inside the box has this key");
            prop_assert!(bound >= score, "bound {bound} < score {score}");
            // Tight when the box is not tiny next to its distance from 0: the key's rounding
            // slack is relative to the values, so it widens the bound by about
            // 1e-9 × |value| / range per weigher.
            let conditioned = (0..INDEXED).all(|w| min[w].abs().max((min[w] + range[w]).abs()) <= 1e3 * range[w]);
            if exact && conditioned {
                prop_assert!(bound - score < 1e-5, "bound {bound} far above score {score}");
            }
        }
    }
}
