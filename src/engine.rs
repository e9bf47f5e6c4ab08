//! The engine thread and [`EngineHandle`], the only way in.
//!
//! One thread owns the model, the KV cache, the scheduler and every request's sampling and
//! detokenization state; nothing else touches them (TGI's actor pattern). Callers (the HTTP
//! server, the C ABI, the CLI) hold a cloneable `EngineHandle`: `submit` validates a request
//! and returns a [`RequestStream`] of [`Event`]s; dropping the stream (a client that went away)
//! or calling `abort` cancels the request, and its pages are freed on the next step.
//!
//! Each loop iteration: take new messages, ask the scheduler for a step, run the model once on
//! the mixed batch, sample a token for every sequence that reached the end of its known
//! tokens, detokenize incrementally, apply stop conditions, and send the events.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc as tmpsc;

use crate::backend::StepBatch;
use crate::config::{EngineConfig, ModelConfig};
use crate::kv::PagePool;
use crate::model::{self, LoadModelError, ModelRunner};
use crate::sampling::{
    ParamError, Sampled, Sampler, SamplerState, SamplingParams, StopCheck, StopMatcher,
    TokenLogprob, MAX_TOP_LOGPROBS,
};
use crate::scheduler::{Scheduler, SchedulerConfig, Seq};
use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

/// A generation request in token ids (the caller tokenizes).
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub input_ids: Vec<u32>,
    pub params: SamplingParams,
    /// Return the logprob of each generated token.
    pub return_logprob: bool,
    /// Also return this many most likely tokens at each position.
    pub top_logprobs_num: usize,
}

/// Logprob information of one generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenInfo {
    pub token_id: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<TokenLogprob>,
}

/// What made generation stop on a "stop" finish.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Matched {
    Token(u32),
    Text(String),
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
    Failed(String),
}

/// A request that cannot be accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] ParamError),
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

enum Msg {
    Submit {
        id: u64,
        req: Box<GenerateRequest>,
        tx: tmpsc::UnboundedSender<Event>,
        submitted: Instant,
    },
    Abort {
        id: u64,
        reason: String,
    },
    Shutdown,
}

/// Live numbers of the engine, updated by the engine thread every step.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_used_tokens: AtomicUsize,
    pub steps: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub retractions: AtomicU64,
    pub finished: AtomicU64,
    pub aborted: AtomicU64,
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
}

struct Shared {
    tokenizer: Arc<Tokenizer>,
    info: EngineInfo,
    stats: EngineStats,
    next_id: AtomicU64,
    stopped: AtomicBool,
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

    fn note(&mut self, ev: &Option<Event>) {
        if matches!(ev, None | Some(Event::Finished(_)) | Some(Event::Failed(_))) {
            self.done = true;
        }
    }

