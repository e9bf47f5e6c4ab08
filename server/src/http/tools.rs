//! Tool calling for every chat-style protocol (chat completions, Responses, Messages): the
//! request's tools, tool choice and parallel calls (in chat completions' shapes, into which the
//! other protocols translate theirs), how tools and tool history reach the model, and how calls
//! come back.
//!
//! - **Prompt.** Where the model's chat template uses a `tools` variable, the tools and the
//!   history (assistant `tool_calls`, `role: "tool"` results) go to the template as they are.
//!   Otherwise the tools are described in the system message in the Hermes / Qwen 2.5 form
//!   ([`TOOLS_PROMPT_HEAD`]: function signatures inside `<tools></tools>`, calls expected as
//!   `<tool_call>{"name": ..., "arguments": ...}</tool_call>`), earlier calls are written
//!   back in that form and tool results are user turns inside `<tool_response></tool_response>`.
//! - **`"required"` or a named function.** The output is constrained (a JSON schema through
//!   the engine's structured output) to a JSON array of `{"name", "parameters"}` objects
//!   whose parameters validate against the declared schema: one call, or up to eight with
//!   `parallel_tool_calls`. This works with any model, however small.
//! - **`"auto"`.** The output is free; calls are parsed from it by the parser chosen with
//!   `--tool-call-parser` (the SGLang gateway's `tool-parser` crate: `hermes` (default),
//!   `llama`, `mistral`, `pythonic`, ...). Text outside calls stays `content`.
//!
//! The `tool-parser` crate's parsers are `async` but never wait on anything; [`ready`] polls
//! them once, so the synchronous stream formatter can use them.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use openai_protocol::common::Tool;
use serde_json::{json, Value};
use tool_parser::{JsonParser, ParserFactory, ToolCall, ToolParser};

use crate::http::jobs::new_id;
use crate::http::ApiError;

/// What `tool_choice` allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The request's tools and what it asks of them.
pub struct ToolSet {
    tools: Vec<Tool>,
    /// The tools as the request gave them (what the prompt shows).
    raw: Vec<Value>,
    pub choice: Choice,
    parallel: bool,
    /// The `--tool-call-parser` for `"auto"`.
    parser: String,
}

/// The system prompt's tool section for templates that do not render tools themselves (the
/// wording of Qwen 2.5's template, which Hermes-style models follow); the tools' JSON, one per
/// line, goes between the two parts.
pub const TOOLS_PROMPT_HEAD: &str = "# Tools\n\nYou may call one or more functions to \
assist with the user query.\n\nYou are provided with function signatures within <tools></tools> \
XML tags:\n<tools>";
const TOOLS_PROMPT_TAIL: &str = "</tools>\n\nFor each function call, return a json object with \
function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// Most calls a forced answer may hold with `parallel_tool_calls`.
pub const MAX_PARALLEL_CALLS: usize = 8;

/// The `--tool-call-parser` names this server knows (the `tool-parser` crate's, with `hermes`
/// for its Qwen parser, which reads the Hermes `<tool_call>` form).
pub fn parser_names() -> Vec<String> {
    let mut names = ParserFactory::new().list_parsers();
    names.push("hermes".into());
    names.sort();
    names
}

fn create_parser(name: &str) -> Option<Box<dyn ToolParser>> {
    let name = if name == "hermes" { "qwen" } else { name };
    ParserFactory::new().registry().create_parser(name)
}

/// The output of a future that never waits (the tool parsers): polled once.
pub fn ready<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn bad(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(field, format!("`{field}` {message}"))
}

