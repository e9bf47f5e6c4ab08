//! Scheduling policy: which tokens of which sequences go into the next forward step.
//!
//! Continuous batching in the manner of SGLang and vLLM: every step carries one decode token of
//! each running sequence plus prefill chunks (at most `chunked_prefill_size` prompt tokens per
//! step), and waiting sequences join as soon as a slot, the token budget and KV pages allow.
//! A sequence is just its token list (prompt, then sampled tokens) and how many of those are
//! already in the KV cache, so a sequence whose pages are taken back ("retracted" when the pool
//! runs dry) simply recomputes its KV later: nothing is lost and the output is unchanged.
//!
//! With the radix prefix cache on, a sequence starts from the pages of its longest cached
//! prefix, waiting sequences are admitted longest-cached-prefix first (SGLang's LPM policy, for
//! queues up to 128; FIFO beyond), the computed pages of every prefill chunk, retraction and
//! finish go into the tree, and the pool makes room by evicting least recently used runs.
//!
//! The scheduler is the one home of each sequence: [`Seq`] carries the owner's per-request
//! state (`R`; the engine's sampling, detokenization and reply channel) beside the token list,
//! looked up by id in a hash map. The waiting queue and the running list hold ids; removing a
//! sequence is O(1) and leaves its id behind in them, swept out by the next `schedule`.
//!
//! Pure policy over the page pool: no model, no tokenizer, no threads; it depends on the KV
//! pool and the step description (`crate::batch`) only, and the engine thread owns the one
//! instance. Cost per step is O(running + admitted sequences) (plus O(waiting) once after
//! removals from the queue), and O(waiting x prompt pages) for the LPM ordering.

use std::collections::{HashMap, VecDeque};

use crate::batch::{LogitsWanted, StepBatch};
use crate::kv::radix::RadixCache;
use crate::kv::PagePool;

/// Longest waiting queue that is reordered by cached prefix length (beyond: FIFO).
const LPM_MAX_QUEUE: usize = 128;

/// Most rows of logits (a vocabulary each) one step computes for prompt logprobs. Chunks that
/// need them are cut to this, so scoring a long prompt does not grow the logits buffers to a
/// whole chunk's worth (2048 rows x 49152 floats would be 400 MB, kept for reuse).
pub const MAX_PROMPT_LOGIT_ROWS: usize = 256;

/// A sequence: its tokens, its place in the KV cache, and its owner's state `req`.
#[derive(Debug, Clone)]
pub struct Seq<R> {
    pub id: u64,
    /// Prompt tokens followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    pub kv_len: usize,
    pub block_table: Vec<u32>,
    /// Logits for the prompt positions (prompt logprobs) until the prompt is in the cache.
    pub prompt_logits: bool,
    /// With `prompt_logits`: the first prompt token whose logprob is wanted (>= 1). Its
    /// predecessor's logits are needed, so the prefix cache may serve only the tokens before.
    pub logprob_from: usize,
    /// Prompt tokens found in the prefix cache at first admission (None until admitted).
    pub cached_tokens: Option<usize>,
    /// Whether it is in the running list (else it waits for admission).
    running: bool,
    /// What the owner keeps with the sequence; the scheduler never looks at it.
    pub req: R,
}

