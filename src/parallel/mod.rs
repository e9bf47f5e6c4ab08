//! Tensor parallelism: how a model is split across ranks ([`Shard`]), the collectives the ranks
//! use ([`Communicator`]) and the CPU implementation of them over shared memory between the
//! threads of one process ([`thread_group`]).
//!
//! Megatron-style split of a Llama layer: q/k/v and gate/up are split by output features
//! (whole heads, whole intermediate columns), o and down by input features, so each layer
//! needs one all-reduce after attention and one after the MLP. The embedding and the lm_head
//! are split by vocabulary: a rank looks up only its own ids (zeros elsewhere, then an
//! all-reduce) and computes the logits of its own vocabulary slice (then an all-gather).
//!
//! Splits need not be even: with 9 query heads and 3 KV heads, TP 2 gives one rank one KV
//! head (3 query heads) and the other two (6 query heads). When the TP size exceeds the KV
//! head count, KV heads are replicated: the ranks sharing one KV head split its query heads.

pub mod tcp;

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::config::ModelConfig;

/// The part of the model one rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
    /// Query heads of this rank (global indices).
    pub q_heads: Range<usize>,
    /// KV heads of this rank (global indices).
    pub kv_heads: Range<usize>,
    /// Columns of gate/up (rows of down's input) of this rank.
    pub intermediate: Range<usize>,
    /// Token ids whose embedding rows and logits this rank holds.
    pub vocab: Range<usize>,
}

/// `[n * i / w, n * (i + 1) / w)`: an even split of `n` items into `w` parts.
fn part(n: usize, i: usize, w: usize) -> Range<usize> {
    n * i / w..n * (i + 1) / w
}

impl Shard {
    /// The whole model on one rank.
    pub fn full(cfg: &ModelConfig) -> Self {
        Self {
            rank: 0,
            world: 1,
            q_heads: 0..cfg.num_heads,
            kv_heads: 0..cfg.num_kv_heads,
            intermediate: 0..cfg.intermediate_size,
            vocab: 0..cfg.vocab_size,
        }
    }

    /// Checks that `cfg` can be split `world` ways; the message is for `--tp-size`.
    pub fn check(cfg: &ModelConfig, world: usize) -> Result<(), String> {
        let (h, k) = (cfg.num_heads, cfg.num_kv_heads);
        if world == 0 {
            return Err("must be >= 1".into());
        }
        if world > h {
            return Err(format!(
                "{world} is more than the model's {h} attention heads (each rank needs one)"
            ));
        }
        if world > k && !world.is_multiple_of(k) {
            return Err(format!(
                "{world} exceeds the model's {k} KV heads and is not a multiple of it \
                 (KV heads are replicated evenly across ranks)"
            ));
        }
        if world > k && (h / k) < world / k {
            return Err(format!(
                "{world} ranks share {k} KV heads, {} ranks per KV head, but each KV head \
                 serves only {} query heads",
                world / k,
                h / k
            ));
        }
        if world > cfg.intermediate_size || world > cfg.vocab_size {
            return Err(format!("{world} is larger than the model's dimensions"));
        }
        Ok(())
    }

    /// Rank `rank`'s part of a `world`-way split (call [`Shard::check`] first).
    pub fn new(cfg: &ModelConfig, rank: usize, world: usize) -> Self {
        assert!(rank < world);
        let (h, k) = (cfg.num_heads, cfg.num_kv_heads);
        let group = h / k;
        let (q_heads, kv_heads) = if world <= k {
            let kv = part(k, rank, world);
            (kv.start * group..kv.end * group, kv)
        } else {
            let per_kv = world / k;
            let kv = rank / per_kv;
            let q = part(group, rank % per_kv, per_kv);
            (kv * group + q.start..kv * group + q.end, kv..kv + 1)
        };
        Self {
            rank,
            world,
            q_heads,
            kv_heads,
            intermediate: part(cfg.intermediate_size, rank, world),
            vocab: part(cfg.vocab_size, rank, world),
        }
    }

    /// The model as this rank sees it: its heads, intermediate columns and vocabulary slice
    /// (hidden size, layers and everything else unchanged).
    pub fn local_config(&self, cfg: &ModelConfig) -> ModelConfig {
        let mut c = cfg.clone();
        c.num_heads = self.q_heads.len();
        c.num_kv_heads = self.kv_heads.len();
        c.intermediate_size = self.intermediate.len();
        c.vocab_size = self.vocab.len();
        c
    }

