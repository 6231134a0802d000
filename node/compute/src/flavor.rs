//! Flavors: the sizes servers are created with, their extra specs and which projects may use a
//! non-public one, as Nova keeps them.
//!
//! Owns the `flavors` table (key: flavor id) and its name index `flavor_names` (key: name,
//! value: id), written in one transaction so two nodes cannot create one name at once. What a
//! create body may hold, how a listing is filtered and paged, and which extra specs are valid
//! are pure functions here; [`Flavors`] reads and writes the rows.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shoal_state::{retry, tables, Expect, State, Table, Txn, Versioned, DEFAULT_ATTEMPTS};

use crate::error::ComputeError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flavor {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub ram: u64,
    pub disk: u64,
    pub ephemeral: u64,
    pub swap: u64,
    pub rxtx_factor: f64,
    pub is_public: bool,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub extra_specs: BTreeMap<String, String>,
    /// Projects given access to a non-public flavor (`addTenantAccess`).
    #[serde(default)]
    pub projects: Vec<String>,
}

impl Flavor {
    /// Whether a caller sees the flavor: public flavors everyone, others admins and the
    /// projects given access.
    pub fn visible_to(&self, admin: bool, project: Option<&str>) -> bool {
        self.is_public || admin || project.is_some_and(|p| self.projects.iter().any(|x| x == p))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlavorCreateBody {
    pub flavor: FlavorCreate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlavorCreate {
    name: String,
    /// A string, a number (stored as its decimal form) or null, as Nova's `flavor_id`.
    #[serde(default)]
    id: Value,
    ram: Value,
    vcpus: Value,
    disk: Value,
    #[serde(rename = "OS-FLV-EXT-DATA:ephemeral", default)]
    ephemeral: Value,
    #[serde(default)]
    swap: Value,
    #[serde(default)]
    rxtx_factor: Value,
    #[serde(rename = "os-flavor-access:is_public", default)]
    is_public: Value,
}

/// Nova's `flavor_param_positive`/`_non_negative`: an integer, or a string of digits.
fn count(field: &str, v: &Value, min: u64, default: Option<u64>) -> Result<u64, String> {
    use shoal_state::validate::{int, MAX_INT};
    let n = match v {
        Value::Null if default.is_some() => default,
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok().or(Some(u64::MAX))
        }
        _ => None,
    }
    .ok_or_else(|| format!("{field} must be an integer from {min} to {MAX_INT}, not {v}"))?;
    int(field, n, min, MAX_INT)?;
    Ok(n)
}

/// Nova's `parameter_types.boolean`: JSON booleans and the usual spellings of one.
pub fn boolean(field: &str, v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" | "y" | "t" => Ok(true),
            "false" | "0" | "no" | "off" | "n" | "f" => Ok(false),
            _ => Err(format!("{field} must be a boolean, not {v}")),
        },
        _ => Err(format!("{field} must be a boolean, not {v}")),
    }
}

impl FlavorCreate {
    /// The flavor this body asks for, or what is wrong with it (naming the field).
    pub fn validate(self) -> Result<Flavor, String> {
        use shoal_state::validate::text;
        let name = self.name;
        text("name", &name, 255, false)?;
        if name.contains('/') {
            return Err("flavor name may not contain '/'".into());
        }
        let vcpus = count("vcpus", &self.vcpus, 1, None)?;
        let ram = count("ram", &self.ram, 1, None)?;
        let disk = count("disk", &self.disk, 0, None)?;
        let ephemeral = count("OS-FLV-EXT-DATA:ephemeral", &self.ephemeral, 0, Some(0))?;
        let swap = match &self.swap {
            // Nova stores an empty string as no swap.
            Value::String(s) if s.is_empty() => 0,
            v => count("swap", v, 0, Some(0))?,
        };
        let id = match &self.id {
            Value::Null => None,
            Value::String(s) if s == "auto" => None,
            Value::String(s) => Some(s.clone()),
            Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
            v => return Err(format!("flavor id must be a string or an integer, not {v}")),
        };
        let id = match id {
            None => uuid::Uuid::new_v4().to_string(),
            Some(id) => {
                text("id", &id, 255, false)?;
                let ok = id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c));
                if !ok || id.trim() != id {
                    return Err(format!(
                        "flavor id {id:?} may hold only letters, digits, '-', '_', '.' and inner spaces"
                    ));
                }
                id
            }
        };
        let rxtx_factor = match &self.rxtx_factor {
            Value::Null => Some(1.0),
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.parse::<f64>().ok(),
            _ => None,
        }
        .filter(|r| *r > 0.0 && *r <= f64::from(f32::MAX))
        .ok_or_else(|| {
            format!(
                "rxtx_factor must be a number above 0 and at most {}, not {}",
                f32::MAX,
                self.rxtx_factor
            )
        })?;
        let is_public = match &self.is_public {
            Value::Null => true,
            v => boolean("os-flavor-access:is_public", v)?,
        };
        Ok(Flavor {
            id,
            name,
            vcpus: u32::try_from(vcpus).map_err(|_| "vcpus is too large".to_owned())?,
            ram,
            disk,
            ephemeral,
            swap,
            rxtx_factor,
            is_public,
            description: None,
            extra_specs: BTreeMap::new(),
            projects: Vec::new(),
        })
    }
}

