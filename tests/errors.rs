//! Bad input gets a one-line error naming the cause, a non-zero exit, a runc-style JSON
//! error line on `--log`, and leaves no state directory or process behind.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{text, Env};

/// Runs `args` with `--log FILE --log-format json` and checks the error contract.
fn expect_error(env: &Env, args: &[&str], cause: &str) -> Output {
    let log = env.root().join("error-log.json");
    let _ = std::fs::remove_file(&log);
    let out = common::output_of(
        env.cmd()
            .arg("--log")
            .arg(&log)
            .args(["--log-format", "json"])
            .args(args),
    );
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(cause),
        "{args:?}: stderr {stderr:?} does not name {cause:?}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let last: serde_json::Value = log_text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .next_back()
        .unwrap_or_else(|| panic!("{args:?}: no JSON line in --log: {log_text:?}"));
    assert_eq!(last["level"], "error", "{last}");
    assert!(last["msg"].as_str().unwrap().contains(cause), "{last}");
    assert!(last["time"].is_string());
    out
}

fn assert_no_state(env: &Env) {
    let left: Vec<_> = std::fs::read_dir(env.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "error-log.json")
        .collect();
    assert!(left.is_empty(), "state left behind: {left:?}");
    assert!(
        env.processes().is_empty(),
        "processes left: {:?}",
        env.processes()
    );
}

#[test]
fn broken_bundles_are_refused_before_anything_starts() {
    let Some(env) = Env::new() else { return };
    let missing = env.root().join("no-such-bundle");
    expect_error(
        &env,
        &["create", "--bundle", missing.to_str().unwrap(), "c1"],
        "cannot access the bundle directory",
    );

    let mut bundle = env.bundle(&["true"]);
    std::fs::remove_file(bundle.path().join("config.json")).unwrap();
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c1"],
        "config.json not found",
    );

    std::fs::write(bundle.path().join("config.json"), "{ not json").unwrap();
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c1"],
        "invalid config.json",
    );

    bundle.edit(|c| c["process"]["args"] = "true".into());
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c1"],
        "invalid type",
    );

    let mut bundle = env.bundle(&["true"]);
    bundle.edit(|c| c["ociVersion"] = "2.0.0".into());
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c1"],
        "unsupported ociVersion",
    );

    let mut bundle = env.bundle(&["true"]);
    bundle.edit(|c| c["root"]["path"] = "/no/such/rootfs".into());
    expect_error(
        &env,
        &["run", "--bundle", bundle.path_str(), "c1"],
        "does not exist",
    );
    assert_no_state(&env);
}

#[test]
fn a_mount_the_vm_cannot_have_fails_create_naming_it() {
    let Some(env) = Env::new() else { return };
    // A host socket (docker.sock, say) means nothing inside the VM: refused, named.
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("daemon.sock");
    let _socket = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let mut bundle = env.bundle(&["true"]);
    bundle.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/run/daemon.sock", "type": "bind",
            "source": socket_path, "options": ["rbind"],
        }))
    });
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c1"],
        "bind mount of special file",
    );
    expect_error(
        &env,
        &["run", "--bundle", bundle.path_str(), "c1"],
        "on /run/daemon.sock",
    );
    // A bind whose source does not exist: never an empty directory in its place.
    let mut bundle = env.bundle(&["ls", "/data"]);
    bundle.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/data", "type": "bind",
            "source": dir.path().join("no-such-dir"), "options": ["rbind"],
        }))
    });
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c1"],
        "bind mount source for /data",
    );
    assert_no_state(&env);
}

