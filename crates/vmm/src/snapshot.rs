//! Snapshots of a builtin VM: a state file and a memory file in one directory.
//!
//! The state file (framed by [`snapshot::file`]: magic, format version, length, CRC) holds
//! each vCPU's state and the interrupt controllers and clock (opaque to this crate: the
//! hypervisor backend's bytes), the serial port and every virtio transport with its device's
//! own state, and the memory layout. The memory file is a sparse copy of guest RAM; a
//! restore maps it `MAP_PRIVATE`, so it costs the same whatever the guest's size and VMs
//! restored from one snapshot share its clean pages.
//!
//! A restore builds the same devices in the same order as boot from the new VM's config
//! (its own disks, taps and agent socket), then puts each one's saved state back.

use std::path::Path;
use std::time::{Duration, Instant};

use devices::serial::SerialState;
use devices::virtio::mmio::TransportState;
use devices::Persist;
use hypervisor::Hypervisor;
use lock_ext::LockExt;
use serde::{Deserialize, Serialize};

use crate::{builder, memory, x86_64, Error, Vmm, VmmConfig};

/// The state file and the memory file of a snapshot directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// The layout of [`VmState`]; part of the builtin engine's snapshot identity, so that a
/// snapshot of another layout is never found, and checked again on restore.
/// 2: device states are typed ([`devices::virtio::DeviceState`]), with the device's type.
/// 3: the console has a second port (`fs.0`) and a virtio-fs device follows the RNG.
/// 4: a virtio-balloon device follows virtio-fs.
pub const STATE_FORMAT: u32 = 4;

/// How long the parked vCPU threads may take to save their state.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct VmState {
    /// [`STATE_FORMAT`].
    format: u32,
    /// (guest address, size) of each RAM region, in memory-file order.
    ram: Vec<(u64, u64)>,
    /// The interrupt controllers and clock (hypervisor-defined bytes).
    platform: Vec<u8>,
    /// One per vCPU, in id order (hypervisor-defined bytes).
    vcpus: Vec<Vec<u8>>,
    serial: SerialState,
    /// Each virtio-mmio transport with its device's state, in device order.
    devices: Vec<TransportState>,
}

