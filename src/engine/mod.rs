//! The engine thread and [`EngineHandle`], the only way in.
//!
//! One thread owns the model, the KV cache, the scheduler and every request's state (its
//! tokens, sampling and detokenization, in one scheduler `Seq` each); nothing else touches
//! them (TGI's actor pattern). Callers (the HTTP server, the C ABI, the CLI) hold a cloneable
//! `EngineHandle`: `submit` validates a request and returns a [`RequestStream`] of
//! [`Event`]s; dropping the stream (a client that went away) or calling `abort` cancels the
//! request, and its pages are freed on the next step. The engine's live numbers are written
//! once, into the metrics registry, and [`EngineHandle::stats`] reads them back.
//!
//! Each loop iteration: take new messages, ask the scheduler for a step, run the model once on
//! the mixed batch, sample a token for every sequence that reached the end of its known
//! tokens, detokenize incrementally, apply stop conditions, and send the events.

mod masks;
mod request;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc as tmpsc;

use crate::backend::BackendError;
use crate::config::{EngineConfig, ModelConfig};
use crate::constraint::{Constraint, ConstraintCompiler, ConstraintError, ConstraintSpec};
use crate::kv::PagePool;
use crate::metrics::Metrics;
use crate::runner::{self, LoadModelError, ModelRunner};
use crate::sampling::{ParamError, SamplingParams, MAX_TOP_LOGPROBS};
pub use crate::sampling::{TokenInfo, TokenLogprob};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// A generation request in token ids (the caller tokenizes).
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub input_ids: Vec<u32>,
    pub params: SamplingParams,
    /// Return the logprob of each generated token.
    pub return_logprob: bool,
    /// Also return this many most likely tokens at each position.
    pub top_logprobs_num: usize,
    /// Return the logprobs of the prompt tokens from this position on (SGLang's
    /// `logprob_start_len`; `None`: none). Position 0 has no logprob, so the engine reports
    /// positions `max(start, 1)..prompt_len`; the prefix cache serves only what precedes them.
    pub logprob_start_len: Option<usize>,
}

/// What made generation stop on a "stop" finish.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Matched {
    Token(u32),
    Text(String),
    /// The request's constraint is complete: nothing but the end of the output may follow
    /// (serialized as null).
    Constraint,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum FinishReason {
    /// An EOS / stop token or a stop string.
    Stop(Matched),
    /// `max_new_tokens` or the context length.
    Length,
    /// Cancelled (client gone, `abort`, shutdown).
    Abort(String),
}

impl FinishReason {
    /// OpenAI's spelling: "stop", "length", "abort".
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop(_) => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort(_) => "abort",
        }
    }
    pub fn matched(&self) -> Option<&Matched> {
        match self {
            FinishReason::Stop(m) => Some(m),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// One step's output for a request: the new token, and the text that became final.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub token_ids: Vec<u32>,
    pub text: String,
    /// Present when the request asked for logprobs (one per token).
    pub logprobs: Vec<TokenInfo>,
    /// Only in a request's first chunk, when it asked for prompt logprobs: one per prompt
    /// position from `max(logprob_start_len, 1)`. With `max_new_tokens` 0 this chunk has no
    /// token and no text.
    pub prompt_logprobs: Vec<TokenInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub usage: Usage,
    /// Seconds from submission to the first generated token.
    pub time_to_first_token: Option<f64>,
}

/// What a [`RequestStream`] yields: chunks, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Chunk(Chunk),
    Finished(Finish),
    Failed(RequestError),
}

/// Why an accepted request did not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The model step carrying the request failed; the engine goes on with other requests.
    #[error("model error: {0}")]
    Model(BackendError),
    /// The model step carrying the request panicked; the engine goes on with other requests.
    #[error("internal error in the model step")]
    Panicked,
    /// The engine stopped for good (a tensor-parallel rank failed); no request can run.
    #[error("the engine stopped: {0}")]
    EngineFailed(String),
    /// The engine thread ended before the request finished (shut down or gone).
    #[error("the engine stopped before the request finished")]
    EngineStopped,
    /// The request's constraint allowed no token, or llguidance gave up on it; its pages are
    /// freed and the engine goes on.
    #[error("structured output failed after {generated} tokens: {message}")]
    Constraint { generated: usize, message: String },
}

