//! Routing: which worker gets a request (the policies), and relaying it there: retried on
//! another worker while nothing has been answered, streamed through without buffering after.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use parking_lot::{Mutex, RwLock};
use serde_json::{json, Value};

use crate::args::{Args, Policy};
use crate::metrics::Metrics;
use crate::prefix::{PrefixIndex, CHUNK};
use crate::workers::{InFlight, Pool, Worker};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type RespBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub struct Router {
    pub args: Args,
    pub pool: Pool,
    pub index: Mutex<PrefixIndex>,
    pub metrics: Metrics,
    /// A worker's `/v1/models`, answered by the router itself.
    pub models: RwLock<Option<Value>>,
    pub draining: AtomicBool,
    /// Requests being relayed (streams until their last byte): what a drain waits for.
    pub active: AtomicUsize,
    client: Client<HttpConnector, Full<Bytes>>,
    round_robin: AtomicUsize,
    rng: AtomicU64,
}

/// Counts a request as active for the drain until dropped.
struct Active(Arc<Router>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// An OpenAI-shaped error answer.
pub fn error(status: StatusCode, message: &str) -> Response<RespBody> {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": message, "type": kind, "code": status.as_u16()}});
    json_response(status, &body)
}

pub fn json_response(status: StatusCode, body: &Value) -> Response<RespBody> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The text the cache-aware policy routes by: what the worker's radix cache will see first.
/// `None` when the route or body carries no prompt (routed by load alone).
pub fn routing_text(path: &str, body: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let first = |x: &Value| match x {
        Value::Array(a) => a.first().cloned(),
        other => Some(other.clone()),
    };
    let as_text = |x: Value| match x {
        Value::String(s) => s.into_bytes(),
        other => other.to_string().into_bytes(),
    };
    match path {
        "/generate" => {
            let p = v.get("text").or_else(|| v.get("input_ids"))?;
            // a batch of prompts goes by its first
            let p = match p {
                Value::Array(a) if a.first().is_some_and(|x| !x.is_number()) => a[0].clone(),
                other => other.clone(),
            };
            Some(as_text(p))
        }
        "/v1/completions" => Some(as_text(first(v.get("prompt")?)?)),
        "/v1/chat/completions" | "/v1/messages" => {
            // a conversation's next turn extends its message list, so its text extends this
            let mut text = v.get("system").map(|s| s.to_string()).unwrap_or_default();
            for m in v.get("messages")?.as_array()? {
                text.push_str(&m.to_string());
            }
            Some(text.into_bytes())
        }
        "/v1/responses" => Some(as_text(v.get("input")?.clone())),
        _ => None,
    }
}

impl Router {
    pub fn new(args: Args) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Arc::new(Self {
            index: Mutex::new(PrefixIndex::new(args.max_tree_size)),
            pool: Pool::default(),
            metrics: Metrics::new(),
            models: RwLock::new(None),
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            client,
            round_robin: AtomicUsize::new(0),
            rng: AtomicU64::new(seed),
            args,
        })
    }

    /// xorshift64*: enough for spreading requests.
    fn random(&self, n: usize) -> usize {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }

    /// The worker for a request whose prompt is `text`, among those in the pool and not in
    /// `excluded`.
    pub fn select(&self, text: Option<&[u8]>, excluded: &[u32]) -> Option<Arc<Worker>> {
        let cands = self.pool.healthy_except(excluded);
        if cands.is_empty() {
            return None;
        }
        let n = cands.len();
        Some(match self.args.policy {
            Policy::RoundRobin => {
                cands[self.round_robin.fetch_add(1, Ordering::Relaxed) % n].clone()
            }
            Policy::Random => cands[self.random(n)].clone(),
            Policy::PowerOfTwo => {
                let a = self.random(n);
                let b = (a + 1 + self.random(n.max(2) - 1)) % n;
                let (a, b) = (&cands[a], &cands[b]);
                if b.load() < a.load() { b } else { a }.clone()
            }
            Policy::CacheAware => self.cache_aware(text, &cands),
        })
    }

    fn cache_aware(&self, text: Option<&[u8]>, cands: &[Arc<Worker>]) -> Arc<Worker> {
        let mut ix = self.index.lock();
        // least loaded; among equals the one holding the least text, so new conversations
        // spread over the pool
        let least = cands
            .iter()
            .min_by_key(|w| (w.load(), ix.size(w.id)))
            .expect("candidates")
            .clone();
        let Some(text) = text.filter(|t| t.len() >= CHUNK) else {
            return least;
        };
        let ids: Vec<u32> = cands.iter().map(|w| w.id).collect();
        let m = ix.longest_match(text, &ids);
        let a = &self.args;
        let matched = cands
            .iter()
            .filter(|w| m.workers.contains(&w.id))
            .min_by_key(|w| w.load())
            .filter(|_| m.bytes as f64 >= a.cache_threshold * text.len() as f64);
        let chosen = match matched {
            Some(w) => {
                let (load, min) = (w.load(), least.load());
                let overloaded = load > min + a.balance_abs_threshold
                    && load as f64 > min as f64 * a.balance_rel_threshold;
                if overloaded {
                    least
                } else {
                    w.clone()
                }
            }
            None => least,
        };
        let hit = matched.is_some_and(|w| w.id == chosen.id);
        if hit {
            self.metrics.cache_aware_hits_total.inc();
        } else {
            self.metrics.cache_aware_misses_total.inc();
        }
        ix.insert(text, chosen.id);
        chosen
    }

    /// A GET to one worker with the health-check timeout: status and whole body.
    pub async fn get(&self, w: &Worker, path: &str) -> Result<(StatusCode, Bytes), String> {
        let req = Request::get(format!("{}{path}", w.url))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let limit = Duration::from_secs_f64(self.args.health_check_timeout_secs);
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| format!("no answer within {} s", limit.as_secs_f64()))?
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        let Some(key) = self.args.api_key.as_deref() else {
            return true;
        };
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        bearer == Some(key) || x_api_key == Some(key)
    }

    fn health(&self) -> Response<RespBody> {
        let workers: Vec<Value> = self
            .pool
            .all()
            .iter()
            .map(|w| json!({"url": w.url, "healthy": w.healthy(), "in_flight": w.load()}))
            .collect();
        let healthy = workers.iter().filter(|w| w["healthy"] == true).count();
        let (status, code) = if self.draining.load(Ordering::Acquire) {
            ("draining", StatusCode::SERVICE_UNAVAILABLE)
        } else if healthy == 0 {
            ("unhealthy", StatusCode::SERVICE_UNAVAILABLE)
        } else {
            ("healthy", StatusCode::OK)
        };
        json_response(
            code,
            &json!({"status": status, "healthy_workers": healthy, "workers": workers,
                    "policy": self.args.policy.name()}),
        )
    }

    /// `/flush_cache` goes to every worker in the pool; the router forgets its tree too.
    async fn flush_all(self: &Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let headers = req.headers().clone();
        let mut failed = Vec::new();
        let workers = self.pool.healthy_except(&[]);
        for w in &workers {
            let mut r = Request::post(format!("{}/flush_cache", w.url))
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            self.copy_request_headers(&headers, r.headers_mut());
            match self.client.request(r).await {
                Ok(resp) if resp.status().is_success() => self.index.lock().remove_worker(w.id),
                Ok(resp) => failed.push(format!("{}: {}", w.url, resp.status())),
                Err(e) => failed.push(format!("{}: {e}", w.url)),
            }
        }
        if failed.is_empty() {
            json_response(StatusCode::OK, &json!({"flushed": workers.len()}))
        } else {
            error(
                StatusCode::BAD_GATEWAY,
                &format!("flush failed on {}", failed.join(", ")),
            )
        }
    }

    fn copy_request_headers(&self, from: &HeaderMap, to: &mut HeaderMap) {
        for (k, v) in from {
            // host and content-length come from the worker's URI and the body
            if !hop_by_hop(k.as_str()) && k != "host" && k != "content-length" {
                to.append(k, v.clone());
            }
        }
        if let Some(key) = &self.args.worker_api_key {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
                to.insert(AUTHORIZATION, v);
                to.remove("x-api-key");
            }
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/health") | (&Method::GET, "/workers") => return self.health(),
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(full(self.metrics.render()));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return r;
            }
            _ => {}
        }
        if !self.authorised(req.headers()) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
        }
        if self.draining.load(Ordering::Acquire) {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the router is draining");
        }
        match (req.method(), path.as_str()) {
            (&Method::GET, "/v1/models") => {
                if let Some(m) = self.models.read().clone() {
                    return json_response(StatusCode::OK, &m);
                }
            }
            (&Method::POST, "/flush_cache") => return self.flush_all(req).await,
            _ => {}
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        let active = Active(self.clone());
        self.relay(req, path, active).await
    }

    /// Sends the request to the chosen worker; on a failure before any answer, to another
    /// (at most `--max-retries` more, each failed worker excluded).
    async fn relay(
        self: &Arc<Self>,
        req: Request<Incoming>,
        path: String,
        active: Active,
    ) -> Response<RespBody> {
        let arrived = Instant::now();
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, self.args.max_request_bytes)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "request body larger than --max-request-bytes ({})",
                        self.args.max_request_bytes
                    ),
                )
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}")),
        };
        let text = routing_text(&path, &body);
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or(path.clone(), |p| p.to_string());
        let mut excluded = Vec::new();
        let mut last_error = String::from("no worker in the pool");
        for attempt in 0..=self.args.max_retries {
            let Some(w) = self.select(text.as_deref(), &excluded) else {
                break;
            };
            if attempt > 0 {
                self.metrics.retries_total.inc();
            }
            let mut up = Request::builder()
                .method(parts.method.clone())
                .uri(format!("{}{path_and_query}", w.url))
                .body(Full::new(body.clone()))
                .expect("valid request");
            self.copy_request_headers(&parts.headers, up.headers_mut());
            let in_flight = InFlight::new(self, &w);
            let limit = Duration::from_secs_f64(self.args.request_timeout_secs);
            let errs = |kind: &str| self.metrics.errors_total.with_label_values(&[&w.url, kind]);
            match tokio::time::timeout(limit, self.client.request(up)).await {
                Err(_) => {
                    errs("timeout").inc();
                    last_error = format!("{} gave no answer within {} s", w.url, limit.as_secs());
                }
                Ok(Err(e)) => {
                    errs("connect").inc();
                    last_error = format!("{}: {e}", w.url);
                    self.eject(&w, &format!("request failed: {e}"));
                }
                // a worker starting, draining or overloaded did not take the request
                Ok(Ok(resp)) if retryable(resp.status()) && attempt < self.args.max_retries => {
                    errs("status").inc();
                    last_error = format!("{} answered {}", w.url, resp.status());
                }
                Ok(Ok(resp)) => {
                    self.metrics
                        .time_to_headers_seconds
                        .observe(arrived.elapsed().as_secs_f64());
                    self.metrics
                        .requests_total
                        .with_label_values(&[&w.url, resp.status().as_str()])
                        .inc();
                    return self.pass_through(resp, w, in_flight, active);
                }
            }
            tracing::warn!("attempt {} of {path} failed: {last_error}", attempt + 1);
            excluded.push(w.id);
        }
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no worker could take the request ({last_error})"),
        )
    }

    fn pass_through(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        w: Arc<Worker>,
        in_flight: InFlight,
        active: Active,
    ) -> Response<RespBody> {
        let (parts, body) = resp.into_parts();
        let sse = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut out = Response::new(
            Relay {
                inner: body,
                sse,
                done: false,
                router: self.clone(),
                worker: w,
                _held: (in_flight, active),
            }
            .boxed(),
        );
        *out.status_mut() = parts.status;
        for (k, v) in &parts.headers {
            if !hop_by_hop(k.as_str()) {
                out.headers_mut().append(k, v.clone());
            }
        }
        out
    }
}

