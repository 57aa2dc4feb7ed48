//! The error of the container's setup: what failed, with the path or value it failed on.

#[derive(Debug)]
pub struct SetupError(pub String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Wraps an error in a [`SetupError`] that says `what` was being done.
pub fn err<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> SetupError {
    move |e| SetupError(format!("{what}: {e}"))
}
