//! Model loading and the type-erased [`ModelRunner`] the engine drives.
//!
//! `load` resolves the device, reads `config.json`, maps (or generates) the weights, builds the
//! Llama model on the chosen backend and sizes the paged KV pool. The engine then only sees
//! `ModelRunner::forward(batch) -> logits`.

pub mod llama;

use std::borrow::Cow;
use std::time::Instant;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendError, StepBatch};
use crate::config::{ConfigError, Device, EngineConfig, LoadFormat, ModelConfig};
use crate::loader::{self, LoadError};
use llama::{LlamaModel, ModelError, Workspace};

/// A model on a backend with its KV cache: what the engine thread owns.
pub trait ModelRunner: Send {
    fn config(&self) -> &ModelConfig;
    /// One forward step; returns the logits of `batch.logit_rows`, `[rows][vocab]`.
    fn forward(&mut self, batch: &StepBatch) -> Result<Cow<'_, [f32]>, BackendError>;
    fn backend_name(&self) -> &'static str;
    /// Pages in the KV pool and tokens per page.
    fn kv_pages(&self) -> (usize, usize);
    /// Bytes of KV cache per token.
    fn kv_bytes_per_token(&self) -> usize;
    /// Bytes of weights the model reads per forward step (all matrices once).
    fn weight_bytes(&self) -> usize;
}

struct Runner<B: Backend> {
    backend: B,
    model: LlamaModel<B>,
    kv: B::Kv,
    ws: Workspace<B>,
    num_pages: usize,
    page_size: usize,
    weight_bytes: usize,
}

impl<B: Backend> ModelRunner for Runner<B> {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }
    fn forward(&mut self, batch: &StepBatch) -> Result<Cow<'_, [f32]>, BackendError> {
        let rows = self
            .model
            .forward(&self.backend, batch, &mut self.kv, &mut self.ws)?;
        let vocab = self.model.config().vocab_size;
        self.backend.to_host(self.ws.logits(), rows * vocab)
    }
    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
    fn kv_pages(&self) -> (usize, usize) {
        (self.num_pages, self.page_size)
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.backend.kv_bytes_per_token(self.model.config())
    }
    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("--device cuda: {0}")]
    NoCuda(String),
}

/// Reads the model of `cfg` and builds it on the configured device.
pub fn load(cfg: &EngineConfig) -> Result<Box<dyn ModelRunner>, LoadModelError> {
    cfg.validate()?;
    let model_cfg = ModelConfig::from_dir(&cfg.model_path)?;
    match cfg.device {
        Device::Cpu | Device::Auto => {}
        Device::Cuda => {
            return Err(LoadModelError::NoCuda(
                "the CUDA backend is not part of this build yet; use --device cpu".into(),
            ))
        }
    }
    let backend = CpuBackend::new(cfg.num_threads);
    tracing::info!(
        "CPU backend: {} threads, {} kernels",
        backend.num_threads(),
        backend.isa().name()
    );
    build(backend, model_cfg, cfg)
}

fn build<B: Backend + 'static>(
    backend: B,
    model_cfg: ModelConfig,
    cfg: &EngineConfig,
) -> Result<Box<dyn ModelRunner>, LoadModelError> {
    let started = Instant::now();
    let specs = llama::tensor_specs(&model_cfg);
    let weights = match cfg.load_format {
        LoadFormat::Safetensors => loader::load_safetensors(&cfg.model_path, &specs)?,
        LoadFormat::Dummy => loader::dummy_weights(&specs, cfg.dummy_seed),
    };
    // Bytes a decode step reads: every matrix once; the embedding table only as the lm_head
    // (a lookup reads a few rows).
    let size = |name: &str| weights.get(name).map_or(0, |t| t.size_bytes());
    let weight_bytes = specs
        .iter()
        .filter(|s| s.name != "model.embed_tokens.weight")
        .map(|s| size(&s.name))
        .sum::<usize>()
        + if model_cfg.tie_word_embeddings {
            size("model.embed_tokens.weight")
        } else {
            0
        };
    let model = LlamaModel::new(&backend, model_cfg.clone(), &weights)?;
    let per_token = backend.kv_bytes_per_token(&model_cfg);
    let total_tokens = cfg
        .max_total_tokens
        .unwrap_or_else(|| default_kv_tokens(per_token, cfg.page_size));
    let num_pages = (total_tokens / cfg.page_size).max(1);
    let kv = backend.kv_cache(&model_cfg, num_pages, cfg.page_size)?;
    let ws = Workspace::new(&backend)?;
    tracing::info!(
        "loaded {} ({} parameters, {:.1} MB of weights, {} tensors) in {:.2}s",
        cfg.model_path.display(),
        model_cfg.num_parameters(),
        weights.total_bytes() as f64 / 1e6,
        weights.len(),
        started.elapsed().as_secs_f64()
    );
    tracing::info!(
        "KV cache: {} pages x {} tokens = {} tokens, {:.1} MB ({} bytes per token)",
        num_pages,
        cfg.page_size,
        num_pages * cfg.page_size,
        (num_pages * cfg.page_size * per_token) as f64 / 1e6,
        per_token
    );
    Ok(Box::new(Runner {
        backend,
        model,
        kv,
        ws,
        num_pages,
        page_size: cfg.page_size,
        weight_bytes,
    }))
}

/// Default CPU KV pool: a quarter of the available memory, at most 65536 tokens, at least 64
/// pages. The allocation is lazily committed, so unused capacity costs address space only.
fn default_kv_tokens(bytes_per_token: usize, page_size: usize) -> usize {
    let available = available_memory_bytes().unwrap_or(4 << 30);
    let by_memory = available / 4 / bytes_per_token.max(1);
    by_memory.clamp(64 * page_size, 65536)
}

fn available_memory_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
