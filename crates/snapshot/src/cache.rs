//! Cache entries on disk, their publication, validation, locking and eviction.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{CacheError, SnapshotKey};

/// Makes `dir` (and its missing parents) readable by its owner only: snapshots hold guest
/// memory.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Version of the cache layout (entry directory and `meta.json`).
/// 2: every VM has a virtio-net device.
pub const FORMAT_VERSION: u32 = 2;

/// Files up to this size get a CRC in `meta.json`, checked on every lookup; larger ones
/// (guest memory) are checked by size, so that a lookup does not read them.
const CRC_LIMIT: u64 = 64 << 20;

const META: &str = "meta.json";
const HITS: &str = "hits";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Total size of the entries; the least recently used go when it is exceeded.
    pub max_bytes: u64,
    /// No bake starts when the cache's filesystem has less free space than this.
    pub min_free_bytes: u64,
    /// How long a create waits for another create's bake of the same key.
    pub bake_wait: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_bytes: 10 << 30,
            min_free_bytes: 1 << 30,
            bake_wait: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub name: String,
    pub len: u64,
    pub crc32: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub key: String,
    /// What the snapshot is of, for `cache ls` (the image).
    pub description: String,
    /// The key's parts, for `cache ls --verbose` and debugging.
    pub parts: serde_json::Value,
    /// Unix seconds.
    pub created: u64,
    pub files: Vec<FileMeta>,
}

/// A valid entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: SnapshotKey,
    pub dir: PathBuf,
    pub meta: Meta,
}

/// What `cache ls` shows of an entry.
#[derive(Debug, Clone, Serialize)]
pub struct EntryInfo {
    pub key: String,
    pub description: String,
    /// Bytes allocated on disk.
    pub size: u64,
    pub created: u64,
    pub last_used: u64,
    pub hits: u64,
    /// `last_used` to the nanosecond, which eviction orders by.
    #[serde(skip)]
    last_used_exact: Duration,
}

/// What `cache stats` shows of an entry: its restores' latency, phase by phase.
#[derive(Debug, Clone, Serialize)]
pub struct EntryLatency {
    pub key: String,
    pub description: String,
    /// Restores recorded (the last few hundred at most).
    pub restores: usize,
    pub phases: Vec<crate::latency::PhaseStats>,
}

/// The answer to "I need a VM for this key".
#[derive(Debug)]
pub enum Lookup {
    Hit(Entry),
    /// This caller bakes the entry (it holds the key's lock until it publishes or drops).
    Bake(Bake),
    /// Boot cold and do not bake, for this reason.
    Cold(String),
}