/// Named durations of a restore's phases, for `--debug` logs and the benchmark.
pub type Phases = Vec<(&'static str, Duration)>;

/// Whether `bytes` are a state file this VMM reads (seal, checksum, layout, decoding): the
/// parser a restore runs first, for the fuzz target `snapshot_state` (fuzz/).
pub fn validate_state(bytes: &[u8]) -> Result<(), String> {
    decode_state(bytes).map(drop)
}

/// A state file's contents, checked and decoded; what it says about the VM is checked
/// against the VM being restored by the caller.
fn decode_state(bytes: &[u8]) -> Result<VmState, String> {
    let body = snapshot::file::unseal(bytes).map_err(|e| e.to_string())?;
    let state: VmState = bincode::deserialize(body).map_err(|e| format!("decoding: {e}"))?;
    if state.format != STATE_FORMAT {
        return Err(format!(
            "state layout {} (this VMM reads {STATE_FORMAT})",
            state.format
        ));
    }
    Ok(state)
}

impl Vmm {
    /// Writes a snapshot of this VM into `dir`. The VM must be paused ([`Vmm::pause`]) and
    /// must have been booted (a restored VM's RAM is a private mapping of another snapshot).
    pub fn snapshot(&self, dir: &Path) -> Result<(), Error> {
        let ram_file = self
            .ram
            .file
            .as_ref()
            .ok_or_else(|| Error::Snapshot("only a booted VM can be snapshotted".into()))?;
        let vcpus = self
            .vcpus
            .control
            .save_vcpus(self.vcpu_count, VCPU_SAVE_TIMEOUT)?;
        let platform = self.vm.save_platform()?;
        let serial = self.serial.lock_unpoisoned().save();
        let devices = self
            .virtio
            .iter()
            .map(|t| t.lock_unpoisoned().save())
            .collect();
        let state = VmState {
            format: STATE_FORMAT,
            ram: self.ram.ranges.clone(),
            platform,
            vcpus,
            serial,
            devices,
        };
        let body = bincode::serialize(&state).map_err(|e| Error::Snapshot(e.to_string()))?;
        let state_path = dir.join(STATE_FILE);
        snapshot::file::write_state(&state_path, &body).map_err(|e| Error::File {
            path: state_path,
            source: e,
        })?;
        let memory = dir.join(MEMORY_FILE);
        let size = self.ram.ranges.iter().map(|r| r.1).sum();
        snapshot::file::copy_sparse(ram_file, &memory, size).map_err(|e| Error::File {
            path: memory,
            source: e,
        })
    }

    /// Starts a VM from the snapshot in `dir`, with `config`'s devices (disks, taps, agent
    /// channel, console log) in the saved devices' states. `config` must have the shape the
    /// snapshot was taken with; its kernel, initramfs and command line are not used. A
    /// device whose saved state does not fit fails the restore ([`Error::DeviceState`]).
    pub fn restore(
        hv: &dyn Hypervisor,
        mut config: VmmConfig,
        dir: &Path,
    ) -> Result<(Vmm, Phases), Error> {
        let started = Instant::now();
        config.check_shape()?;
        let mut phases = Phases::new();
        let mut phase = |name, since: &mut Instant| {
            phases.push((name, since.elapsed()));
            *since = Instant::now();
        };
        let mut since = started;

        let state_path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&state_path).map_err(|e| Error::File {
            path: state_path.clone(),
            source: e,
        })?;
        let state = decode_state(&bytes)
            .map_err(|e| Error::Snapshot(format!("{}: {e}", state_path.display())))?;
        let ram_ranges = x86_64::ram_ranges(u64::from(config.memory_mib) << 20);
        if state.ram != ram_ranges || state.vcpus.len() != config.vcpus as usize {
            return Err(Error::Snapshot(format!(
                "taken of a VM with {} vCPUs and {} MiB, restored as {} vCPUs and {} MiB",
                state.vcpus.len(),
                state.ram.iter().map(|r| r.1).sum::<u64>() >> 20,
                config.vcpus,
                config.memory_mib
            )));
        }
        phase("validate state", &mut since);

        let ram = memory::GuestRam::from_snapshot(&dir.join(MEMORY_FILE), &state.ram)?;
        let vm = builder::create_vm(hv, &ram)?;
        phase("VM create + memory map", &mut since);

        vm.restore_platform(&state.platform)?;
        phase("irq/clock state", &mut since);

        let devices = builder::build_devices(&vm, &ram.mem, &mut config)?;
        restore_devices(&devices, state.serial, state.devices)?;
        phase("device state", &mut since);

        let vcpus = builder::create_vcpus(hv, &vm, &config, |id, vcpu| {
            vcpu.restore_state(&state.vcpus[id as usize])
        })?;
        phase("vCPU state", &mut since);
        log::debug!(
            "builtin VMM: restored {} vCPUs, {} MiB from {} in {:?}",
            config.vcpus,
            config.memory_mib,
            dir.display(),
            started.elapsed()
        );
        let vmm = builder::start(vm, ram, devices, vcpus, config, started)?;
        Ok((vmm, phases))
    }
}