/// Why [`EngineHandle::generate_text`] gave no output.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// A request that cannot be accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] ParamError),
    /// Its constraint (`json_schema`, `regex`, `ebnf`) does not compile within the limits.
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("the engine is not accepting requests (draining)")]
    Draining,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("cannot start the engine thread: {0}")]
    Thread(std::io::Error),
}

/// Why a request was cancelled (the `reason` label of `sglang_aborted_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// The receiver went away (HTTP client disconnected, stream dropped).
    ClientDisconnected,
    /// `EngineHandle::abort`.
    Requested,
    /// The per-request time limit passed.
    Timeout,
    /// The engine stopped.
    Shutdown,
}

impl AbortReason {
    /// Its `reason` label (one of `metrics::ABORT_REASONS`).
    pub fn label(self) -> &'static str {
        match self {
            AbortReason::ClientDisconnected => "client_disconnected",
            AbortReason::Requested => "aborted",
            AbortReason::Timeout => "timeout",
            AbortReason::Shutdown => "shutdown",
        }
    }
}

pub(super) enum Msg {
    Submit {
        id: u64,
        req: Box<GenerateRequest>,
        /// Its constraint, compiled by `submit`.
        constraint: Option<Box<Constraint>>,
        tx: tmpsc::UnboundedSender<Event>,
        submitted: Instant,
    },
    Abort {
        id: u64,
        reason: AbortReason,
    },
    FlushCache {
        reply: tokio::sync::oneshot::Sender<usize>,
    },
    CachedPrefixes {
        reply: tokio::sync::oneshot::Sender<Vec<Vec<u32>>>,
    },
    Shutdown,
}

/// Live numbers of the engine, as of the call to [`EngineHandle::stats`]. Those with a
/// Prometheus twin (requests, KV tokens, token counts, aborts, ranks) are read from the
/// metrics registry, the one place the engine thread writes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// KV slots held by running requests.
    pub kv_used_tokens: usize,
    /// KV slots held only by the prefix cache.
    pub kv_evictable_tokens: usize,
    /// KV slots free or reclaimable.
    pub kv_available_tokens: usize,
    pub steps: u64,
    /// Time spent in model forward passes, nanoseconds (server overhead = the rest).
    pub forward_nanos: u64,
    /// Steps that only decoded (one token per sequence), and their forward time.
    pub decode_steps: u64,
    pub decode_forward_nanos: u64,
    /// Milliseconds since the Unix epoch at the end of the last engine loop iteration.
    pub heartbeat_unix_ms: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub retractions: u64,
    pub finished: u64,
    pub aborted: u64,
    /// Tensor-parallel ranks that are up (equal to `EngineInfo::tp_size` while healthy).
    pub tp_ranks_ready: usize,
}

/// The engine's numbers that have no Prometheus twin, written by the engine thread.
#[derive(Debug, Default)]
struct Counters {
    steps: AtomicU64,
    forward_nanos: AtomicU64,
    decode_steps: AtomicU64,
    decode_forward_nanos: AtomicU64,
    heartbeat_unix_ms: AtomicU64,
    retractions: AtomicU64,
    finished: AtomicU64,
}

/// Facts about the loaded engine (fixed after start).
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model_config: ModelConfig,
    pub engine_config: EngineConfig,
    pub backend: &'static str,
    pub context_length: usize,
    pub kv_capacity_tokens: usize,
    pub kv_bytes_per_token: usize,
    pub page_size: usize,
    pub weight_bytes: usize,
    /// Ranks of the tensor-parallel group (1 without tensor parallelism).
    pub tp_size: usize,
    /// Decode batch sizes captured in CUDA graphs (empty: none).
    pub cuda_graph_sizes: Vec<usize>,
    /// Whether decode steps are queued before the tokens of the step before are read (the
    /// overlap scheduler: a backend that can, unless `--disable-overlap-schedule`).
    pub overlap_schedule: bool,
}

pub(super) struct Shared {
    /// The engine thread, joined by `shutdown_and_join`.
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    tokenizer: Arc<Tokenizer>,
    constraints: ConstraintCompiler,
    info: EngineInfo,
    counters: Counters,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    stopped: AtomicBool,
    /// Why the engine stopped on its own (a tensor-parallel rank failed); no step can run.
    fatal: parking_lot::Mutex<Option<String>>,
    draining: AtomicBool,
    max_queued: Option<usize>,
}

