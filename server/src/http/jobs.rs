//! Running a request's generations (one per prompt and per choice) through the engine, for
//! both API families: all-or-nothing submission, collection with the time limit, and the SSE
//! producer that merges several generations into one event stream. A client that goes away
//! drops the streams, which aborts the generations in the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Response;
use sglang::engine::{AbortReason, EngineHandle, Event, GenerateRequest, Output, RequestStream};
use tokio::sync::mpsc;

use super::sse::sse_response;
use super::{ActiveGuard, ApiError, AppState, Body};

/// Submits every request or none (a refusal drops, and so aborts, those already queued).
pub fn submit_all(
    engine: &EngineHandle,
    reqs: Vec<GenerateRequest>,
) -> Result<Vec<RequestStream>, ApiError> {
    let mut streams = Vec::with_capacity(reqs.len());
    for r in reqs {
        streams.push(engine.submit(r)?);
    }
    Ok(streams)
}

fn deadline(state: &AppState) -> Option<tokio::time::Instant> {
    state
        .args
        .request_timeout
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s))
}

async fn next_before(
    stream: &mut RequestStream,
    deadline: Option<tokio::time::Instant>,
) -> Result<Option<Event>, ()> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, stream.next())
            .await
            .map_err(|_| ()),
        None => Ok(stream.next().await),
    }
}

/// Waits for every generation to finish (non-streaming responses).
pub async fn collect_all(
    state: &AppState,
    engine: &EngineHandle,
    mut streams: Vec<RequestStream>,
) -> Result<Vec<Output>, ApiError> {
    let deadline = deadline(state);
    let ids: Vec<u64> = streams.iter().map(|s| s.id()).collect();
    let mut outputs = Vec::with_capacity(streams.len());
    for stream in streams.iter_mut() {
        let mut out = Output::default();
        loop {
            match next_before(stream, deadline).await {
                Ok(Some(Event::Chunk(c))) => out.push(c),
                Ok(Some(Event::Finished(f))) => {
                    out.finish = Some(f);
                    break;
                }
                Ok(Some(Event::Failed(e))) => return Err(ApiError::internal(e)),
                Ok(None) => return Err(ApiError::unavailable("the engine stopped")),
                Err(()) => {
                    for &id in &ids {
                        engine.abort_with(id, AbortReason::Timeout);
                    }
                    return Err(ApiError::timeout(
                        state.args.request_timeout.unwrap_or_default(),
                    ));
                }
            }
        }
        outputs.push(out);
    }
    Ok(outputs)
}

/// Forwards every stream's events, tagged with the stream's index, into one channel. A
/// forwarder stops (dropping, hence aborting, its stream) as soon as the receiver is gone.
fn merge(streams: Vec<RequestStream>) -> mpsc::Receiver<(usize, Event)> {
    let (tx, rx) = mpsc::channel(64);
    for (i, mut s) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    ev = s.next() => {
                        let Some(ev) = ev else { break };
                        let last = !matches!(ev, Event::Chunk(_));
                        if tx.send((i, ev)).await.is_err() || last {
                            break;
                        }
                    }
                }
            }
        });
    }
    rx
}

/// What an SSE stream formats: each event becomes zero or more `data:` payloads.
pub trait StreamFormatter: Send + 'static {
    fn event(&mut self, index: usize, event: &Event) -> Vec<String>;
    /// Payloads after every generation finished (usage chunks), before `[DONE]`.
    fn finish(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Called once at the end with the outcome, for the request log line.
    fn log(&self, status: &str, started: Instant);
}

/// Streams the generations as server-sent events ending with `data: [DONE]`.
pub fn stream<F: StreamFormatter>(
    state: &Arc<AppState>,
    engine: &EngineHandle,
    streams: Vec<RequestStream>,
    mut fmt: F,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let guard = ActiveGuard::new(state);
    let deadline = deadline(state);
    let timeout_secs = state.args.request_timeout.unwrap_or_default();
    let ids: Vec<u64> = streams.iter().map(|s| s.id()).collect();
    let engine = engine.clone();
    let started = Instant::now();
    tokio::spawn(async move {
        let _guard = guard;
        let total = ids.len();
        let mut merged = merge(streams);
        let mut done = 0;
        let send = |payload: String| {
            let tx = tx.clone();
            async move {
                tx.send(Bytes::from(format!("data: {payload}\n\n")))
                    .await
                    .is_ok()
            }
        };
        let mut status = "ok";
        while done < total {
            let next = tokio::select! {
                _ = tx.closed() => { status = "client_disconnected"; break }
                ev = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d, merged.recv()).await.map_err(|_| ()),
                        None => Ok(merged.recv().await),
                    }
                } => ev,
            };
            match next {
                Ok(Some((i, ev))) => {
                    let terminal = !matches!(ev, Event::Chunk(_));
                    let failed = match &ev {
                        Event::Failed(e) => Some(ApiError::internal(e.clone())),
                        _ => None,
                    };
                    for p in fmt.event(i, &ev) {
                        if !send(p).await {
                            status = "client_disconnected";
                        }
                    }
                    if let Some(err) = failed {
                        let _ = send(err.body_json().to_string()).await;
                        status = "failed";
                    }
                    if terminal {
                        done += 1;
                    }
                }
                Ok(None) => {
                    let _ = send(
                        ApiError::unavailable("the engine stopped")
                            .body_json()
                            .to_string(),
                    )
                    .await;
                    status = "failed";
                    break;
                }
                Err(()) => {
                    for &id in &ids {
                        engine.abort_with(id, AbortReason::Timeout);
                    }
                    let _ = send(ApiError::timeout(timeout_secs).body_json().to_string()).await;
                    status = "timeout";
                    break;
                }
            }
            if status == "client_disconnected" {
                break;
            }
        }
        if status == "ok" {
            for p in fmt.finish() {
                let _ = send(p).await;
            }
        }
        if status != "client_disconnected" {
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
        fmt.log(status, started);
    });
    sse_response(rx)
}
