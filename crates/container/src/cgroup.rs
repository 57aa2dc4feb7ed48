//! The monitor's host cgroup: `linux.cgroupsPath`, so that what a container costs the host
//! (its VMM process and guest memory) is accounted and limited where docker and containerd
//! look (`docker stats`, `ctr task metrics` read the cgroup of the pid in `--pid-file`).
//!
//! Works with cgroup v1, v2 and hybrid hosts: the monitor joins every mounted hierarchy at
//! the container's path. Only limits that make sense for a VMM are applied on the host
//! (memory, CPU quota/shares, cpuset); device rules and pid limits describe the container's
//! own view, which is inside the VM.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::systemd::Scope;
use crate::ContainerError;

/// Host resource limits for the VM's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLimits {
    pub memory_bytes: Option<i64>,
    /// Swap the VM may use beyond its memory, runc's reading of `memory.swap` (memory plus
    /// swap) on cgroup2: that less the container's memory limit; -1 is no limit.
    #[serde(default)]
    pub swap_bytes: Option<i64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
}

/// The tasks a container's host cgroup may hold: its monitor's and VMM's threads (a few
/// dozen: vCPUs, device and relay threads, a relay per exec session), bounded so that no
/// guest-driven path can make the host start threads without end. The container's own
/// processes are in the guest, under its `pids` limit there.
pub const HOST_PIDS_MAX: u32 = 512;

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// v1 controllers (`memory`, `cpu,cpuacct`, `name=systemd` …); empty for cgroup2.
    pub controllers: Vec<String>,
    pub v2: bool,
}

impl Hierarchy {
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// The cgroup hierarchies mounted on this host, from mountinfo text.
pub fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount = left.split(' ').nth(4).unwrap_or("");
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or("");
        let options = right.nth(1).unwrap_or("");
        match fstype {
            "cgroup2" => found.push(Hierarchy {
                mount: mount.into(),
                controllers: vec![],
                v2: true,
            }),
            "cgroup" => {
                let controllers: Vec<String> = options
                    .split(',')
                    .filter(|o| {
                        !matches!(
                            *o,
                            "rw" | "ro"
                                | "nosuid"
                                | "nodev"
                                | "noexec"
                                | "relatime"
                                | "clone_children"
                                | "xattr"
                        ) && !o.starts_with("release_agent")
                    })
                    .map(String::from)
                    .collect();
                found.push(Hierarchy {
                    mount: mount.into(),
                    controllers,
                    v2: false,
                });
            }
            _ => {}
        }
    }
    // One entry per hierarchy (bind mounts of the same one appear more than once).
    found.dedup_by(|a, b| a.controllers == b.controllers && a.v2 == b.v2);
    found
}

/// The cgroup path relative to each hierarchy's root, from `linux.cgroupsPath`: either a
/// path (`/docker/ID`, cgroupfs driver) or systemd's `slice:prefix:name`. Cleaned as runc
/// cleans it: `..` never climbs above the hierarchy's root (`/a/../../b` is `b`).
pub fn relative_path(cgroups_path: &str) -> PathBuf {
    within_root(&unclean_relative_path(cgroups_path))
}

/// `path` resolved lexically with `/` as its root: `.` and `..` are gone, and a `..` at the
/// root stays there.
fn within_root(path: &Path) -> PathBuf {
    let mut clean = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::Normal(name) => clean.push(name),
            std::path::Component::ParentDir => {
                clean.pop();
            }
            _ => {}
        }
    }
    clean
}

fn unclean_relative_path(cgroups_path: &str) -> PathBuf {
    match crate::systemd::Scope::parse(cgroups_path) {
        Some(scope) => scope.cgroup_dir(),
        None => PathBuf::from(cgroups_path.trim_start_matches('/')),
    }
}

