//! The host's capacity ledger with real VMs: a create beyond the budget fails at once with
//! the capacity error and leaves nothing; a killed holder's reservation is reclaimed; a
//! stopped VM's is released.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{text, Env};

/// What a VM with the shipped defaults (config/vm-defaults.json) reserves: its guest
/// memory and the VMM's, in MiB, and its online vCPUs.
fn default_vm() -> (u64, u32) {
    let defaults = container::paths::VmDefaults::load();
    (
        u64::from(defaults.memory_mib + defaults.vmm_overhead_mib),
        defaults.vcpus,
    )
}

/// `supermachine` with a ledger of its own and a budget of one default VM and a half.
fn cmd(env: &Env, ledger: &Path) -> Command {
    let (mib, vcpus) = default_vm();
    let mut cmd = env.cmd();
    cmd.env("SUPERMACHINE_CAPACITY_DIR", ledger)
        .env("SUPERMACHINE_CAPACITY_MEMORY", format!("{}M", mib * 3 / 2))
        .env("SUPERMACHINE_CAPACITY_VCPUS", (vcpus * 8).to_string());
    cmd
}

/// What `check` says the VMs hold: its capacity line.
fn held(env: &Env, ledger: &Path) -> String {
    let out = common::output_of(cmd(env, ledger).arg("check"));
    text(&out.stdout)
        .lines()
        .find(|l| l.contains("capacity"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_create_beyond_the_budget_fails_and_a_gone_vms_reservation_is_reclaimed() {
    let Some(env) = Env::new() else { return };
    let ledger = tempfile::tempdir().unwrap();
    let sleeper = env.bundle(&["sleep", "1000"]);
    let create = |id: &str| {
        common::output_of(cmd(&env, ledger.path()).args([
            "create",
            "--bundle",
            sleeper.path_str(),
            id,
        ]))
    };

    let out = create("c-cap-1");
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let line = held(&env, ledger.path());
    let (mib, vcpus) = default_vm();
    assert!(
        line.contains(&format!("1 VM(s) hold {mib} MiB and {vcpus} vCPUs")),
        "{line}"
    );

    // No room for a second VM: refused before anything of it exists.
    let processes = env.processes();
    let out = create("c-cap-2");
    assert!(
        !out.status.success(),
        "a create beyond the budget succeeded"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not enough host capacity")
            && stderr.contains("SUPERMACHINE_CAPACITY_MEMORY"),
        "{stderr}"
    );
    assert!(
        !env.root().join("c-cap-2").exists(),
        "state dir left behind"
    );
    assert_eq!(
        env.processes(),
        processes,
        "a refused create left processes"
    );

    // The first VM's holder killed outright: its reservation is reclaimed, and the second
    // container fits.
    let monitor = env.state("c-cap-1")["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    common::wait_for("the killed monitor to go", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{monitor}")).exists()
    });
    let out = create("c-cap-2");
    assert!(
        out.status.success(),
        "create after reclaim: {}",
        text(&out.stderr)
    );
    let line = held(&env, ledger.path());
    assert!(line.contains("1 VM(s) hold"), "{line}");

    // A container that ends releases its VM's reservation.
    let out = common::output_of(cmd(&env, ledger.path()).args(["delete", "--force", "c-cap-2"]));
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    let out = common::output_of(cmd(&env, ledger.path()).args(["delete", "--force", "c-cap-1"]));
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    let line = held(&env, ledger.path());
    assert!(line.contains("0 VM(s) hold 0 MiB and 0 vCPUs"), "{line}");
    env.assert_clean("c-cap-1");
    env.assert_clean("c-cap-2");
}
