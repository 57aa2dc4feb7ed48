//! The container's seccomp filter: config.json's `linux.seccomp`, compiled once per
//! container by libseccomp (as runc compiles it) into a BPF program, which each container
//! process installs on itself right before its `exec` (see `spawn`).
//!
//! Compiling is done in the agent, not in the child: libseccomp builds the program in memory
//! the child would share with the agent; the child only makes the one `seccomp` call.

use std::io::{Read, Seek};
use std::os::fd::{FromRawFd, OwnedFd};

use agent_proto::{SeccompAction, SeccompArg, SeccompOp, SeccompProfile};
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

/// A compiled filter, ready for `seccomp(SECCOMP_SET_MODE_FILTER, flags, program)`.
#[derive(Debug)]
pub struct Filter {
    program: Vec<libc::sock_filter>,
    flags: libc::c_ulong,
}

fn action(action: SeccompAction) -> ScmpAction {
    match action {
        SeccompAction::KillThread => ScmpAction::KillThread,
        SeccompAction::KillProcess => ScmpAction::KillProcess,
        SeccompAction::Trap => ScmpAction::Trap,
        SeccompAction::Errno(errno) => ScmpAction::Errno(i32::from(errno)),
        SeccompAction::Trace(value) => ScmpAction::Trace(value),
        SeccompAction::Allow => ScmpAction::Allow,
        SeccompAction::Log => ScmpAction::Log,
    }
}

fn compare(arg: &SeccompArg) -> ScmpArgCompare {
    let op = match arg.op {
        SeccompOp::NotEqual => ScmpCompareOp::NotEqual,
        SeccompOp::LessThan => ScmpCompareOp::Less,
        SeccompOp::LessOrEqual => ScmpCompareOp::LessOrEqual,
        SeccompOp::Equal => ScmpCompareOp::Equal,
        SeccompOp::GreaterOrEqual => ScmpCompareOp::GreaterEqual,
        SeccompOp::GreaterThan => ScmpCompareOp::Greater,
        // OCI: `arg & value == valueTwo`.
        SeccompOp::MaskedEqual => ScmpCompareOp::MaskedEqual(arg.value),
    };
    let datum = match arg.op {
        SeccompOp::MaskedEqual => arg.value_two,
        _ => arg.value,
    };
    ScmpArgCompare::new(arg.index, op, datum)
}

/// The kernel's flag for a `SECCOMP_FILTER_FLAG_*` name the host passed on.
fn flag(name: &str) -> Result<libc::c_ulong, String> {
    Ok(match name {
        "SECCOMP_FILTER_FLAG_TSYNC" => libc::SECCOMP_FILTER_FLAG_TSYNC,
        "SECCOMP_FILTER_FLAG_LOG" => libc::SECCOMP_FILTER_FLAG_LOG,
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
        other => return Err(format!("seccomp flag {other} is not supported")),
    })
}

/// Compiles `profile` as runc does: every listed architecture added, a system call name the
/// guest's libseccomp does not know skipped (profiles list calls of newer kernels), a rule
/// whose action is the default one skipped, and conditions on one argument that repeat
/// made separate rules (libseccomp cannot AND two conditions on one argument).
pub fn compile(profile: &SeccompProfile) -> Result<Filter, String> {
    let mut filter = ScmpFilterContext::new(action(profile.default_action))
        .map_err(|e| format!("seccomp: {e}"))?;
    for name in &profile.architectures {
        let arch: ScmpArch = name
            .parse()
            .map_err(|e| format!("seccomp architecture {name}: {e}"))?;
        filter
            .add_arch(arch)
            .map_err(|e| format!("seccomp architecture {name}: {e}"))?;
    }
    for rule in &profile.rules {
        if rule.action == profile.default_action {
            continue;
        }
        let rule_action = action(rule.action);
        let conditions: Vec<ScmpArgCompare> = rule.args.iter().map(compare).collect();
        let repeats = rule
            .args
            .iter()
            .enumerate()
            .any(|(i, a)| rule.args[..i].iter().any(|b| b.index == a.index));
        for name in &rule.names {
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let added = if conditions.is_empty() {
                filter.add_rule(rule_action, syscall).map(drop)
            } else if repeats {
                conditions.iter().try_for_each(|c| {
                    filter
                        .add_rule_conditional(rule_action, syscall, &[*c])
                        .map(drop)
                })
            } else {
                filter
                    .add_rule_conditional(rule_action, syscall, &conditions)
                    .map(drop)
            };
            added.map_err(|e| format!("seccomp rule for {name}: {e}"))?;
        }
    }
    let mut flags = 0;
    for name in &profile.flags {
        flags |= flag(name)?;
    }
    Ok(Filter {
        program: export(&filter)?,
        flags,
    })
}

