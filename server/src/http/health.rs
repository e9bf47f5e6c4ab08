//! Health: `/health` answers from probe results cached by a background task (it never runs the
//! model), `/health_generate` pushes a one-token generation through the scheduler (the
//! readiness probe), `/metrics` renders the Prometheus registry.
//!
//! `/health` answers `{status, timestamp, uptime, version, checks}` with the checks `basic`
//! (engine alive, heartbeat), `memory`, `gpu` (NVML, or why there is nothing to report: a CPU
//! server is not unhealthy for lacking a GPU), `parallel`, `model` and `performance`. Status:
//! `starting`, `draining` and `unhealthy` answer 503; `healthy` and `degraded` answer 200.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use parking_lot::RwLock;
use serde_json::{json, Value};
use sglang::engine::{EngineHandle, GenerateRequest};
use sglang::sampling::SamplingParams;

use crate::http::{full, json_response, AppState, Body};

/// How often the probes run.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// An engine with work that has not completed a loop iteration for this long is stalled.
const STALL_AFTER: Duration = Duration::from_secs(60);

/// The last probe results (`checks` and the status they imply).
pub struct Health {
    report: RwLock<(String, Value)>,
    /// `sglang_gpu_utilization_percent`, registered the first time NVML answers.
    gpu_gauge: std::sync::OnceLock<Option<sglang::metrics::IntGaugeVec>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            report: RwLock::new(("starting".into(), json!({}))),
            gpu_gauge: std::sync::OnceLock::new(),
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs every probe once and stores the results.
pub fn probe(state: &AppState) {
    let Some(engine) = state.engine.get() else {
        return;
    };
    let stats = engine.stats();
    let info = engine.info();
    let rss = sglang::sys::resident_bytes();
    let mem = sglang::sys::MemInfo::read();
    let (avail, total) = (mem.available_bytes, mem.total_bytes);
    if let Some(rss) = rss {
        state
            .metrics
            .memory_usage_bytes
            .with_label_values(&["resident"])
            .set(rss as i64);
    }
    let used_fraction = match (avail, total) {
        (Some(a), Some(t)) if t > 0 => 1.0 - a as f64 / t as f64,
        _ => 0.0,
    };
    let pressure = if used_fraction > 0.95 {
        "high"
    } else if used_fraction > 0.8 {
        "medium"
    } else {
        "low"
    };
    let in_flight = engine.in_flight();
    let heartbeat_ms = stats.heartbeat_unix_ms;
    let heartbeat_age = if heartbeat_ms == 0 {
        None
    } else {
        Some((unix_now() * 1000.0 - heartbeat_ms as f64).max(0.0) / 1000.0)
    };
    let stalled = in_flight > 0 && heartbeat_age.is_some_and(|a| a > STALL_AFTER.as_secs_f64());
    let alive = !engine.is_stopped();
    let fatal = engine.fatal_error();
    let steps = stats.steps;
    let forward = stats.forward_nanos as f64 / 1e9;
    let hist = &state.metrics.request_duration_seconds;
    let (count, sum) = (hist.get_sample_count(), hist.get_sample_sum());
    let checks = json!({
        "basic": {
            "server_responsive": true,
            "engine_running": alive,
            "engine_stalled": stalled,
            "engine_heartbeat_age_seconds": heartbeat_age,
        },
        "memory": {
            "process_resident_bytes": rss,
            "system_available_bytes": avail,
            "system_total_bytes": total,
            "weights_bytes": info.weight_bytes,
            "kv_cache_bytes": info.kv_capacity_tokens * info.kv_bytes_per_token,
            "kv_cache_used_tokens": stats.kv_used_tokens,
            "kv_cache_available_tokens": stats.kv_available_tokens,
            "memory_pressure": pressure,
        },
        "gpu": gpu_check(state, info.backend),
        "parallel": {
            "tp_size": info.tp_size,
            "ranks_ready": stats.tp_ranks_ready,
            "error": fatal,
        },
        "model": {
            "model_loaded": true,
            "model_path": info.engine_config.model_path.display().to_string(),
            "served_model_name": state.served_model_name,
            "model_size_parameters": info.model_config.num_parameters(),
            "backend": info.backend,
        },
        "performance": {
            "requests_in_flight": in_flight,
            "requests_completed": count,
            "average_latency_ms": if count > 0 { sum / count as f64 * 1000.0 } else { 0.0 },
            "forward_steps": steps,
            "average_step_ms": if steps > 0 { forward / steps as f64 * 1000.0 } else { 0.0 },
            "generated_tokens": stats.generated_tokens,
        },
    });
    let status = if !alive || stalled || fatal.is_some() {
        "unhealthy"
    } else if pressure == "high" {
        "degraded"
    } else {
        "healthy"
    };
    *state.health.report.write() = (status.to_string(), checks);
}

/// The `gpu` check: NVML's view of the GPUs when the engine runs on one (utilisation, memory,
/// temperature; also exported as metrics), else why there is nothing to report.
fn gpu_check(state: &AppState, backend: &str) -> Value {
    if backend != "cuda" {
        return json!({
            "gpu_available": false,
            "status": "not available",
            "reason": format!("the {backend} backend runs without a GPU"),
        });
    }
    match sglang::gpu::status() {
        Err(reason) => json!({
            "gpu_available": true,
            "status": "not available",
            "reason": format!("telemetry: {reason}"),
        }),
        Ok(devices) => {
            let m = &state.metrics;
            let gauge = state.health.gpu_gauge.get_or_init(|| m.register_gpu().ok());
            for d in &devices {
                if let Some(g) = gauge {
                    g.with_label_values(&[&d.index.to_string()])
                        .set(d.utilization_percent as i64);
                }
            }
            let used: u64 = devices.iter().map(|d| d.memory_used_bytes).sum();
            let total: u64 = devices.iter().map(|d| d.memory_total_bytes).sum();
            m.memory_usage_bytes
                .with_label_values(&["gpu"])
                .set(used as i64);
            m.memory_usage_bytes
                .with_label_values(&["gpu_total"])
                .set(total as i64);
            json!({"gpu_available": true, "status": "ok", "devices": devices})
        }
    }
}

/// How long a server whose engine failed keeps answering (`/health`: unhealthy) before it
/// exits, so that probes and clients see why.
const EXIT_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Re-runs the probes every `PROBE_INTERVAL` for the life of the server. An engine that
/// stopped by itself (a tensor-parallel rank failed) cannot recover: the server reports
/// unhealthy, then exits with status 1 and the reason, for the supervisor to restart it.
pub fn spawn_prober(state: Arc<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        loop {
            tick.tick().await;
            probe(&state);
            if let Some(reason) = state.engine.get().and_then(EngineHandle::fatal_error) {
                tracing::error!(
                    "the engine failed: {reason}; exiting in {}s",
                    EXIT_AFTER_FAILURE.as_secs()
                );
                tokio::time::sleep(EXIT_AFTER_FAILURE).await;
                eprintln!("error: the engine failed: {reason}");
                std::process::exit(1);
            }
        }
    });
}

