//! `POST /v1/chat/completions`: messages rendered through the model's chat template, the
//! assistant's reply as `message` (or `delta` chunks), `logprobs` in the chat shape.

use std::sync::Arc;
use std::time::Instant;

use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::engine::{Event, Output, TokenInfo};
use sglang::tokenizer::Tokenizer;

use super::{
    api_names, check_top, choices, finish_reason, now_secs, token_text, usage_json, ChunkHead,
    Common,
};
use crate::http::jobs::{self, log_outputs, new_id};
use crate::http::parse::parse_json;
use crate::http::sse::{self, StreamFormatter};
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
    let params = body.common.params(max_tokens).map_err(api_names)?;
    let reqs = choices(&ids, &params, n, top, body.logprobs, false);
    let streams = jobs::submit_all(engine, reqs).await.map_err(api_names)?;
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
        return Ok(sse::stream(state, engine, streams, fmt));
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
