//! `POST /v1/chat/completions`: messages rendered through the model's chat template, the
//! assistant's reply as `message` (or `delta` chunks), `logprobs` in the chat shape, tool calls
//! (`tools`, `tool_choice`, `parallel_tool_calls`; see `http/tools.rs`) and, with
//! `--reasoning-parser`, `reasoning_content`. The pipeline is the one `http/turn.rs` shares
//! with the Responses and Messages APIs.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::engine::{Event, Output, TokenInfo};
use sglang::sampling::SamplingParams;
use sglang::tokenizer::Tokenizer;

use super::{api_names, check_top, choices, now_secs, token_text, usage_json, ChunkHead, Common};
use crate::http::blocking;
use crate::http::jobs::{self, log_outputs, new_id};
use crate::http::parse::{from_value, parse_object};
use crate::http::sse::{self, SseEvent, StreamFormatter};
use crate::http::tools::{self, ToolSet};
use crate::http::turn::{self, Conversation, Delta, TurnEnd, TurnStream};
use crate::http::{ok_json, ApiError, AppState, Body};

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

#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Value>,
    #[serde(default)]
    tool_call_id: Option<String>,
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
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    /// Read from the same body by `Common`'s own pass, so its errors keep their field.
    #[serde(skip)]
    common: Common,
}

/// A message's text: a string, or text parts joined.
fn message_text(field: &str, content: &Option<Value>) -> Result<String, ApiError> {
    Ok(match content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(|t| t.as_str());
                match (kind, p.get("text").and_then(|t| t.as_str())) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        let f = format!("{field}.content[{j}]");
                        return Err(ApiError::bad_request(
                            &f,
                            format!("`{f}`: only text parts are supported"),
                        ));
                    }
                }
            }
            text
        }
        Some(_) => {
            let f = format!("{field}.content");
            return Err(ApiError::bad_request(
                &f,
                format!("`{f}` must be a string or a list of text parts"),
            ));
        }
    })
}

/// Messages as the template sees them: `role`, `content` (text parts joined), and the
/// assistant's `tool_calls` and the tool results' `tool_call_id`.
pub(crate) fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages", "`messages` is empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("messages[{i}]");
            let role = match m.role.as_str() {
                "system" | "user" | "assistant" | "tool" => m.role.as_str(),
                "developer" => "system",
                other => {
                    let f = format!("{field}.role");
                    return Err(ApiError::bad_request(
                        &f,
                        format!("`{f}` {other:?} is not supported (system, developer, user, assistant, tool)"),
                    ));
                }
            };
            let content = message_text(&field, &m.content)?;
            tools::message_value(i, role, content, m.tool_calls.as_ref(), m.tool_call_id.as_deref())
        })
        .collect()
}

/// Chat's `finish_reason`.
fn finish_str(end: &TurnEnd) -> &'static str {
    match end {
        TurnEnd::Stop | TurnEnd::StopSequence(_) => "stop",
        TurnEnd::Length => "length",
        TurnEnd::ToolCalls => "tool_calls",
        TurnEnd::Abort => "abort",
    }
}

/// `completion_tokens_details.reasoning_tokens` where reasoning was split off.
fn usage_with_reasoning(
    tok: &Tokenizer,
    prompt: usize,
    outputs: &[Output],
    reasoning: &[&str],
) -> Value {
    let mut usage = usage_json(prompt, outputs);
    if reasoning.iter().any(|r| !r.is_empty()) {
        let tokens: usize = reasoning.iter().map(|r| turn::count(tok, r)).sum();
        usage["completion_tokens_details"] = json!({"reasoning_tokens": tokens});
    }
    usage
}

type Prepared = (ChatBody, Conversation, usize, Vec<u32>, SamplingParams);

