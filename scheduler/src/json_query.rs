//! Nova's JsonFilter: a query such as `[">=", "$free_ram_mb", 1024]` parsed once per request
//! into a typed tree and evaluated per host.

use std::cmp::Ordering;

use serde_json::Value as Json;

/// The host variables a query may name.
pub const VARIABLES: [&str; 5] = [
    "$free_ram_mb",
    "$free_disk_mb",
    "$total_usable_ram_mb",
    "$vcpus_total",
    "$vcpus_used",
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
        "unknown query variable `{0}`; allowed: $free_ram_mb $free_disk_mb \
         $total_usable_ram_mb $vcpus_total $vcpus_used"
    )]
    UnknownVariable(String),
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
    FreeRamMb,
    FreeDiskMb,
    TotalUsableRamMb,
    VcpusTotal,
    VcpusUsed,
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

/// The host figures a query can read, as Nova's HostState names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostVars {
    pub free_ram_mb: f64,
    pub free_disk_mb: f64,
    pub total_usable_ram_mb: f64,
    pub vcpus_total: f64,
    pub vcpus_used: f64,
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
                Some(_) => args.push(Arg::Var(parse_var(s)?)),
                None => args.push(Arg::Str(s.clone())),
            },
            Json::Number(n) => args.push(Arg::Num(n.as_f64().unwrap_or(f64::NAN))),
            Json::Bool(b) => args.push(Arg::Bool(*b)),
            Json::Object(_) => return Err(QueryError::ObjectArgument),
        }
    }
    Ok(Query { op: Some(op), args })
}

fn parse_var(s: &str) -> Result<Var, QueryError> {
    Ok(match s {
        "$free_ram_mb" => Var::FreeRamMb,
        "$free_disk_mb" => Var::FreeDiskMb,
        "$total_usable_ram_mb" => Var::TotalUsableRamMb,
        "$vcpus_total" => Var::VcpusTotal,
        "$vcpus_used" => Var::VcpusUsed,
        other => return Err(QueryError::UnknownVariable(other.to_owned())),
    })
}

/// Python values the evaluation passes around.
#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Num(f64),
    Str(&'a str),
    Bool(bool),
    List(Vec<bool>),
}

impl Val<'_> {
    fn truthy(&self) -> bool {
        match self {
            Val::Num(n) => *n != 0.0,
            Val::Str(s) => !s.is_empty(),
            Val::Bool(b) => *b,
            Val::List(l) => !l.is_empty(),
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
    pub fn host_passes(&self, vars: &HostVars) -> bool {
        match self.eval(vars) {
            Val::List(l) => l.into_iter().any(|b| b),
            v => v.truthy(),
        }
    }

    fn eval<'a>(&'a self, vars: &HostVars) -> Val<'a> {
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

fn eval_arg<'a>(a: &'a Arg, vars: &HostVars) -> Val<'a> {
    match a {
        Arg::Query(q) => q.eval(vars),
        Arg::Var(v) => Val::Num(match v {
            Var::FreeRamMb => vars.free_ram_mb,
            Var::FreeDiskMb => vars.free_disk_mb,
            Var::TotalUsableRamMb => vars.total_usable_ram_mb,
            Var::VcpusTotal => vars.vcpus_total,
            Var::VcpusUsed => vars.vcpus_used,
        }),
        Arg::Num(n) => Val::Num(*n),
        Arg::Str(s) => Val::Str(s),
        Arg::Bool(b) => Val::Bool(*b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> HostVars {
        HostVars {
            free_ram_mb: 1024.0,
            free_disk_mb: 200.0 * 1024.0,
            total_usable_ram_mb: 4096.0,
            vcpus_total: 4.0,
            vcpus_used: 1.0,
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
        ];
        for (q, want) in cases {
            let query = parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
            assert_eq!(query.host_passes(&vars()), *want, "query {q}");
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
    }
}
