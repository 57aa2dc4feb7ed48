//! One VM start-up for both front doors: from a plan to a running VM whose agent is
//! connected and whose container process is created, held for `start`.
//!
//! The monitor (CLI) and the shim call [`start_vm`] from the thread that will own the VMM
//! (it enters the container's network namespace, which the VMM and its tap inherit). It
//! picks the engine, makes the tap, restores a snapshot or boots (and bakes), gives the VM
//! its identity, creates the container's first process and attaches the network. Whatever
//! fails after the VM exists stops it and returns the guest console's last lines; nothing
//! of it is left. Each step a container start-up gains (shares, a pool checkout, limits)
//! is added here once.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_proto::{RootSource, INIT_PROCESS};
use engine::{EngineChoice, Phase, Vm};
use snapshot::SnapshotCache;

use crate::agent_client::{AgentClient, ProcessEvents};
use crate::capacity::{Budget, Demand, Ledger, Reservation};
use crate::launch::{self, Launched, Origin};
use crate::netns::NetworkNamespace;
use crate::network::{self, Attachment};
use crate::paths::VmDefaults;
use crate::plan::Plan;
use crate::rootfs::OverlayRenewer;
use crate::shares::Shares;
use crate::{ContainerError, Paths};

/// How long a tap in a network namespace of the container's own lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapLifetime {
    /// Persistent: it goes with the namespace, which the kernel tears down in the background
    /// (closing a tap unregisters it synchronously, 15-30 ms of every container's exit).
    /// For a process that leaves the namespace with its container (the monitor).
    WithNamespace,
    /// Gone when the VMM closes it. For a thread that stays in the namespace after its
    /// container has gone (the shim's launcher), where a persistent tap would outlive it.
    WithVmm,
}

/// What a VM start-up needs.
pub struct VmStartup {
    pub plan: Plan,
    pub engine: EngineChoice,
    pub paths: Paths,
    /// Where the VM keeps its console log and other per-VM files.
    pub work_dir: PathBuf,
    pub tap_lifetime: TapLifetime,
    /// Where the container's first process's output and exit go; registered before the
    /// process is created.
    pub init_events: Box<dyn ProcessEvents>,
}

impl std::fmt::Debug for VmStartup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmStartup")
            .field("engine", &self.engine)
            .field("work_dir", &self.work_dir)
            .field("tap_lifetime", &self.tap_lifetime)
            .finish_non_exhaustive()
    }
}

/// The container's network connection: its namespace's interfaces bridged to the VM's taps,
/// once the namespace has them (docker connects it between `create` and `start`).
#[derive(Debug, Default)]
pub struct VmNetwork {
    pub attachment: Attachment,
    pub taps: Vec<String>,
    /// The host file bound on the container's `/etc/resolv.conf`, which docker writes when
    /// it connects the network: it says whether the guest relays DNS to the host.
    pub resolv_conf: Option<PathBuf>,
}

impl VmNetwork {
    /// Connects the namespace's interfaces if there are any yet; in the namespace.
    pub fn attach(&mut self, agent: &AgentClient) -> Result<(), ContainerError> {
        self.attachment
            .attach(agent, &self.taps, self.resolv_conf.as_deref())
    }

    pub fn detach(&mut self) {
        self.attachment.detach();
    }
}

/// A running VM with its container created in it.
#[derive(Debug)]
pub struct RunningVm {
    pub vm: Box<dyn Vm>,
    pub agent: AgentClient,
    pub engine_name: String,
    pub origin: Origin,
    /// Phases from the start of the launch.
    pub phases: Vec<Phase>,
    /// The guest pid of the container's first process.
    pub guest_pid: i32,
    pub network: VmNetwork,
    /// The thread sealing a fresh bake; join it before the process exits.
    pub publisher: Option<JoinHandle<()>>,
    /// The VM's place in the host's capacity ledger: keep it as long as the VM runs.
    pub reservation: Reservation,
}

