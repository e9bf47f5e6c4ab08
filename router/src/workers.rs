//! The pool of workers: who they are (fixed URLs or a DNS name re-resolved on an interval),
//! whether they are in the pool (health probes, and failed requests, eject; probes re-admit),
//! and how many requests each is running.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::router::Router;

pub struct Worker {
    pub id: u32,
    /// `http://host:port`, no trailing slash.
    pub url: String,
    healthy: AtomicBool,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    successes: AtomicU32,
}

impl Worker {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn load(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Counts a request against its worker until dropped (a stream: until its last byte).
pub struct InFlight {
    worker: Arc<Worker>,
    router: Arc<Router>,
}

impl InFlight {
    pub fn new(router: &Arc<Router>, worker: &Arc<Worker>) -> Self {
        worker.in_flight.fetch_add(1, Ordering::AcqRel);
        router
            .metrics
            .in_flight
            .with_label_values(&[&worker.url])
            .inc();
        Self {
            worker: worker.clone(),
            router: router.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.worker.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.router
            .metrics
            .in_flight
            .with_label_values(&[&self.worker.url])
            .dec();
    }
}

/// Normalises a worker address: a scheme is added when missing, a trailing slash dropped.
pub fn normalise_url(url: &str) -> Result<String, String> {
    let raw = url.trim();
    let full = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let u = full
        .parse::<hyper::Uri>()
        .map_err(|e| format!("worker URL `{raw}`: {e}"))?;
    match (u.scheme_str(), u.authority(), u.path()) {
        (Some("http"), Some(a), "/" | "") if u.host().is_some_and(|h| !h.is_empty()) => {
            Ok(format!("http://{a}"))
        }
        _ => Err(format!(
            "worker URL `{raw}`: only http://host:port workers (no path) are supported"
        )),
    }
}

#[derive(Default)]
pub struct Pool {
    workers: RwLock<Vec<Arc<Worker>>>,
    next_id: AtomicU32,
}

impl Pool {
    /// Adds `url` (not yet in the pool until its first good probe) unless already known.
    pub fn add(&self, url: String) -> Option<Arc<Worker>> {
        let mut ws = self.workers.write();
        if ws.iter().any(|w| w.url == url) {
            return None;
        }
        let w = Arc::new(Worker {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            url,
            healthy: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
        });
        ws.push(w.clone());
        Some(w)
    }

    /// Removes the workers whose URL `keep` rejects; returns them.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Vec<Arc<Worker>> {
        let mut ws = self.workers.write();
        let (kept, gone) = ws.drain(..).partition(|w| keep(&w.url));
        *ws = kept;
        gone
    }

    pub fn all(&self) -> Vec<Arc<Worker>> {
        self.workers.read().clone()
    }

    /// The workers in the pool, less `excluded` (ids).
    pub fn healthy_except(&self, excluded: &[u32]) -> Vec<Arc<Worker>> {
        self.workers
            .read()
            .iter()
            .filter(|w| w.healthy() && !excluded.contains(&w.id))
            .cloned()
            .collect()
    }
}

impl Router {
    /// Takes `w` out of the pool (its requests fail over to others until a probe re-admits it).
    pub fn eject(&self, w: &Worker, why: &str) {
        w.successes.store(0, Ordering::Release);
        if w.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!("worker {} ejected: {why}", w.url);
            let m = &self.metrics;
            m.ejections_total.with_label_values(&[&w.url]).inc();
            m.worker_healthy.with_label_values(&[&w.url]).set(0);
            // a worker that failed may come back as a fresh process with an empty cache
            self.index.lock().remove_worker(w.id);
        }
    }

    fn admit(&self, w: &Worker) {
        if !w.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!("worker {} in the pool", w.url);
            self.metrics
                .worker_healthy
                .with_label_values(&[&w.url])
                .set(1);
        }
    }

    /// One probe of `w`'s `/health`: counts towards ejection or admission.
    pub async fn probe(self: &Arc<Self>, w: &Arc<Worker>) {
        let ok = match self.get(w, "/health").await {
            Ok((status, _)) if status.is_success() => Ok(()),
            Ok((status, _)) => Err(format!("/health answered {status}")),
            Err(e) => Err(e),
        };
        let a = &self.args;
        match ok {
            Ok(()) => {
                w.failures.store(0, Ordering::Release);
                let n = w.successes.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= a.health_success_threshold {
                    self.admit(w);
                    if self.models.read().is_none() {
                        if let Ok((s, body)) = self.get(w, "/v1/models").await {
                            if s.is_success() {
                                *self.models.write() = serde_json::from_slice(&body).ok();
                            }
                        }
                    }
                }
            }
            Err(e) => {
                w.successes.store(0, Ordering::Release);
                let n = w.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= a.health_failure_threshold {
                    self.eject(w, &format!("{n} failed probe(s), last: {e}"));
                }
            }
        }
    }

    /// Probes every worker each `--health-check-interval-secs`.
    pub async fn probe_forever(self: Arc<Self>) {
        let every = Duration::from_secs_f64(self.args.health_check_interval_secs);
        loop {
            let probes: Vec<_> = self
                .pool
                .all()
                .into_iter()
                .map(|w| {
                    let r = self.clone();
                    tokio::spawn(async move { r.probe(&w).await })
                })
                .collect();
            for p in probes {
                let _ = p.await;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Re-resolves `--worker-dns` (`name:port`, a Kubernetes headless Service) each
    /// `--dns-refresh-secs`: new addresses join (after a good probe), vanished ones leave.
    pub async fn discover_forever(self: Arc<Self>, name: String) {
        let every = Duration::from_secs_f64(self.args.dns_refresh_secs);
        loop {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => {
                    let urls: Vec<String> = addrs.map(|a| format!("http://{a}")).collect();
                    for u in &urls {
                        if let Some(w) = self.pool.add(u.clone()) {
                            tracing::info!("discovered worker {u} ({name})");
                            let r = self.clone();
                            tokio::spawn(async move { r.probe(&w).await });
                        }
                    }
                    for gone in self.pool.retain(|u| urls.iter().any(|x| x == u)) {
                        tracing::info!("worker {} left {name}", gone.url);
                        self.index.lock().remove_worker(gone.id);
                        self.metrics
                            .worker_healthy
                            .with_label_values(&[&gone.url])
                            .set(0);
                    }
                }
                Err(e) => tracing::warn!("cannot resolve {name}: {e} (keeping the pool as is)"),
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_urls_are_normalised_and_checked() {
        assert_eq!(
            normalise_url("127.0.0.1:30001/").unwrap(),
            "http://127.0.0.1:30001"
        );
        assert_eq!(normalise_url("http://w1:8000").unwrap(), "http://w1:8000");
        assert!(normalise_url("https://w1:8000")
            .unwrap_err()
            .contains("only http://"));
        assert!(normalise_url("http://").is_err());
        assert!(normalise_url("http://w1:8000/v1").is_err());
    }
}
