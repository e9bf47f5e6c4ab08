//! `sglang-server bench`: the model step alone (like llama.cpp's `llama-bench`): prompt
//! processing at given lengths, decode at given batch sizes, the streaming-read bandwidth and
//! the peak resident memory, as a table or one JSON object (for benches/vs_llamacpp.py).

use clap::Args;
use sglang::bench::{decode_with, prefill, prompt, stream_read_bandwidth, time_prefill};
use sglang::runner;

use crate::args::EngineArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt lengths to time (one prefill step each).
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub prompt_lens: Vec<usize>,
    /// Batch sizes to time decode at.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Decode steps per batch size.
    #[arg(long, default_value_t = 128)]
    pub decode_steps: usize,
    /// Prompt length before decoding.
    #[arg(long, default_value_t = 32)]
    pub decode_context: usize,
    /// Repetitions (the best is reported, as llama-bench's averages would hide warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Also measure the streaming-read bandwidth (the decode floor).
    #[arg(long)]
    pub bandwidth: bool,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchArgs) -> Result<(), String> {
    let mut cfg = a.engine.to_config()?;
    let longest = a
        .prompt_lens
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(a.decode_context + a.decode_steps);
    let most = a.batch.iter().copied().max().unwrap_or(1);
    cfg.max_total_tokens
        .get_or_insert(((longest + 64) * most.max(2)).max(4096));
    let mut r = runner::load(&cfg).map_err(|e| e.to_string())?;
    let vocab = r.config().vocab_size;
    let reps = a.repeat.max(1);
    let mut pp = serde_json::Map::new();
    for &n in &a.prompt_lens {
        let best = (0..reps)
            .map(|k| n as f64 / time_prefill(r.as_mut(), &prompt(n, 7 + k as u32, vocab)))
            .fold(0.0, f64::max);
        pp.insert(n.to_string(), best.into());
    }
    // decode with CUDA graphs where they were captured (each step queued before the one
    // before is read, as the engine does, and then each step waited for), and without them
    let graph_sizes = r.graph_sizes();
    let overlaps = r.overlaps();
    let mut tg = serde_json::Map::new();
    let mut tg_eager = serde_json::Map::new();
    let mut tg_no_overlap = serde_json::Map::new();
    for (graphs, overlap) in [(true, true), (true, false), (false, true)] {
        if (!graphs && graph_sizes.is_empty()) || (graphs && !overlap && !overlaps) {
            continue;
        }
        r.use_graphs(graphs);
        for &b in &a.batch {
            let mut best = 0.0f64;
            for k in 0..reps {
                let prompts: Vec<Vec<u32>> = (0..b)
                    .map(|i| prompt(a.decode_context, (100 * k + i) as u32, vocab))
                    .collect();
                let mut s = prefill(r.as_mut(), &prompts, a.decode_steps + 1);
                best = best.max(decode_with(r.as_mut(), &mut s, a.decode_steps, overlap));
            }
            let m = match (graphs, overlap) {
                (false, _) => &mut tg_eager,
                (true, false) => &mut tg_no_overlap,
                (true, true) => &mut tg,
            };
            m.insert(b.to_string(), best.into());
        }
    }
    r.use_graphs(true);
    let weight_bytes = r.weight_bytes();
    let threads = cfg
        .num_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // the model's peak, before the bandwidth probe allocates its 1 GB buffer
    let peak = sglang::sys::peak_resident_bytes();
    drop(r);
    let bw = a.bandwidth.then(|| stream_read_bandwidth(threads, 1 << 30));
    let out = serde_json::json!({
        "prompt_tokens_per_s": pp,
        "decode_tokens_per_s": tg,
        "decode_tokens_per_s_eager": tg_eager,
        "decode_tokens_per_s_no_overlap": tg_no_overlap,
        "cuda_graph_bs": graph_sizes,
        "weight_bytes": weight_bytes,
        "bandwidth_bytes_per_s": bw,
        "peak_rss_bytes": peak,
        "threads": threads,
        "kernels": sglang::backend::cpu::kernel_set(cfg.dtype),
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    println!("| test | tokens/s |\n|---|---:|");
    for (n, v) in &pp {
        println!(
            "| prompt processing, {n} tokens | {:.1} |",
            v.as_f64().unwrap_or(0.0)
        );
    }
    for (b, v) in &tg {
        println!("| decode, batch {b} | {:.1} |", v.as_f64().unwrap_or(0.0));
    }
    for (b, v) in &tg_eager {
        println!(
            "| decode, batch {b}, without CUDA graphs | {:.1} |",
            v.as_f64().unwrap_or(0.0)
        );
    }
    if let Some(bw) = bw {
        println!(
            "| decode floor (bandwidth {:.1} GB/s / {:.0} MB per step) | {:.1} |",
            bw / 1e9,
            weight_bytes as f64 / 1e6,
            bw / weight_bytes as f64
        );
    }
    if let Some(p) = peak {
        println!(
            "peak resident memory (before the bandwidth probe): {:.1} MB",
            p as f64 / 1e6
        );
    }
    Ok(())
}
