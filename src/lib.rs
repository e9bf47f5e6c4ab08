//! sglang: an LLM inference engine for Llama-family models.
//!
//! Layers, from the bottom: [`config`] (model and engine options), [`loader`] (zero-copy
//! safetensors), [`tokenizer`], [`backend`] (the ops a model needs: CPU today), [`model`]
//! (Llama written against the backend trait), [`parallel`] (tensor parallelism), [`kv`]
//! (paged KV pool), [`sampling`],
//! [`scheduler`] (pure policy) and [`engine`] (the thread that owns the model and the KV cache,
//! reached through an [`engine::EngineHandle`]).

pub mod backend;
pub mod batch;
pub mod bench;
pub mod config;
pub mod engine;
pub mod gpu;
pub mod kv;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod sys;
pub mod tokenizer;

/// The engine's version (also reported by the server).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether this build has the CUDA backend (feature `cuda`); it still runs on the CPU where
/// no driver exists.
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");
