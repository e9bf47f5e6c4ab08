//! Model configuration (`config.json` of a Hugging Face Llama directory) and engine options.
//!
//! Both are validated once, when they are built, and immutable afterwards: everything downstream
//! (loader, model, KV pool, scheduler) trusts the numbers here.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// An invalid or unreadable configuration; the message names the file or option and the bound.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: `{field}` {message}")]
    Field {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error("invalid option `{option}`: {message}")]
    Option {
        option: &'static str,
        message: String,
    },
}

/// RoPE frequency scaling from `rope_scaling` (the types Llama checkpoints use).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (all frequencies scaled).
    Linear { factor: f32 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// `eos_token_id` is an integer or a list of integers in HF configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    bos_token_id: Option<OneOrMany>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

/// The shape and hyper-parameters of a Llama-family model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The file this came from (for error messages).
    pub source: PathBuf,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text, &path)
    }

    /// Parses and validates a `config.json` text; `path` is used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let field = |field: &'static str, message: String| ConfigError::Field {
            path: path.to_path_buf(),
            field,
            message,
        };
        let arch_ok = raw.architectures.is_empty()
            || raw
                .architectures
                .iter()
                .any(|a| a == "LlamaForCausalLM" || a == "MistralForCausalLM");
        if !arch_ok {
            return Err(field(
                "architectures",
                format!(
                    "{:?} is not supported (LlamaForCausalLM or MistralForCausalLM)",
                    raw.architectures
                ),
            ));
        }
        if let Some(mt) = &raw.model_type {
            if mt != "llama" && mt != "mistral" {
                return Err(field(
                    "model_type",
                    format!("{mt:?} is not supported (llama, mistral)"),
                ));
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(field(
                    "hidden_act",
                    format!("{act:?} is not supported (silu)"),
                ));
            }
        }
        if raw.attention_bias {
            return Err(field("attention_bias", "true is not supported".into()));
        }
        if raw.mlp_bias {
            return Err(field("mlp_bias", "true is not supported".into()));
        }
        let positive = |name: &'static str, v: usize| {
            if v == 0 {
                Err(field(name, "must be > 0".into()))
            } else {
                Ok(v)
            }
        };
        positive("hidden_size", raw.hidden_size)?;
        positive("intermediate_size", raw.intermediate_size)?;
        positive("num_hidden_layers", raw.num_hidden_layers)?;
        positive("num_attention_heads", raw.num_attention_heads)?;
        positive("vocab_size", raw.vocab_size)?;
        positive("max_position_embeddings", raw.max_position_embeddings)?;
        let num_kv_heads = positive(
            "num_key_value_heads",
            raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
        )?;
        if !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(field(
                "num_key_value_heads",
                format!(
                    "{num_kv_heads} must divide num_attention_heads ({})",
                    raw.num_attention_heads
                ),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => positive("head_dim", d)?,
            None => {
                if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
                    return Err(field(
                        "hidden_size",
                        format!(
                            "{} is not divisible by num_attention_heads ({})",
                            raw.hidden_size, raw.num_attention_heads
                        ),
                    ));
                }
                raw.hidden_size / raw.num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(field("head_dim", format!("{head_dim} must be even (RoPE)")));
        }
        if !(raw.rms_norm_eps > 0.0 && raw.rms_norm_eps < 1.0) {
            return Err(field(
                "rms_norm_eps",
                format!("{} must be > 0 and < 1", raw.rms_norm_eps),
            ));
        }
        if raw.rope_theta <= 0.0 || !raw.rope_theta.is_finite() {
            return Err(field(
                "rope_theta",
                format!("{} must be > 0", raw.rope_theta),
            ));
        }
        let rope_scaling =
            parse_rope_scaling(raw.rope_scaling.as_ref()).map_err(|m| field("rope_scaling", m))?;
        let bos_token_id = match raw.bos_token_id {
            Some(OneOrMany::One(id)) => Some(id),
            Some(OneOrMany::Many(ids)) => ids.first().copied(),
            None => None,
        };
        let eos_token_ids = match raw.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => Vec::new(),
        };
        for &id in eos_token_ids.iter().chain(bos_token_id.iter()) {
            if id as usize >= raw.vocab_size {
                return Err(field(
                    "eos_token_id",
                    format!("{id} is outside the vocabulary ({})", raw.vocab_size),
                ));
            }
        }
        Ok(Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps as f32,
            rope_theta: raw.rope_theta,
            rope_scaling,
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings,
            max_position_embeddings: raw.max_position_embeddings,
            bos_token_id,
            eos_token_ids,
            source: path.to_path_buf(),
        })
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Total parameter count implied by the shapes.
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * i;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }

    /// Bytes of K and V per token for all layers at `elem_bytes` per value.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes
    }
}

