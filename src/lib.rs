//! sglang: an LLM inference engine for Llama-family models.
//!
//! An [`EngineHandle`] loads a model directory (Hugging Face layout: `config.json`,
//! safetensors, `tokenizer.json`) on the CPU or, in a build with the `cuda` feature, a GPU,
//! and runs one engine thread that batches every request submitted to it (continuous
//! batching, chunked prefill, a paged KV cache with a radix prefix cache). Requests are token
//! ids with [`SamplingParams`]; their output streams back as [`Event`]s. The HTTP server and
//! the C ABI (`libsglang.so`) are built on exactly this API.
//!
//! ```
//! use sglang::{EngineConfig, EngineHandle, SamplingParams};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = EngineConfig::new(sglang::default_model_path());
//! # // the doctest runs wherever the default model is prepared (scripts/prepare-model.sh)
//! # if !config.model_path.join("config.json").exists() { return Ok(()); }
//! config.max_total_tokens = Some(4096); // KV cache tokens
//! let engine = EngineHandle::start(config)?;
//! let output = engine.generate_text("The capital of France is", SamplingParams::greedy(8))?;
//! println!("{}", output.text);
//! assert_eq!(output.finish.unwrap().usage.completion_tokens, output.token_ids.len());
//! # Ok(())
//! # }
//! ```
//!
//! For streaming, [`EngineHandle::submit`] returns a [`RequestStream`] (async `next`, or
//! `next_blocking`); dropping it aborts the request.
//!
//! The crate's floors, from the bottom; each imports only floors below it (`tests/layers.rs`
//! checks): `config`, `loader` (zero-copy safetensors), `tokenizer`, `sampling`, `batch` (what
//! one forward step computes), `kv` (paged KV pool, radix cache), `constraint` (structured
//! output through llguidance), `parallel` (tensor-parallel shards and collectives), `backend`
//! (the ops a model needs, on the CPU and CUDA), `model`
//! (Llama written against the backend trait), `scheduler` (pure policy), `runner` (loading a
//! model and driving its steps, alone or as a tensor-parallel group), `engine` (the thread
//! that owns them all). Only the engine's handle and the types it speaks are the supported
//! API; the other modules are public for the server, the tests and the benchmarks, and hidden
//! from the docs.

pub mod config;
pub mod constraint;
pub mod engine;
pub mod gpu;
pub mod metrics;
pub mod sampling;
pub mod tokenizer;

#[doc(hidden)]
pub mod backend;
#[doc(hidden)]
pub mod batch;
#[doc(hidden)]
pub mod bench;
#[doc(hidden)]
pub mod kv;
#[doc(hidden)]
pub mod loader;
#[doc(hidden)]
pub mod model;
#[doc(hidden)]
pub mod parallel;
/// GGUF block-quantized formats and their integer dot products.
pub mod quant;
#[doc(hidden)]
pub mod runner;
#[doc(hidden)]
pub mod scheduler;
#[doc(hidden)]
pub mod sys;

pub use config::{default_model_path, ConfigError, Device, EngineConfig, LoadFormat, ModelConfig};
pub use engine::{
    AbortReason, Chunk, EngineError, EngineHandle, EngineInfo, EngineStats, Event, Finish,
    FinishReason, GenerateError, GenerateRequest, Matched, Output, RequestError, RequestStream,
    SubmitError, Usage,
};
pub use metrics::Metrics;
pub use runner::LoadModelError;
pub use sampling::{ParamError, SamplingParams, TokenInfo, TokenLogprob, MAX_TOP_LOGPROBS};
pub use tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer, TokenizerError};

/// The engine's version (also reported by the server).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether this build has the CUDA backend (feature `cuda`); it still runs on the CPU where
/// no driver exists.
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");
