//! Which accelerator QEMU should use here, measured rather than assumed.
//!
//! `/dev/kvm` existing is not enough: on a host that is itself a guest without nested
//! virtualisation (a PVM host), KVM runs guest kernel code through its instruction emulator,
//! ~100× slower than TCG. So the probe runs the same tiny guest, a real-mode firmware that
//! counts down a million-iteration loop between two serial bytes, under kvm and under tcg,
//! and picks kvm only when it runs that loop faster. The verdict is cached per host boot.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::EngineError;

/// Longest a probe guest may take before its accelerator is judged too slow.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelVerdict {
    pub accel: Accel,
    /// The `-cpu` model that goes with it.
    pub cpu: String,
    pub reason: String,
    /// Under TCG on an x86 host, the guest's TSC is the host's: its frequency, measured.
    pub tsc_khz: Option<u32>,
}

impl AccelVerdict {
    /// Kernel arguments this accelerator needs. A TCG guest has no paravirtual clock, and
    /// its calibration of the TSC against the PIT fails when TCG runs the loop unevenly (a
    /// busy host): the kernel then marks the TSC unstable and keeps time in jiffies, which
    /// rules out a tickless idle, and a snapshot baked so keeps it for every restore.
    /// Given the frequency, the guest skips that calibration. The TSC it reads is then the
    /// host's constant-rate one, so it is also `reliable`: no clocksource watchdog comparing
    /// it against jiffies twice a second in every VM.
    pub fn kernel_args(&self) -> String {
        match (self.accel, self.tsc_khz) {
            (Accel::Tcg, Some(khz)) => format!("tsc_early_khz={khz} tsc=reliable"),
            _ => String::new(),
        }
    }
}

/// The host TSC's frequency in kHz, from two readings against `CLOCK_MONOTONIC_RAW` 10 ms
/// apart (each taken where the clock reads around it were closest); none without a
/// constant-rate TSC.
pub fn host_tsc_khz() -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
        if !flags.split_whitespace().any(|f| f == "constant_tsc") {
            return None;
        }
        let raw_ns = || {
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_RAW)
                .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
                .unwrap_or(0)
        };
        // (ns between the clock reads around it, ns at the TSC read, TSC)
        let reading = || {
            (0..5)
                .map(|_| {
                    let before = raw_ns();
                    // SAFETY: RDTSC has no side effects and is available on every x86_64.
                    let tsc = unsafe { core::arch::x86_64::_rdtsc() };
                    let after = raw_ns();
                    (after - before, (before + after) / 2, tsc)
                })
                .min()
        };
        let (_, ns0, tsc0) = reading()?;
        std::thread::sleep(Duration::from_millis(10));
        let (_, ns1, tsc1) = reading()?;
        let khz = i128::from(tsc1.wrapping_sub(tsc0)) * 1_000_000 / (ns1 - ns0).max(1);
        u32::try_from(khz).ok().filter(|k| *k > 100_000)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// The firmware: print 'S', loop 2^20 times, print 'E', halt.
fn probe_firmware() -> Vec<u8> {
    let mut rom = vec![0xf4u8; 64 << 10]; // hlt everywhere else
    #[rustfmt::skip]
    let code: [u8; 23] = [
        0xba, 0xf8, 0x03,                   // mov dx, 0x3f8 (COM1)
        0xb0, b'S',                         // mov al, 'S'
        0xee,                               // out dx, al
        0x66, 0xb9, 0x00, 0x00, 0x10, 0x00, // mov ecx, 0x100000
        0x66, 0x49,                         // dec ecx
        0x75, 0xfc,                         // jnz dec
        0xb0, b'E',                         // mov al, 'E'
        0xee,                               // out dx, al
        0xfa,                               // cli
        0xf4,                               // hlt
        0xeb, 0xfd,                         // jmp hlt
    ];
    rom[..code.len()].copy_from_slice(&code);
    // The reset vector (top of the ROM): jmp far F000:0000, the ROM's base below 1 MiB.
    rom[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    rom
}

/// Runs the firmware under one accelerator; the loop's duration, or why it did not run.
fn time_loop(qemu: &str, firmware: &Path, accel: Accel, cpu: &str) -> Result<Duration, String> {
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=off,pit=off,pic=off",
        ])
        .args(["-accel", &accel.to_string(), "-cpu", cpu, "-m", "16"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-bios")
        .arg(firmware)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {qemu}: {e}"))?;
    let result = read_markers(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    result.map_err(|e| {
        let mut stderr = String::new();
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut stderr);
        }
        match stderr.lines().find(|l| !l.trim().is_empty()) {
            Some(line) => format!("{e}: {}", line.trim()),
            None => e,
        }
    })
}