/// The flavors a listing shows, as Nova's `GET /flavors[/detail]` picks them: `is_public`
/// (admins: `true` by default, `false`, or `none` for all; others always see public flavors
/// and those their project was given), `minRam`, `minDisk`, `sort_key`/`sort_dir` (default
/// `flavorid` ascending), then `marker` (a flavor id) and `limit`. The second value is
/// whether `limit` cut the list.
pub fn select(
    mut flavors: Vec<Flavor>,
    admin: bool,
    project: Option<&str>,
    q: &HashMap<String, String>,
) -> Result<(Vec<Flavor>, bool), String> {
    let is_public = match q.get("is_public").map(|v| v.to_ascii_lowercase()) {
        _ if !admin => Some(true),
        None => Some(true),
        Some(v) if v == "none" => None,
        Some(v) => Some(boolean("is_public", &Value::String(v))?),
    };
    let min = |key: &str| -> Result<u64, String> {
        q.get(key).map_or(Ok(0), |v| {
            v.parse()
                .map_err(|_| format!("{key} must be a non-negative integer, not {v:?}"))
        })
    };
    let (min_ram, min_disk) = (min("minRam")?, min("minDisk")?);
    flavors.retain(|f| {
        let shown = match is_public {
            None => true,
            Some(true) => f.is_public || project.is_some_and(|p| f.projects.iter().any(|x| x == p)),
            Some(false) => !f.is_public,
        };
        shown && f.ram >= min_ram && f.disk >= min_disk
    });
    let key = q.get("sort_key").map_or("flavorid", String::as_str);
    let by: fn(&Flavor, &Flavor) -> std::cmp::Ordering = match key {
        "flavorid" | "id" => |a, b| a.id.cmp(&b.id),
        "name" => |a, b| a.name.cmp(&b.name),
        "memory_mb" => |a, b| a.ram.cmp(&b.ram),
        "root_gb" => |a, b| a.disk.cmp(&b.disk),
        "ephemeral_gb" => |a, b| a.ephemeral.cmp(&b.ephemeral),
        "swap" => |a, b| a.swap.cmp(&b.swap),
        "vcpus" => |a, b| a.vcpus.cmp(&b.vcpus),
        "rxtx_factor" => |a, b| a.rxtx_factor.total_cmp(&b.rxtx_factor),
        "is_public" => |a, b| a.is_public.cmp(&b.is_public),
        other => {
            return Err(format!(
                "sort_key {other:?} is not one of flavorid, id, name, memory_mb, root_gb, ephemeral_gb, swap, vcpus, rxtx_factor, is_public"
            ))
        }
    };
    // Ties (and every key but flavorid) fall back to the flavor id, so pages are stable.
    flavors.sort_by(|a, b| by(a, b).then_with(|| a.id.cmp(&b.id)));
    match q.get("sort_dir").map(String::as_str) {
        None | Some("asc") => {}
        Some("desc") => flavors.reverse(),
        Some(other) => return Err(format!("sort_dir must be asc or desc, not {other:?}")),
    }
    if let Some(marker) = q.get("marker") {
        let at = flavors
            .iter()
            .position(|f| f.id == *marker)
            .ok_or_else(|| format!("marker [{marker}] not found"))?;
        flavors.drain(..=at);
    }
    let mut cut = false;
    if let Some(limit) = q.get("limit") {
        let limit: usize = limit
            .parse()
            .map_err(|_| format!("limit must be a non-negative integer, not {limit:?}"))?;
        cut = flavors.len() > limit || (limit > 0 && flavors.len() == limit);
        flavors.truncate(limit);
    }
    Ok((flavors, cut))
}

