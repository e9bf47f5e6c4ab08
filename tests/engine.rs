//! The engine thread end to end on the default model: batching does not change greedy output,
//! a pool too small for all requests at once still completes every request exactly, aborts
//! free their pages, stop strings cut exactly, seeds reproduce, bad requests are refused.

mod common;

use std::time::{Duration, Instant};

use sglang::config::EngineConfig;
use sglang::engine::{EngineHandle, Event, FinishReason, GenerateRequest, Matched, SubmitError};
use sglang::sampling::SamplingParams;

fn engine(max_total_tokens: usize, page_size: usize) -> EngineHandle {
    let mut cfg = EngineConfig::new(common::model_dir());
    cfg.max_total_tokens = Some(max_total_tokens);
    cfg.page_size = page_size;
    cfg.chunked_prefill_size = 64;
    EngineHandle::start(cfg).unwrap()
}

fn request(e: &EngineHandle, text: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        input_ids: e.tokenizer().encode(text, true).unwrap(),
        params,
        ..Default::default()
    }
}

const PROMPTS: &[&str] = &[
    "The history of the printing press",
    "Photosynthesis is the process by which",
    "In mathematics, a prime number is",
    "The best way to learn a new language is to practice every day, read books in that language, and",
    "Once upon a time",
    "Rust is a systems programming language that",
];

/// Tokens and prompt logprobs (asked for from position 2) of one request.
fn with_prompt_logprobs(e: &EngineHandle, text: &str, params: &SamplingParams) -> GenerateRequest {
    GenerateRequest {
        logprob_start_len: Some(2),
        ..request(e, text, params.clone())
    }
}

#[test]
fn batched_and_retracted_requests_match_running_alone() {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(24)
    };
    // the same page size on both sides: pages bound the attention's chunks, so another size
    // sums in another order (~1e-6 with f32 inputs, and up to ~0.1 in a logprob once bf16
    // inputs round those differences the other way)
    let roomy = engine(4096, 4);
    let outputs: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            roomy
                .submit(with_prompt_logprobs(&roomy, p, &params))
                .unwrap()
                .collect_blocking()
                .unwrap()
        })
        .collect();
    let alone: Vec<Vec<u32>> = outputs.iter().map(|o| o.token_ids.clone()).collect();
    // 160 KV slots for six requests of ~30-45 tokens each: they cannot all be resident, so
    // the scheduler must retract and recompute; the outputs must not change.
    let tight = engine(160, 4);
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            tight
                .submit(with_prompt_logprobs(&tight, p, &params))
                .unwrap()
        })
        .collect();
    let together: Vec<_> = streams
        .into_iter()
        .map(|s| s.collect_blocking().unwrap())
        .collect();
    assert_eq!(
        together.iter().map(|o| &o.token_ids).collect::<Vec<_>>(),
        alone.iter().collect::<Vec<_>>()
    );
    // the prompt logprobs arrive once each, whatever was recomputed, with the same bits
    for (a, b) in together.iter().zip(&outputs) {
        assert_eq!(a.prompt_logprobs.len(), b.prompt_logprobs.len());
        for (x, y) in a.prompt_logprobs.iter().zip(&b.prompt_logprobs) {
            assert_eq!(x.token_id, y.token_id);
            assert_eq!(x.logprob.to_bits(), y.logprob.to_bits(), "{x:?} vs {y:?}");
        }
    }
    assert!(
        tight.stats().retractions > 0,
        "the pool was meant to run dry"
    );
    wait_idle(&tight);
    assert_eq!(tight.stats().kv_used_tokens, 0, "pages leaked");
}