/// Host limits from an OCI `LinuxResources` document (`update`, the shim's Update). The
/// container's memory limit is enforced in the guest, by its cgroup there; the host cgroup
/// holds the whole VM, whose guest memory is fixed at boot, so a new limit never takes it
/// below the guest's memory and the VMM's overhead (a lower host limit would leave the VM to
/// the host's OOM killer).
pub fn limits_from_resources(
    resources: &serde_json::Value,
    guest_mib: u32,
    vmm_overhead_mib: u32,
) -> Result<HostLimits, ContainerError> {
    let int = |pointer: &str| {
        resources
            .pointer(pointer)
            .and_then(|v| v.as_i64())
            .filter(|&v| v > 0)
    };
    let text = |pointer: &str| {
        resources
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    // The container's own limit is its cgroup's in the guest; the host's holds the whole VM,
    // whose guest memory is fixed at boot, so it never goes below what that needs.
    let memory_limit = int("/memory/limit");
    let memory_bytes =
        memory_limit.map(|bytes| bytes.max(i64::from(guest_mib + vmm_overhead_mib) << 20));
    let swap = resources.pointer("/memory/swap").and_then(|v| v.as_i64());
    Ok(HostLimits {
        memory_bytes,
        swap_bytes: swap_beyond_memory(memory_limit, swap)?,
        cpu_quota: int("/cpu/quota"),
        cpu_period: int("/cpu/period").map(|p| p as u64),
        cpu_shares: int("/cpu/shares").map(|s| s as u64),
        cpuset_cpus: text("/cpu/cpus"),
        cpuset_mems: text("/cpu/mems"),
    })
}

/// The swap a container may use beyond its memory, from OCI's `memory.swap` (memory plus
/// swap) and `memory.limit`, checked as runc checks them: none when unset or 0, -1 for no
/// limit, else their difference, which cannot be negative and needs a memory limit.
pub fn swap_beyond_memory(
    memory: Option<i64>,
    swap: Option<i64>,
) -> Result<Option<i64>, ContainerError> {
    match (memory, swap) {
        (_, None | Some(0)) => Ok(None),
        (_, Some(-1)) => Ok(Some(-1)),
        (Some(memory), Some(swap)) if memory > 0 && swap >= memory => Ok(Some(swap - memory)),
        (Some(memory), Some(swap)) if memory > 0 => Err(ContainerError::InvalidResources(format!(
            "memory+swap limit {swap} is below the memory limit {memory}"
        ))),
        (_, Some(swap)) => Err(ContainerError::InvalidResources(format!(
            "a memory+swap limit ({swap}) needs a memory limit"
        ))),
    }
}

/// cgroup2's `cpu.weight` for v1 `cpu.shares`, converted as runc converts them.
pub fn cpu_weight(shares: u64) -> u64 {
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// The directories a process joined, to remove on delete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub dirs: Vec<PathBuf>,
    /// The cgroups the process was in before, so that a process that outlives the
    /// container (a shim) can leave before the directories are removed.
    #[serde(default)]
    pub previous: Vec<PathBuf>,
    /// The systemd scope the process was placed in, to stop on delete.
    #[serde(default)]
    pub unit: Option<String>,
}

/// The cgroup directory `pid` is in, for each mounted hierarchy, with the hierarchy.
pub fn directories_of(pid: u32) -> Vec<(Hierarchy, PathBuf)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let all = hierarchies(&mountinfo);
    let dirs = membership(pid, &all);
    dirs.into_iter()
        .filter_map(|dir| {
            let h = all.iter().find(|h| dir.starts_with(&h.mount))?.clone();
            Some((h, dir))
        })
        .collect()
}

/// The cgroup directory `pid` is in, for each mounted hierarchy.
fn membership(pid: u32, hierarchies: &[Hierarchy]) -> Vec<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let found = hierarchies.iter().find(|h| {
            if controllers.is_empty() {
                h.v2
            } else {
                !h.v2 && controllers.split(',').all(|c| h.has(c))
            }
        });
        if let Some(h) = found {
            dirs.push(h.mount.join(relative));
        }
    }
    dirs
}

