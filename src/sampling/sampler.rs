//! The host sampler: penalties, temperature, the candidate filters and the draw, with each
//! request's own seeded generator, and the logprobs of the model's distribution.
//!
//! Order of logit processing, as in vLLM and SGLang: a constraint's allowed-token mask and the
//! banned tokens first, then repetition penalty (prompt and output tokens, HF's
//! divide/multiply rule), frequency and presence penalties (output tokens, OpenAI's
//! subtractive rule), temperature, then the candidate filters top-k, top-p and min-p, then a
//! draw from the renormalised candidates with the request's own generator (xoshiro256**,
//! seeded: the same seed gives the same tokens). Temperature 0 (or top_k 1) is greedy.
//!
//! Logprobs are those of the model's distribution (log-softmax of the raw logits, before any
//! penalty or temperature), for the chosen token and the `top_logprobs_num` most likely ones.
//!
//! Cost per row: O(vocab) for greedy; O(vocab + k log k) with the candidates the filters can
//! keep (top-k bounds them, else they grow until top-p's mass is covered).

use std::collections::HashMap;

use serde::Serialize;

use super::params::SamplingParams;
use super::rows::{SampleBatch, SampleRow};

/// xoshiro256** (Blackman & Vigna), seeded through SplitMix64. Small, fast, and fixed here so
/// that a seed gives the same tokens in every release.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    /// A seed from the clock and a process-wide counter (requests without `seed`).
    pub fn entropy_seed() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ COUNTER.fetch_add(0x9E3779B97F4A7C15, Ordering::Relaxed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A token and its logprob.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// A token with its logprob and the most likely alternatives at its position: what a sampler
/// chose (on the host or the device), and what prompt logprobs report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenInfo {
    pub token_id: u32,
    /// Logprob of the token under the model's distribution (0 when it was not asked for).
    pub logprob: f32,
    /// The most likely tokens (empty unless asked for), most likely first.
    pub top_logprobs: Vec<TokenLogprob>,
}

/// What sampling one row takes: the request's parameters, its generator and penalty state,
/// the logprobs it wants and the tokens banned now. Both sampling paths take it: the host's
/// [`Sampler::sample`] and the device's [`SampleBatch::push`].
#[derive(Debug)]
pub struct SampleSpec<'a> {
    pub params: &'a SamplingParams,
    pub state: &'a mut SamplerState,
    /// How many most likely alternatives to report (0: none).
    pub top_logprobs: usize,
    /// Whether the chosen token's logprob is wanted.
    pub want_logprob: bool,
    /// Tokens that may not be chosen now (the stop tokens until `min_new_tokens` are out).
    pub banned: &'a [u32],
    /// The only tokens that may be chosen (a constraint's bitmask: bit `t % 32` of word
    /// `t / 32` allows token `t`), applied before everything else; `None`: any token.
    pub allowed: Option<&'a [u32]>,
}

/// Per-request sampler state: the generator and the counts the penalties need.
#[derive(Debug, Clone)]
pub struct SamplerState {
    pub(super) rng: Rng,
    /// Occurrences of each generated token (frequency / presence penalties).
    pub(super) output_counts: HashMap<u32, u32>,
    /// Every token seen so far, prompt and output (repetition penalty).
    pub(super) seen: HashMap<u32, ()>,
}

impl SamplerState {
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(Rng::entropy_seed);
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().map(|&t| (t, ())).collect()
        } else {
            HashMap::new()
        };
        Self {
            rng: Rng::new(seed),
            output_counts: HashMap::new(),
            seen,
        }
    }

    /// Records a generated token.
    pub fn observe(&mut self, params: &SamplingParams, token: u32) {
        if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
        if params.repetition_penalty != 1.0 {
            self.seen.insert(token, ());
        }
    }
}

/// Reusable buffers of the sampler (no allocation per token in steady state).
#[derive(Debug, Default)]
pub struct Sampler {
    work: Vec<f32>,
    candidates: Vec<(u32, f32)>,
    /// The one-row batch `sample` states its request in.
    one: SampleBatch,
}

