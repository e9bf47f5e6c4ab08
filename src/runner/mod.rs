//! Loading and running a model: the floor above the model definition, the backends and the
//! tensor-parallel collectives, and below the engine.
//!
//! [`ModelRunner`] is what the engine thread drives: one forward step over a [`StepBatch`],
//! returning logits (or, where the backend samples on the device, only the sampled tokens).
//! [`Runner`] is that for one model on one backend with its KV cache; [`tp::TpRunner`] is rank
//! 0 of a tensor-parallel group, which broadcasts each step to the other ranks. [`load()`] reads
//! the configuration and the weights, chooses the device, sizes the KV pool and builds one of
//! the two; [`serve_rank`] is the loop of a rank other than 0 in a group of processes.
//!
//! Nothing below this module (model, backends, parallel, KV pool, scheduler) imports it.

mod load;
pub mod tp;

use std::borrow::Cow;
use std::sync::Arc;

use crate::backend::{Backend, BackendError};
use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::loader::WeightMap;
use crate::model::llama::{self, LlamaModel, Workspace};
use crate::parallel::Communicator;
use crate::sampling::{SampleBatch, TokenInfo};

pub use load::{
    build_rank, gguf_tokenizer, load, model_config, resolve_device, serve_rank, KvPool,
    LoadModelError,
};

/// The state of a tensor-parallel group (one rank, always ready, without parallelism).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelState {
    pub ranks: usize,
    pub ready: usize,
    /// Why the group stopped; once set, no step can run again.
    pub error: Option<String>,
}

/// A model on a backend with its KV cache: what the engine thread owns.
pub trait ModelRunner: Send {
    fn config(&self) -> &ModelConfig;
    /// One forward step; returns the logits of `batch.logit_rows`, `[rows][vocab]`.
    fn forward(&mut self, batch: &StepBatch) -> Result<Cow<'_, [f32]>, BackendError>;
    fn backend_name(&self) -> &'static str;
    /// Whether [`ModelRunner::forward_kept`] and [`ModelRunner::sample_kept`] can run (the
    /// backend samples on the device).
    fn samples_on_device(&self) -> bool {
        false
    }
    /// One forward step whose logits stay where they were computed, for
    /// [`ModelRunner::sample_kept`]; returns how many rows there are. The host may prepare the
    /// sampling (constraint masks) while the device computes.
    fn forward_kept(&mut self, _batch: &StepBatch) -> Result<usize, BackendError> {
        Err(samples_on_host(self.backend_name()))
    }
    /// Chooses a token for each logits row the last [`ModelRunner::forward_kept`] left (one
    /// row of `samples` each) where they are; only the tokens and logprobs come back.
    fn sample_kept(&mut self, _samples: &SampleBatch) -> Result<Vec<TokenInfo>, BackendError> {
        Err(samples_on_host(self.backend_name()))
    }
    /// Pages in the KV pool and tokens per page.
    fn kv_pages(&self) -> (usize, usize);
    /// Bytes of KV cache per token.
    fn kv_bytes_per_token(&self) -> usize;
    /// Bytes of weights the model reads per forward step (all matrices once).
    fn weight_bytes(&self) -> usize;
    /// Ranks of the tensor-parallel group and how many are ready.
    fn parallel_state(&self) -> ParallelState {
        ParallelState {
            ranks: 1,
            ready: 1,
            error: None,
        }
    }
}

/// What a runner whose backend samples on the host answers to the device-sampling calls.
fn samples_on_host(backend: &str) -> BackendError {
    BackendError::Internal(format!("the {backend} backend samples on the host"))
}

/// One model (or one rank's shard of it) on backend `B`, with its KV cache and the activation
/// buffers of a step.
pub struct Runner<B: Backend> {
    backend: B,
    model: LlamaModel<B>,
    kv: B::Kv,
    ws: Workspace<B>,
    num_pages: usize,
    page_size: usize,
    weight_bytes: usize,
    /// This rank's group (tensor parallelism only).
    comm: Option<Arc<dyn Communicator>>,
    /// Logits rows the last `forward_kept` left in the workspace.
    kept_rows: usize,
}

impl<B: Backend + 'static> Runner<B> {
    /// `model` on `backend` with a KV cache of `num_pages` pages for its (local) KV heads.
    pub fn new(
        backend: B,
        model: LlamaModel<B>,
        num_pages: usize,
        page_size: usize,
        weight_bytes: usize,
        comm: Option<Arc<dyn Communicator>>,
    ) -> Result<Self, BackendError> {
        let kv = backend.kv_cache(model.local_config(), num_pages, page_size)?;
        let ws = Workspace::new(&backend)?;
        Ok(Self {
            backend,
            model,
            kv,
            ws,
            num_pages,
            page_size,
            weight_bytes,
            comm,
            kept_rows: 0,
        })
    }

    /// One forward step; the logits rows it leaves in the workspace.
    fn step(&mut self, batch: &StepBatch) -> Result<usize, BackendError> {
        self.model.forward(
            &self.backend,
            batch,
            &mut self.kv,
            &mut self.ws,
            self.comm.as_deref(),
        )
    }
}

impl<B: Backend + 'static> ModelRunner for Runner<B> {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }
    fn forward(&mut self, batch: &StepBatch) -> Result<Cow<'_, [f32]>, BackendError> {
        let rows = self.step(batch)?;
        let vocab = self.model.config().vocab_size;
        self.backend.to_host(self.ws.logits(), rows * vocab)
    }
    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
    fn samples_on_device(&self) -> bool {
        self.backend.samples_on_device()
    }
    fn forward_kept(&mut self, batch: &StepBatch) -> Result<usize, BackendError> {
        self.kept_rows = 0;
        self.kept_rows = self.step(batch)?;
        Ok(self.kept_rows)
    }
    fn sample_kept(&mut self, samples: &SampleBatch) -> Result<Vec<TokenInfo>, BackendError> {
        if self.kept_rows != samples.len() {
            return Err(BackendError::Internal(format!(
                "{} logits rows for {} sampling rows",
                self.kept_rows,
                samples.len()
            )));
        }
        let vocab = self.model.config().vocab_size;
        self.backend.sample(self.ws.logits(), vocab, samples)
    }
    fn kv_pages(&self) -> (usize, usize) {
        (self.num_pages, self.page_size)
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.backend.kv_bytes_per_token(self.model.local_config())
    }
    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
}

/// Bytes a decode step reads: every matrix once; the embedding table only as the lm_head (a
/// lookup reads a few rows).
fn weight_bytes(model_cfg: &ModelConfig, weights: &WeightMap) -> usize {
    let size = |name: &str| weights.get(name).map_or(0, |t| t.size_bytes());
    llama::tensor_specs(model_cfg)
        .iter()
        .filter(|s| s.name != "model.embed_tokens.weight")
        .map(|s| size(&s.name))
        .sum::<usize>()
        + if model_cfg.tie_word_embeddings {
            size("model.embed_tokens.weight")
        } else {
            0
        }
}
