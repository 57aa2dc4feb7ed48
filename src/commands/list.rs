//! `list`: the containers under `--root`.

use anyhow::{bail, Result};
use liboci_cli::List;

use super::Context;

pub fn run(args: List, context: &Context) -> Result<i32> {
    let states = context.store.list();
    if args.quiet {
        for state in &states {
            outln!("{}", state.id);
        }
        return Ok(0);
    }
    match args.format.as_str() {
        "json" => {
            let list: Vec<_> = states.iter().map(|s| s.oci_state()).collect();
            outln!("{}", serde_json::to_string(&list)?);
        }
        "table" => {
            outln!(
                "{:<24} {:<8} {:<10} {:<40} {:<32} OWNER",
                "ID",
                "PID",
                "STATUS",
                "BUNDLE",
                "CREATED"
            );
            for state in &states {
                let oci = state.oci_state();
                outln!(
                    "{:<24} {:<8} {:<10} {:<40} {:<32} root",
                    state.id,
                    oci.pid,
                    state.current_status(),
                    state.bundle.display(),
                    state.created
                );
            }
        }
        other => bail!("invalid format option {other:?}"),
    }
    Ok(0)
}