impl ToolSet {
    /// The tools of a request (`None` when it declares none and forces none).
    pub fn from_request(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
        parser: &str,
    ) -> Result<Option<Self>, ApiError> {
        let raw: Vec<Value> = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(bad("tools", "must be a list of tools")),
        };
        let tools: Vec<Tool> = raw
            .iter()
            .enumerate()
            .map(|(i, t)| parse_tool(i, t))
            .collect::<Result<_, _>>()?;
        let choice = match tool_choice {
            None | Some(Value::Null) if tools.is_empty() => Choice::None,
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(bad(
                        "tool_choice",
                        format!("{other:?} is not one of none, auto, required"),
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        bad(
                            "tool_choice",
                            "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                Choice::Named(name.to_string())
            }
        };
        if tools.is_empty() {
            return match choice {
                Choice::None => Ok(None),
                _ => Err(bad("tool_choice", "needs `tools`")),
            };
        }
        if let Choice::Named(name) = &choice {
            if !tools.iter().any(|t| &t.function.name == name) {
                return Err(bad(
                    "tool_choice.function.name",
                    format!("{name:?} is not one of the request's tools"),
                ));
            }
        }
        Ok(Some(Self {
            tools,
            raw,
            choice,
            parallel: parallel.unwrap_or(true),
            parser: parser.to_string(),
        }))
    }

    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    /// Whether outputs are read for calls (every choice but `"none"`).
    pub fn parses(&self) -> bool {
        self.choice != Choice::None
    }

    /// The tools as the prompt shows them (`None` with `tool_choice: "none"`).
    pub fn for_prompt(&self) -> Option<&[Value]> {
        (self.choice != Choice::None).then_some(&self.raw[..])
    }

    /// The JSON schema forcing calls (`"required"`, a named function): an array of
    /// `{"name", "parameters"}` objects, at least one, one only without `parallel_tool_calls`
    /// or for a named function, at most [`MAX_PARALLEL_CALLS`] (small models repeat a call
    /// until the tokens run out otherwise).
    pub fn forced_schema(&self) -> Option<String> {
        let (candidates, one): (Vec<&Tool>, bool) = match &self.choice {
            Choice::None | Choice::Auto => return None,
            Choice::Required => (self.tools.iter().collect(), !self.parallel),
            Choice::Named(n) => (
                self.tools
                    .iter()
                    .filter(|t| &t.function.name == n)
                    .collect(),
                true,
            ),
        };
        let calls: Vec<Value> = candidates
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.function.name},
                        "parameters": parameters_schema(&t.function.parameters),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let most = if one { 1 } else { MAX_PARALLEL_CALLS };
        let schema =
            json!({"type": "array", "minItems": 1, "maxItems": most, "items": {"anyOf": calls}});
        Some(schema.to_string())
    }

    /// A fresh parser for one choice's output.
    pub fn parser(&self) -> Box<dyn ToolParser> {
        match self.choice {
            Choice::Required | Choice::Named(_) => Box::new(JsonParser::new()),
            _ => create_parser(&self.parser).unwrap_or_else(|| Box::new(JsonParser::new())),
        }
    }

    /// The calls in a finished output and the text around them.
    pub fn parse(&self, text: &str) -> (String, Vec<ToolCall>) {
        let parser = self.parser();
        match ready(parser.parse_complete_with_tools(text, &self.tools)) {
            Some(Ok((normal, calls))) => (normal, calls),
            _ => (text.to_string(), Vec::new()),
        }
    }
}

/// A function's parameters as a schema (an empty one: any object).
fn parameters_schema(p: &Value) -> Value {
    match p {
        Value::Object(o) if !o.is_empty() => p.clone(),
        _ => json!({"type": "object"}),
    }
}

/// One entry of `tools`, checked: a function with a name OpenAI accepts and object
/// parameters.
fn parse_tool(i: usize, v: &Value) -> Result<Tool, ApiError> {
    let field = format!("tools[{i}]");
    if v.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(&format!("{field}.type"), "must be \"function\""));
    }
    let tool: Tool = serde_json::from_value(v.clone()).map_err(|e| bad(&field, e))?;
    let name = &tool.function.name;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(bad(
            &format!("{field}.function.name"),
            format!("{name:?} must be 1 to 64 letters, digits, underscores or dashes"),
        ));
    }
    let p = &tool.function.parameters;
    if !(p.is_object() && p.get("type").is_none_or(|t| t == "object")) {
        return Err(bad(
            &format!("{field}.function.parameters"),
            "must be a JSON schema of an object",
        ));
    }
    Ok(tool)
}

