//! Issue 8 §7: QMP conformance as a QEMU client sees it, against real `tern run` processes:
//! `query-qmp-schema` generated from the dispatcher's own tables (and every reply checked
//! against it), `migrate` / `migrate-incoming` driven by QEMU's `channels`, duplicate keys,
//! `migrate-continue` with a bad enum value, the destination's `socket-address`, and large
//! pipelined replies on one connection.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::*;
use serde_json::{json, Map, Value};
use tern_qmp::{ClientError, ErrorClass, QmpSchema};

/// The schema of `vm`, checked for QEMU's well-formedness rules.
fn schema(vm: &mut Vm) -> QmpSchema {
    let reply = vm.c("query-qmp-schema", json!({}));
    let s = QmpSchema::new(&reply).unwrap_or_else(|e| panic!("malformed schema: {e}"));
    assert_eq!(s.dangling_references(), Vec::<String>::new());
    s.check_return("query-qmp-schema", &reply)
        .unwrap_or_else(|e| panic!("the schema does not match its own SchemaInfo type: {e}"));
    s
}

/// Runs `cmd`, checks a successful reply against the command's `ret-type`, and returns the
/// reply or the QMP error.
fn checked(
    vm: &mut Vm,
    s: &QmpSchema,
    cmd: &str,
    args: Value,
) -> Result<Value, tern_qmp::QmpError> {
    match vm.qmp.execute(cmd, args) {
        Ok(v) => {
            if let Err(e) = s.check_return(cmd, &v) {
                panic!("{}: reply of {cmd} does not match the schema: {e}", vm.name);
            }
            Ok(v)
        }
        Err(ClientError::Qmp(e)) => Err(e),
        Err(e) => panic!("{}: {cmd}: {e}", vm.name),
    }
}

/// A value of schema type `ty` built from the schema alone: "" for strings, 0, false, the first
/// enum value, the first alternative, one-element lists, objects with their mandatory members
/// (and the first variant of a union).
fn sample(s: &QmpSchema, ty: &str) -> Value {
    let e = s
        .entry(ty)
        .unwrap_or_else(|| panic!("type {ty} missing"))
        .clone();
    let list = |k: &str| e[k].as_array().cloned().unwrap_or_default();
    match e["meta-type"].as_str().unwrap_or_default() {
        "builtin" => match e["json-type"].as_str().unwrap_or_default() {
            "string" => json!(""),
            "int" | "number" => json!(0),
            "boolean" => json!(false),
            "null" => Value::Null,
            _ => json!({}),
        },
        "enum" => list("values")[0].clone(),
        "array" => json!([sample(s, e["element-type"].as_str().unwrap_or_default())]),
        "alternate" => sample(s, list("members")[0]["type"].as_str().unwrap_or_default()),
        "object" => {
            let mut o = Map::new();
            let mut current = Some(e.clone());
            while let Some(obj) = current {
                for m in obj["members"].as_array().cloned().unwrap_or_default() {
                    if m.get("default").is_none() {
                        let name = m["name"].as_str().unwrap_or_default().to_owned();
                        o.insert(name, sample(s, m["type"].as_str().unwrap_or_default()));
                    }
                }
                current = obj["tag"].as_str().and_then(|tag| {
                    let case = o.get(tag)?.as_str()?.to_owned();
                    let v = obj["variants"]
                        .as_array()?
                        .iter()
                        .find(|v| v["case"] == case)?;
                    s.entry(v["type"].as_str()?).cloned()
                });
            }
            Value::Object(o)
        }
        other => panic!("{ty} is a {other}"),
    }
}

