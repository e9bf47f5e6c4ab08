//! The OpenAI API: `POST /v1/completions` ([`completions()`]), `POST /v1/chat/completions`
//! ([`chat`]), both as JSON or SSE ending with `data: [DONE]` (`n`, `stop`, `seed`, `logprobs`,
//! `stream_options.include_usage`, `usage` with `prompt_tokens_details.cached_tokens`), and
//! `GET /v1/models`. This module holds what the two share: the sampling fields, the choices of
//! a request, usage, finish reasons and the envelope of streamed chunks.
//!
//! Besides OpenAI's fields, the sampling extensions of vLLM and SGLang are accepted: `top_k`,
//! `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`,
//! `min_tokens`, `no_stop_trim`, and SGLang's `regex` and `ebnf` constraints. Fields this server
//! cannot honour (logit_bias, images, `suffix`, `best_of` > `n`) are refused with 400 rather
//! than ignored. The `model` field is not checked, as in SGLang.

mod chat;
mod completions;
mod responses;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::engine::{FinishReason, GenerateRequest, Output};
use sglang::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use sglang::tokenizer::Tokenizer;

use super::{ok_json, ApiError, AppState, Body};

pub use chat::chat_completions;
pub(crate) use chat::{chat_messages, ChatMessageIn};
pub use completions::completions;
pub use responses::{
    create as create_response, delete as delete_response, get as get_response, ResponseStore,
};

#[derive(Debug, Default, Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Common {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    pub(super) stream: bool,
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
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema", ...}}`
    #[serde(default)]
    response_format: Option<Value>,
    // SGLang's structured-output extensions
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    ebnf: Option<String>,
}

impl Common {
    pub(super) fn n(&self) -> Result<usize, ApiError> {
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

    pub(super) fn params(&self, max_tokens: usize) -> Result<SamplingParams, ApiError> {
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
            json_schema: self.json_schema()?,
            regex: self.regex.clone(),
            ebnf: self.ebnf.clone(),
        })
    }

    /// The JSON schema `response_format` asks for: `json_object` is any object.
    fn json_schema(&self) -> Result<Option<String>, ApiError> {
        let Some(rf) = self.response_format.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let bad = |field: &str, msg: &str| ApiError::bad_request(field, format!("`{field}` {msg}"));
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(r#"{"type": "object"}"#.to_string())),
            Some("json_schema") => {
                let spec = rf
                    .get("json_schema")
                    .filter(|v| v.is_object())
                    .ok_or_else(|| {
                        bad(
                            "response_format.json_schema",
                            "must be an object with a `schema`",
                        )
                    })?;
                let schema = spec
                    .get("schema")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"}));
                Ok(Some(schema.to_string()))
            }
            Some(other) => Err(bad(
                "response_format.type",
                &format!("{other:?} is not supported (text, json_object, json_schema)"),
            )),
            None => Err(bad("response_format.type", "is required")),
        }
    }

    pub(super) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// An engine error in the OpenAI API's own field names.
pub(super) fn api_names(e: ApiError) -> ApiError {
    e.rename_param("max_new_tokens", "max_tokens")
        .rename_param("min_new_tokens", "min_tokens")
        .rename_param("json_schema", "response_format")
}

/// `n` requests for one prompt (seeded choices differ: seed + choice index);
/// `prompt_logprob`: also the prompt's logprobs (completions with `echo` and `logprobs`).
pub(super) fn choices(
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

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn usage_json(prompt_tokens: usize, outputs: &[Output]) -> Value {
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

pub(super) fn finish_reason(o: &Output) -> Value {
    match o.finish.as_ref().map(|f| &f.reason) {
        Some(FinishReason::Stop(_)) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        Some(FinishReason::Abort(_)) => json!("abort"),
        None => Value::Null,
    }
}

pub(super) fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

pub(super) fn check_top(n: usize, field: &str) -> Result<(), ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad_request(
            field,
            format!("`{field}` must be <= {MAX_TOP_LOGPROBS}, got {n}"),
        ));
    }
    Ok(())
}

/// What every streamed chunk of a response shares: its id, object type, creation time and
/// model, and whether usage is reported (null on each chunk, then a final usage chunk).
pub(super) struct ChunkHead {
    pub(super) id: String,
    model: String,
    object: &'static str,
    created: u64,
    include_usage: bool,
}

impl ChunkHead {
    pub(super) fn new(id: String, model: String, object: &'static str, common: &Common) -> Self {
        Self {
            id,
            model,
            object,
            created: now_secs(),
            include_usage: common.include_usage(),
        }
    }

    /// One chunk carrying `choice`.
    pub(super) fn chunk(&self, choice: Value) -> String {
        let mut v = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    /// The final usage chunk, when asked for.
    pub(super) fn usage(&self, prompt_tokens: usize, outputs: &[Output]) -> Vec<String> {
        self.usage_value(usage_json(prompt_tokens, outputs))
    }

    /// The final chunk carrying `usage`, when asked for.
    pub(super) fn usage_value(&self, usage: Value) -> Vec<String> {
        if !self.include_usage {
            return Vec::new();
        }
        let v = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [], "usage": usage});
        vec![v.to_string()]
    }
}

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
