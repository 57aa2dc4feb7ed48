//! The container's cgroup v2 in the guest: made at setup with the settings the host
//! translated from config.json's `linux.resources`, joined by every container process before
//! its `exec`, seen by the container as its `/sys/fs/cgroup` root (a cgroup namespace), written
//! again by a live update, read for the host's stats, and watched for OOM kills.
//!
//! The hierarchy is mounted in the initramfs, before the agent enters the container root, so
//! that the container never sees the VM's root cgroup; from then on the agent reaches it only
//! through the directory descriptor it keeps.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use agent_proto::{CgroupSetting, CgroupSpec};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

use crate::error::{err, SetupError};

/// Where the agent mounts the guest's cgroup2 hierarchy (in the initramfs: out of the
/// container's sight once the root is entered).
const HIERARCHY: &str = "/sm/cgroup";
/// The container's cgroup, under the hierarchy's root.
const CONTAINER: &str = "container";
/// The controllers delegated to the container's cgroup, those the guest kernel has.
const CONTROLLERS: [&str; 6] = ["cpu", "cpuset", "io", "memory", "pids", "hugetlb"];
/// The files the host's stats are made from (those the guest kernel has).
const STATS_FILES: [&str; 9] = [
    "memory.current",
    "memory.max",
    "memory.stat",
    "memory.events",
    "memory.swap.current",
    "cpu.stat",
    "pids.current",
    "pids.max",
    "io.stat",
];

#[derive(Debug)]
pub struct ContainerCgroup {
    /// The container cgroup's directory.
    dir: OwnedFd,
    /// An inotify descriptor watching its `memory.events` (the kernel reports every change
    /// of that file as a modification); `None` without the memory controller.
    events: Option<OwnedFd>,
    /// `oom_kill` of `memory.events` when last reported.
    oom_kills: u64,
}

impl ContainerCgroup {
    /// Mounts the hierarchy, delegates the controllers, makes the container's cgroup and
    /// writes its settings in order; a setting the guest kernel lacks fails naming its file.
    pub fn create(spec: &CgroupSpec) -> Result<Self, SetupError> {
        fs::create_dir_all(HIERARCHY).map_err(err(format!("mkdir {HIERARCHY}")))?;
        mount(
            Some("cgroup2"),
            HIERARCHY,
            Some("cgroup2"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(err(format!("mount cgroup2 on {HIERARCHY}")))?;
        let root = Path::new(HIERARCHY);
        let available = fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(err("read the guest's cgroup.controllers"))?;
        let enable: Vec<String> = CONTROLLERS
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !enable.is_empty() {
            fs::write(root.join("cgroup.subtree_control"), enable.join(" ")).map_err(err(
                format!("enable cgroup controllers {}", enable.join(" ")),
            ))?;
        }
        let path = root.join(CONTAINER);
        fs::create_dir(&path).map_err(err(format!("mkdir {}", path.display())))?;
        let dir = nix::fcntl::open(
            &path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err(format!("open {}", path.display())))?;
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        let dir = unsafe { OwnedFd::from_raw_fd(dir) };
        let events = if path.join("memory.events").exists() {
            Some(watch_modifications(&path.join("memory.events"))?)
        } else {
            None
        };
        let cgroup = ContainerCgroup {
            dir,
            events,
            oom_kills: 0,
        };
        cgroup.write(&spec.settings).map_err(SetupError)?;
        Ok(cgroup)
    }

    /// Writes each setting in order (a live update); stops at the first that fails, naming
    /// its file and value.
    pub fn write(&self, settings: &[CgroupSetting]) -> Result<(), String> {
        for setting in settings {
            let fd = openat(
                Some(self.dir.as_raw_fd()),
                setting.file.as_str(),
                OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
            .map_err(|e| match e {
                Errno::ENOENT => format!(
                    "cgroup setting {}={}: the guest kernel has no {}",
                    setting.file, setting.value, setting.file
                ),
                e => format!("cgroup setting {}={}: {e}", setting.file, setting.value),
            })?;
            // SAFETY: `openat` returned a new descriptor that nothing else owns.
            let file = unsafe { fs::File::from_raw_fd(fd) };
            // One write: the kernel parses each write to an interface file as a whole value.
            let written = nix::unistd::write(file.as_fd(), setting.value.as_bytes());
            match written {
                Ok(n) if n == setting.value.len() => {}
                Ok(n) => {
                    return Err(format!(
                        "cgroup setting {}={}: short write ({n} bytes)",
                        setting.file, setting.value
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "cgroup setting {}={}: {e}",
                        setting.file, setting.value
                    ))
                }
            }
        }
        Ok(())
    }

    /// The contents of the stats files the guest kernel has.
    pub fn stats(&self) -> BTreeMap<String, String> {
        STATS_FILES
            .iter()
            .filter_map(|&file| Some((file.to_string(), self.read(file)?)))
            .collect()
    }

    fn read(&self, file: &str) -> Option<String> {
        let fd = openat(
            Some(self.dir.as_raw_fd()),
            file,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .ok()?;
        // SAFETY: `openat` returned a new descriptor that nothing else owns.
        let mut file = unsafe { fs::File::from_raw_fd(fd) };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).ok()?;
        Some(text)
    }

    /// The container's `cgroup.procs`, opened for a process about to be spawned: it writes
    /// itself in (`0`) before it `exec`s.
    pub fn open_procs(&self) -> Result<OwnedFd, String> {
        let fd = openat(
            Some(self.dir.as_raw_fd()),
            "cgroup.procs",
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("open the container cgroup's cgroup.procs: {e}"))?;
        // SAFETY: `openat` returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// What to poll for OOM kills.
    pub fn events_fd(&self) -> Option<BorrowedFd<'_>> {
        self.events.as_ref().map(|fd| fd.as_fd())
    }

    /// How many more of the container's processes the OOM killer killed since the last call
    /// (`None`: none); drains the watch.
    pub fn new_oom_kills(&mut self) -> Option<u64> {
        if let Some(events) = &self.events {
            let mut buf = [0u8; 1024];
            while matches!(nix::unistd::read(events.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
        }
        let kills = oom_kills(&self.read("memory.events")?)?;
        let new = kills.checked_sub(self.oom_kills).filter(|&n| n > 0)?;
        self.oom_kills = kills;
        Some(new)
    }

    /// Mounts cgroup2 on `target` from inside a cgroup namespace rooted at the container's
    /// cgroup, so that the mount's root is that cgroup (the kernel roots a cgroup2 mount at
    /// the mounting process's namespace root). A child does it: a process that joined the
    /// container's cgroup namespace could never leave it.
    pub fn mount_rooted(&self, target: &Path, flags: MsFlags) -> Result<(), SetupError> {
        if !target.is_dir() {
            fs::create_dir_all(target).map_err(err(format!("mkdir {}", target.display())))?;
        }
        let procs = self.open_procs().map_err(SetupError)?;
        let target_c = CString::new(target.as_os_str().as_bytes())
            .map_err(err(format!("cgroup mount target {}", target.display())))?;
        let source = c"cgroup2";
        // SAFETY: the child runs only async-signal-safe system calls on memory prepared
        // before the fork (the agent has other threads), then `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(SetupError(format!(
                "fork to mount cgroup2 on {}: {}",
                target.display(),
                std::io::Error::last_os_error()
            )));
        }
        if pid == 0 {
            mount_rooted_child(procs.as_raw_fd(), source.as_ptr(), target_c.as_ptr(), flags);
        }
        let status =
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).map_err(err(
                format!("wait for the cgroup2 mount on {}", target.display()),
            ))?;
        match status {
            nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
            nix::sys::wait::WaitStatus::Exited(_, step) => Err(SetupError(format!(
                "mount cgroup2 on {} in the container's cgroup namespace: {} failed",
                target.display(),
                match step {
                    1 => "joining the container's cgroup",
                    2 => "unshare(CLONE_NEWCGROUP)",
                    _ => "mount",
                }
            ))),
            other => Err(SetupError(format!(
                "mount cgroup2 on {}: the helper ended with {other:?}",
                target.display()
            ))),
        }
    }
}

