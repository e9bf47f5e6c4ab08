//! Command-line options. Every option is a flag and an `SGLANG_*` environment variable; the
//! flag wins. Invalid values stop start-up with a message naming the option.

use std::path::PathBuf;

use clap::Args;
use sglang::config::{default_model_path, Device, Dtype, EngineConfig, KvCacheDtype, LoadFormat};
use sglang::quant::QuantType;
use sglang::sampling::SamplingParams;

/// Options of the engine (shared by `serve` and `generate`).
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Model directory (Hugging Face layout: config.json, *.safetensors, tokenizer.json).
    /// Default: models/SmolLM2-135M-Instruct.
    #[arg(long, env = "SGLANG_MODEL_PATH")]
    pub model_path: Option<PathBuf>,

    /// auto (CUDA when built with it and a driver is present, else CPU), cpu or cuda.
    #[arg(long, env = "SGLANG_DEVICE", default_value = "auto")]
    pub device: Device,

    /// Where weights come from: safetensors; gguf (the model path is a .gguf file, or a
    /// directory with config.json, the tokenizer and one .gguf file; served in place,
    /// quantized); auto (gguf for a .gguf path or a directory with a .gguf and no
    /// safetensors, else safetensors); or dummy (random weights with the config's shapes, for
    /// benchmarks).
    #[arg(long, env = "SGLANG_LOAD_FORMAT", default_value = "auto")]
    pub load_format: LoadFormat,

    /// Quantize bf16/f16/f32 weights while loading: q8_0, q4_0, q4_1, q5_0 (llama.cpp's block
    /// formats, bit for bit as its reference quantizers write them), q4_k or q6_k (k-quants,
    /// by a simpler rule than llama-quantize's; rows that are not whole 256-value super-blocks
    /// take llama.cpp's fallback, q5_0 or q8_0). The linear layers and the embedding; norms
    /// stay as they are. Decode moves 2-4x fewer bytes per token; the memory held is the
    /// quantized size. Not with GGUF files or tensor parallelism.
    #[arg(long, env = "SGLANG_QUANTIZATION")]
    pub quantization: Option<QuantType>,

    /// The KV cache's element type: auto (the backend's own: f32 on the CPU, bf16 on CUDA),
    /// fp32, or bf16 (CPU: half the memory per cached token, so twice the tokens in the same
    /// pool; attention widens it to f32 as it reads).
    #[arg(long, env = "SGLANG_KV_CACHE_DTYPE", default_value = "auto")]
    pub kv_cache_dtype: KvCacheDtype,

    /// The matrix products' inputs: auto (the backend's own: bf16 on CUDA; on the CPU bf16
    /// where it multiplies bf16 natively, AVX-512 BF16, else f32), float32 (CPU), or bfloat16
    /// (CPU: the activations entering products with bf16 weights are rounded to bf16, as
    /// SGLang, vLLM and llama.cpp do, and multiplied with AVX-512 BF16 `vdpbf16ps` where the
    /// CPU has it; norms, attention and the residual stay f32)
    #[arg(long, env = "SGLANG_DTYPE", default_value = "auto")]
    pub dtype: Dtype,

    /// Tokens per KV-cache page.
    #[arg(long, env = "SGLANG_PAGE_SIZE", default_value_t = 16)]
    pub page_size: usize,

    /// KV pool size in tokens (CPU; default: a quarter of available memory, at most 65536).
    #[arg(long, env = "SGLANG_MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<usize>,

    /// Fraction of device memory for weights and KV cache (CUDA).
    #[arg(long, env = "SGLANG_MEM_FRACTION_STATIC", default_value_t = 0.9)]
    pub mem_fraction_static: f32,

    /// Most requests running at once.
    #[arg(long, env = "SGLANG_MAX_RUNNING_REQUESTS", default_value_t = 256)]
    pub max_running_requests: usize,

    /// Most prompt tokens prefilled in one step; longer prompts are split into chunks.
    #[arg(long, env = "SGLANG_CHUNKED_PREFILL_SIZE", default_value_t = 2048)]
    pub chunked_prefill_size: usize,

    /// Longest prompt + output in tokens (default: the model's max_position_embeddings).
    #[arg(long, env = "SGLANG_CONTEXT_LENGTH")]
    pub context_length: Option<usize>,

    /// CPU threads (default: all cores).
    #[arg(long, env = "SGLANG_THREADS")]
    pub threads: Option<usize>,

    /// Seed of --load-format dummy weights.
    #[arg(long, env = "SGLANG_DUMMY_SEED", default_value_t = 0)]
    pub dummy_seed: u64,

    /// Turn the radix prefix cache off (it is on by default; SGLANG_ENABLE_RADIX_CACHE=false
    /// does the same).
    #[arg(long)]
    pub disable_radix_cache: bool,

    /// Run every step eagerly: no CUDA graphs of the decode step (SGLANG_DISABLE_CUDA_GRAPH=1
    /// does the same).
    #[arg(long)]
    pub disable_cuda_graph: bool,

    /// Run each step to its end before planning the next: no overlap of the host's work on
    /// the next decode step with the GPU's on this one (SGLANG_DISABLE_OVERLAP_SCHEDULE=1 does
    /// the same).
    #[arg(long)]
    pub disable_overlap_schedule: bool,

    /// The largest decode batch replayed from a CUDA graph (larger batches run eagerly).
    #[arg(long, env = "SGLANG_CUDA_GRAPH_MAX_BS", default_value_t = 160)]
    pub cuda_graph_max_bs: usize,

    /// A Jinja chat template file that replaces the model's own.
    #[arg(long, env = "SGLANG_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,

    /// Tensor-parallel ranks on this machine (on the CPU, threads of this process sharing
    /// the work of each layer).
    #[arg(
        long,
        visible_alias = "tensor-parallel-size",
        env = "SGLANG_TP_SIZE",
        default_value_t = 1
    )]
    pub tp_size: usize,

    /// Processes of a multi-process tensor-parallel group, one rank each (1: this process
    /// alone). Rank 0 serves HTTP; the others run its steps.
    #[arg(long, env = "SGLANG_WORLD_SIZE", default_value_t = 1)]
    pub world_size: usize,

    /// This process's rank in a multi-process group (0 serves HTTP).
    #[arg(long, env = "SGLANG_RANK", default_value_t = 0)]
    pub rank: usize,

    /// Address of rank 0, where the other ranks join (required with --world-size > 1).
    #[arg(long, env = "SGLANG_MASTER_ADDR")]
    pub master_addr: Option<String>,

    /// Port on which rank 0 waits for the other ranks (closed once all have joined).
    #[arg(long, env = "SGLANG_MASTER_PORT", default_value_t = 23456)]
    pub master_port: u16,

    /// Seconds ranks wait for each other: to join at start-up, and inside a step. A rank that
    /// does not arrive in time stops the group with an error naming it.
    #[arg(long, env = "SGLANG_DIST_TIMEOUT", default_value_t = 300)]
    pub dist_timeout: u64,
}

