//! Who may do what, as pure functions of the caller's token so they can be tested alone.
//!
//! The rules follow Keystone's defaults with Shoal's three roles: identity writes need
//! `admin`; anyone holding a role may read the role list; a non-admin sees only the projects
//! they hold a role on, only their own user, and only their own role assignments.
//!
//! Images follow Glance's defaults: readers read, members of the owning project write, only
//! admins publish; who sees which image is `image_record::{visible, listed}`.

use super::image_record::Caller;
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

/// The caller as image visibility rules see it.
pub fn image_caller(c: &Claims) -> Caller {
    Caller {
        admin: has_role(c, "admin"),
        project: c.project_id.clone(),
    }
}

/// Changing, uploading to or deleting an image (and managing its members): an admin, or a
/// member (not a reader) of the owning project.
pub fn can_modify_image(c: &Claims, owner: Option<&str>) -> bool {
    has_role(c, "admin")
        || (has_role(c, "member") && owner.is_some() && c.project_id.as_deref() == owner)
}

/// Creating an image needs the member role in the token's project.
pub fn can_create_image(c: &Claims) -> bool {
    has_role(c, "member") && c.project_id.is_some()
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
    fn only_owners_and_admins_change_images() {
        assert!(can_modify_image(&token("a", &["admin"]), Some("other")));
        assert!(can_modify_image(&token("m", &["member"]), Some("p")));
        assert!(!can_modify_image(&token("m", &["member"]), Some("other")));
        assert!(!can_modify_image(&token("m", &["member"]), None));
        assert!(!can_modify_image(&token("r", &["reader"]), Some("p")));
        assert!(can_create_image(&token("m", &["member"])));
        assert!(!can_create_image(&token("r", &["reader"])));
        let c = image_caller(&token("r", &["reader"]));
        assert_eq!((c.admin, c.project.as_deref()), (false, Some("p")));
    }

    #[test]
    fn role_list_needs_a_role() {
        assert!(can_list_roles(&token("r", &["reader"])));
        assert!(!can_list_roles(&token("x", &[])));
    }
}
