//! The engine thread: owns the model, the scheduler (KV pool, radix cache, and every request's
//! state, one [`Seq`] each) and the sampler. See the module above for the message protocol.
//!
//! Where the runner samples on the device and can queue steps ahead (CUDA), a step is queued
//! and its tokens read on the next turn of the loop; in between, when the next step is the
//! decode of the same requests, it is planned and queued first, its input naming the tokens
//! not read yet (`FUTURE_TOKEN`), so that the host's work on one step (reading, detokenising,
//! stop checks, planning and packing the next) happens while the GPU runs the next (the
//! overlap scheduler; `EngineLoop::queue_next` says when it applies).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc as tmpsc;

use super::masks::{Done, Job, Masker};
use super::request::Request;
use super::{
    AbortReason, Chunk, Event, Finish, FinishReason, GenerateRequest, Msg, RequestError, Shared,
    Usage,
};
use crate::backend::BackendError;
use crate::batch::{StepBatch, FUTURE_TOKEN};
use crate::constraint::Constraint;
use crate::runner::ModelRunner;
use crate::sampling::{logprobs_of, SampleBatch, Sampler, TokenInfo};
use crate::scheduler::{Plan, PlanItem, Scheduler};

type Seq = crate::scheduler::Seq<Request>;

/// How often an idle engine checks that the ranks of its tensor-parallel group are still up.
const GROUP_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) struct EngineLoop {
    rx: mpsc::Receiver<Msg>,
    runner: Box<dyn ModelRunner>,
    shared: Arc<Shared>,
    sched: Scheduler<Request>,
    batch: StepBatch,
    sampler: Sampler,
    /// Set by a shutdown message (or when every handle is gone and nothing is left to do).
    stop: bool,
    /// Host copy of the last step's logits (reused).
    logits: Vec<f32>,
    /// The step's sampling when the backend samples on the device (reused).
    samples: SampleBatch,
    /// The helper thread computing constraint masks during the forward pass.
    masker: Option<Masker>,
    /// Masks computed on this thread when the helper is not there.
    mask_results: Vec<Done>,
    /// Queue decode steps ahead of their tokens (the overlap scheduler; backends that can).
    overlap: bool,
    /// The step queued on the device whose tokens have not been read yet.
    in_flight: Option<InFlight>,
    /// When the last queued step's tokens were read (forward time is counted from there).
    last_read: Instant,
    /// Sampling rows of finished steps, for reuse.
    spare_samples: Vec<SampleBatch>,
}

/// A step queued on the device whose tokens the engine reads later.
struct InFlight {
    plan: Plan,
    samples: SampleBatch,
    queued: Instant,
    /// Whether the scheduler has recorded the step as done (it has when the next step was
    /// planned on top of it).
    done: bool,
}

impl EngineLoop {
    pub(super) fn new(
        rx: mpsc::Receiver<Msg>,
        runner: Box<dyn ModelRunner>,
        shared: Arc<Shared>,
        sched: Scheduler<Request>,
    ) -> Self {
        Self {
            rx,
            runner,
            shared,
            sched,
            batch: StepBatch::default(),
            sampler: Sampler::new(),
            stop: false,
            logits: Vec::new(),
            samples: SampleBatch::default(),
            masker: None,
            mask_results: Vec::new(),
            overlap: false,
            in_flight: None,
            last_read: Instant::now(),
            spare_samples: Vec::new(),
        }
    }

    /// Queues each decode step before the tokens of the one before are read, where the
    /// runner can (`ModelRunner::overlaps`).
    pub(super) fn with_overlap(mut self, on: bool) -> Self {
        self.overlap = on && self.runner.overlaps();
        self
    }

