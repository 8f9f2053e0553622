//! Parsing a framed request into a `serde_json::Value`, refusing duplicate keys.
//!
//! `serde_json`'s own `Value` keeps the last of two equal keys; QEMU's parser rejects the whole
//! message with `JSON parse error, duplicate key`, at any depth. This visitor builds the same
//! `Value` and fails on the first repeated key of any object.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The error text of a repeated key (without QEMU's `JSON parse error, ` prefix).
pub(crate) const DUPLICATE_KEY: &str = "duplicate key";

/// Parses one JSON text. On error, returns the text after `JSON parse error, `.
pub(crate) fn parse(bytes: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict.deserialize(&mut de).and_then(|v| {
        de.end()?;
        Ok(v)
    });
    value.map_err(|e| {
        let text = e.to_string();
        if text.starts_with(DUPLICATE_KEY) {
            DUPLICATE_KEY.to_owned()
        } else {
            text
        }
    })
}

/// A `Value` seed that refuses duplicate object keys.
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never produces a non-finite float; keep its `Value` behaviour anyway.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut list = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict)? {
            list.push(v);
        }
        Ok(Value::Array(list))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
            let v = map.next_value_seed(Strict)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_values_as_serde_json() {
        let text = br#"{"a": [1, -2, 3.5, 18446744073709551615, true, null, "s\u00e9"], "b": {}}"#;
        let expected: Value = serde_json::from_slice(text).expect("valid");
        assert_eq!(parse(text), Ok(expected));
        assert_eq!(parse(b"42"), Ok(json!(42)));
    }

    #[test]
    fn duplicate_keys_at_any_depth_are_refused() {
        assert_eq!(
            parse(br#"{"execute": "a", "execute": "b"}"#),
            Err(DUPLICATE_KEY.to_owned())
        );
        assert_eq!(
            parse(br#"{"execute": "a", "arguments": {"x": [{"k": 1, "k": 1}]}}"#),
            Err(DUPLICATE_KEY.to_owned())
        );
        // Equal keys in different objects are fine.
        assert!(parse(br#"{"k": {"k": 1}, "l": [{"k": 2}, {"k": 3}]}"#).is_ok());
        let other = parse(br#"{"a" 1}"#).expect_err("invalid");
        assert!(!other.starts_with(DUPLICATE_KEY), "{other}");
    }
}
