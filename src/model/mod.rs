//! The model definition: the Llama decoder ([`llama`]), written only against the
//! [`Backend`](crate::backend::Backend) trait so that one definition runs on every backend.
//! Loading it and driving it step by step is the runner's job (`crate::runner`).

pub mod llama;
