//! The HTTP front: hyper 1 over HTTP/1.1. One function (`handle`) routes every request,
//! checks its key, reads its body under the size limit, calls the route's handler, and turns
//! the outcome into a response, a `sglang_requests_total` count and, for inference routes, one
//! log line. Handlers live by API: `native` (SGLang), `openai`, `admin` (tokenizer, info,
//! cache), and `crate::health`.

mod admin;
mod anthropic;
mod conn;
pub mod error;
pub mod health;
mod jobs;
mod native;
pub mod openai;
mod parse;
mod sse;
pub mod tools;
mod turn;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use sglang::engine::EngineHandle;
use sglang::metrics::Metrics;

use crate::args::ServerArgs;
pub use admin::sha256_file as admin_sha256_file;
pub use conn::{connection_cap, serve, Connections};
pub use error::ApiError;
use health::Health;
pub use turn::reasoning_parser_names;

pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// Everything the handlers share.
pub struct AppState {
    pub args: ServerArgs,
    /// Set once the model is loaded; until then inference routes answer 503.
    pub engine: OnceLock<EngineHandle>,
    pub metrics: Arc<Metrics>,
    pub health: Health,
    pub served_model_name: String,
    pub started: Instant,
    pub draining: AtomicBool,
    /// Inference requests whose response is not finished yet (drained on shutdown).
    pub active: AtomicUsize,
    /// Stored `/v1/responses` results, for `GET` and `previous_response_id`.
    pub responses: openai::ResponseStore,
    /// Open connections under the cap.
    pub connections: conn::Connections,
}

impl AppState {
    /// The engine, or 503 while starting or draining.
    pub fn engine(&self) -> Result<&EngineHandle, ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.engine
            .get()
            .ok_or_else(|| ApiError::unavailable("the server is starting: the model is loading"))
    }
}

/// Keeps `AppState::active` up while an inference response is being produced.
pub struct ActiveGuard(Arc<AppState>);

