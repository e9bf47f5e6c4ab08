//! Structured output's cost on the CPU with the default model: llguidance's mask time per
//! token (p50, p99) for a nested JSON schema and for a regex, replayed over outputs the engine
//! generated under those constraints, and decode throughput with and without a constraint
//! at batch 1 and 8 through the engine, as a ratio (goal: 0.95 or better). The masks are
//! computed on a helper thread while the model runs, so the ratio shows what they still cost.
//!
//! Run: `cargo bench --bench structured` (needs the prepared default model).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sglang::constraint::{ConstraintCompiler, ConstraintSpec};
use sglang::engine::{EngineHandle, GenerateRequest};
use sglang::sampling::SamplingParams;
use sglang::{ChatMessage, EngineConfig};

/// A realistic nested schema: an order with a customer, line items and a status (at least
/// 20 items, so that a constrained output outlasts the decode measurement).
const ORDER: &str = r#"{"type": "object", "properties": {
  "order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"},
  "customer": {"type": "object", "properties": {
      "name": {"type": "string", "maxLength": 40},
      "email": {"type": "string", "maxLength": 60},
      "address": {"type": "object", "properties": {
          "street": {"type": "string", "maxLength": 60}, "city": {"type": "string", "maxLength": 40},
          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["street", "city", "zip"]}},
    "required": ["name", "email", "address"]},
  "items": {"type": "array", "minItems": 20, "maxItems": 50, "items": {"type": "object", "properties": {
      "sku": {"type": "string", "maxLength": 12}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
      "price": {"type": "number", "minimum": 0}},
    "required": ["sku", "quantity", "price"]}},
  "status": {"enum": ["pending", "paid", "shipped", "cancelled"]}},
  "required": ["order_id", "customer", "items", "status"]}"#;
/// A long regex output: 20 to 40 dated log lines.
const LOG_LINES: &str =
    r"(20[0-9]{2}-[01][0-9]-[0-3][0-9] (INFO|WARN|ERROR) [a-z ]{1,40}\n){20,40}";

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn request(e: &EngineHandle, text: &str, params: SamplingParams) -> GenerateRequest {
    let chat = [ChatMessage::new("user", text)];
    let rendered = e.tokenizer().apply_chat_template(&chat, true).unwrap();
    GenerateRequest {
        input_ids: e.tokenizer().encode(&rendered, false).unwrap(),
        params,
        ..Default::default()
    }
}

/// Tokens per second of decode for `batch` requests of `tokens` tokens each (from the first
/// token to the last, so the prompts' prefill is left out).
fn decode_rate(
    e: &EngineHandle,
    batch: usize,
    tokens: usize,
    spec: Option<&ConstraintSpec>,
) -> f64 {
    let streams: Vec<_> = (0..batch)
        .map(|i| {
            // greedy: the sampler's own cost is the same with and without a mask, so the
            // ratio is the masks' (a draw at temperature > 0 without top-p sorts the whole
            // vocabulary on the host, which a mask shrinks: it would flatter the constraint)
            let mut params = SamplingParams {
                seed: Some(i as u64),
                ignore_eos: true,
                ..SamplingParams::greedy(tokens)
            };
            match spec {
                Some(ConstraintSpec::JsonSchema(s)) => params.json_schema = Some(s.clone()),
                Some(ConstraintSpec::Regex(r)) => params.regex = Some(r.clone()),
                _ => {}
            }
            let prompt = format!("Write an order as JSON, or log lines ({i}).");
            e.submit(request(e, &prompt, params)).unwrap()
        })
        .collect();
    let mut first = None;
    let mut generated = 0;
    let start = Instant::now();
    for mut s in streams {
        while let Some(ev) = s.next_blocking() {
            match ev {
                sglang::Event::Chunk(c) => {
                    first.get_or_insert_with(Instant::now);
                    generated += c.token_ids.len();
                }
                _ => break,
            }
        }
    }
    let first = first.unwrap_or(start);
    (generated - batch) as f64 / first.elapsed().as_secs_f64()
}

fn main() {
    let model_dir = std::env::var("SGLANG_BENCH_MODEL").unwrap_or_else(|_| {
        format!(
            "{}/models/SmolLM2-135M-Instruct",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let mut cfg = EngineConfig::new(&model_dir);
    cfg.max_total_tokens = Some(16384);
    let engine = EngineHandle::start(cfg).expect("load the model (scripts/prepare-model.sh)");
    let info = engine.info().model_config.clone();
    let compiler = ConstraintCompiler::new(
        Arc::new(sglang::Tokenizer::from_dir(std::path::Path::new(&model_dir)).unwrap()),
        info.vocab_size,
        &info.eos_token_ids,
    );
    let specs = [
        (
            "nested JSON schema (an order)",
            ConstraintSpec::JsonSchema(ORDER.into()),
        ),
        ("regex (log lines)", ConstraintSpec::Regex(LOG_LINES.into())),
    ];
    println!("\nmask time per token, replayed over constrained outputs of the engine:\n");
    println!("| constraint | compile (ms) | tokens | mask p50 (us) | mask p99 (us) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, spec) in &specs {
        let t = Instant::now();
        compiler.compile(spec).expect("compiles");
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut times = Vec::new();
        for seed in 0..4 {
            let mut params = SamplingParams {
                temperature: 0.8,
                seed: Some(seed),
                max_new_tokens: 256,
                ..SamplingParams::default()
            };
            match spec {
                ConstraintSpec::JsonSchema(s) => params.json_schema = Some(s.clone()),
                ConstraintSpec::Regex(r) => params.regex = Some(r.clone()),
                ConstraintSpec::Grammar(_) => unreachable!(),
            }
            let out = engine
                .submit(request(
                    &engine,
                    "Write an order as JSON, or log lines.",
                    params,
                ))
                .unwrap()
                .collect_blocking()
                .unwrap();
            // a fresh matcher follows the same tokens, timing each mask (the cache is warm)
            let mut c = compiler.compile(spec).unwrap();
            for &token in &out.token_ids {
                let t = Instant::now();
                c.compute_mask().unwrap();
                times.push(t.elapsed().as_secs_f64() * 1e6);
                if c.advance(token).is_err() || c.is_complete() {
                    break;
                }
            }
        }
        let n = times.len();
        let (p50, p99) = (percentile(&mut times, 0.5), percentile(&mut times, 0.99));
        println!("| {name} | {compile_ms:.1} | {n} | {p50:.0} | {p99:.0} |");
    }
    let rounds = 5;
    println!(
        "\ndecode throughput through the engine (greedy, tokens/s; {rounds} rounds, each \
         running both back to back; medians, and the median of the per-round ratios):\n"
    );
    println!("| constraint | batch | without | with | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for (name, spec) in &specs {
        for batch in [1, 8] {
            let (mut plain, mut constrained, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let p = decode_rate(&engine, batch, 128, None);
                let c = decode_rate(&engine, batch, 128, Some(spec));
                plain.push(p);
                constrained.push(c);
                ratios.push(c / p);
            }
            let (p, c) = (
                percentile(&mut plain, 0.5),
                percentile(&mut constrained, 0.5),
            );
            let r = percentile(&mut ratios, 0.5);
            println!("| {name} | {batch} | {p:.1} | {c:.1} | {r:.3} |");
        }
    }
    std::thread::sleep(Duration::from_millis(10));
}
