//! The state store: `<root>/<id>/state.json`, one directory per container.
//!
//! Every read-modify-write holds an exclusive `flock` on `<root>/<id>/lock`; `state.json` is
//! replaced atomically (write, fsync, rename), so a reader never sees half a file. The status
//! on disk is what the last transition wrote; `Status::Stopped` is also inferred when the
//! recorded monitor process is gone.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{id, proc, ContainerError};

/// OCI lifecycle status, plus `creating` while the VM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// A lifecycle verb, as far as the container's status decides whether it may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Start,
    Kill,
    Pause,
    Resume,
    /// `ignore_paused`: runc's `exec --ignore-paused`.
    Exec {
        ignore_paused: bool,
    },
    Delete {
        force: bool,
    },
    /// New resource limits, applied inside the VM (whose agent a paused VM cannot run).
    Update,
}

impl Status {
    pub fn can_start(self) -> bool {
        self == Status::Created
    }

    /// A paused container can be killed: SIGKILL ends its VM from outside.
    pub fn can_kill(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Paused)
    }

    pub fn can_pause(self) -> bool {
        self == Status::Running
    }

    pub fn can_resume(self) -> bool {
        self == Status::Paused
    }

    pub fn can_exec(self, ignore_paused: bool) -> bool {
        match self {
            Status::Created | Status::Running => true,
            Status::Paused => ignore_paused,
            Status::Creating | Status::Stopped => false,
        }
    }

    /// As runc: a created container is deleted without `--force` (its process never ran);
    /// a running or paused one only with it.
    pub fn can_delete(self, force: bool) -> bool {
        force || !matches!(self, Status::Running | Status::Paused)
    }

    /// Whether `verb` may run on a container in this status; if not, the error runc gives.
    pub fn allows(self, verb: Verb) -> Result<(), ContainerError> {
        let refused = |message: String| Err(ContainerError::InvalidState(message));
        match verb {
            Verb::Start if self.can_start() => Ok(()),
            Verb::Start => refused(match self {
                Status::Running | Status::Paused => {
                    "cannot start an already running container".into()
                }
                Status::Creating => "cannot start a container that is still being created".into(),
                _ => "cannot start a container that has stopped".into(),
            }),
            Verb::Kill if self.can_kill() => Ok(()),
            Verb::Kill => Err(ContainerError::NotRunning),
            Verb::Pause if self.can_pause() => Ok(()),
            Verb::Pause if self == Status::Paused => refused("container is already paused".into()),
            // runc's words for a container that is not running, whatever its status.
            Verb::Pause => refused("container not running".into()),
            Verb::Resume if self.can_resume() => Ok(()),
            Verb::Resume => refused("container not paused".into()),
            Verb::Exec { ignore_paused } if self.can_exec(ignore_paused) => Ok(()),
            Verb::Exec { .. } if self == Status::Paused => refused(
                "cannot exec in a paused container (use --ignore-paused to override)".into(),
            ),
            Verb::Exec { .. } => refused("cannot exec in a stopped container".into()),
            Verb::Update if matches!(self, Status::Created | Status::Running) => Ok(()),
            Verb::Update if self == Status::Paused => refused(
                "cannot update a paused container: its limits are applied inside the VM, \
                 which runs nothing while paused; resume it first"
                    .into(),
            ),
            Verb::Update => Err(ContainerError::NotRunning),
            Verb::Delete { force } if self.can_delete(force) => Ok(()),
            Verb::Delete { .. } => refused(format!(
                "cannot delete a container that is not stopped: {self}"
            )),
        }
    }
}

/// The OCI state document: what `state` prints and what every hook reads on stdin, built
/// the same way for the CLI and the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    /// The container's host process (0 once it stopped).
    pub pid: i32,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339.
    pub created: String,
    pub owner: String,
    pub annotations: HashMap<String, String>,
}

/// The runtime spec version the state documents follow.
pub const OCI_VERSION: &str = "1.2.0";

impl OciState {
    /// The state of a container with host process `pid` (ignored once it stopped).
    pub fn new(
        id: &str,
        status: Status,
        pid: Option<i32>,
        bundle: &Path,
        created: &str,
        annotations: HashMap<String, String>,
    ) -> Self {
        OciState {
            oci_version: OCI_VERSION.into(),
            id: id.into(),
            status,
            pid: match status {
                Status::Stopped => 0,
                _ => pid.unwrap_or(0),
            },
            bundle: bundle.to_path_buf(),
            rootfs: bundle.join("rootfs"),
            created: created.into(),
            owner: String::new(),
            annotations,
        }
    }

