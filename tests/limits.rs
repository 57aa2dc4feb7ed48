//! Limits inside the VM, as under runc: config.json's `linux.resources` become the
//! container's cgroup in the guest, which the container sees as its `/sys/fs/cgroup`; the
//! guest kernel enforces them (OOM kills, pid limits), `update` changes them live and
//! `events --stats` reports the container's usage from them.

#![allow(clippy::unwrap_used)]

mod common;

use common::{text, Bundle, Env};
use serde_json::{json, Value};

const MIB: i64 = 1 << 20;

/// A bundle with `resources` and the cgroup mount runc's and docker's default configs have.
fn limited(env: &Env, args: &[&str], resources: Value) -> Bundle {
    let mut bundle = env.bundle(args);
    bundle.edit(|config| {
        config["linux"] = json!({ "resources": resources });
        config["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]
        }));
    });
    bundle
}

#[test]
fn the_memory_limit_is_the_containers_own_cgroup_root() {
    let Some(env) = Env::new() else { return };
    let bundle = limited(
        &env,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /proc/self/cgroup; \
             ls /sys/fs/cgroup | grep -c '^container$' || true",
        ],
        json!({ "memory": { "limit": 64 * MIB }, "pids": { "limit": 64 } }),
    );
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-memmax"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["67108864", "64", "0::/", "0"],
        "memory.max, pids.max, the cgroup as the container sees it, and no nested \
         `container` (the mount is rooted at its cgroup): {stdout}"
    );
    env.assert_clean("c-memmax");
}

#[test]
fn a_process_beyond_the_memory_limit_is_oom_killed_and_the_container_exits_137() {
    let Some(env) = Env::new() else { return };
    // dd fills a buffer of `bs` bytes: 96 MiB touched under a 48 MiB limit, in a guest
    // sized to hold more than that (the limit plus the guest's headroom), so the cgroup's
    // OOM killer ends it, not the guest's.
    let bundle = limited(
        &env,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1"],
        json!({ "memory": { "limit": 48 * MIB } }),
    );
    let (out, log) = env.run_with_log(&bundle, "c-oom");
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        log.contains("OOM killer killed 1"),
        "the guest reported the OOM kill: {log}"
    );
    env.assert_clean("c-oom");
}

#[test]
fn a_pids_limit_stops_a_fork_loop() {
    let Some(env) = Env::new() else { return };
    // A subshell forks 40 sleeps and dies of the first fork refused; its parent then reads
    // the counters with builtins only (no fork of its own).
    let script = "(i=0; while [ $i -lt 40 ]; do sleep 60 & i=$((i+1)); done) 2>/dev/null; \
                  read current < /sys/fs/cgroup/pids.current; echo current=$current; \
                  while read key value; do echo $key=$value; done < /sys/fs/cgroup/pids.events";
    let bundle = limited(
        &env,
        &["sh", "-c", script],
        json!({ "pids": { "limit": 8 } }),
    );
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-pids"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{:?} stdout: {stdout} stderr: {}",
        out.status,
        text(&out.stderr)
    );
    let value = |key: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
    };
    assert!(
        (1..=8).contains(&value("current")),
        "never more than the limit: {stdout}"
    );
    assert!(value("max") >= 1, "forks refused at the limit: {stdout}");
    env.assert_clean("c-pids");
}

