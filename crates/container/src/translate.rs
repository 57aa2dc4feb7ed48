//! config.json → what the VM and the agent need: the VM shape, the mounts the agent makes,
//! the processes it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agent_proto::{
    Capabilities, CgroupSetting, CgroupSpec, ContainerSetup, DeviceKind, DeviceNode, MountKind,
    MountSpec, ProcessSpec, PropagationKind, Rlimit, RootPropagation, RootfsSpec, SeccompAction,
    SeccompArg, SeccompOp, SeccompProfile, SeccompRule, UserNamespace,
};
use oci_spec::runtime::{LinuxCpu, LinuxResources, Process, Spec};

use crate::cgroup::HostLimits;
use crate::lifecycle::LiveUpdate;
use crate::paths::VmDefaults;
use crate::ContainerError;

/// Filesystems the guest kernel makes itself.
const GUEST_FILESYSTEMS: [&str; 8] = [
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "ramfs",
];

/// Guest memory beyond the container's memory limit, for what runs in the VM outside the
/// container's cgroup: the guest kernel (its code, page tables, slab, the page cache of the
/// root it serves) and the agent. Without it the container's `memory.max` could never be
/// reached: the whole guest would run out first and its OOM killer pick anything. Measured
/// in a 128 MiB guest whose container sleeps: the kernel's image and reserved memory take
/// 9 MiB (MemTotal 117 MiB) and MemTotal - MemAvailable is 22 MiB (slab 15 MiB of it), 31
/// MiB in all; twice that leaves the container's limit whole while the kernel's caches grow.
pub const GUEST_HEADROOM_MIB: u32 = 64;

/// A VM's size: the vCPUs it boots with, how many of them are online when its container
/// starts, and its guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmShape {
    /// vCPUs the VM has: the most any update may bring online.
    pub vcpus: u32,
    /// vCPUs online for the container (`0..online_vcpus`): the guest boots with these.
    pub online_vcpus: u32,
    pub memory_mib: u32,
}

/// The VM for a container, from `linux.resources`, else the defaults. Online vCPUs follow
/// the CPU limit (its quota rounded up, covering every CPU its cpuset names), at most the
/// host's CPUs; the VM boots with `max_vcpus` of them (or the host's CPUs if fewer, and
/// never fewer than are online), so that `update` can raise the limit. With a memory limit
/// the guest holds the limit (the container's cgroup `memory.max`) plus
/// [`GUEST_HEADROOM_MIB`] for the guest kernel and agent (never less than the minimum); the
/// host cgroup gets that plus the VMM's overhead ([`host_limits`]).
pub fn vm_shape(spec: &Spec, defaults: &VmDefaults) -> VmShape {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let host = host_cpus();
    let online_vcpus = resources
        .and_then(|r| r.cpu().as_ref())
        .and_then(cpus_asked)
        .unwrap_or(defaults.vcpus)
        .clamp(1, host);
    let vcpus = defaults.max_vcpus.max(online_vcpus).clamp(1, host);
    let memory_mib = memory_limit_mib(spec)
        .map(|m| m.saturating_add(GUEST_HEADROOM_MIB))
        .map(|m| m.clamp(defaults.min_memory_mib, defaults.max_memory_mib))
        .unwrap_or(defaults.memory_mib);
    VmShape {
        vcpus,
        online_vcpus,
        memory_mib,
    }
}

/// The host's CPUs, at least one.
fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

fn memory_limit_mib(spec: &Spec) -> Option<u32> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|&l| l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20).min(u32::MAX as u64) as u32)
}

/// The limits for the VM's host cgroup. A memory limit becomes what the VM costs the host:
/// its guest memory (the limit and the guest's headroom, see [`vm_shape`]) and the VMM's
/// overhead; with a note when the limit is smaller than the smallest VM.
pub fn host_limits(
    spec: &Spec,
    guest_memory_mib: u32,
    defaults: &VmDefaults,
    notes: &mut Vec<String>,
) -> Result<HostLimits, ContainerError> {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let needed = guest_memory_mib + defaults.vmm_overhead_mib;
    let memory_bytes = memory_limit_mib(spec).map(|limit| {
        if limit.saturating_add(GUEST_HEADROOM_MIB) < defaults.min_memory_mib {
            notes.push(format!(
                "memory limit {limit} MiB gets the smallest VM ({guest_memory_mib} MiB guest + \
                 {} MiB VMM); the host limit is {needed} MiB",
                defaults.vmm_overhead_mib
            ));
        }
        i64::from(limit.max(needed)) << 20
    });
    let memory = resources.and_then(|r| r.memory().as_ref());
    let swap_bytes = crate::cgroup::swap_beyond_memory(
        memory.and_then(|m| m.limit()),
        memory.and_then(|m| m.swap()),
    )?;
    Ok(HostLimits {
        memory_bytes,
        swap_bytes,
        cpu_quota: cpu.and_then(|c| c.quota()).filter(|&q| q > 0),
        cpu_period: cpu.and_then(|c| c.period()).filter(|&p| p > 0),
        cpu_shares: cpu.and_then(|c| c.shares()).filter(|&s| s > 0),
        cpuset_cpus: cpu.and_then(|c| c.cpus().clone()).filter(|c| !c.is_empty()),
        cpuset_mems: cpu.and_then(|c| c.mems().clone()).filter(|m| !m.is_empty()),
    })
}

/// The vCPUs a CPU limit keeps online (vCPUs come online from 0 up): its quota rounded up,
/// and enough that every CPU its cpuset names is online. A container whose cpuset is `1`
/// gets vCPUs 0 and 1 online and runs on vCPU 1 alone, so it counts one CPU, as under runc.
fn cpus_asked(cpu: &LinuxCpu) -> Option<u32> {
    let from_quota = match (cpu.quota(), cpu.period()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p) as u32),
        _ => None,
    };
    let from_cpuset = cpu
        .cpus()
        .as_deref()
        .and_then(highest_cpu)
        .map(|cpu| cpu.saturating_add(1));
    from_quota.max(from_cpuset)
}

/// The highest CPU a cpuset list like `0-3,7` names; `None` for an empty or malformed list.
fn highest_cpu(list: &str) -> Option<u32> {
    let mut highest = None;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let last = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                (a <= b).then_some(b)?
            }
            None => part.parse::<u32>().ok()?,
        };
        highest = highest.max(Some(last));
    }
    highest
}

fn cap_names(set: &Option<oci_spec::runtime::Capabilities>) -> Vec<String> {
    let mut names: Vec<String> = set
        .iter()
        .flatten()
        .filter_map(|c| serde_json::to_value(c).ok()?.as_str().map(String::from))
        .collect();
    names.sort();
    names
}

