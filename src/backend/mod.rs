//! The `Backend` trait: the operations the Llama model needs, on the backend's own buffers.
//!
//! The model (`model::llama`) is written only against this trait, so one model definition
//! runs on every backend. Each operation is stated at the granularity where a backend can fuse
//! (QKV projections in one pass, SiLU-and-mul inside the gate/up product, residual add inside
//! RMSNorm, RoPE together with the KV-cache write). The CPU backend (`cpu`) is both the
//! embedded default and the reference that other backends are tested against.
//!
//! A forward step is described by a [`StepBatch`] (`crate::batch`).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod kernels;
pub mod split;
pub mod step_meta;

use std::borrow::Cow;

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::loader::Tensor;
use crate::parallel::{CommError, Communicator};
use crate::sampling::{SampleBatch, TokenInfo};

/// Why a backend operation failed. The engine fails the requests of a step that returns one
/// (HTTP 500); a `Collective` error means the tensor-parallel group has stopped for good.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// A weight the backend cannot take (its shape or dtype), or one missing from the map.
    #[error("weight `{name}`: {message}")]
    Weight { name: String, message: String },
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The device cannot be used at all (no driver, no device, no cuBLAS).
    #[error("{0}")]
    Unavailable(String),
    /// A call into the driver, cuBLAS or a kernel failed; `call` names it.
    #[error("{call}: {message}")]
    Device { call: String, message: String },
    /// The model needs something this backend does not do (a head size, a group size, NCCL).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A collective of the tensor-parallel group failed: the group has stopped.
    #[error(transparent)]
    Collective(#[from] CommError),
    /// An operation's contract was broken by its caller (sizes that do not match): a bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `(rows, cols)` of a weight (a 1-D tensor is one column), or the error naming it.
pub fn weight_dims(name: &str, t: &Tensor) -> Result<(usize, usize), BackendError> {
    let shape = t.shape();
    if shape.is_empty() || shape.len() > 2 {
        return Err(BackendError::Weight {
            name: name.into(),
            message: format!("expected a 1-D or 2-D tensor, got shape {shape:?}"),
        });
    }
    Ok((shape[0], shape.get(1).copied().unwrap_or(1)))
}

/// RoPE frequencies of the model, shared by all backends.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// `head_dim / 2` inverse frequencies (after `rope_scaling`), in f64 for exact angles.
    pub inv_freq: Vec<f64>,
}

/// The operations of a Llama forward pass on one device.
///
/// Shapes are row-major; `rows` is the number of tokens in the step. Matrices follow the HF
/// layout `[out_features, in_features]`, and `matmul` computes `out = x · wᵀ`.
pub trait Backend: Send + Sync {
    /// A weight tensor in device form.
    type Weight: Send + Sync;
    /// An activation buffer (f32 values).
    type Buf: Send;
    /// The paged KV cache of all layers.
    type Kv: Send;
    /// A captured step (see [`Backend::captures_graphs`]).
    type Graph: Send;
    /// Per-step state prepared once (e.g. RoPE cos/sin for the step's positions).
    type Step;

    fn name(&self) -> &'static str;

    /// Makes a weight usable by the backend (a view on the CPU, an upload on a GPU).
    fn weight(&self, name: &str, t: &Tensor) -> Result<Self::Weight, BackendError>;

    /// Weights the model multiplies by the same input (q, k, v; gate, up), in that order. A
    /// backend may place them one after the other in one allocation so that one product
    /// serves them all (the CUDA backend does); by default each is a [`Backend::weight`].
    fn weights(&self, parts: &[(&str, &Tensor)]) -> Result<Vec<Self::Weight>, BackendError> {
        parts.iter().map(|(n, t)| self.weight(n, t)).collect()
    }

    /// A buffer of at least `len` f32 values (contents unspecified).
    fn buffer(&self, len: usize) -> Result<Self::Buf, BackendError>;
    /// Grows `buf` to at least `len` values if needed (no work when it is large enough).
    fn ensure_len(&self, buf: &mut Self::Buf, len: usize) -> Result<(), BackendError>;

