//! Nova's JsonFilter: a query such as `[">=", "$free_ram_mb", 1024]` parsed once per request
//! into a typed tree and evaluated per host.

use std::cmp::Ordering;

use serde_json::Value as Json;

use crate::model::Host;

/// The host variables a query may name: every attribute of Nova's `HostState`.
///
/// These have a value for every host (see `eval_arg` for how each is read from a [`Host`]).
pub const VARIABLES: [&str; 21] = [
    "$host",
    "$nodename",
    "$hypervisor_hostname",
    "$hypervisor_type",
    "$hypervisor_version",
    "$total_usable_ram_mb",
    "$free_ram_mb",
    "$total_usable_disk_gb",
    "$free_disk_mb",
    "$disk_mb_used",
    "$vcpus_total",
    "$vcpus_used",
    "$num_instances",
    "$num_io_ops",
    "$failed_builds",
    "$ram_allocation_ratio",
    "$cpu_allocation_ratio",
    "$disk_allocation_ratio",
    "$aggregates",
    "$service",
    "$stats",
];

/// Nova `HostState` attributes Shoal has no value for. Nova drops an argument whose
/// attribute is `None`; these are dropped the same way (as a `null` would be).
pub const UNSET_VARIABLES: [&str; 11] = [
    "$uuid",
    "$cell_uuid",
    "$host_ip",
    "$cpu_info",
    "$supported_instances",
    "$pci_stats",
    "$numa_topology",
    "$metrics",
    "$limits",
    "$instances",
    "$updated",
];

/// The operators a query may use.
pub const OPERATORS: [&str; 9] = ["=", "<", ">", "in", "<=", ">=", "not", "or", "and"];

/// Why a `query` hint was rejected. Each message says what was wrong and what is allowed, so
/// an API can return it with HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("the query hint is not valid JSON: {0}")]
    NotJson(String),
    #[error("a query must be a JSON list such as [\">=\", \"$free_ram_mb\", 1024]")]
    NotAList,
    #[error("a query list must start with an operator string; allowed: = < > in <= >= not or and")]
    MissingOperator,
    #[error("unknown query operator `{0}`; allowed: = < > in <= >= not or and")]
    UnknownOperator(String),
    #[error(
        "unknown query variable `{0}`; allowed: the attributes of Nova's HostState: $host \
         $nodename $hypervisor_hostname $hypervisor_type $hypervisor_version \
         $total_usable_ram_mb $free_ram_mb $total_usable_disk_gb $free_disk_mb $disk_mb_used \
         $vcpus_total $vcpus_used $num_instances $num_io_ops $failed_builds \
         $ram_allocation_ratio $cpu_allocation_ratio $disk_allocation_ratio $aggregates \
         $service[.host|.binary|.topic|.disabled|.key] $stats[.key] (and, with no value here, $uuid $cell_uuid $host_ip $cpu_info $supported_instances \
         $pci_stats $numa_topology $metrics $limits $instances $updated)"
    )]
    UnknownVariable(String),
    #[error(
        "query variable `{0}` is not a dictionary: only $service.…, $stats.…, $metrics.… and \
         $limits.… take a key"
    )]
    NotADictionary(String),
    #[error("query arguments must be lists, strings, numbers, booleans or null, not objects")]
    ObjectArgument,
    #[error("the query is nested deeper than {MAX_DEPTH} lists")]
    TooDeep,
}

const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Lt,
    Gt,
    In,
    Le,
    Ge,
    Not,
    Or,
    And,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    /// `$host`, `$nodename`, `$hypervisor_hostname`: one node per host, named as the host.
    Name,
    HypervisorType,
    HypervisorVersion,
    TotalUsableRamMb,
    FreeRamMb,
    TotalUsableDiskGb,
    FreeDiskMb,
    DiskMbUsed,
    VcpusTotal,
    VcpusUsed,
    NumInstances,
    /// Always 0: Shoal tracks no instance task states (Nova counts builds, resizes,
    /// snapshots in progress).
    NumIoOps,
    /// Always 0: Shoal does not count failed builds per host.
    FailedBuilds,
    RamAllocationRatio,
    CpuAllocationRatio,
    DiskAllocationRatio,
    Aggregates,
    /// `$service`: Nova's service record of the host's `nova-compute`, a dictionary.
    Service,
    /// `$service.host`: the host's name.
    ServiceHost,
    /// `$service.binary`: `nova-compute`.
    ServiceBinary,
    /// `$service.topic`: `compute`.
    ServiceTopic,
    /// `$service.disabled`: the host is not enabled.
    ServiceDisabled,
    /// `$stats`: the compute node's stats dictionary; Shoal reports none, so it is empty.
    Stats,
}