    pub fn with_rootfs(mut self, rootfs: &Path) -> Self {
        self.rootfs = rootfs.to_path_buf();
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub status: Status,
    /// The monitor process (the pid in `--pid-file`).
    pub pid: Option<i32>,
    pub pid_start_time: Option<u64>,
    /// RFC 3339.
    pub created: String,
    pub annotations: HashMap<String, String>,
    pub engine: String,
    pub exit_status: Option<i32>,
    /// The guest pid of the container's first process.
    pub guest_pid: Option<i32>,
    /// The host cgroups the monitor created (removed on delete).
    #[serde(default)]
    pub cgroups: crate::cgroup::Placement,
}

impl ContainerState {
    /// The status with a dead monitor taken into account.
    pub fn current_status(&self) -> Status {
        match self.status {
            Status::Stopped => Status::Stopped,
            Status::Creating if self.pid.is_none() => Status::Creating,
            _ => match self.pid {
                Some(pid) if proc::is_alive(pid, self.pid_start_time) => self.status,
                _ => Status::Stopped,
            },
        }
    }

    /// The OCI state document (`state` verb), with runc's fields.
    pub fn oci_state(&self) -> OciState {
        self.oci_state_as(self.current_status())
    }

    /// The OCI state document with a given status (hooks get the status of their moment).
    pub fn oci_state_as(&self, status: Status) -> OciState {
        OciState::new(
            &self.id,
            status,
            self.pid,
            &self.bundle,
            &self.created,
            self.annotations.clone(),
        )
        .with_rootfs(&self.rootfs)
    }
}

#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

/// One container's directory; the lock is taken explicitly around transitions.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub id: String,
    pub path: PathBuf,
}

/// Held while a transition reads and writes state.
#[derive(Debug)]
pub struct StateLock {
    _flock: Flock<File>,
}

impl StateStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes the directory for a new container; fails if the id is taken.
    pub fn create(&self, id: &str) -> Result<ContainerDir, ContainerError> {
        id::validate(id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(ContainerError::io(&self.root))?;
        let path = self.root.join(id);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => Ok(ContainerDir {
                id: id.to_string(),
                path,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(ContainerError::AlreadyExists(id.to_string()))
            }
            Err(e) => Err(ContainerError::Io { path, source: e }),
        }
    }

    /// An existing container.
    pub fn open(&self, id: &str) -> Result<ContainerDir, ContainerError> {
        id::validate(id)?;
        let path = self.root.join(id);
        if path.join("state.json").exists() {
            Ok(ContainerDir {
                id: id.to_string(),
                path,
            })
        } else {
            Err(ContainerError::NotFound(id.to_string()))
        }
    }

    /// Where container `id` lives (whether or not it exists).
    pub fn create_dir_path(&self, id: &str) -> Result<PathBuf, ContainerError> {
        id::validate(id)?;
        Ok(self.root.join(id))
    }

    /// Every container with a readable state, sorted by id.
    pub fn list(&self) -> Vec<ContainerState> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut states: Vec<ContainerState> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| self.open(e.file_name().to_str()?).ok()?.load().ok())
            .collect();
        states.sort_by(|a, b| a.id.cmp(&b.id));
        states
    }
}

impl ContainerDir {
    /// Takes the directory's exclusive `flock`, held while a transition reads and writes state.
    pub fn lock_state(&self) -> Result<StateLock, ContainerError> {
        let path = self.path.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ContainerError::io(&path))?;
        let flock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| ContainerError::Io {
                path,
                source: e.into(),
            })?;
        Ok(StateLock { _flock: flock })
    }

    pub fn load(&self) -> Result<ContainerState, ContainerError> {
        let path = self.path.join("state.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ContainerError::NotFound(self.id.clone()))
            }
            Err(e) => return Err(ContainerError::Io { path, source: e }),
        };
        serde_json::from_slice(&bytes).map_err(|e| ContainerError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Replaces state.json atomically. Callers hold the lock.
    pub fn save(&self, state: &ContainerState, _lock: &StateLock) -> Result<(), ContainerError> {
        write_atomic(
            &self.path.join("state.json"),
            &serde_json::to_vec_pretty(state).unwrap_or_default(),
        )
    }

    /// Applies `change` to the stored state under the lock.
    pub fn update(
        &self,
        change: impl FnOnce(&mut ContainerState),
    ) -> Result<ContainerState, ContainerError> {
        let lock = self.lock_state()?;
        let mut state = self.load()?;
        change(&mut state);
        self.save(&state, &lock)?;
        Ok(state)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Removes what the container left on the host (its cgroups) and then its directory.
    /// The monitor must be gone.
    pub fn discard(&self) -> Result<(), ContainerError> {
        if let Ok(state) = self.load() {
            crate::cgroup::remove(&state.cgroups);
        }
        self.remove()
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) -> Result<(), ContainerError> {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ContainerError::Io {
                path: self.path.clone(),
                source: e,
            }),
        }
    }
}

