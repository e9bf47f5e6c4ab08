//! One request as the engine thread keeps it, beside its tokens in the scheduler's `Seq`: how
//! its next token is sampled, the text it has produced and how much of that was sent, when it
//! stops, where its events go, and its timings. The engine thread alone owns it.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::{Event, FinishReason, GenerateRequest, Matched};
use crate::constraint::Constraint;
use crate::sampling::{SampleSpec, SamplerState, SamplingParams, TokenInfo};
use crate::tokenizer::{IncrementalDecoder, StopCheck, StopMatcher, Tokenizer};

pub(super) struct Request {
    pub params: SamplingParams,
    pub sampler: SamplerState,
    detok: IncrementalDecoder,
    /// All text so far (before stop trimming) and how much of it was sent.
    text: String,
    sent: usize,
    stop: StopMatcher,
    /// Tokens that end the request (its `stop_token_ids`, and EOS unless `ignore_eos`).
    stop_ids: Vec<u32>,
    /// The request's `max_new_tokens`, capped by the room the context length leaves.
    pub max_new_tokens: usize,
    /// Where its output is in its constraint's grammar (structured output).
    pub constraint: Option<Box<Constraint>>,
    return_logprob: bool,
    pub top_logprobs_num: usize,
    /// Prompt logprobs computed so far (sent with the first chunk); from where is the
    /// sequence's `logprob_from`.
    pub prompt_logprobs: Vec<TokenInfo>,
    pub tx: UnboundedSender<Event>,
    pub submitted: Instant,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
}

impl Request {
    /// The state of `req`, whose output may take at most `room` tokens of context; `eos`: the
    /// model's end-of-sequence tokens.
    pub fn new(
        req: &GenerateRequest,
        constraint: Option<Box<Constraint>>,
        room: usize,
        eos: &[u32],
        tx: UnboundedSender<Event>,
        submitted: Instant,
    ) -> Self {
        let params = req.params.clone();
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend(eos);
        }
        Self {
            sampler: SamplerState::new(&params, &req.input_ids),
            detok: IncrementalDecoder::new(params.skip_special_tokens),
            text: String::new(),
            sent: 0,
            stop: StopMatcher::new(&params.stop),
            stop_ids,
            max_new_tokens: params.max_new_tokens.min(room),
            constraint,
            return_logprob: req.return_logprob,
            top_logprobs_num: req.top_logprobs_num,
            prompt_logprobs: Vec::new(),
            tx,
            submitted,
            first_token: None,
            last_token: None,
            params,
        }
    }

    /// What sampling this request's next token takes, with `generated` tokens so far: its
    /// parameters, its generator and penalty state, the logprobs it wants, the tokens banned
    /// now (the stop tokens until `min_new_tokens` are out) and its constraint's mask (as
    /// last computed).
    pub fn spec(&mut self, generated: usize) -> SampleSpec<'_> {
        let banned: &[u32] = if generated < self.params.min_new_tokens {
            &self.stop_ids
        } else {
            &[]
        };
        SampleSpec {
            params: &self.params,
            state: &mut self.sampler,
            top_logprobs: self.top_logprobs_num,
            want_logprob: self.return_logprob,
            banned,
            allowed: self.constraint.as_deref().map(Constraint::mask),
        }
    }

    /// Whether each generated token's logprob goes out with it.
    pub fn wants_logprobs(&self) -> bool {
        self.return_logprob || self.top_logprobs_num > 0
    }

    /// Takes the request's newest token (its `generated`-th, already followed by its
    /// constraint): detokenizes it, applies the stop rules, and returns the text that may now
    /// be sent and why the request ends, if it does.
    pub fn accept(
        &mut self,
        tok: &Tokenizer,
        token_id: u32,
        generated: usize,
    ) -> (String, Option<FinishReason>) {
        let complete = self
            .constraint
            .as_deref()
            .is_some_and(Constraint::is_complete);
        self.sampler.observe(&self.params, token_id);
        let mut finish = None;
        let mut text_end;
        if self.stop_ids.contains(&token_id) {
            // The stop token's own text is not part of the output.
            if let Ok(rest) = self.detok.finish(tok) {
                self.text.push_str(&rest);
            }
            text_end = self.text.len();
            finish = Some(FinishReason::Stop(Matched::Token(token_id)));
        } else {
            let before = self.text.len();
            match self.detok.push(tok, token_id) {
                Ok(delta) => self.text.push_str(&delta),
                Err(e) => tracing::warn!("detokenization failed: {e}"),
            }
            let at_limit = generated >= self.max_new_tokens || complete;
            if at_limit {
                if let Ok(rest) = self.detok.finish(tok) {
                    self.text.push_str(&rest);
                }
            }
            match self.stop.check(&self.text, before) {
                StopCheck::Stop { at, matched } => {
                    text_end = if self.params.no_stop_trim {
                        at + matched.len()
                    } else {
                        at
                    };
                    finish = Some(FinishReason::Stop(Matched::Text(matched)));
                }
                StopCheck::Continue { safe_len } => {
                    text_end = safe_len;
                    if at_limit {
                        text_end = self.text.len();
                        finish = Some(if complete {
                            FinishReason::Stop(Matched::Constraint)
                        } else {
                            FinishReason::Length
                        });
                    }
                }
            }
        }
        text_end = text_end.max(self.sent);
        let text = self.text[self.sent..text_end].to_string();
        self.sent = text_end;
        (text, finish)
    }
}
