//! The prepared model against the GGUF it came from: the reference recomputes the forward pass
//! from the original Q4_1/Q8_0 tensors (its own dequantisation, llama.cpp's adjacent-pair RoPE
//! on the permuted q/k rows) and compares with the bf16 safetensors in HF layout. A wrong
//! un-permutation or dequantisation shows up here even though both would agree with each
//! other everywhere else. Also: the preparation command is idempotent.

mod common;

use std::process::Command;

#[test]
fn prepared_weights_match_the_original_gguf() {
    let dir = common::model_dir();
    let out = Command::new(common::python())
        .arg(common::root().join("scripts/reference.py"))
        .arg("--model")
        .arg(&dir)
        .args(["check-gguf", "--tolerance", "0.02"])
        .args([
            "The capital of France is",
            "<|im_start|>user\nWrite a poem about rain.<|im_end|>\n<|im_start|>assistant\n",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"ok\": true"), "{stdout}");
}

#[test]
fn preparation_is_idempotent() {
    let dir = common::model_dir();
    let before = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let out = Command::new(common::root().join("scripts/prepare-model.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to do"));
    let after = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "a complete model directory is left alone");
}