/// Puts the saved states into freshly built devices (the same devices in the same order).
fn restore_devices(
    devices: &builder::Devices,
    serial: SerialState,
    transports: Vec<TransportState>,
) -> Result<(), Error> {
    let refused = |device: String| move |source| Error::DeviceState { device, source };
    devices
        .serial
        .lock_unpoisoned()
        .restore(serial)
        .map_err(refused("the serial port".into()))?;
    if transports.len() != devices.virtio.len() {
        return Err(Error::Snapshot(format!(
            "the snapshot has {} virtio devices, this VM {}",
            transports.len(),
            devices.virtio.len()
        )));
    }
    for (i, (transport, saved)) in devices.virtio.iter().zip(transports).enumerate() {
        transport
            .lock_unpoisoned()
            .restore(saved)
            .map_err(refused(format!("virtio device {i}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hypervisor that must not be reached: a snapshot that does not validate is refused
    /// before any VM exists.
    #[derive(Debug)]
    struct Unreachable;

    impl Hypervisor for Unreachable {
        fn name(&self) -> &'static str {
            "none"
        }
        fn create_vm(&self) -> hypervisor::Result<Box<dyn hypervisor::Vm>> {
            panic!("a VM was created for a snapshot that does not validate")
        }
    }

    fn config(dir: &Path, vcpus: u32, memory_mib: u32) -> VmmConfig {
        VmmConfig {
            vcpus,
            memory_mib,
            kernel: dir.join("unused"),
            initramfs: None,
            cmdline: String::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            agent_channel: None,
            fs_channel: None,
            fs: None,
            console_log: dir.join("console.log"),
            hide_cpuid: Vec::new(),
            diagnostics: crate::Diagnostics::default(),
        }
    }

    fn write(dir: &Path, vcpus: usize, memory_mib: u64) -> Vec<u8> {
        let state = VmState {
            format: STATE_FORMAT,
            ram: x86_64::ram_ranges(memory_mib << 20),
            platform: vec![1, 2, 3],
            vcpus: vec![vec![4; 16]; vcpus],
            serial: SerialState::default(),
            devices: Vec::new(),
        };
        let body = bincode::serialize(&state).unwrap();
        snapshot::file::write_state(&dir.join(STATE_FILE), &body).unwrap();
        std::fs::read(dir.join(STATE_FILE)).unwrap()
    }

    fn refusal(dir: &Path, vcpus: u32, memory_mib: u32) -> String {
        match Vmm::restore(&Unreachable, config(dir, vcpus, memory_mib), dir) {
            Ok(_) => panic!("restored"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn damaged_missing_or_mismatched_state_is_refused_before_a_vm_exists() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            refusal(dir.path(), 1, 64).contains("state"),
            "no state file"
        );

        let sealed = write(dir.path(), 1, 64);
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        std::fs::write(dir.path().join(STATE_FILE), &flipped).unwrap();
        assert!(refusal(dir.path(), 1, 64).contains("CRC"));

        std::fs::write(dir.path().join(STATE_FILE), &sealed[..sealed.len() - 3]).unwrap();
        assert!(refusal(dir.path(), 1, 64).contains("truncated"));

        write(dir.path(), 2, 64);
        let shape = refusal(dir.path(), 1, 64);
        assert!(shape.contains("2 vCPUs and 64 MiB"), "{shape}");
        write(dir.path(), 1, 64);
        assert!(refusal(dir.path(), 1, 128).contains("restored as 1 vCPUs and 128 MiB"));
    }

    /// A VM without a hypervisor behind it: enough for devices to raise their lines on.
    #[derive(Debug)]
    struct LinesOnly;

    impl hypervisor::Vm for LinesOnly {
        unsafe fn map_memory(&self, _region: hypervisor::MemoryRegion) -> hypervisor::Result<()> {
            Ok(())
        }
        fn create_irqchip(&self) -> hypervisor::Result<()> {
            Ok(())
        }
        fn set_irq_line(&self, _line: u32, _level: bool) -> hypervisor::Result<()> {
            Ok(())
        }
        fn create_vcpu(&self, _id: u32) -> hypervisor::Result<Box<dyn hypervisor::Vcpu>> {
            panic!("no vCPUs here")
        }
    }

    /// The devices of a VM with one disk and an agent channel, and their saved states.
    fn devices(dir: &Path) -> (builder::Devices, SerialState, Vec<TransportState>) {
        let disk = dir.join("disk");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let mut config = config(dir, 1, 64);
        config.disks.push(crate::Disk {
            path: disk,
            read_only: true,
        });
        let (_host, device) = std::os::unix::net::UnixStream::pair().unwrap();
        config.agent_channel = Some(device);
        let vm: std::sync::Arc<dyn hypervisor::Vm> = std::sync::Arc::new(LinesOnly);
        let ram = memory::GuestRam::new(&[(0, 1 << 20)]).unwrap();
        let devices = builder::build_devices(&vm, &ram.mem, &mut config).unwrap();
        let serial = devices.serial.lock_unpoisoned().save();
        let transports = devices
            .virtio
            .iter()
            .map(|t| t.lock_unpoisoned().save())
            .collect();
        (devices, serial, transports)
    }

    #[test]
    fn saved_device_states_restore_and_a_device_that_refuses_its_state_fails_the_restore() {
        let dir = tempfile::tempdir().unwrap();
        let (devices, serial, transports) = devices(dir.path());
        assert_eq!(
            transports.len(),
            5,
            "the disk, the console, the RNG, the shared filesystem, the balloon"
        );
        restore_devices(&devices, serial.clone(), transports.clone()).unwrap();

        // The disk's state given to the console, the console's to the disk.
        let mut swapped = transports.clone();
        swapped.swap(0, 1);
        match restore_devices(&devices, serial.clone(), swapped) {
            Err(Error::DeviceState { device, source }) => {
                assert_eq!(device, "virtio device 0");
                assert!(
                    matches!(source, devices::PersistError::WrongDevice { .. }),
                    "{source}"
                );
            }
            other => panic!("restored: {other:?}"),
        }

        let mut overfull = serial.clone();
        overfull.in_buffer = vec![0; 1000];
        assert!(matches!(
            restore_devices(&devices, overfull, transports.clone()),
            Err(Error::DeviceState { .. })
        ));

        let mut fewer = transports;
        fewer.pop();
        assert!(matches!(
            restore_devices(&devices, serial, fewer),
            Err(Error::Snapshot(_))
        ));
    }
}