#[derive(Debug, Clone, PartialEq)]
enum Arg {
    Query(Query),
    Var(Var),
    Num(f64),
    Str(String),
    Bool(bool),
}

/// A parsed query. An empty list matches every host, as in Nova.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    op: Option<Op>,
    args: Vec<Arg>,
}

/// What a query reads: the host as Nova's HostState would describe it.
#[derive(Debug, Clone, Copy)]
pub struct HostVars<'a> {
    pub host: &'a Host,
}

/// Parses the `query` hint.
///
/// Differences from Nova, where Nova would fail later with a 500 or silently ignore a typo:
/// the query must be a list, nested lists must start with a known operator, objects are
/// rejected, and an unknown `$variable` is an error instead of being dropped.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    let json: Json = serde_json::from_str(text).map_err(|e| QueryError::NotJson(e.to_string()))?;
    match json {
        Json::Array(items) => parse_list(&items, 0),
        _ => Err(QueryError::NotAList),
    }
}

fn parse_list(items: &[Json], depth: usize) -> Result<Query, QueryError> {
    if depth > MAX_DEPTH {
        return Err(QueryError::TooDeep);
    }
    let Some(first) = items.first() else {
        return Ok(Query {
            op: None,
            args: Vec::new(),
        });
    };
    let Json::String(op) = first else {
        return Err(QueryError::MissingOperator);
    };
    let op = match op.as_str() {
        "=" => Op::Eq,
        "<" => Op::Lt,
        ">" => Op::Gt,
        "in" => Op::In,
        "<=" => Op::Le,
        ">=" => Op::Ge,
        "not" => Op::Not,
        "or" => Op::Or,
        "and" => Op::And,
        other => return Err(QueryError::UnknownOperator(other.to_owned())),
    };
    let mut args = Vec::with_capacity(items.len() - 1);
    for item in &items[1..] {
        match item {
            Json::Array(sub) => args.push(Arg::Query(parse_list(sub, depth + 1)?)),
            // Nova drops empty strings and nulls (they parse to None).
            Json::String(s) if s.is_empty() => {}
            Json::Null => {}
            Json::String(s) => match s.strip_prefix('$') {
                // A variable Shoal has no value for is dropped, as Nova drops `None`.
                Some(_) => {
                    if let Some(v) = parse_var(s)? {
                        args.push(Arg::Var(v));
                    }
                }
                None => args.push(Arg::Str(s.clone())),
            },
            Json::Number(n) => args.push(Arg::Num(n.as_f64().unwrap_or(f64::NAN))),
            Json::Bool(b) => args.push(Arg::Bool(*b)),
            Json::Object(_) => return Err(QueryError::ObjectArgument),
        }
    }
    Ok(Query { op: Some(op), args })
}

