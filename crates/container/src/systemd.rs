//! The systemd cgroup driver: on a host whose PID 1 is systemd, a container whose
//! `cgroupsPath` is systemd's `slice:prefix:name` (docker's and containerd's systemd cgroup
//! driver) gets a transient scope unit, `prefix-name.scope` in `slice`, created over D-Bus
//! with `StartTransientUnit`, as runc does. systemd then owns the cgroup: `systemctl status`
//! shows the monitor and its VMM, the limits are the unit's properties (so a `daemon-reload`
//! or another unit's start does not reset them), and the scope goes away with its last
//! process. The cgroup files are written as well (by [`crate::cgroup`]), for what systemd
//! has no property for.
//!
//! Elsewhere (no systemd, or a plain path) the cgroupfs driver alone places the container.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_lite::{FutureExt as _, StreamExt as _};

use zbus::blocking::{Connection, Proxy};
use zbus::zvariant::{OwnedObjectPath, Value};

use crate::cgroup::{cpu_weight, HostLimits, HOST_PIDS_MAX};
use crate::ContainerError;

const DESTINATION: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

/// How long systemd may take to start a scope (its job) before `create` fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A transient scope: its unit name and the slice it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub unit: String,
    pub slice: String,
}

impl Scope {
    /// The scope for a systemd-style `cgroupsPath` (`slice:prefix:name`; an empty slice is
    /// `system.slice`), or `None` for a path.
    pub fn parse(cgroups_path: &str) -> Option<Self> {
        if cgroups_path.starts_with('/') {
            return None;
        }
        let mut parts = cgroups_path.split(':');
        let (Some(slice), Some(prefix), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if name.is_empty() {
            return None;
        }
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        let unit = if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        Some(Self {
            unit,
            slice: slice.into(),
        })
    }

    /// The scope's cgroup directory below a hierarchy's root: a nested slice (`a-b.slice`)
    /// lives under its parents (`a.slice/a-b.slice`), as systemd lays them out.
    pub fn cgroup_dir(&self) -> PathBuf {
        let mut dir = PathBuf::new();
        match self.slice.strip_suffix(".slice") {
            Some(stem) => {
                let mut end = 0;
                for piece in stem.split('-') {
                    end += piece.len();
                    dir.push(format!("{}.slice", &stem[..end]));
                    end += 1;
                }
            }
            None => dir.push(&self.slice),
        }
        dir.join(&self.unit)
    }

    /// The scope systemd manages for `cgroups_path` on this host: `None` when PID 1 is not
    /// systemd (checked as `sd_booted` does) or the path is not systemd's form.
    pub fn on_this_host(cgroups_path: &str) -> Option<Self> {
        if !is_pid1() {
            return None;
        }
        Self::parse(cgroups_path)
    }

    /// Starts the scope with `pid` in it and `limits` as its properties, and waits (at most
    /// [`START_TIMEOUT`]) for systemd's job to finish. The wait is a future raced against a
    /// timer, so that nothing (no thread, no bus connection) outlives the call.
    pub fn start(&self, pid: u32, limits: &HostLimits) -> Result<(), ContainerError> {
        let mut properties: Vec<(&str, Value<'_>)> = vec![
            (
                "Description",
                Value::from(format!("supermachine container {}", self.unit)),
            ),
            ("Slice", Value::from(self.slice.as_str())),
            ("PIDs", Value::from(vec![pid])),
            // The monitor manages the cgroup below the scope (its VMM threads, the limits
            // systemd has no property for), as runc's containers do.
            ("Delegate", Value::from(true)),
            ("DefaultDependencies", Value::from(false)),
            ("MemoryAccounting", Value::from(true)),
            ("CPUAccounting", Value::from(true)),
            ("TasksAccounting", Value::from(true)),
            ("TasksMax", Value::from(u64::from(HOST_PIDS_MAX))),
        ];
        properties
            .extend(properties_of(limits, unified()).map_err(ContainerError::InvalidResources)?);
        let outcome = async_io::block_on(self.start_job(properties).or(async {
            async_io::Timer::after(START_TIMEOUT).await;
            Err(format!(
                "systemd did not start it within {}s",
                START_TIMEOUT.as_secs()
            ))
        }));
        outcome.map_err(|reason| self.failure(reason))
    }

    /// `StartTransientUnit`, then the `JobRemoved` signal of its job: watched before the
    /// call, so that a job that ends at once is not missed.
    async fn start_job(&self, properties: Vec<(&str, Value<'_>)>) -> Result<(), String> {
        let connection = zbus::Connection::system()
            .await
            .map_err(|e| format!("connecting to systemd: {e}"))?;
        let manager = zbus::Proxy::new(&connection, DESTINATION, PATH, MANAGER)
            .await
            .map_err(|e| e.to_string())?;
        // systemd sends its manager's signals (JobRemoved) only while some client has
        // subscribed; this subscription ends with this connection.
        manager
            .call::<_, _, ()>("Subscribe", &())
            .await
            .map_err(|e| format!("Subscribe: {e}"))?;
        let mut removed = manager
            .receive_signal("JobRemoved")
            .await
            .map_err(|e| format!("watching systemd's jobs: {e}"))?;
        let aux: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
        let job: OwnedObjectPath = manager
            .call(
                "StartTransientUnit",
                &(self.unit.as_str(), "replace", properties, aux),
            )
            .await
            .map_err(|e| format!("StartTransientUnit: {e}"))?;
        while let Some(signal) = removed.next().await {
            let Ok((_, path, _, result)) = signal
                .body()
                .deserialize::<(u32, OwnedObjectPath, String, String)>()
            else {
                continue;
            };
            if path == job {
                return match result.as_str() {
                    "done" => Ok(()),
                    other => Err(format!("its start job ended {other:?}")),
                };
            }
        }
        Err("the connection to systemd closed before its job ended".into())
    }

    /// New limits for a running scope (`update`), kept across systemd's reloads.
    pub fn set_limits(&self, limits: &HostLimits) -> Result<(), ContainerError> {
        let properties =
            properties_of(limits, unified()).map_err(ContainerError::InvalidResources)?;
        if properties.is_empty() {
            return Ok(());
        }
        let manager =
            Manager::connect().map_err(|e| self.failure(format!("connecting to systemd: {e}")))?;
        manager
            .proxy
            .call::<_, _, ()>("SetUnitProperties", &(self.unit.as_str(), true, properties))
            .map_err(|e| self.failure(format!("SetUnitProperties: {e}")))
    }

    fn failure(&self, reason: String) -> ContainerError {
        ContainerError::Cgroup(format!(
            "systemd scope {} in {}: {reason}",
            self.unit, self.slice
        ))
    }
}

/// Whether this host was booted by systemd (what `sd_booted` checks).
pub fn is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Whether systemd's manager answers on the system bus.
pub fn reachable() -> Result<(), String> {
    Manager::connect().map(drop).map_err(|e| e.to_string())
}

/// Stops a scope if it is still there (it goes by itself with its last process).
pub fn stop(unit: &str) {
    let Ok(manager) = Manager::connect() else {
        return;
    };
    match manager
        .proxy
        .call::<_, _, OwnedObjectPath>("StopUnit", &(unit, "replace"))
    {
        Ok(_) => {}
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" => {}
        Err(e) => log::warn!("systemd scope {unit}: StopUnit: {e}"),
    }
}

/// systemd's manager on the system bus, for the calls that wait for no signal.
struct Manager {
    proxy: Proxy<'static>,
}

impl Manager {
    fn connect() -> zbus::Result<Self> {
        let connection = Connection::system()?;
        let proxy = Proxy::new(&connection, DESTINATION, PATH, MANAGER)?;
        Ok(Self { proxy })
    }
}

/// Whether the host's cgroups are v2 only (systemd then takes the v2 property names).
fn unified() -> bool {
    std::fs::metadata("/sys/fs/cgroup/cgroup.controllers").is_ok()
}

/// The unit properties for `limits`: v2 names on a unified host, the v1 ones (as runc sets
/// them there) otherwise. The CPU quota is per second, rounded up to systemd's 10 ms.
pub fn properties_of(
    limits: &HostLimits,
    unified: bool,
) -> Result<Vec<(&'static str, Value<'static>)>, String> {
    let mut properties = Vec::new();
    if let Some(bytes) = limits.memory_bytes {
        let name = if unified { "MemoryMax" } else { "MemoryLimit" };
        properties.push((name, Value::from(bytes as u64)));
    }
    if unified {
        if let Some(swap) = limits.swap_bytes {
            // -1 is no limit, systemd's infinity.
            properties.push((
                "MemorySwapMax",
                Value::from(u64::try_from(swap).unwrap_or(u64::MAX)),
            ));
        }
    }
    let period = limits.cpu_period.unwrap_or(100_000);
    if let Some(quota) = limits.cpu_quota {
        let per_second = (quota as u64).saturating_mul(1_000_000) / period.max(1);
        properties.push((
            "CPUQuotaPerSecUSec",
            Value::from(per_second.div_ceil(10_000) * 10_000),
        ));
    }
    if limits.cpu_quota.is_some() || limits.cpu_period.is_some() {
        properties.push(("CPUQuotaPeriodUSec", Value::from(period)));
    }
    if let Some(shares) = limits.cpu_shares {
        if unified {
            properties.push(("CPUWeight", Value::from(cpu_weight(shares))));
        } else {
            properties.push(("CPUShares", Value::from(shares)));
        }
    }
    if unified {
        if let Some(cpus) = &limits.cpuset_cpus {
            properties.push(("AllowedCPUs", Value::from(bitmask(cpus)?)));
        }
        if let Some(mems) = &limits.cpuset_mems {
            properties.push(("AllowedMemoryNodes", Value::from(bitmask(mems)?)));
        }
    }
    Ok(properties)
}

/// A cpuset list (`0-3,6`) as systemd's bitmask: bit `n % 8` of byte `n / 8` is CPU `n`.
fn bitmask(list: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("cpuset {list:?} is not a list of CPUs or ranges");
    let mut mask = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>(), b.parse::<usize>()),
            None => (part.parse::<usize>(), part.parse::<usize>()),
        };
        let (Ok(first), Ok(last)) = (first, last) else {
            return Err(bad());
        };
        if first > last || last >= 8192 {
            return Err(bad());
        }
        for cpu in first..=last {
            if mask.len() <= cpu / 8 {
                mask.resize(cpu / 8 + 1, 0);
            }
            mask[cpu / 8] |= 1 << (cpu % 8);
        }
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_paths_name_a_scope_in_a_slice() {
        let scope = Scope::parse("system.slice:docker:abc").unwrap();
        assert_eq!(scope.unit, "docker-abc.scope");
        assert_eq!(scope.slice, "system.slice");
        let scope = Scope::parse(":cri-containerd:x").unwrap();
        assert_eq!(
            (scope.unit.as_str(), scope.slice.as_str()),
            ("cri-containerd-x.scope", "system.slice")
        );
        assert_eq!(Scope::parse("user.slice::x").unwrap().unit, "x.scope");
        assert_eq!(Scope::parse("/docker/abc"), None);
        assert_eq!(Scope::parse("a:b"), None);
        assert_eq!(Scope::parse("a:b:c:d"), None);
        assert_eq!(Scope::parse("a:b:"), None);
    }

