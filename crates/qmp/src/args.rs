//! Typed command arguments with QEMU-like error messages.
//!
//! `serde_json`'s errors do not say which member was wrong, so arguments are deserialized
//! through a thin wrapper around `serde_json::Value` that records the path of the member being
//! deserialized; the error is then rewritten into the text QEMU's QAPI input visitor produces.

use std::cell::RefCell;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use serde_json::{Map, Value};

use crate::error::QmpError;

/// Deserializes command arguments into `T`, mapping failures to QEMU's `GenericError` texts:
///
/// * `Parameter 'uri' is missing`
/// * `Parameter 'foo' is unexpected` (with `#[serde(deny_unknown_fields)]`)
/// * `Invalid parameter type for 'x', expected: string` (`integer`, `boolean`, `number`,
///   `object`, `array`)
/// * `Parameter 'x' expects uint8` (integer out of range)
/// * `Parameter 'x' does not accept value 'nope'` (unknown enum value)
///
/// Nested members are named like QEMU does: `a.b`, `list[2]`.
pub fn parse_args<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, QmpError> {
    let path = RefCell::new(Vec::new());
    let result = T::deserialize(Tracked {
        value: Value::Object(args),
        path: &path,
    });
    result.map_err(|e| QmpError::generic(rewrite(&e.to_string(), &path.borrow())))
}

/// For commands without arguments: rejects any member with QEMU's text.
pub fn no_args(args: &Map<String, Value>) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn join(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn between_backticks(s: &str) -> Option<&str> {
    let start = s.find('`')? + 1;
    let len = s[start..].find('`')?;
    Some(&s[start..start + len])
}

fn int_name(expected: &str) -> Option<&'static str> {
    Some(match expected.trim() {
        "u8" => "uint8",
        "u16" => "uint16",
        "u32" => "uint32",
        "u64" | "usize" => "uint64",
        "i8" => "int8",
        "i16" => "int16",
        "i32" => "int32",
        "i64" | "isize" => "int64",
        _ => return None,
    })
}

fn qapi_type(expected: &str) -> String {
    let e = expected.trim();
    if int_name(e).is_some() || e.contains("integer") || e.starts_with("u128") || e == "i128" {
        "integer".into()
    } else if e.contains("bool") {
        "boolean".into()
    } else if e.contains("f32") || e.contains("f64") || e.contains("float") || e.contains("number")
    {
        "number".into()
    } else if e.contains("string") || e.contains("char") || e.contains("variant") {
        "string".into()
    } else if e.contains("struct") || e.contains("map") {
        "object".into()
    } else if e.contains("sequence") || e.contains("tuple") || e.contains("array") {
        "array".into()
    } else if e.contains("unit") || e.contains("null") {
        "null".into()
    } else {
        e.to_string()
    }
}

fn rewrite(msg: &str, path: &[Seg]) -> String {
    let here = join(path);
    if let Some(rest) = msg.strip_prefix("missing field ") {
        let field = between_backticks(rest).unwrap_or(rest);
        let mut full = path.to_vec();
        full.push(Seg::Key(field.to_string()));
        return format!("Parameter '{}' is missing", join(&full));
    }
    if msg.starts_with("unknown field ") {
        return format!("Parameter '{here}' is unexpected");
    }
    if msg.starts_with("unknown variant ") {
        let value = between_backticks(msg).unwrap_or("");
        return format!("Parameter '{here}' does not accept value '{value}'");
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let expected = rest.split_once(", expected ").map_or(rest, |(_, e)| e);
        return format!(
            "Invalid parameter type for '{here}', expected: {}",
            qapi_type(expected)
        );
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        let expected = rest.split_once(", expected ").map_or(rest, |(_, e)| e);
        let what = int_name(expected).unwrap_or(expected);
        return format!("Parameter '{here}' expects {what}");
    }
    if here.is_empty() {
        msg.to_string()
    } else {
        format!("Parameter '{here}': {msg}")
    }
}

/// A `Value` deserializer that records the path of the member being deserialized.
struct Tracked<'p> {
    value: Value,
    path: &'p RefCell<Vec<Seg>>,
}

