//! The vCPU threads: how they are steered (run, pause, snapshot, end) and the loop each runs,
//! serving its exits on the device buses.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::GuestMemory;
use hypervisor::{Kick, Vcpu, VcpuExit};
use lock_ext::{CondvarExt, LockExt};

use crate::bus::Bus;
use crate::profiler::Profiler;
use crate::{repair, Diagnostics, Error, VmExit};

/// A vCPU's saved state once its thread has read it.
pub(crate) type SavedVcpu = Option<Result<Vec<u8>, String>>;

/// Where the VM is, as its vCPU threads see it.
#[derive(Debug)]
pub(crate) enum RunState {
    /// The vCPUs run guest code.
    Running,
    /// The vCPUs are asked to park. `parked` threads have parked since the pause numbered
    /// `pause` began (a thread still parked from an earlier pause counts itself again);
    /// `snapshot`, when there, has one slot per vCPU for its parked thread to fill.
    Paused {
        pause: u64,
        parked: u32,
        snapshot: Option<Vec<SavedVcpu>>,
    },
    /// The VM ended; every thread leaves.
    Ended(VmExit),
}

/// The run state and the condition every change of it is signalled on.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) state: Mutex<RunState>,
    changed: Condvar,
    /// Numbers the pauses (see [`RunState::Paused`]).
    pauses: std::sync::atomic::AtomicU64,
    /// Descriptions asked of the vCPUs (see [`Vcpus::describe`]): a slot per vCPU, filled
    /// by its thread when a kick brings it out of the guest.
    descriptions: Mutex<Option<Vec<Option<VcpuDescription>>>>,
}

/// Where a vCPU's thread is, for [`Vcpus::describe`]: a count its thread bumps as it enters
/// the hypervisor's run call and again as it leaves, odd while it is inside.
#[derive(Debug, Default)]
struct Activity(AtomicU64);

impl Activity {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the thread was in the run call when the count read `count`.
    fn inside(count: u64) -> bool {
        !count.is_multiple_of(2)
    }

    /// Whether the thread was in the run call when the count read `before`, and is still in
    /// that same call now that it reads `now`.
    fn stayed_inside(before: u64, now: u64) -> bool {
        Self::inside(before) && now == before
    }
}

/// What a vCPU whose run call `timeout` of kicks did not end says of itself.
fn stuck_in_run_call(timeout: Duration) -> String {
    format!("its run call did not return through {timeout:?} of kicks")
}

/// One vCPU in words (see [`describe`]).
#[derive(Clone, Debug)]
pub(crate) struct VcpuDescription {
    pub(crate) text: String,
    /// How the hypervisor under the VMM failed this vCPU, where what it shows no guest and
    /// no working hypervisor can do: state that cannot be the guest's (nested
    /// virtualisation that lost track of which level it runs), or a run call that kicks
    /// did not end.
    pub(crate) fault: Option<String>,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            state: Mutex::new(RunState::Running),
            changed: Condvar::new(),
            pauses: std::sync::atomic::AtomicU64::new(0),
            descriptions: Mutex::new(None),
        }
    }
}

impl Control {
    /// Sets the state and wakes everyone waiting on it.
    fn set(&self, mut state: MutexGuard<'_, RunState>, next: RunState) {
        *state = next;
        self.changed.notify_all();
    }

