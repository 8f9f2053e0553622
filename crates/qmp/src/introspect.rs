//! `query-qmp-schema`: the [`crate::schema`] tables in QEMU's `SchemaInfo` format
//! (`qapi/introspect.json`, generated like QEMU's `scripts/qapi/introspect.py`).
//!
//! Commands and events come first, in table order, then every type they use, in order of first
//! use. As in QEMU, type names are masked as numbers ("clients should examine commands and
//! events, not types"): builtins keep their names (`str`, `int`, `bool`, `number`, `null`,
//! `any`), every integer type is `int`, arrays are named `[ELEMENT]`, and commands without
//! arguments or result use the empty object. Optional members carry `"default": null`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::schema::{Alternate, Command, Enum, Event, Member, Object, Type, Variants, EMPTY};

/// What a type is identified by while generating (names are unique per kind in the tables).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Builtin(&'static str),
    Array(String),
    Named(&'static str),
    /// The implicit argument object of a command or event.
    Args(&'static str),
}

/// A type waiting to be described.
#[derive(Clone, Copy)]
enum Pending {
    /// The JSON type of a builtin.
    Builtin(&'static str),
    Enum(&'static Enum),
    Object(&'static Object),
    Args(&'static [Member]),
    Array(&'static Type),
    Alternate(&'static Alternate),
}

#[derive(Default)]
struct Gen {
    out: Vec<Value>,
    queue: Vec<(String, Pending)>,
    seen: HashMap<Key, String>,
    masks: usize,
}

impl Gen {
    fn mask(&mut self) -> String {
        let name = self.masks.to_string();
        self.masks += 1;
        name
    }

    /// The schema name of `key`, queueing its description on first use.
    fn name_of(&mut self, key: Key, pending: Pending, builtin_or_array: Option<String>) -> String {
        if let Some(name) = self.seen.get(&key) {
            return name.clone();
        }
        let name = builtin_or_array.unwrap_or_else(|| self.mask());
        self.seen.insert(key, name.clone());
        self.queue.push((name.clone(), pending));
        name
    }

    fn use_type(&mut self, ty: &Type) -> String {
        match ty {
            Type::Str => self.builtin("str", "string"),
            Type::Int(_) => self.builtin("int", "int"),
            Type::Bool => self.builtin("bool", "boolean"),
            Type::Number => self.builtin("number", "number"),
            Type::Null => self.builtin("null", "null"),
            Type::Any => self.builtin("any", "value"),
            Type::Enum(e) => self.name_of(Key::Named(e.name), Pending::Enum(e), None),
            Type::Object(o) => self.use_object(o),
            Type::Alternate(a) => self.name_of(Key::Named(a.name), Pending::Alternate(a), None),
            Type::Array(elem) => {
                let elem_name = self.use_type(elem);
                let name = format!("[{elem_name}]");
                self.name_of(Key::Array(name.clone()), Pending::Array(elem), Some(name))
            }
        }
    }

    fn use_object(&mut self, o: &'static Object) -> String {
        self.name_of(Key::Named(o.name), Pending::Object(o), None)
    }

    fn builtin(&mut self, name: &'static str, json_type: &'static str) -> String {
        self.name_of(
            Key::Builtin(name),
            Pending::Builtin(json_type),
            Some(name.to_owned()),
        )
    }

    /// The argument type of a command or event: the empty object when it has no members.
    fn use_args(&mut self, owner: &'static str, members: &'static [Member]) -> String {
        if members.is_empty() {
            return self.use_type(&EMPTY);
        }
        self.name_of(Key::Args(owner), Pending::Args(members), None)
    }

    fn members(&mut self, members: &'static [Member]) -> Value {
        let list: Vec<Value> = members
            .iter()
            .map(|m| {
                let mut o = Map::new();
                o.insert("name".into(), json!(m.name));
                o.insert("type".into(), json!(self.use_type(&m.ty)));
                if m.optional {
                    o.insert("default".into(), Value::Null);
                }
                Value::Object(o)
            })
            .collect();
        Value::Array(list)
    }

    fn variants(&mut self, v: &'static Variants) -> Value {
        let cases: Vec<Value> = v
            .cases
            .iter()
            .map(|(case, o)| json!({"case": case, "type": self.use_object(o)}))
            .collect();
        Value::Array(cases)
    }

    fn describe(&mut self, name: String, p: Pending) {
        let entry = match p {
            Pending::Builtin(json_type) => {
                json!({"name": name, "meta-type": "builtin", "json-type": json_type})
            }
            Pending::Enum(e) => {
                let values = e.values();
                let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                json!({"name": name, "meta-type": "enum", "members": members, "values": values})
            }
            Pending::Args(members) => {
                let members = self.members(members);
                json!({"name": name, "meta-type": "object", "members": members})
            }
            Pending::Object(o) => {
                let mut entry = json!({"name": name, "meta-type": "object"});
                entry["members"] = self.members(o.members);
                if let Some(v) = &o.variants {
                    entry["tag"] = json!(v.tag);
                    entry["variants"] = self.variants(v);
                }
                entry
            }
            Pending::Array(elem) => {
                let elem = self.use_type(elem);
                json!({"name": name, "meta-type": "array", "element-type": elem})
            }
            Pending::Alternate(a) => {
                let members: Vec<Value> = a
                    .members
                    .iter()
                    .map(|t| json!({"type": self.use_type(t)}))
                    .collect();
                json!({"name": name, "meta-type": "alternate", "members": members})
            }
        };
        self.out.push(entry);
    }
}

/// The `query-qmp-schema` reply for these commands and events.
pub(crate) fn schema_info(commands: &[&'static Command], events: &[&'static Event]) -> Value {
    let mut g = Gen::default();
    for c in commands {
        let arg = match c.boxed {
            Some(o) => g.use_object(o),
            None => g.use_args(c.name, c.args),
        };
        let ret = g.use_type(&c.ret);
        g.out.push(json!({"name": c.name, "meta-type": "command",
                          "arg-type": arg, "ret-type": ret}));
    }
    for e in events {
        let arg = g.use_args(e.name, e.data);
        g.out
            .push(json!({"name": e.name, "meta-type": "event", "arg-type": arg}));
    }
    let mut i = 0;
    while i < g.queue.len() {
        let (name, p) = g.queue[i].clone();
        g.describe(name, p);
        i += 1;
    }
    Value::Array(g.out)
}
