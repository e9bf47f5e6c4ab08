//! The OpenAI API: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or SSE ending with
//! `data: [DONE]`; `n`, `stop`, `seed`, `logprobs`, `stream_options.include_usage`, `usage`
//! with `prompt_tokens_details.cached_tokens`) and `GET /v1/models`.
//!
//! Besides OpenAI's fields, the sampling extensions of vLLM and SGLang are accepted: `top_k`,
//! `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`,
//! `min_tokens`, `no_stop_trim`. Fields this server cannot honour (tools, logit_bias,
//! response formats other than text, images, `suffix`, `best_of` > `n`) are refused with 400
//! rather than ignored. The `model` field is not checked, as in SGLang.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::engine::{Event, FinishReason, GenerateRequest, Output, TokenInfo};
use sglang::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use sglang::tokenizer::Tokenizer;

use super::jobs::{self, StreamFormatter};
use super::native::{log_outputs, new_id, parse_ids};
use super::{ok_json, parse_json, ApiError, AppState, Body};

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
struct Common {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<Value>,
    #[serde(default)]
    best_of: Option<usize>,
    // extensions
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    skip_special_tokens: Option<bool>,
    #[serde(default)]
    min_tokens: Option<usize>,
    #[serde(default)]
    no_stop_trim: bool,
}

impl Common {
    fn n(&self) -> Result<usize, ApiError> {
        let n = self.n.unwrap_or(1);
        if !(1..=128).contains(&n) {
            return Err(ApiError::bad_request(
                "n",
                format!("`n` must be between 1 and 128, got {n}"),
            ));
        }
        if let Some(b) = self.best_of {
            if b != n {
                return Err(ApiError::bad_request(
                    "best_of",
                    "`best_of` other than `n` is not supported",
                ));
            }
        }
        if self
            .logit_bias
            .as_ref()
            .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        {
            return Err(ApiError::bad_request(
                "logit_bias",
                "`logit_bias` is not supported",
            ));
        }
        Ok(n)
    }

