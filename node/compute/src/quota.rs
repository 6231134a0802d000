//! Nova's quotas: the defaults, the `default` quota class that changes them for every project,
//! and a project's own overrides.
//!
//! Owns the `quotas` table (key: project id; value: the overrides) and `quota_classes` (key:
//! class name; only `default` has an effect, as in Nova). Counting what a project holds against
//! a quota, race-free, is `shoal_state::quota`.

use std::collections::BTreeMap;

use serde_json::Value;
use shoal_state::{tables, State, Table};

use crate::error::ComputeError;

/// Nova's default quotas, in the order `quota show` prints them. (`networks` was
/// nova-network's; Nova accepts it in an update at 2.1 and shows it nowhere.)
pub const DEFAULT_QUOTAS: [(&str, i64); 14] = [
    ("cores", 20),
    ("fixed_ips", -1),
    ("floating_ips", 10),
    ("injected_file_content_bytes", 10240),
    ("injected_file_path_bytes", 255),
    ("injected_files", 5),
    ("instances", 10),
    ("key_pairs", 100),
    ("metadata_items", 128),
    ("ram", 51200),
    ("security_group_rules", 20),
    ("security_groups", 10),
    ("server_group_members", 10),
    ("server_groups", 10),
];

/// The quota rows.
#[derive(Debug, Clone)]
pub struct Quotas {
    state: State,
    projects: Table<BTreeMap<String, i64>>,
    classes: Table<BTreeMap<String, i64>>,
}

/// `base` with every known quota in `overrides` applied (rows written before `networks` left
/// may still carry it: unknown names are ignored).
fn apply(base: &mut BTreeMap<String, i64>, overrides: BTreeMap<String, i64>) {
    for (k, v) in overrides {
        if let Some(slot) = base.get_mut(&k) {
            *slot = v;
        }
    }
}

impl Quotas {
    pub fn new(state: &State) -> Self {
        Self {
            state: state.clone(),
            projects: state.table(tables::QUOTAS),
            classes: state.table(tables::QUOTA_CLASSES),
        }
    }

    /// Nova's defaults with the `default` quota class's changes applied.
    pub async fn class_defaults(&self) -> Result<BTreeMap<String, i64>, ComputeError> {
        let mut q: BTreeMap<String, i64> = DEFAULT_QUOTAS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        if let Some(class) = self.classes.get("default").await? {
            apply(&mut q, class.value);
        }
        Ok(q)
    }

    /// The project's quotas, after a read barrier: the class defaults with the project's
    /// overrides applied.
    pub async fn of(&self, project: &str) -> Result<BTreeMap<String, i64>, ComputeError> {
        self.state.read_barrier().await?;
        let mut q = self.class_defaults().await?;
        if let Some(overrides) = self.projects.get(project).await? {
            apply(&mut q, overrides.value);
        }
        Ok(q)
    }

    /// One quota of the project, `-1` meaning unlimited.
    pub async fn limit(&self, project: &str, name: &str) -> Result<i64, ComputeError> {
        Ok(self.of(project).await?.get(name).copied().unwrap_or(-1))
    }

    /// Merges `update` into the `default` class (every project's defaults).
    pub async fn update_defaults(
        &self,
        update: &BTreeMap<String, i64>,
    ) -> Result<(), ComputeError> {
        self.classes
            .upsert("default", BTreeMap::new, |stored| {
                stored.extend(update.clone());
                Ok::<_, ComputeError>(())
            })
            .await
            .map(|_| ())
    }

    /// Merges `update` into the project's overrides.
    pub async fn update_project(
        &self,
        project: &str,
        update: &BTreeMap<String, i64>,
    ) -> Result<(), ComputeError> {
        self.projects
            .upsert(project, BTreeMap::new, |stored| {
                stored.extend(update.clone());
                Ok::<_, ComputeError>(())
            })
            .await
            .map(|_| ())
    }

    /// Drops the project's overrides: it takes the defaults again.
    pub async fn revert_project(&self, project: &str) -> Result<(), ComputeError> {
        self.projects.delete(project).await?;
        Ok(())
    }
}

/// Checks a body `{NAME: {quota: value, ...}}` (`quota_set` or `quota_class_set`).
pub fn parse_update(body: Value, name: &str) -> Result<BTreeMap<String, i64>, String> {
    let mut b = match body {
        Value::Object(b) => b,
        _ => return Err("the body must be a JSON object".into()),
    };
    let set = match b.remove(name) {
        Some(Value::Object(set)) if b.is_empty() => set,
        _ => {
            return Err(format!(
                "the body must be {{\"{name}\": {{...}}}} and nothing else"
            ))
        }
    };
    let mut out = BTreeMap::new();
    for (k, v) in set {
        if k == "force" {
            if !v.is_boolean() {
                return Err("force must be a boolean".into());
            }
            continue;
        }
        if k == "networks" {
            continue;
        }
        if !DEFAULT_QUOTAS.iter().any(|(name, _)| *name == k) {
            let known: Vec<&str> = DEFAULT_QUOTAS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "additional properties are not allowed ({k} was unexpected); quotas are: {}",
                known.join(", ")
            ));
        }
        let n = match &v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .filter(|n| (-1..=shoal_state::validate::MAX_INT as i64).contains(n))
        .ok_or_else(|| {
            format!(
                "{k} must be an integer from -1 (unlimited) to {}, not {v}",
                shoal_state::validate::MAX_INT
            )
        })?;
        out.insert(k, n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn projects_take_the_class_defaults_and_their_own_overrides() {
        let quotas = Quotas::new(&State::in_memory());
        assert_eq!(quotas.limit("p", "instances").await.unwrap(), 10);
        quotas
            .update_defaults(&BTreeMap::from([("instances".to_owned(), 20)]))
            .await
            .unwrap();
        quotas
            .update_project(
                "p",
                &BTreeMap::from([("cores".to_owned(), 4), ("networks".to_owned(), 1)]),
            )
            .await
            .unwrap();
        let p = quotas.of("p").await.unwrap();
        assert_eq!((p["instances"], p["cores"]), (20, 4));
        assert!(!p.contains_key("networks"));
        assert_eq!(quotas.limit("q", "cores").await.unwrap(), 20);
        assert_eq!(quotas.limit("p", "no-such-quota").await.unwrap(), -1);
        quotas.revert_project("p").await.unwrap();
        assert_eq!(quotas.limit("p", "cores").await.unwrap(), 20);
    }

    #[test]
    fn updates_take_known_quotas_as_integers() {
        let ok = parse_update(
            serde_json::json!({"quota_set": {"cores": "4", "ram": -1, "force": true, "networks": 3}}),
            "quota_set",
        )
        .unwrap();
        assert_eq!(
            ok,
            BTreeMap::from([("cores".to_owned(), 4), ("ram".to_owned(), -1)])
        );
        let err = parse_update(serde_json::json!({"quota_set": {"gpus": 1}}), "quota_set");
        assert!(err.unwrap_err().contains("gpus was unexpected"));
        for bad in [
            serde_json::json!({"quota_set": {"cores": -2}}),
            serde_json::json!({"quota_set": {"cores": 1.5}}),
            serde_json::json!({"quota_set": {}, "extra": 1}),
            serde_json::json!([]),
        ] {
            assert!(parse_update(bad.clone(), "quota_set").is_err(), "{bad}");
        }
    }
}
