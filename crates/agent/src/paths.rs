//! Paths and search lists every container image is read with, shared by process start-up
//! (`spawn`) and the reads before a snapshot (`warm`).

/// The `PATH` a program is searched in when the process's environment has none, as runc's.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where a process without HOME finds it.
pub const PASSWD: &str = "/etc/passwd";
