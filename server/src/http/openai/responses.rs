//! OpenAI's Responses API: `POST /v1/responses`, `GET /v1/responses/{id}`,
//! `DELETE /v1/responses/{id}`. A thin translation onto the shared chat pipeline
//! (`http/turn.rs`): `instructions` and the `input` items (messages, `function_call`,
//! `function_call_output`) become chat messages, `text.format` a constraint, function tools
//! chat tools; the turn comes back as `reasoning`, `message` and `function_call` items, whole
//! or as the typed event sequence (`response.created`, `response.output_item.added`,
//! `response.output_text.delta`, `response.function_call_arguments.delta`,
//! `response.completed`, ...).
//!
//! Responses are stored (unless `store: false`) in memory, at most [`STORE_MAX_RESPONSES`] and
//! [`STORE_MAX_BYTES`], the oldest dropped first; `previous_response_id` continues one (its
//! conversation and output come before the new input; its `instructions` do not carry over,
//! as in OpenAI's API). Fields this server does not do (built-in tools, `background`,
//! `reasoning`, ...) are a 400 naming the field.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::Response;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use sglang::engine::{Event, Output};
use sglang::sampling::SamplingParams;
use sglang::tokenizer::Tokenizer;

use super::{api_names, now_secs};
use crate::http::jobs::{self, log_outputs, new_id};
use crate::http::parse::{bad, opt, opt_bool, opt_f32, opt_i64, opt_string, opt_u64, parse_json};
use crate::http::sse::{self, SseEvent, StreamFormatter};
use crate::http::tools::{self, ToolSet};
use crate::http::turn::{self, Conversation, Delta, Turn, TurnEnd, TurnStream};
use crate::http::{blocking, json_response, ok_json, ApiError, AppState, Body};

/// Most responses kept for `previous_response_id` and `GET`.
pub const STORE_MAX_RESPONSES: usize = 1024;
/// Most bytes of stored responses (their JSON and their conversation).
pub const STORE_MAX_BYTES: usize = 64 << 20;

/// A stored response: what `GET` returns, and the conversation it continues from.
struct Stored {
    response: Value,
    /// The conversation up to and including this response's output (no instructions).
    messages: Vec<Value>,
    bytes: usize,
}

/// The responses kept in memory, oldest first.
#[derive(Default)]
pub struct ResponseStore {
    entries: Mutex<(VecDeque<(String, Stored)>, usize)>,
}

impl ResponseStore {
    fn put(&self, id: String, response: Value, messages: Vec<Value>) {
        let bytes = response.to_string().len()
            + messages.iter().map(|m| m.to_string().len()).sum::<usize>();
        let mut g = self.entries.lock();
        let (list, total) = &mut *g;
        list.push_back((
            id,
            Stored {
                response,
                messages,
                bytes,
            },
        ));
        *total += bytes;
        while list.len() > STORE_MAX_RESPONSES || (*total > STORE_MAX_BYTES && list.len() > 1) {
            if let Some((_, old)) = list.pop_front() {
                *total -= old.bytes;
            }
        }
    }

    fn get(&self, id: &str) -> Option<(Value, Vec<Value>)> {
        let g = self.entries.lock();
        g.0.iter()
            .find(|(k, _)| k == id)
            .map(|(_, s)| (s.response.clone(), s.messages.clone()))
    }

    fn delete(&self, id: &str) -> bool {
        let mut g = self.entries.lock();
        let (list, total) = &mut *g;
        match list.iter().position(|(k, _)| k == id) {
            Some(i) => {
                if let Some((_, s)) = list.remove(i) {
                    *total -= s.bytes;
                }
                true
            }
            None => false,
        }
    }
}

/// The request fields this server reads; any other is refused, naming it.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "stream",
    "store",
    "previous_response_id",
    "metadata",
    "user",
    "truncation",
    // sampling extensions, as on chat completions
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    // SGLang's constraint extensions, as on chat completions
    "regex",
    "ebnf",
];