/// An OCI process as the agent runs it.
pub fn process_spec(process: &Process) -> ProcessSpec {
    let user = process.user();
    ProcessSpec {
        args: process.args().clone().unwrap_or_default(),
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().to_string_lossy().into_owned(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        terminal: process.terminal().unwrap_or(false),
        console_size: process
            .console_size()
            .map(|b| {
                (
                    b.height().min(u16::MAX as u64) as u16,
                    b.width().min(u16::MAX as u64) as u16,
                )
            })
            .filter(|&(h, w)| h > 0 && w > 0),
        rlimits: process
            .rlimits()
            .iter()
            .flatten()
            .map(|r| Rlimit {
                kind: format!(
                    "RLIMIT_{}",
                    r.typ().to_string().trim_start_matches("RLIMIT_")
                ),
                soft: r.soft(),
                hard: r.hard(),
            })
            .collect(),
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        capabilities: process.capabilities().as_ref().map(|c| Capabilities {
            bounding: cap_names(c.bounding()),
            effective: cap_names(c.effective()),
            inheritable: cap_names(c.inheritable()),
            permitted: cap_names(c.permitted()),
            ambient: cap_names(c.ambient()),
        }),
        oom_score_adj: process.oom_score_adj(),
        // The caller's, not config.json's: `create` adds them.
        passed_fds: Vec::new(),
    }
}

/// An exec'd process without a `capabilities` object gets the container's first process's,
/// as under runc.
pub fn inherit_capabilities(exec: &mut ProcessSpec, init: &ProcessSpec) {
    if exec.capabilities.is_none() {
        exec.capabilities = Some(init.capabilities.clone().unwrap_or_default());
    }
}

/// A host directory or regular file the container binds: served live to the guest by the
/// VM's share server (the `share` crate), the `index`th entry of the shared filesystem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub source: PathBuf,
    pub readonly: bool,
    /// The earlier share this one may rename into ([`share::ShareSpec::joined_with`]).
    #[serde(default)]
    pub joined_with: Option<usize>,
}

impl From<&Share> for share::ShareSpec {
    fn from(share: &Share) -> Self {
        share::ShareSpec {
            source: share.source.clone(),
            read_only: share.readonly,
            joined_with: share.joined_with,
        }
    }
}

/// What the agent sets up in the VM, and the host files and directories the VM's share
/// serves for its bind mounts. A mount that cannot be brought into the VM fails: never an
/// empty directory in place of the user's data.
pub fn container_setup(
    spec: &Spec,
    rootfs: RootfsSpec,
) -> Result<(ContainerSetup, Vec<Share>), ContainerError> {
    let mut mounts = Vec::new();
    let mut shares = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let destination = m.destination().to_string_lossy().into_owned();
        let options: Vec<String> = m.options().clone().unwrap_or_default();
        let fstype = m.typ().clone().unwrap_or_default();
        let source = m
            .source()
            .as_ref()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_bind = fstype == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        let readonly = options.iter().any(|o| o == "ro");
        let kind = if !is_bind && GUEST_FILESYSTEMS.contains(&fstype.as_str()) {
            MountKind::Filesystem {
                fstype,
                source,
                options,
            }
        } else if is_bind && destination == "/dev/shm" {
            // docker binds a host tmpfs for /dev/shm; the guest makes its own.
            MountKind::Filesystem {
                fstype: "tmpfs".into(),
                source: "shm".into(),
                options: vec![
                    "nosuid".into(),
                    "nodev".into(),
                    "noexec".into(),
                    "mode=1777".into(),
                ],
            }
        } else if is_bind {
            refuse_cross_vm_propagation(&options, &destination)?;
            let share = bind_share(Path::new(&source), &destination, readonly)?;
            let index = shares.len() as u32;
            shares.push(share);
            MountKind::Share {
                index,
                readonly,
                options,
            }
        } else {
            return Err(ContainerError::Unsupported(format!(
                "mount of type {fstype:?} on {destination}: the VM's kernel mounts only {}",
                GUEST_FILESYSTEMS.join(", ")
            )));
        };
        mounts.push(MountSpec { destination, kind });
    }
    let linux = spec.linux().as_ref();
    let setup = ContainerSetup {
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        rootfs,
        mounts,
        masked_paths: linux
            .and_then(|l| l.masked_paths().clone())
            .unwrap_or_default(),
        readonly_paths: linux
            .and_then(|l| l.readonly_paths().clone())
            .unwrap_or_default(),
        sysctls: linux
            .and_then(|l| l.sysctl().clone())
            .map(|m| m.into_iter().collect::<BTreeMap<_, _>>())
            .unwrap_or_default(),
        pid_namespace: linux
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Pid)
            }),
        cgroup: linux
            .map(|l| match l.resources() {
                Some(resources) => guest_cgroup_settings(resources),
                None => Ok(Vec::new()),
            })
            .transpose()?
            .map(|settings| CgroupSpec { settings }),
        devices: devices(spec)?,
        root_propagation: root_propagation(spec)?,
        seccomp: linux
            .and_then(|l| l.seccomp().as_ref())
            .map(seccomp)
            .transpose()?,
        user_namespace: user_namespace(spec)?,
    };
    Ok((setup, shares))
}

/// config.json's `user` namespace and its mappings, refused as runc refuses them when one
/// comes without the other. (A `user` namespace with a path, to join, is refused earlier.)
fn user_namespace(spec: &Spec) -> Result<Option<UserNamespace>, ContainerError> {
    let Some(linux) = spec.linux() else {
        return Ok(None);
    };
    let mappings = |given: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        given
            .iter()
            .flatten()
            .map(|m| agent_proto::IdMapping {
                container_id: m.container_id(),
                host_id: m.host_id(),
                size: m.size(),
            })
            .collect::<Vec<_>>()
    };
    let (uid_mappings, gid_mappings) = (
        mappings(linux.uid_mappings()),
        mappings(linux.gid_mappings()),
    );
    let wanted = linux.namespaces().iter().flatten().any(|n| {
        n.typ() == oci_spec::runtime::LinuxNamespaceType::User
            && n.path().as_ref().is_none_or(|p| p.as_os_str().is_empty())
    });
    if !wanted {
        if uid_mappings.is_empty() && gid_mappings.is_empty() {
            return Ok(None);
        }
        return Err(ContainerError::Unsupported(
            "linux.uidMappings/gidMappings are given, but linux.namespaces has no user \
             namespace for them"
                .into(),
        ));
    }
    for (kind, given) in [("uid", &uid_mappings), ("gid", &gid_mappings)] {
        if given.is_empty() {
            return Err(ContainerError::Unsupported(format!(
                "User namespaces enabled, but no {kind} mappings found."
            )));
        }
    }
    Ok(Some(UserNamespace {
        uid_mappings,
        gid_mappings,
    }))
}