    pub(super) fn run(&mut self) {
        tracing::info!("engine thread started");
        loop {
            // Block only when there is nothing to do.
            if self.sched.is_idle() && self.in_flight.is_none() && !self.stop {
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
            if !self.sched.is_idle() || self.in_flight.is_some() {
                self.step();
            }
        }
        if let Some(f) = self.in_flight.take() {
            self.read_in_flight(f, None);
        }
        for id in self.sched.ids() {
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
                constraint,
                tx,
                submitted,
            } => self.admit(id, *req, constraint, tx, submitted),
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
        constraint: Option<Box<Constraint>>,
        tx: tmpsc::UnboundedSender<Event>,
        submitted: Instant,
    ) {
        let info = &self.shared.info;
        let prompt_len = req.input_ids.len();
        // The context length and the pool bound the output (finish reason "length").
        let room = info.context_length.saturating_sub(prompt_len);
        let eos = &info.model_config.eos_token_ids;
        let state = Request::new(&req, constraint, room, eos, tx, submitted);
        self.shared
            .metrics
            .prompt_tokens_total
            .inc_by(prompt_len as u64);
        // with prompt logprobs wanted, a request for no new tokens still runs its prompt
        let zero_budget = state.max_new_tokens == 0 && req.logprob_start_len.is_none();
        let seq = Seq::new(id, req.input_ids, state);
        self.sched.add(match req.logprob_start_len {
            Some(from) => seq.with_prompt_logprobs(from),
            None => seq,
        });
        if zero_budget {
            self.finish(id, FinishReason::Length);
        }
        self.publish_stats();
    }

    fn abort(&mut self, id: u64, reason: AbortReason) {
        if self.sched.get(id).is_some() {
            self.shared
                .metrics
                .aborted_requests_total
                .with_label_values(&[reason.label()])
                .inc();
            self.finish(id, FinishReason::Abort(reason.label().into()));
        }
    }

    /// Writes the scheduler's state into the metrics registry (which
    /// [`EngineHandle::stats`](super::EngineHandle::stats) reads back) and the heartbeat.
    pub(super) fn publish_stats(&self) {
        let m = &self.shared.metrics;
        let pool = self.sched.pool();
        let ps = pool.page_size();
        let evictable = self.sched.evictable_tokens();
        let free = pool.free_pages() * ps;
        let used = pool.used_pages() * ps - evictable;
        m.num_running_requests.set(self.sched.num_running() as i64);
        m.request_queue_length.set(self.sched.num_waiting() as i64);
        m.kv_cache_used_tokens.set(used as i64);
        m.kv_cache_evictable_tokens.set(evictable as i64);
        m.kv_cache_available_tokens.set((free + evictable) as i64);
        let total = pool.total_pages() * ps;
        m.kv_cache_usage_ratio.set(if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        });
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.shared
            .counters
            .heartbeat_unix_ms
            .store(now_ms, Ordering::Relaxed);
    }

