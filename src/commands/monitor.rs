//! The hidden `monitor` verb: the container's host process, started by `create`.

use anyhow::Result;
use container::monitor::{self, MonitorArgs};

use super::Context;

pub fn run(args: crate::MonitorArgs, context: &Context) -> Result<i32> {
    let sync = monitor::take_sync_fd();
    Ok(monitor::run(
        MonitorArgs {
            state_root: context.store.root().to_path_buf(),
            id: args.id,
            console_socket: args.console_socket,
            engine: context.engine.clone(),
        },
        sync,
    ))
}
