//! The image key of a container root filesystem (see the crate docs for the order).

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
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
    Manifest,
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Annotation(name) => write!(f, "annotation {name}"),
            KeySource::OverlayLowerdirs => f.write_str("overlay lowerdirs"),
            KeySource::Manifest => f.write_str("content manifest"),
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

    /// The key of `rootfs`, by the first source that applies.
    pub fn for_rootfs(
        rootfs: &Path,
        annotations: &HashMap<String, String>,
    ) -> Result<Self, ImageError> {
        for name in IMAGE_ANNOTATIONS {
            if let Some(value) = annotations.get(name).filter(|v| !v.is_empty()) {
                return Ok(Self::from_parts(
                    KeySource::Annotation(name.to_string()),
                    &[value.as_bytes()],
                ));
            }
        }
        let canonical = rootfs.canonicalize().map_err(ImageError::io(rootfs))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if let Some(layers) = overlay_lowerdirs(&mountinfo, &canonical) {
            let layers = image_layers(&layers);
            let joined = layers.join("\n");
            return Ok(Self::from_parts(
                KeySource::OverlayLowerdirs,
                &[joined.as_bytes()],
            ));
        }
        let manifest = manifest(&canonical)?;
        Ok(Self::from_parts(KeySource::Manifest, &[&manifest]))
    }
}

/// The `lowerdir=` list of the overlay mounted at `mount_point`, from mountinfo text.
pub fn overlay_lowerdirs(mountinfo: &str, mount_point: &Path) -> Option<Vec<String>> {
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
        let options = right.nth(1)?;
        let lower = options
            .split(',')
            .find_map(|o| o.strip_prefix("lowerdir="))?;
        Some(lower.split(':').map(unescape).collect())
    })
}

/// Resolves layer links and drops docker's per-container `-init` layer, whose content is the
/// same for every container but whose directory is not.
fn image_layers(lowerdirs: &[String]) -> Vec<String> {
    lowerdirs
        .iter()
        .map(|dir| {
            std::fs::canonicalize(dir)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| dir.clone())
        })
        .filter(|dir| {
            !Path::new(dir)
                .parent()
                .and_then(|p| p.file_name())
                .is_some_and(|name| name.to_string_lossy().ends_with("-init"))
        })
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

/// A digest of the tree's metadata, in sorted path order.
fn manifest(root: &Path) -> Result<Vec<u8>, ImageError> {
    let mut hasher = Sha256::new();
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let path = root.join(&relative);
        let mut entries: Vec<_> = std::fs::read_dir(&path)
            .map_err(ImageError::io(&path))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        // Directories are pushed in reverse so that they pop in sorted order.
        let mut subdirs = Vec::new();
        for entry in entries {
            let rel = relative.join(entry.file_name());
            let meta = entry.metadata().map_err(ImageError::io(entry.path()))?;
            let link = if meta.file_type().is_symlink() {
                std::fs::read_link(entry.path()).unwrap_or_default()
            } else {
                PathBuf::new()
            };
            let line = format!(
                "{}\0{:o}\0{}\0{}\0{}\0{}.{}\0{}\0{}\n",
                rel.display(),
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.rdev(),
                link.display()
            );
            hasher.update(line.as_bytes());
            if meta.is_dir() {
                subdirs.push(rel);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(hasher.finalize().to_vec())
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
    fn lowerdirs_come_from_the_overlay_at_the_rootfs() {
        let layers = overlay_lowerdirs(
            MOUNTINFO,
            Path::new("/run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs"),
        )
        .unwrap();
        assert_eq!(
            layers,
            vec![
                "/var/lib/containerd/snapshots/3/fs",
                "/var/lib/containerd/snapshots/2/fs"
            ]
        );
        assert_eq!(overlay_lowerdirs(MOUNTINFO, Path::new("/")), None);
    }

    #[test]
    fn escaped_mount_points_and_layers_are_decoded() {
        let layers = overlay_lowerdirs(MOUNTINFO, Path::new("/with space")).unwrap();
        assert_eq!(layers, vec!["/l/a b"]);
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

    #[test]
    fn annotation_wins_over_content() {
        let dir = tempfile::tempdir().unwrap();
        let mut annotations = HashMap::new();
        annotations.insert(
            "org.opencontainers.image.digest".to_string(),
            "sha256:abc".to_string(),
        );
        let key = ImageKey::for_rootfs(dir.path(), &annotations).unwrap();
        assert_eq!(
            key.source(),
            &KeySource::Annotation("org.opencontainers.image.digest".into())
        );
        let other = tempfile::tempdir().unwrap();
        assert_eq!(
            key,
            ImageKey::for_rootfs(other.path(), &annotations).unwrap()
        );
    }

    #[test]
    fn manifest_key_is_stable_and_changes_with_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/motd"), "one").unwrap();
        let none = HashMap::new();
        let first = ImageKey::for_rootfs(dir.path(), &none).unwrap();
        assert_eq!(first.source(), &KeySource::Manifest);
        assert_eq!(first, ImageKey::for_rootfs(dir.path(), &none).unwrap());
        std::fs::write(dir.path().join("etc/motd"), "two!").unwrap();
        assert_ne!(first, ImageKey::for_rootfs(dir.path(), &none).unwrap());
    }
}