/// The way to the engine thread. Cheap to clone; the engine stops when the last handle is
/// dropped (or on [`EngineHandle::shutdown`]).
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// Events of one request. Dropping it aborts the request if it has not finished.
pub struct RequestStream {
    id: u64,
    rx: tmpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<Msg>,
    done: bool,
}

impl RequestStream {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event (async).
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await;
        self.note(&ev);
        ev
    }

    /// The next event, blocking the calling thread (not for async contexts).
    pub fn next_blocking(&mut self) -> Option<Event> {
        let ev = self.rx.blocking_recv();
        self.note(&ev);
        ev
    }

    /// Polls for the next event (for a hand-written future or response body).
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        let ev = std::task::ready!(self.rx.poll_recv(cx));
        self.note(&ev);
        std::task::Poll::Ready(ev)
    }

    fn note(&mut self, ev: &Option<Event>) {
        if matches!(ev, None | Some(Event::Finished(_)) | Some(Event::Failed(_))) {
            self.done = true;
        }
    }

    /// Collects everything until the end (blocking).
    pub fn collect_blocking(mut self) -> Result<Output, RequestError> {
        let mut out = Output::default();
        while let Some(ev) = self.next_blocking() {
            match ev {
                Event::Chunk(c) => out.push(c),
                Event::Finished(f) => {
                    out.finish = Some(f);
                    return Ok(out);
                }
                Event::Failed(e) => return Err(e),
            }
        }
        Err(RequestError::EngineStopped)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Msg::Abort {
                id: self.id,
                reason: AbortReason::ClientDisconnected,
            });
        }
    }
}

/// A whole generation, gathered from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<TokenInfo>,
    /// See [`Chunk::prompt_logprobs`].
    pub prompt_logprobs: Vec<TokenInfo>,
    pub finish: Option<Finish>,
}

impl Output {
    pub fn push(&mut self, c: Chunk) {
        self.token_ids.extend(c.token_ids);
        self.text.push_str(&c.text);
        self.logprobs.extend(c.logprobs);
        self.prompt_logprobs.extend(c.prompt_logprobs);
    }
}

impl EngineHandle {
    /// Loads the model of `cfg` and starts the engine thread.
    pub fn start(cfg: EngineConfig) -> Result<Self, EngineError> {
        Self::start_with_metrics(cfg, Arc::new(Metrics::new()))
    }

    /// Like `start`, recording into `metrics` (the server's registry).
    pub fn start_with_metrics(
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        let tokenizer = match runner::gguf_tokenizer(&cfg)? {
            Some((json, config, path)) => {
                Tokenizer::from_json(&json, &config, &path.display().to_string())?
            }
            None => Tokenizer::from_dir(cfg.model_dir())?,
        };
        let runner = runner::load(&cfg)?;
        Self::start_with(cfg, tokenizer, runner, metrics)
    }

