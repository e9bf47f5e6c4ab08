//! Tensor parallelism on the CPU: TP 2 and 3 (uneven head splits: the default model has 9
//! query heads and 3 KV heads) give the logits of TP 1 within float tolerance and the same
//! greedy tokens on the real default model; a rank that fails at start-up or during a step
//! stops the group with an error naming it, never a hang.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sglang::backend::BackendError;
use sglang::batch::{LogitsWanted, StepBatch};
use sglang::config::{Dtype, EngineConfig, KvCacheDtype, ModelConfig};
use sglang::engine::{EngineHandle, GenerateRequest, RequestError};
use sglang::kv::PagePool;
use sglang::loader::{self, WeightMap};
use sglang::metrics::Metrics;
use sglang::model::llama;
use sglang::runner::{self, tp, LoadModelError, ModelRunner};
use sglang::sampling::SamplingParams;
use sglang::tokenizer::Tokenizer;

/// Both sides compute in f32; only the order of the partial sums of o, down and the
/// embedding differs.
const LOGITS_TOLERANCE: f32 = 1e-5;
const STEPS: usize = 24;

/// A KV pool of `pages` 16-token f32 pages.
fn kv(pages: usize) -> runner::KvPool {
    runner::KvPool::new(pages, 16, KvCacheDtype::Fp32)
}

fn config(tp: usize) -> EngineConfig {
    let mut cfg = EngineConfig::new(common::model_dir());
    cfg.max_total_tokens = Some(2048);
    cfg.tp_size = tp;
    // f32 inputs: ranks sum the row-parallel products in parts (~1e-6 from one rank), which
    // bf16 inputs would round into ~1e-2
    cfg.dtype = Dtype::Float32;
    cfg
}

/// Logits of every position of two prompts prefilled together, then of one decode step.
fn logits(runner: &mut dyn ModelRunner, prompts: &[Vec<u32>]) -> Vec<f32> {
    let (pages, page_size) = runner.kv_pages();
    let mut pool = PagePool::new(pages, page_size);
    let mut batch = StepBatch {
        page_size,
        ..Default::default()
    };
    let mut tables = Vec::new();
    for ids in prompts {
        let mut table = Vec::new();
        assert!(pool.alloc_into(&mut table, pool.pages_for(ids.len() + 1)));
        batch.push_seq(ids, 0, &table, LogitsWanted::All);
        tables.push(table);
    }
    let mut out = runner.forward(&batch).unwrap().to_vec();
    batch.clear();
    for (ids, table) in prompts.iter().zip(&tables) {
        batch.push_seq(&[ids[0]], ids.len(), table, LogitsWanted::Last);
    }
    out.extend_from_slice(&runner.forward(&batch).unwrap());
    out
}

fn greedy(engine: &EngineHandle, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let streams: Vec<_> = prompts
        .iter()
        .map(|ids| {
            engine
                .submit(GenerateRequest {
                    input_ids: ids.clone(),
                    params: SamplingParams::greedy(STEPS),
                    ..Default::default()
                })
                .unwrap()
        })
        .collect();
    streams
        .into_iter()
        .map(|s| s.collect_blocking().unwrap().token_ids)
        .collect()
}

#[test]
fn tp_2_and_3_match_tp_1_on_the_default_model() {
    let tok = Tokenizer::from_dir(&common::model_dir()).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "A lighthouse keeper wrote in his diary that",
    ]
    .iter()
    .map(|t| tok.encode(t, true).unwrap())
    .collect();

    let mut runner1 = runner::load(&config(1)).unwrap();
    let want = logits(runner1.as_mut(), &prompts[..2]);
    drop(runner1);
    let engine1 = EngineHandle::start(config(1)).unwrap();
    let want_tokens = greedy(&engine1, &prompts);
    engine1.shutdown_and_join();

    for tp in [2, 3] {
        let mut runner = runner::load(&config(tp)).unwrap();
        assert_eq!(runner.parallel_state().ranks, tp);
        assert_eq!(runner.parallel_state().ready, tp);
        let got = logits(runner.as_mut(), &prompts[..2]);
        assert_eq!(got.len(), want.len());
        let err = common::rel_err(&got, &want);
        assert!(err < LOGITS_TOLERANCE, "tp {tp}: logits rel err {err}");
        drop(runner);

        let engine = EngineHandle::start(config(tp)).unwrap();
        assert_eq!(engine.info().tp_size, tp);
        let tokens = greedy(&engine, &prompts);
        assert_eq!(tokens, want_tokens, "tp {tp}: greedy tokens differ");
        engine.shutdown_and_join();
        eprintln!("tp {tp}: logits rel err {err:.2e}, {STEPS} greedy tokens x 3 identical");
    }
}

