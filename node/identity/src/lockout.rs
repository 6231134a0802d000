//! Throttling of failed password attempts, in the spirit of Keystone's
//! `lockout_failure_attempts` / `lockout_duration`, kept in each node's memory.
//!
//! Keystone locks the user account itself, which lets anyone who knows a user name lock that
//! user out. Shoal counts failures per (user name, source address) and per source address
//! instead: a source that fails [`PER_USER_SOURCE`] times for one user, or [`PER_SOURCE`] times
//! in all, within [`WINDOW`], is refused without a password check until the window has passed.
//! A guesser is slowed to a few attempts a minute per node, and the real user, from another
//! address, is not locked out (clients sharing the guesser's address, behind one NAT, are
//! throttled with it once it passes the per-source budget). Refused attempts cost no argon2
//! work. The counts are per node and
//! not replicated: spreading guesses over N nodes gives N times the budget, still bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(60);
pub const PER_USER_SOURCE: u32 = 5;
pub const PER_SOURCE: u32 = 100;
/// Entries kept at most; past it, expired windows are swept and then the oldest dropped.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Default)]
pub struct Lockout {
    failures: Mutex<HashMap<Key, (u32, Instant)>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    UserSource(String, Option<IpAddr>),
    Source(Option<IpAddr>),
}

impl Lockout {
    fn keys(user: &str, source: Option<IpAddr>) -> [(Key, u32); 2] {
        [
            (Key::UserSource(user.to_owned(), source), PER_USER_SOURCE),
            (Key::Source(source), PER_SOURCE),
        ]
    }

    /// Whether an attempt for `user` from `source` may be checked now.
    pub fn allows(&self, user: &str, source: Option<IpAddr>, now: Instant) -> bool {
        let map = self.failures.lock().expect("lockout lock");
        Self::keys(user, source).iter().all(|(k, limit)| {
            map.get(k)
                .is_none_or(|(n, since)| now.duration_since(*since) >= WINDOW || n < limit)
        })
    }

    /// Counts a failed attempt.
    pub fn failed(&self, user: &str, source: Option<IpAddr>, now: Instant) {
        let mut map = self.failures.lock().expect("lockout lock");
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        for (k, _) in Self::keys(user, source) {
            let e = map.entry(k).or_insert((0, now));
            if now.duration_since(e.1) >= WINDOW {
                *e = (0, now);
            }
            e.0 += 1;
        }
    }

    /// A successful check clears the user's count from that source.
    pub fn succeeded(&self, user: &str, source: Option<IpAddr>) {
        self.failures
            .lock()
            .expect("lockout lock")
            .remove(&Key::UserSource(user.to_owned(), source));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    /// After the per-user budget from one source, that source is refused for that user until
    /// the window passes; another source and another user are not affected.
    #[test]
    fn a_guessing_source_is_slowed_and_nobody_else() {
        let l = Lockout::default();
        let t0 = Instant::now();
        for _ in 0..PER_USER_SOURCE {
            assert!(l.allows("admin", ip("10.9.9.9"), t0));
            l.failed("admin", ip("10.9.9.9"), t0);
        }
        assert!(!l.allows("admin", ip("10.9.9.9"), t0));
        assert!(l.allows("admin", ip("10.1.1.1"), t0));
        assert!(l.allows("alice", ip("10.9.9.9"), t0));
        assert!(l.allows("admin", ip("10.9.9.9"), t0 + WINDOW));
    }

    /// One source spreading guesses over many users hits the per-source budget.
    #[test]
    fn a_source_guessing_many_users_is_slowed() {
        let l = Lockout::default();
        let t0 = Instant::now();
        for i in 0..PER_SOURCE {
            l.failed(&format!("u{i}"), ip("10.9.9.9"), t0);
        }
        assert!(!l.allows("someone-new", ip("10.9.9.9"), t0));
        assert!(l.allows("someone-new", ip("10.1.1.1"), t0));
    }
}
