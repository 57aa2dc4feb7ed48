//! `cache ls | stats | rm KEY | prune [--max-size SIZE]`: the snapshot cache.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use container::launch;
use snapshot::{SnapshotCache, SnapshotKey};

use super::Context;

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// List snapshots: key, image, size, created, last used, hits
    Ls {
        /// table or json
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// How long restores from each snapshot took: p50 and p95 per phase, over its last few
    /// hundred restores
    Stats {
        /// table or json
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Remove one snapshot
    Rm { key: String },
    /// Remove least recently used snapshots until the cache fits, and what an interrupted
    /// bake or removal left
    Prune {
        /// Target size (e.g. 2G); default: the configured maximum
        #[arg(long)]
        max_size: Option<String>,
    },
}

pub fn run(args: CacheArgs, context: &Context) -> Result<i32> {
    let limits = launch::cache_limits(None)?;
    let cache = SnapshotCache::new(context.paths.snapshots_dir(), limits);
    match args.command {
        CacheCommand::Ls { format } => {
            let entries = cache.list();
            match format.as_str() {
                "json" => outln!("{}", serde_json::to_string_pretty(&entries)?),
                "table" => {
                    outln!(
                        "{:<34} {:>9} {:<20} {:<20} {:>6}  IMAGE",
                        "KEY",
                        "SIZE",
                        "CREATED",
                        "LAST USED",
                        "HITS"
                    );
                    for e in entries {
                        outln!(
                            "{:<34} {:>8}M {:<20} {:<20} {:>6}  {}",
                            e.key,
                            e.size >> 20,
                            date(e.created),
                            date(e.last_used),
                            e.hits,
                            e.description
                        );
                    }
                }
                other => bail!("invalid format {other:?} (table or json)"),
            }
        }
        CacheCommand::Stats { format } => {
            let entries = cache.latency();
            match format.as_str() {
                "json" => outln!("{}", serde_json::to_string_pretty(&entries)?),
                "table" => {
                    outln!(
                        "{:<34} {:>8}  {:<28} {:>9} {:>9}  IMAGE",
                        "KEY",
                        "RESTORES",
                        "PHASE",
                        "P50 MS",
                        "P95 MS"
                    );
                    for e in entries {
                        for (i, phase) in e.phases.iter().enumerate() {
                            let (key, restores, image) = if i == 0 {
                                (
                                    e.key.as_str(),
                                    e.restores.to_string(),
                                    e.description.as_str(),
                                )
                            } else {
                                ("", String::new(), "")
                            };
                            outln!(
                                "{key:<34} {restores:>8}  {:<28} {:>9.1} {:>9.1}  {image}",
                                phase.phase,
                                phase.p50.as_secs_f64() * 1e3,
                                phase.p95.as_secs_f64() * 1e3
                            );
                        }
                    }
                }
                other => bail!("invalid format {other:?} (table or json)"),
            }
        }
        CacheCommand::Rm { key } => {
            let Some(key) = SnapshotKey::parse(&key) else {
                bail!("invalid snapshot key {key:?} (32 hex digits, as `cache ls` shows)");
            };
            cache.remove(&key)?;
        }
        CacheCommand::Prune { max_size } => {
            let max = match max_size {
                Some(text) => snapshot::parse_size(&text)?,
                None => limits.max_bytes,
            };
            for key in cache.prune(max, None) {
                outln!("removed {key}");
            }
        }
    }
    Ok(0)
}

fn date(secs: u64) -> String {
    let full = container::state::rfc3339(secs as i64, 0);
    full.get(..19).unwrap_or(&full).replace('T', " ")
}
