//! Tests that cannot run here say so where the runner shows it, and fail where they must run.
//!
//! A test returning early passes silently in cargo's report, so a missing prerequisite is
//! either a failure (under `CI=true`, or when `SUPERMACHINE_ASSETS_DIR` says the VM assets
//! are meant to be there) or a recorded skip: one line appended to the file named by
//! `SUPERMACHINE_SKIP_LOG` (default `target/skipped-tests.log`, which `make test` lists at
//! its end) and the same line written to stderr. The line goes through `io::stderr()`
//! directly, not `eprintln!`: libtest captures the print macros of a passing test, not
//! writes to the stream itself.
//!
//! Shared by the workspace's tests/ and crates/hypervisor/tests (included by path there):
//! std only.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// Whether a missing prerequisite fails the test: in CI, and wherever the caller said the
/// VM assets are meant to be present (`make test` sets `SUPERMACHINE_ASSETS_DIR`).
pub fn prerequisites_required() -> bool {
    ci() || std::env::var_os("SUPERMACHINE_ASSETS_DIR").is_some()
}

pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The file skipped tests are appended to.
pub fn skip_log() -> PathBuf {
    if let Some(path) = std::env::var_os("SUPERMACHINE_SKIP_LOG") {
        return PathBuf::from(path);
    }
    // The test executable is target/[TRIPLE/]PROFILE/deps/NAME: the log goes in that
    // `target` (the workspace's, whichever crate's test this is).
    let exe = std::env::current_exe().unwrap_or_default();
    let target = exe
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "target"))
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    target.join("skipped-tests.log")
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|name| match name.rsplit_once('-') {
            // Cargo appends a hash to test executables' names.
            Some((stem, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => stem.to_owned(),
            _ => name,
        })
        .unwrap_or_default();
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    format!("{binary}::{test}")
}

/// Records the running test as skipped for `reason` (a configuration it does not apply to):
/// never a failure. The caller returns right after.
pub fn skip(reason: &str) {
    let line = format!("SKIPPED {}: {reason}\n", test_name());
    let _ = std::io::stderr().write_all(line.as_bytes());
    let log = skip_log();
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // One `write` of one line with O_APPEND: lines of tests running at once do not mix.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(e) = appended {
        let _ = writeln!(std::io::stderr(), "cannot append to {}: {e}", log.display());
    }
}

/// A prerequisite of the running test is missing: a failure where prerequisites are
/// required (see [`prerequisites_required`]), a recorded skip elsewhere. The caller returns
/// right after.
pub fn missing_prerequisite(reason: &str) {
    missing_prerequisite_if(prerequisites_required(), reason);
}

/// As [`missing_prerequisite`], with the caller deciding whether it is required.
pub fn missing_prerequisite_if(required: bool, reason: &str) {
    if required {
        panic!(
            "prerequisite missing (required under CI=true or SUPERMACHINE_ASSETS_DIR): {reason}"
        );
    }
    skip(reason);
}

/// KVM cannot be opened (`error`). A host with no /dev/kvm at all has no hypervisor to test:
/// that fails only in CI (whose machines have one). A /dev/kvm that exists but cannot be
/// used is a broken set-up: a failure wherever prerequisites are required.
pub fn missing_kvm(error: &dyn std::fmt::Display) {
    let present = std::path::Path::new("/dev/kvm").exists();
    let required = if present {
        prerequisites_required()
    } else {
        ci()
    };
    let reason = if present {
        format!("/dev/kvm is not usable: {error}")
    } else {
        format!("no /dev/kvm: {error}")
    };
    missing_prerequisite_if(required, &reason);
}
