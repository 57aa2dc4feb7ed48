//! A minimal QMP client: capabilities negotiation, then one command at a time.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

use crate::EngineError;

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads the greeting and enters command mode.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, EngineError> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| EngineError::Control(format!("set timeout: {e}")))?;
        let writer = stream
            .try_clone()
            .map_err(|e| EngineError::Control(e.to_string()))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(EngineError::Control(format!(
                "unexpected QMP greeting: {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_value(&mut self) -> Result<Value, EngineError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| EngineError::Control(format!("read: {e}")))?;
        if n == 0 {
            return Err(EngineError::Control("QMP connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| EngineError::Control(format!("bad QMP reply: {e}")))
    }

    /// Runs a command and returns its `return` value; events in between are skipped.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, EngineError> {
        self.execute_with_fd(command, arguments, None)
    }

    /// Like [`Qmp::execute`], passing `fd` along with the command (SCM_RIGHTS), as `getfd`
    /// expects.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<RawFd>,
    ) -> Result<Value, EngineError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        let sent = match fd {
            None => self.writer.write_all(&bytes),
            Some(fd) => {
                let fds = [fd];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                let iov = [IoSlice::new(&bytes)];
                match sendmsg::<()>(
                    self.writer.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::empty(),
                    None,
                ) {
                    Ok(n) if n == bytes.len() => Ok(()),
                    Ok(n) => self.writer.write_all(&bytes[n..]),
                    Err(e) => Err(e.into()),
                }
            }
        };
        sent.map_err(|e| EngineError::Control(format!("{command}: {e}")))?;
        loop {
            let value = self.read_value()?;
            if let Some(result) = value.get("return") {
                return Ok(result.clone());
            }
            if let Some(error) = value.get("error") {
                return Err(EngineError::Control(format!("{command}: {error}")));
            }
            // An asynchronous event (STOP, RESUME, SHUTDOWN…): not the answer.
        }
    }

    /// Polls `query-migrate` until the migration (either direction) ends.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), EngineError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.execute("query-migrate", None)?;
            match status.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = status
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(EngineError::Control(format!("migration failed: {why}")));
                }
                _ if Instant::now() >= deadline => {
                    return Err(EngineError::Control(format!(
                        "migration not done after {timeout:?}"
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}
