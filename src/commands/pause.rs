//! `pause`: stop the VM's vCPUs.

use anyhow::Result;
use container::lifecycle;
use liboci_cli::Pause;

use super::Context;

pub fn run(args: Pause, context: &Context) -> Result<i32> {
    lifecycle::pause(&context.container(&args.container_id)?)?;
    Ok(0)
}
