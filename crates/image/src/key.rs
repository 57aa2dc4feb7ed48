//! The image key of a container root filesystem (see the crate docs for the order).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ImageError;

/// Annotations that name the image a bundle's rootfs was made from, in order of preference.
pub const IMAGE_ANNOTATIONS: [&str; 3] = [
    "run.supermachine.image",
    "org.opencontainers.image.digest",
    "io.containerd.image.digest",
];

/// Where a key came from; shown by `cache ls` and in debug logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    Annotation(String),
    OverlayLowerdirs,
    /// A root served whole from its host directory: no image of it is made, so every such
    /// root is one key.
    SharedDirectory,
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Annotation(name) => write!(f, "annotation {name}"),
            KeySource::OverlayLowerdirs => f.write_str("overlay lowerdirs"),
            KeySource::SharedDirectory => f.write_str("shared directory"),
        }
    }
}

/// Identifies the content of a root filesystem: 32 hex digits of a SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageKey {
    hex: String,
    source: KeySource,
}

impl fmt::Display for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex)
    }
}

impl ImageKey {
    pub fn as_str(&self) -> &str {
        &self.hex
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    fn from_parts(source: KeySource, parts: &[&[u8]]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(source.to_string().as_bytes());
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        let hex: String = hasher.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        ImageKey { hex, source }
    }

    /// The key of a root laid out as `layout`: its content as the runtime sees it (the
    /// lower layers it makes the image of; nothing of a shared directory), labelled by an
    /// image annotation where the bundle has one. The annotation is the caller's word, so it
    /// is hashed with the content, never instead of it: a bundle that claims another image's
    /// annotation over other layers gets a key, and an image, of its own.
    pub fn for_root(layout: &RootLayout, annotations: &HashMap<String, String>) -> Self {
        let (source, content) = match layout {
            RootLayout::Layered(layers) => (
                KeySource::OverlayLowerdirs,
                image_layers(&layers.lower).join("\n"),
            ),
            RootLayout::Directory => (KeySource::SharedDirectory, String::new()),
        };
        let annotation = IMAGE_ANNOTATIONS.iter().find_map(|name| {
            annotations
                .get(*name)
                .filter(|v| !v.is_empty())
                .map(|value| (*name, value))
        });
        match annotation {
            Some((name, value)) => Self::from_parts(
                KeySource::Annotation(name.to_string()),
                &[
                    value.as_bytes(),
                    source.to_string().as_bytes(),
                    content.as_bytes(),
                ],
            ),
            None => Self::from_parts(source, &[content.as_bytes()]),
        }
    }

    /// The key of the root at `rootfs`.
    pub fn for_rootfs(
        rootfs: &Path,
        annotations: &HashMap<String, String>,
    ) -> Result<Self, ImageError> {
        Ok(Self::for_root(&RootLayout::of(rootfs)?, annotations))
    }
}

/// How a bundle's root filesystem is laid out on the host, which decides where the
/// container's writes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootLayout {
    /// An overlay with a writable layer (docker's and containerd's snapshotters): the image
    /// is its lower layers, the container's own files its upper directory.
    Layered(OverlayLayers),
    /// Anything else (a plain directory from `runc spec`, a bind mount, a read-only
    /// overlay): the directory itself takes the container's writes.
    Directory,
}

impl RootLayout {
    /// The layout of the root at `rootfs`, from the mount table.
    pub fn of(rootfs: &Path) -> Result<Self, ImageError> {
        let canonical = rootfs.canonicalize().map_err(ImageError::io(rootfs))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Ok(match overlay_layers(&mountinfo, &canonical) {
            Some(layers) if layers.upper.is_some() && layers.work.is_some() => {
                RootLayout::Layered(layers)
            }
            _ => RootLayout::Directory,
        })
    }
}

/// The directories of an overlay mount, as its options name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayLayers {
    /// Topmost first, as in `lowerdir=`.
    pub lower: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    /// The mount's own options (`rw`, `nodev`, `relatime`, …) and the overlay's (its layers
    /// and features), as mountinfo shows them.
    pub mount_options: String,
    pub super_options: String,
}

/// The layers of the overlay mounted at `mount_point`, from mountinfo text. Relative layer
/// paths (docker's `l/…` links, used when the options would not fit in a page) are taken
/// relative to the directory that holds the upper directory's layer, as docker mounts them.
pub fn overlay_layers(mountinfo: &str, mount_point: &Path) -> Option<OverlayLayers> {
    let wanted = mount_point.to_str()?;
    // The last matching line is the mount on top.
    mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = unescape(left.split(' ').nth(4)?);
        let mut right = right.split(' ');
        let fstype = right.next()?;
        if point != wanted || fstype != "overlay" {
            return None;
        }
        let mount_options = left.split(' ').nth(5)?.to_string();
        let options = right.nth(1)?;
        let option = |name: &str| {
            options
                .split(',')
                .find_map(|o| o.strip_prefix(name))
                .map(unescape)
        };
        let upper = option("upperdir=").map(PathBuf::from);
        let work = option("workdir=").map(PathBuf::from);
        let base = upper
            .as_deref()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let lower = option("lowerdir=")?
            .split(':')
            .map(|dir| match &base {
                Some(base) if Path::new(dir).is_relative() => base.join(dir),
                _ => PathBuf::from(dir),
            })
            .collect();
        Some(OverlayLayers {
            lower,
            upper,
            work,
            mount_options,
            super_options: options.to_string(),
        })
    })
}

