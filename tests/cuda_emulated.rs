//! The CUDA backend's own host code run end to end without a GPU: its kernels execute on the
//! CPU emulation of `csrc/` (`tests/kernel_emu`, selected by `SGLANG_CUDA_EMULATOR`), its
//! matrix products on a plain implementation of the cuBLAS call it makes. Everything else is
//! the code a GPU runs: weight upload through the staging buffer, buffer sizing, launch
//! shapes and argument order, split attention, device sampling, the engine on top.
//!
//! Checked against the CPU backend: logits of a prefill (every position) and of decode steps
//! on the real default model, greedy and seeded tokens through the whole engine, and a long
//! context (split attention) on a small random-weight model. Only the driver calls themselves
//! (cudarc, cuBLAS) and the hardware stay untested here; tests/cuda.rs covers those on a GPU.
#![cfg(feature = "cuda")]

mod common;
mod kernel_emu;

use sglang::config::{Device, EngineConfig, LoadFormat};
use sglang::engine::{EngineHandle, GenerateRequest};
use sglang::runner;
use sglang::sampling::SamplingParams;

#[test]
fn emulated_cuda_backend_matches_the_cpu() {
    // before any backend is made: this process's CUDA backend runs on the emulator
    std::env::set_var(sglang::backend::cuda::EMULATOR_ENV, kernel_emu::library());
    let config = |dir: &std::path::Path, device| {
        let mut c = EngineConfig::new(dir);
        c.max_total_tokens = Some(2048);
        c.device = device;
        // the CPU reference caches K and V in bf16 as the GPU does
        c.kv_cache_dtype = sglang::config::KvCacheDtype::Bf16;
        c
    };
    let model_dir = common::model_dir();
    let t = std::time::Instant::now();

    // the real default model: logits
    let mut emu = runner::load(&config(&model_dir, Device::Cuda)).unwrap();
    assert_eq!(emu.backend_name(), "cuda");
    let mut cpu = runner::load(&config(&model_dir, Device::Cpu)).unwrap();
    let engine_cpu = EngineHandle::start(config(&model_dir, Device::Cpu)).unwrap();
    let tok = engine_cpu.tokenizer().clone();
    let ids = tok.encode("The capital of France is", true).unwrap();
    common::assert_bf16_logits_close(
        "default model",
        &common::logits(emu.as_mut(), &ids, 3),
        &common::logits(cpu.as_mut(), &ids, 3),
    );
    drop(emu);
    println!("  {:.1} s", t.elapsed().as_secs_f64());

    // the engine on the emulated backend: greedy and seeded sampling (on the device), with
    // logprobs; the emulator is deterministic, so a seed gives fixed tokens
    let engine_emu = EngineHandle::start(config(&model_dir, Device::Cuda)).unwrap();
    let run = |e: &EngineHandle, ids: &[u32], params: SamplingParams| {
        e.submit(GenerateRequest {
            input_ids: ids.to_vec(),
            params,
            return_logprob: true,
            top_logprobs_num: 3,
            ..Default::default()
        })
        .unwrap()
        .collect_blocking()
        .unwrap()
    };
    for text in ["The capital of France is", "def add(a, b):\n"] {
        let ids = tok.encode(text, true).unwrap();
        let (g, w) = (
            run(&engine_emu, &ids, SamplingParams::greedy(16)),
            run(&engine_cpu, &ids, SamplingParams::greedy(16)),
        );
        assert_eq!(g.token_ids, w.token_ids, "{text:?}: greedy tokens");
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!((a.logprob - b.logprob).abs() < 0.05, "{a:?} vs {b:?}");
            assert_eq!(a.top_logprobs.len(), 3);
        }
    }
    // seeded sampling: reproducible on the device path (the CPU's logits differ by the bf16
    // rounding above, enough to move a draw, so its tokens are not the reference here;
    // tests/kernels.rs checks the sampling kernel against the host sampler on equal logits)
    let seeded = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 40,
        repetition_penalty: 1.1,
        seed: Some(7),
        ..SamplingParams::greedy(4)
    };
    let a = run(&engine_emu, &ids, seeded.clone());
    let b = run(&engine_emu, &ids, seeded);
    assert_eq!(a.token_ids.len(), 4);
    assert_eq!(a.token_ids, b.token_ids, "a seed reproduces");
    assert!(a
        .logprobs
        .iter()
        .all(|l| l.logprob.is_finite() && l.logprob <= 0.0));
    drop(engine_emu);
    println!("  {:.1} s", t.elapsed().as_secs_f64());

    // a long context on a small model (random weights): decode with split attention
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16"}"#,
    )
    .unwrap();
    let small = |device| {
        let mut c = config(dir.path(), device);
        c.load_format = LoadFormat::Dummy;
        c
    };
    let mut emu = runner::load(&small(Device::Cuda)).unwrap();
    let mut cpu = runner::load(&small(Device::Cpu)).unwrap();
    let long: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 512).collect();
    common::assert_bf16_logits_close(
        "small model, 300-token context",
        &common::logits(emu.as_mut(), &long, 4),
        &common::logits(cpu.as_mut(), &long, 4),
    );

    // launches of one decode step (batch 1, 2 layers, 301-token context, so split
    // attention), from the emulator's launch log (the library the backend loaded, which also
    // counts the emulated cuBLAS products): two decode steps less one, after the same prefill
    let emulator = kernel_emu::Emulator::load(kernel_emu::library());
    emulator.launch_log(true);
    common::logits(emu.as_mut(), &long, 1);
    let one = emulator.launch_log(true);
    common::logits(emu.as_mut(), &long, 2);
    let two = emulator.launch_log(true);
    println!("launches of one decode step (2 layers):");
    let mut total = 0;
    for (name, launches, _, _) in &two {
        let before = one.iter().find(|k| &k.0 == name).map_or(0, |k| k.1);
        println!("  {name:<20} {}", launches - before);
        total += launches - before;
    }
    println!("  {:<20} {total}", "total");
    // per layer: a norm, the q/k/v product, RoPE with the KV store, attention and its merge,
    // the o product, add+norm, the gate/up product, SiLU-and-mul, the down product (10; 9
    // without a split); per step: the embedding, the first norm, the row gather, the logits'
    // product
    assert_eq!(
        total, DECODE_STEP_LAUNCHES_2_LAYERS,
        "launches per decode step (2 layers)"
    );
    println!("emulated checks: {:.1} s", t.elapsed().as_secs_f64());
}

/// Launches (kernels and cuBLAS products) of one decode step of the 2-layer model above:
/// 10 per layer, 4 per step.
const DECODE_STEP_LAUNCHES_2_LAYERS: u64 = 24;
