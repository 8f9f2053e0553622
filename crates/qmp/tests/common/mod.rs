//! The test server: a dispatcher with a few commands (described in static schema tables), a
//! fixture that binds it on a fresh socket, and a raw line-oriented connection.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tern_qmp::schema::{Command, Event, IntKind, Member, Object, Type, EMPTY};
use tern_qmp::{
    parse_args, ClientCtx, Dispatcher, Limits, QemuVersion, QmpError, QmpServer, ServerConfig,
};

pub const FAILSAFE: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)]
pub struct TypedArgs {
    uri: String,
    max_bandwidth: Option<u64>,
}

#[derive(Default)]
pub struct TestDispatcher {
    pub started: Mutex<Option<Sender<()>>>,
    pub release: Mutex<Option<Receiver<()>>>,
    pub done: Mutex<Option<Sender<()>>>,
    pub quit: Mutex<Option<Sender<()>>>,
    pub server: Mutex<Option<Arc<QmpServer>>>,
}

pub const ANY_ARGS: &[Member] = &[
    Member::opt("a", Type::Any),
    Member::opt("i", Type::Any),
    Member::opt("k", Type::Any),
    Member::opt("q", Type::Any),
    Member::opt("s", Type::Any),
    Member::opt("t", Type::Any),
];

pub static ECHO_RET: Object = Object {
    name: "EchoRet",
    members: ANY_ARGS,
    variants: None,
};

pub static BIG_RET: Object = Object {
    name: "BigRet",
    members: &[Member::req("pad", Type::Str)],
    variants: None,
};

pub static TYPED_RET: Object = Object {
    name: "TypedRet",
    members: &[Member::req("uri", Type::Str)],
    variants: None,
};

pub const fn cmd(name: &'static str, args: &'static [Member], ret: Type) -> Command {
    Command {
        name,
        args,
        boxed: None,
        ret,
    }
}

pub static COMMANDS: [Command; 9] = [
    cmd("echo", ANY_ARGS, Type::Object(&ECHO_RET)),
    cmd("fail", &[], EMPTY),
    cmd(
        "typed",
        &[
            Member::req("uri", Type::Str),
            Member::opt("max-bandwidth", Type::Int(IntKind::Uint64)),
        ],
        Type::Object(&TYPED_RET),
    ),
    cmd("emit", &[], EMPTY),
    cmd("block", &[], Type::Any),
    cmd("quit", &[], EMPTY),
    cmd("quit-inline", &[], EMPTY),
    cmd("boom", &[], EMPTY),
    cmd(
        "big",
        &[Member::req("bytes", Type::Int(IntKind::Uint32))],
        Type::Object(&BIG_RET),
    ),
];

pub static EVENTS: [Event; 2] = [
    Event {
        name: "DURING",
        data: &[Member::req("n", Type::Int(IntKind::Int64))],
    },
    Event {
        name: "SHUTDOWN",
        data: &[Member::req("guest", Type::Bool)],
    },
];

impl Dispatcher for TestDispatcher {
    fn commands(&self) -> Vec<&'static Command> {
        COMMANDS.iter().collect()
    }

    fn events(&self) -> Vec<&'static Event> {
        EVENTS.iter().collect()
    }

    fn dispatch(
        &self,
        ctx: &ClientCtx,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match command {
            "echo" => Ok(Value::Object(args)),
            "fail" => Err(QmpError::device_not_found("Device 'x' not found")),
            "typed" => {
                let a: TypedArgs = parse_args(args)?;
                Ok(json!({ "uri": a.uri }))
            }
            "emit" => {
                ctx.events().emit("DURING", Some(json!({ "n": 1 })));
                Ok(json!({}))
            }
            "block" => {
                if let Some(tx) = self
                    .started
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                {
                    let _ = tx.send(());
                }
                let rx = self
                    .release
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(rx) = rx {
                    let _ = rx.recv_timeout(FAILSAFE);
                }
                if let Some(tx) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    ctx.after_reply(move || {
                        let _ = tx.send(());
                    });
                }
                Ok(json!({ "big": "x".repeat(100_000) }))
            }
            "quit" => {
                if let Some(tx) = self.quit.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    ctx.after_reply(move || {
                        let _ = tx.send(());
                    });
                }
                Ok(json!({}))
            }
            "quit-inline" => {
                let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
                let events = ctx.events().clone();
                ctx.after_reply(move || {
                    events.emit("SHUTDOWN", Some(json!({ "guest": false })));
                    if let Some(server) = server {
                        server.shutdown();
                    }
                });
                Ok(json!({}))
            }
            "boom" => panic!("dispatcher bug"),
            "big" => {
                let n = args.get("bytes").and_then(Value::as_u64).unwrap_or(0);
                Ok(json!({ "pad": "x".repeat(n as usize) }))
            }
            _ => Err(QmpError::command_not_found("unreachable")),
        }
    }
}

pub fn version() -> QemuVersion {
    QemuVersion {
        micro: 0,
        minor: 2,
        major: 8,
    }
}

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub server: Arc<QmpServer>,
    pub dispatcher: Arc<TestDispatcher>,
}

pub fn start_with(limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let dispatcher = Arc::new(TestDispatcher::default());
    let mut config = ServerConfig::new(version(), "tern-test");
    config.limits = limits;
    let server = QmpServer::bind(&path, dispatcher.clone(), config).expect("bind");
    Fixture {
        _dir: dir,
        path,
        server: Arc::new(server),
        dispatcher,
    }
}

pub fn start() -> Fixture {
    start_with(Limits::default())
}

/// A raw line-oriented connection for protocol-level tests.
pub struct Raw {
    pub writer: UnixStream,
    pub reader: BufReader<UnixStream>,
}

impl Raw {
    pub fn connect(path: &Path) -> (Raw, Value) {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(FAILSAFE)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut raw = Raw {
            writer: stream,
            reader,
        };
        let greeting = raw.recv();
        (raw, greeting)
    }

    pub fn negotiated(path: &Path) -> Raw {
        let (mut raw, _) = Raw::connect(path);
        assert_eq!(
            raw.call(r#"{"execute": "qmp_capabilities"}"#),
            json!({"return": {}})
        );
        raw
    }

    pub fn send(&mut self, s: &str) {
        self.writer.write_all(s.as_bytes()).expect("write");
    }

    pub fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read");
        assert!(n > 0, "unexpected EOF");
        assert!(line.ends_with("\r\n"), "QMP lines end with CRLF: {line:?}");
        serde_json::from_str(&line).expect("server sent valid JSON")
    }

    /// Sends `s` and its newline in one write, then reads one line. One write: the server
    /// parses the request before the newline arrives, and a newline still unread when the
    /// server drops this client would turn its close into ECONNRESET (AF_UNIX reports a
    /// close with unread data as a reset) instead of the EOF tests expect.
    pub fn call(&mut self, s: &str) -> Value {
        self.send(&format!("{s}\n"));
        self.recv()
    }

    pub fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .expect("read until EOF (fail-safe timeout hit?)");
    }
}

pub fn generic(desc: &str) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc}})
}
