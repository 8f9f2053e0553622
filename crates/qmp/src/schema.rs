//! The QAPI schema as data: the types of command arguments, replies and event data.
//!
//! A VMM describes every command it accepts with a [`Command`] and every event it emits with an
//! [`Event`], as `static` tables. The server checks each request's arguments against the
//! command's table before dispatching it ([`check_args`], QEMU's input-visitor texts) and
//! answers `query-qmp-schema` from the same tables (`crate::introspect`), so the schema cannot
//! drift from what the dispatcher accepts.

use serde_json::{Map, Value};

use crate::error::QmpError;

/// A QAPI type.
#[derive(Clone, Copy, Debug)]
pub enum Type {
    /// `str`.
    Str,
    /// An integer type (`int`, `uint8`, ..., `size`); introspected as QEMU's `int`.
    Int(IntKind),
    /// `bool`.
    Bool,
    /// `number` (any JSON number).
    Number,
    /// `null`.
    Null,
    /// `any` (any JSON value).
    Any,
    /// An enumeration (a string out of a fixed list).
    Enum(&'static Enum),
    /// A struct, or a flat union when it has [`Object::variants`].
    Object(&'static Object),
    /// A list of the element type.
    Array(&'static Type),
    /// One of several types, told apart by their JSON type.
    Alternate(&'static Alternate),
}

/// The range of an integer type (QEMU's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntKind {
    /// `int` / `int64`.
    Int64,
    /// `uint8`.
    Uint8,
    /// `uint16`.
    Uint16,
    /// `uint32`.
    Uint32,
    /// `uint64` / `size`.
    Uint64,
}

impl IntKind {
    fn name(self) -> &'static str {
        match self {
            IntKind::Int64 => "int64",
            IntKind::Uint8 => "uint8",
            IntKind::Uint16 => "uint16",
            IntKind::Uint32 => "uint32",
            IntKind::Uint64 => "uint64",
        }
    }

    /// Whether the JSON number `n` (an integer) is in range.
    fn accepts(self, n: &serde_json::Number) -> bool {
        let max = match self {
            IntKind::Int64 => return n.as_i64().is_some(),
            IntKind::Uint64 => return n.as_u64().is_some(),
            IntKind::Uint8 => u64::from(u8::MAX),
            IntKind::Uint16 => u64::from(u16::MAX),
            IntKind::Uint32 => u64::from(u32::MAX),
        };
        n.as_u64().is_some_and(|v| v <= max)
    }
}

/// The values of an [`Enum`].
#[derive(Clone, Copy, Debug)]
pub enum Values {
    /// A fixed list.
    List(&'static [&'static str]),
    /// Computed from the Rust enum the values come from (so they cannot drift from it).
    From(fn() -> Vec<&'static str>),
}

/// An enumeration type.
#[derive(Debug)]
pub struct Enum {
    /// QAPI name (unique in the schema; QEMU's name where QEMU has the type).
    pub name: &'static str,
    /// The accepted strings, in QEMU's order.
    pub values: Values,
}

impl Enum {
    /// The accepted strings.
    pub fn values(&self) -> Vec<&'static str> {
        match self.values {
            Values::List(l) => l.to_vec(),
            Values::From(f) => f(),
        }
    }
}

/// A member of an object type.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    /// Member name.
    pub name: &'static str,
    /// Member type.
    pub ty: Type,
    /// Whether it may be absent.
    pub optional: bool,
}

impl Member {
    /// A mandatory member.
    pub const fn req(name: &'static str, ty: Type) -> Member {
        Member {
            name,
            ty,
            optional: false,
        }
    }

    /// An optional member.
    pub const fn opt(name: &'static str, ty: Type) -> Member {
        Member {
            name,
            ty,
            optional: true,
        }
    }
}

