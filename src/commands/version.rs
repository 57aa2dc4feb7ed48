//! `--version`, in runc's three-line shape (docker parses the first line).

pub fn print() {
    outln!("supermachine version {}", env!("CARGO_PKG_VERSION"));
    outln!(
        "commit: {}",
        option_env!("SUPERMACHINE_COMMIT").unwrap_or("unknown")
    );
    outln!("spec: 1.2.0");
}