    fn step(&mut self) {
        if let Some(mut f) = self.in_flight.take() {
            // the overlap: the next step goes to the device before this one's tokens are read
            let next = self.queue_next(&mut f);
            self.read_in_flight(f, next);
            return;
        }
        let plan = self.sched.schedule();
        let counters = &self.shared.counters;
        if !plan.retracted.is_empty() {
            tracing::debug!(
                "KV pool full: retracted {} request(s)",
                plan.retracted.len()
            );
            counters
                .retractions
                .fetch_add(plan.retracted.len() as u64, Ordering::Relaxed);
        }
        let now = Instant::now();
        for &(id, cached) in &plan.admitted {
            if let Some(seq) = self.sched.get(id) {
                let m = &self.shared.metrics;
                m.queue_time_seconds
                    .observe(now.duration_since(seq.req.submitted).as_secs_f64());
                m.cache_hits_total.inc_by(cached as u64);
                m.cache_misses_total
                    .inc_by((seq.prompt_len - cached) as u64);
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
        // the constrained items' masks are computed beside the forward pass
        let constrained: Vec<u64> = plan
            .items
            .iter()
            .filter(|i| i.sample)
            .filter(|i| {
                self.sched
                    .get(i.id)
                    .is_some_and(|s| s.req.constraint.is_some() && s.req.max_new_tokens > 0)
            })
            .map(|i| i.id)
            .collect();
        let masking = self.start_masks(&constrained);
        // without masks to wait for, the step's sampling rows go with its input (one copy, a
        // replayed graph for a decode step): built now, from the requests' state before it
        let sampled_with_step = on_device && constrained.is_empty();
        if sampled_with_step {
            self.build_samples(&plan);
            if self.overlap {
                // queued; its tokens are read by the next call, after the step after it is
                // queued when it can be
                self.in_flight = self.queue(plan);
                return;
            }
        }
        let vocab = self.runner.config().vocab_size;
        let runner = &mut self.runner;
        let batch = &self.batch;
        let samples = &self.samples;
        // reused across steps: no allocation for the logits in steady state
        let mut logits = std::mem::take(&mut self.logits);
        let mut sampled = None;
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            if sampled_with_step {
                runner
                    .forward_sampled(batch, samples)
                    .and_then(|s| checked(s, vocab))
                    .map(|s| sampled = Some(s))
            } else if on_device {
                runner.forward_kept(batch).map(|_| ())
            } else {
                runner.forward(batch).map(|l| {
                    logits.clear();
                    logits.extend_from_slice(&l);
                })
            }
        }));
        let mask_failures = self.finish_masks(masking);
        let nanos = started.elapsed().as_nanos() as u64;
        let counters = &self.shared.counters;
        counters.forward_nanos.fetch_add(nanos, Ordering::Relaxed);
        if plan.items.iter().all(|i| i.len == 1) {
            counters.decode_steps.fetch_add(1, Ordering::Relaxed);
            counters
                .decode_forward_nanos
                .fetch_add(nanos, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("forward step failed: {e}");
                let error = match e {
                    // the tensor-parallel group stopped: no step can run again
                    BackendError::Collective(c) => RequestError::EngineFailed(c.reason().into()),
                    e => RequestError::Model(e),
                };
                self.fail_items(&plan, error);
                self.check_parallel();
                return;
            }
            Err(_) => {
                tracing::error!("forward step panicked");
                self.fail_items(&plan, RequestError::Panicked);
                return;
            }
        }
        self.sched.step_done(&plan);
        counters.steps.fetch_add(1, Ordering::Relaxed);
        for (id, message) in mask_failures {
            self.fail_constraint(id, message);
        }
        let replays = self.runner.graph_replays();
        let m = &self.shared.metrics;
        m.cuda_graph_replays_total
            .inc_by(replays.saturating_sub(m.cuda_graph_replays_total.get()));
        if let Some(sampled) = sampled {
            let ids = plan.items.iter().filter(|i| i.sample).map(|i| i.id);
            for (id, s) in ids.zip(sampled) {
                self.on_sampled(id, Some(s));
            }
        } else if on_device {
            self.build_samples(&plan);
            let sampled = catch_unwind(AssertUnwindSafe(|| {
                checked(self.runner.sample_kept(&self.samples)?, vocab)
            }));
            let sampled = match sampled {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::error!("sampling failed: {e}");
                    self.fail_items(&plan, RequestError::Model(e));
                    self.logits = logits;
                    return;
                }
                Err(_) => {
                    tracing::error!("sampling panicked");
                    self.fail_items(&plan, RequestError::Panicked);
                    self.logits = logits;
                    return;
                }
            };
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

    /// Queues `plan` (its batch filled, its sampling rows built) without waiting for it; the
    /// step in flight, or None when it could not be queued (its requests have failed).
    fn queue(&mut self, plan: Plan) -> Option<InFlight> {
        let runner = &mut self.runner;
        let (batch, samples) = (&self.batch, &self.samples);
        let queued = Instant::now();
        let error = match catch_unwind(AssertUnwindSafe(|| runner.launch_sampled(batch, samples))) {
            Ok(Ok(())) => {
                let spare = self.spare_samples.pop().unwrap_or_default();
                return Some(InFlight {
                    plan,
                    samples: std::mem::replace(&mut self.samples, spare),
                    queued,
                    done: false,
                });
            }
            Ok(Err(e)) => {
                tracing::error!("forward step failed: {e}");
                RequestError::Model(e)
            }
            Err(_) => {
                tracing::error!("forward step panicked");
                RequestError::Panicked
            }
        };
        self.fail_items(&plan, error);
        None
    }