fn parse_rope_scaling(v: Option<&serde_json::Value>) -> Result<Option<RopeScaling>, String> {
    let Some(v) = v else { return Ok(None) };
    if v.is_null() {
        return Ok(None);
    }
    let obj = v.as_object().ok_or("must be an object or null")?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|t| t.as_str())
        .ok_or("needs a `rope_type` (or `type`) string")?;
    let num = |key: &str| -> Result<f64, String> {
        obj.get(key)
            .and_then(|x| x.as_f64())
            .ok_or(format!("{kind} scaling needs a numeric `{key}`"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => {
            let factor = num("factor")?;
            if factor <= 0.0 {
                return Err(format!("factor {factor} must be > 0"));
            }
            Ok(Some(RopeScaling::Linear {
                factor: factor as f32,
            }))
        }
        "llama3" => {
            let factor = num("factor")?;
            let low = obj
                .get("low_freq_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(1.0);
            let high = obj
                .get("high_freq_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(4.0);
            let orig = num("original_max_position_embeddings")?;
            if factor <= 0.0 || high <= low || orig < 1.0 {
                return Err(
                    "llama3 scaling needs factor > 0, high_freq_factor > low_freq_factor, original_max_position_embeddings >= 1"
                        .into(),
                );
            }
            Ok(Some(RopeScaling::Llama3 {
                factor: factor as f32,
                low_freq_factor: low as f32,
                high_freq_factor: high as f32,
                original_max_position_embeddings: orig as usize,
            }))
        }
        other => Err(format!(
            "type {other:?} is not supported (linear, llama3, default)"
        )),
    }
}

/// Where the weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFormat {
    /// GGUF when the model path is a `.gguf` file, or a directory with a `.gguf` file and no
    /// safetensors; otherwise safetensors.
    Auto,
    /// `model.safetensors` or shards listed in `model.safetensors.index.json`.
    Safetensors,
    /// A GGUF file (the model path, or the one `.gguf` file in the model directory), served
    /// in place: F32/F16/BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K.
    Gguf,
    /// Deterministic random weights with the shapes of `config.json` (benchmarks of large shapes).
    Dummy,
}

impl LoadFormat {
    /// The option's value that names this format.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Safetensors => "safetensors",
            Self::Gguf => "gguf",
            Self::Dummy => "dummy",
        }
    }
}

impl std::str::FromStr for LoadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "safetensors" => Ok(Self::Safetensors),
            "gguf" => Ok(Self::Gguf),
            "dummy" => Ok(Self::Dummy),
            other => Err(format!(
                "{other:?} is not a load format (auto, safetensors, gguf, dummy)"
            )),
        }
    }
}

/// The KV cache's element type (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The backend's own: f32 on the CPU (exact against the f32 reference), bf16 on CUDA.
    #[default]
    Auto,
    /// f32: the CPU's default.
    Fp32,
    /// bf16: half the memory per cached token (values rounded to nearest even when stored).
    Bf16,
}

impl KvCacheDtype {
    /// The option's value that names this type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "fp32" | "float32" => Ok(Self::Fp32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "{other:?} is not a KV cache dtype (auto, fp32, bf16)"
            )),
        }
    }
}

/// The element type of the matrix products' inputs (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    /// The backend's own: on the CPU bf16 where it multiplies bf16 natively (AVX-512 BF16),
    /// else f32 (`backend::cpu::resolve_dtype`); bf16 on CUDA.
    #[default]
    Auto,
    /// f32 activations into every product (CPU only).
    Float32,
    /// The activations entering a product with bf16 weights are rounded to bf16, as SGLang,
    /// vLLM and llama.cpp run bf16 models (on the CPU, AVX-512 BF16 `vdpbf16ps` where the CPU
    /// has it); norms, attention and the residual stream stay f32.
    Bfloat16,
}

impl Dtype {
    /// The option's value that names this type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Float32 => "float32",
            Self::Bfloat16 => "bfloat16",
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "float32" | "float" | "fp32" => Ok(Self::Float32),
            "bfloat16" | "bf16" => Ok(Self::Bfloat16),
            other => Err(format!(
                "{other:?} is not a supported dtype (auto, float32, bfloat16)"
            )),
        }
    }
}

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA when this build has it and a driver is present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!("{other:?} is not a device (auto, cpu, cuda)")),
        }
    }
}