/// An extra spec key and value as Nova's schema allows them.
pub fn check_spec(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 255
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:. ".contains(c));
    if !key_ok {
        return Err(format!(
            "extra spec key {key:?} must be 1 to 255 characters of letters, digits, '-', '_', ':', '.' or space"
        ));
    }
    shoal_state::validate::text(&format!("extra spec {key}"), value, 255, true)
}

/// An extra spec value: Nova's schema takes a string, a number or a boolean and stores its
/// text.
pub fn spec_value(key: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(if *b { "True" } else { "False" }.to_owned()),
        other => Err(format!(
            "extra spec {key} must be a string, a number or a boolean, not {other}"
        )),
    }
}

/// The flavor rows.
#[derive(Debug, Clone)]
pub struct Flavors {
    state: State,
    table: Table<Flavor>,
}

impl Flavors {
    pub fn new(state: &State) -> Self {
        Self {
            state: state.clone(),
            table: state.table(tables::FLAVORS),
        }
    }

    /// Every flavor, read after a barrier so a flavor made through another node is listed.
    pub async fn all(&self) -> Result<Vec<Flavor>, ComputeError> {
        self.state.read_barrier().await?;
        Ok(self.table.list("").await?.into_values().collect())
    }

    /// The flavor and the revision it was read at, after a read barrier.
    pub async fn get(&self, id: &str) -> Result<Versioned<Flavor>, ComputeError> {
        self.state.read_barrier().await?;
        self.table
            .get(id)
            .await?
            .ok_or_else(|| ComputeError::NotFound(format!("flavor {id} could not be found")))
    }

    /// The flavor, if a caller who is `admin` or of `project` may see it; to anyone else a
    /// non-public flavor does not exist, as Nova answers.
    pub async fn visible(
        &self,
        id: &str,
        admin: bool,
        project: Option<&str>,
    ) -> Result<Flavor, ComputeError> {
        self.state.read_barrier().await?;
        self.visible_local(id, admin, project).await
    }

    /// [`Self::visible`] from the local replica, without a read barrier of its own: for a
    /// caller that passed one after its request arrived (a server create shares the one its
    /// quota read passed), so the read still sees every flavor acknowledged before.
    pub async fn visible_local(
        &self,
        id: &str,
        admin: bool,
        project: Option<&str>,
    ) -> Result<Flavor, ComputeError> {
        let f = self
            .table
            .get(id)
            .await?
            .ok_or_else(|| ComputeError::NotFound(format!("flavor {id} could not be found")))?
            .value;
        if f.visible_to(admin, project) {
            Ok(f)
        } else {
            Err(ComputeError::NotFound(format!(
                "flavor {id} could not be found"
            )))
        }
    }

    /// Creates `flavor`; its id and its name must both be new.
    pub async fn create(&self, flavor: &Flavor) -> Result<(), ComputeError> {
        let txn = Txn::new()
            .when(tables::FLAVORS, &flavor.id, Expect::Absent)
            .when(tables::FLAVOR_NAMES, &flavor.name, Expect::Absent)
            .put(tables::FLAVORS, &flavor.id, self.table.encode(flavor))
            .put(
                tables::FLAVOR_NAMES,
                &flavor.name,
                flavor.id.as_bytes().to_vec(),
            );
        let resp = self.state.write(tables::FLAVORS, txn).await?;
        if resp.succeeded {
            return Ok(());
        }
        Err(ComputeError::Conflict(
            if resp.failed_precondition == Some(0) {
                format!("flavor with id {} already exists", flavor.id)
            } else {
                format!("flavor with name {} already exists", flavor.name)
            },
        ))
    }

