//! The container root: the image's layers from their disk under an overlay whose upper
//! layer is the container's own layer on the host (through the share), or a host directory
//! shared whole; the OCI mounts inside it, and the switch into it.
//!
//! The agent starts in the initramfs, which cannot be `pivot_root`ed away from; like
//! `switch_root`, it moves the new root onto `/` and chroots into it, before it mounts
//! anything for the container. From then on the kernel resolves every path inside the
//! container root (an image's absolute symlinks point into it, `..` stops at it), so the
//! OCI mount targets are used as they are: resolving them by hand, one `lstat` per
//! component, was most of the container setup's system calls, and where the guest kernel
//! is emulated each costs milliseconds. Everything the agent does afterwards (process
//! spawns, `/proc` scans) sees the container's filesystem.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agent_proto::{
    ContainerSetup, DeviceKind, DeviceNode, MountKind, MountSpec, PropagationKind, RootPropagation,
    RootSource, RootfsSpec,
};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::cgroup::ContainerCgroup;
use crate::error::{err, SetupError};
use crate::shares::Shares;
use crate::{agent_debug, agent_log};

const IMAGE_DIR: &str = "/sm/image";
const ROOT_DIR: &str = "/sm/root";
/// The guest overlay's options beyond its layers: the upper directory is the host overlay's,
/// so the guest writes only what the host overlay (docker's `overlay2`, containerd's
/// snapshotter) reads back: no index, no redirects, no metadata-only copies.
const OVERLAY_OPTIONS: &str = "index=off,redirect_dir=off,metacopy=off";

/// Mounts the image's disk read-only, if the root has one; returns where its files are (for
/// reading them into the caches before a snapshot).
pub fn prepare_root(rootfs: &RootfsSpec) -> Result<Option<&'static Path>, SetupError> {
    let Some((device, fstype)) = rootfs.source.image_disk() else {
        return Ok(None);
    };
    fs::create_dir_all(IMAGE_DIR).map_err(err(format!("mkdir {IMAGE_DIR}")))?;
    mount(
        Some(device),
        IMAGE_DIR,
        Some(fstype),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(err(format!("mount {device} ({fstype}) on {IMAGE_DIR}")))?;
    Ok(Some(Path::new(IMAGE_DIR)))
}

/// Makes the container root at [`ROOT_DIR`], not yet entered: the overlay of the image disk
/// (mounted by [`prepare_root`]) and the container's layer, or the shared directory.
fn mount_root(rootfs: &RootfsSpec, shares: &Shares) -> Result<(), SetupError> {
    fs::create_dir_all(ROOT_DIR).map_err(err(format!("mkdir {ROOT_DIR}")))?;
    match &rootfs.source {
        RootSource::Layered { upper, work, .. } => {
            let upper = shares.path(*upper);
            let work = shares.path(*work);
            let options = format!(
                "lowerdir={IMAGE_DIR},upperdir={},workdir={},{OVERLAY_OPTIONS}",
                upper.display(),
                work.display()
            );
            mount(
                Some("overlay"),
                ROOT_DIR,
                Some("overlay"),
                MsFlags::empty(),
                Some(options.as_str()),
            )
            .map_err(err("mount the root overlay over the container's layer"))
        }
        RootSource::Share { index } => mount(
            Some(&shares.path(*index)),
            ROOT_DIR,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("bind the shared root directory")),
    }
}

/// The container's mounts, made once the root is entered, in runc's order: config.json's
/// mounts as listed (so the container's mountinfo lists them so), a `/dev` if config.json has
/// none, the device nodes, `/dev/pts`, the root's propagation, the read-only then the masked
/// paths, and the read-only remount of the root last.
///
/// With a pid namespace the container's first process makes them, as PID 1 of the new
/// namespace (procfs shows the pid namespace of the process that mounts it, and `/proc` is
/// usually first): it shares the agent's mount namespace, root and memory, and its copy of
/// the agent's descriptors holds the share directory the binds come from, while the agent's
/// other threads serve the shares it looks up.
#[derive(Debug)]
pub struct ContainerMounts {
    shares: Shares,
    mounts: Vec<MountSpec>,
    devices: Vec<DeviceNode>,
    root_propagation: Option<RootPropagation>,
    masked: Vec<String>,
    readonly: Vec<String>,
    readonly_root: bool,
}

