//! Table tests per filter and weigher, and property tests of the scheduler's invariants.

// Table tests spell their row types inline, next to the rows.
#![allow(clippy::type_complexity)]

use std::collections::BTreeMap;

use crate::*;

fn host(name: &str, az: &str) -> Host {
    Host {
        name: name.to_owned(),
        enabled: true,
        up: true,
        availability_zone: az.to_owned(),
        aggregates: Vec::new(),
        vcpus_total: 16,
        vcpus_used: 0,
        ram_mb_total: 32768,
        ram_mb_used: 0,
        disk_gb_total: 1000,
        disk_mb_used: 0,
        vcpus_reserved: 0,
        ram_mb_reserved: 0,
        disk_mb_reserved: 0,
        allocation_ratios: AllocationRatios::default(),
        hypervisor_type: "qemu".to_owned(),
        architecture: "x86_64".to_owned(),
        hypervisor_version: 6_002_000,
        instances: Vec::new(),
        generation: 0,
    }
}

fn flavor(vcpus: u32, ram_mb: u64, root_gb: u64) -> Flavor {
    Flavor {
        name: "f".to_owned(),
        vcpus,
        ram_mb,
        root_gb,
        ephemeral_gb: 0,
        swap_mb: 0,
        extra_specs: BTreeMap::new(),
    }
}

fn request(n: usize, flavor: Flavor) -> Request {
    Request {
        instance_ids: (0..n).map(|i| format!("new-{i}")).collect(),
        flavor,
        image: ImageProperties::default(),
        availability_zone: None,
        is_admin: false,
        hints: SchedulerHints::default(),
    }
}

