//! End-to-end tests over real unix sockets and real threads. Channels (with generous
//! fail-safe timeouts) synchronise; nothing sleeps and nothing asserts on timing.

mod common;

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tern_qmp::{ClientError, ErrorClass, Limits, QmpClient, QmpError, QmpServer, ServerConfig};

#[test]
fn greeting_format() {
    let f = start();
    let (_raw, greeting) = Raw::connect(&f.path);
    assert_eq!(
        greeting,
        json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8},
                                   "package": "tern-test"},
                       "capabilities": []}})
    );
}

#[test]
fn capabilities_negotiation_rules() {
    let f = start();
    let (mut raw, _) = Raw::connect(&f.path);
    let expecting = json!({"error": {"class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1});
    assert_eq!(raw.call(r#"{"execute": "echo", "id": 1}"#), expecting);
    assert_eq!(raw.call(r#"{"execute": "nope", "id": 1}"#), expecting);
    assert_eq!(
        raw.call(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#),
        generic("Capability oob not available")
    );
    assert_eq!(
        raw.call(r#"{"execute": "qmp_capabilities", "arguments": {"x": 1}}"#),
        generic("Parameter 'x' is unexpected")
    );
    assert_eq!(
        raw.call(r#"{"execute": "qmp_capabilities", "id": "c"}"#),
        json!({"return": {}, "id": "c"})
    );
    assert_eq!(
        raw.call(r#"{"execute": "qmp_capabilities"}"#),
        json!({"error": {"class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored"}})
    );
    assert_eq!(
        raw.call(r#"{"execute": "echo", "arguments": {"a": 1}}"#),
        json!({"return": {"a": 1}})
    );
}

#[test]
fn id_is_echoed_whatever_its_type() {
    let f = start();
    let mut raw = Raw::negotiated(&f.path);
    for id in [
        json!(1),
        json!("s"),
        json!(null),
        json!({"a": [1, {"b": null}]}),
        json!([1.5]),
    ] {
        let req = json!({"execute": "echo", "id": id}).to_string();
        assert_eq!(raw.call(&req), json!({"return": {}, "id": id}));
        let req = json!({"execute": "nope", "id": id}).to_string();
        assert_eq!(raw.call(&req)["id"], id);
        let req = json!({"execute": 3, "id": id}).to_string();
        assert_eq!(raw.call(&req)["id"], id);
    }
    assert_eq!(
        raw.call(r#"{"execute": "fail", "id": 7}"#),
        json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": 7})
    );
}

#[test]
fn query_commands_lists_dispatcher_commands() {
    let f = start();
    let mut client = QmpClient::connect(&f.path).expect("connect");
    let list = client
        .execute("query-commands", Value::Null)
        .expect("query-commands");
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for n in ["qmp_capabilities", "query-commands", "echo", "quit"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let err = client
        .execute("query-commands", json!({"x": 1}))
        .expect_err("args rejected");
    assert!(matches!(err, ClientError::Qmp(e) if e.desc == "Parameter 'x' is unexpected"));
}

#[test]
fn protocol_errors_use_qemu_texts_and_keep_the_connection() {
    let f = start();
    let mut raw = Raw::negotiated(&f.path);
    let cases: &[(&str, Value)] = &[
        ("[1, 2]", generic("QMP input must be a JSON object")),
        ("42", generic("QMP input must be a JSON object")),
        (
            r#"{"execute": 1}"#,
            generic("QMP input member 'execute' must be a string"),
        ),
        (
            r#"{"execute": "echo", "arguments": []}"#,
            generic("QMP input member 'arguments' must be an object"),
        ),
        (
            r#"{"execute": "echo", "foo": 1}"#,
            generic("QMP input member 'foo' is unexpected"),
        ),
        (
            r#"{"arguments": {}}"#,
            generic("QMP input lacks member 'execute'"),
        ),
        (
            r#"{"exec-oob": "echo", "id": 3}"#,
            json!({"error": {"class": "GenericError",
                "desc": "QMP input member 'exec-oob' is unexpected"}, "id": 3}),
        ),
        (
            r#"{"execute": "nope"}"#,
            json!({"error": {"class": "CommandNotFound",
                "desc": "The command nope has not been found"}}),
        ),
        (
            r#"{"execute": "typed"}"#,
            generic("Parameter 'uri' is missing"),
        ),
        (
            r#"{"execute": "typed", "arguments": {"uri": 5}}"#,
            generic("Invalid parameter type for 'uri', expected: string"),
        ),
        (
            r#"{"execute": "typed", "arguments": {"uri": "u", "bogus": 1}}"#,
            generic("Parameter 'bogus' is unexpected"),
        ),
        (
            r#"{"execute": "typed", "arguments": {"uri": "u", "max-bandwidth": -1}}"#,
            generic("Parameter 'max-bandwidth' expects uint64"),
        ),
        ("}", generic("JSON parse error, expecting value")),
    ];
    for (input, expected) in cases {
        assert_eq!(&raw.call(input), expected, "input {input}");
    }
    // Like QEMU: a lexical error discards the partial message, the lexer skips to the next
    // structural character, and that stray '}' is an error of its own.
    assert_eq!(
        raw.call("{\"execute\": @ junk}"),
        generic("JSON parse error, stray '@'")
    );
    assert_eq!(raw.recv(), generic("JSON parse error, expecting value"));
    // Structurally balanced but invalid JSON goes to the parser.
    let v = raw.call(r#"{"execute" "echo"}"#);
    let desc = v["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.starts_with("JSON parse error, "), "{v}");
    // A dispatcher panic is an error reply, not a dead connection.
    let v = raw.call(r#"{"execute": "boom"}"#);
    assert_eq!(v["error"]["class"], "GenericError");
    assert_eq!(raw.call(r#"{"execute": "echo"}"#), json!({"return": {}}));
}

#[test]
fn streaming_framing_like_qemu() {
    let f = start();
    let mut raw = Raw::negotiated(&f.path);
    // Two messages on one line, no newline needed between them.
    raw.send(r#"{"execute": "echo", "id": 1}{"execute": "echo", "id": 2}"#);
    assert_eq!(raw.recv()["id"], 1);
    assert_eq!(raw.recv()["id"], 2);
    // One message split across writes and lines.
    raw.send("{\"execute\":\n");
    raw.send("\"echo\", \"arguments\": {\"s\": \"a}b{\\\"c\"}\n");
    raw.send("}");
    assert_eq!(raw.recv(), json!({"return": {"s": "a}b{\"c"}}));
    // QEMU's single-quoted strings.
    assert_eq!(
        raw.call(r#"{'execute': 'echo', 'arguments': {'q': 'it''s "x"'}}"#)["error"]["class"],
        "GenericError"
    );
    assert_eq!(
        raw.call(r#"{'execute': 'echo', 'arguments': {'q': 'it\'s "x"'}}"#),
        json!({"return": {"q": "it's \"x\""}})
    );
    // An unterminated string resynchronises at the newline.
    raw.send("{\"execute\": \"ec\n");
    assert_eq!(raw.recv(), generic("JSON parse error, stray '\\x0a'"));
    assert_eq!(raw.call(r#"{"execute": "echo", "id": 5}"#)["id"], 5);
    // A 0xFF byte forces the parser back into a known state, even mid-object.
    raw.writer
        .write_all(b"{\"execute\": [[\xff")
        .expect("write");
    assert_eq!(raw.recv(), generic("JSON parse error, stray '\\xff'"));
    assert_eq!(raw.call(r#"{"execute": "echo", "id": 6}"#)["id"], 6);
}

#[test]
fn nesting_depth_is_limited() {
    let f = start();
    let mut raw = Raw::negotiated(&f.path);
    let deep = format!(
        "{{\"execute\": \"echo\", \"arguments\": {{\"a\": {}{}}}}}",
        "[".repeat(500),
        "]".repeat(500)
    );
    assert_eq!(
        raw.call(&deep),
        generic("JSON nesting depth limit exceeded")
    );
    assert_eq!(raw.call(r#"{"execute": "echo", "id": 1}"#)["id"], 1);
    let ok = format!(
        "{{\"execute\": \"echo\", \"arguments\": {{\"a\": {}{}}}}}",
        "[".repeat(50),
        "]".repeat(50)
    );
    assert!(raw.call(&ok).get("return").is_some());
}

#[test]
fn hundred_mib_without_newline_closes_only_that_client() {
    let f = start();
    let (raw, _) = Raw::connect(&f.path);
    let Raw { writer, mut reader } = raw;
    let flood = thread::Builder::new()
        .name("test-flood".into())
        .spawn(move || {
            let mut w = writer;
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            if w.write_all(b"{\"execute\": \"echo\", \"arguments\": {\"s\": \"")
                .is_err()
            {
                return sent;
            }
            for _ in 0..100 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        })
        .expect("spawn");
    let mut line = String::new();
    reader.read_line(&mut line).expect("error reply");
    let v: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["error"]["class"], "GenericError");
    assert!(
        v["error"]["desc"]
            .as_str()
            .unwrap_or_default()
            .contains("size limit"),
        "{v}"
    );
    // Then the connection is closed: EOF, or a reset because the server dropped unread input.
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    let sent = flood.join().expect("flood thread");
    assert!(
        sent < 100 << 20,
        "the server must close before reading it all"
    );
    // Other clients are unaffected.
    let mut client = QmpClient::connect(&f.path).expect("connect");
    assert_eq!(
        client.execute("echo", json!({"k": 1})).expect("echo"),
        json!({"k": 1})
    );
}

#[test]
fn events_reach_negotiated_clients_with_timestamps() {
    let f = start();
    let mut a = QmpClient::connect(&f.path).expect("a");
    let mut b = Raw::negotiated(&f.path);
    let (mut pending, _) = Raw::connect(&f.path);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    f.server.events().emit("STOP", None);
    f.server
        .events()
        .emit("MIGRATION", Some(json!({"status": "active"})));
    let stop = a.wait_event("STOP", FAILSAFE).expect("STOP");
    assert!(stop.get("data").is_none());
    let ts = &stop["timestamp"];
    assert!(ts["seconds"].as_u64().expect("seconds") >= before);
    assert!(ts["microseconds"].as_u64().expect("us") < 1_000_000);
    let mig = a.wait_event("MIGRATION", FAILSAFE).expect("MIGRATION");
    assert_eq!(mig["data"], json!({"status": "active"}));
    let raw_stop = b.recv();
    assert_eq!(raw_stop["event"], "STOP");
    assert_eq!(b.recv()["event"], "MIGRATION");
    // Not negotiated: no events, the next line is the reply.
    assert_eq!(
        pending.call(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    // Events emitted during a command are buffered by the client while it waits for the reply.
    a.execute("emit", Value::Null).expect("emit");
    let during = a.wait_event("DURING", Duration::ZERO).expect("buffered");
    assert_eq!(during["data"], json!({"n": 1}));
    f.server.events().emit("X", None);
    a.execute("echo", Value::Null).expect("echo");
    let taken = a.take_events();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0]["event"], "X");
    assert!(matches!(
        a.wait_event("NEVER", Duration::ZERO),
        Err(ClientError::Timeout(_))
    ));
}

#[test]
fn slow_client_is_dropped_and_emitter_never_blocks() {
    let f = start_with(Limits {
        max_pending_output: 64 << 10,
        ..Limits::default()
    });
    let mut slow = Raw::negotiated(&f.path);
    let events = f.server.events();
    let payload = json!({"pad": "p".repeat(1024)});
    for _ in 0..10_000 {
        events.emit("FLOOD", Some(payload.clone()));
    }
    // The slow client got what fitted, then was disconnected.
    slow.expect_eof();
    let mut client = QmpClient::connect(&f.path).expect("connect");
    client.execute("echo", Value::Null).expect("echo");
}

#[test]
fn client_vanishing_mid_command_does_not_wedge_anything() {
    let f = start();
    let (started_tx, started_rx) = channel();
    let (release_tx, release_rx) = channel();
    let (done_tx, done_rx) = channel();
    *f.dispatcher.started.lock().expect("lock") = Some(started_tx);
    *f.dispatcher.release.lock().expect("lock") = Some(release_rx);
    *f.dispatcher.done.lock().expect("lock") = Some(done_tx);
    let mut raw = Raw::negotiated(&f.path);
    raw.send(r#"{"execute": "block"}"#);
    started_rx.recv_timeout(FAILSAFE).expect("command started");
    drop(raw);
    // Other clients are served while that command is stuck.
    let mut other = QmpClient::connect(&f.path).expect("connect");
    other.execute("echo", Value::Null).expect("echo");
    release_tx.send(()).expect("release");
    // The after-reply action runs once the (failed) write is done: the thread got through.
    done_rx.recv_timeout(FAILSAFE).expect("reply attempted");
    other.execute("echo", Value::Null).expect("echo again");
}

#[test]
fn many_clients_connecting_and_vanishing() {
    let f = start_with(Limits {
        max_clients: 10_000,
        ..Limits::default()
    });
    for i in 0..300 {
        let mut s = UnixStream::connect(&f.path).expect("connect");
        match i % 3 {
            0 => {}
            1 => {
                let _ = s.write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"ec");
            }
            _ => {
                let _ = s.write_all(b"{\"execute\": \"qmp_capabilities\"}\n");
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
        }
    }
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let path = f.path.clone();
            thread::Builder::new()
                .name(format!("test-client-{t}"))
                .spawn(move || {
                    let mut c = QmpClient::connect(&path).expect("connect");
                    for i in 0..100 {
                        let v = c.execute("echo", json!({"t": t, "i": i})).expect("echo");
                        assert_eq!(v, json!({"t": t, "i": i}));
                    }
                })
                .expect("spawn")
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
}

#[test]
fn quit_replies_then_shutdown_flushes_and_closes() {
    let f = start();
    let (quit_tx, quit_rx) = channel();
    *f.dispatcher.quit.lock().expect("lock") = Some(quit_tx);
    let mut client = QmpClient::connect(&f.path).expect("connect");
    let mut bystander = Raw::negotiated(&f.path);
    assert_eq!(
        client.execute("quit", Value::Null).expect("quit"),
        json!({})
    );
    // The "main thread": woken by the after-reply action.
    quit_rx
        .recv_timeout(FAILSAFE)
        .expect("after-reply action ran");
    f.server.events().emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    f.server.shutdown();
    assert!(!f.path.exists(), "socket file removed");
    let ev = client.wait_event("SHUTDOWN", FAILSAFE).expect("SHUTDOWN");
    assert_eq!(ev["data"]["reason"], "host-qmp-quit");
    assert!(matches!(
        client.execute("echo", Value::Null),
        Err(ClientError::Closed | ClientError::Io(_))
    ));
    assert_eq!(bystander.recv()["event"], "SHUTDOWN");
    bystander.expect_eof();
    assert!(UnixStream::connect(&f.path).is_err());
    f.server.shutdown(); // idempotent
}

#[test]
fn shutdown_from_the_after_reply_action_itself() {
    let f = start();
    *f.dispatcher.server.lock().expect("lock") = Some(Arc::clone(&f.server));
    let mut client = QmpClient::connect(&f.path).expect("connect");
    assert_eq!(
        client.execute("quit-inline", Value::Null).expect("quit"),
        json!({})
    );
    let ev = client.wait_event("SHUTDOWN", FAILSAFE).expect("SHUTDOWN");
    assert_eq!(ev["data"]["guest"], false);
    let err = client.wait_event("NEVER", FAILSAFE).expect_err("closed");
    assert!(
        matches!(err, ClientError::Closed | ClientError::Io(_)),
        "{err}"
    );
    assert!(!f.path.exists());
}

#[test]
fn live_socket_is_not_stolen_and_stale_one_is_replaced() {
    let f = start();
    let again = QmpServer::bind(
        &f.path,
        Arc::new(TestDispatcher::default()),
        ServerConfig::new(version(), ""),
    );
    assert!(matches!(again, Err(tern_qmp::ServerError::AddrInUse(_))));
    // A stale socket file (nobody listening) is replaced.
    let dir = tempfile::tempdir().expect("tempdir");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let server = QmpServer::bind(
        &stale,
        Arc::new(TestDispatcher::default()),
        ServerConfig::new(version(), ""),
    )
    .expect("rebind stale");
    let mut c = QmpClient::connect(&stale).expect("connect");
    c.execute("echo", Value::Null).expect("echo");
    let err = c.execute("fail", Value::Null).expect_err("fails");
    assert!(matches!(
        err,
        ClientError::Qmp(QmpError {
            class: ErrorClass::DeviceNotFound,
            ..
        })
    ));
    drop(server);
    assert!(!stale.exists());
}
