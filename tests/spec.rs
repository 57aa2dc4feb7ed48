//! Inside the VM as the runtime spec says, with real VMs: the container's mounts in
//! config.json's order (with a pid namespace too), `linux.devices` made, namespace paths
//! checked at create, `linux.rootfsPropagation` applied to the root, an image's 0:0
//! character devices kept, runc's errors for verbs on a stopped container, seccomp
//! profiles, capability sets and user namespaces applied as runc applies them.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{guest_time, text, Bundle, Env};
use serde_json::{json, Value};

/// The mount points of the container's `/proc/self/mountinfo`, in its order.
const MOUNTINFO: &str = "cut -d' ' -f5 /proc/self/mountinfo";

fn set_namespaces(bundle: &mut Bundle, namespaces: Value) {
    bundle.edit(|c| c["linux"] = json!({ "namespaces": namespaces }));
}

/// The mount points the container lists, only those in `wanted`, in the container's order.
fn listed_in_order(mountinfo: &str, wanted: &[&str]) -> Vec<String> {
    mountinfo
        .lines()
        .map(str::trim)
        .filter(|m| wanted.contains(m))
        .map(String::from)
        .collect()
}

/// config.json's mounts (the bundle's defaults, a host directory bound, a tmpfs) and their
/// order; runs the bundle and checks the container lists them in that order, the masked
/// and read-only paths after them.
fn check_mount_order(pid_namespace: bool) {
    let Some(env) = Env::new() else { return };
    let data = tempfile::tempdir().unwrap();
    let mut bundle = env.bundle(&["sh", "-c", MOUNTINFO]);
    if pid_namespace {
        set_namespaces(&mut bundle, json!([{ "type": "pid" }, { "type": "mount" }]));
    }
    bundle.edit(|c| {
        let mounts = c["mounts"].as_array_mut().unwrap();
        mounts.push(json!({ "destination": "/data", "type": "bind",
            "source": data.path(), "options": ["rbind", "rw"] }));
        mounts.push(json!({ "destination": "/scratch", "type": "tmpfs", "source": "tmpfs" }));
        c["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
        c["linux"]["maskedPaths"] = json!(["/sys/firmware"]);
    });
    let config_order: Vec<String> = bundle.config["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["destination"].as_str().unwrap().to_string())
        .collect();
    let id = if pid_namespace {
        "order-pidns"
    } else {
        "order"
    };
    let (out, _) = env.run_logged(&bundle, id);
    let mut wanted: Vec<&str> = config_order.iter().map(String::as_str).collect();
    wanted.extend(["/proc/sys", "/sys/firmware"]);
    let mut expected = config_order.clone();
    // runc's order after the mounts: read-only paths, then masked ones.
    expected.extend(["/proc/sys".to_string(), "/sys/firmware".to_string()]);
    assert_eq!(
        listed_in_order(&out, &wanted),
        expected,
        "mountinfo:\n{out}"
    );
}

#[test]
fn mountinfo_lists_the_config_mounts_in_config_order() {
    check_mount_order(false);
}

#[test]
fn mountinfo_lists_the_config_mounts_in_config_order_with_a_pid_namespace() {
    check_mount_order(true);
}

#[test]
fn linux_devices_are_made_with_their_type_numbers_mode_and_owner() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&[
        "stat",
        "-c",
        "%n %F %t:%T %a %u:%g",
        "/dev/sm-char",
        "/dev/sub/sm-block",
        "/dev/sm-fifo",
    ]);
    set_namespaces(&mut bundle, json!([{ "type": "pid" }, { "type": "mount" }]));
    bundle.edit(|c| {
        // 240 and 259:77 have no driver in the guest: runc makes such nodes all the same.
        c["linux"]["devices"] = json!([
            { "path": "/dev/sm-char", "type": "c", "major": 240, "minor": 7,
              "fileMode": 0o640, "uid": 1000, "gid": 44 },
            { "path": "/dev/sub/sm-block", "type": "b", "major": 259, "minor": 77 },
            { "path": "/dev/sm-fifo", "type": "p", "fileMode": 0o600 }
        ]);
    });
    let (out, _) = env.run_logged(&bundle, "devices");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "/dev/sm-char character special file f0:7 640 1000:44",
            "/dev/sub/sm-block block special file 103:4d 666 0:0",
            "/dev/sm-fifo fifo 0:0 600 0:0",
        ],
        "{out}"
    );
}

