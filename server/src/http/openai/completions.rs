//! `POST /v1/completions`: a prompt (text, texts, token ids) continued, with `echo`, and
//! `logprobs` in the completions shape (with `echo`, the prompt's own logprobs first: how
//! evaluation harnesses score a text, with `max_tokens` 0).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::engine::{Event, Output, TokenInfo};
use sglang::sampling::SamplingParams;
use sglang::tokenizer::Tokenizer;

use super::{
    api_names, check_top, choices, finish_reason, now_secs, token_text, usage_json, ChunkHead,
    Common,
};
use crate::http::blocking;
use crate::http::jobs::{self, log_outputs, new_id};
use crate::http::parse::{from_value, parse_ids, parse_object};
use crate::http::sse::{self, SseEvent, StreamFormatter};
use crate::http::{ok_json, ApiError, AppState, Body};

/// The echoed prompt of a completion with `echo` and `logprobs`.
struct EchoedPrompt<'a> {
    /// The first prompt token: it has no logprob (null).
    first: u32,
    /// The logprobs of the others.
    logprobs: &'a [TokenInfo],
    /// Bytes of echoed text: the generated tokens' offsets start after it.
    text_len: usize,
}

/// Completions logprobs: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
/// the echoed prompt's tokens first when there is one; offsets count from `offset`.
fn completion_logprobs(
    tok: &Tokenizer,
    echo: Option<EchoedPrompt>,
    infos: &[TokenInfo],
    offset: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    let mut at = offset;
    let mut push = |id: u32, info: Option<&TokenInfo>, at: &mut usize| {
        let t = token_text(tok, id);
        offsets.push(*at);
        *at += t.len();
        tokens.push(t);
        let Some(i) = info else {
            lps.push(Value::Null);
            tops.push(Value::Null);
            return;
        };
        lps.push(json!(i.logprob));
        let top: serde_json::Map<String, Value> = i
            .top_logprobs
            .iter()
            .map(|t| (token_text(tok, t.token_id), json!(t.logprob)))
            .collect();
        tops.push(Value::Object(top));
    };
    if let Some(e) = echo {
        push(e.first, None, &mut at);
        for i in e.logprobs {
            push(i.token_id, Some(i), &mut at);
        }
        at = offset + e.text_len;
    }
    for i in infos {
        push(i.token_id, Some(i), &mut at);
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    prompt: Value,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    suffix: Option<String>,
    /// Read from the same body by `Common`'s own pass, so its errors keep their field.
    #[serde(skip)]
    common: Common,
}

fn completion_prompts(tok: &Tokenizer, v: &Value) -> Result<Vec<(String, Vec<u32>)>, ApiError> {
    let bad = || {
        ApiError::bad_request("prompt", "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids")
    };
    let enc = |t: &str| {
        tok.encode(t, true)
            .map_err(|e| ApiError::bad_request("prompt", e.to_string()))
    };
    match v {
        Value::String(s) => Ok(vec![(s.clone(), enc(s)?)]),
        Value::Array(list) if list.is_empty() => {
            Err(ApiError::bad_request("prompt", "`prompt` is empty"))
        }
        Value::Array(list) => match &list[0] {
            Value::String(_) => list
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(bad)
                        .and_then(|t| Ok((t.to_string(), enc(t)?)))
                })
                .collect(),
            Value::Number(_) => {
                let ids = parse_ids(v, "prompt")?;
                Ok(vec![(tok.decode(&ids, false).unwrap_or_default(), ids)])
            }
            Value::Array(_) => list
                .iter()
                .map(|x| {
                    let ids = parse_ids(x, "prompt")?;
                    Ok((tok.decode(&ids, false).unwrap_or_default(), ids))
                })
                .collect(),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

type Prepared = (
    CompletionBody,
    usize,
    Vec<(String, Vec<u32>)>,
    SamplingParams,
);

/// Everything before the engine: the body read and checked, the prompts tokenized (on the
/// blocking pool).
fn prepare(state: &AppState, tok: &Tokenizer, body: &[u8]) -> Result<Prepared, ApiError> {
    let v = parse_object(body)?;
    let mut body: CompletionBody = from_value(&v)?;
    body.common = from_value(&v)?;
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix", "`suffix` is not supported"));
    }
    check_top(body.logprobs.unwrap_or(0), "logprobs")?;
    let n = body.common.n()?;
    let prompts = completion_prompts(tok, &body.prompt)?;
    jobs::check_fan_out(state, prompts.len() * n, if n > 1 { "n" } else { "prompt" })?;
    let params = body
        .common
        .params(body.max_tokens.unwrap_or(16))
        .map_err(api_names)?;
    Ok((body, n, prompts, params))
}

pub async fn completions(state: &Arc<AppState>, body: Bytes) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let engine = state.engine()?;
    let tok = engine.tokenizer().clone();
    let (body, n, prompts, params) = {
        let (state, tok) = (state.clone(), tok.clone());
        blocking(move || prepare(&state, &tok, &body)).await?
    };
    let top = body.logprobs.unwrap_or(0);
    let logprobs = body.logprobs.is_some();
    // `echo` with `logprobs`: the prompt's tokens and logprobs come first (scoring a text,
    // with `max_tokens` 0, is how evaluation harnesses use it)
    let echo_logprobs = body.echo && logprobs;
    let mut reqs = Vec::new();
    for (_, ids) in &prompts {
        reqs.extend(choices(ids, &params, n, top, logprobs, echo_logprobs));
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.1.len()).sum();
    let streams = jobs::submit_all(engine, reqs).await.map_err(api_names)?;
    let id = format!("cmpl-{}", new_id());
    let model = state.served_model_name.clone();
    let echo: Vec<String> = prompts
        .iter()
        .flat_map(|p| {
            std::iter::repeat_n(
                if body.echo {
                    p.0.clone()
                } else {
                    String::new()
                },
                n,
            )
        })
        .collect();
    let firsts: Vec<u32> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.1.first().copied().unwrap_or_default(), n))
        .collect();
    if body.common.stream {
        let fmt = CompletionStream {
            head: ChunkHead::new(id, model, "text_completion", &body.common),
            tok,
            logprobs,
            echo_logprobs: echo_logprobs.then_some(firsts),
            echo,
            sent_echo: Vec::new(),
            offsets: Vec::new(),
            outputs: Vec::new(),
            prompt_tokens,
            rid_prompts: prompts.iter().map(|p| p.1.len()).collect(),
            n,
        };
        return Ok(sse::stream(state, engine, streams, fmt));
    }
    let outputs = jobs::collect_all(state, engine, streams).await?;
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let echoed = echo_logprobs.then(|| EchoedPrompt { first: firsts[i], logprobs: &o.prompt_logprobs, text_len: echo[i].len() });
            let logprobs = if logprobs { completion_logprobs(&tok, echoed, &o.logprobs, 0) } else { Value::Null };
            json!({"index": i, "text": format!("{}{}", echo[i], o.text), "logprobs": logprobs, "finish_reason": finish_reason(o)})
        })
        .collect();
    let jobs: Vec<(&str, usize)> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n((id.as_str(), p.1.len()), n))
        .collect();
    log_outputs("/v1/completions", &jobs, &outputs, "ok", started);
    Ok(ok_json(&json!({
        "id": id, "object": "text_completion", "created": now_secs(), "model": model,
        "choices": choices, "usage": usage_json(prompt_tokens, &outputs),
    })))
}

