//! The weighers and Nova's normalisation: each weigher's raw values are min-max normalised to
//! [0, 1] across the candidate hosts, multiplied by the weigher's multiplier and summed.

use serde::{Deserialize, Serialize};

use crate::filters::HostCtx;
use crate::model::GroupPolicy;

/// Number of weighers, in the order their terms are summed.
pub(crate) const N: usize = 5;
pub(crate) const SOFT_AFFINITY: usize = 3;
pub(crate) const SOFT_ANTI_AFFINITY: usize = 4;

/// Weigher multipliers. Positive RAM/disk/CPU multipliers spread instances over the hosts
/// with the most free resources; negative ones pack them onto the fullest hosts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Multipliers {
    pub ram: f64,
    pub disk: f64,
    pub cpu: f64,
    pub soft_affinity: f64,
    pub soft_anti_affinity: f64,
}

impl Default for Multipliers {
    /// Nova's defaults.
    fn default() -> Self {
        Self {
            ram: 1.0,
            disk: 1.0,
            cpu: 1.0,
            soft_affinity: 1.0,
            soft_anti_affinity: 1.0,
        }
    }
}

impl Multipliers {
    pub(crate) fn as_array(&self) -> [f64; N] {
        [
            self.ram,
            self.disk,
            self.cpu,
            self.soft_affinity,
            self.soft_anti_affinity,
        ]
    }
}

/// Raw weights of one host: free RAM MB, free disk MB, free vCPUs (total × ratio − used),
/// group members on the host for soft-affinity, minus that for soft-anti-affinity.
pub(crate) fn raw(
    ctx: &HostCtx<'_>,
    policy: Option<GroupPolicy>,
    members_on_host: u32,
) -> [f64; N] {
    with_group(resources(ctx), policy, members_on_host)
}

/// The raw weights of the resource weighers: free RAM MB, free disk MB, free vCPUs.
pub(crate) fn resources(ctx: &HostCtx<'_>) -> [f64; 3] {
    let h = ctx.host;
    [
        h.ram_mb_usable() as f64 - h.ram_mb_used as f64,
        h.disk_mb_usable() as f64 - h.disk_mb_used as f64,
        f64::from(h.vcpus_usable()) * ctx.ratios.cpu - f64::from(h.vcpus_used),
    ]
}

/// All raw weights from the resource weights and the group members on the host.
#[inline]
pub(crate) fn with_group(
    resources: [f64; 3],
    policy: Option<GroupPolicy>,
    members_on_host: u32,
) -> [f64; N] {
    let members = f64::from(members_on_host);
    [
        resources[0],
        resources[1],
        resources[2],
        if policy == Some(GroupPolicy::SoftAffinity) {
            members
        } else {
            0.0
        },
        if policy == Some(GroupPolicy::SoftAntiAffinity) {
            -members
        } else {
            0.0
        },
    ]
}

/// The minimum and maximum of each weigher over the candidate hosts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bounds {
    pub min: [f64; N],
    pub max: [f64; N],
}

impl Bounds {
    pub fn empty() -> Self {
        Self {
            min: [f64::INFINITY; N],
            max: [f64::NEG_INFINITY; N],
        }
    }

    pub fn add(&mut self, raw: &[f64; N]) {
        for (w, &x) in raw.iter().enumerate() {
            self.min[w] = self.min[w].min(x);
            self.max[w] = self.max[w].max(x);
        }
    }
}

/// Nova's `normalize`: (x − min) / (max − min), or 0 when every host has the same value.
#[inline]
pub(crate) fn normalize(x: f64, min: f64, max: f64) -> f64 {
    if min == max {
        0.0
    } else {
        (x - min) / (max - min)
    }
}

/// A host's total weight. Both selectors call this, so equal inputs give bit-equal scores.
#[inline]
pub(crate) fn score(raw: &[f64; N], b: &Bounds, mult: &[f64; N]) -> f64 {
    let mut total = 0.0;
    for (w, (x, m)) in raw.iter().zip(mult).enumerate() {
        total += m * normalize(*x, b.min[w], b.max[w]);
    }
    total
}

/// Orders candidates best first: higher score, then lower host index (Nova sorts stably, so
/// equal weights keep the order of the host list).
#[inline]
pub(crate) fn better(a: (f64, u32), b: (f64, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normalisation maps the smallest value to 0 and the largest to 1, and everything to 0
    /// when all values are equal (Nova's `weights.normalize`).
    #[test]
    fn normalize_table() {
        assert_eq!(normalize(5.0, 5.0, 5.0), 0.0);
        assert_eq!(normalize(0.0, 0.0, 10.0), 0.0);
        assert_eq!(normalize(10.0, 0.0, 10.0), 1.0);
        assert_eq!(normalize(2.5, 0.0, 10.0), 0.25);
        assert_eq!(normalize(-5.0, -10.0, 0.0), 0.5);
    }

    /// The score is the multiplier-weighted sum of normalised terms.
    #[test]
    fn score_sums_weighted_terms() {
        let mut b = Bounds::empty();
        b.add(&[0.0, 0.0, 0.0, 0.0, 0.0]);
        b.add(&[10.0, 100.0, 4.0, 0.0, 0.0]);
        let mult = [1.0, 2.0, -1.0, 1.0, 1.0];
        assert_eq!(
            score(&[5.0, 100.0, 4.0, 0.0, 0.0], &b, &mult),
            0.5 + 2.0 - 1.0
        );
        assert!(better((1.0, 5), (0.5, 1)));
        assert!(better((1.0, 1), (1.0, 5)));
        assert!(!better((1.0, 5), (1.0, 1)));
    }
}
