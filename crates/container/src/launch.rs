//! Getting a VM with a connected agent for a container: restored from the snapshot cache
//! when its key has been baked, else booted cold (and baked on the way when this create
//! holds the key's bake).
//!
//! A bake happens at the first quiet point after boot: the agent said READY and mounted the
//! image's root overlay, nothing container-specific has happened yet. The VM is paused only
//! while its device state is saved and its memory copied; sealing the entry (fsync, rename,
//! eviction) runs in a background thread while the container starts.

use std::time::{Duration, Instant};

use std::fs::File;
use std::io::Read;

use agent_proto::{Reply, Request, INIT_PROCESS};
use engine::{Engine, Phase, Vm, VmSpec};
use snapshot::{
    Bake, CacheLimits, Entry, KeyParts, Lookup, SnapshotCache, SnapshotKey, FORMAT_VERSION,
};

use crate::agent_client::{self, AgentClient, REQUEST_TIMEOUT};
use crate::plan::Plan;
use crate::ContainerError;

/// How long a restored agent may take to answer; beyond it the snapshot is presumed bad.
const RESTORE_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the VM came from.
#[derive(Debug)]
pub enum Origin {
    Restored { key: SnapshotKey },
    Booted { baked: Option<SnapshotKey> },
}

/// A running VM, its agent session, and how it got there.
#[derive(Debug)]
pub struct Launched {
    pub vm: Box<dyn Vm>,
    pub agent: AgentClient,
    pub origin: Origin,
    /// Phases from the start of the launch.
    pub phases: Vec<Phase>,
    /// Guest uptime when the agent became ready (cold boots).
    pub guest_uptime_at_ready: Option<Duration>,
    /// The thread sealing a fresh bake; join it before the process exits.
    pub publisher: Option<std::thread::JoinHandle<()>>,
}

/// Cache limits from the environment (`SUPERMACHINE_CACHE_MAX_SIZE`,
/// `SUPERMACHINE_CACHE_MIN_FREE`, `SUPERMACHINE_BAKE_WAIT` in seconds). Without a
/// `SUPERMACHINE_BAKE_WAIT`, a create waits for another's bake at least as long as `engine`
/// may take to boot cold here: waiting is never worse than booting beside it.
pub fn cache_limits(engine: Option<&dyn Engine>) -> Result<CacheLimits, ContainerError> {
    let mut limits = CacheLimits::default();
    if let Some(engine) = engine {
        limits.bake_wait = limits.bake_wait.max(engine.boot_timeout_floor());
    }
    let size = |name: &str| -> Result<Option<u64>, ContainerError> {
        match std::env::var(name) {
            Ok(text) => snapshot::parse_size(&text)
                .map(Some)
                .map_err(|e| ContainerError::Monitor(format!("{name}: {e}"))),
            Err(_) => Ok(None),
        }
    };
    if let Some(max) = size("SUPERMACHINE_CACHE_MAX_SIZE")? {
        limits.max_bytes = max;
    }
    if let Some(floor) = size("SUPERMACHINE_CACHE_MIN_FREE")? {
        limits.min_free_bytes = floor;
    }
    if let Some(wait) = std::env::var("SUPERMACHINE_BAKE_WAIT")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        limits.bake_wait = Duration::from_secs(wait);
    }
    Ok(limits)
}

/// The snapshot key of a plan on an engine: with the digest of the kernel the engine boots,
/// which may be a variant of the plan's.
pub fn snapshot_key(
    plan: &Plan,
    engine: &dyn Engine,
    spec: &VmSpec,
) -> Result<(SnapshotKey, KeyParts), ContainerError> {
    let kernel = engine.kernel(spec);
    let kernel_digest = if kernel == plan.kernel {
        plan.kernel_digest.clone()
    } else {
        image::file_digest(&kernel)?
    };
    let parts = KeyParts {
        image_key: plan.image_key.clone(),
        kernel_digest,
        agent_digest: plan.agent_digest.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        // A VM that keeps what its guest frees may have other devices (see
        // `VmDiagnostics::keep_freed_memory`); such runs are rare, so they alone change it.
        engine: if spec.diagnostics.keep_freed_memory {
            format!("{} keep-freed-memory", engine.snapshot_identity())
        } else {
            engine.snapshot_identity()
        },
        kernel_args: spec.kernel_args.join(" "),
        format: FORMAT_VERSION,
    };
    Ok((SnapshotKey::new(&parts), parts))
}