/// Runs `create` and expects it to fail with `cause` on stderr, leaving nothing behind.
fn expect_create_error(env: &Env, bundle: &Bundle, id: &str, cause: &str) {
    let out = env.run(&["create", "--bundle", bundle.path_str(), id]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "create {id} succeeded");
    assert!(stderr.contains(cause), "stderr {stderr:?} lacks {cause:?}");
    let _ = env.run(&["delete", "--force", id]);
}

#[test]
fn a_namespace_path_of_another_type_fails_create_naming_it() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["true"]);
    set_namespaces(
        &mut bundle,
        json!([{ "type": "network", "path": "/proc/self/ns/uts" }]),
    );
    expect_create_error(
        &env,
        &bundle,
        "ns-type",
        "net namespace /proc/self/ns/uts: it is a uts namespace",
    );
}

#[test]
fn joining_a_pid_namespace_fails_create_naming_it() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["true"]);
    set_namespaces(
        &mut bundle,
        json!([{ "type": "pid", "path": "/proc/self/ns/pid" }]),
    );
    expect_create_error(
        &env,
        &bundle,
        "ns-pid",
        "pid namespace /proc/self/ns/pid: joining it is not supported",
    );
}

/// The optional fields of the container root's mountinfo line (between the options and
/// the ` - ` separator).
fn root_propagation_fields(mountinfo: &str) -> String {
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no root in {mountinfo}"));
    let fields: Vec<&str> = line.split(' ').collect();
    let end = fields.iter().position(|f| *f == "-").unwrap();
    fields[6..end].join(" ")
}

#[test]
fn rootfs_propagation_is_the_roots_in_mountinfo() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["cat", "/proc/self/mountinfo"]);
    bundle.edit(|c| c["linux"] = json!({ "rootfsPropagation": "shared" }));
    let (shared, _) = env.run_logged(&bundle, "prop-shared");
    assert!(
        root_propagation_fields(&shared).starts_with("shared:"),
        "{shared}"
    );
    bundle.edit(|c| c["linux"] = json!({ "rootfsPropagation": "private" }));
    let (private, _) = env.run_logged(&bundle, "prop-private");
    assert_eq!(root_propagation_fields(&private), "", "{private}");
    bundle.edit(|c| c["linux"] = json!({ "rootfsPropagation": "unbindable" }));
    expect_create_error(
        &env,
        &bundle,
        "prop-unbindable",
        "rootfsPropagation unbindable",
    );
}

#[test]
fn a_zero_zero_character_device_of_a_directory_root_survives() {
    let Some(env) = Env::new() else { return };
    let bundle = Bundle::with_directory_root(&["stat", "-c", "%F %t:%T", "/etc/zero-dev"]);
    let node = bundle.rootfs().join("etc/zero-dev");
    let status = Command::new("mknod")
        .arg(&node)
        .args(["c", "0", "0"])
        .status()
        .unwrap();
    assert!(status.success(), "mknod {}", node.display());
    let (out, _) = env.run_logged(&bundle, "zero-dev");
    assert_eq!(out.trim(), "character special file 0:0");
}

