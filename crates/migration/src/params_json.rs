//! Reading QMP argument values for `migrate-set-parameters` / `migrate-set-capabilities`,
//! with QEMU's error texts (split out of `params.rs`).

use serde::Deserialize;
use serde_json::Value;

use super::ParamError;

pub(super) fn type_error(name: &str, expected: &str) -> ParamError {
    ParamError::Invalid(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

pub(super) fn unexpected(name: &str) -> ParamError {
    ParamError::Invalid(format!("Parameter '{name}' is unexpected"))
}

pub(super) fn missing(name: &str) -> ParamError {
    ParamError::Invalid(format!("Parameter '{name}' is missing"))
}

pub(super) fn get_u64(name: &str, v: &Value, ty: &str) -> Result<u64, ParamError> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| ParamError::Invalid(format!("Parameter '{name}' expects {ty}"))),
        _ => Err(type_error(name, "integer")),
    }
}

pub(super) fn get_u8(name: &str, v: &Value) -> Result<u8, ParamError> {
    u8::try_from(get_u64(name, v, "uint8")?)
        .map_err(|_| ParamError::Invalid(format!("Parameter '{name}' expects uint8")))
}

pub(super) fn get_u32(name: &str, v: &Value) -> Result<u32, ParamError> {
    u32::try_from(get_u64(name, v, "uint32")?)
        .map_err(|_| ParamError::Invalid(format!("Parameter '{name}' expects uint32")))
}

pub(super) fn get_bool(name: &str, v: &Value) -> Result<bool, ParamError> {
    v.as_bool().ok_or_else(|| type_error(name, "boolean"))
}

/// `StrOrNull`: a string, or null meaning "".
pub(super) fn get_str_or_null(name: &str, v: &Value) -> Result<String, ParamError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        _ => Err(type_error(name, "string")),
    }
}

pub(super) fn get_enum<T: for<'de> Deserialize<'de>>(
    name: &str,
    v: &Value,
) -> Result<T, ParamError> {
    let s = v.as_str().ok_or_else(|| type_error(name, "string"))?;
    serde_json::from_value(Value::String(s.to_owned()))
        .map_err(|_| ParamError::Invalid(format!("Parameter '{name}' does not accept value '{s}'")))
}

pub(super) fn expects(name: &str, what: &str) -> ParamError {
    ParamError::Invalid(format!("Parameter '{name}' expects {what}"))
}
