//! runc-compatible logging: `--log FILE` (default stderr), `--log-format text|json`,
//! `--debug`. The caller (containerd's runc shim) reads the last `"level":"error"` line of
//! the JSON log to explain a failure, so every fatal error is logged there too.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lock_ext::LockExt;
use log::{Level, LevelFilter, Log, Metadata, Record};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug)]
struct Logger {
    sink: Mutex<Sink>,
    format: Format,
    level: LevelFilter,
}

#[derive(Debug)]
enum Sink {
    Stderr,
    File(File),
    Discard,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(self.format, record.level(), &record.args().to_string());
        let mut sink = self.sink.lock_unpoisoned();
        let _ = match &mut *sink {
            Sink::Stderr => std::io::stderr().write_all(line.as_bytes()),
            Sink::File(f) => f.write_all(line.as_bytes()),
            Sink::Discard => Ok(()),
        };
    }

    fn flush(&self) {}
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

pub fn format_line(format: Format, level: Level, message: &str) -> String {
    let time = container::state::rfc3339_now();
    match format {
        Format::Json => {
            let value =
                serde_json::json!({ "level": level_name(level), "msg": message, "time": time });
            format!("{value}\n")
        }
        Format::Text => {
            format!(
                "time=\"{time}\" level={} msg={:?}\n",
                level_name(level),
                message
            )
        }
    }
}

/// Where logs go for this invocation.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub file: Option<PathBuf>,
    pub format: Format,
    pub debug: bool,
}

impl LogConfig {
    pub fn new(file: Option<PathBuf>, format: Option<&str>, debug: bool) -> Result<Self, String> {
        let format = match format {
            None | Some("text") => Format::Text,
            Some("json") => Format::Json,
            Some(other) => return Err(format!("unknown log-format {other:?}")),
        };
        Ok(LogConfig {
            file,
            format,
            debug,
        })
    }

    /// Installs the logger. `stderr_is_container` is set in the monitor, whose stderr belongs
    /// to the container: without a log file its logs go to `fallback` (if any) instead.
    pub fn install(&self, stderr_is_container: bool, fallback: Option<&Path>) {
        let level = if self.debug {
            LevelFilter::Debug
        } else {
            std::env::var("SUPERMACHINE_LOG")
                .ok()
                .and_then(|l| l.parse().ok())
                .unwrap_or(LevelFilter::Warn)
        };
        let open = |p: &Path| OpenOptions::new().create(true).append(true).open(p).ok();
        let sink = match (&self.file, stderr_is_container) {
            (Some(path), _) if path != Path::new("/dev/stderr") || !stderr_is_container => {
                open(path).map(Sink::File).unwrap_or(Sink::Discard)
            }
            (_, true) => fallback
                .and_then(open)
                .map(Sink::File)
                .unwrap_or(Sink::Discard),
            (_, false) => Sink::Stderr,
        };
        let logger = Logger {
            sink: Mutex::new(sink),
            format: self.format,
            level,
        };
        if log::set_boxed_logger(Box::new(logger)).is_ok() {
            log::set_max_level(level);
        }
    }

    /// Reports a fatal error: to the log (as runc's shim expects) and to stderr.
    pub fn fatal(&self, message: &str) {
        if self.file.is_some() {
            log::error!("{message}");
        }
        eprintln!("supermachine: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_have_runc_fields() {
        let line = format_line(Format::Json, Level::Error, "container \"x\" does not exist");
        let value: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(value["level"], "error");
        assert_eq!(value["msg"], "container \"x\" does not exist");
        assert!(value["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn text_lines_quote_the_message() {
        let line = format_line(Format::Text, Level::Warn, "a \"b\"");
        assert!(line.contains("level=warning msg=\"a \\\"b\\\"\""), "{line}");
    }
}
