//! Mounting the rootfs containerd describes (`CreateTaskRequest.rootfs`) at the bundle's
//! `rootfs`, as the runc shim does before it calls runc: an overlay of snapshot layers, or a
//! bind mount. And renewing the host's overlay at a bundle's root, whose upper directory the
//! guest writes behind its back.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use image::{OverlayLayers, RootLayout};

use crate::ContainerError;

/// Splits containerd's mount options into mount(2) flags and filesystem data.
pub fn split_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags -= MsFlags::MS_RDONLY,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "private" | "rprivate" | "defaults" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

pub fn mount_rootfs(
    fstype: &str,
    source: &str,
    options: &[String],
    target: &Path,
) -> Result<(), ContainerError> {
    std::fs::create_dir_all(target).map_err(ContainerError::io(target))?;
    let (flags, data) = split_options(options);
    let fstype = (!fstype.is_empty() && fstype != "bind" && !flags.contains(MsFlags::MS_BIND))
        .then_some(fstype);
    let source = (!source.is_empty()).then_some(source);
    mount(
        source,
        target,
        fstype,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| {
        ContainerError::Monitor(format!(
            "mount rootfs ({}) on {}: {e}",
            fstype.unwrap_or("bind"),
            target.display()
        ))
    })?;
    if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
        // A bind mount takes read-only only on a remount.
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| ContainerError::Monitor(format!("remount rootfs read-only: {e}")))?;
    }
    Ok(())
}

/// Replaces the overlay mounted at `rootfs` by a new mount of the same layers and options.
///
/// The guest writes the overlay's upper directory directly, not through this mount, and an
/// overlay caches what it has looked up, without checking its layers again: a directory it
/// found only in a lower layer stays that, even after the guest has made it in the upper
/// one. Docker looks paths up in the root before the container starts (the working
/// directory, `/etc/passwd`, mount points), and `docker cp` out of a running container reads
/// through this same mount, so a file the container writes into its image's working
/// directory would stay invisible to it. A new mount starts with nothing cached. Docker and
/// containerd find their mount where they left it, and unmount it when they are done.
///
/// Skipped (returns false) where the options cannot be given back as they were: relative
/// layer paths (docker's short links, used when the options exceed a page) or escaped
/// characters.
pub fn renew_overlay(rootfs: &Path, layers: &OverlayLayers) -> Result<bool, ContainerError> {
    let options = &layers.super_options;
    let relative_layers = options
        .split(',')
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .flat_map(|dirs| dirs.split(':'))
        .any(|dir| !dir.starts_with('/'));
    if options.contains('\\') || relative_layers {
        log::debug!(
            "root overlay at {} kept: its options do not round-trip",
            rootfs.display()
        );
        return Ok(false);
    }
    let data: Vec<&str> = options
        .split(',')
        .filter(|o| !matches!(*o, "rw" | "ro"))
        .collect();
    let data = data.join(",");
    let mut flags = MsFlags::empty();
    for option in layers.mount_options.split(',') {
        flags |= match option {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            _ => MsFlags::empty(),
        };
    }
    umount2(rootfs, MntFlags::MNT_DETACH).map_err(|e| {
        ContainerError::Monitor(format!(
            "renew the root overlay: unmount {}: {e}",
            rootfs.display()
        ))
    })?;
    mount(
        Some("overlay"),
        rootfs,
        Some("overlay"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| {
        ContainerError::Monitor(format!(
            "renew the root overlay: mount {} again: {e}",
            rootfs.display()
        ))
    })?;
    Ok(true)
}

/// Holds the lock of the root at `rootfs` against [`renew_overlay`] elsewhere: from reading
/// the mount table to the mount, nobody else finds the root unmounted (a create of another
/// container of the same bundle, a renewer). The lock is the directory that holds the root:
/// the root itself is a different directory once mounted over.
pub fn lock_root(rootfs: &Path) -> Result<Flock<std::fs::File>, ContainerError> {
    let holder = rootfs.parent().unwrap_or(rootfs);
    let dir = std::fs::File::open(holder).map_err(ContainerError::io(holder))?;
    Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, e)| {
        ContainerError::Monitor(format!("lock the root at {}: {e}", rootfs.display()))
    })
}

/// How long the renewer waits after a change before it renews: a burst of changes (an
/// unpacked archive, a package install) costs one mount.
const RENEW_DELAY: Duration = Duration::from_millis(200);

/// Renews the host overlay at a root ([`renew_overlay`]) after the guest changed names in its
/// upper directory: what the host looks up afterwards (`docker cp`, `docker export` of the
/// running container) is found as the container left it, not as the host cached it. Its
/// thread ends when the renewer is dropped.
#[derive(Debug, Clone)]
pub struct OverlayRenewer {
    changed: mpsc::SyncSender<()>,
}

impl OverlayRenewer {
    pub fn start(rootfs: PathBuf) -> Result<OverlayRenewer, ContainerError> {
        let (changed, changes) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("root-renew".into())
            .spawn(move || {
                while changes.recv().is_ok() {
                    std::thread::sleep(RENEW_DELAY);
                    while changes.try_recv().is_ok() {}
                    let _locked = match lock_root(&rootfs) {
                        Ok(lock) => lock,
                        Err(e) => {
                            log::warn!("{e}");
                            continue;
                        }
                    };
                    let renewed = match RootLayout::of(&rootfs) {
                        Ok(RootLayout::Layered(layers)) => renew_overlay(&rootfs, &layers),
                        Ok(RootLayout::Directory) => Ok(false),
                        Err(e) => Err(ContainerError::from(e)),
                    };
                    if let Err(e) = renewed {
                        log::warn!("{e}");
                    }
                }
            })
            .map_err(|e| ContainerError::Monitor(format!("start the root renewer: {e}")))?;
        Ok(OverlayRenewer { changed })
    }

    /// The guest changed names in the upper directory.
    pub fn changed(&self) {
        let _ = self.changed.try_send(());
    }
}

/// Unmounts the rootfs the shim mounted; under the root's lock, so that a renewer finishing
/// its last renewal does not mount it again afterwards.
pub fn unmount_rootfs(target: &Path) {
    let _locked = lock_root(target).inspect_err(|e| log::debug!("{e}")).ok();
    if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
        log::debug!("unmount {}: {e}", target.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_are_data_and_bind_options_are_flags() {
        let overlay =
            ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/a:/b"].map(String::from);
        let (flags, data) = split_options(&overlay);
        assert_eq!(flags, MsFlags::empty());
        assert_eq!(data, "index=off,workdir=/w,upperdir=/u,lowerdir=/a:/b");
        let (flags, data) = split_options(&["rbind".into(), "ro".into()]);
        assert_eq!(
            flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
        assert!(data.is_empty());
    }

    #[test]
    fn an_overlay_whose_options_do_not_round_trip_is_left_alone() {
        for options in [
            "rw,lowerdir=l/AB:l/CD,upperdir=/u/diff,workdir=/u/work",
            "rw,lowerdir=/a\\040b,upperdir=/u/diff,workdir=/u/work",
        ] {
            let layers = OverlayLayers {
                lower: vec!["/l/AB".into()],
                upper: Some("/u/diff".into()),
                work: Some("/u/work".into()),
                mount_options: "rw,relatime".into(),
                super_options: options.into(),
            };
            // Nothing is mounted there: a renewal that went on would fail to unmount it.
            let renewed = renew_overlay(Path::new("/nonexistent/rootfs"), &layers);
            assert!(matches!(renewed, Ok(false)), "{options}: {renewed:?}");
        }
    }
}