/// `$attribute` or `$attribute.key…` (Nova's `_parse_string`); `None` for an attribute
/// without a value here.
fn parse_var(s: &str) -> Result<Option<Var>, QueryError> {
    let (name, path, rest) = match s.split_once('.') {
        Some((name, rest)) => (name, true, rest),
        None => (s, false, ""),
    };
    if UNSET_VARIABLES.contains(&name) {
        // Nova: `None` stays `None` whatever the path; `$limits` and `$metrics` are
        // dictionaries in Nova, and Shoal sets no key in them.
        return Ok(None);
    }
    let var = match name {
        "$host" | "$nodename" | "$hypervisor_hostname" => Var::Name,
        "$hypervisor_type" => Var::HypervisorType,
        "$hypervisor_version" => Var::HypervisorVersion,
        "$total_usable_ram_mb" => Var::TotalUsableRamMb,
        "$free_ram_mb" => Var::FreeRamMb,
        "$total_usable_disk_gb" => Var::TotalUsableDiskGb,
        "$free_disk_mb" => Var::FreeDiskMb,
        "$disk_mb_used" => Var::DiskMbUsed,
        "$vcpus_total" => Var::VcpusTotal,
        "$vcpus_used" => Var::VcpusUsed,
        "$num_instances" => Var::NumInstances,
        "$num_io_ops" => Var::NumIoOps,
        "$failed_builds" => Var::FailedBuilds,
        "$ram_allocation_ratio" => Var::RamAllocationRatio,
        "$cpu_allocation_ratio" => Var::CpuAllocationRatio,
        "$disk_allocation_ratio" => Var::DiskAllocationRatio,
        "$aggregates" => Var::Aggregates,
        // Dictionaries: a key Nova's record has no value for here, or does not have, reads
        // as `None` (`dict.get`) and is dropped; a key past a string or boolean is an error.
        "$service" if path => {
            let (key, deeper) = match rest.split_once('.') {
                Some((key, _)) => (key, true),
                None => (rest, false),
            };
            let var = match key {
                "host" => Var::ServiceHost,
                "binary" => Var::ServiceBinary,
                "topic" => Var::ServiceTopic,
                "disabled" => Var::ServiceDisabled,
                _ => return Ok(None),
            };
            if deeper {
                return Err(QueryError::NotADictionary(s.to_owned()));
            }
            return Ok(Some(var));
        }
        "$service" => Var::Service,
        "$stats" if path => return Ok(None),
        "$stats" => Var::Stats,
        _ => return Err(QueryError::UnknownVariable(s.to_owned())),
    };
    if path {
        // Nova would call `.get` on a number or string and fail the request.
        return Err(QueryError::NotADictionary(s.to_owned()));
    }
    Ok(Some(var))
}

/// Python values the evaluation passes around.
#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Num(f64),
    Str(&'a str),
    Bool(bool),
    List(Vec<bool>),
    /// A list of objects (`$aggregates`: Nova's Aggregate objects): equal to nothing a query
    /// can write, unordered against it, truthy when not empty.
    Objects(usize),
}

impl Val<'_> {
    fn truthy(&self) -> bool {
        match self {
            Val::Num(n) => *n != 0.0,
            Val::Str(s) => !s.is_empty(),
            Val::Bool(b) => *b,
            Val::List(l) => !l.is_empty(),
            Val::Objects(n) => *n != 0,
        }
    }

    fn as_num(&self) -> Option<f64> {
        match self {
            Val::Num(n) => Some(*n),
            Val::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }
}

/// Python `==`: numbers and booleans compare as numbers.
fn py_eq(a: &Val<'_>, b: &Val<'_>) -> bool {
    match (a.as_num(), b.as_num()) {
        (Some(x), Some(y)) => x == y,
        _ => match (a, b) {
            (Val::Str(x), Val::Str(y)) => x == y,
            (Val::List(x), Val::List(y)) => x == y,
            _ => false,
        },
    }
}

