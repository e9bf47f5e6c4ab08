//! Command-line options. Every option is a flag and an `SGLANG_*` environment variable; the
//! flag wins. Invalid values stop start-up with a message naming the option.

use std::path::PathBuf;

use clap::Args;
use sglang::config::{default_model_path, Device, EngineConfig, LoadFormat};
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

    /// Where weights come from: auto/safetensors, or dummy (random weights with the
    /// config's shapes, for benchmarks).
    #[arg(long, env = "SGLANG_LOAD_FORMAT", default_value = "auto")]
    pub load_format: LoadFormat,

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
}

impl EngineArgs {
    pub fn to_config(&self) -> Result<EngineConfig, String> {
        let mut c = EngineConfig::new(self.model_path.clone().unwrap_or_else(default_model_path));
        c.device = self.device;
        c.load_format = self.load_format;
        c.page_size = self.page_size;
        c.max_total_tokens = self.max_total_tokens;
        c.mem_fraction_static = self.mem_fraction_static;
        c.max_running_requests = self.max_running_requests;
        c.chunked_prefill_size = self.chunked_prefill_size;
        c.context_length = self.context_length;
        c.num_threads = self.threads;
        c.dummy_seed = self.dummy_seed;
        c.validate().map_err(|e| e.to_string())?;
        if !c.model_path.join("config.json").exists() {
            return Err(format!(
                "invalid option `model-path`: {} has no config.json (prepare the default model with scripts/prepare-model.sh)",
                c.model_path.display()
            ));
        }
        Ok(c)
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
            ..SamplingParams::default()
        }
    }
}