impl Sampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Chooses the next token from `logits` (one row, the vocabulary).
    pub fn sample(&mut self, logits: &[f32], spec: SampleSpec<'_>) -> TokenInfo {
        let mut one = std::mem::take(&mut self.one);
        one.clear();
        one.push(spec);
        let s = self.sample_row(logits, &one, 0);
        self.one = one;
        s
    }

    /// Row `i` of `samples` chosen from `logits` (that row's logits): what a backend that
    /// samples where the logits are (the CPU) runs, and the host's statement of what
    /// csrc/sampling.cu computes. Same rules and random number as [`Sampler::sample`].
    pub fn sample_row(&mut self, logits: &[f32], samples: &SampleBatch, i: usize) -> TokenInfo {
        let row = &samples.rows[i];
        let work = &mut self.work;
        work.clear();
        match row.mask_start {
            m if m >= 0 => apply_mask(logits, &samples.lists[m as usize..], work),
            _ => work.extend_from_slice(logits),
        }
        let lists = &samples.lists;
        for &b in &lists[row.ban_start as usize..row.ban_end as usize] {
            if let Some(v) = work.get_mut(b as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        for e in lists[row.pen_start as usize..row.pen_end as usize].chunks_exact(3) {
            let &[token, c, seen] = e else { continue };
            let Some(v) = work.get_mut(token as usize) else {
                continue;
            };
            let p = row.repetition_penalty;
            if p != 1.0 && seen != 0 {
                *v = if *v > 0.0 { *v / p } else { *v * p };
            }
            if c > 0 && (row.frequency_penalty != 0.0 || row.presence_penalty != 0.0) {
                *v -= row.frequency_penalty * c as f32 + row.presence_penalty;
            }
        }
        let token_id = if row.greedy != 0 {
            argmax(work) as u32
        } else {
            self.draw(row, row.u)
        };
        let top = row.n_top as usize;
        let (logprob, top_logprobs) = if samples.want_logprob[i] || top > 0 {
            logprobs_of(logits, token_id, top)
        } else {
            (0.0, Vec::new())
        };
        TokenInfo {
            token_id,
            logprob,
            top_logprobs,
        }
    }

    /// Temperature, top-k, top-p, min-p (of `params`), then a draw with `u` uniform in [0, 1).
    fn draw(&mut self, params: &SampleRow, u: f64) -> u32 {
        let work = &self.work;
        let inv_t = 1.0 / params.temperature;
        let max = work.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let k = if params.top_k > 0 {
            (params.top_k as usize).min(work.len())
        } else {
            work.len()
        };
        // Candidates sorted by probability, most likely first. Only as many as the filters can
        // keep are sorted: top-k bounds them; otherwise grow until top-p's mass is covered.
        let cands = &mut self.candidates;
        let mut take = k.min(256);
        let total: f64 = work
            .iter()
            .map(|&v| (((v - max) * inv_t) as f64).exp())
            .sum();
        loop {
            cands.clear();
            cands.extend(
                work.iter()
                    .enumerate()
                    .map(|(i, &v)| (i as u32, ((v - max) * inv_t).exp())),
            );
            // most likely first, lower id first on ties (also at the cut: a top-k that
            // falls inside a run of equal probabilities keeps the lowest ids, as the device)
            let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            if take < cands.len() {
                cands.select_nth_unstable_by(take - 1, order);
                cands.truncate(take);
            }
            cands.sort_unstable_by(order);
            let mass: f64 = cands.iter().map(|c| c.1 as f64).sum::<f64>() / total;
            if take >= k || mass >= params.top_p as f64 {
                break;
            }
            take = (take * 4).min(k);
        }
        // top-p over the full distribution's mass
        if params.top_p < 1.0 {
            let mut acc = 0.0f64;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                acc += c.1 as f64 / total;
                if acc >= params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        if params.min_p > 0.0 {
            let threshold = cands[0].1 * params.min_p;
            let keep = cands.iter().take_while(|c| c.1 >= threshold).count();
            cands.truncate(keep.max(1));
        }
        let sum: f64 = cands.iter().map(|c| c.1 as f64).sum();
        let mut u = u * sum;
        for c in cands.iter() {
            u -= c.1 as f64;
            if u < 0.0 {
                return c.0;
            }
        }
        cands.last().map(|c| c.0).unwrap_or(0)
    }
}

/// `work` = `logits` where `mask` allows the token (bit `t % 32` of word `t / 32`), -inf
/// elsewhere; a word at a time, so a mostly closed or mostly open mask costs little.
fn apply_mask(logits: &[f32], mask: &[u32], work: &mut Vec<f32>) {
    work.resize(logits.len(), f32::NEG_INFINITY);
    for (w, (from, to)) in logits.chunks(32).zip(work.chunks_mut(32)).enumerate() {
        let mut bits = mask.get(w).copied().unwrap_or(0);
        if bits == u32::MAX && from.len() == 32 {
            to.copy_from_slice(from);
            continue;
        }
        while bits != 0 {
            let j = bits.trailing_zeros() as usize;
            if let (Some(o), Some(&v)) = (to.get_mut(j), from.get(j)) {
                *o = v;
            }
            bits &= bits - 1;
        }
    }
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best_v = x;
            best = i;
        }
    }
    best
}

