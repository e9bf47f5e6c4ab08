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

mod graphs;
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

pub use graphs::{graph_sizes, GraphOptions};
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
    /// One forward step and the sampling of its logits rows (`samples`: one row each, built
    /// before the step) on the device: [`ModelRunner::forward_kept`] then
    /// [`ModelRunner::sample_kept`], or, where the backend captures graphs, the step's whole
    /// input in one copy and a decode step replayed from its graph.
    fn forward_sampled(
        &mut self,
        batch: &StepBatch,
        samples: &SampleBatch,
    ) -> Result<Vec<TokenInfo>, BackendError> {
        self.forward_kept(batch)?;
        self.sample_kept(samples)
    }
    /// Whether [`ModelRunner::launch_sampled`] and [`ModelRunner::collect_sampled`] can run:
    /// a step is queued on the device and the host goes on (the overlap scheduler).
    fn overlaps(&self) -> bool {
        false
    }
    /// Queues a step and its sampling (`samples`: one row per logits row, built before the
    /// step) and the copy of its tokens back, without waiting for them. The step's token ids
    /// may name tokens the step queued before samples
    /// ([`FUTURE_TOKEN`](crate::batch::FUTURE_TOKEN)). At most two steps are in flight.
    fn launch_sampled(
        &mut self,
        _batch: &StepBatch,
        _samples: &SampleBatch,
    ) -> Result<(), BackendError> {
        Err(no_overlap(self.backend_name()))
    }
    /// Waits for the oldest step [`ModelRunner::launch_sampled`] queued and returns its
    /// sampled rows (`samples`: the rows it was launched with).
    fn collect_sampled(&mut self, _samples: &SampleBatch) -> Result<Vec<TokenInfo>, BackendError> {
        Err(no_overlap(self.backend_name()))
    }
    /// The decode batch sizes captured in graphs (empty: none).
    fn graph_sizes(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Decode steps replayed from a graph so far.
    fn graph_replays(&self) -> u64 {
        0
    }
    /// Replays captured graphs (true, the default) or runs every step eagerly (false): for
    /// benchmarks comparing the two on one loaded model.
    fn use_graphs(&mut self, _on: bool) {}
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

/// What a runner that runs each step to its end answers to the overlap calls.
fn no_overlap(backend: &str) -> BackendError {
    BackendError::Internal(format!("the {backend} backend does not queue steps ahead"))
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
    /// The decode step's graphs (None: every step runs eagerly).
    graphs: Option<graphs::Graphs<B::Graph>>,
    /// False: the graphs are kept but not replayed (`use_graphs`).
    graphs_on: bool,
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
            graphs: None,
            graphs_on: true,
        })
    }

    /// Sizes the buffers for the largest step of `opts` and captures the decode step in a
    /// graph for each padded batch size (a backend that cannot capture: nothing to do).
    pub fn capture_graphs(&mut self, opts: GraphOptions) -> Result<(), BackendError> {
        if !self.backend.captures_graphs() || opts.max_bs == 0 || self.comm.is_some() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let before = self.backend.memory_used();
        let mut g = graphs::Graphs::new(opts.max_bs, self.num_pages as u32, self.page_size);
        let (tokens, rows) = (
            opts.max_tokens.max(opts.max_bs),
            opts.max_rows.max(opts.max_bs),
        );
        self.model
            .reserve_workspace(&self.backend, &mut self.ws, tokens, rows)?;
        self.backend
            .prepare_positions(self.model.rope(), opts.max_positions)?;
        // the step input at its largest: every row's block table at the longest context, a
        // constraint mask and some penalty entries per row
        let cfg = self.model.config();
        let pages = opts.max_positions.div_ceil(self.page_size) + 1;
        let per_row = pages + cfg.vocab_size.div_ceil(32) + 3 * 256;
        let words = crate::backend::step_meta::MetaLayout::fixed(tokens, rows, rows, rows).words
            + rows * per_row;
        self.backend.reserve_step_input(words)?;
        let empty = (StepBatch::default(), SampleBatch::default());
        // every size once eagerly first (which sizes every buffer), then the captures (which
        // must not allocate)
        for capture in [false, true] {
            for i in (0..g.sizes().len()).rev() {
                g.pad(i, &empty.0, &empty.1);
                let (batch, samples) = (&g.padded, &g.padded_samples);
                let ran = if capture {
                    self.staged_capture(batch, samples).map(|graph| {
                        g.captured[i] = Some((graph, self.backend.memory_epoch()));
                    })
                } else {
                    self.staged_eager(batch, samples).map(|_| ())
                };
                self.backend.unstage();
                ran?;
            }
        }
        graphs::log_capture(g.sizes(), started, before, self.backend.memory_used());
        self.graphs = Some(g);
        Ok(())
    }

    /// Sends a step's input with its sampling rows (one copy), runs it and samples it; the
    /// sampled rows.
    fn staged_eager(
        &mut self,
        batch: &StepBatch,
        samples: &SampleBatch,
    ) -> Result<Vec<TokenInfo>, BackendError> {
        self.run_staged(batch, samples)?;
        self.backend.read_samples(samples)
    }

    /// Sends a step's input with its sampling rows (one copy) and queues the step and its
    /// sampling; the results stay on the device.
    fn run_staged(&mut self, batch: &StepBatch, samples: &SampleBatch) -> Result<(), BackendError> {
        self.backend.stage(batch, samples)?;
        self.step(batch)?;
        let vocab = self.model.config().vocab_size;
        self.backend.sample_staged(self.ws.logits(), vocab)
    }

    /// Sends a step's input with its sampling rows and captures the step and its sampling in
    /// a graph (run by replaying it).
    fn staged_capture(
        &mut self,
        batch: &StepBatch,
        samples: &SampleBatch,
    ) -> Result<B::Graph, BackendError> {
        self.backend.stage(batch, samples)?;
        self.backend.begin_capture()?;
        let vocab = self.model.config().vocab_size;
        let ran = self
            .step(batch)
            .and_then(|_| self.backend.sample_staged(self.ws.logits(), vocab));
        // the capture ends whatever happened, so that the stream leaves capture mode
        let graph = self.backend.end_capture();
        ran?;
        graph
    }

    /// Queues a step with its sampling on a backend that captures graphs, and the copy of its
    /// results back, without waiting for any of it: replayed when it is a decode step of a
    /// captured size, else run eagerly; one copy of its input either way. The backend's
    /// `take_samples` returns the results.
    fn launch_staged(
        &mut self,
        batch: &StepBatch,
        samples: &SampleBatch,
    ) -> Result<(), BackendError> {
        let mut g = self.graphs.take();
        let on = self.graphs_on;
        let result = (|| {
            let Some((g, i)) = g
                .as_mut()
                .filter(|_| on)
                .and_then(|g| g.size_for(batch, samples).map(|i| (g, i)))
            else {
                self.run_staged(batch, samples)?;
                return self.backend.send_samples_back(samples);
            };
            g.pad(i, batch, samples);
            let (padded, padded_samples) = (&g.padded, &g.padded_samples);
            let epoch = self.backend.memory_epoch();
            if matches!(&g.captured[i], Some((_, at)) if *at == epoch) {
                let (graph, _) = g.captured[i].as_ref().expect("matched above");
                self.backend.stage(padded, padded_samples)?;
                self.backend.replay(graph)?;
                g.replays += 1;
            } else {
                // captured before a buffer moved (or never): this step runs eagerly (which
                // sizes the buffers; its results are the step's: a step reading the tokens of
                // the one before must not run twice), then it is captured for the next
                tracing::debug!("capturing the decode step of {} again", g.sizes()[i]);
                g.captured[i] = None;
                self.run_staged(padded, padded_samples)?;
                let graph = self.staged_capture(padded, padded_samples)?;
                g.captured[i] = Some((graph, self.backend.memory_epoch()));
            }
            // the padding rows' results come back too; `take_samples` reads the real rows
            self.backend.send_samples_back(padded_samples)
        })();
        self.backend.unstage();
        self.graphs = g;
        result
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
    fn forward_sampled(
        &mut self,
        batch: &StepBatch,
        samples: &SampleBatch,
    ) -> Result<Vec<TokenInfo>, BackendError> {
        if self.backend.captures_graphs() {
            self.launch_staged(batch, samples)?;
            return self.backend.take_samples(samples);
        }
        self.forward_kept(batch)?;
        self.sample_kept(samples)
    }
    fn overlaps(&self) -> bool {
        self.backend.captures_graphs() && self.comm.is_none()
    }
    fn launch_sampled(
        &mut self,
        batch: &StepBatch,
        samples: &SampleBatch,
    ) -> Result<(), BackendError> {
        if !self.overlaps() {
            return Err(no_overlap(self.backend_name()));
        }
        self.launch_staged(batch, samples)
    }
    fn collect_sampled(&mut self, samples: &SampleBatch) -> Result<Vec<TokenInfo>, BackendError> {
        if !self.overlaps() {
            return Err(no_overlap(self.backend_name()));
        }
        self.backend.take_samples(samples)
    }
    fn graph_sizes(&self) -> Vec<usize> {
        self.graphs
            .as_ref()
            .map_or(Vec::new(), |g| g.sizes().to_vec())
    }
    fn graph_replays(&self) -> u64 {
        self.graphs.as_ref().map_or(0, |g| g.replays)
    }
    fn use_graphs(&mut self, on: bool) {
        self.graphs_on = on;
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