    pub fn is_full(&self) -> bool {
        self.world == 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// A rank failed (or timed out) and the whole group stopped.
    #[error("tensor-parallel group stopped: {0}")]
    Aborted(String),
    /// The ranks disagreed (different lengths, a message that does not parse): a bug, and the
    /// group stops too.
    #[error("{0}")]
    Invalid(String),
}

impl CommError {
    /// Why, without the kind: what a rank records as the group's reason.
    pub fn reason(&self) -> &str {
        match self {
            CommError::Aborted(r) | CommError::Invalid(r) => r,
        }
    }
}

/// Collectives between the ranks of a tensor-parallel group. Every rank calls the same
/// sequence of collectives; a call returns when all ranks have made it, or with an error once
/// any rank has failed or the group's timeout has passed.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, in place. Every rank adds the parts in rank
    /// order, so all ranks hold bit-identical results.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `local` (lengths may differ by rank), concatenated in rank order into
    /// `out`, whose length must be the sum.
    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CommError>;
    /// Replaces `buf` on every rank with `root`'s. Ranks other than `root` wait for it without
    /// a timeout (an idle server has no steps to send).
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError>;
    /// Returns when every rank has called it (within the timeout).
    fn barrier(&self) -> Result<(), CommError>;
    /// Stops the group: collectives in progress and later ones fail on every rank with
    /// `reason`.
    fn abort(&self, reason: &str);
    /// Checked between steps: why another rank is known to be gone, if it is (a closed
    /// connection). Ranks that share this process cannot vanish on their own.
    fn peer_lost(&self) -> Option<String> {
        None
    }
}

struct GroupState {
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
    slots: Vec<Vec<f32>>,
    bytes: Vec<u8>,
}

struct Group {
    world: usize,
    timeout: Duration,
    state: Mutex<GroupState>,
    cv: Condvar,
}

/// One rank of a CPU group created by [`thread_group`]: collectives through memory shared by
/// the threads of one process.
pub struct ThreadComm {
    group: Arc<Group>,
    rank: usize,
}

/// `world` communicators, one per rank (give each to its thread). A rank that waits longer
/// than `timeout` for the others stops the group with an error naming the missing ranks.
pub fn thread_group(world: usize, timeout: Duration) -> Vec<ThreadComm> {
    let group = Arc::new(Group {
        world,
        timeout,
        state: Mutex::new(GroupState {
            arrived: 0,
            generation: 0,
            aborted: None,
            slots: vec![Vec::new(); world],
            bytes: Vec::new(),
        }),
        cv: Condvar::new(),
    });
    (0..world)
        .map(|rank| ThreadComm {
            group: group.clone(),
            rank,
        })
        .collect()
}

impl ThreadComm {
    fn deadline(&self) -> Option<Instant> {
        Some(Instant::now() + self.group.timeout)
    }

    /// Waits until every rank has arrived at this point (or the group fails).
    fn wait_all(
        &self,
        st: &mut MutexGuard<'_, GroupState>,
        deadline: Option<Instant>,
    ) -> Result<(), CommError> {
        if let Some(reason) = &st.aborted {
            return Err(CommError::Aborted(reason.clone()));
        }
        let g = &self.group;
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == g.world {
            st.arrived = 0;
            st.generation = generation.wrapping_add(1);
            g.cv.notify_all();
            return Ok(());
        }
        loop {
            let timed_out = match deadline {
                Some(d) => g.cv.wait_until(st, d).timed_out(),
                None => {
                    g.cv.wait(st);
                    false
                }
            };
            if st.generation != generation {
                return Ok(());
            }
            if let Some(reason) = &st.aborted {
                return Err(CommError::Aborted(reason.clone()));
            }
            if timed_out {
                let reason = format!(
                    "rank {} waited {:.0}s for the other ranks; only {} of {} arrived",
                    self.rank,
                    g.timeout.as_secs_f64(),
                    st.arrived,
                    g.world
                );
                st.aborted = Some(reason.clone());
                g.cv.notify_all();
                return Err(CommError::Aborted(reason));
            }
        }
    }
}

