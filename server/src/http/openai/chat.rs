//! `POST /v1/chat/completions`: messages rendered through the model's chat template, the
//! assistant's reply as `message` (or `delta` chunks), `logprobs` in the chat shape, and tool
//! calls (`tools`, `tool_choice`, `parallel_tool_calls`; see [`super::tools`]).

use std::sync::Arc;
use std::time::Instant;

use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::engine::{Event, Output, TokenInfo};
use sglang::tokenizer::Tokenizer;
use tool_parser::ToolParser;

use super::tools::{self, ToolSet};
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
    #[serde(flatten)]
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
fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<Value>, ApiError> {
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

/// The prompt: messages (and tools) through the chat template, or with the tools and tool
/// history written into the messages for a template that does not render them.
fn render(
    tok: &Tokenizer,
    messages: Vec<Value>,
    tools: Option<&ToolSet>,
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    let shown = tools.and_then(ToolSet::for_prompt);
    let rendered = if tok.template_uses_tools() {
        tok.apply_chat_template_with_tools(&messages, shown, add_generation_prompt)
    } else {
        let messages = tools::inline_tools(messages, shown);
        tok.apply_chat_template(&messages, add_generation_prompt)
    };
    rendered.map_err(|e| ApiError::bad_request("messages", e.to_string()))
}

/// The assistant message of a finished choice: its text, or the calls parsed from it.
fn message_json(o: &Output, tools: Option<&ToolSet>) -> (Value, Value) {
    if let Some(t) = tools.filter(|t| t.parses()) {
        let (normal, calls) = t.parse(&o.text);
        if !calls.is_empty() {
            let content = if normal.trim().is_empty() {
                Value::Null
            } else {
                json!(normal)
            };
            let calls: Vec<Value> = calls.iter().map(tools::call_json).collect();
            return (
                json!({"role": "assistant", "content": content, "tool_calls": calls}),
                json!("tool_calls"),
            );
        }
    }
    (
        json!({"role": "assistant", "content": o.text}),
        finish_reason(o),
    )
}

pub async fn chat_completions(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let engine = state.engine()?;
    let body: ChatBody = parse_json(body)?;
    let top = body.top_logprobs.unwrap_or(0);
    check_top(top, "top_logprobs")?;
    if top > 0 && !body.logprobs {
        return Err(ApiError::bad_request(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let n = body.common.n()?;
    let tools = ToolSet::from_request(
        body.tools.as_ref(),
        body.tool_choice.as_ref(),
        body.parallel_tool_calls,
        &state.args.tool_call_parser,
    )?
    .map(Arc::new);
    let tok = engine.tokenizer().clone();
    let messages = chat_messages(&body.messages)?;
    let text = render(
        &tok,
        messages,
        tools.as_deref(),
        body.add_generation_prompt.unwrap_or(true),
    )?;
    let ids = tok
        .encode(&text, false)
        .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
    // default: as long as the context allows (the engine caps it there)
    let max_tokens = body
        .max_completion_tokens
        .or(body.max_tokens)
        .unwrap_or(usize::MAX / 2);
    let mut params = body.common.params(max_tokens).map_err(api_names)?;
    if let Some(schema) = tools.as_ref().and_then(|t| t.forced_schema()) {
        if sglang::engine::constraint_spec(&params).is_some() {
            return Err(ApiError::bad_request(
                "tool_choice",
                "`tool_choice` that forces a call cannot be combined with `response_format`, `regex` or `ebnf`",
            ));
        }
        params.json_schema = Some(schema);
    }
    let reqs = choices(&ids, &params, n, top, body.logprobs, false);
    let streams = jobs::submit_all(engine, reqs).await.map_err(api_names)?;
    let id = format!("chatcmpl-{}", new_id());
    let model = state.served_model_name.clone();
    if body.common.stream {
        let parsers = (0..n)
            .map(|_| tools.as_ref().filter(|t| t.parses()).map(|t| t.parser()))
            .collect();
        let fmt = ChatStream {
            head: ChunkHead::new(id, model, "chat.completion.chunk", &body.common),
            tok,
            logprobs: body.logprobs,
            started_roles: vec![false; n],
            outputs: vec![Output::default(); n],
            prompt_tokens: ids.len(),
            tools,
            parsers,
            call_ids: vec![Vec::new(); n],
        };
        return Ok(sse::stream(state, engine, streams, fmt));
    }
    let outputs = jobs::collect_all(state, engine, streams).await?;
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let logprobs = if body.logprobs {
                chat_logprobs(&tok, &o.logprobs)
            } else {
                Value::Null
            };
            let (message, finish) = message_json(o, tools.as_deref());
            json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
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
    tools: Option<Arc<ToolSet>>,
    /// Each choice's tool-call parser (when its output is read for calls).
    parsers: Vec<Option<Box<dyn ToolParser>>>,
    /// Each choice's calls so far, by the parser's index: their ids.
    call_ids: Vec<Vec<String>>,
}

impl ChatStream {
    /// The deltas of one piece of a choice's text: content, and tool calls by index.
    fn deltas(&mut self, i: usize, text: &str, last: bool) -> Vec<Value> {
        let Some(parser) = self.parsers[i].as_mut() else {
            return if text.is_empty() {
                Vec::new()
            } else {
                vec![json!({"content": text})]
            };
        };
        let tools = self.tools.as_deref().map_or(&[][..], ToolSet::tools);
        let mut normal = String::new();
        let mut items = Vec::new();
        if let Some(Ok(r)) = tools::ready(parser.parse_incremental(text, tools)) {
            normal.push_str(&r.normal_text);
            items.extend(r.calls);
        }
        if last {
            items.extend(parser.get_unstreamed_tool_args().unwrap_or_default());
            normal.push_str(&parser.take_unstreamed_normal_text());
        }
        let mut out = Vec::new();
        if !normal.is_empty() {
            out.push(json!({"content": normal}));
        }
        let ids = &mut self.call_ids[i];
        for item in items {
            let k = item.tool_index;
            let call = match item.name {
                Some(name) => {
                    while ids.len() <= k {
                        ids.push(tools::call_id());
                    }
                    json!({"index": k, "id": ids[k], "type": "function",
                           "function": {"name": name, "arguments": item.parameters}})
                }
                None if item.parameters.is_empty() => continue,
                None => json!({"index": k, "function": {"arguments": item.parameters}}),
            };
            out.push(json!({"tool_calls": [call]}));
        }
        out
    }
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
                let mut logprobs = if self.logprobs {
                    chat_logprobs(&self.tok, &c.logprobs)
                } else {
                    Value::Null
                };
                let mut deltas = self.deltas(i, &c.text, false);
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
                for delta in self.deltas(i, "", true) {
                    out.push(self.head.chunk(json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": null})));
                }
                let finish = if self.call_ids[i].is_empty() {
                    finish_reason(&self.outputs[i])
                } else {
                    json!("tool_calls")
                };
                out.push(self.head.chunk(
                    json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}),
                ));
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
