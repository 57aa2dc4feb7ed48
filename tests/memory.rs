//! Memory a container frees goes back to the host (virtio-balloon free page reporting), on a
//! VM restored from a snapshot, without changing the snapshot.
//!
//! Measured on the host: the resident memory of the container's VMM (the monitor and what
//! it runs, QEMU or the builtin VMM in-process).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use common::{guest_time, text, Env};

const MIB: u64 = 1 << 20;

/// What the container allocates, writes, and frees, and the memory limit its VM is sized
/// from: 200 MiB in a VM made for 640 MiB, or, where the guest kernel may be emulated, 32
/// MiB in a VM of the default size (there every page the guest faults in and zeroes costs
/// emulated kernel code: 200 MiB took over ten minutes).
fn allocation_and_limit_mib() -> (u64, Option<u64>) {
    if common::slow_guest() {
        (32, None)
    } else {
        (200, Some(640))
    }
}

/// Resident memory (VmRSS, bytes) of `pid` and every process below it.
fn tree_rss(pid: u32) -> u64 {
    container::proc::tree(pid as i32)
        .into_iter()
        .filter_map(container::proc::resident_bytes)
        .sum()
}

/// A container running `tests/fixtures/alloc_free.rs`, talked to over its stdin and stdout.
struct AllocFree {
    child: Child,
    stdin: ChildStdin,
    stdout: PathBuf,
    log: PathBuf,
    /// The lines of stdout already answered: each answer is looked for after them (the
    /// program says `allocated` once per `alloc`).
    answered: usize,
    /// Unmounted when the container has ended.
    _bundle: common::Bundle,
}

impl AllocFree {
    fn start(env: &Env, id: &str) -> Self {
        let program = common::fixture_program("alloc_free");
        let size = std::fs::metadata(&program).unwrap().len();
        // The program comes in on stdin (the container runs on the shared busybox image),
        // then the commands follow it.
        let mut bundle = env.bundle(&[
            "sh",
            "-c",
            &format!("head -c {size} > /tmp/alloc_free && chmod +x /tmp/alloc_free && exec /tmp/alloc_free"),
        ]);
        // Room for the allocation beside the guest kernel and the agent.
        if let Some(limit) = allocation_and_limit_mib().1 {
            bundle.edit(|config| {
                config["linux"] =
                    serde_json::json!({ "resources": { "memory": { "limit": limit * MIB } } });
            });
        }
        let stdout = env.root().join(format!("{id}.stdout"));
        // A debug log, shown when the run fails: a restore's phases say where it stopped.
        let log = env.root().join(format!("{id}.log"));
        let mut child = env
            .cmd()
            .args(["--debug", "--log", log.to_str().unwrap()])
            .args(["run", "--bundle", bundle.path_str(), id])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&std::fs::read(&program).unwrap()).unwrap();
        let mut this = AllocFree {
            child,
            stdin,
            stdout,
            log,
            answered: 0,
            _bundle: bundle,
        };
        let started = Instant::now();
        this.wait_line("ready", guest_time(Duration::from_secs(60)));
        eprintln!("{id}: ready after {:.1?}", started.elapsed());
        this
    }

    fn command(&mut self, line: &str, answer: &str, timeout: Duration) {
        let started = Instant::now();
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        self.wait_line(answer, timeout);
        eprintln!("{line}: {answer} after {:.1?}", started.elapsed());
    }

    fn wait_line(&mut self, line: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            if let Some(at) = out.lines().skip(self.answered).position(|l| l == line) {
                self.answered += at + 1;
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the container ended ({status}) before {line:?}: {out}\n{}",
                    log_tail(&self.log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} within {timeout:?}: {out}\n{}",
                log_tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn exit(mut self) {
        writeln!(self.stdin, "exit").unwrap();
        drop(self.stdin);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "run: {status}\n{}", log_tail(&self.log));
    }
}

/// The last lines of a run's debug log.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "debug log ({}):\n{}",
        log.display(),
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// The monitor's pid from `state`.
fn monitor_pid(env: &Env, id: &str) -> u32 {
    env.state(id)["pid"].as_u64().unwrap() as u32
}

/// The memory files of every snapshot in the cache, with their contents' digests.
fn snapshot_memory(cache: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let mut dirs = vec![cache.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "memory") {
                let out = common::output_of(std::process::Command::new("sha256sum").arg(&path));
                files.push((path, text(&out.stdout)));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn memory_a_container_frees_goes_back_to_the_host_and_the_snapshot_stays_as_baked() {
    // A cache of its own, so that the first container bakes; where the guest is slow, the
    // shared one, whose snapshot of a default-sized VM the suites before have baked (a cold
    // boot there takes minutes).
    let (env, _cache) = if common::slow_guest() {
        let Some(env) = Env::new() else { return };
        (env, None)
    } else {
        let Some((env, cache)) = Env::with_fresh_cache() else {
            return;
        };
        (env, Some(cache))
    };
    let (allocation_mib, _) = allocation_and_limit_mib();
    // The first container bakes the snapshot (or restores it); this one is restored from it.
    let warm = AllocFree::start(&env, "c-mem-bake");
    warm.exit();
    let baked = snapshot_memory(&env.cache);
    assert!(!baked.is_empty(), "no snapshot in {}", env.cache.display());

    let mut vm = AllocFree::start(&env, "c-mem");
    let pid = monitor_pid(&env, "c-mem");
    // Idle: after the start's own work has settled (and been reported, which the guest
    // does on a timer of about 2 s).
    std::thread::sleep(Duration::from_secs(5));
    let idle = tree_rss(pid);

    vm.command(
        &format!("alloc {allocation_mib}"),
        "allocated",
        guest_time(Duration::from_secs(60)),
    );
    let peak = tree_rss(pid);
    // The measure sees the guest's memory: otherwise the bound below proves nothing.
    assert!(
        peak >= idle + allocation_mib * 3 / 4 * MIB,
        "idle {} MiB, holding {allocation_mib} MiB {} MiB",
        idle / MIB,
        peak / MIB
    );

    vm.command("free", "freed", guest_time(Duration::from_secs(30)));
    // The guest reports free memory in blocks of 2 MiB and more, about 2 s after it was
    // freed and in several passes.
    let bound = idle + allocation_mib / 2 * MIB;
    let deadline = Instant::now() + guest_time(Duration::from_secs(30));
    let freed = Instant::now();
    let mut after = tree_rss(pid);
    while after >= bound && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = tree_rss(pid);
    }
    eprintln!("given back after {:.1?}", freed.elapsed());
    eprintln!(
        "VMM resident memory: idle {} MiB, holding {allocation_mib} MiB {} MiB, after freeing {} MiB",
        idle / MIB,
        peak / MIB,
        after / MIB
    );
    assert!(
        after < bound,
        "after freeing, the VMM still holds {} MiB (idle {} MiB, peak {} MiB)",
        after / MIB,
        idle / MIB,
        peak / MIB
    );

    // The guest goes on working with its memory given back.
    vm.command(
        &format!("alloc {}", allocation_mib / 2),
        "allocated",
        guest_time(Duration::from_secs(60)),
    );
    vm.command("free", "freed", guest_time(Duration::from_secs(30)));
    vm.exit();
    // A page given back by a restored VM reads back as the snapshot's page: the snapshot's
    // memory file, mapped copy-on-write, was never written (no hole punched in it).
    assert_eq!(snapshot_memory(&env.cache), baked);
    env.assert_clean("c-mem");
}