    /// Waits until `done` holds for the state or `deadline` passes; the state either way.
    pub(crate) fn wait_until(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&RunState) -> bool,
    ) -> MutexGuard<'_, RunState> {
        let mut state = self.state.lock_unpoisoned();
        while !done(&state) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            state = self.changed.wait_timeout_unpoisoned(state, left).0;
        }
        state
    }

    /// Asks the vCPUs to park (a no-op once the VM ended or while already paused).
    pub(crate) fn pause(&self) {
        let state = self.state.lock_unpoisoned();
        if matches!(*state, RunState::Running) {
            let pause = self
                .pauses
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1;
            self.set(
                state,
                RunState::Paused {
                    pause,
                    parked: 0,
                    snapshot: None,
                },
            );
        }
    }

    pub(crate) fn resume(&self) {
        let state = self.state.lock_unpoisoned();
        if matches!(*state, RunState::Paused { .. }) {
            self.set(state, RunState::Running);
        }
    }

    /// Ends the VM with `exit` unless it has ended already (the first reason stays).
    pub(crate) fn end(&self, exit: VmExit) {
        let state = self.state.lock_unpoisoned();
        if !matches!(*state, RunState::Ended(_)) {
            self.set(state, RunState::Ended(exit));
        }
    }

    pub(crate) fn exit(&self) -> Option<VmExit> {
        match &*self.state.lock_unpoisoned() {
            RunState::Ended(exit) => Some(exit.clone()),
            _ => None,
        }
    }

    /// Called by vCPU `id`'s thread between runs: parks while paused, saving the vCPU's state
    /// with `save` when a snapshot asks for it (vCPU state is read on the vCPU's own thread);
    /// false when it must end.
    pub(crate) fn checkpoint(
        &self,
        id: usize,
        save: &mut dyn FnMut() -> Result<Vec<u8>, String>,
    ) -> bool {
        let mut state = self.state.lock_unpoisoned();
        let mut counted_in = None;
        loop {
            match &mut *state {
                RunState::Running => return true,
                RunState::Ended(_) => return false,
                RunState::Paused {
                    pause,
                    parked,
                    snapshot,
                } => {
                    if counted_in != Some(*pause) {
                        counted_in = Some(*pause);
                        *parked += 1;
                        self.changed.notify_all();
                    }
                    let asked = snapshot
                        .as_ref()
                        .is_some_and(|slots| slots.get(id).is_some_and(Option::is_none));
                    if asked {
                        drop(state);
                        let saved = save();
                        state = self.state.lock_unpoisoned();
                        if let RunState::Paused {
                            snapshot: Some(slots),
                            ..
                        } = &mut *state
                        {
                            if let Some(slot) = slots.get_mut(id) {
                                *slot = Some(saved);
                            }
                        }
                        self.changed.notify_all();
                        continue;
                    }
                }
            }
            state = self.changed.wait_unpoisoned(state);
        }
    }

    /// Each vCPU's state, read by its own parked thread; `vcpus` must all be parked.
    pub(crate) fn save_vcpus(&self, vcpus: u32, timeout: Duration) -> Result<Vec<Vec<u8>>, Error> {
        let mut state = self.state.lock_unpoisoned();
        match &mut *state {
            RunState::Paused {
                parked, snapshot, ..
            } if *parked == vcpus => *snapshot = Some((0..vcpus).map(|_| None).collect()),
            _ => {
                return Err(Error::Snapshot(
                    "the VM must be paused (and running) to be snapshotted".into(),
                ))
            }
        }
        self.changed.notify_all();
        drop(state);
        let mut state = self.wait_until(Instant::now() + timeout, |state| match state {
            RunState::Paused {
                snapshot: Some(slots),
                ..
            } => slots.iter().all(Option::is_some),
            _ => true,
        });
        let slots = match &mut *state {
            RunState::Paused { snapshot, .. } => snapshot.take().unwrap_or_default(),
            _ => Vec::new(),
        };
        drop(state);
        if slots.is_empty() {
            return Err(Error::Snapshot("the VM ended during the snapshot".into()));
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(id, slot)| match slot {
                Some(Ok(bytes)) => Ok(bytes),
                Some(Err(e)) => Err(Error::Snapshot(format!("vCPU {id}: {e}"))),
                None => Err(Error::Snapshot(format!("vCPU {id} did not save its state"))),
            })
            .collect()
    }
}

/// The running vCPU threads of a VM.
#[derive(Debug)]
pub(crate) struct Vcpus {
    pub(crate) control: Arc<Control>,
    kickers: Vec<Arc<dyn Kick>>,
    activity: Vec<Arc<Activity>>,
    threads: Vec<JoinHandle<()>>,
}