impl<R> Seq<R> {
    pub fn new(id: u64, prompt: Vec<u32>, req: R) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            kv_len: 0,
            block_table: Vec::new(),
            prompt_logits: false,
            logprob_from: 0,
            cached_tokens: None,
            running: false,
            req,
        }
    }

    /// This sequence with its prompt logprobs wanted from position `from` (0 counts as 1: the
    /// first token has no logprob).
    pub fn with_prompt_logprobs(self, from: usize) -> Self {
        let from = from.max(1);
        Self {
            prompt_logits: from < self.prompt_len,
            logprob_from: from,
            ..self
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// How many leading tokens the prefix cache may serve: all but the last (its logits give
    /// the next token), and none whose logits the prompt logprobs need.
    fn cacheable(&self) -> usize {
        let all = self.tokens.len() - 1;
        if self.prompt_logits {
            all.min(self.logprob_from - 1)
        } else {
            all
        }
    }

    /// Whether the chunk `start..start + len` has logits the prompt logprobs need.
    fn wants_logits(&self, start: usize, len: usize) -> bool {
        self.prompt_logits && start + len >= self.logprob_from && start + 1 < self.prompt_len
    }

    /// The next chunk's length, at most `len`, with `logit_rows` rows of logits left in this
    /// step: a chunk needing logits ends where they start (it computes none), or holds at
    /// most `logit_rows` tokens. 0: wait for the next step.
    fn chunk_len(&self, len: usize, logit_rows: usize) -> usize {
        if !self.wants_logits(self.kv_len, len) {
            return len;
        }
        let first = self.logprob_from - 1; // the first position whose logits are wanted
        if self.kv_len < first {
            first - self.kv_len
        } else {
            len.min(logit_rows)
        }
    }

    /// The step item computing the next `len` prompt tokens; the logit rows it needs are
    /// taken from `logit_rows`.
    fn prefill_item(&self, len: usize, logit_rows: &mut usize) -> PlanItem {
        let all_logits = self.wants_logits(self.kv_len, len);
        if all_logits {
            *logit_rows -= len;
        }
        PlanItem {
            id: self.id,
            start: self.kv_len,
            len,
            sample: len == self.pending(),
            all_logits,
        }
    }

    /// Tokens still to be run through the model (1 when decoding).
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.kv_len
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_running: usize,
    pub chunked_prefill_size: usize,
    pub enable_radix_cache: bool,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanItem {
    pub id: u64,
    /// First token (index into `Seq::tokens`) computed this step.
    pub start: usize,
    pub len: usize,
    /// This step reaches the end of the known tokens: a new token is sampled from its logits.
    pub sample: bool,
    /// Logits of every token of the chunk are returned (prompt logprobs).
    pub all_logits: bool,
}

/// What the next step computes, and what scheduling it cost.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    pub items: Vec<PlanItem>,
    /// Sequences whose pages were taken back this step (they recompute later).
    pub retracted: Vec<u64>,
    /// Sequences admitted for the first time: (id, prompt tokens served from the cache).
    pub admitted: Vec<(u64, usize)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|i| i.len).sum()
    }
}

pub struct Scheduler<R> {
    cfg: SchedulerConfig,
    pool: PagePool,
    radix: Option<RadixCache>,
    seqs: HashMap<u64, Seq<R>>,
    /// Ids waiting for admission, in order; may still hold ids removed since the last step.
    waiting: VecDeque<u64>,
    /// Ids in admission order (the newest last: the first to be retracted); may still hold
    /// ids removed since the last step.
    running: Vec<u64>,
    num_waiting: usize,
    num_running: usize,
}

/// Ensures `seq` has pages for `upto` tokens, evicting cached runs if the pool is short; false
/// (nothing taken) when even that is not enough.
fn reserve<R>(
    pool: &mut PagePool,
    radix: &mut Option<RadixCache>,
    seq: &mut Seq<R>,
    upto: usize,
) -> bool {
    let need = pool.pages_for(upto).saturating_sub(seq.block_table.len());
    if need == 0 {
        return true;
    }
    if need > pool.free_pages() {
        if let Some(r) = radix.as_mut() {
            r.evict(pool, need);
        }
    }
    pool.alloc_into(&mut seq.block_table, need)
}

/// Gives up a sequence's pages; with the radix cache its computed whole pages stay cached.
fn release<R>(pool: &mut PagePool, radix: &mut Option<RadixCache>, seq: &mut Seq<R>) {
    if let Some(r) = radix.as_mut() {
        r.insert(pool, &seq.tokens[..seq.kv_len], &seq.block_table);
    }
    pool.release_all(&mut seq.block_table);
}

impl<R> Scheduler<R> {
    pub fn new(cfg: SchedulerConfig, pool: PagePool) -> Self {
        let radix = cfg
            .enable_radix_cache
            .then(|| RadixCache::new(pool.page_size()));
        Self {
            cfg,
            pool,
            radix,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_waiting: 0,
            num_running: 0,
        }
    }

    pub fn radix(&self) -> Option<&RadixCache> {
        self.radix.as_ref()
    }

