//! The host's capacity ledger: admission of VMs against a budget of memory and vCPUs.
//!
//! Every VM a runtime process starts (a CLI monitor, a shim) first reserves what it may use,
//! its guest memory plus the VMM's overhead and its online vCPUs, in one ledger shared by
//! every runtime process on the host, whatever its state root. A start that would take the
//! reservations beyond the budget fails at once with [`ContainerError::Capacity`], before a
//! VM exists, instead of letting guests that later touch their memory push the host into
//! its OOM killer.
//!
//! The ledger is a JSON file beside a lock file (`/run/supermachine/capacity`, per host
//! boot, as VMs are): each change takes an exclusive `flock` on the lock file, reads the
//! entries, and writes them back by rename, so that a reader never sees half a file and a
//! process killed mid-change leaves the old one. An entry names its holder by pid and
//! start time: one whose holder is gone (killed, crashed) is reclaimed by the next change,
//! and a reused pid is not taken for its holder. A holder releases its entry when its VM
//! stops ([`Reservation`]'s drop).
//!
//! The budget: `SUPERMACHINE_CAPACITY_MEMORY` (a size, `24G`) and
//! `SUPERMACHINE_CAPACITY_VCPUS` (a count), by default 90% of the host's memory (the rest is
//! the host's own) and eight vCPUs per host CPU (a vCPU that waits costs a thread, not a
//! CPU). Every process of the host should see the same budget (set it where dockerd,
//! containerd or the caller of the CLI get their environment).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{proc, ContainerError};

/// Where the ledger lives unless `SUPERMACHINE_CAPACITY_DIR` says otherwise.
pub const DEFAULT_DIR: &str = "/run/supermachine/capacity";
const LEDGER_FILE: &str = "ledger.json";
const LOCK_FILE: &str = "lock";
/// The share of the host's memory VMs may reserve by default.
const DEFAULT_MEMORY_PERCENT: u64 = 90;
/// vCPUs per host CPU by default.
const DEFAULT_VCPUS_PER_CPU: u64 = 8;

const MIB: u64 = 1 << 20;

/// What VMs may reserve in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub memory_mib: u64,
    pub vcpus: u64,
}

impl Budget {
    /// The host's budget: the environment's, else derived from the host's size.
    pub fn of_host() -> Result<Self, ContainerError> {
        let memory_mib = match std::env::var("SUPERMACHINE_CAPACITY_MEMORY") {
            Ok(text) => snapshot::parse_size(&text)
                .map(|bytes| bytes / MIB)
                .map_err(|e| {
                    ContainerError::Capacity(format!("SUPERMACHINE_CAPACITY_MEMORY: {e}"))
                })?,
            Err(_) => host_memory_mib()? * DEFAULT_MEMORY_PERCENT / 100,
        };
        let vcpus = match std::env::var("SUPERMACHINE_CAPACITY_VCPUS") {
            Ok(text) => text.trim().parse().map_err(|_| {
                ContainerError::Capacity(format!(
                    "SUPERMACHINE_CAPACITY_VCPUS: {text:?} is not a number of vCPUs"
                ))
            })?,
            Err(_) => host_cpus() * DEFAULT_VCPUS_PER_CPU,
        };
        Ok(Budget { memory_mib, vcpus })
    }
}

fn host_memory_mib() -> Result<u64, ContainerError> {
    let meminfo =
        fs::read_to_string("/proc/meminfo").map_err(ContainerError::io("/proc/meminfo"))?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib / 1024)
        .ok_or_else(|| ContainerError::Capacity("no MemTotal in /proc/meminfo".into()))
}

fn host_cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// What one VM reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    pub memory_mib: u64,
    pub vcpus: u64,
}

/// A process that holds reservations, told apart from a later process with its pid by its
/// start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: i32,
    pub start_time: u64,
}

impl Holder {
    fn this_process() -> Result<Self, ContainerError> {
        let pid = std::process::id() as i32;
        let start_time = proc::start_time(pid)
            .ok_or_else(|| ContainerError::Capacity("no start time for this process".into()))?;
        Ok(Holder { pid, start_time })
    }

