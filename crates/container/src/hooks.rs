//! OCI hooks that run on the host, as runc runs them: `createRuntime` and `prestart` during
//! `create` (once the monitor, and so the container's network namespace, exists),
//! `poststart` after `start`, `poststop` during `delete`. Each gets the container's state on
//! stdin. `createContainer` and `startContainer` hooks run in the container's namespaces, a
//! host program inside them; the container is a VM here, where a host program cannot run, so
//! a bundle with any fails `create` naming them rather than starting without them.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;
use serde::{Deserialize, Serialize};

use crate::{ContainerError, OciState};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostHooks {
    pub create_runtime: Vec<HookSpec>,
    pub prestart: Vec<HookSpec>,
    pub poststart: Vec<HookSpec>,
    pub poststop: Vec<HookSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookSpec {
    pub path: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub timeout: Option<u64>,
}

impl From<&Hook> for HookSpec {
    fn from(hook: &Hook) -> Self {
        HookSpec {
            path: hook.path().to_string_lossy().into_owned(),
            args: hook.args().clone().unwrap_or_default(),
            env: hook.env().clone().unwrap_or_default(),
            timeout: hook
                .timeout()
                .and_then(|t| u64::try_from(t).ok())
                .filter(|&t| t > 0),
        }
    }
}

impl HostHooks {
    pub fn from_spec(spec: &oci_spec::runtime::Spec) -> Result<Self, ContainerError> {
        let Some(hooks) = spec.hooks() else {
            return Ok(HostHooks::default());
        };
        let list =
            |h: &Option<Vec<Hook>>| h.iter().flatten().map(HookSpec::from).collect::<Vec<_>>();
        for (kind, in_container) in [
            ("createContainer", list(hooks.create_container())),
            ("startContainer", list(hooks.start_container())),
        ] {
            if let Some(hook) = in_container.first() {
                return Err(ContainerError::Unsupported(format!(
                    "{kind} hook {}: it would run in the container's namespaces, which are a VM \
                     here, where a host program cannot run",
                    hook.path
                )));
            }
        }
        #[allow(deprecated)]
        let prestart = list(hooks.prestart());
        Ok(HostHooks {
            create_runtime: list(hooks.create_runtime()),
            prestart,
            poststart: list(hooks.poststart()),
            poststop: list(hooks.poststop()),
        })
    }
}

/// Runs `hooks` in order with `state` on stdin; the first failure stops and is returned.
pub fn run(kind: &str, hooks: &[HookSpec], state: &OciState) -> Result<(), ContainerError> {
    let input = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        let fail =
            |why: String| ContainerError::Monitor(format!("{kind} hook {}: {why}", hook.path));
        let mut command = Command::new(&hook.path);
        if let Some((argv0, rest)) = hook.args.split_first() {
            command.arg0(argv0).args(rest);
        }
        command.env_clear();
        for var in &hook.env {
            if let Some((k, v)) = var.split_once('=') {
                command.env(k, v);
            }
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| fail(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&input);
        }
        let deadline = hook
            .timeout
            .map(|t| Instant::now() + Duration::from_secs(t));
        let status = loop {
            match child.try_wait().map_err(|e| fail(e.to_string()))? {
                Some(status) => break status,
                None if deadline.is_some_and(|d| Instant::now() >= d) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "timed out after {}s",
                        hook.timeout.unwrap_or(0)
                    )));
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let output = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        if !status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(fail(format!("{status}, stderr: {}", stderr.trim())));
        }
    }
    Ok(())
}

use std::os::unix::process::CommandExt;

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(script: &str) -> HookSpec {
        HookSpec {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["X=1".into()],
            timeout: Some(5),
        }
    }

    #[test]
    fn hooks_that_would_run_inside_the_container_are_refused_by_name() {
        for kind in ["createContainer", "startContainer"] {
            let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "hooks": { kind: [{ "path": "/usr/bin/in-container-hook" }] },
            }))
            .unwrap();
            let err = HostHooks::from_spec(&spec).unwrap_err().to_string();
            assert!(
                err.contains(kind) && err.contains("/usr/bin/in-container-hook"),
                "{err}"
            );
        }
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "hooks": { "prestart": [{ "path": "/bin/true" }] },
        }))
        .unwrap();
        assert_eq!(HostHooks::from_spec(&spec).unwrap().prestart.len(), 1);
    }

    fn state() -> OciState {
        OciState::new(
            "c1",
            crate::Status::Created,
            Some(42),
            std::path::Path::new("/bundle"),
            "",
            Default::default(),
        )
    }

    #[test]
    fn hooks_get_the_state_on_stdin_and_their_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("cat > {}; echo \" $X\" >> {}", out.display(), out.display());
        run("prestart", &[hook(&script)], &state()).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let (json, rest) = text.split_at(text.rfind('}').unwrap() + 1);
        let seen: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!((&seen["id"], &seen["pid"]), (&"c1".into(), &42.into()));
        assert_eq!(rest, " 1\n");
    }

    #[test]
    fn a_failing_hook_stops_the_chain_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let err = run(
            "poststop",
            &[
                hook("echo broken >&2; exit 3"),
                hook(&format!("touch {}", marker.display())),
            ],
            &state(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("poststop hook /bin/sh") && err.contains("broken"),
            "{err}"
        );
        assert!(!marker.exists());
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed() {
        let mut slow = hook("sleep 10");
        slow.timeout = Some(1);
        let started = Instant::now();
        let err = run("prestart", &[slow], &state()).unwrap_err().to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