    /// While step `f` runs, plans and queues the step after it when that step is the decode
    /// of the same sequences, whatever their tokens: each sequence's next input is the token
    /// `f` samples for it, named by its row ([`FUTURE_TOKEN`]) and read on the device. Not
    /// when the tokens steer what comes next on the host: constraints, penalties (their
    /// lists are built from the tokens), a request `f` ends by length (it leaves the step),
    /// waiting requests that could join, a pool that would have to evict or retract. A
    /// request that `f` ends otherwise (a stop token or string) runs one step more, whose
    /// token is dropped. Returns the queued step.
    fn queue_next(&mut self, f: &mut InFlight) -> Option<InFlight> {
        if self.stop
            || f.plan.items.len() != self.sched.num_running()
            || !f.plan.items.iter().all(|i| i.len == 1 && i.sample)
        {
            return None;
        }
        let mut next = Vec::with_capacity(f.plan.items.len());
        for (row, item) in f.plan.items.iter().enumerate() {
            let seq = self.sched.get(item.id)?;
            let r = &seq.req;
            if r.constraint.is_some() || r.params.has_penalties() {
                return None;
            }
            if seq.generated() + 1 < r.max_new_tokens {
                next.push((item.id, row as u32));
            }
        }
        let ids: Vec<u64> = next.iter().map(|&(id, _)| id).collect();
        if ids.is_empty() || !self.sched.can_decode_again(&ids) {
            return None;
        }
        for &(id, row) in &next {
            self.sched.get_mut(id)?.tokens.push(FUTURE_TOKEN | row);
        }
        self.sched.step_done(&f.plan);
        f.done = true;
        let plan = self.sched.schedule();
        debug_assert!(
            plan.retracted.is_empty()
                && plan.admitted.is_empty()
                && plan.items.iter().map(|i| i.id).eq(ids.iter().copied()),
            "the step planned ahead is the decode of {ids:?}: {plan:?}"
        );
        self.sched.fill_batch(&plan, &mut self.batch);
        self.build_samples(&plan);
        self.queue(plan)
    }

    /// Reads the tokens of the queued step `f` (waiting for it) and hands them out; `next`
    /// is the step queued after it, which becomes the one in flight.
    fn read_in_flight(&mut self, f: InFlight, next: Option<InFlight>) {
        let runner = &mut self.runner;
        let samples = &f.samples;
        let vocab = runner.config().vocab_size;
        let sampled = catch_unwind(AssertUnwindSafe(|| {
            checked(runner.collect_sampled(samples)?, vocab)
        }));
        let now = Instant::now();
        // the device's time on this step: from when it was queued or the last step was read
        let nanos = now.duration_since(f.queued.max(self.last_read)).as_nanos() as u64;
        self.last_read = now;
        let counters = &self.shared.counters;
        counters.forward_nanos.fetch_add(nanos, Ordering::Relaxed);
        if f.plan.items.iter().all(|i| i.len == 1) {
            counters.decode_steps.fetch_add(1, Ordering::Relaxed);
            counters
                .decode_forward_nanos
                .fetch_add(nanos, Ordering::Relaxed);
        }
        let error = match sampled {
            Ok(Ok(sampled)) => {
                if !f.done {
                    self.sched.step_done(&f.plan);
                }
                self.shared.counters.steps.fetch_add(1, Ordering::Relaxed);
                let replays = self.runner.graph_replays();
                let m = &self.shared.metrics;
                m.cuda_graph_replays_total
                    .inc_by(replays.saturating_sub(m.cuda_graph_replays_total.get()));
                let ids = f.plan.items.iter().filter(|i| i.sample).map(|i| i.id);
                for (id, s) in ids.zip(sampled) {
                    self.on_sampled(id, Some(s));
                }
                self.spare_samples.push(f.samples);
                self.in_flight = next;
                self.publish_stats();
                return;
            }
            Ok(Err(e)) => {
                tracing::error!("forward step failed: {e}");
                match e {
                    BackendError::Collective(c) => RequestError::EngineFailed(c.reason().into()),
                    e => RequestError::Model(e),
                }
            }
            Err(_) => {
                tracing::error!("forward step panicked");
                RequestError::Panicked
            }
        };
        // the step queued after it read its tokens: it fails with it
        self.fail_items(&f.plan, error.clone());
        if let Some(n) = next {
            let runner = &mut self.runner;
            let _ = catch_unwind(AssertUnwindSafe(|| runner.collect_sampled(&n.samples)));
            self.fail_items(&n.plan, error);
        }
        self.check_parallel();
    }

