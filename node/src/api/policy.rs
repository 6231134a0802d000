//! Who may do what, as pure functions of the caller's token so they can be tested alone.
//!
//! The rules follow Keystone's defaults with Shoal's three roles: identity writes need
//! `admin`; anyone holding a role may read the role list; a non-admin sees only the projects
//! they hold a role on, only their own user, and only their own role assignments.

use crate::identity::has_role;
use crate::identity::token::Claims;

/// Creating, changing or deleting projects, users and role assignments.
pub fn can_write_identity(c: &Claims) -> bool {
    has_role(c, "admin")
}

/// Reading a project: admins read any; others only the projects they hold a role on.
pub fn can_read_project(c: &Claims, holds_role_on_project: bool) -> bool {
    has_role(c, "admin") || holds_role_on_project
}

/// Reading a user record: admins read any; others only themselves.
pub fn can_read_user(c: &Claims, user_id: &str) -> bool {
    has_role(c, "admin") || c.user_id == user_id
}

/// Listing role assignments: admins see all; others only their own.
pub fn can_read_assignment(c: &Claims, assignment_user_id: &str) -> bool {
    has_role(c, "admin") || c.user_id == assignment_user_id
}

/// Listing roles needs any role at all (an unscoped token carries none).
pub fn can_list_roles(c: &Claims) -> bool {
    has_role(c, "reader")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(user: &str, roles: &[&str]) -> Claims {
        Claims {
            kid: String::new(),
            jti: "j".into(),
            user_id: user.into(),
            user_name: user.into(),
            domain_id: "default".into(),
            project_id: Some("p".into()),
            project_name: Some("p".into()),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            role_ids: Vec::new(),
            project_domain_id: None,
            iat: 0,
            exp: 1,
            issuer: "n1".into(),
        }
    }

    #[test]
    fn only_admin_writes_identity() {
        assert!(can_write_identity(&token("a", &["admin"])));
        assert!(!can_write_identity(&token("m", &["member"])));
        assert!(!can_write_identity(&token("r", &["reader"])));
        assert!(!can_write_identity(&token("x", &[])));
    }

    #[test]
    fn members_read_only_their_projects() {
        assert!(can_read_project(&token("a", &["admin"]), false));
        assert!(can_read_project(&token("m", &["member"]), true));
        assert!(!can_read_project(&token("m", &["member"]), false));
        assert!(!can_read_project(&token("r", &["reader"]), false));
    }

    #[test]
    fn non_admins_read_only_themselves() {
        assert!(can_read_user(&token("a", &["admin"]), "other"));
        assert!(can_read_user(&token("m", &["member"]), "m"));
        assert!(!can_read_user(&token("m", &["member"]), "other"));
        assert!(can_read_assignment(&token("a", &["admin"]), "other"));
        assert!(can_read_assignment(&token("r", &["reader"]), "r"));
        assert!(!can_read_assignment(&token("r", &["reader"]), "other"));
    }

    #[test]
    fn role_list_needs_a_role() {
        assert!(can_list_roles(&token("r", &["reader"])));
        assert!(!can_list_roles(&token("x", &[])));
    }
}