impl ContainerMounts {
    /// Runs in the container root: in the agent, or in the first process before it drops
    /// privileges. A cgroup filesystem in config.json is mounted rooted at the container's
    /// `cgroup`, when it has one.
    pub fn run(&self, cgroup: Option<&ContainerCgroup>) -> Result<(), SetupError> {
        let mut dev_done = false;
        for m in &self.mounts {
            match &m.kind {
                MountKind::Share {
                    index,
                    readonly,
                    options,
                } => {
                    let target = in_root(&m.destination);
                    self.shares
                        .bind(*index, &target, &m.destination, *readonly, options)?
                }
                // The container's cgroup as the root of its cgroup filesystem (see `cgroup`).
                MountKind::Filesystem {
                    fstype, options, ..
                } if matches!(fstype.as_str(), "cgroup" | "cgroup2") && cgroup.is_some() => {
                    if let Some(cgroup) = cgroup {
                        cgroup.mount_rooted(&in_root(&m.destination), parse_options(options).0)?
                    }
                }
                _ => mount_one(m)?,
            }
            dev_done |= m.destination == "/dev";
        }
        if !dev_done {
            let dev = in_root("/dev");
            mkdir_p(&dev)?;
            mount(
                Some("tmpfs"),
                &dev,
                Some("tmpfs"),
                MsFlags::MS_NOSUID,
                Some("mode=755"),
            )
            .map_err(err("mount /dev"))?;
            populate_dev(&dev)?;
        }
        for device in &self.devices {
            make_device(device)?;
        }
        ensure_devpts()?;
        if let Some(propagation) = self.root_propagation {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                propagation_flags(propagation),
                None::<&str>,
            )
            .map_err(err(format!("root propagation {propagation:?}")))?;
        }
        // runc's order: read-only paths, then masked ones.
        for path in &self.readonly {
            readonly_path(path)?;
        }
        for path in &self.masked {
            mask_path(path)?;
        }
        // Last, as runc does: every mount target missing from the image was made above.
        if self.readonly_root {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(err("remount the root read-only"))?;
        }
        Ok(())
    }
}

fn propagation_flags(propagation: RootPropagation) -> MsFlags {
    let kind = match propagation.kind {
        PropagationKind::Shared => MsFlags::MS_SHARED,
        PropagationKind::Slave => MsFlags::MS_SLAVE,
        PropagationKind::Private => MsFlags::MS_PRIVATE,
    };
    if propagation.recursive {
        kind | MsFlags::MS_REC
    } else {
        kind
    }
}

/// Makes the container root and enters it; after this `/` is the container's. Its mounts
/// are made here, or, with a pid namespace, returned for the first process to make.
pub fn setup_container(
    setup: &ContainerSetup,
    cgroup: Option<&ContainerCgroup>,
) -> Result<Option<ContainerMounts>, SetupError> {
    let rootfs = &setup.rootfs;
    // Through the VM's `/proc` (the container's may be mounted only by its first process).
    for (key, value) in &setup.sysctls {
        let file = Path::new("/proc/sys").join(key.replace('.', "/"));
        fs::write(&file, value).map_err(err(format!("sysctl {key}={value}")))?;
    }
    // Mounted outside the container root, so before entering it; the root is made of them.
    let layered = matches!(rootfs.source, RootSource::Layered { .. });
    let shares = Shares::mount(layered)?;
    mount_root(rootfs, &shares)?;
    enter_root(Path::new(ROOT_DIR))?;
    if let Some(hostname) = &setup.hostname {
        nix::unistd::sethostname(hostname).map_err(err(format!("sethostname {hostname}")))?;
    }
    let mounts = ContainerMounts {
        shares,
        mounts: setup.mounts.clone(),
        devices: setup.devices.clone(),
        root_propagation: setup.root_propagation,
        masked: setup.masked_paths.clone(),
        readonly: setup.readonly_paths.clone(),
        readonly_root: rootfs.readonly,
    };
    if !setup.pid_namespace {
        mounts.run(cgroup)?;
        return Ok(None);
    }
    // Checked now, so that a config the agent refuses fails the setup, not the first process.
    for m in &setup.mounts {
        refuse_kernel_filesystem_on_non_directory(m)?;
    }
    // The agent stays in the VM's namespace; its next child is PID 1 of the new one, and
    // every later child (exec) joins it.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(err("new pid namespace"))?;
    Ok(Some(mounts))
}

