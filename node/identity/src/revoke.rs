//! Revocation events, as Keystone's: a token stops validating when its user, its project,
//! its user's role on that project, its domain or the token itself is revoked.
//!
//! An event names what it revokes and a time: every token that matches and was issued at or
//! before that time is refused. Events are rows of `revocation_events` under deterministic keys
//! (`user/<id>`, `project/<id>`, `grant/<user>/<project>`, `domain/<id>`, `system/<user>`), so
//! revoking the same thing twice overwrites one row with a later time instead of adding rows;
//! single tokens are revoked by their audit id in `revoked_tokens`. The event is written in the
//! same Raft transaction as the change that causes it (the user's deletion, the grant's
//! removal), so there is no moment when the change is visible and its tokens still work on a
//! node that has applied it.
//!
//! Every node holds the events in memory ([`Revocations`], inside the key ring) and checks a
//! token with at most five hash lookups. A token cannot outlive its lifetime, so an event is
//! useless once every token it could match has expired: the maintenance loop deletes events
//! and revoked tokens past `purge_after`, which bounds the table by what was revoked within
//! one token lifetime.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::token::Claims;

/// What a revocation matches. Each variant is one Keystone revocation-event shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Revoked {
    /// Every token of the user (deleted, disabled, password changed).
    User { user_id: String },
    /// Every token scoped to the project (deleted or disabled).
    Project { project_id: String },
    /// Every token of the user scoped to the project (a role assignment removed).
    Grant { user_id: String, project_id: String },
    /// Every token of a user of the domain or scoped to a project of the domain.
    Domain { domain_id: String },
    /// Every system-scoped token of the user (a system role assignment removed).
    System { user_id: String },
}

impl Revoked {
    /// The row key; one row per revoked thing.
    pub fn key(&self) -> String {
        match self {
            Revoked::User { user_id } => format!("user/{user_id}"),
            Revoked::Project { project_id } => format!("project/{project_id}"),
            Revoked::Grant {
                user_id,
                project_id,
            } => format!("grant/{user_id}/{project_id}"),
            Revoked::Domain { domain_id } => format!("domain/{domain_id}"),
            Revoked::System { user_id } => format!("system/{user_id}"),
        }
    }
}

/// A stored event: what, tokens issued up to when, and when the row may go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationEvent {
    #[serde(flatten)]
    pub what: Revoked,
    /// Tokens issued at or before this time (milliseconds since the epoch) are refused.
    pub issued_before_ms: u64,
    /// Seconds since the epoch after which no matching token can still be valid.
    pub purge_after: u64,
}

impl RevocationEvent {
    /// An event for `what` at `now_ms`, kept for one token lifetime plus the clock margin.
    pub fn new(what: Revoked, now_ms: u64, token_ttl: u64) -> Self {
        Self {
            what,
            issued_before_ms: now_ms,
            purge_after: now_ms / 1000 + token_ttl + CLOCK_MARGIN_SECS,
        }
    }
}

/// Slack for clock differences between the node that issued a token and the one that wrote
/// the event, in both the match and the purge.
pub const CLOCK_MARGIN_SECS: u64 = 60;

/// The events a node holds in memory, by row key, with the time each applies up to.
#[derive(Debug, Default, Clone)]
pub struct Revocations {
    by_key: HashMap<String, u64>,
}

impl Revocations {
    pub fn insert(&mut self, key: &str, ev: &RevocationEvent) {
        self.by_key.insert(key.to_owned(), ev.issued_before_ms);
    }

    pub fn remove(&mut self, key: &str) {
        self.by_key.remove(key);
    }

