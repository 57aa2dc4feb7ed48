//! The snapshot cache with real VMs: bake once, restore after; identity of restored VMs;
//! corrupt entries; concurrent creates; eviction; the free-space floor.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{text, Bundle, Env};

fn cache_entries(env: &Env) -> Vec<serde_json::Value> {
    let out = env.run(&["cache", "ls", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

/// Runs a container to its end with --debug; returns (stdout, debug log).
fn run_logged(
    env: &Env,
    id: &str,
    args: &[&str],
    edit: impl FnOnce(&mut serde_json::Value),
) -> (String, String) {
    let mut bundle = env.bundle(args);
    bundle.edit(edit);
    env.run_logged(&bundle, id)
}

const IDENTITY: &[&str] = &["sh", "-c", "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"];

#[test]
fn the_second_container_restores_and_restored_vms_do_not_share_randomness() {
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    let (first, log) = run_logged(&env, "s1", IDENTITY, |_| {});
    assert!(log.contains("baked snapshot"), "{log}");
    let entries = cache_entries(&env);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["hits"], 0);

    let (second, log) = run_logged(&env, "s2", IDENTITY, |_| {});
    assert!(log.contains("restore phases"), "{log}");
    for phase in [
        "validate",
        "memory map",
        "device state",
        "agent reconnect",
        "guest clock",
        "guest entropy",
        "container setup",
        "process create",
    ] {
        assert!(
            log.contains(phase),
            "restore phase {phase} not logged: {log}"
        );
    }
    let (third, _) = run_logged(&env, "s3", IDENTITY, |_| {});
    assert_eq!(cache_entries(&env)[0]["hits"], 2);

    // Both restores' latencies, phase by phase, the whole first.
    let out = env.run(&["cache", "stats", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0]["key"], cache_entries(&env)[0]["key"]);
    assert_eq!(stats[0]["restores"], 2, "{stats:?}");
    let phases = stats[0]["phases"].as_array().unwrap();
    assert_eq!(phases[0]["phase"], "created", "{phases:?}");
    let millis = |phase: &serde_json::Value, at: &str| phase[at].as_f64().unwrap();
    assert!(millis(&phases[0], "p50") > 0.0, "{phases:?}");
    assert!(
        millis(&phases[0], "p50") <= millis(&phases[0], "p95"),
        "{phases:?}"
    );
    for phase in ["validate", "agent reconnect", "process create"] {
        let found = phases.iter().find(|p| p["phase"] == phase);
        let found = found.unwrap_or_else(|| panic!("{phase} not in {phases:?}"));
        assert_eq!(found["count"], 2, "{phase}");
        assert!(
            millis(found, "p95") <= millis(&phases[0], "p95"),
            "{phases:?}"
        );
    }
    let table = env.run(&["cache", "stats"]);
    assert!(
        text(&table.stdout).contains("process create"),
        "{}",
        text(&table.stdout)
    );

    let lines = |s: &str| s.lines().map(String::from).collect::<Vec<_>>();
    let (a, b, c) = (lines(&first), lines(&second), lines(&third));
    // One boot, baked once: the restored VMs share the boot id of the VM that was baked…
    assert_eq!(a[0], b[0]);
    assert_eq!(b[0], c[0]);
    // …but each was given fresh entropy before anything ran.
    assert_ne!(b[1], c[1], "two restored VMs read the same random bytes");
    assert_ne!(a[1], b[1]);
    assert_eq!(b[1].len(), 32);
}

#[test]
fn a_file_written_in_one_restored_container_is_not_in_another() {
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    run_logged(&env, "w0", &["true"], |_| {}); // bake
    let writer = env.bundle(&[
        "sh",
        "-c",
        "echo secret > /tmp/x; echo written; exec sleep 1000",
    ]);
    let out_file = env.root().join("writer.out");
    let status = env
        .cmd()
        .args(["run", "--detach", "--bundle", writer.path_str(), "w1"])
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&out_file)
        .unwrap()
        .contains("written")
    {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        text(&env.run(&["exec", "w1", "cat", "/tmp/x"]).stdout),
        "secret\n"
    );
    let (out, log) = run_logged(
        &env,
        "w2",
        &["sh", "-c", "cat /tmp/x 2>&1; ls /tmp | wc -l"],
        |_| {},
    );
    assert!(log.contains("restore phases"), "{log}");
    assert_eq!(
        out,
        "cat: can't open '/tmp/x': No such file or directory\n0\n"
    );
    assert!(env.run(&["delete", "--force", "w1"]).status.success());
}

#[test]
fn a_corrupt_or_truncated_snapshot_is_rebaked_not_used() {
    let Some((env, cache)) = Env::with_fresh_cache() else {
        return;
    };
    run_logged(&env, "c0", &["true"], |_| {});
    let key = cache_entries(&env)[0]["key"].as_str().unwrap().to_string();
    let entry = cache.path().join("snapshots").join(&key);

    // One flipped byte in the device state.
    let mut state = std::fs::read(entry.join("state")).unwrap();
    let middle = state.len() / 2;
    state[middle] ^= 0x01;
    std::fs::write(entry.join("state"), &state).unwrap();
    let (out, log) = run_logged(&env, "c1", &["echo", "still works"], |_| {});
    assert_eq!(out, "still works\n");
    assert!(log.contains("unusable") && log.contains("CRC"), "{log}");
    assert!(log.contains("baked snapshot"), "not rebaked: {log}");
    assert_eq!(cache_entries(&env)[0]["hits"], 0);

    // A truncated memory file.
    std::fs::OpenOptions::new()
        .write(true)
        .open(entry.join("memory"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let (out, log) = run_logged(&env, "c2", &["echo", "still works"], |_| {});
    assert_eq!(out, "still works\n");
    assert!(
        log.contains("unusable") && log.contains("baked snapshot"),
        "{log}"
    );
    let (_, log) = run_logged(&env, "c3", &["true"], |_| {});
    assert!(
        log.contains("restore phases"),
        "the rebaked snapshot is not used: {log}"
    );
}

#[test]
fn eight_parallel_creates_of_a_new_image_bake_once() {
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    let bundle = env.bundle(&["true"]);
    let log = env.root().join("parallel.log");
    let children: Vec<_> = (0..8)
        .map(|i| {
            env.cmd()
                .args([
                    "--debug",
                    "--log",
                    log.to_str().unwrap(),
                    "create",
                    "--bundle",
                    bundle.path_str(),
                ])
                .arg(format!("p{i}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    let baked = log_text.matches("(baked snapshot").count();
    let restored = log_text.matches("restore phases").count();
    assert_eq!(baked, 1, "{log_text}");
    assert_eq!(
        baked + restored,
        8,
        "the others waited for the bake and restored: {log_text}"
    );
    assert_eq!(cache_entries(&env).len(), 1);
    for i in 0..8 {
        assert!(env
            .run(&["delete", "--force", &format!("p{i}")])
            .status
            .success());
    }
}

#[test]
fn a_full_cache_evicts_the_least_recently_used_snapshot() {
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    let image = |name: &'static str| {
        move |c: &mut serde_json::Value| {
            c["annotations"] = serde_json::json!({ "run.supermachine.image": name });
        }
    };
    run_logged(&env, "e1", &["true"], image("image-a"));
    let one = cache_entries(&env)[0]["size"].as_u64().unwrap();
    run_logged(&env, "e2", &["true"], image("image-b"));
    run_logged(&env, "e3", &["true"], image("image-a")); // a is now the more recent
    assert_eq!(cache_entries(&env).len(), 2);
    // Room for two entries, not three: baking c evicts b, the least recently used.
    let limit = format!("{}", one * 5 / 2);
    let mut bundle = env.bundle(&["true"]);
    bundle.edit(image("image-c"));
    let out = env
        .cmd()
        .env("SUPERMACHINE_CACHE_MAX_SIZE", &limit)
        .args(["run", "--bundle", bundle.path_str(), "e4"])
        .status()
        .unwrap();
    assert!(out.success());
    let descriptions: Vec<String> = cache_entries(&env)
        .iter()
        .map(|e| e["description"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(descriptions.len(), 2, "{descriptions:?}");
    assert!(
        !descriptions
            .iter()
            .any(|d| d.contains(&image_key("image-b"))),
        "b was not evicted: {descriptions:?}"
    );

    // `cache rm` and `cache prune` by hand.
    let key = cache_entries(&env)[0]["key"].as_str().unwrap().to_string();
    assert!(env.run(&["cache", "rm", &key]).status.success());
    assert_eq!(cache_entries(&env).len(), 1);
    assert!(env
        .run(&["cache", "prune", "--max-size", "0"])
        .status
        .success());
    assert!(cache_entries(&env).is_empty());
    assert!(!env.run(&["cache", "rm", "../../etc"]).status.success());
}

/// The image key an annotation gives a test bundle's root (as `cache ls` describes it).
fn image_key(annotation: &str) -> String {
    let bundle = Bundle::new(&["true"]);
    let mut annotations = std::collections::HashMap::new();
    annotations.insert("run.supermachine.image".to_string(), annotation.to_string());
    image::ImageKey::for_rootfs(&bundle.rootfs(), &annotations)
        .unwrap()
        .to_string()
}

#[test]
fn the_cache_is_readable_by_its_owner_only() {
    let Some((env, cache)) = Env::with_fresh_cache() else {
        return;
    };
    run_logged(&env, "private", &["true"], |_| {});
    // Each directory the runtime made in the cache (disk images, initramfs, snapshots of
    // guest memory) is its owner's only.
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(cache.path()).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            use std::os::unix::fs::PermissionsExt;
            dirs.push((entry.file_name(), meta.permissions().mode() & 0o777));
        }
    }
    assert!(!dirs.is_empty(), "nothing made in the cache");
    for (name, mode) in dirs {
        assert_eq!(mode, 0o700, "{name:?} is {mode:o}");
    }
}

#[test]
fn a_bundle_claiming_another_images_annotation_gets_its_own_image() {
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    let claim = |c: &mut serde_json::Value| {
        c["annotations"] = serde_json::json!({ "run.supermachine.image": "claimed" });
    };
    const MARKER: &[&str] = &["sh", "-c", "cat /marker 2>/dev/null || echo none"];
    // The image the annotation first came with, baked.
    assert_eq!(run_logged(&env, "claim-a", MARKER, claim).0, "none\n");
    // Another image (busybox with a marker file) under the same annotation.
    let other = tempfile::tempdir().unwrap();
    common::copy_busybox_to(other.path());
    std::fs::write(other.path().join("marker"), "the other image\n").unwrap();
    let mut bundle = Bundle::with_lower(MARKER, other.path());
    bundle.edit(claim);
    let (out, _) = env.run_logged(&bundle, "claim-b");
    assert_eq!(out, "the other image\n");
    assert_eq!(cache_entries(&env).len(), 2, "one snapshot per image");
}

#[test]
fn no_bake_below_the_free_space_floor_and_opt_outs_are_honoured() {
    let Some((env, cache)) = Env::with_fresh_cache() else {
        return;
    };
    // A small tmpfs as the cache: 48 MiB, with a floor above what it can ever have free.
    let mount = cache.path();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(mount)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount);
    let bundle = env.bundle(&["echo", "cold"]);
    let log = env.root().join("floor.log");
    let out = common::output_of(env.cmd().env("SUPERMACHINE_CACHE_MIN_FREE", "64M").args([
        "--debug",
        "--log",
        log.to_str().unwrap(),
        "run",
        "--bundle",
        bundle.path_str(),
        "f1",
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "cold\n");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("below the floor"), "{log_text}");
    assert!(cache_entries(&env).is_empty());

    // With room, the annotation and the runtime option still keep a container out.
    let (_, log) = run_logged(&env, "f2", &["true"], |c| {
        c["annotations"] = serde_json::json!({ "run.supermachine.snapshot": "false" });
    });
    assert!(
        !log.contains("baked snapshot") && !log.contains("restore phases"),
        "{log}"
    );
    let out = env.run(&[
        "--snapshots",
        "off",
        "run",
        "--bundle",
        bundle.path_str(),
        "f3",
    ]);
    assert!(out.status.success());
    assert!(cache_entries(&env).is_empty());
}

#[test]
fn the_bundled_qemu_is_preferred_and_a_snapshot_belongs_to_the_qemu_that_baked_it() {
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    if std::env::var("SUPERMACHINE_ENGINE").is_ok_and(|e| e == "builtin")
        || std::env::var_os("SUPERMACHINE_QEMU").is_some()
    {
        common::skip("the engine or its QEMU is set by the environment");
        return;
    }
    // `make guest` builds it and `make deps` installs Debian's: both are prerequisites.
    let bundled = env
        .assets
        .canonicalize()
        .unwrap()
        .join(engine::qemu::BINARY_NAME);
    if !bundled.exists() {
        common::missing_prerequisite(&format!("{} missing: run `make guest`", bundled.display()));
        return;
    }
    if engine::probe::which(engine::qemu::BINARY_NAME).is_none() {
        common::missing_prerequisite(&format!(
            "no {} on PATH: run `make deps`",
            engine::qemu::BINARY_NAME
        ));
        return;
    }
    let run = |id: &str, qemu: Option<&str>| {
        let bundle = env.bundle(&["echo", "ran"]);
        let log = env.root().join(format!("{id}.log"));
        let mut cmd = env.cmd();
        if let Some(qemu) = qemu {
            cmd.env("SUPERMACHINE_QEMU", qemu);
        }
        let out = common::output_of(cmd.args([
            "--debug",
            "--log",
            log.to_str().unwrap(),
            "--engine",
            "qemu",
            "run",
            "--bundle",
            bundle.path_str(),
            id,
        ]));
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "ran\n");
        std::fs::read_to_string(&log).unwrap()
    };
    let engine_line = |log: &str| {
        log.lines()
            .find(|l| l.contains("engine qemu"))
            .unwrap_or_default()
            .to_string()
    };

    // The assets' QEMU, unless the user names one, with the firmware shipped beside it
    // (a host without Debian's QEMU data has no other).
    let log = run("b1", None);
    assert!(
        engine_line(&log).contains(bundled.to_str().unwrap()),
        "{log}"
    );
    let started = log
        .lines()
        .find(|l| l.contains("starting ") && l.contains(engine::qemu::BINARY_NAME))
        .unwrap_or_default();
    let firmware = started
        .split_once("-bios ")
        .map(|(_, rest)| rest.split([' ', '"']).next().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        firmware.ends_with(engine::qemu::FIRMWARE_NAME) && !firmware.starts_with("/usr/share"),
        "firmware {firmware:?} in {started}"
    );
    assert!(log.contains("baked snapshot"), "{log}");
    // The distribution's QEMU does not restore what another QEMU baked: its own bake, then
    // its own restores.
    let log = run("d1", Some("qemu-system-x86_64"));
    assert!(
        engine_line(&log).contains("qemu-system-x86_64, accel"),
        "{log}"
    );
    assert!(log.contains("baked snapshot"), "{log}");
    let log = run("d2", Some("qemu-system-x86_64"));
    assert!(log.contains("restore phases"), "{log}");
    let log = run("b2", None);
    assert!(log.contains("restore phases"), "{log}");
    let entries = cache_entries(&env);
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(entries.iter().all(|e| e["hits"] == 1), "{entries:?}");
}

/// The VMM process a container's monitor started.
fn vmm_of(monitor: i64) -> Option<i64> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i64 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (comm, rest) = stat.split_once(") ")?;
            let ppid: i64 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == monitor && comm.contains("qemu-system")).then_some(pid)
        })
}

/// KiB resident in a process's anonymous executable mappings: QEMU's translated code.
fn translated_code_kib(pid: i64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_code = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            in_code = fields.get(1).is_some_and(|p| p.contains('x')) && fields.len() == 5;
        } else if in_code && fields.first() == Some(&"Rss:") {
            kib += fields[1].parse::<u64>().unwrap();
        }
    }
    kib
}

