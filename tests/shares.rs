//! Bind mounts and volumes with real VMs: the host's files are the container's, live both
//! ways; read-only binds; symlinks resolve in the guest; host changes reach inotify watchers
//! in the container; a restored VM serves them.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{guest_time, text, wait_for, Bundle, Env};

/// A bind of `source` on `destination` (read-only when `readonly`), as docker writes it.
fn bind(bundle: &mut Bundle, source: &Path, destination: &str, readonly: bool) {
    let mut options = vec!["rbind", "rprivate"];
    if readonly {
        options.push("ro");
    }
    bundle.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": destination, "type": "bind", "source": source, "options": options,
        }))
    });
}

#[test]
fn a_bound_directory_is_the_hosts_both_ways() {
    let Some(env) = Env::new() else { return };
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("from-host"), "host wrote this\n").unwrap();
    std::fs::create_dir(data.path().join("sub")).unwrap();
    std::fs::write(data.path().join("sub/deep"), "deep\n").unwrap();
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "cat /data/from-host /data/sub/deep; \
         echo container wrote this > /data/from-container; \
         mkdir /data/made && ln -s from-container /data/made/link && ln /data/from-container /data/hard; \
         chown 1000:1001 /data/from-container; chmod 640 /data/from-container; \
         for i in $(seq 200); do [ -e /data/late ] && break; sleep 0.05; done; cat /data/late",
    ]);
    bind(&mut bundle, data.path(), "/data", false);
    let (mut child, stdout) = env.spawn_run(&bundle, "c-both-ways");
    let written = data.path().join("from-container");
    wait_for(
        "the container's write on the host",
        guest_time(Duration::from_secs(60)),
        || std::fs::read_to_string(&written).is_ok_and(|s| s == "container wrote this\n"),
    );
    std::fs::write(data.path().join("late"), "host wrote later\n").unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(&stdout).unwrap(),
        "host wrote this\ndeep\nhost wrote later\n"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&written).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (1000, 1001, 0o640)
    );
    assert_eq!(
        std::fs::read_link(data.path().join("made/link")).unwrap(),
        Path::new("from-container")
    );
    assert_eq!(meta.nlink(), 2, "the hard link is one on the host");
    env.assert_clean("c-both-ways");
}

#[test]
fn a_read_only_bind_refuses_writes_and_the_host_file_is_untouched() {
    let Some(env) = Env::new() else { return };
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("kept"), "original\n").unwrap();
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "cat /ro/kept; echo changed > /ro/kept && echo wrote; touch /ro/new && echo created; \
         rm /ro/kept && echo removed; echo done",
    ]);
    bind(&mut bundle, data.path(), "/ro", true);
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-ro"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "original\ndone\n");
    assert_eq!(
        std::fs::read_to_string(data.path().join("kept")).unwrap(),
        "original\n"
    );
    assert!(!data.path().join("new").exists());
    env.assert_clean("c-ro");
}

#[test]
fn a_binds_flags_apply_in_the_guest() {
    let Some(env) = Env::new() else { return };
    let data = tempfile::tempdir().unwrap();
    let script = data.path().join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "/exec/run.sh; /noexec/run.sh 2>/dev/null || echo refused; \
         grep -c ' /noexec .*noexec' /proc/mounts",
    ]);
    bind(&mut bundle, data.path(), "/exec", false);
    bundle.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/noexec", "type": "bind", "source": data.path(),
            "options": ["rbind", "rprivate", "noexec", "nosuid"],
        }))
    });
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-flags"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ran\nrefused\n1\n");
    env.assert_clean("c-flags");
}

#[test]
fn xattrs_and_locks_on_a_shared_file_behave_as_on_the_host() {
    let Some(env) = Env::new() else { return };
    let program = common::fixture_program("fsops");
    let data = tempfile::tempdir().unwrap();
    // What a runc bind mount gives: the same program on a host file beside it.
    let beside = data.path().join("on-host");
    std::fs::write(&beside, "x").unwrap();
    let on_host = std::process::Command::new(&program)
        .arg(&beside)
        .output()
        .unwrap();
    assert_eq!(
        text(&on_host.stdout),
        "xattr shared\nflock busy\nflock free\nofd busy\nofd free\n"
    );
    let file = data.path().join("locked");
    std::fs::write(&file, "x").unwrap();
    let mut bundle = env.bundle(&["/fsops", "/data/locked"]);
    bind(&mut bundle, &program, "/fsops", true);
    bind(&mut bundle, data.path(), "/data", false);
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-fsops"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), text(&on_host.stdout));
    // The attribute the container set is the host file's.
    let mut value = [0u8; 16];
    let path = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings and a buffer valid for its length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.supermachine".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(&value[..n.max(0) as usize], b"shared");
    env.assert_clean("c-fsops");
}

#[test]
fn symlinks_in_a_share_resolve_in_the_guest_never_on_the_host() {
    let Some(env) = Env::new() else { return };
    let data = tempfile::tempdir().unwrap();
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("secret"), "host secret\n").unwrap();
    std::os::unix::fs::symlink(secret.path().join("secret"), data.path().join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../..", data.path().join("up")).unwrap();
    // The guest's own root has a /bin/busybox; the host's /etc/hostname is not in it.
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "cat /data/abs 2>/dev/null || echo abs-missing; \
         ls /data/up/bin/busybox",
    ]);
    bind(&mut bundle, data.path(), "/data", false);
    let out = env.run(&["run", "--bundle", bundle.path_str(), "c-links"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("host secret"), "{stdout}");
    assert!(
        stdout.starts_with("abs-missing\n/data/up/bin/busybox\n"),
        "{stdout}"
    );
    env.assert_clean("c-links");
}

