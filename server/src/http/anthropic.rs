//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`, a thin
//! translation onto the shared chat pipeline (`http/turn.rs`). `system` and the `messages`'
//! content blocks (`text`, `tool_use`, `tool_result`) become chat messages, `tools` and
//! `tool_choice` (`auto`, `any`, `tool`, `none`) chat tools; the turn comes back as `thinking`,
//! `text` and `tool_use` blocks with `stop_reason` `end_turn`, `max_tokens`, `stop_sequence` or
//! `tool_use`, whole or as Anthropic's event sequence (`message_start`, `content_block_start`,
//! `content_block_delta` with `text_delta` / `input_json_delta` / `thinking_delta`,
//! `content_block_stop`, `message_delta`, `message_stop`). Errors on these routes take
//! Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`), and the key may come
//! in `x-api-key`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::Response;
use serde_json::{json, Map, Value};
use sglang::engine::{Event, GenerateRequest, Output};
use sglang::sampling::SamplingParams;

use super::jobs::{self, log_outputs, new_id};
use super::parse::{bad, opt, opt_bool, opt_f32, opt_i64, opt_string, parse_json};
use super::sse::{self, SseEvent, StreamFormatter};
use super::tools::{self, ToolSet};
use super::turn::{self, Conversation, Delta, Turn, TurnEnd, TurnStream};
use super::{blocking, ok_json, ApiError, AppState, Body};

/// The request fields this server reads; any other is refused, naming it.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "stream",
    "metadata",
    "thinking",
    "output_config",
    // prompt caching is automatic here (the radix cache): the marker is accepted and has no effect
    "cache_control",
    // SGLang's constraint extensions, as on chat completions
    "regex",
    "ebnf",
];

/// Text blocks (or a string) as one text.
fn blocks_text(field: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (j, b) in blocks.iter().enumerate() {
                match (
                    b.get("type").and_then(Value::as_str),
                    b.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(bad(
                            &format!("{field}[{j}].type"),
                            format!("{kind:?} is not supported here (text)"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(bad(field, "must be a string or a list of text blocks")),
    }
}

/// One Anthropic message as chat messages: its text (and, from the assistant, its tool uses
/// as tool calls; from the user, its tool results as tool messages first).
fn to_chat(i: usize, m: &Value, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let field = format!("messages[{i}]");
    let role = match m.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant")) => r,
        other => {
            return Err(bad(
                &format!("{field}.role"),
                format!("{other:?} is not one of user, assistant"),
            ))
        }
    };
    let content = m
        .get("content")
        .ok_or_else(|| bad(&format!("{field}.content"), "is required"))?;
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Value::Array(b) => b,
        _ => {
            return Err(bad(
                &format!("{field}.content"),
                "must be a string or a list of content blocks",
            ))
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let f = format!("{field}.content[{j}]");
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") if role == "assistant" => {
                let (Some(id), Some(name)) = (
                    b.get("id").and_then(Value::as_str),
                    b.get("name").and_then(Value::as_str),
                ) else {
                    return Err(bad(&f, "needs `id` and `name`"));
                };
                let input = b.get("input").cloned().unwrap_or(json!({}));
                calls.push(json!({"id": id, "type": "function",
                                  "function": {"name": name, "arguments": input.to_string()}}));
            }
            Some("tool_result") if role == "user" => {
                let id = b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(&format!("{f}.tool_use_id"), "is required"))?;
                let result = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => blocks_text(&format!("{f}.content"), c)?,
                };
                out.push(tools::message_value(i, "tool", result, None, Some(id))?);
            }
            // earlier thinking is not shown to the model again
            Some("thinking" | "redacted_thinking") if role == "assistant" => {}
            kind => {
                return Err(bad(
                    &format!("{f}.type"),
                    format!("{kind:?} is not supported in a {role} message"),
                ))
            }
        }
    }
    if !text.is_empty() || !calls.is_empty() || out.last().is_none_or(|m| m["role"] != "tool") {
        let calls = (!calls.is_empty()).then(|| Value::Array(calls));
        out.push(tools::message_value(i, role, text, calls.as_ref(), None)?);
    }
    Ok(())
}

