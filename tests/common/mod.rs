//! Helpers shared by the integration tests: the prepared default model and the numpy reference.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The prepared default model. Tests that need it fail (not skip) when it is missing: the
/// README's test command prepares it.
pub fn model_dir() -> PathBuf {
    let dir = std::env::var("SGLANG_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("models/SmolLM2-135M-Instruct"));
    assert!(
        dir.join("model.safetensors").exists(),
        "the default model is not prepared at {}: run scripts/prepare-model.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "no .venv: run scripts/venv.sh (scripts/test.sh does)"
    );
    p
}

#[derive(Debug, serde::Deserialize)]
pub struct RefResult {
    pub rendered: String,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    pub logits_file: PathBuf,
    /// logprob of each prompt token after the first (float64 log-softmax of the reference).
    pub prompt_logprobs: Vec<f64>,
    /// Each greedy token's logprob, and its logit's lead over the runner-up's.
    pub greedy_logprobs: Vec<f64>,
    pub greedy_leads: Vec<f64>,
}

impl RefResult {
    pub fn logits(&self) -> Vec<f32> {
        let bytes = std::fs::read(&self.logits_file).expect("reference logits file");
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// Runs scripts/reference.py golden on `prompts` (`(text, chat)` pairs).
pub fn reference(model: &Path, prompts: &[(&str, bool)], steps: usize) -> Vec<RefResult> {
    reference_with(model, prompts, steps, &[])
}

/// [`reference`] with more arguments of the golden command (e.g. `--gguf-weights FILE`).
pub fn reference_with(
    model: &Path,
    prompts: &[(&str, bool)],
    steps: usize,
    extra: &[&std::ffi::OsStr],
) -> Vec<RefResult> {
    let out_dir = tempfile::tempdir().unwrap().keep();
    let prompts_json = serde_json::to_string(
        &prompts
            .iter()
            .map(|(t, c)| serde_json::json!({"text": t, "chat": c}))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let out = Command::new(python())
        .arg(root().join("scripts/reference.py"))
        .arg("--model")
        .arg(model)
        .arg("golden")
        .arg("--prompts")
        .arg(&prompts_json)
        .arg("--steps")
        .arg(steps.to_string())
        .arg("--out-dir")
        .arg(&out_dir)
        .args(extra)
        .output()
        .expect("running the reference");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[derive(serde::Deserialize)]
    struct All {
        results: Vec<RefResult>,
    }
    let all: All = serde_json::from_slice(&out.stdout).expect("reference JSON");
    all.results
}

/// The logits of the last prompt token after one prefill step of `ids` on a fresh KV pool.
pub fn first_step_logits(runner: &mut dyn sglang::runner::ModelRunner, ids: &[u32]) -> Vec<f32> {
    use sglang::batch::{LogitsWanted, StepBatch};
    let (pages, page_size) = runner.kv_pages();
    let mut pool = sglang::kv::PagePool::new(pages, page_size);
    let mut table = Vec::new();
    assert!(pool.alloc_into(&mut table, pool.pages_for(ids.len())));
    let mut batch = StepBatch {
        page_size,
        ..Default::default()
    };
    batch.push_seq(ids, 0, &table, LogitsWanted::Last);
    runner.forward(&batch).unwrap().to_vec()
}

/// The prompt's token ids: raw text (with special tokens), or one user message through the
/// chat template.
pub fn prompt_ids(tok: &sglang::tokenizer::Tokenizer, text: &str, chat: bool) -> Vec<u32> {
    if chat {
        let rendered = tok
            .apply_chat_template(&[sglang::tokenizer::ChatMessage::new("user", text)], true)
            .unwrap();
        tok.encode(&rendered, false).unwrap()
    } else {
        tok.encode(text, true).unwrap()
    }
}

/// `steps` greedy tokens through the whole engine (scheduler, sampler, detokenizer).
pub fn greedy(
    engine: &sglang::engine::EngineHandle,
    ids: &[u32],
    steps: usize,
) -> sglang::engine::Output {
    engine
        .submit(sglang::engine::GenerateRequest {
            input_ids: ids.to_vec(),
            params: sglang::sampling::SamplingParams::greedy(steps),
            ..Default::default()
        })
        .unwrap()
        .collect_blocking()
        .unwrap()
}

/// ‖a − b‖ / ‖b‖
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt() as f32
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Token ids of each text from the reference's own byte-level BPE (reads the GGUF directly).
pub fn reference_tokenize(model: &Path, texts: &[&str]) -> Vec<Vec<u32>> {
    let out = Command::new(python())
        .arg(root().join("scripts/reference.py"))
        .arg("--model")
        .arg(model)
        .arg("tokenize")
        .arg("--json")
        .arg(serde_json::to_string(texts).unwrap())
        .output()
        .expect("running the reference tokenizer");
    assert!(
        out.status.success(),
        "reference tokenizer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

/// Logits of every prompt position, then of `steps` decode steps feeding the prompt's tokens.
pub fn logits(
    runner: &mut dyn sglang::runner::ModelRunner,
    ids: &[u32],
    steps: usize,
) -> Vec<Vec<f32>> {
    let (pages, page_size) = runner.kv_pages();
    let mut pool = sglang::kv::PagePool::new(pages, page_size);
    let mut table = Vec::new();
    assert!(pool.alloc_into(&mut table, pool.pages_for(ids.len() + steps)));
    let mut batch = sglang::batch::StepBatch {
        page_size,
        ..Default::default()
    };
    batch.push_seq(ids, 0, &table, sglang::batch::LogitsWanted::All);
    let vocab = runner.config().vocab_size;
    let mut out: Vec<Vec<f32>> = runner
        .forward(&batch)
        .unwrap()
        .chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect();
    for step in 0..steps {
        batch.clear();
        batch.push_seq(
            &ids[step..step + 1],
            ids.len() + step,
            &table,
            sglang::batch::LogitsWanted::Last,
        );
        out.push(runner.forward(&batch).unwrap().to_vec());
    }
    out
}

/// Logits of the CUDA backend (bf16 KV cache, bf16 inputs to the matrix products) against
/// the CPU's with a bf16 KV cache (f32 activations): the rounding of the products' inputs
/// carried through the layers. It is rounding luck more than kernel quality: on the CPU
/// emulation of the CUDA backend (tests/cuda.rs), default model, two attention
/// kernels whose outputs differ in 1-4 of 2,880 values by one bf16 ulp per layer give rows
/// within 0.4 % to 2.1 % and 0.5 % to 2.6 % (relative L2), absolute differences up to 0.26
/// (and up to 1.4 % after the one-pass norm changed the order of a sum of squares); against
/// an f32 KV cache the two attention kernels gave up to 3.0 % and 5.4 %.
pub const BF16_LOGITS_TOLERANCE: f32 = 5e-2;
/// Below this gap between the CPU's two best logits the argmax may flip (about twice the
/// largest absolute difference measured).
pub const BF16_NEAR_TIE: f32 = 0.5;

/// Asserts each row of `got` is within [`BF16_LOGITS_TOLERANCE`] of `want` (relative L2) and
/// has the same argmax where `want`'s top two are more than [`BF16_NEAR_TIE`] apart; returns
/// the largest error.
pub fn assert_bf16_logits_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    let mut worst = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = rel_err(g, w);
        worst = worst.max(err);
        assert!(err < BF16_LOGITS_TOLERANCE, "{what} row {i}: rel err {err}");
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > BF16_NEAR_TIE {
            assert_eq!(argmax(g), argmax(w), "{what} row {i}: argmax");
        }
    }
    println!(
        "PARITY {what}: {} rows, logits max rel err {worst:.3e} (tolerance {BF16_LOGITS_TOLERANCE})",
        got.len()
    );
    worst
}
