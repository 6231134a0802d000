//! Who may read and change identity records, as pure functions of the caller's token so they
//! can be tested alone. The rules follow Keystone's defaults with Shoal's three roles: identity
//! writes need `admin`; a reader on the system (a system-scoped token) reads every identity
//! record; anyone holding a role may read the role list; anyone else sees only the projects
//! they hold a role on (one by one, or through `/v3/auth/projects` and
//! `/v3/users/{self}/projects`), only their own user, and only their own role assignments.

use crate::has_role;
use crate::token::Claims;

/// Creating, changing or deleting projects, users and role assignments.
pub fn can_write_identity(c: &Claims) -> bool {
    has_role(c, "admin")
}

/// Reading every identity record (projects, users, domains, assignments): an admin, or a
/// reader on the system.
pub fn can_read_identity(c: &Claims) -> bool {
    has_role(c, "admin") || (c.system && has_role(c, "reader"))
}

/// Reading a project: those who read identity read any; others only the projects they hold a
/// role on.
pub fn can_read_project(c: &Claims, holds_role_on_project: bool) -> bool {
    can_read_identity(c) || holds_role_on_project
}

/// Reading a user record (and the projects a user holds roles on): those who read identity
/// read any; others only themselves.
pub fn can_read_user(c: &Claims, user_id: &str) -> bool {
    can_read_identity(c) || c.user_id == user_id
}

/// Listing role assignments: those who read identity see all; others only their own.
pub fn can_read_assignment(c: &Claims, assignment_user_id: &str) -> bool {
    can_read_identity(c) || c.user_id == assignment_user_id
}

/// Listing roles needs any role at all (an unscoped token carries none).
pub fn can_list_roles(c: &Claims) -> bool {
    has_role(c, "reader")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(user: &str, roles: &[&str]) -> Claims {
        Claims::for_test(user, roles)
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
    fn system_readers_read_identity_but_do_not_write_it() {
        let system_reader = Claims {
            system: true,
            project_id: None,
            ..token("s", &["reader"])
        };
        assert!(can_read_identity(&system_reader));
        assert!(can_read_project(&system_reader, false));
        assert!(can_read_user(&system_reader, "other"));
        assert!(can_read_assignment(&system_reader, "other"));
        assert!(!can_write_identity(&system_reader));
        // A reader on a project is not a reader on the system.
        assert!(!can_read_identity(&token("r", &["reader"])));
        assert!(can_read_identity(&token("a", &["admin"])));
    }

    #[test]
    fn role_list_needs_a_role() {
        assert!(can_list_roles(&token("r", &["reader"])));
        assert!(!can_list_roles(&token("x", &[])));
    }
}