fn read_markers(child: &mut Child) -> Result<Duration, String> {
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while let Ok(1) = stdout.read(&mut byte) {
            if tx.send((byte[0], Instant::now())).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut start = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((b'S', at)) => start = Some(at),
            Ok((b'E', at)) => {
                return start
                    .map(|s| at - s)
                    .ok_or_else(|| "no start marker".to_string())
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(match start {
                    Some(_) => format!("loop not done after {PROBE_TIMEOUT:?}"),
                    None => "the probe guest did not start".to_string(),
                })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err("QEMU exited".to_string())
            }
        }
    }
}

fn measure(qemu: &str, dir: &Path) -> Result<AccelVerdict, EngineError> {
    let firmware = dir.join(format!(".probe-{}.rom", std::process::id()));
    fs::write(&firmware, probe_firmware()).map_err(|source| EngineError::Io {
        path: firmware.clone(),
        source,
    })?;
    let tcg = time_loop(qemu, &firmware, Accel::Tcg, "max");
    let kvm_available = Path::new("/dev/kvm").exists();
    let mut kvm = Err("/dev/kvm is absent".to_string());
    if kvm_available {
        // Some hosts refuse to let QEMU set IA32_ARCH_CAPABILITIES; try without it second.
        for cpu in ["host", "host,-arch-capabilities"] {
            kvm = time_loop(qemu, &firmware, Accel::Kvm, cpu).map(|t| (t, cpu));
            if kvm.is_ok() {
                break;
            }
        }
    }
    let _ = fs::remove_file(&firmware);
    let tcg = match tcg {
        Ok(t) => t,
        Err(e) if e.starts_with("cannot run") => {
            return Err(EngineError::QemuMissing {
                binary: qemu.to_string(),
            })
        }
        Err(e) => {
            return Err(EngineError::Unavailable(
                "qemu".into(),
                format!("tcg probe: {e}"),
            ))
        }
    };
    Ok(match kvm {
        Ok((k, cpu)) if k < tcg => AccelVerdict {
            accel: Accel::Kvm,
            cpu: cpu.to_string(),
            reason: format!("probe loop {k:.1?} under kvm, {tcg:.1?} under tcg"),
            tsc_khz: None,
        },
        Ok((k, _)) => AccelVerdict {
            accel: Accel::Tcg,
            cpu: "max".into(),
            reason: format!(
                "kvm emulates guest kernel code here (nested or PVM host): probe loop {k:.1?} \
                 under kvm, {tcg:.1?} under tcg"
            ),
            tsc_khz: None,
        },
        Err(e) => AccelVerdict {
            accel: Accel::Tcg,
            cpu: "max".into(),
            reason: format!("kvm unusable ({e}); probe loop {tcg:.1?} under tcg"),
            tsc_khz: None,
        },
    })
}

/// The cached verdict for this boot of this host and this QEMU, measuring it if needed.
/// `SUPERMACHINE_QEMU_ACCEL=kvm|tcg` overrides the probe.
pub fn accel_verdict(qemu: &str, dir: &Path) -> Result<AccelVerdict, EngineError> {
    let mut verdict = measured_verdict(qemu, &BootCache::this_boot(dir))?;
    if let Ok(cpu) = std::env::var("SUPERMACHINE_QEMU_CPU") {
        verdict.reason = format!("{}; cpu {cpu} set by SUPERMACHINE_QEMU_CPU", verdict.reason);
        verdict.cpu = cpu;
    }
    Ok(verdict)
}

