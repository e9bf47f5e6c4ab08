//! `sglang-server [serve]`: bind, load the model in the background (`/health` says "starting"
//! meanwhile), serve, and on SIGTERM or SIGINT drain: new requests get 503, in-flight ones run
//! to completion up to `--shutdown-timeout`, then the process exits 0. A second signal stops
//! at once.
//!
//! In a multi-process tensor-parallel group only rank 0 serves; the other ranks run the steps
//! it sends and exit when it stops (status 0) or when the group fails (status 1).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sglang::engine::EngineHandle;
use sglang::metrics::Metrics;
use tokio::signal::unix::{signal, SignalKind};

use crate::args::ServerArgs;
use crate::http::health::{self, Health};
use crate::http::{self, AppState};

pub fn run(mut args: ServerArgs) -> Result<(), String> {
    args.drop_empty_keys_from_env();
    args.validate()?;
    let mut cfg = args.engine.to_config()?;
    cfg.max_queued_requests = args.max_queued_requests;
    if cfg.world_size > 1 && cfg.rank > 0 {
        // ranks 1.. of a multi-process group serve no HTTP: they run rank 0's steps
        return sglang::runner::serve_rank(&cfg).map_err(|e| e.to_string());
    }
    let served_model_name = args.served_model_name.clone().unwrap_or_else(|| {
        cfg.model_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".into())
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // tokenizing, templating and grammar compilation run here, off the async threads
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let result = runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tracing::info!(
            "listening on http://{addr} (model {})",
            cfg.model_path.display()
        );
        let metrics = Arc::new(Metrics::new());
        let cap = http::connection_cap(args.max_connections);
        tracing::info!("at most {cap} open connections");
        let state = Arc::new(AppState {
            args,
            engine: OnceLock::new(),
            metrics: metrics.clone(),
            health: Health::default(),
            served_model_name,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            responses: Default::default(),
            connections: http::Connections::new(cap),
        });
        // Load the model off the async threads; /health answers "starting" meanwhile.
        let loader_state = state.clone();
        tokio::task::spawn_blocking(
            move || match EngineHandle::start_with_metrics(cfg, metrics) {
                Ok(engine) => {
                    let info = engine.info();
                    tracing::info!(
                        "ready: {} backend, context {} tokens, KV pool {} tokens",
                        info.backend,
                        info.context_length,
                        info.kv_capacity_tokens
                    );
                    let _ = loader_state.engine.set(engine);
                    health::probe(&loader_state);
                }
                Err(e) => {
                    tracing::error!("cannot load the model: {e}");
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            },
        );
        health::spawn_prober(state.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(drain_on_signal(state.clone(), stop_tx));
        http::serve(state.clone(), listener, async {
            let _ = stop_rx.await;
        })
        .await;
        if let Some(engine) = state.engine.get() {
            engine.shutdown_and_join();
        }
        tracing::info!("stopped");
        Ok(())
    });
    // Blocking work still running (a runaway template, say) must not keep the process alive
    // past the drain: give it a moment, then exit regardless.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn drain_on_signal(state: Arc<AppState>, stop: tokio::sync::oneshot::Sender<()>) {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::warn!("cannot install signal handlers; SIGTERM will not drain");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    state.draining.store(true, Ordering::Release);
    if let Some(engine) = state.engine.get() {
        engine.set_draining(true);
    }
    let limit = Duration::from_secs_f64(state.args.shutdown_timeout);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let in_flight =
            state.active.load(Ordering::Acquire) + state.engine.get().map_or(0, |e| e.in_flight());
        if in_flight == 0 {
            tracing::info!("drained: every in-flight request finished");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("shutdown timeout ({} s): {in_flight} request(s) still in flight", limit.as_secs_f64());
                break;
            }
            _ = term.recv() => { tracing::warn!("second signal: stopping now"); break }
            _ = int.recv() => { tracing::warn!("second signal: stopping now"); break }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let _ = stop.send(());
}
