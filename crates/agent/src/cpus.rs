//! The guest's online vCPUs, which follow the container's CPU limit on a live update: the
//! VM boots with the vCPUs its limit asked for, and an update takes some of them offline
//! or back online, so that what the container counts (`nproc`, `/proc/cpuinfo`, the
//! runtimes that size their thread pools from them) is what it may use.
//!
//! The agent reaches sysfs through the descriptor it opened in the initramfs, before it
//! entered the container root, whose `/sys` is the container's (and usually read-only).

use std::fs;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::Mode;

/// Where the kernel lists the CPUs.
const CPUS: &str = "/sys/devices/system/cpu";

#[derive(Debug)]
pub struct Cpus {
    /// [`CPUS`], opened before the container root hides it.
    dir: Option<OwnedFd>,
}

impl Cpus {
    pub fn open() -> Self {
        let dir = open(
            CPUS,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        Cpus { dir }
    }

    /// Keeps vCPUs `0..count` online and takes the others offline; the boot CPU is always
    /// online (the guest kernel cannot take it offline).
    pub fn keep_online(&self, count: u32) -> Result<(), String> {
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| format!("{CPUS} was not readable at boot"))?;
        let present = read(dir, "present")?;
        let total = count_cpu_list(present.trim())
            .ok_or_else(|| format!("{CPUS}/present: unexpected {present:?}"))?;
        if count == 0 || count > total {
            return Err(format!(
                "cannot keep {count} vCPUs online: the VM has {total}"
            ));
        }
        // Raised in order and lowered from the top, as a CPU's number says when it came.
        let mut order: Vec<u32> = (1..total).collect();
        if count < total {
            order.reverse();
        }
        for cpu in order {
            let want = if cpu < count { "1" } else { "0" };
            let file = format!("cpu{cpu}/online");
            if read(dir, &file)?.trim() != want {
                write(dir, &file, want)?;
            }
        }
        Ok(())
    }
}

/// `file` under the CPUs' directory `dir`, opened with `flags`.
fn open_in(dir: &OwnedFd, file: &str, flags: OFlag) -> Result<fs::File, String> {
    let fd = openat(
        Some(dir.as_raw_fd()),
        file,
        flags | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {CPUS}/{file}: {e}"))?;
    // SAFETY: `openat` returned a new descriptor that nothing else owns.
    Ok(unsafe { fs::File::from_raw_fd(fd) })
}

fn read(dir: &OwnedFd, file: &str) -> Result<String, String> {
    std::io::read_to_string(open_in(dir, file, OFlag::O_RDONLY)?)
        .map_err(|e| format!("read {CPUS}/{file}: {e}"))
}

fn write(dir: &OwnedFd, file: &str, value: &str) -> Result<(), String> {
    // One write: sysfs takes each write as a whole value.
    nix::unistd::write(
        open_in(dir, file, OFlag::O_WRONLY)?.as_fd(),
        value.as_bytes(),
    )
    .map(drop)
    .map_err(|e| format!("write {value} to {CPUS}/{file}: {e}"))
}

/// How many CPUs a kernel CPU list (`0-3,5`) names.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut count = 0;
    for part in list.split(',') {
        count += match part.split_once('-') {
            Some((first, last)) => last
                .parse::<u32>()
                .ok()?
                .checked_sub(first.parse().ok()?)?
                .checked_add(1)?,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count_their_cpus() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3"), Some(4));
        assert_eq!(count_cpu_list("0-1,4,6-7"), Some(5));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("a"), None);
    }
}
