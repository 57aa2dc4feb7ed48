//! Every program under `tests/fixtures/` builds, and the busybox root filesystem the VM tests
//! share is made: `scripts/typical-host.sh` runs this on the host so that the tests it runs
//! in the typical host's VM (which has no `rustc` or busybox) find them built.

#![allow(clippy::unwrap_used)]

mod common;

#[test]
fn every_fixture_program_builds() {
    let dir = common::workspace().join("tests/fixtures");
    let mut built = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let program = common::fixture_program(&name);
            assert!(program.is_file(), "{} was not built", program.display());
            built += 1;
        }
    }
    assert!(built > 0, "no fixtures in {}", dir.display());
    assert!(common::busybox_rootfs().join("bin/busybox").exists());
}