#[test]
fn verbs_on_a_stopped_container_fail_as_runcs_do() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sleep", "1"]);
    let id = "stopped";
    let out = env.run(&["create", "--bundle", bundle.path_str(), id]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    assert!(env.run(&["start", id]).status.success());
    // Signalled until it has exited: a kill while the process ends and its VM shuts down
    // succeeds or says what runc says, never what the closing agent connection says.
    let deadline = Instant::now() + guest_time(Duration::from_secs(30));
    loop {
        let out = env.run(&["kill", id, "CONT"]);
        if !out.status.success() {
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert_eq!(stderr.trim(), "supermachine: container not running");
            break;
        }
        assert!(Instant::now() < deadline, "kill never failed");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.wait_status(id, "stopped", guest_time(Duration::from_secs(30)));
    // runc 1.1's messages and exit codes for the same verbs on a stopped container.
    for (args, code, message) in [
        (vec!["kill", id], 1, "container not running"),
        (vec!["kill", id, "KILL"], 1, "container not running"),
        (vec!["kill", id, "0"], 1, "container not running"),
        // `--all` finds nothing left to signal, and succeeds.
        (vec!["kill", "--all", id, "KILL"], 0, ""),
        (
            vec!["exec", id, "true"],
            255,
            "cannot exec in a stopped container",
        ),
        (vec!["pause", id], 1, "container not running"),
        (vec!["resume", id], 1, "container not paused"),
        (
            vec!["start", id],
            1,
            "cannot start a container that has stopped",
        ),
    ] {
        let out = env.run(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("agent"), "{args:?}: {stderr}");
    }
    // runc lists no process of a stopped container and succeeds.
    let out = env.run(&["ps", id]);
    assert!(out.status.success(), "ps: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out.stdout)
    );
    assert!(env.run(&["delete", id]).status.success());
    env.assert_clean(id);
}

#[test]
fn mount_order_filter_keeps_the_containers_order() {
    let mountinfo = "/\n/proc\n/dev\n/other\n/dev/pts\n";
    assert_eq!(
        listed_in_order(mountinfo, &["/dev/pts", "/proc", "/dev"]),
        ["/proc", "/dev", "/dev/pts"]
    );
}

/// A profile that allows everything but `mkdir` (EPERM) and `kill` with SIGTERM (EACCES):
/// a rule without and one with an argument condition.
fn seccomp_profile() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO" },
            { "names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
              "args": [{ "index": 1, "value": 15, "op": "SCMP_CMP_EQ" }] }
        ]
    })
}

/// What the container prints under [`seccomp_profile`].
const SECCOMP_PROBE: &str = "mkdir /tmp/blocked 2>&1; echo mkdir=$?; \
    kill -0 $$; echo kill0=$?; kill -TERM $$ 2>&1; echo term=$?; \
    touch /tmp/allowed; echo touch=$?";

fn check_seccomp(no_new_privileges: bool) {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["sh", "-c", SECCOMP_PROBE]);
    bundle.edit(|c| {
        c["process"]["noNewPrivileges"] = no_new_privileges.into();
        // A pid namespace, as `runc spec` has: `$$` is 1 in both, and so are the messages.
        c["linux"] = json!({
            "seccomp": seccomp_profile(),
            "namespaces": [{ "type": "pid" }, { "type": "mount" }],
        });
    });
    let id = if no_new_privileges {
        "seccomp-nnp"
    } else {
        "seccomp"
    };
    let (out, _) = env.run_logged(&bundle, id);
    let runc = common::run_under_runc(&bundle);
    for line in ["mkdir=1", "kill0=0", "term=1", "touch=0"] {
        assert!(
            out.lines().any(|l| l.trim() == line),
            "{line} not in {out:?}"
        );
    }
    assert!(out.contains("Operation not permitted"), "{out:?}");
    assert!(out.contains("Permission denied"), "{out:?}");
    if let Some(runc) = runc {
        assert_eq!(
            out,
            text(&runc.stdout),
            "supermachine, then runc (runc's stderr: {})",
            text(&runc.stderr)
        );
    }
}

#[test]
fn a_seccomp_profile_fails_the_calls_it_names_as_under_runc() {
    check_seccomp(false);
}

#[test]
fn a_seccomp_profile_fails_the_calls_it_names_as_under_runc_with_no_new_privileges() {
    check_seccomp(true);
}

#[test]
fn seccomp_user_notification_fails_create_naming_it() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["true"]);
    bundle.edit(|c| {
        let mut profile = seccomp_profile();
        profile["listenerPath"] = "/run/seccomp-agent.sock".into();
        c["linux"] = json!({ "seccomp": profile });
    });
    expect_create_error(&env, &bundle, "seccomp-listener", "listenerPath");
    bundle.edit(|c| {
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["mkdir"], "action": "SCMP_ACT_NOTIFY" }]
        });
    });
    expect_create_error(&env, &bundle, "seccomp-notify", "SCMP_ACT_NOTIFY");
}

