//! Running a tensor-parallel group: rank 0 is the [`ModelRunner`] the engine thread drives;
//! ranks 1.. each run on a thread of their own with their shard, KV cache and CPU thread pool.
//!
//! Every step, rank 0 broadcasts the step's batch (encoded as u32 words) through the
//! communicator, then all ranks run the forward pass together. The worker loop uses nothing
//! but the [`Communicator`], so ranks in other processes only need another implementation of
//! it. A rank that fails (an error, a panic, a timeout) stops the whole group: rank 0's step
//! returns the error, [`ModelRunner::parallel_state`] reports it, and the engine stops.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{LoadModelError, ModelRunner, ParallelState};
use crate::backend::BackendError;
use crate::batch::{SeqSlice, StepBatch};
use crate::config::ModelConfig;
use crate::parallel::{thread_group, CommError, Communicator, Shard};

/// The first word of a broadcast message.
const STEP: u32 = 0x5354_4550;
const STOP: u32 = 0x5354_4f50;

/// Serialises `batch` into `out` (u32 words, native byte order: all ranks share a process).
pub fn encode_step(batch: &StepBatch, out: &mut Vec<u8>) {
    out.clear();
    let mut put = |w: u32| out.extend_from_slice(&w.to_ne_bytes());
    put(STEP);
    put(batch.page_size as u32);
    for len in [
        batch.tokens.len(),
        batch.seqs.len(),
        batch.block_tables.len(),
        batch.logit_rows.len(),
    ] {
        put(len as u32);
    }
    for v in [&batch.tokens, &batch.positions, &batch.slots] {
        v.iter().for_each(|&w| put(w));
    }
    for s in &batch.seqs {
        for w in [
            s.token_start,
            s.num_tokens,
            s.context_len,
            s.block_table_start,
            s.block_table_len,
        ] {
            put(w as u32);
        }
    }
    batch.block_tables.iter().for_each(|&w| put(w));
    batch.logit_rows.iter().for_each(|&w| put(w));
}

/// The inverse of [`encode_step`]: `Ok(true)` with `batch` filled, `Ok(false)` for "stop".
pub fn decode_step(bytes: &[u8], batch: &mut StepBatch) -> Result<bool, CommError> {
    let mut words = bytes
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().expect("4 bytes")));
    let mut next = || {
        words
            .next()
            .ok_or_else(|| CommError::Invalid("truncated step message".into()))
    };
    match next()? {
        STOP => return Ok(false),
        STEP => {}
        other => return Err(CommError::Invalid(format!("unknown message {other:#x}"))),
    }
    batch.clear();
    batch.page_size = next()? as usize;
    let (tokens, seqs, blocks, logits) = (next()?, next()?, next()?, next()?);
    for v in [&mut batch.tokens, &mut batch.positions, &mut batch.slots] {
        for _ in 0..tokens {
            v.push(next()?);
        }
    }
    for _ in 0..seqs {
        let mut w = [0usize; 5];
        for x in &mut w {
            *x = next()? as usize;
        }
        batch.seqs.push(SeqSlice {
            token_start: w[0],
            num_tokens: w[1],
            context_len: w[2],
            block_table_start: w[3],
            block_table_len: w[4],
        });
    }
    for _ in 0..blocks {
        batch.block_tables.push(next()?);
    }
    for _ in 0..logits {
        batch.logit_rows.push(next()?);
    }
    Ok(true)
}

/// What the group knows about itself, shared with the worker threads.
struct Health {
    ready: AtomicUsize,
    failed: parking_lot::Mutex<Option<String>>,
    stopping: AtomicBool,
}

impl Health {
    fn fail(&self, reason: String) {
        let mut f = self.failed.lock();
        if f.is_none() {
            tracing::error!("tensor parallelism: {reason}");
            *f = Some(reason);
        }
    }
}

/// Rank 0 of a group and the threads of the other ranks.
pub struct TpRunner {
    rank0: Box<dyn ModelRunner>,
    comm: Arc<dyn Communicator>,
    workers: Vec<JoinHandle<()>>,
    health: Arc<Health>,
    message: Vec<u8>,
    world: usize,
    kv_bytes_per_token: usize,
}

