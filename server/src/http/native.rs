//! SGLang's native `POST /generate`: `text` or `input_ids` (one prompt or a batch),
//! `sampling_params` (one for all, or one per prompt; `n` for several samples), `stream`,
//! `return_logprob`, `logprob_start_len`, `top_logprobs_num`, `return_text_in_logprobs`, `rid`.
//!
//! Responses follow SGLang: `{"text", "output_ids", "meta_info": {"id", "finish_reason",
//! "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency", ...}}`, a list for a
//! batch; streaming sends the accumulated text in every event, then `data: [DONE]`.
//! With `return_logprob`, `meta_info` has `output_token_logprobs` (`[logprob, id, text]` per
//! token, `text` null unless `return_text_in_logprobs`) and, when `logprob_start_len` is 0 or
//! more, `input_token_logprobs` from that prompt position (the first prompt token's logprob is
//! null); `top_logprobs_num` adds `output_top_logprobs` / `input_top_logprobs`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::engine::{Event, FinishReason, GenerateRequest, Matched, Output, TokenInfo};
use sglang::sampling::SamplingParams;
use sglang::tokenizer::Tokenizer;

use super::jobs::{self, log_outputs, new_id};
use super::parse::{parse_ids, parse_json};
use super::sse::{self, SseEvent, StreamFormatter};
use super::{blocking, ok_json, ApiError, AppState, Body};

#[derive(Debug, Deserialize)]
struct GenerateBody {
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    input_ids: Option<Value>,
    #[serde(default)]
    sampling_params: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    return_logprob: Option<Value>,
    #[serde(default)]
    logprob_start_len: Option<Value>,
    #[serde(default)]
    top_logprobs_num: Option<Value>,
    #[serde(default)]
    return_text_in_logprobs: bool,
    #[serde(default)]
    rid: Option<Value>,
}

/// One prompt's settings after the batch fields are broadcast.
struct Prompt {
    ids: Vec<u32>,
    params: SamplingParams,
    n: usize,
    return_logprob: bool,
    /// Prompt logprobs from this position (with `return_logprob` only, as in SGLang).
    logprob_start_len: Option<usize>,
    top_logprobs_num: usize,
    rid: String,
}

/// `v` as one value or as a list of `count` values (per prompt).
fn per_prompt<'a>(
    v: Option<&'a Value>,
    count: usize,
    field: &str,
) -> Result<Vec<Option<&'a Value>>, ApiError> {
    match v {
        Some(Value::Array(list)) => {
            if list.len() != count {
                return Err(ApiError::bad_request(
                    field,
                    format!("`{field}` has {} entries for {count} prompts", list.len()),
                ));
            }
            Ok(list.iter().map(Some).collect())
        }
        other => Ok(vec![other; count]),
    }
}

/// SGLang's `sampling_params` object (plus `n`), errors prefixed with the field path.
pub fn parse_sampling(v: Option<&Value>, field: &str) -> Result<(SamplingParams, usize), ApiError> {
    let Some(v) = v else {
        return Ok((SamplingParams::default(), 1));
    };
    let mut obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request(field, format!("`{field}` must be an object")))?
        .clone();
    let n = match obj.remove("n") {
        None | Some(Value::Null) => 1,
        Some(x) => x
            .as_u64()
            .filter(|&n| (1..=128).contains(&n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    &format!("{field}.n"),
                    format!("`{field}.n` must be an integer from 1 to 128, got {x}"),
                )
            })? as usize,
    };
    let params: SamplingParams =
        serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
            let path = e.path().to_string();
            let full = if path == "." {
                field.to_string()
            } else {
                format!("{field}.{path}")
            };
            ApiError::bad_request(&full, format!("`{full}`: {}", e.into_inner()))
        })?;
    Ok((params, n))
}

