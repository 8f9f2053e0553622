//! The client's view of a `query-qmp-schema` reply: look entries up, answer libvirt-style
//! schema queries, and check replies and events against the declared types.
//!
//! It reads only the wire format (QEMU's `SchemaInfo`), so it works the same against QEMU and
//! against Tern, and it checks what a server actually sends, not the tables it was built from.

use std::collections::HashMap;

use serde_json::Value;

/// A parsed `query-qmp-schema` reply.
#[derive(Debug, Clone)]
pub struct QmpSchema {
    entries: HashMap<String, Value>,
    order: Vec<String>,
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn list_of<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

impl QmpSchema {
    /// Reads the reply: an array of entries, each with a unique `name` and a `meta-type`.
    pub fn new(reply: &Value) -> Result<QmpSchema, String> {
        let list = reply
            .as_array()
            .ok_or_else(|| format!("query-qmp-schema did not return an array: {reply}"))?;
        let mut entries = HashMap::new();
        let mut order = Vec::new();
        for e in list {
            let name = str_of(e, "name").ok_or_else(|| format!("entry without name: {e}"))?;
            if str_of(e, "meta-type").is_none() {
                return Err(format!("entry without meta-type: {e}"));
            }
            if entries.insert(name.to_owned(), e.clone()).is_some() {
                return Err(format!("two entries named '{name}'"));
            }
            order.push(name.to_owned());
        }
        Ok(QmpSchema { entries, order })
    }

    /// The entry named `name`.
    pub fn entry(&self, name: &str) -> Option<&Value> {
        self.entries.get(name)
    }

    /// Names of the entries of one meta-type (`command`, `event`, ...), in reply order.
    pub fn names(&self, meta_type: &str) -> Vec<&str> {
        self.order
            .iter()
            .filter(|n| {
                self.entries
                    .get(*n)
                    .is_some_and(|e| str_of(e, "meta-type") == Some(meta_type))
            })
            .map(String::as_str)
            .collect()
    }