/// Moves `pid` back to the cgroups it was in before `place`.
pub fn leave(placement: &Placement, pid: u32) {
    for dir in &placement.previous {
        let _ = fs::write(dir.join("cgroup.procs"), pid.to_string());
    }
}

/// Creates the cgroup in every hierarchy, applies `limits`, and moves `pid` into it. Under
/// systemd, a systemd-style path is a transient scope systemd creates first
/// ([`Scope::start`]); what it did not create or set is then done here as elsewhere.
pub fn place(
    pid: u32,
    cgroups_path: &str,
    limits: &HostLimits,
) -> Result<Placement, ContainerError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let relative = relative_path(cgroups_path);
    let all = hierarchies(&mountinfo);
    let mut placement = Placement {
        dirs: Vec::new(),
        previous: membership(pid, &all),
        unit: None,
    };
    if let Some(scope) = Scope::on_this_host(cgroups_path) {
        scope.start(pid, limits)?;
        placement.unit = Some(scope.unit);
    }
    for hierarchy in all {
        let dir = hierarchy.mount.join(&relative);
        let existed = dir.exists();
        if let Err(e) = fs::create_dir_all(&dir) {
            // Read-only or foreign hierarchies (a container host's own) are skipped.
            log::debug!("cgroup {}: {e}", dir.display());
            continue;
        }
        if !existed {
            placement.dirs.push(dir.clone());
        }
        if hierarchy.has("cpuset") {
            inherit_cpuset(&hierarchy.mount, &dir);
        }
        if hierarchy.v2 {
            delegate_controllers(&hierarchy.mount, &dir);
        }
        apply(&hierarchy, &dir, limits)?;
        if !existed && (hierarchy.v2 || hierarchy.has("pids")) {
            write(&dir, "pids.max", &HOST_PIDS_MAX.to_string())?;
        }
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(ContainerError::io(&procs))?;
    }
    Ok(placement)
}

/// Applies new limits to an existing placement (`update`).
pub fn update(cgroups_path: &str, limits: &HostLimits) -> Result<(), ContainerError> {
    if let Some(scope) = Scope::on_this_host(cgroups_path) {
        scope.set_limits(limits)?;
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let relative = relative_path(cgroups_path);
    for hierarchy in hierarchies(&mountinfo) {
        let dir = hierarchy.mount.join(&relative);
        if dir.exists() {
            apply(&hierarchy, &dir, limits)?;
        }
    }
    Ok(())
}

/// A cgroup2 limit file's text: `max` for no limit.
fn limit_text(value: i64) -> String {
    if value < 0 {
        "max".into()
    } else {
        value.to_string()
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), ContainerError> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(());
    }
    fs::write(&path, value).map_err(|e| ContainerError::Io {
        path: path.clone(),
        source: std::io::Error::new(e.kind(), format!("write {value:?}: {e}")),
    })
}

