//! QEMU conformance of the server: `query-qmp-schema` generated from the dispatcher's tables,
//! duplicate keys, and large replies to requests pipelined on one connection.

mod common;

use common::*;
use serde_json::{json, Value};
use tern_qmp::{ClientError, Limits, QmpClient, QmpSchema};

/// Sends `sizes.len()` requests for replies of `sizes[i]` bytes in one write, each ended by a
/// newline as QEMU's clients send them, then checks every reply arrives, in order.
fn pipelined_big_replies(f: &Fixture, sizes: &[usize]) {
    let mut raw = Raw::negotiated(&f.path);
    let mut batch = String::new();
    for (i, n) in sizes.iter().enumerate() {
        batch.push_str(&format!(
            "{{\"execute\": \"big\", \"arguments\": {{\"bytes\": {n}}}, \"id\": {i}}}\n"
        ));
    }
    raw.send(&batch);
    for (i, n) in sizes.iter().enumerate() {
        let r = raw.recv();
        assert_eq!(r["id"], i, "replies out of order");
        let pad = r["return"]["pad"].as_str().map(str::len);
        assert_eq!(pad, Some(*n), "reply {i}");
    }
    // The connection is still served.
    assert_eq!(raw.call(r#"{"execute": "echo", "id": "end"}"#)["id"], "end");
}

/// Requests that wait behind a full output backlog are processed as soon as it drains, though
/// no new byte arrives: the connection used to sleep in poll() asking for neither input nor
/// output while they sat in its buffer. With a 1-byte mark every reply fills the backlog, and
/// the first reply is small enough to be written at once, so the old code stalled here every
/// time.
#[test]
fn pipelined_requests_behind_a_full_backlog_are_answered() {
    let f = start_with(Limits {
        pause_input_at: 1,
        ..Limits::default()
    });
    let sizes: Vec<usize> = (0..64)
        .map(|i| if i % 2 == 0 { 16 } else { 300_000 })
        .collect();
    pipelined_big_replies(&f, &sizes);
}

/// The case seen in the field: replies of a few hundred KB (above the default 256 KiB mark),
/// many requests pipelined in one write.
#[test]
fn pipelined_requests_with_large_replies_are_answered_in_order() {
    let f = start();
    let sizes: Vec<usize> = (0..48).map(|i| 335_000 + i * 1000).collect();
    pipelined_big_replies(&f, &sizes);
}

#[test]
fn duplicate_keys_are_a_parse_error_at_any_depth() {
    let f = start();
    let mut raw = Raw::negotiated(&f.path);
    let dup = generic("JSON parse error, duplicate key");
    assert_eq!(
        raw.call(r#"{"execute": "echo", "execute": "fail", "id": 1}"#),
        dup
    );
    assert_eq!(raw.call(r#"{"execute": "echo", "id": 1, "id": 2}"#), dup);
    assert_eq!(
        raw.call(r#"{"execute": "echo", "arguments": {"a": [{"x": 1, "x": 1}]}}"#),
        dup
    );
    // Equal keys in different objects are not duplicates; the connection lives on.
    assert_eq!(
        raw.call(r#"{"execute": "echo", "arguments": {"a": {"a": 1}}, "id": 3}"#),
        json!({"return": {"a": {"a": 1}}, "id": 3})
    );
}

#[test]
fn query_qmp_schema_lists_every_command_in_qemu_format() {
    let f = start();
    let mut client = QmpClient::connect(&f.path).expect("connect");
    let reply = client
        .execute("query-qmp-schema", Value::Null)
        .expect("query-qmp-schema");
    let schema = QmpSchema::new(&reply).expect("well-formed schema");
    // The schema describes itself: its reply is a valid value of its own ret-type.
    schema
        .check_return("query-qmp-schema", &reply)
        .expect("reply matches SchemaInfo");
    assert_eq!(schema.dangling_references(), Vec::<String>::new());
    // Exactly the commands query-commands lists, in the same order.
    let listed = client.execute("query-commands", Value::Null).expect("list");
    let names: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(schema.names("command"), names);
    assert_eq!(
        &names[..3],
        ["qmp_capabilities", "query-commands", "query-qmp-schema"]
    );
    assert_eq!(schema.names("event"), ["DURING", "SHUTDOWN"]);
    // QEMU's shapes: masked type names, builtins by name, `int` for every integer type.
    for e in reply.as_array().expect("array") {
        let name = e["name"].as_str().unwrap_or_default();
        match e["meta-type"].as_str().unwrap_or_default() {
            "command" | "event" | "builtin" => {}
            "array" => assert!(name.starts_with('[') && name.ends_with(']'), "{e}"),
            _ => assert!(name.parse::<u32>().is_ok(), "type name not masked: {e}"),
        }
    }
    assert_eq!(
        schema.entry("int").map(|e| e["json-type"].clone()),
        Some(json!("int"))
    );
    let typed = schema.entry("typed").expect("typed").clone();
    let args = schema
        .entry(typed["arg-type"].as_str().unwrap_or(""))
        .expect("args");
    assert_eq!(
        args["members"],
        json!([{"name": "uri", "type": "str"},
               {"name": "max-bandwidth", "type": "int", "default": null}])
    );
    // Commands without arguments or result use QEMU's empty object.
    let fail = schema.entry("fail").expect("fail");
    assert_eq!(fail["arg-type"], fail["ret-type"]);
    let empty = schema
        .entry(fail["arg-type"].as_str().unwrap_or(""))
        .expect("q_empty");
    assert_eq!(empty["members"], json!([]));
    // libvirt's queries.
    for q in [
        "typed/arg-type/uri",
        "typed/arg-type/*max-bandwidth",
        "typed/arg-type/uri/!string",
        "qmp_capabilities/arg-type/enable/^oob",
        "query-qmp-schema/ret-type/+command/arg-type",
        "query-qmp-schema/ret-type/meta-type/^alternate",
        "DURING/arg-type/n/!int",
    ] {
        assert!(schema.path_exists(q), "{q}");
    }
    for q in [
        "typed/arg-type/*uri",
        "typed/arg-type/nope",
        "qmp_capabilities/arg-type/enable/^nope",
        "nope/arg-type",
    ] {
        assert!(!schema.path_exists(q), "{q}");
    }
    // Replies check against their ret-type.
    let echoed = client.execute("echo", json!({"k": 1})).expect("echo");
    schema.check_return("echo", &echoed).expect("echo reply");
    assert!(schema.check_return("typed", &echoed).is_err());
    // Arguments are checked against the same table before dispatch.
    let err = client
        .execute("big", json!({"bytes": "many"}))
        .expect_err("type checked");
    assert!(
        matches!(&err, ClientError::Qmp(e) if e.desc == "Invalid parameter type for 'bytes', expected: integer"),
        "{err}"
    );
    let err = client
        .execute("query-qmp-schema", json!({"x": 1}))
        .expect_err("no arguments");
    assert!(matches!(&err, ClientError::Qmp(e) if e.desc == "Parameter 'x' is unexpected"));
}
