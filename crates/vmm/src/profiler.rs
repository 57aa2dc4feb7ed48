//! The guest profiler ([`crate::Diagnostics::profile`]): a sampler thread kicks every vCPU
//! each millisecond, and each vCPU records where the kick found the guest, counted by (CR3,
//! instruction pointer, guessed kernel call chain). When the vCPU ends, the counts go to
//! `<path>.<pid>.vcpu<id>` as `count cr3 rip frames…` lines; `scripts/guest-profile.py`
//! names the functions. CR3 tells the guest's processes apart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::GuestMemory;
use hypervisor::{Kick, Vcpu};
use lock_ext::LockExt;

use crate::vcpu::{Control, RunState};

/// Where the guest's kernel text is mapped (x86_64, no KASLR).
const KERNEL_TEXT: std::ops::Range<u64> = 0xffff_ffff_8100_0000..0xffff_ffff_a000_0000;

/// One vCPU's samples.
#[derive(Debug)]
pub(crate) struct Profiler {
    path: PathBuf,
    samples: HashMap<Vec<u64>, u64>,
}

impl Profiler {
    pub(crate) fn new(path: PathBuf) -> Self {
        Profiler {
            path,
            samples: HashMap::new(),
        }
    }

    /// One sample: the instruction pointer and, in the guest kernel, the words on its stack
    /// that look like kernel text addresses (a guessed call chain, innermost first).
    pub(crate) fn sample(&mut self, vcpu: &dyn Vcpu, mem: &GuestMemory) {
        let Ok(r) = vcpu.x86_regs() else { return };
        let cr3 = vcpu.x86_sregs().map_or(0, |s| s.cr3);
        let mut key = vec![cr3, r.rip];
        if KERNEL_TEXT.contains(&r.rip) {
            // The rest of the stack's page, from its aligned top.
            if let Ok(stack) = crate::vcpu::read_virtual(vcpu, mem, r.rsp & !7, 0x1000) {
                key.extend(
                    stack
                        .chunks_exact(8)
                        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
                        .filter(|w| KERNEL_TEXT.contains(w)),
                );
            }
        }
        *self.samples.entry(key).or_default() += 1;
    }

    /// Writes vCPU `id`'s samples, most frequent first.
    pub(crate) fn write(self, id: u32) {
        let mut lines: Vec<(u64, Vec<u64>)> =
            self.samples.into_iter().map(|(k, n)| (n, k)).collect();
        lines.sort_unstable_by(|a, b| b.cmp(a));
        let text: String = lines
            .iter()
            .map(|(n, key)| {
                let words: Vec<String> = key.iter().map(|w| format!("{w:#x}")).collect();
                format!("{n} {}\n", words.join(" "))
            })
            .collect();
        let mut name = self.path.into_os_string();
        name.push(format!(".{}.vcpu{id}", std::process::id()));
        if let Err(e) = std::fs::write(&name, text) {
            log::warn!("profile {}: {e}", Path::new(&name).display());
        }
    }
}

/// Kicks every vCPU each millisecond until the VM ends, so that each takes a sample.
pub(crate) fn start_sampler(control: Arc<Control>, kickers: Vec<Arc<dyn Kick>>) {
    let spawned = std::thread::Builder::new()
        .name("sampler".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(1));
            if matches!(*control.state.lock_unpoisoned(), RunState::Ended(_)) {
                return;
            }
            for k in &kickers {
                k.kick();
            }
        });
    if let Err(e) = spawned {
        log::warn!("profile: cannot start the sampler: {e}");
    }
}
