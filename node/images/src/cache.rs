//! The base-image cache: whole, verified images under `<data-dir>/images/cache/<image id>`, as
//! qcow2 overlays will use them as backing files.
//!
//! A file there is complete by construction: the streamer writes `.<id>.<random>.part` and
//! renames it only after the whole-image hash matched. Last use is the file's mtime (set on every
//! pull and lease), so it survives restarts. Like Nova's image cache manager, eviction removes
//! least recently used images while the cache is over its byte budget, never one used more
//! recently than the minimum age, and never one in use: a [`CacheLease`] is held by whoever has
//! the file open (the compute agent, for each instance whose disk backs onto it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// One cached image as the eviction policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub size: u64,
    pub last_used: SystemTime,
    /// Leased or being pulled: never evicted.
    pub busy: bool,
}

/// The images to evict, oldest use first, so that the rest fit in `budget` bytes. Images used
/// within `min_age` of `now` and busy images stay even if the budget is then still exceeded.
pub fn plan_eviction(
    entries: &[Entry],
    budget: u64,
    min_age: Duration,
    now: SystemTime,
) -> Vec<String> {
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut by_age: Vec<&Entry> = entries.iter().collect();
    by_age.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.id.cmp(&b.id)));
    let mut out = Vec::new();
    for e in by_age {
        if total <= budget {
            break;
        }
        let old_enough = now
            .duration_since(e.last_used)
            .is_ok_and(|age| age >= min_age);
        if e.busy || !old_enough {
            continue;
        }
        total -= e.size;
        out.push(e.id.clone());
    }
    out
}

/// The cache directory and who is using what in it.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    leases: Arc<Mutex<HashMap<String, usize>>>,
}

/// Keeps a cached image from eviction while held.
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct CacheLease {
    id: String,
    leases: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for CacheLease {
    fn drop(&mut self) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = leases.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                leases.remove(&self.id);
            }
        }
    }
}

impl Cache {
    pub fn new(dir: PathBuf) -> Cache {
        Cache {
            dir,
            leases: Arc::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// A temporary name in the cache directory for a pull of `id` in progress.
    pub fn part_path(&self, id: &str) -> PathBuf {
        self.dir
            .join(format!(".{id}.{:016x}.part", rand::random::<u64>()))
    }

    /// Takes a lease on image `id` (whether or not it is cached yet).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn lease(&self, id: &str) -> CacheLease {
        *self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default() += 1;
        CacheLease {
            id: id.to_owned(),
            leases: self.leases.clone(),
        }
    }

    /// Records a use of `id` now (its file's mtime).
    pub fn touch(&self, id: &str) {
        let path = self.path(id);
        if let Ok(f) = std::fs::File::options().write(true).open(&path) {
            if let Err(e) = f.set_modified(SystemTime::now()) {
                tracing::debug!(path = %path.display(), error = %e, "cannot record cache use");
            }
        }
    }

    /// Removes leftovers of pulls that a crash interrupted.
    pub fn clear_parts(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".part") {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// The complete cached images, with `busy` set for leased ones and those in `pulling`.
    pub fn entries(&self, pulling: &[String]) -> std::io::Result<Vec<Entry>> {
        let leases = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue;
            }
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            out.push(Entry {
                busy: leases.contains_key(&id) || pulling.contains(&id),
                size: meta.len(),
                last_used: meta.modified()?,
                id,
            });
        }
        Ok(out)
    }

