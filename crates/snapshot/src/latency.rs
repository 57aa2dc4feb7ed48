//! How long restores from a snapshot took, phase by phase: a line per restore in the entry's
//! `latency` file, each field `phase=microseconds`, tab-separated (phase names hold spaces).
//! A file that grows past [`ROTATE_BYTES`] becomes `latency.old`, replacing the generation
//! before, so an entry keeps its last few hundred restores and no more. Best effort: a
//! sample lost to two rotations at once costs nothing but a sample.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// The phase a line's whole restore is recorded as: from the start of the launch to the
/// container created in the VM.
pub const CREATED: &str = "created";

const FILE: &str = "latency";
const OLD: &str = "latency.old";
/// About 300 restores of a dozen phases.
const ROTATE_BYTES: u64 = 48 << 10;

/// One restore: its phases in order, [`CREATED`] among them.
pub type Sample = Vec<(String, Duration)>;

/// Appends one restore's `phases` to the entry in `dir`.
pub fn record(dir: &Path, phases: &[(&str, Duration)]) -> std::io::Result<()> {
    let path = dir.join(FILE);
    if fs::metadata(&path).is_ok_and(|m| m.len() >= ROTATE_BYTES) {
        fs::rename(&path, dir.join(OLD))?;
    }
    let fields: Vec<String> = phases
        .iter()
        .map(|(name, took)| {
            format!(
                "{}={}",
                name.replace(['\t', '\n', '='], " "),
                took.as_micros()
            )
        })
        .collect();
    // One write of a line: appends from several processes do not interleave within it.
    let line = format!("{}\n", fields.join("\t"));
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?
        .write_all(line.as_bytes())
}

/// The restores recorded for the entry in `dir`, oldest first; lines that do not parse
/// (a torn write) are left out.
pub fn samples(dir: &Path) -> Vec<Sample> {
    [OLD, FILE]
        .iter()
        .filter_map(|name| fs::read_to_string(dir.join(name)).ok())
        .flat_map(|text| text.lines().filter_map(parse_line).collect::<Vec<_>>())
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    line.split('\t')
        .map(|field| {
            let (name, micros) = field.rsplit_once('=')?;
            Some((
                name.to_string(),
                Duration::from_micros(micros.parse().ok()?),
            ))
        })
        .collect::<Option<Sample>>()
        .filter(|sample| sample.iter().any(|(name, _)| name == CREATED))
}

/// A phase's median and 95th percentile over a set of restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhaseStats {
    pub phase: String,
    /// Restores that had this phase.
    pub count: usize,
    #[serde(serialize_with = "as_millis")]
    pub p50: Duration,
    #[serde(serialize_with = "as_millis")]
    pub p95: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

/// Each phase's [`PhaseStats`], [`CREATED`] first, then the phases in the order the
/// restores went through them.
pub fn stats(samples: &[Sample]) -> Vec<PhaseStats> {
    let mut order: Vec<&str> = vec![CREATED];
    for sample in samples {
        for (name, _) in sample {
            if !order.contains(&name.as_str()) {
                order.push(name);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|phase| {
            let mut took: Vec<Duration> = samples
                .iter()
                .flat_map(|s| s.iter().filter(|(n, _)| n == phase).map(|(_, d)| *d))
                .collect();
            took.sort();
            Some(PhaseStats {
                phase: phase.to_string(),
                count: took.len(),
                p50: percentile(&took, 50)?,
                p95: percentile(&took, 95)?,
            })
        })
        .collect()
}

/// The nearest-rank `p`th percentile of `sorted`: the smallest value with at least p% of the
/// values at or below it.
fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=20).map(ms).collect();
        assert_eq!(percentile(&values, 50), Some(ms(10)));
        assert_eq!(percentile(&values, 95), Some(ms(19)));
        assert_eq!(percentile(&[ms(7)], 95), Some(ms(7)));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn restores_recorded_come_back_as_each_phases_percentiles() {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=10 {
            record(
                dir.path(),
                &[
                    ("validate", ms(1)),
                    ("vmm start + memory map", ms(10 + i)),
                    (CREATED, ms(100 + i)),
                ],
            )
            .unwrap();
        }
        // A torn line, and a line without the whole restore, are left out.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        file.write_all(b"validate=5\tcreated=1\nvalidate=3\tvmm=x\n")
            .unwrap();
        let samples = samples(dir.path());
        assert_eq!(samples.len(), 11);
        let stats = stats(&samples[..10]);
        let names: Vec<&str> = stats.iter().map(|s| s.phase.as_str()).collect();
        assert_eq!(names, [CREATED, "validate", "vmm start + memory map"]);
        assert_eq!(
            (stats[0].count, stats[0].p50, stats[0].p95),
            (10, ms(105), ms(110))
        );
        assert_eq!((stats[2].p50, stats[2].p95), (ms(15), ms(20)));
    }

    #[test]
    fn a_full_file_becomes_the_old_generation_and_both_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let long = "x".repeat(200);
        let mut written = 0;
        while !dir.path().join(OLD).exists() {
            record(dir.path(), &[(long.as_str(), ms(1)), (CREATED, ms(2))]).unwrap();
            written += 1;
            assert!(written < 10_000, "never rotated");
        }
        assert_eq!(samples(dir.path()).len(), written);
        let kept = fs::metadata(dir.path().join(FILE)).unwrap().len();
        assert!(kept < ROTATE_BYTES, "{kept}");
        // The next rotation drops the oldest generation: what is kept stays bounded.
        for _ in 0..written {
            record(dir.path(), &[(long.as_str(), ms(1)), (CREATED, ms(2))]).unwrap();
        }
        assert!(samples(dir.path()).len() < 2 * written + 1);
    }
}