/// A `linux.devices` node, made as runc makes it: `mknod` (which needs no driver behind the
/// numbers), then the mode exactly (the umask does not apply) and the owner. A node that
/// exists already is left as it is.
fn make_device(device: &DeviceNode) -> Result<(), SetupError> {
    let target = in_root(&device.path);
    if let Some(parent) = target.parent() {
        mkdir_p(parent)?;
    }
    let kind = match device.kind {
        DeviceKind::Char => SFlag::S_IFCHR,
        DeviceKind::Block => SFlag::S_IFBLK,
        DeviceKind::Fifo => SFlag::S_IFIFO,
    };
    let mode = Mode::from_bits_truncate(device.mode & 0o7777);
    match mknod(&target, kind, mode, makedev(device.major, device.minor)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EEXIST) => return Ok(()),
        Err(e) => return Err(SetupError(format!("mknod {}: {e}", device.path))),
    }
    fs::set_permissions(&target, fs::Permissions::from_mode(device.mode & 0o7777))
        .map_err(err(format!("chmod {}", device.path)))?;
    nix::unistd::chown(
        &target,
        Some(nix::unistd::Uid::from_raw(device.uid)),
        Some(nix::unistd::Gid::from_raw(device.gid)),
    )
    .map_err(err(format!("chown {}", device.path)))
}

fn enter_root(root: &Path) -> Result<(), SetupError> {
    std::env::set_current_dir(root).map_err(err("chdir to the container root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(err("move the container root onto /"))?;
    nix::unistd::chroot(".").map_err(err("chroot into the container root"))?;
    std::env::set_current_dir("/").map_err(err("chdir /"))?;
    Ok(())
}

/// An OCI path (absolute, or relative to the root as runc takes it) in the entered root.
fn in_root(path: &str) -> PathBuf {
    Path::new("/").join(path)
}

/// As runc: procfs and sysfs go only on an ordinary directory of the image, never through a
/// symlink or over a file there (mounting through an image's symlink has been a way to put
/// them where the container's process can subvert them).
fn refuse_kernel_filesystem_on_non_directory(m: &MountSpec) -> Result<(), SetupError> {
    let MountKind::Filesystem { fstype, source, .. } = &m.kind else {
        return Ok(());
    };
    if !matches!(fstype.as_str(), "proc" | "sysfs") {
        return Ok(());
    }
    match fs::symlink_metadata(in_root(&m.destination)) {
        Ok(meta) if !meta.is_dir() => Err(SetupError(format!(
            "error mounting {:?} to rootfs at {:?}: filesystem {fstype:?} must be mounted on \
             ordinary directory",
            source, m.destination
        ))),
        _ => Ok(()),
    }
}

fn mount_one(m: &MountSpec) -> Result<(), SetupError> {
    refuse_kernel_filesystem_on_non_directory(m)?;
    let target = in_root(&m.destination);
    agent_debug!("mount {} -> {}", m.destination, target.display());
    match &m.kind {
        MountKind::Filesystem {
            fstype,
            source,
            options,
        } => {
            mkdir_p(&target)?;
            let (flags, data) = parse_options(options);
            let fstype = if fstype == "cgroup" {
                "cgroup2"
            } else {
                fstype.as_str()
            };
            let data = if fstype == "cgroup2" {
                String::new()
            } else {
                data
            };
            let result = mount(
                Some(source.as_str()),
                &target,
                Some(fstype),
                flags - MsFlags::MS_RDONLY,
                (!data.is_empty()).then_some(data.as_str()),
            );
            match result {
                Ok(()) => {}
                // A guest kernel without some cgroup or mqueue support still runs the container.
                Err(e) if matches!(fstype, "cgroup2" | "mqueue") => {
                    agent_log!("skipping {fstype} mount on {}: {e}", m.destination);
                    return Ok(());
                }
                Err(e) => {
                    return Err(SetupError(format!(
                        "mount {fstype} on {}: {e}",
                        m.destination
                    )))
                }
            }
            if m.destination == "/dev" && fstype == "tmpfs" {
                populate_dev(&target)?;
            }
            if flags.contains(MsFlags::MS_RDONLY) {
                remount_readonly(&target, flags)?;
            }
        }
        // Made by `Shares::bind`, which [`ContainerMounts::run`] calls.
        MountKind::Share { .. } => {
            return Err(SetupError(format!(
                "bind on {} outside the container setup",
                m.destination
            )))
        }
    }
    Ok(())
}

fn remount_readonly(target: &Path, flags: MsFlags) -> Result<(), SetupError> {
    let keep = flags & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | keep,
        None::<&str>,
    )
    .map_err(err(format!("remount {} read-only", target.display())))
}

/// Splits mount(8)-style options into flags and the data string for the filesystem.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            // Propagation and bind flags mean nothing for a filesystem made in the guest.
            "bind" | "rbind" | "private" | "rprivate" | "shared" | "rshared" | "slave"
            | "rslave" | "unbindable" | "runbindable" | "defaults" => continue,
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags = (flags | set) - clear;
    }
    (flags, data.join(","))
}

