//! The disk image cache: one read-only ext4 image per image key, built with `mkfs.ext4 -d`
//! from the image's layers (the lower layers of the bundle's overlay, never its writable
//! layer: that one is the container's, and reaches the guest through the share).
//!
//! Builds are serialised per key by a lock file, written to a `.partial` file, synced and
//! renamed, so that a reader sees either no image or a complete one.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::{ImageError, ImageKey};

/// `DIR/<key>.ext4` images, shared by every VM of that image (attached read-only).
#[derive(Debug, Clone)]
pub struct DiskImages {
    dir: PathBuf,
}

impl DiskImages {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DiskImages { dir: dir.into() }
    }

    pub fn path_for(&self, key: &ImageKey) -> PathBuf {
        self.dir.join(format!("{key}.ext4"))
    }

    /// The image for `key`, built from `layers` (an overlay's lower directories, topmost
    /// first) if it is not cached yet. Also says whether this call built it.
    pub fn get_or_build(
        &self,
        key: &ImageKey,
        layers: &[PathBuf],
    ) -> Result<(PathBuf, bool), ImageError> {
        let path = self.path_for(key);
        if path.exists() {
            return Ok((path, false));
        }
        crate::private_dir(&self.dir).map_err(ImageError::io(&self.dir))?;
        let lock_path = self.dir.join(format!("{key}.lock"));
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(ImageError::io(&lock_path))?;
        let _lock =
            Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| ImageError::Io {
                path: lock_path.clone(),
                source: e.into(),
            })?;
        if path.exists() {
            // Another create built it while this one waited.
            return Ok((path, false));
        }
        let partial = self.dir.join(format!("{key}.ext4.partial"));
        let merged = self.dir.join(format!("{key}.layers"));
        let result = with_layers_merged(layers, &merged, |tree| build_ext4(tree, &partial))
            .and_then(|()| {
                File::open(&partial)
                    .and_then(|f| f.sync_all())
                    .map_err(ImageError::io(&partial))?;
                std::fs::rename(&partial, &path).map_err(ImageError::io(&path))?;
                File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(ImageError::io(&self.dir))
            });
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result.map(|()| (path, true))
    }
}

/// Runs `f` on one tree holding `layers` merged: the layer itself if there is one, else a
/// read-only overlay of them mounted at `at` for the call (the host kernel applies the
/// layers' whiteouts and opaque directories).
fn with_layers_merged<T>(
    layers: &[PathBuf],
    at: &Path,
    f: impl FnOnce(&Path) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    match layers {
        [] => Err(ImageError::NoLayers),
        [only] => f(only),
        _ => {
            std::fs::create_dir_all(at).map_err(ImageError::io(at))?;
            let lowerdir: Vec<String> = layers.iter().map(|l| escape_layer(l)).collect();
            let options = format!("lowerdir={}", lowerdir.join(":"));
            mount(
                Some("overlay"),
                at,
                Some("overlay"),
                MsFlags::MS_RDONLY,
                Some(options.as_str()),
            )
            .map_err(|e| ImageError::Io {
                path: at.to_path_buf(),
                source: std::io::Error::other(format!("mount the image's layers: {e}")),
            })?;
            let result = f(at);
            if let Err(e) = umount2(at, MntFlags::MNT_DETACH) {
                log::warn!("unmount {}: {e}", at.display());
            }
            let _ = std::fs::remove_dir(at);
            result
        }
    }
}

/// A layer path as overlayfs's `lowerdir=` list takes it: `:`, `,` and `\` escaped.
fn escape_layer(layer: &Path) -> String {
    let mut out = String::new();
    for c in layer.to_string_lossy().chars() {
        if matches!(c, ':' | ',' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What the tree needs: bytes in 4 KiB blocks, and inodes.
fn measure(root: &Path) -> Result<(u64, u64), ImageError> {
    let mut blocks = 0u64;
    let mut inodes = 1u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(ImageError::io(&dir))? {
            let entry = entry.map_err(ImageError::io(&dir))?;
            let meta = entry.metadata().map_err(ImageError::io(entry.path()))?;
            inodes += 1;
            blocks += meta.size().div_ceil(4096).max(1);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((blocks * 4096, inodes))
}

fn build_ext4(rootfs: &Path, out: &Path) -> Result<(), ImageError> {
    let (bytes, inodes) = measure(rootfs)?;
    // Room for metadata and the inode tables; read-only, so no journal and no reserve.
    let mut size_kib = (bytes + bytes / 4 + inodes * 512) / 1024 + 8 * 1024;
    let inodes = inodes + inodes / 4 + 64;
    for _attempt in 0..3 {
        let _ = std::fs::remove_file(out);
        let output = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-m",
                "0",
                "-O",
                "^has_journal,^resize_inode",
            ])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(rootfs)
            .arg(out)
            .arg(format!("{size_kib}K"))
            .output()
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => ImageError::MkfsMissing,
                _ => ImageError::io("mkfs.ext4")(e),
            })?;
        if output.status.success() {
            return Ok(());
        }
        let message = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if !message.contains("Could not allocate") && !message.contains("No space left") {
            return Err(ImageError::Mkfs {
                rootfs: rootfs.to_path_buf(),
                message,
            });
        }
        log::debug!(
            "mkfs.ext4: {size_kib} KiB too small for {}, retrying",
            rootfs.display()
        );
        size_kib *= 2;
    }
    Err(ImageError::Mkfs {
        rootfs: rootfs.to_path_buf(),
        message: "image size estimate too small after retries".into(),
    })
}
