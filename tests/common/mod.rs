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
