//! Tokenizer routes (`/tokenize`, `/detokenize`), information (`/get_model_info`,
//! `/get_server_info`, `/config`) and `/flush_cache`. Keys are never printed: `/config` and
//! `/get_server_info` show whether a key is set, not the key.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use sglang::tokenizer::Tokenizer;

use super::openai::{chat_messages, ChatMessageIn};
use super::parse::{parse_ids, parse_json};
use super::turn::{self, Conversation};
use super::{blocking, ok_json, ApiError, AppState, Body};
use sglang::engine::{GenerateRequest, SubmitError};
use sglang::sampling::SamplingParams;

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
    messages: Option<Vec<ChatMessageIn>>,
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
}

/// `{"prompt" | "text" | "messages"}` -> `{"tokens", "count", "max_model_len"}` (vLLM's shape).
/// Messages are checked and templated as chat completions does, so the count is the prompt
/// chat would run.
pub async fn tokenize(state: &Arc<AppState>, body: Bytes) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let (state2, tok) = (state.clone(), engine.tokenizer().clone());
    let ids = blocking(move || tokenize_body(&state2, &tok, &body)).await?;
    Ok(ok_json(
        &json!({"tokens": ids, "count": ids.len(), "max_model_len": engine.info().context_length}),
    ))
}

fn tokenize_body(state: &AppState, tok: &Tokenizer, body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let b: TokenizeBody = parse_json(body)?;
    let _ = b.model;
    match (b.prompt.or(b.text), b.messages) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "prompt",
            "give either `prompt` or `messages`, not both",
        )),
        (Some(t), None) => tok
            .encode(&t, b.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::bad_request("prompt", e.to_string())),
        (None, Some(m)) => {
            let conv = Conversation {
                messages: chat_messages(&m)?,
                tools: None,
                add_generation_prompt: b.add_generation_prompt.unwrap_or(true),
            };
            let text = turn::render(tok, &conv, state.args.parse_special_tokens_in_messages)?;
            let mut ids = turn::encode(tok, &text)?;
            if b.add_special_tokens == Some(true) {
                // the post-processor's tokens (a BOS) around the templated prompt
                let bare = tok.encode("", true).unwrap_or_default();
                ids.splice(0..0, bare);
            }
            Ok(ids)
        }
        (None, None) => Err(ApiError::bad_request(
            "prompt",
            "`prompt` (or `messages`) is required",
        )),
    }
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
pub async fn detokenize(state: &Arc<AppState>, body: Bytes) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let tok = engine.tokenizer().clone();
    // a long id list decodes on the blocking pool
    let text = blocking(move || {
        let b: DetokenizeBody = parse_json(&body)?;
        let _ = b.model;
        let ids = parse_ids(&b.tokens, "tokens")?;
        tok.decode(&ids, b.skip_special_tokens.unwrap_or(false))
            .map_err(|e| ApiError::bad_request("tokens", e.to_string()))
    })
    .await?;
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
        "load_format": e.load_format.name(),
        "quantization": e.quantization.map(|q| q.name().to_lowercase()),
        "kv_cache_dtype": e.kv_cache_dtype.name(),
        "dtype": e.dtype.name(),
        "page_size": e.page_size,
        "max_total_tokens": e.max_total_tokens,
        "mem_fraction_static": e.mem_fraction_static,
        "max_running_requests": e.max_running_requests,
        "chunked_prefill_size": e.chunked_prefill_size,
        "context_length": e.context_length,
        "threads": e.threads,
        "tp_size": e.tp_size,
        "world_size": e.world_size,
        "rank": e.rank,
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
        "max_sequences_per_request": a.max_sequences_per_request,
        "timeout_keep_alive": a.timeout_keep_alive,
        "header_read_timeout": a.header_read_timeout,
        "body_read_timeout": a.body_read_timeout,
        "max_connections": state.connections.cap(),
        "parse_special_tokens_in_messages": a.parse_special_tokens_in_messages,
        "incremental_streaming_output": a.incremental_streaming_output,
        "log_level": a.log_level,
        "log_file": a.log_file.as_ref().map(|p| p.display().to_string()),
    })
}

pub fn config(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    Ok(ok_json(&config_json(state)))
}

