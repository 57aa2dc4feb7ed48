//! The runc contract with real microVMs: run, exit statuses, the create/start/kill/delete
//! life cycle, exec, terminals, pause/resume.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{text, ConsoleSocket, Env};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

fn guest_release(env: &Env) -> String {
    std::fs::read_to_string(env.assets.join("release"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn run_prints_the_guest_kernel_and_the_container_rootfs() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sh", "-c", "uname -r; cat /etc/motd; hostname"]);
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-run"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], guest_release(&env), "{stdout}");
    assert!(
        lines[1].starts_with("Hello from the container's own rootfs"),
        "{stdout}"
    );
    assert_eq!(lines[2], "testvm");
    env.assert_clean("c-run");
}

#[test]
fn run_returns_the_container_exit_status() {
    let Some(env) = Env::new() else { return };
    for (script, expected) in [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137)] {
        let bundle = env.bundle(&["sh", "-c", script]);
        let id = format!("c-exit-{expected}");
        let out = env.run(&["run", "--bundle", bundle.path_str(), &id]);
        assert_eq!(
            out.status.code(),
            Some(expected),
            "{script}: {}",
            text(&out.stderr)
        );
        env.assert_clean(&id);
    }
}

#[test]
fn stdin_reaches_the_container_and_stderr_is_separate() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sh", "-c", "read line; echo got:$line; echo oops >&2"]);
    let mut child = env
        .cmd()
        .args(["run", "--bundle", bundle.path_str(), "c-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello vm\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "got:hello vm\n");
    assert_eq!(text(&out.stderr), "oops\n");
}

#[test]
fn glibc_in_the_container_uses_only_vector_state_the_guest_kernel_switches() {
    let Some(env) = Env::new() else { return };
    // tests/fixtures/vector_state.rs compares glibc's active AVX/AVX-512 features with the
    // guest kernel's. It comes in on stdin, so that the container runs on the shared image.
    let program = common::fixture_program("vector_state");
    let bundle = env.bundle(&[
        "sh",
        "-c",
        "cat > /tmp/probe && chmod +x /tmp/probe && exec /tmp/probe",
    ]);
    let out = env
        .cmd()
        .args(["run", "--bundle", bundle.path_str(), "c-vector"])
        .stdin(std::fs::File::open(&program).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("avx: glibc uses it:"));
}

#[test]
fn the_guest_keeps_time_with_a_clock_that_lets_it_sleep_when_idle() {
    let Some(env) = Env::new() else { return };
    // A kernel that cannot use a real clock source keeps time in jiffies, which needs a
    // timer tick 100 times a second even when the guest has nothing to do.
    let bundle = env.bundle(&[
        "cat",
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
    ]);
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-clock"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let clock = text(&out.stdout);
    assert!(
        !clock.trim().is_empty() && !clock.contains("jiffies"),
        "guest clock source: {clock:?}"
    );
}

/// Makes this test process the subreaper of what it starts, as containerd's shim is, so
/// that the monitor (orphaned when `create` exits) can be waited for here.
fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);
}