/// A VM for the container, from the cache if possible.
pub fn launch(
    engine: &dyn Engine,
    spec: &VmSpec,
    plan: &Plan,
    cache: Option<&SnapshotCache>,
) -> Result<Launched, ContainerError> {
    let Some(cache) = cache else {
        return boot(engine, spec, plan, None);
    };
    let started = Instant::now();
    let (key, parts) = snapshot_key(plan, engine, spec)?;
    match cache
        .lookup(&key)
        .map_err(|e| ContainerError::Monitor(e.to_string()))?
    {
        Lookup::Hit(entry) => {
            let validated = started.elapsed();
            match restore(engine, spec, &entry) {
                Ok(mut launched) => {
                    cache.record_hit(&entry);
                    launched.phases.insert(0, Phase::new("validate", validated));
                    Ok(launched)
                }
                Err(e) => {
                    log::warn!(
                        "restoring snapshot {key} failed ({e}); removing it and booting cold"
                    );
                    let _ = cache.remove(&key);
                    boot(engine, spec, plan, None)
                }
            }
        }
        Lookup::Bake(bake) => boot(engine, spec, plan, Some((bake, parts))),
        Lookup::Cold(why) => {
            log::info!("snapshot {key} not baked: {why}");
            boot(engine, spec, plan, None)
        }
    }
}

/// How long a request of the container's start (root, mounts, first process) may take:
/// where the engine's guest kernel is emulated (its boot timeout has a floor), so is every
/// mount and file the agent reads, and a cold page cache can take minutes, not seconds.
pub fn start_request_timeout(engine: &dyn Engine) -> Duration {
    REQUEST_TIMEOUT.max(engine.boot_timeout_floor())
}

fn restore(engine: &dyn Engine, spec: &VmSpec, entry: &Entry) -> Result<Launched, ContainerError> {
    let (mut vm, mut phases) = engine.restore(spec, &entry.dir)?;
    let connected = Instant::now();
    let result = vm
        .take_channel()
        .ok_or_else(|| ContainerError::Monitor("the VM has no agent channel".into()))
        .and_then(|channel| AgentClient::start(channel, RESTORE_HELLO_TIMEOUT));
    match result {
        Ok((agent, _)) => {
            phases.push(Phase::new("agent reconnect", connected.elapsed()));
            Ok(Launched {
                vm,
                agent,
                origin: Origin::Restored {
                    key: entry.key.clone(),
                },
                phases,
                guest_uptime_at_ready: None,
                publisher: None,
            })
        }
        Err(e) => {
            let console = vm.console_tail(10);
            let _ = vm.stop();
            Err(ContainerError::Boot {
                message: e.to_string(),
                console,
            })
        }
    }
}

fn boot(
    engine: &dyn Engine,
    spec: &VmSpec,
    plan: &Plan,
    bake: Option<(Bake, KeyParts)>,
) -> Result<Launched, ContainerError> {
    let started = Instant::now();
    let mut vm = engine.boot(spec)?;
    let mut phases = vec![Phase::new("vmm", started.elapsed())];
    let timeout = plan.boot_timeout.on(engine);
    let request_timeout = start_request_timeout(engine);
    match connect_booted(
        &mut *vm,
        plan,
        timeout,
        request_timeout,
        started,
        &mut phases,
    ) {
        Ok((agent, uptime)) => {
            let mut launched = Launched {
                vm,
                agent,
                origin: Origin::Booted { baked: None },
                phases,
                guest_uptime_at_ready: Some(uptime),
                publisher: None,
            };
            if let Some((bake, parts)) = bake {
                bake_snapshot(&mut launched, bake, parts, plan)?;
            }
            Ok(launched)
        }
        Err(e) => {
            let console = vm.console_tail(15);
            let _ = vm.stop();
            Err(ContainerError::Boot {
                message: e.to_string(),
                console,
            })
        }
    }
}

