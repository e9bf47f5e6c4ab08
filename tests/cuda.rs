//! The CUDA backend (built with `--features sglang/cuda`).
//!
//! Without a GPU (CI): `--device cuda` is an error that says why, `--device auto` serves on
//! the CPU. With a GPU: on the real default model, the logits of a prefill (every position)
//! and of decode steps stay within tolerance of the CPU backend, the argmax agrees wherever
//! the CPU's top two are not a near tie, and greedy generation through the whole engine gives
//! the CPU's tokens.
//!
//! With `SGLANG_CUDA_TEST_DUMMY=DIR` the weights are random (`--load-format dummy`) and only
//! the logits are compared.
//!
//! Tolerance: both backends cache K and V in bf16 here (the CPU with `--kv-cache-dtype bf16`),
//! but the GPU also rounds activations to bf16 before each matrix product (tensor cores)
//! where the CPU keeps f32, so the logits differ by that rounding carried through the layers
//! (see `common::BF16_LOGITS_TOLERANCE`); the argmax must agree where the CPU's top two are
//! more than 0.5 apart (`common::assert_bf16_logits_close`).
#![cfg(feature = "cuda")]

mod common;

use sglang::config::{Device, EngineConfig};
use sglang::engine::{EngineHandle, GenerateRequest};
use sglang::runner;
use sglang::sampling::SamplingParams;

/// `SGLANG_CUDA_TEST_DUMMY=DIR`: the model of DIR (config and tokenizer only) with
/// deterministic random weights, for a GPU machine the real weights cannot be carried to.
fn dummy_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("SGLANG_CUDA_TEST_DUMMY").map(Into::into)
}

fn config(device: Device) -> EngineConfig {
    let mut cfg = match dummy_dir() {
        Some(dir) => {
            let mut c = EngineConfig::new(dir);
            c.load_format = sglang::config::LoadFormat::Dummy;
            c
        }
        None => EngineConfig::new(common::model_dir()),
    };
    cfg.max_total_tokens = Some(4096);
    cfg.device = device;
    // the CPU reference caches K and V in bf16 as the GPU does (common::BF16_LOGITS_TOLERANCE)
    cfg.kv_cache_dtype = sglang::config::KvCacheDtype::Bf16;
    cfg
}

#[test]
fn cuda_matches_the_cpu_or_says_why_it_cannot_run() {
    if !sglang::backend::cuda::driver_available() {
        let e = runner::load(&config(Device::Cuda))
            .err()
            .expect("--device cuda without a driver must fail")
            .to_string();
        assert!(e.contains("--device cuda") && e.contains("libcuda"), "{e}");
        let r = runner::load(&config(Device::Auto)).unwrap();
        assert_eq!(r.backend_name(), "cpu", "auto falls back to the CPU");
        return;
    }
    let mut gpu = runner::load(&config(Device::Cuda)).unwrap();
    assert_eq!(gpu.backend_name(), "cuda");
    let mut cpu = runner::load(&config(Device::Cpu)).unwrap();
    let engine_gpu = EngineHandle::start(config(Device::Cuda)).unwrap();
    let engine_cpu = EngineHandle::start(config(Device::Cpu)).unwrap();
    let tok = engine_cpu.tokenizer().clone();
    for text in [
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "A lighthouse keeper wrote in his diary that the storm",
    ] {
        let ids = tok.encode(text, true).unwrap();
        common::assert_bf16_logits_close(
            &format!("default model {text:?}"),
            &common::logits(gpu.as_mut(), &ids, 3),
            &common::logits(cpu.as_mut(), &ids, 3),
        );
        if dummy_dir().is_some() {
            // random weights leave many near ties: the logits are the check
            continue;
        }
        let run = |e: &EngineHandle| {
            e.submit(GenerateRequest {
                input_ids: ids.clone(),
                params: SamplingParams::greedy(32),
                ..Default::default()
            })
            .unwrap()
            .collect_blocking()
            .unwrap()
            .token_ids
        };
        assert_eq!(
            run(&engine_gpu),
            run(&engine_cpu),
            "{text:?}: greedy tokens"
        );
    }
}

