//! CPU kernel microbenchmarks: the matrix products of a decode step (one token) and of
//! prefill (many tokens) at the default model's shapes, as bytes of weights read per second
//! beside the streaming read bandwidth measured in the same run. All but the output layer fit
//! in cache, so those rows measure the kernel's arithmetic; "1, from memory" is one token with the
//! weights streamed from memory, as a decode step reads them (the row to hold against the
//! bandwidth).
//!
//! Run: `cargo bench --bench cpu_kernels [-- WORD...]` (only the products whose name, such as
//! `gate 1536x576 Q5_0`, holds one of the words); `BENCH_TOKENS=512` (or another label of the
//! token column, such as `1, from memory`) runs only that row of each product, for profiling.

use std::time::Instant;

use sglang::backend::cpu::CpuBackend;
use sglang::backend::Backend;
use sglang::config::Dtype;
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

/// Bytes of weight copies the "from memory" row cycles through: larger than any CPU's
/// last-level cache that this project's machines have (32 MB on its EPYCs).
const MEMORY_BYTES: f64 = 256e6;

fn main() {
    let backend = CpuBackend::new(None);
    // `--dtype bfloat16`: the same bf16 weights with the activations rounded to bf16
    let backend_bf16 = CpuBackend::new(None).with_dtype(Dtype::Bfloat16);
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
    // (quantized format, activations in bf16)
    let mut formats = vec![(None, false), (None, true)];
    formats.extend(QuantType::ALL.map(|q| (Some(q), false)));
    // `cargo bench --bench cpu_kernels -- WORD...`: only the products whose name holds a WORD
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for &(name, n, k) in &shapes {
        let wf: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        for &(format, bf16x) in &formats {
            let fname = match format {
                Some(q) => q.name(),
                None if bf16x => "bf16 (--dtype bfloat16)",
                None => "bf16 (--dtype float32)",
            };
            let backend = if bf16x { &backend_bf16 } else { &backend };
            let name = &format!("{name} {fname}");
            let wanted = words.is_empty() || words.iter().any(|w| name.contains(w.as_str()));
            // the k-quants need rows of whole 256-value super-blocks
            if !wanted || format.is_some_and(|q| !k.is_multiple_of(q.block_values())) {
                continue;
            }
            let bf16: Vec<u16> = match format {
                None => wf.iter().map(|&v| f32_to_bf16(v)).collect(),
                Some(_) => Vec::new(),
            };
            let packed = format.map(|q| quant::quantize(q, &wf));
            // a tensor of its own memory each time (a clone would share the bytes)
            let tensor = || match (format, &packed) {
                (Some(q), Some(p)) => Tensor::from_quant(q, p.clone(), vec![n, k]),
                _ => Tensor::from_bf16(bf16.clone(), vec![n, k]),
            };
            // Decode reads weights from memory, not from cache: the "1, from memory" row
            // cycles through copies of the matrix that together exceed any last-level cache.
            let bytes = tensor().size_bytes() as f64;
            let copies = (MEMORY_BYTES / bytes).ceil() as usize;
            let wts: Vec<_> = (0..copies)
                .map(|_| backend.weight(name, &tensor()).unwrap())
                .collect();
            let runs = [
                (1usize, "1"),
                (1, "1, from memory"),
                (8, "8"),
                (16, "16"),
                (32, "32"),
                (512, "512"),
            ];
            for (m, label) in runs {
                if std::env::var("BENCH_TOKENS").is_ok_and(|v| v != label) {
                    continue;
                }
                let x = vec![0.01f32; m * k];
                let mut out = vec![0.0f32; m * n];
                let from_memory = label.ends_with("memory");
                let wt = |rep: usize| &wts[if from_memory { rep % copies } else { 0 }];
                // enough repetitions to read ~2 GB of weights (or 0.5 s of work)
                let reps = ((2e9 / bytes) as usize).clamp(5, 20000) / m.max(1) + 5;
                let _ = backend.matmul(&x, m, wt(0), &mut out);
                // the best of five slices of the repetitions: other tenants of a shared
                // machine slow some slices down, none speeds one up
                let slice = reps.div_ceil(5);
                let mut dt = f64::INFINITY;
                for s in 0..5 {
                    let start = Instant::now();
                    for rep in s * slice..(s + 1) * slice {
                        backend.matmul(&x, m, wt(rep + 1), &mut out).unwrap();
                    }
                    dt = dt.min(start.elapsed().as_secs_f64() / slice as f64);
                }
                println!(
                    "| {name} | {label} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} |",
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