fn apply(hierarchy: &Hierarchy, dir: &Path, limits: &HostLimits) -> Result<(), ContainerError> {
    if hierarchy.v2 {
        if let Some(bytes) = limits.memory_bytes {
            write(dir, "memory.max", &bytes.to_string())?;
        }
        if let Some(swap) = limits.swap_bytes {
            write(dir, "memory.swap.max", &limit_text(swap))?;
        }
        if let (Some(quota), period) = (limits.cpu_quota, limits.cpu_period.unwrap_or(100_000)) {
            write(dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(shares) = limits.cpu_shares {
            write(dir, "cpu.weight", &cpu_weight(shares).to_string())?;
        }
        return Ok(());
    }
    if hierarchy.has("memory") {
        if let Some(bytes) = limits.memory_bytes {
            write(dir, "memory.limit_in_bytes", &bytes.to_string())?;
            // v1 limits memory and swap together.
            if let Some(swap) = limits.swap_bytes {
                let both = if swap < 0 {
                    -1
                } else {
                    bytes.saturating_add(swap)
                };
                write(dir, "memory.memsw.limit_in_bytes", &both.to_string())?;
            }
        }
    }
    if hierarchy.has("cpu") {
        if let Some(period) = limits.cpu_period {
            write(dir, "cpu.cfs_period_us", &period.to_string())?;
        }
        if let Some(quota) = limits.cpu_quota {
            write(dir, "cpu.cfs_quota_us", &quota.to_string())?;
        }
        if let Some(shares) = limits.cpu_shares {
            write(dir, "cpu.shares", &shares.to_string())?;
        }
    }
    if hierarchy.has("cpuset") {
        if let Some(cpus) = &limits.cpuset_cpus {
            write(dir, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = &limits.cpuset_mems {
            write(dir, "cpuset.mems", mems)?;
        }
    }
    Ok(())
}

/// On cgroup2 a cgroup has the controllers its parent enables for its children: enable, from
/// the hierarchy's root down to `dir`'s parent, each controller the parent has, as runc
/// does, so that the limit files exist in `dir`. Best effort: a parent that holds processes
/// itself (other than the root) cannot, and its children then have what it had.
fn delegate_controllers(mount: &Path, dir: &Path) {
    let Ok(relative) = dir.strip_prefix(mount) else {
        return;
    };
    let mut parent = mount.to_path_buf();
    for component in relative.components() {
        let available = fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
        for controller in available.split_whitespace() {
            let _ = fs::write(
                parent.join("cgroup.subtree_control"),
                format!("+{controller}"),
            );
        }
        parent.push(component);
    }
}

/// A new v1 cpuset cgroup starts empty and refuses tasks; fill it from its ancestors.
fn inherit_cpuset(mount: &Path, dir: &Path) {
    let mut chain = Vec::new();
    let mut cursor = dir.to_path_buf();
    while cursor.starts_with(mount) && cursor != mount {
        chain.push(cursor.clone());
        if !cursor.pop() {
            break;
        }
    }
    for dir in chain.into_iter().rev() {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let current = fs::read_to_string(dir.join(file)).unwrap_or_default();
            if current.trim().is_empty() {
                if let Some(parent) = dir.parent() {
                    let value = fs::read_to_string(parent.join(file)).unwrap_or_default();
                    let _ = fs::write(dir.join(file), value.trim());
                }
            }
        }
    }
}

/// Removes the cgroups a container created (children first; they must be empty), and its
/// systemd scope if that outlived its processes.
pub fn remove(placement: &Placement) {
    if let Some(unit) = &placement.unit {
        crate::systemd::stop(unit);
    }
    for dir in placement.dirs.iter().rev() {
        for attempt in 0..50 {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // EBUSY while the last task is still exiting.
                Err(_) if attempt < 49 => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(e) => log::warn!("cannot remove cgroup {}: {e}", dir.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn the_host_limit_always_holds_the_vm() {
        let small = serde_json::json!({ "memory": { "limit": 64 << 20 } });
        let limits = limits_from_resources(&small, 256, 64).unwrap();
        assert_eq!(limits.memory_bytes, Some((256 + 64) << 20));
        let big = serde_json::json!({ "memory": { "limit": 1i64 << 30 }, "cpu": { "quota": 50000, "period": 100000 } });
        let limits = limits_from_resources(&big, 256, 64).unwrap();
        assert_eq!(limits.memory_bytes, Some(1 << 30));
        assert_eq!(
            (limits.cpu_quota, limits.cpu_period),
            (Some(50000), Some(100000))
        );
    }

    #[test]
    fn hybrid_hosts_have_v1_controllers_and_a_unified_hierarchy() {
        let h = hierarchies(HYBRID);
        assert_eq!(h.len(), 4);
        assert!(h[0].v2 && h[0].mount == Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(h[1].controllers, vec!["name=systemd"]);
        assert!(h[2].has("memory"));
        assert!(h[3].has("cpu") && h[3].has("cpuacct"));
    }

    #[test]
    fn cgroupfs_and_systemd_paths_resolve() {
        assert_eq!(relative_path("/docker/abc"), PathBuf::from("docker/abc"));
        // Never above the hierarchy's root, as runc's CleanPath.
        assert_eq!(relative_path("/a/../../b"), PathBuf::from("b"));
        assert_eq!(relative_path("../../../etc/x"), PathBuf::from("etc/x"));
        assert_eq!(relative_path("./a/./b/.."), PathBuf::from("a"));
        assert_eq!(
            relative_path("system.slice:docker:../../../x"),
            PathBuf::from("x.scope")
        );
        assert_eq!(relative_path("default/c1"), PathBuf::from("default/c1"));
        assert_eq!(
            relative_path("system.slice:docker:abc"),
            PathBuf::from("system.slice/docker-abc.scope")
        );
        assert_eq!(
            relative_path("kubepods-besteffort.slice:cri-containerd:x"),
            PathBuf::from("kubepods.slice/kubepods-besteffort.slice/cri-containerd-x.scope")
        );
        // Without a name it is not systemd's form (--systemd-cgroup refuses it): a path.
        assert_eq!(relative_path("a.slice:b:"), PathBuf::from("a.slice:b:"));
    }

    #[test]
    fn limits_are_written_to_the_files_of_each_version() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "memory.limit_in_bytes",
            "memory.max",
            "cpu.cfs_quota_us",
            "cpu.cfs_period_us",
            "cpu.max",
            "cpu.shares",
            "memory.memsw.limit_in_bytes",
            "memory.swap.max",
        ] {
            fs::write(dir.path().join(f), "").unwrap();
        }
        let limits = HostLimits {
            memory_bytes: Some(1 << 28),
            swap_bytes: Some(1 << 27),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            ..Default::default()
        };
        let v1 = Hierarchy {
            mount: "/x".into(),
            controllers: vec!["memory".into(), "cpu".into()],
            v2: false,
        };
        apply(&v1, dir.path(), &limits).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("memory.limit_in_bytes")).unwrap(),
            "268435456"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("memory.memsw.limit_in_bytes")).unwrap(),
            "402653184",
            "v1 limits memory and swap together"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        let v2 = Hierarchy {
            mount: "/x".into(),
            controllers: vec![],
            v2: true,
        };
        apply(&v2, dir.path(), &limits).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("cpu.max")).unwrap(),
            "50000 100000"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("memory.max")).unwrap(),
            "268435456"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("memory.swap.max")).unwrap(),
            "134217728"
        );
    }

    #[test]
    fn swap_is_checked_and_read_as_runc_reads_it() {
        let mib = |n: i64| n << 20;
        assert_eq!(swap_beyond_memory(Some(mib(64)), None).unwrap(), None);
        assert_eq!(swap_beyond_memory(Some(mib(64)), Some(0)).unwrap(), None);
        assert_eq!(swap_beyond_memory(None, Some(-1)).unwrap(), Some(-1));
        assert_eq!(
            swap_beyond_memory(Some(mib(64)), Some(mib(128))).unwrap(),
            Some(mib(64)),
            "docker's default: swap as large as the memory limit"
        );
        assert_eq!(
            swap_beyond_memory(Some(mib(64)), Some(mib(64))).unwrap(),
            Some(0)
        );
        let below = swap_beyond_memory(Some(mib(64)), Some(mib(32))).unwrap_err();
        assert!(
            below.to_string().contains("below the memory limit"),
            "{below}"
        );
        let alone = swap_beyond_memory(None, Some(mib(32))).unwrap_err();
        assert!(
            alone.to_string().contains("needs a memory limit"),
            "{alone}"
        );
    }
}