/// Reads a boolean environment variable; a value that is not a boolean is an error naming it.
fn env_bool(name: &str) -> Result<Option<bool>, String> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Some(true)),
            "0" | "false" | "no" | "off" => Ok(Some(false)),
            "" => Ok(None),
            _ => Err(format!(
                "invalid environment variable `{name}`: {v:?} is not a boolean (true or false)"
            )),
        },
    }
}

impl EngineArgs {
    pub fn to_config(&self) -> Result<EngineConfig, String> {
        let mut c = EngineConfig::new(self.model_path.clone().unwrap_or_else(default_model_path));
        c.device = self.device;
        c.load_format = self.load_format;
        c.quantization = self.quantization;
        c.kv_cache_dtype = self.kv_cache_dtype;
        c.dtype = self.dtype;
        c.page_size = self.page_size;
        c.max_total_tokens = self.max_total_tokens;
        c.mem_fraction_static = self.mem_fraction_static;
        c.max_running_requests = self.max_running_requests;
        c.chunked_prefill_size = self.chunked_prefill_size;
        c.context_length = self.context_length;
        c.num_threads = self.threads;
        c.dummy_seed = self.dummy_seed;
        c.tp_size = self.tp_size;
        c.world_size = self.world_size;
        c.rank = self.rank;
        c.master_addr = self.master_addr.clone();
        c.master_port = self.master_port;
        c.dist_timeout_secs = self.dist_timeout;
        // the flag wins over the variable
        c.enable_radix_cache =
            !self.disable_radix_cache && env_bool("SGLANG_ENABLE_RADIX_CACHE")?.unwrap_or(true);
        c.disable_cuda_graph =
            self.disable_cuda_graph || env_bool("SGLANG_DISABLE_CUDA_GRAPH")?.unwrap_or(false);
        c.cuda_graph_max_bs = self.cuda_graph_max_bs;
        c.disable_overlap_schedule = self.disable_overlap_schedule
            || env_bool("SGLANG_DISABLE_OVERLAP_SCHEDULE")?.unwrap_or(false);
        if let Some(path) = &self.chat_template {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "invalid option `chat-template`: cannot read {}: {e}",
                    path.display()
                )
            })?;
            c.chat_template = Some(text);
        }
        c.validate().map_err(|e| e.to_string())?;
        // a GGUF file's metadata stands in for a missing config.json
        let gguf = c.resolved_load_format() == sglang::config::LoadFormat::Gguf;
        if !gguf && !c.model_dir().join("config.json").exists() {
            return Err(format!(
                "invalid option `model-path`: {} has no config.json and no .gguf file (prepare the default model with scripts/prepare-model.sh)",
                c.model_path.display()
            ));
        }
        Ok(c)
    }
}

