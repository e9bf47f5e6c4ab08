//! CPU kernel microbenchmarks: the matrix products of a decode step (one token) and of
//! prefill (many tokens) at the default model's shapes, as bytes of weights read per second
//! beside the streaming read bandwidth measured in the same run.
//!
//! Run: `cargo bench --bench cpu_kernels [-- WORD...]` (only the products whose name, such as
//! `gate 1536x576 Q5_0`, holds one of the words).

use std::time::Instant;

use sglang::backend::cpu::CpuBackend;
use sglang::backend::Backend;
use sglang::loader::{f32_to_bf16, Tensor};
use sglang::quant::{self, QuantType};

fn bandwidth(backend_threads: usize) -> f64 {
    let n = (1usize << 30) / 8;
    let data: Vec<u64> = (0..n as u64).collect();
    let pool = sglang::backend::cpu::pool::ThreadPool::new(backend_threads);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        pool.run(|tid| {
            let r = sglang::backend::cpu::pool::split_range(n, 64, backend_threads, tid);
            let mut acc = [0u64; 4];
            for c in data[r].chunks_exact(4) {
                for j in 0..4 {
                    acc[j] = acc[j].wrapping_add(c[j]);
                }
            }
            std::hint::black_box(acc);
        });
        best = best.max((n * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let backend = CpuBackend::new(None);
    let bw = bandwidth(backend.num_threads());
    println!(
        "threads: {}, kernels: {}, streaming read: {:.1} GB/s",
        backend.num_threads(),
        backend.isa().name(),
        bw / 1e9
    );
    println!();
    println!("| product | tokens | weights (MB) | time (us) | GB/s of weights | fraction of bandwidth | GFLOP/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let shapes = [
        ("q/o 576x576", 576, 576usize),
        ("k/v 192x576", 192, 576),
        ("gate 1536x576", 1536, 576),
        ("down 576x1536", 576, 1536),
        ("lm_head 49152x576", 49152, 576),
    ];
    let mut formats = vec![None];
    formats.extend(QuantType::ALL.map(Some));
    // `cargo bench --bench cpu_kernels -- WORD...`: only the products whose name holds a WORD
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for &(name, n, k) in &shapes {
        let wf: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        for &format in &formats {
            let fname = format.map_or("bf16", |q| q.name());
            let name = &format!("{name} {fname}");
            let wanted = words.is_empty() || words.iter().any(|w| name.contains(w.as_str()));
            // the k-quants need rows of whole 256-value super-blocks
            if !wanted || format.is_some_and(|q| !k.is_multiple_of(q.block_values())) {
                continue;
            }
            let t = match format {
                None => Tensor::from_bf16(wf.iter().map(|&v| f32_to_bf16(v)).collect(), vec![n, k]),
                Some(q) => Tensor::from_quant(q, quant::quantize(q, &wf), vec![n, k]),
            };
            let wt = backend.weight(name, &t).unwrap();
            for m in [1usize, 8, 16, 32, 512] {
                let x = vec![0.01f32; m * k];
                let mut out = vec![0.0f32; m * n];
                // enough repetitions to read ~2 GB of weights (or 0.5 s of work)
                let bytes = t.size_bytes() as f64;
                let reps = ((2e9 / bytes) as usize).clamp(3, 20000) / m.max(1) + 1;
                let _ = backend.matmul(&x, m, &wt, &mut out);
                let start = Instant::now();
                for _ in 0..reps {
                    backend.matmul(&x, m, &wt, &mut out).unwrap();
                }
                let dt = start.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "| {name} | {m} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} |",
                    bytes / 1e6,
                    dt * 1e6,
                    bytes / dt / 1e9,
                    bytes / dt / bw,
                    2.0 * (m * n * k) as f64 / dt / 1e9
                );
            }
        }
    }
}