/// Runs `cmd` with `fds` as its descriptors 3..: it fails, and its error names each of
/// `parts`.
fn fails_naming(mut cmd: Command, fds: Vec<std::os::fd::OwnedFd>, parts: &[&str]) {
    common::pass_fds(&mut cmd, fds);
    let out = common::output_of(&mut cmd);
    let message = text(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} succeeded");
    for part in parts {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
}

/// Passed descriptors the VM has no stand-in for fail `create` naming them (runc passes
/// any descriptor; a VM can stand in only for pipes, stream sockets and the null device).
#[test]
fn passed_descriptors_the_vm_cannot_stand_in_for_fail_create_naming_them() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["true"]);
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("a-file")).unwrap();
    let create = [
        "create",
        "--preserve-fds",
        "1",
        "--bundle",
        bundle.path_str(),
        "c1",
    ];
    let mut cmd = env.cmd();
    cmd.args(create);
    fails_naming(
        cmd,
        vec![file.into()],
        &[
            "--preserve-fds 1",
            "descriptor 3 is a regular file",
            "a-file",
        ],
    );
    // A descriptor that is not open at all.
    expect_error(&env, &create, "descriptor 3 is not open");
    // Socket activation of a datagram socket, as systemd would pass it (LISTEN_PID is
    // the runtime's own pid: the shell execs it).
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut run = env.cmd();
    run.args(["run", "--bundle", bundle.path_str(), "c1"]);
    let cmd = common::socket_activated(&run, 1);
    fails_naming(
        cmd,
        vec![udp.into()],
        &["LISTEN_FDS=1", "descriptor 3 is a Datagram socket"],
    );
    // exec takes `--preserve-fds` too, and no socket activation (as runc's).
    expect_error(
        &env,
        &["exec", "--preserve-fds", "1", "c1", "true"],
        "--preserve-fds 1: descriptor 3 is not open",
    );
    assert_no_state(&env);
}

#[test]
fn proc_through_a_symlink_in_the_image_is_refused_as_runc_refuses_it() {
    let Some(env) = Env::new() else { return };
    let rootfs = tempfile::tempdir().unwrap();
    common::copy_busybox_to(rootfs.path());
    let _ = std::fs::remove_dir_all(rootfs.path().join("proc"));
    std::os::unix::fs::symlink("tmp", rootfs.path().join("proc")).unwrap();
    let mut bundle = env.bundle(&["true"]);
    bundle.edit(|c| c["root"]["path"] = rootfs.path().to_str().unwrap().into());
    let refusal = "must be mounted on ordinary directory";
    expect_error(
        &env,
        &["run", "--bundle", bundle.path_str(), "c-symlink"],
        refusal,
    );
    assert_no_state(&env);
    // runc, where it is installed, refuses the same bundle the same way (with the namespaces
    // a namespace container needs, which a VM does not).
    if let Some(runc) = which_runc() {
        bundle.edit(|c| {
            c["linux"]["namespaces"] = serde_json::json!([
                { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }
            ])
        });
        let root = tempfile::tempdir().unwrap();
        let out = common::output_of(
            std::process::Command::new(runc)
                .arg("--root")
                .arg(root.path())
                .args(["run", "--bundle", bundle.path_str(), "c-symlink"])
                .stdin(std::process::Stdio::null()),
        );
        assert!(!out.status.success(), "runc ran it");
        assert!(
            text(&out.stderr).contains(refusal),
            "runc: {}",
            text(&out.stderr)
        );
    }
}

fn which_runc() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("runc"))
        .find(|path| path.is_file())
}

#[test]
fn bad_ids_are_refused_on_every_verb() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["true"]);
    for id in ["a/b", "..", "x/../y"] {
        expect_error(
            &env,
            &["create", "--bundle", bundle.path_str(), id],
            "invalid container id",
        );
        expect_error(&env, &["state", id], "invalid container id");
    }
    let out = env.run(&["create", "--bundle", bundle.path_str(), ""]);
    assert!(!out.status.success(), "empty id accepted");
    let verbs: [&[&str]; 9] = [
        &["start"],
        &["state"],
        &["kill"],
        &["delete"],
        &["pause"],
        &["resume"],
        &["ps"],
        &["exec"],
        &["update", "--memory", "1"],
    ];
    for verb in verbs {
        let mut args: Vec<&str> = verb.to_vec();
        args.push("nope");
        if verb == ["exec"] {
            args.push("true");
        }
        expect_error(&env, &args, "container \"nope\" does not exist");
    }
    // As runc: a forced delete of a container that is not there succeeds.
    assert!(env.run(&["delete", "--force", "nope"]).status.success());
    assert_no_state(&env);
}

