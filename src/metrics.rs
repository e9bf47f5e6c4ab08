//! Prometheus metrics, with the names of ARCHITECTURE.md (`sglang_` prefix, token-counted so
//! rates can be computed). One registry per engine; the engine thread updates the engine
//! metrics, the HTTP server the request metrics, and `/metrics` renders the registry.
//!
//! Histogram buckets span LLM latencies: milliseconds (inter-token) to minutes (long requests).

pub use prometheus::IntGaugeVec;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Request, TTFT and queue latencies: 5 ms to 10 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Every `reason` of `sglang_aborted_requests_total` (`engine::AbortReason::label`).
pub const ABORT_REASONS: [&str; 4] = ["client_disconnected", "aborted", "timeout", "shutdown"];

/// Inter-token latency: 1 ms to 5 s.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: Histogram,
    pub time_to_first_token_seconds: Histogram,
    pub inter_token_latency_seconds: Histogram,
    pub queue_time_seconds: Histogram,
    pub prompt_tokens_total: IntCounter,
    pub generation_tokens_total: IntCounter,
    pub cache_hits_total: IntCounter,
    pub cache_misses_total: IntCounter,
    pub request_queue_length: IntGauge,
    pub num_running_requests: IntGauge,
    pub kv_cache_size_bytes: IntGauge,
    pub kv_cache_used_tokens: IntGauge,
    pub kv_cache_evictable_tokens: IntGauge,
    pub kv_cache_available_tokens: IntGauge,
    /// KV slots held by running requests over all slots, 0 to 1 (the Kubernetes inference
    /// gateway's KV-cache utilisation; slots held only by the prefix cache count as free).
    pub kv_cache_usage_ratio: Gauge,
    pub memory_usage_bytes: IntGaugeVec,
    pub aborted_requests_total: IntCounterVec,
    pub cuda_graph_replays_total: IntCounter,
    pub tp_ranks: IntGauge,
    pub tp_ranks_ready: IntGauge,
    pub http_connections: IntGauge,
    pub http_connections_closed_total: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid counter");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid gauge");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "sglang_requests_total",
                "HTTP requests by endpoint and status code",
            ),
            &["endpoint", "status"],
        )
        .expect("valid counter");
        r.register(Box::new(requests_total.clone()))
            .expect("unique metric");
        let memory_usage_bytes = IntGaugeVec::new(
            Opts::new(
                "sglang_memory_usage_bytes",
                "Memory in use by kind: weights, kv_cache, resident (process RSS)",
            ),
            &["kind"],
        )
        .expect("valid gauge");
        r.register(Box::new(memory_usage_bytes.clone()))
            .expect("unique metric");
        let aborted_requests_total = IntCounterVec::new(
            Opts::new(
                "sglang_aborted_requests_total",
                "Requests ended before completion, by reason",
            ),
            &["reason"],
        )
        .expect("valid counter");
        r.register(Box::new(aborted_requests_total.clone()))
            .expect("unique metric");
        // every reason from the start, so rates and alerts see a 0 rather than no series
        for reason in ABORT_REASONS {
            aborted_requests_total.with_label_values(&[reason]);
        }
        let http_connections_closed_total = IntCounterVec::new(
            Opts::new(
                "sglang_http_connections_closed_total",
                "Connections the server closed, by reason: idle (keep-alive timeout), header_timeout, evicted (idlest, to make room at the cap), refused (at the cap, none idle)",
            ),
            &["reason"],
        )
        .expect("valid counter");
        r.register(Box::new(http_connections_closed_total.clone()))
            .expect("unique metric");
        for reason in ["idle", "header_timeout", "evicted", "refused"] {
            http_connections_closed_total.with_label_values(&[reason]);
        }
        Self {
            http_connections: gauge(&r, "sglang_http_connections", "Open HTTP connections"),
            http_connections_closed_total,
            request_duration_seconds: histogram(
                &r,
                "sglang_request_duration_seconds",
                "End-to-end request latency",
                LATENCY_BUCKETS,
            ),
            time_to_first_token_seconds: histogram(
                &r,
                "sglang_time_to_first_token_seconds",
                "Time from arrival to the first generated token",
                LATENCY_BUCKETS,
            ),
            inter_token_latency_seconds: histogram(
                &r,
                "sglang_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request",
                ITL_BUCKETS,
            ),
            queue_time_seconds: histogram(
                &r,
                "sglang_queue_time_seconds",
                "Time from arrival to first admission into the running batch",
                LATENCY_BUCKETS,
            ),
            prompt_tokens_total: counter(
                &r,
                "sglang_prompt_tokens_total",
                "Prompt tokens of admitted requests",
            ),
            generation_tokens_total: counter(
                &r,
                "sglang_generation_tokens_total",
                "Generated tokens",
            ),
            cache_hits_total: counter(
                &r,
                "sglang_cache_hits_total",
                "Prompt tokens served from the radix prefix cache",
            ),
            cache_misses_total: counter(
                &r,
                "sglang_cache_misses_total",
                "Prompt tokens not found in the radix prefix cache",
            ),
            request_queue_length: gauge(
                &r,
                "sglang_request_queue_length",
                "Requests waiting for admission",
            ),
            num_running_requests: gauge(
                &r,
                "sglang_num_running_requests",
                "Requests in the running batch",
            ),
            tp_ranks: gauge(&r, "sglang_tp_ranks", "Ranks of the tensor-parallel group"),
            tp_ranks_ready: gauge(
                &r,
                "sglang_tp_ranks_ready",
                "Ranks of the tensor-parallel group that are up and serving steps",
            ),
            kv_cache_size_bytes: gauge(
                &r,
                "sglang_kv_cache_size_bytes",
                "Bytes of the KV cache pool",
            ),
            kv_cache_used_tokens: gauge(
                &r,
                "sglang_kv_cache_used_tokens",
                "KV slots held by running requests",
            ),
            kv_cache_evictable_tokens: gauge(
                &r,
                "sglang_kv_cache_evictable_tokens",
                "KV slots held only by the prefix cache (reclaimable)",
            ),
            kv_cache_available_tokens: gauge(
                &r,
                "sglang_kv_cache_available_tokens",
                "KV slots free or reclaimable",
            ),
            kv_cache_usage_ratio: {
                let g = Gauge::new(
                    "sglang_kv_cache_usage_ratio",
                    "KV slots held by running requests over all KV slots (0 to 1)",
                )
                .expect("valid gauge");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            cuda_graph_replays_total: counter(
                &r,
                "sglang_cuda_graph_replays_total",
                "Decode steps replayed from a captured CUDA graph",
            ),
            requests_total,
            memory_usage_bytes,
            aborted_requests_total,
            registry: r,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The GPU gauges, registered by a backend that has a GPU (a CPU server exports none, so
    /// a dashboard shows "no data" rather than a made-up 0 %): utilisation per device
    /// (`sglang_gpu_utilization_percent{gpu}`); GPU memory is reported through
    /// `sglang_memory_usage_bytes{kind="gpu"|"gpu_total"}`.
    pub fn register_gpu(&self) -> prometheus::Result<IntGaugeVec> {
        let g = IntGaugeVec::new(
            Opts::new(
                "sglang_gpu_utilization_percent",
                "GPU utilisation by device (NVML)",
            ),
            &["gpu"],
        )?;
        self.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }

    /// Requests aborted so far, for every reason.
    pub fn aborted_total(&self) -> u64 {
        ABORT_REASONS
            .iter()
            .map(|r| self.aborted_requests_total.with_label_values(&[r]).get())
            .sum()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_architecture_name_is_exported() {
        let m = Metrics::new();
        m.requests_total
            .with_label_values(&["/generate", "200"])
            .inc();
        m.aborted_requests_total
            .with_label_values(&["client_disconnected"])
            .inc();
        m.memory_usage_bytes.with_label_values(&["weights"]).set(1);
        let text = m.render();
        for name in [
            "sglang_requests_total",
            "sglang_request_duration_seconds",
            "sglang_time_to_first_token_seconds",
            "sglang_inter_token_latency_seconds",
            "sglang_queue_time_seconds",
            "sglang_prompt_tokens_total",
            "sglang_generation_tokens_total",
            "sglang_cache_hits_total",
            "sglang_cache_misses_total",
            "sglang_request_queue_length",
            "sglang_num_running_requests",
            "sglang_kv_cache_size_bytes",
            "sglang_kv_cache_used_tokens",
            "sglang_kv_cache_evictable_tokens",
            "sglang_kv_cache_available_tokens",
            "sglang_kv_cache_usage_ratio",
            "sglang_memory_usage_bytes",
            "sglang_aborted_requests_total",
            "sglang_cuda_graph_replays_total",
            "sglang_tp_ranks",
            "sglang_tp_ranks_ready",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(
            !text.contains("sglang_gpu_utilization_percent"),
            "no GPU: no GPU gauge"
        );
        let gpu = m.register_gpu().unwrap();
        gpu.with_label_values(&["0"]).set(42);
        m.memory_usage_bytes.with_label_values(&["gpu"]).set(1);
        m.memory_usage_bytes
            .with_label_values(&["gpu_total"])
            .set(2);
        let text = m.render();
        assert!(
            text.contains("sglang_gpu_utilization_percent{gpu=\"0\"} 42"),
            "{text}"
        );
        assert!(text.contains("kind=\"gpu_total\""));
    }
}