/// `GET /health`: cached results, never the model.
pub fn health(state: &Arc<AppState>) -> Response<Body> {
    let (mut status, checks) = state.health.report.read().clone();
    if state.engine.get().is_none() {
        status = "starting".into();
    }
    if state.draining.load(Ordering::Acquire) {
        status = "draining".into();
    }
    let code = match status.as_str() {
        "healthy" | "degraded" => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_response(
        code,
        &json!({
            "status": status,
            "timestamp": unix_now(),
            "uptime": state.started.elapsed().as_secs_f64(),
            "version": sglang::VERSION,
            "checks": checks,
        }),
    )
}

async fn one_token(engine: &EngineHandle) -> Result<(), String> {
    let ids = engine
        .tokenizer()
        .encode("Hello", true)
        .map_err(|e| e.to_string())?;
    let req = GenerateRequest {
        input_ids: ids,
        params: SamplingParams::greedy(1),
        ..Default::default()
    };
    let mut stream = engine.submit(req).map_err(|e| e.to_string())?;
    loop {
        match stream.next().await {
            Some(sglang::engine::Event::Finished(_)) => return Ok(()),
            Some(sglang::engine::Event::Failed(e)) => return Err(e.to_string()),
            Some(_) => continue,
            None => return Err("the engine stopped".into()),
        }
    }
}

/// `GET /health_generate`: one token through the scheduler within the time limit.
pub async fn health_generate(state: &Arc<AppState>) -> Response<Body> {
    let started = Instant::now();
    let engine = match state.engine() {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let limit = Duration::from_secs_f64(state.args.health_generate_timeout);
    let outcome = match tokio::time::timeout(limit, one_token(engine)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no token within {} s", limit.as_secs_f64())),
    };
    match outcome {
        Ok(()) => json_response(
            StatusCode::OK,
            &json!({"status": "healthy", "latency_ms": started.elapsed().as_secs_f64() * 1000.0}),
        ),
        Err(e) => crate::http::ApiError::unavailable(format!("generation check failed: {e}"))
            .into_response(),
    }
}

/// `GET /metrics`: Prometheus text format.
pub fn metrics(state: &Arc<AppState>) -> Response<Body> {
    let mut resp = Response::new(full(state.metrics.render()));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