impl Vcpus {
    /// One thread per vCPU, serving its exits on `pio` and `mmio`.
    pub(crate) fn start(
        vcpus: Vec<Box<dyn Vcpu>>,
        pio: &Bus,
        mmio: &Bus,
        mem: &Arc<GuestMemory>,
        diagnostics: &Diagnostics,
    ) -> Result<Vcpus, Error> {
        let control = Arc::new(Control::default());
        let mut kickers = Vec::new();
        let mut activity = Vec::new();
        let mut threads = Vec::new();
        for vcpu in vcpus {
            let id = vcpu.id();
            kickers.push(vcpu.kicker());
            let its_activity = Arc::new(Activity::default());
            activity.push(its_activity.clone());
            let worker = VcpuWorker {
                vcpu,
                activity: its_activity,
                trace: diagnostics.trace,
                forbidden_call: diagnostics.forbidden_call_for_tests,
                exits: 0,
                profiler: diagnostics
                    .profile
                    .as_ref()
                    .map(|p| Profiler::new(p.clone())),
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                control: control.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || worker.run());
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    control.end(VmExit::Failed(e.to_string()));
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(Error::Thread(e));
                }
            }
        }
        if diagnostics.profile.is_some() {
            crate::profiler::start_sampler(control.clone(), kickers.clone());
        }
        Ok(Vcpus {
            control,
            kickers,
            activity,
            threads,
        })
    }

    pub(crate) fn kick(&self) {
        for k in &self.kickers {
            k.kick();
        }
    }

    /// Stops every vCPU between two guest instructions; returns when all `count` are parked
    /// (or the VM ended, or `timeout` passed).
    pub(crate) fn pause(&self, count: u32, timeout: Duration) {
        self.control.pause();
        let deadline = Instant::now() + timeout;
        let all_parked = |state: &RunState| match state {
            RunState::Paused { parked, .. } => *parked == count,
            _ => true,
        };
        loop {
            // A vCPU in guest code parks only once kicked out of it.
            self.kick();
            let step = (Instant::now() + Duration::from_millis(10)).min(deadline);
            if all_parked(&self.control.wait_until(step, all_parked)) {
                return;
            }
            if Instant::now() >= deadline {
                log::warn!("builtin VMM: not every vCPU parked within {timeout:?}");
                return;
            }
        }
    }

    /// Each vCPU in words (where it is, the interrupts it has in hand; see
    /// [`hypervisor::Vcpu::describe`]), read by its own thread once kicked out of the guest.
    /// A vCPU that did not answer within `timeout` says why: busy in a device, or still in
    /// the hypervisor's run call, which no working hypervisor keeps through kicks.
    pub(crate) fn describe(&self, count: u32, timeout: Duration) -> Vec<VcpuDescription> {
        *self.control.descriptions.lock_unpoisoned() = Some(vec![None; count as usize]);
        let before: Vec<u64> = self.activity.iter().map(|a| a.now()).collect();
        let deadline = Instant::now() + timeout;
        let answered = || {
            self.control
                .descriptions
                .lock_unpoisoned()
                .as_ref()
                .is_some_and(|slots| slots.iter().all(Option::is_some))
        };
        while !answered() && Instant::now() < deadline {
            self.kick();
            std::thread::sleep(Duration::from_millis(5));
        }
        let slots = self.control.descriptions.lock_unpoisoned().take();
        slots
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(id, slot)| {
                slot.unwrap_or_else(|| {
                    if Activity::stayed_inside(before[id], self.activity[id].now()) {
                        let why = stuck_in_run_call(timeout);
                        VcpuDescription {
                            text: why.clone(),
                            fault: Some(why),
                        }
                    } else {
                        VcpuDescription {
                            text: format!("no answer within {timeout:?} (busy in a device)"),
                            fault: None,
                        }
                    }
                })
            })
            .collect()
    }

    /// Ends the VM (if it has not ended) and joins the threads. A vCPU whose run call kicks
    /// do not end within [`STOP_TIMEOUT`] (a failed hypervisor, see [`Vcpus::watch`]) is
    /// left to the process's exit rather than hang its caller: its thread owns everything
    /// it touches (the vCPU, the buses, a reference to guest memory).
    pub(crate) fn stop(&mut self) {
        self.control.end(VmExit::Shutdown);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!(
                    "builtin VMM: thread {} did not end within {STOP_TIMEOUT:?} of kicks; left \
                     behind",
                    t.thread().name().unwrap_or("?")
                );
            }
        }
    }

    /// Starts the VM's watch: a thread that, when the VM ends, shuts down `port_ends` (the
    /// console ports' device ends) so that the host sees its channels close, as it does
    /// when a VMM process dies; and that every [`WATCH_INTERVAL`] checks that a kick still
    /// brings each vCPU out of the hypervisor's run call. One that stays in the same call
    /// through [`STUCK_TIMEOUT`] of kicks is held by a hypervisor that failed (nested
    /// virtualisation that lost the guest's state, seen under an emulated SVM): the guest
    /// can make no progress there and nothing would end the wait of whoever waits on it,
    /// so the VM ends, saying so.
    ///
    /// It touches nothing a guest wrote (its counters are the vCPU threads'), so it runs
    /// unconfined, as the thread that starts the VM does.
    pub(crate) fn watch(&mut self, port_ends: Vec<UnixStream>) -> Result<(), Error> {
        let control = self.control.clone();
        let kickers = self.kickers.clone();
        let activity = self.activity.clone();
        let spawned = std::thread::Builder::new()
            .name("vmm-watch".into())
            .spawn(move || {
                let ended = |state: &RunState| matches!(state, RunState::Ended(_));
                while !ended(&control.wait_until(Instant::now() + WATCH_INTERVAL, ended)) {
                    let kick = || kickers.iter().for_each(|k| k.kick());
                    let stuck = stuck_in_run(&activity, kick, STUCK_TIMEOUT);
                    if !stuck.is_empty() {
                        let faults: Vec<String> = stuck
                            .iter()
                            .map(|id| format!("vCPU {id}: {}", stuck_in_run_call(STUCK_TIMEOUT)))
                            .collect();
                        let why = crate::hypervisor_fault(&faults);
                        log::warn!("builtin VMM: {why}");
                        control.end(VmExit::Failed(why));
                    }
                }
                for end in &port_ends {
                    let _ = end.shutdown(std::net::Shutdown::Both);
                }
            });
        match spawned {
            Ok(thread) => {
                self.threads.push(thread);
                Ok(())
            }
            Err(e) => {
                self.stop();
                Err(Error::Thread(e))
            }
        }
    }
}