    /// A tensor-parallel group that lost a rank cannot run another step: every request
    /// fails with the reason and the engine stops (the server then reports unhealthy).
    fn check_parallel(&mut self) {
        let state = self.runner.parallel_state();
        self.shared.metrics.tp_ranks_ready.set(state.ready as i64);
        let Some(reason) = state.error else {
            return;
        };
        tracing::error!("the engine stops: {reason}");
        for id in self.sched.ids() {
            if let Some(seq) = self.sched.remove(id) {
                let _ = seq
                    .req
                    .tx
                    .send(Event::Failed(RequestError::EngineFailed(reason.clone())));
            }
        }
        *self.shared.fatal.lock() = Some(reason);
        self.stop = true;
        self.publish_stats();
    }

    /// Sends the constraints of the sequences `ids` to the mask helper (started on first
    /// use); returns the ids sent, whose constraints `finish_masks` puts back.
    fn start_masks(&mut self, ids: &[u64]) -> Vec<u64> {
        if ids.is_empty() {
            return Vec::new();
        }
        if self.masker.is_none() {
            match Masker::start() {
                Ok(m) => self.masker = Some(m),
                Err(e) => tracing::error!("cannot start the mask thread: {e}"),
            }
        }
        let jobs: Vec<Job> = ids
            .iter()
            .filter_map(|&id| Some((id, self.sched.get_mut(id)?.req.constraint.take()?)))
            .collect();
        let sent: Vec<u64> = jobs.iter().map(|j| j.0).collect();
        let outcome = match &self.masker {
            Some(m) => m.submit(jobs),
            None => Err(jobs),
        };
        match outcome {
            Ok(()) => sent,
            Err(jobs) => {
                // no helper: the masks are computed here, after all
                for (id, mut c) in jobs {
                    let r = c.compute_mask();
                    self.mask_results.push((id, c, r));
                }
                Vec::new()
            }
        }
    }

    /// Waits for the masks `start_masks` sent, puts the constraints back, and returns the
    /// requests whose constraint failed.
    fn finish_masks(&mut self, sent: Vec<u64>) -> Vec<(u64, String)> {
        let mut done = std::mem::take(&mut self.mask_results);
        if !sent.is_empty() {
            match self.masker.as_ref().and_then(Masker::collect) {
                Some(back) => done.extend(back),
                None => {
                    self.masker = None;
                    return sent
                        .into_iter()
                        .map(|id| (id, "the mask thread stopped".to_string()))
                        .collect();
                }
            }
        }
        let mut failed = Vec::new();
        for (id, c, r) in done {
            if let Some(seq) = self.sched.get_mut(id) {
                seq.req.constraint = Some(c);
            }
            if let Err(e) = r {
                failed.push((id, e));
            }
        }
        failed
    }

    /// Ends a request whose constraint failed (no token allowed, a llguidance limit).
    fn fail_constraint(&mut self, id: u64, message: String) {
        if let Some(seq) = self.sched.remove(id) {
            let generated = seq.generated();
            tracing::info!("request {id}: constraint failed: {message}");
            let error = RequestError::Constraint { generated, message };
            let _ = seq.req.tx.send(Event::Failed(error));
            self.publish_stats();
        }
    }

    fn fail_items(&mut self, plan: &Plan, error: RequestError) {
        for item in &plan.items {
            if let Some(seq) = self.sched.remove(item.id) {
                let _ = seq.req.tx.send(Event::Failed(error.clone()));
            }
        }
        self.publish_stats();
    }