fn parse_prompts(tok: &Tokenizer, body: &GenerateBody) -> Result<(Vec<Prompt>, bool), ApiError> {
    let (ids, batch): (Vec<Vec<u32>>, bool) = match (&body.text, &body.input_ids) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "text",
                "give either `text` or `input_ids`, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "text",
                "`text` or `input_ids` is required",
            ))
        }
        (Some(Value::String(t)), None) => (vec![encode(tok, t)?], false),
        (Some(Value::Array(list)), None) => {
            let texts = list
                .iter()
                .map(|t| {
                    t.as_str().map(|t| encode(tok, t)).unwrap_or_else(|| {
                        Err(ApiError::bad_request(
                            "text",
                            "`text` must be a string or a list of strings",
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (texts, true)
        }
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "text",
                "`text` must be a string or a list of strings",
            ))
        }
        (None, Some(v)) => match v.as_array() {
            Some(list) if list.first().is_some_and(|x| x.is_array()) => (
                list.iter()
                    .map(|x| parse_ids(x, "input_ids"))
                    .collect::<Result<Vec<_>, _>>()?,
                true,
            ),
            _ => (vec![parse_ids(v, "input_ids")?], false),
        },
    };
    if ids.is_empty() {
        return Err(ApiError::bad_request("text", "the batch is empty"));
    }
    let count = ids.len();
    let sps = per_prompt(body.sampling_params.as_ref(), count, "sampling_params")?;
    let lps = per_prompt(body.return_logprob.as_ref(), count, "return_logprob")?;
    let starts = per_prompt(body.logprob_start_len.as_ref(), count, "logprob_start_len")?;
    let tops = per_prompt(body.top_logprobs_num.as_ref(), count, "top_logprobs_num")?;
    let rids = per_prompt(body.rid.as_ref(), count, "rid")?;
    let mut prompts = Vec::with_capacity(count);
    for (i, ids) in ids.into_iter().enumerate() {
        let (params, n) = parse_sampling(sps[i], "sampling_params")?;
        let return_logprob = match lps[i] {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "return_logprob",
                    "`return_logprob` must be a boolean",
                ))
            }
        };
        // -1 (SGLang's default) or absent: no prompt logprobs
        let logprob_start_len = match starts[i] {
            None | Some(Value::Null) => None,
            Some(v) if v.as_i64() == Some(-1) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                ApiError::bad_request(
                    "logprob_start_len",
                    format!("`logprob_start_len` must be -1 or a non-negative integer, got {v}"),
                )
            })? as usize),
        };
        let top_logprobs_num = match tops[i] {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().ok_or_else(|| {
                ApiError::bad_request(
                    "top_logprobs_num",
                    "`top_logprobs_num` must be a non-negative integer",
                )
            })? as usize,
        };
        let rid = match rids[i] {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => new_id(),
            Some(_) => return Err(ApiError::bad_request("rid", "`rid` must be a string")),
        };
        prompts.push(Prompt {
            ids,
            params,
            n,
            return_logprob,
            logprob_start_len: logprob_start_len.filter(|_| return_logprob),
            top_logprobs_num,
            rid,
        });
    }
    Ok((prompts, batch))
}

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    tok.encode(text, true)
        .map_err(|e| ApiError::bad_request("text", e.to_string()))
}

/// SGLang's `finish_reason` object.
pub fn finish_json(reason: &FinishReason, completion_tokens: usize) -> Value {
    match reason {
        FinishReason::Stop(Matched::Token(t)) => json!({"type": "stop", "matched": t}),
        FinishReason::Stop(Matched::Text(s)) => json!({"type": "stop", "matched": s}),
        FinishReason::Stop(Matched::Constraint) => json!({"type": "stop", "matched": null}),
        FinishReason::Length => json!({"type": "length", "length": completion_tokens}),
        FinishReason::Abort(m) => json!({"type": "abort", "message": m}),
    }
}

/// `[logprob, id, text]`; the logprob is null for a token without one (the prompt's first).
fn logprob_entry(tok: &Tokenizer, with_text: bool, lp: Option<f32>, id: u32) -> Value {
    let text = with_text.then(|| tok.decode(&[id], false).unwrap_or_default());
    json!([lp, id, text])
}