/// Anthropic tools (`{"name", "description", "input_schema"}`) in chat completions' shape;
/// a server tool is refused.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| bad("tools", "must be a list of tools"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            if let Some(kind) = t
                .get("type")
                .and_then(Value::as_str)
                .filter(|k| *k != "custom")
            {
                return Err(bad(
                    &format!("tools[{i}].type"),
                    format!("{kind:?} is not supported: only custom (client) tools are"),
                ));
            }
            let name = t
                .get("name")
                .ok_or_else(|| bad(&format!("tools[{i}].name"), "is required"))?;
            let schema = t
                .get("input_schema")
                .ok_or_else(|| bad(&format!("tools[{i}].input_schema"), "is required"))?;
            let mut f = json!({"name": name, "parameters": schema});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            Ok(json!({"type": "function", "function": f}))
        })
        .collect()
}

/// `tool_choice` in chat completions' shape, and whether parallel calls are allowed.
fn chat_tool_choice(choice: Option<&Value>) -> Result<(Option<Value>, bool), ApiError> {
    let Some(c) = choice else {
        return Ok((None, true));
    };
    let parallel = !c
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chat = match c.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice.name", "is required"))?;
            json!({"type": "function", "function": {"name": name}})
        }
        other => {
            return Err(bad(
                "tool_choice.type",
                format!("{other:?} is not one of auto, any, tool, none"),
            ))
        }
    };
    Ok((Some(chat), parallel))
}

/// A request's conversation (and its parameters, for `create`).
fn read(state: &AppState, body: &[u8]) -> Result<(Map<String, Value>, Conversation), ApiError> {
    let body: Value = parse_json(body)?;
    let Value::Object(body) = body else {
        return Err(bad("body", "must be a JSON object"));
    };
    if let Some(k) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(bad(k, "is not supported by this server"));
    }
    if !opt(&body, "model").is_some_and(Value::is_string) {
        return Err(bad("model", "is required (a string)"));
    }
    let list = opt(&body, "messages")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad("messages", "is required (a non-empty list)"))?;
    let mut messages = Vec::new();
    if let Some(system) = opt(&body, "system") {
        messages.push(json!({"role": "system", "content": blocks_text("system", system)?}));
    }
    for (i, m) in list.iter().enumerate() {
        to_chat(i, m, &mut messages)?;
    }
    if let Some(t) = opt(&body, "thinking") {
        let enabled = t.get("type").and_then(Value::as_str) == Some("enabled");
        if enabled && state.args.reasoning_parser.is_none() {
            return Err(bad(
                "thinking",
                "needs the server started with --reasoning-parser (a model that thinks)",
            ));
        }
    }
    let tools_json = opt(&body, "tools").map(chat_tools).transpose()?;
    let (choice, parallel) = chat_tool_choice(opt(&body, "tool_choice"))?;
    let tools = ToolSet::from_request(
        tools_json.as_ref(),
        choice.as_ref(),
        Some(parallel),
        &state.args.tool_call_parser,
    )?
    .map(Arc::new);
    Ok((
        body,
        Conversation {
            messages,
            tools,
            add_generation_prompt: true,
        },
    ))
}

fn params(body: &Map<String, Value>) -> Result<SamplingParams, ApiError> {
    let max_tokens = opt(body, "max_tokens")
        .ok_or_else(|| bad("max_tokens", "is required"))?
        .as_u64()
        .filter(|&n| n >= 1)
        .ok_or_else(|| bad("max_tokens", "must be an integer >= 1"))?;
    let stop = match opt(body, "stop_sequences") {
        None => Vec::new(),
        Some(Value::Array(l)) => l
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("stop_sequences", "must be a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("stop_sequences", "must be a list of strings")),
    };
    let d = SamplingParams::default();
    Ok(SamplingParams {
        max_new_tokens: max_tokens as usize,
        temperature: opt_f32(body, "temperature")?.unwrap_or(1.0),
        top_p: opt_f32(body, "top_p")?.unwrap_or(1.0),
        top_k: opt_i64(body, "top_k")?.unwrap_or(d.top_k),
        stop,
        json_schema: output_format(opt(body, "output_config"))?,
        regex: opt_string(body, "regex")?,
        ebnf: opt_string(body, "ebnf")?,
        ..d
    })
}

/// `output_config.format` (`{"type": "json_schema", "schema"}`) as a JSON schema constraint;
/// `output_config.effort` is a hint this server has no use for.
fn output_format(config: Option<&Value>) -> Result<Option<String>, ApiError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let Value::Object(config) = config else {
        return Err(bad("output_config", "must be an object"));
    };
    if let Some(k) = config
        .keys()
        .find(|k| !matches!(k.as_str(), "format" | "effort"))
    {
        return Err(bad(
            &format!("output_config.{k}"),
            "is not supported by this server",
        ));
    }
    let Some(format) = opt(config, "format") else {
        return Ok(None);
    };
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Err(bad("output_config.format.type", "must be \"json_schema\""));
    }
    let schema = format
        .get("schema")
        .filter(|s| s.is_object())
        .ok_or_else(|| bad("output_config.format.schema", "is required (an object)"))?;
    Ok(Some(schema.to_string()))
}