fn measured_verdict(qemu: &str, cache: &BootCache) -> Result<AccelVerdict, EngineError> {
    let forced = match std::env::var("SUPERMACHINE_QEMU_ACCEL").as_deref() {
        Ok("kvm") => Some(Accel::Kvm),
        Ok("tcg") => Some(Accel::Tcg),
        _ => None,
    };
    // A forced verdict is cached too (apart from the measured one): its TSC measurement
    // would otherwise cost every command 10 ms. v2: verdicts carry the TSC frequency.
    cache.get_or_measure("accel-v2", &cache_key(qemu, forced), || {
        let mut verdict = match forced {
            Some(accel) => AccelVerdict {
                accel,
                cpu: if accel == Accel::Kvm { "host" } else { "max" }.into(),
                reason: "set by SUPERMACHINE_QEMU_ACCEL".into(),
                tsc_khz: None,
            },
            None => {
                fs::create_dir_all(&cache.dir).map_err(|source| EngineError::Io {
                    path: cache.dir.clone(),
                    source,
                })?;
                let verdict = measure(qemu, &cache.dir)?;
                log::debug!("accelerator probe: {} ({})", verdict.accel, verdict.reason);
                verdict
            }
        };
        if verdict.accel == Accel::Tcg {
            verdict.tsc_khz = host_tsc_khz();
        }
        Ok(Measured::Keep(verdict))
    })
}

/// What the accelerator verdict depends on besides the boot: the QEMU binary (its path and
/// modification time) and the accelerator SUPERMACHINE_QEMU_ACCEL forces, if any.
fn cache_key(qemu: &str, forced: Option<Accel>) -> String {
    let qemu_path = which(qemu).unwrap_or_else(|| PathBuf::from(qemu));
    let stamp = fs::metadata(&qemu_path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let forced = forced.map(|a| a.to_string()).unwrap_or_default();
    format!("{}|{stamp}|{forced}", qemu_path.display())
}

/// Verdicts measured once per host boot (a reboot may change the hypervisor, its modules or
/// the CPU's microcode), kept as JSON files in a directory: `<name>-<hash>.json`, the hash
/// over the boot id and what else the verdict depends on. Both engines' probes go through
/// it. A file that does not parse is measured again; writes are atomic (a temporary file
/// renamed), so concurrent commands never read half a verdict.
#[derive(Debug, Clone)]
pub struct BootCache {
    dir: PathBuf,
    boot_id: String,
}

/// What a measurement gives: a verdict to keep for this boot, or one to use once (a probe
/// that could not run says nothing lasting about the host).
#[derive(Debug)]
pub enum Measured<T> {
    Keep(T),
    Once(T),
}

impl BootCache {
    /// The cache in `dir` for this boot of this host.
    pub fn this_boot(dir: &Path) -> Self {
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        BootCache::new(dir, boot_id.trim())
    }

    pub fn new(dir: &Path, boot_id: &str) -> Self {
        BootCache {
            dir: dir.to_path_buf(),
            boot_id: boot_id.to_string(),
        }
    }

    /// The file of verdict `name` (its kind and format version, e.g. `accel-v2`) that
    /// depends on `key` besides the boot.
    pub fn file(&self, name: &str, key: &str) -> PathBuf {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("{}|{key}", self.boot_id).bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.dir.join(format!("{name}-{hash:016x}.json"))
    }

    /// The kept verdict `name` for `key`, or `measure`'s (kept if it says so). An error is
    /// not kept.
    pub fn get_or_measure<T, E>(
        &self,
        name: &str,
        key: &str,
        measure: impl FnOnce() -> Result<Measured<T>, E>,
    ) -> Result<T, E>
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let file = self.file(name, key);
        if let Some(kept) = fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            return Ok(kept);
        }
        match measure()? {
            Measured::Once(verdict) => Ok(verdict),
            Measured::Keep(verdict) => {
                self.keep(&file, &verdict);
                Ok(verdict)
            }
        }
    }

    /// Best effort: without a cache the next command measures again.
    fn keep<T: Serialize>(&self, file: &Path, verdict: &T) {
        let Ok(bytes) = serde_json::to_vec_pretty(verdict) else {
            return;
        };
        if let Err(e) = fs::create_dir_all(&self.dir) {
            log::debug!("probe cache {}: {e}", self.dir.display());
            return;
        }
        let partial = file.with_extension(format!("partial-{}", std::process::id()));
        if fs::write(&partial, bytes).is_ok() && fs::rename(&partial, file).is_err() {
            let _ = fs::remove_file(&partial);
        }
    }
}

