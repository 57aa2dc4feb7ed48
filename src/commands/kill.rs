//! `kill ID [SIGNAL]`: signal the container's process (or, with `--all`, all of them).

use anyhow::Result;
use container::{lifecycle, signal};

use super::Context;

pub fn run(args: crate::KillArgs, context: &Context) -> Result<i32> {
    let signal = signal::parse(if args.signal.is_empty() {
        "SIGTERM"
    } else {
        &args.signal
    })?;
    lifecycle::kill(&context.container(&args.container_id)?, signal, args.all)?;
    Ok(0)
}