/// Options of one engine: everything between the model directory and the scheduler.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub load_format: LoadFormat,
    /// Quantize bf16/f16/f32 weights to this format while loading (`--quantization`).
    pub quantization: Option<crate::quant::QuantType>,
    /// The KV cache's element type (`--kv-cache-dtype`).
    pub kv_cache_dtype: KvCacheDtype,
    /// The matrix products' input type (`--dtype`).
    pub dtype: Dtype,
    pub device: Device,
    /// Tokens per KV page.
    pub page_size: usize,
    /// KV pool size in tokens on the CPU (None: a default from the model's shape).
    pub max_total_tokens: Option<usize>,
    /// Fraction of device memory for weights and KV (CUDA).
    pub mem_fraction_static: f32,
    pub max_running_requests: usize,
    /// Most prompt tokens prefilled in one step (long prompts are split into chunks).
    pub chunked_prefill_size: usize,
    pub enable_radix_cache: bool,
    /// Worker threads for the CPU backend (None: all available cores).
    pub num_threads: Option<usize>,
    /// Seed of `--load-format dummy` weights.
    pub dummy_seed: u64,
    /// Longest context (prompt + output) a request may use; None: the model's maximum.
    pub context_length: Option<usize>,
    /// Requests allowed to wait for admission before new ones get "queue full" (None: no limit).
    pub max_queued_requests: Option<usize>,
    /// A chat template that replaces the model's (`--chat-template`, the template text).
    pub chat_template: Option<String>,
    /// Tensor-parallel ranks (`--tp-size`). With `world_size` 1 they run as threads of this
    /// process; otherwise each rank is a process and `tp_size` equals `world_size`.
    pub tp_size: usize,
    /// Processes of a multi-process group (`--world-size`), this one's rank (`--rank`; 0
    /// serves HTTP) and where rank 0 listens for the others (`--master-addr`/`--master-port`).
    pub world_size: usize,
    pub rank: usize,
    pub master_addr: Option<String>,
    pub master_port: u16,
    /// How long ranks wait for each other (joining, and inside a collective), in seconds.
    pub dist_timeout_secs: u64,
    /// What runs the CUDA backend's kernels: None, the GPU; a path, the CPU emulation library
    /// of csrc/ (built by tests/kernel_emu; a test hook, far too slow to serve with). Defaults
    /// to [`CUDA_EMULATOR_ENV`].
    pub cuda_emulator: Option<PathBuf>,
    /// Run every step eagerly (`--disable-cuda-graph`).
    pub disable_cuda_graph: bool,
    /// The largest decode batch replayed from a CUDA graph (`--cuda-graph-max-bs`).
    pub cuda_graph_max_bs: usize,
    /// Run each step to its end before planning the next (`--disable-overlap-schedule`); by
    /// default a backend that samples on the device gets the next decode step queued while
    /// the current one runs.
    pub disable_overlap_schedule: bool,
}

/// `SGLANG_CUDA_EMULATOR`: the default of [`EngineConfig::cuda_emulator`].
pub const CUDA_EMULATOR_ENV: &str = "SGLANG_CUDA_EMULATOR";

impl EngineConfig {
    /// The model directory (config.json, tokenizer): the model path, or the directory holding
    /// it when it names a `.gguf` file.
    pub fn model_dir(&self) -> &Path {
        if self.model_path.is_file() {
            self.model_path.parent().unwrap_or(Path::new("."))
        } else {
            &self.model_path
        }
    }

