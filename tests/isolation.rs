//! The VMM's jail, seen from the host: QEMU runs with a system call filter, no capabilities
//! and `no_new_privs`, in namespaces of its own, on a root that holds only its inputs; a
//! call its filter forbids ends the VM with an error that says so.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{text, Env};

/// The QEMU engine, whatever this host's `auto` would pick: the jail described here is
/// QEMU's.
fn on_qemu(cmd: &mut std::process::Command) -> &mut std::process::Command {
    cmd.env("SUPERMACHINE_ENGINE", "qemu")
}

/// A `/proc/<pid>/status` field.
fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Every path under `dir` that is not a directory, as seen from `dir` (`/x/y`), without
/// descending into `skip`.
fn files_under(dir: &Path, skip: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap().flatten() {
            let path = entry.path();
            let inside = Path::new("/").join(path.strip_prefix(dir).unwrap());
            if inside == skip {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            } else {
                found.insert(inside);
            }
        }
    }
    found
}

#[test]
fn qemu_runs_filtered_without_capabilities_in_its_own_namespaces_and_root() {
    let Some(env) = Env::new() else { return };
    // The first run of the image boots and bakes (or restores): either way the next one
    // restores, jailed with the snapshot's memory file among its inputs.
    let first = env.bundle(&["true"]);
    let out = common::output_of(on_qemu(&mut env.cmd()).args([
        "run",
        "--bundle",
        first.path_str(),
        "c-first",
    ]));
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    let bundle = env.bundle(&["sleep", "1000"]);
    let out = common::output_of(on_qemu(&mut env.cmd()).args([
        "create",
        "--bundle",
        bundle.path_str(),
        "c-jail",
    ]));
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let monitor = env.state("c-jail")["pid"].as_i64().unwrap() as i32;
    let vmm = common::vm_processes(monitor);
    assert_eq!(vmm.len(), 1, "one QEMU: {vmm:?}");
    let vmm = vmm[0];
    let cmdline = std::fs::read(format!("/proc/{vmm}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(text)
        .collect();
    assert!(args[0].ends_with("qemu-system-x86_64"), "{args:?}");
    assert!(
        args.iter().any(|a| a == "-incoming"),
        "restored from the snapshot: {args:?}"
    );
    // Named by its container's state, so that `assert_clean` sees a QEMU left behind.
    assert!(
        env.processes()
            .iter()
            .any(|p| p.starts_with(&format!("{vmm}: "))),
        "QEMU is among the state root's processes: {:#?}",
        env.processes()
    );

    assert_eq!(status_field(vmm, "Seccomp"), "2", "a seccomp filter");
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    // The QEMU built here (among the assets) changed to the unprivileged user once set up
    // (`-runas`), which left it no capability; its bounding set holds only what that change
    // took (CAP_SETGID, CAP_SETUID). Another QEMU keeps uid 0, with no capability at all.
    let built_here = common::assets()
        .and_then(|assets| assets.join("qemu-system-x86_64").canonicalize().ok())
        .is_some_and(|bundled| Path::new(&args[0]) == bundled);
    if common::ci() {
        assert!(built_here, "CI runs the QEMU built here: {}", args[0]);
    }
    let (user, bounding) = if built_here {
        ("65534", "00000000000000c0")
    } else {
        ("0", "0000000000000000")
    };
    assert_eq!(args.iter().any(|a| a == "-runas"), built_here, "{args:?}");
    for field in ["Uid", "Gid"] {
        assert_eq!(status_field(vmm, field), [user; 4].join("\t"), "{field}");
    }
    if built_here {
        assert_eq!(status_field(vmm, "Groups"), "65534");
    }
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(status_field(vmm, set), "0000000000000000", "{set}");
    }
    assert_eq!(status_field(vmm, "CapBnd"), bounding);
    // `features` says the same.
    let out = common::output_of(on_qemu(&mut env.cmd()).arg("features"));
    let features: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let confinement = features["annotations"]["run.supermachine.vmm.confinement"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let said = if built_here {
        "as user 65534:65534 once set up"
    } else {
        "as uid 0"
    };
    assert!(confinement.contains(said), "{features}");
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "QEMU shares the host's {ns} namespace");
    }

    // Its root holds its inputs and nothing else: every file there is named on its command
    // line (the binary, firmware, disks, the snapshot's memory) or is the KVM device or
    // `/dev/fd`; `/proc` is its PID namespace's, where it is alone.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    let files = files_under(&root, Path::new("/proc"));
    let named = |file: &Path| {
        let file = file.to_str().unwrap();
        args.iter().any(|a| {
            a == file
                || a.split(',').any(|option| {
                    option
                        .strip_prefix("file=")
                        .or(option.strip_prefix("mem-path="))
                        == Some(file)
                })
        })
    };
    let extra: Vec<&PathBuf> = files
        .iter()
        .filter(|f| {
            !named(f) && !["/dev/kvm", "/dev/null", "/dev/fd"].contains(&f.to_str().unwrap())
        })
        .collect();
    assert!(
        extra.is_empty(),
        "not QEMU's inputs: {extra:?} (all: {files:?})"
    );
    assert!(files.contains(Path::new(&args[0])), "{files:?}");
    assert!(
        !root
            .join(env.root().strip_prefix("/").unwrap())
            .join("c-jail/state.json")
            .exists(),
        "the container's state is visible to QEMU"
    );
    let processes: Vec<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .map(|pid| pid.to_string())
        .collect();
    assert_eq!(processes, ["1"], "QEMU is alone in its PID namespace");
    let mounts = std::fs::read_to_string(format!("/proc/{vmm}/mountinfo")).unwrap();
    assert!(
        mounts.lines().count() <= files.len() + 3,
        "more mounts than inputs: {mounts}"
    );

    let out = env.run(&["delete", "--force", "c-jail"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_clean("c-jail");
}

#[test]
fn a_system_call_qemus_filter_forbids_ends_the_vm_with_an_error_naming_it() {
    // A cache of its own: its failed start must not hold the shared cache's bake, which
    // the other test's containers wait for and restore from.
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    let bundle = env.bundle(&["true"]);
    let out = common::output_of(
        on_qemu(&mut env.cmd())
            .env("SUPERMACHINE_TEST_VMM_FORBIDDEN_CALL", "1")
            .args(["run", "--bundle", bundle.path_str(), "c-sigsys"]),
    );
    assert!(!out.status.success(), "ran with a VMM its filter killed");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("killed by its system call filter (SIGSYS)"),
        "{stderr}"
    );
    env.assert_clean("c-sigsys");
}
