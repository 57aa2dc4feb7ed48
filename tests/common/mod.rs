//! Shared set-up for tests that boot real VMs through the `supermachine` binary.
//!
//! Each test gets its own state root; the disk-image cache and the busybox root filesystem
//! are shared by every test (and test run), so a busybox image is built once.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod skip;
pub use skip::*;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The guest assets, or `None` when they are not built: a failure where prerequisites are
/// required (`make test` and CI), a recorded skip elsewhere (see `skip.rs`).
pub fn assets() -> Option<PathBuf> {
    let dir = std::env::var_os("SUPERMACHINE_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("build/share/supermachine"));
    if dir.join("vmlinux").exists() && dir.join("supermachine-agent").exists() {
        return Some(dir);
    }
    missing_prerequisite(&format!(
        "guest assets missing in {}: run `make guest`",
        dir.display()
    ));
    None
}

/// A busybox root filesystem shared by all tests (read-only for them).
pub fn busybox_rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let dir = workspace().join("target/sm-test/rootfs");
            if !dir.join("bin/busybox").exists() {
                let tmp = workspace().join(format!("target/sm-test/rootfs.{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&tmp);
                let status = Command::new(workspace().join("scripts/busybox-rootfs.sh"))
                    .arg(&tmp)
                    .status()
                    .expect("run busybox-rootfs.sh");
                assert!(status.success(), "busybox-rootfs.sh failed");
                if std::fs::rename(&tmp, &dir).is_err() {
                    // Another test binary made it first.
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            }
            dir
        })
        .clone()
}

/// A copy of [`busybox_rootfs`] at `dest` (made if missing), for a test that writes into
/// its root.
pub fn copy_busybox_to(dest: &Path) {
    std::fs::create_dir_all(dest).expect("mkdir");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", busybox_rootfs().display()))
        .arg(dest)
        .status()
        .expect("cp");
    assert!(copied.success(), "copy busybox to {}", dest.display());
}

/// A program from `tests/fixtures/NAME.rs`, built with `rustc` (a second or so) as a static
/// executable for a container to run; an executable newer than its source is reused (the
/// typical host's tests get them built, having no `rustc`: `tests/fixtures.rs`).
pub fn fixture_program(name: &str) -> PathBuf {
    let source = workspace().join(format!("tests/fixtures/{name}.rs"));
    let out = workspace().join(format!("target/sm-test/{name}"));
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    match (modified(&out), modified(&source)) {
        (Some(built), Some(written)) if built >= written => return out,
        (Some(_), None) => return out,
        _ => {}
    }
    let tmp = workspace().join(format!("target/sm-test/{name}.{}", std::process::id()));
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            // A quarter of the size: a container reads it in through its stdin or share.
            "-C",
            "strip=symbols",
            "-o",
        ])
        .arg(&tmp)
        .arg(&source)
        .status()
        .expect("run rustc");
    assert!(status.success(), "rustc {} failed", source.display());
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// How long to allow for `d` of guest work. With `SUPERMACHINE_ENGINE=builtin` the guest
/// may run on a KVM that emulates guest kernel code (one `exec` in the guest takes seconds
/// there), so deadlines are ten times longer; a test still ends as soon as it sees what it
/// waits for.
pub fn guest_time(d: Duration) -> Duration {
    if slow_guest() {
        d * 10
    } else {
        d
    }
}

/// Whether this run may be on a KVM that emulates guest kernel code (see [`guest_time`]):
/// tests that make the guest kernel do much work (fault in and zero hundreds of MiB) do
/// less of it there.
pub fn slow_guest() -> bool {
    std::env::var("SUPERMACHINE_ENGINE").is_ok_and(|e| e == "builtin")
}

/// One test's runtime: its own state root.
pub struct Env {
    pub state: tempfile::TempDir,
    pub assets: PathBuf,
    pub cache: PathBuf,
}

impl Env {
    pub fn new() -> Option<Self> {
        Self::with_cache(workspace().join("target/sm-test/cache"))
    }

