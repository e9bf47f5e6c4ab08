//! Structured output through the engine on the default model: constrained outputs match their
//! regex or schema, constrained and plain requests batched together give what each gives alone
//! (the masks do not leak between rows), bad constraints are refused before they are queued,
//! and a constraint that leaves no token fails its request and frees its pages.

mod common;

use std::time::{Duration, Instant};

use sglang::config::EngineConfig;
use sglang::engine::{
    EngineHandle, FinishReason, GenerateRequest, Matched, Output, RequestError, SubmitError,
};
use sglang::sampling::SamplingParams;

fn engine(tp_size: usize) -> EngineHandle {
    let mut cfg = EngineConfig::new(common::model_dir());
    cfg.max_total_tokens = Some(8192);
    cfg.chunked_prefill_size = 64;
    cfg.tp_size = tp_size;
    EngineHandle::start(cfg).unwrap()
}

fn request(e: &EngineHandle, text: &str, params: SamplingParams) -> GenerateRequest {
    let chat = [sglang::ChatMessage::new("user", text)];
    let rendered = e.tokenizer().apply_chat_template(&chat, true).unwrap();
    GenerateRequest {
        input_ids: e.tokenizer().encode(&rendered, false).unwrap(),
        params,
        ..Default::default()
    }
}

fn run(e: &EngineHandle, req: GenerateRequest) -> Output {
    e.submit(req).unwrap().collect_blocking().unwrap()
}

const PERSON: &str = r#"{"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "maxItems": 3, "items": {"enum": ["cat", "dog", "fish"]}}},
    "required": ["name", "age", "pets"], "additionalProperties": false}"#;
const DATE: &str = "[0-9]{4}-(0[1-9]|1[0-2])-[0-3][0-9]";

fn json_params(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        max_new_tokens: 96,
        json_schema: Some(PERSON.into()),
        ..SamplingParams::default()
    }
}

fn date_params(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        max_new_tokens: 32,
        regex: Some(DATE.into()),
        ..SamplingParams::default()
    }
}

/// Checks a PERSON output by hand (no JSON-schema validator in the Rust tests; the server
/// tests validate with the `jsonschema` package).
fn check_person(text: &str) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 3, "{text}");
    assert!(obj["name"].as_str().unwrap().chars().count() <= 24);
    assert!((0..=120).contains(&obj["age"].as_i64().unwrap()), "{text}");
    let pets = obj["pets"].as_array().unwrap();
    assert!(pets.len() <= 3);
    assert!(pets
        .iter()
        .all(|p| ["cat", "dog", "fish"].contains(&p.as_str().unwrap())));
}

fn check_date(text: &str) {
    let b = text.as_bytes();
    assert_eq!(b.len(), 10, "{text:?}");
    assert!(b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[7] == b'-');
    let month: u32 = text[5..7].parse().unwrap();
    assert!((1..=12).contains(&month), "{text}");
    assert!(
        b'0' <= b[8] && b[8] <= b'3' && b[9].is_ascii_digit(),
        "{text}"
    );
}

#[test]
fn constrained_outputs_match_their_schema_and_regex() {
    let e = engine(1);
    for seed in 0..6 {
        let out = run(
            &e,
            request(&e, "Describe a person as JSON.", json_params(0.8, seed)),
        );
        check_person(&out.text);
        // the grammar ends the request as soon as nothing but the end may follow
        let finish = out.finish.unwrap();
        assert!(matches!(finish.reason, FinishReason::Stop(_)), "{finish:?}");
        let out = run(
            &e,
            request(&e, "What is today's date?", date_params(1.0, seed)),
        );
        check_date(&out.text);
        assert_eq!(
            out.finish.unwrap().reason,
            FinishReason::Stop(Matched::Constraint)
        );
    }
}

#[test]
fn constrained_and_plain_requests_batched_give_what_each_gives_alone() {
    let e = engine(1);
    let prompts = [
        "Describe a person as JSON.",
        "What is today's date?",
        "Tell me about the sea.",
        "Write a short poem about rain.",
    ];
    let mut reqs = Vec::new();
    for i in 0..16u64 {
        let prompt = prompts[i as usize % prompts.len()];
        let params = match i % 4 {
            0 => json_params(0.7, i),
            1 => date_params(0.9, i),
            2 => SamplingParams {
                seed: Some(i),
                temperature: 0.7,
                max_new_tokens: 24,
                ..SamplingParams::default()
            },
            _ => SamplingParams::greedy(24),
        };
        let mut req = request(&e, prompt, params);
        if i == 4 {
            // prompt logprobs: this request's prefill step samples on the host path
            req.logprob_start_len = Some(1);
        }
        reqs.push(req);
    }
    let alone: Vec<Output> = reqs.iter().map(|r| run(&e, r.clone())).collect();
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let together: Vec<Output> = streams
        .into_iter()
        .map(|s| s.collect_blocking().unwrap())
        .collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.token_ids, t.token_ids, "request {i}");
        match i % 4 {
            0 => check_person(&t.text),
            1 => check_date(&t.text),
            _ => {}
        }
    }
}

