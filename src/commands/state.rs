//! `state`: the OCI state of a container as JSON.

use anyhow::Result;
use liboci_cli::State;

use super::Context;

pub fn run(args: State, context: &Context) -> Result<i32> {
    let (_, state) = context.open(&args.container_id)?;
    outln!("{}", serde_json::to_string_pretty(&state.oci_state())?);
    Ok(0)
}
