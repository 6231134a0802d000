//! A linearizability checker for histories of reads and writes on registers (one register per
//! key), in the manner of Porcupine (Athalye's Go checker): Wing and Gong's search over the
//! operations' call and return events, with Lowe's memoisation of (set of operations already
//! linearized, register state) so each configuration is explored once.
//!
//! Registers are independent, so a history is linearizable if and only if each key's
//! sub-history is (P-compositionality, Herlihy and Wing): each key is checked alone, which keeps
//! the search small.
//!
//! What the client saw decides how an operation enters the history:
//! - an acknowledged write or read is an operation between its invocation and its completion;
//! - a write that definitely failed (refused before it could reach any log) is left out;
//! - a write whose fate is unknown (a timeout, "commit status unknown", a connection cut while it
//!   was in flight) may have taken effect at any moment after its invocation, or never: it
//!   completes at +infinity (a write linearized after everything else changes nothing anyone
//!   observed, which is "never");
//! - a read that did not answer is left out (it observed nothing).
//!
//! Included with `#[path]` by the tests that need it, so its own tests run once, not in every
//! test binary that uses `common`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// What the client saw when the call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: took effect (a write) or answered (a read).
    Ok,
    /// Definitely did not take effect.
    Fail,
    /// May or may not have taken effect.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Wrote this value; values are unique per history.
    Write(String),
    /// Read this value (`None`: the key did not exist).
    Read(Option<String>),
}

/// One client call, as recorded by the client.
#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub key: String,
    pub kind: Kind,
    /// Nanoseconds since the history's start, taken before the request was sent.
    pub invoke: u64,
    /// Nanoseconds since the history's start, taken after the answer (or the error) arrived.
    pub complete: u64,
    pub outcome: Outcome,
    /// Which node the call went through, for the report.
    pub node: usize,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            Kind::Write(v) => format!("write {v:?}"),
            Kind::Read(Some(v)) => format!("read {v:?}"),
            Kind::Read(None) => "read (absent)".to_owned(),
        };
        write!(
            f,
            "client {} via node{}: {} {what} [{:.3} s .. {:.3} s] {:?}",
            self.client,
            self.node + 1,
            self.key,
            self.invoke as f64 / 1e9,
            self.complete as f64 / 1e9,
            self.outcome
        )
    }
}

/// Why a history is not shown linearizable.
#[derive(Debug)]
pub enum Violation {
    /// No order of this key's operations explains what the reads saw.
    NotLinearizable {
        key: String,
        /// The operations involved in the deepest point the search reached: those linearized
        /// last and those still pending when it had to backtrack.
        around: Vec<Op>,
        /// The most operations of this key the search could linearize in a row.
        linearized: usize,
        total: usize,
    },
    /// Two writes in one history carry the same value, which the checker cannot tell apart.
    DuplicateValue { key: String, value: String },
    /// The search explored more than the budget of configurations without an answer.
    GaveUp { key: String, ops: usize },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotLinearizable {
                key,
                around,
                linearized,
                total,
            } => {
                writeln!(
                    f,
                    "key {key:?} is not linearizable: at most {linearized} of its {total} \
                     operations can be put in an order consistent with real time and the \
                     register's semantics; the operations around the point where every order \
                     fails:"
                )?;
                for op in around {
                    writeln!(f, "  {op}")?;
                }
                Ok(())
            }
            Violation::DuplicateValue { key, value } => {
                write!(
                    f,
                    "key {key:?}: two writes of {value:?}; values must be unique"
                )
            }
            Violation::GaveUp { key, ops } => write!(
                f,
                "key {key:?}: gave up after exploring the budget of configurations over {ops} \
                 operations (neither shown linearizable nor not)"
            ),
        }
    }
}

/// Configurations one key's search may visit before giving up.
const BUDGET: u64 = 20_000_000;

/// Checks every key's sub-history; returns every violation found (empty: linearizable).
pub fn check(history: &[Op]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    by_key
        .into_iter()
        .filter_map(|(key, ops)| check_key(key, &ops).err())
        .collect()
}

/// One operation as the search sees it: values interned (0 is "absent").
#[derive(Debug, Clone, Copy)]
struct RegOp {
    write: bool,
    value: u32,
    invoke: u64,
    complete: u64,
}