/// `linux.seccomp` for the guest's libseccomp, checked here so that what the VM cannot do
/// fails `create` naming it: user notification (`SCMP_ACT_NOTIFY`, `listenerPath`) would need
/// the guest's listener descriptor on the host, which is not relayed.
fn seccomp(profile: &oci_spec::runtime::LinuxSeccomp) -> Result<SeccompProfile, ContainerError> {
    use oci_spec::runtime::LinuxSeccompOperator as O;
    use oci_spec::runtime::{LinuxSeccompAction as A, LinuxSeccompFilterFlag as F};
    let notify = || {
        ContainerError::Unsupported(
            "linux.seccomp: seccomp user notification (SCMP_ACT_NOTIFY, listenerPath) is not \
             relayed out of the VM"
                .into(),
        )
    };
    if profile.listener_path().is_some() {
        return Err(notify());
    }
    // As runc: an errno action without errnoRet returns EPERM.
    let action = |action: A, errno: Option<u32>| -> Result<SeccompAction, ContainerError> {
        let value = || -> Result<u16, ContainerError> {
            let errno = errno.unwrap_or(libc::EPERM as u32);
            u16::try_from(errno).map_err(|_| {
                ContainerError::Unsupported(format!("linux.seccomp: errnoRet {errno} is too large"))
            })
        };
        Ok(match action {
            A::ScmpActKill | A::ScmpActKillThread => SeccompAction::KillThread,
            A::ScmpActKillProcess => SeccompAction::KillProcess,
            A::ScmpActTrap => SeccompAction::Trap,
            A::ScmpActErrno => SeccompAction::Errno(value()?),
            A::ScmpActTrace => SeccompAction::Trace(value()?),
            A::ScmpActLog => SeccompAction::Log,
            A::ScmpActAllow => SeccompAction::Allow,
            A::ScmpActNotify => return Err(notify()),
        })
    };
    let mut flags = Vec::new();
    for flag in profile.flags().iter().flatten() {
        flags.push(
            match flag {
                F::SeccompFilterFlagLog => "SECCOMP_FILTER_FLAG_LOG",
                F::SeccompFilterFlagTsync => "SECCOMP_FILTER_FLAG_TSYNC",
                F::SeccompFilterFlagSpecAllow => "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                F::SeccompFilterFlagWaitKillableRecv => return Err(notify()),
            }
            .to_string(),
        );
    }
    let mut rules = Vec::new();
    for syscall in profile.syscalls().iter().flatten() {
        let mut args = Vec::new();
        for arg in syscall.args().iter().flatten() {
            if arg.index() > 5 {
                return Err(ContainerError::Unsupported(format!(
                    "linux.seccomp: argument index {} of {:?}: system calls have 6",
                    arg.index(),
                    syscall.names()
                )));
            }
            args.push(SeccompArg {
                index: arg.index() as u32,
                value: arg.value(),
                value_two: arg.value_two().unwrap_or(0),
                op: match arg.op() {
                    O::ScmpCmpNe => SeccompOp::NotEqual,
                    O::ScmpCmpLt => SeccompOp::LessThan,
                    O::ScmpCmpLe => SeccompOp::LessOrEqual,
                    O::ScmpCmpEq => SeccompOp::Equal,
                    O::ScmpCmpGe => SeccompOp::GreaterOrEqual,
                    O::ScmpCmpGt => SeccompOp::GreaterThan,
                    O::ScmpCmpMaskedEq => SeccompOp::MaskedEqual,
                },
            });
        }
        rules.push(SeccompRule {
            names: syscall.names().clone(),
            action: action(syscall.action(), syscall.errno_ret())?,
            args,
        });
    }
    Ok(SeccompProfile {
        default_action: action(profile.default_action(), profile.default_errno_ret())?,
        architectures: profile
            .architectures()
            .iter()
            .flatten()
            .map(|a| a.to_string())
            .collect(),
        flags,
        rules,
    })
}

/// `linux.devices` as the guest makes them. The numbers are the ones config.json gives (for
/// docker's `--device`, the host device's): the node is made like runc makes it, and reaches
/// whatever driver the guest kernel has at those numbers, never the host's device.
fn devices(spec: &Spec) -> Result<Vec<DeviceNode>, ContainerError> {
    use oci_spec::runtime::LinuxDeviceType;
    let list = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    list.iter()
        .map(|d| {
            let path = d.path().to_string_lossy().into_owned();
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => DeviceKind::Char,
                LinuxDeviceType::B => DeviceKind::Block,
                LinuxDeviceType::P => DeviceKind::Fifo,
                LinuxDeviceType::A => {
                    return Err(ContainerError::Unsupported(format!(
                        "device {path}: type \"a\" is not a device node type (c, u, b or p)"
                    )))
                }
            };
            let number = |n: i64, what: &str| {
                u64::try_from(n).map_err(|_| {
                    ContainerError::Unsupported(format!("device {path}: {what} number {n}"))
                })
            };
            Ok(DeviceNode {
                kind,
                major: number(d.major(), "major")?,
                minor: number(d.minor(), "minor")?,
                // As runc: permission bits only (docker passes the host node's whole mode),
                // world read-write when config.json says nothing.
                mode: d.file_mode().map_or(0o666, |m| m & 0o7777),
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
                path,
            })
        })
        .collect()
}

/// `linux.rootfsPropagation`. An unbindable root fails as it fails under runc, which binds
/// the root onto itself after applying it.
fn root_propagation(spec: &Spec) -> Result<Option<RootPropagation>, ContainerError> {
    let Some(value) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().clone())
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let (kind, recursive) = match value.as_str() {
        "shared" => (PropagationKind::Shared, false),
        "rshared" => (PropagationKind::Shared, true),
        "slave" => (PropagationKind::Slave, false),
        "rslave" => (PropagationKind::Slave, true),
        "private" => (PropagationKind::Private, false),
        "rprivate" => (PropagationKind::Private, true),
        "unbindable" | "runbindable" => {
            return Err(ContainerError::Unsupported(format!(
                "rootfsPropagation {value}: an unbindable container root cannot be bound as \
                 its root (runc fails the same way)"
            )))
        }
        other => {
            return Err(ContainerError::Unsupported(format!(
                "rootfsPropagation={other} is not supported"
            )))
        }
    };
    Ok(Some(RootPropagation { kind, recursive }))
}

