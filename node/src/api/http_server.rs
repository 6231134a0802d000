//! The HTTP server under the API: hyper's HTTP/1 connection driver with the limits a server
//! facing untrusted clients needs, which `axum::serve` does not set.
//!
//! - **Connections**: at most [`Limits::max_connections`] at once. Past that a new connection
//!   is closed at once (counted in the log, not logged one by one), so a flood costs the node a
//!   file descriptor for a moment and no task or buffer.
//! - **Headers**: a request's headers must arrive within [`Limits::header_read_timeout`] of the
//!   first byte of the request, and an idle keep-alive connection is closed after the same time:
//!   clients that open connections and never finish their headers are cut off.
//! - **Bodies**: a body that stops sending for [`Limits::body_idle_timeout`] is cut off; a body
//!   of an ordinary call (not an image upload, which streams gigabytes) must be complete within
//!   [`Limits::body_total_timeout`]. A `Content-Length` above the call's cap is refused with 413
//!   before a byte of the body is read (see `limits_layer` in `api/mod.rs`).
//!
//! Every accepted connection is served until `shutdown`; then each is asked to finish its
//! current request, and the server returns once all are closed or after [`DRAIN_TIMEOUT`].

use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// How long shutdown waits for open requests to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub body_total_timeout: Duration,
}

impl From<&crate::config::HttpSection> for Limits {
    fn from(h: &crate::config::HttpSection) -> Self {
        Self {
            max_connections: h.max_connections,
            header_read_timeout: Duration::from_secs(h.header_read_timeout_secs),
            body_idle_timeout: Duration::from_secs(h.body_idle_timeout_secs),
            body_total_timeout: Duration::from_secs(h.body_timeout_secs),
        }
    }
}

/// Whether a request's body is a bulk stream that may take longer than ordinary calls: an
/// image upload. Its size has its own cap in the image service.
pub fn is_bulk_upload(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::PUT && path.starts_with("/image/") && path.ends_with("/file")
}

/// Serves `router` on `listener` with `limits` until `shutdown` resolves.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refused = Arc::new(AtomicU64::new(0));
    // Connections hold a receiver; shutdown sends on the channel and waits until none is left.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut last_report = tokio::time::Instant::now();
    loop {
        let (io, peer) = tokio::select! {
            _ = &mut shutdown => break,
            conn = listener.accept() => conn,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Dropping the stream closes it. Report refusals at most every 10 s.
            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = tokio::time::Instant::now();
                tracing::warn!(
                    refused_total = n,
                    max = limits.max_connections,
                    "API connection limit reached; refusing new connections"
                );
            }
            continue;
        };
        let router = router.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let bulk = is_bulk_upload(req.method(), req.uri().path());
                let mut req = req.map(|b| {
                    Body::new(TimedBody::new(
                        b,
                        limits.body_idle_timeout,
                        (!bulk).then_some(limits.body_total_timeout),
                    ))
                });
                req.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move {
                    let resp = match router.oneshot(req).await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "API connection ended");
                    }
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    drop(stop_rx);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, stop_tx.closed()).await;
    Ok(())
}

/// Why a body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    #[error("the request body stopped arriving for {0:?}")]
    Idle(Duration),
    #[error("the request body did not arrive in full within {0:?}")]
    Total(Duration),
}

/// A request body that fails when the client goes quiet for `idle` between frames, or when
/// the whole body has not arrived within `total`.
struct TimedBody {
    inner: Incoming,
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    total: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

impl TimedBody {
    fn new(inner: Incoming, idle: Duration, total: Option<Duration>) -> Self {
        Self {
            inner,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            total: total.map(|t| (t, Box::pin(tokio::time::sleep(t)))),
        }
    }
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.idle_timer.as_mut().reset(deadline);
                return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
            }
            Poll::Pending => {}
        }
        if let Some((t, timer)) = &mut this.total {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(BodyTimeout::Total(*t).into())));
            }
        }
        if this.idle_timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyTimeout::Idle(this.idle).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
