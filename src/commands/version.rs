//! `--version`, in runc's three-line shape (docker parses the first line).

pub fn print() {
    println!("supermachine version {}", env!("CARGO_PKG_VERSION"));
    println!(
        "commit: {}",
        option_env!("SUPERMACHINE_COMMIT").unwrap_or("unknown")
    );
    println!("spec: 1.2.0");
}