    fn is_alive(&self) -> bool {
        proc::start_time(self.pid) == Some(self.start_time)
    }
}

/// One reservation in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u64,
    pub holder: Holder,
    /// What it is for (the container's id and state root), for people reading the ledger.
    pub label: String,
    #[serde(flatten)]
    pub demand: Demand,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    next_id: u64,
    entries: Vec<Entry>,
}

/// The host's ledger (a directory with the ledger and its lock).
#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

/// The ledger's entries with their holders alive, and the budget they are held against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub budget: Budget,
    pub entries: Vec<Entry>,
}

impl Usage {
    pub fn reserved(&self) -> Demand {
        self.entries.iter().fold(
            Demand {
                memory_mib: 0,
                vcpus: 0,
            },
            |sum, e| Demand {
                memory_mib: sum.memory_mib + e.demand.memory_mib,
                vcpus: sum.vcpus + e.demand.vcpus,
            },
        )
    }
}

impl Ledger {
    /// The host's ledger: `SUPERMACHINE_CAPACITY_DIR`, else [`DEFAULT_DIR`].
    pub fn host() -> Self {
        let dir = std::env::var_os("SUPERMACHINE_CAPACITY_DIR")
            .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from);
        Ledger { dir }
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Ledger { dir: dir.into() }
    }

    /// Reserves `demand` for this process if the live reservations leave room for it in
    /// `budget`; fails with [`ContainerError::Capacity`] naming what is short.
    pub fn reserve(
        &self,
        budget: Budget,
        label: &str,
        demand: Demand,
    ) -> Result<Reservation, ContainerError> {
        let holder = Holder::this_process()?;
        self.change(|contents| {
            let usage = Usage {
                budget,
                entries: contents.entries.clone(),
            };
            let reserved = usage.reserved();
            let short = |what: &str, want: u64, used: u64, all: u64, setting: &str| {
                ContainerError::Capacity(format!(
                    "not enough host capacity for {label}: it needs {want} of {what}, and {} \
                     VM(s) hold {used} of the budget of {all} ({setting})",
                    usage.entries.len(),
                ))
            };
            if reserved.memory_mib + demand.memory_mib > budget.memory_mib {
                return Err(short(
                    "memory",
                    demand.memory_mib,
                    reserved.memory_mib,
                    budget.memory_mib,
                    "MiB; SUPERMACHINE_CAPACITY_MEMORY",
                ));
            }
            if reserved.vcpus + demand.vcpus > budget.vcpus {
                return Err(short(
                    "vCPUs",
                    demand.vcpus,
                    reserved.vcpus,
                    budget.vcpus,
                    "SUPERMACHINE_CAPACITY_VCPUS",
                ));
            }
            let id = contents.next_id;
            contents.next_id += 1;
            contents.entries.push(Entry {
                id,
                holder,
                label: label.to_string(),
                demand,
            });
            Ok(id)
        })
        .map(|id| Reservation {
            ledger: self.clone(),
            id,
        })
    }

    /// The live reservations against `budget` (dead holders' are dropped from the file).
    pub fn usage(&self, budget: Budget) -> Result<Usage, ContainerError> {
        self.change(|contents| Ok(contents.entries.clone()))
            .map(|entries| Usage { budget, entries })
    }

    fn release(&self, id: u64) -> Result<(), ContainerError> {
        self.change(|contents| {
            contents.entries.retain(|e| e.id != id);
            Ok(())
        })
    }

    /// Runs `f` on the ledger's live entries under its lock and writes back what it leaves.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut Contents) -> Result<T, ContainerError>,
    ) -> Result<T, ContainerError> {
        image::private_dir(&self.dir).map_err(ContainerError::io(&self.dir))?;
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(ContainerError::io(&lock_path))?;
        let _lock =
            Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| ContainerError::Io {
                path: lock_path.clone(),
                source: e.into(),
            })?;
        let path = self.dir.join(LEDGER_FILE);
        let read = match fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ContainerError::Io { path, source: e }),
        };
        let mut contents = match &read {
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
                ContainerError::Capacity(format!(
                    "{}: {e} (written only by rename, so not by this runtime; removing it \
                     forgets the running VMs' reservations)",
                    path.display()
                ))
            })?,
            None => Contents::default(),
        };
        let before = contents.entries.len();
        contents.entries.retain(|e| e.holder.is_alive());
        if contents.entries.len() < before {
            log::debug!(
                "capacity: reclaimed {} reservation(s) of processes that are gone",
                before - contents.entries.len()
            );
        }
        let result = f(&mut contents)?;
        // Only a change is written (a look at the ledger that reclaims nothing writes nothing).
        let bytes = serde_json::to_vec_pretty(&contents).unwrap_or_default();
        if read.as_deref() != Some(&bytes[..]) {
            crate::state::write_atomic_with_mode(&path, &bytes, 0o600)?;
        }
        Ok(result)
    }
}

