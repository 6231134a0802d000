//! The one JSON body parser of every API. A body that is not JSON, or not the shape a handler
//! asks for, is a 400 whose message is serde's account of what was wrong (the field it could
//! not take, the line and column); the edge puts it in the shape of the API that was called.

use serde::de::DeserializeOwned;

use super::error::{ApiError, ApiResult};

/// Parses a request body as `T`.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Named {
        #[allow(dead_code)]
        name: String,
    }

    #[test]
    fn refusals_say_what_was_wrong() {
        assert!(parse::<Named>(br#"{"name": "a"}"#).is_ok());
        for (body, says) in [
            (&br#"{"name": "#[..], "EOF"),
            (br#"{"name": 1}"#, "expected a string"),
            (br#"{"name": "a", "color": 1}"#, "unknown field `color`"),
            (b"", "EOF"),
        ] {
            let e = parse::<Named>(body).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(e.message.contains(says), "{}", e.message);
            assert!(e.message.starts_with("the request body is not valid"));
        }
    }
}