fn check_key(key: &str, ops: &[&Op]) -> Result<(), Violation> {
    let mut values: HashMap<&str, u32> = HashMap::new();
    let mut kept: Vec<&Op> = Vec::new();
    let mut reg: Vec<RegOp> = Vec::new();
    // Interns written values first, so that a read of a value nobody wrote gets an id no write
    // has and fails the search as it should.
    for op in ops {
        if let Kind::Write(v) = &op.kind {
            if op.outcome == Outcome::Fail {
                continue;
            }
            let next = values.len() as u32 + 1;
            if values.insert(v.as_str(), next).is_some() {
                return Err(Violation::DuplicateValue {
                    key: key.to_owned(),
                    value: v.clone(),
                });
            }
        }
    }
    let mut unknown_value = values.len() as u32 + 1;
    for op in ops {
        let (write, value, complete) = match (&op.kind, op.outcome) {
            (_, Outcome::Fail) | (Kind::Read(_), Outcome::Unknown) => continue,
            (Kind::Write(v), Outcome::Ok) => (true, values[v.as_str()], op.complete),
            (Kind::Write(v), Outcome::Unknown) => (true, values[v.as_str()], u64::MAX),
            (Kind::Read(None), Outcome::Ok) => (false, 0, op.complete),
            (Kind::Read(Some(v)), Outcome::Ok) => {
                let id = values.get(v.as_str()).copied().unwrap_or_else(|| {
                    unknown_value += 1;
                    unknown_value
                });
                (false, id, op.complete)
            }
        };
        kept.push(op);
        reg.push(RegOp {
            write,
            value,
            invoke: op.invoke,
            complete: complete.max(op.invoke),
        });
    }
    match search(&reg) {
        Search::Linearizable => Ok(()),
        Search::GaveUp => Err(Violation::GaveUp {
            key: key.to_owned(),
            ops: reg.len(),
        }),
        Search::Stuck { best, around } => {
            let mut around: Vec<Op> = around.into_iter().map(|i| kept[i].clone()).collect();
            around.sort_by_key(|o| o.invoke);
            Err(Violation::NotLinearizable {
                key: key.to_owned(),
                around,
                linearized: best,
                total: reg.len(),
            })
        }
    }
}

enum Search {
    Linearizable,
    GaveUp,
    /// `best`: the most operations linearized at once; `around`: indices of operations near the
    /// deepest dead end.
    Stuck {
        best: usize,
        around: Vec<usize>,
    },
}

/// A call or return event in the doubly linked list the search unlinks and relinks.
#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    call: bool,
    /// For a call: the index of its return entry.
    matching: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// Wing and Gong's search with Lowe's cache, as Porcupine's `checkSingle`.
fn search(ops: &[RegOp]) -> Search {
    let n = ops.len();
    if n == 0 {
        return Search::Linearizable;
    }
    // Events sorted by time; at equal times calls come first, so operations that touch at one
    // instant count as concurrent (the permissive reading).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke, true, i));
        events.push((op.complete, false, i));
    }
    events.sort_by_key(|&(t, call, i)| (t, !call, i));
    // Entry 0 is the list's head sentinel; events follow from 1.
    let mut list: Vec<Entry> = Vec::with_capacity(2 * n + 1);
    list.push(Entry {
        op: NIL,
        call: false,
        matching: NIL,
        prev: NIL,
        next: 1,
    });
    let mut ret_of = vec![NIL; n];
    for (k, &(_, call, op)) in events.iter().enumerate() {
        let idx = k + 1;
        if !call {
            ret_of[op] = idx;
        }
        list.push(Entry {
            op,
            call,
            matching: NIL,
            prev: idx - 1,
            next: if k + 1 < events.len() { idx + 1 } else { NIL },
        });
    }
    for e in list.iter_mut().skip(1) {
        if e.call {
            e.matching = ret_of[e.op];
        }
    }

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, u32)> = HashSet::new();
    let mut calls: Vec<(usize, u32)> = Vec::new();
    let mut state: u32 = 0;
    let mut entry = list[0].next;
    let mut steps: u64 = 0;
    let mut best = 0usize;
    let mut around: Vec<usize> = Vec::new();

    // The list always ends with a return (every call's return follows it), so walking forward
    // from a call never runs off the end.
    while list[0].next != NIL {
        steps += 1;
        if steps > BUDGET {
            return Search::GaveUp;
        }
        let e = list[entry];
        if e.call {
            let op = ops[e.op];
            let next_state = if op.write {
                Some(op.value)
            } else if op.value == state {
                Some(state)
            } else {
                None
            };
            let mut moved = false;
            if let Some(s) = next_state {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((lin, s)) {
                    calls.push((entry, state));
                    state = s;
                    linearized[e.op / 64] |= 1 << (e.op % 64);
                    lift(&mut list, entry);
                    entry = list[0].next;
                    moved = true;
                }
            }
            if !moved {
                entry = e.next;
            }
        } else {
            // A return whose call is not linearized yet: this path is a dead end.
            if calls.len() >= best {
                best = calls.len();
                around = dead_end(&list, &calls, entry);
            }
            let Some((call_entry, prev_state)) = calls.pop() else {
                return Search::Stuck { best, around };
            };
            state = prev_state;
            let op = list[call_entry].op;
            linearized[op / 64] &= !(1 << (op % 64));
            unlift(&mut list, call_entry);
            entry = list[call_entry].next;
        }
    }
    Search::Linearizable
}

