//! Command-line flags, each with an `SGLANG_ROUTER_*` environment fallback (the flag wins).
//! Names and defaults follow SGLang's router where it has the same knob.

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Policy {
    /// The worker whose cache holds the longest prefix of the prompt, unless overloaded.
    CacheAware,
    RoundRobin,
    Random,
    /// The less loaded of two workers drawn at random.
    PowerOfTwo,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::CacheAware => "cache_aware",
            Policy::RoundRobin => "round_robin",
            Policy::Random => "random",
            Policy::PowerOfTwo => "power_of_two",
        }
    }
}

#[derive(Parser, Clone, Debug)]
#[command(
    name = "sglang-router",
    version,
    about = "Routes requests over many sglang-server workers, by prompt-prefix cache affinity \
             (default), round robin, random choice or the power of two choices"
)]
pub struct Args {
    /// Workers (http://host:port), comma-separated or repeated.
    #[arg(long, env = "SGLANG_ROUTER_WORKER_URLS", value_delimiter = ',', num_args = 1..)]
    pub worker_urls: Vec<String>,
    /// A DNS name and port (`name:port`) whose addresses are the workers, re-resolved every
    /// --dns-refresh-secs (a Kubernetes headless Service).
    #[arg(long, env = "SGLANG_ROUTER_WORKER_DNS")]
    pub worker_dns: Option<String>,
    #[arg(long, env = "SGLANG_ROUTER_DNS_REFRESH_SECS", default_value_t = 10.0)]
    pub dns_refresh_secs: f64,
    #[arg(long, env = "SGLANG_ROUTER_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "SGLANG_ROUTER_PORT", default_value_t = 30000)]
    pub port: u16,
    #[arg(long, env = "SGLANG_ROUTER_POLICY", value_enum, default_value_t = Policy::CacheAware)]
    pub policy: Policy,
    /// cache_aware: the share of the prompt a worker's match must cover to be followed.
    #[arg(long, env = "SGLANG_ROUTER_CACHE_THRESHOLD", default_value_t = 0.3)]
    pub cache_threshold: f64,
    /// cache_aware: a matched worker is overloaded when it runs more than this many requests
    /// above the least-loaded worker ...
    #[arg(
        long,
        env = "SGLANG_ROUTER_BALANCE_ABS_THRESHOLD",
        default_value_t = 32
    )]
    pub balance_abs_threshold: usize,
    /// ... and more than this many times its load.
    #[arg(
        long,
        env = "SGLANG_ROUTER_BALANCE_REL_THRESHOLD",
        default_value_t = 1.5
    )]
    pub balance_rel_threshold: f64,
    /// cache_aware: bytes of prompt text remembered per worker (least recently used go first).
    #[arg(long, env = "SGLANG_ROUTER_MAX_TREE_SIZE", default_value_t = 1 << 26)]
    pub max_tree_size: usize,
    #[arg(
        long,
        env = "SGLANG_ROUTER_HEALTH_CHECK_INTERVAL_SECS",
        default_value_t = 5.0
    )]
    pub health_check_interval_secs: f64,
    #[arg(
        long,
        env = "SGLANG_ROUTER_HEALTH_CHECK_TIMEOUT_SECS",
        default_value_t = 5.0
    )]
    pub health_check_timeout_secs: f64,
    /// Consecutive failed probes that eject a worker (a failed request ejects at once).
    #[arg(
        long,
        env = "SGLANG_ROUTER_HEALTH_FAILURE_THRESHOLD",
        default_value_t = 2
    )]
    pub health_failure_threshold: u32,
    /// Consecutive good probes that (re-)admit a worker.
    #[arg(
        long,
        env = "SGLANG_ROUTER_HEALTH_SUCCESS_THRESHOLD",
        default_value_t = 1
    )]
    pub health_success_threshold: u32,
    /// Other workers tried when one fails before answering.
    #[arg(long, env = "SGLANG_ROUTER_MAX_RETRIES", default_value_t = 2)]
    pub max_retries: usize,
    /// How long a worker may take to send its response headers.
    #[arg(
        long,
        env = "SGLANG_ROUTER_REQUEST_TIMEOUT_SECS",
        default_value_t = 600.0
    )]
    pub request_timeout_secs: f64,
    #[arg(long, env = "SGLANG_ROUTER_MAX_REQUEST_BYTES", default_value_t = 32 << 20)]
    pub max_request_bytes: usize,
    /// The key clients must send (`Authorization: Bearer KEY` or `x-api-key`); without it,
    /// clients' own keys pass through to the workers.
    #[arg(long, env = "SGLANG_ROUTER_API_KEY")]
    pub api_key: Option<String>,
    /// The key sent to the workers in place of the client's.
    #[arg(long, env = "SGLANG_ROUTER_WORKER_API_KEY")]
    pub worker_api_key: Option<String>,
    /// On SIGTERM: how long in-flight requests may run before the router exits anyway.
    #[arg(long, env = "SGLANG_ROUTER_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    #[arg(long, env = "SGLANG_ROUTER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl Args {
    pub fn validate(&mut self) -> Result<(), String> {
        self.worker_urls.retain(|u| !u.trim().is_empty());
        if self.api_key.as_deref() == Some("") {
            self.api_key = None;
        }
        if self.worker_api_key.as_deref() == Some("") {
            self.worker_api_key = None;
        }
        if self.worker_urls.is_empty() && self.worker_dns.is_none() {
            return Err(
                "give the workers: --worker-urls URL[,URL...] or --worker-dns NAME:PORT".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.cache_threshold) {
            return Err(format!(
                "--cache-threshold must be between 0 and 1, got {}",
                self.cache_threshold
            ));
        }
        if self.balance_rel_threshold < 1.0 {
            return Err(format!(
                "--balance-rel-threshold must be at least 1, got {}",
                self.balance_rel_threshold
            ));
        }
        for (name, v) in [
            (
                "--health-check-interval-secs",
                self.health_check_interval_secs,
            ),
            (
                "--health-check-timeout-secs",
                self.health_check_timeout_secs,
            ),
            ("--dns-refresh-secs", self.dns_refresh_secs),
            ("--request-timeout-secs", self.request_timeout_secs),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!(
                    "{name} must be a positive number of seconds, got {v}"
                ));
            }
        }
        if self.health_failure_threshold == 0 || self.health_success_threshold == 0 {
            return Err(
                "--health-failure-threshold and --health-success-threshold must be at least 1"
                    .into(),
            );
        }
        if let Some(dns) = &self.worker_dns {
            if dns
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return Err(format!("--worker-dns must be NAME:PORT, got `{dns}`"));
            }
        }
        Ok(())
    }
}