/// The members of a command's arguments, as the schema lists them.
fn arg_members(s: &QmpSchema, cmd: &str) -> Vec<Value> {
    let arg = s.entry(cmd).expect("command")["arg-type"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    s.entry(&arg).expect("arg-type")["members"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A raw QMP connection (negotiated) for what `QmpClient` cannot send.
fn raw(path: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let w = UnixStream::connect(path).expect("connect");
    w.set_read_timeout(Some(T)).expect("timeout");
    let mut r = BufReader::new(w.try_clone().expect("clone"));
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    (&w).write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .expect("write");
    line.clear();
    r.read_line(&mut line).expect("negotiation");
    assert_eq!(line.trim(), "{\"return\": {}}");
    (w, r)
}

fn recv(r: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("reply (fail-safe timeout?)");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Every command the dispatcher accepts is in the schema and the other way round; every
/// argument the schema lists is accepted by the command's handler; replies match the declared
/// types; libvirt's schema queries find what Tern implements.
#[test]
fn qmp_schema_is_the_dispatcher_table() {
    let dir = tmpdir();
    let m = Machine::idle(8);
    let mut vm = boot(dir.path(), "vm", &m);
    let s = schema(&mut vm);

    // The schema's commands are exactly query-commands', in the same order.
    let listed = vm.c("query-commands", json!({}));
    let names: Vec<String> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(s.names("command"), names);
    assert_eq!(
        s.names("event"),
        [
            "SHUTDOWN",
            "STOP",
            "RESUME",
            "MIGRATION",
            "MIGRATION_PASS",
            "RESET",
            "POWERDOWN"
        ]
    );
    // Every listed command is dispatched (its arguments are checked, it is not unknown), and
    // nothing else is: a bogus member is refused before anything runs. (`qmp_capabilities`
    // only answers "negotiation already complete" once negotiated.)
    let names: Vec<String> = names
        .into_iter()
        .filter(|n| n != "qmp_capabilities")
        .collect();
    for cmd in &names {
        match vm.qmp.execute(cmd, json!({"x-tern-probe": 1})) {
            Err(ClientError::Qmp(e)) => {
                assert_eq!(e.class, ErrorClass::GenericError, "{cmd}: {e}");
                assert!(
                    e.desc == "Parameter 'x-tern-probe' is unexpected"
                        || e.desc.ends_with("is missing"),
                    "{cmd}: {}",
                    e.desc
                );
            }
            other => panic!("{cmd} with a bogus argument: {other:?}"),
        }
    }
    match vm.qmp.execute("x-tern-no-such-command", json!({})) {
        Err(ClientError::Qmp(e)) => assert_eq!(e.class, ErrorClass::CommandNotFound),
        other => panic!("{other:?}"),
    }
    vm.assert_running_guest(2);

    // Every listed argument is accepted by the handler: with the mandatory members and that
    // one, any error is about the values, never about the member or its type.
    for cmd in &names {
        let members = arg_members(&s, cmd);
        let mandatory: Map<String, Value> = members
            .iter()
            .filter(|m| m.get("default").is_none())
            .map(|m| {
                let name = m["name"].as_str().unwrap_or_default().to_owned();
                (name, sample(&s, m["type"].as_str().unwrap_or_default()))
            })
            .collect();
        for m in &members {
            let name = m["name"].as_str().unwrap_or_default();
            let mut args = mandatory.clone();
            args.insert(
                name.to_owned(),
                sample(&s, m["type"].as_str().unwrap_or_default()),
            );
            if let Err(e) = checked(&mut vm, &s, cmd, Value::Object(args.clone())) {
                for refused in [
                    "is unexpected",
                    "Invalid parameter type",
                    "does not accept value",
                    "is missing",
                ] {
                    assert!(
                        !e.desc.contains(refused),
                        "{cmd} refuses {} listed in its schema: {}",
                        Value::Object(args.clone()),
                        e.desc
                    );
                }
            }
        }
    }
    vm.assert_running_guest(2);

    // Replies of every command without mandatory arguments match the schema.
    for cmd in [
        "query-version",
        "query-status",
        "query-name",
        "query-uuid",
        "query-migrate",
        "query-migrate-capabilities",
        "query-migrate-parameters",
        "query-dirty-rate",
        "x-tern-guest-stats",
        "x-tern-statedev",
        "x-tern-heartbeats",
        "x-tern-serial",
    ] {
        checked(&mut vm, &s, cmd, json!({})).unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }
    // migrate-set-parameters takes exactly what query-migrate-parameters shows.
    let params = vm.c("query-migrate-parameters", json!({}));
    let mut shown: Vec<&str> = params
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let set_members = arg_members(&s, "migrate-set-parameters");
    let mut settable: Vec<&str> = set_members
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    shown.sort_unstable();
    settable.sort_unstable();
    assert_eq!(shown, settable);

    // What libvirt asks the schema (virQEMUQAPISchemaPathExists syntax).
    for q in [
        "migrate/arg-type/uri",
        "migrate/arg-type/channels",
        "migrate/arg-type/channels/channel-type/^main",
        "migrate/arg-type/channels/addr/+socket/+inet/host",
        "migrate/arg-type/channels/addr/+socket/+unix/path",
        "migrate/arg-type/channels/addr/+file/offset",
        "migrate-incoming/arg-type/*exit-on-error",
        "migrate-incoming/arg-type/channels",
        "migrate-set-parameters/arg-type/downtime-limit",
        "migrate-set-parameters/arg-type/tls-creds/!null",
        "migrate-set-parameters/arg-type/mode/^normal",
        "query-migrate-parameters/ret-type/tls-creds/!string",
        "migrate-set-capabilities/arg-type/capabilities/capability/^switchover-ack",
        "query-migrate/ret-type/status/^pre-switchover",
        "query-migrate/ret-type/ram/mbps/!number",
        "query-migrate/ret-type/socket-address/+inet/ipv4",
        "query-status/ret-type/status/^postmigrate",
        "MIGRATION/arg-type/status/^completed",
        "migrate-continue/arg-type/state/^pre-switchover",
    ] {
        assert!(s.path_exists(q), "{q}");
    }
    for q in [
        "migrate/arg-type/*uri/^x",
        "migrate/arg-type/channels/channel-type/^cpr",
        "migrate/arg-type/channels/addr/+exec",
        "migrate-set-parameters/arg-type/block-bitmap-mapping",
        "query-migrate/ret-type/blocked-reasons",
    ] {
        assert!(!s.path_exists(q), "{q}");
    }

    // A bad enum value is reported as such (it used to answer with the migration state).
    assert_eq!(
        vm.err("migrate-continue", json!({"state": "bogus"})),
        "Parameter 'state' does not accept value 'bogus'"
    );
    assert_eq!(
        vm.err("migrate-continue", json!({"state": "pre-switchover"})),
        "Migration not in expected state: none"
    );
    // migrate-start-postcopy refuses, with QEMU's messages, without postcopy-ram and before
    // any migration.
    assert_eq!(
        vm.err("migrate-start-postcopy", json!({})),
        "Enable postcopy with migrate_set_capability before the start of migration"
    );
    vm.c(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
    );
    assert_eq!(
        vm.err("migrate-start-postcopy", json!({})),
        "Postcopy must be started after migration has been started"
    );
    vm.c(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": false}]}),
    );

    // Duplicate keys: the whole request is refused, nothing runs (the guest keeps running).
    let (mut w, mut r) = raw(&vm.qmp_path);
    w.write_all(b"{\"execute\": \"query-status\", \"execute\": \"stop\"}\n")
        .expect("write");
    assert_eq!(
        recv(&mut r),
        json!({"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}})
    );
    w.write_all(b"{\"execute\": \"migrate-set-parameters\", \"arguments\": {\"downtime-limit\": 5, \"downtime-limit\": 6}}\n")
        .expect("write");
    assert_eq!(
        recv(&mut r)["error"]["desc"],
        "JSON parse error, duplicate key"
    );
    assert_eq!(vm.run_status(), "running");

    // Large replies pipelined on one connection, newline-terminated as QEMU's clients send
    // them: all answered, in order.
    let mut batch = String::new();
    for i in 0..40 {
        let cmd = if i % 2 == 0 {
            "query-qmp-schema"
        } else {
            "x-tern-heartbeats"
        };
        batch.push_str(&format!("{{\"execute\": \"{cmd}\", \"id\": {i}}}\n"));
    }
    w.write_all(batch.as_bytes()).expect("write");
    for i in 0..40 {
        let v = recv(&mut r);
        assert_eq!(v["id"], i, "out of order: {}", v.to_string().len());
        assert!(v.get("return").is_some(), "{i}: {v}");
    }
    vm.quit_ok();
}

/// A live migration driven by QEMU's `channels` instead of `uri`; the destination reports
/// where it listens as QEMU does (with `ipv4`) while it listens and drops it when the migration
/// ends; every `query-migrate` reply and every event matches the schema.
#[test]
fn migration_driven_by_channels() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    let s = schema(&mut src);
    let caps = [("events", true), ("return-path", true)];
    src.caps(&caps);
    dst.caps(&caps);
    converge(&mut src);

    let inet = |port: &str| {
        json!({"channel-type": "main",
               "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": port}})
    };
    // QEMU's texts for the combinations it refuses; Tern's schema for what it cannot do.
    for (args, want) in [
        (
            json!({"uri": "tcp:127.0.0.1:0", "channels": [inet("0")]}),
            "need either 'uri' or 'channels' argument",
        ),
        (
            json!({"channels": [inet("0"), inet("0")]}),
            "Channel list must have only one entry, for type 'main'",
        ),
        (
            json!({"channels": []}),
            "need either 'uri' or 'channels' argument",
        ),
        (
            json!({"channels": [{"channel-type": "cpr", "addr": {"transport": "socket",
                "type": "unix", "path": "/tmp/x"}}]}),
            "Parameter 'channels[0].channel-type' does not accept value 'cpr'",
        ),
        (
            json!({"channels": [{"channel-type": "main", "addr": {"transport": "exec",
                "args": ["true"]}}]}),
            "Parameter 'channels[0].addr.transport' does not accept value 'exec'",
        ),
        (
            json!({"channels": [{"channel-type": "main", "addr": {"transport": "socket",
                "type": "inet", "host": "127.0.0.1"}}]}),
            "Parameter 'channels[0].addr.port' is missing",
        ),
    ] {
        assert_eq!(dst.err("migrate-incoming", args), want);
    }
    assert_eq!(
        src.err("migrate", json!({"channels": [inet("1"), inet("2")]})),
        "Channel list has more than one main entry"
    );
    assert_eq!(src.mig_status(), "none");

    dst.c("migrate-incoming", json!({ "channels": [inet("0")] }));
    let q = checked(&mut dst, &s, "query-migrate", json!({})).expect("query-migrate");
    let addr = &q["socket-address"][0];
    let port = addr["port"].as_str().expect("port string").to_owned();
    assert_ne!(port, "0");
    assert_eq!(
        *addr,
        json!({"type": "inet", "host": "127.0.0.1", "port": port, "ipv4": true})
    );

    src.c("migrate", json!({ "channels": [inet(&port)] }));
    let sq = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    s.check_return("query-migrate", &sq)
        .expect("source query-migrate");
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dq = checked(&mut dst, &s, "query-migrate", json!({})).expect("query-migrate");
    assert_eq!(
        dq,
        json!({"status": "completed"}),
        "nothing listens once the migration ended"
    );
    assert_handover(&mut src, &mut dst);
    checked(&mut src, &s, "query-migrate", json!({})).expect("query-migrate");
    for vm in [&mut src, &mut dst] {
        for ev in vm.qmp.take_events() {
            s.check_event(&ev)
                .unwrap_or_else(|e| panic!("{}: event {ev} does not match: {e}", vm.name));
        }
    }
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");

    // A failed incoming migration drops socket-address too (a unix channel this time).
    let mut dst2 = dest(dir.path(), "dst2", &m);
    dst2.caps(&[("events", true)]);
    let path = dir.path().join("in.sock");
    let unix = json!([{"channel-type": "main",
        "addr": {"transport": "socket", "type": "unix", "path": path.display().to_string()}}]);
    dst2.c(
        "migrate-incoming",
        json!({"channels": unix, "exit-on-error": false}),
    );
    let q = checked(&mut dst2, &s, "query-migrate", json!({})).expect("query-migrate");
    assert_eq!(
        q["socket-address"],
        json!([{"type": "unix", "path": path.display().to_string()}])
    );
    let mut garbage = UnixStream::connect(&path).expect("connect");
    garbage.write_all(b"not a migration stream").expect("write");
    drop(garbage);
    let q = dst2.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    s.check_return("query-migrate", &q)
        .expect("failed query-migrate");
    assert_eq!(q["status"], "failed");
    assert!(q.get("socket-address").is_none(), "{q}");
    assert!(!error_desc(&q).is_empty(), "{q}");
    src.quit_ok();
    dst.quit_ok();
    dst2.quit_ok();
}