pub async fn count_tokens(state: &Arc<AppState>, body: Bytes) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let (state, tok) = (state.clone(), engine.tokenizer().clone());
    let count = blocking(move || {
        let (_, conv) = read(&state, &body)?;
        let text = turn::render(&tok, &conv, state.args.parse_special_tokens_in_messages)?;
        Ok(turn::encode(&tok, &text)?.len())
    })
    .await?;
    Ok(ok_json(&json!({"input_tokens": count})))
}

fn stop_reason(end: &TurnEnd) -> (&'static str, Value) {
    match end {
        TurnEnd::Stop | TurnEnd::Abort => ("end_turn", Value::Null),
        TurnEnd::StopSequence(s) => ("stop_sequence", json!(s)),
        TurnEnd::Length => ("max_tokens", Value::Null),
        TurnEnd::ToolCalls => ("tool_use", Value::Null),
    }
}

fn usage(prompt: usize, o: &Output) -> Value {
    let cached = o.finish.as_ref().map_or(0, |f| f.usage.cached_tokens);
    json!({"input_tokens": prompt - cached.min(prompt), "output_tokens": o.token_ids.len(),
           "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0})
}

/// A tool call's arguments as the `input` object (the call's text when it is not JSON).
fn input_of(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| json!({}))
}

fn tool_use_id(call_id: &str) -> String {
    format!("toolu_{}", call_id.trim_start_matches("call_"))
}

fn content_blocks(t: &Turn) -> Vec<Value> {
    let mut blocks = Vec::new();
    if let Some(r) = &t.reasoning {
        blocks.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    if !t.content.is_empty() || t.calls.is_empty() {
        blocks.push(json!({"type": "text", "text": t.content}));
    }
    for c in &t.calls {
        blocks.push(
            json!({"type": "tool_use", "id": tool_use_id(&tools::call_id()),
                           "name": c.function.name, "input": input_of(&c.function.arguments)}),
        );
    }
    blocks
}

pub async fn create(state: &Arc<AppState>, body: Bytes) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let engine = state.engine()?;
    let (body, conv, prepared) = {
        let (state, tok) = (state.clone(), engine.tokenizer().clone());
        blocking(move || {
            let (body, conv) = read(&state, &body)?;
            let special = state.args.parse_special_tokens_in_messages;
            let prepared = turn::prepare(&tok, &conv, params(&body)?, special)?;
            Ok((body, conv, prepared))
        })
        .await?
    };
    let stream = opt_bool(&body, "stream")?.unwrap_or(false);
    let ids = prepared.ids;
    let gen = GenerateRequest {
        input_ids: ids.clone(),
        params: prepared.params,
        ..Default::default()
    };
    let streams = jobs::submit_all(engine, vec![gen]).await.map_err(|e| {
        e.rename_param("max_new_tokens", "max_tokens")
            .rename_param("stop", "stop_sequences")
            .rename_param("json_schema", "output_config.format")
    })?;
    let id = format!("msg_{}", new_id());
    let model = body["model"].clone();
    let reasoning = state.args.reasoning_parser.as_deref();
    if stream {
        let fmt = MessageStream {
            id,
            model,
            prompt_tokens: ids.len(),
            turn: TurnStream::new(conv.tools.as_ref(), reasoning),
            output: Output::default(),
            started: false,
            block: None,
            next_block: 0,
        };
        return Ok(sse::stream(state, engine, streams, fmt));
    }
    let outputs = jobs::collect_all(state, engine, streams).await?;
    let o = &outputs[0];
    let (t, end) = turn::finished_turn(o, conv.tools.as_deref(), reasoning);
    let (reason, sequence) = stop_reason(&end);
    log_outputs(
        "/v1/messages",
        &[(id.as_str(), ids.len())],
        &outputs,
        "ok",
        started,
    );
    Ok(ok_json(&json!({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": content_blocks(&t), "stop_reason": reason, "stop_sequence": sequence,
        "usage": usage(ids.len(), o),
    })))
}

/// The kind of content block being streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    /// A tool use: the parser's index of its call.
    ToolUse(usize),
}