/// The text of a message's content: a string, or `input_text` / `output_text` parts.
fn content_text(field: &str, content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(bad(
                            &format!("{field}.content[{j}].type"),
                            format!("{kind:?} is not supported (input_text, output_text)"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(bad(
            &format!("{field}.content"),
            "must be a string or a list of text parts",
        )),
    }
}

/// `input` as chat messages appended to `messages` (function calls join the assistant message
/// they follow; their outputs become tool messages).
fn input_messages(input: &Value, messages: &mut Vec<Value>) -> Result<(), ApiError> {
    let items = match input {
        Value::String(s) => {
            messages.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(items) if !items.is_empty() => items,
        Value::Array(_) => return Err(bad("input", "is empty")),
        _ => return Err(bad("input", "must be a string or a list of items")),
    };
    for (i, item) in items.iter().enumerate() {
        let field = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some(r @ ("user" | "system" | "assistant")) => r,
                    Some("developer") => "system",
                    other => {
                        return Err(bad(
                            &format!("{field}.role"),
                            format!("{other:?} is not one of user, system, developer, assistant"),
                        ))
                    }
                };
                let content = content_text(&field, item.get("content"))?;
                messages.push(tools::message_value(i, role, content, None, None)?);
            }
            "function_call" => {
                let (Some(call_id), Some(name)) = (
                    item.get("call_id").and_then(Value::as_str),
                    item.get("name").and_then(Value::as_str),
                ) else {
                    return Err(bad(&field, "needs `call_id` and `name`"));
                };
                let arguments = item.get("arguments").cloned().unwrap_or(json!("{}"));
                let call = json!({"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": arguments}});
                let calls = json!([call]);
                let joins = messages
                    .last()
                    .is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_some());
                let m = tools::message_value(i, "assistant", String::new(), Some(&calls), None)?;
                match messages.last_mut().filter(|_| joins) {
                    Some(last) => {
                        if let (Some(list), Some(new)) = (
                            last["tool_calls"].as_array_mut(),
                            m["tool_calls"].as_array(),
                        ) {
                            list.extend(new.iter().cloned());
                        }
                    }
                    None => messages.push(m),
                }
            }
            "function_call_output" => {
                let call_id = item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(&format!("{field}.call_id"), "is required"))?;
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                messages.push(tools::message_value(
                    i,
                    "tool",
                    output,
                    None,
                    Some(call_id),
                )?);
            }
            // earlier reasoning is not shown to the model again
            "reasoning" => {}
            other => {
                return Err(bad(
                    &format!("{field}.type"),
                    format!(
                        "{other:?} is not supported (message, function_call, function_call_output)"
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Responses function tools (`{"type": "function", "name", "description", "parameters"}`)
/// in chat completions' shape; a built-in tool is refused.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| bad("tools", "must be a list of tools"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(bad(
                    &format!("tools[{i}].type"),
                    format!("{kind:?} is not supported: only function tools are"),
                ));
            }
            let mut f = Map::new();
            for k in ["name", "description", "parameters"] {
                if let Some(v) = t.get(k) {
                    f.insert(k.into(), v.clone());
                }
            }
            Ok(json!({"type": "function", "function": f}))
        })
        .collect()
}

/// `tool_choice` in chat completions' shape.
fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice.name", "is required"))?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(bad(
            "tool_choice",
            "must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