/// Options of the HTTP server (`sglang-server [serve]`).
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// Address to listen on.
    #[arg(long, env = "SGLANG_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on.
    #[arg(long, env = "SGLANG_PORT", default_value_t = 30000)]
    pub port: u16,

    /// Bearer key required by the inference routes (never printed).
    #[arg(long, env = "SGLANG_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Bearer key required by /flush_cache, /config, /get_server_info and /admin/* (never
    /// printed). Without it those routes take --api-key.
    #[arg(long, env = "SGLANG_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,

    /// Requests allowed to wait for admission; beyond, 429 with Retry-After (default: no limit).
    #[arg(long, env = "SGLANG_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: Option<usize>,

    /// Model name reported by /v1/models and in responses (default: the directory name).
    #[arg(long, env = "SGLANG_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Seconds a request may take before it is aborted (default: no limit).
    #[arg(long, env = "SGLANG_REQUEST_TIMEOUT")]
    pub request_timeout: Option<f64>,

    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    #[arg(long, env = "SGLANG_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,

    /// Seconds /health_generate waits for its one-token generation.
    #[arg(long, env = "SGLANG_HEALTH_GENERATE_TIMEOUT", default_value_t = 20.0)]
    pub health_generate_timeout: f64,

    /// Largest request body in bytes (larger: 413).
    #[arg(long, env = "SGLANG_MAX_REQUEST_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Most sequences one request may create (prompts times `n`); more: 400 naming the field.
    #[arg(long, env = "SGLANG_MAX_SEQUENCES_PER_REQUEST", default_value_t = 256)]
    pub max_sequences_per_request: usize,

    /// Seconds an open connection may wait for its next request before it is closed.
    #[arg(long, env = "SGLANG_TIMEOUT_KEEP_ALIVE", default_value_t = 5.0)]
    pub timeout_keep_alive: f64,

    /// Seconds to receive a request's headers, counted from when the connection starts
    /// waiting for the request (a client that trickles its headers is closed then).
    #[arg(long, env = "SGLANG_HEADER_READ_TIMEOUT", default_value_t = 10.0)]
    pub header_read_timeout: f64,

    /// Seconds to receive a request's body once its headers are in (slower: 408).
    #[arg(long, env = "SGLANG_BODY_READ_TIMEOUT", default_value_t = 60.0)]
    pub body_read_timeout: f64,

    /// Most open connections (default: what the open-file limit allows, less a reserve). At
    /// the cap, the connection idle longest is closed to make room for a new one.
    #[arg(long, env = "SGLANG_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Let chat message content produce the model's special tokens (`<|im_start|>` typed by a
    /// user becomes the control token). Off by default: only the chat template's own markup
    /// yields special tokens, content is tokenized as plain text.
    #[arg(long, env = "SGLANG_PARSE_SPECIAL_TOKENS_IN_MESSAGES")]
    pub parse_special_tokens_in_messages: bool,

    /// Streamed `/generate` events carry only what is new (text, ids, logprobs), as SGLang's
    /// flag of the same name; by default each event carries the whole text so far.
    #[arg(long, env = "SGLANG_INCREMENTAL_STREAMING_OUTPUT")]
    pub incremental_streaming_output: bool,

    /// Log level: error, warn, info, debug, trace.
    #[arg(long, env = "SGLANG_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Also append the log (one line per request) to this file.
    #[arg(long, env = "SGLANG_LOG_FILE")]
    pub log_file: Option<PathBuf>,

    /// How tool calls are read from free output (`tool_choice: "auto"`): hermes (the
    /// `<tool_call>` form of Hermes and Qwen models), llama, mistral, pythonic, json, ...
    #[arg(long, env = "SGLANG_TOOL_CALL_PARSER", default_value = "hermes")]
    pub tool_call_parser: String,

    /// Split the model's reasoning from its answer: deepseek_r1, qwen3, kimi, glm45, ... (the
    /// `<think>...</think>` forms); default: no split.
    #[arg(long, env = "SGLANG_REASONING_PARSER")]
    pub reasoning_parser: Option<String>,
}

