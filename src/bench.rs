//! Measurement helpers shared by `cargo bench --bench engine` and `sglang-server bench`:
//! a streaming-read bandwidth probe (the floor decode is compared with), and prefill / decode
//! timings on a model runner directly (no scheduler, no sampling beyond argmax).

use std::time::Instant;

use crate::backend::cpu::pool::{split_range, ThreadPool};
use crate::batch::{LogitsWanted, StepBatch};
use crate::kv::PagePool;
use crate::runner::ModelRunner;
use crate::sampling::argmax;

/// Best-of-5 streaming read bandwidth over `bytes` with `threads` threads, in bytes/s: what a
/// decode step that reads every weight once can at best achieve.
pub fn stream_read_bandwidth(threads: usize, bytes: usize) -> f64 {
    let data: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let pool = ThreadPool::new(threads);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let sums: Vec<std::sync::atomic::AtomicU64> = (0..threads)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        let t = Instant::now();
        pool.run(|tid| {
            let r = split_range(data.len(), 64, threads, tid);
            // four independent lanes so the loop waits on loads, not on additions
            let mut acc = [0u64; 4];
            for c in data[r].chunks_exact(4) {
                acc[0] = acc[0].wrapping_add(c[0]);
                acc[1] = acc[1].wrapping_add(c[1]);
                acc[2] = acc[2].wrapping_add(c[2]);
                acc[3] = acc[3].wrapping_add(c[3]);
            }
            sums[tid].store(
                acc.iter().fold(0, |a, &b| a.wrapping_add(b)),
                std::sync::atomic::Ordering::Relaxed,
            );
        });
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(&sums);
        best = best.max(bytes as f64 / dt);
    }
    best
}

/// A deterministic prompt of `n` ordinary token ids.
pub fn prompt(n: usize, salt: u32, vocab: usize) -> Vec<u32> {
    let span = (vocab as u32).saturating_sub(200).max(1);
    (0..n as u32)
        .map(|i| 100 + (i.wrapping_mul(7919).wrapping_add(salt.wrapping_mul(31))) % span)
        .collect()
}

/// Sequences in a runner's KV cache, ready to decode.
pub struct Sequences {
    _pool: PagePool,
    tables: Vec<Vec<u32>>,
    cached: Vec<usize>,
    next: Vec<u32>,
}

/// Prefills each prompt (one step per prompt) with room for `room` more tokens each.
pub fn prefill(r: &mut dyn ModelRunner, prompts: &[Vec<u32>], room: usize) -> Sequences {
    let (pages, page_size) = r.kv_pages();
    let mut pool = PagePool::new(pages, page_size);
    let mut s = Sequences {
        _pool: PagePool::new(1, 1),
        tables: vec![],
        cached: vec![],
        next: vec![],
    };
    let mut batch = StepBatch {
        page_size,
        ..Default::default()
    };
    for p in prompts {
        let mut t = Vec::new();
        assert!(
            pool.alloc_into(&mut t, pool.pages_for(p.len() + room)),
            "KV pool too small for the benchmark"
        );
        batch.clear();
        batch.push_seq(p, 0, &t, LogitsWanted::Last);
        let l = r.forward(&batch).expect("forward");
        s.next.push(argmax(&l) as u32);
        s.cached.push(p.len());
        s.tables.push(t);
    }
    s._pool = pool;
    s
}

/// Seconds to prefill `prompt` in one step.
pub fn time_prefill(r: &mut dyn ModelRunner, prompt: &[u32]) -> f64 {
    let t = Instant::now();
    let _ = prefill(r, &[prompt.to_vec()], 1);
    t.elapsed().as_secs_f64()
}

/// Decodes `steps` tokens for every sequence together; returns output tokens/s.
pub fn decode(r: &mut dyn ModelRunner, s: &mut Sequences, steps: usize) -> f64 {
    decode_with(r, s, steps, true)
}

/// [`decode`], choosing whether each step is queued before the tokens of the one before are
/// read (`overlap`, the engine's default where the runner can; its input then names them on
/// the device, `FUTURE_TOKEN`) or each step is waited for.
pub fn decode_with(r: &mut dyn ModelRunner, s: &mut Sequences, steps: usize, overlap: bool) -> f64 {
    let (_, page_size) = r.kv_pages();
    let vocab = r.config().vocab_size;
    let mut batch = StepBatch {
        page_size,
        ..Default::default()
    };
    // greedy rows, sampled where the logits are when the backend can (the engine's path: a
    // replayed graph for a decode step where the backend captures them)
    let mut samples = crate::sampling::SampleBatch::default();
    (0..s.next.len()).for_each(|_| samples.push_unused());
    let on_device = r.samples_on_device();
    let overlap = overlap && on_device && r.overlaps();
    let t = Instant::now();
    let mut queued = false;
    for _ in 0..steps {
        batch.clear();
        for i in 0..s.next.len() {
            let token = if queued {
                crate::batch::FUTURE_TOKEN | i as u32
            } else {
                s.next[i]
            };
            batch.push_seq(&[token], s.cached[i], &s.tables[i], LogitsWanted::Last);
        }
        if overlap {
            r.launch_sampled(&batch, &samples).expect("forward");
            s.cached.iter_mut().for_each(|c| *c += 1);
            if queued {
                r.collect_sampled(&samples).expect("forward");
            }
            queued = true;
            continue;
        }
        if on_device {
            let out = r.forward_sampled(&batch, &samples).expect("forward");
            for (i, t) in out.iter().enumerate() {
                s.next[i] = t.token_id;
                s.cached[i] += 1;
            }
            continue;
        }
        let l = r.forward(&batch).expect("forward");
        for i in 0..s.next.len() {
            s.next[i] = argmax(&l[i * vocab..(i + 1) * vocab]) as u32;
            s.cached[i] += 1;
        }
    }
    if queued {
        let out = r.collect_sampled(&samples).expect("forward");
        for (i, t) in out.iter().enumerate() {
            s.next[i] = t.token_id;
        }
    }
    (steps * s.next.len()) as f64 / t.elapsed().as_secs_f64()
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
