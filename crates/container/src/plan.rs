//! The plan of one container's VM, made by `create` (where errors reach the caller at once)
//! and carried out by the monitor: the disk image, the VM shape, what the agent mounts and
//! runs.

use std::path::PathBuf;
use std::time::Duration;

use agent_proto::{ContainerSetup, ProcessSpec, RootSource, RootfsSpec};
use engine::{DiskSpec, VmSpec};
use image::{DiskImages, ImageKey, Initramfs, OverlayLayers, RootLayout};
use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::cgroup::HostLimits;
use crate::hooks::HostHooks;
use crate::netns::NetworkNamespace;
use crate::paths::{Assets, Paths, VmDefaults};
use crate::{translate, ContainerError};

fn one() -> u32 {
    1
}

/// The guest NIC's MAC until the agent gives it the host interface's.
const GUEST_MAC: &str = "02:53:4d:00:00:01";

/// Where the guest overlays' work directories are, in the host overlay's.
const GUEST_WORK_DIR: &str = "supermachine";

/// A bundle annotation that keeps a container out of the snapshot cache.
pub const SNAPSHOT_ANNOTATION: &str = "run.supermachine.snapshot";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// vCPUs the VM boots with ([`translate::VmShape`]).
    pub vcpus: u32,
    /// vCPUs online for the container (`maxcpus` on the guest's command line).
    #[serde(default = "one")]
    pub online_vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The QEMU built for the runtime, if the assets hold one ([`Assets::qemu`]).
    #[serde(default)]
    pub qemu: Option<PathBuf>,
    /// The image's layers as a disk, for a root that is an overlay on the host.
    pub rootfs_image: Option<PathBuf>,
    pub image_key: String,
    pub image_key_source: String,
    pub kernel_digest: String,
    pub agent_digest: String,
    /// Whether this container may use (and fill) the snapshot cache.
    pub snapshots: bool,
    pub kernel_args: Vec<String>,
    pub setup: ContainerSetup,
    pub init: ProcessSpec,
    /// How long a cold boot may take to reach the agent's READY.
    pub boot_timeout: BootTimeout,
    /// `linux.cgroupsPath`: where the monitor and VMM are accounted on the host.
    pub cgroups_path: Option<String>,
    pub host_limits: HostLimits,
    pub network: NetworkNamespace,
    pub hooks: HostHooks,
    /// The host files and directories the container binds, served to the guest live
    /// (`MountKind::Share`'s index is the position here).
    #[serde(default)]
    pub shares: Vec<translate::Share>,
    /// The bundle's root, when it is an overlay on the host that is renewed after the guest
    /// changes its upper directory ([`crate::rootfs::OverlayRenewer`]).
    #[serde(default)]
    pub renewed_root: Option<PathBuf>,
    /// Things of config.json the VM cannot honour, logged by `create`.
    pub notes: Vec<String>,
}

/// The boot timeout: `SUPERMACHINE_BOOT_TIMEOUT` as given, or config/vm-defaults.json's,
/// which an engine that knows its boots are slow on this host may extend
/// ([`engine::Engine::boot_timeout_floor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootTimeout {
    Explicit(Duration),
    Default(Duration),
}

impl BootTimeout {
    pub fn on(self, engine: &dyn engine::Engine) -> Duration {
        match self {
            BootTimeout::Explicit(t) => t,
            BootTimeout::Default(t) => t.max(engine.boot_timeout_floor()),
        }
    }
}

impl Plan {
    /// The host source of the bind mount on `destination`, if the container has one.
    pub fn bound_source(&self, destination: &str) -> Option<PathBuf> {
        self.setup.mounts.iter().rev().find_map(|m| match m.kind {
            agent_proto::MountKind::Share { index, .. } if m.destination == destination => {
                self.shares.get(index as usize).map(|s| s.source.clone())
            }
            _ => None,
        })
    }

