//! `sglang-server generate` as a user runs it.

use std::path::PathBuf;
use std::process::Command;

fn model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct");
    assert!(
        dir.join("model.safetensors").exists(),
        "prepare the default model first (scripts/prepare-model.sh)"
    );
    dir
}

fn generate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sglang-server"))
        .arg("generate")
        .args(args)
        .env("SGLANG_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn json_output_has_ids_text_and_finish_reason() {
    let dir = model_dir();
    let out = generate(&[
        "--model-path",
        dir.to_str().unwrap(),
        "--prompt",
        "What is 2+2?",
        "--chat",
        "--max-new-tokens",
        "64",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let ids = v["output_ids"].as_array().unwrap();
    assert!(!ids.is_empty());
    assert!(!v["text"].as_str().unwrap().is_empty());
    let reason = v["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length");
    if reason == "stop" {
        // the EOS id is included in output_ids
        assert_eq!(ids.last().unwrap(), &serde_json::json!(2));
        assert_eq!(v["matched_stop"], 2);
    }
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        ids.len()
    );
}

#[test]
fn default_model_path_and_streaming_text() {
    // run from the workspace root so the default models/ directory is found
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    model_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_sglang-server"))
        .current_dir(&root)
        .env_remove("SGLANG_MODEL_PATH")
        .env("SGLANG_LOG", "warn")
        .args([
            "generate",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
}

#[test]
fn bad_options_fail_with_a_message_naming_them() {
    let dir = model_dir();
    let d = dir.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--model-path", d, "--prompt", "x", "--top-p", "1.5"],
            "top_p",
        ),
        (
            vec!["--model-path", d, "--prompt", "x", "--page-size", "0"],
            "page-size",
        ),
        (
            vec!["--model-path", "/nonexistent", "--prompt", "x"],
            "model-path",
        ),
        (
            vec!["--model-path", d, "--prompt", "x", "--device", "tpu"],
            "device",
        ),
        (
            vec!["--model-path", d, "--prompt", "x", "--dtype", "float16"],
            "dtype",
        ),
    ] {
        let out = generate(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
