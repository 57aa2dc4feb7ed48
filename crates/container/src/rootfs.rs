//! Mounting the rootfs containerd describes (`CreateTaskRequest.rootfs`) at the bundle's
//! `rootfs`, as the runc shim does before it calls runc: an overlay of snapshot layers, or a
//! bind mount.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

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

pub fn unmount_rootfs(target: &Path) {
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
}