#[test]
fn the_prefix_cache_changes_no_token() {
    let shared = "You are a careful assistant who answers in one short paragraph. ".repeat(6);
    let prompts: Vec<String> = PROMPTS.iter().map(|p| format!("{shared}{p}")).collect();
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(20)
    };
    let run = |radix: bool| {
        let mut cfg = EngineConfig::new(common::model_dir());
        cfg.max_total_tokens = Some(4096);
        cfg.enable_radix_cache = radix;
        let e = EngineHandle::start(cfg).unwrap();
        // one at a time (the later ones hit the cache), then all together
        let mut outs: Vec<(Vec<u32>, usize)> = Vec::new();
        for p in &prompts {
            let o = e
                .submit(request(&e, p, params.clone()))
                .unwrap()
                .collect_blocking()
                .unwrap();
            outs.push((o.token_ids, o.finish.unwrap().usage.cached_tokens));
        }
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| e.submit(request(&e, p, params.clone())).unwrap())
            .collect();
        for s in streams {
            let o = s.collect_blocking().unwrap();
            outs.push((o.token_ids, o.finish.unwrap().usage.cached_tokens));
        }
        outs
    };
    let with = run(true);
    let without = run(false);
    let tokens = |v: &[(Vec<u32>, usize)]| v.iter().map(|o| o.0.clone()).collect::<Vec<_>>();
    assert_eq!(tokens(&with), tokens(&without));
    assert!(
        with[1..].iter().all(|o| o.1 > 0),
        "later requests reuse the shared prefix"
    );
    assert!(without.iter().all(|o| o.1 == 0));
}

fn wait_idle(e: &EngineHandle) {
    let t = Instant::now();
    while e.in_flight() > 0 || e.stats().kv_used_tokens > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "engine did not go idle"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn dropping_a_stream_aborts_and_frees_pages() {
    let e = engine(4096, 16);
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(2000)
    };
    let mut s = e.submit(request(&e, PROMPTS[0], params.clone())).unwrap();
    // read a few tokens, then go away like a disconnected client
    for _ in 0..3 {
        assert!(matches!(s.next_blocking(), Some(Event::Chunk(_))));
    }
    drop(s);
    wait_idle(&e);
    // explicit abort from another handle
    let mut s = e.submit(request(&e, PROMPTS[1], params)).unwrap();
    assert!(matches!(s.next_blocking(), Some(Event::Chunk(_))));
    e.abort(s.id());
    loop {
        match s.next_blocking() {
            Some(Event::Chunk(_)) => continue,
            Some(Event::Finished(f)) => {
                assert!(matches!(f.reason, FinishReason::Abort(_)));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    wait_idle(&e);
}

#[test]
fn stop_strings_and_tokens_cut_exactly() {
    let e = engine(4096, 16);
    let base = e
        .submit(request(
            &e,
            PROMPTS[2],
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(40)
            },
        ))
        .unwrap()
        .collect_blocking()
        .unwrap();
    // a stop string from the middle of the greedy output
    let chars: Vec<char> = base.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 4].iter().collect();
    let cut = base.text.find(&stop).unwrap();
    let params = SamplingParams {
        stop: vec![stop.clone()],
        ignore_eos: true,
        ..SamplingParams::greedy(40)
    };
    let out = e
        .submit(request(&e, PROMPTS[2], params.clone()))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_eq!(out.text, base.text[..cut]);
    let f = out.finish.unwrap();
    assert_eq!(f.reason, FinishReason::Stop(Matched::Text(stop.clone())));
    // streamed chunk by chunk, the same text arrives (nothing of the stop string leaks)
    let mut s = e.submit(request(&e, PROMPTS[2], params.clone())).unwrap();
    let mut streamed = String::new();
    while let Some(Event::Chunk(c)) = s.next_blocking() {
        streamed.push_str(&c.text);
    }
    assert_eq!(streamed, base.text[..cut]);
    // no_stop_trim keeps it
    let params = SamplingParams {
        no_stop_trim: true,
        ..params
    };
    let out = e
        .submit(request(&e, PROMPTS[2], params))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_eq!(out.text, base.text[..cut + stop.len()]);
    // a stop token id: included in output_ids, its text not in the output
    let tok = base.token_ids[5];
    let params = SamplingParams {
        stop_token_ids: vec![tok],
        ignore_eos: true,
        ..SamplingParams::greedy(40)
    };
    let out = e
        .submit(request(&e, PROMPTS[2], params))
        .unwrap()
        .collect_blocking()
        .unwrap();
    let first = base.token_ids.iter().position(|&t| t == tok).unwrap();
    assert_eq!(out.token_ids, base.token_ids[..=first]);
    assert_eq!(
        out.finish.unwrap().reason,
        FinishReason::Stop(Matched::Token(tok))
    );
    let want = e
        .tokenizer()
        .decode(&base.token_ids[..first], true)
        .unwrap();
    assert_eq!(out.text, want);
}

#[test]
fn seeds_reproduce_and_limits_hold() {
    let e = engine(4096, 16);
    let sampled = |seed| {
        let p = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(seed),
            max_new_tokens: 20,
            ignore_eos: true,
            ..Default::default()
        };
        e.submit(request(&e, PROMPTS[4], p))
            .unwrap()
            .collect_blocking()
            .unwrap()
    };
    let (a, b, c) = (sampled(7), sampled(7), sampled(8));
    assert_eq!(a.token_ids, b.token_ids);
    assert_ne!(a.token_ids, c.token_ids);
    assert_eq!(a.token_ids.len(), 20);
    let f = a.finish.unwrap();
    assert_eq!(f.reason, FinishReason::Length);
    assert_eq!(f.usage.completion_tokens, 20);
    // EOS ends a chat answer: the EOS id is the last output id
    let tok = e.tokenizer();
    let text = tok
        .apply_chat_template(
            &[sglang::tokenizer::ChatMessage::new("user", "Say hi.")],
            true,
        )
        .unwrap();
    let out = e
        .submit(GenerateRequest {
            input_ids: tok.encode(&text, false).unwrap(),
            params: SamplingParams::greedy(200),
            ..Default::default()
        })
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_eq!(out.token_ids.last(), Some(&2));
    assert_eq!(
        out.finish.unwrap().reason,
        FinishReason::Stop(Matched::Token(2))
    );
    assert!(!out.text.contains("<|im_end|>"));
}

