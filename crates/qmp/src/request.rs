//! One request, from a framed JSON text to its reply: parsing (duplicate keys refused), the
//! request members, capabilities negotiation, the server's own commands (`qmp_capabilities`,
//! `query-commands`, `query-qmp-schema`), argument checking against the command's schema, and
//! dispatch.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::args::parse_args;
use crate::builtins::{QMP_CAPABILITIES, QUERY_COMMANDS, QUERY_QMP_SCHEMA};
use crate::error::QmpError;
use crate::json;
use crate::schema::{check_args, check_command_args, Command};
use crate::server::{AfterReply, ClientCtx, Inner};

/// Result of one request: the reply and what to do after it.
pub(crate) struct Handled {
    pub result: Result<Value, QmpError>,
    pub id: Option<Value>,
    /// The request completed capabilities negotiation.
    pub negotiated: bool,
    pub hooks: Vec<AfterReply>,
}

impl Handled {
    pub(crate) fn err(e: QmpError, id: Option<Value>) -> Handled {
        Handled::done(Err(e), id)
    }

    fn done(result: Result<Value, QmpError>, id: Option<Value>) -> Handled {
        Handled {
            result,
            id,
            negotiated: false,
            hooks: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesArgs {
    #[serde(default)]
    enable: Vec<Capability>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Capability {
    Oob,
}

/// Handles one complete JSON text from client `client_id` (`negotiated`: whether it completed
/// capabilities negotiation).
pub(crate) fn handle(inner: &Inner, client_id: u64, negotiated: bool, bytes: &[u8]) -> Handled {
    let value = match json::parse(bytes) {
        Ok(v) => v,
        Err(e) => return Handled::err(QmpError::generic(format!("JSON parse error, {e}")), None),
    };
    let Value::Object(mut request) = value else {
        return Handled::err(QmpError::generic("QMP input must be a JSON object"), None);
    };
    let id = request.remove("id");
    let mut command = None;
    let mut args = Map::new();
    for (key, member) in request {
        match (key.as_str(), member) {
            ("execute", Value::String(name)) => command = Some(name),
            ("execute", _) => {
                return Handled::err(
                    QmpError::generic("QMP input member 'execute' must be a string"),
                    id,
                )
            }
            ("arguments", Value::Object(map)) => args = map,
            ("arguments", _) => {
                return Handled::err(
                    QmpError::generic("QMP input member 'arguments' must be an object"),
                    id,
                )
            }
            (other, _) => {
                return Handled::err(
                    QmpError::generic(format!("QMP input member '{other}' is unexpected")),
                    id,
                )
            }
        }
    }
    let Some(command) = command else {
        return Handled::err(QmpError::generic("QMP input lacks member 'execute'"), id);
    };
    if !negotiated {
        if command != QMP_CAPABILITIES.name {
            return Handled::err(
                QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ),
                id,
            );
        }
        let result = check_args(QMP_CAPABILITIES.args, &args).and_then(|()| negotiate(args));
        return Handled {
            negotiated: result.is_ok(),
            ..Handled::done(result, id)
        };
    }
    if command == QMP_CAPABILITIES.name {
        return Handled::err(
            QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ),
            id,
        );
    }
    let Some(spec) = inner.commands.iter().find(|c| c.name == command) else {
        return Handled::err(
            QmpError::command_not_found(format!("The command {command} has not been found")),
            id,
        );
    };
    if let Err(e) = check_command_args(spec, &args) {
        return Handled::err(e, id);
    }
    match spec.name {
        n if n == QUERY_COMMANDS.name => Handled::done(Ok(query_commands(&inner.commands)), id),
        n if n == QUERY_QMP_SCHEMA.name => Handled::done(Ok(inner.schema().clone()), id),
        _ => dispatch(inner, client_id, spec, args, id),
    }
}

fn negotiate(args: Map<String, Value>) -> Result<Value, QmpError> {
    let caps: CapabilitiesArgs = parse_args(args)?;
    if let Some(Capability::Oob) = caps.enable.first() {
        return Err(QmpError::generic("Capability oob not available"));
    }
    Ok(Value::Object(Map::new()))
}

fn query_commands(commands: &[&'static Command]) -> Value {
    Value::Array(commands.iter().map(|c| json!({ "name": c.name })).collect())
}

fn dispatch(
    inner: &Inner,
    client_id: u64,
    spec: &Command,
    args: Map<String, Value>,
    id: Option<Value>,
) -> Handled {
    let ctx = ClientCtx {
        id: client_id,
        events: inner.events.clone(),
        after_reply: RefCell::new(Vec::new()),
    };
    let name = spec.name;
    let result = catch_unwind(AssertUnwindSafe(|| {
        inner.dispatcher.dispatch(&ctx, name, args)
    }))
    .unwrap_or_else(|_| {
        tracing::error!("QMP command {name} panicked");
        Err(QmpError::generic(format!(
            "internal error: command {name} failed"
        )))
    });
    Handled {
        hooks: ctx.after_reply.into_inner(),
        ..Handled::done(result, id)
    }
}