#[test]
fn missing_guest_assets_say_how_to_build_them() {
    let Some(env) = Env::new() else { return };
    let empty = tempfile::tempdir().unwrap();
    let bundle = env.bundle(&["true"]);
    let mut cmd = env.cmd();
    cmd.env("SUPERMACHINE_ASSETS_DIR", empty.path()).args([
        "run",
        "--bundle",
        bundle.path_str(),
        "c1",
    ]);
    let out = common::output_of(&mut cmd);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("make guest"),
        "{}",
        text(&out.stderr)
    );
    assert_no_state(&env);
}

#[test]
fn a_guest_that_never_answers_is_killed_and_its_console_reported() {
    let Some(env) = Env::new() else { return };
    // A kernel whose /init is not the agent: busybox runs as init and never says Ready.
    let fake = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env.assets.join("vmlinux"), fake.path().join("vmlinux")).unwrap();
    std::fs::copy("/bin/busybox", fake.path().join("supermachine-agent")).unwrap();
    let bundle = env.bundle(&["true"]);
    let mut cmd = env.cmd();
    cmd.env("SUPERMACHINE_ASSETS_DIR", fake.path())
        .env("SUPERMACHINE_BOOT_TIMEOUT", "6")
        .args(["run", "--bundle", bundle.path_str(), "c-hang"]);
    let out = common::output_of(&mut cmd);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("did not answer within 6s"), "{stderr}");
    assert!(stderr.contains("last guest console lines"), "{stderr}");
    assert_no_state(&env);

    // A kernel QEMU cannot load fails at once, with QEMU's own words.
    std::fs::remove_file(fake.path().join("vmlinux")).unwrap();
    std::fs::write(fake.path().join("vmlinux"), b"not a kernel").unwrap();
    let mut cmd = env.cmd();
    cmd.env("SUPERMACHINE_ASSETS_DIR", fake.path()).args([
        "run",
        "--bundle",
        bundle.path_str(),
        "c-bad-kernel",
    ]);
    let out = common::output_of(&mut cmd);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("qemu"), "{}", text(&out.stderr));
    assert_no_state(&env);
}

#[test]
fn delete_force_of_a_container_still_being_created_stops_its_monitor() {
    let Some(env) = Env::new() else { return };
    // busybox as /init: the VM boots but never says Ready, so create waits.
    let fake = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env.assets.join("vmlinux"), fake.path().join("vmlinux")).unwrap();
    std::fs::copy("/bin/busybox", fake.path().join("supermachine-agent")).unwrap();
    let bundle = env.bundle(&["true"]);
    let out = tempfile::tempdir().unwrap();
    let mut create = env
        .cmd()
        .env("SUPERMACHINE_ASSETS_DIR", fake.path())
        .env("SUPERMACHINE_BOOT_TIMEOUT", "120")
        .args(["create", "--bundle", bundle.path_str(), "c-creating"])
        .stdout(std::fs::File::create(out.path().join("stdout")).unwrap())
        .stderr(std::fs::File::create(out.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let state = env.run(&["state", "c-creating"]);
        let doc: serde_json::Value = serde_json::from_slice(&state.stdout).unwrap_or_default();
        if doc["status"] == "creating" && doc["pid"].as_i64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saw it creating: {doc}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let deleted = env.run(&["delete", "--force", "c-creating"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    let status = create.wait().unwrap();
    assert!(
        !status.success(),
        "create must fail when its container is deleted"
    );
    assert_no_state(&env);
}

#[test]
fn a_program_that_cannot_run_fails_create() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["no-such-program"]);
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c-noprog"],
        "executable file not found in $PATH",
    );
    assert_no_state(&env);
    // Found, but not something the kernel can run: the failed `exec` fails `create` too.
    let bundle = env.bundle(&["/etc/passwd"]);
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c-noexec"],
        "permission denied",
    );
    assert_no_state(&env);
}

