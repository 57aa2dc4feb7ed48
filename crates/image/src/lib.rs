//! Container root filesystems as VM disk images, and the guest's initramfs.
//!
//! A bundle's `root.path` becomes a read-only ext4 image (`mkfs.ext4 -d`), cached by an
//! [`ImageKey`] so that every later bundle of the same image reuses it. The key comes, in
//! this order, from:
//! 1. an explicit image annotation (`run.supermachine.image`, `org.opencontainers.image.digest`,
//!    `io.containerd.image.digest`): the caller vouches that the rootfs is that image;
//! 2. the overlay lower layers the rootfs is mounted from (docker and containerd mount every
//!    container of one image from the same layer directories);
//! 3. a manifest of the tree's metadata (paths, types, modes, owners, sizes, mtimes, link
//!    targets): any change to a file changes its size or mtime.

mod cpio;
mod digest;
mod ext4;
mod key;

pub use cpio::{write_initramfs, Initramfs};
pub use digest::file_digest;
pub use ext4::DiskImages;
pub use key::{ImageKey, KeySource};

use std::path::PathBuf;

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
}

impl ImageError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { path, source }
    }
}
