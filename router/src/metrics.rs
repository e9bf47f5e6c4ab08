//! The router's own Prometheus metrics (`sglang_router_*`), per worker where it matters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Answers relayed, by worker and status code.
    pub requests_total: IntCounterVec,
    /// Failures talking to a worker, by worker and kind (connect, status, stream, timeout).
    pub errors_total: IntCounterVec,
    /// Requests sent again to another worker after one failed before answering.
    pub retries_total: IntCounter,
    /// Workers taken out of the pool (failed probes or failed requests).
    pub ejections_total: IntCounterVec,
    /// 1 while a worker is in the pool, 0 while ejected.
    pub worker_healthy: IntGaugeVec,
    /// Requests routed to a worker and not yet finished (streams until their last byte).
    pub in_flight: IntGaugeVec,
    /// Cache-aware decisions that followed a prefix match, and those that did not.
    pub cache_aware_hits_total: IntCounter,
    pub cache_aware_misses_total: IntCounter,
    /// From the request's arrival to the chosen worker's response headers.
    pub time_to_headers_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauges = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["worker"]).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let time_to_headers_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "sglang_router_time_to_headers_seconds",
                "From a request's arrival to its worker's response headers",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(time_to_headers_seconds.clone()))
            .expect("unique metric");
        Self {
            requests_total: vec(
                "sglang_router_requests_total",
                "Answers relayed from workers, by status code",
                &["worker", "status"],
            ),
            errors_total: vec(
                "sglang_router_errors_total",
                "Failures talking to a worker (connect, status, stream, timeout)",
                &["worker", "kind"],
            ),
            retries_total: counter(
                "sglang_router_retries_total",
                "Requests sent to another worker after one failed before answering",
            ),
            ejections_total: vec(
                "sglang_router_worker_ejections_total",
                "Workers taken out of the pool",
                &["worker"],
            ),
            worker_healthy: gauges(
                "sglang_router_worker_healthy",
                "1 while the worker is in the pool, 0 while ejected",
            ),
            in_flight: gauges(
                "sglang_router_in_flight_requests",
                "Requests routed to the worker and not yet finished",
            ),
            cache_aware_hits_total: counter(
                "sglang_router_cache_aware_hits_total",
                "Cache-aware decisions that followed a prefix match",
            ),
            cache_aware_misses_total: counter(
                "sglang_router_cache_aware_misses_total",
                "Cache-aware decisions that went to the least-loaded worker",
            ),
            time_to_headers_seconds,
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 metrics")
    }
}
