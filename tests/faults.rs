//! Fault injection, with real VMs: the runtime's processes (the verbs and the container's
//! monitor) are killed with SIGKILL (no chance to clean up) at each step of create, start
//! and delete. What a caller does next
//! (`state`, then `delete --force`, as containerd and docker do after a failure) must
//! answer within a bound and leave nothing: no state directory, no monitor, no VM.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{guest_time, text, Bundle, Env};
use serde_json::Value;

/// Long enough for any verb on a slow guest; a verb that takes longer is stuck.
fn verb_bound() -> Duration {
    guest_time(Duration::from_secs(60))
}

fn sigkill(pid: i32) {
    // SAFETY: kill(2) with integer arguments only.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// The state `state` reports, or `Null` once the container is gone.
fn status(env: &Env, id: &str) -> Value {
    let out = env.run(&["state", id]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    doc
}

/// Waits until `state` reports `want` with a monitor pid; the pid.
fn wait_for_status(env: &Env, id: &str, want: &str) -> i32 {
    let mut pid = 0;
    common::wait_for(&format!("{id} {want}"), verb_bound(), || {
        let doc = status(env, id);
        pid = doc["pid"].as_i64().unwrap_or(0) as i32;
        doc["status"] == want && pid > 0
    });
    pid
}

/// `create` in the background, its output in files under the state root.
fn spawn_create(env: &Env, bundle: &Bundle, id: &str) -> Child {
    let out = |name: &str| std::fs::File::create(env.root().join(format!("{id}.{name}"))).unwrap();
    env.cmd()
        .args(["create", "--bundle", bundle.path_str(), id])
        .stdout(out("stdout"))
        .stderr(out("stderr"))
        .spawn()
        .unwrap()
}

/// Waits for `child` for at most the verb bound; its exit code (`None`: killed).
fn wait_bounded(child: &mut Child, what: &str) -> Option<i32> {
    let deadline = Instant::now() + verb_bound();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "{what} did not return");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `delete --force` (which must succeed, or find nothing to delete), then nothing left.
fn delete_leaves_nothing(env: &Env, id: &str) {
    let started = Instant::now();
    let out = env.run(&["delete", "--force", id]);
    assert!(
        started.elapsed() < verb_bound(),
        "delete --force {id} took too long"
    );
    assert!(
        out.status.success() || text(&out.stderr).contains("does not exist"),
        "delete --force {id}: {}",
        text(&out.stderr)
    );
    env.assert_clean(id);
    assert!(
        mounts_mentioning(env.root()).is_empty(),
        "mounts left: {:?}",
        mounts_mentioning(env.root())
    );
}

fn mounts_mentioning(root: &std::path::Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root))
        .map(String::from)
        .collect()
}

#[test]
fn create_killed_at_each_step_then_delete_force_leaves_nothing() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sleep", "1000"]);
    // Killed before it has done anything, while its monitor is still creating the
    // container, and after the container was created (`create` is then on its way out).
    for (id, step) in [
        ("create-at-once", "spawned"),
        ("create-creating", "creating"),
        ("create-created", "created"),
    ] {
        let mut create = spawn_create(&env, &bundle, id);
        if step != "spawned" {
            wait_for_status(&env, id, step);
        }
        sigkill(create.id() as i32);
        let _ = create.wait();
        // Whatever the killed create left, `state` answers and `delete --force` ends it.
        let started = Instant::now();
        let _ = status(&env, id);
        assert!(started.elapsed() < verb_bound(), "state {id} took too long");
        delete_leaves_nothing(&env, id);
    }
}

#[test]
fn the_monitor_killed_at_each_step_leaves_a_stopped_container_that_deletes_cleanly() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sleep", "1000"]);
    for (id, step) in [
        ("monitor-creating", "creating"),
        ("monitor-created", "created"),
        ("monitor-running", "running"),
    ] {
        let mut create = spawn_create(&env, &bundle, id);
        let monitor = match step {
            "running" => {
                wait_for_status(&env, id, "created");
                assert_eq!(wait_bounded(&mut create, "create"), Some(0));
                let out = env.run(&["start", id]);
                assert!(out.status.success(), "start {id}: {}", text(&out.stderr));
                wait_for_status(&env, id, "running")
            }
            _ => wait_for_status(&env, id, step),
        };
        sigkill(monitor);
        let code = wait_bounded(&mut create, "create");
        if step == "creating" {
            assert_ne!(code, Some(0), "create succeeded without its monitor");
        }
        // The VM went with its monitor: the container is stopped (or, killed while
        // creating, gone or stopped), never reported alive.
        common::wait_for(&format!("{id} not alive"), verb_bound(), || {
            let doc = status(&env, id);
            doc.is_null() || doc["status"] == "stopped"
        });
        delete_leaves_nothing(&env, id);
    }
}

/// Runs the verb `args` and SIGKILLs it `delay` after it began.
fn kill_after(env: &Env, args: &[&str], delay: Duration) {
    let mut verb = env
        .cmd()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    sigkill(verb.id() as i32);
    let _ = verb.wait();
}

#[test]
fn start_killed_midway_leaves_a_container_that_is_created_or_running_and_deletes_cleanly() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sleep", "1000"]);
    for (n, delay) in [0u64, 20, 100].into_iter().enumerate() {
        let id = format!("start-killed-{n}");
        let mut create = spawn_create(&env, &bundle, &id);
        assert_eq!(wait_bounded(&mut create, "create"), Some(0));
        kill_after(&env, &["start", &id], Duration::from_millis(delay));
        let doc = status(&env, &id);
        assert!(
            doc["status"] == "created" || doc["status"] == "running",
            "{id}: {doc}"
        );
        delete_leaves_nothing(&env, &id);
    }
}