#[test]
fn update_changes_the_limit_the_container_sees_and_the_vms_memory_and_events_reports_usage() {
    let Some(env) = Env::new() else { return };
    let bundle = limited(
        &env,
        &["sleep", "1000"],
        json!({ "memory": { "limit": 32 * MIB } }),
    );
    let id = "c-update";
    let out = env.run(&["create", "--bundle", bundle.path_str(), id]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    assert!(env.run(&["start", id]).status.success());

    let raised = (48 * MIB).to_string();
    let out = env.run(&["update", "--memory", &raised, id]);
    assert!(out.status.success(), "update: {}", text(&out.stderr));
    let out = env.run(&["exec", id, "cat", "/sys/fs/cgroup/memory.max"]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), raised);

    // The VM was sized for 32 MiB and its guest's headroom: 1 GiB cannot fit, and says so.
    let out = env.run(&["update", "--memory", &(1024 * MIB).to_string(), id]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot raise the memory limit"), "{stderr}");
    let out = env.run(&["exec", id, "cat", "/sys/fs/cgroup/memory.max"]);
    assert_eq!(
        text(&out.stdout).trim(),
        raised,
        "a refused update changes nothing"
    );

    let out = env.run(&["events", "--stats", id]);
    assert!(out.status.success(), "events: {}", text(&out.stderr));
    let event: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(event["type"], "stats");
    assert_eq!(event["id"], id);
    let memory = &event["data"]["memory"];
    assert_eq!(memory["usage"]["limit"], 48 * MIB);
    let usage = memory["usage"]["usage"].as_u64().unwrap();
    assert!(
        usage > 0 && usage < 48 << 20,
        "the container's own usage, not the VM's: {event}"
    );
    assert!(event["data"]["pids"]["current"].as_u64().unwrap() >= 1);
    assert!(event["data"]["cpu"]["usage"]["total"].as_u64().unwrap() > 0);
    // Beside the container's numbers, the VM's host cost: its monitor's process tree.
    let vm = &event["data"]["vm"];
    let monitor = env.state(id)["pid"].as_u64().unwrap();
    assert_eq!(vm["pids"][0].as_u64(), Some(monitor), "{vm}");
    assert!(
        vm["host_memory_rss"].as_u64().unwrap() > usage,
        "the VM holds at least what its container uses: {vm}"
    );
    assert!(vm["host_cpu_usage"].as_u64().is_some(), "{vm}");

    // A lower limit shrinks the VM too: its balloon takes what the guest no longer may use
    // (the VM was made for 32 MiB and the headroom; 16 MiB and the headroom is 16 MiB less,
    // and more where the VM got the smallest size instead).
    let free_before = guest_free_kib(&env, id);
    let out = env.run(&["update", "--memory", &(16 * MIB).to_string(), id]);
    assert!(out.status.success(), "update: {}", text(&out.stderr));
    let mut free_after = guest_free_kib(&env, id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while free_before - free_after < 12 * 1024 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        free_after = guest_free_kib(&env, id);
    }
    assert!(
        free_before - free_after >= 12 * 1024,
        "the guest's balloon took no memory: MemFree {free_before} kB before, {free_after} kB after"
    );

    assert!(env.run(&["delete", "--force", id]).status.success());
    env.assert_clean(id);
}

/// The guest's free memory (`MemFree` of its `/proc/meminfo`), in KiB.
fn guest_free_kib(env: &Env, id: &str) -> i64 {
    let out = env.run(&["exec", id, "cat", "/proc/meminfo"]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("MemFree:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemFree in {}", text(&out.stdout)))
}

/// The guest's online CPUs as the container counts them.
fn guest_nproc(env: &Env, id: &str) -> String {
    let out = env.run(&["exec", id, "nproc"]);
    assert!(out.status.success(), "exec nproc: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// Creates `id` sleeping, with a CPU quota of `quota` µs per 100 ms (`quota / 100_000`
/// CPUs, and a VM of that many vCPUs rounded up); its bundle must outlive it.
fn created_with_cpu_quota(env: &Env, id: &str, quota: u32) -> Bundle {
    let bundle = limited(
        env,
        &["sleep", "1000"],
        json!({ "cpu": { "quota": quota, "period": 100_000 } }),
    );
    let out = env.run(&["create", "--bundle", bundle.path_str(), id]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    bundle
}

/// `update` of `id`'s CPU quota to `quota` µs per 100 ms.
fn update_cpu_quota(env: &Env, id: &str, quota: u32) -> std::process::Output {
    let quota = quota.to_string();
    env.run(&[
        "update",
        "--cpu-quota",
        &quota,
        "--cpu-period",
        "100000",
        id,
    ])
}

/// The file at `path` as the container `id` reads it, trimmed.
fn guest_file(env: &Env, id: &str, path: &str) -> String {
    let out = env.run(&["exec", id, "cat", path]);
    assert!(
        out.status.success(),
        "exec cat {path}: {}",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

/// `id`'s `cpu.max`, as the container reads it.
fn guest_cpu_max(env: &Env, id: &str) -> String {
    guest_file(env, id, "/sys/fs/cgroup/cpu.max")
}

#[test]
fn update_takes_vcpus_offline_and_brings_them_online_up_to_what_the_vm_booted_with() {
    let Some(env) = Env::new() else { return };
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    if host < 2 {
        common::skip("a VM of two vCPUs needs a host of two CPUs");
        return;
    }
    // Two CPUs' quota: a VM of two vCPUs.
    let id = "c-update-cpus";
    let _bundle = created_with_cpu_quota(&env, id, 200_000);
    assert!(env.run(&["start", id]).status.success());
    assert_eq!(guest_nproc(&env, id), "2");

    let out = update_cpu_quota(&env, id, 100_000);
    assert!(out.status.success(), "update: {}", text(&out.stderr));
    assert_eq!(
        guest_nproc(&env, id),
        "1",
        "one CPU's quota: one vCPU online"
    );
    assert_eq!(guest_cpu_max(&env, id), "100000 100000");

    let out = update_cpu_quota(&env, id, 150_000);
    assert!(out.status.success(), "update: {}", text(&out.stderr));
    assert_eq!(guest_nproc(&env, id), "2", "back online");

    // A paused VM runs no agent to apply it: refused, saying so.
    assert!(env.run(&["pause", id]).status.success());
    let out = update_cpu_quota(&env, id, 100_000);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("resume it first"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.run(&["resume", id]).status.success());
    assert!(env.run(&["delete", "--force", id]).status.success());
    env.assert_clean(id);

    // One CPU's quota: one vCPU online of the host's the VM boots with, so that an
    // update can raise it; a created container is updated as a running one is.
    let id = "c-update-one-cpu";
    let _bundle = created_with_cpu_quota(&env, id, 100_000);
    let booted = host.min(container::paths::VmDefaults::load().max_vcpus as usize);
    assert_eq!(
        guest_cpus(&env, id, "present"),
        format!("0-{}", booted - 1),
        "booted with the host's CPUs"
    );
    assert_eq!(guest_nproc(&env, id), "1");
    let out = update_cpu_quota(&env, id, 200_000);
    assert!(out.status.success(), "update: {}", text(&out.stderr));
    assert_eq!(guest_nproc(&env, id), "2", "brought online");
    assert_eq!(guest_cpu_max(&env, id), "200000 100000");
    assert!(env.run(&["delete", "--force", id]).status.success());
    env.assert_clean(id);
}

/// The guest kernel's list of its `which` CPUs (`present`, `online`), as the container
/// reads it.
fn guest_cpus(env: &Env, id: &str, which: &str) -> String {
    guest_file(env, id, &format!("/sys/devices/system/cpu/{which}"))
}

#[test]
fn a_cpuset_brings_online_every_cpu_it_names_and_the_container_runs_on_those() {
    let Some(env) = Env::new() else { return };
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    if host < 2 {
        common::skip("a cpuset of CPU 1 needs a host of two CPUs");
        return;
    }
    // docker run --cpuset-cpus 1: CPU 1 exists on the host, so it does in the VM.
    let bundle = limited(&env, &["sleep", "1000"], json!({ "cpu": { "cpus": "1" } }));
    let id = "c-cpuset-one";
    let out = env.run(&["create", "--bundle", bundle.path_str(), id]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    assert_eq!(guest_cpus(&env, id, "online"), "0-1");
    assert_eq!(
        guest_file(&env, id, "/sys/fs/cgroup/cpuset.cpus.effective"),
        "1"
    );
    assert_eq!(guest_nproc(&env, id), "1", "its affinity is its cpuset");
    assert!(env.run(&["delete", "--force", id]).status.success());
    env.assert_clean(id);
}