/// The filter's BPF program, through a memory file (libseccomp writes it to a descriptor).
fn export(filter: &ScmpFilterContext) -> Result<Vec<libc::sock_filter>, String> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"seccomp-bpf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    filter
        .export_bpf(&file)
        .map_err(|e| format!("seccomp export: {e}"))?;
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| format!("seccomp export: {e}"))?;
    let size = std::mem::size_of::<libc::sock_filter>();
    if bytes.is_empty() || bytes.len() % size != 0 {
        return Err(format!("seccomp export: {} bytes of BPF", bytes.len()));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|i| libc::sock_filter {
            code: u16::from_ne_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect())
}

impl Filter {
    /// Installs the filter on the calling process (a container process before its `exec`):
    /// it then holds for the process and everything it starts.
    pub fn install(&self) -> Result<(), String> {
        let program = libc::sock_fprog {
            len: self.program.len() as libc::c_ushort,
            filter: self.program.as_ptr().cast_mut(),
        };
        // SAFETY: `program` points at `self.program`, which outlives the call; the kernel
        // copies the program.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags,
                &program as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(format!("seccomp: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The number of BPF instructions (for logs).
    pub fn instructions(&self) -> usize {
        self.program.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::SeccompRule;

    fn profile(default_action: SeccompAction, rules: Vec<SeccompRule>) -> SeccompProfile {
        SeccompProfile {
            default_action,
            architectures: vec!["SCMP_ARCH_X86_64".into(), "SCMP_ARCH_X86".into()],
            flags: vec![],
            rules,
        }
    }

    #[test]
    fn a_profile_compiles_with_unknown_names_skipped_and_repeated_arguments_split() {
        let rules = vec![
            SeccompRule {
                names: vec!["getpid".into(), "no_such_call_in_any_kernel".into()],
                action: SeccompAction::Errno(1),
                args: vec![],
            },
            SeccompRule {
                names: vec!["personality".into()],
                action: SeccompAction::Errno(22),
                args: vec![
                    SeccompArg {
                        index: 0,
                        value: 8,
                        value_two: 0,
                        op: SeccompOp::Equal,
                    },
                    SeccompArg {
                        index: 0,
                        value: 0xffff_ffff,
                        value_two: 0,
                        op: SeccompOp::MaskedEqual,
                    },
                ],
            },
            // The default action: skipped, as runc skips it.
            SeccompRule {
                names: vec!["read".into()],
                action: SeccompAction::Allow,
                args: vec![],
            },
        ];
        let filter = compile(&profile(SeccompAction::Allow, rules)).unwrap();
        assert!(filter.instructions() > 4, "{filter:?}");
    }

    #[test]
    fn an_unknown_flag_or_architecture_fails_naming_it() {
        let mut p = profile(SeccompAction::Allow, vec![]);
        p.flags = vec!["SECCOMP_FILTER_FLAG_NEW_LISTENER".into()];
        assert!(compile(&p).unwrap_err().contains("NEW_LISTENER"));
        let mut p = profile(SeccompAction::Allow, vec![]);
        p.architectures = vec!["SCMP_ARCH_VAX".into()];
        assert!(compile(&p).unwrap_err().contains("SCMP_ARCH_VAX"));
    }

    #[test]
    fn an_installed_filter_fails_the_call_it_names_with_its_errno() {
        // In a child, so that the test process keeps no filter.
        let rules = vec![SeccompRule {
            names: vec!["getppid".into()],
            action: SeccompAction::Errno(libc::EXDEV as u16),
            args: vec![],
        }];
        let filter = compile(&profile(SeccompAction::Allow, rules)).unwrap();
        // SAFETY: fork has no memory-safety preconditions; the child below only makes
        // system calls and exits.
        match unsafe { libc::fork() } {
            // SAFETY: prctl, syscall and _exit take integers; errno is this thread's.
            0 => unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if filter.install().is_err() {
                    libc::_exit(2);
                }
                let rc = libc::syscall(libc::SYS_getppid);
                let errno = *libc::__errno_location();
                libc::_exit(if rc == -1 && errno == libc::EXDEV {
                    0
                } else {
                    1
                });
            },
            pid => {
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "{status}"
                );
            }
        }
    }
}
