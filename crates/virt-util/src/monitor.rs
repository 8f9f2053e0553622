//! A QMP monitor connection to a VMM (Tern or QEMU) over `tern-qmp`'s client, and a second
//! connection that only reads events.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_qmp::{ClientError, QmpClient};

use crate::UtilError;

/// Pause between connection attempts while a just-started VMM creates its socket.
const CONNECT_RETRY: Duration = Duration::from_millis(2);

fn connect_retry(
    path: &Path,
    timeout: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> Result<QmpClient, UtilError> {
    let deadline = Instant::now() + timeout;
    loop {
        match QmpClient::connect(path) {
            Ok(c) => return Ok(c),
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                if !alive() {
                    return Err(UtilError::Vmm(format!(
                        "the VMM exited before its QMP socket {} was ready",
                        path.display()
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(UtilError::Vmm(format!(
                        "the VMM's QMP socket {} was not ready within {timeout:?}",
                        path.display()
                    )));
                }
                // The VMM gives no other signal that it listens (its stderr goes to a log
                // file so that it survives the daemon): retry with a bounded deadline.
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => {
                return Err(UtilError::Qmp {
                    command: "connect".into(),
                    message: format!("{}: {e}", path.display()),
                })
            }
        }
    }
}

/// The control connection.
pub struct Monitor {
    client: QmpClient,
}

impl Monitor {
    /// Connects to `path`, retrying while the VMM is starting (`alive` says whether it still
    /// runs) for at most `timeout`.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<Monitor, UtilError> {
        let mut client = connect_retry(path, timeout, alive)?;
        client.set_timeout(Some(Duration::from_secs(60)));
        Ok(Monitor { client })
    }

    /// Runs a command; its `return` value, or the VMM's error text.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, UtilError> {
        let r = self.client.execute(command, args).map_err(|e| match e {
            ClientError::Closed => UtilError::MonitorClosed,
            e => UtilError::Qmp {
                command: command.into(),
                message: match e {
                    ClientError::Qmp(q) => q.desc,
                    e => e.to_string(),
                },
            },
        });
        // Events also arrive on this connection; the event connection handles them.
        let _ = self.client.take_events();
        r
    }

    /// Migration capabilities the VMM supports: those `query-migrate-capabilities` lists that
    /// can be switched on (Tern lists every QEMU name but refuses those it lacks). Each one
    /// found off is switched on and back off; call only while no migration runs.
    pub fn supported_capabilities(&mut self, wanted: &[&str]) -> Result<Vec<String>, UtilError> {
        let list = self.execute("query-migrate-capabilities", Value::Null)?;
        let mut out = Vec::new();
        for c in list.as_array().into_iter().flatten() {
            let Some(name) = c.get("capability").and_then(Value::as_str) else {
                continue;
            };
            if !wanted.contains(&name) {
                continue;
            }
            if c.get("state").and_then(Value::as_bool) == Some(true) {
                out.push(name.to_string());
                continue;
            }
            // Some need another on (switchover-ack needs return-path): try alone, then with
            // return-path; switch everything tried back off.
            for with_rp in [false, true] {
                let mut on = vec![json!({"capability": name, "state": true})];
                if with_rp {
                    on.insert(0, json!({"capability": "return-path", "state": true}));
                }
                if self
                    .execute("migrate-set-capabilities", json!({ "capabilities": on }))
                    .is_ok()
                {
                    let off: Vec<Value> = on
                        .iter()
                        .map(|c| json!({"capability": c["capability"], "state": false}))
                        .collect();
                    self.execute("migrate-set-capabilities", json!({ "capabilities": off }))?;
                    out.push(name.to_string());
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Sets capabilities by name.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), UtilError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({"capability": c, "state": s}))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))?;
        Ok(())
    }
}

/// The event connection: a second QMP client that only waits for events.
pub struct MonitorEvents {
    client: QmpClient,
}

impl MonitorEvents {
    /// Connects (the VMM is already up: no retry beyond `timeout`).
    pub fn connect(
        path: &Path,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<MonitorEvents, UtilError> {
        Ok(MonitorEvents {
            client: connect_retry(path, timeout, alive)?,
        })
    }

    /// The next event. `Ok(None)`: `timeout` passed; `Err(MonitorClosed)`: the VMM is gone.
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Option<Value>, UtilError> {
        match self.client.next_event(timeout) {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Timeout(_)) => Ok(None),
            Err(ClientError::Closed) => Err(UtilError::MonitorClosed),
            Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Err(UtilError::MonitorClosed)
            }
            Err(e) => Err(UtilError::Qmp {
                command: "(events)".into(),
                message: e.to_string(),
            }),
        }
    }
}