/// Llama-3-8B's widths (4096 hidden, 32 query / 8 KV heads of 128, 14336 MLP, 128256 vocab,
/// rope theta 500000) with 2 of its 32 layers and random weights: the GPU's logits stay within
/// tolerance of the CPU's for a prefill and decode steps.
#[test]
fn llama3_8b_shape_matches_the_cpu() {
    if !sglang::backend::cuda::driver_available() {
        println!("skipped: {}", sglang::backend::cuda::unavailable_reason());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 2, "vocab_size": 128256,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "bos_token_id": 128000, "eos_token_id": 128001}"#,
    )
    .unwrap();
    let cfg = |device| {
        let mut c = EngineConfig::new(dir.path());
        c.load_format = sglang::config::LoadFormat::Dummy;
        c.max_total_tokens = Some(1024);
        c.device = device;
        c
    };
    let mut gpu = runner::load(&cfg(Device::Cuda)).unwrap();
    let mut cpu = runner::load(&cfg(Device::Cpu)).unwrap();
    let ids: Vec<u32> = (0..37u32).map(|i| i * 7919 % 128256).collect();
    common::assert_bf16_logits_close(
        "Llama-3-8B shape (2 layers)",
        &common::logits(gpu.as_mut(), &ids, 3),
        &common::logits(cpu.as_mut(), &ids, 3),
    );
}

/// The static figures of every kernel on sm_90 (no GPU needed): ptxas's registers, stack and
/// spills and the theoretical occupancy at the backend's launch geometry. Every kernel must
/// be launchable at that geometry (at least one resident block) and spill nothing; the
/// table goes into the CI log and benches/RESULTS.md.
#[test]
fn kernel_resources_on_sm90() {
    use sglang::backend::cuda::report;
    // the occupancy arithmetic on known cases: 255 registers x 128 threads fill 32,768 of
    // 65,536 registers per block (2 blocks, 8 warps of 64); 32 x 1024 (2 blocks, all 64
    // warps); 48 KB of shared memory each (+1 KB reserved): 4 blocks of 228 KB
    let k = |registers, static_smem| report::KernelResources {
        registers,
        static_smem,
        ..Default::default()
    };
    assert_eq!(
        report::occupancy_sm90(&k(255, 0), 128, 0),
        (2, 0.125, "registers")
    );
    assert_eq!(report::occupancy_sm90(&k(32, 0), 1024, 0).0, 2);
    assert_eq!(report::occupancy_sm90(&k(32, 0), 1024, 0).1, 1.0);
    assert_eq!(
        report::occupancy_sm90(&k(16, 16 << 10), 128, 32 << 10),
        (4, 0.25, "shared memory")
    );
    let parsed = report::parse_ptxas(
        "ptxas info    : Compiling entry function 'sg_x' for 'sm_90a'\n\
         ptxas info    : Function properties for sg_x\n    \
         320 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
         ptxas info    : Used 253 registers, used 1 barriers, 640 bytes smem, 456 bytes cmem[0]\n",
    );
    assert_eq!(
        parsed,
        vec![report::KernelResources {
            name: "sg_x".into(),
            arch: "sm_90a".into(),
            registers: 253,
            stack_bytes: 320,
            spill_stores: 8,
            spill_loads: 4,
            static_smem: 640,
        }]
    );

    let kernels = report::parse_ptxas(report::PTXAS_REPORT);
    println!("{}", report::sm90_table());
    let sm90: Vec<_> = kernels.iter().filter(|k| k.arch == "sm_90a").collect();
    for name in sglang::backend::kernels::all_kernel_names() {
        let k = sm90
            .iter()
            .find(|k| k.name == *name)
            .unwrap_or_else(|| panic!("{name} missing from the sm_90a ptxas report"));
        assert!(k.registers > 0, "{k:?}");
        assert_eq!(k.spill_stores + k.spill_loads, 0, "{name} spills registers");
        let (threads, dyn_smem) = report::launch_geometry(&name).unwrap();
        let (blocks, _, why) = report::occupancy_sm90(k, threads, dyn_smem);
        assert!(blocks >= 1, "{name} cannot be resident ({why})");
    }
    // the attention kernels specialised on head size and group keep everything in registers
    let fixed: Vec<_> = sm90
        .iter()
        .filter(|k| k.name.starts_with("sg_attention_d"))
        .collect();
    assert_eq!(fixed.len(), 16, "head_dim 64 and 128, groups 1 to 8");
    for k in fixed {
        assert_eq!(k.stack_bytes, 0, "{k:?}");
        assert_eq!(k.spill_stores + k.spill_loads, 0, "{k:?}");
    }
}
