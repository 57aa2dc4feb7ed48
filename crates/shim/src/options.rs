//! Runtime options from containerd.
//!
//! containerd hands a non-runc shim its runtime options as `runtimeoptions.v1.Options`
//! (`ConfigPath` and/or `ConfigBody`): from a CRI runtime class
//! (`[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.supermachine.options]` with
//! `ConfigPath = "/etc/supermachine/shim.toml"`) or from `ctr run --runtime-config-path`.
//! The file (or body) holds `key = value` lines:
//!
//! ```toml
//! engine = "qemu"      # auto (default), qemu or builtin
//! memory_mib = 512     # guest memory when config.json sets no memory limit
//! vcpus = 2            # vCPUs when config.json sets no CPU limit
//! snapshots = false    # use the snapshot cache (default true)
//! debug = true         # agent diagnostics on the guest console
//! ```

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimOptions {
    pub engine: String,
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub snapshots: bool,
    pub debug: bool,
}

impl Default for ShimOptions {
    fn default() -> Self {
        ShimOptions {
            engine: std::env::var("SUPERMACHINE_ENGINE").unwrap_or_else(|_| "auto".into()),
            memory_mib: None,
            vcpus: None,
            snapshots: std::env::var("SUPERMACHINE_SNAPSHOTS")
                .map(|v| v != "off")
                .unwrap_or(true),
            debug: false,
        }
    }
}

const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

impl ShimOptions {
    /// The options of a CreateTaskRequest.
    pub fn from_any(any: Option<&Any>) -> Result<Self, String> {
        let mut options = ShimOptions::default();
        let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
            return Ok(options);
        };
        if !any.type_url.ends_with(RUNTIME_OPTIONS) {
            log::warn!("ignoring runtime options of type {}", any.type_url);
            return Ok(options);
        }
        let (path, body) = decode_runtime_options(&any.value)?;
        if let Some(path) = path.filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("runtime options {path}: {e}"))?;
            options.apply(&text)?;
        }
        if let Some(body) = body.filter(|b| !b.is_empty()) {
            options.apply(&String::from_utf8_lossy(&body))?;
        }
        Ok(options)
    }

    /// Applies `key = value` lines.
    pub fn apply(&mut self, text: &str) -> Result<(), String> {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() || line.starts_with('[') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("runtime options line {}: expected key = value", n + 1))?;
            let (key, value) = (
                key.trim().to_ascii_lowercase(),
                value.trim().trim_matches('"'),
            );
            let bad = || format!("runtime options: invalid {key} = {value}");
            match key.as_str() {
                "engine" => self.engine = value.to_string(),
                "memory_mib" => self.memory_mib = Some(value.parse().map_err(|_| bad())?),
                "vcpus" => self.vcpus = Some(value.parse().map_err(|_| bad())?),
                "snapshots" => self.snapshots = value.parse().map_err(|_| bad())?,
                "debug" => self.debug = value.parse().map_err(|_| bad())?,
                other => log::warn!("unknown runtime option {other}"),
            }
        }
        Ok(())
    }
}

/// `runtimeoptions.v1.Options { type_url = 1; config_path = 2; config_body = 3 }`.
fn decode_runtime_options(bytes: &[u8]) -> Result<(Option<String>, Option<Vec<u8>>), String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let (mut path, mut body) = (None, None);
    let err = |e: containerd_shim_protos::protobuf::Error| format!("runtime options: {e}");
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(err)? {
        match tag >> 3 {
            2 => path = Some(input.read_string().map_err(err)?),
            3 => body = Some(input.read_bytes().map_err(err)?),
            _ => {
                let wire_type = containerd_shim_protos::protobuf::rt::WireType::new(tag & 7)
                    .ok_or_else(|| "runtime options: bad wire type".to_string())?;
                input.skip_field(wire_type).map_err(err)?;
            }
        }
    }
    Ok((path, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_lines_set_options() {
        let mut o = ShimOptions {
            engine: "auto".into(),
            snapshots: true,
            ..Default::default()
        };
        o.apply("# comment\n[options]\nengine = \"qemu\"\nmemory_mib = 512 # trailing\nvcpus=2\nsnapshots = false\n").unwrap();
        assert_eq!(
            o,
            ShimOptions {
                engine: "qemu".into(),
                memory_mib: Some(512),
                vcpus: Some(2),
                snapshots: false,
                debug: false
            }
        );
        assert!(o.apply("memory_mib = lots").is_err());
    }

    #[test]
    fn runtime_options_message_is_decoded() {
        // field 1 "x", field 2 "/etc/p.toml", field 3 "vcpus = 3"
        let mut bytes = vec![0x0a, 1, b'x', 0x12, 11];
        bytes.extend_from_slice(b"/etc/p.toml");
        bytes.extend_from_slice(&[0x1a, 9]);
        bytes.extend_from_slice(b"vcpus = 3");
        let (path, body) = decode_runtime_options(&bytes).unwrap();
        assert_eq!(path.as_deref(), Some("/etc/p.toml"));
        assert_eq!(body.as_deref(), Some(&b"vcpus = 3"[..]));
        let mut value = vec![0x1a, 9];
        value.extend_from_slice(b"vcpus = 3");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(ShimOptions::from_any(Some(&any)).unwrap().vcpus, Some(3));
    }
}