/// `[logprob, id, text]` per token and, with `top`, the list of top entries per token.
/// `first`: a token without a logprob put in front (the prompt's first token).
fn logprobs_json(
    tok: &Tokenizer,
    with_text: bool,
    first: Option<u32>,
    infos: &[TokenInfo],
    top: bool,
) -> (Value, Value) {
    let mut chosen = Vec::with_capacity(infos.len() + 1);
    let mut tops = Vec::new();
    if let Some(id) = first {
        chosen.push(logprob_entry(tok, with_text, None, id));
        tops.push(Value::Null);
    }
    chosen.extend(
        infos
            .iter()
            .map(|i| logprob_entry(tok, with_text, Some(i.logprob), i.token_id)),
    );
    if top {
        tops.extend(infos.iter().map(|i| {
            Value::Array(
                i.top_logprobs
                    .iter()
                    .map(|t| logprob_entry(tok, with_text, Some(t.logprob), t.token_id))
                    .collect(),
            )
        }));
    }
    (Value::Array(chosen), Value::Array(tops))
}

/// The JSON of one generation (final or, while streaming, so far).
struct OutputView<'a> {
    tok: &'a Tokenizer,
    job: &'a Job,
    with_text: bool,
    started: Instant,
}

/// Where a streamed event starts: what earlier events of the same generation already sent.
#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    tokens: usize,
    text_bytes: usize,
    prompt_logprobs: bool,
}

impl OutputView<'_> {
    /// The whole generation (non-streaming responses).
    fn json(&self, out: &Output) -> Value {
        self.json_since(out, Sent::default(), false)
    }

    /// A streamed event. Logprobs (and the prompt's, once) cover only the tokens new since
    /// `sent`, so a stream's bytes grow linearly with its tokens; `text` and `output_ids` are
    /// the whole generation so far (SGLang's default), or also only the new part with
    /// `incremental` (`--incremental-streaming-output`).
    fn json_since(&self, out: &Output, sent: Sent, incremental: bool) -> Value {
        let (reason, cached) = match &out.finish {
            Some(f) => (
                finish_json(&f.reason, f.usage.completion_tokens),
                f.usage.cached_tokens,
            ),
            None => (Value::Null, 0),
        };
        let (rid, req) = (&self.job.rid, &self.job.req);
        let top = req.top_logprobs_num > 0;
        let mut meta = json!({
            "id": rid,
            "finish_reason": reason,
            "prompt_tokens": req.input_ids.len(),
            "completion_tokens": out.token_ids.len(),
            "cached_tokens": cached,
            "e2e_latency": self.started.elapsed().as_secs_f64(),
        });
        if req.return_logprob || top {
            let new = out.logprobs.get(sent.tokens..).unwrap_or_default();
            let (chosen, tops) = logprobs_json(self.tok, self.with_text, None, new, top);
            meta["output_token_logprobs"] = chosen;
            if top {
                meta["output_top_logprobs"] = tops;
            }
        }
        if let Some(start) = req.logprob_start_len.filter(|_| !sent.prompt_logprobs) {
            // rendered only after an event: the first chunk has brought the prompt's logprobs
            let first = req.input_ids.first().copied().filter(|_| start == 0);
            let (chosen, tops) =
                logprobs_json(self.tok, self.with_text, first, &out.prompt_logprobs, top);
            meta["input_token_logprobs"] = chosen;
            if top {
                meta["input_top_logprobs"] = tops;
            }
        }
        if incremental {
            let text = out.text.get(sent.text_bytes..).unwrap_or_default();
            let ids = out.token_ids.get(sent.tokens..).unwrap_or_default();
            json!({"text": text, "output_ids": ids, "meta_info": meta})
        } else {
            json!({"text": out.text, "output_ids": out.token_ids, "meta_info": meta})
        }
    }
}

/// One generation of the request: the id it is reported under and what was asked.
struct Job {
    rid: String,
    req: GenerateRequest,
}