/// `text.format` as a JSON schema constraint.
fn text_format(text: Option<&Value>) -> Result<Option<String>, ApiError> {
    let Some(format) = text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(r#"{"type": "object"}"#.into())),
        Some("json_schema") => {
            let schema = format
                .get("schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            Ok(Some(schema.to_string()))
        }
        other => Err(bad(
            "text.format.type",
            format!("{other:?} is not one of text, json_object, json_schema"),
        )),
    }
}

/// What a request asks for, checked.
struct Request {
    conv: Conversation,
    /// The conversation without instructions, for the store.
    history: Vec<Value>,
    params: SamplingParams,
    stream: bool,
    store: bool,
    /// Request fields the response echoes.
    echo: Value,
}

fn read_request(state: &AppState, body: &[u8]) -> Result<Request, ApiError> {
    let body: Value = parse_json(body)?;
    let Value::Object(body) = body else {
        return Err(bad("body", "must be a JSON object"));
    };
    if let Some(k) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(bad(k, "is not supported by this server"));
    }
    if opt(&body, "truncation").is_some_and(|t| t != "disabled") {
        return Err(bad("truncation", "only \"disabled\" is supported"));
    }
    let input = body
        .get("input")
        .ok_or_else(|| bad("input", "is required"))?;
    let mut history = Vec::new();
    let previous = opt(&body, "previous_response_id");
    if let Some(p) = previous {
        let id = p
            .as_str()
            .ok_or_else(|| bad("previous_response_id", "must be a string"))?;
        let (_, messages) = state.responses.get(id).ok_or_else(|| {
            bad(
                "previous_response_id",
                format!("{id:?} is not a stored response"),
            )
        })?;
        history = messages;
    }
    input_messages(input, &mut history)?;
    let mut messages = history.clone();
    let instructions = opt(&body, "instructions");
    if let Some(text) = instructions {
        let text = text
            .as_str()
            .ok_or_else(|| bad("instructions", "must be a string"))?;
        messages.insert(0, json!({"role": "system", "content": text}));
    }
    let tools_json = opt(&body, "tools").map(chat_tools).transpose()?;
    let choice_json = opt(&body, "tool_choice")
        .map(chat_tool_choice)
        .transpose()?;
    let parallel = opt_bool(&body, "parallel_tool_calls")?;
    let store = opt_bool(&body, "store")?.unwrap_or(true);
    let tools = ToolSet::from_request(
        tools_json.as_ref(),
        choice_json.as_ref(),
        parallel,
        &state.args.tool_call_parser,
    )?
    .map(Arc::new);
    let d = SamplingParams::default();
    let params = SamplingParams {
        max_new_tokens: opt_u64(&body, "max_output_tokens")?.map_or(usize::MAX / 2, |v| v as usize),
        temperature: opt_f32(&body, "temperature")?.unwrap_or(1.0),
        top_p: opt_f32(&body, "top_p")?.unwrap_or(1.0),
        top_k: opt_i64(&body, "top_k")?.unwrap_or(d.top_k),
        min_p: opt_f32(&body, "min_p")?.unwrap_or(d.min_p),
        repetition_penalty: opt_f32(&body, "repetition_penalty")?.unwrap_or(1.0),
        seed: opt_u64(&body, "seed")?,
        json_schema: text_format(opt(&body, "text"))?,
        regex: opt_string(&body, "regex")?,
        ebnf: opt_string(&body, "ebnf")?,
        ..d
    };
    let echo = json!({
        "instructions": instructions.cloned().unwrap_or(Value::Null),
        "max_output_tokens": opt(&body, "max_output_tokens").cloned().unwrap_or(Value::Null),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "tools": opt(&body, "tools").cloned().unwrap_or(json!([])),
        "tool_choice": opt(&body, "tool_choice").cloned().unwrap_or(json!("auto")),
        "parallel_tool_calls": parallel.unwrap_or(true),
        "text": opt(&body, "text").cloned().unwrap_or(json!({"format": {"type": "text"}})),
        "previous_response_id": previous.cloned().unwrap_or(Value::Null),
        "metadata": opt(&body, "metadata").cloned().unwrap_or(json!({})),
        "store": store,
    });
    Ok(Request {
        conv: Conversation {
            messages,
            tools,
            add_generation_prompt: true,
        },
        history,
        params,
        stream: opt_bool(&body, "stream")?.unwrap_or(false),
        store,
        echo,
    })
}

fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", new_id())
}

fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "reasoning", "id": id, "summary": [], "status": status,
           "content": [{"type": "reasoning_text", "text": text}]})
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
           "arguments": arguments, "status": status})
}

/// The output items of a finished turn.
fn output_items(t: &Turn) -> Vec<Value> {
    let mut items = Vec::new();
    if let Some(r) = &t.reasoning {
        items.push(reasoning_item(&item_id("rs"), r, "completed"));
    }
    if !t.content.is_empty() || t.calls.is_empty() {
        items.push(message_item(&item_id("msg"), &t.content, "completed"));
    }
    for c in &t.calls {
        items.push(call_item(
            &item_id("fc"),
            &tools::call_id(),
            &c.function.name,
            &c.function.arguments,
            "completed",
        ));
    }
    items
}

