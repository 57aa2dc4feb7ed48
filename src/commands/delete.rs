//! `delete [--force] ID`: end the VM (if any) and remove everything the container left.

use anyhow::Result;
use container::{lifecycle, ContainerError};
use liboci_cli::Delete;

use super::Context;

pub fn run(args: Delete, context: &Context) -> Result<i32> {
    match context.container(&args.container_id) {
        Ok(container) => lifecycle::delete(&container, args.force)?,
        // As runc: forcing the delete of a container that is not there succeeds, after
        // removing whatever an aborted create left under its id.
        Err(e) if args.force && is_not_found(&e) => {
            if let Ok(dir) = context.store.create_dir_path(&args.container_id) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        Err(e) => return Err(e),
    }
    Ok(0)
}

fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ContainerError>(),
        Some(ContainerError::NotFound(_))
    )
}