/// config.json's `linux.resources` (shaped after cgroup v1, as the OCI spec is) as writes to
/// the cgroup v2 interface files of the container's cgroup in the guest, converted as runc
/// and crun convert them, so that the container reads there what it would under runc. A
/// resource the guest cannot apply as asked (a host device's IO limit, a v1-only knob) fails
/// naming it: never dropped. Device access rules are not cgroup writes here: the guest's
/// `/dev` is the VM's own.
pub fn guest_cgroup_settings(
    resources: &LinuxResources,
) -> Result<Vec<CgroupSetting>, ContainerError> {
    let mut settings = Vec::new();
    let mut set = |file: &str, value: String| {
        settings.push(CgroupSetting {
            file: file.to_string(),
            value,
        })
    };
    let unsupported = |what: &str| {
        Err(ContainerError::Unsupported(format!(
            "linux.resources.{what}: cgroup v2 in the VM has no such setting"
        )))
    };
    if let Some(memory) = resources.memory() {
        // docker sends 0 for the kernel memory limits it does not set, and a swappiness of
        // -1 (as u64) for none: only a value that asks for something is refused.
        #[allow(deprecated)] // Read only to refuse it.
        let kernel = memory.kernel();
        if kernel.is_some_and(|k| k > 0) {
            return unsupported("memory.kernel");
        }
        if memory.kernel_tcp().is_some_and(|k| k > 0) {
            return unsupported("memory.kernelTCP");
        }
        if memory.swappiness().is_some_and(|s| s <= 100) {
            return unsupported("memory.swappiness");
        }
        if memory.disable_oom_killer() == Some(true) {
            return unsupported("memory.disableOOMKiller");
        }
        let limit = memory.limit().unwrap_or(0);
        if limit != 0 {
            set("memory.max", v2_limit(limit));
        }
        if let Some(swap) = swap_max(memory.swap().unwrap_or(0), limit)? {
            set("memory.swap.max", swap);
        }
        match memory.reservation() {
            Some(0) | None => {}
            Some(reservation) => set("memory.low", v2_limit(reservation)),
        }
    }
    if let Some(cpu) = resources.cpu() {
        if cpu.realtime_runtime().is_some_and(|r| r != 0)
            || cpu.realtime_period().is_some_and(|p| p != 0)
        {
            return unsupported("cpu.realtimeRuntime/realtimePeriod");
        }
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            set("cpu.weight", cpu_weight(shares).to_string());
        }
        let quota = cpu.quota().unwrap_or(0);
        let period = cpu.period().unwrap_or(0);
        if quota != 0 || period != 0 {
            let mut max = if quota > 0 {
                quota.to_string()
            } else {
                "max".to_string()
            };
            // Without a period the kernel keeps the one it has.
            if period != 0 {
                max.push_str(&format!(" {period}"));
            }
            set("cpu.max", max);
        }
        if let Some(burst) = cpu.burst() {
            set("cpu.max.burst", burst.to_string());
        }
        if let Some(idle) = cpu.idle() {
            set("cpu.idle", idle.to_string());
        }
        if let Some(cpus) = cpu.cpus().as_deref().filter(|c| !c.is_empty()) {
            set("cpuset.cpus", cpus.to_string());
        }
        if let Some(mems) = cpu.mems().as_deref().filter(|m| !m.is_empty()) {
            set("cpuset.mems", mems.to_string());
        }
    }
    if let Some(pids) = resources.pids() {
        match pids.limit() {
            0 => {}
            limit if limit < 0 => set("pids.max", "max".into()),
            limit => set("pids.max", limit.to_string()),
        }
    }
    if let Some(io) = resources.block_io() {
        if io.leaf_weight().is_some() {
            return unsupported("blockIO.leafWeight");
        }
        if let Some(weight) = io.weight().filter(|&w| w != 0) {
            set("io.weight", format!("default {}", io_weight(weight)));
        }
        let host_device = |what: &str, major: i64, minor: i64| {
            Err(ContainerError::Unsupported(format!(
                "linux.resources.blockIO.{what} for device {major}:{minor}: a host device \
                 number names no disk inside the VM, whose disks are its own"
            )))
        };
        if let Some(device) = io.weight_device().iter().flatten().next() {
            return host_device("weightDevice", device.major(), device.minor());
        }
        for (what, devices) in [
            ("throttleReadBpsDevice", io.throttle_read_bps_device()),
            ("throttleWriteBpsDevice", io.throttle_write_bps_device()),
            ("throttleReadIOPSDevice", io.throttle_read_iops_device()),
            ("throttleWriteIOPSDevice", io.throttle_write_iops_device()),
        ] {
            if let Some(device) = devices.iter().flatten().next() {
                return host_device(what, device.major(), device.minor());
            }
        }
    }
    for limit in resources.hugepage_limits().iter().flatten() {
        set(
            &format!("hugetlb.{}.max", limit.page_size()),
            v2_limit(limit.limit()),
        );
    }
    if let Some(network) = resources.network() {
        if network.class_id().is_some() || network.priorities().is_some() {
            return unsupported("network (net_cls/net_prio are cgroup v1 only)");
        }
    }
    if resources.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(ContainerError::Unsupported(
            "linux.resources.rdma: the VM has no RDMA devices".into(),
        ));
    }
    // Last, as runc writes them: a unified value overrides the converted one.
    let unified: BTreeMap<_, _> = resources.unified().iter().flatten().collect();
    for (file, value) in unified {
        if file.is_empty() || file.contains('/') || file.starts_with('.') {
            return Err(ContainerError::Unsupported(format!(
                "linux.resources.unified key {file:?} is not a cgroup interface file"
            )));
        }
        set(file, value.clone());
    }
    Ok(settings)
}

/// A live update (`update`, the shim's Update) of a running VM that booted with `vcpus`
/// vCPUs and `guest_memory_mib` of memory: refused whole when it asks for more than the VM
/// has (its memory and vCPUs are fixed at boot), never half-applied.
pub fn live_update(
    resources: &LinuxResources,
    vcpus: u32,
    guest_memory_mib: u32,
) -> Result<LiveUpdate, ContainerError> {
    let settings = guest_cgroup_settings(resources)?;
    if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
        refuse_beyond_the_vm(limit, guest_memory_mib)?;
    }
    Ok(LiveUpdate {
        settings,
        memory_target: guest_memory_target(resources, guest_memory_mib),
        online_vcpus: online_vcpus(resources, vcpus)?,
    })
}

/// The VM's memory after a live update of the container's memory limit: the limit and the
/// guest's headroom, within what the VM booted with (`guest_memory_mib`); all of it when the
/// limit is lifted (-1). `None` when the update leaves the memory limit alone. The VM's
/// balloon then gives the host what the guest no longer may use, or takes it back.
fn guest_memory_target(resources: &LinuxResources, guest_memory_mib: u32) -> Option<u64> {
    let limit = resources.memory().as_ref().and_then(|m| m.limit())?;
    let boot = u64::from(guest_memory_mib) << 20;
    if limit < 0 {
        return Some(boot);
    }
    let wanted = (limit as u64).saturating_add(u64::from(GUEST_HEADROOM_MIB) << 20);
    Some(wanted.clamp(engine::MIN_MEMORY_TARGET.min(boot), boot))
}