/// The output items as chat messages, for a later `previous_response_id`.
fn output_messages(items: &[Value]) -> Vec<Value> {
    let mut content = String::new();
    let mut calls = Vec::new();
    for item in items {
        match item["type"].as_str() {
            Some("message") => {
                content.push_str(item["content"][0]["text"].as_str().unwrap_or_default())
            }
            Some("function_call") => calls.push(json!({"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}})),
            _ => {}
        }
    }
    let mut m = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
        if let Ok(v) = tools::message_value(0, "assistant", content, Some(&m["tool_calls"]), None) {
            m = v;
        }
    }
    vec![m]
}

/// Responses' `usage`.
fn usage(tok: &Tokenizer, prompt: usize, o: &Output, reasoning: &str) -> Value {
    let cached = o.finish.as_ref().map_or(0, |f| f.usage.cached_tokens);
    let out = o.token_ids.len();
    json!({
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": turn::count(tok, reasoning)},
        "total_tokens": prompt + out,
    })
}

/// The response object.
struct Head {
    id: String,
    created: u64,
    model: String,
    echo: Value,
}

impl Head {
    fn response(
        &self,
        status: &str,
        end: Option<&TurnEnd>,
        output: Vec<Value>,
        usage: Value,
    ) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "usage": usage, "error": null,
            "incomplete_details": null,
        });
        if let Some(TurnEnd::Length) = end {
            r["status"] = json!("incomplete");
            r["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        if let (Value::Object(r), Value::Object(e)) = (&mut r, &self.echo) {
            for (k, v) in e {
                r.insert(k.clone(), v.clone());
            }
        }
        r
    }
}

pub async fn create(state: &Arc<AppState>, body: Bytes) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let engine = state.engine()?;
    let tok = engine.tokenizer().clone();
    let (req, prepared) = {
        let (state, tok) = (state.clone(), tok.clone());
        blocking(move || {
            let mut req = read_request(&state, &body)?;
            let special = state.args.parse_special_tokens_in_messages;
            let params = std::mem::take(&mut req.params);
            let prepared = turn::prepare(&tok, &req.conv, params, special).map_err(text_names)?;
            Ok((req, prepared))
        })
        .await?
    };
    let ids = prepared.ids;
    let gen = sglang::engine::GenerateRequest {
        input_ids: ids.clone(),
        params: prepared.params,
        ..Default::default()
    };
    let streams = jobs::submit_all(engine, vec![gen])
        .await
        .map_err(|e| text_names(api_names(e)))?;
    let head = Head {
        id: item_id("resp"),
        created: now_secs(),
        model: state.served_model_name.clone(),
        echo: req.echo,
    };
    let reasoning = state.args.reasoning_parser.as_deref();
    if req.stream {
        let fmt = ResponseStream {
            turn: TurnStream::new(req.conv.tools.as_ref(), reasoning),
            head,
            tok,
            prompt_tokens: ids.len(),
            output: Output::default(),
            seq: 0,
            items: Vec::new(),
            open_text: None,
            open_reasoning: None,
            calls: Vec::new(),
            started: false,
            store: req.store.then(|| (state.clone(), req.history)),
        };
        return Ok(sse::stream(state, engine, streams, fmt));
    }
    let outputs = jobs::collect_all(state, engine, streams).await?;
    let o = &outputs[0];
    let (t, end) = turn::finished_turn(o, req.conv.tools.as_deref(), reasoning);
    let items = output_items(&t);
    let usage = usage(
        &tok,
        ids.len(),
        o,
        t.reasoning.as_deref().unwrap_or_default(),
    );
    let response = head.response("completed", Some(&end), items.clone(), usage);
    if req.store {
        let mut history = req.history;
        history.extend(output_messages(&items));
        state
            .responses
            .put(head.id.clone(), response.clone(), history);
    }
    log_outputs(
        "/v1/responses",
        &[(head.id.as_str(), ids.len())],
        &outputs,
        "ok",
        started,
    );
    Ok(ok_json(&response))
}

/// An engine error in this API's field names.
fn text_names(e: ApiError) -> ApiError {
    e.rename_param("max_new_tokens", "max_output_tokens")
        .rename_param("max_tokens", "max_output_tokens")
        .rename_param("response_format", "text.format")
        .rename_param("json_schema", "text.format")
        .rename_param("messages", "input")
}

pub fn get(state: &Arc<AppState>, id: &str) -> Result<Response<Body>, ApiError> {
    state
        .responses
        .get(id)
        .map(|(r, _)| ok_json(&r))
        .ok_or_else(|| ApiError::not_found(&format!("/v1/responses/{id}")))
}

pub fn delete(state: &Arc<AppState>, id: &str) -> Result<Response<Body>, ApiError> {
    if !state.responses.delete(id) {
        return Err(ApiError::not_found(&format!("/v1/responses/{id}")));
    }
    Ok(json_response(
        hyper::StatusCode::OK,
        &json!({"id": id, "object": "response.deleted", "deleted": true}),
    ))
}

/// A function call item being streamed.
struct OpenCall {
    item_id: String,
    call_id: String,
    name: String,
    arguments: String,
    output_index: usize,
}