/// Answers that mean the worker did not take the request: worth another worker.
fn retryable(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// A worker's answer relayed frame by frame. If the worker fails mid-stream the request is not
/// replayed (the client has part of it): a server-sent-event stream ends with an error event,
/// any other body is cut (the client sees a truncated message).
struct Relay {
    inner: Incoming,
    sse: bool,
    done: bool,
    router: Arc<Router>,
    worker: Arc<Worker>,
    _held: (InFlight, Active),
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                let url = self.worker.url.clone();
                self.router
                    .metrics
                    .errors_total
                    .with_label_values(&[&url, "stream"])
                    .inc();
                tracing::warn!("worker {url} failed mid-answer: {e}");
                if !self.sse {
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                let event = json!({"error": {
                    "message": format!("the worker serving this request failed mid-stream ({e}); \
                                        the answer is incomplete and was not retried"),
                    "type": "server_error", "code": 502}});
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
                    "data: {event}\n\n"
                ))))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            other => other.map_err(|e| Box::new(e) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_text_follows_each_api() {
        let t =
            |p: &str, b: Value| routing_text(p, b.to_string().as_bytes()).map(String::from_utf8);
        assert_eq!(t("/generate", json!({"text": "hi"})), Some(Ok("hi".into())));
        assert_eq!(
            t("/generate", json!({"text": ["a", "b"]})),
            Some(Ok("a".into()))
        );
        assert_eq!(
            t("/generate", json!({"input_ids": [1, 2]})),
            Some(Ok("[1,2]".into()))
        );
        assert_eq!(
            t("/v1/completions", json!({"prompt": ["p", "q"]})),
            Some(Ok("p".into()))
        );
        let turn1 = json!({"messages": [{"role": "user", "content": "x"}]});
        let turn2 = json!({"messages": [{"role": "user", "content": "x"},
                                        {"role": "assistant", "content": "y"}]});
        let (a, b) = (
            t("/v1/chat/completions", turn1).unwrap().unwrap(),
            t("/v1/chat/completions", turn2).unwrap().unwrap(),
        );
        assert!(b.starts_with(&a) && b.len() > a.len());
        assert_eq!(t("/v1/embeddings", json!({"input": "x"})), None);
        assert_eq!(routing_text("/generate", b"not json"), None);
    }
}