/// Python ordering; `None` where Python raises a TypeError (the comparison then fails).
fn py_cmp(a: &Val<'_>, b: &Val<'_>) -> Option<Ordering> {
    match (a.as_num(), b.as_num()) {
        (Some(x), Some(y)) => x.partial_cmp(&y),
        _ => match (a, b) {
            (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
            (Val::List(x), Val::List(y)) => Some(x.cmp(y)),
            _ => None,
        },
    }
}

impl Query {
    /// Whether the host passes: Nova's `host_passes`, where a list result (from `not`) passes
    /// if any element is true.
    pub fn host_passes(&self, vars: &HostVars<'_>) -> bool {
        match self.eval(vars) {
            Val::List(l) => l.into_iter().any(|b| b),
            v => v.truthy(),
        }
    }

    fn eval<'a>(&'a self, vars: &HostVars<'a>) -> Val<'a> {
        let Some(op) = self.op else {
            return Val::Bool(true);
        };
        // Python evaluates every argument first; evaluation has no side effects, so reading
        // them lazily (and stopping early for `or`/`and`) gives the same result.
        let arg = |a: &'a Arg| -> Val<'a> { eval_arg(a, vars) };
        let args = &self.args;
        let compare = |pred: fn(&Val<'a>, &Val<'a>) -> bool| -> Val<'a> {
            if args.len() < 2 {
                return Val::Bool(false);
            }
            let first = arg(&args[0]);
            Val::Bool(args[1..].iter().all(|b| pred(&first, &arg(b))))
        };
        match op {
            Op::Eq => compare(py_eq),
            Op::In => {
                if args.len() < 2 {
                    return Val::Bool(false);
                }
                let first = arg(&args[0]);
                Val::Bool(args[1..].iter().any(|b| py_eq(&first, &arg(b))))
            }
            Op::Lt => compare(|a, b| py_cmp(a, b) == Some(Ordering::Less)),
            Op::Gt => compare(|a, b| py_cmp(a, b) == Some(Ordering::Greater)),
            Op::Le => {
                compare(|a, b| matches!(py_cmp(a, b), Some(Ordering::Less | Ordering::Equal)))
            }
            Op::Ge => {
                compare(|a, b| matches!(py_cmp(a, b), Some(Ordering::Greater | Ordering::Equal)))
            }
            Op::Not => Val::List(args.iter().map(|a| !arg(a).truthy()).collect()),
            Op::Or => Val::Bool(args.iter().any(|a| arg(a).truthy())),
            Op::And => Val::Bool(args.iter().all(|a| arg(a).truthy())),
        }
    }
}