/// The typed event sequence of a streamed response.
struct ResponseStream {
    head: Head,
    tok: Arc<Tokenizer>,
    turn: TurnStream,
    prompt_tokens: usize,
    output: Output,
    seq: u64,
    /// Finished output items, in order.
    items: Vec<Value>,
    /// The message item being streamed: (id, output index, text so far).
    open_text: Option<(String, usize, String)>,
    /// The reasoning item being streamed: (id, output index, text so far).
    open_reasoning: Option<(String, usize, String)>,
    calls: Vec<OpenCall>,
    started: bool,
    /// Where to keep the response at the end, and the conversation it continues.
    store: Option<(Arc<AppState>, Vec<Value>)>,
}

impl ResponseStream {
    fn ev(&mut self, name: &'static str, mut data: Value) -> SseEvent {
        data["type"] = json!(name);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        SseEvent::named(name, data.to_string())
    }

    fn next_index(&self) -> usize {
        self.items.len()
            + usize::from(self.open_text.is_some())
            + usize::from(self.open_reasoning.is_some())
            + self.calls.len()
    }

    fn close_reasoning(&mut self, out: &mut Vec<SseEvent>) {
        if let Some((id, index, text)) = self.open_reasoning.take() {
            let e = self.ev(
                "response.reasoning_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
            );
            out.push(e);
            let item = reasoning_item(&id, &text, "completed");
            let e = self.ev(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
            out.push(e);
            self.items.push(item);
        }
    }

    fn close_text(&mut self, out: &mut Vec<SseEvent>) {
        if let Some((id, index, text)) = self.open_text.take() {
            let part =
                json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
            let e = self.ev(
                "response.output_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
            );
            out.push(e);
            let e = self.ev(
                "response.content_part.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            );
            out.push(e);
            let item = message_item(&id, &text, "completed");
            let e = self.ev(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
            out.push(e);
            self.items.push(item);
        }
    }

    fn close_calls(&mut self, out: &mut Vec<SseEvent>) {
        for c in std::mem::take(&mut self.calls) {
            let e = self.ev(
                "response.function_call_arguments.done",
                json!({"item_id": c.item_id, "output_index": c.output_index, "arguments": c.arguments, "name": c.name}),
            );
            out.push(e);
            let item = call_item(&c.item_id, &c.call_id, &c.name, &c.arguments, "completed");
            let e = self.ev(
                "response.output_item.done",
                json!({"output_index": c.output_index, "item": item}),
            );
            out.push(e);
            self.items.push(item);
        }
    }

    fn delta(&mut self, d: Delta, out: &mut Vec<SseEvent>) {
        match d {
            Delta::Reasoning(text) => {
                if self.open_reasoning.is_none() {
                    let (id, index) = (item_id("rs"), self.next_index());
                    let item = json!({"type": "reasoning", "id": id, "summary": [], "content": [], "status": "in_progress"});
                    let e = self.ev(
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                    );
                    out.push(e);
                    self.open_reasoning = Some((id, index, String::new()));
                }
                let (id, index) = {
                    let r = self.open_reasoning.as_mut().expect("opened");
                    r.2.push_str(&text);
                    (r.0.clone(), r.1)
                };
                let e = self.ev(
                    "response.reasoning_text.delta",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text}),
                );
                out.push(e);
            }
            Delta::Content(text) => {
                self.close_reasoning(out);
                if self.open_text.is_none() {
                    let (id, index) = (item_id("msg"), self.next_index());
                    let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
                    let e = self.ev(
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                    );
                    out.push(e);
                    let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
                    let e = self.ev(
                        "response.content_part.added",
                        json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                    );
                    out.push(e);
                    self.open_text = Some((id, index, String::new()));
                }
                let (id, index) = {
                    let t = self.open_text.as_mut().expect("opened");
                    t.2.push_str(&text);
                    (t.0.clone(), t.1)
                };
                let e = self.ev(
                    "response.output_text.delta",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
                );
                out.push(e);
            }
            Delta::CallStart {
                id,
                name,
                arguments,
                ..
            } => {
                self.close_reasoning(out);
                self.close_text(out);
                let index = self.next_index();
                let item_id = item_id("fc");
                let item = call_item(&item_id, &id, &name, "", "in_progress");
                let e = self.ev(
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                out.push(e);
                self.calls.push(OpenCall {
                    item_id,
                    call_id: id,
                    name,
                    arguments: String::new(),
                    output_index: index,
                });
                if !arguments.is_empty() {
                    let k = self.calls.len() - 1;
                    self.call_arguments(k, arguments, out);
                }
            }
            Delta::CallArguments { index, arguments } => {
                // the parser's index counts this turn's calls, in order
                if index < self.calls.len() {
                    self.call_arguments(index, arguments, out);
                }
            }
        }
    }

    fn call_arguments(&mut self, k: usize, arguments: String, out: &mut Vec<SseEvent>) {
        let c = &mut self.calls[k];
        c.arguments.push_str(&arguments);
        let (item_id, index) = (c.item_id.clone(), c.output_index);
        let e = self.ev(
            "response.function_call_arguments.delta",
            json!({"item_id": item_id, "output_index": index, "delta": arguments}),
        );
        out.push(e);
    }
}

impl StreamFormatter for ResponseStream {
    fn event(&mut self, _i: usize, event: &Event) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            let r = self
                .head
                .response("in_progress", None, Vec::new(), Value::Null);
            let e = self.ev("response.created", json!({"response": r}));
            out.push(e);
            let r = self
                .head
                .response("in_progress", None, Vec::new(), Value::Null);
            let e = self.ev("response.in_progress", json!({"response": r}));
            out.push(e);
        }
        let Some((deltas, last)) = self.turn.event(&mut self.output, event) else {
            return out;
        };
        for d in deltas {
            self.delta(d, &mut out);
        }
        if last {
            self.close_reasoning(&mut out);
            if self.items.is_empty() && self.calls.is_empty() && self.open_text.is_none() {
                // an empty answer is still a message
                self.delta(Delta::Content(String::new()), &mut out);
            }
            self.close_text(&mut out);
            self.close_calls(&mut out);
            let end = self.turn.end(&self.output);
            let usage = usage(
                &self.tok,
                self.prompt_tokens,
                &self.output,
                self.turn.reasoning(),
            );
            let response = self
                .head
                .response("completed", Some(&end), self.items.clone(), usage);
            let name = if end == TurnEnd::Length {
                "response.incomplete"
            } else {
                "response.completed"
            };
            let e = self.ev(name, json!({"response": response}));
            out.push(e);
            if let Some((state, mut history)) = self.store.take() {
                history.extend(output_messages(&self.items));
                state.responses.put(self.head.id.clone(), response, history);
            }
        }
        out
    }