/// Write to a temporary sibling, fsync, rename over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ContainerError> {
    write_atomic_with_mode(path, bytes, 0o666)
}

/// [`write_atomic`] of a file created with `mode` (less the umask).
pub fn write_atomic_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ContainerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(ContainerError::io(path))
}

/// Now, in RFC 3339 with nanoseconds, UTC.
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_nanos())
}

pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> ContainerState {
        ContainerState {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            status: Status::Created,
            pid: Some(std::process::id() as i32),
            pid_start_time: proc::start_time(std::process::id() as i32),
            created: rfc3339_now(),
            annotations: HashMap::new(),
            engine: "qemu-tcg".into(),
            exit_status: None,
            guest_pid: None,
            cgroups: Default::default(),
        }
    }

    #[test]
    fn duplicate_id_is_refused_and_unknown_id_is_not_found() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::new(root.path());
        let dir = store.create("c1").unwrap();
        assert!(matches!(
            store.create("c1"),
            Err(ContainerError::AlreadyExists(_))
        ));
        // Created but without state.json: not yet a container for the other verbs.
        assert!(matches!(store.open("c1"), Err(ContainerError::NotFound(_))));
        dir.update(|_| {}).unwrap_err();
        assert!(matches!(
            store.open("nope"),
            Err(ContainerError::NotFound(_))
        ));
        assert!(matches!(
            store.open("../x"),
            Err(ContainerError::InvalidId(_))
        ));
    }

    #[test]
    fn saved_state_round_trips_and_lists() {
        let root = tempfile::tempdir().unwrap();
        let store = StateStore::new(root.path());
        let dir = store.create("c1").unwrap();
        let lock = dir.lock_state().unwrap();
        dir.save(&sample("c1"), &lock).unwrap();
        drop(lock);
        let state = dir.update(|s| s.status = Status::Running).unwrap();
        assert_eq!(state.status, Status::Running);
        assert_eq!(
            store.open("c1").unwrap().load().unwrap().status,
            Status::Running
        );
        assert_eq!(store.list().len(), 1);
        dir.remove().unwrap();
        assert!(store.list().is_empty());
    }

    #[test]
    fn each_verb_is_allowed_in_the_statuses_runc_allows_it_in() {
        use Status::*;
        let allowed = |verb: Verb| -> Vec<Status> {
            [Creating, Created, Running, Paused, Stopped]
                .into_iter()
                .filter(|s| s.allows(verb).is_ok())
                .collect()
        };
        assert_eq!(allowed(Verb::Start), [Created]);
        assert_eq!(allowed(Verb::Kill), [Created, Running, Paused]);
        assert_eq!(allowed(Verb::Pause), [Running]);
        assert_eq!(allowed(Verb::Resume), [Paused]);
        assert_eq!(
            allowed(Verb::Exec {
                ignore_paused: false
            }),
            [Created, Running]
        );
        assert_eq!(
            allowed(Verb::Delete { force: false }),
            [Creating, Created, Stopped]
        );
        assert_eq!(allowed(Verb::Delete { force: true }).len(), 5);
        assert_eq!(allowed(Verb::Update), [Created, Running]);
        assert!(Paused
            .allows(Verb::Update)
            .unwrap_err()
            .to_string()
            .contains("resume it first"));
        assert_eq!(
            Stopped.allows(Verb::Start).unwrap_err().to_string(),
            "cannot start a container that has stopped"
        );
        assert_eq!(
            Stopped.allows(Verb::Kill).unwrap_err().to_string(),
            "container not running"
        );
    }

    #[test]
    fn dead_monitor_means_stopped() {
        let mut state = sample("c1");
        assert_eq!(state.current_status(), Status::Created);
        state.pid_start_time = state.pid_start_time.map(|t| t + 1);
        assert_eq!(state.current_status(), Status::Stopped);
        assert_eq!(state.oci_state().pid, 0);
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_700_000_000, 5), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000000000Z");
    }
}
