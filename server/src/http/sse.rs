//! Server-sent events straight from the engine. The response body polls the generations'
//! event streams itself and formats each event as it arrives, so a streamed response costs no
//! task and no channel besides the engine's own event channel, whatever the number of
//! generations it merges. When the client goes away hyper drops the body, which drops the
//! streams and so aborts the generations in the engine.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use sglang::engine::{AbortReason, EngineHandle, Event, RequestError, RequestStream};

use super::{ActiveGuard, ApiError, AppState, Body};

/// One server-sent event: an optional `event:` name (the Responses and Messages protocols
/// name theirs) and its `data:`.
pub struct SseEvent {
    pub name: Option<&'static str>,
    pub data: String,
}

impl SseEvent {
    pub fn named(name: &'static str, data: String) -> Self {
        Self {
            name: Some(name),
            data,
        }
    }

    fn bytes(&self) -> Bytes {
        Bytes::from(match self.name {
            Some(n) => format!("event: {n}\ndata: {}\n\n", self.data),
            None => format!("data: {}\n\n", self.data),
        })
    }
}

impl From<String> for SseEvent {
    fn from(data: String) -> Self {
        Self { name: None, data }
    }
}

/// What an SSE stream formats: each event becomes zero or more server-sent events.
pub trait StreamFormatter: Send + Sync + 'static {
    fn event(&mut self, index: usize, event: &Event) -> Vec<SseEvent>;
    /// Events after every generation finished (usage chunks, a closing event).
    fn finish(&mut self) -> Vec<SseEvent> {
        Vec::new()
    }
    /// How a failure is told mid-stream (OpenAI's error object by default).
    fn error(&self, e: &ApiError) -> SseEvent {
        e.body_json().to_string().into()
    }
    /// Whether the stream ends with `data: [DONE]` (OpenAI's chat and completions do).
    fn done_marker(&self) -> bool {
        true
    }
    /// Called once at the end with the outcome, for the request log line.
    fn log(&self, status: &str, started: Instant);
}

/// The body of a streamed response: `streams[i]`'s events become server-sent events through
/// `fmt`, then (unless the client left, and where the protocol has it) `data: [DONE]`.
struct EventBody<F: StreamFormatter> {
    streams: Vec<RequestStream>,
    /// Which streams have ended (finished, failed).
    ended: Vec<bool>,
    live: usize,
    /// The stream polled first next time (round robin, so none starves the others).
    next: usize,
    fmt: F,
    /// Payloads formatted but not yet handed to hyper.
    out: VecDeque<Bytes>,
    /// The request's time limit, and its length for the message.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout_secs: f64,
    engine: EngineHandle,
    /// "ok", "failed" or "timeout"; a body dropped before its end logs "client_disconnected".
    status: &'static str,
    /// `[DONE]` is queued: nothing more is polled.
    done: bool,
    logged: bool,
    started: Instant,
    _active: ActiveGuard,
}

impl<F: StreamFormatter> EventBody<F> {
    fn push(&mut self, event: SseEvent) {
        self.out.push_back(event.bytes());
    }

    fn push_error(&mut self, e: ApiError) {
        let event = self.fmt.error(&e);
        self.push(event);
    }

    fn on_event(&mut self, i: usize, event: Event) {
        for p in self.fmt.event(i, &event) {
            self.push(p);
        }
        match event {
            Event::Chunk(_) => return,
            Event::Finished(_) => {}
            Event::Failed(e) => {
                self.push_error(ApiError::from(e));
                self.status = "failed";
            }
        }
        self.ended[i] = true;
        self.live -= 1;
        if self.live == 0 {
            self.end();
        }
    }

    /// Queues what follows the last event: the formatter's closing events when everything
    /// went well, then `[DONE]` where the protocol has it.
    fn end(&mut self) {
        if self.status == "ok" {
            for p in self.fmt.finish() {
                self.push(p);
            }
        }
        if self.fmt.done_marker() {
            self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        }
        self.done = true;
    }

    /// The next event of any live stream; `Ready(None)` when the engine stopped.
    fn poll_streams(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, Event)>> {
        let n = self.streams.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.ended[i] {
                continue;
            }
            if let Poll::Ready(ev) = self.streams[i].poll_next(cx) {
                self.next = (i + 1) % n;
                return Poll::Ready(ev.map(|ev| (i, ev)));
            }
        }
        Poll::Pending
    }

    fn log_once(&mut self, status: &str) {
        if !self.logged {
            self.logged = true;
            self.fmt.log(status, self.started);
        }
    }
}

// Nothing is pinned in place: the timer is boxed, so moving the body is fine.
impl<F: StreamFormatter> Unpin for EventBody<F> {}

impl<F: StreamFormatter> http_body::Body for EventBody<F> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.done {
                let status = this.status;
                this.log_once(status);
                return Poll::Ready(None);
            }
            match this.poll_streams(cx) {
                Poll::Ready(Some((i, ev))) => {
                    this.on_event(i, ev);
                    continue;
                }
                Poll::Ready(None) => {
                    this.push_error(ApiError::from(RequestError::EngineStopped));
                    this.status = "failed";
                    this.end();
                    continue;
                }
                Poll::Pending => {}
            }
            let timed_out = this
                .deadline
                .as_mut()
                .is_some_and(|d| d.as_mut().poll(cx).is_ready());
            if !timed_out {
                return Poll::Pending;
            }
            for s in &this.streams {
                this.engine.abort_with(s.id(), AbortReason::Timeout);
            }
            this.push_error(ApiError::timeout(this.timeout_secs));
            this.status = "timeout";
            this.end();
        }
    }
}

impl<F: StreamFormatter> Drop for EventBody<F> {
    fn drop(&mut self) {
        // dropped before its end: hyper gave up on the connection
        self.log_once("client_disconnected");
    }
}

/// Streams the generations as server-sent events ending with `data: [DONE]`.
pub fn stream<F: StreamFormatter>(
    state: &Arc<AppState>,
    engine: &EngineHandle,
    streams: Vec<RequestStream>,
    fmt: F,
) -> Response<Body> {
    let timeout_secs = state.args.request_timeout.unwrap_or_default();
    let mut body = EventBody {
        ended: vec![false; streams.len()],
        live: streams.len(),
        next: 0,
        fmt,
        out: VecDeque::new(),
        deadline: state
            .args
            .request_timeout
            .map(|s| Box::pin(tokio::time::sleep(Duration::from_secs_f64(s)))),
        timeout_secs,
        engine: engine.clone(),
        status: "ok",
        done: false,
        logged: false,
        started: Instant::now(),
        _active: ActiveGuard::new(state),
        streams,
    };
    if body.live == 0 {
        body.end();
    }
    let mut resp = Response::new(body.boxed());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
