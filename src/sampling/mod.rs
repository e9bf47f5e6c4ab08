//! Sampling: the parameters a request gives and their bounds ([`params`]), the host sampler
//! with its seeded generator and the logprobs it reports ([`sampler`]), and the per-row layout
//! a backend that samples on the device takes ([`rows`]). The engine builds one
//! [`SampleSpec`] per row and hands it to either path; both choose the same token for the
//! same logits and the same draw.

pub mod params;
pub mod rows;
pub mod sampler;

pub use params::{
    ParamError, SamplingParams, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES, MAX_TOP_LOGPROBS,
};
pub use rows::{device_work_words, SampleBatch, SampleRow};
pub use sampler::{
    argmax, logprobs_of, Rng, SampleSpec, Sampler, SamplerState, TokenInfo, TokenLogprob,
};