/// A struct type, or a flat union (common members, one of which is the tag, plus the members
/// of the variant the tag selects).
#[derive(Debug)]
pub struct Object {
    /// QAPI name (unique in the schema).
    pub name: &'static str,
    /// The members every value has (for a union: the base, tag included).
    pub members: &'static [Member],
    /// For a union: the tag member and the variant for each of its values.
    pub variants: Option<Variants>,
}

/// The variant part of a flat union.
#[derive(Debug)]
pub struct Variants {
    /// The member (of [`Object::members`], an enum) whose value selects the variant.
    pub tag: &'static str,
    /// For each tag value, the object whose members come with it.
    pub cases: &'static [(&'static str, &'static Object)],
}

/// An alternate type: a value of any one of `members`, each of a different JSON type.
#[derive(Debug)]
pub struct Alternate {
    /// QAPI name (unique in the schema).
    pub name: &'static str,
    /// The possible types.
    pub members: &'static [Type],
}

/// A command: its name, arguments and reply.
#[derive(Debug)]
pub struct Command {
    /// The `execute` name.
    pub name: &'static str,
    /// The members of `arguments` (an empty list for a command without arguments).
    pub args: &'static [Member],
    /// QAPI's `boxed: true`: `arguments` is this type (e.g. `object-add`'s flat union
    /// `ObjectOptions`), and `args` is unused.
    pub boxed: Option<&'static Object>,
    /// The type of `return` ([`EMPTY`] for commands that return `{}`).
    pub ret: Type,
}

/// [`check_args`] for a command: against its [`Command::boxed`] type when it has one.
pub fn check_command_args(c: &Command, args: &Map<String, Value>) -> Result<(), QmpError> {
    match c.boxed {
        Some(o) => check_object(o, args, "").map_err(QmpError::generic),
        None => check_args(c.args, args),
    }
}

/// An event: its name and the members of its `data`.
#[derive(Debug)]
pub struct Event {
    /// The `event` name.
    pub name: &'static str,
    /// The members of `data` (empty: the event has no data).
    pub data: &'static [Member],
}

/// QEMU's empty object (`q_empty`): the reply of commands that return `{}`.
pub static EMPTY_OBJECT: Object = Object {
    name: "q_empty",
    members: &[],
    variants: None,
};

/// The type of `{}`.
pub const EMPTY: Type = Type::Object(&EMPTY_OBJECT);

/// QEMU's `StrOrNull`: a string, or `null`.
pub static STR_OR_NULL: Alternate = Alternate {
    name: "StrOrNull",
    members: &[Type::Str, Type::Null],
};

/// Checks a command's `arguments` against its members, with the texts of QEMU's QAPI input
/// visitor: `Parameter 'x' is missing`, `Invalid parameter type for 'x', expected: string`,
/// `Parameter 'x' expects uint8`, `Parameter 'x' does not accept value 'v'`,
/// `Parameter 'x' is unexpected` (nested members named `a.b`, `l[2]`). Like QEMU, the declared
/// members are checked in order first, then unexpected ones are reported.
pub fn check_args(members: &'static [Member], args: &Map<String, Value>) -> Result<(), QmpError> {
    let o = Object {
        name: "arguments",
        members,
        variants: None,
    };
    check_object(&o, args, "").map_err(QmpError::generic)
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn wrong_type(path: &str, expected: &str) -> String {
    let name = if path.is_empty() { "null" } else { path };
    format!("Invalid parameter type for '{name}', expected: {expected}")
}

/// Checks `map` against an object's members (for a union, the base members, which hold the
/// tag, then those of the variant the tag selects, which may be a union in turn), then reports a
/// member none of them declares.
fn check_object(o: &Object, map: &Map<String, Value>, path: &str) -> Result<(), String> {
    let mut declared: Vec<&Member> = Vec::new();
    let mut current = Some(o);
    while let Some(o) = current {
        for m in o.members {
            let here = join(path, m.name);
            match map.get(m.name) {
                Some(v) => check_value(&m.ty, v, &here)?,
                None if m.optional => {}
                None => return Err(format!("Parameter '{here}' is missing")),
            }
            declared.push(m);
        }
        current = o.variants.as_ref().and_then(|v| {
            let tag = map.get(v.tag).and_then(Value::as_str)?;
            v.cases.iter().find(|(case, _)| *case == tag).map(|c| c.1)
        });
    }
    match map.keys().find(|k| !declared.iter().any(|m| m.name == *k)) {
        Some(k) => Err(format!("Parameter '{}' is unexpected", join(path, k))),
        None => Ok(()),
    }
}

fn json_type_name(ty: &Type) -> &'static str {
    match ty {
        Type::Str | Type::Enum(_) => "string",
        Type::Int(_) => "integer",
        Type::Bool => "boolean",
        Type::Number => "number",
        Type::Null => "null",
        Type::Any => "any",
        Type::Object(_) => "object",
        Type::Array(_) => "array",
        Type::Alternate(a) => a.name,
    }
}