/// The vCPUs to keep online after a live update of the CPU limit, counted as at create
/// ([`vm_shape`]: the quota rounded up, else the cpuset, at most the host's CPUs); all of
/// the VM's when the quota is lifted (-1). `None` when the update leaves the CPU count
/// alone. More than the VM booted with is refused: a running VM cannot get more vCPUs.
fn online_vcpus(resources: &LinuxResources, vcpus: u32) -> Result<Option<u32>, ContainerError> {
    let Some(cpu) = resources.cpu().as_ref() else {
        return Ok(None);
    };
    let wanted = match cpus_asked(cpu) {
        Some(asked) => asked.clamp(1, host_cpus()),
        None if cpu.quota() == Some(-1) => vcpus,
        None => return Ok(None),
    };
    if wanted > vcpus {
        return Err(ContainerError::Unsupported(format!(
            "cannot raise the CPU limit to {wanted} CPUs: the VM was created with {vcpus} \
             vCPU{} (its limit then, or max_vcpus of the runtime's VM defaults if more), and \
             a running VM cannot get more: recreate the container with the larger limit",
            if vcpus == 1 { "" } else { "s" }
        )));
    }
    Ok(Some(wanted))
}

/// A memory limit larger than the VM: its guest memory is fixed at boot (the limit it was
/// created with plus the guest's headroom, or the smallest VM). A raise into the headroom is
/// accepted, as docker's `--memory 64m` then `update --memory 128m` on a 128 MiB guest: the
/// container then shares the headroom with the guest kernel, and an OOM kill there is still
/// counted in its cgroup (and reported). No limit (-1) is what a container created without
/// one has: the VM's memory is its bound.
fn refuse_beyond_the_vm(limit: i64, guest_mib: u32) -> Result<(), ContainerError> {
    let room = i64::from(guest_mib) << 20;
    if limit > room {
        return Err(ContainerError::Unsupported(format!(
            "cannot raise the memory limit to {} MiB: the VM was created with {guest_mib} MiB \
             of guest memory, and a VM's memory cannot grow yet: recreate the container with \
             the larger limit",
            (limit + (1 << 20) - 1) >> 20,
        )));
    }
    Ok(())
}

/// A v1-style byte limit: -1 is unlimited.
fn v2_limit(value: i64) -> String {
    if value < 0 {
        "max".into()
    } else {
        value.to_string()
    }
}

/// `memory.swap.max` from OCI's `swap`, which is memory+swap as in cgroup v1 (0: unset).
fn swap_max(swap: i64, limit: i64) -> Result<Option<String>, ContainerError> {
    let invalid = |why: &str| {
        Err(ContainerError::Unsupported(format!(
            "linux.resources.memory.swap {swap} with limit {limit}: {why}"
        )))
    };
    match (swap, limit) {
        // Unlimited memory and no swap setting: unlimited both, as in cgroup v1.
        (0, -1) => Ok(Some("max".into())),
        (0, _) => Ok(None),
        (s, _) if s < 0 => Ok(Some("max".into())),
        (_, l) if l <= 0 => invalid("a swap limit needs a memory limit"),
        (s, l) if s < l => invalid("memory+swap must be at least the memory limit"),
        (s, l) => Ok(Some((s - l).to_string())),
    }
}

/// cgroup v1 `cpu.shares` (2..262144) onto v2 `cpu.weight` (1..10000), as runc maps it.
fn cpu_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// cgroup v1 `blkio.weight` (10..1000) onto v2 `io.weight` (1..10000), as runc maps it.
fn io_weight(weight: u16) -> u64 {
    let weight = u64::from(weight.clamp(10, 1000));
    1 + ((weight - 10) * 9999) / 990
}

/// Shared or slave propagation of a bind would carry mounts between the host and the
/// container; the VM's boundary carries none, so it fails naming the mount rather than being
/// dropped (private and unbindable are applied in the guest).
fn refuse_cross_vm_propagation(
    options: &[String],
    destination: &str,
) -> Result<(), ContainerError> {
    match options
        .iter()
        .find(|o| matches!(o.as_str(), "shared" | "rshared" | "slave" | "rslave"))
    {
        Some(option) => Err(ContainerError::Unsupported(format!(
            "bind mount on {destination} with {option} propagation: mounts do not propagate \
             between the host and the VM"
        ))),
        None => Ok(()),
    }
}