    /// An environment with a fresh cache of its own (its first container bakes), and the
    /// cache directory's guard, which must outlive it.
    pub fn with_fresh_cache() -> Option<(Self, tempfile::TempDir)> {
        let cache = tempfile::Builder::new()
            .prefix("sm-cache-")
            .tempdir()
            .expect("tempdir");
        let env = Self::with_cache(cache.path().to_path_buf())?;
        Some((env, cache))
    }

    /// An environment with its own cache directory (for tests that count cache entries).
    pub fn with_cache(cache: PathBuf) -> Option<Self> {
        let assets = assets()?;
        Some(Env {
            state: tempfile::Builder::new()
                .prefix("sm-state-")
                .tempdir()
                .expect("tempdir"),
            assets,
            cache,
        })
    }

    pub fn root(&self) -> &Path {
        self.state.path()
    }

    /// `supermachine --root <state>` with this test's environment.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_supermachine"));
        cmd.arg("--root").arg(self.root());
        cmd.env("SUPERMACHINE_ASSETS_DIR", &self.assets);
        cmd.env("SUPERMACHINE_CACHE_DIR", &self.cache);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a verb to its exit. Output goes through files, not pipes: `create` hands its
    /// stdio to the container's monitor, so its pipes would stay open long after it exits.
    pub fn run(&self, args: &[&str]) -> Output {
        output_of(self.cmd().args(args))
    }

    /// Runs `bundle` to its end as `id` with `--debug`; its stdout and the debug log. A
    /// failed run fails the test.
    pub fn run_logged(&self, bundle: &Bundle, id: &str) -> (String, String) {
        let (out, log) = self.run_with_log(bundle, id);
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        (text(&out.stdout), log)
    }