    /// Deletes the flavor and its name.
    pub async fn delete(&self, id: &str) -> Result<(), ComputeError> {
        let Versioned { value, revision } = self.get(id).await?;
        let txn = Txn::new()
            .when(tables::FLAVORS, id, Expect::Revision(revision))
            .delete(tables::FLAVORS, id)
            .delete(tables::FLAVOR_NAMES, &value.name);
        if self.state.write(tables::FLAVORS, txn).await?.succeeded {
            Ok(())
        } else {
            Err(ComputeError::Conflict(format!(
                "flavor {id} changed while deleting; retry"
            )))
        }
    }

    /// Applies `change` to the flavor with a compare-and-set on its revision, retried on a
    /// concurrent change; answers the flavor as written.
    pub async fn modify(
        &self,
        id: &str,
        change: impl Fn(&mut Flavor) -> Result<(), ComputeError>,
    ) -> Result<Flavor, ComputeError> {
        retry(tables::FLAVORS, id, DEFAULT_ATTEMPTS, || async {
            let Versioned {
                mut value,
                revision,
            } = self.get(id).await?;
            change(&mut value)?;
            let written = self.table.put_at(id, &value, revision).await?;
            Ok(written.map(|_| value))
        })
        .await
    }

    /// Gives (`add`) or takes back project `project`'s access to a flavor. From microversion
    /// 2.7 Nova refuses to add access to a public flavor (`refuse_public`, a 409); below it the
    /// project is listed although a public flavor is open to all anyway.
    pub async fn set_access(
        &self,
        id: &str,
        project: &str,
        add: bool,
        refuse_public: bool,
    ) -> Result<Flavor, ComputeError> {
        self.modify(id, |f| {
            if add && refuse_public && f.is_public {
                return Err(ComputeError::Conflict(
                    "Can not add access to a public flavor.".into(),
                ));
            }
            match (add, f.projects.iter().position(|p| p == project)) {
                (true, Some(_)) => Err(ComputeError::Conflict(format!(
                    "flavor {id} already has access for project {project}"
                ))),
                (false, None) => Err(ComputeError::NotFound(format!(
                    "flavor {id} has no access for project {project}"
                ))),
                (true, None) => {
                    f.projects.push(project.to_owned());
                    Ok(())
                }
                (false, Some(i)) => {
                    f.projects.remove(i);
                    Ok(())
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn create(body: &str) -> Result<Flavor, String> {
        let b: FlavorCreateBody = serde_json::from_str(body).map_err(|e| e.to_string())?;
        b.flavor.validate()
    }

    #[test]
    fn flavor_bodies_are_checked() {
        let f =
            create(r#"{"flavor":{"name":"m1","ram":512,"vcpus":1,"disk":1,"id":null}}"#).unwrap();
        assert_eq!((f.name.as_str(), f.ram, f.is_public), ("m1", 512, true));
        assert_eq!(f.id.len(), 36);
        let err = create(r#"{"flavor":{"name":"m1","ram":512,"vcpus":1,"disk":1,"color":"red"}}"#)
            .unwrap_err();
        assert!(err.contains("unknown field `color`"), "{err}");
        assert!(create(r#"{"flavor":{"name":"m1","ram":512,"vcpus":0,"disk":1}}"#).is_err());
        assert!(create(r#"{"flavor":{"name":"","ram":512,"vcpus":1,"disk":1}}"#).is_err());
        // Nova's loose types: numeric ids, digit strings, boolean spellings.
        let f = create(
            r#"{"flavor":{"name":"m2","ram":"1024","vcpus":"2","disk":"10","id":453182950,
                "os-flavor-access:is_public":"False","rxtx_factor":"1.5","swap":""}}"#,
        )
        .unwrap();
        assert_eq!(f.id, "453182950");
        assert_eq!((f.ram, f.vcpus, f.disk, f.swap), (1024, 2, 10, 0));
        assert!(!f.is_public);
        assert_eq!(f.rxtx_factor, 1.5);
        for bad in [
            r#""ram":"-1","vcpus":1,"disk":1"#,
            r#""ram":"1e3","vcpus":1,"disk":1"#,
            r#""ram":1.5,"vcpus":1,"disk":1"#,
            r#""ram":1,"vcpus":1,"disk":1,"os-flavor-access:is_public":"maybe""#,
            r#""ram":1,"vcpus":1,"disk":1,"id":" padded""#,
            r#""ram":1,"vcpus":1,"disk":1,"id":{"a":1}"#,
            r#""ram":1,"vcpus":1,"disk":1,"rxtx_factor":0"#,
        ] {
            let body = format!(r#"{{"flavor":{{"name":"x",{bad}}}}}"#);
            assert!(create(&body).is_err(), "{body}");
        }
    }

    #[test]
    fn extra_spec_values_may_be_numbers_and_booleans() {
        assert_eq!(spec_value("k", &json!("x")).unwrap(), "x");
        assert_eq!(spec_value("k", &json!(2)).unwrap(), "2");
        assert_eq!(spec_value("k", &json!(true)).unwrap(), "True");
        assert!(spec_value("k", &json!({"a": 1})).is_err());
        assert!(spec_value("k", &json!(null)).is_err());
    }

    #[test]
    fn extra_spec_keys() {
        assert!(check_spec("hw:cpu_policy", "dedicated").is_ok());
        assert!(check_spec("bad/key", "x").is_err());
        assert!(check_spec("", "x").is_err());
    }

    fn flavor(id: &str, ram: u64, public: bool, projects: &[&str]) -> Flavor {
        Flavor {
            id: id.into(),
            name: format!("f{id}"),
            vcpus: 1,
            ram,
            disk: 1,
            ephemeral: 0,
            swap: 0,
            rxtx_factor: 1.0,
            is_public: public,
            description: None,
            extra_specs: BTreeMap::new(),
            projects: projects.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    #[test]
    fn listings_filter_sort_and_page() {
        let all = vec![
            flavor("3", 2048, true, &[]),
            flavor("1", 512, true, &[]),
            flavor("2", 1024, false, &["p"]),
            flavor("4", 4096, false, &[]),
        ];
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        let ids = |(fs, _): (Vec<Flavor>, bool)| fs.into_iter().map(|f| f.id).collect::<Vec<_>>();
        // A member sees public flavors and those given to its project, whatever it asks.
        let shown = select(all.clone(), false, Some("p"), &q(&[("is_public", "none")])).unwrap();
        assert_eq!(ids(shown), ["1", "2", "3"]);
        // An admin asks for all, filters by RAM, sorts and pages.
        let shown = select(
            all.clone(),
            true,
            None,
            &q(&[("is_public", "none"), ("minRam", "1024")]),
        );
        assert_eq!(ids(shown.unwrap()), ["2", "3", "4"]);
        let (page, cut) = select(
            all.clone(),
            true,
            None,
            &q(&[("sort_dir", "desc"), ("limit", "1")]),
        )
        .unwrap();
        assert_eq!((page[0].id.as_str(), cut), ("3", true));
        let after = select(all.clone(), true, None, &q(&[("marker", "1")])).unwrap();
        assert_eq!(ids(after), ["3"]);
        assert!(select(all.clone(), true, None, &q(&[("sort_key", "color")])).is_err());
        assert!(select(all, true, None, &q(&[("marker", "nope")])).is_err());
    }

    #[tokio::test]
    async fn names_are_unique_and_access_lists_change_under_compare_and_set() {
        let state = State::in_memory();
        let flavors = Flavors::new(&state);
        flavors.create(&flavor("1", 512, false, &[])).await.unwrap();
        let mut twin = flavor("9", 512, false, &[]);
        twin.name = "f1".into();
        assert!(
            matches!(flavors.create(&twin).await, Err(ComputeError::Conflict(m)) if m.contains("name"))
        );
        assert!(matches!(
            flavors.create(&flavor("1", 1, true, &[])).await,
            Err(ComputeError::Conflict(m)) if m.contains("id")
        ));
        let f = flavors.set_access("1", "p", true, true).await.unwrap();
        assert_eq!(f.projects, ["p"]);
        assert!(flavors.set_access("1", "p", true, true).await.is_err());
        assert!(flavors.visible("1", false, Some("p")).await.is_ok());
        assert!(matches!(
            flavors.visible("1", false, Some("q")).await,
            Err(ComputeError::NotFound(_))
        ));
        flavors.delete("1").await.unwrap();
        assert!(matches!(
            flavors.get("1").await,
            Err(ComputeError::NotFound(_))
        ));
        // The name is free again.
        flavors.create(&twin).await.unwrap();
    }
}
