//! Reading and validating an OCI bundle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::ContainerError;

/// A bundle whose config.json parsed and whose root exists.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute path of the bundle directory.
    pub dir: PathBuf,
    pub spec: Spec,
    /// Absolute path of the root filesystem.
    pub rootfs: PathBuf,
}

fn bundle_error(dir: &Path, reason: impl Into<String>) -> ContainerError {
    ContainerError::Bundle {
        path: dir.to_path_buf(),
        reason: reason.into(),
    }
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Self, ContainerError> {
        let meta = std::fs::metadata(dir)
            .map_err(|e| bundle_error(dir, format!("cannot access the bundle directory: {e}")))?;
        if !meta.is_dir() {
            return Err(bundle_error(dir, "not a directory"));
        }
        let dir = dir.canonicalize().map_err(ContainerError::io(dir))?;
        let config = dir.join("config.json");
        let text = match std::fs::read_to_string(&config) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bundle_error(&dir, "config.json not found"))
            }
            Err(e) => return Err(bundle_error(&dir, format!("cannot read config.json: {e}"))),
        };
        let spec: Spec = serde_json::from_str(&text)
            .map_err(|e| bundle_error(&dir, format!("invalid config.json: {e}")))?;
        check_version(spec.version()).map_err(|reason| bundle_error(&dir, reason))?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| bundle_error(&dir, "config.json has no root"))?;
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else {
            dir.join(root.path())
        };
        match std::fs::metadata(&rootfs) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(bundle_error(
                    &dir,
                    format!("root.path {} is not a directory", rootfs.display()),
                ))
            }
            Err(_) => {
                return Err(bundle_error(
                    &dir,
                    format!("root.path {} does not exist", rootfs.display()),
                ))
            }
        }
        if spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .is_none_or(|a| a.is_empty())
        {
            return Err(bundle_error(&dir, "process.args must not be empty"));
        }
        Ok(Bundle { dir, spec, rootfs })
    }

    pub fn annotations(&self) -> HashMap<String, String> {
        self.spec.annotations().clone().unwrap_or_default()
    }

    pub fn root_readonly(&self) -> bool {
        self.spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false)
    }
}

/// Any 1.x `ociVersion` is accepted: the spec is compatible within a major version.
fn check_version(version: &str) -> Result<(), String> {
    let major = version.split('.').next().unwrap_or("");
    match major.parse::<u32>() {
        Ok(1) => Ok(()),
        Ok(other) => Err(format!(
            "unsupported ociVersion {version:?}: major version {other}, this runtime supports 1.x"
        )),
        Err(_) => Err(format!("invalid ociVersion {version:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_bundle(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    const MINIMAL: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#;

    #[test]
    fn minimal_bundle_loads_with_absolute_rootfs() {
        let dir = write_bundle(MINIMAL);
        let bundle = Bundle::load(dir.path()).unwrap();
        assert!(bundle.rootfs.is_absolute());
        assert!(bundle.rootfs.ends_with("rootfs"));
    }

    #[test]
    fn versions_1_0_to_1_2_load_and_2_0_does_not() {
        for v in ["1.0.0", "1.0.2-dev", "1.1.0", "1.2.0"] {
            let dir = write_bundle(&MINIMAL.replace("1.0.2", v));
            Bundle::load(dir.path()).unwrap();
        }
        let dir = write_bundle(&MINIMAL.replace("1.0.2", "2.0.0"));
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unsupported ociVersion"), "{err}");
    }

    #[test]
    fn each_broken_bundle_names_its_cause() {
        let cases = [
            ("{not json", "invalid config.json"),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":"sh","cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "invalid config.json",
            ),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"nope"},"process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "does not exist",
            ),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "process.args",
            ),
        ];
        for (config, expected) in cases {
            let dir = write_bundle(config);
            let err = Bundle::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains(expected), "{config}: {err}");
        }
        let empty = tempfile::tempdir().unwrap();
        let err = Bundle::load(empty.path()).unwrap_err().to_string();
        assert!(err.contains("config.json not found"), "{err}");
        let err = Bundle::load(&empty.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot access the bundle directory"), "{err}");
    }
}