    /// Samples each item's logits row on the host (and records prompt logprobs).
    fn sample_on_host(&mut self, plan: &Plan, logits: &[f32]) {
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
            let Some(seq) = self.sched.get_mut(item.id) else {
                continue;
            };
            let generated = seq.generated();
            let r = &mut seq.req;
            let sampled = (r.max_new_tokens > 0).then(|| self.sampler.sample(l, r.spec(generated)));
            self.on_sampled(item.id, sampled);
        }
    }

    /// One sampling row per item that samples, in the order of the logits rows.
    fn build_samples(&mut self, plan: &Plan) {
        self.samples.clear();
        for item in plan.items.iter().filter(|i| i.sample) {
            match self.sched.get_mut(item.id) {
                Some(seq) if seq.req.max_new_tokens > 0 => {
                    let generated = seq.generated();
                    self.samples.push(seq.req.spec(generated));
                }
                _ => self.samples.push_unused(),
            }
        }
    }

    /// Records the prompt logprobs a chunk's logits give (`logits`: one row per token of the
    /// chunk). A chunk computed again after a retraction adds nothing twice.
    fn on_prompt_logits(&mut self, item: &PlanItem, logits: &[f32], vocab: usize) {
        let Some(seq) = self.sched.get_mut(item.id) else {
            return;
        };
        let (from, prompt_len) = (seq.logprob_from, seq.prompt_len);
        let r = &mut seq.req;
        for (k, row) in logits.chunks_exact(vocab).enumerate() {
            // the logits at position p are the distribution of the token at p + 1
            let next = item.start + k + 1;
            if next >= prompt_len || next != from + r.prompt_logprobs.len() {
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

    /// The step's token for request `id` (None: a request that only scores its prompt).
    fn on_sampled(&mut self, id: u64, sampled: Option<TokenInfo>) {
        let Some(seq) = self.sched.get_mut(id) else {
            return;
        };
        let Some(info) = sampled.filter(|_| seq.req.max_new_tokens > 0) else {
            // only the prompt was wanted (prompt logprobs, scoring): no token is sampled
            let chunk = Chunk {
                token_ids: Vec::new(),
                text: String::new(),
                logprobs: Vec::new(),
                prompt_logprobs: std::mem::take(&mut seq.req.prompt_logprobs),
            };
            self.deliver(id, chunk, Some(FinishReason::Length));
            return;
        };
        if let Some(c) = seq.req.constraint.as_mut() {
            if let Err(message) = c.advance(info.token_id) {
                self.fail_constraint(id, message);
                return;
            }
        }
        match seq.tokens.last_mut() {
            // planned on before it was known (the overlap scheduler)
            Some(last) if *last & FUTURE_TOKEN != 0 => *last = info.token_id,
            _ => seq.tokens.push(info.token_id),
        }
        let generated = seq.generated();
        let r = &mut seq.req;
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
        let token_id = info.token_id;
        let (text, finish) = r.accept(&self.shared.tokenizer, token_id, generated);
        let chunk = Chunk {
            token_ids: vec![token_id],
            text,
            logprobs: if r.wants_logprobs() {
                vec![info]
            } else {
                Vec::new()
            },
            // computed by now: the prompt ends in the step that samples the first token
            prompt_logprobs: std::mem::take(&mut r.prompt_logprobs),
        };
        self.deliver(id, chunk, finish);
    }

    /// Sends a request its chunk, then ends it if `finish` says so.
    fn deliver(&mut self, id: u64, chunk: Chunk, finish: Option<FinishReason>) {
        let Some(seq) = self.sched.get(id) else {
            return;
        };
        if seq.req.tx.send(Event::Chunk(chunk)).is_err() {
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
        let Some(seq) = self.sched.remove(id) else {
            return;
        };
        self.shared
            .counters
            .finished
            .fetch_add(1, Ordering::Relaxed);
        let r = &seq.req;
        let finish = Finish {
            reason,
            usage: Usage {
                prompt_tokens: seq.prompt_len,
                completion_tokens: seq.generated(),
                cached_tokens: seq.cached_tokens.unwrap_or(0),
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

/// Tokens sampled on the device, refused when one is outside the vocabulary (a fault of the
/// backend, which must not reach a request's tokens, let alone a later step's input).
fn checked(sampled: Vec<TokenInfo>, vocab: usize) -> Result<Vec<TokenInfo>, BackendError> {
    match sampled.iter().find(|s| s.token_id as usize >= vocab) {
        Some(s) => Err(BackendError::Internal(format!(
            "the device sampled token {}, outside the vocabulary of {vocab}",
            s.token_id
        ))),
        None => Ok(sampled),
    }
}
