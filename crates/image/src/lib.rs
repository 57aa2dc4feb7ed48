//! Container root filesystems as VM disk images, and the guest's initramfs.
//!
//! A bundle's root is laid out one of two ways ([`RootLayout`]). An overlay with a writable
//! layer (docker, containerd) gives its lower layers, the image, as a read-only ext4 image
//! (`mkfs.ext4 -d`), cached by an [`ImageKey`] so that every later container of the image
//! reuses it; its upper directory stays the container's. Any other root is a host directory
//! the guest is given whole, and has no disk image. The key is a digest of what the runtime
//! sees of the root: the overlay's lower layers (docker and containerd mount every container
//! of one image from the same layer directories), or for a shared directory one key for all
//! (nothing of the directory is in the snapshot). An image annotation
//! (`run.supermachine.image`, `org.opencontainers.image.digest`,
//! `io.containerd.image.digest`) labels the key and is hashed with that content, never
//! instead of it: a bundle cannot claim another image's key.

mod cpio;
mod digest;
mod ext4;
mod key;

pub use cpio::{write_initramfs, Initramfs};
pub use digest::file_digest;
pub use ext4::DiskImages;
pub use key::{overlay_layers, ImageKey, KeySource, OverlayLayers, RootLayout};

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Makes `dir` (and its missing parents) readable by its owner only: the cache holds the
/// containers' files and guest memory.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mkfs.ext4 failed for {rootfs}: {message}")]
    Mkfs { rootfs: PathBuf, message: String },
    #[error("mkfs.ext4 not found: install e2fsprogs")]
    MkfsMissing,
    #[error("the root's overlay has no lower layer to make an image of")]
    NoLayers,
}

impl ImageError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { path, source }
    }
}