/// A bind mount's source as a share. The source must exist and be a directory or a regular
/// file: a socket, fifo or device node on the host means nothing in the VM, so it is refused
/// (naming the mount) rather than replaced by something else.
fn bind_share(source: &Path, destination: &str, readonly: bool) -> Result<Share, ContainerError> {
    let meta = std::fs::metadata(source).map_err(|e| ContainerError::Bundle {
        path: source.to_path_buf(),
        reason: format!("bind mount source for {destination}: {e}"),
    })?;
    if !meta.is_dir() && !meta.is_file() {
        return Err(ContainerError::Unsupported(format!(
            "bind mount of special file {} on {destination}: a socket, fifo or device node \
             of the host cannot be reached from inside the VM",
            source.display()
        )));
    }
    Ok(Share {
        source: source.to_path_buf(),
        readonly,
        joined_with: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    fn defaults() -> VmDefaults {
        VmDefaults {
            vcpus: 1,
            max_vcpus: 8,
            memory_mib: 256,
            min_memory_mib: 128,
            max_memory_mib: 4096,
            vmm_overhead_mib: 64,
            boot_timeout_secs: 1,
        }
    }

    #[test]
    fn shape_follows_memory_limit_and_cpu_quota() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":536870912,"swap":1073741824},"cpu":{"quota":150000,"period":100000}}}}"#,
        );
        let shape = vm_shape(&s, &defaults());
        let memory = shape.memory_mib;
        assert_eq!(
            memory,
            512 + GUEST_HEADROOM_MIB,
            "the guest holds the limit and its own kernel and agent"
        );
        let host = host_cpus();
        assert_eq!(shape.online_vcpus, 2.min(host));
        assert_eq!(
            shape.vcpus,
            8.min(host),
            "booted with the most an update may ask"
        );
        let mut notes = Vec::new();
        let limits = host_limits(&s, memory, &defaults(), &mut notes).unwrap();
        assert_eq!(
            limits.memory_bytes,
            Some(i64::from(512 + GUEST_HEADROOM_MIB + 64) << 20)
        );
        assert_eq!(
            limits.swap_bytes,
            Some(512 << 20),
            "swap beyond memory, as runc sets memory.swap.max"
        );
        assert_eq!(
            (limits.cpu_quota, limits.cpu_period),
            (Some(150_000), Some(100_000))
        );
        assert!(notes.is_empty());
    }

    #[test]
    fn shape_clamps_tiny_limits_and_defaults_without_resources() {
        let s =
            spec(r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":6291456}}}}"#);
        let shape = vm_shape(&s, &defaults());
        assert_eq!((shape.online_vcpus, shape.memory_mib), (1, 128));
        let mut notes = Vec::new();
        let limits = host_limits(&s, 128, &defaults(), &mut notes).unwrap();
        assert_eq!(
            limits.memory_bytes,
            Some((128 + 64) << 20),
            "raised to hold the VM"
        );
        assert_eq!(notes.len(), 1);
        let s = spec(r#"{"ociVersion":"1.0.2"}"#);
        let shape = vm_shape(&s, &defaults());
        assert_eq!((shape.online_vcpus, shape.memory_mib), (1, 256));
        // A limit above `max_vcpus` boots that many; a host of fewer CPUs bounds both.
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"cpu":{"quota":1200000,"period":100000}}}}"#,
        );
        let shape = vm_shape(&s, &defaults());
        assert_eq!(shape.online_vcpus, 12.min(host_cpus()));
        assert_eq!(shape.vcpus, shape.online_vcpus.max(8.min(host_cpus())));
    }

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    fn settings(json: &str) -> Vec<(String, String)> {
        guest_cgroup_settings(&resources(json))
            .unwrap()
            .into_iter()
            .map(|s| (s.file, s.value))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn docker_resources_become_cgroup_v2_files_as_runc_writes_them() {
        // `docker run --memory 64m --memory-reservation 32m --cpus 1.5 --cpu-shares 512
        // --cpuset-cpus 0 --pids-limit 100 --blkio-weight 500`
        let got = settings(
            r#"{"memory":{"limit":67108864,"reservation":33554432,"swap":134217728},
                "cpu":{"shares":512,"quota":150000,"period":100000,"cpus":"0","mems":""},
                "pids":{"limit":100},"blockIO":{"weight":500},
                "devices":[{"allow":false,"access":"rwm"}]}"#,
        );
        assert_eq!(
            got,
            pairs(&[
                ("memory.max", "67108864"),
                ("memory.swap.max", "67108864"),
                ("memory.low", "33554432"),
                ("cpu.weight", "20"),
                ("cpu.max", "150000 100000"),
                ("cpuset.cpus", "0"),
                ("pids.max", "100"),
                ("io.weight", "default 4950"),
            ])
        );
    }

    #[test]
    fn unlimited_values_are_max_and_unset_values_are_not_written() {
        assert_eq!(
            settings(
                r#"{"memory":{"limit":-1},"cpu":{"quota":-1,"period":50000},"pids":{"limit":-1}}"#
            ),
            pairs(&[
                ("memory.max", "max"),
                ("memory.swap.max", "max"),
                ("cpu.max", "max 50000"),
                ("pids.max", "max"),
            ])
        );
        assert_eq!(
            settings(r#"{"memory":{"limit":67108864,"swap":-1},"pids":{"limit":0}}"#),
            pairs(&[("memory.max", "67108864"), ("memory.swap.max", "max")])
        );
        assert!(settings(r#"{"memory":{},"cpu":{"shares":0}}"#).is_empty());
        // What docker 20.10's update sends for what it does not set.
        assert_eq!(
            settings(
                r#"{"memory":{"limit":209715200,"kernel":0,"kernelTCP":0,"swappiness":18446744073709551615},"blockIO":{"weight":0}}"#
            ),
            pairs(&[("memory.max", "209715200")])
        );
    }

    #[test]
    fn share_and_weight_conversions_keep_runcs_end_points() {
        assert_eq!(
            (cpu_weight(2), cpu_weight(1024), cpu_weight(262_144)),
            (1, 39, 10_000)
        );
        assert_eq!((io_weight(10), io_weight(1000)), (1, 10_000));
    }

    #[test]
    fn unified_values_are_written_last_and_override() {
        let got = settings(
            r#"{"memory":{"limit":1048576},"unified":{"memory.high":"524288","memory.max":"2097152"}}"#,
        );
        assert_eq!(
            got,
            pairs(&[
                ("memory.max", "1048576"),
                ("memory.high", "524288"),
                ("memory.max", "2097152"),
            ])
        );
    }

    #[test]
    fn resources_the_guest_cannot_honour_fail_naming_them() {
        for (json, named) in [
            (
                r#"{"blockIO":{"throttleReadBpsDevice":[{"major":8,"minor":0,"rate":1048576}]}}"#,
                "throttleReadBpsDevice for device 8:0",
            ),
            (
                r#"{"blockIO":{"weightDevice":[{"major":253,"minor":1,"weight":100}]}}"#,
                "weightDevice for device 253:1",
            ),
            (r#"{"memory":{"swappiness":10}}"#, "memory.swappiness"),
            (r#"{"memory":{"kernelTCP":1048576}}"#, "memory.kernelTCP"),
            (r#"{"network":{"classID":42}}"#, "network"),
            (
                r#"{"memory":{"limit":1048576,"swap":524288}}"#,
                "memory+swap must be at least",
            ),
            (r#"{"memory":{"swap":524288}}"#, "needs a memory limit"),
            (r#"{"unified":{"../x":"1"}}"#, "\"../x\""),
        ] {
            let err = guest_cgroup_settings(&resources(json))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{json}: {err}");
        }
    }

    #[test]
    fn every_linux_container_gets_a_guest_cgroup() {
        let with = spec(r#"{"ociVersion":"1.0.2","linux":{"resources":{"pids":{"limit":7}}}}"#);
        let (setup, _) = container_setup(&with, RootfsSpec::default()).unwrap();
        assert_eq!(
            setup.cgroup.unwrap().settings,
            vec![CgroupSetting {
                file: "pids.max".into(),
                value: "7".into()
            }]
        );
        let without = spec(r#"{"ociVersion":"1.0.2","linux":{}}"#);
        let (setup, _) = container_setup(&without, RootfsSpec::default()).unwrap();
        assert_eq!(setup.cgroup, Some(CgroupSpec::default()));
    }

    #[test]
    fn a_memory_limit_the_vm_cannot_hold_is_refused() {
        let raise = |limit: i64| resources(&format!(r#"{{"memory":{{"limit":{limit}}}}}"#));
        assert_eq!(
            live_update(&raise(128 << 20), 1, 128).unwrap().settings,
            vec![CgroupSetting {
                file: "memory.max".into(),
                value: (128 << 20).to_string()
            }]
        );
        let err = live_update(&raise(129 << 20), 1, 128)
            .unwrap_err()
            .to_string();
        assert!(err.contains("129 MiB") && err.contains("128 MiB"), "{err}");
        assert!(live_update(&raise(-1), 1, 128).is_ok());
    }

    #[test]
    fn a_cpu_update_keeps_online_what_it_asks_within_the_vms_vcpus() {
        let host = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let cpu = |json: &str| resources(&format!(r#"{{"cpu":{json}}}"#));
        let online = |json: &str, vcpus: u32| live_update(&cpu(json), vcpus, 128);
        // Rounded up, as at create.
        assert_eq!(
            online(r#"{"quota":50000,"period":100000}"#, 2)
                .unwrap()
                .online_vcpus,
            Some(1)
        );
        assert_eq!(online(r#"{"cpus":"0"}"#, 2).unwrap().online_vcpus, Some(1));
        // Lifted: every vCPU the VM has.
        assert_eq!(online(r#"{"quota":-1}"#, 2).unwrap().online_vcpus, Some(2));
        // Not about the count: left alone.
        assert_eq!(online(r#"{"shares":512}"#, 2).unwrap().online_vcpus, None);
        // More than the VM has (and the host can give) is refused, naming both.
        if host >= 2 {
            let err = online(r#"{"quota":200000,"period":100000}"#, 1)
                .unwrap_err()
                .to_string();
            assert!(err.contains("2 CPUs") && err.contains("1 vCPU ("), "{err}");
        }
        // A quota beyond the host's CPUs asks for all of them, as at create.
        assert_eq!(
            online(r#"{"quota":100000000,"period":100000}"#, host)
                .unwrap()
                .online_vcpus,
            Some(host)
        );
    }

    #[test]
    fn a_memory_update_sets_the_vm_to_the_limit_and_headroom_within_its_boot_size() {
        let limit = |bytes: i64| -> LinuxResources {
            serde_json::from_value(serde_json::json!({"memory": {"limit": bytes}})).unwrap()
        };
        let guest_memory_target =
            |r: &LinuxResources, mib: u32| live_update(r, 1, mib).unwrap().memory_target;
        let mib = |n: u64| n << 20;
        assert_eq!(
            guest_memory_target(&limit(64 << 20), 320),
            Some(mib(64 + 64))
        );
        // Never above what it booted with, all of it when the limit is lifted.
        assert_eq!(guest_memory_target(&limit(300 << 20), 320), Some(mib(320)));
        assert_eq!(guest_memory_target(&limit(-1), 320), Some(mib(320)));
        // Never below the least a guest keeps.
        assert_eq!(
            guest_memory_target(&limit(1 << 20), 320),
            Some(engine::MIN_MEMORY_TARGET.max(mib(65)))
        );
        let cpu_only: LinuxResources =
            serde_json::from_value(serde_json::json!({"cpu": {"shares": 512}})).unwrap();
        assert_eq!(guest_memory_target(&cpu_only, 320), None);
    }

    #[test]
    fn a_cpuset_keeps_online_every_cpu_it_names() {
        assert_eq!(highest_cpu("0-3,7"), Some(7));
        assert_eq!(highest_cpu("2"), Some(2));
        assert_eq!(highest_cpu("3-1"), None);
        assert_eq!(highest_cpu(""), None);
        let cpu = |json: &str| serde_json::from_str::<LinuxCpu>(json).unwrap();
        assert_eq!(cpus_asked(&cpu(r#"{"cpus":"1"}"#)), Some(2));
        assert_eq!(cpus_asked(&cpu(r#"{"cpus":"0"}"#)), Some(1));
        assert_eq!(
            cpus_asked(&cpu(r#"{"quota":300000,"period":100000,"cpus":"1"}"#)),
            Some(3),
            "the quota's count when it is more"
        );
        assert_eq!(cpus_asked(&cpu(r#"{"shares":512}"#)), None);
    }

    #[test]
    fn a_user_namespace_needs_its_mappings_and_mappings_need_the_namespace() {
        let with = |linux: &str| {
            user_namespace(&spec(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{linux}}}"#
            )))
        };
        let map = r#"[{"containerID":0,"hostID":100000,"size":65536}]"#;
        let both = with(&format!(
            r#"{{"namespaces":[{{"type":"user"}}],"uidMappings":{map},"gidMappings":{map}}}"#
        ))
        .unwrap()
        .unwrap();
        let expected = agent_proto::IdMapping {
            container_id: 0,
            host_id: 100_000,
            size: 65_536,
        };
        assert_eq!(both.uid_mappings, [expected]);
        assert_eq!(both.gid_mappings, [expected]);
        assert_eq!(with(r#"{"namespaces":[{"type":"pid"}]}"#).unwrap(), None);
        let no_gid = with(&format!(
            r#"{{"namespaces":[{{"type":"user"}}],"uidMappings":{map}}}"#
        ));
        assert!(no_gid.unwrap_err().to_string().contains("no gid mappings"));
        let no_namespace = with(&format!(r#"{{"uidMappings":{map},"gidMappings":{map}}}"#));
        assert!(no_namespace
            .unwrap_err()
            .to_string()
            .contains("no user namespace"));
    }

    #[test]
    fn process_translation_keeps_user_rlimits_and_capabilities() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","process":{"terminal":true,"consoleSize":{"height":24,"width":80},
            "user":{"uid":1000,"gid":100,"additionalGids":[5,6],"umask":18},
            "args":["sh"],"env":["A=1"],"cwd":"/tmp","noNewPrivileges":true,
            "rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":512}],
            "capabilities":{"bounding":["CAP_KILL","CAP_CHOWN"],"effective":["CAP_KILL"]}}}"#,
        );
        let p = process_spec(s.process().as_ref().unwrap());
        assert_eq!(
            (p.uid, p.gid, p.additional_gids.clone(), p.umask),
            (1000, 100, vec![5, 6], Some(18))
        );
        assert_eq!(p.console_size, Some((24, 80)));
        assert_eq!(
            p.rlimits,
            vec![Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                soft: 512,
                hard: 1024
            }]
        );
        let caps = p.capabilities.unwrap();
        assert_eq!(
            caps.bounding,
            vec!["CAP_CHOWN".to_string(), "CAP_KILL".to_string()]
        );
        assert_eq!(caps.effective, vec!["CAP_KILL".to_string()]);
        assert!(p.no_new_privileges && p.terminal);
    }

    #[test]
    fn binds_become_shares_in_order_and_docker_shm_is_the_guests_own() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let json = format!(
            r#"{{"ociVersion":"1.0.2","hostname":"h1","mounts":[
                {{"destination":"/proc","type":"proc","source":"proc"}},
                {{"destination":"/etc/hosts","type":"bind","source":"{}","options":["rbind","ro"]}},
                {{"destination":"/dev/shm","type":"bind","source":"{}","options":["rbind"]}},
                {{"destination":"/data","source":"{}","options":["rbind","rw"]}}]}}"#,
            hosts.display(),
            dir.path().display(),
            data.display()
        );
        let (setup, shares) = container_setup(&spec(&json), RootfsSpec::default()).unwrap();
        assert_eq!(setup.hostname.as_deref(), Some("h1"));
        assert!(
            matches!(&setup.mounts[0].kind, MountKind::Filesystem { fstype, .. } if fstype == "proc")
        );
        assert_eq!(
            setup.mounts[1].kind,
            MountKind::Share {
                index: 0,
                readonly: true,
                options: vec!["rbind".into(), "ro".into()],
            }
        );
        assert!(
            matches!(&setup.mounts[2].kind, MountKind::Filesystem { fstype, .. } if fstype == "tmpfs")
        );
        assert_eq!(
            setup.mounts[3].kind,
            MountKind::Share {
                index: 1,
                readonly: false,
                options: vec!["rbind".into(), "rw".into()],
            }
        );
        assert_eq!(
            shares,
            vec![
                Share {
                    source: hosts,
                    readonly: true,
                    joined_with: None
                },
                Share {
                    source: data,
                    readonly: false,
                    joined_with: None
                }
            ]
        );
    }

    #[test]
    fn a_mount_the_vm_cannot_have_fails_naming_it() {
        for (mount, named) in [
            (
                r#"{"destination":"/null","type":"bind","source":"/dev/null","options":["bind"]}"#,
                "special file",
            ),
            (
                r#"{"destination":"/nfs","type":"nfs","source":"server:/x"}"#,
                "\"nfs\"",
            ),
            (
                r#"{"destination":"/null","type":"bind","source":"/tmp","options":["rbind","rshared"]}"#,
                "rshared propagation",
            ),
        ] {
            let json = format!(r#"{{"ociVersion":"1.0.2","mounts":[{mount}]}}"#);
            let err = container_setup(&spec(&json), RootfsSpec::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{err}");
            assert!(err.contains("/null") || err.contains("/nfs"), "{err}");
        }
    }

    #[test]
    fn missing_bind_source_is_an_error() {
        let json = r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/x","type":"bind","source":"/no/such/file","options":["rbind"]}]}"#;
        let err = container_setup(&spec(json), RootfsSpec::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bind mount source for /x"), "{err}");
    }

    #[test]
    fn devices_keep_their_numbers_owner_and_permission_bits_only() {
        let json = r#"{"ociVersion":"1.0.2","linux":{"devices":[
            {"path":"/dev/fuse","type":"c","major":10,"minor":229,"fileMode":8630,"uid":1000,"gid":44},
            {"path":"/dev/sdz","type":"b","major":259,"minor":7},
            {"path":"/dev/pipe","type":"p","major":0,"minor":0,"fileMode":384}]}}"#;
        let (setup, _) = container_setup(&spec(json), RootfsSpec::default()).unwrap();
        assert_eq!(
            setup.devices,
            vec![
                DeviceNode {
                    path: "/dev/fuse".into(),
                    kind: DeviceKind::Char,
                    major: 10,
                    minor: 229,
                    mode: 0o666,
                    uid: 1000,
                    gid: 44,
                },
                DeviceNode {
                    path: "/dev/sdz".into(),
                    kind: DeviceKind::Block,
                    major: 259,
                    minor: 7,
                    mode: 0o666,
                    uid: 0,
                    gid: 0,
                },
                DeviceNode {
                    path: "/dev/pipe".into(),
                    kind: DeviceKind::Fifo,
                    major: 0,
                    minor: 0,
                    mode: 0o600,
                    uid: 0,
                    gid: 0,
                },
            ]
        );
    }

    #[test]
    fn a_device_of_type_all_fails_naming_it() {
        let json = r#"{"ociVersion":"1.0.2","linux":{"devices":[{"path":"/dev/x","type":"a","major":1,"minor":3}]}}"#;
        let err = container_setup(&spec(json), RootfsSpec::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/x"), "{err}");
    }

    #[test]
    fn root_propagation_follows_config_and_unbindable_fails() {
        let with = |value: &str| {
            let json =
                format!(r#"{{"ociVersion":"1.0.2","linux":{{"rootfsPropagation":"{value}"}}}}"#);
            container_setup(&spec(&json), RootfsSpec::default()).map(|(s, _)| s.root_propagation)
        };
        assert_eq!(
            with("rshared").unwrap(),
            Some(RootPropagation {
                kind: PropagationKind::Shared,
                recursive: true
            })
        );
        assert_eq!(
            with("slave").unwrap(),
            Some(RootPropagation {
                kind: PropagationKind::Slave,
                recursive: false
            })
        );
        assert_eq!(with("").unwrap(), None);
        for refused in ["unbindable", "runbindable", "sideways"] {
            let err = with(refused).unwrap_err().to_string();
            assert!(err.contains(refused), "{err}");
        }
    }
    fn seccomp_of(profile: &str) -> Result<Option<SeccompProfile>, ContainerError> {
        let json = format!(r#"{{"ociVersion":"1.0.2","linux":{{"seccomp":{profile}}}}}"#);
        container_setup(&spec(&json), RootfsSpec::default()).map(|(setup, _)| setup.seccomp)
    }

    #[test]
    fn a_seccomp_profile_reaches_the_guest_with_runcs_default_errno() {
        let profile = seccomp_of(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],
            "flags":["SECCOMP_FILTER_FLAG_LOG"],
            "syscalls":[{"names":["read","write"],"action":"SCMP_ACT_ALLOW"},
            {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
            {"names":["personality"],"action":"SCMP_ACT_ALLOW",
             "args":[{"index":0,"value":4294967295,"valueTwo":8,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            profile.default_action,
            SeccompAction::Errno(libc::EPERM as u16)
        );
        assert_eq!(profile.architectures, ["SCMP_ARCH_X86_64"]);
        assert_eq!(profile.flags, ["SECCOMP_FILTER_FLAG_LOG"]);
        assert_eq!(profile.rules[1].action, SeccompAction::Errno(38));
        assert_eq!(
            profile.rules[2].args,
            [SeccompArg {
                index: 0,
                value: 0xffff_ffff,
                value_two: 8,
                op: SeccompOp::MaskedEqual
            }]
        );
        assert_eq!(seccomp_of("null").unwrap(), None);
    }

    #[test]
    fn seccomp_user_notification_is_refused_naming_it() {
        for profile in [
            r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}"#,
            r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        ] {
            let err = seccomp_of(profile).unwrap_err().to_string();
            assert!(
                err.contains("SCMP_ACT_NOTIFY, listenerPath"),
                "{profile}: {err}"
            );
        }
        let err = seccomp_of(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("argument index 6"), "{err}");
    }
}
