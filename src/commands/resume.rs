//! `resume`: continue a paused VM.

use anyhow::Result;
use container::lifecycle;
use liboci_cli::Resume;

use super::Context;

pub fn run(args: Resume, context: &Context) -> Result<i32> {
    lifecycle::resume(&context.container(&args.container_id)?)?;
    Ok(0)
}