impl ThreadComm {
    /// Puts `values` in this rank's slot and waits until every rank has put its own.
    fn deposit(
        &self,
        values: &[f32],
        deadline: Option<Instant>,
    ) -> Result<MutexGuard<'_, GroupState>, CommError> {
        let mut st = self.group.state.lock();
        let slot = &mut st.slots[self.rank];
        slot.clear();
        slot.extend_from_slice(values);
        self.wait_all(&mut st, deadline)?;
        Ok(st)
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let deadline = self.deadline();
        let mut st = self.deposit(buf, deadline)?;
        if st.slots.iter().any(|s| s.len() != buf.len()) {
            let reason = format!("all_reduce: ranks passed different lengths ({})", buf.len());
            st.aborted = Some(reason.clone());
            self.group.cv.notify_all();
            return Err(CommError::Invalid(reason));
        }
        let (first, rest) = st.slots.split_first().expect("world >= 1");
        buf.copy_from_slice(first);
        for s in rest {
            buf.iter_mut().zip(s).for_each(|(b, x)| *b += x);
        }
        // nobody may overwrite a slot before every rank has read them all
        self.wait_all(&mut st, deadline)
    }

    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let deadline = self.deadline();
        let mut st = self.deposit(local, deadline)?;
        let total: usize = st.slots.iter().map(Vec::len).sum();
        if total != out.len() {
            let reason = format!(
                "all_gather: the ranks hold {total} values, rank {} expected {}",
                self.rank,
                out.len()
            );
            st.aborted = Some(reason.clone());
            self.group.cv.notify_all();
            return Err(CommError::Invalid(reason));
        }
        let mut at = 0;
        for s in &st.slots {
            out[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        self.wait_all(&mut st, deadline)
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        let mut st = self.group.state.lock();
        let deadline = if self.rank == root {
            st.bytes.clear();
            st.bytes.extend_from_slice(buf);
            self.deadline()
        } else {
            None
        };
        self.wait_all(&mut st, deadline)?;
        if self.rank != root {
            buf.clear();
            buf.extend_from_slice(&st.bytes);
        }
        self.wait_all(&mut st, self.deadline())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let deadline = self.deadline();
        let mut st = self.group.state.lock();
        self.wait_all(&mut st, deadline)
    }

    fn abort(&self, reason: &str) {
        let mut st = self.group.state.lock();
        if st.aborted.is_none() {
            st.aborted = Some(reason.to_string());
        }
        self.group.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(heads: usize, kv: usize) -> ModelConfig {
        let text = format!(
            r#"{{"hidden_size": {}, "intermediate_size": 1536, "num_hidden_layers": 1,
            "num_attention_heads": {heads}, "num_key_value_heads": {kv}, "vocab_size": 49152}}"#,
            heads * 64
        );
        ModelConfig::from_json(&text, Path::new("config.json")).unwrap()
    }

    #[test]
    fn shards_cover_every_head_once() {
        for (h, k) in [(9, 3), (32, 8), (8, 8), (12, 2)] {
            let c = cfg(h, k);
            for world in 1..=h {
                if Shard::check(&c, world).is_err() {
                    continue;
                }
                let shards: Vec<Shard> = (0..world).map(|r| Shard::new(&c, r, world)).collect();
                let mut q = vec![0; h];
                let mut inter = 0;
                let mut vocab = 0;
                for s in &shards {
                    assert!(!s.q_heads.is_empty() && !s.kv_heads.is_empty());
                    for head in s.q_heads.clone() {
                        q[head] += 1;
                        // each query head sits with its own KV head
                        assert!(s.kv_heads.contains(&(head / (h / k))), "{h}/{k} tp {world}");
                    }
                    inter += s.intermediate.len();
                    vocab += s.vocab.len();
                }
                assert!(q.iter().all(|&n| n == 1), "{h}/{k} tp {world}: {q:?}");
                assert_eq!(inter, 1536);
                assert_eq!(vocab, 49152);
            }
        }
        let c = cfg(9, 3);
        assert!(Shard::check(&c, 2).is_ok() && Shard::check(&c, 3).is_ok());
        assert!(Shard::check(&c, 4).unwrap_err().contains("KV heads"));
        assert!(Shard::check(&c, 10)
            .unwrap_err()
            .contains("attention heads"));
        // 9 heads, 3 KV heads, 6 ranks: two ranks per KV head, query heads split 1 + 2
        let s = Shard::new(&c, 1, 6);
        assert_eq!((s.kv_heads, s.q_heads), (0..1, 1..3));
    }

    fn run_ranks<T: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(ThreadComm) -> T + Sync,
    ) -> Vec<T> {
        let comms = thread_group(world, timeout);
        std::thread::scope(|s| {
            let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_agree_on_every_rank() {
        let out = run_ranks(3, Duration::from_secs(10), |c| {
            let r = c.rank() as f32;
            let mut sums = Vec::new();
            for step in 0..50 {
                let mut buf = vec![r + step as f32, 2.0 * r, 1.0];
                c.all_reduce_sum(&mut buf).unwrap();
                sums.push(buf);
            }
            let local = vec![r; c.rank() + 1];
            let mut gathered = vec![0.0; 6];
            c.all_gather(&local, &mut gathered).unwrap();
            let mut msg = if c.rank() == 1 {
                b"hi".to_vec()
            } else {
                vec![]
            };
            c.broadcast(&mut msg, 1).unwrap();
            (sums, gathered, msg)
        });
        for (sums, gathered, msg) in &out {
            for (step, s) in sums.iter().enumerate() {
                assert_eq!(s, &vec![3.0 + 3.0 * step as f32, 6.0, 3.0]);
            }
            assert_eq!(gathered, &vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            assert_eq!(msg, b"hi");
        }
    }

    #[test]
    fn a_failed_rank_stops_the_others_instead_of_hanging() {
        let started = Instant::now();
        let out = run_ranks(3, Duration::from_secs(30), |c| {
            if c.rank() == 2 {
                c.abort("rank 2 failed: out of memory");
                return Err(CommError::Aborted("self".into()));
            }
            let mut buf = vec![1.0];
            c.all_reduce_sum(&mut buf)
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        for r in &out[..2] {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(e.contains("rank 2 failed: out of memory"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out() {
        let out = run_ranks(2, Duration::from_millis(200), |c| {
            if c.rank() == 1 {
                return Ok(());
            }
            c.barrier()
        });
        let e = out[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("only 1 of 2 arrived"), "{e}");
    }
}