    #[test]
    fn cpusets_become_bitmasks() {
        assert_eq!(bitmask("0").unwrap(), vec![1]);
        assert_eq!(bitmask("0-3,9").unwrap(), vec![0x0f, 0x02]);
        assert_eq!(bitmask("1,1").unwrap(), vec![2]);
        assert!(bitmask("3-1").is_err());
        assert!(bitmask("x").is_err());
    }

    /// Each property as `Name=type value`, D-Bus type included: systemd refuses a
    /// property of the wrong type.
    fn names(properties: &[(&'static str, Value<'static>)]) -> Vec<String> {
        properties.iter().map(|(n, v)| format!("{n}={v}")).collect()
    }

    #[test]
    fn limits_become_the_properties_runc_sets() {
        let limits = HostLimits {
            memory_bytes: Some(512 << 20),
            swap_bytes: Some(256 << 20),
            cpu_quota: Some(150_000),
            cpu_period: Some(100_000),
            cpu_shares: Some(1024),
            cpuset_cpus: Some("0-1".into()),
            cpuset_mems: None,
        };
        assert_eq!(
            names(&properties_of(&limits, true).unwrap()),
            [
                "MemoryMax=uint64 536870912",
                "MemorySwapMax=uint64 268435456",
                "CPUQuotaPerSecUSec=uint64 1500000",
                "CPUQuotaPeriodUSec=uint64 100000",
                "CPUWeight=uint64 39",
                "AllowedCPUs=[byte 0x03]",
            ]
        );
        assert_eq!(
            names(&properties_of(&limits, false).unwrap()),
            [
                "MemoryLimit=uint64 536870912",
                "CPUQuotaPerSecUSec=uint64 1500000",
                "CPUQuotaPeriodUSec=uint64 100000",
                "CPUShares=uint64 1024",
            ]
        );
        // A quota that is not a whole number of 10 ms per second is rounded up.
        let odd = HostLimits {
            cpu_quota: Some(12_345),
            ..HostLimits::default()
        };
        assert_eq!(
            names(&properties_of(&odd, true).unwrap()),
            [
                "CPUQuotaPerSecUSec=uint64 130000",
                "CPUQuotaPeriodUSec=uint64 100000"
            ]
        );
        let unlimited_swap = HostLimits {
            swap_bytes: Some(-1),
            ..HostLimits::default()
        };
        assert_eq!(
            names(&properties_of(&unlimited_swap, true).unwrap()),
            [format!("MemorySwapMax=uint64 {}", u64::MAX)]
        );
    }
}
