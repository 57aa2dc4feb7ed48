//! A system call filter for one thread that runs guest-driven code (a vCPU, a device's I/O
//! loop) in a process that is not jailed as a whole: the builtin VMM runs in the container's
//! monitor, whose main thread still needs the host (state, cgroups, hooks).
//!
//! It denies what no such thread ever calls and what an escape needs: new programs and
//! processes, namespaces and mounts, credentials and capabilities, tracing other processes,
//! kernel modules, BPF, keyrings, the clock and host identity. A denied call kills the whole
//! process (SIGSYS): the VM and its monitor end, and the caller sees how. `clone3` (whose
//! flags a filter cannot read) fails with ENOSYS, so the C library uses `clone`, whose flags
//! are checked: a thread may start threads, never processes.
//!
//! A deny list, not yet the allow list per thread kind that Firecracker installs.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::JailError;

/// Calls denied outright, on every architecture. Not here, since the shared filesystem's
/// server makes them on its threads: `open_by_handle_at`/`name_to_handle_at` (its inodes)
/// and `fanotify_init` (host changes for the guest's watches).
const DENIED: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_capset,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_userfaultfd,
    libc::SYS_personality,
];

/// Calls denied outright that only some architectures have.
#[cfg(target_arch = "x86_64")]
const DENIED_HERE: &[libc::c_long] = &[
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_iopl,
    libc::SYS_ioperm,
];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_HERE: &[libc::c_long] = &[];

/// The two filters (deny-and-kill, and clone3's ENOSYS), compiled once per process.
fn programs() -> Result<&'static [BpfProgram; 2], String> {
    static PROGRAMS: OnceLock<Result<[BpfProgram; 2], String>> = OnceLock::new();
    PROGRAMS
        .get_or_init(|| compile().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

fn compile() -> Result<[BpfProgram; 2], seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .chain(DENIED_HERE)
        .map(|&call| (call, Vec::new()))
        .collect();
    // A clone without CLONE_THREAD makes a process.
    denied.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )?])?],
    );
    let kill = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        arch,
    )?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok([kill.try_into()?, clone3.try_into()?])
}

/// Installs the filter on the calling thread (and the threads it starts from now on). It
/// also sets the thread's `no_new_privs`.
pub fn confine_this_thread() -> Result<(), JailError> {
    let programs = programs().map_err(|reason| JailError::Setup {
        what: "compile the thread filter",
        source: std::io::Error::other(reason),
    })?;
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| JailError::Setup {
            what: "install the thread filter",
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread under the filter may start threads; a process (fork) kills the whole
    /// process, so that half is checked in a child process.
    #[test]
    fn a_confined_thread_starts_threads_and_its_fork_kills_the_process() {
        let confined = std::thread::spawn(|| {
            confine_this_thread().expect("install");
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
            std::thread::spawn(|| 42).join().unwrap()
        });
        assert_eq!(confined.join().unwrap(), 42);
        // This thread is not confined.
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(status.lines().any(|l| l == "Seccomp:\t0"), "{status}");

        // SAFETY: the child only installs the filter and forks (or exits).
        let child = unsafe { libc::fork() };
        if child == 0 {
            let code = match confine_this_thread() {
                // SAFETY: fork in the child; the filter kills the process here.
                Ok(()) => unsafe { libc::fork().max(0) + 3 },
                Err(_) => 2,
            };
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut raw = 0;
        // SAFETY: waitpid writes only `raw`.
        assert_eq!(unsafe { libc::waitpid(child, &mut raw, 0) }, child);
        assert!(libc::WIFSIGNALED(raw), "the child exited ({raw:#x})");
        assert_eq!(libc::WTERMSIG(raw), libc::SIGSYS);
    }
}