#[test]
fn tensor_parallel_ranks_follow_the_constraint_too() {
    let one = engine(1);
    let two = engine(2);
    let req = |e: &EngineHandle| request(e, "Describe a person as JSON.", json_params(0.0, 0));
    let a = run(&one, req(&one));
    let b = run(&two, req(&two));
    check_person(&a.text);
    assert_eq!(a.token_ids, b.token_ids);
}

#[test]
fn bad_constraints_are_refused_before_they_are_queued() {
    let e = engine(1);
    let refused = |params: SamplingParams| {
        let r = e.submit(request(&e, "Hi", params));
        match r {
            Err(err) => err,
            Ok(_) => panic!("accepted"),
        }
    };
    let cases = [
        (
            SamplingParams {
                json_schema: Some("{\"type\": ".into()),
                ..Default::default()
            },
            "json_schema",
        ),
        (
            SamplingParams {
                json_schema: Some("{\"type\": \"objekt\"}".into()),
                ..Default::default()
            },
            "json_schema",
        ),
        (
            SamplingParams {
                regex: Some("(unclosed".into()),
                ..Default::default()
            },
            "regex",
        ),
        (
            SamplingParams {
                ebnf: Some("start: undefined_rule".into()),
                ..Default::default()
            },
            "ebnf",
        ),
        (
            SamplingParams {
                regex: Some("a".repeat(300 * 1024)),
                ..Default::default()
            },
            "regex",
        ),
    ];
    for (params, field) in cases {
        match refused(params) {
            SubmitError::Constraint(c) => assert_eq!(c.field(), Some(field), "{c}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    match refused(SamplingParams {
        json_schema: Some("{}".into()),
        regex: Some("a".into()),
        ..Default::default()
    }) {
        SubmitError::Invalid(p) => {
            assert_eq!(p.param, "regex");
            assert!(p.to_string().contains("`json_schema`"), "{p}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.in_flight(), 0, "nothing was queued");
}

#[test]
fn a_constraint_that_leaves_no_token_fails_its_request_and_frees_its_pages() {
    let e = engine(1);
    let tok = e.tokenizer();
    // the grammar allows only "x" or "y", and both are stop tokens banned until one token
    // has been generated: no token is left
    let stops: Vec<u32> = ["x", "y"]
        .iter()
        .map(|t| tok.encode(t, false).unwrap()[0])
        .collect();
    let params = SamplingParams {
        regex: Some("x|y".into()),
        stop_token_ids: stops,
        min_new_tokens: 1,
        max_new_tokens: 8,
        ..SamplingParams::greedy(8)
    };
    let err = e
        .submit(request(&e, "Say x or y.", params))
        .unwrap()
        .collect_blocking()
        .unwrap_err();
    assert!(matches!(err, RequestError::Constraint { .. }), "{err:?}");
    // and the engine goes on, every page back
    let out = run(&e, request(&e, "Hi", SamplingParams::greedy(4)));
    assert_eq!(out.token_ids.len(), 4);
    let t = Instant::now();
    while e.in_flight() > 0 || e.stats().kv_used_tokens > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "pages leaked");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn constrained_requests_survive_retraction() {
    // 160 KV slots hold two prompts but not their outputs: requests are retracted and
    // recomputed, and their constraints carry on from where they were
    let mut cfg = EngineConfig::new(common::model_dir());
    cfg.max_total_tokens = Some(160);
    cfg.page_size = 4;
    cfg.chunked_prefill_size = 64;
    let tight = EngineHandle::start(cfg.clone()).unwrap();
    // the same page size (pages bound attention's chunks, so their summation order)
    cfg.max_total_tokens = Some(8192);
    let roomy = EngineHandle::start(cfg).unwrap();
    let reqs: Vec<_> = (0..8)
        .map(|i| request(&roomy, "Describe a person as JSON.", json_params(0.7, i)))
        .collect();
    let alone: Vec<Output> = reqs.iter().map(|r| run(&roomy, r.clone())).collect();
    let streams: Vec<_> = reqs
        .iter()
        .map(|r| tight.submit(r.clone()).unwrap())
        .collect();
    for (i, (s, a)) in streams.into_iter().zip(&alone).enumerate() {
        let out = s.collect_blocking().unwrap();
        assert_eq!(out.token_ids, a.token_ids, "request {i}");
    }
    assert!(
        tight.stats().retractions > 0,
        "the pool was meant to run dry"
    );
}