/// Everything before the engine: the body read and checked, the conversation templated and
/// tokenized (on the blocking pool).
fn prepare(state: &AppState, tok: &Tokenizer, body: &[u8]) -> Result<Prepared, ApiError> {
    let v = parse_object(body)?;
    let mut body: ChatBody = from_value(&v)?;
    body.common = from_value(&v)?;
    let top = body.top_logprobs.unwrap_or(0);
    check_top(top, "top_logprobs")?;
    if top > 0 && !body.logprobs {
        return Err(ApiError::bad_request(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let n = body.common.n()?;
    jobs::check_fan_out(state, n, "n")?;
    let tools = ToolSet::from_request(
        body.tools.as_ref(),
        body.tool_choice.as_ref(),
        body.parallel_tool_calls,
        &state.args.tool_call_parser,
    )?
    .map(Arc::new);
    let conv = Conversation {
        messages: chat_messages(&body.messages)?,
        tools,
        add_generation_prompt: body.add_generation_prompt.unwrap_or(true),
    };
    // default: as long as the context allows (the engine caps it there)
    let max_tokens = body
        .max_completion_tokens
        .or(body.max_tokens)
        .unwrap_or(usize::MAX / 2);
    let params = body.common.params(max_tokens).map_err(api_names)?;
    let prepared = turn::prepare(
        tok,
        &conv,
        params,
        state.args.parse_special_tokens_in_messages,
    )?;
    Ok((body, conv, n, prepared.ids, prepared.params))
}

pub async fn chat_completions(
    state: &Arc<AppState>,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let engine = state.engine()?;
    let tok = engine.tokenizer().clone();
    let (body, conv, n, ids, params) = {
        let (state, tok) = (state.clone(), tok.clone());
        blocking(move || prepare(&state, &tok, &body)).await?
    };
    let top = body.top_logprobs.unwrap_or(0);
    let reqs = choices(&ids, &params, n, top, body.logprobs, false);
    let streams = jobs::submit_all(engine, reqs).await.map_err(api_names)?;
    let id = format!("chatcmpl-{}", new_id());
    let model = state.served_model_name.clone();
    let reasoning = state.args.reasoning_parser.as_deref();
    if body.common.stream {
        let fmt = ChatStream {
            head: ChunkHead::new(id, model, "chat.completion.chunk", &body.common),
            tok,
            logprobs: body.logprobs,
            started_roles: vec![false; n],
            outputs: vec![Output::default(); n],
            prompt_tokens: ids.len(),
            turns: (0..n)
                .map(|_| TurnStream::new(conv.tools.as_ref(), reasoning))
                .collect(),
        };
        return Ok(sse::stream(state, engine, streams, fmt));
    }
    let outputs = jobs::collect_all(state, engine, streams).await?;
    let mut reasonings = Vec::new();
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let logprobs = if body.logprobs {
                chat_logprobs(&tok, &o.logprobs)
            } else {
                Value::Null
            };
            let (t, end) = turn::finished_turn(o, conv.tools.as_deref(), reasoning);
            let mut message = json!({"role": "assistant", "content": t.content});
            if !t.calls.is_empty() {
                if t.content.trim().is_empty() {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] = t.calls.iter().map(tools::call_json).collect();
            }
            if let Some(r) = &t.reasoning {
                message["reasoning_content"] = json!(r);
            }
            reasonings.push(t.reasoning.unwrap_or_default());
            json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish_str(&end)})
        })
        .collect();
    log_outputs(
        "/v1/chat/completions",
        &vec![(id.as_str(), ids.len()); n],
        &outputs,
        "ok",
        started,
    );
    let reasoning_refs: Vec<&str> = reasonings.iter().map(String::as_str).collect();
    Ok(ok_json(&json!({
        "id": id, "object": "chat.completion", "created": now_secs(), "model": model,
        "choices": choices,
        "usage": usage_with_reasoning(&tok, ids.len(), &outputs, &reasoning_refs),
    })))
}

struct ChatStream {
    head: ChunkHead,
    tok: Arc<Tokenizer>,
    logprobs: bool,
    started_roles: Vec<bool>,
    outputs: Vec<Output>,
    prompt_tokens: usize,
    /// Each choice's reasoning and tool-call split.
    turns: Vec<TurnStream>,
}

/// A chat `delta` object.
fn delta_json(d: Delta) -> Value {
    match d {
        Delta::Reasoning(r) => json!({"reasoning_content": r}),
        Delta::Content(c) => json!({"content": c}),
        Delta::CallStart {
            index,
            id,
            name,
            arguments,
        } => json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                                     "function": {"name": name, "arguments": arguments}}]}),
        Delta::CallArguments { index, arguments } => {
            json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        }
    }
}

impl StreamFormatter for ChatStream {
    fn event(&mut self, i: usize, event: &Event) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.started_roles[i] {
            self.started_roles[i] = true;
            out.push(self.head.chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})));
        }
        match event {
            Event::Chunk(c) => {
                self.outputs[i].push(c.clone());
                let mut logprobs = if self.logprobs {
                    chat_logprobs(&self.tok, &c.logprobs)
                } else {
                    Value::Null
                };
                let mut deltas: Vec<Value> = self.turns[i]
                    .push(&c.text, false)
                    .into_iter()
                    .map(delta_json)
                    .collect();
                if deltas.is_empty() && self.logprobs {
                    deltas.push(json!({"content": ""}));
                }
                for delta in deltas {
                    // the event's logprobs travel with its first chunk
                    let lp = std::mem::replace(&mut logprobs, Value::Null);
                    out.push(self.head.chunk(
                        json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": null}),
                    ));
                }
            }
            Event::Finished(f) => {
                self.outputs[i].finish = Some(f.clone());
                for delta in self.turns[i].push("", true) {
                    out.push(self.head.chunk(json!({"index": i, "delta": delta_json(delta), "logprobs": null, "finish_reason": null})));
                }
                let end = self.turns[i].end(&self.outputs[i]);
                out.push(self.head.chunk(json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish_str(&end)})));
            }
            Event::Failed(_) => {}
        }
        out.into_iter().map(Into::into).collect()
    }

    fn finish(&mut self) -> Vec<SseEvent> {
        let reasoning: Vec<&str> = self.turns.iter().map(TurnStream::reasoning).collect();
        let usage = usage_with_reasoning(&self.tok, self.prompt_tokens, &self.outputs, &reasoning);
        self.head
            .usage_value(usage)
            .into_iter()
            .map(Into::into)
            .collect()
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