impl ActiveGuard {
    pub fn new(state: &Arc<AppState>) -> Self {
        state.active.fetch_add(1, Ordering::AcqRel);
        Self(state.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Probes and scrapers.
    Open,
    /// `--api-key`.
    Inference,
    /// `--admin-api-key` (or `--api-key` when there is no admin key).
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Generate,
    Completions,
    ChatCompletions,
    Responses,
    /// `/v1/responses/{id}`: the id is read from the path.
    ResponseById,
    Messages,
    CountTokens,
    Models,
    Tokenize,
    Detokenize,
    ModelInfo,
    ServerInfo,
    Config,
    FlushCache,
    Checkpoint,
    CacheState,
    Health,
    HealthGenerate,
    Metrics,
    OpenApi,
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const BOTH: &[Method] = &[Method::GET, Method::POST];
const GET_DELETE: &[Method] = &[Method::GET, Method::DELETE];

/// Every route: its path (a template for `/v1/responses/{id}`) and methods. `openapi.json`
/// describes exactly these (a test keeps them equal).
const ROUTES: &[(&str, Route, &[Method])] = &[
    ("/generate", Route::Generate, POST),
    ("/v1/completions", Route::Completions, POST),
    ("/v1/chat/completions", Route::ChatCompletions, POST),
    ("/v1/responses", Route::Responses, POST),
    ("/v1/responses/{id}", Route::ResponseById, GET_DELETE),
    ("/v1/messages", Route::Messages, POST),
    ("/v1/messages/count_tokens", Route::CountTokens, POST),
    ("/v1/models", Route::Models, GET),
    ("/tokenize", Route::Tokenize, POST),
    ("/detokenize", Route::Detokenize, POST),
    ("/get_model_info", Route::ModelInfo, GET),
    ("/get_server_info", Route::ServerInfo, GET),
    ("/config", Route::Config, GET),
    ("/flush_cache", Route::FlushCache, BOTH),
    ("/admin/checkpoint", Route::Checkpoint, POST),
    ("/admin/cache/state", Route::CacheState, BOTH),
    ("/health", Route::Health, GET),
    ("/health_generate", Route::HealthGenerate, GET),
    ("/metrics", Route::Metrics, GET),
    ("/openapi.json", Route::OpenApi, GET),
];

/// The OpenAPI 3.1 description of `ROUTES`, served at `GET /openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

impl Route {
    /// The route for a path and the methods it takes.
    fn find(path: &str) -> Option<(Route, &'static [Method])> {
        if response_id(path).is_some() {
            return Some((Route::ResponseById, GET_DELETE));
        }
        ROUTES
            .iter()
            .find(|(p, r, _)| *p == path && *r != Route::ResponseById)
            .map(|&(_, r, m)| (r, m))
    }

    fn access(self) -> Access {
        match self {
            Route::Health | Route::HealthGenerate | Route::Metrics | Route::OpenApi => Access::Open,
            Route::ServerInfo
            | Route::Config
            | Route::FlushCache
            | Route::Checkpoint
            | Route::CacheState => Access::Admin,
            _ => Access::Inference,
        }
    }

    /// Routes that run the model: counted as in flight and logged per request.
    fn is_inference(self) -> bool {
        matches!(
            self,
            Route::Generate
                | Route::Completions
                | Route::ChatCompletions
                | Route::Responses
                | Route::Messages
        )
    }

    /// Anthropic's routes answer errors in Anthropic's shape.
    fn is_anthropic(self) -> bool {
        matches!(self, Route::Messages | Route::CountTokens)
    }

    /// The path as a metrics label: the template, not the id, for `/v1/responses/{id}`.
    fn label(self, path: &str) -> &str {
        match self {
            Route::ResponseById => "/v1/responses/{id}",
            _ => path,
        }
    }
}

/// The id in `/v1/responses/{id}`.
fn response_id(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/responses/")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Constant-time comparison, so response timing does not reveal how much of a key matched.
fn keys_match(given: &[u8], want: &[u8]) -> bool {
    if given.len() != want.len() {
        return false;
    }
    given
        .iter()
        .zip(want)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn authorized(state: &AppState, access: Access, req: &Request<Incoming>) -> bool {
    let key = match access {
        Access::Open => return true,
        Access::Inference => state.args.api_key.as_deref(),
        Access::Admin => state
            .args
            .admin_api_key
            .as_deref()
            .or(state.args.api_key.as_deref()),
    };
    let Some(key) = key else { return true };
    // `Authorization: Bearer <key>` (OpenAI, SGLang; the scheme in any case, RFC 9110) or
    // `x-api-key: <key>` (Anthropic)
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or("");
    keys_match(given.trim().as_bytes(), key.as_bytes())
}

/// The credentials of `Authorization: Bearer <token>`, the scheme matched in any case.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Reads the whole body, refusing one over `limit` bytes (413) or slower than `timeout` (408).
async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::too_large(limit));
        }
    }
    let read = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect());
    let Ok(read) = read.await else {
        return Err(ApiError::body_timeout(timeout.as_secs_f64()));
    };
    match read {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(
            "body",
            format!("cannot read the body: {e}"),
        )),
    }
}

/// Runs a request's CPU-heavy preparation (JSON parsing, chat templating, tokenizing) on the
/// blocking pool, so that the two async threads keep answering `/health` and streaming while
/// a large prompt is read.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn ok_json(value: &serde_json::Value) -> Response<Body> {
    json_response(StatusCode::OK, value)
}

/// Serves one HTTP request.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let Some((route, methods)) = Route::find(&path) else {
        state
            .metrics
            .requests_total
            .with_label_values(&["other", "404"])
            .inc();
        return Ok(ApiError::not_found(&path).into_response());
    };
    let outcome = dispatch(&state, route, methods, req).await;
    let resp = match outcome {
        Ok(r) => r,
        Err(e) if route.is_anthropic() => e.into_anthropic_response(),
        Err(e) => e.into_response(),
    };
    let status = resp.status();
    state
        .metrics
        .requests_total
        .with_label_values(&[route.label(&path), status.as_str()])
        .inc();
    if route.is_inference() {
        state
            .metrics
            .request_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        if !status.is_success() {
            tracing::info!(target: "sglang::request", endpoint = %path, %method, status = status.as_u16(), total_ms = started.elapsed().as_millis() as u64, "request refused");
        }
    }
    Ok(resp)
}