    fn error(&self, e: &ApiError) -> SseEvent {
        let body = json!({"type": "error", "code": e.kind, "message": e.message, "param": e.param,
                          "sequence_number": self.seq});
        SseEvent::named("error", body.to_string())
    }

    fn done_marker(&self) -> bool {
        false
    }

    fn log(&self, status: &str, started: Instant) {
        log_outputs(
            "/v1/responses",
            &[(self.head.id.as_str(), self.prompt_tokens)],
            std::slice::from_ref(&self.output),
            status,
            started,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_drops_the_oldest_past_its_count() {
        let store = ResponseStore::default();
        for i in 0..STORE_MAX_RESPONSES + 2 {
            store.put(format!("r{i}"), json!({"n": i}), Vec::new());
        }
        assert!(store.get("r0").is_none() && store.get("r1").is_none());
        assert_eq!(store.get("r2").unwrap().0, json!({"n": 2}));
        let last = format!("r{}", STORE_MAX_RESPONSES + 1);
        assert!(store.get(&last).is_some());
        assert!(store.delete(&last) && !store.delete(&last));
        assert!(store.get(&last).is_none());
    }

    #[test]
    fn store_drops_the_oldest_past_its_bytes() {
        let store = ResponseStore::default();
        let big = json!({"role": "user", "content": "x".repeat(STORE_MAX_BYTES / 3)});
        for i in 0..4 {
            store.put(format!("r{i}"), json!({}), vec![big.clone()]);
        }
        // three of them exceed the bound: only the two newest stay
        assert!(store.get("r0").is_none() && store.get("r1").is_none());
        assert!(store.get("r2").is_some() && store.get("r3").is_some());
        assert!(store.entries.lock().1 <= STORE_MAX_BYTES);
        // one larger than the whole bound is still kept (alone) so its GET works
        let huge = json!({"content": "y".repeat(STORE_MAX_BYTES + 1)});
        store.put("huge".into(), json!({}), vec![huge]);
        assert!(store.get("huge").is_some() && store.get("r3").is_none());
    }
}