#[test]
fn state_rules_follow_runc() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sleep", "1000"]);
    assert!(env
        .run(&["create", "--bundle", bundle.path_str(), "c-rules"])
        .status
        .success());
    expect_error(
        &env,
        &["create", "--bundle", bundle.path_str(), "c-rules"],
        "container with id exists",
    );
    expect_error(&env, &["kill", "c-rules", "SIGNOPE"], "unknown signal");
    expect_error(&env, &["kill", "c-rules", "99"], "unknown signal");
    assert!(env.run(&["start", "c-rules"]).status.success());
    expect_error(
        &env,
        &["start", "c-rules"],
        "cannot start an already running container",
    );
    assert!(env.run(&["kill", "c-rules", "KILL"]).status.success());
    env.wait_status("c-rules", "stopped", std::time::Duration::from_secs(20));
    expect_error(
        &env,
        &["start", "c-rules"],
        "cannot start a container that has stopped",
    );
    expect_error(
        &env,
        &["exec", "c-rules", "true"],
        "cannot exec in a stopped container",
    );
    expect_error(&env, &["kill", "c-rules", "TERM"], "container not running");
    assert!(env.run(&["delete", "c-rules"]).status.success());
    env.assert_clean("c-rules");
    assert!(!Path::new(&env.root().join("c-rules")).exists());
}

#[test]
fn required_hardware_isolation_refuses_an_emulated_vm_and_features_says_which() {
    let Some(env) = Env::new() else { return };
    // QEMU with TCG: the VM boundary is software emulation.
    let tcg = |cmd: &mut std::process::Command| {
        cmd.env("SUPERMACHINE_ENGINE", "qemu")
            .env("SUPERMACHINE_QEMU_ACCEL", "tcg");
    };
    let mut features = env.cmd();
    tcg(&mut features);
    let out = common::output_of(features.arg("features"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let isolation = doc["annotations"]["run.supermachine.isolation"]
        .as_str()
        .unwrap();
    assert!(isolation.contains("software emulation"), "{isolation}");
    let bundle = env.bundle(&["true"]);
    let mut create = env.cmd();
    tcg(&mut create);
    create.env("SUPERMACHINE_REQUIRE_HARDWARE_ISOLATION", "1");
    let out = common::output_of(create.args(["create", "--bundle", bundle.path_str(), "c-tcg"]));
    assert!(!out.status.success(), "ran on TCG");
    assert!(
        text(&out.stderr).contains("SUPERMACHINE_REQUIRE_HARDWARE_ISOLATION=1"),
        "{}",
        text(&out.stderr)
    );
    assert_no_state(&env);
}

#[test]
fn check_says_what_the_host_lacks_and_how_to_fix_it() {
    let Some(env) = Env::new() else { return };
    let out = env.run(&["check"]);
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}");
    for what in ["assets", "kvm", "engine", "tools", "cgroups", "containerd"] {
        assert!(
            report
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(what)),
            "no {what} line in {report}"
        );
    }
    assert!(report
        .lines()
        .any(|l| l.starts_with("ok") && l.contains("assets")));
    // Without the guest's kernel and agent nothing can run: a failure that says how to
    // build them.
    let empty = tempfile::tempdir().unwrap();
    let out = common::output_of(
        env.cmd()
            .env("SUPERMACHINE_ASSETS_DIR", empty.path())
            .arg("check"),
    );
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("MISSING") && l.contains("assets") && l.contains("make guest")),
        "{report}"
    );
}