struct CompletionStream {
    head: ChunkHead,
    tok: Arc<Tokenizer>,
    logprobs: bool,
    /// With `echo` and `logprobs`: each choice's first prompt token.
    echo_logprobs: Option<Vec<u32>>,
    echo: Vec<String>,
    sent_echo: Vec<bool>,
    offsets: Vec<usize>,
    outputs: Vec<Output>,
    prompt_tokens: usize,
    rid_prompts: Vec<usize>,
    n: usize,
}

impl StreamFormatter for CompletionStream {
    fn event(&mut self, i: usize, event: &Event) -> Vec<SseEvent> {
        self.payloads(i, event)
            .into_iter()
            .map(Into::into)
            .collect()
    }

    fn finish(&mut self) -> Vec<SseEvent> {
        self.head
            .usage(self.prompt_tokens, &self.outputs)
            .into_iter()
            .map(Into::into)
            .collect()
    }

    fn log(&self, status: &str, started: Instant) {
        let jobs: Vec<(&str, usize)> = self
            .rid_prompts
            .iter()
            .flat_map(|&p| std::iter::repeat_n((self.head.id.as_str(), p), self.n))
            .collect();
        log_outputs("/v1/completions", &jobs, &self.outputs, status, started);
    }
}

impl CompletionStream {
    fn payloads(&mut self, i: usize, event: &Event) -> Vec<String> {
        let count = self.echo.len();
        if self.outputs.len() < count {
            self.outputs.resize(count, Output::default());
            self.sent_echo.resize(count, false);
            self.offsets.resize(count, 0);
        }
        match event {
            Event::Chunk(c) => {
                let mut text = String::new();
                let mut echoed = None;
                if !self.sent_echo[i] {
                    text.push_str(&self.echo[i]);
                    self.sent_echo[i] = true;
                    echoed = self.echo_logprobs.as_ref().map(|firsts| EchoedPrompt {
                        first: firsts[i],
                        logprobs: &c.prompt_logprobs,
                        text_len: text.len(),
                    });
                }
                text.push_str(&c.text);
                let logprobs = if self.logprobs {
                    completion_logprobs(&self.tok, echoed, &c.logprobs, self.offsets[i])
                } else {
                    Value::Null
                };
                self.offsets[i] += text.len();
                self.outputs[i].push(c.clone());
                if text.is_empty() && !self.logprobs {
                    return Vec::new();
                }
                vec![self.head.chunk(
                    json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": null}),
                )]
            }
            Event::Finished(f) => {
                self.outputs[i].finish = Some(f.clone());
                vec![self.head.chunk(json!({"index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(&self.outputs[i])}))]
            }
            Event::Failed(_) => Vec::new(),
        }
    }
}