    /// Every type name an entry refers to that has no entry of its own (a well-formed schema
    /// has none: libvirt calls such a schema malformed).
    pub fn dangling_references(&self) -> Vec<String> {
        let mut refs: Vec<&str> = Vec::new();
        for e in self.entries.values() {
            for key in ["arg-type", "ret-type", "element-type"] {
                refs.extend(str_of(e, key));
            }
            for key in ["members", "variants"] {
                refs.extend(list_of(e, key).iter().filter_map(|m| str_of(m, "type")));
            }
        }
        let mut out: Vec<String> = refs
            .into_iter()
            .filter(|r| !self.entries.contains_key(*r))
            .map(str::to_owned)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// libvirt's schema query (`virQEMUQAPISchemaPathExists`): `command/arg-type/member/...`,
    /// where a component may be `*member` (an optional member), `+case` (a union variant),
    /// `^value` (an enum value, last) or `!json-type` (a builtin's JSON type, last). Arrays are
    /// looked through; alternates match if any branch does.
    pub fn path_exists(&self, query: &str) -> bool {
        let mut parts = query.split('/');
        let Some(first) = parts.next() else {
            return false;
        };
        let rest: Vec<&str> = parts.collect();
        self.walk(first, &rest, 0)
    }

    fn walk(&self, name: &str, query: &[&str], depth: usize) -> bool {
        let Some(e) = self.entries.get(name) else {
            return false;
        };
        let Some((q, rest)) = query.split_first() else {
            return true;
        };
        if depth > 1000 {
            return false;
        }
        match str_of(e, "meta-type").unwrap_or("") {
            "command" | "event" => str_of(e, q).is_some_and(|t| self.walk(t, rest, depth + 1)),
            "array" => str_of(e, "element-type").is_some_and(|t| self.walk(t, query, depth + 1)),
            "object" => {
                let (list, key, want) = match q.split_at(1) {
                    ("+", case) => ("variants", "case", case),
                    ("*", m) => ("members", "name", m),
                    _ => ("members", "name", *q),
                };
                let found = list_of(e, list)
                    .iter()
                    .find(|m| str_of(m, key) == Some(want));
                match found {
                    Some(m) if q.starts_with('*') && m.get("default").is_none() => false,
                    Some(m) => str_of(m, "type").is_some_and(|t| self.walk(t, rest, depth + 1)),
                    None => false,
                }
            }
            "enum" => match q.strip_prefix('^') {
                Some(v) if rest.is_empty() => {
                    list_of(e, "values").iter().any(|x| x.as_str() == Some(v))
                }
                _ => false,
            },
            "builtin" => match q.strip_prefix('!') {
                Some(t) if rest.is_empty() => str_of(e, "json-type") == Some(t),
                _ => false,
            },
            "alternate" => list_of(e, "members")
                .iter()
                .filter_map(|m| str_of(m, "type"))
                .any(|t| self.walk(t, query, depth + 1)),
            _ => false,
        }
    }

    /// Checks `value` (what `command` returned) against the command's `ret-type`.
    pub fn check_return(&self, command: &str, value: &Value) -> Result<(), String> {
        let ret = self
            .entries
            .get(command)
            .and_then(|e| str_of(e, "ret-type"))
            .ok_or_else(|| format!("no command '{command}' in the schema"))?;
        self.check(ret, value, command)
    }

    /// Checks an event message (`{"event": NAME, "data": ..., "timestamp": ...}`) against the
    /// event's `arg-type` (an absent `data` counts as `{}`).
    pub fn check_event(&self, event: &Value) -> Result<(), String> {
        let name = str_of(event, "event").ok_or_else(|| format!("not an event: {event}"))?;
        let arg = self
            .entries
            .get(name)
            .filter(|e| str_of(e, "meta-type") == Some("event"))
            .and_then(|e| str_of(e, "arg-type"))
            .ok_or_else(|| format!("no event '{name}' in the schema"))?;
        let empty = Value::Object(serde_json::Map::new());
        self.check(arg, event.get("data").unwrap_or(&empty), name)
    }

    /// Checks that `value` is a value of type `ty`, strictly: every mandatory member present, no
    /// member the type does not declare. `path` names the value in messages.
    pub fn check(&self, ty: &str, value: &Value, path: &str) -> Result<(), String> {
        let e = self
            .entries
            .get(ty)
            .ok_or_else(|| format!("{path}: type '{ty}' is not in the schema"))?;
        let bad = |what: &str| Err(format!("{path}: {value} is not {what}"));
        match str_of(e, "meta-type").unwrap_or("") {
            "builtin" => {
                let ok = match str_of(e, "json-type").unwrap_or("") {
                    "string" => value.is_string(),
                    "int" => value.is_i64() || value.is_u64(),
                    "number" => value.is_number(),
                    "boolean" => value.is_boolean(),
                    "null" => value.is_null(),
                    "object" => value.is_object(),
                    "array" => value.is_array(),
                    _ => true,
                };
                if ok {
                    Ok(())
                } else {
                    bad(ty)
                }
            }
            "enum" => match value.as_str() {
                Some(s) if list_of(e, "values").iter().any(|v| v.as_str() == Some(s)) => Ok(()),
                _ => bad("one of the enum's values"),
            },
            "array" => {
                let Some(items) = value.as_array() else {
                    return bad("an array");
                };
                let elem = str_of(e, "element-type").unwrap_or("");
                for (i, item) in items.iter().enumerate() {
                    self.check(elem, item, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            "alternate" => {
                let fits = list_of(e, "members")
                    .iter()
                    .filter_map(|m| str_of(m, "type"))
                    .any(|t| self.check(t, value, path).is_ok());
                if fits {
                    Ok(())
                } else {
                    bad("any branch of the alternate")
                }
            }
            "object" => self.check_object(e, value, path),
            other => Err(format!("{path}: '{ty}' is a {other}, not a type")),
        }
    }

    fn check_object(&self, e: &Value, value: &Value, path: &str) -> Result<(), String> {
        let Some(map) = value.as_object() else {
            return Err(format!("{path}: {value} is not an object"));
        };
        // The members, then those of the variant the tag selects (a union in turn, maybe).
        let mut members: Vec<&Value> = Vec::new();
        let mut current = Some(e);
        while let Some(o) = current {
            members.extend(list_of(o, "members"));
            current = str_of(o, "tag").and_then(|tag| {
                let case = map.get(tag).and_then(Value::as_str)?;
                list_of(o, "variants")
                    .iter()
                    .find(|v| str_of(v, "case") == Some(case))
                    .and_then(|v| str_of(v, "type"))
                    .and_then(|t| self.entries.get(t))
            });
        }
        for m in &members {
            let name = str_of(m, "name").unwrap_or("");
            let here = format!("{path}.{name}");
            match map.get(name) {
                Some(v) => self.check(str_of(m, "type").unwrap_or(""), v, &here)?,
                None if m.get("default").is_some() => {}
                None => return Err(format!("{here} is missing in {value}")),
            }
        }
        if let Some(k) = map.keys().find(|k| {
            !members
                .iter()
                .any(|m| str_of(m, "name") == Some(k.as_str()))
        }) {
            return Err(format!("{path}.{k} is not in the schema"));
        }
        Ok(())
    }
}
