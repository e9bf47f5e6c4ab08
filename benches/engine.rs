//! Engine benchmark on the CPU: decode tokens/s at batch 1 and 8, prefill tokens/s for a
//! 512-token prompt, beside the memory-bandwidth floor measured in the same run.
//!
//! The floor for decode is (streaming read bandwidth) / (weight bytes read per step): every
//! step must read every weight once, so no CPU engine can decode one sequence faster.
//!
//! Run: `cargo bench --bench engine` (needs the prepared default model; `SGLANG_BENCH_MODEL`
//! points elsewhere, `SGLANG_BENCH_DUMMY=1` uses random weights with that config).

use std::time::Instant;

use sglang::bench::{decode, median, prefill, prompt, stream_read_bandwidth, time_prefill};
use sglang::config::{EngineConfig, LoadFormat};
use sglang::engine::{EngineHandle, GenerateRequest};
use sglang::runner;
use sglang::sampling::SamplingParams;

fn main() {
    let model_dir = std::env::var("SGLANG_BENCH_MODEL").unwrap_or_else(|_| {
        format!(
            "{}/models/SmolLM2-135M-Instruct",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut cfg = EngineConfig::new(&model_dir);
    cfg.max_total_tokens = Some(16384);
    if std::env::var("SGLANG_BENCH_DUMMY").is_ok() {
        cfg.load_format = LoadFormat::Dummy;
    }
    let mut r =
        runner::load(&cfg).expect("load the model (prepare it with scripts/prepare-model.sh)");
    let weight_bytes = r.weight_bytes() as f64;
    let vocab = r.config().vocab_size;
    // The machine's bandwidth drifts (shared hosts): each round measures the bandwidth right
    // before the decode it is compared with, and the table reports medians over the rounds.
    let rounds = 5;
    let (mut bws, mut d1s, mut ratios, mut d8s, mut pfs) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds as u32 {
        let bw = stream_read_bandwidth(threads, 1 << 30);
        let mut s = prefill(r.as_mut(), &[prompt(32, round, vocab)], 80);
        let d1 = decode(r.as_mut(), &mut s, 64);
        ratios.push(d1 / (bw / weight_bytes));
        bws.push(bw);
        d1s.push(d1);
        let prompts: Vec<Vec<u32>> = (0..8)
            .map(|i| prompt(32, 10 + i + round * 8, vocab))
            .collect();
        let mut s = prefill(r.as_mut(), &prompts, 40);
        d8s.push(decode(r.as_mut(), &mut s, 24));
        pfs.push(512.0 / time_prefill(r.as_mut(), &prompt(512, 100 + round, vocab)));
    }
    drop(r);
    // the same batch-1 decode through the engine thread (scheduling, sampling, detokenizing)
    let engine = EngineHandle::start(cfg.clone()).expect("engine");
    let mut e1s = vec![];
    for rep in 0..3 {
        let req = GenerateRequest {
            input_ids: prompt(32, 50 + rep, vocab),
            params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(128)
            },
            ..Default::default()
        };
        let stream = engine.submit(req).unwrap();
        let t = Instant::now();
        let out = stream.collect_blocking().unwrap();
        let ttft = out
            .finish
            .as_ref()
            .and_then(|f| f.time_to_first_token)
            .unwrap_or(0.0);
        e1s.push((out.token_ids.len() - 1) as f64 / (t.elapsed().as_secs_f64() - ttft));
    }
    let bw = median(&mut bws);
    let floor = bw / weight_bytes;
    let (d1, ratio, d8, pf, e1) = (
        median(&mut d1s),
        median(&mut ratios),
        median(&mut d8s),
        median(&mut pfs),
        median(&mut e1s),
    );

    println!("model: {model_dir}");
    println!("threads: {threads}; weights read per step: {:.1} MB; streaming read bandwidth (median of {rounds}): {:.1} GB/s", weight_bytes / 1e6, bw / 1e9);
    println!();
    println!("| metric | ours | floor / peer | ratio |");
    println!("|---|---:|---:|---:|");
    println!("| decode batch 1 (model step), tok/s | {d1:.1} | {floor:.1} (bandwidth floor) | {ratio:.2} (median of per-round ratios) |");
    println!("| decode batch 1 (engine, sampling + detok), tok/s | {e1:.1} | {floor:.1} (bandwidth floor) | {:.2} |", e1 / floor);
    println!(
        "| decode batch 8, tok/s | {d8:.1} | {:.1} (8 x batch 1) | {:.2} |",
        8.0 * d1,
        d8 / (8.0 * d1)
    );
    println!("| prefill 512 tokens, tok/s | {pf:.1} | - | - |");
}