pub async fn generate(state: &Arc<AppState>, body: Bytes) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let engine = state.engine()?;
    let tok = engine.tokenizer().clone();
    // parsing and tokenizing on the blocking pool, not the async threads
    let (body, prompts, batch) = {
        let tok = tok.clone();
        blocking(move || {
            let body: GenerateBody = parse_json(&body)?;
            let (prompts, batch) = parse_prompts(&tok, &body)?;
            Ok((body, prompts, batch))
        })
        .await?
    };
    let field = if prompts.iter().any(|p| p.n > 1) {
        "sampling_params.n"
    } else if body.text.is_some() {
        "text"
    } else {
        "input_ids"
    };
    jobs::check_fan_out(state, prompts.iter().map(|p| p.n).sum(), field)?;
    let mut jobs = Vec::new();
    for p in &prompts {
        for k in 0..p.n {
            let mut params = p.params.clone();
            // several samples of one prompt differ even with a seed
            params.seed = params.seed.map(|s| s.wrapping_add(k as u64));
            let rid = if p.n > 1 {
                format!("{}-{k}", p.rid)
            } else {
                p.rid.clone()
            };
            let req = GenerateRequest {
                input_ids: p.ids.clone(),
                params,
                return_logprob: p.return_logprob,
                top_logprobs_num: p.top_logprobs_num,
                logprob_start_len: p.logprob_start_len,
            };
            jobs.push(Job { rid, req });
        }
    }
    let streams = jobs::submit_all(engine, jobs.iter().map(|j| j.req.clone()).collect()).await?;
    let with_text = body.return_text_in_logprobs;
    let many = batch || jobs.len() > 1;
    if body.stream {
        let fmt = NativeStream {
            tok,
            jobs,
            outputs: Vec::new(),
            sent: Vec::new(),
            incremental: state.args.incremental_streaming_output,
            with_text,
            many,
            started,
        };
        return Ok(sse::stream(state, engine, streams, fmt));
    }
    let outputs = jobs::collect_all(state, engine, streams).await?;
    let mut results: Vec<Value> = Vec::with_capacity(outputs.len());
    for (job, out) in jobs.iter().zip(&outputs) {
        let view = OutputView {
            tok: &tok,
            job,
            with_text,
            started,
        };
        results.push(view.json(out));
    }
    log_outputs("/generate", &log_jobs(&jobs), &outputs, "ok", started);
    Ok(ok_json(&if many {
        Value::Array(results)
    } else {
        results.pop().unwrap_or_default()
    }))
}

/// Each generation's (id, prompt tokens), for the request's log line.
fn log_jobs(jobs: &[Job]) -> Vec<(&str, usize)> {
    jobs.iter()
        .map(|j| (j.rid.as_str(), j.req.input_ids.len()))
        .collect()
}

struct NativeStream {
    tok: Arc<Tokenizer>,
    jobs: Vec<Job>,
    outputs: Vec<Output>,
    /// Per generation, what earlier events sent.
    sent: Vec<Sent>,
    incremental: bool,
    with_text: bool,
    many: bool,
    started: Instant,
}

impl StreamFormatter for NativeStream {
    fn event(&mut self, index: usize, event: &Event) -> Vec<SseEvent> {
        if self.outputs.len() < self.jobs.len() {
            self.outputs.resize(self.jobs.len(), Output::default());
            self.sent.resize(self.jobs.len(), Sent::default());
        }
        let out = &mut self.outputs[index];
        match event {
            Event::Chunk(c) => out.push(c.clone()),
            Event::Finished(f) => out.finish = Some(f.clone()),
            Event::Failed(_) => return Vec::new(),
        }
        let job = &self.jobs[index];
        let view = OutputView {
            tok: &self.tok,
            job,
            with_text: self.with_text,
            started: self.started,
        };
        let sent = self.sent[index];
        let mut v = view.json_since(out, sent, self.incremental);
        self.sent[index] = Sent {
            tokens: out.logprobs.len().max(out.token_ids.len()),
            text_bytes: out.text.len(),
            prompt_logprobs: sent.prompt_logprobs || !out.prompt_logprobs.is_empty(),
        };
        if self.many {
            v["index"] = json!(index);
        }
        vec![v.to_string().into()]
    }

    fn log(&self, status: &str, started: Instant) {
        log_outputs(
            "/generate",
            &log_jobs(&self.jobs),
            &self.outputs,
            status,
            started,
        );
    }
}
