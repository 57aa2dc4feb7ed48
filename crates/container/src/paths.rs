//! Where things live: the state root (`--root`), the cache, and the guest assets.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ContainerError;

pub const DEFAULT_STATE_ROOT: &str = "/run/supermachine";
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/supermachine/cache";

/// The VM defaults shipped in `config/vm-defaults.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmDefaults {
    /// vCPUs online for a container without a CPU limit.
    pub vcpus: u32,
    /// vCPUs a VM boots with (at most the host's), so that an update can bring them online:
    /// each costs the guest a little memory for its per-CPU data and the host a thread.
    pub max_vcpus: u32,
    pub memory_mib: u32,
    pub min_memory_mib: u32,
    pub max_memory_mib: u32,
    /// Host memory the VMM needs beside guest RAM; a container memory limit is shared
    /// between the two.
    pub vmm_overhead_mib: u32,
    pub boot_timeout_secs: u64,
}

impl VmDefaults {
    pub fn load() -> Self {
        const SHIPPED: &str = include_str!("../../../config/vm-defaults.json");
        #[allow(clippy::expect_used)] // A compile-time constant, checked by a unit test.
        let defaults: VmDefaults = serde_json::from_str(SHIPPED).expect("valid vm-defaults.json");
        defaults
    }
}

#[derive(Debug, Clone)]
pub struct Paths {
    pub state_root: PathBuf,
    pub cache_dir: PathBuf,
}

impl Paths {
    pub fn new(state_root: Option<PathBuf>) -> Self {
        let cache_dir = std::env::var_os("SUPERMACHINE_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
        let state_root = state_root.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT));
        // The monitor and the VMM resolve these later, from wherever they run.
        let absolute = |p: PathBuf| match std::env::current_dir() {
            Ok(cwd) if p.is_relative() => cwd.join(p),
            _ => p,
        };
        Paths {
            state_root: absolute(state_root),
            cache_dir: absolute(cache_dir),
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.cache_dir.join("images")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.cache_dir.join("snapshots")
    }

    /// The engine probe's verdicts: per host boot, so in /run (`SUPERMACHINE_PROBE_DIR`
    /// overrides), shared by every state root and cache on the host.
    pub fn probe_dir(&self) -> PathBuf {
        std::env::var_os("SUPERMACHINE_PROBE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/supermachine/probe"))
    }
}

/// The guest kernel and agent this runtime boots, and the QEMU built for it if there is one.
#[derive(Debug, Clone)]
pub struct Assets {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub agent: PathBuf,
    /// `qemu-system-x86_64` (`scripts/build-qemu.sh`), which the qemu engine prefers to the
    /// one on PATH.
    pub qemu: Option<PathBuf>,
}

impl Assets {
    /// Candidate directories: `SUPERMACHINE_ASSETS_DIR` alone when set; else, in order,
    /// `<exe>/../share/supermachine`, `/usr/local/share/supermachine`, `/usr/share/supermachine`.
    pub fn search_path() -> Vec<PathBuf> {
        // An explicit directory is the only one looked at: a test or an operator who names
        // one must not silently get another.
        if let Some(dir) = std::env::var_os("SUPERMACHINE_ASSETS_DIR") {
            return vec![PathBuf::from(dir)];
        }
        let mut dirs = Vec::new();
        if let Some(bin_dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            dirs.push(bin_dir.join("../share/supermachine"));
        }
        dirs.push(PathBuf::from("/usr/local/share/supermachine"));
        dirs.push(PathBuf::from("/usr/share/supermachine"));
        dirs
    }

    pub fn locate() -> Result<Self, ContainerError> {
        let dirs = Self::search_path();
        for dir in &dirs {
            let kernel = dir.join("vmlinux");
            let agent = dir.join("supermachine-agent");
            if kernel.exists() && agent.exists() {
                let dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                let qemu = Some(dir.join(engine::qemu::BINARY_NAME)).filter(|q| q.is_file());
                return Ok(Assets {
                    kernel: dir.join("vmlinux"),
                    agent: dir.join("supermachine-agent"),
                    qemu,
                    dir,
                });
            }
        }
        let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        Err(ContainerError::Assets(format!(
            "guest kernel and agent not found (looked for vmlinux and supermachine-agent in {}); \
             build them with `make guest` in the supermachine source tree, or set \
             SUPERMACHINE_ASSETS_DIR",
            looked.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_vm_defaults_parse_and_are_sane() {
        let d = VmDefaults::load();
        assert!(d.vcpus >= 1 && d.vcpus <= d.max_vcpus);
        assert!(d.min_memory_mib <= d.memory_mib && d.memory_mib <= d.max_memory_mib);
    }
}