pub fn server_info(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    let mut v = config_json(state);
    v["version"] = json!(sglang::VERSION);
    v["cuda_build"] = json!(sglang::CUDA_BUILD);
    v["uptime_seconds"] = json!(state.started.elapsed().as_secs_f64());
    v["draining"] = json!(state.draining.load(Ordering::Acquire));
    if let Some(engine) = state.engine.get() {
        let info = engine.info();
        let s = engine.stats();
        v["backend"] = json!(info.backend);
        v["load_format"] = json!(info.engine_config.resolved_load_format().name());
        let dtype = if info.backend == "cpu" {
            v["cpu_kernels"] = json!(sglang::backend::cpu::kernel_set(info.engine_config.dtype));
            sglang::backend::cpu::resolve_dtype(info.engine_config.dtype)
        } else {
            sglang::config::Dtype::Bfloat16
        };
        // what `auto` stands for on this backend (/config shows the option as given)
        v["dtype"] = json!(dtype.name());
        v["context_length_effective"] = json!(info.context_length);
        v["kv_cache"] = json!({
            "capacity_tokens": info.kv_capacity_tokens,
            "bytes_per_token": info.kv_bytes_per_token,
            "size_bytes": info.kv_capacity_tokens * info.kv_bytes_per_token,
            "page_size": info.page_size,
            "used_tokens": s.kv_used_tokens,
            "evictable_tokens": s.kv_evictable_tokens,
            "available_tokens": s.kv_available_tokens,
        });
        v["weight_bytes"] = json!(info.weight_bytes);
        v["cuda_graph_bs"] = json!(info.cuda_graph_sizes);
        // SGLang's name; also true where the backend runs each step to its end (the CPU)
        v["disable_overlap_schedule"] = json!(!info.overlap_schedule);
        v["tensor_parallel"] = json!({
            "ranks": info.tp_size,
            "ranks_ready": s.tp_ranks_ready,
            "error": engine.fatal_error(),
        });
        v["stats"] = json!({
            "running": s.running,
            "waiting": s.waiting,
            "steps": s.steps,
            "forward_seconds": s.forward_nanos as f64 / 1e9,
            "decode_steps": s.decode_steps,
            "decode_forward_seconds": s.decode_forward_nanos as f64 / 1e9,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "retractions": s.retractions,
            "finished": s.finished,
            "aborted": s.aborted,
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

/// Hex sha256 of a file, read in 1 MiB blocks.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `POST /admin/checkpoint`: the identity of the served model: its directory, config and the
/// sha256 of every file in it (the weights themselves are not sent).
pub async fn checkpoint(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    let dir = std::fs::canonicalize(&info.engine_config.model_path)
        .unwrap_or_else(|_| info.engine_config.model_path.clone());
    let load_format = info.engine_config.resolved_load_format().name();
    let served = state.served_model_name.clone();
    let files = tokio::task::spawn_blocking(move || -> Result<(Value, Value), String> {
        let mut files = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_type().map(|t| t.is_file()).unwrap_or(false)
                    && !e.file_name().to_string_lossy().starts_with('.')
            })
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
            let sha = sha256_file(&path).map_err(|err| format!("{}: {err}", path.display()))?;
            files.push(
                json!({"name": e.file_name().to_string_lossy(), "bytes": bytes, "sha256": sha}),
            );
        }
        let config: Value = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        Ok((
            json!({"model_path": dir.display().to_string(), "files": files}),
            config,
        ))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::internal)?;
    let (mut body, config) = files;
    body["checkpoint_path"] = body["model_path"].clone();
    body["config"] = config;
    body["served_model_name"] = json!(served);
    body["load_format"] = json!(load_format);
    body["version"] = json!(sglang::VERSION);
    body["created"] = json!(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()));
    Ok(ok_json(&body))
}

/// `GET /admin/cache/state`: the token prefixes the radix cache holds.
pub async fn cache_state(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    let prefixes = engine
        .cached_prefixes()
        .await
        .map_err(|_| ApiError::unavailable("the engine stopped"))?;
    let tokens: usize = prefixes.iter().map(|p| p.len()).sum();
    Ok(ok_json(&json!({
        "enable_radix_cache": engine.info().engine_config.enable_radix_cache,
        "page_size": engine.info().page_size,
        "num_prefixes": prefixes.len(),
        "cached_tokens": tokens,
        "prefixes": prefixes,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmBody {
    prefixes: Vec<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    page_size: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    enable_radix_cache: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    num_prefixes: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    cached_tokens: Option<usize>,
}

/// `POST /admin/cache/state`: re-warms the radix cache by prefilling each prefix (one token is
/// generated and discarded). Accepts what `GET` returned.
pub async fn warm_cache(state: &Arc<AppState>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let engine = state.engine()?;
    if !engine.info().engine_config.enable_radix_cache {
        return Err(ApiError::bad_request(
            "prefixes",
            "the radix cache is disabled on this server",
        ));
    }
    let b: WarmBody = parse_json(body)?;
    let mut prefixes = Vec::with_capacity(b.prefixes.len());
    for (i, p) in b.prefixes.iter().enumerate() {
        let ids = parse_ids(p, &format!("prefixes[{i}]"))?;
        let req = GenerateRequest {
            input_ids: ids,
            params: SamplingParams::greedy(1),
            ..Default::default()
        };
        engine
            .validate(&req)
            .map_err(|e| ApiError::bad_request(&format!("prefixes[{i}]"), e.to_string()))?;
        prefixes.push(req);
    }
    let mut warmed = 0usize;
    let mut tokens = 0usize;
    // in waves, so a large cache does not overrun the request queue
    for wave in prefixes.chunks(32) {
        let mut streams = Vec::new();
        for req in wave {
            tokens += req.input_ids.len();
            loop {
                match engine.submit(req.clone()) {
                    Ok(s) => break streams.push(s),
                    Err(SubmitError::QueueFull(_)) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for mut s in streams {
            while let Some(ev) = s.next().await {
                match ev {
                    sglang::engine::Event::Finished(_) => {
                        warmed += 1;
                        break;
                    }
                    sglang::engine::Event::Failed(e) => return Err(e.into()),
                    sglang::engine::Event::Chunk(_) => {}
                }
            }
        }
    }
    Ok(ok_json(&json!({"warmed": warmed, "prefix_tokens": tokens})))
}