    fn params(&self, max_tokens: usize) -> Result<SamplingParams, ApiError> {
        let d = SamplingParams::default();
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|s| {
                    s.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::bad_request(
                            "stop",
                            "`stop` must be a string or a list of strings",
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "stop",
                    "`stop` must be a string or a list of strings",
                ))
            }
        };
        Ok(SamplingParams {
            max_new_tokens: max_tokens,
            min_new_tokens: self.min_tokens.unwrap_or(0),
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(-1),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            stop,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            skip_special_tokens: self.skip_special_tokens.unwrap_or(d.skip_special_tokens),
            no_stop_trim: self.no_stop_trim,
            seed: self.seed,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// `n` requests for one prompt (seeded choices differ: seed + choice index);
/// `prompt_logprob`: also the prompt's logprobs (completions with `echo` and `logprobs`).
fn choices(
    ids: &[u32],
    params: &SamplingParams,
    n: usize,
    top: usize,
    logprob: bool,
    prompt_logprob: bool,
) -> Vec<GenerateRequest> {
    (0..n)
        .map(|k| {
            let mut p = params.clone();
            p.seed = p.seed.map(|s| s.wrapping_add(k as u64));
            GenerateRequest {
                input_ids: ids.to_vec(),
                params: p,
                return_logprob: logprob,
                top_logprobs_num: top,
                logprob_start_len: prompt_logprob.then_some(0),
            }
        })
        .collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage_json(prompt_tokens: usize, outputs: &[Output]) -> Value {
    let completion: usize = outputs.iter().map(|o| o.token_ids.len()).sum();
    let cached = outputs
        .first()
        .and_then(|o| o.finish.as_ref())
        .map_or(0, |f| f.usage.cached_tokens);
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn finish_reason(o: &Output) -> Value {
    match o.finish.as_ref().map(|f| &f.reason) {
        Some(FinishReason::Stop(_)) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        Some(FinishReason::Abort(_)) => json!("abort"),
        None => Value::Null,
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Chat logprobs: `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.
fn chat_logprobs(tok: &Tokenizer, infos: &[TokenInfo]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = infos
        .iter()
        .map(|i| {
            let mut e = entry(i.token_id, i.logprob);
            e["top_logprobs"] = Value::Array(
                i.top_logprobs
                    .iter()
                    .map(|t| entry(t.token_id, t.logprob))
                    .collect(),
            );
            e
        })
        .collect();
    json!({"content": content})
}

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

fn check_top(n: usize, field: &str) -> Result<(), ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad_request(
            field,
            format!("`{field}` must be <= {MAX_TOP_LOGPROBS}, got {n}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------- completions

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
    #[serde(flatten)]
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

pub async fn completions(state: &Arc<AppState>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let engine = state.engine()?;
    let body: CompletionBody = parse_json(body)?;
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix", "`suffix` is not supported"));
    }
    let top = body.logprobs.unwrap_or(0);
    check_top(top, "logprobs")?;
    let logprobs = body.logprobs.is_some();
    // `echo` with `logprobs`: the prompt's tokens and logprobs come first (scoring a text,
    // with `max_tokens` 0, is how evaluation harnesses use it)
    let echo_logprobs = body.echo && logprobs;
    let n = body.common.n()?;
    let tok = engine.tokenizer().clone();
    let prompts = completion_prompts(&tok, &body.prompt)?;
    let params = body
        .common
        .params(body.max_tokens.unwrap_or(16))
        .map_err(|e| e.rename_param("max_new_tokens", "max_tokens"))?;
    let mut reqs = Vec::new();
    for (_, ids) in &prompts {
        reqs.extend(choices(ids, &params, n, top, logprobs, echo_logprobs));
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.1.len()).sum();
    let streams = jobs::submit_all(engine, reqs)
        .map_err(|e| e.rename_param("max_new_tokens", "max_tokens"))?;
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
        return Ok(jobs::stream(state, engine, streams, fmt));
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

/// What every streamed chunk of a response shares: its id, object type, creation time and
/// model, and whether usage is reported (null on each chunk, then a final usage chunk).
struct ChunkHead {
    id: String,
    model: String,
    object: &'static str,
    created: u64,
    include_usage: bool,
}

impl ChunkHead {
    fn new(id: String, model: String, object: &'static str, common: &Common) -> Self {
        Self {
            id,
            model,
            object,
            created: now_secs(),
            include_usage: common.include_usage(),
        }
    }

    /// One chunk carrying `choice`.
    fn chunk(&self, choice: Value) -> String {
        let mut v = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    /// The final usage chunk, when asked for.
    fn usage(&self, prompt_tokens: usize, outputs: &[Output]) -> Vec<String> {
        if !self.include_usage {
            return Vec::new();
        }
        let v = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [], "usage": usage_json(prompt_tokens, outputs)});
        vec![v.to_string()]
    }
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
    fn event(&mut self, i: usize, event: &Event) -> Vec<String> {
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

    fn finish(&mut self) -> Vec<String> {
        self.head.usage(self.prompt_tokens, &self.outputs)
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

// ---------------------------------------------------------------------------- chat

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

/// Messages as the template sees them: `{role, content}` with text parts joined.
fn chat_messages(
    messages: &[ChatMessageIn],
) -> Result<Vec<sglang::tokenizer::ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages", "`messages` is empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("messages[{i}]");
            let role = match m.role.as_str() {
                "system" | "user" | "assistant" => m.role.clone(),
                "developer" => "system".to_string(),
                other => return Err(ApiError::bad_request(&format!("{field}.role"), format!("`{field}.role` {other:?} is not supported (system, developer, user, assistant)"))),
            };
            if m.tool_calls.as_ref().is_some_and(|t| !t.is_null()) {
                return Err(ApiError::bad_request(&format!("{field}.tool_calls"), "tool calls are not supported"));
            }
            let content = match &m.content {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => return Err(ApiError::bad_request(&format!("{field}.content[{j}]"), format!("`{field}.content[{j}]`: only text parts are supported"))),
                        }
                    }
                    text
                }
                Some(_) => return Err(ApiError::bad_request(&format!("{field}.content"), format!("`{field}.content` must be a string or a list of text parts"))),
            };
            Ok(sglang::tokenizer::ChatMessage { role, content })
        })
        .collect()
}

pub async fn chat_completions(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let engine = state.engine()?;
    let body: ChatBody = parse_json(body)?;
    if body
        .tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::bad_request(
            "tools",
            "tool calling is not supported",
        ));
    }
    if let Some(rf) = &body.response_format {
        if rf.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(ApiError::bad_request(
                "response_format",
                "only `{\"type\": \"text\"}` is supported",
            ));
        }
    }
    let top = body.top_logprobs.unwrap_or(0);
    check_top(top, "top_logprobs")?;
    if top > 0 && !body.logprobs {
        return Err(ApiError::bad_request(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let n = body.common.n()?;
    let tok = engine.tokenizer().clone();
    let messages = chat_messages(&body.messages)?;
    let text = tok
        .apply_chat_template(&messages, body.add_generation_prompt.unwrap_or(true))
        .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
    let ids = tok
        .encode(&text, false)
        .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
    // default: as long as the context allows (the engine caps it there)
    let max_tokens = body
        .max_completion_tokens
        .or(body.max_tokens)
        .unwrap_or(usize::MAX / 2);
    let params = body
        .common
        .params(max_tokens)
        .map_err(|e| e.rename_param("max_new_tokens", "max_tokens"))?;
    let reqs = choices(&ids, &params, n, top, body.logprobs, false);
    let streams = jobs::submit_all(engine, reqs)
        .map_err(|e| e.rename_param("max_new_tokens", "max_tokens"))?;
    let id = format!("chatcmpl-{}", new_id());
    let model = state.served_model_name.clone();
    if body.common.stream {
        let fmt = ChatStream {
            head: ChunkHead::new(id, model, "chat.completion.chunk", &body.common),
            tok,
            logprobs: body.logprobs,
            started_roles: vec![false; n],
            outputs: vec![Output::default(); n],
            prompt_tokens: ids.len(),
        };
        return Ok(jobs::stream(state, engine, streams, fmt));
    }
    let outputs = jobs::collect_all(state, engine, streams).await?;
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let logprobs = if body.logprobs { chat_logprobs(&tok, &o.logprobs) } else { Value::Null };
            json!({"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": logprobs, "finish_reason": finish_reason(o)})
        })
        .collect();
    log_outputs(
        "/v1/chat/completions",
        &vec![(id.as_str(), ids.len()); n],
        &outputs,
        "ok",
        started,
    );
    Ok(ok_json(&json!({
        "id": id, "object": "chat.completion", "created": now_secs(), "model": model,
        "choices": choices, "usage": usage_json(ids.len(), &outputs),
    })))
}

struct ChatStream {
    head: ChunkHead,
    tok: Arc<Tokenizer>,
    logprobs: bool,
    started_roles: Vec<bool>,
    outputs: Vec<Output>,
    prompt_tokens: usize,
}

impl StreamFormatter for ChatStream {
    fn event(&mut self, i: usize, event: &Event) -> Vec<String> {
        let mut out = Vec::new();
        if !self.started_roles[i] {
            self.started_roles[i] = true;
            out.push(self.head.chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})));
        }
        match event {
            Event::Chunk(c) => {
                self.outputs[i].push(c.clone());
                if !c.text.is_empty() || self.logprobs {
                    let logprobs = if self.logprobs {
                        chat_logprobs(&self.tok, &c.logprobs)
                    } else {
                        Value::Null
                    };
                    out.push(self.head.chunk(json!({"index": i, "delta": {"content": c.text}, "logprobs": logprobs, "finish_reason": null})));
                }
            }
            Event::Finished(f) => {
                self.outputs[i].finish = Some(f.clone());
                out.push(self.head.chunk(json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish_reason(&self.outputs[i])})));
            }
            Event::Failed(_) => {}
        }
        out
    }

    fn finish(&mut self) -> Vec<String> {
        self.head.usage(self.prompt_tokens, &self.outputs)
    }

    fn log(&self, status: &str, started: Instant) {
        log_outputs(
            "/v1/chat/completions",
            &vec![(self.head.id.as_str(), self.prompt_tokens); self.outputs.len()],
            &self.outputs,
            status,
            started,
        );
    }
}

// ---------------------------------------------------------------------------- models

pub fn models(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    Ok(ok_json(&json!({
        "object": "list",
        "data": [{
            "id": state.served_model_name,
            "object": "model",
            "created": now_secs(),
            "owned_by": "sglang",
            "root": info.engine_config.model_path.display().to_string(),
            "max_model_len": info.context_length,
        }],
    })))
}