/// The five capability sets of the container's process, as `/proc/self/status` shows them.
const CAPABILITY_SETS: &str = "grep ^Cap /proc/self/status";

/// Runs `bundle` under supermachine and, where it is installed, runc: the same exit status
/// and output, or the same error.
fn same_as_runc(env: &Env, bundle: &Bundle, id: &str) -> std::process::Output {
    let ours = env.run(&["run", "--bundle", bundle.path_str(), id]);
    if let Some(runc) = common::run_under_runc(bundle) {
        assert_eq!(
            ours.status.code(),
            runc.status.code(),
            "{id}: exit status; ours said {:?}, runc {:?}",
            text(&ours.stderr),
            text(&runc.stderr)
        );
        assert_eq!(
            text(&ours.stdout),
            text(&runc.stdout),
            "{id}: supermachine, then runc"
        );
        if !runc.status.success() {
            // runc's is a logrus line around the same message.
            let message = text(&ours.stderr);
            let message = message.trim().trim_start_matches("supermachine: ");
            assert!(
                text(&runc.stderr).contains(message),
                "{id}: {message:?} is not runc's {:?}",
                text(&runc.stderr)
            );
        }
    }
    ours
}

/// The bit of each named capability (CAP_CHOWN is 0).
fn mask(names: &[&str]) -> u64 {
    names.iter().fold(0, |m, name| {
        let bit = agent_proto::CAPABILITY_NAMES
            .iter()
            .position(|n| n == name)
            .unwrap();
        m | 1 << bit
    })
}

#[test]
fn the_five_capability_sets_are_as_configured_and_as_under_runc() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["sh", "-c", CAPABILITY_SETS]);
    // Five different sets, an unprivileged user keeping its ambient ones across exec.
    let (bounding, permitted) = (
        [
            "CAP_KILL",
            "CAP_CHOWN",
            "CAP_NET_BIND_SERVICE",
            "CAP_SETUID",
        ],
        ["CAP_KILL", "CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
    );
    bundle.edit(|c| {
        c["process"]["user"] = json!({ "uid": 1000, "gid": 1000 });
        c["process"]["capabilities"] = json!({
            "bounding": bounding,
            "permitted": permitted,
            "effective": permitted,
            "inheritable": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "ambient": ["CAP_NET_BIND_SERVICE"],
        });
    });
    let out = same_as_runc(&env, &bundle, "caps-five");
    let ambient = mask(&["CAP_NET_BIND_SERVICE"]);
    // An unprivileged user's exec keeps only its ambient capabilities in the permitted and
    // effective sets.
    let want = [
        ("CapInh", mask(&["CAP_KILL", "CAP_NET_BIND_SERVICE"])),
        ("CapPrm", ambient),
        ("CapEff", ambient),
        ("CapBnd", mask(&bounding)),
        ("CapAmb", ambient),
    ]
    .map(|(set, bits)| format!("{set}:\t{bits:016x}"))
    .join("\n");
    assert_eq!(text(&out.stdout).trim(), want);
}

#[test]
fn a_process_without_capabilities_has_none_as_under_runc() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["sh", "-c", CAPABILITY_SETS]);
    bundle.edit(|c| {
        c["process"].as_object_mut().unwrap().remove("capabilities");
    });
    let out = same_as_runc(&env, &bundle, "caps-none");
    for line in text(&out.stdout).lines() {
        assert!(line.ends_with("\t0000000000000000"), "{line}");
    }
}

