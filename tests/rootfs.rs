//! The container's own root filesystem lives on the host, as under runc: with real VMs, a
//! bundle whose root is an overlay (as docker and containerd mount one) gets its process's
//! writes, renames and deletions in the overlay's upper directory, in the overlay's own
//! format; a plain directory root gets them in the directory; files put into the root on
//! the host, before the start or while it runs, are the container's.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{guest_time, text, wait_for, Bundle, Env};

/// What a container does to its root: a new file and directory, a changed image file, an
/// image file renamed, an image file and an image directory removed.
const CHANGES: &str =
    "echo new > /new-file; mkdir -p /app/data; echo state > /app/data/state.json; \
     echo changed >> /etc/motd; mv /etc/group /etc/group.moved; rm /bin/true; rm -r /home";

/// Every entry under `dir`: its path, and its kind with what matters of it (a file's
/// content, a character device's numbers).
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let kind = meta.file_type();
            let what = if kind.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if kind.is_char_device() {
                format!("char {}", meta.rdev())
            } else if kind.is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.len() > 256 {
                format!("file of {} bytes", meta.len())
            } else {
                format!("file {}", text(&std::fs::read(&path).unwrap()).trim_end())
            };
            let relative = path.strip_prefix(dir).unwrap().display().to_string();
            out.insert(relative, what);
        }
    }
    out
}

/// The opaque mark overlayfs puts on a directory that hides the lower layers' one.
fn opaque(dir: &Path) -> bool {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let mut value = [0u8; 8];
    // SAFETY: both strings are NUL-terminated and `value` is writable for its length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

#[test]
fn an_overlay_roots_writes_are_its_upper_layer_in_the_overlays_format() {
    let Some(env) = Env::new() else { return };
    let bundle = env.bundle(&["sh", "-c", CHANGES]);
    // Put there before the start, as `docker cp` into a created container does.
    std::fs::write(bundle.rootfs().join("before-start"), "copied in\n").unwrap();
    let (_, log) = env.run_logged(&bundle, "layered");
    assert!(log.contains("root overlay at"), "{log}");

    let upper = tree(&bundle.upper_layer());
    let expected: BTreeMap<String, String> = [
        ("before-start", "file copied in"),
        ("new-file", "file new"),
        ("app", "dir"),
        ("app/data", "dir"),
        ("app/data/state.json", "file state"),
        ("etc", "dir"),
        ("etc/group", "char 0"),
        ("etc/group.moved", ""),
        ("etc/motd", ""),
        ("bin", "dir"),
        ("bin/true", "char 0"),
        ("home", "char 0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        upper.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the upper layer holds exactly the container's changes: {upper:#?}"
    );
    for (path, what) in &expected {
        if !what.is_empty() {
            assert_eq!(&upper[path], what, "{path}");
        }
    }
    let image_motd = std::fs::read_to_string(common::busybox_rootfs().join("etc/motd")).unwrap();
    assert_eq!(
        std::fs::read_to_string(bundle.upper_layer().join("etc/motd")).unwrap(),
        format!("{image_motd}changed\n")
    );
    // The host's overlay shows them as the container saw them.
    let root = bundle.rootfs();
    assert!(!root.join("bin/true").exists() && !root.join("home").exists());
    assert!(root.join("etc/group.moved").exists() && !root.join("etc/group").exists());

    // A second run of the bundle finds them.
    let mut again = bundle;
    again.edit(|c| {
        c["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "cat /new-file /app/data/state.json /before-start; ls /etc; \
             test -e /bin/true || echo no-true; test -e /home || echo no-home; \
             mkdir /home && echo again > /home/file"
        ])
    });
    let (out, _) = env.run_logged(&again, "layered-again");
    assert_eq!(
        out,
        "new\nstate\ncopied in\ngroup.moved\nmotd\npasswd\nno-true\nno-home\n"
    );
    // A directory made where the image's was removed hides the image's: opaque.
    assert!(opaque(&again.upper_layer().join("home")));
    assert_eq!(
        tree(&again.upper_layer().join("home")),
        BTreeMap::from([("file".to_string(), "file again".to_string())])
    );
    env.assert_clean("layered-again");
}

#[test]
fn a_directory_roots_writes_are_the_directory() {
    let Some(env) = Env::new() else { return };
    let bundle = Bundle::with_directory_root(&["sh", "-c", CHANGES]);
    std::fs::write(bundle.rootfs().join("before-start"), "copied in\n").unwrap();
    let before = tree(&bundle.rootfs());
    env.run_logged(&bundle, "directory");
    let after = tree(&bundle.rootfs());
    let mut expected = before.clone();
    expected.retain(|path, _| {
        !["etc/group", "bin/true"].contains(&path.as_str()) && !path.starts_with("home")
    });
    expected.insert("etc/group.moved".into(), before["etc/group"].clone());
    expected.insert("new-file".into(), "file new".into());
    expected.insert("app".into(), "dir".into());
    expected.insert("app/data".into(), "dir".into());
    expected.insert("app/data/state.json".into(), "file state".into());
    expected.insert(
        "etc/motd".into(),
        format!("{}\nchanged", before["etc/motd"]),
    );
    assert_eq!(after, expected);

    let mut again = bundle;
    again.edit(|c| c["process"]["args"] = serde_json::json!(["cat", "/new-file", "/before-start"]));
    let (out, _) = env.run_logged(&again, "directory-again");
    assert_eq!(out, "new\ncopied in\n");
    env.assert_clean("directory-again");
}

/// Both ways while the container runs, through the host's overlay as `docker cp` goes: into
/// the root, and into a directory of the image that is the process's working directory
/// (the guest's overlay knows it as the image's only, until the host's copy of it appears);
/// and out of it, a file the container wrote into that directory.
#[test]
fn the_host_overlay_and_the_running_container_see_each_others_files() {
    let Some(env) = Env::new() else { return };
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "echo ready > /root/written; \
         until test -e /from-host && test -e ./from-host; do sleep 0.05; done; \
         cat /from-host ./from-host; echo seen > /root/seen; sleep 60",
    ]);
    bundle.edit(|c| c["process"]["cwd"] = "/root".into());
    let root = bundle.rootfs();
    // The host looks the working directory up before the start, as docker does.
    assert!(root.join("root").is_dir());
    let (mut child, stdout) = env.spawn_run(&bundle, "live");
    wait_for(
        "the container's file on the host",
        guest_time(Duration::from_secs(60)),
        || std::fs::read_to_string(root.join("root/written")).is_ok_and(|s| s == "ready\n"),
    );
    std::fs::write(root.join("from-host"), "top\n").unwrap();
    std::fs::write(root.join("root/from-host"), "in the working directory\n").unwrap();
    let written = Instant::now();
    wait_for(
        "the container to see the host's files",
        Duration::from_secs(10),
        || root.join("root/seen").exists(),
    );
    let took = written.elapsed();
    assert_eq!(
        std::fs::read_to_string(&stdout).unwrap(),
        "top\nin the working directory\n"
    );
    println!("host files seen in the container after {took:?}");
    assert!(env.run(&["kill", "live", "KILL"]).status.success());
    let status = child.wait().unwrap();
    assert!(!status.success());
    env.assert_clean("live");
}
