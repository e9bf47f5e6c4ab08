//! Sampling parameters (validated), the CPU sampler, and stop-string matching.
//!
//! Order of logit processing, as in vLLM and SGLang: repetition penalty (prompt and output
//! tokens, HF's divide/multiply rule), frequency and presence penalties (output tokens, OpenAI's
//! subtractive rule), temperature, then the candidate filters top-k, top-p and min-p, then a
//! draw from the renormalised candidates with the request's own generator (xoshiro256**,
//! seeded: the same seed gives the same tokens). Temperature 0 (or top_k 1) is greedy.
//!
//! Logprobs are those of the model's distribution (log-softmax of the raw logits, before any
//! penalty or temperature), for the chosen token and the `top_logprobs_num` most likely ones.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Most `top_logprobs_num` a request may ask for (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;

/// A parameter outside its bound; `param` is the field name as the API spells it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{param}` {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

impl ParamError {
    pub fn new(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: param.to_string(),
            message: message.into(),
        }
    }
}

/// SGLang's `sampling_params` (field names and defaults as in SGLang).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// -1 (or 0): no top-k filter.
    pub top_k: i64,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    /// Keep the matched stop string at the end of the text.
    pub no_stop_trim: bool,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            min_new_tokens: 0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
            no_stop_trim: false,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-6 || self.top_k == 1
    }

    /// Checks every field against its bound; the error names the field.
    pub fn validate(&self, vocab_size: usize) -> Result<(), ParamError> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(ParamError::new(
                    name,
                    format!("must be a finite number, got {v}"),
                ))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        if self.temperature < 0.0 {
            return Err(ParamError::new(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ParamError::new(
                "top_p",
                format!("must be > 0 and <= 1, got {}", self.top_p),
            ));
        }
        if self.top_k < -1 {
            return Err(ParamError::new(
                "top_k",
                format!("must be -1 (disabled) or >= 1, got {}", self.top_k),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ParamError::new(
                "min_p",
                format!("must be >= 0 and <= 1, got {}", self.min_p),
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return Err(ParamError::new(
                "repetition_penalty",
                format!("must be > 0 and <= 2, got {}", self.repetition_penalty),
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(ParamError::new(
                "frequency_penalty",
                format!("must be >= -2 and <= 2, got {}", self.frequency_penalty),
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(ParamError::new(
                "presence_penalty",
                format!("must be >= -2 and <= 2, got {}", self.presence_penalty),
            ));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(ParamError::new(
                "min_new_tokens",
                format!(
                    "must be <= max_new_tokens ({}), got {}",
                    self.max_new_tokens, self.min_new_tokens
                ),
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(ParamError::new(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    self.stop.len()
                ),
            ));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(ParamError::new("stop", "stop strings must not be empty"));
        }
        if let Some(&id) = self
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(ParamError::new(
                "stop_token_ids",
                format!("{id} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        Ok(())
    }
}

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

/// What the sampler chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    /// Logprob of the chosen token under the model's distribution.
    pub logprob: f32,
    /// The most likely tokens (empty unless asked for), most likely first.
    pub top_logprobs: Vec<TokenLogprob>,
}

/// Per-request sampler state: the generator and the counts the penalties need.
#[derive(Debug, Clone)]
pub struct SamplerState {
    rng: Rng,
    /// Occurrences of each generated token (frequency / presence penalties).
    output_counts: HashMap<u32, u32>,
    /// Every token seen so far, prompt and output (repetition penalty).
    seen: HashMap<u32, ()>,
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
    /// `banned`: tokens that may not be chosen now (EOS before `min_new_tokens`).
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        state: &mut SamplerState,
        top_logprobs: usize,
        want_logprob: bool,
        banned: &[u32],
    ) -> Sampled {
        let mut one = std::mem::take(&mut self.one);
        one.clear();
        one.push(params, state, top_logprobs, want_logprob, banned);
        let s = self.sample_row(logits, &one, 0);
        self.one = one;
        s
    }

    /// Row `i` of `samples` chosen from `logits` (that row's logits): what a backend that
    /// samples where the logits are (the CPU) runs, and the host's statement of what
    /// csrc/sampling.cu computes. Same rules and random number as [`Sampler::sample`].
    pub fn sample_row(&mut self, logits: &[f32], samples: &SampleBatch, i: usize) -> Sampled {
        let row = &samples.rows[i];
        let work = &mut self.work;
        work.clear();
        work.extend_from_slice(logits);
        for &b in &samples.banned[row.ban_start as usize..row.ban_end as usize] {
            if let Some(v) = work.get_mut(b as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        for e in row.pen_start as usize..row.pen_end as usize {
            let Some(v) = work.get_mut(samples.pen_tokens[e] as usize) else {
                continue;
            };
            let p = row.repetition_penalty;
            if p != 1.0 && samples.pen_seen[e] != 0 {
                *v = if *v > 0.0 { *v / p } else { *v * p };
            }
            let c = samples.pen_counts[e];
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
        Sampled {
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
            if take < cands.len() {
                cands.select_nth_unstable_by(take - 1, |a, b| b.1.total_cmp(&a.1));
                cands.truncate(take);
            }
            cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
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

/// One row of device sampling (`SampleRow` of csrc/sampling.cu: same fields, same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleRow {
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// <= 0: no top-k filter.
    pub top_k: i32,
    /// 1: argmax of the processed logits.
    pub greedy: i32,
    /// The draw's uniform number in [0, 1), from the request's generator.
    pub u: f64,
    pub pen_start: i32,
    pub pen_end: i32,
    pub ban_start: i32,
    pub ban_end: i32,
    pub n_top: i32,
    pub pad: i32,
}

impl SampleRow {
    /// The candidate filters of `params` (the rest left at their defaults).
    fn filters(params: &SamplingParams) -> Self {
        Self {
            temperature: params.temperature,
            top_p: params.top_p,
            min_p: params.min_p,
            top_k: params.top_k.clamp(-1, i32::MAX as i64) as i32,
            ..Self::default()
        }
    }
}

/// A step's sampling for a device that samples itself: one [`SampleRow`] per logits row and
/// the penalty and ban lists the rows index. Built from the same parameters and state as
/// [`Sampler::sample`], drawing the same random number from the request's generator.
#[derive(Debug, Clone, Default)]
pub struct SampleBatch {
    pub rows: Vec<SampleRow>,
    /// Penalty entries: a token, its count among the output tokens, and 1 when it was seen
    /// (prompt or output) for the repetition penalty.
    pub pen_tokens: Vec<u32>,
    pub pen_counts: Vec<u32>,
    pub pen_seen: Vec<u32>,
    pub banned: Vec<u32>,
    /// Whether each row's caller wants the chosen token's logprob (else it is reported as 0,
    /// as the host sampler does).
    pub want_logprob: Vec<bool>,
}

impl SampleBatch {
    pub fn clear(&mut self) {
        self.rows.clear();
        self.pen_tokens.clear();
        self.pen_counts.clear();
        self.pen_seen.clear();
        self.banned.clear();
        self.want_logprob.clear();
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds the next row (arguments as [`Sampler::sample`]); draws from `state`'s generator
    /// when the row is not greedy, exactly as the host sampler would.
    pub fn push(
        &mut self,
        params: &SamplingParams,
        state: &mut SamplerState,
        top_logprobs: usize,
        want_logprob: bool,
        banned: &[u32],
    ) {
        let greedy = params.is_greedy();
        let pen_start = self.pen_tokens.len() as i32;
        if params.repetition_penalty != 1.0 {
            for &t in state.seen.keys() {
                self.pen_tokens.push(t);
                self.pen_counts
                    .push(state.output_counts.get(&t).copied().unwrap_or(0));
                self.pen_seen.push(1);
            }
        }
        if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
            for (&t, &c) in &state.output_counts {
                if !state.seen.contains_key(&t) {
                    self.pen_tokens.push(t);
                    self.pen_counts.push(c);
                    self.pen_seen.push(0);
                }
            }
        }
        let ban_start = self.banned.len() as i32;
        self.banned.extend_from_slice(banned);
        self.rows.push(SampleRow {
            repetition_penalty: params.repetition_penalty,
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            greedy: i32::from(greedy),
            u: if greedy { 0.0 } else { state.rng.next_f64() },
            pen_start,
            pen_end: self.pen_tokens.len() as i32,
            ban_start,
            ban_end: self.banned.len() as i32,
            n_top: top_logprobs.min(MAX_TOP_LOGPROBS) as i32,
            ..SampleRow::filters(params)
        });
        self.want_logprob.push(want_logprob || top_logprobs > 0);
    }

    /// A row whose result is not used (a request that only scores its prompt): greedy, no
    /// penalties, no draw from any generator.
    pub fn push_unused(&mut self) {
        let (p, b) = (self.pen_tokens.len() as i32, self.banned.len() as i32);
        self.rows.push(SampleRow {
            temperature: 1.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            greedy: 1,
            pen_start: p,
            pen_end: p,
            ban_start: b,
            ban_end: b,
            ..SampleRow::default()
        });
        self.want_logprob.push(false);
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

/// Finds stop strings in generated text as it grows, and decides how much text is safe to
/// stream: text that could still turn out to be the start of a stop string is held back.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    longest: usize,
}

/// Result of [`StopMatcher::check`].
#[derive(Debug, Clone, PartialEq)]
pub enum StopCheck {
    /// No stop string; text up to `safe_len` bytes may be emitted.
    Continue { safe_len: usize },
    /// A stop string begins at byte `at` (the text is to be cut there).
    Stop { at: usize, matched: String },
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            longest: stops.iter().map(|s| s.len()).max().unwrap_or(0),
            stops: stops.to_vec(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// `text` is all generated text; `new_from` the byte where this step's new text starts.
    /// Only matches overlapping the new text are looked for (older text was checked already).
    pub fn check(&self, text: &str, new_from: usize) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue {
                safe_len: text.len(),
            };
        }
        let mut from = new_from.saturating_sub(self.longest.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let mut best: Option<(usize, &str)> = None;
        for s in &self.stops {
            if let Some(i) = text[from..].find(s.as_str()) {
                let at = from + i;
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, s));
                }
            }
        }
        if let Some((at, s)) = best {
            return StopCheck::Stop {
                at,
                matched: s.to_string(),
            };
        }
        // Hold back the longest suffix of `text` that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for len in (1..s.len()).rev() {
                if len <= hold || len > text.len() {
                    continue;
                }
                if s.is_char_boundary(len) && text.ends_with(&s[..len]) {
                    hold = len;
                    break;
                }
            }
        }
        StopCheck::Continue {
            safe_len: text.len() - hold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn validation_names_the_field_and_bound() {
        let check = |p: SamplingParams| p.validate(1000).unwrap_err().to_string();
        let e = check(SamplingParams {
            top_p: 1.5,
            ..Default::default()
        });
        assert!(e.contains("`top_p`") && e.contains("<= 1"), "{e}");
        let e = check(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        });
        assert!(e.contains("`temperature`"), "{e}");
        let e = check(SamplingParams {
            top_k: -5,
            ..Default::default()
        });
        assert!(e.contains("`top_k`"), "{e}");
        let e = check(SamplingParams {
            min_p: 2.0,
            ..Default::default()
        });
        assert!(e.contains("`min_p`"), "{e}");
        let e = check(SamplingParams {
            stop_token_ids: vec![5000],
            ..Default::default()
        });
        assert!(e.contains("`stop_token_ids`"), "{e}");
        let e = check(SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        });
        assert!(e.contains("`temperature`"), "{e}");
        assert!(SamplingParams::default().validate(1000).is_ok());
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
            let s = sampler.sample(&l, &params, &mut state, 0, false, &[]);
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
                .sample(&l, &params, &mut state, 0, false, &[])
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
                .sample(&l, &params, &mut state, 0, false, &[])
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
                        .sample(&l, &params, &mut state, 0, false, &[])
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
        assert_eq!(sampler.sample(&l, &p, &mut st, 0, false, &[]).token_id, 3);
        st.observe(&p, 3);
        assert_eq!(sampler.sample(&l, &p, &mut st, 0, false, &[]).token_id, 4);
        // the repetition penalty also counts prompt tokens
        let mut st = SamplerState::new(&p, &[3]);
        assert_eq!(sampler.sample(&l, &p, &mut st, 0, false, &[]).token_id, 4);
        // presence penalty: subtracts once
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.2,
            ..Default::default()
        };
        let mut st = SamplerState::new(&p, &[3]);
        assert_eq!(
            sampler.sample(&l, &p, &mut st, 0, false, &[]).token_id,
            3,
            "prompt tokens do not count"
        );
        st.observe(&p, 3);
        assert_eq!(sampler.sample(&l, &p, &mut st, 0, false, &[]).token_id, 4);
        // frequency penalty grows with the count
        let p = SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.06,
            ..Default::default()
        };
        let mut st = SamplerState::new(&p, &[]);
        st.observe(&p, 3);
        assert_eq!(
            sampler.sample(&l, &p, &mut st, 0, false, &[]).token_id,
            3,
            "2.0 - 0.06 > 1.9"
        );
        st.observe(&p, 3);
        assert_eq!(
            sampler.sample(&l, &p, &mut st, 0, false, &[]).token_id,
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
        assert_eq!(sampler.sample(&l, &p, &mut st, 0, false, &[]).token_id, 4);
    }

    #[test]
    fn logprobs_are_of_the_raw_distribution() {
        let l = vec![1.0f32, 2.0, 3.0];
        let p = SamplingParams::greedy(1);
        let mut st = SamplerState::new(&p, &[]);
        let s = Sampler::new().sample(&l, &p, &mut st, 2, true, &[]);
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert_eq!(s.token_id, 2);
        assert!((s.logprob - (3.0 - lse)).abs() < 1e-5);
        assert_eq!(s.top_logprobs.len(), 2);
        assert_eq!(s.top_logprobs[1].token_id, 1);
        // banned tokens are never chosen
        let s = Sampler::new().sample(&l, &p, &mut st, 0, false, &[2]);
        assert_eq!(s.token_id, 1);
    }

    #[test]
    fn stop_strings_cut_exactly_and_hold_back_prefixes() {
        let m = StopMatcher::new(&["###".to_string(), "\nUser:".to_string()]);
        assert_eq!(m.check("hello", 0), StopCheck::Continue { safe_len: 5 });
        // "##" might become "###": held back
        assert_eq!(m.check("hello ##", 5), StopCheck::Continue { safe_len: 6 });
        assert_eq!(
            m.check("hello ###!", 8),
            StopCheck::Stop {
                at: 6,
                matched: "###".into()
            }
        );
        // a match spanning old and new text is found
        assert_eq!(m.check("a\nUse", 1), StopCheck::Continue { safe_len: 1 });
        assert_eq!(
            m.check("a\nUser: hi", 5),
            StopCheck::Stop {
                at: 1,
                matched: "\nUser:".into()
            }
        );
        // multi-byte text near a boundary does not panic
        let m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.check("caféé", 4), StopCheck::Continue { safe_len: 5 });
        assert_eq!(
            m.check("caféé!", 6),
            StopCheck::Stop {
                at: 5,
                matched: "é!".into()
            }
        );
    }
}