impl ServerArgs {
    /// An empty `SGLANG_API_KEY` or `SGLANG_ADMIN_API_KEY` in the environment means no key, as
    /// an empty key does in SGLang and vLLM: it is what compose's `${SGLANG_API_KEY:-}` passes
    /// when the operator sets none. An empty key on the command line stays an error.
    pub fn drop_empty_keys_from_env(&mut self) {
        let given_as_flag =
            |flag: &str| std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        for (flag, var, key) in [
            ("--api-key", "SGLANG_API_KEY", &mut self.api_key),
            (
                "--admin-api-key",
                "SGLANG_ADMIN_API_KEY",
                &mut self.admin_api_key,
            ),
        ] {
            let empty_in_env = std::env::var_os(var).is_some_and(|v| v.is_empty());
            if key.as_deref() == Some("") && empty_in_env && !given_as_flag(flag) {
                *key = None;
            }
        }
    }

    /// Checks the server's own options; the error names the option.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "invalid option `{name}`: {v} must be a positive number of seconds"
                ))
            }
        };
        if let Some(t) = self.request_timeout {
            positive("request-timeout", t)?;
        }
        positive("shutdown-timeout", self.shutdown_timeout)?;
        positive("health-generate-timeout", self.health_generate_timeout)?;
        positive("timeout-keep-alive", self.timeout_keep_alive)?;
        positive("header-read-timeout", self.header_read_timeout)?;
        positive("body-read-timeout", self.body_read_timeout)?;
        if self.max_sequences_per_request == 0 {
            return Err("invalid option `max-sequences-per-request`: must be >= 1".into());
        }
        if self.max_connections == Some(0) {
            return Err("invalid option `max-connections`: must be >= 1".into());
        }
        if self.max_request_bytes < 1024 {
            return Err(format!(
                "invalid option `max-request-bytes`: {} must be at least 1024",
                self.max_request_bytes
            ));
        }
        if self.max_queued_requests == Some(0) {
            return Err("invalid option `max-queued-requests`: must be >= 1".into());
        }
        for (name, key) in [
            ("api-key", &self.api_key),
            ("admin-api-key", &self.admin_api_key),
        ] {
            if key.as_deref() == Some("") {
                return Err(format!("invalid option `{name}`: the key is empty"));
            }
        }
        if let Some(name) = &self.reasoning_parser {
            let names = crate::http::reasoning_parser_names();
            if !names.contains(name) {
                return Err(format!(
                    "invalid option `reasoning-parser`: {name:?} (one of {})",
                    names.join(", ")
                ));
            }
        }
        let parsers = crate::http::tools::parser_names();
        if !parsers.contains(&self.tool_call_parser) {
            return Err(format!(
                "invalid option `tool-call-parser`: {:?} (one of {})",
                self.tool_call_parser,
                parsers.join(", ")
            ));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log_level.as_str()) {
            return Err(format!(
                "invalid option `log-level`: {:?} (error, warn, info, debug, trace)",
                self.log_level
            ));
        }
        Ok(())
    }
}

/// Sampling options of `generate`.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// -1: no top-k filter.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub top_k: i64,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Stop token id (repeatable).
    #[arg(long)]
    pub stop_token_id: Vec<u32>,
    /// Do not stop at the model's EOS token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Constrain the output to this JSON schema (JSON text).
    #[arg(long, conflicts_with_all = ["regex", "grammar"])]
    pub json_schema: Option<String>,
    /// Constrain the output to fully match this regular expression.
    #[arg(long, conflicts_with = "grammar")]
    pub regex: Option<String>,
    /// Constrain the output to this grammar (llguidance's Lark dialect).
    #[arg(long)]
    pub grammar: Option<String>,
}

impl SamplingArgs {
    pub fn to_params(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_id.clone(),
            ignore_eos: self.ignore_eos,
            json_schema: self.json_schema.clone(),
            regex: self.regex.clone(),
            ebnf: self.grammar.clone(),
            ..SamplingParams::default()
        }
    }
}