    /// Reads the plan `create` left in a container's state directory.
    pub fn load(dir: &crate::state::ContainerDir) -> Result<Self, ContainerError> {
        let path = dir.file("plan.json");
        let bytes = std::fs::read(&path).map_err(ContainerError::io(&path))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ContainerError::Monitor(format!("{}: {e}", path.display())))
    }

    /// `snapshots` is the runtime's setting; the bundle can still opt out with the
    /// annotation `run.supermachine.snapshot=false`.
    pub fn prepare(
        bundle: &Bundle,
        paths: &Paths,
        guest_debug: bool,
        snapshots: bool,
    ) -> Result<Self, ContainerError> {
        Self::prepare_with(bundle, paths, guest_debug, snapshots, VmDefaults::load())
    }

    /// [`Plan::prepare`] with other VM defaults (a shim's runtime options).
    pub fn prepare_with(
        bundle: &Bundle,
        paths: &Paths,
        guest_debug: bool,
        snapshots: bool,
        defaults: VmDefaults,
    ) -> Result<Self, ContainerError> {
        let assets = Assets::locate()?;
        let initramfs = Initramfs::ensure(&assets.agent, &paths.cache_dir)?;
        let root_lock = crate::rootfs::lock_root(&bundle.rootfs)?;
        let layout = RootLayout::of(&bundle.rootfs)?;
        let mut renewed_root = None;
        let key = ImageKey::for_root(&layout, &bundle.annotations());
        let (rootfs_image, root_shares) = match &layout {
            RootLayout::Layered(layers) => {
                let images = DiskImages::new(paths.images_dir());
                let (image, built) = images.get_or_build(&key, &layers.lower)?;
                log::debug!(
                    "image key {key} (from {}); disk {} {}",
                    key.source(),
                    image.display(),
                    if built { "built" } else { "reused" }
                );
                if crate::rootfs::renew_overlay(&bundle.rootfs, layers)? {
                    log::debug!("root overlay at {} mounted anew", bundle.rootfs.display());
                    renewed_root = Some(bundle.rootfs.clone());
                }
                (Some(image), writable_layer(layers)?)
            }
            RootLayout::Directory => {
                log::debug!("root {} shared whole", bundle.rootfs.display());
                (None, vec![bundle.rootfs.clone()])
            }
        };
        drop(root_lock);
        let kernel_digest = image::file_digest(&assets.kernel)?;
        let translate::VmShape {
            vcpus,
            online_vcpus,
            memory_mib,
        } = translate::vm_shape(&bundle.spec, &defaults);
        let rootfs = RootfsSpec {
            source: RootSource::default(),
            readonly: bundle.root_readonly(),
            warm: Vec::new(),
            warm_path: None,
            warm_lookups: Vec::new(),
        };
        let (mut setup, mut shares) = translate::container_setup(&bundle.spec, rootfs)?;
        // The root's shares come after the binds', whose indexes config.json's order gave.
        let first = shares.len();
        for (n, source) in root_shares.iter().enumerate() {
            shares.push(translate::Share {
                source: source.clone(),
                readonly: false,
                joined_with: (n > 0).then_some(first),
            });
        }
        setup.rootfs.source = match &rootfs_image {
            Some(_) => RootSource::Layered {
                device: VmSpec::guest_disk(0),
                fstype: "ext4".into(),
                upper: first as u32,
                work: first as u32 + 1,
            },
            None => RootSource::Share {
                index: first as u32,
            },
        };
        let mut notes = Vec::new();
        let hooks = HostHooks::from_spec(&bundle.spec)?;
        let host_limits = translate::host_limits(&bundle.spec, memory_mib, &defaults, &mut notes)?;
        let linux = bundle.spec.linux().as_ref();
        let cgroups_path = linux
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty());
        let network = NetworkNamespace::from_spec(&bundle.spec);
        crate::namespaces::check_paths(&bundle.spec)?;
        let process = bundle
            .spec
            .process()
            .as_ref()
            .ok_or_else(|| ContainerError::Bundle {
                path: bundle.dir.clone(),
                reason: "config.json has no process".into(),
            })?;
        let mut init = translate::process_spec(process);
        // As runc: a process without a `capabilities` object has none (an exec without one
        // gets the container's, see `inherit_capabilities`).
        init.capabilities.get_or_insert_with(Default::default);
        // The first process's program is read into the guest's page cache with the root, so
        // a snapshot baked now holds it (the next container of this image usually runs it).
        setup.rootfs.warm = init.args.first().cloned().into_iter().collect();
        setup.rootfs.warm_path = init
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .map(String::from);
        // So are the paths its setup resolves, for the same reason.
        setup.rootfs.warm_lookups = setup.mounts.iter().map(|m| m.destination.clone()).collect();
        // The guest brings up the vCPUs the container may use and leaves the others for an
        // update to bring online. In the snapshot's key: bringing a vCPU up costs a restore
        // more than the rest of it (~300 ms under TCG), so each count has its own snapshot.
        let mut kernel_args = vec![format!("maxcpus={online_vcpus}")];
        if guest_debug {
            kernel_args.push("supermachine.debug=1".to_string());
            kernel_args.push("loglevel=7".to_string());
            // A process killed by a signal it does not handle gets its registers on the console.
            kernel_args.push("print-fatal-signals=1".to_string());
        }
        let boot_timeout = match std::env::var("SUPERMACHINE_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            Some(secs) => BootTimeout::Explicit(Duration::from_secs(secs)),
            None => BootTimeout::Default(Duration::from_secs(defaults.boot_timeout_secs)),
        };
        Ok(Plan {
            vcpus,
            online_vcpus,
            memory_mib,
            kernel: assets.kernel,
            initramfs: initramfs.path,
            qemu: assets.qemu,
            rootfs_image,
            image_key: key.to_string(),
            image_key_source: key.source().to_string(),
            kernel_digest,
            agent_digest: initramfs.agent_digest.clone(),
            snapshots: snapshots
                && bundle
                    .annotations()
                    .get(SNAPSHOT_ANNOTATION)
                    .map(String::as_str)
                    != Some("false"),
            kernel_args,
            setup,
            init,
            boot_timeout,
            cgroups_path,
            host_limits,
            network,
            hooks,
            shares,
            renewed_root,
            notes,
        })
    }

    /// The VM for this plan. It always has one network device and one shared filesystem
    /// device (a snapshot's device set is fixed), backed by `tap` when the container has a
    /// network namespace of its own and by `fs` when it binds host files.
    pub fn vm_spec(
        &self,
        work_dir: PathBuf,
        tap: Option<&crate::network::Tap>,
        fs: Option<std::sync::Arc<dyn engine::FsBackend>>,
    ) -> VmSpec {
        use std::os::fd::AsRawFd;
        VmSpec {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            kernel_args: self.kernel_args.clone(),
            disks: self
                .rootfs_image
                .iter()
                .map(|path| DiskSpec {
                    path: path.clone(),
                    read_only: true,
                })
                .collect(),
            nics: vec![engine::NicSpec {
                tap: tap.map(|t| t.fd.as_raw_fd()),
                mac: GUEST_MAC.to_string(),
            }],
            work_dir,
            diagnostics: vm_diagnostics(),
            fs,
        }
    }
}

