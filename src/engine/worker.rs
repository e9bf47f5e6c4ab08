//! The engine thread: owns the model, the scheduler (KV pool, radix cache) and each request's
//! sampling and detokenization state. See the module above for the message protocol.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc as tmpsc;

use super::{
    AbortReason, Chunk, Event, Finish, FinishReason, GenerateRequest, Matched, Msg, Shared,
    TokenInfo, Usage,
};
use crate::backend::StepBatch;
use crate::model::ModelRunner;
use crate::sampling::{
    logprobs_of, SampleBatch, Sampled, Sampler, SamplerState, SamplingParams, StopCheck,
    StopMatcher,
};
use crate::scheduler::{PlanItem, Scheduler, Seq};
use crate::tokenizer::IncrementalDecoder;

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
    /// Prompt logprobs computed so far (sent with the first chunk); from where is the
    /// scheduler's `Seq::logprob_from`.
    prompt_logprobs: Vec<TokenInfo>,
    tx: tmpsc::UnboundedSender<Event>,
    submitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl ReqState {
    /// What sampling this request's next token takes: its parameters, its generator and
    /// penalty state, the top logprobs wanted, whether its logprob is, and the tokens banned
    /// now (the stop tokens until `min_new_tokens` are out).
    fn sampling(&mut self) -> (&SamplingParams, &mut SamplerState, usize, bool, &[u32]) {
        let banned: &[u32] = if self.generated < self.params.min_new_tokens {
            &self.stop_ids
        } else {
            &[]
        };
        (
            &self.params,
            &mut self.sampler,
            self.top_logprobs_num,
            self.return_logprob,
            banned,
        )
    }
}

/// How often an idle engine checks that the ranks of its tensor-parallel group are still up.
const GROUP_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) struct EngineLoop {
    rx: mpsc::Receiver<Msg>,
    runner: Box<dyn ModelRunner>,
    shared: Arc<Shared>,
    sched: Scheduler,
    reqs: HashMap<u64, ReqState>,
    batch: StepBatch,
    sampler: Sampler,
    /// Set by a shutdown message (or when every handle is gone and nothing is left to do).
    stop: bool,
    /// Host copy of the last step's logits (reused).
    logits: Vec<f32>,
    /// The step's sampling when the backend samples on the device (reused).
    samples: SampleBatch,
}

impl EngineLoop {
    pub(super) fn new(
        rx: mpsc::Receiver<Msg>,
        runner: Box<dyn ModelRunner>,
        shared: Arc<Shared>,
        sched: Scheduler,
    ) -> Self {
        Self {
            rx,
            runner,
            shared,
            sched,
            reqs: HashMap::new(),
            batch: StepBatch::default(),
            sampler: Sampler::new(),
            stop: false,
            logits: Vec::new(),
            samples: SampleBatch::default(),
        }
    }

    pub(super) fn run(&mut self) {
        tracing::info!("engine thread started");
        loop {
            // Block only when there is nothing to do.
            if self.sched.is_idle() && !self.stop {
                match self.rx.recv_timeout(GROUP_CHECK_INTERVAL) {
                    Ok(msg) => self.handle(msg),
                    // while idle, notice a tensor-parallel rank that went away
                    Err(mpsc::RecvTimeoutError::Timeout) => self.check_parallel(),
                    Err(mpsc::RecvTimeoutError::Disconnected) => self.stop = true,
                }
            }
            self.drain_messages();
            if self.stop {
                break;
            }
            if !self.sched.is_idle() {
                self.step();
            }
        }
        let ids: Vec<u64> = self.reqs.keys().copied().collect();
        for id in ids {
            self.abort(id, AbortReason::Shutdown);
        }
        self.shared.stopped.store(true, Ordering::Release);
        tracing::info!("engine thread stopped");
    }