fn connect_booted(
    vm: &mut dyn Vm,
    plan: &Plan,
    timeout: Duration,
    start_request_timeout: Duration,
    started: Instant,
    phases: &mut Vec<Phase>,
) -> Result<(AgentClient, Duration), ContainerError> {
    let mut channel = vm
        .take_channel()
        .ok_or_else(|| ContainerError::Monitor("the VM has no agent channel".into()))?;
    let info = agent_client::wait_ready(&mut channel, timeout, || match vm.exited() {
        Some(why) => Err(why),
        None => Ok(()),
    })?;
    phases.push(Phase::new("agent ready", started.elapsed()));
    log::debug!(
        "agent ready at guest uptime {} ms, kernel {}",
        info.uptime_ms,
        info.kernel_release
    );
    let (agent, _) = AgentClient::start(channel, REQUEST_TIMEOUT)?;
    agent.request(
        Request::PrepareRoot(plan.setup.rootfs.clone()),
        start_request_timeout,
    )?;
    Ok((agent, Duration::from_millis(info.uptime_ms)))
}

/// Snapshots the freshly booted VM into the bake's directory and publishes it in the
/// background. A failed bake costs only the snapshot: the container goes on.
fn bake_snapshot(
    launched: &mut Launched,
    bake: Bake,
    parts: KeyParts,
    plan: &Plan,
) -> Result<(), ContainerError> {
    // The guest's RNG is initialized from the host before the snapshot, so that restores
    // start with it ready; each restore still adds its own entropy and reseeds.
    let seeded = host_entropy().and_then(|bytes| {
        launched
            .agent
            .request(Request::AddEntropy { bytes }, REQUEST_TIMEOUT)
    });
    if let Err(e) = seeded {
        log::warn!(
            "not baking snapshot {}: seeding the guest RNG: {e}",
            bake.key()
        );
        return Ok(());
    }
    let paused = Instant::now();
    launched.vm.pause()?;
    let saved = launched.vm.snapshot(bake.dir());
    launched.vm.resume()?;
    launched
        .phases
        .push(Phase::new("bake (VM paused)", paused.elapsed()));
    if let Err(e) = saved {
        log::warn!("baking snapshot {} failed: {e}", bake.key());
        return Ok(());
    }
    let key = bake.key().clone();
    let description = format!("image {} ({})", plan.image_key, plan.image_key_source);
    let parts = serde_json::to_value(&parts).unwrap_or_default();
    let publisher = std::thread::Builder::new()
        .name("publish-snapshot".into())
        .spawn(move || match bake.publish(description, parts) {
            Ok(entry) => log::debug!(
                "snapshot {} published in {}",
                entry.key,
                entry.dir.display()
            ),
            Err(e) => log::warn!("publishing snapshot failed: {e}"),
        })
        .map_err(|e| ContainerError::Monitor(format!("spawn publisher: {e}")))?;
    launched.publisher = Some(publisher);
    launched.origin = Origin::Booted { baked: Some(key) };
    Ok(())
}

/// Bytes from the host's RNG for the guest's.
fn host_entropy() -> Result<Vec<u8>, ContainerError> {
    let mut entropy = vec![0u8; 64];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(ContainerError::io("/dev/urandom"))?;
    Ok(entropy)
}