/// The last few operations linearized and the calls still in the list up to the stuck return.
fn dead_end(list: &[Entry], calls: &[(usize, u32)], stuck: usize) -> Vec<usize> {
    let mut out: Vec<usize> = calls
        .iter()
        .rev()
        .take(8)
        .map(|&(c, _)| list[c].op)
        .collect();
    let mut e = list[0].next;
    while e != NIL {
        if list[e].call || e == stuck {
            out.push(list[e].op);
        }
        if e == stuck || out.len() > 40 {
            break;
        }
        e = list[e].next;
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn lift(list: &mut [Entry], call: usize) {
    let c = list[call];
    list[c.prev].next = c.next;
    if c.next != NIL {
        list[c.next].prev = c.prev;
    }
    let r = list[c.matching];
    list[r.prev].next = r.next;
    if r.next != NIL {
        list[r.next].prev = r.prev;
    }
}

fn unlift(list: &mut [Entry], call: usize) {
    let ret = list[call].matching;
    let r = list[ret];
    list[r.prev].next = ret;
    if r.next != NIL {
        list[r.next].prev = ret;
    }
    let c = list[call];
    list[c.prev].next = call;
    if c.next != NIL {
        list[c.next].prev = call;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(client: usize, v: &str, invoke: u64, complete: u64, outcome: Outcome) -> Op {
        Op {
            client,
            key: "k".into(),
            kind: Kind::Write(v.into()),
            invoke,
            complete,
            outcome,
            node: 0,
        }
    }

    fn r(client: usize, v: Option<&str>, invoke: u64, complete: u64) -> Op {
        Op {
            client,
            key: "k".into(),
            kind: Kind::Read(v.map(str::to_owned)),
            invoke,
            complete,
            outcome: Outcome::Ok,
            node: 0,
        }
    }

    fn ok(h: &[Op]) -> bool {
        check(h).is_empty()
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            r(0, None, 0, 1),
            w(0, "a", 2, 3, Outcome::Ok),
            r(1, Some("a"), 4, 5),
            w(1, "b", 6, 7, Outcome::Ok),
            r(0, Some("b"), 8, 9),
        ];
        assert!(ok(&h));
    }

    #[test]
    fn stale_read_after_an_acknowledged_write_is_flagged() {
        let h = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 3, Outcome::Ok),
            // Invoked after b was acknowledged, yet sees a.
            r(1, Some("a"), 4, 5),
        ];
        let v = check(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        let text = v[0].to_string();
        assert!(text.contains("not linearizable"), "{text}");
        assert!(text.contains("read \"a\""), "{text}");
    }

    #[test]
    fn lost_write_is_flagged() {
        // An acknowledged write, then a read (after it) that sees the key absent.
        let h = [w(0, "a", 0, 1, Outcome::Ok), r(1, None, 2, 3)];
        assert!(!ok(&h));
    }

    #[test]
    fn concurrent_read_may_see_either_value() {
        let old = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 10, Outcome::Ok),
            r(1, Some("a"), 3, 4),
        ];
        let new = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 10, Outcome::Ok),
            r(1, Some("b"), 3, 4),
        ];
        assert!(ok(&old));
        assert!(ok(&new));
    }

    #[test]
    fn reads_may_not_go_back_in_time() {
        // b is concurrent with both reads, but once one read saw b a later read cannot see a.
        let h = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 20, Outcome::Ok),
            r(1, Some("b"), 3, 4),
            r(2, Some("a"), 5, 6),
        ];
        assert!(!ok(&h));
    }

    #[test]
    fn failed_write_must_not_be_seen() {
        let h = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 3, Outcome::Fail),
            r(1, Some("b"), 4, 5),
        ];
        assert!(!ok(&h), "a definitely failed write was observed");
        let without = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 3, Outcome::Fail),
            r(1, Some("a"), 4, 5),
        ];
        assert!(ok(&without));
    }

    #[test]
    fn unknown_write_may_apply_late_or_never() {
        // Seen long after its client gave up on it.
        let late = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 3, Outcome::Unknown),
            r(1, Some("a"), 4, 5),
            r(1, Some("b"), 6, 7),
        ];
        assert!(ok(&late));
        // Never seen.
        let never = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 3, Outcome::Unknown),
            r(1, Some("a"), 4, 5),
        ];
        assert!(ok(&never));
        // But once seen, it cannot be undone.
        let flicker = [
            w(0, "a", 0, 1, Outcome::Ok),
            w(0, "b", 2, 3, Outcome::Unknown),
            r(1, Some("b"), 4, 5),
            r(1, Some("a"), 6, 7),
        ];
        assert!(!ok(&flicker));
        // Nor take effect before it was invoked.
        let early = [r(1, Some("b"), 0, 1), w(0, "b", 2, 3, Outcome::Unknown)];
        assert!(!ok(&early));
    }

    #[test]
    fn read_of_a_value_nobody_wrote_is_flagged() {
        let h = [w(0, "a", 0, 1, Outcome::Ok), r(1, Some("zzz"), 2, 3)];
        assert!(!ok(&h));
    }

    #[test]
    fn keys_are_independent() {
        let mut other = w(0, "x", 0, 1, Outcome::Ok);
        other.key = "j".into();
        let mut stale = r(1, None, 2, 3);
        stale.key = "j".into();
        let h = [
            w(0, "a", 0, 1, Outcome::Ok),
            r(1, Some("a"), 2, 3),
            other,
            stale,
        ];
        let v = check(&h);
        assert_eq!(v.len(), 1);
        assert!(v[0].to_string().contains("\"j\""), "{}", v[0]);
    }

    #[test]
    fn duplicate_values_are_refused() {
        let h = [w(0, "a", 0, 1, Outcome::Ok), w(1, "a", 2, 3, Outcome::Ok)];
        assert!(matches!(
            check(&h).as_slice(),
            [Violation::DuplicateValue { .. }]
        ));
    }

    /// Many overlapping clients: the memo keeps this fast, and a stale read hidden in the
    /// middle of a long linearizable history is still found.
    #[test]
    fn long_concurrent_histories() {
        let mut h = Vec::new();
        let mut t = 0u64;
        // Rounds of 6 overlapping writes then 6 overlapping reads of the round's last write.
        for round in 0..60 {
            let base = t;
            for c in 0..6u64 {
                let v = format!("v{round}-{c}");
                h.push(w(c as usize, &v, base + c, base + 20 + c, Outcome::Ok));
            }
            // Every read starts after all writes of the round ended, so sees one of them; the
            // last written in any order is allowed, make all readers agree on one.
            let seen = format!("v{round}-3");
            for c in 0..6u64 {
                h.push(r(c as usize, Some(&seen), base + 30 + c, base + 40 + c));
            }
            t += 50;
        }
        let start = std::time::Instant::now();
        assert!(ok(&h));
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        // Now one reader in round 30 sees round 29's value.
        let idx = h
            .iter()
            .position(|o| o.invoke == 30 * 50 + 32 && matches!(o.kind, Kind::Read(_)))
            .unwrap();
        h[idx].kind = Kind::Read(Some("v29-3".into()));
        assert!(!ok(&h));
    }
}