/// A VM's place in the ledger, released when dropped (its VM has stopped). A holder that
/// dies without dropping it has its entry reclaimed by the next change.
#[derive(Debug)]
pub struct Reservation {
    ledger: Ledger,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Err(e) = self.ledger.release(self.id) {
            log::warn!("capacity: releasing reservation {}: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget {
        memory_mib: 1000,
        vcpus: 4,
    };

    fn demand(memory_mib: u64, vcpus: u64) -> Demand {
        Demand { memory_mib, vcpus }
    }

    #[test]
    fn reservations_are_admitted_within_the_budget_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::at(dir.path());
        let a = ledger.reserve(BUDGET, "a", demand(600, 1)).unwrap();
        let err = ledger.reserve(BUDGET, "b", demand(500, 1)).unwrap_err();
        assert!(matches!(err, ContainerError::Capacity(_)), "{err}");
        let message = err.to_string();
        assert!(message.contains("needs 500 of memory"), "{message}");
        assert!(
            message.contains("1 VM(s) hold 600 of the budget of 1000 (MiB"),
            "{message}"
        );
        assert!(
            message.contains("SUPERMACHINE_CAPACITY_MEMORY"),
            "{message}"
        );
        let b = ledger.reserve(BUDGET, "b", demand(400, 3)).unwrap();
        let err = ledger.reserve(BUDGET, "c", demand(0, 1)).unwrap_err();
        assert!(
            err.to_string().contains("SUPERMACHINE_CAPACITY_VCPUS"),
            "{err}"
        );
        assert_eq!(ledger.usage(BUDGET).unwrap().reserved(), demand(1000, 4));
        drop(a);
        assert_eq!(ledger.usage(BUDGET).unwrap().reserved(), demand(400, 3));
        drop(b);
        assert!(ledger.usage(BUDGET).unwrap().entries.is_empty());
    }

    #[test]
    fn a_dead_holders_reservation_is_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::at(dir.path());
        // A real process that held a reservation and is gone, and a live one whose pid is
        // reused by nobody: only the first is reclaimed.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let start_time = proc::start_time(pid).unwrap_or(1);
        child.wait().unwrap();
        let me = Holder::this_process().unwrap();
        let contents = Contents {
            next_id: 3,
            entries: vec![
                Entry {
                    id: 1,
                    holder: Holder { pid, start_time },
                    label: "dead".into(),
                    demand: demand(900, 1),
                },
                Entry {
                    id: 2,
                    holder: Holder {
                        pid: me.pid,
                        start_time: me.start_time + 1,
                    },
                    label: "reused pid".into(),
                    demand: demand(50, 1),
                },
            ],
        };
        fs::write(
            dir.path().join(LEDGER_FILE),
            serde_json::to_vec(&contents).unwrap(),
        )
        .unwrap();
        let _held = ledger.reserve(BUDGET, "new", demand(900, 4)).unwrap();
        let usage = ledger.usage(BUDGET).unwrap();
        assert_eq!(usage.entries.len(), 1);
        assert_eq!(usage.entries[0].label, "new");
        assert_eq!(usage.entries[0].id, 3);
    }

    #[test]
    fn a_corrupt_ledger_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LEDGER_FILE), b"{not json").unwrap();
        let err = Ledger::at(dir.path())
            .reserve(BUDGET, "a", demand(1, 1))
            .unwrap_err();
        assert!(err.to_string().contains("ledger.json"), "{err}");
    }
}