/// A call as the API returns it: `{"id", "type": "function", "function": {"name",
/// "arguments"}}`.
pub fn call_json(call: &ToolCall) -> Value {
    json!({
        "id": call_id(),
        "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    })
}

pub fn call_id() -> String {
    format!("call_{}", &new_id()[..24])
}

/// A chat message as the template sees it (`role`, `content`, and `tool_calls` /
/// `tool_call_id` where there are some); `index` names it in errors.
pub fn message_value(
    index: usize,
    role: &str,
    content: String,
    tool_calls: Option<&Value>,
    tool_call_id: Option<&str>,
) -> Result<Value, ApiError> {
    let mut m = json!({"role": role, "content": content});
    if let Some(calls) = tool_calls.filter(|c| !c.is_null()) {
        let field = format!("messages[{index}].tool_calls");
        if role != "assistant" {
            return Err(bad(&field, "belong to assistant messages"));
        }
        let list = calls
            .as_array()
            .ok_or_else(|| bad(&field, "must be a list"))?;
        let mut out = Vec::with_capacity(list.len());
        for (j, c) in list.iter().enumerate() {
            let f = c.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            let args = f.and_then(|f| f.get("arguments"));
            let Some(name) = name else {
                return Err(bad(&format!("{field}[{j}].function.name"), "is required"));
            };
            // templates read arguments as an object; OpenAI sends a JSON string
            let arguments = match args {
                Some(Value::String(s)) => {
                    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
                }
                Some(v @ Value::Object(_)) => v.clone(),
                None | Some(Value::Null) => json!({}),
                Some(_) => {
                    return Err(bad(
                        &format!("{field}[{j}].function.arguments"),
                        "must be a JSON string",
                    ))
                }
            };
            out.push(json!({
                "id": c.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }));
        }
        m["tool_calls"] = Value::Array(out);
    }
    if let Some(id) = tool_call_id {
        m["tool_call_id"] = json!(id);
    }
    Ok(m)
}

/// `messages` for a template that does not render tools: the tools in the system message,
/// earlier calls as `<tool_call>` blocks, tool results as `<tool_response>` user turns.
pub fn inline_tools(messages: Vec<Value>, tools: Option<&[Value]>) -> Vec<Value> {
    let mut out: Vec<Value> = messages
        .into_iter()
        .map(|mut m| {
            if m["role"] == "tool" {
                let content = m["content"].as_str().unwrap_or_default();
                return json!({
                    "role": "user",
                    "content": format!("<tool_response>\n{content}\n</tool_response>"),
                });
            }
            if let Some(calls) = m.get("tool_calls").and_then(Value::as_array).cloned() {
                let mut content = m["content"].as_str().unwrap_or_default().to_string();
                for c in calls {
                    let call = json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]});
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
                }
                m = json!({"role": "assistant", "content": content});
            }
            m
        })
        .collect();
    if let Some(tools) = tools {
        let lines: Vec<String> = tools.iter().map(Value::to_string).collect();
        let section = format!(
            "{TOOLS_PROMPT_HEAD}\n{}\n{TOOLS_PROMPT_TAIL}",
            lines.join("\n")
        );
        match out.first_mut().filter(|m| m["role"] == "system") {
            Some(system) => {
                let text = system["content"].as_str().unwrap_or_default();
                system["content"] = json!(format!("{text}\n\n{section}"));
            }
            None => out.insert(0, json!({"role": "system", "content": section})),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}])
    }

    #[test]
    fn hermes_calls_are_parsed_from_free_text() {
        let tools = weather();
        let set = ToolSet::from_request(Some(&tools), None, None, "hermes")
            .unwrap()
            .unwrap();
        assert_eq!(set.choice, Choice::Auto);
        // a recorded Hermes-style answer
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (normal, calls) = set.parse(text);
        assert_eq!(normal.trim(), "Let me check.");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
    }

    #[test]
    fn forced_calls_are_a_constrained_array() {
        let tools = weather();
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let set = ToolSet::from_request(Some(&tools), Some(&named), Some(true), "hermes")
            .unwrap()
            .unwrap();
        let schema: Value = serde_json::from_str(&set.forced_schema().unwrap()).unwrap();
        assert_eq!(schema["maxItems"], 1);
        assert_eq!(
            schema["items"]["anyOf"][0]["properties"]["name"]["const"],
            "get_weather"
        );
        let (_, calls) = set.parse(r#"[{"name": "get_weather", "parameters": {"city": "Oslo"}}]"#);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.arguments, r#"{"city":"Oslo"}"#);
    }

    #[test]
    fn bad_tools_name_their_field() {
        let check = |tools: Value, choice: Option<Value>| {
            ToolSet::from_request(Some(&tools), choice.as_ref(), None, "hermes")
                .err()
                .unwrap()
                .param
                .unwrap()
        };
        assert_eq!(check(json!([{"type": "retrieval"}]), None), "tools[0].type");
        assert_eq!(
            check(
                json!([{"type": "function", "function": {"name": "has space"}}]),
                None
            ),
            "tools[0].function.name"
        );
        assert_eq!(
            check(
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
                None
            ),
            "tools[0].function.parameters"
        );
        assert_eq!(
            check(
                weather(),
                Some(json!({"type": "function", "function": {"name": "nope"}}))
            ),
            "tool_choice.function.name"
        );
        assert_eq!(check(weather(), Some(json!("sometimes"))), "tool_choice");
        let none: Option<ToolSet> =
            ToolSet::from_request(None, Some(&json!("none")), None, "hermes").unwrap();
        assert!(none.is_none());
        let e = ToolSet::from_request(None, Some(&json!("required")), None, "hermes")
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn templates_without_tools_get_them_inline() {
        let msgs = vec![
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
            json!({"role": "tool", "content": "18 C", "tool_call_id": "call_1"}),
        ];
        let tools = vec![weather()[0].clone()];
        let out = inline_tools(msgs, Some(&tools));
        assert_eq!(out[0]["role"], "system");
        assert!(out[0]["content"]
            .as_str()
            .unwrap()
            .contains("\"get_weather\""));
        assert!(out[2]["content"]
            .as_str()
            .unwrap()
            .starts_with("<tool_call>\n{"));
        assert_eq!(out[3]["role"], "user");
        assert_eq!(out[3]["content"], "<tool_response>\n18 C\n</tool_response>");
    }
}