    /// Handles every message already waiting; sets `stop` on shutdown, or when every handle
    /// is gone and nothing is left to do.
    fn drain_messages(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(msg) => self.handle(msg),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if self.sched.is_idle() {
                        self.stop = true;
                    }
                    break;
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit {
                id,
                req,
                tx,
                submitted,
            } => self.admit(id, *req, tx, submitted),
            Msg::Abort { id, reason } => self.abort(id, reason),
            Msg::FlushCache { reply } => {
                let pages = self.sched.radix().map_or(0, |r| r.cached_pages());
                self.sched.flush_cache();
                self.publish_stats();
                let _ = reply.send(pages);
            }
            Msg::CachedPrefixes { reply } => {
                let _ = reply.send(self.sched.cached_prefixes());
            }
            Msg::Shutdown => self.stop = true,
        }
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
            prompt_logprobs: Vec::new(),
            tx,
            submitted,
            first_token: None,
            last_token: None,
            params: req.params,
        };
        self.shared
            .stats
            .prompt_tokens
            .fetch_add(prompt_len as u64, Ordering::Relaxed);
        self.shared
            .metrics
            .prompt_tokens_total
            .inc_by(prompt_len as u64);
        // with prompt logprobs wanted, a request for no new tokens still runs its prompt
        let zero_budget = state.max_new_tokens == 0 && req.logprob_start_len.is_none();
        let seq = match req.logprob_start_len {
            Some(from) => Seq::with_prompt_logprobs(id, req.input_ids, from),
            None => Seq::new(id, req.input_ids),
        };
        self.reqs.insert(id, state);
        self.sched.add(seq);
        if zero_budget {
            self.finish(id, FinishReason::Length);
        }
        self.publish_stats();
    }

    fn abort(&mut self, id: u64, reason: AbortReason) {
        if self.reqs.contains_key(&id) {
            self.shared.stats.aborted.fetch_add(1, Ordering::Relaxed);
            self.shared
                .metrics
                .aborted_requests_total
                .with_label_values(&[reason.label()])
                .inc();
            self.finish(id, FinishReason::Abort(reason.label().into()));
        }
    }

    fn publish_stats(&self) {
        let s = &self.shared.stats;
        let m = &self.shared.metrics;
        let pool = self.sched.pool();
        let ps = pool.page_size();
        let evictable = self.sched.evictable_tokens();
        let free = pool.free_pages() * ps;
        let used = pool.used_pages() * ps - evictable;
        s.running.store(self.sched.num_running(), Ordering::Relaxed);
        s.waiting.store(self.sched.num_waiting(), Ordering::Relaxed);
        s.kv_used_tokens.store(used, Ordering::Relaxed);
        s.kv_evictable_tokens.store(evictable, Ordering::Relaxed);
        s.kv_available_tokens
            .store(free + evictable, Ordering::Relaxed);
        m.num_running_requests.set(self.sched.num_running() as i64);
        m.request_queue_length.set(self.sched.num_waiting() as i64);
        m.kv_cache_used_tokens.set(used as i64);
        m.kv_cache_evictable_tokens.set(evictable as i64);
        m.kv_cache_available_tokens.set((free + evictable) as i64);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        s.heartbeat_unix_ms.store(now_ms, Ordering::Relaxed);
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
        let now = Instant::now();
        for &(id, cached) in &plan.admitted {
            if let Some(r) = self.reqs.get_mut(&id) {
                r.cached_tokens = cached;
                let m = &self.shared.metrics;
                m.queue_time_seconds
                    .observe(now.duration_since(r.submitted).as_secs_f64());
                m.cache_hits_total.inc_by(cached as u64);
                m.cache_misses_total.inc_by((r.prompt_len - cached) as u64);
            }
        }
        if plan.is_empty() {
            // Nothing fits (cannot happen while one request alone fits the pool); avoid a spin.
            std::thread::yield_now();
            return;
        }
        self.sched.fill_batch(&plan, &mut self.batch);
        // Sampling on the device when the backend can and no item needs whole logits rows
        // (prompt logprobs): only tokens and logprobs are copied back.
        let on_device = self.runner.samples_on_device() && !plan.items.iter().any(|i| i.all_logits);
        if on_device {
            self.build_samples(&plan);
        }
        let runner = &mut self.runner;
        let batch = &self.batch;
        let samples = &self.samples;
        // what device sampling chose, one per row of `samples`
        let mut sampled = Vec::new();
        // reused across steps: no allocation for the logits in steady state
        let mut logits = std::mem::take(&mut self.logits);
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            if on_device {
                runner.forward_sampled(batch, samples).map(|s| sampled = s)
            } else {
                runner.forward(batch).map(|l| {
                    logits.clear();
                    logits.extend_from_slice(&l);
                })
            }
        }));
        let nanos = started.elapsed().as_nanos() as u64;
        let stats = &self.shared.stats;
        stats.forward_nanos.fetch_add(nanos, Ordering::Relaxed);
        if plan.items.iter().all(|i| i.len == 1) {
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats
                .decode_forward_nanos
                .fetch_add(nanos, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("forward step failed: {e}");
                self.fail_items(&plan, &format!("model error: {e}"));
                self.check_parallel();
                return;
            }
            Err(_) => {
                tracing::error!("forward step panicked");
                self.fail_items(&plan, "internal error in the model step");
                return;
            }
        }
        self.sched.step_done(&plan);
        self.shared.stats.steps.fetch_add(1, Ordering::Relaxed);
        if on_device {
            let ids = plan.items.iter().filter(|i| i.sample).map(|i| i.id);
            for (id, s) in ids.zip(sampled) {
                self.on_sampled(id, Some(s));
            }
        } else {
            self.sample_on_host(&plan, &logits);
        }
        self.logits = logits;
        self.publish_stats();
    }

    /// A tensor-parallel group that lost a rank cannot run another step: every request
    /// fails with the reason and the engine stops (the server then reports unhealthy).
    fn check_parallel(&mut self) {
        let state = self.runner.parallel_state();
        let m = &self.shared.metrics;
        m.tp_ranks_ready.set(state.ready as i64);
        self.shared
            .stats
            .tp_ranks_ready
            .store(state.ready, Ordering::Relaxed);
        let Some(reason) = state.error else {
            return;
        };
        tracing::error!("the engine stops: {reason}");
        let msg = format!("the engine stopped: {reason}");
        for (id, r) in self.reqs.drain() {
            let _ = r.tx.send(Event::Failed(msg.clone()));
            self.sched.remove(id);
        }
        *self.shared.fatal.lock() = Some(reason);
        self.stop = true;
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

    /// Samples each item's logits row on the host (and records prompt logprobs).
    fn sample_on_host(&mut self, plan: &crate::scheduler::Plan, logits: &[f32]) {
        let vocab = self.runner.config().vocab_size;
        let mut row = 0;
        for item in &plan.items {
            let rows = if item.all_logits {
                item.len
            } else {
                usize::from(item.sample)
            };
            let this = row + rows.saturating_sub(1);
            if item.all_logits {
                self.on_prompt_logits(item, &logits[row * vocab..(row + rows) * vocab], vocab);
            }
            row += rows;
            if !item.sample {
                continue;
            }
            let l = &logits[this * vocab..(this + 1) * vocab];
            self.on_logits(item.id, l);
        }
    }

    /// One sampling row per item that samples, in the order of the logits rows.
    fn build_samples(&mut self, plan: &crate::scheduler::Plan) {
        self.samples.clear();
        for item in plan.items.iter().filter(|i| i.sample) {
            match self.reqs.get_mut(&item.id) {
                Some(r) if r.max_new_tokens > 0 => {
                    let (params, state, top, want, banned) = r.sampling();
                    self.samples.push(params, state, top, want, banned);
                }
                _ => self.samples.push_unused(),
            }
        }
    }

    /// Records the prompt logprobs a chunk's logits give (`logits`: one row per token of the
    /// chunk). A chunk computed again after a retraction adds nothing twice.
    fn on_prompt_logits(&mut self, item: &PlanItem, logits: &[f32], vocab: usize) {
        let (Some(r), Some(seq)) = (self.reqs.get_mut(&item.id), self.sched.get(item.id)) else {
            return;
        };
        let from = seq.logprob_from;
        for (k, row) in logits.chunks_exact(vocab).enumerate() {
            // the logits at position p are the distribution of the token at p + 1
            let next = item.start + k + 1;
            if next >= r.prompt_len || next != from + r.prompt_logprobs.len() {
                continue;
            }
            let token_id = seq.tokens[next];
            let (logprob, top_logprobs) = logprobs_of(row, token_id, r.top_logprobs_num);
            r.prompt_logprobs.push(TokenInfo {
                token_id,
                logprob,
                top_logprobs,
            });
        }
    }

    fn on_logits(&mut self, id: u64, logits: &[f32]) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let sampled = (r.max_new_tokens > 0).then(|| {
            let (params, state, top, want, banned) = r.sampling();
            self.sampler
                .sample(logits, params, state, top, want, banned)
        });
        self.on_sampled(id, sampled);
    }

    /// The step's token for request `id` (None: a request that only scores its prompt).
    fn on_sampled(&mut self, id: u64, sampled: Option<Sampled>) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        let Some(Sampled {
            token_id,
            logprob,
            top_logprobs,
        }) = sampled.filter(|_| r.max_new_tokens > 0)
        else {
            // only the prompt was wanted (prompt logprobs, scoring): no token is sampled
            let chunk = Chunk {
                token_ids: Vec::new(),
                text: String::new(),
                logprobs: Vec::new(),
                prompt_logprobs: std::mem::take(&mut r.prompt_logprobs),
            };
            self.deliver(id, chunk, Some(FinishReason::Length));
            return;
        };
        r.sampler.observe(&r.params, token_id);
        r.generated += 1;
        let now = Instant::now();
        let m = &self.shared.metrics;
        match r.last_token {
            None => {
                r.first_token = Some(now);
                m.time_to_first_token_seconds
                    .observe(now.duration_since(r.submitted).as_secs_f64());
            }
            Some(prev) => m
                .inter_token_latency_seconds
                .observe(now.duration_since(prev).as_secs_f64()),
        }
        r.last_token = Some(now);
        m.generation_tokens_total.inc();
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
        let chunk = Chunk {
            token_ids: vec![token_id],
            text,
            logprobs,
            // computed by now: the prompt ends in the step that samples the first token
            prompt_logprobs: std::mem::take(&mut r.prompt_logprobs),
        };
        self.deliver(id, chunk, finish);
    }

    /// Sends a request its chunk, then ends it if `finish` says so.
    fn deliver(&mut self, id: u64, chunk: Chunk, finish: Option<FinishReason>) {
        let Some(r) = self.reqs.get(&id) else {
            return;
        };
        if r.tx.send(Event::Chunk(chunk)).is_err() {
            // The receiver is gone. Whoever dropped it may have said why just before (a
            // timeout, an explicit abort): apply waiting messages first so the reason counts.
            self.drain_messages();
            self.abort(id, AbortReason::ClientDisconnected);
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
        // stats first: a caller that sees the finish also sees the pages returned
        self.publish_stats();
        let _ = r.tx.send(Event::Finished(finish));
    }
}