fn eval_arg<'a>(a: &'a Arg, vars: &HostVars<'a>) -> Val<'a> {
    let h = vars.host;
    match a {
        Arg::Query(q) => q.eval(vars),
        Arg::Var(v) => Val::Num(match v {
            Var::Name => return Val::Str(&h.name),
            Var::HypervisorType => return Val::Str(&h.hypervisor_type),
            Var::Aggregates => return Val::Objects(h.aggregates.len()),
            // A dictionary with keys (truthy), equal to nothing a query can write.
            Var::Service => return Val::Objects(1),
            Var::ServiceHost => return Val::Str(&h.name),
            Var::ServiceBinary => return Val::Str("nova-compute"),
            Var::ServiceTopic => return Val::Str("compute"),
            Var::ServiceDisabled => return Val::Bool(!h.enabled),
            // An empty dictionary: falsy.
            Var::Stats => return Val::Objects(0),
            Var::HypervisorVersion => h.hypervisor_version as f64,
            Var::TotalUsableRamMb => h.ram_mb_total as f64,
            // Nova's free figures ignore allocation ratios, count the host's reserved amounts
            // as used, and may be negative.
            Var::FreeRamMb => h.ram_mb_usable() as f64 - h.ram_mb_used as f64,
            Var::TotalUsableDiskGb => h.disk_gb_total as f64,
            Var::FreeDiskMb => h.disk_mb_usable() as f64 - h.disk_mb_used as f64,
            Var::DiskMbUsed => (h.disk_mb_used + h.disk_mb_reserved) as f64,
            Var::VcpusTotal => f64::from(h.vcpus_total),
            Var::VcpusUsed => f64::from(h.vcpus_used),
            Var::NumInstances => h.instances.len() as f64,
            Var::NumIoOps | Var::FailedBuilds => 0.0,
            // The compute node's own ratios, as in Nova's HostState (aggregate overrides
            // apply only in the Aggregate*Filters).
            Var::RamAllocationRatio => h.allocation_ratios.ram,
            Var::CpuAllocationRatio => h.allocation_ratios.cpu,
            Var::DiskAllocationRatio => h.allocation_ratios.disk,
        }),
        Arg::Num(n) => Val::Num(*n),
        Arg::Str(s) => Val::Str(s),
        Arg::Bool(b) => Val::Bool(*b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            name: "cmp1".into(),
            enabled: true,
            up: true,
            availability_zone: "az1".into(),
            aggregates: vec!["ssd".into()],
            vcpus_total: 4,
            vcpus_used: 1,
            ram_mb_total: 4096,
            ram_mb_used: 3072,
            disk_gb_total: 200,
            disk_mb_used: 0,
            vcpus_reserved: 0,
            ram_mb_reserved: 0,
            disk_mb_reserved: 0,
            allocation_ratios: crate::model::AllocationRatios::default(),
            hypervisor_type: "QEMU".into(),
            architecture: "x86_64".into(),
            hypervisor_version: 6_002_000,
            instances: vec!["a".into(), "b".into()],
            generation: 7,
        }
    }

    /// Queries evaluate as Nova's JsonFilter does, including its quirks: comparisons need
    /// two arguments, `in` tests membership of the first argument in the rest, `not` yields a
    /// list that passes if any element is true, and an empty list matches everything.
    #[test]
    fn json_filter_table() {
        let cases: &[(&str, bool)] = &[
            ("[]", true),
            (r#"[">=", "$free_ram_mb", 1024]"#, true),
            (r#"[">=", "$free_ram_mb", 1025]"#, false),
            (r#"["<", "$free_ram_mb", 1025]"#, true),
            (r#"[">", "$free_ram_mb", 1024]"#, false),
            (r#"["<=", "$vcpus_used", 1, 2]"#, true),
            (r#"["=", "$vcpus_total", 4]"#, true),
            (r#"["=", "$vcpus_total", 4, 5]"#, false),
            (r#"["=", "$vcpus_total"]"#, false),
            (r#"["in", "$vcpus_total", 1, 2, 4]"#, true),
            (r#"["in", "$vcpus_total", 1, 2]"#, false),
            (
                r#"["and", [">=", "$free_ram_mb", 1024], [">=", "$free_disk_mb", 204800]]"#,
                true,
            ),
            (
                r#"["and", [">=", "$free_ram_mb", 1024], [">", "$free_disk_mb", 204800]]"#,
                false,
            ),
            (
                r#"["or", [">", "$free_ram_mb", 4096], ["=", "$total_usable_ram_mb", 4096]]"#,
                true,
            ),
            (r#"["not", [">=", "$free_ram_mb", 1024]]"#, false),
            (r#"["not", [">=", "$free_ram_mb", 1025]]"#, true),
            (r#"["not", true, false]"#, true),
            // A nested `not` yields a non-empty list, which is truthy for `and`.
            (r#"["and", ["not", true]]"#, true),
            // Nulls and empty strings are dropped, so this is a one-argument comparison.
            (r#"[">=", "$free_ram_mb", null]"#, false),
            // Number against string: Python raises a TypeError; the host does not pass.
            (r#"[">=", "$free_ram_mb", "1"]"#, false),
            (r#"["=", "$free_ram_mb", "1024"]"#, false),
            (r#"["<", "a", "b"]"#, true),
            // Booleans are numbers to Python.
            (r#"["=", true, 1]"#, true),
            // Every HostState attribute Nova's JsonFilter can read.
            (r#"["=", "$host", "cmp1"]"#, true),
            (r#"["=", "$nodename", "cmp1"]"#, true),
            (r#"["in", "$hypervisor_hostname", "cmp0", "cmp1"]"#, true),
            (r#"["=", "$hypervisor_type", "QEMU"]"#, true),
            (r#"["=", "$hypervisor_type", "qemu"]"#, false),
            (r#"[">=", "$hypervisor_version", 6000000]"#, true),
            (r#"["=", "$total_usable_disk_gb", 200]"#, true),
            (r#"["=", "$disk_mb_used", 0]"#, true),
            (r#"["=", "$num_instances", 2]"#, true),
            (r#"["<", "$num_instances", 2]"#, false),
            (r#"["<", "$num_io_ops", 8]"#, true),
            (r#"["=", "$failed_builds", 0]"#, true),
            (r#"["=", "$cpu_allocation_ratio", 16]"#, true),
            (r#"["=", "$ram_allocation_ratio", 1.5]"#, true),
            (r#"["=", "$disk_allocation_ratio", 1]"#, true),
            // Aggregate objects: truthy when the host has any, equal to no literal.
            (r#"["and", "$aggregates"]"#, true),
            (r#"["=", "$aggregates", "ssd"]"#, false),
            // Attributes without a value are dropped like nulls: a one-argument comparison.
            (r#"["=", "$host_ip", "10.0.0.1"]"#, false),
            (r#"["=", "cmp1", "$uuid", "$host"]"#, true),
            (r#"[">", "$metrics.cpu.frequency", 1]"#, false),
            (r#"["<", 1, "$limits.memory_mb", 2]"#, true),
            // `$service` is the host's nova-compute service record, `$stats` an empty
            // dictionary (Shoal reports no compute-node stats).
            (r#"["=", "$service.host", "cmp1"]"#, true),
            (r#"["=", "$service.binary", "nova-compute"]"#, true),
            (r#"["=", "$service.topic", "compute"]"#, true),
            (r#"["=", "$service.disabled", false]"#, true),
            (r#"["not", "$service.disabled"]"#, true),
            (r#"["=", "$service.forced_down", true]"#, false),
            (r#"["and", "$service"]"#, true),
            (r#"["=", "$service", "cmp1"]"#, false),
            (r#"["or", "$stats"]"#, false),
            (r#"["=", "$stats.num_instances", "2"]"#, false),
            (r#"["=", "cmp1", "$stats.io_workload", "$host"]"#, true),
        ];
        let h = host();
        for (q, want) in cases {
            let query = parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
            assert_eq!(
                query.host_passes(&HostVars { host: &h }),
                *want,
                "query {q}"
            );
        }
    }

    /// The host's reserved amounts count as used in the free figures, as Nova's HostState
    /// reports them from the compute node.
    #[test]
    fn json_filter_counts_reserved_as_used() {
        let mut h = host();
        h.ram_mb_reserved = 512;
        h.disk_mb_reserved = 2048;
        for (q, want) in [
            (r#"["=", "$free_ram_mb", 512]"#, true),
            (r#"["=", "$free_disk_mb", 202752]"#, true),
            (r#"["=", "$disk_mb_used", 2048]"#, true),
            (r#"["=", "$total_usable_ram_mb", 4096]"#, true),
        ] {
            let query = parse(q).unwrap();
            assert_eq!(query.host_passes(&HostVars { host: &h }), want, "query {q}");
        }
    }

    /// Malformed queries are typed errors (an API turns them into HTTP 400), never a panic
    /// and never a silently ignored filter.
    #[test]
    fn json_filter_parse_errors() {
        let cases: &[(&str, QueryError)] = &[
            (r#"{"a": 1}"#, QueryError::NotAList),
            (r#""$free_ram_mb""#, QueryError::NotAList),
            (r#"[1, 2]"#, QueryError::MissingOperator),
            (r#"["~", 1]"#, QueryError::UnknownOperator("~".into())),
            (
                r#"[">=", "$free_ram", 1]"#,
                QueryError::UnknownVariable("$free_ram".into()),
            ),
            (r#"[">=", {"a": 1}, 1]"#, QueryError::ObjectArgument),
            (r#"["=", "$", 1]"#, QueryError::UnknownVariable("$".into())),
            (
                r#"["=", "$free_ram_mb.x", 1]"#,
                QueryError::NotADictionary("$free_ram_mb.x".into()),
            ),
            (
                r#"["=", "$service.host.x", 1]"#,
                QueryError::NotADictionary("$service.host.x".into()),
            ),
            (
                r#"["=", "$capabilities.x", 1]"#,
                QueryError::UnknownVariable("$capabilities.x".into()),
            ),
            (
                r#"["and", ["xor", 1, 2]]"#,
                QueryError::UnknownOperator("xor".into()),
            ),
        ];
        for (q, want) in cases {
            assert_eq!(parse(q).unwrap_err(), *want, "query {q}");
        }
        assert!(matches!(parse("[>= 1"), Err(QueryError::NotJson(_))));
        let deep = format!("{}[]{}", "[\"not\", ".repeat(40), "]".repeat(40));
        assert_eq!(parse(&deep), Err(QueryError::TooDeep));
        // The message names what is allowed.
        let msg = parse(r#"["~"]"#).unwrap_err().to_string();
        assert!(msg.contains("allowed"), "{msg}");
        let msg = parse(r#"["=", "$free_ram", 1]"#).unwrap_err().to_string();
        for v in VARIABLES.iter().chain(&UNSET_VARIABLES) {
            assert!(msg.contains(v), "{msg} does not name {v}");
        }
    }
}
