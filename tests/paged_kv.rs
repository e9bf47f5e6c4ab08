//! The paged KV cache: the same prompt gives the same logits with different page sizes, and
//! when it is prefilled and decoded in one batch together with other sequences.

mod common;

use sglang::batch::{LogitsWanted, StepBatch};
use sglang::config::{Dtype, EngineConfig};
use sglang::kv::PagePool;
use sglang::runner::{self, ModelRunner};
use sglang::tokenizer::Tokenizer;

fn runner(page_size: usize) -> Box<dyn ModelRunner> {
    let mut cfg = EngineConfig::new(common::model_dir());
    cfg.page_size = page_size;
    cfg.max_total_tokens = Some(4096);
    // f32 inputs: another page size sums attention in another order (~1e-6), which bf16
    // inputs would round into ~1e-3
    cfg.dtype = Dtype::Float32;
    runner::load(&cfg).expect("load the default model")
}

/// Prefill `prompt` alone in one step, then greedy-decode `steps` tokens; returns the logits
/// of every step.
fn run_alone(r: &mut dyn ModelRunner, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let (pages, page_size) = r.kv_pages();
    let mut pool = PagePool::new(pages, page_size);
    let mut table = Vec::new();
    assert!(pool.alloc_into(&mut table, pool.pages_for(prompt.len() + steps)));
    let mut batch = StepBatch {
        page_size,
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut cached = 0;
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..=steps {
        batch.clear();
        batch.push_seq(&next, cached, &table, LogitsWanted::Last);
        let logits = r.forward(&batch).unwrap().to_vec();
        cached += next.len();
        next = vec![common::argmax(&logits) as u32];
        out.push(logits);
    }
    out
}

#[test]
fn page_sizes_and_mixed_batches_agree() {
    let dir = common::model_dir();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let prompt = tok
        .encode("The quick brown fox jumps over the lazy dog because", true)
        .unwrap();
    let other = tok
        .encode("Once upon a time, in a small village by the sea,", true)
        .unwrap();
    let steps = 6;

    let base = run_alone(runner(16).as_mut(), &prompt, steps);
    for page_size in [1, 64] {
        let got = run_alone(runner(page_size).as_mut(), &prompt, steps);
        for (s, (a, b)) in got.iter().zip(&base).enumerate() {
            let e = common::rel_err(a, b);
            assert!(e < 1e-5, "page size {page_size}, step {s}: rel err {e}");
        }
    }

    // Mixed batch: `other` is prefilled first; then in one step `prompt` is prefilled while
    // `other` decodes; afterwards both decode together. Pages are interleaved between them.
    let mut r = runner(16);
    let (pages, page_size) = r.kv_pages();
    let mut pool = PagePool::new(pages, page_size);
    let mut scratch = Vec::new();
    assert!(pool.alloc_into(&mut scratch, 1)); // so the tables do not start at page 0
    let mut t_other = Vec::new();
    let mut t_prompt = Vec::new();
    for _ in 0..4 {
        assert!(pool.alloc_into(&mut t_other, 1));
        assert!(pool.alloc_into(&mut t_prompt, 1));
    }
    let mut batch = StepBatch {
        page_size,
        ..Default::default()
    };
    batch.push_seq(&other, 0, &t_other, LogitsWanted::Last);
    let l = r.forward(&batch).unwrap().to_vec();
    let mut other_next = common::argmax(&l) as u32;
    let mut prompt_next: Vec<u32> = prompt.clone();
    let mut prompt_cached = 0;
    for (s, want) in base.iter().enumerate() {
        let other_cached = other.len() + s;
        batch.clear();
        batch.push_seq(&[other_next], other_cached, &t_other, LogitsWanted::Last);
        batch.push_seq(&prompt_next, prompt_cached, &t_prompt, LogitsWanted::Last);
        let logits = r.forward(&batch).unwrap().to_vec();
        let vocab = logits.len() / 2;
        let (lo, lp) = logits.split_at(vocab);
        let e = common::rel_err(lp, want);
        assert!(e < 1e-5, "mixed batch, step {s}: rel err {e}");
        other_next = common::argmax(lo) as u32;
        prompt_cached += prompt_next.len();
        prompt_next = vec![common::argmax(lp) as u32];
    }
}

/// A token decoded alone over a long context (attention split into segments of the context
/// across threads) gives the bits it gives decoded in a batch (each KV head's whole context
/// on one thread), and its first decode step keeps to the logits of a dense prefill.
#[test]
fn long_context_decode_alone_and_batched_agree_bit_for_bit() {
    let dir = common::model_dir();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let mut cfg = EngineConfig::new(dir);
    cfg.max_total_tokens = Some(4096);
    cfg.num_threads = Some(2); // the split needs more than one thread
    let mut r = runner::load(&cfg).expect("load the default model");
    let text = "The quick brown fox jumps over the lazy dog because it is quick. ".repeat(40);
    let long = tok.encode(&text, true).unwrap();
    assert!(
        long.len() > 2 * sglang::backend::cpu::ATTENTION_SEGMENT,
        "{}",
        long.len()
    );
    let short = tok.encode("Once upon a time", true).unwrap();
    let (pages, page_size) = r.kv_pages();
    let mut pool = PagePool::new(pages, page_size);
    let (mut t_long, mut t_short) = (Vec::new(), Vec::new());
    assert!(pool.alloc_into(&mut t_long, pool.pages_for(long.len() + 1)));
    assert!(pool.alloc_into(&mut t_short, pool.pages_for(short.len() + 1)));
    let mut batch = StepBatch {
        page_size,
        ..Default::default()
    };
    // prefill all but the last token of the long prompt, and the short one
    let n = long.len() - 1;
    batch.push_seq(&long[..n], 0, &t_long, LogitsWanted::Last);
    batch.push_seq(&short, 0, &t_short, LogitsWanted::Last);
    let l = r.forward(&batch).unwrap().to_vec();
    let short_next = common::argmax(&l[l.len() / 2..]) as u32;
    // the last token alone (split), then again in a batch with the short sequence
    batch.clear();
    batch.push_seq(&long[n..], n, &t_long, LogitsWanted::Last);
    let alone = r.forward(&batch).unwrap().to_vec();
    batch.clear();
    batch.push_seq(&long[n..], n, &t_long, LogitsWanted::Last);
    batch.push_seq(&[short_next], short.len(), &t_short, LogitsWanted::Last);
    let both = r.forward(&batch).unwrap().to_vec();
    let batched = &both[..alone.len()];
    assert!(
        alone
            .iter()
            .zip(batched)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "rel err {}",
        common::rel_err(&alone, batched)
    );
    // and the whole prompt prefilled at once
    batch.clear();
    batch.push_seq(&long, 0, &t_long, LogitsWanted::Last);
    let dense = r.forward(&batch).unwrap().to_vec();
    let e = common::rel_err(&alone, &dense);
    assert!(e < 1e-5, "decode after prefill vs one prefill: rel err {e}");
}
