//! Tokenizer routes (`/tokenize`, `/detokenize`), information (`/get_model_info`,
//! `/get_server_info`, `/config`) and `/flush_cache`. Keys are never printed: `/config` and
//! `/get_server_info` show whether a key is set, not the key.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::tokenizer::ChatMessage;

use super::native::parse_ids;
use super::{ok_json, parse_json, ApiError, AppState, Body};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
}

/// `{"prompt" | "text" | "messages"}` -> `{"tokens", "count", "max_model_len"}` (vLLM's shape).
pub fn tokenize(state: &Arc<AppState>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let b: TokenizeBody = parse_json(body)?;
    let _ = b.model;
    let tok = engine.tokenizer();
    let ids = match (b.prompt.or(b.text), b.messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "prompt",
                "give either `prompt` or `messages`, not both",
            ))
        }
        (Some(t), None) => tok
            .encode(&t, b.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::bad_request("prompt", e.to_string()))?,
        (None, Some(m)) => {
            let text = tok
                .apply_chat_template(&m, b.add_generation_prompt.unwrap_or(true))
                .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
            tok.encode(&text, b.add_special_tokens.unwrap_or(false))
                .map_err(|e| ApiError::bad_request("messages", e.to_string()))?
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "prompt",
                "`prompt` (or `messages`) is required",
            ))
        }
    };
    Ok(ok_json(
        &json!({"tokens": ids, "count": ids.len(), "max_model_len": engine.info().context_length}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    #[serde(default)]
    model: Option<String>,
    tokens: Value,
    #[serde(default)]
    skip_special_tokens: Option<bool>,
}

/// `{"tokens": [ids]}` -> `{"prompt": text}` (vLLM's shape; also as `text`).
pub fn detokenize(state: &Arc<AppState>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let b: DetokenizeBody = parse_json(body)?;
    let _ = b.model;
    let ids = parse_ids(&b.tokens, "tokens")?;
    let text = engine
        .tokenizer()
        .decode(&ids, b.skip_special_tokens.unwrap_or(false))
        .map_err(|e| ApiError::bad_request("tokens", e.to_string()))?;
    Ok(ok_json(&json!({"prompt": text, "text": text})))
}

pub fn model_info(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    let m = &info.model_config;
    Ok(ok_json(&json!({
        "model_path": info.engine_config.model_path.display().to_string(),
        "tokenizer_path": info.engine_config.model_path.display().to_string(),
        "served_model_name": state.served_model_name,
        "is_generation": true,
        "architecture": "LlamaForCausalLM",
        "context_length": info.context_length,
        "vocab_size": m.vocab_size,
        "num_parameters": m.num_parameters(),
        "num_hidden_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "eos_token_ids": m.eos_token_ids,
        "has_chat_template": engine.tokenizer().chat_template().is_some(),
    })))
}

/// The effective configuration, keys redacted.
fn config_json(state: &AppState) -> Value {
    let a = &state.args;
    let e = &a.engine;
    let set = |k: &Option<String>| {
        if k.is_some() {
            "set (redacted)"
        } else {
            "not set"
        }
    };
    json!({
        "model_path": e.model_path.as_ref().map(|p| p.display().to_string()),
        "served_model_name": state.served_model_name,
        "device": format!("{:?}", e.device).to_lowercase(),
        "load_format": format!("{:?}", e.load_format).to_lowercase(),
        "page_size": e.page_size,
        "max_total_tokens": e.max_total_tokens,
        "mem_fraction_static": e.mem_fraction_static,
        "max_running_requests": e.max_running_requests,
        "chunked_prefill_size": e.chunked_prefill_size,
        "context_length": e.context_length,
        "threads": e.threads,
        "enable_radix_cache": state.engine.get().map(|h| h.info().engine_config.enable_radix_cache),
        "chat_template": e.chat_template.as_ref().map(|p| p.display().to_string()),
        "host": a.host,
        "port": a.port,
        "api_key": set(&a.api_key),
        "admin_api_key": set(&a.admin_api_key),
        "max_queued_requests": a.max_queued_requests,
        "request_timeout": a.request_timeout,
        "shutdown_timeout": a.shutdown_timeout,
        "health_generate_timeout": a.health_generate_timeout,
        "max_request_bytes": a.max_request_bytes,
        "log_level": a.log_level,
    })
}

pub fn config(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    Ok(ok_json(&config_json(state)))
}

pub fn server_info(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    let mut v = config_json(state);
    v["version"] = json!(sglang::VERSION);
    v["uptime_seconds"] = json!(state.started.elapsed().as_secs_f64());
    v["draining"] = json!(state.draining.load(Ordering::Acquire));
    if let Some(engine) = state.engine.get() {
        let info = engine.info();
        let s = engine.stats();
        v["backend"] = json!(info.backend);
        v["context_length_effective"] = json!(info.context_length);
        v["kv_cache"] = json!({
            "capacity_tokens": info.kv_capacity_tokens,
            "bytes_per_token": info.kv_bytes_per_token,
            "size_bytes": info.kv_capacity_tokens * info.kv_bytes_per_token,
            "page_size": info.page_size,
            "used_tokens": s.kv_used_tokens.load(Ordering::Relaxed),
            "evictable_tokens": s.kv_evictable_tokens.load(Ordering::Relaxed),
            "available_tokens": s.kv_available_tokens.load(Ordering::Relaxed),
        });
        v["weight_bytes"] = json!(info.weight_bytes);
        v["stats"] = json!({
            "running": s.running.load(Ordering::Relaxed),
            "waiting": s.waiting.load(Ordering::Relaxed),
            "steps": s.steps.load(Ordering::Relaxed),
            "forward_seconds": s.forward_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            "decode_steps": s.decode_steps.load(Ordering::Relaxed),
            "decode_forward_seconds": s.decode_forward_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            "prompt_tokens": s.prompt_tokens.load(Ordering::Relaxed),
            "generated_tokens": s.generated_tokens.load(Ordering::Relaxed),
            "retractions": s.retractions.load(Ordering::Relaxed),
            "finished": s.finished.load(Ordering::Relaxed),
            "aborted": s.aborted.load(Ordering::Relaxed),
        });
    }
    Ok(ok_json(&v))
}

pub async fn flush_cache(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let pages = engine
        .flush_cache()
        .await
        .map_err(|_| ApiError::unavailable("the engine stopped"))?;
    Ok(ok_json(
        &json!({"message": "Cache flushed.", "freed_pages": pages}),
    ))
}