/// The host directories of a container's writable layer, as the guest overlay uses them:
/// the host overlay's upper directory, and a work directory of the guest's own on the same
/// filesystem. That one is made inside the host overlay's work directory, which belongs to
/// the same layer (docker and containerd remove it with the layer) and is never part of what
/// the layer holds; the host overlay itself only uses its `work` (and `index`) entries.
fn writable_layer(layers: &OverlayLayers) -> Result<Vec<PathBuf>, ContainerError> {
    let (Some(upper), Some(work)) = (&layers.upper, &layers.work) else {
        return Err(ContainerError::Monitor(
            "the root's overlay has no writable layer".into(),
        ));
    };
    // One per container: a guest overlay empties its work directory when it mounts, so two
    // containers of one bundle (parallel creates) must not share one.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let guest_work = work
        .join(GUEST_WORK_DIR)
        .join(format!("{nanos}-{}", std::process::id()));
    std::fs::create_dir_all(&guest_work).map_err(ContainerError::io(&guest_work))?;
    Ok(vec![upper.clone(), guest_work])
}

/// `SUPERMACHINE_VMM_TRACE` (set: on) and `SUPERMACHINE_VMM_PROFILE` (a path prefix): the
/// builtin VMM's diagnostics; `SUPERMACHINE_KEEP_FREED_MEMORY` (set: on): either engine
/// keeps what the guest frees (for benchmarks). Read here at the runtime's edge like the
/// boot timeout.
fn vm_diagnostics() -> engine::VmDiagnostics {
    engine::VmDiagnostics {
        trace: std::env::var_os("SUPERMACHINE_VMM_TRACE").is_some(),
        profile: std::env::var_os("SUPERMACHINE_VMM_PROFILE").map(PathBuf::from),
        keep_freed_memory: std::env::var_os("SUPERMACHINE_KEEP_FREED_MEMORY").is_some(),
    }
}