#[test]
fn a_tp_size_the_model_cannot_split_is_refused_naming_the_option() {
    // 3 KV heads: 4 ranks can neither split nor evenly replicate them
    let e = runner::load(&config(4)).err().unwrap().to_string();
    assert!(e.contains("tp-size") && e.contains("KV heads"), "{e}");
    let e = runner::load(&config(10)).err().unwrap().to_string();
    assert!(
        e.contains("tp-size") && e.contains("attention heads"),
        "{e}"
    );
}

fn model_weights() -> (ModelConfig, Arc<WeightMap>) {
    let dir = common::model_dir();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let weights = loader::load_safetensors(&dir, &llama::tensor_specs(&cfg)).unwrap();
    (cfg, Arc::new(weights))
}

#[test]
fn a_rank_that_fails_at_start_up_is_a_clear_error_not_a_hang() {
    let (cfg, weights) = model_weights();
    let started = Instant::now();
    let model_cfg = cfg.clone();
    let result = tp::start(&cfg, 3, Duration::from_secs(60), move |shard, comm| {
        if shard.rank == 1 {
            return Err(LoadModelError::Backend(BackendError::OutOfMemory(
                "cannot allocate the KV cache".into(),
            )));
        }
        runner::build_rank(
            &model_cfg,
            &weights,
            shard,
            Some(comm),
            kv(64),
            Some(1),
            Dtype::Auto,
        )
    });
    let e = result.err().expect("start must fail").to_string();
    assert!(
        e.contains("rank 1 failed at start-up: out of memory: cannot allocate the KV cache"),
        "{e}"
    );
    // the other ranks were released at once, not after the 60 s timeout
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A rank whose step fails after `ok_steps` good ones.
struct FailingRank {
    inner: Box<dyn ModelRunner>,
    ok_steps: usize,
}

impl ModelRunner for FailingRank {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn forward(&mut self, batch: &StepBatch) -> Result<std::borrow::Cow<'_, [f32]>, BackendError> {
        if self.ok_steps == 0 {
            return Err(BackendError::Device {
                call: "simulated launch".into(),
                message: "device fault".into(),
            });
        }
        self.ok_steps -= 1;
        self.inner.forward(batch)
    }
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn kv_pages(&self) -> (usize, usize) {
        self.inner.kv_pages()
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }
}

#[test]
fn a_rank_that_fails_during_a_step_stops_the_engine_with_the_reason() {
    let (cfg, weights) = model_weights();
    let model_cfg = cfg.clone();
    let group = tp::start(&cfg, 3, Duration::from_secs(60), move |shard, comm| {
        let rank = shard.rank;
        let r = runner::build_rank(
            &model_cfg,
            &weights,
            shard,
            Some(comm),
            kv(128),
            Some(1),
            Dtype::Auto,
        )?;
        Ok(if rank == 2 {
            Box::new(FailingRank {
                inner: r,
                ok_steps: 3,
            })
        } else {
            r
        })
    })
    .unwrap();
    let engine_cfg = config(3);
    let tok = Tokenizer::from_dir(&engine_cfg.model_path).unwrap();
    let metrics = Arc::new(Metrics::new());
    let engine =
        EngineHandle::start_with(engine_cfg, tok, Box::new(group), metrics.clone()).unwrap();
    let started = Instant::now();
    let ids = engine.tokenizer().encode("Once upon a time", true).unwrap();
    let result = engine
        .submit(GenerateRequest {
            input_ids: ids,
            params: SamplingParams::greedy(16),
            ..Default::default()
        })
        .unwrap()
        .collect_blocking();
    let e = result.expect_err("the request must fail");
    // the group stopped: the engine failed (HTTP 503), not just this request's step
    assert!(matches!(e, RequestError::EngineFailed(_)), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("rank 2 step failed") && e.contains("simulated launch: device fault"),
        "{e}"
    );
    while !engine.is_stopped() {
        assert!(started.elapsed() < Duration::from_secs(20), "engine hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let fatal = engine.fatal_error().unwrap();
    assert!(fatal.contains("rank 2"), "{fatal}");
    assert!(metrics.render().contains("sglang_tp_ranks 3"));
    assert!(!metrics.render().contains("sglang_tp_ranks_ready 3"));
    // later requests are refused, not queued forever
    assert!(engine
        .generate_text("hi", SamplingParams::greedy(2))
        .is_err());
}