/// How often [`Vcpus::watch`] checks that kicks reach every vCPU: a kick costs a running
/// vCPU one exit.
const WATCH_INTERVAL: Duration = Duration::from_secs(10);
/// How long a vCPU may stay in one run call through kicks before the watch ends its VM.
/// Kicks end a run call within microseconds; this leaves room for a host so loaded that
/// the vCPU's thread is not scheduled for seconds.
const STUCK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Vcpus::stop`] kicks the threads before it leaves one behind.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The vCPUs (by index into `activity`) that were in the hypervisor's run call and were
/// still in that same call after `timeout` of `kick`s.
fn stuck_in_run(activity: &[Arc<Activity>], kick: impl Fn(), timeout: Duration) -> Vec<usize> {
    let before: Vec<u64> = activity.iter().map(|a| a.now()).collect();
    let mut inside: Vec<usize> = (0..activity.len())
        .filter(|&id| Activity::inside(before[id]))
        .collect();
    let deadline = Instant::now() + timeout;
    while !inside.is_empty() {
        kick();
        std::thread::sleep(Duration::from_millis(5));
        inside.retain(|&id| Activity::stayed_inside(before[id], activity[id].now()));
        if Instant::now() >= deadline {
            break;
        }
    }
    inside
}

struct VcpuWorker {
    vcpu: Box<dyn Vcpu>,
    /// [`Diagnostics::trace`]: log one exit in a thousand and where each kick found the vCPU.
    trace: bool,
    exits: u64,
    profiler: Option<Profiler>,
    /// [`Diagnostics::forbidden_call_for_tests`].
    forbidden_call: bool,
    pio: Bus,
    mmio: Bus,
    mem: Arc<GuestMemory>,
    control: Arc<Control>,
    activity: Arc<Activity>,
}

/// What the run loop does after an exit (the exit borrows the vCPU; this does not).
enum Next {
    Continue,
    End(VmExit),
    Repair(String),
}

impl VcpuWorker {
    fn run(mut self) {
        let id = self.vcpu.id();
        let kind = devices::ThreadKind::Vcpu(self.vcpu.thread_ioctls());
        if let Err(e) = devices::confine_thread(kind) {
            self.control.end(VmExit::Failed(format!("vCPU {id}: {e}")));
            return;
        }
        if self.forbidden_call && id == 0 {
            // SAFETY: a fork the filter forbids: the process ends here.
            unsafe { libc::fork() };
        }
        while self.control.checkpoint(id as usize, &mut || {
            self.vcpu.save_state().map_err(|e| e.to_string())
        }) {
            self.activity.bump();
            let exit = self.vcpu.run();
            self.activity.bump();
            if self.trace {
                self.exits += 1;
                if self.exits.is_multiple_of(1000) {
                    log::debug!("vCPU {id}: exit #{}: {exit:?}", self.exits);
                }
            }
            let next = match exit {
                Ok(VcpuExit::IoIn { port, data }) => {
                    self.pio.read(u64::from(port), data);
                    Next::Continue
                }
                Ok(VcpuExit::IoOut { port, data }) => {
                    // The i8042 reset line: the guest asked for a reboot.
                    if port == 0x64 && data.first() == Some(&0xfe) {
                        Next::End(VmExit::Shutdown)
                    } else {
                        self.pio.write(u64::from(port), data);
                        Next::Continue
                    }
                }
                Ok(VcpuExit::MmioRead { addr, data }) => {
                    self.mmio.read(addr, data);
                    Next::Continue
                }
                Ok(VcpuExit::MmioWrite { addr, data }) => {
                    self.mmio.write(addr, data);
                    Next::Continue
                }
                Ok(VcpuExit::Interrupted) => {
                    if let Some(slot) = self
                        .control
                        .descriptions
                        .lock_unpoisoned()
                        .as_mut()
                        .and_then(|slots| slots.get_mut(id as usize))
                        .filter(|slot| slot.is_none())
                    {
                        *slot = Some(describe(self.vcpu.as_ref(), &self.mem));
                    }
                    if let Some(profiler) = &mut self.profiler {
                        profiler.sample(self.vcpu.as_ref(), &self.mem);
                    }
                    if self.trace {
                        if let Ok(r) = self.vcpu.x86_regs() {
                            log::debug!("vCPU {id}: kicked at rip {:#x}", r.rip);
                        }
                    }
                    Next::Continue
                }
                Ok(VcpuExit::Halt) | Ok(VcpuExit::Shutdown) => Next::End(VmExit::Shutdown),
                Ok(VcpuExit::EmulationFailure { detail }) => Next::Repair(detail),
                Ok(VcpuExit::Other(what)) => {
                    Next::End(VmExit::Failed(format!("vCPU {id}: {what}")))
                }
                Err(e) => Next::End(VmExit::Failed(format!("vCPU {id}: {e}"))),
            };
            match next {
                Next::Continue => {}
                Next::End(exit) => {
                    self.control.end(exit);
                    break;
                }
                Next::Repair(detail) => {
                    if let Err(e) = repair::apply(self.vcpu.as_mut(), &self.mem) {
                        self.control
                            .end(VmExit::Failed(format!("vCPU {id}: {detail}: {e}")));
                        return;
                    }
                }
            }
        }
        if let Some(profiler) = self.profiler.take() {
            profiler.write(id);
        }
    }
}

/// Up to `len` bytes of guest memory at the virtual address `gva`, as `vcpu`'s page tables
/// map it, stopping at the end of that page (the next one may be anywhere in guest memory).
pub(crate) fn read_virtual(
    vcpu: &dyn Vcpu,
    mem: &GuestMemory,
    gva: u64,
    len: usize,
) -> Result<Vec<u8>, String> {
    use vm_memory::{Bytes, GuestAddress};
    let in_page = (0x1000 - (gva & 0xfff)) as usize;
    let gpa = vcpu
        .translate(gva)
        .map_err(|e| format!("untranslated ({e})"))?;
    let mut bytes = vec![0u8; len.min(in_page)];
    mem.read_slice(&mut bytes, GuestAddress(gpa))
        .map_err(|e| format!("unreadable ({e})"))?;
    Ok(bytes)
}

/// A vCPU in words: the backend's description, then (x86) its code segment and page tables,
/// the bytes at its instruction pointer and the top of its stack, which name the code it
/// is in even where no symbol does. A vCPU paging through a root outside guest memory runs
/// with state that is not the guest's: no guest can load such a root and go on running.
fn describe(vcpu: &dyn Vcpu, mem: &GuestMemory) -> VcpuDescription {
    use vm_memory::{GuestAddress, GuestMemoryBackend as _};
    const CR0_PG: u64 = 1 << 31;
    const CR3_ROOT: u64 = 0x000f_ffff_ffff_f000;
    let mut out = vec![vcpu.describe()];
    let mut fault = None;
    let hex = |gva: u64, len: usize| match read_virtual(vcpu, mem, gva, len) {
        Ok(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Err(e) => e,
    };
    if let (Ok(regs), Ok(sregs)) = (vcpu.x86_regs(), vcpu.x86_sregs()) {
        out.push(format!(
            "cs {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            sregs.cs.selector, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer
        ));
        out.push(format!("code at rip: {}", hex(regs.rip, 16)));
        out.push(format!("stack at {:#x}: {}", regs.rsp, hex(regs.rsp, 64)));
        if sregs.cr0 & CR0_PG != 0 && !mem.address_in_range(GuestAddress(sregs.cr3 & CR3_ROOT)) {
            fault = Some(format!(
                "its page-table root (CR3 {:#x}) is outside the guest's memory (at rip {:#x})",
                sregs.cr3, regs.rip
            ));
        }
    }
    VcpuDescription {
        text: out.join(", "),
        fault,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(control: &Control) -> u32 {
        match &*control.state.lock_unpoisoned() {
            RunState::Paused { parked, .. } => *parked,
            _ => 0,
        }
    }

    fn wait_parked(control: &Control, count: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while parked(control) != count {
            assert!(Instant::now() < deadline, "the vCPU never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_paused_vcpu_parks_until_resumed_and_stop_releases_it() {
        let control = Arc::new(Control::default());
        control.pause();
        let c = control.clone();
        let parked = std::thread::spawn(move || c.checkpoint(0, &mut || Ok(Vec::new())));
        wait_parked(&control, 1);
        control.end(VmExit::Shutdown);
        assert!(!parked.join().unwrap(), "a stopped VM's vCPU ends");
        assert_eq!(control.exit(), Some(VmExit::Shutdown));
        control.end(VmExit::Failed("later".into()));
        assert_eq!(
            control.exit(),
            Some(VmExit::Shutdown),
            "the first reason stays"
        );
    }

    #[test]
    fn a_parked_vcpu_saves_its_state_when_asked_and_runs_on_after_resume() {
        let control = Arc::new(Control::default());
        control.pause();
        let c = control.clone();
        let parked = std::thread::spawn(move || {
            let mut saves = 0;
            let going_on = c.checkpoint(0, &mut || {
                saves += 1;
                Ok(vec![7, 7])
            });
            (going_on, saves)
        });
        wait_parked(&control, 1);
        let saved = control.save_vcpus(1, Duration::from_secs(5)).unwrap();
        assert_eq!(saved, vec![vec![7, 7]]);
        control.resume();
        assert_eq!(
            parked.join().unwrap(),
            (true, 1),
            "saved once, then runs on"
        );
    }

    /// A thread standing in for a vCPU in its run call: it leaves the call (bumps its
    /// count twice) when kicked, unless `deaf`.
    fn in_run_call(deaf: bool) -> (Arc<Activity>, Arc<std::sync::atomic::AtomicBool>) {
        let activity = Arc::new(Activity::default());
        activity.bump();
        let kicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, k) = (activity.clone(), kicked.clone());
        std::thread::spawn(move || {
            while !k.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if !deaf {
                a.bump();
                a.bump();
            }
        });
        (activity, kicked)
    }

    #[test]
    fn only_a_vcpu_that_kicks_do_not_bring_out_of_its_run_call_is_stuck() {
        let (answers, kicked_answers) = in_run_call(false);
        let (deaf, kicked_deaf) = in_run_call(true);
        // Out of the run call (in a device, or parked): not the hypervisor's to end.
        let outside = Arc::new(Activity::default());
        let kick = || {
            kicked_answers.store(true, Ordering::SeqCst);
            kicked_deaf.store(true, Ordering::SeqCst);
        };
        let stuck = stuck_in_run(
            &[answers, deaf.clone(), outside],
            kick,
            Duration::from_millis(100),
        );
        assert_eq!(stuck, vec![1]);
        // A kick that lands is seen at once, not after the timeout.
        let (answers, kicked) = in_run_call(false);
        let started = Instant::now();
        let stuck = stuck_in_run(
            &[answers],
            || kicked.store(true, Ordering::SeqCst),
            Duration::from_secs(30),
        );
        assert!(stuck.is_empty());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_snapshot_of_a_vm_not_fully_parked_is_refused() {
        let control = Control::default();
        assert!(control.save_vcpus(1, Duration::from_millis(10)).is_err());
        control.pause();
        assert!(control.save_vcpus(1, Duration::from_millis(10)).is_err());
    }

    #[test]
    fn a_vcpu_still_parked_from_a_previous_pause_counts_itself_in_the_next() {
        let control = Arc::new(Control::default());
        control.pause();
        let c = control.clone();
        let parked = std::thread::spawn(move || c.checkpoint(0, &mut || Ok(Vec::new())));
        wait_parked(&control, 1);
        // Resume and pause again at once, before the thread gets to run.
        {
            let state = control.state.lock_unpoisoned();
            let next = RunState::Paused {
                pause: 99,
                parked: 0,
                snapshot: None,
            };
            control.set(state, next);
        }
        wait_parked(&control, 1);
        control.resume();
        assert!(parked.join().unwrap());
    }

    /// A vCPU whose only state is its registers, for [`describe`].
    #[derive(Debug)]
    struct Frozen(hypervisor::x86::Sregs);

    #[derive(Debug)]
    struct NoKick;
    impl Kick for NoKick {
        fn kick(&self) {}
    }

    impl Vcpu for Frozen {
        fn id(&self) -> u32 {
            0
        }
        fn run(&mut self) -> hypervisor::Result<VcpuExit<'_>> {
            unreachable!("a frozen vCPU is only described")
        }
        fn kicker(&self) -> Arc<dyn Kick> {
            Arc::new(NoKick)
        }
        fn x86_regs(&self) -> hypervisor::Result<hypervisor::x86::Regs> {
            Ok(hypervisor::x86::Regs {
                rip: 0xffff_ffff_c084_413c,
                ..Default::default()
            })
        }
        fn x86_sregs(&self) -> hypervisor::Result<hypervisor::x86::Sregs> {
            Ok(self.0)
        }
    }

    #[test]
    fn a_vcpu_paging_through_a_root_outside_guest_memory_runs_someone_elses_state() {
        use vm_memory::GuestAddress;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let paged = |cr3| hypervisor::x86::Sregs {
            cr0: 0x8005_0033,
            cr3,
            ..Default::default()
        };
        // What a stalled restore on nested KVM under QEMU's emulated SVM showed.
        let lost = describe(&Frozen(paged(0x1_045f_2000)), &mem);
        let why = lost
            .fault
            .expect("a root beyond guest memory is not the guest's");
        assert!(why.contains("CR3 0x1045f2000"), "{why}");
        assert!(why.contains("rip 0xffffffffc084413c"), "{why}");
        // A root in guest memory (PCID bits and all), or any CR3 with paging off, is the
        // guest's own business.
        let own = describe(&Frozen(paged(0x00ff_e000 | 0x5)), &mem);
        assert_eq!(own.fault, None, "{}", own.text);
        let unpaged = hypervisor::x86::Sregs {
            cr0: 0x11,
            cr3: 0x1_045f_2000,
            ..Default::default()
        };
        assert_eq!(describe(&Frozen(unpaged), &mem).fault, None);
    }

    /// A vCPU whose run call ignores kicks for a while, as a failed hypervisor's does.
    #[derive(Debug)]
    struct Deaf(Duration);

    impl Vcpu for Deaf {
        fn id(&self) -> u32 {
            0
        }
        fn run(&mut self) -> hypervisor::Result<VcpuExit<'_>> {
            std::thread::sleep(self.0);
            Ok(VcpuExit::Shutdown)
        }
        fn kicker(&self) -> Arc<dyn Kick> {
            Arc::new(NoKick)
        }
    }

    #[test]
    fn a_run_call_that_kicks_do_not_end_is_the_hypervisors_fault() {
        let mem =
            Arc::new(GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap());
        let vcpus: Vec<Box<dyn Vcpu>> = vec![Box::new(Deaf(Duration::from_secs(2)))];
        let mut running = Vcpus::start(
            vcpus,
            &Bus::default(),
            &Bus::default(),
            &mem,
            &Diagnostics::default(),
        )
        .unwrap();
        // Let the thread get into its run call.
        let activity = running.activity[0].clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !Activity::inside(activity.now()) {
            assert!(Instant::now() < deadline, "the vCPU never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        let described = running.describe(1, Duration::from_millis(100));
        let fault = described[0].fault.as_deref().expect("a fault");
        assert!(
            fault.contains("did not return through 100ms of kicks"),
            "{fault}"
        );
        running.stop();
    }
}