    /// Tokens held only by the prefix cache (freed on demand).
    pub fn evictable_tokens(&self) -> usize {
        self.radix
            .as_ref()
            .map_or(0, |r| r.evictable_pages(&self.pool) * self.pool.page_size())
    }

    /// The cached token prefixes (see `RadixCache::prefixes`), empty without the cache.
    pub fn cached_prefixes(&self) -> Vec<Vec<u32>> {
        self.radix.as_ref().map_or_else(Vec::new, |r| r.prefixes())
    }

    /// Drops the whole prefix cache. Pages of running sequences stay with them.
    pub fn flush_cache(&mut self) {
        if let Some(r) = self.radix.as_mut() {
            r.clear(&mut self.pool);
        }
    }

    pub fn pool(&self) -> &PagePool {
        &self.pool
    }

    pub fn num_waiting(&self) -> usize {
        self.num_waiting
    }

    pub fn num_running(&self) -> usize {
        self.num_running
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Tokens the KV pool holds in all.
    pub fn capacity_tokens(&self) -> usize {
        self.pool.total_pages() * self.pool.page_size()
    }

    /// Queues a sequence (its id must not be queued or running already).
    pub fn add(&mut self, mut seq: Seq<R>) {
        debug_assert!(!self.seqs.contains_key(&seq.id), "sequence ids are unique");
        seq.running = false;
        self.waiting.push_back(seq.id);
        self.num_waiting += 1;
        self.seqs.insert(seq.id, seq);
    }

    pub fn get(&self, id: u64) -> Option<&Seq<R>> {
        self.seqs.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Seq<R>> {
        self.seqs.get_mut(&id)
    }

    /// The ids of every sequence, waiting or running.
    pub fn ids(&self) -> Vec<u64> {
        self.seqs.keys().copied().collect()
    }

    /// Removes a sequence wherever it is and frees its pages. Returns it if it existed.
    pub fn remove(&mut self, id: u64) -> Option<Seq<R>> {
        let mut seq = self.seqs.remove(&id)?;
        if seq.running {
            self.num_running -= 1;
        } else {
            self.num_waiting -= 1;
        }
        release(&mut self.pool, &mut self.radix, &mut seq);
        Some(seq)
    }

    /// Sweeps the ids of removed sequences out of the queue and the running list.
    fn compact(&mut self) {
        let seqs = &self.seqs;
        if self.running.len() != self.num_running {
            self.running
                .retain(|id| seqs.get(id).is_some_and(|s| s.running));
        }
        if self.waiting.len() != self.num_waiting {
            self.waiting
                .retain(|id| seqs.get(id).is_some_and(|s| !s.running));
        }
        debug_assert_eq!(self.running.len(), self.num_running);
        debug_assert_eq!(self.waiting.len(), self.num_waiting);
    }

    /// Takes back the pages of the newest running sequence; it waits again at the front.
    fn retract_newest(&mut self, plan: &mut Plan) -> bool {
        let Some(id) = self.running.pop() else {
            return false;
        };
        let seq = self
            .seqs
            .get_mut(&id)
            .expect("running ids are live after compact");
        release(&mut self.pool, &mut self.radix, seq);
        seq.kv_len = 0;
        seq.running = false;
        self.num_running -= 1;
        self.num_waiting += 1;
        plan.retracted.push(id);
        self.waiting.push_front(id);
        true
    }

    /// Chooses the next step and allocates its pages.
    pub fn schedule(&mut self) -> Plan {
        self.compact();
        let mut plan = Plan::default();
        // 1. Every running sequence's next token(s). Decodes first: they are cheap and their
        //    latency is what users feel. If the pool is dry, the newest sequences give back
        //    their pages until the older ones fit.
        let mut i = 0;
        while i < self.running.len() {
            let seq = self
                .seqs
                .get_mut(&self.running[i])
                .expect("running ids are live after compact");
            if seq.pending() == 1 {
                let upto = seq.kv_len + 1;
                if !reserve(&mut self.pool, &mut self.radix, seq, upto) {
                    let newest = i + 1 == self.running.len();
                    self.retract_newest(&mut plan);
                    if newest {
                        break;
                    }
                    continue;
                }
            }
            i += 1;
        }
        let mut budget = self.cfg.chunked_prefill_size;
        let mut logit_rows = MAX_PROMPT_LOGIT_ROWS;
        for id in &self.running {
            let seq = &self.seqs[id];
            if seq.pending() == 1 {
                plan.items.push(PlanItem {
                    id: seq.id,
                    start: seq.kv_len,
                    len: 1,
                    sample: true,
                    all_logits: false,
                });
            }
        }
        // 2. Unfinished prefills of running sequences continue.
        for id in &self.running {
            let seq = self.seqs.get_mut(id).expect("running ids are live");
            let pending = seq.pending();
            if pending <= 1 || budget == 0 {
                continue;
            }
            let len = seq.chunk_len(pending.min(budget), logit_rows);
            let upto = seq.kv_len + len;
            if len == 0 || !reserve(&mut self.pool, &mut self.radix, seq, upto) {
                continue;
            }
            budget -= len;
            plan.items.push(seq.prefill_item(len, &mut logit_rows));
        }
        // 3. Admit waiting sequences while there is room: a running slot, prefill budget, and
        //    pages for the first chunk with one page per running sequence to spare for decode.
        let reorder = self.waiting.len() > 1 && self.waiting.len() <= LPM_MAX_QUEUE;
        if let Some(radix) = self.radix.as_ref().filter(|_| reorder) {
            let seqs = &self.seqs;
            let mut keyed: Vec<(usize, u64)> = self
                .waiting
                .drain(..)
                .map(|id| {
                    let s = &seqs[&id];
                    (radix.match_len(&s.tokens[..s.cacheable()]), id)
                })
                .collect();
            // stable: equal prefixes keep their arrival order
            keyed.sort_by_key(|(m, _)| std::cmp::Reverse(*m));
            self.waiting.extend(keyed.into_iter().map(|(_, id)| id));
        }
        while budget > 0 && self.num_running < self.cfg.max_running {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            let seq = self
                .seqs
                .get_mut(&id)
                .expect("waiting ids are live after compact");
            if seq.block_table.is_empty() {
                if let Some(r) = self.radix.as_mut() {
                    let pages = r.match_prefix(&seq.tokens[..seq.cacheable()]);
                    for &p in &pages {
                        self.pool.retain(p);
                    }
                    seq.kv_len = pages.len() * self.pool.page_size();
                    seq.block_table = pages;
                }
            }
            let pending = seq.pending();
            let len = seq.chunk_len(pending.min(budget), logit_rows);
            let need = self
                .pool
                .pages_for(seq.kv_len + len)
                .saturating_sub(seq.block_table.len());
            let spare = self.num_running;
            if need + spare > self.pool.free_pages() {
                if let Some(r) = self.radix.as_mut() {
                    r.evict(&mut self.pool, need + spare);
                }
            }
            if len == 0 || need + spare > self.pool.free_pages() {
                // undo the prefix match and wait
                self.pool.release_all(&mut seq.block_table);
                seq.kv_len = 0;
                self.waiting.push_front(id);
                break;
            }
            let upto = seq.kv_len + len;
            let ok = reserve(&mut self.pool, &mut self.radix, seq, upto);
            debug_assert!(ok);
            if seq.cached_tokens.is_none() {
                let cached = seq.kv_len.min(seq.prompt_len);
                seq.cached_tokens = Some(cached);
                plan.admitted.push((id, cached));
            }
            budget -= len;
            plan.items.push(seq.prefill_item(len, &mut logit_rows));
            seq.running = true;
            self.num_waiting -= 1;
            self.num_running += 1;
            self.running.push(id);
        }
        plan
    }

    /// Whether, once the running sequences `ids` each have one more token (and the step
    /// computing their last one is done), the next [`Scheduler::schedule`] decodes them and
    /// does nothing else: no waiting sequence can take a free running slot, and the pool has
    /// their pages without evicting or retracting (the caller knows that the other running
    /// sequences have nothing pending). The overlap scheduler asks before it plans a step on
    /// tokens it has not read yet.
    pub fn can_decode_again(&self, ids: &[u64]) -> bool {
        if self.num_waiting > 0 && self.num_running < self.cfg.max_running {
            return false;
        }
        let mut need = 0;
        for id in ids {
            match self.seqs.get(id) {
                Some(seq) if seq.running => {
                    let upto = seq.tokens.len() + 1;
                    need += self
                        .pool
                        .pages_for(upto)
                        .saturating_sub(seq.block_table.len());
                }
                _ => return false,
            }
        }
        need <= self.pool.free_pages()
    }

    /// Writes the plan's tokens into `batch` (cleared first).
    pub fn fill_batch(&self, plan: &Plan, batch: &mut StepBatch) {
        batch.clear();
        batch.page_size = self.pool.page_size();
        for item in &plan.items {
            let seq = &self.seqs[&item.id];
            let logits = if item.all_logits {
                LogitsWanted::All
            } else if item.sample {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            batch.push_seq(
                &seq.tokens[item.start..item.start + item.len],
                item.start,
                &seq.block_table,
                logits,
            );
        }
    }

    /// Records that the plan's tokens are now in the KV cache. Prefill chunks enter the
    /// prefix cache at once, so requests arriving meanwhile can share them.
    pub fn step_done(&mut self, plan: &Plan) {
        for item in &plan.items {
            if let Some(seq) = self.seqs.get_mut(&item.id) {
                seq.kv_len = item.start + item.len;
                if seq.kv_len >= seq.prompt_len {
                    seq.prompt_logits = false;
                }
                if item.len > 1 {
                    if let Some(r) = self.radix.as_mut() {
                        r.insert(&mut self.pool, &seq.tokens[..seq.kv_len], &seq.block_table);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(pages: usize, page_size: usize, max_running: usize, chunk: usize) -> Scheduler<()> {
        Scheduler::new(
            SchedulerConfig {
                max_running,
                chunked_prefill_size: chunk,
                enable_radix_cache: false,
            },
            PagePool::new(pages, page_size),
        )
    }

    /// Runs steps, sampling token 7 whenever asked, until every sequence has `target` tokens.
    fn run(s: &mut Scheduler<()>, target: usize, max_steps: usize) -> usize {
        let mut steps = 0;
        while !s.is_idle() {
            steps += 1;
            assert!(steps <= max_steps, "no progress");
            let plan = s.schedule();
            assert!(!plan.is_empty(), "stalled with work left");
            s.step_done(&plan);
            for item in plan.items.iter().filter(|i| i.sample) {
                s.get_mut(item.id).unwrap().tokens.push(7);
                if s.get(item.id).unwrap().tokens.len() >= target {
                    s.remove(item.id);
                }
            }
        }
        steps
    }

    /// The overlap scheduler's question: the next step is the decode of these sequences and
    /// nothing else, only with their pages free and no waiting sequence able to join.
    #[test]
    fn decoding_again_needs_pages_and_no_joiner() {
        // 2 pages of 4 tokens; a 3-token prompt and its first output token fill the first, the
        // next step's position 4 takes the second
        let mut s = sched(2, 4, 2, 16);
        s.add(Seq::new(1, vec![1, 2, 3], ()));
        let p = s.schedule();
        s.step_done(&p);
        s.get_mut(1).unwrap().tokens.push(7); // 4 tokens: the page is full after the next step
        assert!(s.can_decode_again(&[1]), "the second page is free");
        assert!(!s.can_decode_again(&[2]), "not a running sequence");
        // a waiting sequence that could take the free running slot
        s.add(Seq::new(2, vec![1], ()));
        assert!(!s.can_decode_again(&[1]), "a sequence waits to join");
        s.remove(2);
        assert!(s.can_decode_again(&[1]));
        // one page in all: the next position has no page without retracting
        let mut s = sched(1, 4, 2, 16);
        s.add(Seq::new(1, vec![1, 2, 3], ()));
        let p = s.schedule();
        s.step_done(&p);
        s.get_mut(1).unwrap().tokens.push(7);
        assert!(!s.can_decode_again(&[1]), "no page for position 4");
    }

    #[test]
    fn long_prompts_are_chunked() {
        let mut s = sched(64, 4, 8, 10);
        s.add(Seq::new(1, vec![1; 25], ()));
        let p = s.schedule();
        assert_eq!(
            p.items,
            vec![PlanItem {
                id: 1,
                start: 0,
                len: 10,
                sample: false,
                all_logits: false
            }]
        );
        s.step_done(&p);
        let p = s.schedule();
        assert_eq!(p.items[0].start, 10);
        s.step_done(&p);
        let p = s.schedule();
        assert_eq!(
            (p.items[0].start, p.items[0].len, p.items[0].sample),
            (20, 5, true)
        );
    }

    #[test]
    fn decodes_and_new_prefills_share_a_step() {
        let mut s = sched(64, 4, 8, 16);
        s.add(Seq::new(1, vec![1; 5], ()));
        let p = s.schedule();
        s.step_done(&p);
        s.get_mut(1).unwrap().tokens.push(9);
        s.add(Seq::new(2, vec![2; 6], ()));
        let p = s.schedule();
        assert_eq!(p.items.len(), 2);
        assert_eq!((p.items[0].id, p.items[0].len), (1, 1));
        assert_eq!((p.items[1].id, p.items[1].len), (2, 6));
        let mut b = StepBatch::default();
        s.fill_batch(&p, &mut b);
        assert_eq!(b.tokens, vec![9, 2, 2, 2, 2, 2, 2]);
        assert_eq!(b.positions[0], 5);
        assert_eq!(b.logit_rows, vec![0, 6]);
    }

    #[test]
    fn max_running_is_respected() {
        let mut s = sched(64, 4, 2, 100);
        for id in 0..5 {
            s.add(Seq::new(id, vec![1; 3], ()));
        }
        let p = s.schedule();
        assert_eq!(p.items.len(), 2);
        assert_eq!(s.num_waiting(), 3);
    }

    #[test]
    fn every_sequence_completes_when_the_pool_is_tight() {
        // 12 pages of 4 tokens = 48 slots; 6 sequences of 20 tokens each need 120.
        let mut s = sched(12, 4, 6, 32);
        for id in 0..6 {
            s.add(Seq::new(id, vec![id as u32; 6], ()));
        }
        run(&mut s, 20, 10_000);
        assert_eq!(s.pool().free_pages(), 12, "all pages returned");
    }

    #[test]
    fn retraction_recomputes_from_scratch() {
        let mut s = sched(3, 2, 4, 32);
        s.add(Seq::new(1, vec![1; 2], ()));
        s.add(Seq::new(2, vec![2; 2], ()));
        let p = s.schedule();
        assert_eq!(p.items.len(), 2, "both admitted");
        s.step_done(&p);
        s.get_mut(1).unwrap().tokens.push(7);
        s.get_mut(2).unwrap().tokens.push(7);
        // each needs a second page now; only one is free: the newest (2) is retracted
        let p = s.schedule();
        assert_eq!(p.retracted, vec![2]);
        assert_eq!(p.items.len(), 1);
        assert_eq!(p.items[0].id, 1);
        let back = s.get(2).unwrap();
        assert_eq!(
            (back.kv_len, back.tokens.len()),
            (0, 3),
            "keeps its sampled token"
        );
        assert!(back.block_table.is_empty());
    }

    fn radix_sched(
        pages: usize,
        page_size: usize,
        max_running: usize,
        chunk: usize,
    ) -> Scheduler<()> {
        Scheduler::new(
            SchedulerConfig {
                max_running,
                chunked_prefill_size: chunk,
                enable_radix_cache: true,
            },
            PagePool::new(pages, page_size),
        )
    }

    #[test]
    fn a_shared_prefix_is_not_recomputed() {
        let mut s = radix_sched(64, 4, 8, 64);
        let mut a: Vec<u32> = (0..20).collect();
        s.add(Seq::new(1, a.clone(), ()));
        let p = s.schedule();
        assert_eq!(p.admitted, vec![(1, 0)]);
        s.step_done(&p);
        // b shares a's first 18 tokens: 4 whole pages (16 tokens) come from the cache
        a.truncate(18);
        a.extend([900, 901, 902]);
        s.add(Seq::new(2, a, ()));
        let p = s.schedule();
        assert_eq!(p.admitted, vec![(2, 16)]);
        let item = p.items.iter().find(|i| i.id == 2).unwrap();
        assert_eq!((item.start, item.len), (16, 5));
        // both finish: every page is either free or cached, and a flush frees them all
        s.step_done(&p);
        s.remove(1);
        s.remove(2);
        assert_eq!(
            s.pool().free_pages() + s.radix().unwrap().cached_pages(),
            64
        );
        s.flush_cache();
        assert_eq!(s.pool().free_pages(), 64);
    }

    #[test]
    fn prompt_logprobs_limit_the_cached_prefix_and_ask_for_logits() {
        let mut s = radix_sched(64, 4, 8, 8);
        let a: Vec<u32> = (0..20).collect();
        s.add(Seq::new(1, a.clone(), ()));
        let mut steps = 0;
        while s.get(1).unwrap().kv_len < 20 {
            let p = s.schedule();
            s.step_done(&p);
            steps += 1;
            assert!(steps < 10);
        }
        s.remove(1);
        // from token 10: token 9's logits are needed, so only 2 whole pages (8 tokens) may
        // come from the cache although 4 are cached; the first chunk ends where the logits
        // start (it needs none), the next ones compute them
        s.add(Seq::new(2, a.clone(), ()).with_prompt_logprobs(10));
        let p = s.schedule();
        assert_eq!(p.admitted, vec![(2, 8)]);
        let item = |p: &Plan| (p.items[0].start, p.items[0].len, p.items[0].all_logits);
        assert_eq!(item(&p), (8, 1, false));
        s.step_done(&p);
        let p = s.schedule();
        assert_eq!(item(&p), (9, 8, true));
        s.step_done(&p);
        let p = s.schedule();
        assert_eq!(item(&p), (17, 3, true));
        assert!(p.items[0].sample);
        s.step_done(&p);
        // the prompt is done: decoding asks for the last row only
        s.get_mut(2).unwrap().tokens.push(5);
        let p = s.schedule();
        assert!(!p.items[0].all_logits);
        // a chunk wholly before the wanted positions does not ask for logits
        s.add(Seq::new(3, (100..120).collect(), ()).with_prompt_logprobs(18));
        let p = s.schedule();
        let item = p.items.iter().find(|i| i.id == 3).unwrap();
        assert_eq!((item.start, item.len, item.all_logits), (0, 8, false));
    }

    #[test]
    fn prompt_logits_are_capped_per_step() {
        let rows = MAX_PROMPT_LOGIT_ROWS;
        let mut s = sched(1024, 16, 8, 4 * rows);
        // two long prompts wanting logprobs from the start, one without
        s.add(Seq::new(1, vec![3; 3 * rows], ()).with_prompt_logprobs(0));
        s.add(Seq::new(2, vec![4; 3 * rows], ()).with_prompt_logprobs(0));
        s.add(Seq::new(3, vec![5; rows], ()));
        let p = s.schedule();
        let got: Vec<_> = p
            .items
            .iter()
            .map(|i| (i.id, i.len, i.all_logits))
            .collect();
        // the first takes the step's logit rows; the second waits (and the plain one behind
        // it with it, in arrival order)
        assert_eq!(got, vec![(1, rows, true)]);
        s.step_done(&p);
        let mut steps = 1;
        while s.get(1).unwrap().kv_len < 3 * rows || s.num_waiting() > 0 {
            let p = s.schedule();
            assert!(
                p.items
                    .iter()
                    .filter(|i| i.all_logits)
                    .map(|i| i.len)
                    .sum::<usize>()
                    <= rows
            );
            s.step_done(&p);
            steps += 1;
            assert!(steps < 20);
        }
    }

    #[test]
    fn the_longest_cached_prefix_is_admitted_first() {
        let mut s = radix_sched(64, 2, 1, 64);
        s.add(Seq::new(1, (0..10).collect(), ()));
        let p = s.schedule();
        s.step_done(&p);
        s.remove(1);
        s.add(Seq::new(2, (50..60).collect(), ())); // arrived first, nothing cached
        s.add(Seq::new(3, (0..10).collect(), ())); // fully cached prefix
        let p = s.schedule();
        assert_eq!(p.items.len(), 1, "one running slot");
        assert_eq!(p.items[0].id, 3);
        assert_eq!(p.admitted, vec![(3, 8)]);
    }

    #[test]
    fn cached_pages_are_evicted_when_the_pool_needs_them() {
        // 8 pages; a finished sequence leaves 5 cached pages behind
        let mut s = radix_sched(8, 2, 4, 64);
        s.add(Seq::new(1, (0..10).collect(), ()));
        let p = s.schedule();
        s.step_done(&p);
        s.remove(1);
        assert_eq!(s.pool().free_pages(), 3);
        assert_eq!(s.evictable_tokens(), 10);
        // an unrelated sequence needing 6 pages gets them by eviction
        s.add(Seq::new(2, (100..112).collect(), ()));
        let p = s.schedule();
        assert_eq!(p.items.len(), 1);
        assert!(s.radix().unwrap().cached_pages() < 5);
        run(&mut s, 14, 100);
    }

    #[test]
    fn retracted_work_stays_cached_and_every_sequence_completes() {
        let mut s = radix_sched(12, 4, 6, 32);
        for id in 0..6 {
            s.add(Seq::new(id, vec![id as u32; 6], ()));
        }
        run(&mut s, 20, 10_000);
        let r = s.radix().unwrap();
        assert_eq!(
            s.pool().used_pages(),
            r.evictable_pages(s.pool()),
            "idle: every used page is cached only"
        );
        assert_eq!(s.pool().used_pages(), r.cached_pages());
        s.flush_cache();
        assert_eq!(s.pool().free_pages(), 12);
    }

    /// Random workloads with shared prefixes on a tight pool: every sequence completes, and
    /// when idle every page is either free or held by the prefix cache alone.
    #[test]
    fn randomized_shared_prefixes_leak_nothing() {
        // Knuth's MMIX LCG, high bits: enough for workload shapes
        let mut state = 5u64;
        let mut rng = std::iter::from_fn(|| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Some(state >> 33)
        });
        for round in 0..40 {
            let page_size = [1, 2, 4][round % 3];
            let pages = 24 + (rng.next().unwrap() % 24) as usize;
            let mut s = radix_sched(
                pages,
                page_size,
                1 + (rng.next().unwrap() % 6) as usize,
                8 + (rng.next().unwrap() % 24) as usize,
            );
            let n = 3 + (rng.next().unwrap() % 8) as usize;
            for id in 0..n as u64 {
                let shared = (rng.next().unwrap() % 12) as usize;
                let own = 1 + (rng.next().unwrap() % 8) as usize;
                let mut toks: Vec<u32> = (0..shared as u32).collect();
                toks.extend((0..own).map(|_| 100 + (rng.next().unwrap() % 50) as u32));
                s.add(Seq::new(id, toks, ()));
            }
            let target = 22.min(pages * page_size / 2);
            let mut steps = 0;
            while !s.is_idle() {
                steps += 1;
                assert!(steps < 10_000, "round {round}: no progress");
                let plan = s.schedule();
                s.step_done(&plan);
                for item in plan.items.iter().filter(|i| i.sample) {
                    s.get_mut(item.id)
                        .unwrap()
                        .tokens
                        .push((rng.next().unwrap() % 7) as u32);
                    if s.get(item.id).unwrap().tokens.len() >= target {
                        s.remove(item.id);
                    }
                }
            }
            let r = s.radix().unwrap();
            assert_eq!(
                s.pool().used_pages(),
                r.evictable_pages(s.pool()),
                "round {round}"
            );
            s.flush_cache();
            assert_eq!(s.pool().free_pages(), pages, "round {round}");
        }
    }

    #[test]
    fn remove_frees_pages_of_waiting_and_running() {
        let mut s = sched(8, 4, 1, 32);
        s.add(Seq::new(1, vec![1; 9], ()));
        s.add(Seq::new(2, vec![1; 9], ()));
        let p = s.schedule();
        s.step_done(&p);
        assert_eq!(s.pool().free_pages(), 5);
        assert!(s.remove(1).is_some());
        assert!(s.remove(2).is_some());
        assert!(s.remove(3).is_none());
        assert_eq!(s.pool().free_pages(), 8);
        assert!(s.is_idle());
    }
}