macro_rules! forward_to_value {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                self.value.$method(visitor)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Tracked<'_> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Object(map) => visitor.visit_map(TrackedMap {
                iter: map.into_iter(),
                value: None,
                path: self.path,
            }),
            Value::Array(items) => visitor.visit_seq(TrackedSeq {
                iter: items.into_iter().enumerate(),
                path: self.path,
            }),
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Object(_) | Value::Array(_) => self.deserialize_any(visitor),
            other => other.deserialize_struct(name, fields, visitor),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Object(_) => self.deserialize_any(visitor),
            other => other.deserialize_map(visitor),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Array(_) => self.deserialize_any(visitor),
            other => other.deserialize_seq(visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Array(_) => self.deserialize_any(visitor),
            other => other.deserialize_tuple(len, visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.value.deserialize_enum(name, variants, visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.value.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.deserialize_tuple(len, visitor)
    }

    forward_to_value! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_unit
        deserialize_identifier deserialize_ignored_any
    }
}

struct TrackedMap<'p> {
    iter: serde_json::map::IntoIter,
    value: Option<Value>,
    path: &'p RefCell<Vec<Seg>>,
}

impl<'de> MapAccess<'de> for TrackedMap<'_> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.iter.next() {
            Some((key, value)) => {
                self.path.borrow_mut().push(Seg::Key(key.clone()));
                self.value = Some(value);
                let de: de::value::StringDeserializer<serde_json::Error> = key.into_deserializer();
                seed.deserialize(de).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let value = self.value.take().unwrap_or(Value::Null);
        let out = seed.deserialize(Tracked {
            value,
            path: self.path,
        })?;
        self.path.borrow_mut().pop();
        Ok(out)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct TrackedSeq<'p> {
    iter: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    path: &'p RefCell<Vec<Seg>>,
}

impl<'de> SeqAccess<'de> for TrackedSeq<'_> {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        match self.iter.next() {
            Some((i, value)) => {
                self.path.borrow_mut().push(Seg::Index(i));
                let out = seed.deserialize(Tracked {
                    value,
                    path: self.path,
                })?;
                self.path.borrow_mut().pop();
                Ok(Some(out))
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Args {
        uri: String,
        #[serde(default)]
        max_bandwidth: Option<u8>,
        #[serde(default)]
        mode: Option<Mode>,
        #[serde(default)]
        caps: Vec<Cap>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        Fast,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cap {
        #[allow(dead_code)]
        state: bool,
    }

    fn err(v: Value) -> String {
        let Value::Object(map) = v else {
            panic!("test input must be an object")
        };
        match parse_args::<Args>(map) {
            Ok(a) => panic!("unexpected success: {a:?}"),
            Err(e) => e.desc,
        }
    }

    #[test]
    fn qemu_like_messages() {
        assert_eq!(err(json!({})), "Parameter 'uri' is missing");
        assert_eq!(
            err(json!({"uri": 1})),
            "Invalid parameter type for 'uri', expected: string"
        );
        assert_eq!(
            err(json!({"uri": "x", "foo": 1})),
            "Parameter 'foo' is unexpected"
        );
        assert_eq!(
            err(json!({"uri": "x", "max-bandwidth": 300})),
            "Parameter 'max-bandwidth' expects uint8"
        );
        assert_eq!(
            err(json!({"uri": "x", "max-bandwidth": "a"})),
            "Invalid parameter type for 'max-bandwidth', expected: integer"
        );
        assert_eq!(
            err(json!({"uri": "x", "mode": "slow"})),
            "Parameter 'mode' does not accept value 'slow'"
        );
        assert_eq!(
            err(json!({"uri": "x", "caps": [{"state": true}, {"state": 1}]})),
            "Invalid parameter type for 'caps[1].state', expected: boolean"
        );
        assert_eq!(
            err(json!({"uri": "x", "caps": [{}]})),
            "Parameter 'caps[0].state' is missing"
        );
        assert_eq!(
            err(json!({"uri": "x", "caps": 3})),
            "Invalid parameter type for 'caps', expected: array"
        );
        let Value::Object(map) = json!({"uri": "tcp:x", "mode": "fast"}) else {
            unreachable!()
        };
        let a: Args = parse_args(map).expect("valid args");
        assert_eq!(a.uri, "tcp:x");
        assert!(no_args(&Map::new()).is_ok());
    }
}