/// Gives a fresh (booted or restored) VM its own identity, mounts the container and
/// prepares its first process; returns the process's guest pid.
pub fn prepare_container(
    agent: &AgentClient,
    plan: &Plan,
    timeout: Duration,
) -> Result<(i32, Vec<Phase>), ContainerError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Host entropy and a CRNG reseed: VMs restored from one snapshot start with the same
    // RNG state, and must not produce the same numbers.
    let entropy = host_entropy()?;
    // In one round trip; the agent stops at nothing, so each reply is checked in order.
    // Each request is named for the restore phase it is.
    let (names, requests): (Vec<&'static str>, Vec<Request>) = [
        (
            "guest clock",
            Request::SetClock {
                unix_secs: now.as_secs() as i64,
                nanos: now.subsec_nanos(),
            },
        ),
        ("guest entropy", Request::AddEntropy { bytes: entropy }),
        (
            "container setup",
            Request::SetupContainer(plan.setup.clone()),
        ),
        (
            "process create",
            Request::CreateProcess {
                process: INIT_PROCESS,
                spec: plan.init.clone(),
                start: false,
            },
        ),
    ]
    .into_iter()
    .unzip();
    let answers = agent.pipeline(requests, timeout)?;
    // The agent handles them one after the other, so the gaps between arrivals are the
    // guest's time for each.
    let mut phases = Vec::new();
    let mut before = Duration::ZERO;
    let mut last = None;
    for (name, answer) in names.into_iter().zip(answers) {
        phases.push(Phase::new(name, answer.after.saturating_sub(before)));
        before = answer.after;
        last = Some(answer.reply?);
    }
    match last {
        Some(Reply::Created { pid }) => Ok((pid, phases)),
        other => Err(ContainerError::Agent(format!("unexpected reply {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use engine::EngineError;

    use super::*;
    use crate::plan::BootTimeout;

    /// An engine for the key alone: it boots a given kernel instead of the spec's, and
    /// starts no VM.
    #[derive(Debug)]
    struct KeyOnly {
        kernel: Option<PathBuf>,
    }

    impl Engine for KeyOnly {
        fn name(&self) -> String {
            "key-only".into()
        }
        fn isolation(&self) -> engine::Isolation {
            engine::Isolation::Hypervisor
        }
        fn vmm_confinement(&self) -> String {
            "none".into()
        }
        fn boot(&self, _: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
            Err(EngineError::Control("a key-only engine".into()))
        }
        fn kernel(&self, spec: &VmSpec) -> PathBuf {
            self.kernel.clone().unwrap_or_else(|| spec.kernel.clone())
        }
        fn snapshot_identity(&self) -> String {
            "key-only".into()
        }
        fn restore(&self, _: &VmSpec, _: &Path) -> Result<(Box<dyn Vm>, Vec<Phase>), EngineError> {
            Err(EngineError::Control("a key-only engine".into()))
        }
    }

    fn plan(kernel: &Path) -> Plan {
        Plan {
            vcpus: 1,
            online_vcpus: 1,
            memory_mib: 256,
            kernel: kernel.to_path_buf(),
            initramfs: "initramfs".into(),
            qemu: None,
            rootfs_image: Some("rootfs.ext4".into()),
            image_key: "image".into(),
            image_key_source: "test".into(),
            kernel_digest: image::file_digest(kernel).unwrap(),
            agent_digest: "agent".into(),
            snapshots: true,
            kernel_args: Vec::new(),
            setup: Default::default(),
            init: Default::default(),
            boot_timeout: BootTimeout::Default(Duration::from_secs(1)),
            cgroups_path: None,
            host_limits: Default::default(),
            network: Default::default(),
            hooks: Default::default(),
            shares: Vec::new(),
            renewed_root: None,
            notes: Vec::new(),
        }
    }

    #[test]
    fn the_key_digests_the_kernel_the_engine_boots() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("vmlinux");
        let variant = dir.path().join("vmlinux-pvm");
        std::fs::write(&default, "default kernel").unwrap();
        std::fs::write(&variant, "variant kernel").unwrap();
        let plan = plan(&default);
        let spec = plan.vm_spec(dir.path().to_path_buf(), None, None);
        let key = |kernel: Option<&Path>| {
            let engine = KeyOnly {
                kernel: kernel.map(Path::to_path_buf),
            };
            snapshot_key(&plan, &engine, &spec).unwrap()
        };
        let (on_default, parts) = key(None);
        assert_eq!(parts.kernel_digest, plan.kernel_digest);
        let (on_variant, parts) = key(Some(&variant));
        assert_eq!(parts.kernel_digest, image::file_digest(&variant).unwrap());
        assert_ne!(on_default, on_variant);
        // A rebuilt variant is a new key, though the plan's kernel is the same. (Its mtime
        // moves on past the digest's sidecar, as a build's would: tmpfs times are coarse.)
        std::fs::write(&variant, "variant kernel, rebuilt").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&variant)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + Duration::from_secs(2))
            .unwrap();
        assert_ne!(key(Some(&variant)).0, on_variant);
    }
}