async fn dispatch(
    state: &Arc<AppState>,
    route: Route,
    methods: &[Method],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if !methods.contains(req.method()) {
        return Err(ApiError::method_not_allowed(
            req.method().as_str(),
            req.uri().path(),
        ));
    }
    if !authorized(state, route.access(), &req) {
        return Err(ApiError::unauthorized());
    }
    match route {
        Route::Health => return Ok(health::health(state)),
        Route::HealthGenerate => return Ok(health::health_generate(state).await),
        Route::Metrics => return Ok(health::metrics(state)),
        Route::OpenApi => {
            return Ok(Response::builder()
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(full(Bytes::from_static(OPENAPI.as_bytes())))
                .expect("static response"))
        }
        _ => {}
    }
    let limit = state.args.max_request_bytes;
    let _active = route.is_inference().then(|| ActiveGuard::new(state));
    let is_post = req.method() == Method::POST;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = if is_post {
        let timeout = std::time::Duration::from_secs_f64(state.args.body_read_timeout);
        read_body(req, limit, timeout).await?
    } else {
        Bytes::new()
    };
    match route {
        Route::Generate => native::generate(state, body).await,
        Route::Completions => openai::completions(state, body).await,
        Route::ChatCompletions => openai::chat_completions(state, body).await,
        Route::Responses => openai::create_response(state, body).await,
        Route::ResponseById => {
            let id = response_id(&path).unwrap_or_default();
            if method == Method::DELETE {
                openai::delete_response(state, id)
            } else {
                openai::get_response(state, id)
            }
        }
        Route::Messages => anthropic::create(state, body).await,
        Route::CountTokens => anthropic::count_tokens(state, body).await,
        Route::Models => openai::models(state),
        Route::Tokenize => admin::tokenize(state, body).await,
        Route::Detokenize => admin::detokenize(state, body).await,
        Route::ModelInfo => admin::model_info(state),
        Route::ServerInfo => admin::server_info(state),
        Route::Config => admin::config(state),
        Route::FlushCache => admin::flush_cache(state).await,
        Route::Checkpoint => admin::checkpoint(state).await,
        Route::CacheState if is_post => admin::warm_cache(state, &body).await,
        Route::CacheState => admin::cache_state(state).await,
        Route::Health | Route::HealthGenerate | Route::Metrics | Route::OpenApi => {
            unreachable!("handled above")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_in_full() {
        assert!(keys_match(b"secret", b"secret"));
        assert!(!keys_match(b"secreT", b"secret"));
        assert!(!keys_match(b"secret-longer", b"secret"));
        assert!(!keys_match(b"", b"secret"));
    }

    #[test]
    fn bearer_scheme_in_any_case() {
        for h in ["Bearer k1", "bearer k1", "BEARER k1", "  bEaReR k1"] {
            assert_eq!(bearer_token(h), Some("k1"), "{h}");
        }
        assert_eq!(bearer_token("Basic k1"), None);
        assert_eq!(bearer_token("Bearerk1"), None);
    }

    #[test]
    fn routes_and_their_access() {
        assert_eq!(
            Route::find("/v1/chat/completions").unwrap().0.access(),
            Access::Inference
        );
        assert_eq!(
            Route::find("/flush_cache").unwrap().0.access(),
            Access::Admin
        );
        assert_eq!(Route::find("/metrics").unwrap().0.access(), Access::Open);
        assert!(Route::find("/nope").is_none());
        assert_eq!(Route::find("/v1/responses/{id}").unwrap().1, GET_DELETE);
    }

    /// `openapi.json` describes every route with exactly its methods, and nothing else.
    #[test]
    fn openapi_describes_every_route() {
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(spec["openapi"], "3.1.0");
        let paths = spec["paths"].as_object().unwrap();
        let mut described: Vec<(String, String)> = paths
            .iter()
            .flat_map(|(p, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(move |m| (p.clone(), m.to_uppercase()))
            })
            .collect();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .flat_map(|(p, _, ms)| ms.iter().map(move |m| (p.to_string(), m.to_string())))
            .collect();
        described.sort();
        served.sort();
        assert_eq!(described, served);
        for (p, r, _) in ROUTES {
            let open = spec["paths"][p]
                .as_object()
                .unwrap()
                .values()
                .all(|op| op.get("security").is_none());
            assert_eq!(open, r.access() == Access::Open, "{p}: security");
        }
    }
}
