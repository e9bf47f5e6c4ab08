//! Reading request bodies: JSON into the route's type with errors that name the field path,
//! and the token-id lists several routes accept.

use serde_json::Value;

use super::error::{self, ApiError};

/// Parses a JSON body into `T`; errors name the field path.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "body",
            "the request body is empty (JSON expected)",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(error::json_error)
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
