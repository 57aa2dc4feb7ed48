//! The namespaces config.json names by path (`linux.namespaces[].path`), checked at create:
//! each path must be a namespace of its entry's type, and only the network namespace can be
//! joined (the VM's host side lives in it). The others would be the host kernel's, and the
//! container's processes run under the VM's kernel: joining a pid or ipc namespace of
//! another container (docker's `--pid container:X`) cannot be done, so create fails rather
//! than run the container apart from it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::ContainerError;

/// `NS_GET_NSTYPE` of linux/nsfs.h, `_IO(0xb7, 0x3)`: the `CLONE_NEW*` type of a namespace.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Fails on the first namespace path that is not a namespace of its type, or that names a
/// namespace other than the network one.
pub fn check_paths(spec: &Spec) -> Result<(), ContainerError> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in &namespaces {
        let Some(path) = ns.path().as_ref().filter(|p| !p.as_os_str().is_empty()) else {
            continue;
        };
        let kind = ns.typ();
        let error = |reason: String| ContainerError::Namespace {
            kind: kind.to_string(),
            path: path.clone(),
            reason,
        };
        let actual = namespace_type(path).map_err(&error)?;
        if actual != kind as i32 {
            return Err(error(format!(
                "it is a {} namespace",
                type_name(actual).unwrap_or("different")
            )));
        }
        if kind != LinuxNamespaceType::Network {
            return Err(error(
                "joining it is not supported: the container runs under its VM's kernel, which \
                 cannot enter the host's namespaces (only a network namespace is followed)"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// The `CLONE_NEW*` type of the namespace file at `path`. The ioctl tells the type itself;
/// comparing the file's device with `/proc/self/ns/*` would only tell that it is a
/// namespace file.
fn namespace_type(path: &Path) -> Result<i32, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor, which `file`
    // keeps open for the call.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOTTY) | Some(libc::EINVAL) => "not a namespace file".to_string(),
            _ => format!("reading its namespace type: {e}"),
        });
    }
    Ok(kind)
}

fn type_name(clone_flag: i32) -> Option<&'static str> {
    let kind = [
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::User,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Time,
    ]
    .into_iter()
    .find(|&k| k as i32 == clone_flag)?;
    Some(match kind {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(kind: &str, path: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[{{"type":"{kind}","path":"{path}"}}]}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_network_namespace_path_of_the_right_type_passes() {
        check_paths(&spec_with("network", "/proc/self/ns/net")).unwrap();
    }

    #[test]
    fn a_path_of_another_namespace_type_fails_naming_both() {
        let err = check_paths(&spec_with("network", "/proc/self/ns/uts"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("net namespace /proc/self/ns/uts"), "{err}");
        assert!(err.contains("it is a uts namespace"), "{err}");
    }

    #[test]
    fn a_file_that_is_no_namespace_fails_naming_it() {
        let err = check_paths(&spec_with("ipc", "/etc/hostname"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ipc namespace /etc/hostname"), "{err}");
        assert!(err.contains("not a namespace file"), "{err}");
    }

    #[test]
    fn joining_a_pid_namespace_fails_naming_it() {
        let err = check_paths(&spec_with("pid", "/proc/self/ns/pid"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pid namespace /proc/self/ns/pid"), "{err}");
        assert!(err.contains("not supported"), "{err}");
    }

    #[test]
    fn a_missing_path_fails_naming_it() {
        let err = check_paths(&spec_with("network", "/no/such/netns"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/netns"), "{err}");
    }
}