    /// One aging pass, as Nova's image cache manager: an image in `keep` (the compute agent's
    /// instances use it), leased or being pulled gets `now` as its last use; any other image
    /// unused for at least `min_age` is removed, whatever the budget. Returns the images removed.
    pub fn age_unused(
        &self,
        keep: &std::collections::BTreeSet<String>,
        min_age: Duration,
        pulling: &[String],
        now: SystemTime,
    ) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for e in self.entries(pulling)? {
            if e.busy || keep.contains(&e.id) {
                let f = std::fs::File::options()
                    .write(true)
                    .open(self.path(&e.id))?;
                f.set_modified(now)?;
                continue;
            }
            if now.duration_since(e.last_used).unwrap_or_default() < min_age {
                continue;
            }
            let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            // A lease taken since `entries` was read wins; holding the lock keeps a new one
            // from being taken while the file goes.
            if leases.contains_key(&e.id) {
                continue;
            }
            tracing::info!(image = %e.id, "removing a base image unused for the minimum age");
            std::fs::remove_file(self.path(&e.id))?;
            drop(leases);
            removed.push(e.id);
        }
        Ok(removed)
    }

    /// One eviction pass; returns the images removed.
    pub fn evict(
        &self,
        budget: u64,
        min_age: Duration,
        pulling: &[String],
    ) -> std::io::Result<Vec<String>> {
        let entries = self.entries(pulling)?;
        let victims = plan_eviction(&entries, budget, min_age, SystemTime::now());
        for id in &victims {
            // A lease taken since `entries` was read wins.
            if self
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
            {
                continue;
            }
            tracing::info!(image = %id, "evicting cached base image");
            std::fs::remove_file(self.path(id))?;
        }
        Ok(victims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn e(id: &str, size: u64, used: u64, busy: bool) -> Entry {
        Entry {
            id: id.into(),
            size,
            last_used: at(used),
            busy,
        }
    }

    /// Under budget nothing goes; over budget the least recently used go first, only as many as
    /// needed.
    #[test]
    fn evicts_least_recently_used_until_under_budget() {
        let entries = [
            e("new", 10, 900, false),
            e("old", 10, 100, false),
            e("mid", 10, 500, false),
        ];
        assert!(plan_eviction(&entries, 30, MIN, at(1000)).is_empty());
        assert_eq!(plan_eviction(&entries, 25, MIN, at(1000)), ["old"]);
        assert_eq!(plan_eviction(&entries, 10, MIN, at(1000)), ["old", "mid"]);
        assert_eq!(
            plan_eviction(&entries, 0, MIN, at(1000)),
            ["old", "mid", "new"]
        );
    }

    /// A busy image and one used within the minimum age stay, even over budget; the next oldest
    /// goes instead.
    #[test]
    fn busy_and_young_images_stay() {
        let entries = [
            e("leased", 10, 100, true),
            e("young", 10, 990, false),
            e("old", 10, 200, false),
        ];
        assert_eq!(plan_eviction(&entries, 10, MIN, at(1000)), ["old"]);
        assert_eq!(plan_eviction(&entries, 0, MIN, at(1000)), ["old"]);
        // A clock that went backwards makes every image young.
        assert!(plan_eviction(&entries, 0, MIN, at(0)).is_empty());
    }

    #[test]
    fn unused_images_age_out_and_kept_ones_are_marked_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_owned());
        for id in ["kept", "leased", "pulled", "old", "recent"] {
            std::fs::write(cache.path(id), b"x").unwrap();
        }
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        for id in ["kept", "leased", "pulled", "old"] {
            std::fs::File::options()
                .write(true)
                .open(cache.path(id))
                .unwrap()
                .set_modified(now - 2 * day)
                .unwrap();
        }
        let _lease = cache.lease("leased");
        let keep = std::collections::BTreeSet::from(["kept".to_owned()]);
        let removed = cache
            .age_unused(&keep, day, &["pulled".to_owned()], now)
            .unwrap();
        assert_eq!(removed, vec!["old"]);
        assert!(!cache.path("old").exists() && cache.path("recent").exists());
        for id in ["kept", "leased", "pulled"] {
            let m = std::fs::metadata(cache.path(id))
                .unwrap()
                .modified()
                .unwrap();
            assert_eq!(m, now, "{id} is marked used now");
        }
    }

    #[test]
    fn leases_and_files_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_owned());
        for id in ["a", "b"] {
            std::fs::write(cache.path(id), [0u8; 100]).unwrap();
            let f = std::fs::File::options()
                .write(true)
                .open(cache.path(id))
                .unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(3600))
                .unwrap();
        }
        std::fs::write(cache.part_path("c"), [0u8; 1000]).unwrap();
        let lease = cache.lease("a");
        // "b" is the only one neither leased nor pulling; the part file is not an entry.
        assert_eq!(cache.evict(0, MIN, &[]).unwrap(), ["b"]);
        assert!(cache.path("a").exists() && !cache.path("b").exists());
        drop(lease);
        cache.touch("a");
        assert!(cache.evict(0, MIN, &[]).unwrap().is_empty(), "just used");
        cache.clear_parts().unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
