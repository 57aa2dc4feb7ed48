//! Linux: KVM.

#[cfg(feature = "kvm")]
pub mod kvm;

use crate::{Hypervisor, Result};

/// The hypervisor of this host, if this build has its backend.
pub fn open() -> Result<Box<dyn Hypervisor>> {
    #[cfg(feature = "kvm")]
    {
        Ok(Box::new(kvm::Kvm::open()?))
    }
    #[cfg(not(feature = "kvm"))]
    {
        Err(crate::Error::Unsupported {
            backend: "this build",
            what: "KVM (built without the `kvm` feature)",
        })
    }
}
