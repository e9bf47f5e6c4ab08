//! The one place where failures become HTTP responses: OpenAI-shaped JSON
//! `{"error": {"message", "type", "param", "code"}}` with the status that fits.

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use sglang::engine::{RequestError, SubmitError};
use sglang::sampling::ParamError;

use super::{full, Body};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            retry_after: None,
        }
    }

    /// 400 naming the offending field.
    pub fn bad_request(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 about the request as a whole (no single field to name).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or invalid API key (send `Authorization: Bearer <key>`)",
        )
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no route for {path}"),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}"),
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(seconds: f64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {seconds} s"),
        )
    }

    pub fn queue_full(waiting: usize) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("the request queue is full ({waiting} waiting); retry later"),
            )
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            )
        }
    }

    pub fn timeout(seconds: f64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("the request did not finish within the {seconds} s time limit and was aborted"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// Renames the field in the message and `param` (e.g. `max_new_tokens` -> `max_tokens` on
    /// the OpenAI routes).
    pub fn rename_param(mut self, from: &str, to: &str) -> Self {
        if self.param.as_deref() == Some(from) {
            self.param = Some(to.to_string());
            self.message = self
                .message
                .replace(&format!("`{from}`"), &format!("`{to}`"));
        }
        self
    }

    pub fn body_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }

    /// The error in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`, the
    /// type named by status as Anthropic names it.
    pub fn anthropic_json(&self) -> serde_json::Value {
        let kind = match self.status.as_u16() {
            400 | 405 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            504 => "timeout_error",
            _ => "api_error",
        };
        serde_json::json!({"type": "error", "error": {"type": kind, "message": self.message}})
    }

    pub fn into_response(self) -> Response<Body> {
        let body = self.body_json();
        self.respond(body)
    }

    /// As [`Self::into_response`], with the body in Anthropic's shape.
    pub fn into_anthropic_response(self) -> Response<Body> {
        let body = self.anthropic_json();
        self.respond(body)
    }

    fn respond(self, body: serde_json::Value) -> Response<Body> {
        let mut resp = Response::new(full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::bad_request(&e.param, e.to_string())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(p) => p.into(),
            SubmitError::Constraint(c) => match c.field() {
                Some(field) => ApiError::bad_request(field, c.to_string()),
                None => ApiError::invalid(c.to_string()),
            },
            SubmitError::QueueFull(n) => ApiError::queue_full(n),
            SubmitError::Stopped => ApiError::unavailable("the engine has stopped"),
            SubmitError::Draining => ApiError::unavailable("the server is shutting down"),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Model(_) | RequestError::Panicked => ApiError::internal(e.to_string()),
            RequestError::EngineFailed(_) | RequestError::EngineStopped => {
                ApiError::unavailable(e.to_string())
            }
            // the request's own constraint led nowhere: its input, not the server
            RequestError::Constraint { .. } => ApiError::invalid(e.to_string()),
        }
    }
}

/// A JSON body that does not parse into the expected shape: the message names the field path.
pub fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::bad_request("body", format!("malformed JSON: {inner}"));
    }
    if path == "." || path.is_empty() {
        return ApiError::bad_request("body", format!("invalid request: {inner}"));
    }
    ApiError::bad_request(&path, format!("`{path}`: {inner}"))
}