/// `create` of `bundle` as `id` with `--pid-file` (which must succeed); the pid it wrote.
fn create_with_pid_file(env: &Env, bundle: &common::Bundle, id: &str) -> i32 {
    let pid_file = env.root().join(format!("{id}.pid"));
    let out = env.run(&[
        "create",
        "--bundle",
        bundle.path_str(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        id,
    ]);
    assert!(out.status.success(), "create {id}: {}", text(&out.stderr));
    std::fs::read_to_string(&pid_file).unwrap().parse().unwrap()
}

fn wait_monitor(pid: i32) -> i32 {
    match waitpid(Pid::from_raw(pid), None).unwrap() {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
        other => panic!("unexpected wait status {other:?}"),
    }
}

#[test]
fn lifecycle_create_start_kill_delete_through_the_monitor_pid() {
    let Some(env) = Env::new() else { return };
    become_subreaper();
    let bundle = env.bundle(&["sleep", "1000"]);
    let pid = create_with_pid_file(&env, &bundle, "c-life");
    let state = env.state("c-life");
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    assert_eq!(state["id"], "c-life");
    assert_eq!(
        state["bundle"],
        bundle.path().canonicalize().unwrap().to_str().unwrap()
    );
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "monitor not alive"
    );

    assert!(env.run(&["start", "c-life"]).status.success());
    assert_eq!(env.state("c-life")["status"], "running");

    let out = env.run(&["ps", "--format", "json", "c-life"]);
    let pids: Vec<i32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pids[0], pid, "ps lists the monitor first");
    // `start` returns once the process is told to exec, as runc's does: until the exec is
    // done the guest lists it without arguments (seconds where guest kernel code is
    // emulated). Asking while it starts also checks that the agent's work does not disturb
    // its start-up (see glibc_in_the_container_uses_only_vector_state_the_guest_kernel_switches).
    let deadline = Instant::now() + common::guest_time(Duration::from_secs(10));
    loop {
        let out = env.run(&["ps", "c-life"]);
        if text(&out.stdout).contains("sleep 1000") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ps: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = env.run(&["kill", "c-life", "15"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    assert_eq!(wait_monitor(pid), 143);
    let state = env.wait_status(
        "c-life",
        "stopped",
        common::guest_time(Duration::from_secs(20)),
    );
    assert_eq!(state["pid"], 0);

    let out = env.run(&["delete", "c-life"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_clean("c-life");
}

#[test]
fn a_start_the_vm_cannot_answer_leaves_the_container_stopped_and_deletable() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sleep", "1000"]);
    let out = env.run(&["create", "--bundle", bundle.path_str(), "c-stuck"]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let monitor = env.state("c-stuck")["pid"].as_i64().unwrap() as i32;
    // The VM stops answering between create and start.
    let vm = common::vm_processes(monitor);
    for &pid in &vm {
        nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
    let out = env.run(&["start", "c-stuck"]);
    for &pid in &vm {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGCONT);
    }
    assert!(!out.status.success(), "start of a stopped VM succeeded");
    // As runc leaves a container whose start failed: stopped, with nothing running, and
    // deleted without --force.
    let state = env.wait_status("c-stuck", "stopped", Duration::from_secs(20));
    assert_eq!(state["pid"], 0);
    let out = env.run(&["delete", "c-stuck"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_clean("c-stuck");
}

#[test]
fn a_created_containers_program_runs_only_at_start() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sh", "-c", "echo ran > /dev/shm/ran; exec sleep 1000"]);
    let out = env.run(&["create", "--bundle", bundle.path_str(), "c-held"]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let ran = |env: &Env| {
        let out = env.run(&["exec", "c-held", "cat", "/dev/shm/ran"]);
        text(&out.stdout).contains("ran\n")
    };
    // Long enough for the program to have written its file had it been let run.
    std::thread::sleep(common::guest_time(Duration::from_secs(2)));
    assert!(!ran(&env), "the program ran before start");
    assert!(env.run(&["start", "c-held"]).status.success());
    let deadline = Instant::now() + common::guest_time(Duration::from_secs(10));
    while !ran(&env) {
        assert!(
            Instant::now() < deadline,
            "the program did not run after start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.run(&["delete", "--force", "c-held"]).status.success());
    env.assert_clean("c-held");

    // A signal that would end the program ends a created container, as it ends runc's
    // waiting init.
    let out = env.run(&["create", "--bundle", bundle.path_str(), "c-held2"]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let out = env.run(&["kill", "c-held2", "TERM"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    env.wait_status(
        "c-held2",
        "stopped",
        common::guest_time(Duration::from_secs(20)),
    );
    assert!(env.run(&["delete", "c-held2"]).status.success());
    env.assert_clean("c-held2");
}

#[test]
fn exit_status_comes_back_through_the_monitor_pid() {
    let Some(env) = Env::new() else { return };
    become_subreaper();
    for (script, expected) in [("exit 3", 3), ("kill -9 $$", 137)] {
        let bundle = env.bundle(&["sh", "-c", script]);
        let id = format!("c-mon-{expected}");
        let pid = create_with_pid_file(&env, &bundle, &id);
        assert!(env.run(&["start", &id]).status.success());
        assert_eq!(wait_monitor(pid), expected, "{script}");
        assert_eq!(env.state(&id)["status"], "stopped");
        assert!(env.run(&["delete", &id]).status.success());
        env.assert_clean(&id);
    }
}

#[test]
fn kill_accepts_signal_names_and_delete_force_ends_a_running_container() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&[
        "sh",
        "-c",
        "trap 'echo usr1' USR1; touch /tmp/trapped; while true; do sleep 1; done",
    ]);
    let out = env.run(&["run", "--detach", "--bundle", bundle.path_str(), "c-kill"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    // Until the shell has set its trap, USR1 would end it.
    let deadline =
        std::time::Instant::now() + common::guest_time(std::time::Duration::from_secs(60));
    while !env
        .run(&["exec", "c-kill", "test", "-e", "/tmp/trapped"])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the trap was never set"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(env.run(&["kill", "c-kill", "SIGUSR1"]).status.success());
    assert!(env.run(&["kill", "c-kill", "usr1"]).status.success());
    // Signal 0 only asks whether the process is there, as under runc.
    assert!(env.run(&["kill", "c-kill", "0"]).status.success());
    let out = env.run(&["delete", "c-kill"]);
    assert!(
        !out.status.success(),
        "deleting a running container needs --force"
    );
    assert!(
        text(&out.stderr).contains("not stopped"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.run(&["delete", "--force", "c-kill"]).status.success());
    env.assert_clean("c-kill");
}

#[test]
fn exec_runs_in_the_same_vm_and_returns_its_status() {
    let Some(env) = Env::new() else { return };
    become_subreaper();
    // Written aside and renamed: a redirection creates the file before it writes it, and a
    // slow guest leaves an exec time to read it empty in between.
    let bundle = env.bundle(&[
        "sh",
        "-c",
        "echo from-init > /tmp/s.tmp; mv /tmp/s.tmp /tmp/shared; exec sleep 1000",
    ]);
    assert!(env
        .run(&["run", "--detach", "--bundle", bundle.path_str(), "c-exec"])
        .status
        .success());
    // The init may still be writing the file: retry briefly.
    let deadline = Instant::now() + common::guest_time(Duration::from_secs(10));
    loop {
        let out = env.run(&["exec", "c-exec", "cat", "/tmp/shared"]);
        if out.status.success() {
            assert_eq!(text(&out.stdout), "from-init\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "exec never saw the file: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env.run(&["exec", "c-exec", "sh", "-c", "echo $0 >&2; exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(text(&out.stderr), "sh\n");

    // Detached, as containerd's shim does it: the pid file names the relay, which exits with
    // the process's status.
    let process = env.root().join("process.json");
    std::fs::write(
        &process,
        r#"{"args":["sh","-c","exit 7"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#,
    )
    .unwrap();
    let pid_file = env.root().join("exec.pid");
    let out = env.run(&[
        "exec",
        "--process",
        process.to_str().unwrap(),
        "--detach",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "c-exec",
    ]);
    assert!(out.status.success(), "exec -d: {}", text(&out.stderr));
    let relay: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(wait_monitor(relay), 7);

    let out = env.run(&["exec", "c-exec", "no-such-program"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("executable file not found"),
        "{}",
        text(&out.stderr)
    );

    assert!(env.run(&["delete", "--force", "c-exec"]).status.success());
    env.assert_clean("c-exec");
}

#[test]
fn console_socket_receives_a_working_pty() {
    check_console("c-tty", false);
}

/// With a pid namespace the container's mounts (its `/dev/pts` among them) are made by its
/// first process: the pty must come from that devpts, not one the agent sees before.
#[test]
fn console_socket_receives_a_pty_of_the_containers_devpts_with_a_pid_namespace() {
    check_console("c-tty-pidns", true);
}

/// Creates `id` with a terminal and a console socket (the bundle mounts a devpts at
/// `/dev/pts`); the container's pty works both ways, has the console size asked for, and
/// is a node of the container's own `/dev/pts`.
fn check_console(id: &str, pid_namespace: bool) {
    let Some(env) = Env::new() else { return };
    become_subreaper();
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "t=$(tty); echo $t; test -c $t && echo in-devpts; stty size; read x; echo got-$x",
    ]);
    bundle.edit(|c| {
        c["process"]["terminal"] = true.into();
        c["process"]["consoleSize"] = serde_json::json!({ "height": 30, "width": 100 });
        if pid_namespace {
            c["linux"]["namespaces"] =
                serde_json::json!([{ "type": "pid" }, { "type": "mount" }, { "type": "ipc" }]);
        }
    });
    let socket = ConsoleSocket::new();
    let pid_file = env.root().join("tty.pid");
    let mut create = env
        .cmd()
        .args([
            "create",
            "--bundle",
            bundle.path_str(),
            "--pid-file",
            pid_file.to_str().unwrap(),
        ])
        .arg("--console-socket")
        .arg(socket.path())
        .arg(id)
        .spawn()
        .unwrap();
    let (stream, _) = socket.listener.accept().unwrap();
    let master = container::console::receive_fd(&stream).unwrap();
    assert!(create.wait().unwrap().success());
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert!(env.run(&["start", id]).status.success());
    let mut master = std::fs::File::from(master);
    master.write_all(b"ping\n").unwrap();
    let mut output = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + common::guest_time(Duration::from_secs(20));
    while !text(&output).contains("got-ping") && Instant::now() < deadline {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => output.extend_from_slice(&buf[..n]),
        }
    }
    let output = text(&output);
    assert!(output.contains("/dev/pts/"), "{output:?}");
    assert!(output.contains("in-devpts"), "{output:?}");
    assert!(output.contains("30 100"), "{output:?}");
    assert!(output.contains("got-ping"), "{output:?}");
    assert_eq!(wait_monitor(pid), 0);
    let _ = master.as_raw_fd();
    assert!(env.run(&["delete", id]).status.success());
    env.assert_clean(id);
}

/// The complete lines of a file the container's stdout goes to (its counter's ticks; a
/// line still being relayed is left out).
fn counter_lines(path: &std::path::Path) -> Vec<u64> {
    let output = std::fs::read_to_string(path).unwrap_or_default();
    let complete = output.rfind('\n').map_or("", |end| &output[..end]);
    complete
        .lines()
        .map(|line| {
            line.trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a tick: {line:?} in {output:?}"))
        })
        .collect()
}

/// Waits until the counter's output has more than `than` lines; returns them.
fn counter_beyond(path: &std::path::Path, than: usize, timeout: Duration) -> Vec<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let ticks = counter_lines(path);
        if ticks.len() > than {
            return ticks;
        }
        assert!(
            Instant::now() < deadline,
            "the container's counter stayed at {} ticks for {timeout:?}",
            ticks.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pause_and_resume_stop_and_continue_the_vm() {
    let Some(env) = Env::new() else { return };
    // A counter ticking every 50 ms on the container's stdout, a file the test reads: it
    // shows whether the guest ran, with no exec (refused while paused) in the way.
    let bundle = env.bundle(&[
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done",
    ]);
    let ticks_file = env.root().join("c-pause.out");
    let status = env
        .cmd()
        .args(["run", "--detach", "--bundle", bundle.path_str(), "c-pause"])
        .stdout(std::fs::File::create(&ticks_file).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    counter_beyond(&ticks_file, 3, common::guest_time(Duration::from_secs(30)));

    assert!(env.run(&["pause", "c-pause"]).status.success());
    assert_eq!(env.state("c-pause")["status"], "paused");
    // What the guest wrote before it stopped may still be on its way to the file.
    std::thread::sleep(common::guest_time(Duration::from_millis(500)));
    let at_pause = counter_lines(&ticks_file);
    let out = env.run(&["exec", "c-pause", "true"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("paused"),
        "exec while paused: {}",
        text(&out.stderr)
    );
    // Running, the counter would tick ~40 times in 2 s (and still several times where
    // guest forks take a second).
    let paused_for = common::guest_time(Duration::from_secs(2));
    std::thread::sleep(paused_for);
    let before_resume = counter_lines(&ticks_file);
    assert_eq!(
        before_resume.len(),
        at_pause.len(),
        "the counter advanced while paused for {paused_for:?}: {:?} at pause, {:?} before resume",
        at_pause.last(),
        before_resume.last()
    );

    assert!(env.run(&["resume", "c-pause"]).status.success());
    assert_eq!(env.state("c-pause")["status"], "running");
    let resumed = counter_beyond(
        &ticks_file,
        before_resume.len() + 2,
        common::guest_time(Duration::from_secs(10)),
    );
    // The same shell went on counting: no restart, no tick lost.
    let expected: Vec<u64> = (1..=resumed.len() as u64).collect();
    assert_eq!(resumed, expected, "the counter's ticks");
    assert!(env.run(&["exec", "c-pause", "true"]).status.success());
    let out = env.run(&["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], "c-pause");
    assert!(env.run(&["delete", "--force", "c-pause"]).status.success());
    env.assert_clean("c-pause");
}

#[test]
fn process_settings_apply_inside_the_vm() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "id -u; id -g; id -G; pwd; umask; ulimit -n; echo $FOO",
    ]);
    bundle.edit(|c| {
        c["process"]["user"] = serde_json::json!({ "uid": 1000, "gid": 1000, "additionalGids": [1000, 65534], "umask": 23 });
        c["process"]["cwd"] = "/home/user".into();
        c["process"]["env"].as_array_mut().unwrap().push("FOO=bar".into());
        c["process"]["rlimits"] = serde_json::json!([{ "type": "RLIMIT_NOFILE", "hard": 200, "soft": 100 }]);
        c["process"]["noNewPrivileges"] = true.into();
    });
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-proc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "1000\n1000\n1000 65534\n/home/user\n0027\n100\nbar\n"
    );
}

#[test]
fn a_pid_namespace_makes_the_process_pid_1_with_init_semantics() {
    let Some(env) = Env::new() else { return };
    // As under runc: PID 1 of a namespace ignores signals it has no handler for, even
    // SIGKILL from inside; an exec'd process sees the same namespace.
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "echo pid=$$; kill -9 $$; echo survived; ls /proc | grep -c '^[0-9]'; exec sleep 1000",
    ]);
    bundle.edit(|c| {
        c["linux"] = serde_json::json!({ "namespaces": [{ "type": "pid" }, { "type": "mount" }] })
    });
    let out_file = env.root().join("ns.out");
    let out = std::fs::File::create(&out_file).unwrap();
    let status = env
        .cmd()
        .args(["run", "--detach", "--bundle", bundle.path_str(), "c-pidns"])
        .stdout(out)
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + common::guest_time(Duration::from_secs(10));
    while !std::fs::read_to_string(&out_file)
        .unwrap()
        .contains("survived")
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&out_file).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text_out = std::fs::read_to_string(&out_file).unwrap();
    assert!(text_out.starts_with("pid=1\nsurvived\n"), "{text_out}");
    // The init execs `sleep` right after its output: wait for that.
    let deadline = Instant::now() + common::guest_time(Duration::from_secs(10));
    let exec_out = loop {
        let out = env.run(&[
            "exec",
            "c-pidns",
            "sh",
            "-c",
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo $$",
        ]);
        let exec_out = text(&out.stdout);
        if exec_out.starts_with("sleep 1000 \n") {
            break exec_out;
        }
        assert!(
            Instant::now() < deadline,
            "exec: {exec_out}{}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<&str> = exec_out.lines().collect();
    assert!(
        lines.get(1).and_then(|l| l.parse::<u32>().ok()) > Some(1),
        "{exec_out}"
    );
    // SIGTERM without a handler is ignored by a namespace's PID 1; SIGKILL is not.
    assert!(env.run(&["kill", "c-pidns", "TERM"]).status.success());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(env.state("c-pidns")["status"], "running");
    assert!(env.run(&["kill", "c-pidns", "KILL"]).status.success());
    env.wait_status(
        "c-pidns",
        "stopped",
        common::guest_time(Duration::from_secs(20)),
    );
    assert!(env.run(&["delete", "c-pidns"]).status.success());
    env.assert_clean("c-pidns");
}

#[test]
fn host_hooks_run_with_the_container_state_and_the_cgroup_is_joined() {
    let Some(env) = Env::new() else { return };
    let hooks_dir = tempfile::tempdir().unwrap();
    let log = |name: &str| hooks_dir.path().join(name);
    let hook = |name: &str| serde_json::json!({ "path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", log(name).display())] });
    let cgroup = format!("/supermachine-test/{}", std::process::id());
    let mut bundle = env.bundle(&["sleep", "1000"]);
    bundle.edit(|c| {
        c["hooks"] = serde_json::json!({
            "createRuntime": [hook("createRuntime")],
            "prestart": [hook("prestart")],
            "poststart": [hook("poststart")],
            "poststop": [hook("poststop")],
        });
        c["linux"] = serde_json::json!({
            "cgroupsPath": cgroup,
            "resources": { "memory": { "limit": 402653184 } },
            "namespaces": [{ "type": "network" }]
        });
    });
    let pid = i64::from(create_with_pid_file(&env, &bundle, "c-hooks"));
    for (name, status) in [("createRuntime", "creating"), ("prestart", "creating")] {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(log(name)).unwrap()).unwrap();
        assert_eq!(
            (
                state["id"].as_str(),
                state["status"].as_str(),
                state["pid"].as_i64()
            ),
            (Some("c-hooks"), Some(status), Some(pid))
        );
    }
    assert!(!log("poststart").exists());
    // The monitor is in the container's cgroup, whose memory limit holds the VM (the
    // container's 384 MiB, enforced in the guest, plus 64 MiB for the guest kernel and 64
    // for the VMM), and in a network namespace of its own (so that networking hooks never
    // touch the host's).
    let memory = std::path::Path::new("/sys/fs/cgroup/memory").join(cgroup.trim_start_matches('/'));
    if memory.exists() {
        let procs = std::fs::read_to_string(memory.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
        assert_eq!(
            std::fs::read_to_string(memory.join("memory.limit_in_bytes"))
                .unwrap()
                .trim(),
            ((384 + 64 + 64) << 20).to_string()
        );
    }
    // The host cgroup bounds the monitor's and VMM's tasks, in whichever hierarchy has
    // the pids controller.
    let relative = cgroup.trim_start_matches('/');
    let pids_max: Vec<String> = [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .iter()
    .filter_map(|mount| {
        std::fs::read_to_string(std::path::Path::new(mount).join(relative).join("pids.max")).ok()
    })
    .map(|v| v.trim().to_string())
    .collect();
    assert!(!pids_max.is_empty(), "no pids.max for {relative}");
    assert!(pids_max.iter().all(|v| v == "512"), "{pids_max:?}");
    let own_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        own_ns
    );

    assert!(env.run(&["start", "c-hooks"]).status.success());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(log("poststart")).unwrap()).unwrap();
    assert_eq!(state["status"], "running");
    assert!(env.run(&["delete", "--force", "c-hooks"]).status.success());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(log("poststop")).unwrap()).unwrap();
    assert_eq!(state["status"], "stopped");
    assert!(!memory.exists(), "cgroup left behind");
    let _ = std::fs::remove_dir(memory.parent().unwrap());
    env.assert_clean("c-hooks");
}

#[test]
fn a_cgroups_path_that_climbs_stays_under_the_hierarchy_root() {
    let Some(env) = Env::new() else { return };
    let name = format!("supermachine-climb-{}", std::process::id());
    let mut bundle = env.bundle(&["sleep", "1000"]);
    bundle
        .edit(|c| c["linux"] = serde_json::json!({ "cgroupsPath": format!("/a/../../../{name}") }));
    let pid = create_with_pid_file(&env, &bundle, "c-climb");
    // Cleaned as runc cleans it: the cgroup is `/<name>` of each hierarchy, not a
    // directory climbed to outside `/sys/fs/cgroup`.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups.lines().any(|l| l.ends_with(&format!(":/{name}"))),
        "{cgroups}"
    );
    assert!(!std::path::Path::new("/").join(&name).exists());
    assert!(!std::path::Path::new("/sys").join(&name).exists());
    assert!(env.run(&["delete", "--force", "c-climb"]).status.success());
    env.assert_clean("c-climb");
}

#[test]
fn file_binds_are_mounts_over_a_read_only_root() {
    let Some(env) = Env::new() else { return };
    // docker's own files, on a root (busybox) that has neither: the targets are made before
    // the root turns read-only, and the files are binds, not writes into the image.
    let files = tempfile::tempdir().unwrap();
    let hostname = files.path().join("hostname");
    let resolv = files.path().join("resolv.conf");
    std::fs::write(&hostname, "bound-host\n").unwrap();
    std::fs::write(&resolv, "nameserver 10.9.8.7\n").unwrap();
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "cat /etc/hostname /etc/resolv.conf; \
         touch /new 2>/dev/null && echo root-rw || echo root-ro; \
         echo x > /etc/resolv.conf 2>/dev/null && echo resolv-rw || echo resolv-ro; \
         echo c2 > /etc/hostname && cat /etc/hostname",
    ]);
    bundle.edit(|c| {
        c["root"]["readonly"] = true.into();
        let mounts = c["mounts"].as_array_mut().unwrap();
        mounts.push(
            serde_json::json!({ "destination": "/etc/hostname", "type": "bind",
            "source": hostname, "options": ["rbind", "rprivate"] }),
        );
        mounts.push(
            serde_json::json!({ "destination": "/etc/resolv.conf", "type": "bind",
            "source": resolv, "options": ["rbind", "rprivate", "ro"] }),
        );
    });
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-file-binds"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "bound-host\nnameserver 10.9.8.7\nroot-ro\nresolv-ro\nc2\n"
    );
    // The binds are the host's files, as with runc.
    assert_eq!(std::fs::read_to_string(&hostname).unwrap(), "c2\n");
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        "nameserver 10.9.8.7\n"
    );
    env.assert_clean("c-file-binds");
}

#[test]
fn the_guest_kernel_has_fuse_virtiofs_and_the_fuse_control_directory() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&[
        "sh",
        "-c",
        "cat /proc/filesystems; cat /sys/class/misc/fuse/dev; ls -d /sys/fs/fuse/connections",
    ]);
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-fuse"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let filesystems: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for fs in ["fuse", "fusectl", "virtiofs"] {
        assert!(filesystems.contains(&fs), "{fs} missing: {stdout}");
    }
    // The misc device the agent's relay opens as /dev/fuse (devtmpfs makes the node).
    assert!(stdout.lines().any(|l| l == "10:229"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "/sys/fs/fuse/connections"),
        "{stdout}"
    );
    env.assert_clean("c-fuse");
}

/// A FUSE_NOTIFY_FSNOTIFY message (the guest kernel's patch) about `name` in the root
/// directory (node 1), as printf's octal escapes.
fn fsnotify_message(mask: u32, name: &str) -> String {
    let mut body = Vec::new();
    body.extend_from_slice(&1u64.to_le_bytes()); // parent
    body.extend_from_slice(&0u64.to_le_bytes()); // child: not known
    body.extend_from_slice(&mask.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // cookie
    body.extend_from_slice(&(name.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    let mut message = Vec::new();
    message.extend_from_slice(&(16 + body.len() as u32).to_le_bytes());
    message.extend_from_slice(&64i32.to_le_bytes()); // FUSE_NOTIFY_FSNOTIFY
    message.extend_from_slice(&0u64.to_le_bytes()); // unique 0: a notification
    message.extend_from_slice(&body);
    message.iter().map(|b| format!("\\{b:03o}")).collect()
}

#[test]
fn fsnotify_notifications_reach_inotify_watchers_through_dev_fuse_and_fusectl() {
    let Some(env) = Env::new() else { return };
    // A FUSE mount with no server: nothing here sends it a request (no default_permissions,
    // so no attribute lookups), and the root's inode (node 1) always exists. Its fusectl
    // directory is named by its device number, from mountinfo (a stat would ask the absent
    // server); the VM's own share connection is another one.
    let program = common::fixture_program("inotify_watch");
    let script = format!(
        "set -e
         cat > /tmp/watch && chmod +x /tmp/watch
         mknod /dev/fuse c 10 229
         mkdir -p /tmp/f
         exec 3<>/dev/fuse
         mount -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 sm /tmp/f
         mount -t fusectl fusectl /sys/fs/fuse/connections
         /tmp/watch /tmp/f > /tmp/events &
         until grep -q watching /tmp/events; do sleep 0.1; done
         printf '{create}' >&3
         conn=$(awk '$5 == \"/tmp/f\" {{ split($3, d, \":\"); print d[2] }}' /proc/self/mountinfo)
         printf '{delete}' > /sys/fs/fuse/connections/$conn/notify
         sleep 1
         kill $!
         cat /tmp/events",
        create = fsnotify_message(0x100, "made-on-host"),
        delete = fsnotify_message(0x4000_0200, "gone-on-host"),
    );
    let bundle = env.bundle(&["sh", "-c", &script]);
    let out = env
        .cmd()
        .args(["run", "--bundle", bundle.path_str(), "c-fsnotify"])
        .stdin(std::fs::File::open(&program).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let events: Vec<&str> = stdout.lines().collect();
    // IN_CREATE through /dev/fuse, IN_DELETE|IN_ISDIR through the fusectl file.
    assert_eq!(
        events,
        ["watching", "100 made-on-host", "40000200 gone-on-host"],
        "{stdout}"
    );
    env.assert_clean("c-fsnotify");
}