/// Starts the container's VM (see the module doc). Runs on the thread that will own the
/// VMM.
pub fn start_vm(startup: VmStartup) -> Result<RunningVm, ContainerError> {
    let started = Instant::now();
    let VmStartup {
        plan,
        engine: choice,
        paths,
        work_dir,
        tap_lifetime,
        init_events,
    } = startup;
    // Admission first: a start the host has no room for fails before anything exists.
    let reservation = reserve(&plan, &work_dir)?;
    plan.network.enter()?;
    let selection = engine::select(choice, &paths.probe_dir(), plan.qemu.as_deref())?;
    log::debug!(
        "engine {}, isolation by {} ({})",
        selection.engine.name(),
        selection.engine.isolation(),
        selection.reason
    );
    selection.check_isolation()?;
    let tap_name = format!("{}0", network::TAP_PREFIX);
    let tap = match (&plan.network, tap_lifetime) {
        (NetworkNamespace::Host, _) => None,
        (NetworkNamespace::New, TapLifetime::WithNamespace) => {
            Some(network::create_tap(&tap_name, true)?)
        }
        _ => Some(network::create_tap(&tap_name, false)?),
    };
    let shares = Shares::open(&plan.shares)?;
    if let (Some(shares), Some(rootfs), RootSource::Layered { upper, .. }) =
        (&shares, &plan.renewed_root, &plan.setup.rootfs.source)
    {
        shares.renew_after_changes(*upper, OverlayRenewer::start(rootfs.clone())?)?;
    }
    let spec = plan.vm_spec(work_dir, tap.as_ref(), shares.as_ref().map(Shares::backend));
    let cache = if plan.snapshots {
        Some(SnapshotCache::new(
            paths.snapshots_dir(),
            launch::cache_limits(Some(&*selection.engine))?,
        ))
    } else {
        None
    };
    let launched = launch::launch(&*selection.engine, &spec, &plan, cache.as_ref())?;
    // The VMM holds the tap now; it goes when the VMM does.
    let network = VmNetwork {
        attachment: Attachment::default(),
        taps: tap.into_iter().map(|t| t.name).collect(),
        resolv_conf: plan.bound_source("/etc/resolv.conf"),
    };
    let engine_name = selection.engine.name();
    let Launched {
        mut vm,
        agent,
        origin,
        mut phases,
        guest_uptime_at_ready,
        publisher,
    } = launched;
    let created = match &shares {
        Some(shares) => shares.serve(&mut *vm),
        None => Ok(()),
    }
    .and_then(|()| {
        let timeout = launch::start_request_timeout(&*selection.engine);
        create_container(&agent, &plan, timeout, init_events, network, &mut phases)
    });
    match created {
        Ok((guest_pid, network)) => {
            let created = started.elapsed();
            log_phases(&origin, &phases, guest_uptime_at_ready, created);
            if let (Origin::Restored { key }, Some(cache)) = (&origin, &cache) {
                let mut took: Vec<(&str, Duration)> =
                    phases.iter().map(|p| (p.name, p.duration)).collect();
                took.push((snapshot::latency::CREATED, created));
                cache.record_latency(key, &took);
            }
            Ok(RunningVm {
                vm,
                agent,
                engine_name,
                origin,
                phases,
                guest_pid,
                network,
                publisher,
                reservation,
            })
        }
        Err(e) => {
            let console = vm.console_tail(15);
            let mut hypervisor_fault = None;
            if matches!(e, ContainerError::Agent(_)) {
                // The agent stopped answering: what the VM looked like then, for the log,
                // and for the error where it shows the guest was not to blame.
                let description = vm.describe();
                if !description.text.is_empty() {
                    let state = &description.text;
                    log::warn!("the VM when the agent stopped answering ({e}):\n{state}");
                }
                hypervisor_fault = description.hypervisor_fault;
            }
            agent.shutdown();
            if let Err(stop) = vm.stop() {
                log::warn!("stopping the VM after a failed start-up: {stop}");
            }
            // A bake being sealed finishes (or fails) before the caller goes.
            if let Some(publisher) = publisher {
                let _ = publisher.join();
            }
            // An answer of the agent's is the whole story; anything else may be the
            // guest's, and its console may say.
            Err(match e {
                ContainerError::Guest(_) => e,
                e => ContainerError::Boot {
                    message: match hypervisor_fault {
                        Some(fault) => format!("{e}: {fault}"),
                        None => e.to_string(),
                    },
                    console,
                },
            })
        }
    }
}

/// Reserves the VM's memory (guest and VMM) and online vCPUs in the host's ledger.
fn reserve(plan: &Plan, work_dir: &std::path::Path) -> Result<Reservation, ContainerError> {
    let demand = Demand {
        memory_mib: u64::from(plan.memory_mib) + u64::from(VmDefaults::load().vmm_overhead_mib),
        vcpus: u64::from(plan.online_vcpus),
    };
    let label = format!("the VM of {}", work_dir.display());
    Ledger::host().reserve(Budget::of_host()?, &label, demand)
}

/// Gives the fresh VM its identity, creates the container's first process (held for
/// `start`) and connects the network if the namespace has one yet; returns the process's
/// guest pid.
fn create_container(
    agent: &AgentClient,
    plan: &Plan,
    timeout: Duration,
    init_events: Box<dyn ProcessEvents>,
    mut network: VmNetwork,
    phases: &mut Vec<Phase>,
) -> Result<(i32, VmNetwork), ContainerError> {
    agent.register(INIT_PROCESS, init_events);
    let (guest_pid, guest_phases) = launch::prepare_container(agent, plan, timeout)?;
    phases.extend(guest_phases);
    // CNI-style namespaces are ready before create; docker's are connected between create
    // and start (then `start` attaches).
    let attaching = Instant::now();
    network.attach(agent)?;
    phases.push(Phase::new("network attach", attaching.elapsed()));
    Ok((guest_pid, network))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One debug line with the start-up's phases, each in ms from its start for cold boots (the
/// boot timeline) and as durations for restores.
fn log_phases(origin: &Origin, phases: &[Phase], uptime: Option<Duration>, total: Duration) {
    match origin {
        Origin::Booted { baked } => {
            let at = |name: &str| {
                phases
                    .iter()
                    .find(|p| p.name == name)
                    .map_or(0.0, |p| ms(p.duration))
            };
            let agent = at("agent ready");
            // The guest's uptime at READY dates the kernel's entry on the host clock.
            let kernel = uptime.map_or(0.0, |u| (agent - ms(u)).max(0.0));
            let bake = phases
                .iter()
                .find(|p| p.name.starts_with("bake"))
                .map_or(0.0, |p| ms(p.duration));
            log::debug!(
                "boot phases: vmm={:.1}ms kernel={kernel:.1}ms agent={agent:.1}ms bake={bake:.1}ms created={:.1}ms{}",
                at("vmm"),
                ms(total),
                baked.as_ref().map(|k| format!(" (baked snapshot {k})")).unwrap_or_default()
            );
        }
        Origin::Restored { key } => {
            let list: Vec<String> = phases
                .iter()
                .map(|p| format!("{}={:.2}ms", p.name, ms(p.duration)))
                .collect();
            log::debug!(
                "restore phases: {}; created={:.1}ms (snapshot {key})",
                list.join(", "),
                ms(total)
            );
        }
    }
}