#[test]
fn bad_requests_are_refused_with_the_field_named() {
    let e = engine(4096, 16);
    let err = |r: GenerateRequest| match e.submit(r) {
        Err(SubmitError::Invalid(p)) => p.to_string(),
        Err(other) => panic!("unexpected {other}"),
        Ok(_) => panic!("accepted"),
    };
    assert!(err(GenerateRequest::default()).contains("input_ids"));
    assert!(err(GenerateRequest {
        input_ids: vec![1, 70000],
        ..Default::default()
    })
    .contains("input_ids"));
    let long = GenerateRequest {
        input_ids: vec![100; 9000],
        ..Default::default()
    };
    assert!(err(long).contains("context length"));
    let e2 = err(request(
        &e,
        "hi",
        SamplingParams {
            top_k: -3,
            ..Default::default()
        },
    ));
    assert!(e2.contains("top_k"), "{e2}");
    let e3 = err(GenerateRequest {
        input_ids: vec![5],
        top_logprobs_num: 100,
        ..Default::default()
    });
    assert!(e3.contains("top_logprobs_num"), "{e3}");
    let e4 = err(GenerateRequest {
        input_ids: vec![5, 6],
        logprob_start_len: Some(2),
        ..Default::default()
    });
    assert!(e4.contains("logprob_start_len"), "{e4}");
    // the engine is unharmed
    let out = e
        .submit(request(&e, "hi", SamplingParams::greedy(3)))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_eq!(out.token_ids.len(), 3);
}

#[test]
fn logprobs_are_returned_when_asked() {
    let e = engine(4096, 16);
    let mut r = request(&e, PROMPTS[0], SamplingParams::greedy(5));
    r.return_logprob = true;
    r.top_logprobs_num = 3;
    let out = e.submit(r).unwrap().collect_blocking().unwrap();
    assert_eq!(out.logprobs.len(), 5);
    for (info, &id) in out.logprobs.iter().zip(&out.token_ids) {
        assert_eq!(info.token_id, id);
        assert_eq!(info.top_logprobs.len(), 3);
        // greedy: the chosen token is the most likely one
        assert_eq!(info.top_logprobs[0].token_id, id);
        assert!((info.top_logprobs[0].logprob - info.logprob).abs() < 1e-6);
        assert!(info.logprob <= 0.0);
    }
}