    /// Collects everything until the end (blocking).
    pub fn collect_blocking(mut self) -> Result<Output, String> {
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
        Err("the engine stopped before the request finished".into())
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Msg::Abort {
                id: self.id,
                reason: "client disconnected".into(),
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
    pub finish: Option<Finish>,
}

impl Output {
    pub fn push(&mut self, c: Chunk) {
        self.token_ids.extend(c.token_ids);
        self.text.push_str(&c.text);
        self.logprobs.extend(c.logprobs);
    }
}

impl EngineHandle {
    /// Loads the model of `cfg` and starts the engine thread.
    pub fn start(cfg: EngineConfig) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::from_dir(&cfg.model_path)?;
        let runner = model::load(&cfg)?;
        Self::start_with(cfg, tokenizer, runner)
    }

    /// Starts the engine thread on an already loaded model.
    pub fn start_with(
        cfg: EngineConfig,
        tokenizer: Tokenizer,
        runner: Box<dyn ModelRunner>,
    ) -> Result<Self, EngineError> {
        let model_config = runner.config().clone();
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
            model_config,
            engine_config: cfg.clone(),
        };
        let shared = Arc::new(Shared {
            tokenizer: Arc::new(tokenizer),
            info,
            stats: EngineStats::default(),
            next_id: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            max_queued: cfg.max_queued_requests,
        });
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_running: cfg.max_running_requests,
                chunked_prefill_size: cfg.chunked_prefill_size,
            },
            PagePool::new(pages, page_size),
        );
        let mut engine = EngineLoop {
            rx,
            runner,
            shared: shared.clone(),
            sched: scheduler,
            reqs: HashMap::new(),
            batch: StepBatch::default(),
            sampler: Sampler::new(),
        };
        std::thread::Builder::new()
            .name("sglang-engine".into())
            .spawn(move || engine.run())
            .map_err(EngineError::Thread)?;
        Ok(Self { tx, shared })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.shared.tokenizer
    }

    pub fn info(&self) -> &EngineInfo {
        &self.shared.info
    }

    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Stop admitting new requests (SIGTERM); running ones go on.
    pub fn set_draining(&self, on: bool) {
        self.shared.draining.store(on, Ordering::Release);
    }

    /// Requests waiting or running.
    pub fn in_flight(&self) -> usize {
        self.shared.stats.running.load(Ordering::Relaxed)
            + self.shared.stats.waiting.load(Ordering::Relaxed)
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

    /// Validates and queues a request.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, SubmitError> {
        if self.is_stopped() {
            return Err(SubmitError::Stopped);
        }
        if self.shared.draining.load(Ordering::Acquire) {
            return Err(SubmitError::Draining);
        }
        self.validate(&req)?;
        if let Some(max) = self.shared.max_queued {
            let waiting = self.shared.stats.waiting.load(Ordering::Relaxed);
            if waiting >= max {
                return Err(SubmitError::QueueFull(waiting));
            }
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = tmpsc::unbounded_channel();
        // counted as waiting at once, so a burst cannot overrun the queue limit
        self.shared.stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Msg::Submit {
                id,
                req: Box::new(req),
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
        let _ = self.tx.send(Msg::Abort {
            id,
            reason: "aborted".into(),
        });
    }

    /// Stops the engine thread: in-flight requests end with an `Abort` finish.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
    }

    /// Convenience: tokenize `text`, generate, and gather the result (blocking).
    pub fn generate_text(&self, text: &str, params: SamplingParams) -> Result<Output, String> {
        let ids = self
            .shared
            .tokenizer
            .encode(text, true)
            .map_err(|e| e.to_string())?;
        let stream = self
            .submit(GenerateRequest {
                input_ids: ids,
                params,
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
        stream.collect_blocking()
    }
}

/// Per-request state the engine thread keeps besides the scheduler's token list.
struct ReqState {
    params: SamplingParams,
    sampler: SamplerState,
    detok: IncrementalDecoder,
    /// All text so far (before stop trimming) and how much of it was sent.
    text: String,
    sent: usize,
    stop: StopMatcher,
    stop_ids: Vec<u32>,
    max_new_tokens: usize,
    generated: usize,
    prompt_len: usize,
    cached_tokens: usize,
    return_logprob: bool,
    top_logprobs_num: usize,
    tx: tmpsc::UnboundedSender<Event>,
    submitted: Instant,
    first_token: Option<Instant>,
}

struct EngineLoop {
    rx: mpsc::Receiver<Msg>,
    runner: Box<dyn ModelRunner>,
    shared: Arc<Shared>,
    sched: Scheduler,
    reqs: HashMap<u64, ReqState>,
    batch: StepBatch,
    sampler: Sampler,
}

impl EngineLoop {
    fn run(&mut self) {
        tracing::info!("engine thread started");
        'outer: loop {
            // Block only when there is nothing to do.
            if self.sched.is_idle() {
                match self.rx.recv() {
                    Ok(msg) => {
                        if !self.handle(msg) {
                            break 'outer;
                        }
                    }
                    Err(_) => break 'outer,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(msg) => {
                        if !self.handle(msg) {
                            break 'outer;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.sched.is_idle() {
                            break 'outer;
                        }
                        break;
                    }
                }
            }
            if !self.sched.is_idle() {
                self.step();
            }
        }
        let ids: Vec<u64> = self.reqs.keys().copied().collect();
        for id in ids {
            self.finish(id, FinishReason::Abort("engine shut down".into()));
        }
        self.shared.stopped.store(true, Ordering::Release);
        tracing::info!("engine thread stopped");
    }

    /// Returns false on shutdown.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Submit {
                id,
                req,
                tx,
                submitted,
            } => self.admit(id, *req, tx, submitted),
            Msg::Abort { id, reason } => {
                if self.reqs.contains_key(&id) {
                    self.shared.stats.aborted.fetch_add(1, Ordering::Relaxed);
                    self.finish(id, FinishReason::Abort(reason));
                }
            }
            Msg::Shutdown => return false,
        }
        true
    }

    fn admit(
        &mut self,
        id: u64,
        req: GenerateRequest,
        tx: tmpsc::UnboundedSender<Event>,
        submitted: Instant,
    ) {
        let info = &self.shared.info;
        let prompt_len = req.input_ids.len();
        // The context length and the pool bound the output (finish reason "length").
        let room = info.context_length.saturating_sub(prompt_len);
        let max_new_tokens = req.params.max_new_tokens.min(room);
        let mut stop_ids = req.params.stop_token_ids.clone();
        if !req.params.ignore_eos {
            stop_ids.extend(&info.model_config.eos_token_ids);
        }
        let state = ReqState {
            sampler: SamplerState::new(&req.params, &req.input_ids),
            detok: IncrementalDecoder::new(req.params.skip_special_tokens),
            text: String::new(),
            sent: 0,
            stop: StopMatcher::new(&req.params.stop),
            stop_ids,
            max_new_tokens,
            generated: 0,
            prompt_len,
            cached_tokens: 0,
            return_logprob: req.return_logprob,
            top_logprobs_num: req.top_logprobs_num,
            tx,
            submitted,
            first_token: None,
            params: req.params,
        };
        self.shared
            .stats
            .prompt_tokens
            .fetch_add(prompt_len as u64, Ordering::Relaxed);
        let zero_budget = state.max_new_tokens == 0;
        self.reqs.insert(id, state);
        self.sched.add(Seq::new(id, req.input_ids));
        if zero_budget {
            self.finish(id, FinishReason::Length);
        }
        self.publish_stats();
    }

    fn publish_stats(&self) {
        let s = &self.shared.stats;
        s.running.store(self.sched.num_running(), Ordering::Relaxed);
        s.waiting.store(self.sched.num_waiting(), Ordering::Relaxed);
        let pool = self.sched.pool();
        s.kv_used_tokens
            .store(pool.used_pages() * pool.page_size(), Ordering::Relaxed);
    }

    fn step(&mut self) {
        let plan = self.sched.schedule();
        if !plan.retracted.is_empty() {
            tracing::debug!(
                "KV pool full: retracted {} request(s)",
                plan.retracted.len()
            );
            self.shared
                .stats
                .retractions
                .fetch_add(plan.retracted.len() as u64, Ordering::Relaxed);
        }
        if plan.is_empty() {
            // Nothing fits (cannot happen while one request alone fits the pool); avoid a spin.
            std::thread::yield_now();
            return;
        }
        self.sched.fill_batch(&plan, &mut self.batch);
        let runner = &mut self.runner;
        let batch = &self.batch;
        let result = catch_unwind(AssertUnwindSafe(|| {
            runner.forward(batch).map(|l| l.into_owned())
        }));
        let logits = match result {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::error!("forward step failed: {e}");
                self.fail_items(&plan, &format!("model error: {e}"));
                return;
            }
            Err(_) => {
                tracing::error!("forward step panicked");
                self.fail_items(&plan, "internal error in the model step");
                return;
            }
        };
        self.sched.step_done(&plan);
        self.shared.stats.steps.fetch_add(1, Ordering::Relaxed);
        let vocab = self.runner.config().vocab_size;
        let mut row = 0;
        for item in &plan.items {
            let rows = if item.all_logits {
                item.len
            } else {
                usize::from(item.sample)
            };
            let this = row + rows.saturating_sub(1);
            row += rows;
            if !item.sample {
                continue;
            }
            let l = &logits[this * vocab..(this + 1) * vocab];
            self.on_logits(item.id, l);
        }
        self.publish_stats();
    }

    fn fail_items(&mut self, plan: &crate::scheduler::Plan, msg: &str) {
        for item in &plan.items {
            if let Some(r) = self.reqs.remove(&item.id) {
                let _ = r.tx.send(Event::Failed(msg.to_string()));
            }
            self.sched.remove(item.id);
        }
        self.publish_stats();
    }

    fn on_logits(&mut self, id: u64, logits: &[f32]) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let banned: &[u32] = if r.generated < r.params.min_new_tokens {
            &r.stop_ids
        } else {
            &[]
        };
        let Sampled {
            token_id,
            logprob,
            top_logprobs,
        } = self.sampler.sample(
            logits,
            &r.params,
            &mut r.sampler,
            r.top_logprobs_num,
            r.return_logprob,
            banned,
        );
        r.sampler.observe(&r.params, token_id);
        r.generated += 1;
        if r.first_token.is_none() {
            r.first_token = Some(Instant::now());
        }
        self.shared
            .stats
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);
        self.sched.push_token(id, token_id);

        let tok = &self.shared.tokenizer;
        let mut finish = None;
        let mut text_end;
        let stop_token = r.stop_ids.contains(&token_id);
        if stop_token {
            // The stop token's own text is not part of the output.
            if let Ok(rest) = r.detok.finish(tok) {
                r.text.push_str(&rest);
            }
            text_end = r.text.len();
            finish = Some(FinishReason::Stop(Matched::Token(token_id)));
        } else {
            let before = r.text.len();
            match r.detok.push(tok, token_id) {
                Ok(delta) => r.text.push_str(&delta),
                Err(e) => tracing::warn!("detokenization failed: {e}"),
            }
            let at_limit = r.generated >= r.max_new_tokens;
            if at_limit {
                if let Ok(rest) = r.detok.finish(tok) {
                    r.text.push_str(&rest);
                }
            }
            match r.stop.check(&r.text, before) {
                StopCheck::Stop { at, matched } => {
                    text_end = if r.params.no_stop_trim {
                        at + matched.len()
                    } else {
                        at
                    };
                    finish = Some(FinishReason::Stop(Matched::Text(matched)));
                }
                StopCheck::Continue { safe_len } => {
                    text_end = safe_len;
                    if at_limit {
                        text_end = r.text.len();
                        finish = Some(FinishReason::Length);
                    }
                }
            }
        }
        text_end = text_end.max(r.sent);
        let text = r.text[r.sent..text_end].to_string();
        r.sent = text_end;
        let logprobs = if r.return_logprob || r.top_logprobs_num > 0 {
            vec![TokenInfo {
                token_id,
                logprob,
                top_logprobs,
            }]
        } else {
            Vec::new()
        };
        let sent = r.tx.send(Event::Chunk(Chunk {
            token_ids: vec![token_id],
            text,
            logprobs,
        }));
        if sent.is_err() {
            // the receiver is gone: the client disconnected
            self.shared.stats.aborted.fetch_add(1, Ordering::Relaxed);
            self.finish(id, FinishReason::Abort("client disconnected".into()));
            return;
        }
        if let Some(reason) = finish {
            self.finish(id, reason);
        }
    }

    /// Ends a request: frees its pages and sends the final event.
    fn finish(&mut self, id: u64, reason: FinishReason) {
        self.sched.remove(id);
        let Some(r) = self.reqs.remove(&id) else {
            return;
        };
        self.shared.stats.finished.fetch_add(1, Ordering::Relaxed);
        let finish = Finish {
            reason,
            usage: Usage {
                prompt_tokens: r.prompt_len,
                completion_tokens: r.generated,
                cached_tokens: r.cached_tokens,
            },
            time_to_first_token: r
                .first_token
                .map(|t| t.duration_since(r.submitted).as_secs_f64()),
        };
        let _ = r.tx.send(Event::Finished(finish));
        self.publish_stats();
    }
}