fn aggregate(name: &str, meta: &[(&str, &str)]) -> Aggregate {
    Aggregate {
        name: name.to_owned(),
        metadata: meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

fn config_only(filters: &[FilterKind]) -> SchedulerConfig {
    SchedulerConfig {
        filters: filters.to_vec(),
        ..SchedulerConfig::default()
    }
}

/// Whether a single host passes one filter for a request (the filter alone is enabled).
fn passes(filter: FilterKind, h: Host, aggs: Vec<Aggregate>, req: &Request) -> bool {
    let mut s = Scheduler::new(config_only(&[filter]), vec![h], aggs).unwrap();
    match s.select(req) {
        Ok(_) => true,
        Err(ScheduleError::NoValidHost(_)) => false,
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn picks(s: &mut Scheduler, req: &Request) -> Vec<String> {
    s.select(req).unwrap().into_iter().map(|c| c.host).collect()
}

/// ComputeFilter passes only hosts that are both enabled and up.
#[test]
fn compute_filter_table() {
    let req = request(1, flavor(1, 512, 1));
    for (enabled, up, want) in [
        (true, true, true),
        (false, true, false),
        (true, false, false),
    ] {
        let mut h = host("h", "az1");
        h.enabled = enabled;
        h.up = up;
        assert_eq!(passes(FilterKind::Compute, h, vec![], &req), want);
    }
}

/// RAM filter: `used + requested <= total × ratio`, an instance never overcommits against
/// itself (`requested <= total`), the ratio defaults to 1.5, aggregates override it with the
/// minimum of their values, and an unparsable aggregate value falls back to the host's ratio.
#[test]
fn ram_filter_table() {
    let cases: &[(u64, u64, Vec<Aggregate>, bool)] = &[
        (0, 1024, vec![], true),
        (0, 1025, vec![], false),
        (1000, 536, vec![], true),
        (1000, 537, vec![], false),
        (
            0,
            1024,
            vec![aggregate("a", &[("ram_allocation_ratio", "1.0")])],
            true,
        ),
        (
            1,
            1024,
            vec![aggregate("a", &[("ram_allocation_ratio", "1.0")])],
            false,
        ),
        (
            1,
            1024,
            vec![
                aggregate("a", &[("ram_allocation_ratio", "2.0")]),
                aggregate("b", &[("ram_allocation_ratio", "1.0")]),
            ],
            false,
        ),
        (
            1000,
            536,
            vec![aggregate("a", &[("ram_allocation_ratio", "x")])],
            true,
        ),
        (
            2000,
            1024,
            vec![aggregate("a", &[("ram_allocation_ratio", "3.0")])],
            true,
        ),
    ];
    for (used, req_mb, aggs, want) in cases {
        let mut h = host("h", "az1");
        h.ram_mb_total = 1024;
        h.ram_mb_used = *used;
        h.aggregates = aggs.iter().map(|a| a.name.clone()).collect();
        let req = request(1, flavor(1, *req_mb, 1));
        assert_eq!(
            passes(FilterKind::Ram, h, aggs.clone(), &req),
            *want,
            "used {used} req {req_mb} aggs {aggs:?}"
        );
    }
}

/// Disk filter counts root and ephemeral GB plus swap MB against `total × disk ratio`
/// (default 1.0, overridable per aggregate), never beyond the host's own disk.
#[test]
fn disk_filter_table() {
    let cases: &[(u64, u64, u64, u64, Vec<Aggregate>, bool)] = &[
        // used MB, root GB, ephemeral GB, swap MB, aggregates, passes
        (0, 10, 0, 0, vec![], true),
        (0, 9, 1, 0, vec![], true),
        (0, 9, 0, 1025, vec![], false),
        (1, 10, 0, 0, vec![], false),
        (
            10240,
            10,
            0,
            0,
            vec![aggregate("a", &[("disk_allocation_ratio", "2.0")])],
            true,
        ),
        (
            0,
            11,
            0,
            0,
            vec![aggregate("a", &[("disk_allocation_ratio", "2.0")])],
            false,
        ),
    ];
    for (used, root, eph, swap, aggs, want) in cases {
        let mut h = host("h", "az1");
        h.disk_gb_total = 10;
        h.disk_mb_used = *used;
        h.aggregates = aggs.iter().map(|a| a.name.clone()).collect();
        let mut f = flavor(1, 512, *root);
        f.ephemeral_gb = *eph;
        f.swap_mb = *swap;
        let req = request(1, f);
        assert_eq!(
            passes(FilterKind::Disk, h, aggs.clone(), &req),
            *want,
            "case {used} {root} {eph} {swap}"
        );
    }
}

/// Core filter: `used + requested <= total × cpu ratio` (16 by default, aggregate minimum
/// otherwise), never more vCPUs than the host has, and Nova's fail-safe that a host reporting
/// zero vCPUs is not judged on them.
#[test]
fn core_filter_table() {
    let cases: &[(u32, u32, u32, Vec<Aggregate>, bool)] = &[
        (4, 60, 4, vec![], true),
        (4, 60, 5, vec![], false),
        (4, 0, 5, vec![], false),
        (0, 0, 5, vec![], true),
        (
            4,
            2,
            2,
            vec![aggregate("a", &[("cpu_allocation_ratio", "1.0")])],
            true,
        ),
        (
            4,
            2,
            3,
            vec![aggregate("a", &[("cpu_allocation_ratio", "1.0")])],
            false,
        ),
    ];
    for (total, used, req_cpus, aggs, want) in cases {
        let mut h = host("h", "az1");
        h.vcpus_total = *total;
        h.vcpus_used = *used;
        h.aggregates = aggs.iter().map(|a| a.name.clone()).collect();
        let req = request(1, flavor(*req_cpus, 512, 1));
        assert_eq!(
            passes(FilterKind::Core, h, aggs.clone(), &req),
            *want,
            "case {total} {used} {req_cpus}"
        );
    }
}

/// AvailabilityZoneFilter passes hosts of the requested zone, and every host when no zone is
/// requested.
#[test]
fn availability_zone_filter_table() {
    for (req_az, host_az, want) in [
        (Some("az1"), "az1", true),
        (Some("az1"), "az2", false),
        (None, "az2", true),
    ] {
        let mut req = request(1, flavor(1, 512, 1));
        req.availability_zone = req_az.map(str::to_owned);
        assert_eq!(
            passes(
                FilterKind::AvailabilityZone,
                host("h", host_az),
                vec![],
                &req
            ),
            want
        );
    }
}

/// `zone:host` forces a host for admins only (bypassing the non-resource filters, as Nova
/// bypasses filters for forced hosts); non-admins get a typed error, as do unknown hosts and
/// malformed zones.
#[test]
fn forced_host() {
    let mut h1 = host("h1", "az1");
    h1.enabled = false;
    let hosts = vec![h1, host("h2", "az1")];
    let mut s = Scheduler::new(SchedulerConfig::default(), hosts, vec![]).unwrap();
    let mut req = request(1, flavor(1, 512, 1));
    req.availability_zone = Some("az2:h1".to_owned());
    assert_eq!(
        s.select(&req),
        Err(ScheduleError::Request(RequestError::ForcedHostNotAdmin))
    );
    req.is_admin = true;
    assert_eq!(picks(&mut s, &req), vec!["h1"]);
    req.availability_zone = Some("az1:nope".to_owned());
    assert_eq!(
        s.select(&req),
        Err(ScheduleError::Request(RequestError::UnknownForcedHost(
            "nope".into()
        )))
    );
    req.availability_zone = Some("az1:h1:other".to_owned());
    assert!(matches!(
        s.select(&req),
        Err(ScheduleError::Request(
            RequestError::InvalidAvailabilityZone(_)
        ))
    ));
    // Resource filters still hold on a forced host.
    req.availability_zone = Some("az1:h1".to_owned());
    req.flavor.ram_mb = 1 << 20;
    assert!(matches!(s.select(&req), Err(ScheduleError::NoValidHost(_))));
}

/// AggregateInstanceExtraSpecsFilter: scoped keys lose their scope, unscoped keys match as
/// they are, unscoped keys with a `:` belong to other filters and are ignored, a key missing
/// from every aggregate of the host fails, any of the host's values may match, and the
/// extra_specs_ops operators apply.
#[test]
fn aggregate_instance_extra_specs_table() {
    let ssd = aggregate("ssd", &[("ssd", "true"), ("cores", "8")]);
    let a = aggregate("a", &[("kind", "a")]);
    let b = aggregate("b", &[("kind", "b")]);
    let cases: &[(&[&str], &[(&str, &str)], bool)] = &[
        (
            &["ssd"],
            &[("aggregate_instance_extra_specs:ssd", "true")],
            true,
        ),
        (
            &["ssd"],
            &[("aggregate_instance_extra_specs:ssd", "false")],
            false,
        ),
        (
            &[],
            &[("aggregate_instance_extra_specs:ssd", "true")],
            false,
        ),
        (&["ssd"], &[("ssd", "true")], true),
        (&[], &[("hw:cpu_policy", "dedicated")], true),
        (&[], &[("capabilities:cpu_info", "x")], true),
        (
            &["ssd"],
            &[("aggregate_instance_extra_specs:cores", ">= 4")],
            true,
        ),
        (
            &["ssd"],
            &[("aggregate_instance_extra_specs:cores", ">= 16")],
            false,
        ),
        (
            &["ssd"],
            &[("aggregate_instance_extra_specs:cores", "= 8")],
            true,
        ),
        (&["a", "b"], &[("kind", "s== b")], true),
        (&["a", "b"], &[("kind", "<or> c <or> a")], true),
        (&["a", "b"], &[("kind", "<in> c")], false),
        (&["a", "ssd"], &[("kind", "a"), ("ssd", "true")], true),
        (&["a"], &[("kind", "a"), ("ssd", "true")], false),
    ];
    for (member_of, specs, want) in cases {
        let mut h = host("h", "az1");
        h.aggregates = member_of.iter().map(|s| (*s).to_owned()).collect();
        let mut f = flavor(1, 512, 1);
        f.extra_specs = specs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let req = request(1, f);
        let aggs = vec![ssd.clone(), a.clone(), b.clone()];
        assert_eq!(
            passes(FilterKind::AggregateInstanceExtraSpecs, h, aggs, &req),
            *want,
            "aggregates {member_of:?} specs {specs:?}"
        );
    }
}

/// ImagePropertiesFilter: architecture and hypervisor type must match after Nova's
/// canonicalisation, the hypervisor version must satisfy the requirement, a host reporting no
/// version passes that part, a version requirement alone is ignored as in Nova, and a
/// malformed requirement is a typed error.
#[test]
fn image_properties_table() {
    let cases: &[(Option<&str>, Option<&str>, Option<&str>, u64, bool)] = &[
        (None, None, None, 6_002_000, true),
        (Some("x86_64"), None, None, 6_002_000, true),
        (Some("amd64"), None, None, 6_002_000, true),
        (Some("aarch64"), None, None, 6_002_000, false),
        (None, Some("QEMU"), None, 6_002_000, true),
        (None, Some("kvm"), None, 6_002_000, false),
        (Some("x86_64"), Some("qemu"), Some(">=6.0"), 6_002_000, true),
        (
            Some("x86_64"),
            Some("qemu"),
            Some(">=6.2.1"),
            6_002_000,
            false,
        ),
        (
            Some("x86_64"),
            Some("qemu"),
            Some(">=6.0, <6.2"),
            6_002_000,
            false,
        ),
        (
            Some("x86_64"),
            Some("qemu"),
            Some(">=6.0,<7.0"),
            6_002_000,
            true,
        ),
        (Some("x86_64"), None, Some("<1.0"), 0, true),
        (None, None, Some("<1.0"), 6_002_000, true),
    ];
    for (arch, hv, ver, host_ver, want) in cases {
        let mut h = host("h", "az1");
        h.hypervisor_version = *host_ver;
        let mut req = request(1, flavor(1, 512, 1));
        req.image = ImageProperties {
            architecture: arch.map(str::to_owned),
            hypervisor_type: hv.map(str::to_owned),
            hypervisor_version_requires: ver.map(str::to_owned),
        };
        assert_eq!(
            passes(FilterKind::ImageProperties, h, vec![], &req),
            *want,
            "{arch:?} {hv:?} {ver:?}"
        );
    }
    let mut s = Scheduler::new(SchedulerConfig::default(), vec![host("h", "az1")], vec![]).unwrap();
    let mut req = request(1, flavor(1, 512, 1));
    req.image.hypervisor_version_requires = Some("6.0".to_owned());
    assert!(matches!(
        s.select(&req),
        Err(ScheduleError::Request(
            RequestError::InvalidVersionRequirement(_)
        ))
    ));
    let glance: BTreeMap<String, String> = [("architecture", "x86_64"), ("img_hv_type", "kvm")]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let props = ImageProperties::from_glance(&glance);
    assert_eq!(props.architecture.as_deref(), Some("x86_64"));
    assert_eq!(props.hypervisor_type.as_deref(), Some("kvm"));
}

/// JsonFilter reads the host's free RAM; a malformed query is a typed request error whose
/// message can be shown to the user.
#[test]
fn json_filter_through_scheduler() {
    let req_with = |q: &str| {
        let mut r = request(1, flavor(1, 512, 1));
        r.hints.query = Some(q.to_owned());
        r
    };
    let mut h = host("h", "az1");
    h.ram_mb_total = 4096;
    h.ram_mb_used = 2048;
    let q = r#"[">=", "$free_ram_mb", 2048]"#;
    assert!(passes(FilterKind::Json, h.clone(), vec![], &req_with(q)));
    h.ram_mb_used = 2049;
    assert!(!passes(FilterKind::Json, h.clone(), vec![], &req_with(q)));
    let mut s = Scheduler::new(SchedulerConfig::default(), vec![h], vec![]).unwrap();
    let err = s.select(&req_with(r#"[">=", "$ram", 1]"#)).unwrap_err();
    assert_eq!(
        err,
        ScheduleError::Request(RequestError::Query(QueryError::UnknownVariable(
            "$ram".into()
        )))
    );
}

fn group_request(n: usize, policy: GroupPolicy, members: &[&str], max: Option<u32>) -> Request {
    let mut r = request(n, flavor(1, 512, 1));
    r.hints.group = Some(ServerGroup {
        policy,
        members: members.iter().map(|m| (*m).to_owned()).collect(),
        max_server_per_host: max,
    });
    r
}

/// Reserved host resources come off the total before the allocation ratio, as Placement
/// computes capacity: `(total - reserved) × ratio - used`.
#[test]
fn reserved_resources_come_off_before_the_ratio() {
    let mut h = host("h", "az1");
    h.ram_mb_total = 4096;
    h.ram_mb_reserved = 1024;
    h.vcpus_total = 4;
    h.vcpus_reserved = 2;
    h.disk_gb_total = 10;
    h.disk_mb_reserved = 2048;
    h.allocation_ratios = AllocationRatios {
        cpu: 2.0,
        ram: 1.5,
        disk: 1.0,
    };
    let ram = |mb| {
        passes(
            FilterKind::Ram,
            h.clone(),
            vec![],
            &request(1, flavor(1, mb, 1)),
        )
    };
    // (4096 - 1024) × 1.5 = 4608 may be claimed, but one instance never more than 3072.
    assert!(ram(3072));
    assert!(!ram(3073));
    let mut used = h.clone();
    used.ram_mb_used = 4608 - 1000;
    assert!(passes(
        FilterKind::Ram,
        used.clone(),
        vec![],
        &request(1, flavor(1, 1000, 1))
    ));
    assert!(!passes(
        FilterKind::Ram,
        used,
        vec![],
        &request(1, flavor(1, 1001, 1))
    ));
    // (4 - 2) × 2.0 = 4 vCPUs, at most 2 for one instance.
    let cpu = |n| {
        passes(
            FilterKind::Core,
            h.clone(),
            vec![],
            &request(1, flavor(n, 64, 1)),
        )
    };
    assert!(cpu(2));
    assert!(!cpu(3));
    // 10 GiB - 2 GiB reserved = 8 GiB of disk.
    let disk = |gb| {
        passes(
            FilterKind::Disk,
            h.clone(),
            vec![],
            &request(1, flavor(1, 64, gb)),
        )
    };
    assert!(disk(8));
    assert!(!disk(9));
}

/// SameHostFilter keeps the hosts holding one of the named instances, DifferentHostFilter
/// those holding none; an id no host holds matches no host, as in Nova.
#[test]
fn same_and_different_host_filters() {
    let mut h1 = host("h1", "az1");
    h1.instances = vec!["a".to_owned()];
    let mut h2 = host("h2", "az1");
    h2.instances = vec!["b".to_owned()];
    let h3 = host("h3", "az1");
    let hint = |same: &[&str], different: &[&str]| {
        let mut r = request(1, flavor(1, 256, 1));
        r.hints.same_host = same.iter().map(|s| (*s).to_owned()).collect();
        r.hints.different_host = different.iter().map(|s| (*s).to_owned()).collect();
        r
    };
    let same = FilterKind::SameHost;
    let diff = FilterKind::DifferentHost;
    assert!(passes(same, h3.clone(), vec![], &hint(&[], &[])));
    assert!(passes(same, h1.clone(), vec![], &hint(&["a"], &[])));
    assert!(passes(same, h2.clone(), vec![], &hint(&["a", "b"], &[])));
    assert!(!passes(same, h3.clone(), vec![], &hint(&["a"], &[])));
    assert!(!passes(same, h1.clone(), vec![], &hint(&["unknown"], &[])));
    assert!(!passes(diff, h1.clone(), vec![], &hint(&[], &["a"])));
    assert!(passes(diff, h2.clone(), vec![], &hint(&[], &["a"])));
    assert!(passes(diff, h1.clone(), vec![], &hint(&[], &["unknown"])));
    let mut s = Scheduler::new(SchedulerConfig::default(), vec![h1, h2, h3], vec![]).unwrap();
    assert_eq!(picks(&mut s, &hint(&["b"], &[])), vec!["h2"]);
    let mut away = hint(&[], &["a", "b"]);
    away.instance_ids = vec!["n1".to_owned(), "n2".to_owned()];
    assert_eq!(picks(&mut s, &away), vec!["h3", "h3"]);
    let mut lost = hint(&["unknown"], &[]);
    lost.instance_ids = vec!["n3".to_owned()];
    let Err(ScheduleError::NoValidHost(e)) = s.select(&lost) else {
        panic!("an unknown same_host id matches no host");
    };
    assert!(ScheduleError::NoValidHost(e)
        .to_string()
        .contains("SameHostFilter"));
}

/// ServerGroupAntiAffinityFilter rejects hosts holding `max_server_per_host` members
/// (default 1); ServerGroupAffinityFilter keeps only hosts holding members once any exist.
#[test]
fn server_group_filters_table() {
    let mut h1 = host("h1", "az1");
    h1.instances = vec!["m1".to_owned()];
    let h2 = host("h2", "az1");
    let anti = FilterKind::ServerGroupAntiAffinity;
    let aff = FilterKind::ServerGroupAffinity;
    let cases: &[(FilterKind, &Host, GroupPolicy, &[&str], Option<u32>, bool)] = &[
        (anti, &h1, GroupPolicy::AntiAffinity, &["m1"], None, false),
        (anti, &h2, GroupPolicy::AntiAffinity, &["m1"], None, true),
        (anti, &h1, GroupPolicy::AntiAffinity, &["m1"], Some(2), true),
        (anti, &h1, GroupPolicy::Affinity, &["m1"], None, true),
        (
            anti,
            &h1,
            GroupPolicy::SoftAntiAffinity,
            &["m1"],
            None,
            true,
        ),
        (aff, &h1, GroupPolicy::Affinity, &["m1"], None, true),
        (aff, &h1, GroupPolicy::Affinity, &["gone"], None, true),
        (aff, &h1, GroupPolicy::SoftAffinity, &["m1"], None, true),
    ];
    for (filter, h, policy, members, max, want) in cases {
        let req = group_request(1, *policy, members, *max);
        assert_eq!(
            passes(*filter, (*h).clone(), vec![], &req),
            *want,
            "{filter:?} {policy:?}"
        );
    }
    // Affinity with the member elsewhere: h2 alone is rejected.
    let mut s = Scheduler::new(config_only(&[aff]), vec![h1.clone(), h2.clone()], vec![]).unwrap();
    let req = group_request(3, GroupPolicy::Affinity, &["m1"], None);
    assert_eq!(picks(&mut s, &req), vec!["h1", "h1", "h1"]);
    let mut s = Scheduler::new(config_only(&[anti]), vec![h1, h2], vec![]).unwrap();
    let req = group_request(1, GroupPolicy::AntiAffinity, &["m1"], None);
    assert_eq!(picks(&mut s, &req), vec!["h2"]);
    let req = group_request(2, GroupPolicy::AntiAffinity, &["m1"], None);
    assert!(matches!(s.select(&req), Err(ScheduleError::NoValidHost(e)) if e.instance_index == 1));
}

fn weigher_hosts() -> Vec<Host> {
    // h1: most free RAM, least free CPU; h2: a little less RAM, most CPU; h3: no free RAM.
    // 32 vCPUs × 16 = 512 schedulable, so no host is full.
    let mut h1 = host("h1", "az1");
    h1.vcpus_total = 32;
    h1.ram_mb_used = 32768 - 10000;
    h1.vcpus_used = 256;
    let mut h2 = host("h2", "az1");
    h2.vcpus_total = 32;
    h2.ram_mb_used = 32768 - 9000;
    h2.vcpus_used = 156;
    let mut h3 = host("h3", "az1");
    h3.vcpus_total = 32;
    h3.ram_mb_used = 32768;
    h3.vcpus_used = 206;
    vec![h1, h2, h3]
}

fn weigh(m: Multipliers, hosts: Vec<Host>, req: &Request) -> String {
    let config = SchedulerConfig {
        multipliers: m,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config, hosts, vec![]).unwrap();
    picks(&mut s, req).remove(0)
}

fn only(ram: f64, disk: f64, cpu: f64) -> Multipliers {
    Multipliers {
        ram,
        disk,
        cpu,
        soft_affinity: 1.0,
        soft_anti_affinity: 1.0,
    }
}

/// Weighers: a positive multiplier spreads (most free wins), a negative one packs (least free
/// wins), and values are normalised before they are summed, so a weigher with large raw
/// numbers (MB of RAM) does not drown one with small numbers (vCPUs) unless its multiplier
/// says so.
#[test]
fn weigher_table() {
    let req = request(1, flavor(1, 512, 1));
    let cases: &[(Multipliers, &str)] = &[
        (only(1.0, 0.0, 0.0), "h1"),
        (only(-1.0, 0.0, 0.0), "h3"),
        (only(0.0, 0.0, 1.0), "h2"),
        (only(0.0, 0.0, -1.0), "h1"),
        // Normalised: RAM 1, 0.9, 0; CPU 0, 1, 0.5. Equal multipliers: h2 (1.9) beats h1 (1).
        (only(1.0, 0.0, 1.0), "h2"),
        (only(3.0, 0.0, 1.0), "h2"),
        // RAM × 20: h1 20 beats h2 19.
        (only(20.0, 0.0, 1.0), "h1"),
    ];
    for (m, want) in cases {
        assert_eq!(weigh(*m, weigher_hosts(), &req), *want, "{m:?}");
    }
    // Disk.
    let mut hosts = vec![host("d1", "az1"), host("d2", "az1")];
    hosts[0].disk_mb_used = 500 * 1024;
    assert_eq!(weigh(only(0.0, 1.0, 0.0), hosts.clone(), &req), "d2");
    assert_eq!(weigh(only(0.0, -1.0, 0.0), hosts, &req), "d1");
}

/// Soft affinity prefers the hosts holding group members, soft anti-affinity avoids them;
/// neither rejects a host.
#[test]
fn soft_group_weighers() {
    let mut hosts = vec![host("h1", "az1"), host("h2", "az1"), host("h3", "az1")];
    hosts[1].instances = vec!["m1".to_owned()];
    // h1 has the most free RAM, so without the group weigher it would win.
    hosts[1].ram_mb_used = 100;
    hosts[2].ram_mb_used = 100;
    let m = only(1.0, 0.0, 0.0);
    let req = group_request(1, GroupPolicy::SoftAffinity, &["m1"], None);
    let mut m2 = m;
    m2.soft_affinity = 2.0;
    assert_eq!(weigh(m2, hosts.clone(), &req), "h2");
    let req = group_request(1, GroupPolicy::SoftAntiAffinity, &["m1"], None);
    assert_eq!(weigh(m, hosts.clone(), &req), "h1");
    // All hosts hold a member: soft anti-affinity still places (it only weighs).
    for (n, h) in hosts.iter_mut().enumerate() {
        h.instances = vec![format!("m{n}")];
    }
    let req = group_request(2, GroupPolicy::SoftAntiAffinity, &["m0", "m1", "m2"], None);
    let mut s = Scheduler::new(SchedulerConfig::default(), hosts, vec![]).unwrap();
    let got = picks(&mut s, &req);
    assert_eq!(got.len(), 2);
    assert_ne!(
        got[0], got[1],
        "the second pick avoids the host the first just took"
    );
}

/// A multi-instance request consumes resources between picks and is all-or-nothing: if the
/// third instance does not fit, nothing is placed and the view is unchanged.
#[test]
fn multi_instance_consumes_and_is_atomic() {
    let mut hosts = vec![host("h1", "az1"), host("h2", "az1")];
    // 4096 MB × 1.5 = 6144 MB: one 4000 MB instance per host.
    for h in &mut hosts {
        h.ram_mb_total = 4096;
    }
    let mut s = Scheduler::new(SchedulerConfig::default(), hosts, vec![]).unwrap();
    let before = s.hosts().to_vec();
    let mut got = picks(&mut s, &request(2, flavor(1, 4000, 1)));
    got.sort();
    assert_eq!(got, vec!["h1", "h2"]);
    assert_eq!(
        s.hosts(),
        &before[..],
        "select leaves the view to the caller"
    );
    match s.select(&request(3, flavor(1, 4000, 1))) {
        Err(ScheduleError::NoValidHost(e)) => {
            assert_eq!(e.instance_index, 2);
            assert_eq!(e.instances, 3);
        }
        other => panic!("expected no valid host, got {other:?}"),
    }
    assert_eq!(s.hosts(), &before[..]);
}

/// The "no valid host" answer counts, per filter and in order, the hosts it started with and
/// kept, like Nova's log line.
#[test]
fn no_valid_host_report() {
    let mut h1 = host("h1", "az1");
    h1.enabled = false;
    let h2 = host("h2", "az2");
    let mut h3 = host("h3", "az1");
    h3.ram_mb_total = 1024;
    let mut h4 = host("h4", "az1");
    h4.instances = vec!["m1".to_owned()];
    let mut s = Scheduler::new(SchedulerConfig::default(), vec![h1, h2, h3, h4], vec![]).unwrap();
    let mut req = group_request(1, GroupPolicy::AntiAffinity, &["m1"], None);
    req.flavor.ram_mb = 2048;
    req.availability_zone = Some("az1".to_owned());
    let Err(ScheduleError::NoValidHost(e)) = s.select(&req) else {
        panic!("expected no valid host");
    };
    let counts: Vec<(FilterKind, usize, usize)> = e
        .filters
        .iter()
        .map(|c| (c.filter, c.start, c.end))
        .collect();
    assert_eq!(
        counts,
        vec![
            (FilterKind::Compute, 4, 3),
            (FilterKind::AvailabilityZone, 3, 2),
            (FilterKind::Ram, 2, 1),
            (FilterKind::Disk, 1, 1),
            (FilterKind::Core, 1, 1),
            (FilterKind::AggregateInstanceExtraSpecs, 1, 1),
            (FilterKind::ImageProperties, 1, 1),
            (FilterKind::Json, 1, 1),
            (FilterKind::ServerGroupAntiAffinity, 1, 0),
            (FilterKind::ServerGroupAffinity, 0, 0),
            (FilterKind::SameHost, 0, 0),
            (FilterKind::DifferentHost, 0, 0),
        ]
    );
    let text = ScheduleError::NoValidHost(e).to_string();
    assert!(text.contains("ComputeFilter: (start: 4, end: 3)"), "{text}");
}

/// A claim applies only at the generation it was made at: applying the same claim twice, or
/// a claim made before another one landed, fails instead of double-booking.
#[test]
fn claims_are_conditioned_on_generation() {
    let mut s =
        Scheduler::new(SchedulerConfig::default(), vec![host("h1", "az1")], vec![]).unwrap();
    let a = s
        .select(&request(1, flavor(2, 1024, 10)))
        .unwrap()
        .remove(0);
    let mut b_req = request(1, flavor(2, 1024, 10));
    b_req.instance_ids = vec!["other".to_owned()];
    let b = s.select(&b_req).unwrap().remove(0);
    assert_eq!((a.generation, b.generation), (0, 0));
    s.apply_claim(&a).unwrap();
    let h = s.host("h1").unwrap();
    assert_eq!(
        (h.vcpus_used, h.ram_mb_used, h.disk_mb_used, h.generation),
        (2, 1024, 10240, 1)
    );
    assert!(matches!(
        s.apply_claim(&a),
        Err(ClaimError::StaleGeneration { .. })
    ));
    assert!(matches!(
        s.apply_claim(&b),
        Err(ClaimError::StaleGeneration { .. })
    ));
    assert_eq!(s.host("h1").unwrap().vcpus_used, 2);
    let mut wrong = host("h2", "az1");
    assert!(matches!(
        apply_claim(&mut wrong, &a),
        Err(ClaimError::WrongHost { .. })
    ));
    // The same instance cannot be placed twice, even with a current generation.
    let again = Claim {
        generation: 1,
        ..a.clone()
    };
    assert_eq!(
        s.apply_claim(&again),
        Err(ClaimError::InstanceAlreadyPlaced(a.instance_id.clone()))
    );
    assert_eq!(s.host("h1").unwrap().generation, 1);
}

/// With `host_subset_size` > 1 the pick is random among the best hosts only, and the same
/// seed gives the same picks.
#[test]
fn host_subset_is_seeded() {
    let hosts: Vec<Host> = (0..10)
        .map(|i| {
            let mut h = host(&format!("h{i}"), "az1");
            h.ram_mb_used = i * 1000;
            h
        })
        .collect();
    let config = SchedulerConfig {
        host_subset_size: 3,
        multipliers: only(1.0, 0.0, 0.0),
        seed: 7,
        ..SchedulerConfig::default()
    };
    let run = || {
        let mut s = Scheduler::new(config.clone(), hosts.clone(), vec![]).unwrap();
        (0..30)
            .map(|n| {
                let mut r = request(1, flavor(1, 64, 1));
                r.instance_ids = vec![format!("i{n}")];
                picks(&mut s, &r).remove(0)
            })
            .collect::<Vec<_>>()
    };
    let a = run();
    assert_eq!(a, run());
    assert!(
        a.iter().all(|h| ["h0", "h1", "h2"].contains(&h.as_str())),
        "{a:?}"
    );
    assert!(
        a.iter().any(|h| h != &a[0]),
        "the subset is actually sampled: {a:?}"
    );
}

/// A view with unknown aggregates, duplicate hosts or duplicated instances is rejected, and
/// a request reusing a placed instance id is refused.
#[test]
fn view_and_request_validation() {
    let mut h = host("h", "az1");
    h.aggregates = vec!["nope".to_owned()];
    assert!(matches!(
        Scheduler::new(SchedulerConfig::default(), vec![h], vec![]),
        Err(ViewError::UnknownAggregate { .. })
    ));
    assert!(matches!(
        Scheduler::new(
            SchedulerConfig::default(),
            vec![host("h", "a"), host("h", "b")],
            vec![]
        ),
        Err(ViewError::DuplicateHost(_))
    ));
    let mut h = host("h", "az1");
    h.instances = vec!["x".to_owned()];
    let mut s = Scheduler::new(SchedulerConfig::default(), vec![h], vec![]).unwrap();
    let mut r = request(1, flavor(1, 64, 1));
    r.instance_ids = vec!["x".to_owned()];
    assert_eq!(
        s.select(&r),
        Err(ScheduleError::DuplicateInstance("x".into()))
    );
    r.instance_ids = vec![];
    assert_eq!(
        s.select(&r),
        Err(ScheduleError::Request(RequestError::NoInstances))
    );
}

mod props {
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::filters::{effective_ratios, merge_metadata};
    use crate::reference::reference_select;

    fn aggregates() -> Vec<Aggregate> {
        vec![
            aggregate("ssd", &[("ssd", "true")]),
            aggregate("hdd", &[("ssd", "false")]),
            aggregate("gpu", &[("gpu", "2")]),
            aggregate(
                "tight",
                &[
                    ("ram_allocation_ratio", "1.0"),
                    ("cpu_allocation_ratio", "2.0"),
                ],
            ),
            aggregate(
                "loose",
                &[
                    ("disk_allocation_ratio", "1.5"),
                    ("ram_allocation_ratio", "bogus"),
                ],
            ),
        ]
    }

    fn ratios_of(h: &Host, aggs: &[Aggregate]) -> AllocationRatios {
        let meta = merge_metadata(
            aggs.iter()
                .filter(|a| h.aggregates.contains(&a.name))
                .map(|a| &a.metadata),
        );
        effective_ratios(h.allocation_ratios, &meta)
    }

    prop_compose! {
        fn arb_host(i: usize)(
            az in 0..3usize,
            member in proptest::collection::vec(any::<bool>(), 5),
            enabled in prop::bool::weighted(0.9),
            up in prop::bool::weighted(0.9),
            // 0: a host reporting no vCPUs passes the core filter (and has no vCPU floor).
            vcpus_total in prop::sample::select(vec![0u32, 1, 2, 4, 8, 15]),
            ram_mb_total in (1u64..16).prop_map(|x| x * 512),
            disk_gb_total in 1u64..40,
            fill in (0u64..=100, 0u64..=100, 0u64..=100),
            hv in 0..2usize,
            arch in 0..2usize,
            version in prop::sample::select(vec![0u64, 5_000_000, 6_002_000, 7_000_000]),
            existing in 0usize..3,
        ) -> Host {
            let names = ["ssd", "hdd", "gpu", "tight", "loose"];
            let mut h = host(&format!("h{i}"), ["az1", "az2", "az3"][az]);
            h.aggregates = names.iter().zip(&member).filter(|(_, m)| **m).map(|(n, _)| (*n).to_owned()).collect();
            h.enabled = enabled;
            h.up = up;
            h.vcpus_total = vcpus_total;
            h.ram_mb_total = ram_mb_total;
            h.disk_gb_total = disk_gb_total;
            let r = ratios_of(&h, &aggregates());
            // Start within capacity: used = fill% of total × ratio.
            h.vcpus_used = ((f64::from(vcpus_total) * r.cpu).floor() as u64 * fill.0 / 100) as u32;
            h.ram_mb_used = (ram_mb_total as f64 * r.ram).floor() as u64 * fill.1 / 100;
            h.disk_mb_used = ((disk_gb_total * 1024) as f64 * r.disk).floor() as u64 * fill.2 / 100;
            h.hypervisor_type = ["qemu", "kvm"][hv].to_owned();
            h.architecture = ["x86_64", "aarch64"][arch].to_owned();
            h.hypervisor_version = version;
            h.instances = (0..existing).map(|j| format!("pre-{i}-{j}")).collect();
            h
        }
    }

    fn arb_hosts() -> impl Strategy<Value = Vec<Host>> {
        arb_hosts_in(1..12)
    }

    fn arb_hosts_in(n: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Host>> {
        n.prop_flat_map(|n| (0..n).map(arb_host).collect::<Vec<_>>())
    }

    /// A request template; `ids` and group members are filled in by the test.
    #[derive(Debug, Clone)]
    struct Tmpl {
        instances: usize,
        flavor: Flavor,
        image: ImageProperties,
        az: Option<String>,
        force: Option<usize>,
        query: Option<String>,
        group: Option<(GroupPolicy, Option<u32>)>,
    }

    prop_compose! {
        fn arb_tmpl()(
            instances in 1usize..4,
            vcpus in 1u32..6,
            ram in prop::sample::select(vec![256u64, 512, 1024, 2048, 4096]),
            root in 0u64..10,
            eph in 0u64..3,
            swap in prop::sample::select(vec![0u64, 512]),
            spec in 0usize..7,
            image in 0usize..4,
            az in prop::option::weighted(0.3, 0usize..3),
            force in prop::option::weighted(0.05, 0usize..12),
            query in 0usize..9,
            group in prop::option::weighted(0.4, (0usize..4, prop::option::of(1u32..3))),
        ) -> Tmpl {
            let mut f = flavor(vcpus, ram, root);
            f.ephemeral_gb = eph;
            f.swap_mb = swap;
            let specs: &[(&str, &str)] = match spec {
                1 => &[("aggregate_instance_extra_specs:ssd", "true")],
                2 => &[("ssd", "false")],
                3 => &[("gpu", ">= 1")],
                4 => &[("hw:cpu_policy", "dedicated")],
                5 => &[("aggregate_instance_extra_specs:gpu", "<or> 2 <or> 4"), ("ssd", "s== true")],
                _ => &[],
            };
            f.extra_specs = specs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            let image = match image {
                1 => ImageProperties { architecture: Some("x86_64".into()), ..Default::default() },
                2 => ImageProperties {
                    hypervisor_type: Some("kvm".into()),
                    hypervisor_version_requires: Some(">=6.0".into()),
                    ..Default::default()
                },
                _ => ImageProperties::default(),
            };
            let query = match query {
                1 => Some(r#"[">=", "$free_ram_mb", 1024]"#.to_owned()),
                2 => Some(r#"["and", [">", "$vcpus_total", 4], ["<", "$vcpus_used", 20]]"#.to_owned()),
                3 => Some(r#"["not", ["=", "$vcpus_used", 0]]"#.to_owned()),
                4 => Some(r#"["or", ["<", "$num_instances", 2], ["in", "$host", "h1", "h3"]]"#.to_owned()),
                5 => Some(r#"["and", ["=", "$hypervisor_type", "kvm"], ["<", "$num_io_ops", 8]]"#.to_owned()),
                // Floors for the normalisation walks: free disk at least 4 GB and free RAM
                // above 0 (−0.0 and +0.0 must both be read), or free RAM from a reversed
                // comparison under `and`.
                6 => Some(r#"["and", [">=", "$free_disk_mb", 4096], [">", "$free_ram_mb", 0]]"#.to_owned()),
                7 => Some(r#"["and", ["<=", 1536, "$free_ram_mb"], ["not", ["<", "$free_disk_mb", 0]]]"#.to_owned()),
                _ => None,
            };
            let policies = [GroupPolicy::Affinity, GroupPolicy::AntiAffinity, GroupPolicy::SoftAffinity, GroupPolicy::SoftAntiAffinity];
            Tmpl {
                instances,
                flavor: f,
                image,
                az: az.map(|z| format!("az{}", z + 1)),
                force,
                query,
                group: group.map(|(p, max)| (policies[p], max)),
            }
        }
    }

    fn build(t: &Tmpl, k: usize, hosts: &[Host], members: &[String]) -> Request {
        let mut az = t.az.clone();
        if let Some(f) = t.force {
            let h = &hosts[f % hosts.len()];
            az = Some(format!("{}:{}", az.unwrap_or_default(), h.name));
        }
        Request {
            instance_ids: (0..t.instances).map(|n| format!("r{k}-{n}")).collect(),
            flavor: t.flavor.clone(),
            image: t.image.clone(),
            availability_zone: az,
            is_admin: true,
            hints: SchedulerHints {
                query: t.query.clone(),
                group: t.group.map(|(policy, max)| ServerGroup {
                    policy,
                    members: members.to_vec(),
                    max_server_per_host: max,
                }),
                ..Default::default()
            },
        }
    }

    prop_compose! {
        fn arb_config()(
            subset in 1usize..4,
            scan_limit in prop::sample::select(vec![0usize, 2, 1000]),
            mult in proptest::collection::vec(prop::sample::select(vec![-1.0f64, 0.0, 1.0, 2.0]), 5),
            seed in any::<u64>(),
        ) -> SchedulerConfig {
            SchedulerConfig {
                host_subset_size: subset,
                scan_limit,
                multipliers: Multipliers {
                    ram: mult[0],
                    disk: mult[1],
                    cpu: mult[2],
                    soft_affinity: mult[3],
                    soft_anti_affinity: mult[4],
                },
                seed,
                ..SchedulerConfig::default()
            }
        }
    }

    /// How a test drives the combined index: reference ranges to re-key to before requests
    /// (none: keep the scheduler's own), and whether to re-key after every walk. Ranges far
    /// from the requests' make the combined walk's stop rule loose, never wrong.
    fn arb_combo() -> impl Strategy<Value = (Option<[f64; 3]>, bool)> {
        let range = prop::sample::select(vec![0.0f64, 1.0, 3.0, 1000.0, 65536.0, 1e7]);
        (
            proptest::option::of([range.clone(), range.clone(), range]),
            any::<bool>(),
        )
    }

    /// Runs a sequence of requests, committing each success, and returns the final hosts and
    /// every outcome. Members of a request's group are the instances of the earlier requests
    /// with a group hint, so groups grow as they would in a cloud.
    fn run(
        config: &SchedulerConfig,
        hosts: Vec<Host>,
        tmpls: &[Tmpl],
    ) -> (Scheduler, Vec<Result<Vec<Claim>, ScheduleError>>) {
        let mut s = Scheduler::new(config.clone(), hosts, aggregates()).unwrap();
        let mut members = Vec::new();
        let mut out = Vec::new();
        for (k, t) in tmpls.iter().enumerate() {
            let req = build(t, k, s.hosts(), &members);
            let res = s.select(&req);
            if let Ok(claims) = &res {
                for c in claims {
                    s.apply_claim(c).unwrap();
                }
                if t.group.is_some() {
                    members.extend(req.instance_ids.iter().cloned());
                }
            }
            out.push(res);
        }
        (s, out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The indexed selector (scan or threshold walk, any scan limit) returns exactly what
        /// the plain reference FilterScheduler returns, claim for claim and error for error,
        /// over sequences of committed requests: the indexes never change which hosts are
        /// eligible or which one is chosen.
        #[test]
        fn indexed_equals_reference(
            config in arb_config(),
            hosts in arb_hosts(),
            tmpls in proptest::collection::vec(arb_tmpl(), 1..6),
            combo in arb_combo(),
        ) {
            let mut s = Scheduler::new(config.clone(), hosts.clone(), aggregates()).unwrap();
            let mut ref_hosts = hosts;
            let mut rng = StdRng::seed_from_u64(config.seed);
            let mut members = Vec::new();
            for (k, t) in tmpls.iter().enumerate() {
                s.tune_combo(combo.0, combo.1);
                let req = build(t, k, &ref_hosts, &members);
                let want = reference_select(&ref_hosts, &aggregates(), &config, &mut rng, &req);
                let got = s.select(&req);
                prop_assert_eq!(&got, &want, "request {} {:?}", k, req);
                if let Ok(claims) = got {
                    for c in &claims {
                        s.apply_claim(c).unwrap();
                        let h = ref_hosts.iter_mut().find(|h| h.name == c.host).unwrap();
                        apply_claim(h, c).unwrap();
                    }
                    if t.group.is_some() {
                        members.extend(req.instance_ids.iter().cloned());
                    }
                }
                prop_assert_eq!(s.hosts(), &ref_hosts[..]);
            }
        }

        /// After any sequence of committed placements no host uses more than
        /// total × allocation ratio of vCPUs, RAM or disk (vCPUs only on hosts that report
        /// some: one that reports none is not judged on them, Nova's fail-safe).
        #[test]
        fn never_exceeds_capacity(
            config in arb_config(),
            hosts in arb_hosts(),
            tmpls in proptest::collection::vec(arb_tmpl(), 1..12),
        ) {
            let (s, _) = run(&config, hosts, &tmpls);
            let aggs = aggregates();
            for h in s.hosts() {
                let r = ratios_of(h, &aggs);
                prop_assert!(
                    h.vcpus_total == 0 || f64::from(h.vcpus_used) <= f64::from(h.vcpus_total) * r.cpu,
                    "{:?}", h
                );
                prop_assert!(h.ram_mb_used as f64 <= h.ram_mb_total as f64 * r.ram, "{:?}", h);
                prop_assert!(h.disk_mb_used as f64 <= (h.disk_gb_total * 1024) as f64 * r.disk, "{:?}", h);
            }
        }

        /// Members of an anti-affinity group never share a host, and members of an affinity
        /// group are always on one host, whatever else the requests ask for.
        #[test]
        fn group_policies_hold(
            config in arb_config(),
            hosts in arb_hosts(),
            tmpls in proptest::collection::vec(arb_tmpl(), 1..10),
            anti in any::<bool>(),
        ) {
            let policy = if anti { GroupPolicy::AntiAffinity } else { GroupPolicy::Affinity };
            let tmpls: Vec<Tmpl> = tmpls
                .into_iter()
                .map(|mut t| {
                    t.group = Some((policy, None));
                    t.force = None;
                    t
                })
                .collect();
            let (s, outcomes) = run(&config, hosts, &tmpls);
            let mut member_hosts = Vec::new();
            for claims in outcomes.iter().flatten() {
                member_hosts.extend(claims.iter().map(|c| c.host.clone()));
            }
            if anti {
                let mut uniq = member_hosts.clone();
                uniq.sort();
                uniq.dedup();
                prop_assert_eq!(uniq.len(), member_hosts.len(), "{:?}", member_hosts);
            } else {
                prop_assert!(member_hosts.windows(2).all(|w| w[0] == w[1]), "{:?}", member_hosts);
            }
            // The committed view agrees with the claims.
            for c in outcomes.iter().flatten().flatten() {
                prop_assert!(s.host(&c.host).unwrap().instances.contains(&c.instance_id));
            }
        }

        /// A multi-instance request either yields one claim per instance, all of which commit
        /// in order, or an error; either way `select` itself changes nothing in the view.
        #[test]
        fn multi_instance_all_or_nothing(
            config in arb_config(),
            hosts in arb_hosts(),
            mut tmpl in arb_tmpl(),
            n in 2usize..7,
        ) {
            tmpl.instances = n;
            let mut s = Scheduler::new(config, hosts, aggregates()).unwrap();
            let req = build(&tmpl, 0, s.hosts(), &[]);
            let before = s.hosts().to_vec();
            let res = s.select(&req);
            prop_assert_eq!(s.hosts(), &before[..]);
            match res {
                Ok(claims) => {
                    prop_assert_eq!(claims.len(), n);
                    for c in &claims {
                        prop_assert!(s.apply_claim(c).is_ok());
                    }
                }
                Err(ScheduleError::NoValidHost(e)) => prop_assert!(e.instance_index < n),
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// The same equivalence on clusters of hundreds of hosts and longer request streams,
        /// where the threshold walk sees deep sorted indexes, many ties and filled hosts.
        #[test]
        fn indexed_equals_reference_large(
            config in arb_config(),
            hosts in arb_hosts_in(100..400),
            tmpls in proptest::collection::vec(arb_tmpl(), 20..60),
            combo in arb_combo(),
        ) {
            let config = SchedulerConfig { scan_limit: config.scan_limit.min(16), ..config };
            let mut s = Scheduler::new(config.clone(), hosts.clone(), aggregates()).unwrap();
            let mut ref_hosts = hosts;
            let mut rng = StdRng::seed_from_u64(config.seed);
            let mut members = Vec::new();
            for (k, t) in tmpls.iter().enumerate() {
                if k % 7 == 0 {
                    s.tune_combo(combo.0, combo.1);
                }
                let req = build(t, k, &ref_hosts, &members);
                let want = reference_select(&ref_hosts, &aggregates(), &config, &mut rng, &req);
                let got = s.select(&req);
                prop_assert_eq!(&got, &want, "request {}", k);
                if let Ok(claims) = got {
                    for c in &claims {
                        s.apply_claim(c).unwrap();
                        let h = ref_hosts.iter_mut().find(|h| h.name == c.host).unwrap();
                        apply_claim(h, c).unwrap();
                    }
                    if t.group.is_some() {
                        members.extend(req.instance_ids.iter().cloned());
                    }
                }
            }
        }
    }
}

/// Nova's integer hypervisor versions decode in groups of three digits (6002000 is 6.2.0).
#[test]
fn hypervisor_version_decoding() {
    use crate::filters::version_from_int;
    assert_eq!(version_from_int(6_002_000), [6, 2, 0]);
    assert_eq!(version_from_int(1_002_003), [1, 2, 3]);
    assert_eq!(version_from_int(2_011), [2, 11, 0]);
    assert_eq!(version_from_int(5), [5, 0, 0]);
    assert_eq!(version_from_int(0), [0, 0, 0]);
    assert_eq!(version_from_int(12_003_004_005), [12, 3, 4]);
}