fn mkdir_p(path: &Path) -> Result<(), SetupError> {
    // Most targets exist in the image: one `stat` then, where creating first costs a failed
    // `mkdir` and a `stat`.
    if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(err(format!("mkdir {}", path.display())))
}

/// The device nodes and links a container expects in a fresh `/dev`, as runc makes them.
fn populate_dev(dev: &Path) -> Result<(), SetupError> {
    let nodes = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    for (name, major, minor) in nodes {
        let path = dev.join(name);
        match mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(SetupError(format!("mknod /dev/{name}: {e}"))),
        }
        // mknod honours the umask; the nodes must be world-usable.
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o666));
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        match symlink(target, dev.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(SetupError(format!("symlink /dev/{name}: {e}"))),
        }
    }
    for dir in ["pts", "shm"] {
        mkdir_p(&dev.join(dir))?;
    }
    Ok(())
}

/// Terminals need a devpts instance in the container; add one when config.json has none.
fn ensure_devpts() -> Result<(), SetupError> {
    let pts = in_root("/dev/pts");
    if pts.join("ptmx").exists() {
        return Ok(());
    }
    mkdir_p(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(err("mount /dev/pts"))
}

fn mask_path(path: &str) -> Result<(), SetupError> {
    let target = in_root(path);
    let Ok(meta) = fs::metadata(&target) else {
        return Ok(());
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(err(format!("mask {path}")))
}

fn readonly_path(path: &str) -> Result<(), SetupError> {
    let target = in_root(path);
    if fs::metadata(&target).is_err() {
        return Ok(());
    }
    mount(
        Some(&target),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err(format!("bind {path}")))?;
    remount_readonly(
        &target,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = [
            "nosuid",
            "strictatime",
            "mode=755",
            "size=65536k",
            "ro",
            "rbind",
        ]
        .map(String::from)
        .to_vec();
        let (flags, data) = parse_options(&opts);
        assert_eq!(
            flags,
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME | MsFlags::MS_RDONLY
        );
        assert_eq!(data, "mode=755,size=65536k");
    }

    #[test]
    fn root_propagation_maps_to_its_flags_recursive_only_when_asked() {
        let flags = |kind, recursive| propagation_flags(RootPropagation { kind, recursive });
        assert_eq!(flags(PropagationKind::Shared, false), MsFlags::MS_SHARED);
        assert_eq!(
            flags(PropagationKind::Slave, true),
            MsFlags::MS_SLAVE | MsFlags::MS_REC
        );
        assert_eq!(flags(PropagationKind::Private, false), MsFlags::MS_PRIVATE);
    }

    #[test]
    fn later_option_overrides_earlier() {
        let (flags, _) = parse_options(&["ro".to_string(), "rw".to_string()]);
        assert!(!flags.contains(MsFlags::MS_RDONLY));
    }
}