#[derive(Debug, Clone)]
pub struct SnapshotCache {
    dir: PathBuf,
    limits: CacheLimits,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn crc_of(path: &Path) -> std::io::Result<u32> {
    let mut file = File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

fn allocated(path: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

impl SnapshotCache {
    pub fn new(dir: impl Into<PathBuf>, limits: CacheLimits) -> Self {
        SnapshotCache {
            dir: dir.into(),
            limits,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_dir(&self, key: &SnapshotKey) -> PathBuf {
        self.dir.join(key.as_str())
    }

    /// A valid entry for `key`. An entry that fails validation is removed (a miss).
    pub fn get(&self, key: &SnapshotKey) -> Option<Entry> {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return None;
        }
        match validate(key, &dir) {
            Ok(meta) => Some(Entry {
                key: key.clone(),
                dir,
                meta,
            }),
            Err(why) => {
                log::warn!("snapshot {key} is unusable ({why}); removing it");
                let _ = self.remove(key);
                None
            }
        }
    }

    /// A hit, the right to bake, or a reason to boot cold.
    pub fn lookup(&self, key: &SnapshotKey) -> Result<Lookup, CacheError> {
        if let Some(entry) = self.get(key) {
            return Ok(Lookup::Hit(entry));
        }
        private_dir(&self.dir).map_err(CacheError::io(&self.dir))?;
        let lock_path = self.dir.join(format!("{key}.lock"));
        let deadline = Instant::now() + self.limits.bake_wait;
        let mut waited = false;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(CacheError::io(&lock_path))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    // A prune may have unlinked the file between the open and the lock: a
                    // lock on a file no longer at the path excludes no one.
                    let same = match (lock.metadata(), fs::metadata(&lock_path)) {
                        (Ok(held), Ok(now)) => held.ino() == now.ino() && held.dev() == now.dev(),
                        _ => false,
                    };
                    if !same {
                        continue;
                    }
                    if let Some(entry) = self.get(key) {
                        return Ok(Lookup::Hit(entry));
                    }
                    if waited {
                        // The baker gave up (failed or was killed): take over.
                        log::debug!("snapshot {key}: previous bake did not publish");
                    }
                    if let Some(why) = self.below_floor() {
                        return Ok(Lookup::Cold(why));
                    }
                    self.remove_partials(key);
                    let partial = self
                        .dir
                        .join(format!("{key}.partial-{}", std::process::id()));
                    fs::create_dir(&partial).map_err(CacheError::io(&partial))?;
                    return Ok(Lookup::Bake(Bake {
                        key: key.clone(),
                        cache: self.clone(),
                        partial,
                        _lock: lock,
                        published: false,
                    }));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    waited = true;
                    if Instant::now() >= deadline {
                        return Ok(Lookup::Cold(format!(
                            "another create has been baking snapshot {key} for over {}s",
                            self.limits.bake_wait.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    if let Some(entry) = self.get(key) {
                        return Ok(Lookup::Hit(entry));
                    }
                }
                Err((_, e)) => {
                    return Err(CacheError::Io {
                        path: lock_path,
                        source: e.into(),
                    })
                }
            }
        }
    }

    /// Why a bake must not start now, if it must not.
    fn below_floor(&self) -> Option<String> {
        let stat = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        (free < self.limits.min_free_bytes).then(|| {
            format!(
                "only {} MiB free on the cache's filesystem, below the floor of {} MiB",
                free >> 20,
                self.limits.min_free_bytes >> 20
            )
        })
    }

    fn remove_partials(&self, key: &SnapshotKey) {
        let prefix = format!("{key}.partial-");
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                log::debug!(
                    "removing {}, left by a bake that did not finish",
                    entry.file_name().to_string_lossy()
                );
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Counts a restore from `entry` (and marks it recently used).
    pub fn record_hit(&self, entry: &Entry) {
        let path = entry.dir.join(HITS);
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(&path) {
            let _ = file.write_all(b"+");
        }
    }

    /// Records how long a restore from `key` took, phase by phase (see [`crate::latency`]);
    /// best effort: an entry removed meanwhile, or a full disk, loses the sample.
    pub fn record_latency(&self, key: &SnapshotKey, phases: &[(&str, Duration)]) {
        let dir = self.entry_dir(key);
        if dir.is_dir() {
            if let Err(e) = crate::latency::record(&dir, phases) {
                log::debug!("recording the restore's latency in {}: {e}", dir.display());
            }
        }
    }

    /// Each entry's restores, phase by phase ([`crate::latency::stats`]), most restored first;
    /// entries with no restore recorded are left out.
    pub fn latency(&self) -> Vec<EntryLatency> {
        let mut all: Vec<EntryLatency> = self
            .list()
            .into_iter()
            .filter_map(|info| {
                let samples = crate::latency::samples(&self.dir.join(&info.key));
                (!samples.is_empty()).then(|| EntryLatency {
                    restores: samples.len(),
                    phases: crate::latency::stats(&samples),
                    key: info.key,
                    description: info.description,
                })
            })
            .collect();
        all.sort_by(|a, b| b.restores.cmp(&a.restores).then(a.key.cmp(&b.key)));
        all
    }

    pub fn remove(&self, key: &SnapshotKey) -> Result<(), CacheError> {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return Err(CacheError::NotFound(key.to_string()));
        }
        // Rename first, so that no reader sees a half-removed entry; files still mapped by a
        // running VM stay valid until it ends.
        let doomed = self
            .dir
            .join(format!(".removed-{key}-{}", std::process::id()));
        fs::rename(&dir, &doomed).map_err(CacheError::io(&dir))?;
        match fs::remove_dir_all(&doomed) {
            // A concurrent prune's sweep may be deleting the same tree.
            Err(e) if e.kind() != ErrorKind::NotFound => Err(CacheError::Io {
                path: doomed,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    pub fn list(&self) -> Vec<EntryInfo> {
        let mut infos: Vec<EntryInfo> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let key = SnapshotKey::parse(e.file_name().to_str()?)?;
                let meta: Meta =
                    serde_json::from_slice(&fs::read(e.path().join(META)).ok()?).ok()?;
                let hits = fs::metadata(e.path().join(HITS)).ok();
                let last_used_exact = hits
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .unwrap_or(Duration::from_secs(meta.created));
                Some(EntryInfo {
                    key: key.to_string(),
                    description: meta.description,
                    size: allocated(&e.path()),
                    created: meta.created,
                    last_used: last_used_exact.as_secs(),
                    hits: hits.map(|m| m.len()).unwrap_or(0),
                    last_used_exact,
                })
            })
            .collect();
        infos.sort_by(|a, b| {
            b.last_used_exact
                .cmp(&a.last_used_exact)
                .then(a.key.cmp(&b.key))
        });
        infos
    }

    /// Removes what a killed runtime left: the partial directories and the lock file of a key
    /// whose lock no one holds (a baker holds it until it publishes or gives up), and an
    /// entry that `remove` renamed but did not finish deleting.
    fn sweep_abandoned(&self) {
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(rest) = name.strip_prefix(".removed-") {
                // `.removed-KEY-PID`: left if PID is gone (or the name is not one of ours).
                let remover = rest
                    .rsplit_once('-')
                    .and_then(|(_, pid)| pid.parse::<i32>().ok())
                    .filter(|&pid| pid > 0);
                let alive = remover.is_some_and(|pid| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                });
                if !alive {
                    let _ = fs::remove_dir_all(entry.path());
                }
                continue;
            }
            // A key's lock file that no process holds: no bake of that key is under way, so
            // its partial directories are abandoned, and the file itself can go (`lookup`
            // checks that the file it locked is still the one at the path).
            let Some(key) = name.strip_suffix(".lock").and_then(SnapshotKey::parse) else {
                continue;
            };
            let Ok(file) = OpenOptions::new().write(true).open(entry.path()) else {
                continue;
            };
            if let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                self.remove_partials(&key);
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Removes least recently used entries until the total is at most `max_bytes`, never
    /// `keep`, and anything a killed runtime left half-written. Returns the keys removed.
    pub fn prune(&self, max_bytes: u64, keep: Option<&SnapshotKey>) -> Vec<String> {
        self.sweep_abandoned();
        let mut entries = self.list();
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        // Oldest use first.
        entries.sort_by(|a, b| {
            a.last_used_exact
                .cmp(&b.last_used_exact)
                .then(a.key.cmp(&b.key))
        });
        let mut removed = Vec::new();
        for entry in entries {
            if total <= max_bytes {
                break;
            }
            if keep.is_some_and(|k| k.as_str() == entry.key) {
                continue;
            }
            if let Some(key) = SnapshotKey::parse(&entry.key) {
                if self.remove(&key).is_ok() {
                    log::debug!("evicted snapshot {} ({} MiB)", entry.key, entry.size >> 20);
                    total = total.saturating_sub(entry.size);
                    removed.push(entry.key);
                }
            }
        }
        removed
    }
}

fn validate(key: &SnapshotKey, dir: &Path) -> Result<Meta, String> {
    let bytes = fs::read(dir.join(META)).map_err(|e| format!("meta.json: {e}"))?;
    let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| format!("meta.json: {e}"))?;
    if meta.format != FORMAT_VERSION {
        return Err(format!(
            "format {} (this runtime writes {FORMAT_VERSION})",
            meta.format
        ));
    }
    if meta.key != key.as_str() {
        return Err(format!("meta.json names key {}", meta.key));
    }
    for file in &meta.files {
        let path = dir.join(&file.name);
        let len = fs::metadata(&path)
            .map_err(|e| format!("{}: {e}", file.name))?
            .len();
        if len != file.len {
            return Err(format!(
                "{} is {len} bytes, expected {}",
                file.name, file.len
            ));
        }
        if let Some(expected) = file.crc32 {
            let crc = crc_of(&path).map_err(|e| format!("{}: {e}", file.name))?;
            if crc != expected {
                return Err(format!("{} fails its CRC", file.name));
            }
        }
    }
    Ok(meta)
}

/// The right to bake one key: a private directory to write into, and the key's lock.
#[derive(Debug)]
pub struct Bake {
    key: SnapshotKey,
    cache: SnapshotCache,
    partial: PathBuf,
    _lock: Flock<File>,
    published: bool,
}

impl Bake {
    pub fn key(&self) -> &SnapshotKey {
        &self.key
    }

    /// Where the engine writes the snapshot's files.
    pub fn dir(&self) -> &Path {
        &self.partial
    }

    /// Seals the files in the directory, makes the entry visible atomically, and evicts
    /// what no longer fits. Slow (fsync): callers run it off the critical path.
    pub fn publish(
        mut self,
        description: String,
        parts: serde_json::Value,
    ) -> Result<Entry, CacheError> {
        let mut files = Vec::new();
        let mut names: Vec<_> = fs::read_dir(&self.partial)
            .map_err(CacheError::io(&self.partial))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let path = self.partial.join(&name);
            let file = File::open(&path).map_err(CacheError::io(&path))?;
            file.sync_all().map_err(CacheError::io(&path))?;
            let len = file.metadata().map_err(CacheError::io(&path))?.len();
            let crc32 = if len <= CRC_LIMIT {
                Some(crc_of(&path).map_err(CacheError::io(&path))?)
            } else {
                None
            };
            files.push(FileMeta { name, len, crc32 });
        }
        let meta = Meta {
            format: FORMAT_VERSION,
            key: self.key.to_string(),
            description,
            parts,
            created: now_secs(),
            files,
        };
        let meta_path = self.partial.join(META);
        let mut file = File::create(&meta_path).map_err(CacheError::io(&meta_path))?;
        file.write_all(&serde_json::to_vec_pretty(&meta).unwrap_or_default())
            .and_then(|()| file.sync_all())
            .map_err(CacheError::io(&meta_path))?;
        File::create(self.partial.join(HITS)).map_err(CacheError::io(&self.partial))?;
        sync_dir(&self.partial).map_err(CacheError::io(&self.partial))?;
        let target = self.cache.entry_dir(&self.key);
        match fs::remove_dir_all(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(CacheError::Io {
                    path: target,
                    source: e,
                })
            }
        }
        fs::rename(&self.partial, &target).map_err(CacheError::io(&target))?;
        sync_dir(&self.cache.dir).map_err(CacheError::io(&self.cache.dir))?;
        self.published = true;
        let evicted = self
            .cache
            .prune(self.cache.limits.max_bytes, Some(&self.key));
        if !evicted.is_empty() {
            log::debug!(
                "cache over {} MiB: evicted {evicted:?}",
                self.cache.limits.max_bytes >> 20
            );
        }
        Ok(Entry {
            key: self.key.clone(),
            dir: target,
            meta,
        })
    }
}

impl Drop for Bake {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyParts, SnapshotKey};
    use std::sync::{Arc, Barrier};

    fn key(n: u32) -> SnapshotKey {
        SnapshotKey::new(&KeyParts {
            image_key: format!("img{n}"),
            kernel_digest: "k".into(),
            agent_digest: "a".into(),
            vcpus: 1,
            memory_mib: 256,
            engine: "test".into(),
            kernel_args: String::new(),
            format: FORMAT_VERSION,
        })
    }

    fn limits() -> CacheLimits {
        CacheLimits {
            max_bytes: u64::MAX,
            min_free_bytes: 0,
            bake_wait: Duration::from_secs(10),
        }
    }

    fn bake(cache: &SnapshotCache, k: &SnapshotKey, state: &[u8]) -> Entry {
        let Lookup::Bake(b) = cache.lookup(k).unwrap() else {
            panic!("expected a bake")
        };
        fs::write(b.dir().join("state"), state).unwrap();
        fs::write(b.dir().join("memory"), vec![7u8; 8192]).unwrap();
        b.publish("test image".into(), serde_json::json!({}))
            .unwrap()
    }

    #[test]
    fn a_published_entry_is_a_hit_with_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path(), limits());
        let k = key(1);
        let entry = bake(&cache, &k, b"device state");
        assert_eq!(entry.meta.files.len(), 2);
        let Lookup::Hit(hit) = cache.lookup(&k).unwrap() else {
            panic!("expected a hit")
        };
        assert_eq!(fs::read(hit.dir.join("state")).unwrap(), b"device state");
        cache.record_hit(&hit);
        cache.record_hit(&hit);
        let info = &cache.list()[0];
        assert_eq!((info.hits, info.description.as_str()), (2, "test image"));
    }

    #[test]
    fn a_dropped_bake_leaves_nothing_and_the_next_caller_bakes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path(), limits());
        let k = key(1);
        let Lookup::Bake(b) = cache.lookup(&k).unwrap() else {
            panic!()
        };
        let partial = b.dir().to_path_buf();
        fs::write(partial.join("state"), b"x").unwrap();
        drop(b);
        assert!(!partial.exists());
        assert!(matches!(cache.lookup(&k).unwrap(), Lookup::Bake(_)));
    }

    #[test]
    fn prune_removes_what_a_killed_runtime_left_but_not_a_bake_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path(), limits());
        let (killed, live) = (key(1), key(2));
        // What a baker killed before publishing leaves: its partial directory and the key's
        // lock file, which no process holds any more.
        let abandoned = dir.path().join(format!("{killed}.partial-4194304"));
        fs::create_dir(&abandoned).unwrap();
        fs::write(abandoned.join("state"), b"x").unwrap();
        File::create(dir.path().join(format!("{killed}.lock"))).unwrap();
        // And a `cache rm` killed between its rename and its delete.
        let half_removed = dir.path().join(format!(".removed-{killed}-4194304"));
        fs::create_dir(&half_removed).unwrap();
        // A removal still under way (this process's) is left to its remover.
        let being_removed = dir
            .path()
            .join(format!(".removed-{live}-{}", std::process::id()));
        fs::create_dir(&being_removed).unwrap();
        let Lookup::Bake(in_progress) = cache.lookup(&live).unwrap() else {
            panic!("expected the right to bake")
        };
        cache.prune(u64::MAX, None);
        assert!(!abandoned.exists());
        assert!(!dir.path().join(format!("{killed}.lock")).exists());
        assert!(!half_removed.exists());
        assert!(being_removed.exists());
        assert!(
            in_progress.dir().exists(),
            "a live bake's directory was removed"
        );
        assert!(dir.path().join(format!("{live}.lock")).exists());
        // The swept key bakes again.
        bake(&cache, &killed, b"state");
        assert!(cache.get(&killed).is_some());
    }

    #[test]
    fn corrupt_or_truncated_entries_are_misses_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path(), limits());
        let k = key(1);
        let entry = bake(&cache, &k, b"device state");
        // One flipped byte in the state: its CRC fails.
        let mut state = fs::read(entry.dir.join("state")).unwrap();
        state[3] ^= 0x40;
        fs::write(entry.dir.join("state"), &state).unwrap();
        assert!(cache.get(&k).is_none());
        assert!(!entry.dir.exists(), "a corrupt entry is removed");

        let entry = bake(&cache, &k, b"device state");
        File::options()
            .write(true)
            .open(entry.dir.join("memory"))
            .unwrap()
            .set_len(100)
            .unwrap();
        assert!(
            matches!(cache.lookup(&k).unwrap(), Lookup::Bake(_)),
            "truncated memory: rebake"
        );

        let entry = bake(&cache, &k, b"device state");
        let mut meta: Meta =
            serde_json::from_slice(&fs::read(entry.dir.join(META)).unwrap()).unwrap();
        meta.format = FORMAT_VERSION + 1;
        fs::write(entry.dir.join(META), serde_json::to_vec(&meta).unwrap()).unwrap();
        assert!(cache.get(&k).is_none(), "an incompatible format is a miss");
    }

    #[test]
    fn concurrent_lookups_of_a_new_key_bake_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path(), limits());
        let k = key(1);
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (cache, k, barrier) = (cache.clone(), k.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    match cache.lookup(&k).unwrap() {
                        Lookup::Bake(b) => {
                            std::thread::sleep(Duration::from_millis(200));
                            fs::write(b.dir().join("state"), b"s").unwrap();
                            b.publish("x".into(), serde_json::json!({})).unwrap();
                            "bake"
                        }
                        Lookup::Hit(_) => "hit",
                        Lookup::Cold(_) => "cold",
                    }
                })
            })
            .collect();
        let mut results: Vec<&str> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        results.sort();
        assert_eq!(
            results,
            ["bake", "hit", "hit", "hit", "hit", "hit", "hit", "hit"]
        );
    }

    #[test]
    fn waiting_too_long_for_another_bake_means_cold() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(
            dir.path(),
            CacheLimits {
                bake_wait: Duration::from_millis(100),
                ..limits()
            },
        );
        let k = key(1);
        let Lookup::Bake(_held) = cache.lookup(&k).unwrap() else {
            panic!()
        };
        let other = cache.clone();
        let result = std::thread::spawn(move || other.lookup(&k).unwrap())
            .join()
            .unwrap();
        assert!(matches!(result, Lookup::Cold(why) if why.contains("baking")));
    }

    #[test]
    fn eviction_removes_the_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path(), limits());
        let (a, b, c) = (key(1), key(2), key(3));
        for k in [&a, &b, &c] {
            bake(&cache, k, b"state");
        }
        // a used long ago, b recently, c in between.
        let set_used = |k: &SnapshotKey, secs_ago: u64| {
            let t = SystemTime::now() - Duration::from_secs(secs_ago);
            File::options()
                .write(true)
                .open(dir.path().join(k.as_str()).join(HITS))
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        set_used(&a, 300);
        set_used(&b, 10);
        set_used(&c, 100);
        let one = cache.list()[0].size;
        let removed = cache.prune(one * 2, None);
        assert_eq!(removed, vec![a.to_string()]);
        let removed = cache.prune(one, None);
        assert_eq!(removed, vec![c.to_string()]);
        assert!(cache.get(&b).is_some());
    }

    #[test]
    fn below_the_free_space_floor_there_is_no_bake() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(
            dir.path(),
            CacheLimits {
                min_free_bytes: u64::MAX,
                ..limits()
            },
        );
        assert!(
            matches!(cache.lookup(&key(1)).unwrap(), Lookup::Cold(why) if why.contains("floor"))
        );
    }
}
