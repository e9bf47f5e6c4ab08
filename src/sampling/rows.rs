//! The per-row layout device sampling takes: one [`SampleRow`] per logits row (the same
//! struct as `SampleRow` in csrc/sampling.cu) and one flat array of the lists the rows index
//! (penalties, bans, masks), built from the same parameters, state and random draw as the
//! host sampler uses.

use super::params::{SamplingParams, MAX_TOP_LOGPROBS};
use super::sampler::SampleSpec;

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
    /// Words `[pen_start, pen_end)` of [`SampleBatch::lists`]: this row's penalty entries,
    /// `(token, its count among the output tokens, 1 if seen in prompt or output)` triples.
    pub pen_start: i32,
    pub pen_end: i32,
    /// Words `[ban_start, ban_end)` of [`SampleBatch::lists`]: the tokens banned now.
    pub ban_start: i32,
    pub ban_end: i32,
    pub n_top: i32,
    /// First word of this row's allowed-token bitmask in [`SampleBatch::lists`] (bit `t % 32`
    /// of word `t / 32` allows token `t`); -1: every token is allowed.
    pub mask_start: i32,
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
/// the penalty, ban and mask lists the rows index. Built from the same parameters and state
/// as [`Sampler::sample`](super::Sampler::sample), drawing the same random number from the
/// request's generator.
#[derive(Debug, Clone, Default)]
pub struct SampleBatch {
    pub rows: Vec<SampleRow>,
    /// The rows' penalty entries, banned tokens and allowed-token bitmasks, one after the
    /// other, at the words each [`SampleRow`] names: one array, so that a device takes a
    /// step's sampling input in one copy.
    pub lists: Vec<u32>,
    /// Whether each row's caller wants the chosen token's logprob (else it is reported as 0,
    /// as the host sampler does).
    pub want_logprob: Vec<bool>,
}

/// 32-bit words of scratch `sg_sample` needs per row (its `work` argument): the row's
/// processed logits, then a bitmap of the tokens the penalty and ban lists touch.
pub fn device_work_words(vocab: usize) -> usize {
    vocab + vocab.div_ceil(32)
}

impl SampleBatch {
    pub fn clear(&mut self) {
        self.rows.clear();
        self.lists.clear();
        self.want_logprob.clear();
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds the next row; draws from the request's generator when the row is not greedy,
    /// exactly as the host sampler would.
    pub fn push(&mut self, spec: SampleSpec<'_>) {
        let SampleSpec {
            params,
            state,
            top_logprobs,
            want_logprob,
            banned,
            allowed,
        } = spec;
        let greedy = params.is_greedy();
        let lists = &mut self.lists;
        let pen_start = lists.len() as i32;
        if params.repetition_penalty != 1.0 {
            for &t in state.seen.keys() {
                let count = state.output_counts.get(&t).copied().unwrap_or(0);
                lists.extend_from_slice(&[t, count, 1]);
            }
        }
        if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
            for (&t, &c) in &state.output_counts {
                if !state.seen.contains_key(&t) {
                    lists.extend_from_slice(&[t, c, 0]);
                }
            }
        }
        let pen_end = lists.len() as i32;
        lists.extend_from_slice(banned);
        let mask_start = match allowed {
            Some(mask) => {
                let at = lists.len() as i32;
                lists.extend_from_slice(mask);
                at
            }
            None => -1,
        };
        self.rows.push(SampleRow {
            repetition_penalty: params.repetition_penalty,
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            greedy: i32::from(greedy),
            u: if greedy { 0.0 } else { state.rng.next_f64() },
            pen_start,
            pen_end,
            ban_start: pen_end,
            ban_end: pen_end + banned.len() as i32,
            n_top: top_logprobs.min(MAX_TOP_LOGPROBS) as i32,
            mask_start,
            ..SampleRow::filters(params)
        });
        self.want_logprob.push(want_logprob || top_logprobs > 0);
    }

    /// A row whose result is not used (a request that only scores its prompt): greedy, no
    /// penalties, no draw from any generator.
    pub fn push_unused(&mut self) {
        let at = self.lists.len() as i32;
        self.rows.push(SampleRow {
            temperature: 1.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            greedy: 1,
            pen_start: at,
            pen_end: at,
            ban_start: at,
            ban_end: at,
            mask_start: -1,
            ..SampleRow::default()
        });
        self.want_logprob.push(false);
    }
}
