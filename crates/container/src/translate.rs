//! config.json → what the VM and the agent need: the VM shape, the mounts the agent makes,
//! the processes it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agent_proto::{
    Capabilities, ContainerSetup, DeviceKind, DeviceNode, MountKind, MountSpec, ProcessSpec,
    PropagationKind, Rlimit, RootPropagation, RootfsSpec,
};
use oci_spec::runtime::{Process, Spec};

use crate::cgroup::HostLimits;
use crate::paths::VmDefaults;
use crate::ContainerError;

/// Filesystems the guest kernel makes itself.
const GUEST_FILESYSTEMS: [&str; 8] = [
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "ramfs",
];

/// vCPUs and memory for the VM, from `linux.resources` (cpu quota or cpuset, memory limit),
/// else the defaults. A memory limit covers the whole VM on the host, so the guest gets the
/// limit minus the VMM's overhead (but never less than the minimum).
pub fn vm_shape(spec: &Spec, defaults: &VmDefaults) -> (u32, u32) {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let from_quota = cpu.and_then(|c| match (c.quota(), c.period()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p) as u32),
        _ => None,
    });
    let from_cpuset = cpu.and_then(|c| c.cpus().as_deref()).and_then(count_cpuset);
    let vcpus = from_quota
        .or(from_cpuset)
        .unwrap_or(defaults.vcpus)
        .clamp(1, host_cpus.max(1));
    let memory = memory_limit_mib(spec)
        .map(|m| m.saturating_sub(defaults.vmm_overhead_mib))
        .map(|m| m.clamp(defaults.min_memory_mib, defaults.max_memory_mib))
        .unwrap_or(defaults.memory_mib);
    (vcpus, memory)
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

/// The limits for the VM's host cgroup. The memory limit is raised, with a note, when it
/// cannot hold the smallest VM.
pub fn host_limits(
    spec: &Spec,
    guest_memory_mib: u32,
    defaults: &VmDefaults,
    notes: &mut Vec<String>,
) -> HostLimits {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let needed = guest_memory_mib + defaults.vmm_overhead_mib;
    let memory_bytes = memory_limit_mib(spec).map(|limit| {
        if limit < needed {
            notes.push(format!(
                "memory limit {limit} MiB cannot hold a VM ({guest_memory_mib} MiB guest + \
                 {} MiB VMM); the host limit is {needed} MiB",
                defaults.vmm_overhead_mib
            ));
        }
        i64::from(limit.max(needed)) << 20
    });
    HostLimits {
        memory_bytes,
        cpu_quota: cpu.and_then(|c| c.quota()).filter(|&q| q > 0),
        cpu_period: cpu.and_then(|c| c.period()).filter(|&p| p > 0),
        cpu_shares: cpu.and_then(|c| c.shares()).filter(|&s| s > 0),
        cpuset_cpus: cpu.and_then(|c| c.cpus().clone()).filter(|c| !c.is_empty()),
        cpuset_mems: cpu.and_then(|c| c.mems().clone()).filter(|m| !m.is_empty()),
    }
}

/// Counts a cpuset list like `0-3,7`.
fn count_cpuset(list: &str) -> Option<u32> {
    let mut count = 0;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (count > 0).then_some(count)
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
        cgroup: None,
        devices: devices(spec)?,
        root_propagation: root_propagation(spec)?,
    };
    Ok((setup, shares))
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
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":536870912},"cpu":{"quota":150000,"period":100000}}}}"#,
        );
        let (vcpus, memory) = vm_shape(&s, &defaults());
        assert_eq!(
            memory,
            512 - 64,
            "the VMM's overhead comes out of the limit"
        );
        let host = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(vcpus, 2.min(host));
        let mut notes = Vec::new();
        let limits = host_limits(&s, memory, &defaults(), &mut notes);
        assert_eq!(limits.memory_bytes, Some(512 << 20));
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
        assert_eq!(vm_shape(&s, &defaults()), (1, 128));
        let mut notes = Vec::new();
        let limits = host_limits(&s, 128, &defaults(), &mut notes);
        assert_eq!(
            limits.memory_bytes,
            Some((128 + 64) << 20),
            "raised to hold the VM"
        );
        assert_eq!(notes.len(), 1);
        let s = spec(r#"{"ociVersion":"1.0.2"}"#);
        assert_eq!(vm_shape(&s, &defaults()), (1, 256));
    }

    #[test]
    fn cpuset_lists_are_counted() {
        assert_eq!(count_cpuset("0-3,7"), Some(5));
        assert_eq!(count_cpuset("2"), Some(1));
        assert_eq!(count_cpuset("3-1"), None);
        assert_eq!(count_cpuset(""), None);
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
}
