//! Connections: accepting them under a cap, and closing the ones that hold a descriptor without
//! using it, so that slow or idle clients cannot starve the others (slowloris).
//!
//! - A connection that waits for its next request longer than `--timeout-keep-alive` is
//!   closed (no byte of a request received, no response being written).
//! - Request headers must be complete within `--header-read-timeout` of the connection
//!   starting to wait for them (hyper's timer; this also ends a client that trickles bytes).
//! - A body must arrive within `--body-read-timeout` (408; in `super::read_body`).
//! - At most `--max-connections` are open (default: the open-file limit, raised to its hard
//!   limit at start-up, less a reserve). At the cap, the connection idle longest (no request
//!   in progress) is closed to make room; when every connection is busy the new one is closed
//!   at once. A failed `accept` for lack of descriptors does the same eviction.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::Request;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{AppState, Body};

/// Descriptors kept for everything that is not a connection (model files, logs, backups,
/// the runtime's own), beyond those open when the server starts.
const FD_RESERVE: usize = 64;

/// What the server knows of one open connection.
struct ConnState {
    /// Requests whose response is not fully written yet.
    busy: AtomicUsize,
    /// Bytes of a next request have arrived since the last response ended.
    reading: AtomicBool,
    /// Milliseconds since `Connections::epoch` of the last request's end (or the accept).
    idle_since_ms: AtomicU64,
    close: Notify,
}

/// The open connections, for the cap and the `sglang_http_connections` gauge.
pub struct Connections {
    epoch: Instant,
    cap: usize,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
}

impl Connections {
    pub fn new(cap: usize) -> Self {
        Self {
            epoch: Instant::now(),
            cap,
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Asks the connection idle longest to close (and stops counting it against the cap);
    /// false when every one is busy.
    fn evict_idlest(&self) -> bool {
        let mut open = self.open.lock();
        let idlest = open
            .iter()
            .filter(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, c)| c.idle_since_ms.load(Ordering::Acquire))
            .map(|(&id, _)| id);
        match idlest.and_then(|id| open.remove(&id)) {
            Some(c) => {
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// The cap on open connections: `--max-connections`, or what the open-file limit allows.
pub fn connection_cap(flag: Option<usize>) -> usize {
    let limit = raise_nofile_limit();
    let in_use = std::fs::read_dir("/proc/self/fd").map_or(16, |d| d.count());
    let allowed = limit.saturating_sub(in_use + FD_RESERVE).max(1);
    match flag {
        Some(n) if n > allowed => {
            tracing::warn!("--max-connections {n} exceeds what the open-file limit ({limit}) allows: using {allowed}");
            allowed
        }
        Some(n) => n,
        None => allowed,
    }
}

/// Raises the soft open-file limit to the hard one (as SGLang does) and returns it.
fn raise_nofile_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur.min(1 << 20) as usize
}

/// A TCP stream that notes when request bytes arrive (so a half-sent request is not idle).
struct Tracked {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.reading.store(true, Ordering::Release);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks its connection busy while alive: held by the response body until hyper has written
/// it (or the connection is gone).
struct BusyGuard {
    state: Arc<ConnState>,
    conns: Arc<AppState>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let now = self.conns.connections.now_ms();
        self.state.idle_since_ms.store(now, Ordering::Release);
        self.state.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts connections until `stop` resolves; each connection is served on its own task.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let closed = |reason: &str| {
        state
            .metrics
            .http_connections_closed_total
            .with_label_values(&[reason])
            .inc()
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // out of descriptors: make room, else wait for one to close
                    let no_fds = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                    if no_fds && state.connections.evict_idlest() {
                        closed("evicted");
                    } else {
                        tracing::warn!("accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(if no_fds { 5 } else { 50 })).await;
                    continue;
                }
            },
        };
        let conns = &state.connections;
        if conns.open.lock().len() >= conns.cap {
            if conns.evict_idlest() {
                closed("evicted");
            } else {
                closed("refused");
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let id = conns.next_id.fetch_add(1, Ordering::Relaxed);
        let cs = Arc::new(ConnState {
            busy: AtomicUsize::new(0),
            reading: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(conns.now_ms()),
            close: Notify::new(),
        });
        conns.open.lock().insert(id, cs.clone());
        state.metrics.http_connections.inc();
        let state = state.clone();
        tokio::spawn(async move {
            let reason = run_connection(&state, stream, cs).await;
            state.connections.open.lock().remove(&id);
            state.metrics.http_connections.dec();
            if let Some(reason) = reason {
                tracing::debug!("connection from {peer} closed: {reason}");
                state
                    .metrics
                    .http_connections_closed_total
                    .with_label_values(&[reason])
                    .inc();
            }
        });
    }
}

/// Serves one connection until it ends; `Some(reason)` when the server closed it.
async fn run_connection(
    state: &Arc<AppState>,
    stream: TcpStream,
    cs: Arc<ConnState>,
) -> Option<&'static str> {
    let args = &state.args;
    let keep_alive = Duration::from_secs_f64(args.timeout_keep_alive);
    let io = hyper_util::rt::TokioIo::new(Tracked {
        inner: stream,
        state: cs.clone(),
    });
    let service = {
        let state = state.clone();
        let cs = cs.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            cs.busy.fetch_add(1, Ordering::AcqRel);
            cs.reading.store(false, Ordering::Release);
            let guard = BusyGuard {
                state: cs.clone(),
                conns: state.clone(),
            };
            let state = state.clone();
            async move {
                let resp = super::handle(state, req).await?;
                Ok::<_, std::convert::Infallible>(resp.map(|b| with_guard(b, guard)))
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs_f64(args.header_read_timeout))
        .serve_connection(io, service);
    tokio::pin!(conn);
    let tick = keep_alive.min(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                return match r {
                    Err(e) if e.is_timeout() => Some("header_timeout"),
                    _ => None,
                };
            }
            // counted as evicted where it was asked; a request that began meanwhile goes on
            _ = cs.close.notified() => if cs.busy.load(Ordering::Acquire) == 0 { return None },
            _ = tokio::time::sleep(tick) => {
                let idle = cs.busy.load(Ordering::Acquire) == 0
                    && !cs.reading.load(Ordering::Acquire);
                let since = cs.idle_since_ms.load(Ordering::Acquire);
                let now = state.connections.now_ms();
                if idle && now.saturating_sub(since) >= keep_alive.as_millis() as u64 {
                    return Some("idle");
                }
            }
        }
    }
}

/// The response body, keeping `guard` alive until hyper drops it (written or abandoned). Its
/// size hint and end are the inner body's, so a sized response keeps its Content-Length.
fn with_guard(body: Body, guard: BusyGuard) -> Body {
    use http_body_util::BodyExt;
    Guarded {
        inner: body,
        _guard: guard,
    }
    .boxed()
}

struct Guarded {
    inner: Body,
    _guard: BusyGuard,
}

impl hyper::body::Body for Guarded {
    type Data = <Body as hyper::body::Body>::Data;
    type Error = <Body as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