    /// The load format `Auto` stands for with this model path.
    pub fn resolved_load_format(&self) -> LoadFormat {
        if self.load_format != LoadFormat::Auto {
            return self.load_format;
        }
        let p = &self.model_path;
        if p.is_file() && p.extension().is_some_and(|e| e == "gguf") {
            return LoadFormat::Gguf;
        }
        // the files load_safetensors reads; any .gguf file
        let has_safetensors = ["model.safetensors", "model.safetensors.index.json"]
            .iter()
            .any(|f| p.join(f).is_file());
        let has_gguf = std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "gguf"))
            })
            .unwrap_or(false);
        if has_gguf && !has_safetensors {
            LoadFormat::Gguf
        } else {
            LoadFormat::Safetensors
        }
    }

    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            load_format: LoadFormat::Safetensors,
            quantization: None,
            kv_cache_dtype: KvCacheDtype::Auto,
            dtype: Dtype::Auto,
            device: Device::Auto,
            page_size: 16,
            max_total_tokens: None,
            mem_fraction_static: 0.9,
            max_running_requests: 256,
            chunked_prefill_size: 2048,
            enable_radix_cache: true,
            num_threads: None,
            dummy_seed: 0,
            context_length: None,
            max_queued_requests: None,
            chat_template: None,
            tp_size: 1,
            world_size: 1,
            rank: 0,
            master_addr: None,
            master_port: 23456,
            dist_timeout_secs: 300,
            cuda_emulator: std::env::var_os(CUDA_EMULATOR_ENV).map(Into::into),
            disable_cuda_graph: false,
            disable_overlap_schedule: false,
            cuda_graph_max_bs: 160,
        }
    }

    /// The rank count of the tensor-parallel group: `tp_size`, or `world_size` processes.
    pub fn group_size(&self) -> usize {
        self.tp_size.max(self.world_size)
    }

    /// Checks every option against its bound; the error names the option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let opt = |option: &'static str, message: String| ConfigError::Option { option, message };
        if self.page_size == 0 || self.page_size > 1024 {
            return Err(opt(
                "page-size",
                format!("{} must be between 1 and 1024", self.page_size),
            ));
        }
        if let Some(t) = self.max_total_tokens {
            if t < self.page_size {
                return Err(opt(
                    "max-total-tokens",
                    format!("{t} must be at least one page ({} tokens)", self.page_size),
                ));
            }
        }
        if !(self.mem_fraction_static > 0.0 && self.mem_fraction_static <= 1.0) {
            return Err(opt(
                "mem-fraction-static",
                format!("{} must be > 0 and <= 1", self.mem_fraction_static),
            ));
        }
        if self.max_running_requests == 0 {
            return Err(opt("max-running-requests", "must be >= 1".into()));
        }
        if self.chunked_prefill_size == 0 {
            return Err(opt("chunked-prefill-size", "must be >= 1".into()));
        }
        if self.num_threads == Some(0) {
            return Err(opt("threads", "must be >= 1".into()));
        }
        if self.context_length == Some(0) {
            return Err(opt("context-length", "must be >= 1".into()));
        }
        if self.tp_size == 0 {
            return Err(opt("tp-size", "must be >= 1".into()));
        }
        if self.world_size == 0 {
            return Err(opt("world-size", "must be >= 1".into()));
        }
        if self.rank >= self.world_size {
            return Err(opt(
                "rank",
                format!(
                    "{} must be below the world size {}",
                    self.rank, self.world_size
                ),
            ));
        }
        if self.world_size > 1 && self.tp_size != 1 && self.tp_size != self.world_size {
            return Err(opt(
                "tp-size",
                format!(
                    "{} differs from --world-size {}: each process of a multi-process group is \
                     one rank",
                    self.tp_size, self.world_size
                ),
            ));
        }
        if self.world_size > 1 && self.master_addr.as_deref().unwrap_or("").is_empty() {
            return Err(opt(
                "master-addr",
                "is required with --world-size > 1 (where rank 0 listens)".into(),
            ));
        }
        if self.dist_timeout_secs == 0 {
            return Err(opt("dist-timeout", "must be >= 1 second".into()));
        }
        if let (Some(q), true) = (self.quantization, self.group_size() > 1) {
            return Err(opt(
                "quantization",
                format!(
                    "{} with {} tensor-parallel ranks: tensor parallelism over quantized weights \
                     is not supported yet",
                    q.name().to_lowercase(),
                    self.group_size()
                ),
            ));
        }
        Ok(())
    }
}

/// The default model directory: `$SGLANG_MODEL_PATH`, else `models/SmolLM2-135M-Instruct`
/// under the current directory or the directory holding the executable's workspace.
pub fn default_model_path() -> PathBuf {
    if let Ok(p) = std::env::var("SGLANG_MODEL_PATH") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let rel = Path::new("models").join("SmolLM2-135M-Instruct");
    if rel.join("config.json").exists() {
        return rel;
    }
    // target/{debug,release}/sglang-server -> workspace root
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            let cand = dir.join(&rel);
            if cand.join("config.json").exists() {
                return cand;
            }
        }
    }
    rel
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<ModelConfig, ConfigError> {
        let text = format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100{extra}}}"#
        );
        ModelConfig::from_json(&text, Path::new("config.json"))
    }

    #[test]
    fn defaults_and_derived_values() {
        let c = cfg("").unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.group_size(), 2);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 10000.0);
    }

    #[test]
    fn errors_name_the_field() {
        let e = cfg(r#", "num_key_value_heads": 3"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = cfg(r#", "rope_scaling": {"type": "yarn", "factor": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");
        let e = cfg(r#", "eos_token_id": 1000"#).unwrap_err().to_string();
        assert!(e.contains("eos_token_id"), "{e}");
        let e = cfg(r#", "attention_bias": true"#).unwrap_err().to_string();
        assert!(e.contains("attention_bias"), "{e}");
    }

    #[test]
    fn rope_scaling_llama3() {
        let c = cfg(r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#).unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    }

    #[test]
    fn engine_options_are_validated() {
        let mut e = EngineConfig::new("x");
        e.page_size = 0;
        assert!(e.validate().unwrap_err().to_string().contains("page-size"));
        let mut e = EngineConfig::new("x");
        e.mem_fraction_static = 1.5;
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mem-fraction-static"));
    }
}
