//! `sglang-router`: one HTTP front for many `sglang-server` workers.
//!
//! It routes `/generate`, `/v1/completions`, `/v1/chat/completions`, `/v1/messages`,
//! `/v1/responses` (and any other route, by load) to a worker chosen by `--policy`, passes
//! streams through without buffering, retries a request on another worker while nothing has
//! been answered, probes the workers' `/health`, and answers `/health`, `/workers`,
//! `/v1/models` and `/metrics` itself. On SIGTERM it drains: `/health` says 503, new requests
//! get 503, in-flight ones finish (up to `--shutdown-timeout`), then it exits 0.

mod args;
mod metrics;
mod prefix;
mod router;
mod workers;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{signal, SignalKind};

use crate::args::Args;
use crate::router::Router;

fn main() {
    let mut args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let router = Router::new(args.clone());
    for u in &args.worker_urls {
        router.pool.add(workers::normalise_url(u)?);
    }
    // the first probes before the first request, so a ready pool serves at once
    for w in router.pool.all() {
        router.probe(&w).await;
    }
    tokio::spawn(router.clone().probe_forever());
    if let Some(dns) = args.worker_dns.clone() {
        tokio::spawn(router.clone().discover_forever(dns));
    }
    tracing::info!(
        "routing on http://{addr}: policy {}, {} worker(s) in the pool",
        args.policy.name(),
        router.pool.healthy_except(&[]).len()
    );
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(drain_on_signal(router.clone(), stop_tx));
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop_rx => break,
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let r = router.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let r = r.clone();
                async move { Ok::<_, std::convert::Infallible>(r.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    tracing::info!("stopped");
    Ok(())
}

async fn drain_on_signal(router: Arc<Router>, stop: tokio::sync::oneshot::Sender<()>) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; SIGTERM will not drain");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    router.draining.store(true, Ordering::Release);
    let limit = Duration::from_secs_f64(router.args.shutdown_timeout);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let n = router.active.load(Ordering::Acquire);
        if n == 0 {
            tracing::info!("drained: every in-flight request finished");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("shutdown timeout: {n} request(s) still in flight");
                break;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let _ = stop.send(());
}
