//! Bounds every API checks the same way: Nova's integer ceiling and the rules for names,
//! keys and values (no control characters, no surrounding spaces, a length limit). Each
//! function says in its error which field is wrong and what is allowed.

/// Nova's `db.MAX_INT`: the largest count, size or quota value its schemas accept.
pub const MAX_INT: u64 = 2_147_483_647;

/// A name, key or value: 1 to `max` characters (or 0 to `max` when `may_be_empty`), no control
/// characters, no leading or trailing whitespace.
pub fn text(field: &str, value: &str, max: usize, may_be_empty: bool) -> Result<(), String> {
    let len = value.chars().count();
    if (len == 0 && !may_be_empty) || len > max {
        let min = if may_be_empty { 0 } else { 1 };
        return Err(format!(
            "{field} must be {min} to {max} characters, not {len}"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} may not contain control characters"));
    }
    if value.trim() != value {
        return Err(format!("{field} may not begin or end with whitespace"));
    }
    Ok(())
}

/// An integer in `min..=max`.
pub fn int(field: &str, value: u64, min: u64, max: u64) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!(
            "{field} must be between {min} and {max}, not {value}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_control_characters_spaces_and_length() {
        assert!(text("name", "m1.small", 255, false).is_ok());
        assert!(text("name", "", 255, false)
            .unwrap_err()
            .contains("1 to 255"));
        assert!(text("name", "", 255, true).is_ok());
        assert!(text("name", "a\0b", 255, false)
            .unwrap_err()
            .contains("control"));
        assert!(text("name", "a\nb", 255, false)
            .unwrap_err()
            .contains("control"));
        assert!(text("name", " a", 255, false)
            .unwrap_err()
            .contains("whitespace"));
        assert!(text("name", &"x".repeat(256), 255, false).is_err());
        assert!(text("name", &"é".repeat(255), 255, false).is_ok());
    }

    #[test]
    fn integers_name_their_bounds() {
        assert!(int("ram", 512, 1, MAX_INT).is_ok());
        let e = int("ram", 1 << 63, 1, MAX_INT).unwrap_err();
        assert!(e.contains("ram") && e.contains("2147483647"), "{e}");
        assert!(int("vcpus", 0, 1, MAX_INT).is_err());
    }
}
