//! The pipeline every chat-style protocol shares: chat completions, the Responses API and the
//! Messages API translate their request into a [`Conversation`] (the messages as the chat
//! template sees them, the tools, the sampling parameters), [`prepare`] turns it into one
//! engine request (template, tokens, a forced tool call's constraint), and the generated text
//! comes back split into reasoning, content and tool calls: whole ([`finished_turn`]) or as
//! [`Delta`]s while it streams ([`TurnStream`]). Each protocol then only formats.
//!
//! Reasoning (`--reasoning-parser`, SGLang gateway's `reasoning-parser` crate: the
//! `<think>...</think>` forms of DeepSeek-R1, Qwen3 and others) is split off first; tool calls
//! are read from what remains.

use std::sync::Arc;

use reasoning_parser::ReasoningParser;
use serde_json::Value;
use sglang::engine::{Event, FinishReason, Matched, Output};
use sglang::sampling::SamplingParams;
use sglang::tokenizer::Tokenizer;
use tool_parser::{ToolCall, ToolParser};

use super::tools::{self, ToolSet};
use super::ApiError;

/// A conversation in chat completions' terms, whichever protocol it came in.
pub struct Conversation {
    /// `{"role", "content"}` messages, with `tool_calls` / `tool_call_id` where there are some.
    pub messages: Vec<Value>,
    pub tools: Option<Arc<ToolSet>>,
    pub add_generation_prompt: bool,
}

/// A conversation ready for the engine.
pub struct Prepared {
    pub ids: Vec<u32>,
    pub params: SamplingParams,
}

/// The prompt of `conv`: messages (and tools) through the chat template, or with the tools and
/// tool history written into the messages for a template that does not render them. Unless
/// `parse_special` (`--parse-special-tokens-in-messages`), special tokens' texts in the
/// messages and tools are escaped, so that [`encode`] reads them as plain text.
pub fn render(
    tok: &Tokenizer,
    conv: &Conversation,
    parse_special: bool,
) -> Result<String, ApiError> {
    let escape = |list: &[Value]| {
        let mut list = list.to_vec();
        if !parse_special {
            list.iter_mut().for_each(|v| tok.escape_specials_in(v));
        }
        list
    };
    let messages = escape(&conv.messages);
    let shown = conv
        .tools
        .as_deref()
        .and_then(ToolSet::for_prompt)
        .map(escape);
    let shown = shown.as_deref();
    let rendered = if tok.template_uses_tools() {
        tok.apply_chat_template_with_tools(&messages, shown, conv.add_generation_prompt)
    } else {
        let messages = tools::inline_tools(messages, shown);
        tok.apply_chat_template(&messages, conv.add_generation_prompt)
    };
    rendered.map_err(|e| ApiError::bad_request("messages", e.to_string()))
}

/// The tokens of a rendered prompt: the template's markup as control tokens, escaped content
/// as text.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    tok.encode_chat(text)
        .map_err(|e| ApiError::bad_request("messages", e.to_string()))
}

/// The prompt's tokens and the sampling parameters, with a forced tool call's constraint.
pub fn prepare(
    tok: &Tokenizer,
    conv: &Conversation,
    mut params: SamplingParams,
    parse_special: bool,
) -> Result<Prepared, ApiError> {
    let text = render(tok, conv, parse_special)?;
    let ids = encode(tok, &text)?;
    if let Some(schema) = conv.tools.as_ref().and_then(|t| t.forced_schema()) {
        if sglang::engine::constraint_spec(&params).is_some() {
            return Err(ApiError::bad_request(
                "tool_choice",
                "`tool_choice` that forces a call cannot be combined with a response format, `regex` or `ebnf`",
            ));
        }
        params.json_schema = Some(schema);
    }
    Ok(Prepared { ids, params })
}

/// The `--reasoning-parser` names this server knows.
pub fn reasoning_parser_names() -> Vec<String> {
    reasoning_parser::ParserFactory::new().list_parsers()
}

/// A fresh reasoning parser (`None`: the server splits no reasoning off).
pub fn reasoning_parser(name: Option<&str>) -> Option<Box<dyn ReasoningParser>> {
    reasoning_parser::ParserFactory::new()
        .registry()
        .create_parser(name?)
}

/// How a turn ended, in terms every protocol maps to its own.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnEnd {
    /// The model ended its answer (EOS, a stop token, a complete constraint).
    Stop,
    /// One of the request's stop strings.
    StopSequence(String),
    Length,
    ToolCalls,
    Abort,
}

/// A finished generation, split.
#[derive(Debug, Clone, Default)]
pub struct Turn {
    pub reasoning: Option<String>,
    pub content: String,
    pub calls: Vec<ToolCall>,
}

fn end_of(o: &Output, called: bool) -> TurnEnd {
    match o.finish.as_ref().map(|f| &f.reason) {
        _ if called => TurnEnd::ToolCalls,
        Some(FinishReason::Stop(Matched::Text(s))) => TurnEnd::StopSequence(s.clone()),
        Some(FinishReason::Stop(_)) => TurnEnd::Stop,
        Some(FinishReason::Length) => TurnEnd::Length,
        Some(FinishReason::Abort(_)) | None => TurnEnd::Abort,
    }
}