#[test]
fn an_idle_restored_vm_gives_back_its_translated_code_and_still_runs() {
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    run_logged(&env, "t0", &["true"], |_| {}); // bake
    let bundle = env.bundle(&["sleep", "1000"]);
    let log = env.root().join("t1.log");
    let out = env.run(&[
        "--debug",
        "--log",
        log.to_str().unwrap(),
        "run",
        "--detach",
        "--bundle",
        bundle.path_str(),
        "t1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(read_log().contains("restore phases"), "{}", read_log());
    if !read_log().contains("engine qemu-tcg") {
        common::skip("only QEMU's TCG keeps translated code");
        assert!(env.run(&["delete", "--force", "t1"]).status.success());
        return;
    }
    let monitor = env.state("t1")["pid"].as_i64().unwrap();
    let vmm = vmm_of(monitor).expect("the container's QEMU");
    // A restore and a container start translate ~10 MiB of code; once the guest idles
    // (in `sleep`), the runtime has QEMU drop it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !read_log().contains("trimming") {
        assert!(
            std::time::Instant::now() < deadline,
            "never trimmed: {}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let kib = translated_code_kib(vmm);
    assert!(
        kib < 4096,
        "{kib} KiB of translated code resident after the trim"
    );
    // What runs next is translated again.
    let out = env.run(&["exec", "t1", "sh", "-c", "echo still running"]);
    assert_eq!(
        text(&out.stdout),
        "still running\n",
        "{}",
        text(&out.stderr)
    );
    assert!(env.run(&["delete", "--force", "t1"]).status.success());
    env.assert_clean("t1");
}
