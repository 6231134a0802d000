//! Who may change which image, as pure functions of the caller's token. Glance's defaults:
//! readers read, members of the owning project write, only admins publish; who sees which
//! image is `glance::record::{visible, listed}`.

use shoal_identity::has_role;
use shoal_identity::token::Claims;

use crate::record::Caller;

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
}
