//! Nova's `extra_specs_ops.match`: compare an aggregate metadata value with a flavor extra-spec
//! requirement such as `>= 4`, `s== ssd`, `<in> avx` or `<or> a <or> b`.

/// Whether `value` (aggregate metadata) satisfies `req` (flavor extra spec).
///
/// As in Nova: a requirement whose first word is not an operator is compared as a plain
/// string; `=` means "numerically at least"; numeric operators on values that are not numbers
/// do not match (Nova raises, which fails the request; here the host just does not match).
pub fn matches(value: &str, req: &str) -> bool {
    let mut words = req.split_whitespace();
    let Some(op) = words.next() else {
        return value == req;
    };
    let rest: Vec<&str> = words.collect();
    let num = |f: fn(f64, f64) -> bool| -> bool {
        match (parse_f64(value), rest.first().and_then(|w| parse_f64(w))) {
            (Some(x), Some(y)) => f(x, y),
            _ => false,
        }
    };
    let string = |f: fn(&str, &str) -> bool| -> bool { rest.first().is_some_and(|y| f(value, y)) };
    match op {
        "=" => num(|x, y| x >= y),
        "==" => num(|x, y| x == y),
        "!=" => num(|x, y| x != y),
        ">=" => num(|x, y| x >= y),
        "<=" => num(|x, y| x <= y),
        "s==" => string(|x, y| x == y),
        "s!=" => string(|x, y| x != y),
        "s<" => string(|x, y| x < y),
        "s<=" => string(|x, y| x <= y),
        "s>" => string(|x, y| x > y),
        "s>=" => string(|x, y| x >= y),
        "<in>" => string(|x, y| x.contains(y)),
        "<all-in>" => !rest.is_empty() && rest.iter().all(|y| value.contains(y)),
        "<or>" => {
            // `<or> v1 <or> v2 <or> v3`: the words at even positions are the alternatives.
            rest.iter().step_by(2).any(|alt| *alt == value)
        }
        _ => value == req,
    }
}

/// Python's `float()` on a metadata value: surrounding whitespace allowed.
fn parse_f64(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::matches;

    /// Each operator of nova's extra_specs_ops behaves as nova's own unit tests expect
    /// (nova/tests/unit/scheduler/filters/test_extra_specs_ops.py).
    #[test]
    fn extra_specs_ops_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("1", "1", true),
            ("1", "2", false),
            ("ssd", "ssd", true),
            ("123", "= 123", true),
            ("124", "= 123", true),
            ("122", "= 123", false),
            ("123", "= 123.0", true),
            ("abc", "= 1", false),
            ("12311321", "<in> 11", true),
            ("12311321", "<in> 12311321", true),
            ("12311321", "<in> 12311321 <in>", true),
            ("12310321", "<in> 11", false),
            ("12310321", "<in>", false),
            ("a b c", "<all-in> a c", true),
            ("a b c", "<all-in> a d", false),
            ("12", "<or> 11 <or> 12", true),
            ("13", "<or> 11 <or> 12", false),
            ("12", "<or> 11 <or> 12 <or>", true),
            ("11", "<or> 11", true),
            ("12", "<or>", false),
            ("123", "== 123", true),
            ("124", "== 123", false),
            ("124", "!= 123", true),
            ("123", "!= 123", false),
            ("2", ">= 1", true),
            ("1", ">= 1", true),
            ("0", ">= 1", false),
            ("1", "<= 2", true),
            ("3", "<= 2", false),
            ("12", "s== 12", true),
            ("12", "s== 13", false),
            ("123", "s!= 12", true),
            ("a", "s< b", true),
            ("b", "s< a", false),
            ("a", "s<= a", true),
            ("b", "s> a", true),
            ("a", "s>= a", true),
            ("a", "s>= b", false),
            // An operator with nothing after it matches nothing.
            ("1", "=", false),
            ("1", ">=", false),
            // Not an operator: the whole requirement is compared as a string.
            ("<fo> 1", "<fo> 1", true),
            ("1", "<fo> 1", false),
        ];
        for (value, req, want) in cases {
            assert_eq!(matches(value, req), *want, "value {value:?} req {req:?}");
        }
    }
}