/// The forked child of [`ContainerCgroup::mount_rooted`]: its exit code says which step
/// failed.
fn mount_rooted_child(
    procs: RawFd,
    source: *const libc::c_char,
    target: *const libc::c_char,
    flags: MsFlags,
) -> ! {
    // SAFETY: raw system calls on a descriptor and C strings the parent prepared (they stay
    // valid in this copy of its memory); `_exit` ends the child without running the
    // parent's exit handlers.
    unsafe {
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(1);
        }
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            libc::_exit(2);
        }
        if libc::mount(source, target, source, flags.bits(), std::ptr::null()) != 0 {
            libc::_exit(3);
        }
        libc::_exit(0)
    }
}

/// Joins the container's cgroup (through its `cgroup.procs`, opened by the agent) and makes
/// it the root of a new cgroup namespace: runs in a spawned child, before its `exec`.
pub fn join(procs: RawFd) -> Result<(), String> {
    // SAFETY: `procs` is an open descriptor of the child's; the buffer lives across the call.
    if unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) } != 1 {
        return Err(format!(
            "join the container's cgroup: {}",
            std::io::Error::last_os_error()
        ));
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| format!("new cgroup namespace: {e}"))
}

/// An inotify descriptor watching `path` for modifications, non-blocking.
fn watch_modifications(path: &Path) -> Result<OwnedFd, SetupError> {
    // SAFETY: inotify_init1 takes flags only.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(SetupError(format!(
            "inotify: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(err(format!("watch {}", path.display())))?;
    // SAFETY: a valid inotify descriptor and a NUL-terminated path that outlives the call.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), name.as_ptr(), libc::IN_MODIFY) } < 0 {
        return Err(SetupError(format!(
            "watch {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(fd)
}

/// `oom_kill` of a `memory.events` file.
fn oom_kills(events: &str) -> Option<u64> {
    events.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_count_is_read_from_memory_events() {
        let events = "low 0\nhigh 0\nmax 31\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills(events), Some(2));
        assert_eq!(oom_kills("low 0\n"), None);
    }
}