    /// A KV cache of `num_pages` pages of `page_size` tokens for every layer.
    fn kv_cache(
        &self,
        cfg: &ModelConfig,
        num_pages: usize,
        page_size: usize,
    ) -> Result<Self::Kv, BackendError>;
    /// Bytes one cached token takes in this backend's KV cache.
    fn kv_bytes_per_token(&self, cfg: &ModelConfig) -> usize;

    fn begin_step(&self, batch: &StepBatch, rope: &RopeTable) -> Result<Self::Step, BackendError>;

    /// Hands a finished step back (a backend may keep its buffers for the next step).
    fn end_step(&self, _step: Self::Step) {}

    /// `out[t] = table[tokens[t] - vocab_start]`, where `table` holds the embedding rows of
    /// ids `vocab_start..vocab_start + rows` (a tensor-parallel shard); ids outside that range
    /// give zeros (another rank adds their rows).
    fn embedding(
        &self,
        step: &Self::Step,
        table: &Self::Weight,
        vocab_start: usize,
        batch: &StepBatch,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError>;

    /// `out = rmsnorm(x) * w`, row by row.
    fn rms_norm(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        eps: f32,
        rows: usize,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError>;

    /// `residual += delta; out = rmsnorm(residual) * w`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Buf,
        delta: &Self::Buf,
        w: &Self::Weight,
        eps: f32,
        rows: usize,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError>;

    /// `out = x · wᵀ` for `rows` rows of `x`.
    fn matmul(
        &self,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Weight,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError>;

    /// The three attention projections of `x` in one pass.
    #[allow(clippy::too_many_arguments)]
    fn qkv(
        &self,
        x: &Self::Buf,
        rows: usize,
        wq: &Self::Weight,
        wk: &Self::Weight,
        wv: &Self::Weight,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> Result<(), BackendError>;

    /// `out = silu(x · gateᵀ) * (x · upᵀ)`.
    fn gate_up_silu(
        &self,
        x: &Self::Buf,
        rows: usize,
        gate: &Self::Weight,
        up: &Self::Weight,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError>;

    /// Applies RoPE to `q` and `k` in place at the batch's positions, then writes `k` and `v`
    /// into the KV cache of `layer` at the batch's slots.
    #[allow(clippy::too_many_arguments)]
    fn rope_and_store_kv(
        &self,
        step: &Self::Step,
        batch: &StepBatch,
        cfg: &ModelConfig,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        kv: &mut Self::Kv,
        layer: usize,
    ) -> Result<(), BackendError>;

    /// Causal grouped-query attention of each new token over its sequence's cached context.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        step: &Self::Step,
        batch: &StepBatch,
        cfg: &ModelConfig,
        q: &Self::Buf,
        kv: &Self::Kv,
        layer: usize,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError>;

    /// `out[i] = x[rows[i]]` for rows of `width` values (`rows`: the step's
    /// `batch.logit_rows`, which the step's state may also hold).
    fn gather_rows(
        &self,
        step: &Self::Step,
        x: &Self::Buf,
        rows: &[u32],
        width: usize,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError>;

    /// Sums the first `len` values of `buf` over the ranks of `comm` (tensor parallelism).
    fn all_reduce(
        &self,
        comm: &dyn Communicator,
        buf: &mut Self::Buf,
        len: usize,
    ) -> Result<(), BackendError>;

    /// Every rank's first `len` values of `local`, in rank order, into the first `total`
    /// values of `out`.
    fn all_gather(
        &self,
        comm: &dyn Communicator,
        local: &Self::Buf,
        len: usize,
        out: &mut Self::Buf,
        total: usize,
    ) -> Result<(), BackendError>;

    /// Copies host values into the start of `out` (which holds at least `data.len()`).
    fn upload(&self, data: &[f32], out: &mut Self::Buf) -> Result<(), BackendError>;

    /// The first `len` values of `buf` on the host (borrowed where the buffer is host memory).
    fn to_host<'a>(&self, buf: &'a Self::Buf, len: usize) -> Result<Cow<'a, [f32]>, BackendError>;

    /// Whether [`Backend::sample`] chooses tokens on the device.
    fn samples_on_device(&self) -> bool {
        false
    }

    /// Chooses a token for each row of `logits` (one [`SampleBatch`] row each, `vocab` values
    /// per row) where the logits are, returning only the tokens and logprobs. Backends that
    /// sample on the host (the engine then copies the logits back) do not implement it.
    fn sample(
        &self,
        _logits: &Self::Buf,
        _vocab: usize,
        _samples: &SampleBatch,
    ) -> Result<Vec<TokenInfo>, BackendError> {
        Err(BackendError::Internal(format!(
            "the {} backend samples on the host",
            self.name()
        )))
    }

    /// Whether the backend can capture a step into a graph and replay it (the operations
    /// below). A backend that can samples on the device too, and its KV cache holds one page
    /// beyond the `num_pages` asked for (index `num_pages`), where the padding rows of a
    /// replayed step write.
    fn captures_graphs(&self) -> bool {
        false
    }

    /// Makes room for a step input (`step_meta`) of `words` 32-bit words ahead of time, so
    /// that no later step moves the array a captured graph reads.
    fn reserve_step_input(&self, _words: usize) -> Result<(), BackendError> {
        Ok(())
    }

    /// Makes the step state ready for positions below `positions` ahead of time (a captured
    /// step cannot grow it).
    fn prepare_positions(&self, _rope: &RopeTable, _positions: usize) -> Result<(), BackendError> {
        Ok(())
    }

    /// Sends the whole input of the next step (`batch` and its sampling rows) to the device in
    /// one copy; the step's [`Backend::begin_step`] and [`Backend::sample_staged`] then use
    /// it (a replayed graph too), until [`Backend::unstage`].
    fn stage(&self, _batch: &StepBatch, _samples: &SampleBatch) -> Result<(), BackendError> {
        Err(self.no_graphs())
    }

    /// Forgets what [`Backend::stage`] sent (later steps send their own input again).
    fn unstage(&self) {}

    /// Chooses a token for each row of `logits` with the staged sampling rows, leaving the
    /// results on the device for [`Backend::read_samples`] (capturable: no copy, no wait).
    fn sample_staged(&self, _logits: &Self::Buf, _vocab: usize) -> Result<(), BackendError> {
        Err(self.no_graphs())
    }

    /// Queues the copy of the last sampling's results (one row per row of `samples`, the
    /// sampled rows' parameters) to the host, without waiting: while it and the step before
    /// it run, the host may queue the next step ([`Backend::take_samples`] takes it later).
    /// At most two copies are pending at a time.
    fn send_samples_back(&self, _samples: &SampleBatch) -> Result<(), BackendError> {
        Err(self.no_graphs())
    }

    /// Waits for the oldest copy [`Backend::send_samples_back`] queued (the step's one wait)
    /// and returns its rows (`samples`: the rows it was sent for, or their first rows).
    fn take_samples(&self, _samples: &SampleBatch) -> Result<Vec<TokenInfo>, BackendError> {
        Err(self.no_graphs())
    }

    /// The results of the last [`Backend::sample_staged`]: one copy back, one wait.
    fn read_samples(&self, samples: &SampleBatch) -> Result<Vec<TokenInfo>, BackendError> {
        self.send_samples_back(samples)?;
        self.take_samples(samples)
    }

    /// Starts recording the device work of the calls that follow into a graph.
    fn begin_capture(&self) -> Result<(), BackendError> {
        Err(self.no_graphs())
    }

    /// Ends the recording; fails (naming the call) when a call could not be captured.
    fn end_capture(&self) -> Result<Self::Graph, BackendError> {
        Err(self.no_graphs())
    }

    /// Replays a graph on the staged input (same counts of tokens, sequences and rows as at
    /// capture).
    fn replay(&self, _graph: &Self::Graph) -> Result<(), BackendError> {
        Err(self.no_graphs())
    }

    /// A number that changes whenever device memory may have moved (an allocation): a graph
    /// captured under another value must be captured again.
    fn memory_epoch(&self) -> u64 {
        0
    }

    /// Device memory in use, bytes (None: not known), for the graphs' memory report.
    fn memory_used(&self) -> Option<usize> {
        None
    }

    #[doc(hidden)]
    fn no_graphs(&self) -> BackendError {
        BackendError::Unsupported(format!(
            "the {} backend does not capture graphs",
            self.name()
        ))
    }
}