#[test]
fn delete_killed_midway_then_delete_force_again_leaves_nothing() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sleep", "1000"]);
    for (n, delay) in [0u64, 20, 100, 300].into_iter().enumerate() {
        let id = format!("delete-killed-{n}");
        let mut create = spawn_create(&env, &bundle, &id);
        assert_eq!(wait_bounded(&mut create, "create"), Some(0));
        assert!(env.run(&["start", &id]).status.success());
        kill_after(
            &env,
            &["delete", "--force", &id],
            Duration::from_millis(delay),
        );
        delete_leaves_nothing(&env, &id);
    }
}

/// A check that cannot fail is no check: a process left behind that mentions the state
/// root is seen.
#[test]
fn the_fault_helpers_see_a_process_left_behind() {
    let Some(env) = Env::new() else { return };
    let mut sleeper = Command::new("sh")
        .args(["-c", "sleep 30", "sh"])
        .arg(env.root())
        .spawn()
        .unwrap();
    common::wait_for("the sleeper", Duration::from_secs(5), || {
        !env.processes().is_empty()
    });
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let left = env.processes();
    assert!(left.is_empty(), "still seen: {left:#?}");
}

/// Assets whose agent is busybox: the VM boots but never says Ready, so `create` stays in
/// its wait for the guest until the boot timeout (a deliberately slow create).
fn never_ready_assets(env: &Env) -> tempfile::TempDir {
    let fake = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env.assets.join("vmlinux"), fake.path().join("vmlinux")).unwrap();
    std::fs::copy("/bin/busybox", fake.path().join("supermachine-agent")).unwrap();
    fake
}

#[test]
fn verbs_during_a_slow_create_answer_at_once_and_the_create_ends_at_its_timeout() {
    let Some(env) = Env::new() else { return };
    let fake = never_ready_assets(&env);
    let bundle = env.bundle(&["true"]);
    let id = "slow-create";
    let out = |name: &str| std::fs::File::create(env.root().join(format!("{id}.{name}"))).unwrap();
    let mut create = env
        .cmd()
        .env("SUPERMACHINE_ASSETS_DIR", fake.path())
        .env("SUPERMACHINE_BOOT_TIMEOUT", "10")
        .args(["create", "--bundle", bundle.path_str(), id])
        .stdout(out("stdout"))
        .stderr(out("stderr"))
        .spawn()
        .unwrap();
    wait_for_status(&env, id, "creating");
    // `start` does not wait on the guest: it refuses, naming why.
    let asked = Instant::now();
    let start = env.run(&["start", id]);
    assert!(asked.elapsed() < Duration::from_secs(5), "start waited");
    assert!(!start.status.success(), "start of a creating container");
    assert!(
        text(&start.stderr).contains("still being created"),
        "{}",
        text(&start.stderr)
    );
    for verb in [&["state", id][..], &["ps", id], &["list"]] {
        let asked = Instant::now();
        env.run(verb);
        assert!(asked.elapsed() < Duration::from_secs(5), "{verb:?} waited");
    }
    // The create itself gives up at its boot timeout, reporting the guest's console, and
    // takes everything with it.
    let code = wait_bounded(&mut create, "create");
    assert_ne!(code, Some(0));
    let stderr = std::fs::read_to_string(env.root().join(format!("{id}.stderr"))).unwrap();
    assert!(stderr.contains("did not answer"), "{stderr}");
    for name in ["stdout", "stderr"] {
        std::fs::remove_file(env.root().join(format!("{id}.{name}"))).unwrap();
    }
    assert!(
        status(&env, id).is_null(),
        "state left: {}",
        status(&env, id)
    );
    env.assert_clean(id);
}

#[test]
fn the_callers_stdio_closes_when_the_container_process_exits() {
    let Some(env) = Env::new() else { return };
    // The container prints, then exits a while after start: the caller reads its stdout to
    // the end, which must come with the exit, not with `delete`.
    let bundle = env.bundle(&["sh", "-c", "echo out; sleep 1"]);
    let id = "stdio-closes";
    let mut create = env
        .cmd()
        .args(["create", "--bundle", bundle.path_str(), id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = create.stdout.take().unwrap();
    assert_eq!(wait_bounded(&mut create, "create"), Some(0));
    assert!(env.run(&["start", id]).status.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut all);
        let _ = tx.send(all);
    });
    let all = rx
        .recv_timeout(verb_bound())
        .expect("the container's stdout stayed open after it exited");
    assert_eq!(all, "out\n");
    // The exit is recorded as the output ends (the agent sends the end of the output, then
    // the exit status).
    env.wait_status(id, "stopped", verb_bound());
    delete_leaves_nothing(&env, id);
}

#[test]
fn a_guest_that_restarts_ends_its_container_with_an_error_and_leaves_nothing() {
    let Some(env) = Env::new() else { return };
    // The bundle names no pid namespace, so the container shares the VM's, and it has
    // CAP_SYS_BOOT: `reboot -f` restarts the guest's kernel, which ends the VM (QEMU runs
    // with -no-reboot; the builtin VMM takes the triple fault of `reboot=t` as the end).
    // Nothing on the host is told but by the VM's end itself.
    let bundle = env.bundle(&["sh", "-c", "echo up; reboot -f; sleep 1000"]);
    let id = "guest-restarts";
    let log = env.root().join(format!("{id}.log"));
    let mut run = env
        .cmd()
        .arg("--log")
        .arg(&log)
        .args(["run", "--bundle", bundle.path_str(), id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let code = wait_bounded(&mut run, "run of a container whose guest restarts");
    let out = run.wait_with_output().unwrap();
    assert_eq!(
        code,
        Some(255),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "up\n");
    // The container's stderr is its own; the runtime says why in its log.
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("VM died"), "{log}");
    delete_leaves_nothing(&env, id);
}
