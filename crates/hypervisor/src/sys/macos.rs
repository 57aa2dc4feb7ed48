//! macOS: Hypervisor.framework.

use crate::{Hypervisor, Result};

/// The hypervisor of this host, if this build has its backend.
pub fn open() -> Result<Box<dyn Hypervisor>> {
    #[cfg(feature = "hvf")]
    {
        Ok(Box::new(crate::hvf::Hvf::open()?))
    }
    #[cfg(not(feature = "hvf"))]
    {
        Err(crate::Error::Unsupported {
            backend: "this build",
            what: "Hypervisor.framework (built without the `hvf` feature)",
        })
    }
}