/// Reasoning, content and calls of a finished generation, and how it ended.
pub fn finished_turn(
    o: &Output,
    tools: Option<&ToolSet>,
    reasoning: Option<&str>,
) -> (Turn, TurnEnd) {
    let mut turn = Turn::default();
    let mut text = o.text.clone();
    if let Some(mut p) = reasoning_parser(reasoning) {
        if let Ok(r) = p.detect_and_parse_reasoning(&text) {
            turn.reasoning = Some(r.reasoning_text).filter(|t| !t.is_empty());
            text = r.normal_text;
        }
    }
    match tools.filter(|t| t.parses()) {
        Some(t) => {
            let (normal, calls) = t.parse(&text);
            if calls.is_empty() {
                turn.content = text;
            } else {
                turn.content = normal;
                turn.calls = calls;
            }
        }
        None => turn.content = text,
    }
    let end = end_of(o, !turn.calls.is_empty());
    (turn, end)
}

/// A piece of a turn as it streams.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Reasoning(String),
    Content(String),
    /// A tool call begins: its index among the turn's calls, its id and name, and the first
    /// piece of its arguments (JSON text, possibly empty).
    CallStart {
        index: usize,
        id: String,
        name: String,
        arguments: String,
    },
    /// More of a call's arguments.
    CallArguments {
        index: usize,
        arguments: String,
    },
}

/// Splits one generation's text into [`Delta`]s as it arrives.
pub struct TurnStream {
    reasoning: Option<Box<dyn ReasoningParser>>,
    tools: Option<(Arc<ToolSet>, Box<dyn ToolParser>)>,
    /// The calls begun so far: their ids, by index.
    call_ids: Vec<String>,
    reasoning_text: String,
}

impl TurnStream {
    pub fn new(tools: Option<&Arc<ToolSet>>, reasoning: Option<&str>) -> Self {
        Self {
            reasoning: reasoning_parser(reasoning),
            tools: tools
                .filter(|t| t.parses())
                .map(|t| (t.clone(), t.parser())),
            call_ids: Vec::new(),
            reasoning_text: String::new(),
        }
    }

    /// The deltas of the next piece of text (`last`: the generation ended after it).
    pub fn push(&mut self, text: &str, last: bool) -> Vec<Delta> {
        let mut out = Vec::new();
        let mut normal = text.to_string();
        if let Some(p) = self.reasoning.as_mut() {
            normal.clear();
            let mut take = |r: Result<reasoning_parser::ParserResult, _>| {
                if let Ok(r) = r {
                    if !r.reasoning_text.is_empty() {
                        out.push(Delta::Reasoning(r.reasoning_text));
                    }
                    normal.push_str(&r.normal_text);
                }
            };
            if !text.is_empty() {
                take(p.parse_reasoning_streaming_incremental(text));
            }
            if last {
                take(p.flush());
            }
        }
        for d in &out {
            if let Delta::Reasoning(r) = d {
                self.reasoning_text.push_str(r);
            }
        }
        let Some((set, parser)) = self.tools.as_mut() else {
            if !normal.is_empty() {
                out.push(Delta::Content(normal));
            }
            return out;
        };
        let mut content = String::new();
        let mut items = Vec::new();
        if !normal.is_empty() {
            if let Some(Ok(r)) = tools::ready(parser.parse_incremental(&normal, set.tools())) {
                content.push_str(&r.normal_text);
                items.extend(r.calls);
            }
        }
        if last {
            items.extend(parser.get_unstreamed_tool_args().unwrap_or_default());
            content.push_str(&parser.take_unstreamed_normal_text());
        }
        if !content.is_empty() {
            out.push(Delta::Content(content));
        }
        for item in items {
            let index = item.tool_index;
            match item.name {
                Some(name) => {
                    while self.call_ids.len() <= index {
                        self.call_ids.push(tools::call_id());
                    }
                    out.push(Delta::CallStart {
                        index,
                        id: self.call_ids[index].clone(),
                        name,
                        arguments: item.parameters,
                    });
                }
                None if item.parameters.is_empty() => {}
                None => out.push(Delta::CallArguments {
                    index,
                    arguments: item.parameters,
                }),
            }
        }
        out
    }

    /// An engine event of this turn's request: recorded into `output`, its deltas returned
    /// with whether it was the last (`None`: the request failed; the stream reports that).
    pub fn event(&mut self, output: &mut Output, event: &Event) -> Option<(Vec<Delta>, bool)> {
        match event {
            Event::Chunk(c) => {
                output.push(c.clone());
                Some((self.push(&c.text, false), false))
            }
            Event::Finished(f) => {
                output.finish = Some(f.clone());
                Some((self.push("", true), true))
            }
            Event::Failed(_) => None,
        }
    }

    /// Whether the turn has called a tool so far.
    pub fn called(&self) -> bool {
        !self.call_ids.is_empty()
    }

    /// All the reasoning so far.
    pub fn reasoning(&self) -> &str {
        &self.reasoning_text
    }

    /// How the generation `o` ended, given the calls streamed.
    pub fn end(&self, o: &Output) -> TurnEnd {
        end_of(o, self.called())
    }
}

/// Tokens of `text` (reasoning tokens in usage: counted on the reasoning text, which the
/// model produced as tokens with the same tokenizer).
pub fn count(tok: &Tokenizer, text: &str) -> usize {
    if text.is_empty() {
        return 0;
    }
    tok.encode_chat(text).map_or(0, |ids| ids.len())
}