#[test]
fn capabilities_the_kernel_refuses_fail_as_under_runc() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["true"]);
    // Effective beyond permitted, and inheritable beyond the bounding set: capset(2) fails.
    for (id, sets) in [
        (
            "caps-effective",
            json!({ "bounding": ["CAP_KILL", "CAP_CHOWN"], "permitted": ["CAP_KILL"],
                    "effective": ["CAP_KILL", "CAP_CHOWN"] }),
        ),
        (
            "caps-inheritable",
            json!({ "bounding": ["CAP_KILL"], "permitted": ["CAP_KILL"],
                    "effective": ["CAP_KILL"], "inheritable": ["CAP_CHOWN"] }),
        ),
    ] {
        bundle.edit(|c| c["process"]["capabilities"] = sets);
        let out = same_as_runc(&env, &bundle, id);
        assert!(!out.status.success(), "{id} ran");
        assert!(
            text(&out.stderr).contains(
                "unable to start container process: unable to apply caps: operation not permitted"
            ),
            "{id}: {}",
            text(&out.stderr)
        );
        env.assert_clean(id);
    }
}

/// The user namespace as the container's process sees it: its maps, its ids, the owner of
/// a root-owned file of the image, and whether its root can change that file's owner.
const USER_NAMESPACE_PROBE: &str = "cat /proc/self/uid_map /proc/self/gid_map; \
    echo uid=$(id -u) gid=$(id -g); stat -c 'root owned by %u:%g' /; \
    chown 0:0 /bin 2>/dev/null; echo chown=$?";

#[test]
fn a_user_namespace_maps_the_containers_ids_as_under_runc() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["sh", "-c", USER_NAMESPACE_PROBE]);
    let mapping = json!([{ "containerID": 0, "hostID": 100000, "size": 65536 }]);
    bundle.edit(|c| {
        c["linux"] = json!({
            // Pid and network namespaces too: runc's container root may mount /proc and
            // /sys only for namespaces of its own.
            "namespaces": [{ "type": "user" }, { "type": "mount" }, { "type": "pid" },
                           { "type": "network" }],
            "uidMappings": mapping,
            "gidMappings": mapping,
        });
    });
    let out = same_as_runc(&env, &bundle, "userns");
    let out = text(&out.stdout);
    let maps: Vec<Vec<&str>> = out
        .lines()
        .take(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        maps,
        [["0", "100000", "65536"], ["0", "100000", "65536"]],
        "{out}"
    );
    // Root inside; the image's root-owned files belong to no one it knows (the overflow id).
    assert!(out.contains("uid=0 gid=0"), "{out}");
    assert!(out.contains("root owned by 65534:65534"), "{out}");
    // Its root's capabilities hold inside the namespace only: not over the VM's root.
    assert!(out.contains("chown=1"), "{out}");
}

#[test]
fn an_exec_joins_the_containers_user_namespace() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["sleep", "1000"]);
    let mapping = json!([{ "containerID": 0, "hostID": 100000, "size": 65536 }]);
    bundle.edit(|c| {
        c["linux"] = json!({
            "namespaces": [{ "type": "user" }, { "type": "pid" }],
            "uidMappings": mapping,
            "gidMappings": mapping,
        });
    });
    let id = "userns-exec";
    let out = env.run(&["create", "--bundle", bundle.path_str(), id]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    assert!(env.run(&["start", id]).status.success());
    let out = env.run(&["exec", id, "sh", "-c", "cat /proc/self/uid_map; id -u"]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    let words: Vec<String> = text(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(words, ["0", "100000", "65536", "0"]);
    assert!(env.run(&["delete", "--force", id]).status.success());
    env.assert_clean(id);
}

#[test]
fn user_namespace_mappings_without_the_other_half_fail_create() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&["true"]);
    let mapping = json!([{ "containerID": 0, "hostID": 100000, "size": 65536 }]);
    bundle.edit(|c| {
        c["linux"] = json!({ "namespaces": [{ "type": "user" }], "gidMappings": mapping });
    });
    expect_create_error(
        &env,
        &bundle,
        "userns-no-uid-map",
        "User namespaces enabled, but no uid mappings found.",
    );
    env.assert_clean("userns-no-uid-map");
    bundle.edit(|c| {
        c["linux"] = json!({ "uidMappings": mapping, "gidMappings": mapping });
    });
    expect_create_error(&env, &bundle, "userns-no-namespace", "no user namespace");
    env.assert_clean("userns-no-namespace");
}
