//! The hypervisor this host's OS offers: the crate's only `cfg(target_os)`.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "macos")]
mod macos;

#[cfg(target_os = "linux")]
pub use linux::open;
#[cfg(target_os = "macos")]
pub use macos::open;

/// No hypervisor backend exists for this OS.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub fn open() -> crate::Result<Box<dyn crate::Hypervisor>> {
    Err(crate::Error::Unsupported {
        backend: "this build",
        what: "any hypervisor on this OS",
    })
}