/// `binary` as a path if it names one, else where it is on PATH.
pub fn which(binary: &str) -> Option<PathBuf> {
    if binary.contains('/') {
        return Some(PathBuf::from(binary));
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_has_reset_vector_and_serial_markers() {
        let rom = probe_firmware();
        assert_eq!(rom.len(), 65536);
        assert_eq!(&rom[0xfff0..0xfff5], &[0xea, 0, 0, 0, 0xf0]);
        assert_eq!(rom.iter().filter(|&&b| b == b'S').count(), 1);
        assert_eq!(rom.iter().filter(|&&b| b == b'E').count(), 1);
    }

    #[test]
    fn env_override_skips_the_probe() {
        // Not run in parallel with anything else reading this variable in this crate.
        std::env::set_var("SUPERMACHINE_QEMU_ACCEL", "tcg");
        let v = accel_verdict("/nonexistent/qemu", Path::new("/nonexistent")).unwrap();
        std::env::remove_var("SUPERMACHINE_QEMU_ACCEL");
        assert_eq!(v.accel, Accel::Tcg);
    }

    #[test]
    fn only_tcg_guests_are_told_the_tsc_frequency() {
        let mut v = AccelVerdict {
            accel: Accel::Tcg,
            cpu: "max".into(),
            reason: String::new(),
            tsc_khz: Some(2_099_999),
        };
        assert_eq!(v.kernel_args(), "tsc_early_khz=2099999 tsc=reliable");
        v.tsc_khz = None;
        assert_eq!(v.kernel_args(), "");
        v.accel = Accel::Kvm;
        v.tsc_khz = Some(2_099_999);
        assert_eq!(v.kernel_args(), "");
    }

    #[test]
    fn the_host_tsc_frequency_agrees_with_the_clock() {
        let Some(khz) = host_tsc_khz() else {
            eprintln!("skipped: this host has no constant-rate TSC to measure");
            return;
        };
        // Two measurements agree within 0.5%.
        let again = host_tsc_khz().unwrap();
        let diff = (i64::from(khz) - i64::from(again)).abs();
        assert!(diff * 200 < i64::from(khz), "{khz} kHz vs {again} kHz");
        assert!((100_000..20_000_000).contains(&khz), "{khz} kHz");
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Verdict(u32);

    #[test]
    fn a_kept_verdict_is_measured_once_per_boot_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let measures = std::cell::Cell::new(0);
        let measure = |v| {
            measures.set(measures.get() + 1);
            Ok::<_, String>(Measured::Keep(Verdict(v)))
        };
        let boot = BootCache::new(dir.path(), "boot-1");
        assert_eq!(
            boot.get_or_measure("v1", "k", || measure(1)),
            Ok(Verdict(1))
        );
        assert_eq!(
            boot.get_or_measure("v1", "k", || measure(2)),
            Ok(Verdict(1))
        );
        assert_eq!(measures.get(), 1, "the second call read the file");
        assert_eq!(
            boot.get_or_measure("v1", "other", || measure(3)),
            Ok(Verdict(3))
        );
        assert_eq!(
            boot.get_or_measure("v2", "k", || measure(4)),
            Ok(Verdict(4))
        );
        let next_boot = BootCache::new(dir.path(), "boot-2");
        assert_eq!(
            next_boot.get_or_measure("v1", "k", || measure(5)),
            Ok(Verdict(5))
        );
        assert_eq!(measures.get(), 4);
        // Every file is a finished verdict: no temporary left behind.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names.iter().all(|n| n.ends_with(".json")), "{names:?}");
    }

    #[test]
    fn verdicts_to_use_once_errors_and_unreadable_files_are_measured_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BootCache::new(&dir.path().join("made-on-demand"), "boot");
        let once = cache.get_or_measure("v1", "k", || Ok::<_, String>(Measured::Once(Verdict(1))));
        assert_eq!(once, Ok(Verdict(1)));
        let failed = cache.get_or_measure::<Verdict, _>("v1", "k", || Err("no probe".to_string()));
        assert_eq!(failed, Err("no probe".to_string()));
        assert!(!cache.file("v1", "k").exists(), "neither was kept");

        fs::write(cache.file("v1", "k"), b"{ half a verdi").ok();
        let again = cache.get_or_measure("v1", "k", || Ok::<_, String>(Measured::Keep(Verdict(2))));
        assert_eq!(again, Ok(Verdict(2)));
        assert_eq!(
            cache.get_or_measure("v1", "k", || Ok::<_, String>(Measured::Keep(Verdict(3)))),
            Ok(Verdict(2))
        );
    }
}