    /// Whether an event revokes a token with these claims.
    pub fn revokes(&self, c: &Claims) -> bool {
        let issued = c.issued_at_ms();
        let hit = |what: Revoked| {
            self.by_key
                .get(&what.key())
                .is_some_and(|&before| issued <= before)
        };
        if hit(Revoked::User {
            user_id: c.user_id.clone(),
        }) || hit(Revoked::Domain {
            domain_id: c.domain_id.clone(),
        }) {
            return true;
        }
        if c.system
            && hit(Revoked::System {
                user_id: c.user_id.clone(),
            })
        {
            return true;
        }
        if let Some(pid) = &c.project_id {
            if hit(Revoked::Project {
                project_id: pid.clone(),
            }) || hit(Revoked::Grant {
                user_id: c.user_id.clone(),
                project_id: pid.clone(),
            }) {
                return true;
            }
        }
        match &c.project_domain_id {
            Some(d) if *d != c.domain_id => hit(Revoked::Domain {
                domain_id: d.clone(),
            }),
            _ => false,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(user: &str, project: &str, iat_ms: u64) -> Claims {
        Claims {
            project_id: Some(project.into()),
            project_domain_id: Some("default".into()),
            iat: iat_ms / 1000,
            iat_ms,
            ..Claims::for_test(user, &["member"])
        }
    }

    fn with(what: Revoked, at: u64) -> Revocations {
        let mut r = Revocations::default();
        let ev = RevocationEvent::new(what.clone(), at, 3600);
        r.insert(&what.key(), &ev);
        r
    }

    /// Each event shape refuses the tokens it names that were issued up to its time, and
    /// nothing else: later tokens, other users and other projects still pass.
    #[test]
    fn each_event_matches_its_tokens_issued_before_it() {
        let t = claims("u1", "p1", 5_000);
        let cases = [
            Revoked::User {
                user_id: "u1".into(),
            },
            Revoked::Project {
                project_id: "p1".into(),
            },
            Revoked::Grant {
                user_id: "u1".into(),
                project_id: "p1".into(),
            },
            Revoked::Domain {
                domain_id: "default".into(),
            },
        ];
        for what in cases {
            assert!(with(what.clone(), 5_000).revokes(&t), "{what:?}");
            assert!(
                !with(what.clone(), 4_999).revokes(&t),
                "{what:?} later token"
            );
        }
        let r = with(
            Revoked::Grant {
                user_id: "u1".into(),
                project_id: "p1".into(),
            },
            9_000,
        );
        assert!(!r.revokes(&claims("u2", "p1", 5_000)));
        assert!(!r.revokes(&claims("u1", "p2", 5_000)));
        assert!(!with(
            Revoked::User {
                user_id: "u2".into()
            },
            9_000
        )
        .revokes(&t));
    }

    /// Losing a role on the system ends the user's system-scoped tokens only: their project
    /// tokens stay valid.
    #[test]
    fn system_events_match_only_system_scoped_tokens() {
        let r = with(
            Revoked::System {
                user_id: "u1".into(),
            },
            9_000,
        );
        let system = Claims {
            system: true,
            project_id: None,
            project_domain_id: None,
            ..claims("u1", "p1", 5_000)
        };
        assert!(r.revokes(&system));
        assert!(!r.revokes(&claims("u1", "p1", 5_000)));
        assert!(!r.revokes(&Claims {
            user_id: "u2".into(),
            ..system.clone()
        }));
        assert!(!r.revokes(&Claims {
            iat_ms: 9_001,
            ..system
        }));
    }

    /// A token from before `iat_ms` existed is judged by its second-granularity `iat`.
    #[test]
    fn old_tokens_without_milliseconds_use_their_seconds() {
        let mut t = claims("u1", "p1", 0);
        t.iat = 7;
        let r = with(
            Revoked::User {
                user_id: "u1".into(),
            },
            7_000,
        );
        assert!(r.revokes(&t));
        t.iat = 8;
        assert!(!r.revokes(&t));
    }

    #[test]
    fn events_round_trip_and_keys_are_per_thing() {
        let ev = RevocationEvent::new(
            Revoked::Grant {
                user_id: "u".into(),
                project_id: "p".into(),
            },
            10_500,
            100,
        );
        let back: RevocationEvent =
            serde_json::from_slice(&serde_json::to_vec(&ev).unwrap()).unwrap();
        assert_eq!(back, ev);
        assert_eq!(ev.what.key(), "grant/u/p");
        assert_eq!(ev.purge_after, 10 + 100 + CLOCK_MARGIN_SECS);
    }
}
