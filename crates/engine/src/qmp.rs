//! A minimal QMP client: capabilities negotiation, then one command at a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

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
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| EngineError::Control(format!("{command}: {e}")))?;
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
}
