//! Reading request bodies: JSON into the route's type with errors that name the field path,
//! the token-id lists several routes accept, and typed optional fields of a JSON object (the
//! Responses and Messages routes read their bodies field by field).

use serde_json::{Map, Value};

use super::error::{self, ApiError};

/// Parses a JSON body into `T`; errors name the field path.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(&parse_object(body)?)
}

/// A request body: exactly one JSON object. Bytes after it (`{..} xx`) and any other
/// top-level value (an array would otherwise be read positionally as the fields) are 400s.
pub fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "body",
            "the request body is empty (JSON expected)",
        ));
    }
    // `from_slice` (unlike a bare `Deserializer`) refuses trailing characters
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("body", format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "body",
            "the request body must be a JSON object",
        ));
    }
    Ok(v)
}

/// Reads `T` from a parsed body; errors name the field path. Structs that share fields read
/// them each from the same value rather than through `#[serde(flatten)]`, which loses the path.
pub fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(error::json_error)
}

/// Token ids from JSON: a list of non-negative integers.
pub fn parse_ids(v: &Value, field: &str) -> Result<Vec<u32>, ApiError> {
    let list = v.as_array().ok_or_else(|| {
        ApiError::bad_request(field, format!("`{field}` must be a list of token ids"))
    })?;
    list.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&i| i <= u32::MAX as u64)
                .map(|i| i as u32)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        field,
                        format!("`{field}` must hold non-negative integer token ids, got {x}"),
                    )
                })
        })
        .collect()
}

/// 400 naming `field`, the message starting with it.
pub fn bad(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(field, format!("`{field}` {message}"))
}

/// A field that is present and not `null`.
pub fn opt<'a>(body: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    body.get(key).filter(|v| !v.is_null())
}

fn typed<T>(
    body: &Map<String, Value>,
    key: &str,
    get: impl FnOnce(&Value) -> Option<T>,
    what: &str,
) -> Result<Option<T>, ApiError> {
    opt(body, key)
        .map(|v| get(v).ok_or_else(|| bad(key, format!("must be {what}"))))
        .transpose()
}

pub fn opt_f32(body: &Map<String, Value>, key: &str) -> Result<Option<f32>, ApiError> {
    typed(body, key, |v| v.as_f64().map(|x| x as f32), "a number")
}

pub fn opt_u64(body: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    typed(body, key, Value::as_u64, "a non-negative integer")
}

pub fn opt_i64(body: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    typed(body, key, Value::as_i64, "an integer")
}

pub fn opt_bool(body: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    typed(body, key, Value::as_bool, "true or false")
}

pub fn opt_string(body: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    typed(body, key, |v| v.as_str().map(str::to_string), "a string")
}
