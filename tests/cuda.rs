//! The CUDA backend (built with `--features sglang/cuda`), checked against the CPU backend by
//! one test body run on two drivers, chosen by `EngineConfig::cuda_emulator`: the GPU (where
//! one exists) and the CPU emulation of `csrc/` (`tests/kernel_emu`: kernels run by the
//! emulator, matrix products by a plain implementation of the cuBLAS call, everything else the
//! code a GPU runs: weight upload through the staging buffer, buffer sizing, launch shapes and
//! arguments, split attention, device sampling, the engine on top). Only the driver calls
//! themselves (cudarc, cuBLAS) and the hardware are left to the GPU run.
//!
//! Without a GPU (CI): `--device cuda` is an error that says why, `--device auto` serves on
//! the CPU, and the body runs on the emulator. On the real default model: the logits of a
//! prefill (every position) and of decode steps stay within tolerance of the CPU backend, the
//! argmax agrees wherever the CPU's top two are not a near tie, greedy generation through the
//! whole engine gives the CPU's tokens and logprobs, a seeded draw reproduces; on a small
//! random model, a 300-token context (split attention).
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
mod kernel_emu;

use std::path::{Path, PathBuf};

use sglang::config::{Device, EngineConfig, LoadFormat};
use sglang::engine::{EngineHandle, GenerateRequest};
use sglang::runner::{self, ModelRunner};
use sglang::sampling::SamplingParams;

/// `SGLANG_CUDA_TEST_DUMMY=DIR`: the model of DIR (config and tokenizer only) with
/// deterministic random weights, for a GPU machine the real weights cannot be carried to.
fn dummy_dir() -> Option<PathBuf> {
    std::env::var_os("SGLANG_CUDA_TEST_DUMMY").map(Into::into)
}

/// The engine's options on `dir` (None: the default model, or the dummy one) for `device`;
/// the CUDA backend on the GPU, or on the emulator at `emulator`.
fn config(dir: Option<&Path>, device: Device, emulator: Option<&Path>) -> EngineConfig {
    let mut cfg = match (dir, dummy_dir()) {
        (Some(dir), _) => EngineConfig::new(dir),
        (None, Some(dummy)) => {
            let mut c = EngineConfig::new(dummy);
            c.load_format = LoadFormat::Dummy;
            c
        }
        (None, None) => EngineConfig::new(common::model_dir()),
    };
    cfg.max_total_tokens = Some(4096);
    cfg.device = device;
    cfg.cuda_emulator = emulator.map(Path::to_path_buf);
    // decode graphs of batch 1, 2 and 4 (captured at start-up: on the emulator each size's
    // warm-up is a real step)
    cfg.cuda_graph_max_bs = 4;
    // the CPU reference caches K and V in bf16 as the GPU does (common::BF16_LOGITS_TOLERANCE)
    cfg.kv_cache_dtype = sglang::config::KvCacheDtype::Bf16;
    cfg
}