/// Starts `world` ranks: `build(shard, comm)` makes a rank's runner (rank 0 on this thread,
/// the others on threads of their own). Returns when every rank is ready, or with the first
/// failure (naming its rank) once every rank has stopped: no rank is left waiting.
pub fn start<F>(
    cfg: &ModelConfig,
    world: usize,
    timeout: Duration,
    build: F,
) -> Result<TpRunner, CommError>
where
    F: Fn(Shard, Arc<dyn Communicator>) -> Result<Box<dyn ModelRunner>, LoadModelError>
        + Send
        + Sync
        + 'static,
{
    let build = Arc::new(build);
    let health = Arc::new(Health {
        ready: AtomicUsize::new(0),
        failed: parking_lot::Mutex::new(None),
        stopping: AtomicBool::new(false),
    });
    let mut comms: Vec<Arc<dyn Communicator>> = thread_group(world, timeout)
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect();
    let comm0 = comms.remove(0);
    let mut workers = Vec::new();
    for (i, comm) in comms.into_iter().enumerate() {
        let rank = i + 1;
        let shard = Shard::new(cfg, rank, world);
        let (build, shared) = (build.clone(), health.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("sglang-tp{rank}"))
            .spawn(move || worker(rank, shard, comm, build.as_ref(), &shared));
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) => {
                comm0.abort(&format!("rank {rank} could not start: {e}"));
                health.fail(format!("rank {rank} could not start: {e}"));
                break;
            }
        }
    }
    let rank0 = match build(Shard::new(cfg, 0, world), comm0.clone()) {
        Ok(r) => Some(r),
        Err(e) => {
            let reason = format!("rank 0 failed at start-up: {e}");
            comm0.abort(&reason);
            health.fail(reason);
            None
        }
    };
    let ready = match rank0 {
        Some(_) => comm0.barrier(),
        None => Err(CommError::Aborted(String::new())),
    };
    if let Err(e) = ready {
        comm0.abort(e.reason());
        for w in workers {
            let _ = w.join();
        }
        let failed = health.failed.lock().clone();
        return Err(failed.map_or(e, CommError::Aborted));
    }
    // every rank passed the barrier (a rank that stops later takes itself off)
    health.ready.fetch_add(world, Ordering::SeqCst);
    let rank0 = rank0.expect("checked above");
    Ok(TpRunner {
        kv_bytes_per_token: group_kv_bytes_per_token(rank0.as_ref(), world),
        rank0,
        comm: comm0,
        workers,
        health,
        message: Vec::new(),
        world,
    })
}

/// KV bytes per token of the whole group: every rank's KV heads cost what rank 0's do.
fn group_kv_bytes_per_token(rank0: &dyn ModelRunner, world: usize) -> usize {
    let cfg = rank0.config();
    let per_head = rank0.kv_bytes_per_token() / Shard::new(cfg, 0, world).kv_heads.len().max(1);
    let kv_heads: usize = (0..world)
        .map(|r| Shard::new(cfg, r, world).kv_heads.len())
        .sum();
    per_head * kv_heads
}

