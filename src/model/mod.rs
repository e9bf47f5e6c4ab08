//! The model definition: the Llama decoder ([`llama`]), written only against the
//! [`Backend`](crate::backend::Backend) trait so that one definition runs on every backend.
//! Loading it and driving it step by step is the job of the runner, the floor above.

pub mod llama;