/// The body both drivers run (see the module's comment). Returns the CUDA runner of the small
/// random model with its 300-token context, for the emulator's launch count.
fn matches_the_cpu(emulator: Option<&Path>) -> (Box<dyn ModelRunner>, Vec<u32>) {
    let t = std::time::Instant::now();
    let cuda = |dir| config(dir, Device::Cuda, emulator);
    let cpu = |dir| config(dir, Device::Cpu, None);
    let mut gpu_runner = runner::load(&cuda(None)).unwrap();
    assert_eq!(gpu_runner.backend_name(), "cuda");
    let mut cpu_runner = runner::load(&cpu(None)).unwrap();
    let engine_gpu = EngineHandle::start(cuda(None)).unwrap();
    // the decode step was captured (a failed capture would only be logged: serving goes on)
    assert_eq!(engine_gpu.info().cuda_graph_sizes, vec![1, 2, 4]);
    let engine_cpu = EngineHandle::start(cpu(None)).unwrap();
    let tok = engine_cpu.tokenizer().clone();
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
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "A lighthouse keeper wrote in his diary that the storm",
    ];
    for text in prompts {
        let ids = tok.encode(text, true).unwrap();
        common::assert_bf16_logits_close(
            &format!("default model {text:?}"),
            &common::logits(gpu_runner.as_mut(), &ids, 3),
            &common::logits(cpu_runner.as_mut(), &ids, 3),
        );
        if dummy_dir().is_some() {
            // random weights leave many near ties: the logits are the check
            continue;
        }
        let (g, w) = (
            run(&engine_gpu, &ids, SamplingParams::greedy(16)),
            run(&engine_cpu, &ids, SamplingParams::greedy(16)),
        );
        assert_eq!(g.token_ids, w.token_ids, "{text:?}: greedy tokens");
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!((a.logprob - b.logprob).abs() < 0.05, "{a:?} vs {b:?}");
            assert_eq!(a.top_logprobs.len(), 3);
        }
    }
    drop(gpu_runner);
    println!("  default model: {:.1} s", t.elapsed().as_secs_f64());

    // seeded sampling on the device reproduces (the CPU's logits differ by the bf16 rounding
    // above, enough to move a draw, so its tokens are not the reference here;
    // tests/kernels.rs checks the sampling kernel against the host sampler on equal logits)
    let ids = tok.encode(prompts[0], true).unwrap();
    let seeded = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 40,
        repetition_penalty: 1.1,
        seed: Some(7),
        ..SamplingParams::greedy(4)
    };
    let a = run(&engine_gpu, &ids, seeded.clone());
    let b = run(&engine_gpu, &ids, seeded);
    assert_eq!(a.token_ids.len(), 4);
    assert_eq!(a.token_ids, b.token_ids, "a seed reproduces");
    assert!(a
        .logprobs
        .iter()
        .all(|l| l.logprob.is_finite() && l.logprob <= 0.0));
    drop(engine_gpu);

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
    let small = |c: EngineConfig| EngineConfig {
        load_format: LoadFormat::Dummy,
        ..c
    };
    let mut gpu_small = runner::load(&small(cuda(Some(dir.path())))).unwrap();
    let mut cpu_small = runner::load(&small(cpu(Some(dir.path())))).unwrap();
    let long: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 512).collect();
    common::assert_bf16_logits_close(
        "small model, 300-token context",
        &common::logits(gpu_small.as_mut(), &long, 4),
        &common::logits(cpu_small.as_mut(), &long, 4),
    );
    println!(
        "  checks against the CPU: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    (gpu_small, long)
}

#[test]
fn cuda_matches_the_cpu_or_says_why_it_cannot_run() {
    if !sglang::backend::cuda::driver_available() {
        let e = runner::load(&config(None, Device::Cuda, None))
            .err()
            .expect("--device cuda without a driver must fail")
            .to_string();
        assert!(e.contains("--device cuda") && e.contains("libcuda"), "{e}");
        let r = runner::load(&config(None, Device::Auto, None)).unwrap();
        assert_eq!(r.backend_name(), "cpu", "auto falls back to the CPU");
        return;
    }
    matches_the_cpu(None);
}

/// The emulator's launch log is one per process: the tests that read it run one at a time.
static EMULATOR_LOG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Launches of `name` in the emulator's log `after` beyond those in `before`.
fn launches_between(
    before: &[(String, u64, u64, u64)],
    after: &[(String, u64, u64, u64)],
    name: &str,
) -> u64 {
    let of = |log: &[(String, u64, u64, u64)]| log.iter().find(|k| k.0 == name).map_or(0, |k| k.1);
    of(after) - of(before)
}

/// Whether the emulator can run here (SGLANG_KERNELS_NO_EMULATOR: on the GPU machine, which
/// has no C++ compiler).
fn emulator_here() -> bool {
    std::env::var_os("SGLANG_KERNELS_NO_EMULATOR").is_none()
}

