//! A small blocking QMP client for tests, the CLI and benchmarks.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{ClientError, ErrorClass, QmpError};
use crate::framer::{FrameEvent, Framer};

/// Events kept while nobody takes them; the oldest are dropped beyond this.
const MAX_BUFFERED_EVENTS: usize = 100_000;
/// Largest server message accepted.
const MAX_MESSAGE: usize = 256 << 20;

/// A blocking QMP client. Events that arrive while waiting for a reply are buffered; take
/// them with [`QmpClient::wait_event`] or [`QmpClient::take_events`].
pub struct QmpClient {
    stream: UnixStream,
    framer: Framer,
    frames: VecDeque<Vec<u8>>,
    events: VecDeque<Value>,
    greeting: Value,
    next_id: u64,
    timeout: Option<Duration>,
    rbuf: Vec<u8>,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities (`qmp_capabilities`).
    pub fn connect(path: impl AsRef<Path>) -> Result<QmpClient, ClientError> {
        let mut client = Self::connect_raw(path)?;
        client.execute("qmp_capabilities", Value::Null)?;
        Ok(client)
    }

    /// Connects and reads the greeting, without negotiating.
    pub fn connect_raw(path: impl AsRef<Path>) -> Result<QmpClient, ClientError> {
        let stream = UnixStream::connect(path)?;
        let mut client = QmpClient {
            stream,
            framer: Framer::new(MAX_MESSAGE, 120),
            frames: VecDeque::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 0,
            timeout: Some(Duration::from_secs(60)),
            rbuf: vec![0; 64 << 10],
        };
        let deadline = client.deadline();
        let greeting = client.read_message(deadline, "the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        client.greeting = greeting;
        Ok(client)
    }

    /// The server's greeting (`{"QMP": {...}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// How long [`QmpClient::execute`] waits for a reply (`None`: forever). Default 60 s.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }

    /// Runs `name` with `args` (an object, or `Value::Null` for none) and returns its `return`
    /// value, or the server's error as [`ClientError::Qmp`]. Replies are matched by `id`;
    /// events received meanwhile are buffered.
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value, ClientError> {
        self.next_id += 1;
        let id = json!(format!("tern-{}", self.next_id));
        let mut request = json!({ "execute": name, "id": id });
        if !args.is_null() {
            request["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&request)
            .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?;
        bytes.push(b'\n');
        self.stream.write_all(&bytes)?;
        let deadline = self.deadline();
        loop {
            let msg = self.read_message(deadline, &format!("the reply to {name}"))?;
            if msg.get("event").is_some() {
                self.buffer_event(msg);
                continue;
            }
            if msg.get("id") != Some(&id) {
                tracing::debug!("QMP client: ignoring unmatched message {msg}");
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let class = err.get("class").and_then(Value::as_str).unwrap_or("");
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
                return Err(ClientError::Qmp(QmpError::new(
                    ErrorClass::from_wire(class),
                    desc,
                )));
            }
            return Err(ClientError::Protocol(format!("malformed reply {msg}")));
        }
    }

    /// Waits until an event called `name` arrives (or is already buffered), removes it from the
    /// buffer and returns the whole event object (`event`, `data`, `timestamp`). Other events
    /// stay buffered. Blocks in `read` with a socket timeout: no polling loop.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, ClientError> {
        if let Some(pos) = self.events.iter().position(|e| is_event(e, name)) {
            return Ok(self.events.remove(pos).unwrap_or(Value::Null));
        }
        let deadline = Some(Instant::now() + timeout);
        loop {
            let msg = self.read_message(deadline, &format!("event {name}"))?;
            if is_event(&msg, name) {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.buffer_event(msg);
            } else {
                tracing::debug!("QMP client: ignoring unmatched message {msg}");
            }
        }
    }

    /// Waits for the next event of any name (the oldest buffered one first); `None` waits for
    /// ever. Replies that arrive meanwhile (none are pending on an event-only connection) are
    /// dropped.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Value, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let msg = self.read_message(deadline, "an event")?;
            if msg.get("event").is_some() {
                return Ok(msg);
            }
            tracing::debug!("QMP client: ignoring non-event message {msg}");
        }
    }

    /// Takes every buffered event, oldest first, after reading those already received.
    pub fn take_events(&mut self) -> Vec<Value> {
        // Collect what is already in the socket without blocking.
        if self.stream.set_nonblocking(true).is_ok() {
            while let Ok(Some(msg)) = self.try_read_message() {
                if msg.get("event").is_some() {
                    self.buffer_event(msg);
                }
            }
            let _ = self.stream.set_nonblocking(false);
        }
        self.events.drain(..).collect()
    }

    fn buffer_event(&mut self, event: Value) {
        if self.events.len() >= MAX_BUFFERED_EVENTS {
            self.events.pop_front();
            tracing::warn!("QMP client: event buffer full, dropping the oldest event");
        }
        self.events.push_back(event);
    }

    fn parse_frame(frame: &[u8]) -> Result<Value, ClientError> {
        serde_json::from_slice(frame)
            .map_err(|e| ClientError::Protocol(format!("invalid JSON from server: {e}")))
    }

    /// Reads one message if one is available without blocking (socket must be non-blocking).
    fn try_read_message(&mut self) -> Result<Option<Value>, ClientError> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Self::parse_frame(&frame).map(Some);
            }
            match self.stream.read(&mut self.rbuf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.feed(n)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn read_message(
        &mut self,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<Value, ClientError> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Self::parse_frame(&frame);
            }
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout(what.to_string()));
                    }
                    Some(left)
                }
                None => None,
            };
            self.stream.set_read_timeout(timeout)?;
            match self.stream.read(&mut self.rbuf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.feed(n)?,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout(what.to_string()))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn feed(&mut self, n: usize) -> Result<(), ClientError> {
        for i in 0..n {
            let b = self.rbuf[i];
            loop {
                let step = self.framer.step(b);
                match step.event {
                    Some(FrameEvent::Message(m)) => self.frames.push_back(m),
                    Some(FrameEvent::Error(e)) => return Err(ClientError::Protocol(e)),
                    Some(FrameEvent::TooLarge) => {
                        return Err(ClientError::Protocol("server message too large".into()))
                    }
                    Some(FrameEvent::TooDeep) => {
                        return Err(ClientError::Protocol("server message too deep".into()))
                    }
                    None => {}
                }
                if step.consumed {
                    break;
                }
            }
        }
        Ok(())
    }
}

fn is_event(msg: &Value, name: &str) -> bool {
    msg.get("event").and_then(Value::as_str) == Some(name)
}
