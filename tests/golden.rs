//! Golden test against the independent numpy reference (scripts/reference.py): the same
//! prompt token ids, first-step logits within tolerance, and 32 identical greedy tokens, for
//! raw and chat-templated prompts on the real default model.
//!
//! Tolerance: both sides compute in f32 from the same bf16 weights; only summation order
//! differs, so the relative L2 error of the logits is ~1e-6. We allow 1e-4.

mod common;

use sglang::backend::{LogitsWanted, StepBatch};
use sglang::config::EngineConfig;
use sglang::engine::{EngineHandle, GenerateRequest};
use sglang::kv::PagePool;
use sglang::model;
use sglang::sampling::SamplingParams;
use sglang::tokenizer::ChatMessage;

const LOGITS_TOLERANCE: f32 = 1e-4;
const STEPS: usize = 32;

#[test]
fn engine_matches_the_numpy_reference() {
    let dir = common::model_dir();
    let prompts: &[(&str, bool)] = &[
        ("The capital of France is", false),
        (
            "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
            false,
        ),
        ("What are the three primary colors? Answer briefly.", true),
        ("Write a haiku about a lighthouse keeper.", true),
    ];
    let refs = common::reference(&dir, prompts, STEPS);

    let mut cfg = EngineConfig::new(&dir);
    cfg.max_total_tokens = Some(8192);
    let engine = EngineHandle::start(cfg.clone()).unwrap();
    let tok = engine.tokenizer().clone();
    let mut runner = model::load(&cfg).unwrap();

    for ((text, chat), r) in prompts.iter().zip(&refs) {
        // 1. tokenization and chat template agree with the independent implementations
        let ids = if *chat {
            let rendered = tok
                .apply_chat_template(&[ChatMessage::new("user", text)], true)
                .unwrap();
            assert_eq!(
                rendered, r.rendered,
                "chat template rendering differs from jinja2"
            );
            tok.encode(&rendered, false).unwrap()
        } else {
            tok.encode(text, true).unwrap()
        };
        assert_eq!(ids, r.input_ids, "token ids differ for {text:?}");

        // 2. first-step logits
        let (pages, page_size) = runner.kv_pages();
        let mut pool = PagePool::new(pages, page_size);
        let mut table = Vec::new();
        assert!(pool.alloc_into(&mut table, pool.pages_for(ids.len())));
        let mut batch = StepBatch {
            page_size,
            ..Default::default()
        };
        batch.push_seq(&ids, 0, &table, LogitsWanted::Last);
        let logits = runner.forward(&batch).unwrap().to_vec();
        let want = r.logits();
        let err = common::rel_err(&logits, &want);
        assert!(err < LOGITS_TOLERANCE, "{text:?}: logits rel err {err}");
        assert_eq!(common::argmax(&logits), common::argmax(&want));

        // 3. greedy tokens through the whole engine (scheduler, sampler, detokenizer)
        let out = engine
            .submit(GenerateRequest {
                input_ids: ids.clone(),
                params: SamplingParams::greedy(STEPS),
                ..Default::default()
            })
            .unwrap()
            .collect_blocking()
            .unwrap();
        assert!(r.greedy_ids.len() == STEPS || r.greedy_ids.last() == Some(&2));
        assert_eq!(
            out.token_ids, r.greedy_ids,
            "{text:?}: greedy tokens differ"
        );
        let want_text = r.greedy_text.trim_end_matches("<|im_end|>");
        assert_eq!(out.text, want_text, "{text:?}: text differs");
        eprintln!("{text:?} -> {:?} (logits rel err {err:.2e})", out.text);
    }
}
