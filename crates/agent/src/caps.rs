//! Linux capabilities by OCI name, applied to a process being started (in the child).

use std::sync::OnceLock;

use agent_proto::{Capabilities, CAPABILITY_NAMES as NAMES};

/// The highest capability this guest kernel knows (`/proc/sys/kernel/cap_last_cap`), read
/// once: the agent calls this at start-up, so every child (and every VM restored from a
/// snapshot) has it without reading the file again.
pub fn last_cap() -> u32 {
    static LAST_CAP: OnceLock<u32> = OnceLock::new();
    *LAST_CAP.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(NAMES.len() as u32 - 1)
    })
}

/// A capability set as a bit mask; unknown names are ignored, as runc does with a warning.
fn mask(names: &[String]) -> u64 {
    names
        .iter()
        .filter_map(|n| NAMES.iter().position(|known| known.eq_ignore_ascii_case(n)))
        .fold(0u64, |m, bit| m | (1 << bit))
}

/// The last system call's error as Go prints it, which is how runc's messages read:
/// "operation not permitted".
fn last_error() -> String {
    let text = std::io::Error::last_os_error().to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect::<String>()
    })
}

/// The bounding-set part, done before the uid change (it needs CAP_SETPCAP).
pub fn drop_bounding(caps: &Capabilities) -> Result<(), String> {
    let keep = mask(&caps.bounding);
    for cap in 0..=last_cap() {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if rc != 0 && nix::errno::Errno::last() != nix::errno::Errno::EINVAL {
                return Err(format!("unable to apply bounding set: {}", last_error()));
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The effective/permitted/inheritable and ambient sets, done after the uid change (which
/// keeps permitted capabilities because of PR_SET_KEEPCAPS).
pub fn apply_sets(caps: &Capabilities) -> Result<(), String> {
    let (effective, permitted, inheritable) = (
        mask(&caps.effective),
        mask(&caps.permitted),
        mask(&caps.inheritable),
    );
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    for (i, word) in data.iter_mut().enumerate() {
        let shift = 32 * i;
        *word = CapData {
            effective: (effective >> shift) as u32,
            permitted: (permitted >> shift) as u32,
            inheritable: (inheritable >> shift) as u32,
        };
    }
    // SAFETY: header and data are valid, correctly laid out for capset(2) version 3 (two
    // data words), and live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(format!("unable to apply caps: {}", last_error()));
    }
    // A capability can only be ambient if it is permitted and inheritable; configs (runc's
    // own `spec`) often list ambient capabilities without inheritable ones, and runc skips
    // those rather than failing, so this does too.
    let ambient = mask(&caps.ambient) & permitted & inheritable;
    for cap in 0..=last_cap() {
        if ambient & (1 << cap) != 0 {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            if rc != 0 {
                return Err(format!("unable to apply caps: {}", last_error()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_maps_names_to_kernel_bit_numbers() {
        let names = ["CAP_CHOWN", "cap_kill", "CAP_SYS_ADMIN", "CAP_BOGUS"].map(String::from);
        assert_eq!(mask(&names), 1 | (1 << 5) | (1 << 21));
        assert_eq!(NAMES[40], "CAP_CHECKPOINT_RESTORE");
    }
}