    /// `run` of `bundle` as `id` with a debug log, whatever its exit: its output and the log.
    pub fn run_with_log(&self, bundle: &Bundle, id: &str) -> (std::process::Output, String) {
        let log = self.root().join(format!("{id}.log"));
        let out = self.run(&[
            "--debug",
            "--log",
            log.to_str().unwrap(),
            "run",
            "--bundle",
            bundle.path_str(),
            id,
        ]);
        (out, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// Starts `run` of `bundle` as `id` in the background, its stdout in a file.
    pub fn spawn_run(&self, bundle: &Bundle, id: &str) -> (std::process::Child, PathBuf) {
        let stdout = self.root().join(format!("{id}.stdout"));
        let child = self
            .cmd()
            .args(["run", "--bundle", bundle.path_str(), id])
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn run");
        (child, stdout)
    }

    pub fn bundle(&self, args: &[&str]) -> Bundle {
        Bundle::new(args)
    }

    pub fn state(&self, id: &str) -> Value {
        let out = self.run(&["state", id]);
        assert!(out.status.success(), "state {id}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("state JSON")
    }

    /// Polls `state` until the status is `want`.
    pub fn wait_status(&self, id: &str, want: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(id);
            if state["status"] == want {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never became {want}: {state}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Host processes whose command line mentions this test's state root (monitors, VMMs).
    pub fn processes(&self) -> Vec<String> {
        processes_mentioning(self.root())
    }

    /// Asserts nothing of a container is left: no state dir, no process.
    pub fn assert_clean(&self, id: &str) {
        assert!(
            !self.root().join(id).exists(),
            "state dir of {id} left behind"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "processes left behind: {left:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Best-effort cleanup of anything a failed test left running.
        for id in std::fs::read_dir(self.root())
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = self
                .cmd()
                .args(["delete", "--force"])
                .arg(id.file_name())
                .output();
        }
    }
}

/// The processes of a container's VM: the monitor's children (an external VMM), or the
/// monitor itself where the VMM runs inside it (builtin engine).
pub fn vm_processes(monitor: i32) -> Vec<i32> {
    let children: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent is the second field after the command's closing parenthesis.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                == Some(monitor)
        })
        .collect();
    if children.is_empty() {
        vec![monitor]
    } else {
        children
    }
}

/// Waits until `check` holds, for at most `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like `Command::output`, but waits for the process rather than for EOF on its output.
pub fn output_of(cmd: &mut Command) -> Output {
    let out = tempfile::tempfile().expect("tempfile");
    let err = tempfile::tempfile().expect("tempfile");
    let status = cmd
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .status()
        .expect("run supermachine");
    let read = |mut f: std::fs::File| {
        use std::io::{Read, Seek};
        let mut bytes = Vec::new();
        f.rewind().expect("rewind");
        f.read_to_end(&mut bytes).expect("read output");
        bytes
    };
    Output {
        status,
        stdout: read(out),
        stderr: read(err),
    }
}

/// `bundle`'s config run to its end under runc, where runc is installed (`None` without
/// it): its output, for a test to set beside supermachine's. See [`runc`].
pub fn run_under_runc(bundle: &Bundle) -> Option<Output> {
    let mut runc = runc(bundle)?;
    runc.command.arg(&runc.id);
    Some(output_of(&mut runc.command))
}

/// `runc run` of `bundle`'s config, where runc is installed (`None` without it): the
/// command up to its options, which a test adds before the container's `id`. The root is a
/// fresh copy of busybox (runc writes into it) and the container has the mount and UTS
/// namespaces runc needs for a root and a hostname.
pub struct Runc {
    pub command: Command,
    pub id: String,
    /// The bundle and runc's state, removed when the run is dropped.
    _dirs: [tempfile::TempDir; 2],
}

pub fn runc(bundle: &Bundle) -> Option<Runc> {
    let found = output_of(Command::new("sh").args(["-c", "command -v runc"]));
    if !found.status.success() {
        skip::missing_prerequisite("runc is not installed: nothing to compare with");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    copy_busybox_to(&rootfs);
    let mut config = bundle.config.clone();
    config["root"] = json!({ "path": rootfs, "readonly": false });
    // runc cannot give what it has not got (a sandboxed host may lack some capabilities),
    // while the VM's agent has them all.
    let ours = host_bounding_set();
    if let Some(sets) = config["process"]["capabilities"].as_object_mut() {
        for set in sets.values_mut().filter_map(Value::as_array_mut) {
            set.retain(|name| {
                let bit = agent_proto::CAPABILITY_NAMES
                    .iter()
                    .position(|n| Some(*n) == name.as_str());
                bit.map_or(true, |bit| ours & (1 << bit) != 0)
            });
        }
    }
    let linux = &mut config["linux"];
    if !linux.is_object() {
        *linux = json!({});
    }
    let mut namespaces = linux["namespaces"].as_array().cloned().unwrap_or_default();
    // A VM is the container's own host: its hostname is its own without a UTS namespace.
    for needed in ["mount", "uts"] {
        if !namespaces.iter().any(|n| n["type"] == needed) {
            namespaces.push(json!({ "type": needed }));
        }
    }
    linux["namespaces"] = Value::Array(namespaces);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .expect("write runc's config.json");
    let state = tempfile::tempdir().expect("tempdir");
    // runc's default cgroup is named after the id: tests running side by side in this
    // process need ids (and so cgroups) of their own.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut command = Command::new("runc");
    command
        .arg("--root")
        .arg(state.path())
        .args(["run", "--bundle"])
        .arg(dir.path());
    Some(Runc {
        command,
        id: format!("sm-runc-{}-{run}", std::process::id()),
        _dirs: [dir, state],
    })
}

/// `cmd` under systemd's socket activation of `count` descriptors: `LISTEN_PID` names the
/// process that `cmd` becomes (the shell execs it).
pub fn socket_activated(cmd: &Command, count: usize) -> Command {
    let mut activated = Command::new("sh");
    activated
        .args([
            "-c",
            &format!("LISTEN_PID=$$ LISTEN_FDS={count} exec \"$@\""),
            "sh",
        ])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => activated.env(key, value),
            None => activated.env_remove(key),
        };
    }
    activated
}

/// Makes `fds` the command's descriptors 3, 4, … (open across its `exec`), as a caller of
/// `--preserve-fds` or systemd's socket activation hands them over. The command keeps them
/// open until it is dropped.
pub fn pass_fds(cmd: &mut Command, fds: Vec<std::os::fd::OwnedFd>) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let floor = 3 + raw.len() as i32;
    let mut moved = vec![0; raw.len()];
    // SAFETY: between fork and exec only fcntl and dup2 run, on descriptors the child has,
    // writing into a vector allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let _kept = &fds;
            // Above every target first, so that no target overwrites a source.
            for (slot, &fd) in moved.iter_mut().zip(&raw) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, &fd) in (3..).zip(&moved) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// This process's capability bounding set.
fn host_bounding_set() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("CapBnd in /proc/self/status")
}