/// Whether `v` has the JSON type `ty` is written in (what an alternate branches on).
fn json_type_matches(ty: &Type, v: &Value) -> bool {
    match ty {
        Type::Str | Type::Enum(_) => v.is_string(),
        Type::Int(_) => v.is_i64() || v.is_u64(),
        Type::Bool => v.is_boolean(),
        Type::Number => v.is_number(),
        Type::Null => v.is_null(),
        Type::Any => true,
        Type::Object(_) => v.is_object(),
        Type::Array(_) => v.is_array(),
        Type::Alternate(a) => a.members.iter().any(|t| json_type_matches(t, v)),
    }
}

/// Checks one value of type `ty` found at `path`.
pub(crate) fn check_value(ty: &Type, v: &Value, path: &str) -> Result<(), String> {
    let expected = || wrong_type(path, json_type_name(ty));
    match ty {
        Type::Any => Ok(()),
        Type::Str | Type::Bool | Type::Number | Type::Null => {
            if json_type_matches(ty, v) {
                Ok(())
            } else {
                Err(expected())
            }
        }
        Type::Int(kind) => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => {
                if kind.accepts(n) {
                    Ok(())
                } else {
                    Err(format!("Parameter '{path}' expects {}", kind.name()))
                }
            }
            _ => Err(expected()),
        },
        Type::Enum(e) => {
            let s = v.as_str().ok_or_else(expected)?;
            if e.values().contains(&s) {
                Ok(())
            } else {
                Err(format!("Parameter '{path}' does not accept value '{s}'"))
            }
        }
        Type::Array(elem) => {
            let list = v.as_array().ok_or_else(expected)?;
            for (i, item) in list.iter().enumerate() {
                check_value(elem, item, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        Type::Object(o) => {
            let map = v.as_object().ok_or_else(expected)?;
            check_object(o, map, path)
        }
        Type::Alternate(a) => match a.members.iter().find(|t| json_type_matches(t, v)) {
            Some(t) => check_value(t, v, path),
            None => Err(expected()),
        },
    }
}

/// How a type is referred to in a fingerprint (its name, or its structure for arrays).
fn type_ref(ty: &Type) -> String {
    match ty {
        Type::Str => "str".into(),
        Type::Int(k) => k.name().into(),
        Type::Bool => "bool".into(),
        Type::Number => "number".into(),
        Type::Null => "null".into(),
        Type::Any => "any".into(),
        Type::Enum(e) => e.name.into(),
        Type::Object(o) => o.name.into(),
        Type::Alternate(a) => a.name.into(),
        Type::Array(t) => format!("[{}]", type_ref(t)),
    }
}

/// Records the named types reachable from `ty` with a fingerprint of their shape.
fn collect_named(
    ty: &Type,
    seen: &mut Vec<(&'static str, String)>,
    clashes: &mut Vec<&'static str>,
) {
    let (name, shape, inner): (&'static str, String, Vec<Type>) = match ty {
        Type::Array(t) => return collect_named(t, seen, clashes),
        Type::Enum(e) => (e.name, e.values().join(","), Vec::new()),
        Type::Alternate(a) => (
            a.name,
            a.members.iter().map(type_ref).collect::<Vec<_>>().join("|"),
            a.members.to_vec(),
        ),
        Type::Object(o) => {
            let mut shape: Vec<String> = o
                .members
                .iter()
                .map(|m| {
                    format!(
                        "{}{}:{}",
                        m.name,
                        if m.optional { "?" } else { "" },
                        type_ref(&m.ty)
                    )
                })
                .collect();
            let mut inner: Vec<Type> = o.members.iter().map(|m| m.ty).collect();
            if let Some(v) = &o.variants {
                shape.push(format!("tag={}", v.tag));
                for (case, obj) in v.cases {
                    shape.push(format!("{case}=>{}", obj.name));
                    inner.push(Type::Object(obj));
                }
            }
            (o.name, shape.join(","), inner)
        }
        _ => return,
    };
    match seen.iter().find(|(n, _)| *n == name) {
        Some((_, known)) => {
            if *known != shape && !clashes.contains(&name) {
                clashes.push(name);
            }
        }
        None => {
            seen.push((name, shape));
            for t in &inner {
                collect_named(t, seen, clashes);
            }
        }
    }
}

/// Names that the tables give to two different types. `query-qmp-schema` describes each named
/// type once, so every name must mean one type; a test of each VMM's tables asserts this is
/// empty.
pub fn type_name_clashes(commands: &[&Command], events: &[&Event]) -> Vec<&'static str> {
    let mut seen = Vec::new();
    let mut clashes = Vec::new();
    let arg_lists = commands
        .iter()
        .map(|c| c.args)
        .chain(events.iter().map(|e| e.data));
    for members in arg_lists {
        for m in members {
            collect_named(&m.ty, &mut seen, &mut clashes);
        }
    }
    for c in commands {
        collect_named(&c.ret, &mut seen, &mut clashes);
        if let Some(o) = c.boxed {
            collect_named(&Type::Object(o), &mut seen, &mut clashes);
        }
    }
    clashes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    static MODE: Enum = Enum {
        name: "Mode",
        values: Values::List(&["fast", "slow"]),
    };
    static INET: Object = Object {
        name: "Inet",
        members: &[
            Member::req("host", Type::Str),
            Member::req("port", Type::Str),
        ],
        variants: None,
    };
    static KIND: Enum = Enum {
        name: "Kind",
        values: Values::List(&["inet", "none"]),
    };
    static ADDR: Object = Object {
        name: "Addr",
        members: &[Member::req("type", Type::Enum(&KIND))],
        variants: Some(Variants {
            tag: "type",
            cases: &[("inet", &INET), ("none", &EMPTY_OBJECT)],
        }),
    };
    static ARGS: &[Member] = &[
        Member::req("uri", Type::Str),
        Member::opt("level", Type::Int(IntKind::Uint8)),
        Member::opt("mode", Type::Enum(&MODE)),
        Member::opt("addrs", Type::Array(&Type::Object(&ADDR))),
        Member::opt("creds", Type::Alternate(&STR_OR_NULL)),
        Member::opt("outer", Type::Object(&OUTER)),
    ];
    static TRANSPORT: Enum = Enum {
        name: "Transport",
        values: Values::List(&["socket", "file"]),
    };
    static FILE: Object = Object {
        name: "File",
        members: &[Member::req("filename", Type::Str)],
        variants: None,
    };
    static OUTER: Object = Object {
        name: "Outer",
        members: &[Member::req("transport", Type::Enum(&TRANSPORT))],
        variants: Some(Variants {
            tag: "transport",
            cases: &[("socket", &ADDR), ("file", &FILE)],
        }),
    };

    fn err(v: Value) -> String {
        let Value::Object(map) = v else {
            panic!("test input must be an object")
        };
        match check_args(ARGS, &map) {
            Ok(()) => panic!("accepted"),
            Err(e) => e.desc,
        }
    }

    #[test]
    fn a_name_given_to_two_types_is_found() {
        static OTHER_INET: Object = Object {
            name: "Inet",
            members: &[Member::req("host", Type::Str)],
            variants: None,
        };
        static A: Command = Command {
            name: "a",
            args: ARGS,
            boxed: None,
            ret: EMPTY,
        };
        static B: Command = Command {
            name: "b",
            args: &[Member::req("x", Type::Object(&OTHER_INET))],
            boxed: None,
            ret: Type::Object(&INET),
        };
        assert_eq!(type_name_clashes(&[&A], &[]), Vec::<&str>::new());
        assert_eq!(type_name_clashes(&[&A, &B], &[]), ["Inet"]);
    }

    #[test]
    fn qemu_texts_in_qemu_order() {
        assert_eq!(err(json!({})), "Parameter 'uri' is missing");
        // Declared members are checked before unexpected ones are reported.
        assert_eq!(err(json!({"zzz": 1})), "Parameter 'uri' is missing");
        assert_eq!(
            err(json!({"uri": 1})),
            "Invalid parameter type for 'uri', expected: string"
        );
        assert_eq!(
            err(json!({"uri": "u", "bogus": 1})),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err(json!({"uri": "u", "level": 256})),
            "Parameter 'level' expects uint8"
        );
        assert_eq!(
            err(json!({"uri": "u", "level": -1})),
            "Parameter 'level' expects uint8"
        );
        assert_eq!(
            err(json!({"uri": "u", "level": 1.5})),
            "Invalid parameter type for 'level', expected: integer"
        );
        assert_eq!(
            err(json!({"uri": "u", "mode": "bogus"})),
            "Parameter 'mode' does not accept value 'bogus'"
        );
        assert_eq!(
            err(json!({"uri": "u", "mode": 3})),
            "Invalid parameter type for 'mode', expected: string"
        );
        assert_eq!(
            err(json!({"uri": "u", "creds": 3})),
            "Invalid parameter type for 'creds', expected: StrOrNull"
        );
        assert_eq!(
            err(json!({"uri": "u", "addrs": [{"type": "inet"}]})),
            "Parameter 'addrs[0].host' is missing"
        );
        assert_eq!(
            err(json!({"uri": "u", "addrs": [{"type": "none", "host": "h"}]})),
            "Parameter 'addrs[0].host' is unexpected"
        );
        assert_eq!(
            err(json!({"uri": "u", "addrs": [{"type": "tcp"}]})),
            "Parameter 'addrs[0].type' does not accept value 'tcp'"
        );
        assert_eq!(
            err(json!({"uri": "u", "addrs": [{"type": "inet", "host": "h", "port": 1}]})),
            "Invalid parameter type for 'addrs[0].port', expected: string"
        );
        // A union whose variant is a union.
        assert_eq!(
            err(json!({"uri": "u", "outer": {"transport": "socket", "type": "inet", "host": "h"}})),
            "Parameter 'outer.port' is missing"
        );
        assert_eq!(
            err(
                json!({"uri": "u", "outer": {"transport": "file", "filename": "f", "type": "inet"}})
            ),
            "Parameter 'outer.type' is unexpected"
        );
        let Value::Object(ok) = json!({"uri": "u", "level": 255, "mode": "slow", "creds": null,
            "addrs": [{"type": "inet", "host": "h", "port": "1"}, {"type": "none"}],
            "outer": {"transport": "socket", "type": "inet", "host": "h", "port": "1"}})
        else {
            unreachable!()
        };
        assert!(check_args(ARGS, &ok).is_ok());
    }
}