#[test]
fn emulated_cuda_matches_the_cpu() {
    if !emulator_here() {
        return;
    }
    let _log = EMULATOR_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let library = kernel_emu::library();
    let (mut small, long) = matches_the_cpu(Some(library));

    // launches of one decode step (batch 1, 2 layers, 301-token context, so split
    // attention), from the emulator's launch log (the library the backend loaded, which also
    // counts the emulated cuBLAS products): two decode steps less one, after the same prefill
    let emulator = kernel_emu::Emulator::load(library);
    emulator.launch_log(true);
    common::logits(small.as_mut(), &long, 1);
    let one = emulator.launch_log(true);
    common::logits(small.as_mut(), &long, 2);
    let two = emulator.launch_log(true);
    println!("launches of one decode step (2 layers):");
    let mut total = 0;
    // kernels and products (the log also counts copies and synchronisations)
    let kernels = two
        .iter()
        .filter(|k| k.0.starts_with("sg_") || k.0 == "cublas_gemm");
    for (name, _, _, _) in kernels {
        let n = launches_between(&one, &two, name);
        println!("  {name:<20} {n}");
        total += n;
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
}

/// Graphs and the overlap scheduler on the emulator, through the engine on the real default
/// model: the tokens and logprobs of replayed decode steps, queued before the tokens of the
/// step before are read or not, equal eager execution's bit for bit, for batch 1, for 3
/// requests (padded to 4), and for a batch whose members finish and join; a replayed decode
/// step costs the host one copy in, one graph launch, one copy back and one wait (counted by
/// the emulator's log, which also holds back what the host sees of an asynchronous copy until
/// a wait covers it); with the overlap, a request ended by a stop token has had its next step
/// queued already (one step more is launched, its token dropped).
#[test]
fn emulated_graphs_replay_the_eager_step() {
    if !emulator_here() {
        return;
    }
    let _log = EMULATOR_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let library = kernel_emu::library();
    let engine = |graphs: bool, overlap: bool| {
        let mut c = config(None, Device::Cuda, Some(library));
        c.disable_cuda_graph = !graphs;
        c.disable_overlap_schedule = !overlap;
        c.enable_radix_cache = false; // every run prefills the same way
        EngineHandle::start(c).unwrap()
    };
    // graphs and overlap (the default), graphs alone, neither
    let (with, alone, without) = (
        engine(true, true),
        engine(true, false),
        engine(false, false),
    );
    assert_eq!(with.info().cuda_graph_sizes, vec![1, 2, 4]);
    assert!(without.info().cuda_graph_sizes.is_empty());
    assert!(with.info().overlap_schedule);
    assert!(!alone.info().overlap_schedule);
    let tok = with.tokenizer().clone();
    let prompts = [
        "The capital of France is",
        "def add(a, b):",
        "Once upon a time",
        "The three primary colours are",
    ];
    let request = |i: usize, n: usize| GenerateRequest {
        input_ids: tok.encode(prompts[i], true).unwrap(),
        params: SamplingParams::greedy(n),
        return_logprob: true,
        top_logprobs_num: 2,
        ..Default::default()
    };
    let submit = |e: &EngineHandle, i: usize, n: usize| e.submit(request(i, n)).unwrap();
    // (prompt, tokens, submitted after the first request finished)
    let script = [(0, 3, false), (1, 8, false), (2, 12, false), (3, 6, true)];
    let run = |e: &EngineHandle| {
        let mut streams: Vec<_> = script
            .iter()
            .filter(|s| !s.2)
            .map(|&(i, n, _)| submit(e, i, n))
            .collect();
        let first = streams.remove(0).collect_blocking().unwrap();
        // joins while the other two decode
        streams.extend(
            script
                .iter()
                .filter(|s| s.2)
                .map(|&(i, n, _)| submit(e, i, n)),
        );
        let mut out = vec![first];
        out.extend(streams.into_iter().map(|s| s.collect_blocking().unwrap()));
        out
    };
    // what must be equal: text, tokens, logprobs (f32 compared exactly: the same bits, these
    // being nonzero); not the timings
    let key = |o: Vec<sglang::engine::Output>| {
        let key = |r: sglang::engine::Output| (r.text, r.token_ids, r.logprobs);
        o.into_iter().map(key).collect::<Vec<_>>()
    };
    // batch 1 alone
    let one = |e: &EngineHandle| key(vec![submit(e, 0, 5).collect_blocking().unwrap()]);
    let base = one(&without);
    assert_eq!(one(&alone), base, "batch 1, graphs");
    assert_eq!(one(&with), base, "batch 1, graphs and overlap");
    let replays = with.metrics().cuda_graph_replays_total.get();
    assert!(replays >= 4, "{replays} replays for 4 decode steps");
    // 3 requests (padded to 4), finishing and joining
    let base = key(run(&without));
    assert_eq!(
        key(run(&alone)),
        base,
        "a batch whose members change, graphs"
    );
    assert_eq!(
        key(run(&with)),
        base,
        "a batch whose members change, overlap"
    );
    for (r, &(_, n, _)) in base.iter().zip(&script) {
        assert_eq!(r.1.len(), n);
    }
    // the longest request decodes 11 steps; the steps that also prefill (the requests arrive
    // one by one, and one joins later) run eagerly
    let more = with.metrics().cuda_graph_replays_total.get() - replays;
    println!("replayed decode steps: {replays} for batch 1, {more} for the changing batch");
    assert!(more >= 5, "{more} replays");
    assert_eq!(without.metrics().cuda_graph_replays_total.get(), 0);

    // what a decode step costs the host: two runs of one request, 4 decode steps apart
    let emulator = kernel_emu::Emulator::load(library);
    for (what, e) in [("overlap", &with), ("graphs alone", &alone)] {
        let count = |n: usize| {
            emulator.launch_log(true);
            submit(e, 1, n).collect_blocking().unwrap();
            emulator.launch_log(true)
        };
        let (short, long) = (count(2), count(6));
        let per_step = |name: &str| launches_between(&short, &long, name) as f64 / 4.0;
        for (name, want) in [
            ("cuMemcpyHtoDAsync", 1.0),
            ("cuGraphLaunch", 1.0),
            ("cuMemcpyDtoHAsync", 1.0),
            // the one wait is for the copy back (an event), never the whole stream
            ("cuEventSynchronize", 1.0),
            ("cuStreamSynchronize", 0.0),
        ] {
            println!("{what}: {name:<22} {} per decode step", per_step(name));
            assert_eq!(per_step(name), want, "{what}: {name} per decode step");
        }
        assert_eq!(
            per_step("sg_embedding"),
            1.0,
            "the replay runs the step's kernels"
        );
    }

    // the overlap queues the step after a stop token before the host has read it: one graph
    // launch more than without, the same output
    let greedy = submit(&without, 1, 12)
        .collect_blocking()
        .unwrap()
        .token_ids;
    let k = (3..greedy.len())
        .find(|&k| !greedy[..k].contains(&greedy[k]))
        .expect("a token not seen before");
    let stopped = |e: &EngineHandle| {
        let mut r = request(1, 12);
        r.params.stop_token_ids = vec![greedy[k]];
        emulator.launch_log(true);
        let out = e.submit(r).unwrap().collect_blocking().unwrap();
        let log = emulator.launch_log(true);
        (key(vec![out]), launches_between(&[], &log, "cuGraphLaunch"))
    };
    let ((a, with_launches), (b, alone_launches)) = (stopped(&with), stopped(&alone));
    assert_eq!(a, b, "stopped by a token");
    assert_eq!(a[0].1.len(), k + 1, "ends at its stop token");
    println!("graph launches for a request stopped at token {}: {alone_launches} without the overlap, {with_launches} with", k + 1);
    assert_eq!(
        with_launches,
        alone_launches + 1,
        "the step after the stop was queued"
    );

    // a request aborted while its next step is queued, beside a request with a penalty (whose
    // steps are not planned ahead) and a plain one: theirs are the output without the
    // overlap, and every KV page comes back
    let mixed = |e: &EngineHandle| {
        let mut penalised = request(2, 8);
        penalised.params.frequency_penalty = 0.5;
        let plain = e.submit(request(0, 10)).unwrap();
        let penalised = e.submit(penalised).unwrap();
        let mut doomed = e.submit(request(3, 40)).unwrap();
        let mut chunks = 0;
        while let Some(ev) = doomed.next_blocking() {
            match ev {
                sglang::engine::Event::Chunk(_) => {
                    chunks += 1;
                    if chunks == 3 {
                        e.abort(doomed.id());
                    }
                }
                _ => break,
            }
        }
        let out = key(vec![
            plain.collect_blocking().unwrap(),
            penalised.collect_blocking().unwrap(),
        ]);
        let s = e.stats();
        assert_eq!(
            (s.running, s.waiting, s.kv_used_tokens),
            (0, 0, 0),
            "every page back"
        );
        (out, chunks)
    };
    let ((a, chunks), (b, _)) = (mixed(&with), mixed(&alone));
    assert!(
        chunks < 40,
        "the aborted request stopped early ({chunks} chunks)"
    );
    assert_eq!(a, b, "beside an abort and a penalty");
}

/// A capture refuses what a captured stream cannot hold, naming the call, as the driver does:
/// an allocation, a free, a copy from pageable memory, a copy back (which waits).
#[test]
fn emulated_capture_refuses_what_a_graph_cannot_hold() {
    use sglang::backend::cuda::CudaBackend;
    use sglang::backend::Backend;
    use sglang::batch::{LogitsWanted, StepBatch};
    use sglang::sampling::SampleBatch;
    if !emulator_here() {
        return;
    }
    let b = CudaBackend::new(0, Some(kernel_emu::library())).unwrap();
    let mut batch = StepBatch {
        page_size: 16,
        ..Default::default()
    };
    batch.push_seq(&[1], 0, &[0], LogitsWanted::Last);
    let mut samples = SampleBatch::default();
    samples.push_unused();
    assert!(b.begin_capture().is_err(), "a capture reads a staged step");
    b.stage(&batch, &samples).unwrap();
    let mut buf = b.buffer(16).unwrap();
    let refused = |what: &str, call: &dyn Fn() -> bool, name: &str| {
        b.begin_capture().unwrap();
        assert!(call(), "{what}: the call itself fails");
        let e = b
            .end_capture()
            .err()
            .unwrap_or_else(|| panic!("{what} was captured"))
            .to_string();
        assert!(e.contains(name), "{what}: {e}");
    };
    refused(
        "an allocation",
        &|| b.buffer(1 << 20).is_err(),
        "cuMemAlloc",
    );
    refused(
        "a copy back",
        &|| b.to_host(&buf, 4).is_err(),
        "cuMemcpyDtoHAsync",
    );
    b.begin_capture().unwrap();
    assert!(b.upload(&[1.0; 4], &mut buf).is_err());
    let e = b.end_capture().err().unwrap().to_string();
    assert!(e.contains("pageable"), "a copy from pageable memory: {e}");
    let victim = b.buffer(16).unwrap();
    b.begin_capture().unwrap();
    drop(victim);
    let e = b.end_capture().err().unwrap().to_string();
    assert!(e.contains("cuMemFree"), "a free: {e}");
    // a capture that holds nothing it cannot is a graph
    b.begin_capture().unwrap();
    let g = b.end_capture().unwrap();
    b.replay(&g).unwrap();
    let mut other = StepBatch {
        page_size: 16,
        ..Default::default()
    };
    other.push_seq(&[1, 2], 0, &[0], LogitsWanted::Last);
    b.stage(&other, &samples).unwrap();
    let e = b.replay(&g).err().unwrap().to_string();
    assert!(
        e.contains("replayed on"),
        "a graph replays only the counts it was captured with: {e}"
    );
}

/// Launches (kernels and cuBLAS products) of one decode step of the 2-layer model above:
/// 10 per layer, 4 per step.
const DECODE_STEP_LAUNCHES_2_LAYERS: u64 = 24;

/// A model directory (config only: weights `--load-format dummy`) of Llama-3-8B's shape with 2
/// of its 32 layers.
fn llama3_8b_dir() -> tempfile::TempDir {
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
    dir
}

/// Bytes a decode step moves, statically (issue 14 item 7): one decode step of the
/// Llama-3-8B shape (2 layers, random weights) at a 4,096-token context through the CUDA
/// backend, on the emulator built to count the bytes each kernel reads and writes in device
/// memory (and each emulated cuBLAS product its operands): at most 1.05x its weights plus its
/// KV cache, each read once; the attention kernels read the whole KV cache (the counts are
/// live). Counts are per thread's access (a value all 32 lanes load counts 32 times, where a
/// GPU broadcasts it), so they bound the traffic from above. The table goes into the test's
/// output.
#[test]
fn emulated_decode_step_moves_its_weights_and_kv_once() {
    use sglang::batch::{LogitsWanted, StepBatch};
    if !emulator_here() {
        return;
    }
    let library = kernel_emu::library_counting_bytes();
    let dir = llama3_8b_dir();
    let ctx = 4096;
    let mut c = EngineConfig::new(dir.path());
    c.load_format = sglang::config::LoadFormat::Dummy;
    c.device = Device::Cuda;
    c.cuda_emulator = Some(library.to_path_buf());
    c.disable_cuda_graph = true; // the eager step (a graph replays the same launches)
    c.max_total_tokens = Some(ctx + 64);
    let mut r = runner::load(&c).unwrap();
    let (_, page_size) = r.kv_pages();
    // position ctx - 1 of a sequence whose first ctx - 1 positions are cached (the cache holds
    // whatever: the bytes do not depend on the values)
    let table: Vec<u32> = (0..ctx.div_ceil(page_size) as u32).collect();
    let mut batch = StepBatch {
        page_size,
        ..Default::default()
    };
    batch.push_seq(&[17], ctx - 1, &table, LogitsWanted::Last);
    let emulator = kernel_emu::Emulator::load(library);
    emulator.bytes_log(true);
    r.forward(&batch).unwrap();
    let log = emulator.bytes_log(true);
    let cfg = r.config().clone();
    let kv = cfg.num_layers * ctx * cfg.num_kv_heads * cfg.head_dim * 2 * 2;
    let floor = (r.weight_bytes() + kv) as f64;
    println!("bytes of one decode step, Llama-3-8B shape, 2 layers, {ctx}-token context:");
    println!("| kernel | read | written |\n|---|---:|---:|");
    let mut total = 0u64;
    for (name, read, written) in &log {
        println!("| {name} | {read} | {written} |");
        total += read + written;
    }
    let ratio = total as f64 / floor;
    println!(
        "| total | {total} | ({ratio:.4} of weights {} + KV {kv}) |",
        r.weight_bytes()
    );
    let attention: u64 = log
        .iter()
        .filter(|k| k.0.starts_with("sg_attention"))
        .map(|k| k.1)
        .sum();
    assert!(
        attention as f64 >= 0.99 * kv as f64,
        "the attention kernels read {attention} bytes of a {kv}-byte KV cache"
    );
    assert!(
        (1.0..=1.05).contains(&ratio),
        "a decode step moves {ratio:.4}x its weights plus its KV cache"
    );
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
    let dir = llama3_8b_dir();
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
            .find(|k| k.name == name)
            .unwrap_or_else(|| panic!("{name} missing from the sm_90a ptxas report"));
        assert!(k.registers > 0, "{k:?}");
        assert_eq!(k.spill_stores + k.spill_loads, 0, "{name} spills registers");
        let (threads, dyn_smem) = report::launch_geometry(name).unwrap();
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
