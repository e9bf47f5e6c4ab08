//! Running a request's generations (one per prompt and per choice) through the engine, for
//! every API family: all-or-nothing submission, collection under the time limit (non-streaming
//! responses; streaming ones are `sse::stream`), the response id, and the one log line per
//! request.

use std::time::{Duration, Instant};

use sglang::engine::{
    constraint_spec, AbortReason, EngineHandle, Event, GenerateRequest, Output, RequestError,
    RequestStream,
};

use super::{ApiError, AppState};

/// Refuses (400, naming `field`) a request that would create more sequences than one request
/// may (`--max-sequences-per-request`), or more than the queue can ever hold
/// (`--max-queued-requests`: such a request would get 429 however long it waited).
pub fn check_fan_out(state: &AppState, sequences: usize, field: &str) -> Result<(), ApiError> {
    let max = state.args.max_sequences_per_request;
    if sequences > max {
        return Err(ApiError::bad_request(
            field,
            format!("`{field}`: the request makes {sequences} sequences (prompts times `n`), more than the limit of {max} per request"),
        ));
    }
    if let Some(q) = state.args.max_queued_requests.filter(|&q| sequences > q) {
        return Err(ApiError::bad_request(
            field,
            format!("`{field}`: the request makes {sequences} sequences (prompts times `n`), more than the queue holds ({q})"),
        ));
    }
    Ok(())
}

/// Submits every request or none (a refusal drops, and so aborts, those already queued).
/// Requests with a constraint are submitted from a blocking thread: their grammar compiles
/// there (up to seconds), not on the async threads that serve every connection.
pub async fn submit_all(
    engine: &EngineHandle,
    reqs: Vec<GenerateRequest>,
) -> Result<Vec<RequestStream>, ApiError> {
    let submit = |engine: &EngineHandle, reqs: Vec<GenerateRequest>| {
        reqs.into_iter()
            .map(|r| Ok(engine.submit(r)?))
            .collect::<Result<Vec<_>, ApiError>>()
    };
    if !reqs.iter().any(|r| constraint_spec(&r.params).is_some()) {
        return submit(engine, reqs);
    }
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || submit(&engine, reqs))
        .await
        .map_err(|e| ApiError::internal(format!("submitting the request failed: {e}")))?
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
    let deadline = state
        .args
        .request_timeout
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
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
                Ok(Some(Event::Failed(e))) => return Err(e.into()),
                Ok(None) => return Err(RequestError::EngineStopped.into()),
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

/// A fresh random id for a response (`rid`, `chatcmpl-...`, `cmpl-...`).
pub fn new_id() -> String {
    let mut rng = sglang::sampling::Rng::new(sglang::sampling::Rng::entropy_seed());
    format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

/// One structured log line per request: `jobs` holds each generation's (id, prompt tokens).
pub fn log_outputs(
    endpoint: &str,
    jobs: &[(&str, usize)],
    outputs: &[Output],
    status: &str,
    started: Instant,
) {
    let prompt: usize = jobs.iter().map(|j| j.1).sum();
    let completion: usize = outputs.iter().map(|o| o.token_ids.len()).sum();
    let cached: usize = outputs
        .iter()
        .filter_map(|o| o.finish.as_ref())
        .map(|f| f.usage.cached_tokens)
        .sum();
    let ttft = outputs
        .iter()
        .filter_map(|o| o.finish.as_ref()?.time_to_first_token)
        .fold(f64::NAN, f64::min);
    let finish: Vec<&str> = outputs
        .iter()
        .map(|o| o.finish.as_ref().map_or("none", |f| f.reason.as_str()))
        .collect();
    tracing::info!(
        target: "sglang::request",
        id = jobs.first().map_or("", |j| j.0),
        endpoint,
        prompt_tokens = prompt,
        completion_tokens = completion,
        cached_tokens = cached,
        ttft_ms = if ttft.is_nan() { -1.0 } else { (ttft * 1000.0).round() },
        total_ms = started.elapsed().as_millis() as u64,
        status,
        finish = finish.join(","),
        "request done"
    );
}