/// Resolves layer links and drops docker's per-container `-init` layer, whose content is the
/// same for every container but whose directory is not.
fn image_layers(lowerdirs: &[PathBuf]) -> Vec<String> {
    lowerdirs
        .iter()
        .map(|dir| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()))
        .filter(|dir| {
            !dir.parent()
                .and_then(|p| p.file_name())
                .is_some_and(|name| name.to_string_lossy().ends_with("-init"))
        })
        .map(|dir| dir.to_string_lossy().into_owned())
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
300 22 0:77 / /run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs rw,relatime - overlay overlay rw,lowerdir=/var/lib/containerd/snapshots/3/fs:/var/lib/containerd/snapshots/2/fs,upperdir=/var/lib/containerd/snapshots/4/fs,workdir=/var/lib/containerd/snapshots/4/work
301 22 0:78 / /with\\040space rw - overlay overlay rw,lowerdir=/l/a\\040b,upperdir=/u,workdir=/w
";

    #[test]
    fn layers_come_from_the_overlay_at_the_rootfs() {
        let layers = overlay_layers(
            MOUNTINFO,
            Path::new("/run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs"),
        )
        .unwrap();
        assert_eq!(
            layers,
            OverlayLayers {
                lower: vec![
                    "/var/lib/containerd/snapshots/3/fs".into(),
                    "/var/lib/containerd/snapshots/2/fs".into()
                ],
                upper: Some("/var/lib/containerd/snapshots/4/fs".into()),
                work: Some("/var/lib/containerd/snapshots/4/work".into()),
                mount_options: "rw,relatime".into(),
                super_options: "rw,lowerdir=/var/lib/containerd/snapshots/3/fs:/var/lib/containerd/snapshots/2/fs,upperdir=/var/lib/containerd/snapshots/4/fs,workdir=/var/lib/containerd/snapshots/4/work".into(),
            }
        );
        assert_eq!(overlay_layers(MOUNTINFO, Path::new("/")), None);
    }

    #[test]
    fn escaped_mount_points_and_layers_are_decoded() {
        let layers = overlay_layers(MOUNTINFO, Path::new("/with space")).unwrap();
        assert_eq!(layers.lower, vec![PathBuf::from("/l/a b")]);
    }

    #[test]
    fn relative_layers_are_under_the_upper_layers_home() {
        let mountinfo = "400 22 0:90 / /m rw - overlay overlay rw,lowerdir=l/AB:l/CD,upperdir=/var/lib/docker/overlay2/x/diff,workdir=/var/lib/docker/overlay2/x/work\n";
        let layers = overlay_layers(mountinfo, Path::new("/m")).unwrap();
        assert_eq!(
            layers.lower,
            vec![
                PathBuf::from("/var/lib/docker/overlay2/l/AB"),
                PathBuf::from("/var/lib/docker/overlay2/l/CD")
            ]
        );
    }

    #[test]
    fn docker_init_layer_does_not_change_the_key() {
        let a = image_layers(&[
            "/var/lib/docker/overlay2/aaa-init/diff".into(),
            "/var/lib/docker/overlay2/layer1/diff".into(),
        ]);
        let b = image_layers(&[
            "/var/lib/docker/overlay2/bbb-init/diff".into(),
            "/var/lib/docker/overlay2/layer1/diff".into(),
        ]);
        assert_eq!(a, b);
        assert_eq!(a, vec!["/var/lib/docker/overlay2/layer1/diff".to_string()]);
    }

    fn layered(lower: &str) -> RootLayout {
        RootLayout::Layered(OverlayLayers {
            lower: vec![PathBuf::from(lower)],
            upper: Some("/upper".into()),
            work: Some("/work".into()),
            mount_options: String::new(),
            super_options: String::new(),
        })
    }

    #[test]
    fn an_annotation_labels_the_key_but_never_stands_for_the_layers() {
        let mut annotations = HashMap::new();
        annotations.insert(
            "org.opencontainers.image.digest".to_string(),
            "sha256:abc".to_string(),
        );
        let key = ImageKey::for_root(&layered("/layers/a"), &annotations);
        assert_eq!(
            key.source(),
            &KeySource::Annotation("org.opencontainers.image.digest".into())
        );
        // The same image on the same layers: one key.
        assert_eq!(key, ImageKey::for_root(&layered("/layers/a"), &annotations));
        // The same claim over other layers: another key.
        assert_ne!(key, ImageKey::for_root(&layered("/layers/b"), &annotations));
        // And the claim is part of the key: the layers without it are another image.
        assert_ne!(
            key,
            ImageKey::for_root(&layered("/layers/a"), &HashMap::new())
        );
    }

    #[test]
    fn every_shared_directory_has_one_key() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("file"), "one").unwrap();
        let none = HashMap::new();
        let first = ImageKey::for_rootfs(a.path(), &none).unwrap();
        assert_eq!(first.source(), &KeySource::SharedDirectory);
        assert_eq!(first, ImageKey::for_rootfs(b.path(), &none).unwrap());
    }
}
