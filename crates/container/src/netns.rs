//! The monitor's network namespace: the one config.json names (`linux.namespaces` entry
//! `network` with a `path`), or a new one. Docker's and CNI's networking (prestart hooks,
//! veth pairs) is set up in the namespace of the pid in `--pid-file`, so the monitor must
//! live in the container's namespace, never configure the host's.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use nix::sched::{setns, unshare, CloneFlags};
use serde::{Deserialize, Serialize};

use crate::ContainerError;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkNamespace {
    /// No `network` namespace in config.json: the container shares the host's.
    #[default]
    Host,
    New,
    Join(PathBuf),
}

impl NetworkNamespace {
    pub fn from_spec(spec: &oci_spec::runtime::Spec) -> Self {
        let namespaces = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default();
        match namespaces
            .iter()
            .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        {
            None => NetworkNamespace::Host,
            Some(ns) => match ns.path() {
                Some(path) if !path.as_os_str().is_empty() => NetworkNamespace::Join(path.clone()),
                _ => NetworkNamespace::New,
            },
        }
    }

    /// Moves the calling thread (the monitor's main thread, before it starts any other) into
    /// the namespace.
    pub fn enter(&self) -> Result<(), ContainerError> {
        match self {
            NetworkNamespace::Host => Ok(()),
            NetworkNamespace::New => {
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| ContainerError::Monitor(format!("new network namespace: {e}")))?;
                loopback_up()
            }
            NetworkNamespace::Join(path) => {
                let file = File::open(path).map_err(ContainerError::io(path))?;
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    ContainerError::Monitor(format!(
                        "join network namespace {}: {e}",
                        path.display()
                    ))
                })
            }
        }
    }
}

/// `ip link set lo up`, as runc does in a new namespace.
fn loopback_up() -> Result<(), ContainerError> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| ContainerError::Monitor(format!("socket: {e}")))?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own, on our socket.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) != 0 {
            return Err(ContainerError::Monitor(format!(
                "lo flags: {}",
                std::io::Error::last_os_error()
            )));
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) != 0 {
            return Err(ContainerError::Monitor(format!(
                "lo up: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_namespace_comes_from_the_spec() {
        let spec = |json: &str| -> oci_spec::runtime::Spec { serde_json::from_str(json).unwrap() };
        assert_eq!(
            NetworkNamespace::from_spec(&spec(r#"{"ociVersion":"1.0.2"}"#)),
            NetworkNamespace::Host
        );
        assert_eq!(
            NetworkNamespace::from_spec(&spec(
                r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},{"type":"network"}]}}"#
            )),
            NetworkNamespace::New
        );
        assert_eq!(
            NetworkNamespace::from_spec(&spec(
                r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"network","path":"/var/run/netns/x"}]}}"#
            )),
            NetworkNamespace::Join("/var/run/netns/x".into())
        );
    }
}