    /// Starts the engine thread on an already loaded model.
    pub fn start_with(
        cfg: EngineConfig,
        mut tokenizer: Tokenizer,
        runner: Box<dyn ModelRunner>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        if let Some(t) = &cfg.chat_template {
            tokenizer.set_chat_template(t.clone());
        }
        let model_config = runner.config().clone();
        let parallel = runner.parallel_state();
        let (pages, page_size) = runner.kv_pages();
        let context_length = cfg
            .context_length
            .unwrap_or(model_config.max_position_embeddings)
            .min(pages * page_size);
        let info = EngineInfo {
            backend: runner.backend_name(),
            context_length,
            kv_capacity_tokens: pages * page_size,
            kv_bytes_per_token: runner.kv_bytes_per_token(),
            page_size,
            weight_bytes: runner.weight_bytes(),
            tp_size: parallel.ranks,
            cuda_graph_sizes: runner.graph_sizes(),
            overlap_schedule: runner.overlaps() && !cfg.disable_overlap_schedule,
            model_config,
            engine_config: cfg.clone(),
        };
        metrics
            .kv_cache_size_bytes
            .set((info.kv_capacity_tokens * info.kv_bytes_per_token) as i64);
        metrics
            .memory_usage_bytes
            .with_label_values(&["weights"])
            .set(info.weight_bytes as i64);
        metrics
            .memory_usage_bytes
            .with_label_values(&["kv_cache"])
            .set((info.kv_capacity_tokens * info.kv_bytes_per_token) as i64);
        metrics.tp_ranks.set(parallel.ranks as i64);
        metrics.tp_ranks_ready.set(parallel.ready as i64);
        let tokenizer = Arc::new(tokenizer);
        let constraints = ConstraintCompiler::new(
            tokenizer.clone(),
            info.model_config.vocab_size,
            &info.model_config.eos_token_ids,
        );
        let shared = Arc::new(Shared {
            thread: parking_lot::Mutex::new(None),
            tokenizer,
            constraints,
            info,
            counters: Counters::default(),
            metrics,
            next_id: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            fatal: parking_lot::Mutex::new(None),
            draining: AtomicBool::new(false),
            max_queued: cfg.max_queued_requests,
        });
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_running: cfg.max_running_requests,
                chunked_prefill_size: cfg.chunked_prefill_size,
                enable_radix_cache: cfg.enable_radix_cache,
            },
            PagePool::new(pages, page_size),
        );
        let overlap = shared.info.overlap_schedule;
        let mut engine =
            worker::EngineLoop::new(rx, runner, shared.clone(), scheduler).with_overlap(overlap);
        // the KV and queue gauges read true from the start, not 0 until the first request
        engine.publish_stats();
        let thread = std::thread::Builder::new()
            .name("sglang-engine".into())
            .spawn(move || engine.run())
            .map_err(EngineError::Thread)?;
        *shared.thread.lock() = Some(thread);
        Ok(Self { tx, shared })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.shared.tokenizer
    }

    pub fn info(&self) -> &EngineInfo {
        &self.shared.info
    }

    /// The engine's live numbers now.
    pub fn stats(&self) -> EngineStats {
        let m = &self.shared.metrics;
        let c = &self.shared.counters;
        let gauge = |g: &prometheus::IntGauge| g.get().max(0) as usize;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            running: gauge(&m.num_running_requests),
            waiting: gauge(&m.request_queue_length),
            kv_used_tokens: gauge(&m.kv_cache_used_tokens),
            kv_evictable_tokens: gauge(&m.kv_cache_evictable_tokens),
            kv_available_tokens: gauge(&m.kv_cache_available_tokens),
            steps: load(&c.steps),
            forward_nanos: load(&c.forward_nanos),
            decode_steps: load(&c.decode_steps),
            decode_forward_nanos: load(&c.decode_forward_nanos),
            heartbeat_unix_ms: load(&c.heartbeat_unix_ms),
            prompt_tokens: m.prompt_tokens_total.get(),
            generated_tokens: m.generation_tokens_total.get(),
            retractions: load(&c.retractions),
            finished: load(&c.finished),
            aborted: m.aborted_total(),
            tp_ranks_ready: gauge(&m.tp_ranks_ready),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The token prefixes the radix cache holds (most recently used first).
    pub fn cached_prefixes(&self) -> tokio::sync::oneshot::Receiver<Vec<Vec<u32>>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Msg::CachedPrefixes { reply });
        rx
    }

    /// Drops the radix prefix cache; resolves to the number of pages it held.
    pub fn flush_cache(&self) -> tokio::sync::oneshot::Receiver<usize> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Msg::FlushCache { reply });
        rx
    }

    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Why the engine stopped by itself (a tensor-parallel rank failed), if it did.
    pub fn fatal_error(&self) -> Option<String> {
        self.shared.fatal.lock().clone()
    }

    /// Stop admitting new requests (SIGTERM); running ones go on.
    pub fn set_draining(&self, on: bool) {
        self.shared.draining.store(on, Ordering::Release);
    }

    /// Requests waiting or running.
    pub fn in_flight(&self) -> usize {
        let m = &self.shared.metrics;
        (m.num_running_requests.get() + m.request_queue_length.get()).max(0) as usize
    }

    /// Checks a request against the model and the engine's limits, without submitting it.
    pub fn validate(&self, req: &GenerateRequest) -> Result<(), ParamError> {
        let info = &self.shared.info;
        let vocab = info.model_config.vocab_size;
        if req.input_ids.is_empty() {
            return Err(ParamError::new("input_ids", "the prompt is empty"));
        }
        if let Some(&id) = req.input_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ParamError::new(
                "input_ids",
                format!("token id {id} is outside the vocabulary (size {vocab})"),
            ));
        }
        if req.input_ids.len() >= info.context_length {
            return Err(ParamError::new(
                "input_ids",
                format!(
                    "the prompt has {} tokens; the context length is {} (prompt + at least one new token)",
                    req.input_ids.len(),
                    info.context_length
                ),
            ));
        }
        req.params.validate(vocab)?;
        if let Some(start) = req.logprob_start_len {
            if start >= req.input_ids.len() {
                return Err(ParamError::new(
                    "logprob_start_len",
                    format!(
                        "must be < the prompt length ({}), got {start}",
                        req.input_ids.len()
                    ),
                ));
            }
        }
        if req.top_logprobs_num > MAX_TOP_LOGPROBS {
            return Err(ParamError::new(
                "top_logprobs_num",
                format!(
                    "must be <= {MAX_TOP_LOGPROBS}, got {}",
                    req.top_logprobs_num
                ),
            ));
        }
        Ok(())
    }

    /// Validates and queues a request. A constraint (`json_schema`, `regex`, `ebnf`) is
    /// compiled here, on the calling thread (at most [`crate::constraint::COMPILE_TIMEOUT`]):
    /// callers on an async runtime submit constrained requests from a blocking thread.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, SubmitError> {
        if self.is_stopped() {
            return Err(SubmitError::Stopped);
        }
        if self.shared.draining.load(Ordering::Acquire) {
            return Err(SubmitError::Draining);
        }
        self.validate(&req)?;
        let constraint = match constraint_spec(&req.params) {
            Some(spec) => Some(Box::new(self.shared.constraints.compile(&spec)?)),
            None => None,
        };
        let queue = &self.shared.metrics.request_queue_length;
        if let Some(max) = self.shared.max_queued {
            let waiting = queue.get().max(0) as usize;
            if waiting >= max {
                return Err(SubmitError::QueueFull(waiting));
            }
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = tmpsc::unbounded_channel();
        // counted as waiting at once, so a burst cannot overrun the queue limit
        queue.inc();
        self.tx
            .send(Msg::Submit {
                id,
                req: Box::new(req),
                constraint,
                tx: etx,
                submitted: Instant::now(),
            })
            .map_err(|_| SubmitError::Stopped)?;
        Ok(RequestStream {
            id,
            rx: erx,
            tx: self.tx.clone(),
            done: false,
        })
    }

    /// Cancels a request (from any thread); its stream ends with an `Abort` finish.
    pub fn abort(&self, id: u64) {
        self.abort_with(id, AbortReason::Requested);
    }

    pub fn abort_with(&self, id: u64, reason: AbortReason) {
        let _ = self.tx.send(Msg::Abort { id, reason });
    }

    /// Stops the engine thread: in-flight requests end with an `Abort` finish.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
    }

    /// Stops the engine thread and waits until it has released the model and the KV cache.
    pub fn shutdown_and_join(&self) {
        self.shutdown();
        let thread = self.shared.thread.lock().take();
        if let Some(t) = thread {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Convenience: tokenize `text`, generate, and gather the result (blocking).
    pub fn generate_text(
        &self,
        text: &str,
        params: SamplingParams,
    ) -> Result<Output, GenerateError> {
        let ids = self.shared.tokenizer.encode(text, true)?;
        let stream = self.submit(GenerateRequest {
            input_ids: ids,
            params,
            ..Default::default()
        })?;
        Ok(stream.collect_blocking()?)
    }
}

/// The constraint `params` asks for (validation allows at most one).
pub fn constraint_spec(params: &SamplingParams) -> Option<ConstraintSpec> {
    if let Some(s) = &params.json_schema {
        return Some(ConstraintSpec::JsonSchema(s.clone()));
    }
    if let Some(r) = &params.regex {
        return Some(ConstraintSpec::Regex(r.clone()));
    }
    params.ebnf.clone().map(ConstraintSpec::Grammar)
}