/// Anthropic's event sequence for one streamed message.
struct MessageStream {
    id: String,
    model: Value,
    prompt_tokens: usize,
    turn: TurnStream,
    output: Output,
    started: bool,
    /// The block open now and its index.
    block: Option<(Block, usize)>,
    next_block: usize,
}

impl MessageStream {
    fn close(&mut self, out: &mut Vec<SseEvent>) {
        if let Some((_, index)) = self.block.take() {
            out.push(SseEvent::named(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}).to_string(),
            ));
        }
    }

    /// Makes `kind` the open block (closing another), starting it with `start`.
    fn open(&mut self, kind: Block, start: Value, out: &mut Vec<SseEvent>) -> usize {
        if let Some((k, index)) = self.block {
            if k == kind {
                return index;
            }
        }
        self.close(out);
        let index = self.next_block;
        self.next_block += 1;
        self.block = Some((kind, index));
        out.push(SseEvent::named(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start})
                .to_string(),
        ));
        index
    }

    fn delta(&mut self, d: Delta, out: &mut Vec<SseEvent>) {
        let (index, delta) = match d {
            Delta::Reasoning(t) => {
                let i = self.open(
                    Block::Thinking,
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    out,
                );
                (i, json!({"type": "thinking_delta", "thinking": t}))
            }
            Delta::Content(t) => {
                let i = self.open(Block::Text, json!({"type": "text", "text": ""}), out);
                (i, json!({"type": "text_delta", "text": t}))
            }
            Delta::CallStart {
                index,
                id,
                name,
                arguments,
            } => {
                let start =
                    json!({"type": "tool_use", "id": tool_use_id(&id), "name": name, "input": {}});
                let i = self.open(Block::ToolUse(index), start, out);
                if arguments.is_empty() {
                    return;
                }
                (
                    i,
                    json!({"type": "input_json_delta", "partial_json": arguments}),
                )
            }
            Delta::CallArguments { index, arguments } => {
                let Some((Block::ToolUse(k), i)) = self.block else {
                    return;
                };
                if k != index {
                    return;
                }
                (
                    i,
                    json!({"type": "input_json_delta", "partial_json": arguments}),
                )
            }
        };
        out.push(SseEvent::named(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}).to_string(),
        ));
    }
}

impl StreamFormatter for MessageStream {
    fn event(&mut self, _i: usize, event: &Event) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            let message = json!({"id": self.id, "type": "message", "role": "assistant",
                "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}});
            out.push(SseEvent::named(
                "message_start",
                json!({"type": "message_start", "message": message}).to_string(),
            ));
        }
        let Some((deltas, last)) = self.turn.event(&mut self.output, event) else {
            return out;
        };
        for d in deltas {
            self.delta(d, &mut out);
        }
        if last {
            if self.next_block == 0 {
                self.open(Block::Text, json!({"type": "text", "text": ""}), &mut out);
            }
            self.close(&mut out);
            let (reason, sequence) = stop_reason(&self.turn.end(&self.output));
            let usage = usage(self.prompt_tokens, &self.output);
            out.push(SseEvent::named(
                "message_delta",
                json!({"type": "message_delta",
                       "delta": {"stop_reason": reason, "stop_sequence": sequence},
                       "usage": usage})
                .to_string(),
            ));
            out.push(SseEvent::named(
                "message_stop",
                json!({"type": "message_stop"}).to_string(),
            ));
        }
        out
    }

    fn error(&self, e: &ApiError) -> SseEvent {
        SseEvent::named("error", e.anthropic_json().to_string())
    }

    fn done_marker(&self) -> bool {
        false
    }

    fn log(&self, status: &str, started: Instant) {
        log_outputs(
            "/v1/messages",
            &[(self.id.as_str(), self.prompt_tokens)],
            std::slice::from_ref(&self.output),
            status,
            started,
        );
    }
}