/// The logprob of `token_id` under the distribution of one row of raw `logits`, and the `top`
/// most likely tokens with theirs (most likely first).
pub fn logprobs_of(logits: &[f32], token_id: u32, top: usize) -> (f32, Vec<TokenLogprob>) {
    let lse = log_sum_exp(logits);
    let top = top_n(logits, top)
        .into_iter()
        .map(|(t, v)| TokenLogprob {
            token_id: t,
            logprob: v - lse,
        })
        .collect();
    (logits[token_id as usize] - lse, top)
}

fn log_sum_exp(v: &[f32]) -> f32 {
    let max = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let s: f64 = v.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + s.ln() as f32
}

/// The `n` largest values with their indices, largest first (ties: lower id first).
fn top_n(v: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut all: Vec<(u32, f32)> = v.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    let n = n.min(all.len());
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n < all.len() {
        all.select_nth_unstable_by(n - 1, cmp);
        all.truncate(n);
    }
    all.sort_unstable_by(cmp);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(
        params: &'a SamplingParams,
        state: &'a mut SamplerState,
        top_logprobs: usize,
        want_logprob: bool,
        banned: &'a [u32],
    ) -> SampleSpec<'a> {
        SampleSpec {
            params,
            state,
            top_logprobs,
            want_logprob,
            banned,
            allowed: None,
        }
    }

    fn logits() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn top_k_never_leaves_the_k_best() {
        let l = logits();
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let best: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 5,
            seed: Some(1),
            ..Default::default()
        };
        let mut state = SamplerState::new(&params, &[]);
        let mut sampler = Sampler::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let s = sampler.sample(&l, spec(&params, &mut state, 0, false, &[]));
            assert!(
                best.contains(&s.token_id),
                "{} outside the top 5",
                s.token_id
            );
            seen.insert(s.token_id);
        }
        assert_eq!(seen.len(), 5, "high temperature should reach all five");
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ~ 0.5, 0.25, 0.125, ... : top_p 0.7 keeps two tokens
        let l: Vec<f32> = (0..20)
            .map(|i| -(i as f32) * std::f32::consts::LN_2)
            .collect();
        let params = SamplingParams {
            top_p: 0.7,
            seed: Some(3),
            ..Default::default()
        };
        let mut state = SamplerState::new(&params, &[]);
        let mut sampler = Sampler::new();
        for _ in 0..500 {
            let t = sampler
                .sample(&l, spec(&params, &mut state, 0, false, &[]))
                .token_id;
            assert!(t <= 1, "top_p kept token {t}");
        }
        let params = SamplingParams {
            min_p: 0.3,
            seed: Some(3),
            ..Default::default()
        };
        for _ in 0..500 {
            let t = sampler
                .sample(&l, spec(&params, &mut state, 0, false, &[]))
                .token_id;
            assert!(t <= 1, "min_p kept token {t}");
        }
    }

    #[test]
    fn a_seed_reproduces() {
        let l = logits();
        let run = |seed| {
            let params = SamplingParams {
                temperature: 1.5,
                seed: Some(seed),
                ..Default::default()
            };
            let mut state = SamplerState::new(&params, &[]);
            let mut sampler = Sampler::new();
            (0..50)
                .map(|_| {
                    sampler
                        .sample(&l, spec(&params, &mut state, 0, false, &[]))
                        .token_id
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn penalties_change_what_they_should() {
        let mut l = vec![0.0f32; 10];
        l[3] = 2.0;
        l[4] = 1.9;
        let mut sampler = Sampler::new();
        // greedy picks 3; after seeing 3, a repetition penalty moves it below 4
        let p = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.5,
            ..Default::default()
        };
        let mut st = SamplerState::new(&p, &[]);
        assert_eq!(
            sampler
                .sample(&l, spec(&p, &mut st, 0, false, &[]))
                .token_id,
            3
        );
        st.observe(&p, 3);
        assert_eq!(
            sampler
                .sample(&l, spec(&p, &mut st, 0, false, &[]))
                .token_id,
            4
        );
        // the repetition penalty also counts prompt tokens
        let mut st = SamplerState::new(&p, &[3]);
        assert_eq!(
            sampler
                .sample(&l, spec(&p, &mut st, 0, false, &[]))
                .token_id,
            4
        );
        // presence penalty: subtracts once
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.2,
            ..Default::default()
        };
        let mut st = SamplerState::new(&p, &[3]);
        assert_eq!(
            sampler
                .sample(&l, spec(&p, &mut st, 0, false, &[]))
                .token_id,
            3,
            "prompt tokens do not count"
        );
        st.observe(&p, 3);
        assert_eq!(
            sampler
                .sample(&l, spec(&p, &mut st, 0, false, &[]))
                .token_id,
            4
        );
        // frequency penalty grows with the count
        let p = SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.06,
            ..Default::default()
        };
        let mut st = SamplerState::new(&p, &[]);
        st.observe(&p, 3);
        assert_eq!(
            sampler
                .sample(&l, spec(&p, &mut st, 0, false, &[]))
                .token_id,
            3,
            "2.0 - 0.06 > 1.9"
        );
        st.observe(&p, 3);
        assert_eq!(
            sampler
                .sample(&l, spec(&p, &mut st, 0, false, &[]))
                .token_id,
            4,
            "2.0 - 0.12 < 1.9"
        );
        // negative penalties encourage
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: -0.5,
            ..Default::default()
        };
        let mut st = SamplerState::new(&p, &[]);
        st.observe(&p, 4);
        assert_eq!(
            sampler
                .sample(&l, spec(&p, &mut st, 0, false, &[]))
                .token_id,
            4
        );
    }

    #[test]
    fn masks_keep_exactly_the_allowed_tokens() {
        let logits: Vec<f32> = (0..70).map(|i| i as f32).collect();
        let mask = [u32::MAX, 0b1010, 1 << 5];
        let mut work = Vec::new();
        apply_mask(&logits, &mask, &mut work);
        for (t, &v) in work.iter().enumerate() {
            let allowed = t < 32 || t == 33 || t == 35 || t == 69;
            assert_eq!(v == t as f32, allowed, "token {t}");
            assert_eq!(v == f32::NEG_INFINITY, !allowed, "token {t}");
        }
        // the sampler takes the best allowed token, and only allowed ones
        let p = SamplingParams::greedy(1);
        let mut st = SamplerState::new(&p, &[]);
        let mut sampler = Sampler::new();
        let s = sampler.sample(
            &logits,
            SampleSpec {
                allowed: Some(&mask[..]),
                ..spec(&p, &mut st, 0, false, &[])
            },
        );
        assert_eq!(s.token_id, 69);
        let hot = SamplingParams {
            temperature: 5.0,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut st = SamplerState::new(&hot, &[]);
        for _ in 0..200 {
            let t = sampler
                .sample(
                    &logits,
                    SampleSpec {
                        allowed: Some(&[0, 0b1010]),
                        ..spec(&hot, &mut st, 0, false, &[])
                    },
                )
                .token_id;
            assert!(t == 33 || t == 35, "{t}");
        }
    }

    #[test]
    fn logprobs_are_of_the_raw_distribution() {
        let l = vec![1.0f32, 2.0, 3.0];
        let p = SamplingParams::greedy(1);
        let mut st = SamplerState::new(&p, &[]);
        let s = Sampler::new().sample(&l, spec(&p, &mut st, 2, true, &[]));
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert_eq!(s.token_id, 2);
        assert!((s.logprob - (3.0 - lse)).abs() < 1e-5);
        assert_eq!(s.top_logprobs.len(), 2);
        assert_eq!(s.top_logprobs[1].token_id, 1);
        // banned tokens are never chosen
        let s = Sampler::new().sample(&l, spec(&p, &mut st, 0, false, &[2]));
        assert_eq!(s.token_id, 1);
    }
}