#[allow(clippy::type_complexity)]
fn worker(
    rank: usize,
    shard: Shard,
    comm: Arc<dyn Communicator>,
    build: &(dyn Fn(Shard, Arc<dyn Communicator>) -> Result<Box<dyn ModelRunner>, LoadModelError>
          + Send
          + Sync),
    health: &Health,
) {
    let counted = AtomicBool::new(false);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut runner = build(shard, comm.clone())
            .map_err(|e| CommError::Aborted(format!("rank {rank} failed at start-up: {e}")))?;
        comm.barrier()?;
        counted.store(true, Ordering::SeqCst);
        serve_steps(rank, runner.as_mut(), comm.as_ref())
    }));
    // the reason other ranks and the engine will see (the first one recorded wins)
    let failure = match run {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.reason().to_string()),
        Err(_) => Some(format!("rank {rank} panicked")),
    };
    if let Some(reason) = failure {
        if !health.stopping.load(Ordering::SeqCst) {
            health.fail(reason.clone());
        }
        comm.abort(&reason);
    }
    if counted.load(Ordering::SeqCst) {
        health.ready.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The loop of every rank but 0: take the next step from rank 0's broadcast and run it,
/// until rank 0 says stop (`Ok`) or the group fails (`Err` with the reason; a step that fails
/// on this rank stops the group, so it is reported as the group's reason too).
pub fn serve_steps(
    rank: usize,
    runner: &mut dyn ModelRunner,
    comm: &dyn Communicator,
) -> Result<(), CommError> {
    let mut message = Vec::new();
    let mut batch = StepBatch::default();
    loop {
        comm.broadcast(&mut message, 0)?;
        if !decode_step(&message, &mut batch)? {
            return Ok(());
        }
        if let Err(e) = runner.forward(&batch) {
            return Err(CommError::Aborted(format!("rank {rank} step failed: {e}")));
        }
    }
}

/// Rank 0 of a group whose other ranks are processes joined through `comm` (already built
/// and past the start-up barrier).
pub fn process_group(rank0: Box<dyn ModelRunner>, comm: Arc<dyn Communicator>) -> TpRunner {
    let world = comm.world_size();
    TpRunner {
        kv_bytes_per_token: group_kv_bytes_per_token(rank0.as_ref(), world),
        rank0,
        comm,
        workers: Vec::new(),
        health: Arc::new(Health {
            ready: AtomicUsize::new(world),
            failed: parking_lot::Mutex::new(None),
            stopping: AtomicBool::new(false),
        }),
        message: Vec::new(),
        world,
    }
}

/// Records the group's failure (the first reason wins) and stops every rank.
fn fail(health: &Health, comm: &dyn Communicator, reason: String) -> BackendError {
    health.fail(reason);
    let reason = health.failed.lock().clone().unwrap_or_default();
    comm.abort(&reason);
    BackendError::Collective(CommError::Aborted(reason))
}

impl ModelRunner for TpRunner {
    fn config(&self) -> &ModelConfig {
        self.rank0.config()
    }

    fn forward(&mut self, batch: &StepBatch) -> Result<std::borrow::Cow<'_, [f32]>, BackendError> {
        if let Some(reason) = self.health.failed.lock().clone() {
            return Err(BackendError::Collective(CommError::Aborted(reason)));
        }
        encode_step(batch, &mut self.message);
        if let Err(e) = self.comm.broadcast(&mut self.message, 0) {
            return Err(fail(
                &self.health,
                self.comm.as_ref(),
                e.reason().to_string(),
            ));
        }
        let (health, comm) = (&self.health, self.comm.as_ref());
        self.rank0.forward(batch).map_err(|e| {
            // a failing rank records its own reason first; rank 0 then only sees "stopped"
            std::thread::sleep(Duration::from_millis(20));
            fail(health, comm, format!("rank 0 step failed: {e}"))
        })
    }

    fn backend_name(&self) -> &'static str {
        self.rank0.backend_name()
    }

    fn kv_pages(&self) -> (usize, usize) {
        self.rank0.kv_pages()
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token
    }

    fn weight_bytes(&self) -> usize {
        self.rank0.weight_bytes()
    }

    fn parallel_state(&self) -> ParallelState {
        if self.health.failed.lock().is_none() {
            if let Some(reason) = self.comm.peer_lost() {
                self.health.fail(reason.clone());
                self.comm.abort(&reason);
                self.health.ready.fetch_sub(1, Ordering::SeqCst);
            }
        }
        ParallelState {
            ranks: self.world,
            ready: self.health.ready.load(Ordering::SeqCst),
            error: self.health.failed.lock().clone(),
        }
    }
}

impl Drop for TpRunner {
    fn drop(&mut self) {
        self.health.stopping.store(true, Ordering::SeqCst);
        if self.health.failed.lock().is_none() {
            self.message.clear();
            self.message.extend_from_slice(&STOP.to_ne_bytes());
            if self.comm.broadcast(&mut self.message, 0).is_err() {
                self.comm.abort("shutting down");
            }
        } else {
            self.comm.abort("shutting down");
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