pub fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if cmdline.contains(&needle) && !zombie {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An OCI bundle. Its root is the shared busybox rootfs under a writable layer of its own,
/// an overlay as docker and containerd mount one ([`Bundle::new`]), or a plain directory of
/// its own ([`Bundle::with_directory_root`]).
pub struct Bundle {
    /// Unmounted before `dir` is removed (fields drop in order).
    overlay: Option<OverlayRoot>,
    pub dir: tempfile::TempDir,
    pub config: Value,
}

/// The overlay mounted at a bundle's `rootfs`: busybox below, `layer/upper` above.
struct OverlayRoot(PathBuf);

impl Drop for OverlayRoot {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

impl Bundle {
    pub fn new(args: &[&str]) -> Self {
        Self::with_lower(args, &busybox_rootfs())
    }

    /// A bundle whose root is an overlay of `lower` (an image of the test's own) under a
    /// writable layer of its own.
    pub fn with_lower(args: &[&str], lower: &Path) -> Self {
        let mut bundle = Self::with_root(args);
        let rootfs = bundle.path().join("rootfs");
        let layer = bundle.path().join("layer");
        for dir in [&rootfs, &layer.join("upper"), &layer.join("work")] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        let options = format!(
            "lowerdir={},upperdir={}/upper,workdir={}/work",
            lower.display(),
            layer.display(),
            layer.display()
        );
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&rootfs)
            .status()
            .expect("mount");
        assert!(status.success(), "mount the bundle's overlay root");
        bundle.overlay = Some(OverlayRoot(rootfs));
        bundle
    }

    /// A bundle whose root is a plain directory, a copy of busybox (as `runc spec` leaves
    /// one): the container's writes land in it.
    pub fn with_directory_root(args: &[&str]) -> Self {
        let bundle = Self::with_root(args);
        copy_busybox_to(&bundle.rootfs());
        bundle
    }

    /// The host directory of the bundle's writable layer (an overlay root's upper one).
    pub fn upper_layer(&self) -> PathBuf {
        self.path().join("layer/upper")
    }

    /// The bundle's root on the host.
    pub fn rootfs(&self) -> PathBuf {
        self.path().join("rootfs")
    }

    /// The bundle with `root.path` "rootfs", not yet made.
    ///
    /// Its process has every capability (as `docker run --privileged`): what a test does in
    /// the container is then not refused for want of one, and a test of capabilities sets
    /// its own. (Without a `capabilities` object a process has none, under runc and here.)
    fn with_root(args: &[&str]) -> Self {
        let all = agent_proto::CAPABILITY_NAMES.to_vec();
        let config = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": { "uid": 0, "gid": 0 },
                "args": args,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
                "cwd": "/",
                "capabilities": {
                    "bounding": all, "effective": all, "permitted": all
                }
            },
            "root": { "path": "rootfs" },
            "hostname": "testvm",
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"] },
                { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
                { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }
            ]
        });
        let bundle = Bundle {
            overlay: None,
            dir: tempfile::Builder::new()
                .prefix("sm-bundle-")
                .tempdir()
                .expect("tempdir"),
            config,
        };
        bundle.write();
        bundle
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 temp path")
    }

    pub fn write(&self) {
        std::fs::write(
            self.path().join("config.json"),
            serde_json::to_vec_pretty(&self.config).unwrap(),
        )
        .expect("write config.json");
    }

    /// Changes config.json (then rewrites it).
    pub fn edit(&mut self, f: impl FnOnce(&mut Value)) -> &mut Self {
        f(&mut self.config);
        self.write();
        self
    }
}

/// A `--console-socket` listener, as containerd's shim makes one.
pub struct ConsoleSocket {
    pub dir: tempfile::TempDir,
    pub listener: UnixListener,
}

impl ConsoleSocket {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = UnixListener::bind(dir.path().join("console.sock")).expect("bind");
        ConsoleSocket { dir, listener }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("console.sock")
    }
}