#[test]
fn a_file_bind_is_live_and_shows_nothing_next_to_it() {
    let Some(env) = Env::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config");
    std::fs::write(&file, "v1\n").unwrap();
    std::fs::write(dir.path().join("neighbour"), "not shared\n").unwrap();
    // Bigger than what used to be copied into the guest (1 MiB).
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 3 << 20]).unwrap();
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "cat /etc/app.conf; wc -c < /big; ls /etc/neighbour 2>/dev/null; \
         echo appended >> /etc/app.conf; \
         for i in $(seq 200); do grep -q v2 /etc/app.conf && break; sleep 0.05; done; \
         cat /etc/app.conf",
    ]);
    bind(&mut bundle, &file, "/etc/app.conf", false);
    bind(&mut bundle, &big, "/big", true);
    let (mut child, stdout) = env.spawn_run(&bundle, "c-file");
    wait_for(
        "the container's append",
        guest_time(Duration::from_secs(60)),
        || std::fs::read_to_string(&file).is_ok_and(|s| s == "v1\nappended\n"),
    );
    // Rewritten in place, as docker rewrites /etc/hosts and resolv.conf.
    std::fs::write(&file, "v2\n").unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(&stdout).unwrap(),
        format!("v1\n{}\nv2\n", 3 << 20)
    );
    env.assert_clean("c-file");
}

#[test]
fn host_changes_reach_inotify_watchers_in_the_container_once() {
    let Some(env) = Env::new() else { return };
    let watcher = common::fixture_program("watch");
    let data = tempfile::tempdir().unwrap();
    let mut bundle = env.bundle(&["/watch", "/data", "stop"]);
    bind(&mut bundle, &watcher, "/watch", true);
    bind(&mut bundle, data.path(), "/data", false);
    let (mut child, stdout) = env.spawn_run(&bundle, "c-watch");
    let events = || std::fs::read_to_string(&stdout).unwrap_or_default();
    wait_for("the watcher", guest_time(Duration::from_secs(60)), || {
        events().contains("ready")
    });
    let p = |name: &str| data.path().join(name);
    // Each change waits for its event: the order on the host is the order in the guest.
    let step = |what: &str, change: &dyn Fn(), event: &str| {
        let before = Instant::now();
        change();
        wait_for(what, guest_time(Duration::from_secs(10)), || {
            events().lines().any(|l| l.starts_with(event))
        });
        eprintln!("{what}: {:?}", before.elapsed());
    };
    step(
        "create",
        &|| std::fs::write(p("a"), "one\n").unwrap(),
        "CREATE a",
    );
    step(
        "modify",
        &|| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(p("a"))
                .unwrap();
            f.write_all(b"two\n").unwrap();
        },
        // The watcher reads the file at each MODIFY: the new length once the guest's
        // caches were dropped.
        "READ a 8",
    );
    step(
        "attrib",
        &|| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p("a"), std::fs::Permissions::from_mode(0o600)).unwrap()
        },
        "ATTRIB a",
    );
    step(
        "rename",
        &|| std::fs::rename(p("a"), p("b")).unwrap(),
        "MOVED_TO b",
    );
    step(
        "mkdir",
        &|| std::fs::create_dir(p("d")).unwrap(),
        "CREATE d dir",
    );
    step(
        "delete",
        &|| std::fs::remove_file(p("b")).unwrap(),
        "DELETE b",
    );
    std::fs::write(p("stop"), "").unwrap();
    std::fs::remove_file(p("stop")).unwrap();
    assert!(child.wait().unwrap().success());
    let events = events();
    let lines: Vec<&str> = events.lines().collect();
    let from = lines
        .iter()
        .find(|l| l.starts_with("MOVED_FROM a "))
        .unwrap();
    let to = lines.iter().find(|l| l.starts_with("MOVED_TO b ")).unwrap();
    assert_eq!(
        from.rsplit(' ').next(),
        to.rsplit(' ').next(),
        "one cookie pairs the rename: {events}"
    );
    // The container's own file: its kernel reported it, the host does not again.
    assert_eq!(
        lines.iter().filter(|l| **l == "CREATE self-made").count(),
        1,
        "{events}"
    );
    assert!(!events.contains("timeout"), "{events}");
    env.assert_clean("c-watch");
}

#[test]
fn a_restored_vm_serves_volumes() {
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("f"), "shared\n").unwrap();
    let run = |id: &str, with_volume: bool| {
        let mut bundle = env.bundle(&["sh", "-c", "cat /data/f 2>/dev/null || echo none"]);
        if with_volume {
            bind(&mut bundle, data.path(), "/data", false);
        }
        env.run_logged(&bundle, id)
    };
    // The first container bakes the image's snapshot without any volume; the next one,
    // with a volume, restores it: the share is attached after the restore.
    let (first, _) = run("c-bake", false);
    assert_eq!(first, "none\n");
    let (second, log) = run("c-restored", true);
    assert_eq!(second, "shared\n");
    assert!(log.contains("restore phases"), "{log}");
    env.assert_clean("c-restored");
}
