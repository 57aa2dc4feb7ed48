//! `start`: let the created container's process run.

use anyhow::Result;
use container::lifecycle;
use liboci_cli::Start;

use super::Context;

pub fn run(args: Start, context: &Context) -> Result<i32> {
    lifecycle::start(&context.container(&args.container_id)?)?;
    Ok(0)
}
