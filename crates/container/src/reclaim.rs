//! Gives a VM's host memory back once its guest goes idle.
//!
//! An engine that translates guest code (QEMU's TCG) keeps every block it has translated
//! until its buffer fills: a restored VM holds ~10 MiB of code for the restore and
//! container-start paths, which it does not run again. A watcher samples the VMM process's
//! CPU time; when the VM has done some work since it last trimmed and then idles through a
//! sample, the watcher asks it to trim ([`Vm::trim`]). Whatever the guest runs afterwards
//! is translated again, which costs an idle guest little and a busy one a few milliseconds
//! once; the watcher never trims a VM that is busy.
//!
//! [`Vm::trim`]: engine::Vm::trim

use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::Vm;
use lock_ext::LockExt;

use crate::proc;

/// How often the VMM's CPU time is sampled.
const SAMPLE: Duration = Duration::from_millis(500);
/// Below this much CPU time in a sample (2%), the VM is idle.
const IDLE: Duration = Duration::from_millis(10);
/// The work since the last trim that makes another worth it: about what translating a
/// container start costs.
const WORTH_TRIMMING: Duration = Duration::from_millis(50);

/// When to trim, from successive samples of the VMM's total CPU time.
#[derive(Debug, Default)]
struct Policy {
    /// The last sample; zero at first, so that the boot or restore counts as work.
    last: Duration,
    work_since_trim: Duration,
}

impl Policy {
    /// Takes one sample; true when the VM should trim now.
    fn sample(&mut self, cpu_time: Duration) -> bool {
        let used = cpu_time.saturating_sub(self.last);
        self.last = cpu_time;
        if used > IDLE {
            self.work_since_trim += used;
            return false;
        }
        // An idle guest's timer ticks are not work: they never add up to a trim.
        let trim = self.work_since_trim >= WORTH_TRIMMING;
        if trim {
            self.work_since_trim = Duration::ZERO;
        }
        trim
    }
}

/// Trims `vm` whenever it has worked and then idled, from a thread of its own that ends
/// with the VM; nothing to do for a VM that trimming gives nothing back for.
pub fn watch(vm: &Arc<Mutex<Box<dyn Vm>>>) {
    let pid = {
        let vm = vm.lock_unpoisoned();
        match vm.vmm_pid() {
            Some(pid) if vm.trims() => pid,
            _ => return,
        }
    };
    let vm = Arc::downgrade(vm);
    watch_process(pid, move || match vm.upgrade() {
        Some(vm) => {
            vm.lock_unpoisoned().trim();
            true
        }
        None => false,
    });
}

/// Watches the VMM process `vmm_pid` and calls `trim` whenever it has worked and then
/// idled; `trim` returns false once the VM is gone, and the watcher also ends with the
/// process.
fn watch_process(vmm_pid: u32, mut trim: impl FnMut() -> bool + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("reclaim".into())
        .spawn(move || {
            let pid = vmm_pid as i32;
            // Without its start time, a recycled pid could not be told from the VMM.
            let Some(started) = proc::start_time(pid) else {
                return;
            };
            let mut policy = Policy::default();
            loop {
                std::thread::sleep(SAMPLE);
                // Another process may have the pid once the VMM has gone.
                if !proc::is_alive(pid, Some(started)) {
                    return;
                }
                let Some(cpu_time) = proc::cpu_time(pid) else {
                    return;
                };
                if policy.sample(cpu_time) {
                    log::debug!("VMM {vmm_pid} idle after {cpu_time:?} of CPU: trimming");
                    if !trim() {
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::debug!("no reclaim watcher: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn trims_once_the_vm_idles_after_working() {
        let mut policy = Policy::default();
        // A restore and a container start: busy for two samples.
        assert!(!policy.sample(ms(180)));
        assert!(!policy.sample(ms(260)));
        // Idle: trim, once.
        assert!(policy.sample(ms(260)));
        assert!(!policy.sample(ms(270)));
        assert!(!policy.sample(ms(270)));
    }

    #[test]
    fn never_trims_a_busy_vm_and_trims_again_after_new_work() {
        let mut policy = Policy::default();
        let mut cpu = ms(0);
        for _ in 0..10 {
            cpu += ms(300);
            assert!(!policy.sample(cpu), "trimmed while busy");
        }
        assert!(policy.sample(cpu));
        // An exec'd process works for a while, then the VM idles again.
        cpu += ms(40);
        assert!(!policy.sample(cpu));
        cpu += ms(40);
        assert!(!policy.sample(cpu));
        assert!(policy.sample(cpu + ms(5)));
    }

    #[test]
    fn a_little_work_is_not_worth_a_trim() {
        let mut policy = Policy::default();
        assert!(!policy.sample(ms(40)));
        assert!(!policy.sample(ms(40)));
        assert!(!policy.sample(ms(45)));
    }

    #[test]
    fn an_idle_guests_ticks_never_add_up_to_a_trim() {
        let mut policy = Policy::default();
        let mut cpu = ms(0);
        for _ in 0..1000 {
            cpu += ms(10);
            assert!(!policy.sample(cpu));
        }
    }
}
